"""Local acceptance at a site: the model checked on the site's own labelled images, and its
calibration and threshold refitted there (``model calibrate``, ``model compare``).

A model trained on one centre's images does not keep its operating point at another: its
ranking (AUC) travels much better than its threshold. So a site labels a sample of its own
studies (radiologist ground truth), and this module

1. reads the sample: a CSV of SOP Instance UIDs of stored instances with their labels, or a
   folder with ``NORMAL/`` and ``PNEUMONIA/`` sub-folders of image or DICOM files;
2. scores every case through the serving path: the worker's eligibility check and
   normalisation (:func:`pacs_classifier.preprocess.serving_tensor`, under the configured
   ``[eligibility]``) and the runtime the worker would load for that bundle
   (``model.runtime``); a case the serving path refuses is counted as not assessed, as it
   would be in service, and kept out of the metrics;
3. refits the calibration (temperature and bias) on the model's raw outputs and the
   threshold that keeps the target sensitivity on the calibrated probabilities;
4. checks that the sample is big enough: the exact (Clopper-Pearson) lower confidence bound
   of the sensitivity and of the specificity at the new threshold must reach the configured
   floors; if not, it says how many more positive and negative cases are needed.

The sensitivity at a threshold chosen on the same cases is at least the target by
construction, so its bound measures how many positives there are, not how good the model
is; an independent second sample (``model compare``) is the honest check of the new
operating point.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_classifier.config import AcceptanceConfig, Config, EligibilityConfig
from pacs_classifier.db.audit import append_event
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import Instance, Model, utcnow
from pacs_classifier.errors import ModelError, NotAssessable, PermanentError
from pacs_classifier.model import metrics as mt
from pacs_classifier.model.bundle import CLASS_NAMES, METADATA_FILE, BundleInfo, read_bundle
from pacs_classifier.model.bundle import write_metadata as write_bundle_metadata
from pacs_classifier.model.metadata import (
    AcceptanceBounds,
    BundleMetadata,
    Calibration,
    DerivedFrom,
    SiteAcceptance,
    SitePoint,
    SiteSample,
    Threshold,
    ValidationMetrics,
)
from pacs_classifier.model.registry import register_bundle
from pacs_classifier.model.runtime import (
    Predictor,
    auto_choice,
    calibrate,
    load_predictor,
    read_runtimes,
)
from pacs_classifier.model.validation_scores import FILE as VALIDATION_SCORES_FILE
from pacs_classifier.model.validation_scores import write_validation_scores
from pacs_classifier.times import format_utc

log = logging.getLogger(__name__)

NEGATIVE, POSITIVE = CLASS_NAMES
#: The columns a labels CSV must have (others, e.g. an accession number, are ignored).
UID_COLUMN, LABEL_COLUMN = "sop_instance_uid", "label"
#: Bootstrap replicates of the intervals printed beside each metric.
N_BOOT = 1000
#: The largest sample size searched for when saying how many cases are needed.
MAX_CASES = 20_000
_LOOKUP_CHUNK = 500

#: Loads a predictor for a bundle folder and a runtime name (the worker's loader).
PredictorLoader = Callable[[str, str], Predictor]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


class SampleError(PermanentError):
    """The labelled sample cannot be read: bad CSV, unknown UID, bad folder."""


class SampleTooSmall(PermanentError):
    """The sample cannot bound the operating point well enough; nothing was registered."""

    def __init__(self, adequacy: Adequacy) -> None:
        self.adequacy = adequacy
        super().__init__(adequacy.refusal())


# --------------------------------------------------------------------------- the sample


@dataclass(frozen=True)
class Case:
    """One labelled case: a stored instance (by UID) or a file of a labelled folder."""

    ref: str
    label: int  # 1: PNEUMONIA, 0: NORMAL
    path: Path
    instance_id: int | None = None


@dataclass(frozen=True)
class Sample:
    """A site's labelled cases, as given (file or folder)."""

    source: str
    kind: str  # "instances" or "folder"
    cases: tuple[Case, ...]

    @property
    def digest(self) -> str:
        """SHA-256 of the sorted ``ref:LABEL`` lines: names the sample in the provenance."""
        lines = sorted(f"{c.ref}:{CLASS_NAMES[c.label]}\n" for c in self.cases)
        return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()

    @property
    def positives(self) -> int:
        return sum(c.label for c in self.cases)

    @property
    def negatives(self) -> int:
        return len(self.cases) - self.positives


def load_sample(labels: Path, *, session: Session | None, storage_root: Path) -> Sample:
    """A labels CSV of stored instances (needs ``session``) or a labelled folder."""
    if labels.is_dir():
        return read_folder(labels)
    if not labels.is_file():
        raise SampleError(f"--labels {labels}: no such file or folder")
    if session is None:
        raise SampleError(f"--labels {labels}: a CSV of stored instances needs the database")
    return read_instances(session, labels, storage_root)


def _label(text: str) -> int | None:
    value = text.strip().upper()
    return CLASS_NAMES.index(value) if value in CLASS_NAMES else None


def read_labels_csv(path: Path) -> list[tuple[int, str, int]]:
    """(line number, SOP Instance UID, label) for each row of a labels CSV."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SampleError(f"{path}: cannot be read: {exc}") from None
    reader = csv.reader(text.splitlines())
    header = [h.strip().lower() for h in next(reader, [])]
    if UID_COLUMN not in header or LABEL_COLUMN not in header:
        raise SampleError(
            f"{path}: the first line must name the columns {UID_COLUMN} and {LABEL_COLUMN} "
            f"(comma-separated), received {','.join(header)!r}"
        )
    uid_at, label_at = header.index(UID_COLUMN), header.index(LABEL_COLUMN)
    rows: list[tuple[int, str, int]] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(uid_at, label_at):
            raise SampleError(f"{path} line {line}: expected {len(header)} columns")
        uid, label = row[uid_at].strip(), _label(row[label_at])
        if label is None:
            raise SampleError(
                f"{path} line {line}: label must be {POSITIVE} or {NEGATIVE}, "
                f"received {row[label_at].strip()!r}"
            )
        if uid in seen:
            raise SampleError(f"{path} line {line}: {uid} is listed twice (line {seen[uid]})")
        seen[uid] = line
        rows.append((line, uid, label))
    if not rows:
        raise SampleError(f"{path}: no labelled instances")
    return rows


def read_instances(session: Session, path: Path, storage_root: Path) -> Sample:
    """The newest stored version of each UID the CSV names; an unknown UID is an error."""
    rows = read_labels_csv(path)
    newest: dict[str, tuple[int, str]] = {}
    uids = [uid for _, uid, _ in rows]
    for start in range(0, len(uids), _LOOKUP_CHUNK):
        chunk = uids[start : start + _LOOKUP_CHUNK]
        found = session.execute(
            select(Instance.sop_instance_uid, Instance.id, Instance.file_path)
            .where(Instance.sop_instance_uid.in_(chunk))
            .order_by(Instance.id)
        ).all()
        for uid, instance_id, file_path in found:
            newest[uid] = (instance_id, file_path)  # ordered by id: the newest version wins
    missing = [(line, uid) for line, uid, _ in rows if uid not in newest]
    if missing:
        line, uid = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SampleError(f"{path} line {line}: no stored instance has UID {uid}{more}")
    cases = []
    for _, uid, label in rows:
        instance_id, file_path = newest[uid]
        stored = Path(file_path)
        stored = stored if stored.is_absolute() else storage_root / stored
        cases.append(Case(uid, label, stored, instance_id))
    return Sample(str(path.resolve()), "instances", tuple(cases))


def read_folder(folder: Path) -> Sample:
    """Every file in ``NORMAL/`` and ``PNEUMONIA/`` (hidden files aside)."""
    subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [d for d in subdirs if d not in CLASS_NAMES]
    if unknown:
        raise SampleError(
            f"{folder}: sub-folder {unknown[0]!r} is not a class; "
            f"expected {NEGATIVE}/ and {POSITIVE}/"
        )
    cases = [
        Case(f"{name}/{file.name}", label, file)
        for label, name in enumerate(CLASS_NAMES)
        if (folder / name).is_dir()
        for file in sorted((folder / name).iterdir())
        if file.is_file() and not file.name.startswith(".")
    ]
    if not cases:
        raise SampleError(f"{folder}: no files in {NEGATIVE}/ or {POSITIVE}/")
    return Sample(str(folder.resolve()), "folder", tuple(cases))


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Scores:
    """The model's raw (uncalibrated) output for each assessed case of a sample."""

    sample: Sample
    runtime: str
    y: IntArray
    raw: FloatArray
    #: Cases the serving path refused, by reason code (kept out of every metric).
    not_assessed: dict[str, int] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def positives(self) -> int:
        return int(self.y.sum())

    @property
    def negatives(self) -> int:
        return self.n - self.positives


def score_sample(
    sample: Sample, predictor: Predictor, rules: EligibilityConfig, *, batch_size: int = 16
) -> Scores:
    """Each case through the serving path, in batches; refused cases are counted.

    The serving path is the worker's: eligibility and normalisation, the model, then the
    bundle's out-of-distribution check on the model's features (a case it refuses is
    ``out_of_distribution``, as in service; no check when the bundle has none or the
    runtime returns no features).
    """
    from pacs_classifier.model.ood import read_ood
    from pacs_classifier.preprocess import reasons, serving_tensor

    size = predictor.info.image_size
    ood = read_ood(predictor.info)
    labels: list[IntArray] = []
    raw: list[FloatArray] = []
    refused: Counter[str] = Counter()
    batch: list[tuple[npt.NDArray[np.float32], int]] = []

    def flush() -> None:
        if not batch:
            return
        x = np.stack([tensor for tensor, _ in batch])
        y = np.asarray([label for _, label in batch], dtype=np.int64)
        batch.clear()
        out = predictor.raw_predict(x)
        features = predictor.infer(x).features if ood is not None else None
        if ood is not None and features is not None:
            keep = ood.score(features) <= ood.threshold
            if not keep.all():
                refused[reasons.OUT_OF_DISTRIBUTION] += int((~keep).sum())
                out, y = out[keep], y[keep]
        raw.append(out)
        labels.append(y)

    for done, case in enumerate(sample.cases):
        if done and done % 100 == 0:
            log.info("sample: %d of %d cases read", done, len(sample.cases))
        try:
            tensor = serving_tensor(case.path, size, rules=rules)
        except NotAssessable as exc:
            # DEBUG: a labelled folder's file names are the site's, and may name patients.
            log.debug("sample case %s: not assessed, %s", case.ref, exc.reason)
            refused[exc.reason] += 1
            continue
        except OSError as exc:
            raise SampleError(f"{case.ref}: file {case.path} cannot be read: {exc}") from None
        batch.append((tensor, case.label))
        if len(batch) >= batch_size:
            flush()
    flush()
    return Scores(
        sample,
        predictor.runtime,
        np.concatenate(labels) if labels else np.zeros((0,), dtype=np.int64),
        np.concatenate(raw) if raw else np.zeros((0,), dtype=np.float64),
        dict(sorted(refused.items())),
    )


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Evaluation:
    """One model version's calibration and threshold, and what they give on a sample."""

    version: str
    temperature: float
    bias: float
    threshold: float
    #: ``metrics.point_metrics`` plus ``ci95``: percentile bootstrap intervals.
    metrics: dict[str, Any]


def evaluate(
    scores: Scores,
    version: str,
    calibration: tuple[float, float],
    threshold: float,
    *,
    seed: int = 0,
) -> Evaluation:
    """The served probabilities (``calibrate(raw, T, b)``, as every runtime applies it) at
    ``threshold``, with bootstrap intervals."""
    p = calibrate(scores.raw, *calibration)
    m = mt.point_metrics(scores.y, p, threshold)
    m["ci95"] = mt.bootstrap_intervals(scores.y, p, threshold, n_boot=N_BOOT, seed=seed)
    return Evaluation(version, calibration[0], calibration[1], threshold, m)


def refit(scores: Scores, target_sensitivity: float) -> tuple[tuple[float, float], float]:
    """Platt scaling (temperature and bias) on the raw outputs, then the highest threshold
    keeping ``target_sensitivity`` on the calibrated probabilities."""
    temperature, bias = mt.fit_platt(scores.y, scores.raw)
    p = calibrate(scores.raw, temperature, bias)
    return (temperature, bias), mt.threshold_for_sensitivity(scores.y, p, target_sensitivity)


# --------------------------------------------------------------------------- sample size


def lower_bounds(
    successes: npt.ArrayLike, n: npt.ArrayLike, confidence: float
) -> npt.NDArray[np.float64]:
    """Exact (Clopper-Pearson) lower bounds of a proportion, two-sided ``confidence``."""
    from scipy.stats import beta

    x = np.asarray(successes, dtype=np.float64)
    total = np.asarray(n, dtype=np.float64)
    alpha = 1 - confidence
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(alpha / 2, x, total - x + 1)
    return np.asarray(np.where(x > 0, bound, 0.0), dtype=np.float64)


def lower_bound(successes: int, n: int, confidence: float) -> float:
    return float(lower_bounds([successes], [n], confidence)[0]) if n else 0.0


def cases_needed(
    successes_at: Callable[[IntArray], IntArray], floor: float, confidence: float
) -> int | None:
    """The smallest count of cases from which on every larger one keeps the lower bound at
    or above ``floor`` (the bound wobbles with rounding); None when none up to
    :data:`MAX_CASES` does: more cases would not help."""
    n = np.arange(1, MAX_CASES + 1, dtype=np.int64)
    short = np.flatnonzero(lower_bounds(successes_at(n), n, confidence) < floor)
    if len(short) == 0:
        return 1
    if short[-1] == len(n) - 1:
        return None
    return int(n[short[-1] + 1])


@dataclass(frozen=True)
class Adequacy:
    """Whether a sample bounds the new operating point well enough, and what it lacks."""

    positives: int
    negatives: int
    sensitivity: float
    specificity: float
    sensitivity_lower: float
    specificity_lower: float
    acceptance: AcceptanceConfig
    #: Cases of each class needed in all; None: no sample size would reach the floor.
    positives_needed: int | None
    negatives_needed: int | None

    @property
    def ok(self) -> bool:
        a = self.acceptance
        return (
            self.positives > 0
            and self.negatives > 0
            and self.sensitivity_lower >= a.sensitivity_floor
            and self.specificity_lower >= a.specificity_floor
        )

    def bounds_text(self) -> str:
        a, level = self.acceptance, f"{self.acceptance.confidence:.0%}"
        return (
            f"sensitivity {_num(self.sensitivity)} (lower {level} bound "
            f"{self.sensitivity_lower:.3f}, floor {a.sensitivity_floor:.2f}, "
            f"{self.positives} {POSITIVE}), specificity {_num(self.specificity)} (lower bound "
            f"{self.specificity_lower:.3f}, floor {a.specificity_floor:.2f}, "
            f"{self.negatives} {NEGATIVE})"
        )

    def refusal(self) -> str:
        """One line: why the sample is refused and what would make it enough."""
        if self.negatives_needed is None:
            return (
                f"refused: at the new threshold the {self.bounds_text()}; the specificity "
                "itself is under the floor, so more cases will not help: the model does not "
                "suit this site at this target sensitivity"
            )
        more_pos = max(0, (self.positives_needed or 0) - self.positives)
        more_neg = max(0, self.negatives_needed - self.negatives)
        return (
            f"sample too small: at the new threshold the {self.bounds_text()}; add at least "
            f"{more_pos} {POSITIVE} and {more_neg} {NEGATIVE} cases "
            f"({self.positives_needed} and {self.negatives_needed} in all)"
        )


def _num(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.3f}"


def assess(
    y: npt.ArrayLike,
    p: npt.ArrayLike,
    threshold: float,
    target_sensitivity: float,
    acceptance: AcceptanceConfig,
) -> Adequacy:
    """The exact lower bounds at ``threshold`` and the sample size that would clear them.

    Positives needed: the refitted threshold keeps ``ceil(target × n)`` of ``n`` positives,
    so the count follows from the target and the floor alone. Negatives needed: at the
    specificity observed here (all correct when there are none yet, so "at least").
    """
    c = mt.confusion(y, p, threshold)
    pos, neg = c["tp"] + c["fn"], c["tn"] + c["fp"]
    conf = acceptance.confidence
    sens = c["tp"] / pos if pos else float("nan")
    spec = c["tn"] / neg if neg else float("nan")
    spec_rate = spec if neg else 1.0
    return Adequacy(
        positives=pos,
        negatives=neg,
        sensitivity=sens,
        specificity=spec,
        sensitivity_lower=lower_bound(c["tp"], pos, conf),
        specificity_lower=lower_bound(c["tn"], neg, conf),
        acceptance=acceptance,
        positives_needed=cases_needed(
            lambda n: np.ceil(target_sensitivity * n - 1e-9).astype(np.int64),
            acceptance.sensitivity_floor,
            conf,
        ),
        negatives_needed=cases_needed(
            lambda n: np.floor(spec_rate * n + 1e-9).astype(np.int64),
            acceptance.specificity_floor,
            conf,
        ),
    )


def target_sensitivity(info: BundleInfo, acceptance: AcceptanceConfig) -> float:
    """The configured target, else the bundle's own; it must lie above the floor."""
    target = acceptance.target_sensitivity
    if not target:
        recorded = info.metadata.threshold.target_sensitivity
        if recorded is None or not 0 < recorded < 1:
            raise PermanentError(
                f"model {info.version} records no target sensitivity; "
                "set acceptance.target_sensitivity"
            )
        target = float(recorded)
    if acceptance.sensitivity_floor >= target:
        raise PermanentError(
            f"acceptance.sensitivity_floor {acceptance.sensitivity_floor} must be below the "
            f"target sensitivity {target}: no sample could bound it"
        )
    return target


# --------------------------------------------------------------------------- the fit


@dataclass(frozen=True)
class SiteFit:
    """The source version and the refitted operating point, both on the same sample."""

    scores: Scores
    target_sensitivity: float
    before: Evaluation
    after: Evaluation
    adequacy: Adequacy


def fit_site(
    scores: Scores, info: BundleInfo, acceptance: AcceptanceConfig, *, new_version: str
) -> SiteFit:
    """Evaluate ``info`` as it serves, refit, and check the sample bounds the new point.

    Refuses (:class:`SampleTooSmall`) a sample without both classes before fitting
    anything on it.
    """
    target = target_sensitivity(info, acceptance)
    before = evaluate(scores, info.version, info.calibration, info.threshold)
    if scores.positives == 0 or scores.negatives == 0:
        raise SampleTooSmall(assess(scores.y, scores.raw, 0.5, target, acceptance))
    calibration, threshold = refit(scores, target)
    after = evaluate(scores, new_version, calibration, threshold)
    p_after = calibrate(scores.raw, *calibration)
    adequacy = assess(scores.y, p_after, threshold, target, acceptance)
    return SiteFit(scores, target, before, after, adequacy)


def compare_table(evaluations: Sequence[Evaluation]) -> list[tuple[str, ...]]:
    """Rows (header first) comparing versions on one sample: point value [95% interval]."""
    header = ("version", "threshold", "n", "AUC", "sensitivity", "specificity", "ECE", "Brier")
    rows: list[tuple[str, ...]] = [header]
    for e in evaluations:
        m, ci = e.metrics, e.metrics["ci95"]
        rows.append(
            (
                e.version,
                f"{e.threshold:.4f}",
                str(m["n"]),
                *(
                    f"{_num(m[k])} [{_num(ci[k][0])}, {_num(ci[k][1])}]"
                    for k in ("auc", "sensitivity", "specificity")
                ),
                _num(m["ece"]),
                _num(m["brier"]),
            )
        )
    return rows


# --------------------------------------------------------------------------- the new bundle

#: Marks a version derived by ``model calibrate``; a derivation of a derivation keeps the
#: original's name before it, so versions do not grow without end.
SITE_MARK = "-site-"


def site_version(source: str, when: datetime) -> str:
    root = source.split(SITE_MARK, maxsplit=1)[0]
    return f"{root}{SITE_MARK}{when.strftime('%Y%m%d-%H%M%S')}"


def sample_summary(scores: Scores) -> SiteSample:
    """The sample as the provenance and the audit trail name it (no patient data)."""
    s = scores.sample
    return SiteSample(
        source=s.source,
        kind=s.kind,
        sha256=s.digest,
        cases=len(s.cases),
        assessed=scores.n,
        positives=scores.positives,
        negatives=scores.negatives,
        not_assessed=scores.not_assessed,
        runtime=scores.runtime,
    )


def bounds_record(a: Adequacy) -> AcceptanceBounds:
    return AcceptanceBounds(
        method="Clopper-Pearson (exact)",
        confidence=a.acceptance.confidence,
        sensitivity_lower=a.sensitivity_lower,
        sensitivity_floor=a.acceptance.sensitivity_floor,
        specificity_lower=a.specificity_lower,
        specificity_floor=a.acceptance.specificity_floor,
        positives_needed=a.positives_needed,
        negatives_needed=a.negatives_needed,
    )


def _finite(value: Any) -> Any:
    """NaN (a metric with an empty denominator) as null: the audit trail's JSON, like
    PostgreSQL's, refuses NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _point(e: Evaluation) -> SitePoint:
    return SitePoint(
        version=e.version,
        threshold=e.threshold,
        calibration=Calibration(temperature=e.temperature, bias=e.bias),
        metrics=ValidationMetrics.from_json(e.metrics),
    )


def derived_metadata(info: BundleInfo, fit: SiteFit, when: datetime) -> BundleMetadata:
    """The source's metadata with the site's calibration, threshold and provenance.

    ``metrics`` (the validation history of the model files) is kept as it was; what the
    new operating point gives on the site's sample is in ``site_acceptance``.
    """
    sample = sample_summary(fit.scores)
    chosen_on = (
        f"site sample {(sample.sha256 or '')[:12]} ({fit.scores.n} cases: "
        f"{fit.scores.positives} {POSITIVE}, {fit.scores.negatives} {NEGATIVE}), "
        f"{format_utc(when)}"
    )
    return info.metadata.replace(
        version=fit.after.version,
        created_at=when,
        calibration=Calibration(
            method="Platt scaling (temperature and bias)",
            temperature=fit.after.temperature,
            bias=fit.after.bias,
            fitted_on=chosen_on,
        ),
        threshold=Threshold(
            value=fit.after.threshold,
            rule="highest threshold keeping the site sample's sensitivity >= "
            f"{fit.target_sensitivity}",
            target_sensitivity=fit.target_sensitivity,
            chosen_on=chosen_on,
            applies_to="calibrated probability",
        ),
        derived_from=DerivedFrom(
            version=info.version,
            change="calibration and threshold refitted on the site's labelled sample "
            "(model calibrate); model files unchanged",
        ),
        site_acceptance=SiteAcceptance(
            date=when,
            sample=sample,
            target_sensitivity=fit.target_sensitivity,
            before=_point(fit.before),
            after=_point(fit.after),
            bounds=bounds_record(fit.adequacy),
        ),
    )


#: The site calibration in words, beside the (copied) model card of the model files.
ACCEPTANCE_FILE = "SITE_ACCEPTANCE.md"


def acceptance_text(meta: BundleMetadata) -> str:
    """``SITE_ACCEPTANCE.md``: what the derived version changed, for the site's physicist."""
    site, source = meta.site_acceptance, meta.derived_from
    if site is None or source is None:
        raise ModelError(f"model {meta.version} was not derived by model calibrate")
    sample, bounds = site.sample, site.bounds
    refused = sum((sample.not_assessed or {}).values())
    derived_on = format_utc(site.date) if site.date else "-"
    lines = [
        f"# Site acceptance: model `{meta.version}`",
        "",
        f"Derived on {derived_on} from `{source.version}`: the same model files "
        "(see its MODEL_CARD.md), with the calibration and threshold refitted on the site's",
        f"labelled sample `{sample.source}` (SHA-256 of its labels {(sample.sha256 or '')[:16]}…):",
        f"{sample.assessed} cases assessed, {sample.positives} {POSITIVE} and "
        f"{sample.negatives} {NEGATIVE}, {refused} not assessed by the serving path, "
        f"runtime {sample.runtime}. Target sensitivity {site.target_sensitivity}.",
        "",
        "| version | threshold | AUC | sensitivity | specificity | ECE | Brier |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for point in (site.before, site.after):
        m = point.metrics
        ci = m.ci95 or {}

        def cell(key: str, m: ValidationMetrics = m, ci: Any = ci) -> str:
            lo, hi = ci.get(key, (None, None))
            return f"{_md(getattr(m, key))} ({_md(lo)}–{_md(hi)})"

        lines.append(
            f"| {point.version} | {_md(point.threshold, 4)} | {cell('auc')} | "
            f"{cell('sensitivity')} | {cell('specificity')} | {_md(m.ece)} | {_md(m.brier)} |"
        )
    lines += [
        "",
        "Intervals: 95 % bootstrap. At the new threshold the exact lower "
        f"{_pct(bounds.confidence)} bounds are {_md(bounds.sensitivity_lower)} for the "
        f"sensitivity (floor {bounds.sensitivity_floor}) and "
        f"{_md(bounds.specificity_lower)} for the specificity (floor "
        f"{bounds.specificity_floor}). The threshold was chosen on these cases: check it "
        "on an independent sample (`model compare`) before activating it.",
        "",
    ]
    return "\n".join(lines)


def _md(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


#: Files of a source bundle that hold its calibrated probabilities, and so do not hold for
#: a version with another calibration: not copied into a derived one.
CALIBRATED_FILES = frozenset({METADATA_FILE, VALIDATION_SCORES_FILE})


def write_derived_bundle(
    info: BundleInfo,
    metadata: BundleMetadata,
    dest: Path,
    *,
    validation: tuple[npt.ArrayLike, npt.ArrayLike],
) -> Path:
    """Copy the source bundle's files but those of :data:`CALIBRATED_FILES`, then write
    the new metadata, and as ``validation_scores.npz`` (the drift report's reference)
    ``validation``: the site sample's labels and its probabilities as the new version
    serves them, so live traffic is watched against the site's own accepted sample.
    Atomically: a temp folder, renamed.

    The exported runtimes and their record are copied: the model files are the same, so
    the runtime the sample was scored with is the one the new version serves. Their
    parity was measured at the source's calibration and threshold; exporting the new
    version again would measure it at the new ones.
    """
    if dest.exists():
        raise ModelError(f"{dest} exists; remove it or calibrate again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for item in sorted(info.path.iterdir()):
            if item.name in CALIBRATED_FILES or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        write_bundle_metadata(tmp, metadata)
        write_validation_scores(tmp, *validation)
        (tmp / ACCEPTANCE_FILE).write_text(acceptance_text(metadata), encoding="utf-8")
        read_bundle(tmp)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class SiteCalibration:
    """What ``model calibrate`` did: the fit and the new, registered (inactive) version."""

    fit: SiteFit
    version: str
    path: Path


def _load(config: Config, path: str, loader: PredictorLoader | None) -> Predictor:
    return (loader or load_predictor)(path, config.model.runtime)


def _registered(session: Session, version: str) -> Model:
    row = session.execute(select(Model).where(Model.version == version)).scalar_one_or_none()
    if row is None:
        raise PermanentError(f"no registered model with version {version!r}")
    return row


def calibrate_site(
    db: Database,
    config: Config,
    version: str,
    labels: Path,
    *,
    actor: str,
    loader: PredictorLoader | None = None,
) -> SiteCalibration:
    """Evaluate ``version`` on the site's sample, refit, and register the new version.

    The new version is not activated. A sample that cannot bound the new operating point
    raises :class:`SampleTooSmall` after auditing the refusal; nothing else is written.
    """
    with db.read_session() as session:
        source = _registered(session, version)
        source_id, source_path = source.id, source.path
        sample = load_sample(labels, session=session, storage_root=config.storage_root)
    info = read_bundle(source_path)
    predictor = _load(config, source_path, loader)
    scores = score_sample(
        sample, predictor, config.eligibility, batch_size=config.worker.batch_size
    )
    when = utcnow()
    new_version = site_version(info.version, when)
    try:
        fit = fit_site(scores, info, config.acceptance, new_version=new_version)
        if not fit.adequacy.ok:
            raise SampleTooSmall(fit.adequacy)
    except SampleTooSmall as exc:
        with db.session() as session:
            append_event(
                session,
                actor=actor,
                action="model.calibrate",
                entity_type="model",
                entity_id=source_id,
                outcome="refused",
                detail={
                    "version": info.version,
                    "sample": sample_summary(scores).to_json(),
                    "bounds": _finite(bounds_record(exc.adequacy).to_json()),
                    "reason": str(exc),
                },
            )
        raise
    dest = write_derived_bundle(
        info,
        derived_metadata(info, fit, when),
        config.model_dir / new_version,
        validation=(
            scores.y,
            calibrate(scores.raw, fit.after.temperature, fit.after.bias),
        ),
    )
    detail = {
        "version": new_version,
        "derived_from": info.version,
        "sample": sample_summary(scores).to_json(),
        "target_sensitivity": fit.target_sensitivity,
        "threshold": {"before": info.threshold, "after": fit.after.threshold},
        "calibration": {
            "before": list(info.calibration),
            "after": [fit.after.temperature, fit.after.bias],
        },
        "bounds": _finite(bounds_record(fit.adequacy).to_json()),
    }
    row = register_bundle(
        db,
        dest,
        config.model_dir,
        actor=actor,
        activate=False,
        events=[("model.calibrate", detail)],
    )
    log.info("model %s registered from %s's calibration on the site sample", row.version, version)
    return SiteCalibration(fit, row.version, Path(row.path))


def compare_versions(
    db: Database,
    config: Config,
    versions: Sequence[str],
    labels: Path,
    *,
    loader: PredictorLoader | None = None,
) -> tuple[Scores, list[Evaluation]]:
    """Each version, as it would serve, on the same sample.

    Versions with the same model files and runtime (a calibration's derivations) share one
    pass of the model: only the calibration and the threshold differ between them.
    """
    if not versions:
        raise PermanentError("name at least one model version to compare")
    with db.read_session() as session:
        paths = [_registered(session, v).path for v in versions]
        sample = load_sample(labels, session=session, storage_root=config.storage_root)
    scored: dict[tuple[str, str], Scores] = {}
    evaluations = []
    for path in paths:
        info = read_bundle(path)
        runtime = config.model.runtime
        if runtime == "auto":
            runtime = auto_choice(read_runtimes(info))
        key = (info.sha256, runtime)
        if key not in scored:
            predictor = _load(config, path, loader)
            scored[key] = score_sample(
                sample, predictor, config.eligibility, batch_size=config.worker.batch_size
            )
        evaluations.append(evaluate(scored[key], info.version, info.calibration, info.threshold))
    return next(iter(scored.values())), evaluations
