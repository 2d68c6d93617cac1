"""Acquisition augmentation for phase 2: random versions of the trained-in stress shifts.

Each training image, each epoch, gets a random draw of the acquisition changes that
``stress.SHIFTS`` marks ``in_training``: exposure (gamma), window and contrast, blur,
resolution loss, tighter collimation (zoom in), rotation, detector noise and burned-in
annotations (text and lead side markers). Each applies with probability one half at a
random strength around the suite's fixed one. Edge enhancement, a black border (wider
field of view) and JPEG re-compression are never trained in, so the stress suite keeps
measuring what the model was not taught.

Why annotations and noise are trained in (docs/model-quality.md, F1): without them, a
burned-in label turned every NORMAL validation image into PNEUMONIA (p ≈ 0.997) and
detector noise halved specificity: shortcuts of this training set that a new site's
images would trigger.

The same numpy code as the suite, run through ``tf.numpy_function`` in the input
pipeline; it costs ~2 ms an image, small beside a training step.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw
from scipy import ndimage

from pacs_classifier.preprocess.tensor import resize
from pacs_classifier.train.stress import _font

Unit = npt.NDArray[np.float32]

_WORDS = (
    "L",
    "R",
    "AP",
    "PA",
    "PORTABLE",
    "SUPINE",
    "ERECT",
    "SITTING",
    "CHEST",
    "ICU",
    "WARD 4",
    "BEDSIDE",
    "ER",
)


def _text(rng: np.random.Generator) -> str:
    kind = rng.integers(0, 3)
    if kind == 0:
        return str(rng.choice(_WORDS))
    if kind == 1:
        return " ".join(str(w) for w in rng.choice(_WORDS, size=2))
    return (
        f"20{rng.integers(10, 30)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d} "
        f"{rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}"
    )


def _annotate(u: Unit, rng: np.random.Generator) -> Unit:
    im = Image.fromarray(np.round(u * 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    rows, cols = u.shape
    for _ in range(int(rng.integers(1, 4))):
        size = int(rng.integers(max(6, rows // 30), max(8, rows // 12)))
        x = int(rng.integers(0, max(1, cols - 4 * size)))
        y = int(rng.integers(0, max(1, rows - 2 * size)))
        grey = int(rng.integers(200, 256))
        if rng.random() < 0.35:  # a lead marker: a bright box with a dark letter
            draw.rectangle((x, y, x + 2 * size, y + 2 * size), fill=grey)
            draw.text(
                (x + size // 2, y + size // 3),
                str(rng.choice(["L", "R"])),
                fill=0,
                font=_font(size),
            )
        else:
            draw.text((x, y), _text(rng), fill=grey, font=_font(size))
    return (np.asarray(im, dtype=np.float32) / 255.0).astype(np.float32)


def random_acquisition(u: Unit, rng: np.random.Generator) -> Unit:
    """One random acquisition rendering of a [0, 1] grey image (same shape)."""
    rows, cols = u.shape
    out = u.astype(np.float32, copy=True)

    def coin() -> bool:
        return bool(rng.random() < 0.5)

    if coin():
        out = np.power(out, np.float32(np.exp(rng.uniform(-0.55, 0.55))))
    if coin():
        mid = float(np.median(out))
        out = (out - mid) * np.float32(rng.uniform(0.55, 1.7)) + mid + rng.uniform(-0.1, 0.1)
    if coin():
        crop = rng.uniform(0.0, 0.13)  # up to 26 % of each side in all
        dr, dc = int(rows * crop), int(cols * crop)
        if dr and dc:
            out = resize(np.ascontiguousarray(out[dr : rows - dr, dc : cols - dc]), rows, cols)
    if coin():
        out = ndimage.rotate(out, rng.uniform(-10, 10), reshape=False, order=1, cval=0.0)
    if coin():
        out = ndimage.gaussian_filter(out, sigma=rng.uniform(0.3, 2.0) * max(rows, cols) / 224)
    elif coin():
        f = rng.uniform(0.35, 0.9)
        out = resize(resize(out, max(8, int(rows * f)), max(8, int(cols * f))), rows, cols)
    out = np.clip(out, 0.0, 1.0)
    if coin():
        sigma = rng.uniform(0.005, 0.03) + rng.uniform(0.0, 0.06) * np.sqrt(out)
        noisy = out + rng.normal(0.0, 1.0, out.shape).astype(np.float32) * sigma
        out = np.clip(noisy, 0.0, 1.0).astype(np.float32)
    if coin():
        out = _annotate(out.astype(np.float32), rng)
    return np.asarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def augment_batch(x: npt.NDArray[np.float32], seed: int) -> npt.NDArray[np.float32]:
    """A batch (N, S, S) in [-1, 1] rendered by :func:`random_acquisition`, image by image.

    The training images are unpadded squares (the 224-px set), so no border is kept apart.
    """
    rng = np.random.default_rng(seed)
    out = np.empty_like(x, dtype=np.float32)
    for i in range(x.shape[0]):
        unit = (x[i] + 1.0) * 0.5
        out[i] = random_acquisition(unit.astype(np.float32), rng) * 2.0 - 1.0
    return out
