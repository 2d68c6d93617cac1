"""A bundle's ``metadata.json`` as typed, frozen pydantic models.

Why pydantic: it already ships with the web layer and replaces a hand-written type-hint
walker (parser, converter, writer) with declared types; this module only words its errors.

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
required. To add a section: a class deriving from :class:`Section` whose fields all have
defaults, typed with this module's strict aliases (``Number``, ``Integer``, ``Text``,
``Time``), and a ``name: NewSection | None = None`` field on :class:`BundleMetadata`.
Unknown keys are pydantic extras (``extra="allow"``), exposed as ``section.extra``.
Sections are frozen: derive a changed copy with ``section.replace(key=value)``, which
validates like reading does (``dataclasses.replace`` does not apply to these models).
Bump ``BUNDLE_FORMAT`` only for a change an older reader must refuse.

Paths: nothing here locates a file on the training machine. ``data.folder`` and
``base_weights.path`` are informational (where things were when the model was trained);
``split.json`` names images relative to the dataset root, which whoever reads them
supplies (``model register --data DIR``, ``[model] data_root``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Annotated, Any, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    Strict,
    ValidationError,
    field_validator,
    model_serializer,
)
from pydantic_core import ErrorDetails, PydanticCustomError

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

#: Error types whose message follows the key after ": " (the rest follow it after a space,
#: e.g. ``threshold.value must be in [0, 1]``).
_AT = "metadata_at"
_CHECK = "metadata_check"


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _at(message: str) -> PydanticCustomError:
    """``key: message`` (the key is added from the error's location)."""
    return PydanticCustomError(_AT, message)


def _check(message: str) -> PydanticCustomError:
    """``key message``, e.g. ``must be > 0, received 0.0``."""
    return PydanticCustomError(_CHECK, message)


# ------------------------------------------------------------------ strict value types
# pydantic's lax mode would take "0.5" for a number and 1 for true; JSON written by hand
# must say what it means. An integral float (1045.0) is still an integer.


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _aware_time(value: Any) -> datetime:
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise _at(f"expected an ISO 8601 time, received {_describe(value)}") from None
    else:
        raise _at(f"expected an ISO 8601 time, received {_describe(value)}")
    if parsed.tzinfo is None:
        raise _at(f"time has no time zone: {_describe(value)}")
    return parsed


def _items(n: int) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, list | tuple) and len(value) != n:
            raise _at(f"expected {n} items, received {len(value)}")
        return value

    return check


def _file_name(value: str) -> str:
    if not _FILE_NAME.match(value):
        raise _at(f"{value!r} is not a plain file name")
    return value


def _sha256(value: str) -> str:
    if not _SHA256.match(value):
        raise _at("not a SHA-256 hex digest")
    return value


def _plain(value: Any) -> Any:
    """Free-form values as JSON: numpy scalars become Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


Number = Annotated[float, Strict()]
Integer = Annotated[int, BeforeValidator(_integral), Strict()]
Text = Annotated[str, Strict()]
Time = Annotated[
    datetime,
    BeforeValidator(_aware_time),
    PlainSerializer(lambda t: t.isoformat(), when_used="json"),
]
FileName = Annotated[str, Strict(), AfterValidator(_file_name)]
Sha256 = Annotated[str, Strict(), AfterValidator(_sha256)]
#: JSON-valued by nature (training options, per-epoch history, ...): kept as read.
FreeForm = Annotated[Mapping[str, Any], PlainSerializer(_plain, when_used="json")]


class Section(BaseModel):
    """Base of every metadata section: typed fields, plus ``extra`` for unknown keys."""

    model_config = ConfigDict(frozen=True, extra="allow")

    @property
    def extra(self) -> Mapping[str, Any]:
        """Keys this version does not know, as read; written back unchanged."""
        return self.model_extra or {}

    @classmethod
    def from_json(cls, raw: Any, where: str = "") -> Self:
        """Validate and convert a decoded JSON object; ModelError names the bad key."""
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ModelError(_one_line(exc, where)) from None

    def to_json(self) -> dict[str, Any]:
        """The JSON object this section is written as (``None`` fields left out)."""
        return self.model_dump(mode="json")

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``, validated as reading is; unknown keys are kept."""
        current = {name: getattr(self, name) for name in type(self).model_fields}
        try:
            return type(self).model_validate(current | dict(self.extra) | changes)
        except ValidationError as exc:
            raise ModelError(_one_line(exc)) from None

    @model_serializer(mode="wrap")
    def _leave_out_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        fields = type(self).model_fields
        return {k: v for k, v in out.items() if not (v is None and k in fields)}


class Threshold(Section):
    """The operating point: a calibrated probability ``>= value`` is PNEUMONIA."""

    value: Number
    rule: Text | None = None
    target_sensitivity: Number | None = None
    chosen_on: Text | None = None
    applies_to: Text | None = None

    @field_validator("value")
    @classmethod
    def _probability(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise _check(f"must be in [0, 1], received {v!r}")
        return v

    @field_validator("target_sensitivity")
    @classmethod
    def _target(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v <= 1.0:
            raise _check(f"must be in (0, 1], received {v!r}")
        return v


class Calibration(Section):
    """``sigmoid(logit(p) / temperature + bias)``; bias 0 is plain temperature scaling."""

    temperature: Number = 1.0
    bias: Number = 0.0
    method: Text | None = None
    fitted_on: Text | None = None

    @field_validator("temperature")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise _check(f"must be > 0, received {v!r}")
        return v

    @field_validator("bias")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise _check(f"must be finite, received {v!r}")
        return v


class Preprocessing(Section):
    function: Text | None = None
    output_range: Annotated[tuple[Number, Number], BeforeValidator(_items(2))] | None = None
    channels: Integer | None = None
    resize: Text | None = None
    base_input_range: Text | None = None
    intensity: Text | None = None


class Architecture(Section):
    base: Text | None = None
    base_cut: Text | None = None
    base_cut_candidates: tuple[Text, ...] | None = None
    unfreeze_from: Text | None = None
    head: Text | None = None
    phase2_trained_layers: Integer | None = None
    weights_dtype: Text | None = None


class BaseWeightsRecord(Section):
    """The InceptionV3 weights training started from; ``path`` is informational."""

    setting: Text | None = None
    path: Text | None = None
    sha256: Text | None = None


class SplitSummary(Section):
    """Counts per class on each side of the patient-level split."""

    train: Mapping[str, Integer] | None = None
    val: Mapping[str, Integer] | None = None
    train_groups: Integer | None = None
    val_groups: Integer | None = None
    grouping: Text | None = None


class DataSummary(Section):
    """What the model was trained on. ``folder`` is informational (the dataset root on
    the training machine): no code reads images from it."""

    folder: Text | None = None
    total: Mapping[str, Integer] | None = None
    split: SplitSummary | None = None
    split_file: Text = SPLIT_FILE
    val_fraction: Number | None = None

    @field_validator("split_file")
    @classmethod
    def _inside(cls, v: str) -> str:
        if not _FILE_NAME.match(v):
            raise _check(f"must be a file name inside the bundle, received {v!r}")
        return v


class ValidationMetrics(Section):
    """SPEC §10 metrics at one threshold (``model.metrics.point_metrics`` and friends)."""

    n: Integer | None = None
    auc: Number | None = None
    sensitivity: Number | None = None
    specificity: Number | None = None
    precision: Number | None = None
    f1: Number | None = None
    accuracy: Number | None = None
    threshold: Number | None = None
    ece: Number | None = None
    ece_uncalibrated: Number | None = None
    brier: Number | None = None
    confusion: Mapping[str, Integer] | None = None
    ci95: Mapping[str, tuple[Number, ...]] | None = None
    fit_pool: FitPool | None = None


class FitPool(Section):
    """The pool calibration and threshold were fitted on, when it is more than validation."""

    n: Integer
    metrics: ValidationMetrics


ValidationMetrics.model_rebuild()  # fit_pool names FitPool, defined after it


class Metrics(Section):
    """Validation metrics per phase; ``final`` is the model as stored and served."""

    final: ValidationMetrics = Field(default_factory=ValidationMetrics)
    phase1: Mapping[str, ValidationMetrics] | None = None
    phase1_chosen: ValidationMetrics | None = None
    final_before_recalibration: ValidationMetrics | None = None


class DerivedFrom(Section):
    """The bundle this one was made from, with the same model files."""

    version: Text
    change: Text | None = None


class SiteSample(Section):
    """The labelled sample of a site calibration (it names no patient)."""

    #: The labels CSV or folder, as given to ``model calibrate``.
    source: Text | None = None
    #: ``instances`` (a CSV of stored instances' UIDs) or ``folder`` (NORMAL/, PNEUMONIA/).
    kind: Text | None = None
    #: SHA-256 of the sorted ``ref:LABEL`` lines: the same labels give the same digest.
    sha256: Text | None = None
    cases: Integer | None = None
    assessed: Integer | None = None
    positives: Integer | None = None
    negatives: Integer | None = None
    #: Cases the serving path did not assess, by reason code (left out of the metrics).
    not_assessed: Mapping[str, Integer] | None = None
    #: The serving runtime the cases were scored with.
    runtime: Text | None = None


class SitePoint(Section):
    """One version's calibration and threshold, and what they give on the site's sample."""

    version: Text | None = None
    threshold: Number | None = None
    calibration: Calibration = Field(default_factory=Calibration)
    metrics: ValidationMetrics = Field(default_factory=ValidationMetrics)


class AcceptanceBounds(Section):
    """Exact lower confidence bounds at the new threshold, the floors they had to reach,
    and the cases of each class a sample needs to reach them."""

    method: Text | None = None
    confidence: Number | None = None
    sensitivity_lower: Number | None = None
    sensitivity_floor: Number | None = None
    specificity_lower: Number | None = None
    specificity_floor: Number | None = None
    positives_needed: Integer | None = None
    negatives_needed: Integer | None = None


class SiteAcceptance(Section):
    """Local acceptance (``model calibrate``): the source version and the calibration and
    threshold refitted for a site, both measured on the site's labelled sample."""

    date: Time | None = None
    sample: SiteSample = Field(default_factory=SiteSample)
    target_sensitivity: Number | None = None
    before: SitePoint = Field(default_factory=SitePoint)
    after: SitePoint = Field(default_factory=SitePoint)
    bounds: AcceptanceBounds = Field(default_factory=AcceptanceBounds)


class BundleMetadata(Section):
    """Everything ``metadata.json`` holds (SPEC §6)."""

    version: Text
    created_at: Time
    image_size: Integer
    threshold: Threshold
    files: Mapping[FileName, Sha256]
    bundle_format: Integer = BUNDLE_FORMAT
    calibration: Calibration = Field(default_factory=Calibration)
    class_names: tuple[Text, ...] | None = None
    positive_class: Text | None = None
    preprocessing: Preprocessing | None = None
    architecture: Architecture | None = None
    base_weights: BaseWeightsRecord | None = None
    data: DataSummary | None = None
    metrics: Metrics = Field(default_factory=Metrics)
    derived_from: DerivedFrom | None = None
    #: Set by ``model calibrate`` on the version it derives for a site.
    site_acceptance: SiteAcceptance | None = None
    seed: Integer | None = None
    #: Free-form: the trainer's options, per-epoch history, cross-validation, stress suite.
    training: FreeForm | None = None
    history: FreeForm | None = None
    cross_validation: FreeForm | None = None
    stress: FreeForm | None = None
    library_versions: Mapping[str, Text] | None = None

    @field_validator("version")
    @classmethod
    def _folder_name(cls, v: str) -> str:
        if not _VERSION.match(v):
            raise _check(
                "must be 1-64 letters, digits or . _ + - (not starting with . or -), "
                f"received {v!r}"
            )
        return v

    @field_validator("image_size")
    @classmethod
    def _size(cls, v: int) -> int:
        if v < 1:
            raise _check(f"must be >= 1, received {v}")
        return v

    @field_validator("bundle_format")
    @classmethod
    def _format(cls, v: int) -> int:
        if not 1 <= v <= BUNDLE_FORMAT:
            raise _check(
                f"{v} is not one this version reads (1..{BUNDLE_FORMAT}); upgrade pacs-classifier"
            )
        return v

    @field_validator("files")
    @classmethod
    def _model_files(cls, v: Mapping[str, str]) -> Mapping[str, str]:
        missing = [name for name in MODEL_FILES if name not in v]
        if missing:
            raise _check(f"must list {', '.join(MODEL_FILES)}; missing {missing}")
        return v


def parse_metadata(raw: Any) -> BundleMetadata:
    """The typed metadata of a decoded ``metadata.json``; ModelError names the bad key."""
    return BundleMetadata.from_json(raw)


def dump_metadata(meta: BundleMetadata) -> dict[str, Any]:
    """The JSON object ``metadata.json`` holds: ``None`` fields left out, unknown keys kept."""
    return meta.to_json()


# ------------------------------------------------------------------ error wording

#: pydantic's error types, as the one line a user reads after the key.
_EXPECTED = {
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "model_type": "expected an object",
    "model_attributes_type": "expected an object",
    "dict_type": "expected an object",
    "mapping_type": "expected an object",
    "tuple_type": "expected a list",
    "list_type": "expected a list",
}


def _key(loc: tuple[int | str, ...], where: str) -> str:
    if loc and loc[-1] == "[key]":  # a bad mapping key: name the mapping
        loc = loc[:-2]
    text = where
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text = f"{text}.{part}" if text else str(part)
    return text


def _one_line(exc: ValidationError, where: str = "") -> str:
    """The first of pydantic's errors as ``key: what was wrong``, on one line."""
    error: ErrorDetails = exc.errors(include_url=False)[0]
    key = _key(error["loc"], where)
    kind = error["type"]
    if kind == _CHECK:
        return f"{key} {error['msg']}"
    if kind == _AT:
        message = error["msg"]
    elif kind == "missing":
        message = "missing"
    elif kind in _EXPECTED:
        message = f"{_EXPECTED[kind]}, received {_describe(error['input'])}"
    else:
        message = error["msg"].replace("\n", " ")
    return f"{key or 'metadata'}: {message}"


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
