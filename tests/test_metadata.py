"""The typed bundle metadata: the committed reference reads and writes back unchanged,
unknown keys survive, optional sections are optional, and a corrupt or foreign
``metadata.json`` is refused with the key it got wrong."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pacs_classifier import REFERENCE_MODEL_DIR
from pacs_classifier.errors import ModelError
from pacs_classifier.model.bundle import read_bundle, read_metadata, write_metadata
from pacs_classifier.model.metadata import (
    BundleMetadata,
    Threshold,
    ValidationMetrics,
    dump_metadata,
    parse_metadata,
)

REFERENCE_JSON = REFERENCE_MODEL_DIR / "metadata.json"
SHA = "0" * 64


def _reference_raw() -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(REFERENCE_JSON.read_text(encoding="utf-8"))
    return raw


def test_reference_bundle_reads_typed_and_writes_back_byte_identical(tmp_path: Path) -> None:
    info = read_bundle(REFERENCE_MODEL_DIR)  # checksums of model.json and weights.npz too
    meta = info.metadata
    assert meta.threshold.target_sensitivity == 0.97
    assert info.threshold == meta.threshold.value == pytest.approx(0.5278149669562116)
    assert info.calibration == (meta.calibration.temperature, meta.calibration.bias)
    assert meta.created_at == datetime(2026, 12, 2, 16, 11, 33, 161523, tzinfo=UTC)
    final = meta.metrics.final
    assert final.n == 1045 and final.confusion == {"tn": 255, "fp": 14, "fn": 21, "tp": 755}
    assert final.ci95 is not None and final.ci95["auc"][0] < (final.auc or 0) < final.ci95["auc"][1]
    assert final.fit_pool is not None and final.fit_pool.metrics.n == 5045
    assert meta.data is not None and meta.data.split_file == "split.json"
    assert meta.preprocessing is not None and meta.preprocessing.output_range == (-1.0, 1.0)
    assert meta.extra == {}  # every top-level key of the reference is a typed field
    write_metadata(tmp_path, meta)
    assert (tmp_path / "metadata.json").read_bytes() == REFERENCE_JSON.read_bytes()


def test_unknown_keys_of_a_newer_bundle_are_kept(tmp_path: Path) -> None:
    raw = _reference_raw()
    raw["site_review"] = {"site": "north", "n": 120}
    raw["threshold"]["margin"] = 0.02
    raw["metrics"]["final"]["youden"] = 0.91
    meta = parse_metadata(raw)
    assert meta.extra == {"site_review": {"site": "north", "n": 120}}
    assert meta.threshold.extra == {"margin": 0.02}
    assert meta.metrics.final.extra == {"youden": 0.91}
    assert dump_metadata(meta) == raw
    # a derived bundle (new threshold) keeps them too
    derived = meta.replace(version="ref-2", threshold=meta.threshold.replace(value=0.4))
    out = dump_metadata(derived)
    assert out["site_review"] == raw["site_review"]
    assert out["threshold"] == raw["threshold"] | {"value": 0.4}


def test_a_minimal_bundle_needs_only_the_required_keys() -> None:
    files = {"model.json": SHA, "weights.npz": SHA}
    raw: dict[str, Any] = {
        "version": "tiny-1",
        "created_at": "2026-12-02T10:00:00Z",
        "image_size": 75,
        "threshold": {"value": 0.5},
        "files": files,
    }
    meta = parse_metadata(raw)
    assert meta.data is None and meta.preprocessing is None and meta.stress is None
    assert meta.metrics.final == ValidationMetrics()
    assert (meta.calibration.temperature, meta.calibration.bias) == (1.0, 0.0)
    assert meta.created_at.tzinfo is not None
    # explicit nulls are the same as absent keys for optional sections
    assert parse_metadata(raw | {"stress": None, "data": None}) == meta
    # built in code, written, read back: equal
    built = BundleMetadata(
        version="tiny-1",
        created_at=meta.created_at,
        image_size=75,
        threshold=Threshold(value=0.5),
        files=files,
    )
    assert parse_metadata(dump_metadata(built)) == built == meta


def test_sections_built_or_derived_in_code_are_validated_as_read() -> None:
    # A section built by our own code with a bad value is a bug: pydantic says so as it is.
    with pytest.raises(ValidationError, match=r"must be in \[0, 1\], received 1.5"):
        Threshold(value=1.5)
    meta = parse_metadata(_reference_raw())
    with pytest.raises(ModelError, match=r"^threshold.value: expected a number, received 'x'$"):
        meta.replace(threshold={"value": "x"})
    with pytest.raises(ModelError, match=r"^version must be 1-64 letters"):
        meta.replace(version="a/b")
    assert meta.replace(version="ref-2").threshold == meta.threshold  # frozen: shared


def _set(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    *parents, last = dotted.split(".")
    node = out
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return out


_DELETE = object()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("threshold.value", "0.5", "threshold.value: expected a number, received '0.5'"),
        ("threshold.value", 1.5, "threshold.value must be in [0, 1], received 1.5"),
        ("threshold", _DELETE, "threshold: missing"),
        ("version", _DELETE, "version: missing"),
        ("version", "../../etc", "version must be 1-64 letters"),
        ("image_size", True, "image_size: expected an integer, received True"),
        ("created_at", "2026-12-02T16:11:33", "created_at: time has no time zone"),
        ("calibration.temperature", 0, "calibration.temperature must be > 0"),
        ("metrics.final.auc", "high", "metrics.final.auc: expected a number, received 'high'"),
        ("metrics.final.confusion.tp", 1.5, "metrics.final.confusion.tp: expected an integer"),
        ("preprocessing.output_range", [-1.0], "preprocessing.output_range: expected 2 items"),
        ("files.weights.npz", _DELETE, "files must list model.json, weights.npz"),
        ("data.split_file", "../split.json", "data.split_file must be a file name inside"),
        ("bundle_format", 2, "bundle_format 2 is not one this version reads"),
        ("metrics", [1, 2], "metrics: expected an object, received [1, 2]"),
    ],
)
def test_corrupt_or_foreign_metadata_names_the_key(
    tmp_path: Path, key: str, value: Any, message: str
) -> None:
    raw = _reference_raw()
    if key == "files.weights.npz":  # a dotted file name: edit the mapping itself
        del raw["files"]["weights.npz"]
    else:
        raw = _set(raw, key, value)
    (tmp_path / "metadata.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(ModelError) as caught:
        read_metadata(tmp_path)
    text = str(caught.value)
    assert text.startswith(f"{tmp_path / 'metadata.json'}: ")
    assert message in text
    assert "\n" not in text


def test_metadata_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    (tmp_path / "metadata.json").write_text("[1, 2, 3]\n", encoding="utf-8")
    with pytest.raises(ModelError, match=r"metadata: expected an object, received \[1, 2, 3\]"):
        read_metadata(tmp_path)
