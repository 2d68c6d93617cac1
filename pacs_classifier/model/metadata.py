"""A bundle's ``metadata.json`` as typed, frozen dataclasses.

:func:`parse_metadata` (read, through ``BundleMetadata.from_json``) and :func:`dump_metadata`
(written, through ``bundle.write_metadata``) are the only code that knows the JSON keys;
everything else reads attributes (``meta.threshold.value``, ``meta.metrics.final.auc``).

Reading validates: a missing required key, a value of the wrong type or out of range is a
:class:`ModelError` naming the key, e.g. ``threshold.value: expected a number, received
'abc'``. Keys this version does not know (a newer bundle's sections) are kept in each
section's ``extra`` and written back unchanged, so reading and re-writing a bundle loses
nothing. Sections that are free-form by nature (training options, per-epoch history,
cross-validation, the stress table, library versions) are JSON-valued mappings.

Only ``version``, ``created_at``, ``image_size``, ``threshold.value`` and ``files`` are
required. To add a section: a frozen, ``kw_only`` dataclass deriving from
:class:`Section` whose fields all have defaults, and a ``name: NewSection | None = None``
field on :class:`BundleMetadata`; the parser and the writer follow the type hints.
Bump ``BUNDLE_FORMAT`` only for a change an older reader must refuse.

Paths: nothing here locates a file on the training machine. ``data.folder`` and
``base_weights.path`` are informational (where things were when the model was trained);
``split.json`` names images relative to the dataset root, which whoever reads them
supplies (``model register --data DIR``, ``[model] data_root``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Self

from pacs_classifier.errors import ModelError

BUNDLE_FORMAT = 1
METADATA_FILE = "metadata.json"
ARCHITECTURE_FILE = "model.json"
WEIGHTS_FILE = "weights.npz"
MODEL_FILES = (ARCHITECTURE_FILE, WEIGHTS_FILE)
CLASS_NAMES = ("NORMAL", "PNEUMONIA")
SPLIT_FILE = "split.json"

#: A version is also the bundle's folder name in the registry: no separators, no dot first.
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


class Section:
    """Base of every metadata section: typed fields, plus ``extra`` for unknown keys."""

    extra: Mapping[str, Any]

    @classmethod
    def from_json(cls, raw: Any, where: str = "") -> Self:
        """Validate and convert a decoded JSON object; ModelError names the bad key."""
        return typing.cast(Self, _parse_section(cls, raw, where))

    def to_json(self) -> dict[str, Any]:
        """The JSON object this section is written as (``None`` fields left out)."""
        return typing.cast(dict[str, Any], _dump(self))


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ModelError(message)


@dataclass(frozen=True, kw_only=True)
class Threshold(Section):
    """The operating point: a calibrated probability ``>= value`` is PNEUMONIA."""

    value: float
    rule: str | None = None
    target_sensitivity: float | None = None
    chosen_on: str | None = None
    applies_to: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _need(0.0 <= self.value <= 1.0, f"value must be in [0, 1], received {self.value!r}")
        t = self.target_sensitivity
        _need(t is None or 0.0 < t <= 1.0, f"target_sensitivity must be in (0, 1], received {t!r}")


@dataclass(frozen=True, kw_only=True)
class Calibration(Section):
    """``sigmoid(logit(p) / temperature + bias)``; bias 0 is plain temperature scaling."""

    temperature: float = 1.0
    bias: float = 0.0
    method: str | None = None
    fitted_on: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        t = self.temperature
        _need(math.isfinite(t) and t > 0, f"temperature must be > 0, received {t!r}")
        _need(math.isfinite(self.bias), f"bias must be finite, received {self.bias!r}")


@dataclass(frozen=True, kw_only=True)
class Preprocessing(Section):
    function: str | None = None
    output_range: tuple[float, float] | None = None
    channels: int | None = None
    resize: str | None = None
    base_input_range: str | None = None
    intensity: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Architecture(Section):
    base: str | None = None
    base_cut: str | None = None
    base_cut_candidates: tuple[str, ...] | None = None
    unfreeze_from: str | None = None
    head: str | None = None
    phase2_trained_layers: int | None = None
    weights_dtype: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class BaseWeightsRecord(Section):
    """The InceptionV3 weights training started from; ``path`` is informational."""

    setting: str | None = None
    path: str | None = None
    sha256: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class SplitSummary(Section):
    """Counts per class on each side of the patient-level split."""

    train: Mapping[str, int] | None = None
    val: Mapping[str, int] | None = None
    train_groups: int | None = None
    val_groups: int | None = None
    grouping: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class DataSummary(Section):
    """What the model was trained on. ``folder`` is informational (the dataset root on
    the training machine): no code reads images from it."""

    folder: str | None = None
    total: Mapping[str, int] | None = None
    split: SplitSummary | None = None
    split_file: str = SPLIT_FILE
    val_fraction: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _need(
            bool(_FILE_NAME.match(self.split_file)),
            f"split_file must be a file name inside the bundle, received {self.split_file!r}",
        )


@dataclass(frozen=True, kw_only=True)
class FitPool(Section):
    """The pool calibration and threshold were fitted on, when it is more than validation."""

    n: int
    metrics: ValidationMetrics
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ValidationMetrics(Section):
    """SPEC §10 metrics at one threshold (``model.metrics.point_metrics`` and friends)."""

    n: int | None = None
    auc: float | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    precision: float | None = None
    f1: float | None = None
    accuracy: float | None = None
    threshold: float | None = None
    ece: float | None = None
    ece_uncalibrated: float | None = None
    brier: float | None = None
    confusion: Mapping[str, int] | None = None
    ci95: Mapping[str, tuple[float, ...]] | None = None
    fit_pool: FitPool | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Metrics(Section):
    """Validation metrics per phase; ``final`` is the model as stored and served."""

    final: ValidationMetrics = field(default_factory=ValidationMetrics)
    phase1: Mapping[str, ValidationMetrics] | None = None
    phase1_chosen: ValidationMetrics | None = None
    final_before_recalibration: ValidationMetrics | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class DerivedFrom(Section):
    """The bundle this one was made from, with the same model files."""

    version: str
    change: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class SiteSample(Section):
    """The labelled sample of a site calibration (it names no patient)."""

    #: The labels CSV or folder, as given to ``model calibrate``.
    source: str | None = None
    #: ``instances`` (a CSV of stored instances' UIDs) or ``folder`` (NORMAL/, PNEUMONIA/).
    kind: str | None = None
    #: SHA-256 of the sorted ``ref:LABEL`` lines: the same labels give the same digest.
    sha256: str | None = None
    cases: int | None = None
    assessed: int | None = None
    positives: int | None = None
    negatives: int | None = None
    #: Cases the serving path did not assess, by reason code (left out of the metrics).
    not_assessed: Mapping[str, int] | None = None
    #: The serving runtime the cases were scored with.
    runtime: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class SitePoint(Section):
    """One version's calibration and threshold, and what they give on the site's sample."""

    version: str | None = None
    threshold: float | None = None
    calibration: Calibration = field(default_factory=Calibration)
    metrics: ValidationMetrics = field(default_factory=ValidationMetrics)
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class AcceptanceBounds(Section):
    """Exact lower confidence bounds at the new threshold, the floors they had to reach,
    and the cases of each class a sample needs to reach them."""

    method: str | None = None
    confidence: float | None = None
    sensitivity_lower: float | None = None
    sensitivity_floor: float | None = None
    specificity_lower: float | None = None
    specificity_floor: float | None = None
    positives_needed: int | None = None
    negatives_needed: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class SiteAcceptance(Section):
    """Local acceptance (``model calibrate``): the source version and the calibration and
    threshold refitted for a site, both measured on the site's labelled sample."""

    date: datetime | None = None
    sample: SiteSample = field(default_factory=SiteSample)
    target_sensitivity: float | None = None
    before: SitePoint = field(default_factory=SitePoint)
    after: SitePoint = field(default_factory=SitePoint)
    bounds: AcceptanceBounds = field(default_factory=AcceptanceBounds)
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class BundleMetadata(Section):
    """Everything ``metadata.json`` holds (SPEC §6)."""

    version: str
    created_at: datetime
    image_size: int
    threshold: Threshold
    files: Mapping[str, str]
    bundle_format: int = BUNDLE_FORMAT
    calibration: Calibration = field(default_factory=Calibration)
    class_names: tuple[str, ...] | None = None
    positive_class: str | None = None
    preprocessing: Preprocessing | None = None
    architecture: Architecture | None = None
    base_weights: BaseWeightsRecord | None = None
    data: DataSummary | None = None
    metrics: Metrics = field(default_factory=Metrics)
    derived_from: DerivedFrom | None = None
    #: Set by ``model calibrate`` on the version it derives for a site.
    site_acceptance: SiteAcceptance | None = None
    seed: int | None = None
    #: Free-form: the trainer's options, per-epoch history, cross-validation, stress suite.
    training: Mapping[str, Any] | None = None
    history: Mapping[str, Any] | None = None
    cross_validation: Mapping[str, Any] | None = None
    stress: Mapping[str, Any] | None = None
    library_versions: Mapping[str, str] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _need(
            bool(_VERSION.match(self.version)),
            "version must be 1-64 letters, digits or . _ + - (not starting with . or -), "
            f"received {self.version!r}",
        )
        _need(
            self.created_at.tzinfo is not None,
            f"created_at has no time zone: {self.created_at.isoformat()!r}",
        )
        _need(self.image_size >= 1, f"image_size must be >= 1, received {self.image_size}")
        _need(
            1 <= self.bundle_format <= BUNDLE_FORMAT,
            f"bundle_format {self.bundle_format} is not one this version reads "
            f"(1..{BUNDLE_FORMAT}); upgrade pacs-classifier",
        )
        missing = [name for name in MODEL_FILES if name not in self.files]
        _need(not missing, f"files must list {', '.join(MODEL_FILES)}; missing {missing}")
        for name, digest in self.files.items():
            _need(bool(_FILE_NAME.match(name)), f"files: {name!r} is not a plain file name")
            _need(bool(_SHA256.match(digest)), f"files.{name}: not a SHA-256 hex digest")


def parse_metadata(raw: Any) -> BundleMetadata:
    """The typed metadata of a decoded ``metadata.json``; ModelError names the bad key."""
    return BundleMetadata.from_json(raw)


def dump_metadata(meta: BundleMetadata) -> dict[str, Any]:
    """The JSON object ``metadata.json`` holds: ``None`` fields left out, unknown keys kept."""
    return meta.to_json()


# ------------------------------------------------------------------ parser and writer


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _parse_section(cls: type[Section], raw: Any, where: str) -> Section:
    if not isinstance(raw, dict):
        raise ModelError(f"{where or 'metadata'}: expected an object, received {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    known: set[str] = set()
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name == "extra":
            continue
        key = f.name
        known.add(key)
        value = raw.get(key)
        if value is None:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required:
                raise ModelError(f"{_join(where, key)}: missing")
            continue
        kwargs[f.name] = _convert(hints[f.name], value, _join(where, key))
    kwargs["extra"] = {k: v for k, v in raw.items() if k not in known}
    try:
        return cls(**kwargs)
    except ModelError as exc:
        raise ModelError(f"{where}.{exc}" if where else str(exc)) from None


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(inner, value, where)
    if tp is Any:
        return value
    if isinstance(tp, type) and issubclass(tp, Section):
        return _parse_section(tp, value, where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ModelError(f"{where}: expected a string, received {_describe(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ModelError(f"{where}: expected true or false, received {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ModelError(f"{where}: expected an integer, received {_describe(value)}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ModelError(f"{where}: expected a number, received {_describe(value)}")
    if tp is datetime:
        if not isinstance(value, str):
            raise ModelError(f"{where}: expected an ISO 8601 time, received {_describe(value)}")
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ModelError(
                f"{where}: expected an ISO 8601 time, received {_describe(value)}"
            ) from None
        if parsed.tzinfo is None:
            raise ModelError(f"{where}: time has no time zone: {_describe(value)}")
        return parsed
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list):
            raise ModelError(f"{where}: expected a list, received {_describe(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]] * len(value)
        elif len(args) != len(value):
            raise ModelError(f"{where}: expected {len(args)} items, received {len(value)}")
        else:
            item_types = list(args)
        return tuple(
            _convert(t, v, f"{where}[{i}]")
            for i, (t, v) in enumerate(zip(item_types, value, strict=True))
        )
    if origin is Mapping:
        _, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ModelError(f"{where}: expected an object, received {_describe(value)}")
        return {str(k): _convert(value_type, v, _join(where, str(k))) for k, v in value.items()}
    raise TypeError(f"{where}: no conversion for {tp!r}")  # a programming error, not data


def _dump(value: Any) -> Any:
    if isinstance(value, Section):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):  # type: ignore[arg-type]
            if f.name == "extra":
                continue
            item = getattr(value, f.name)
            if item is not None:
                out[f.name] = _dump(item)
        for key, item in value.extra.items():
            out.setdefault(key, item)
        return out
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _dump(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_dump(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars in free-form sections
        return value.item()
    return value


__all__ = [
    "ARCHITECTURE_FILE",
    "BUNDLE_FORMAT",
    "CLASS_NAMES",
    "METADATA_FILE",
    "MODEL_FILES",
    "SPLIT_FILE",
    "WEIGHTS_FILE",
    "AcceptanceBounds",
    "Architecture",
    "BaseWeightsRecord",
    "BundleMetadata",
    "Calibration",
    "DataSummary",
    "DerivedFrom",
    "FitPool",
    "Metrics",
    "Preprocessing",
    "Section",
    "SiteAcceptance",
    "SitePoint",
    "SiteSample",
    "SplitSummary",
    "Threshold",
    "ValidationMetrics",
    "dump_metadata",
    "parse_metadata",
]
