"""Stored pixel values to a grey image in [0, 1]: the DICOM grayscale pipeline, step by step.

Each step is a small function ``f(arr, ds)`` citing the part of DICOM PS3.3 it implements,
in the order of PS3.3 C.11 (Figure C.11-1): stored values → Modality LUT → VOI LUT →
presentation (MONOCHROME1 inverted) → [0, 1]. Everything is float32: the pixel data has at
most 16 significant bits, which float32 holds exactly, and float64 would double the
memory traffic that dominates the cost of a 2,048² image.

:func:`to_unit` composes the steps. When the Modality LUT is a rescale and the VOI is a
linear window (the common case by far), the three steps are one affine map followed by a
clip, which :func:`to_unit` applies in a single pass; the step-by-step path gives the same
values (tests compare them) and serves the rest (LUT sequences, SIGMOID).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

FloatImage = NDArray[np.float32]

MONOCHROME: Final = ("MONOCHROME1", "MONOCHROME2")
# pydicom decodes the YBR family to RGB (its default ``as_rgb=True``), so after decoding
# all of these are RGB samples.
COLOUR: Final = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")

# Robust window for data without a VOI: the tails hold collimator edges, markers and
# dead pixels, which would otherwise compress the anatomy into a few grey levels.
PERCENTILES: Final = (0.5, 99.5)
# The percentiles are taken on a regular grid of at most this many pixels (every 8th row
# and column of a 2k² image): each 0.5% tail still holds ~330 of them, and np.percentile
# costs ~1 ms here against ~10 ms at 2^18 (measured on the 2-core dev machine).
PERCENTILE_SAMPLE: Final = 1 << 16
# ITU-R BT.601 luma weights, the same for RGB DICOM and RGB JPEG/PNG files.
BT601: Final = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Rescale:
    """Modality LUT as Rescale Slope and Intercept, PS3.3 C.11.1.1.2."""

    slope: float = 1.0
    intercept: float = 0.0


@dataclass(frozen=True)
class LookupTable:
    """A LUT of PS3.3 C.11.1.1.1 / C.11.2.1.1: ``data[x - first_mapped]``, ends extended."""

    first_mapped: int
    data: NDArray[np.float32]
    bits: int

    def apply(self, arr: NDArray[Any]) -> FloatImage:
        """Look up every value; inputs outside the table take its first or last entry."""
        index = np.rint(np.asarray(arr, dtype=np.float32)) - np.float32(self.first_mapped)
        np.clip(index, 0, self.data.size - 1, out=index)
        return self.data[index.astype(np.intp)]


@dataclass(frozen=True)
class Window:
    """Window Center/Width with its VOI LUT Function, PS3.3 C.11.2.1.2-3."""

    center: float
    width: float
    function: str = "LINEAR"


# --- stored values -----------------------------------------------------------------------


def stored_values(arr: NDArray[Any], ds: Dataset) -> NDArray[Any]:
    """Keep only the Bits Stored bits of each sample, sign-extended when signed.

    PS3.3 C.7.6.3.1 (Bits Stored, High Bit, Pixel Representation) and PS3.5 8.1.1: the
    bits above High Bit are not part of the value and old devices put overlays there.
    Returns ``arr`` itself when every value is already in range (the usual case).
    """
    if arr.dtype.kind not in "iu":
        return arr
    bits_stored = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    shift = arr.dtype.itemsize * 8 - bits_stored
    if shift <= 0:
        return arr
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    if signed:
        lo, hi = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    else:
        lo, hi = 0, (1 << bits_stored) - 1
    if arr.size == 0 or (int(arr.min()) >= lo and int(arr.max()) <= hi):
        return arr
    work = arr.astype(np.int64 if signed else np.uint64)
    width = 64 - bits_stored
    # A left then arithmetic right shift drops the high bits and extends the sign.
    work = (work << width) >> width if signed else work & np.uint64(hi)
    return work.astype(arr.dtype)


def padding_mask(arr: NDArray[Any], ds: Dataset) -> NDArray[np.bool_] | None:
    """Pixels outside the image proper, or None where the data set declares none.

    PS3.3 C.7.5.1.1.2: Pixel Padding Value (0028,0120), with Pixel Padding Range Limit
    (0028,0121) a range, both in stored-value space (before the Modality LUT).
    """
    if "PixelPaddingValue" not in ds or ds.PixelPaddingValue is None:
        return None
    value = _as_stored(ds.PixelPaddingValue, ds)
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None:
        mask = arr == value
    else:
        end = _as_stored(limit, ds)
        lo, hi = min(value, end), max(value, end)
        mask = (arr >= lo) & (arr <= hi)
    return mask if bool(mask.any()) else None


def _as_stored(value: Any, ds: Dataset) -> int:
    """A US/SS tag value read as the pixel data's signedness (PS3.3 C.7.5.1.1.2)."""
    number = int(value[0] if isinstance(value, (list, tuple)) else value)
    bits = int(ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation") or 0) == 1 and number >= 1 << (bits - 1):
        number -= 1 << bits
    return number


# --- Modality LUT ------------------------------------------------------------------------


def modality_transform(ds: Dataset) -> Rescale | LookupTable:
    """The Modality LUT of the data set, PS3.3 C.11.1.

    A Modality LUT Sequence (0028,3000) takes precedence over Rescale Slope/Intercept
    (the standard forbids both; devices that send both mean the sequence).
    """
    seq = ds.get("ModalityLUTSequence")
    if seq:
        return lut_from_item(seq[0], ds, "(0028,3000) Modality LUT Sequence")
    slope = float(ds.get("RescaleSlope") or 1.0)
    intercept = float(ds.get("RescaleIntercept") or 0.0)
    return Rescale(slope, intercept)


def apply_modality_lut(arr: NDArray[Any], ds: Dataset) -> FloatImage:
    """Stored values to modality values (e.g. optical density, HU), PS3.3 C.11.1."""
    transform = modality_transform(ds)
    if isinstance(transform, LookupTable):
        return transform.apply(arr)
    out = arr.astype(np.float32)
    if transform.slope != 1.0:
        out *= np.float32(transform.slope)
    if transform.intercept != 0.0:
        out += np.float32(transform.intercept)
    return out


def lut_from_item(item: Dataset, ds: Dataset, where: str) -> LookupTable:
    """Read LUT Descriptor (0028,3002) and LUT Data (0028,3006), PS3.3 C.11.1.1.1."""
    desc = item.get("LUTDescriptor")
    if desc is None or len(desc) != 3 or "LUTData" not in item:
        raise ValueError(f"{where} has no valid (0028,3002) LUT Descriptor / LUT Data")
    entries = int(desc[0]) or 65536  # PS3.3 C.11.1.1.1: 0 means 2^16 entries
    first = int(desc[1])
    # The first mapped value is US or SS, following the pixel data's signedness.
    if int(ds.get("PixelRepresentation") or 0) == 1 and first >= 1 << 15:
        first -= 1 << 16
    bits = int(desc[2])
    raw = item.LUTData
    if isinstance(raw, bytes):
        # OW data; 8-bit entries may come packed two per word.
        dtype = np.uint8 if bits <= 8 and len(raw) in (entries, entries + 1) else np.dtype("<u2")
        data = np.frombuffer(raw, dtype=dtype)
    else:
        data = np.atleast_1d(np.asarray(raw, dtype=np.int64))
    if data.size < entries:
        raise ValueError(
            f"{where}: (0028,3006) LUT Data has {data.size} entries, descriptor says {entries}"
        )
    return LookupTable(first, data[:entries].astype(np.float32), bits)


# --- VOI LUT -----------------------------------------------------------------------------


def voi_transform(ds: Dataset) -> Window | LookupTable | None:
    """The VOI of the data set, PS3.3 C.11.2, or None where it declares none (or a bad one).

    A VOI LUT Sequence (0028,3010) wins over Window Center/Width; of several windows, the
    first is the default one (PS3.3 C.11.2.1.2).
    """
    seq = ds.get("VOILUTSequence")
    if seq:
        return lut_from_item(seq[0], ds, "(0028,3010) VOI LUT Sequence")
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    center = float(center[0] if _is_multi(center) else center)
    width = float(width[0] if _is_multi(width) else width)
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        log.warning("unknown (0028,1056) VOI LUT Function %r; using LINEAR", function)
        function = "LINEAR"
    # PS3.3 C.11.2.1.2: Window Width >= 1 for LINEAR, > 0 otherwise.
    if not math.isfinite(center) or not math.isfinite(width) or width <= 0:
        log.warning("invalid (0028,1050/1051) window %s/%s; using an automatic one", center, width)
        return None
    if function == "LINEAR" and width < 1:
        return None
    return Window(center, width, function)


def _is_multi(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"


def auto_window(arr: NDArray[Any], ds: Dataset, mask: NDArray[np.bool_] | None = None) -> Window:
    """A window for data without a VOI, in modality-value space.

    Data of at most 8 bits stored is already a display image (a secondary capture, a
    converted JPEG): its full stored range is the window, so it normalises exactly like an
    8-bit JPEG/PNG file. Deeper data gets a robust percentile window (PERCENTILES) over
    the non-padding pixels, measured on a regular subsample.
    """
    transform = modality_transform(ds)
    bits_stored = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    if bits_stored <= 8 and isinstance(transform, Rescale):
        signed = int(ds.get("PixelRepresentation") or 0) == 1
        lo = -(1 << (bits_stored - 1)) if signed else 0
        hi = lo + (1 << bits_stored) - 1
        a = lo * transform.slope + transform.intercept
        b = hi * transform.slope + transform.intercept
        return full_range_window(min(a, b), max(a, b))
    step = max(1, math.ceil(math.sqrt(arr.size / PERCENTILE_SAMPLE)))
    sample = arr[::step, ::step]
    if mask is not None:
        sample = sample[~mask[::step, ::step]]
    if sample.size == 0:
        return full_range_window(0.0, 1.0)
    modality_values = apply_modality_lut(sample, ds).ravel()
    ends = np.percentile(modality_values, PERCENTILES)
    return full_range_window(float(ends[0]), float(ends[1]))


def full_range_window(lo: float, hi: float) -> Window:
    """The window that maps ``lo`` to 0 and ``hi`` to 1 (LINEAR_EXACT, PS3.3 C.11.2.1.3.2)."""
    if hi <= lo:
        hi = lo + 1.0  # a flat image: everything maps to 0, not a division by zero
    return Window((lo + hi) / 2.0, hi - lo, "LINEAR_EXACT")


def window_affine(window: Window) -> tuple[float, float]:
    """``(a, b)`` with ``clip(a*x + b, 0, 1)`` equal to a LINEAR or LINEAR_EXACT window.

    PS3.3 C.11.2.1.2.1 (LINEAR): ``((x - (c - 0.5)) / (w - 1) + 0.5)`` between the two
    clamps, which meet the line exactly; C.11.2.1.3.2 (LINEAR_EXACT): ``(x - c) / w + 0.5``.
    """
    if window.function == "LINEAR":
        # Width 1 is a threshold: the line is vertical, approximate it by a steep one.
        a = 1.0 / max(window.width - 1.0, 1e-6)
        return a, 0.5 - (window.center - 0.5) * a
    if window.function == "LINEAR_EXACT":
        a = 1.0 / window.width
        return a, 0.5 - window.center * a
    raise ValueError(f"VOI LUT Function {window.function} is not linear")


def apply_voi(
    arr: NDArray[Any], ds: Dataset, window: Window | LookupTable | None = None
) -> FloatImage:
    """Modality values to [0, 1] through the VOI, PS3.3 C.11.2.

    ``window`` defaults to :func:`voi_transform`; callers without one pass
    :func:`auto_window`'s.
    """
    voi = window if window is not None else voi_transform(ds)
    if voi is None:
        voi = auto_window(arr, ds)
    if isinstance(voi, LookupTable):
        # PS3.3 C.11.2.1.1: entries span 0 .. 2^bits - 1 (the descriptor's third value);
        # some devices declare 16 bits for 12-bit data, so trust the larger of the two.
        top = max(float((1 << voi.bits) - 1), float(voi.data.max(initial=1.0)))
        out = voi.apply(arr)
        out *= np.float32(1.0 / top)
        return np.clip(out, 0.0, 1.0, out=out)
    if voi.function == "SIGMOID":
        # PS3.3 C.11.2.1.3.1: 1 / (1 + exp(-4 (x - c) / w)).
        z = np.asarray(arr, dtype=np.float32) - np.float32(voi.center)
        z *= np.float32(-4.0 / voi.width)
        np.clip(z, -80.0, 80.0, out=z)  # exp overflows float32 past ~88
        np.exp(z, out=z)
        z += np.float32(1.0)
        np.reciprocal(z, out=z)
        return z
    a, b = window_affine(voi)
    return affine_clip(arr, a, b)


def affine_clip(arr: NDArray[Any], a: float, b: float) -> FloatImage:
    """``clip(a*arr + b, 0, 1)`` in float32, in three passes and one allocation."""
    out = np.empty(arr.shape, dtype=np.float32)
    np.multiply(arr, np.float32(a), out=out)
    out += np.float32(b)
    return np.clip(out, 0.0, 1.0, out=out)


# --- presentation --------------------------------------------------------------------------


def apply_presentation(unit: FloatImage, ds: Dataset) -> FloatImage:
    """MONOCHROME1 (minimum value white) inverted to MONOCHROME2, PS3.3 C.7.6.3.1.2."""
    if _photometric(ds) == "MONOCHROME1":
        return np.subtract(np.float32(1.0), unit, dtype=np.float32)
    return unit


def _photometric(ds: Dataset) -> str:
    return str(ds.get("PhotometricInterpretation") or "").strip().upper()


def rgb_to_luminance(rgb: NDArray[Any]) -> FloatImage:
    """Grey luminance Y of RGB samples with the ITU-R BT.601 weights, float32.

    Used for RGB/YBR secondary captures (after pydicom's conversion to RGB, PS3.3
    C.7.6.3.1.2) and for colour JPEG/PNG files alike, so both give the same grey.
    """
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected RGB samples of shape (rows, columns, 3); got {rgb.shape}")
    out = rgb[..., 0].astype(np.float32)
    out *= np.float32(BT601[0])
    out += np.float32(BT601[1]) * rgb[..., 1].astype(np.float32)
    out += np.float32(BT601[2]) * rgb[..., 2].astype(np.float32)
    return out


def display_to_unit(arr: NDArray[Any], bits: int) -> FloatImage:
    """A display-ready image of ``bits`` bits (JPEG/PNG, colour DICOM) to [0, 1].

    The same window and arithmetic as :func:`to_unit` on an 8-bit MONOCHROME2 data set
    without a VOI, so a JPEG and a DICOM wrapping its pixels give identical values.
    """
    a, b = window_affine(full_range_window(0.0, float((1 << bits) - 1)))
    return affine_clip(arr, a, b)


# --- the pipeline --------------------------------------------------------------------------


def to_unit(arr: NDArray[Any], ds: Dataset, *, fused: bool = True) -> FloatImage:
    """Decoded stored values to a grey image in [0, 1], black = low attenuation.

    Monochrome data runs the PS3.3 C.11 pipeline; colour (already RGB) is converted to
    luminance. Padding pixels (PS3.3 C.7.5.1.1.2) are left out of the automatic window and
    come out 0, the same black as the square padding added later. ``fused=False`` forces
    the step-by-step path (tests compare the two).
    """
    photometric = _photometric(ds)
    if photometric in COLOUR:
        bits = int(ds.get("BitsStored") or 8)
        return display_to_unit(rgb_to_luminance(arr), bits)
    if photometric not in MONOCHROME:
        raise ValueError(f"(0028,0004) Photometric Interpretation {photometric!r} unsupported")
    arr = stored_values(arr, ds)
    mask = padding_mask(arr, ds)
    modality = modality_transform(ds)
    voi = voi_transform(ds) or auto_window(arr, ds, mask)
    unit = None
    if fused and isinstance(modality, Rescale) and isinstance(voi, Window):
        unit = _fused_linear(arr, modality, voi, photometric == "MONOCHROME1")
    if unit is None:
        unit = apply_presentation(apply_voi(apply_modality_lut(arr, ds), ds, voi), ds)
    if mask is not None:
        unit[mask] = 0.0
    return unit


def _fused_linear(
    arr: NDArray[Any], modality: Rescale, voi: Window, invert: bool
) -> FloatImage | None:
    """Rescale, a linear window and the MONOCHROME1 inversion as one affine map + clip.

    ``clip(a*(m*x + k) + b)`` = ``clip((a*m)*x + (a*k + b))``, and ``1 - clip(y)`` =
    ``clip(1 - y)``: the composition is exact up to float32 rounding. None for SIGMOID.
    """
    if voi.function == "SIGMOID":
        return None
    a, b = window_affine(voi)
    scale, offset = a * modality.slope, a * modality.intercept + b
    if invert:
        scale, offset = -scale, 1.0 - offset
    return affine_clip(arr, scale, offset)
