"""Serving runtimes: export at registration, parity with Keras, choice, and refusal.

One real export (ONNX + int8 TFLite of the 75 px test model, parity on real chest images
from ``cxr_dir``) is made per module and shared; the tests then read what it wrote.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from sqlalchemy import select

from pacs_classifier.db import migrate
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import AuditEvent
from pacs_classifier.errors import ModelError
from pacs_classifier.model import export as export_mod
from pacs_classifier.model.bundle import read_bundle, sha256_file
from pacs_classifier.model.export import (
    MAX_FLOAT32_DELTA,
    export_runtimes,
    float32_parity,
    int8_parity,
    parity_inputs,
)
from pacs_classifier.model.runtime import (
    RUNTIMES_FILE,
    TfliteInt8Predictor,
    auto_choice,
    load_predictor,
    read_verified,
    refusal,
)
from pacs_classifier.preprocess import normalize_file

PER_CLASS_VAL = 20


def _class_files(cxr_dir: Path, cls: str) -> list[Path]:
    return sorted(p for p in (cxr_dir / cls).iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))


@pytest.fixture(scope="module")
def registered(
    tiny_bundles: Any, cxr_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, Database]]:
    """The tiny bundle with a real validation split (paths relative to the dataset root),
    registered by ``model register --data DIR``, which exports it."""
    tmp = tmp_path_factory.mktemp("runtimes")
    source = tmp / "source"
    shutil.copytree(tiny_bundles.v1, source)
    val = [
        *[f"NORMAL/{p.name}" for p in _class_files(cxr_dir, "NORMAL")[:PER_CLASS_VAL]],
        *[f"PNEUMONIA/{p.name}" for p in _class_files(cxr_dir, "PNEUMONIA")[:PER_CLASS_VAL]],
    ]
    (source / "split.json").write_text(json.dumps({"val": val}))
    config = tmp / "config.toml"
    config.write_text('[database]\nurl = "sqlite:///pacs.sqlite3"\n[model]\ndir = "models"\n')
    url = f"sqlite:///{tmp / 'pacs.sqlite3'}"
    migrate.upgrade(url)
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "pacs_classifier", "--config", str(config)),
            *("model", "register", str(source), "--data", str(cxr_dir)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "synthetic" not in proc.stderr
    db = Database(url)
    try:
        yield tmp / "models" / "tiny-v1", db
    finally:
        db.dispose()


def _record(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((path / RUNTIMES_FILE).read_text())
    return data


def _real_batch(cxr_dir: Path, n: int = 4) -> npt.NDArray[np.float32]:
    """Real images that were not among the parity inputs."""
    files = [
        *_class_files(cxr_dir, "NORMAL")[PER_CLASS_VAL : PER_CLASS_VAL + n],
        *_class_files(cxr_dir, "PNEUMONIA")[PER_CLASS_VAL : PER_CLASS_VAL + n],
    ]
    return np.stack([normalize_file(f, 75) for f in files])


def test_registration_exports_and_records_parity(
    registered: tuple[Path, Database], cxr_dir: Path
) -> None:
    path, db = registered
    record = _record(path)
    info = read_bundle(path)
    assert record["bundle_sha256"] == info.sha256
    assert record["parity_inputs"]["source"] == "validation"
    assert record["parity_inputs"]["count"] == 2 * PER_CLASS_VAL
    assert record["parity_inputs"]["data_root"] == str(cxr_dir)
    assert set(record["runtimes"]) == {"onnx", "tflite-int8"}
    for name, entry in record["runtimes"].items():
        assert "error" not in entry, name
        assert sha256_file(path / entry["file"]) == entry["sha256"]
        assert entry["parity"]["passed"] is entry["usable"]
        assert entry["images_per_s"] > 0
        assert entry["features"] is True  # the pooled features are a second output
    onnx = record["runtimes"]["onnx"]["parity"]
    assert onnx["passed"] and onnx["max_abs_delta_probability"] <= MAX_FLOAT32_DELTA
    int8 = record["runtimes"]["tflite-int8"]["parity"]
    assert int8["auc_against"] == "true labels" and int8["auc_keras"] is not None
    assert record["criteria"]["tflite-int8"]["max_abs_delta_probability"] == 0.02
    assert int8["passed"] is (int8["max_abs_delta_probability"] <= 0.02 and not int8["failed"])
    assert record["runtimes"]["tflite-int8"]["quantisation"] == "dynamic-range"
    # metadata.json identifies the bundle: exporting must not rewrite it.
    source_meta = (path.parent.parent / "source" / "metadata.json").read_bytes()
    assert (path / "metadata.json").read_bytes() == source_meta
    with db.session() as session:
        event = session.execute(
            select(AuditEvent).where(AuditEvent.action == "model.register")
        ).scalar_one()
        assert event.detail["runtimes"]["auto"] == record["auto"]
        assert event.detail["runtimes"]["onnx"] is True
        assert event.detail["runtimes"]["parity_inputs"] == "validation"


def test_onnx_matches_keras_on_other_real_images(
    registered: tuple[Path, Database], cxr_dir: Path
) -> None:
    path, _ = registered
    batch = _real_batch(cxr_dir)
    keras_out = load_predictor(path, "keras").infer(batch)
    keras = keras_out.probability
    onnx = load_predictor(path, "onnx")
    assert onnx.runtime == "onnx"
    assert np.max(np.abs(onnx.predict(batch) - keras)) <= MAX_FLOAT32_DELTA
    # The features the OOD check scores are the same in both runtimes.
    onnx_feats, keras_feats = onnx.infer(batch).features, keras_out.features
    assert onnx_feats is not None and keras_feats is not None
    assert onnx_feats.shape == keras_feats.shape == (len(batch), 2048)
    assert np.allclose(onnx_feats, keras_feats, rtol=1e-3, atol=1e-4)
    # One image at a time gives the same numbers as the batch (dynamic batch axis).
    single = np.concatenate([onnx.predict(batch[i : i + 1]) for i in range(len(batch))])
    assert np.max(np.abs(single - keras)) <= MAX_FLOAT32_DELTA


def test_int8_close_to_keras_and_same_labels(
    registered: tuple[Path, Database], cxr_dir: Path
) -> None:
    path, _ = registered
    info = read_bundle(path)
    entry = _record(path)["runtimes"]["tflite-int8"]
    # Loaded through the class even if the record refused it: the numbers are the point.
    int8 = TfliteInt8Predictor(info, read_verified(path / entry["file"], entry["sha256"]))
    batch = _real_batch(cxr_dir)
    keras = load_predictor(path, "keras").predict(batch)
    # Batch sizes change between calls: the interpreter is resized each time.
    got = np.concatenate(
        [int8.predict(batch[:3]), int8.predict(batch[3:4]), int8.predict(batch[4:])]
    )
    assert np.max(np.abs(got - keras)) < 0.01
    assert np.array_equal(got >= 0.5, keras >= 0.5)
    assert entry["parity"]["label_agreement"] >= 0.995


def test_auto_serves_the_fastest_usable_runtime(registered: tuple[Path, Database]) -> None:
    path, _ = registered
    record = _record(path)
    speeds = {"keras": record["keras"]["images_per_s"]} | {
        name: e["images_per_s"] for name, e in record["runtimes"].items() if e["usable"]
    }
    assert record["auto"] == max(speeds, key=lambda k: speeds[k])
    assert load_predictor(path, "auto").runtime == record["auto"]


def test_auto_choice_rules() -> None:
    def rt(speed: float, usable: bool) -> dict[str, Any]:
        return {"images_per_s": speed, "usable": usable}

    record: dict[str, Any] = {
        "keras": {"images_per_s": 20.0},
        "runtimes": {"onnx": rt(25.0, True), "tflite-int8": rt(70.0, False)},
    }
    assert auto_choice(record) == "onnx"  # the faster int8 failed parity
    record["runtimes"]["tflite-int8"]["usable"] = True
    assert auto_choice(record) == "tflite-int8"
    record["runtimes"]["onnx"] = rt(10.0, True)
    record["runtimes"]["tflite-int8"] = rt(15.0, True)
    assert auto_choice(record) == "keras"  # measured slower than Keras: not worth it
    assert auto_choice(None) == "keras"


def test_absent_failed_and_unknown_runtimes_are_refused(
    registered: tuple[Path, Database], tiny_bundles: Any, tmp_path: Path
) -> None:
    # The source bundle was never exported.
    with pytest.raises(ModelError, match="'onnx' was not exported"):
        load_predictor(tiny_bundles.v1, "onnx")
    assert load_predictor(tiny_bundles.v1, "auto").runtime == "keras"
    with pytest.raises(ModelError, match="'tensorrt' is not one of"):
        load_predictor(tiny_bundles.v1, "tensorrt")
    # A copy whose record says int8 failed its parity check.
    path, _ = registered
    copy = tmp_path / "copy"
    shutil.copytree(path, copy, ignore=shutil.ignore_patterns("model.onnx"))
    record = _record(copy)
    record["runtimes"]["tflite-int8"]["usable"] = False
    record["runtimes"]["tflite-int8"]["parity"]["passed"] = False
    (copy / RUNTIMES_FILE).write_text(json.dumps(record))
    with pytest.raises(ModelError, match="'tflite-int8' is not usable: failed its parity"):
        load_predictor(copy, "tflite-int8")


def test_a_runtime_beyond_the_probability_bound_is_refused(
    registered: tuple[Path, Database], tmp_path: Path
) -> None:
    """Same labels and AUC as Keras, probabilities 0.05 off: never served.

    A record written before the bound (format 1, labels and AUC only) may call such a file
    usable; loading holds it to the bound all the same.
    """
    path, _ = registered
    copy = tmp_path / "copy"
    shutil.copytree(path, copy, ignore=shutil.ignore_patterns("model.onnx"))
    record = _record(copy)
    del record["runtimes"]["onnx"]
    entry = record["runtimes"]["tflite-int8"]
    entry["usable"] = True
    entry["images_per_s"] = 1e6  # fastest by far: auto would pick it
    entry["parity"].update(max_abs_delta_probability=0.05, label_agreement=1.0, failed=[])
    record["format"] = 1
    (copy / RUNTIMES_FILE).write_text(json.dumps(record))
    with pytest.raises(ModelError, match=r"max \|Δprobability\| 0\.0500 > 0\.02"):
        load_predictor(copy, "tflite-int8")
    assert auto_choice(record) == "keras"
    assert load_predictor(copy, "auto").runtime == "keras"


def test_corrupt_runtime_file_and_foreign_record_are_refused(
    registered: tuple[Path, Database], tmp_path: Path
) -> None:
    path, _ = registered
    copy = tmp_path / "copy"
    shutil.copytree(path, copy, ignore=shutil.ignore_patterns("model.int8.tflite"))
    onnx = copy / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"model\.onnx: sha256 .* \(corrupt or altered\)"):
        load_predictor(copy, "onnx")
    record = _record(copy)
    record["bundle_sha256"] = "0" * 64
    (copy / RUNTIMES_FILE).write_text(json.dumps(record))
    with pytest.raises(ModelError, match="recorded for another model"):
        load_predictor(copy, "auto")


def test_failed_export_is_recorded_not_raised(
    tiny_bundles: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A converter that breaks (simulated: real ones fail only on exotic models)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundles.v1, bundle)

    def broken(model: Any, size: int) -> bytes:
        raise ValueError("unsupported op Foo")

    monkeypatch.setitem(export_mod._CONVERTERS, "onnx", broken)
    record = export_runtimes(bundle, runtimes=("onnx",))
    entry = record["runtimes"]["onnx"]
    assert entry["usable"] is False
    assert entry["error"] == "ValueError: unsupported op Foo"
    assert record["auto"] == "keras"
    # No dataset root given: the documented synthetic set stood in, and the record says why.
    assert record["parity_inputs"]["source"] == "synthetic"
    assert record["parity_inputs"]["count"] == 32
    assert "no dataset root given (model register --data DIR" in record["parity_inputs"]["why"]
    with pytest.raises(ModelError, match="not usable: ValueError: unsupported op Foo"):
        load_predictor(bundle, "onnx")
    assert load_predictor(bundle, "auto").runtime == "keras"


def test_parity_inputs_fallback_is_synthetic_and_in_range(tiny_bundles: Any) -> None:
    inputs = parity_inputs(read_bundle(tiny_bundles.v1))
    assert inputs.labels is None
    assert inputs.x.shape == (32, 75, 75, 3) and inputs.x.dtype == np.float32
    assert inputs.x.min() >= -1 and inputs.x.max() <= 1
    assert np.array_equal(inputs.x[..., 0], inputs.x[..., 2])  # grey, as normalize_file


def test_parity_inputs_come_from_the_given_dataset_root_only(
    tiny_bundles: Any, cxr_dir: Path, tmp_path: Path
) -> None:
    """The folder a bundle records is where it was trained, not where the data is here."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundles.v1, bundle)
    meta = json.loads((bundle / "metadata.json").read_text())
    meta["data"] = {"folder": str(cxr_dir)}  # as a bundle trained on this machine records
    (bundle / "metadata.json").write_text(json.dumps(meta))
    names = {c: [p.name for p in _class_files(cxr_dir, c)[:3]] for c in ("NORMAL", "PNEUMONIA")}
    legacy = names["NORMAL"][:1]  # a bare name, as bundles before relative paths wrote
    relative = [f"{c}/{n}" for c, ns in names.items() for n in ns if n not in legacy]
    (bundle / "split.json").write_text(json.dumps({"val": [*legacy, *relative]}))
    info = read_bundle(bundle)
    assert parity_inputs(info).source["source"] == "synthetic"
    inputs = parity_inputs(info, data_root=cxr_dir)
    assert inputs.source["source"] == "validation" and inputs.source["count"] == 6
    assert inputs.labels is not None and sorted(inputs.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    elsewhere = parity_inputs(info, data_root=tmp_path)
    assert elsewhere.source["source"] == "synthetic"
    assert str(tmp_path) in elsewhere.source["why"]
    (bundle / "split.json").write_text(json.dumps({"val": ["../../etc/passwd"]}))
    escape = parity_inputs(read_bundle(bundle), data_root=cxr_dir)
    assert "is not a path inside the dataset root" in escape.source["why"]


def test_parity_criteria() -> None:
    ref = np.linspace(0.01, 0.99, 200)
    assert float32_parity(ref, ref + 5e-4)["passed"]
    assert not float32_parity(ref, ref + 2e-3)["passed"]
    labels = (np.arange(200) % 2).astype(np.int64)
    same = int8_parity(ref, ref + 1e-4, 0.5, labels)
    assert same["passed"] and same["label_agreement"] == 1.0 and same["auc_delta"] == 0.0
    # Every label and the AUC as Keras's, but probabilities 0.03 off: refused.
    mid = np.linspace(0.1, 0.9, 200)
    shifted = int8_parity(mid, mid + 0.03 * np.sign(mid - 0.5), 0.5, labels)
    assert shifted["label_agreement"] == 1.0 and shifted["auc_delta"] == 0.0
    assert not shifted["passed"]
    assert shifted["failed"] == ["max |Δprobability| 0.0300 > 0.02"]
    assert refusal(shifted) == (
        "failed its parity check against Keras: max |Δprobability| 0.0300 > 0.02"
    )
    # Two labels of 200 flip at the threshold: 99.0 % < 99.5 %.
    flipped = ref.copy()
    near = np.argsort(np.abs(ref - 0.5))[:2]
    flipped[near] = np.where(ref[near] >= 0.5, 0.49, 0.51)
    result = int8_parity(ref, flipped, 0.5, labels)
    assert result["labels_differing"] == 2 and not result["passed"]
    # Without true labels the AUC is taken against Keras's own labels.
    keras_only = int8_parity(ref, ref, 0.5, None)
    assert keras_only["auc_against"] == "keras labels" and keras_only["auc_keras"] == 1.0
    one_class = int8_parity(np.full(10, 0.2), np.full(10, 0.2), 0.5, None)
    assert one_class["auc"] is None and one_class["passed"]
