"""The shared tail: a [0, 1] grey image to an InceptionV3 input tensor.

Training (JPEG/PNG) and serving (DICOM) both end here, so this is where train/serve skew
would creep in; there is exactly one implementation.

The resize is separable: ``out = R_rows @ image @ R_cols.T`` with sparse weight matrices.
Shrinking uses area averaging (each output pixel is the mean of the input area it covers,
fractional edges weighted by overlap; the anti-aliasing a box filter gives, and what
OpenCV calls INTER_AREA); enlarging uses linear interpolation between pixel centres (edge
values repeated). A 2,048² image shrinks to 299² in a few milliseconds on one core,
where scikit-image's Gaussian-smoothed float64 resize takes ~180 ms.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numpy.typing import NDArray
from scipy import sparse

FloatImage = NDArray[np.float32]


def unit_to_tensor(unit: NDArray[np.float32], image_size: int) -> FloatImage:
    """A 2-D float32 image in [0, 1] → float32 (image_size, image_size, 3) in [-1, 1].

    Aspect-preserving resize so the long side is ``image_size``, centred on a black
    (0 → -1) square, the grey copied to 3 channels, then ``2x - 1`` as InceptionV3's
    ``preprocess_input`` expects.
    """
    check_image_size(image_size)
    if unit.ndim != 2 or unit.shape[0] < 1 or unit.shape[1] < 1:
        raise ValueError(f"expected a non-empty 2-D image. Received: shape={unit.shape}")
    rows, cols = unit.shape
    scale = image_size / max(rows, cols)
    out_rows = min(image_size, max(1, round(rows * scale)))
    out_cols = min(image_size, max(1, round(cols * scale)))
    small = resize(unit, out_rows, out_cols)

    square = np.zeros((image_size, image_size), dtype=np.float32)
    top, left = (image_size - out_rows) // 2, (image_size - out_cols) // 2
    square[top : top + out_rows, left : left + out_cols] = small
    np.clip(square, 0.0, 1.0, out=square)  # convex weights; clip only float rounding
    square *= np.float32(2.0)
    square -= np.float32(1.0)
    return np.repeat(square[:, :, np.newaxis], 3, axis=2)


def check_image_size(image_size: int) -> None:
    """Raise ValueError unless ``image_size`` is a positive int (checked before decoding)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int. Received: image_size={image_size!r}")


def resize(image: NDArray[np.float32], out_rows: int, out_cols: int) -> FloatImage:
    """Resample a 2-D float32 image to (out_rows, out_cols): area mean down, linear up."""
    image = np.ascontiguousarray(image, dtype=np.float32)
    rows, cols = image.shape
    if (rows, cols) == (out_rows, out_cols):
        return image.copy()
    # Reduce the longer dimension first: the second product is then on the small array.
    tmp = image if out_rows == rows else np.asarray(_weights(rows, out_rows) @ image)
    if out_cols == cols:
        return np.ascontiguousarray(tmp, dtype=np.float32)
    out = _weights(cols, out_cols) @ np.ascontiguousarray(tmp.T)
    return np.ascontiguousarray(np.asarray(out).T, dtype=np.float32)


@lru_cache(maxsize=64)
def _weights(n_in: int, n_out: int) -> sparse.csr_matrix:
    """Sparse (n_out, n_in) resampling weights, each row summing to 1. Cached: training
    images mostly share one size."""
    if n_out < n_in:
        rows, cols, vals = _area_weights(n_in, n_out)
    else:
        rows, cols, vals = _linear_weights(n_in, n_out)
    matrix = sparse.csr_matrix(
        (vals.astype(np.float32), (rows, cols)), shape=(n_out, n_in), dtype=np.float32
    )
    matrix.sum_duplicates()
    return matrix


def _area_weights(
    n_in: int, n_out: int
) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.float64]]:
    """Output pixel i covers input [i*f, (i+1)*f), f = n_in / n_out; weight = overlap / f."""
    f = n_in / n_out
    span = int(np.ceil(f)) + 1  # the most input pixels one output pixel can touch
    starts = np.arange(n_out, dtype=np.float64) * f
    ends = starts + f
    first = np.floor(starts).astype(np.intp)
    idx = first[:, None] + np.arange(span, dtype=np.intp)[None, :]
    overlap = np.minimum(ends[:, None], idx + 1.0) - np.maximum(starts[:, None], idx)
    overlap = np.clip(overlap, 0.0, None)
    keep = (overlap > 0) & (idx < n_in)
    out_idx = np.broadcast_to(np.arange(n_out, dtype=np.intp)[:, None], idx.shape)
    weights = overlap[keep]
    rows = out_idx[keep]
    # Normalise per row (exactly 1 up to rounding; also absorbs the clipped last edge).
    sums = np.bincount(rows, weights=weights, minlength=n_out)
    return rows, idx[keep], weights / sums[rows]


def _linear_weights(
    n_in: int, n_out: int
) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.float64]]:
    """Linear interpolation at output pixel centres mapped into input coordinates."""
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    x = np.clip(x, 0.0, n_in - 1.0)
    left = np.floor(x).astype(np.intp)
    right = np.minimum(left + 1, n_in - 1)
    frac = x - left
    out_idx = np.arange(n_out, dtype=np.intp)
    rows = np.concatenate([out_idx, out_idx])
    cols = np.concatenate([left, right])
    vals = np.concatenate([1.0 - frac, frac])
    return rows, cols, vals
