"""Measure a bundle's out-of-distribution check (``ood.npz``) through a serving runtime.

    .venv/bin/python scripts/measure_ood.py models/reference --runtime keras \
        --data ../shared/data/cxr224/train --dicom ../shared/data/dicom [--json out.json]

Reports, at the bundle's threshold:

- false refusals on the validation chest images of the bundle's split (must be ≤ 1 %),
  and on ``--stress-images`` of them under every stress-suite acquisition shift (chest
  images a new site may send; informative);
- each DICOM of ``--dicom`` (``INVENTORY.tsv`` says which are chest radiographs) through
  the serving path, eligibility included, and its pixels through the check alone; plus
  the dental panoramic with its descriptions and body part removed (metadata that lies);
- catch rate on synthetic non-radiographs written as 8-bit PNG files: noise, gradients,
  patterns, text, blank, and the photographs that ship with scikit-image.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pacs_classifier.config import EligibilityConfig  # noqa: E402
from pacs_classifier.errors import NotAssessable  # noqa: E402
from pacs_classifier.model.bundle import read_bundle  # noqa: E402
from pacs_classifier.model.ood import OodModel, read_ood  # noqa: E402
from pacs_classifier.model.runtime import Predictor, load_predictor  # noqa: E402
from pacs_classifier.preprocess import normalize_file, serving_tensor  # noqa: E402
from pacs_classifier.preprocess.eligibility import DESCRIPTION_KEYWORDS  # noqa: E402
from pacs_classifier.train.ood import split_files  # noqa: E402

#: Elements the stripped dental copy loses: everything eligibility reads about what was imaged.
STRIPPED = DESCRIPTION_KEYWORDS


def scores(predictor: Predictor, ood: OodModel, x: npt.NDArray[np.float32]) -> Any:
    out = []
    for i in range(0, len(x), 16):
        feats = predictor.infer(x[i : i + 16]).features
        assert feats is not None, "this runtime returns no features"
        out.append(ood.score(feats))
    return np.concatenate(out) if out else np.zeros(0)


def strip_dental(src: Path, dest: Path) -> Path:
    import pydicom

    ds = pydicom.dcmread(src)
    for keyword in STRIPPED:
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(dest)
    return dest


def synthetic_images(out: Path, size: int = 512, seed: int = 0) -> dict[str, list[Path]]:
    """8-bit PNG files of things that are not radiographs, by kind."""
    import skimage.data
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    kinds: dict[str, list[Any]] = {k: [] for k in ("noise", "gradient", "pattern", "text")}
    kinds["blank"] = [np.full((size, size), v, np.uint8) for v in (0, 128, 255)]
    for _ in range(4):
        kinds["noise"].append(rng.integers(0, 256, (size, size), dtype=np.uint8))
        kinds["noise"].append(np.clip(rng.normal(128, 40, (size, size)), 0, 255).astype(np.uint8))
        coarse = rng.uniform(0, 255, (8, 8))
        kinds["noise"].append(np.kron(coarse, np.ones((size // 8, size // 8))).astype(np.uint8))
    ramp = np.linspace(0, 255, size)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(4):
        kinds["gradient"].append(np.tile(ramp if i % 2 else ramp[:, None], (1, 1)).astype(np.uint8))
        r = np.hypot(xx - 0.5, yy - 0.5) * (1 + i)
        kinds["gradient"].append((255 * np.clip(1 - r, 0, 1)).astype(np.uint8))
    kinds["gradient"] = [np.broadcast_to(g, (size, size)).copy() for g in kinds["gradient"]]
    for cells in (4, 8, 16, 32):
        check = (np.indices((size, size)) // (size // cells)).sum(axis=0) % 2
        kinds["pattern"].append((255 * check).astype(np.uint8))
        stripes = (np.arange(size) // (size // cells)) % 2
        kinds["pattern"].append(np.tile(255 * stripes, (size, 1)).astype(np.uint8))
    kinds["text"] += [getattr(skimage.data, n)() for n in ("text", "page")]
    font = ImageFont.load_default()
    for i in range(6):
        img = Image.new("L", (size, size), 255 if i % 2 else 0)
        draw = ImageDraw.Draw(img)
        for line in range(0, size, 14):
            words = " ".join(f"REPORT {rng.integers(10**6)} lorem ipsum" for _ in range(3))
            draw.text((4, line), words, fill=0 if i % 2 else 255, font=font)
        kinds["text"].append(np.asarray(img))
    photos = (
        "astronaut",
        "camera",
        "coffee",
        "chelsea",
        "rocket",
        "coins",
        "moon",
        "clock",
        "hubble_deep_field",
        "immunohistochemistry",
        "retina",
        "grass",
        "gravel",
        "brick",
        "cell",
        "colorwheel",
        "logo",
        "horse",
    )
    kinds["photo"] = []
    for name in photos:
        arr = np.asarray(getattr(skimage.data, name)())
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        kinds["photo"].append(arr[..., :3] if arr.ndim == 3 else arr)
    files: dict[str, list[Path]] = {}
    for kind, images in kinds.items():
        files[kind] = []
        for i, arr in enumerate(images):
            path = out / f"{kind}_{i:02d}.png"
            Image.fromarray(np.ascontiguousarray(arr)).save(path)
            files[kind].append(path)
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--runtime", default="keras")
    ap.add_argument("--dicom", type=Path, default=REPO.parent / "shared" / "data" / "dicom")
    ap.add_argument(
        "--data", type=Path, required=True, help="dataset root the bundle's split.json is under"
    )
    ap.add_argument("--stress-images", type=int, default=200)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    info = read_bundle(args.bundle)
    ood = read_ood(info)
    if ood is None:
        raise SystemExit(f"{args.bundle}: no ood.npz (scripts/fit_ood.py fits one)")
    predictor = load_predictor(info, args.runtime)
    size = info.image_size
    result: dict[str, Any] = {"runtime": predictor.runtime, **ood.summary()}
    print(f"runtime {predictor.runtime}, threshold {ood.threshold:.3f} ({ood.dims[1]} components)")

    val = split_files(info, "val", args.data)
    result["validation"] = validation(predictor, ood, val, size)
    if args.stress_images:
        result["stress"] = stress(predictor, ood, val, size, args.stress_images)
    result["dicom"] = dicom(predictor, ood, args.dicom, size)
    result["synthetic"] = synthetic(predictor, ood, size)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def validation(predictor: Predictor, ood: OodModel, val: list[Path], size: int) -> Any:
    t = ood.threshold
    s_val = scores(predictor, ood, np.stack([normalize_file(p, size) for p in val]))
    print(
        f"validation chest images: {np.sum(s_val > t)} of {len(s_val)} refused "
        f"({100 * np.mean(s_val > t):.2f} %), median score {np.median(s_val):.3f}"
    )
    return {"n": len(s_val), "refused": int(np.sum(s_val > t))}


def stress(predictor: Predictor, ood: OodModel, val: list[Path], size: int, n: int) -> Any:
    from pacs_classifier.train.data import Sample, load_units
    from pacs_classifier.train.stress import SHIFTS, shifted_predictions

    t = ood.threshold
    pick = np.linspace(0, len(val) - 1, n).round().astype(int)
    chosen = [val[i] for i in sorted(set(pick.tolist()))]
    units = load_units([Sample(p, 0, p.name) for p in chosen], progress=False)
    by_shift = shifted_predictions(
        lambda b: scores(predictor, ood, b), units, [p.name for p in chosen], size, SHIFTS
    )
    print(f"stress suite ({len(chosen)} validation images per shift), refused:")
    for name, v in by_shift.items():
        print(f"  {name:<16} {np.sum(v > t):3d}  (max score {v.max():.2f})")
    return {"n": len(chosen), "refused": {k: int(np.sum(v > t)) for k, v in by_shift.items()}}


def dicom(predictor: Predictor, ood: OodModel, folder: Path, size: int) -> Any:
    inventory = {}
    with (folder / "INVENTORY.tsv").open(encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            inventory[row["file"]] = row["chest_radiograph"] == "yes"
    rules = EligibilityConfig()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        files = sorted(folder / n for n in inventory)
        dental = [p for p in files if p.name.startswith("dental")]
        extra = [strip_dental(p, Path(tmp) / f"stripped_{p.name}") for p in dental]
        print("DICOM files (eligibility, then the OOD score of the pixels alone):")
        for path in [*files, *extra]:
            chest = inventory.get(path.name, False)
            try:
                serving_tensor(path, size, rules=rules)
                eligible = "eligible"
            except NotAssessable as exc:
                eligible = exc.reason
            x = normalize_file(path, size)[None]
            score = float(scores(predictor, ood, x)[0])
            refused = score > ood.threshold
            prob = float(predictor.predict(x)[0])
            out.append(
                {
                    "file": path.name,
                    "chest": chest,
                    "eligibility": eligible,
                    "score": score,
                    "refused": bool(refused),
                    "probability": prob,
                }
            )
            print(
                f"  {path.name:<58} chest={'yes' if chest else 'no ':<3} {eligible:<15} "
                f"score {score:6.2f} {'REFUSED' if refused else 'passes'}  p={prob:.3f}"
            )
    return out


def synthetic(predictor: Predictor, ood: OodModel, size: int) -> Any:
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        print("synthetic non-radiographs (PNG through normalize_file), caught:")
        for kind, paths in synthetic_images(Path(tmp)).items():
            s = scores(predictor, ood, np.stack([normalize_file(p, size) for p in paths]))
            caught = int(np.sum(s > ood.threshold))
            out[kind] = {"n": len(s), "caught": caught, "min_score": float(s.min())}
            print(f"  {kind:<9} {caught:2d} of {len(s):2d}  (lowest score {s.min():.2f})")
    total = sum(v["n"] for v in out.values())
    caught = sum(v["caught"] for v in out.values())
    print(f"  all       {caught} of {total} ({100 * caught / total:.1f} %)")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
