"""The shift stress suite: validation images re-rendered under acquisition changes.

A validation split drawn from the training images' own acquisition batch cannot show
what a new hospital's images do to the model: other exposure, contrast and processing,
other detectors, fields of view and burned-in annotations. Each shift below re-renders a
[0, 1] grey image (the stage where DICOM and JPEG meet, SPEC §6) the way one of those
changes would, before the shared tail (``unit_to_tensor``) and the model. The suite then
reports, per shift, AUC, sensitivity and specificity at the bundle's frozen threshold and
ECE, and the worst case over shifts.

Severities are fixed and deliberate: each is a change a radiographer would still call a
diagnostic image. The rendering is seeded per (shift, image), so two runs and two models
see the same images.

``Shift.in_training`` marks the shifts that training augmentation imitates (see
``augment.py``, which draws them at random strengths); the others (edge enhancement, a
black border, JPEG re-compression) are *held out* of training so the suite measures
generalisation rather than what was trained in. Calibration and threshold may use the
trained-in shifts; the held-out ones are only ever used to check.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from pacs_classifier.model import metrics as mt
from pacs_classifier.preprocess.tensor import resize, unit_to_tensor

Unit = npt.NDArray[np.float32]
Rng = np.random.Generator


@dataclass(frozen=True)
class Shift:
    name: str
    description: str
    in_training: bool
    render: Callable[[Unit, Rng], Unit]


def _clip(u: npt.NDArray[Any]) -> Unit:
    out: Unit = np.clip(u, 0.0, 1.0).astype(np.float32)
    return out


def _gamma(value: float) -> Callable[[Unit, Rng], Unit]:
    def render(u: Unit, _rng: Rng) -> Unit:
        return _clip(np.power(u, value))

    return render


def _window(u: Unit, _rng: Rng) -> Unit:
    # A narrower window around the median: contrast x1.6, the tails clipped.
    centre = float(np.median(u))
    return _clip((u - centre) * 1.6 + 0.5)


def _flat(u: Unit, _rng: Rng) -> Unit:
    # A low-contrast rendering (wide window, lifted black): what a different LUT gives.
    return _clip(0.2 + 0.55 * u)


def _noise(u: Unit, rng: Rng) -> Unit:
    # Quantum (signal-dependent) plus electronic noise of a low-dose exposure.
    sigma = 0.02 + 0.04 * np.sqrt(u)
    return _clip(u + rng.normal(0.0, 1.0, u.shape).astype(np.float32) * sigma)


def _blur(u: Unit, _rng: Rng) -> Unit:
    return _clip(ndimage.gaussian_filter(u, sigma=max(u.shape) / 150.0))


def _sharpen(u: Unit, _rng: Rng) -> Unit:
    # Unsharp-mask edge enhancement, as processing stations apply it.
    soft = ndimage.gaussian_filter(u, sigma=max(u.shape) / 100.0)
    return _clip(u + 1.2 * (u - soft))


def _low_resolution(u: Unit, _rng: Rng) -> Unit:
    rows, cols = u.shape
    small = resize(u, max(1, rows * 2 // 5), max(1, cols * 2 // 5))
    return _clip(resize(small, rows, cols))


def _zoom_in(u: Unit, _rng: Rng) -> Unit:
    # A tighter collimation: the central 80 % fills the frame.
    rows, cols = u.shape
    dr, dc = rows // 10, cols // 10
    return _clip(resize(np.ascontiguousarray(u[dr : rows - dr, dc : cols - dc]), rows, cols))


def _border(u: Unit, _rng: Rng) -> Unit:
    # A wider field of view: the image shrunk to 80 % inside a black border (collimator
    # shadow, or a detector larger than the patient).
    rows, cols = u.shape
    small = resize(u, rows * 4 // 5, cols * 4 // 5)
    out = np.zeros_like(u)
    top, left = (rows - small.shape[0]) // 2, (cols - small.shape[1]) // 2
    out[top : top + small.shape[0], left : left + small.shape[1]] = small
    return _clip(out)


def _rotate(u: Unit, rng: Rng) -> Unit:
    angle = float(rng.choice([-8.0, 8.0]))
    return _clip(ndimage.rotate(u, angle, reshape=False, order=1, mode="constant", cval=0.0))


def _jpeg(u: Unit, _rng: Rng) -> Unit:
    buf = io.BytesIO()
    Image.fromarray(np.round(u * 255).astype(np.uint8)).save(buf, format="JPEG", quality=25)
    buf.seek(0)
    with Image.open(buf) as im:
        return (np.asarray(im.convert("L"), dtype=np.float32) / 255.0).astype(np.float32)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _annotations(u: Unit, rng: Rng) -> Unit:
    # Burned-in text and a lead side marker, as portable and outside images carry them.
    im = Image.fromarray(np.round(u * 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    rows, cols = u.shape
    size = max(8, rows // 18)
    font = _font(size)
    white = 255
    draw.text((cols // 30, rows // 30), "PORTABLE AP", fill=white, font=font)
    draw.text((cols // 30, rows - 2 * size), "2026-12-02 03:14", fill=white, font=font)
    side = "R" if rng.random() < 0.5 else "L"
    x0 = int(cols * (0.8 if side == "L" else 0.1))
    y0 = int(rows * 0.15)
    box = (x0, y0, x0 + 2 * size, y0 + 2 * size)
    draw.rectangle(box, fill=white)
    draw.text((x0 + size // 2, y0 + size // 3), side, fill=0, font=font)
    return (np.asarray(im, dtype=np.float32) / 255.0).astype(np.float32)


SHIFTS: tuple[Shift, ...] = (
    Shift("exposure_dark", "gamma 1.6 (under-exposed / darker LUT)", True, _gamma(1.6)),
    Shift("exposure_bright", "gamma 0.6 (over-exposed / brighter LUT)", True, _gamma(0.6)),
    Shift("window_narrow", "contrast x1.6 around the median, tails clipped", True, _window),
    Shift("contrast_flat", "low contrast: 0.2 + 0.55 x", True, _flat),
    Shift("blur", "Gaussian blur, sigma = side / 150", True, _blur),
    Shift("low_resolution", "down to 40 % and back up", True, _low_resolution),
    Shift("zoom_in", "central 80 % (tighter collimation)", True, _zoom_in),
    Shift("rotation", "rotated 8 degrees either way", True, _rotate),
    Shift("noise", "signal-dependent detector noise", True, _noise),
    Shift("edge_enhance", "unsharp mask, amount 1.2", False, _sharpen),
    Shift("border", "shrunk to 80 % in a black border (wider field)", False, _border),
    Shift("jpeg_q25", "JPEG re-compression at quality 25", False, _jpeg),
    Shift("annotations", "burned-in text and a lead side marker", True, _annotations),
)
SHIFT_NAMES = tuple(s.name for s in SHIFTS)


def get_shifts(names: Sequence[str] | None = None) -> tuple[Shift, ...]:
    """The named shifts (all when ``names`` is None), in suite order."""
    if names is None:
        return SHIFTS
    unknown = sorted(set(names) - set(SHIFT_NAMES))
    if unknown:
        raise ValueError(f"unknown shift(s) {', '.join(unknown)}. Known: {', '.join(SHIFT_NAMES)}")
    return tuple(s for s in SHIFTS if s.name in names)


def render(shift: Shift, unit: Unit, key: str, seed: int = 0) -> Unit:
    """``unit`` re-rendered under ``shift``; the randomness is seeded by (seed, shift, key)."""
    digest = zlib.crc32(f"{seed}:{shift.name}:{key}".encode())
    return shift.render(np.asarray(unit, dtype=np.float32), np.random.default_rng(digest))


Predict = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float64]]


def shifted_predictions(
    predict: Predict,
    units: Sequence[Unit],
    keys: Sequence[str],
    image_size: int,
    shifts: Sequence[Shift],
    *,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, npt.NDArray[np.float64]]:
    """Probabilities of every image under every shift (and ``clean``), keyed by shift."""
    from tqdm import tqdm

    out: dict[str, npt.NDArray[np.float64]] = {}
    plan: list[Shift | None] = [None, *shifts]
    for shift in tqdm(plan, desc="stress suite", unit="shift", disable=not progress, leave=False):
        probs: list[npt.NDArray[np.float64]] = []
        for i in range(0, len(units), batch_size):
            batch = np.stack(
                [
                    unit_to_tensor(u if shift is None else render(shift, u, k, seed), image_size)
                    for u, k in zip(
                        units[i : i + batch_size], keys[i : i + batch_size], strict=True
                    )
                ]
            )
            probs.append(np.asarray(predict(batch), dtype=np.float64).reshape(-1))
        out["clean" if shift is None else shift.name] = np.concatenate(probs)
    return out


@dataclass(frozen=True)
class StressReport:
    """Per-shift metrics at one threshold, and the worst case over the shifts."""

    threshold: float
    rows: dict[str, dict[str, float]]
    worst: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "shifts": self.rows,
            "worst": self.worst,
            "held_out_of_training": [s.name for s in SHIFTS if not s.in_training],
        }


def stress_report(
    y: npt.ArrayLike, by_shift: dict[str, npt.NDArray[np.float64]], threshold: float
) -> StressReport:
    """AUC, sensitivity, specificity, precision, F1 at ``threshold`` and ECE per shift."""
    y_arr = np.asarray(y).astype(int)
    rows: dict[str, dict[str, float]] = {}
    for name, p in by_shift.items():
        m = mt.point_metrics(y_arr, p, threshold)
        rows[name] = {
            k: float(m[k]) for k in ("auc", "sensitivity", "specificity", "precision", "f1", "ece")
        }
        rows[name]["mean_probability_normal"] = float(np.mean(p[y_arr == 0]))
    shifted = {k: v for k, v in rows.items() if k != "clean"} or rows
    worst: dict[str, Any] = {}
    for key, pick in (("auc", min), ("sensitivity", min), ("specificity", min), ("ece", max)):
        name = pick(shifted, key=lambda s, key=key: shifted[s][key])  # type: ignore[misc]
        worst[key] = {"value": shifted[name][key], "shift": name}
    return StressReport(threshold, rows, worst)


__all__ = [
    "SHIFTS",
    "SHIFT_NAMES",
    "Shift",
    "StressReport",
    "get_shifts",
    "render",
    "shifted_predictions",
    "stress_report",
]
