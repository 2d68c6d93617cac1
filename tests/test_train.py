"""The trainer: patient-level split, the two phases, the bundle, bad inputs.

Tests train for real, on a few dozen images at 75 px (the smallest InceptionV3 input).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pytest

from pacs_classifier.errors import PermanentError
from pacs_classifier.model.bundle import BASE_NAME, load_keras_model, read_bundle, split_images
from pacs_classifier.model.ood import read_ood
from pacs_classifier.model.validation_scores import read_validation_scores
from pacs_classifier.train.data import list_samples, patient_group, patient_split
from pacs_classifier.train.model import BaseWeights, build_base
from pacs_classifier.train.stress import SHIFTS
from pacs_classifier.train.trainer import TrainOptions, train

SIZE = 75


def _tiny_dataset(cxr_dir: Path, dest: Path, per_class: int = 16) -> Path:
    for cls in ("NORMAL", "PNEUMONIA"):
        (dest / cls).mkdir(parents=True)
        for path in sorted((cxr_dir / cls).iterdir())[:per_class]:
            shutil.copy(path, dest / cls / path.name)
    return dest


@pytest.fixture(scope="module")
def tiny_data(cxr_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_dataset(cxr_dir, tmp_path_factory.mktemp("data"))


def _opts(data: Path, out: Path, **kw: object) -> TrainOptions:
    base: dict[str, object] = {
        "data": data,
        "out": out,
        "weights": "none",
        "image_size": SIZE,
        "epochs_frozen": 1,
        "epochs_finetune": 1,
        "batch_size": 8,
        "progress": False,
        "patience": 1,
    }
    base.update(kw)
    return TrainOptions(**base)  # type: ignore[arg-type]


def _val_folder(bundle: Path, data: Path, dest: Path) -> Path:
    """A labelled folder holding only the bundle's validation images."""
    for cls in ("NORMAL", "PNEUMONIA"):
        (dest / cls).mkdir(parents=True)
    for path, label in split_images(read_bundle(bundle), data):
        shutil.copy(path, dest / ("NORMAL", "PNEUMONIA")[label] / path.name)
    return dest


@pytest.fixture(scope="module")
def tiny_bundle(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "b"
    train(_opts(tiny_data, out, version="tiny-1"))
    return out


# ------------------------------------------------------------------ split


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("person1000_virus_1681.jpeg", "person1000"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-0115-0002.jpeg", "IM-0115"),
        ("other.png", "other.png"),
    ],
)
def test_patient_group(name: str, group: str) -> None:
    assert patient_group(name) == group


def test_split_on_the_real_train_folder_has_no_shared_patient(cxr_dir: Path) -> None:
    samples = list_samples(cxr_dir)
    split = patient_split(samples, 0.2, seed=7)
    train_groups = {s.group for s in split.train}
    val_groups = {s.group for s in split.val}
    assert not train_groups & val_groups
    assert len(split.train) + len(split.val) == len(samples) == 5216
    for label in (0, 1):  # stratified: each class near 20% in validation
        n_val = sum(s.label == label for s in split.val)
        n_all = sum(s.label == label for s in samples)
        assert 0.18 < n_val / n_all < 0.25
    again = patient_split(samples, 0.2, seed=7)
    assert [s.path for s in again.val] == [s.path for s in split.val]
    other = patient_split(samples, 0.2, seed=8)
    assert {s.group for s in other.val} != val_groups


# ------------------------------------------------------------------ phases


def _layer_weights(layers: list[Any]) -> list[tuple[str, list[np.ndarray]]]:
    """(layer type, weights) in layer order: names differ between Keras sessions."""
    return [
        (type(layer).__name__, [np.asarray(w.numpy()) for w in layer.weights]) for layer in layers
    ]


def _as_stored(arrays: list[np.ndarray]) -> list[np.ndarray]:
    return [a.astype(np.float16).astype(np.float32) for a in arrays]


def test_phase1_leaves_the_base_bit_identical(
    tiny_data: Path, base_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "p1"
    train(
        _opts(
            tiny_data,
            out,
            weights=str(base_weights),
            epochs_finetune=0,
            base_cut="mixed10",
            base_input_range="unit",
        )
    )
    model = load_keras_model(read_bundle(out))
    trained = _layer_weights(model.get_layer(BASE_NAME).layers)
    fresh = _layer_weights(build_base(BaseWeights.parse(str(base_weights)), SIZE).layers)
    assert len(trained) == len(fresh)
    for (kind_a, after), (kind_b, before) in zip(trained, fresh, strict=True):
        assert kind_a == kind_b
        for a, b in zip(after, _as_stored(before), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=kind_a)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["history"]["phase2"] == {}
    assert (
        meta["base_weights"]["sha256"]
        == "ddab033857ceac05bd5912e1823420472952e2862ffbce0ba71715fa34c2f9a5"
    )


def test_phase2_trains_only_the_unfrozen_blocks_and_keeps_batchnorm_statistics(
    tiny_data: Path, base_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "p2"
    train(
        _opts(
            tiny_data,
            out,
            weights=str(base_weights),
            epochs_finetune=1,
            base_cut="mixed10",
            unfreeze_from="mixed9",
            base_input_range="unit",
            lr_finetune=1e-3,
        )
    )
    model = load_keras_model(read_bundle(out))
    trained = _layer_weights(model.get_layer(BASE_NAME).layers)
    fresh_base = build_base(BaseWeights.parse(str(base_weights)), SIZE)
    fresh = _layer_weights(fresh_base.layers)
    start = [layer.name for layer in fresh_base.layers].index("mixed8") + 1
    changed_above = 0
    for idx, ((kind, after), (_, before)) in enumerate(zip(trained, fresh, strict=True)):
        for a, b in zip(after, _as_stored(before), strict=True):
            if idx < start or kind == "BatchNormalization":
                # frozen blocks, and every BatchNorm statistic and parameter
                np.testing.assert_array_equal(a, b, err_msg=f"layer {idx} ({kind})")
            elif not np.array_equal(a, b):
                changed_above += 1
    assert changed_above > 0, "no weight of the unfrozen blocks changed in phase 2"


def test_bundle_metadata_and_plots(tiny_bundle: Path, tiny_data: Path) -> None:
    info = read_bundle(tiny_bundle)
    meta = info.metadata
    assert info.version == "tiny-1"
    assert meta.image_size == SIZE
    assert meta.metrics.phase1 and meta.metrics.phase1_chosen is not None
    assert 0 < meta.threshold.value < 1
    assert meta.threshold.rule is not None and "sensitivity" in meta.threshold.rule
    assert meta.threshold.target_sensitivity == 0.97
    assert meta.calibration.temperature > 0
    split = json.loads((tiny_bundle / "split.json").read_text())
    train_groups = {patient_group(PurePosixPath(n).name) for n in split["train"]}
    assert not train_groups & {patient_group(PurePosixPath(n).name) for n in split["val"]}
    # paths relative to the dataset root; the recorded folder is only informational
    assert split["val"][0].split("/")[0] in ("NORMAL", "PNEUMONIA")
    assert meta.data is not None and meta.data.folder == str(tiny_data.resolve())
    assert len(split_images(info, tiny_data)) == len(split["val"]) == meta.metrics.final.n
    for plot in ("training_curves", "roc", "precision_recall", "confusion_matrix", "calibration"):
        assert (tiny_bundle / "plots" / f"{plot}.png").stat().st_size > 1000
    final = meta.metrics.final
    # the threshold rule holds on validation
    assert final.sensitivity is not None and final.sensitivity >= 0.97
    # The out-of-distribution check is fitted for every new bundle, on its own split.
    ood = read_ood(info)
    assert ood is not None and ood.bundle_sha256 == info.sha256
    # Each pool: the clean images and each of them under every trained-in shift.
    pooled = 1 + sum(s.in_training for s in SHIFTS)
    assert ood.fitted_on == pooled * len(split["train"])
    assert ood.validation_n == pooled * len(split["val"])
    # the drift report's reference: the validation split's labels and served scores
    scores = read_validation_scores(tiny_bundle)
    assert scores is not None and scores.labels.size == len(split["val"])
    c = final.confusion
    assert c is not None and int(scores.labels.sum()) == c["tp"] + c["fn"]
    above = int(np.sum(scores.probabilities >= meta.threshold.value))
    assert abs(above - (c["tp"] + c["fp"])) <= 1  # float32 storage may move the edge case


def test_evaluate_reproduces_the_recorded_validation_metrics(
    tiny_bundle: Path, tiny_data: Path, tmp_path: Path
) -> None:
    from pacs_classifier.train.evaluate import evaluate_bundle

    val_dir = _val_folder(tiny_bundle, tiny_data, tmp_path / "val")
    ev = evaluate_bundle(tiny_bundle, val_dir, tmp_path / "eval", progress=False)
    recorded = read_bundle(tiny_bundle).metadata.metrics.final
    assert ev.metrics["n"] == recorded.n
    assert ev.metrics["confusion"] == recorded.confusion
    assert ev.metrics["auc"] == pytest.approx(recorded.auc, abs=1e-6)
    assert ev.metrics["brier"] == pytest.approx(recorded.brier, abs=1e-5)


# ------------------------------------------------------------------ bad inputs


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pacs_classifier", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("pacs-classifier: error")]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr


def test_empty_folder_fails_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "d" / "NORMAL").mkdir(parents=True)
    (tmp_path / "d" / "PNEUMONIA").mkdir()
    proc = _cli(
        "train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--weights", "none"
    )
    _assert_one_line_error(proc, "no images of class NORMAL")


def test_one_class_only_fails(tmp_path: Path, tiny_data: Path) -> None:
    data = tmp_path / "d"
    shutil.copytree(tiny_data / "NORMAL", data / "NORMAL")
    (data / "PNEUMONIA").mkdir()
    with pytest.raises(PermanentError, match="both classes"):
        list_samples(data)


def test_unreadable_image_fails_naming_the_file(tmp_path: Path, tiny_data: Path) -> None:
    data = tmp_path / "d"
    shutil.copytree(tiny_data, data)
    (data / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"not a jpeg at all")
    proc = _cli(
        "train",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "o"),
        "--weights",
        "none",
        "--image-size",
        "75",
        "--quiet",
    )
    _assert_one_line_error(proc, "IM-9999-0001.jpeg")


def test_wrong_weights_file_fails_with_one_line(tmp_path: Path, tiny_data: Path) -> None:
    bogus = tmp_path / "bogus.weights.h5"
    bogus.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    proc = _cli(
        "train",
        "--data",
        str(tiny_data),
        "--out",
        str(tmp_path / "o"),
        "--weights",
        str(bogus),
        "--image-size",
        "75",
        "--quiet",
    )
    _assert_one_line_error(proc, "cannot be loaded into InceptionV3")
    proc = _cli(
        "train",
        "--data",
        str(tiny_data),
        "--out",
        str(tmp_path / "o"),
        "--weights",
        str(tmp_path / "absent.h5"),
    )
    _assert_one_line_error(proc, "not 'imagenet', 'none' or a file")


def test_recalibrate_script_derives_a_platt_bundle_with_the_same_model(
    tiny_bundle: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "recal"
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve().parents[1] / "scripts" / "recalibrate_bundle.py"),
            str(tiny_bundle),
            "--out",
            str(out),
            "--method",
            "platt",
            "--data",
            str(tiny_data),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    old, new = read_bundle(tiny_bundle), read_bundle(out)
    assert new.version == "tiny-1-platt"
    assert new.metadata.files == old.metadata.files  # the model itself is untouched
    assert new.metadata.derived_from is not None
    assert new.metadata.derived_from.version == "tiny-1"
    assert (new.metadata.calibration.method or "").startswith("Platt")
    final = new.metadata.metrics.final
    assert final.auc == pytest.approx(old.metadata.metrics.final.auc)
    assert final.sensitivity is not None and final.sensitivity >= 0.97
    assert new.metadata.metrics.final_before_recalibration == old.metadata.metrics.final
    assert (out / "plots" / "calibration.png").is_file()


# ------------------------------------------------------------------ shift-robust training


def test_shift_robust_training_records_cross_validation_and_stress_suite(
    tiny_data: Path, tmp_path: Path
) -> None:
    from pacs_classifier.train.evaluate import evaluate_bundle
    from pacs_classifier.train.stress import SHIFT_NAMES

    out = tmp_path / "robust"
    train(
        _opts(
            tiny_data,
            out,
            intensity="equalize",
            augment="acquisition",
            label_smoothing=0.1,
            cv_folds=3,
            calibrate_on="validation+shifts",
        )
    )
    info = read_bundle(out)
    meta = info.metadata
    assert meta.preprocessing is not None and meta.preprocessing.intensity is not None
    assert "equalisation" in meta.preprocessing.intensity
    assert load_keras_model(info).get_layer("equalize") is not None
    assert "pooled" in (meta.calibration.fitted_on or "")
    assert meta.threshold.chosen_on == meta.calibration.fitted_on
    final = meta.metrics.final
    assert final.fit_pool is not None and final.fit_pool.n > (final.n or 0)
    cv = meta.cross_validation
    assert cv is not None
    assert cv["folds"] == 3 and len(cv["per_fold"]) == 3
    assert sum(f["n"] for f in cv["per_fold"]) == 32  # every image out of fold once
    auc = cv["summary"]["auc"]
    assert auc["min"] <= auc["mean"] <= auc["max"]
    stress = meta.stress
    assert stress is not None
    assert set(stress["shifts"]) == {"clean", *SHIFT_NAMES}
    assert stress["threshold"] == meta.threshold.value
    assert stress["n"] == final.n
    worst_spec = min(r["specificity"] for k, r in stress["shifts"].items() if k != "clean")
    assert stress["worst"]["specificity"]["value"] == worst_spec
    # The clean row is the recorded validation; evaluate --stress reproduces the suite.
    assert stress["shifts"]["clean"]["specificity"] == final.specificity
    val = _val_folder(out, tiny_data, tmp_path / "val")
    ev = evaluate_bundle(out, val, tmp_path / "eval", progress=False, stress=True)
    assert ev.metrics["runtime"] == "keras"
    for name, row in stress["shifts"].items():
        again = ev.metrics["stress"]["shifts"][name]
        assert again["auc"] == pytest.approx(row["auc"], abs=1e-6), name
        assert again["specificity"] == row["specificity"], name
    assert (tmp_path / "eval" / "stress.json").is_file()


def test_acquisition_augmentation_keeps_range_and_draws_anew(cxr_dir: Path) -> None:
    import tensorflow as tf

    from pacs_classifier.preprocess import normalize_file
    from pacs_classifier.train.trainer import _acquisition_effects

    files = sorted((cxr_dir / "NORMAL").iterdir())[:8]
    x = np.stack([normalize_file(f, SIZE)[..., 0] for f in files])
    tf.random.set_seed(3)
    out = np.asarray(_acquisition_effects(tf.constant(x)))
    assert out.shape == x.shape and out.min() >= -1.0 and out.max() <= 1.0
    changed = np.abs(out - x).mean(axis=(1, 2)) > 1e-3
    assert changed.sum() >= 6  # each of eight effects hits about half the images
    again = np.asarray(_acquisition_effects(tf.constant(x)))
    assert not np.array_equal(again, out)  # a new draw each batch


def test_new_training_options_are_checked(tiny_data: Path, tmp_path: Path) -> None:
    for kw, needle in (
        ({"intensity": "clahe"}, "--intensity"),
        ({"augment": "heavy"}, "--augment"),
        ({"label_smoothing": 0.6}, "--label-smoothing"),
        ({"cv_folds": 1}, "--cv-folds"),
        ({"calibrate_on": "validation+shifts", "stress": False}, "stress suite"),
    ):
        with pytest.raises(PermanentError, match=needle):
            train(_opts(tiny_data, tmp_path / "x", **kw))
