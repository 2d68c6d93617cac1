"""Benchmark: decode and normalise separately, ours against a scikit-image baseline.

One core (threads pinned to 1, the process pinned to one CPU), the same run for both:

- decode: ``pydicom.dcmread`` + ``pixel_array`` (the codec's cost, not ours);
- normalise ours: ``pixels.to_unit`` + ``unit_to_tensor`` (what normalize_file runs
  after decoding);
- normalise baseline: the same steps in float64 with scikit-image's anti-aliased resize
  (``skimage.transform.resize(..., anti_aliasing=True)``), the obvious implementation.

Inputs: a generated 2,048² 16-bit MONOCHROME1 file with a window, the same without one
(percentile window), the 1955x1841 JPEG 2000 chest from ../shared, and a 224² training
JPEG end to end (normalize_file). Run:

    nice -n 10 .venv/bin/python scripts/bench_preprocess.py [--repeat 30]
"""

# ruff: noqa: E402  (the thread limits must be set before numpy loads its BLAS)
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

from pacs_classifier.preprocess import normalize_file, unit_to_tensor
from pacs_classifier.preprocess.decode import decode_pixels, read_dataset
from pacs_classifier.preprocess.pixels import (
    apply_modality_lut,
    apply_voi,
    auto_window,
    padding_mask,
    stored_values,
    to_unit,
    voi_transform,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def pin_to_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}"
    return "not pinned (no sched_setaffinity)"


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """Median and best wall time of ``fn`` in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def synthetic_2k(path: Path, *, window: bool) -> Path:
    """A 2,048² 16-bit MONOCHROME1 CR: smooth anatomy-like field plus noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:2048, 0:2048] / 2048.0
    field = 30000 + 20000 * np.sin(3 * xx) * np.cos(2 * yy) + rng.normal(0, 800, (2048, 2048))
    pixels = np.clip(field, 0, 65535).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = ComputedRadiographyImageStorage, generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.Rows = ds.Columns = 2048
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = 30000, 40000
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def baseline_tensor(stored: NDArray[Any], ds: Dataset, image_size: int) -> NDArray[np.float32]:
    """The obvious float64 implementation with scikit-image's anti-aliased resize."""
    from skimage.transform import resize

    arr = stored_values(stored, ds)
    mask = padding_mask(arr, ds)
    voi = voi_transform(ds) or auto_window(arr, ds, mask)
    modality = apply_modality_lut(arr, ds).astype(np.float64)
    unit = apply_voi(modality, ds, voi).astype(np.float64)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        unit = 1.0 - unit
    rows, cols = unit.shape
    scale = image_size / max(rows, cols)
    shape = (round(rows * scale), round(cols * scale))
    resize_fn: Callable[..., NDArray[np.float64]] = resize
    small = resize_fn(unit, shape, order=1, anti_aliasing=True, preserve_range=True)
    square = np.zeros((image_size, image_size), dtype=np.float64)
    top, left = (image_size - shape[0]) // 2, (image_size - shape[1]) // 2
    square[top : top + shape[0], left : left + shape[1]] = small
    return np.repeat((square * 2.0 - 1.0)[:, :, None], 3, axis=2).astype(np.float32)


def bench_dicom(label: str, path: Path, repeat: int, image_size: int) -> dict[str, Any]:
    def decode() -> tuple[Dataset, NDArray[Any]]:
        ds = read_dataset(path)
        return ds, decode_pixels(ds)

    ds, stored = decode()
    ours = unit_to_tensor(to_unit(stored, ds), image_size)
    base = baseline_tensor(stored, ds, image_size)
    return {
        "input": label,
        "shape": "x".join(str(n) for n in stored.shape),
        "decode": timed(decode, repeat),
        "ours": timed(lambda: unit_to_tensor(to_unit(stored, ds), image_size), repeat),
        "baseline": timed(lambda: baseline_tensor(stored, ds, image_size), repeat),
        "max_diff": float(np.max(np.abs(ours - base))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=299)
    args = parser.parse_args()
    pinned = pin_to_one_core()
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {pinned}; numpy {np.__version__}, pydicom "
        f"{pydicom.__version__}; repeat={args.repeat}, image_size={args.image_size}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for window in (True, False):
            label = f"synthetic 2048² 16-bit, {'window' if window else 'no window (percentile)'}"
            path = synthetic_2k(Path(tmp) / f"w{window}.dcm", window=window)
            rows.append(bench_dicom(label, path, args.repeat, args.image_size))
    j2k = SHARED / "dicom" / "chest_cr_mono1_15bit_j2k_lossless.dcm"
    if j2k.is_file():
        rows.append(bench_dicom("RG1 chest, JPEG 2000 lossless", j2k, args.repeat, args.image_size))
    print("| input | pixels | decode ms | normalise ours ms | baseline ms | speed-up | max |Δ| |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['input']} | {r['shape']} | {r['decode'][0]:.1f} | "
            f"{r['ours'][0]:.1f} (best {r['ours'][1]:.1f}) | {r['baseline'][0]:.1f} | "
            f"{r['baseline'][0] / r['ours'][0]:.1f}x | {r['max_diff']:.3f} |"
        )
    jpegs = sorted((SHARED / "cxr224" / "train" / "NORMAL").glob("*.jpeg"))[:1]
    if jpegs:
        median, best = timed(lambda: normalize_file(jpegs[0], args.image_size), args.repeat)
        print(f"\n224² training JPEG, normalize_file end to end: {median:.2f} ms (best {best:.2f})")


if __name__ == "__main__":
    main()
