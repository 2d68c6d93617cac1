"""Fit a bundle's out-of-distribution check (``ood.npz``) from its own split.

The features are those the bundle serves (Keras, layer ``pool``) of up to
``max_train`` training images and every validation image named by ``split.json``, read
from the dataset root it is relative to (given explicitly, as for registration's parity
check) through :func:`normalize_file`, the serving path. The trainer calls
:func:`fit_bundle_ood` on each new bundle; ``scripts/fit_ood.py`` does it for an existing
one. ``ood.npz`` is a new file beside the model files: the checksummed files and
``metadata.json`` are not touched.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from pacs_classifier.errors import ModelError, NotAssessable, PermanentError
from pacs_classifier.model.bundle import BundleInfo, read_bundle, split_images
from pacs_classifier.model.ood import (
    DEFAULT_COMPONENTS,
    MAX_FALSE_REFUSAL,
    OOD_FILE,
    OodModel,
    fit_ood,
    write_ood,
)
from pacs_classifier.model.runtime import KerasPredictor, Predictor

log = logging.getLogger(__name__)

#: Training images the PCA is fitted on (spread evenly over the sorted split).
DEFAULT_TRAIN_IMAGES = 2000
#: Images of each split re-rendered under each trained-in acquisition shift and pooled
#: with the clean ones (0: clean images only).
DEFAULT_SHIFT_IMAGES = 100


def split_files(info: BundleInfo, part: str, data: Path) -> list[Path]:
    """The files of split ``part`` (``train`` or ``val``) found under the dataset root."""
    try:
        return [path for path, _ in split_images(info, data, part)]
    except ModelError as exc:
        raise PermanentError(f"{info.path}: no {part!r} images to fit on: {exc}") from None


def features_of(
    predictor: Predictor, files: Sequence[Path], *, batch_size: int = 16
) -> npt.NDArray[np.float32]:
    """Pooled features of ``files`` (unreadable ones skipped, with a warning)."""
    from pacs_classifier.preprocess import normalize_file

    size = predictor.info.image_size
    parts: list[npt.NDArray[np.float32]] = []
    for i in range(0, len(files), batch_size):
        batch = []
        for path in files[i : i + batch_size]:
            try:
                batch.append(normalize_file(path, size))
            except (NotAssessable, OSError) as exc:
                log.warning("%s skipped: %s", path.name, exc)
        if not batch:
            continue
        feats = predictor.infer(np.stack(batch)).features
        if feats is None:
            raise ModelError(f"{predictor.info.path}: the model has no feature layer 'pool'")
        parts.append(feats)
    if not parts:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(parts)


def shifted_features(
    predictor: Predictor, files: Sequence[Path], n: int, *, seed: int = 0
) -> npt.NDArray[np.float32]:
    """Features of ``n`` of ``files`` under every acquisition shift training imitates.

    Chest radiographs a site sends differ from the training images in exposure, noise,
    resolution, burned-in text… (``train/stress.py``); the model was trained to handle
    the trained-in ones, so the check must not refuse them.
    """
    from pacs_classifier.preprocess.tensor import unit_to_tensor
    from pacs_classifier.train.data import Sample, load_units
    from pacs_classifier.train.stress import SHIFTS, render

    if n <= 0 or not files:
        return np.zeros((0, 0), dtype=np.float32)
    index = np.linspace(0, len(files) - 1, min(n, len(files))).round().astype(int)
    chosen = [files[i] for i in sorted(set(index.tolist()))]
    units = load_units([Sample(p, 0, p.name) for p in chosen], progress=False)
    size = predictor.info.image_size
    parts = []
    for shift in (s for s in SHIFTS if s.in_training):
        for i in range(0, len(units), 16):
            batch = np.stack(
                [
                    unit_to_tensor(render(shift, u, p.name, seed), size)
                    for u, p in zip(units[i : i + 16], chosen[i : i + 16], strict=True)
                ]
            )
            feats = predictor.infer(batch).features
            if feats is None:
                raise ModelError(f"{predictor.info.path}: the model has no feature layer 'pool'")
            parts.append(feats)
    return np.concatenate(parts)


def fit_bundle_ood(
    bundle: str | Path | BundleInfo,
    *,
    data: Path,
    max_train: int = DEFAULT_TRAIN_IMAGES,
    shift_images: int = DEFAULT_SHIFT_IMAGES,
    components: int = DEFAULT_COMPONENTS,
    max_false_refusal: float = MAX_FALSE_REFUSAL,
) -> OodModel:
    """Fit the check on the bundle's training images, threshold on its validation images,
    and write ``ood.npz`` into the bundle folder.

    Both pools hold the clean images and ``shift_images`` of them re-rendered under each
    trained-in acquisition shift, as the calibration and threshold of the classifier are
    fitted (``--calibrate-on validation+shifts``): the check then refuses what the model
    never learnt to read, not a noisier or brighter chest film.
    """
    info = bundle if isinstance(bundle, BundleInfo) else read_bundle(bundle)
    train = split_files(info, "train", data)
    val = split_files(info, "val", data)
    if not train or not val:
        raise PermanentError(
            f"{info.path}: images of the split not found under the data folder "
            f"({len(train)} training, {len(val)} validation) under {data}"
        )
    if len(train) > max_train:
        index = np.linspace(0, len(train) - 1, max_train).round().astype(int)
        train = [train[i] for i in sorted(set(index.tolist()))]
    predictor = KerasPredictor(info)
    log.info("OOD check of %s: features of %d training images", info.version, len(train))
    f_train = features_of(predictor, train)
    log.info("OOD check of %s: features of %d validation images", info.version, len(val))
    f_val = features_of(predictor, val)
    if shift_images > 0:
        log.info(
            "OOD check of %s: %d training and %d validation images under each trained-in shift",
            info.version,
            min(shift_images, len(train)),
            min(shift_images, len(val)),
        )
        f_train = np.concatenate([f_train, shifted_features(predictor, train, shift_images)])
        f_val = np.concatenate([f_val, shifted_features(predictor, val, shift_images, seed=1)])
    model = fit_ood(
        f_train,
        f_val,
        info.sha256,
        components=components,
        max_false_refusal=max_false_refusal,
    )
    write_ood(info.path / OOD_FILE, model)
    log.info(
        "OOD check of %s written: threshold %.3f, %.2f %% of %d validation images refused",
        info.version,
        model.threshold,
        100 * model.validation_refused,
        model.validation_n,
    )
    return model
