"""The shift stress suite, the equalisation layer and patient-level folds.

The shifts run on real radiographs from ``../shared``; the layer is checked for what it is
for (a monotone change of grey levels leaves its output nearly unchanged) and for surviving
the bundle's serialisation and both exporters.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from pacs_classifier.preprocess import file_to_unit, normalize_file
from pacs_classifier.train.data import list_samples, patient_folds
from pacs_classifier.train.stress import (
    SHIFTS,
    get_shifts,
    render,
    shifted_predictions,
    stress_report,
)


@pytest.fixture(scope="module")
def radiograph(cxr_dir: Path) -> npt.NDArray[np.float32]:
    return file_to_unit(cxr_dir / "PNEUMONIA" / "person1000_bacteria_2931.jpeg")


def test_every_shift_keeps_shape_range_and_is_reproducible(
    radiograph: npt.NDArray[np.float32],
) -> None:
    for shift in SHIFTS:
        out = render(shift, radiograph, "a.jpeg")
        assert out.shape == radiograph.shape, shift.name
        assert out.dtype == np.float32, shift.name
        assert out.min() >= 0.0 and out.max() <= 1.0, shift.name
        assert np.array_equal(out, render(shift, radiograph, "a.jpeg")), shift.name
        # a real change, not a no-op
        assert np.abs(out - radiograph).mean() > 0.004, shift.name


def test_shifts_do_what_their_names_say(radiograph: npt.NDArray[np.float32]) -> None:
    by = {s.name: s for s in SHIFTS}
    dark = render(by["exposure_dark"], radiograph, "k")
    bright = render(by["exposure_bright"], radiograph, "k")
    assert dark.mean() < radiograph.mean() < bright.mean()
    assert render(by["contrast_flat"], radiograph, "k").std() < radiograph.std()
    blurred = render(by["blur"], radiograph, "k")
    assert np.abs(np.diff(blurred, axis=1)).mean() < np.abs(np.diff(radiograph, axis=1)).mean()
    sharp = render(by["edge_enhance"], radiograph, "k")
    assert np.abs(np.diff(sharp, axis=1)).mean() > np.abs(np.diff(radiograph, axis=1)).mean()
    border = render(by["border"], radiograph, "k")
    assert border[:5].max() == 0.0 and border[:, :5].max() == 0.0
    noisy = render(by["noise"], radiograph, "k")
    assert not np.array_equal(noisy, render(by["noise"], radiograph, "other-key"))
    marked = render(by["annotations"], radiograph, "k")
    assert (marked >= 0.999).sum() > (radiograph >= 0.999).sum() + 50


def test_some_shifts_are_held_out_of_training() -> None:
    held_out = {s.name for s in SHIFTS if not s.in_training}
    assert {"edge_enhance", "jpeg_q25", "border"} <= held_out
    assert {s.name for s in SHIFTS} - held_out  # and some are trained in
    with pytest.raises(ValueError, match="unknown shift"):
        get_shifts(["gamma", "blur"])


def test_shifted_predictions_and_report(cxr_dir: Path) -> None:
    samples = [*list_samples(cxr_dir)[:6], *list_samples(cxr_dir)[-6:]]
    units = [file_to_unit(s.path) for s in samples]
    y = np.array([s.label for s in samples])
    seen: list[int] = []

    def brightness(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        seen.append(len(batch))
        assert batch.shape[1:] == (75, 75, 3)
        out: npt.NDArray[np.float64] = (batch[..., 0].mean(axis=(1, 2)) + 1) / 2
        return out.astype(np.float64)

    shifts = get_shifts(["exposure_dark", "exposure_bright"])
    by = shifted_predictions(
        brightness, units, [s.path.name for s in samples], 75, shifts, batch_size=5
    )
    assert list(by) == ["clean", "exposure_dark", "exposure_bright"]
    assert sum(seen) == 3 * len(samples)
    assert (by["exposure_dark"] < by["clean"]).all()
    assert (by["exposure_bright"] > by["clean"]).all()
    report = stress_report(y, by, threshold=float(np.median(by["clean"])))
    assert set(report.rows) == set(by)
    assert report.worst["specificity"]["shift"] == "exposure_bright"  # all brighter: more FP
    assert report.worst["sensitivity"]["shift"] == "exposure_dark"
    bright = report.rows["exposure_bright"]["specificity"]
    assert report.worst["specificity"]["value"] == bright
    assert "jpeg_q25" in report.as_dict()["held_out_of_training"]


def test_patient_folds_cover_every_image_once_without_shared_patients(cxr_dir: Path) -> None:
    samples = list_samples(cxr_dir)
    folds = patient_folds(samples, 5, seed=7)
    out_of_fold = Counter(s.path for fold in folds for s in fold.val)
    assert len(out_of_fold) == len(samples) and set(out_of_fold.values()) == {1}
    for fold in folds:
        assert not {s.group for s in fold.train} & {s.group for s in fold.val}
        share = sum(s.label for s in fold.val) / len(fold.val)
        assert 0.70 < share < 0.78  # stratified: the set is 74 % PNEUMONIA
        assert 0.15 < len(fold.val) / len(samples) < 0.25
    again = patient_folds(samples, 5, seed=7)
    assert [f.val for f in again] == [f.val for f in folds]


# ------------------------------------------------------------------ equalisation layer


def _grey_batch(cxr_dir: Path, size: int = 75) -> npt.NDArray[np.float32]:
    files = [*sorted((cxr_dir / "NORMAL").iterdir())[:2]]
    files += sorted((cxr_dir / "PNEUMONIA").iterdir())[:2]
    return np.stack([normalize_file(f, size) for f in files])


def test_equalisation_removes_a_change_of_grey_levels(cxr_dir: Path) -> None:
    from pacs_classifier.model.layers import HistogramEqualization

    x = _grey_batch(cxr_dir)
    u = (x + 1) / 2
    layer = HistogramEqualization()
    base = np.asarray(layer(x))
    assert base.shape == x.shape and base.min() >= -1.0 and base.max() <= 1.0
    for changed in (u**1.7, u**0.6, np.clip(0.2 + 0.55 * u, 0, 1)):
        out = np.asarray(layer((changed * 2 - 1).astype(np.float32)))
        assert np.abs(out - base).mean() < 0.04
        assert np.abs(changed * 2 - 1 - x).mean() > 0.1  # the input did change
    # padding (exactly -1) stays black and does not count in the histogram
    padded = -np.ones_like(x)
    padded[:, 20:55] = x[:, 20:55]
    out = np.asarray(layer(padded))
    assert (out[:, :20] == -1).all() and (out[:, 55:] == -1).all()
    assert out[:, 20:55].max() > 0.9


def test_equalised_model_survives_serialisation_and_export(cxr_dir: Path) -> None:
    import keras

    from pacs_classifier.model.export import to_onnx, to_tflite_int8
    from pacs_classifier.train.model import BaseWeights, build_base, build_classifier, cut_base

    base = cut_base(build_base(BaseWeights.parse("none"), 75), "mixed0")
    model = build_classifier(base, 75, "unit", intensity="equalize")
    restored = keras.models.model_from_json(model.to_json())
    restored.set_weights(model.get_weights())
    x = _grey_batch(cxr_dir)
    want = np.asarray(model(x, training=False)).reshape(-1)
    assert np.allclose(np.asarray(restored(x, training=False)).reshape(-1), want, atol=1e-6)
    assert restored.get_layer("equalize").bins == model.get_layer("equalize").bins

    import onnxruntime as ort

    session = ort.InferenceSession(to_onnx(model, 75), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0].reshape(-1)
    assert np.max(np.abs(got - want)) < 1e-4

    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=to_tflite_int8(model, 75))
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], list(x.shape))
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], x)
    interp.invoke()
    assert np.max(np.abs(interp.get_tensor(out["index"]).reshape(-1) - want)) < 0.05
