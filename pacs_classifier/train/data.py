"""Labelled data: listing, patient-level split, and normalised arrays.

The Kermany et al. set has many images per patient, so the validation split is made by
*patient group*, never by image: ``person123_bacteria_4.jpeg`` and ``person123_virus_9.jpeg``
are patient ``person123``; ``IM-0115-0001.jpeg`` and ``NORMAL2-IM-0115-0002.jpeg`` are
both grouped under ``IM-0115`` (grouping by the IM number alone can only merge groups,
never leak one across the split). Any other file name is its own group.

Images go through :func:`pacs_classifier.preprocess.normalize_file`, the same function
the daemon serves with, so there is no train/serve skew.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from pacs_classifier.errors import NotAssessable, PermanentError

log = logging.getLogger(__name__)

CLASSES = ("NORMAL", "PNEUMONIA")
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm", ".dicom", ""}

_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_IM = re.compile(r"(?:^|-)IM-(\d+)-", re.IGNORECASE)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 1 = PNEUMONIA
    group: str


def patient_group(filename: str) -> str:
    """The patient key of a Kermany file name (see the module docstring)."""
    if m := _PERSON.match(filename):
        return m.group(1).lower()
    if m := _IM.search(filename):
        return f"IM-{m.group(1)}"
    return filename


def list_samples(data_dir: Path) -> list[Sample]:
    """Every image under ``data_dir/NORMAL`` and ``data_dir/PNEUMONIA``, sorted."""
    if not data_dir.is_dir():
        raise PermanentError(f"{data_dir}: data folder not found")
    samples: list[Sample] = []
    for label, name in enumerate(CLASSES):
        folder = data_dir / name
        if not folder.is_dir():
            raise PermanentError(f"{data_dir}: needs a sub-folder {name}/ (one per class)")
        for path in sorted(folder.iterdir()):
            if (
                path.is_file()
                and not path.name.startswith(".")
                and path.suffix.lower() in IMAGE_SUFFIXES
            ):
                samples.append(Sample(path, label, patient_group(path.name)))
    counts = Counter(s.label for s in samples)
    for label, name in enumerate(CLASSES):
        if counts[label] == 0:
            raise PermanentError(
                f"{data_dir / name}: no images of class {name}; training needs both classes"
            )
    return samples


@dataclass(frozen=True)
class Split:
    train: list[Sample]
    val: list[Sample]

    def summary(self) -> dict[str, object]:
        def counts(items: Sequence[Sample]) -> dict[str, int]:
            c = Counter(CLASSES[s.label] for s in items)
            return {name: c[name] for name in CLASSES}

        return {
            "train": counts(self.train),
            "val": counts(self.val),
            "train_groups": len({s.group for s in self.train}),
            "val_groups": len({s.group for s in self.val}),
            "grouping": "patient (personN, or IM number), no group on both sides",
        }


def patient_split(samples: Sequence[Sample], val_fraction: float, seed: int) -> Split:
    """A seeded, stratified split by patient group with no group on both sides.

    Groups are assigned to the class most of their images have; within each class,
    shuffled groups go to validation until it holds ``val_fraction`` of that class's
    images. Each class gets at least one group on each side.
    """
    if not 0 < val_fraction < 1:
        raise PermanentError(f"validation fraction must be in (0, 1), received {val_fraction}")
    by_group: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_group[s.group].append(s)
    groups_of_class: dict[int, list[str]] = defaultdict(list)
    for group, items in sorted(by_group.items()):
        majority = Counter(s.label for s in items).most_common(1)[0][0]
        groups_of_class[majority].append(group)
    rng = random.Random(seed)  # noqa: S311 - a reproducible split, not a secret
    val_groups: set[str] = set()
    for label in range(len(CLASSES)):
        groups = groups_of_class[label]
        if len(groups) < 2:
            raise PermanentError(
                f"class {CLASSES[label]} has {len(groups)} patient group(s); a patient-level "
                "validation split needs at least 2"
            )
        rng.shuffle(groups)
        total = sum(len(by_group[g]) for g in groups)
        taken = 0
        for g in groups[:-1]:  # leave at least one group for training
            if taken >= val_fraction * total and taken > 0:
                break
            val_groups.add(g)
            taken += len(by_group[g])
    train = [s for s in samples if s.group not in val_groups]
    val = [s for s in samples if s.group in val_groups]
    overlap = {s.group for s in train} & {s.group for s in val}
    if overlap:  # cannot happen by construction; checked because a leak would be silent
        raise AssertionError(f"patient groups on both sides of the split: {sorted(overlap)[:5]}")
    return Split(train, val)


def load_arrays(
    samples: Sequence[Sample], image_size: int, *, workers: int = 2, progress: bool = True
) -> npt.NDArray[np.float32]:
    """Normalise every sample; return one grey channel per image (N, S, S).

    The three channels of a normalised tensor are identical grey copies, so one is kept
    to save memory (5,216 images at 224 px: 1 GB instead of 3.1 GB). They stay float32,
    bit-identical to what the daemon serves, so validation numbers are the served ones.
    """
    from pacs_classifier.preprocess import normalize_file

    out = np.empty((len(samples), image_size, image_size), dtype=np.float32)

    def one(i: int) -> None:
        path = samples[i].path
        try:
            x = normalize_file(path, image_size=image_size)
        except NotAssessable as exc:
            raise PermanentError(f"{path}: cannot be used for training: {exc}") from exc
        out[i] = x[..., 0]

    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = pool.map(one, range(len(samples)))
        for _ in tqdm(
            futures,
            total=len(samples),
            desc="normalising images",
            unit="img",
            disable=not progress,
            leave=False,
        ):
            pass
    return out


def patient_folds(samples: Sequence[Sample], k: int, seed: int) -> list[Split]:
    """``k`` seeded, stratified folds by patient group: fold i validates on its groups and
    trains on the rest, so every image is out-of-fold exactly once.

    Groups are assigned to their majority class; within each class, shuffled groups go,
    largest first, to the fold that holds the fewest images of that class so far.
    """
    if not 2 <= k <= 20:
        raise PermanentError(f"folds must be in 2..20, received {k}")
    by_group: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_group[s.group].append(s)
    groups_of_class: dict[int, list[str]] = defaultdict(list)
    for group, items in sorted(by_group.items()):
        groups_of_class[Counter(s.label for s in items).most_common(1)[0][0]].append(group)
    rng = random.Random(seed)  # noqa: S311 - a reproducible split, not a secret
    fold_of: dict[str, int] = {}
    for label in range(len(CLASSES)):
        groups = groups_of_class[label]
        if len(groups) < k:
            raise PermanentError(
                f"class {CLASSES[label]} has {len(groups)} patient group(s); {k} folds need "
                f"at least {k}"
            )
        rng.shuffle(groups)
        groups.sort(key=lambda g: -len(by_group[g]))  # stable: ties keep the shuffle
        load = [0] * k
        for g in groups:
            fold = min(range(k), key=lambda f: (load[f], f))
            fold_of[g] = fold
            load[fold] += len(by_group[g])
    return [
        Split(
            train=[s for s in samples if fold_of[s.group] != i],
            val=[s for s in samples if fold_of[s.group] == i],
        )
        for i in range(k)
    ]


def load_units(
    samples: Sequence[Sample], *, workers: int = 2, progress: bool = True
) -> list[npt.NDArray[np.float32]]:
    """Every sample at the [0, 1] grey stage (native size), for the stress suite."""
    from pacs_classifier.preprocess import file_to_unit

    def one(sample: Sample) -> npt.NDArray[np.float32]:
        try:
            return file_to_unit(sample.path)
        except NotAssessable as exc:
            raise PermanentError(f"{sample.path}: cannot be used: {exc}") from exc

    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(
            tqdm(
                pool.map(one, samples),
                total=len(samples),
                desc="reading images",
                unit="img",
                disable=not progress,
                leave=False,
            )
        )
