"""Two-phase transfer learning, calibration, threshold choice, and the bundle.

Phase 1 trains the head on a frozen InceptionV3 base. The frozen base is a fixed function
of an un-augmented image, so its pooled features are computed once per image and the head
is trained on them (seconds instead of a full forward pass per epoch); augmentation is left
to phase 2, where the base changes. The same pass pools several candidate blocks at once,
which is how ``--base-cut auto`` measures, on validation, where to cut the base.

Phase 2 unfreezes the base (all, or from ``--unfreeze-from``) and fine-tunes end to end at
a much lower learning rate with light augmentation, BatchNorm in inference mode, early
stopping, checkpointing and learning-rate reduction on validation AUC.

Everything chosen — base cut, checkpoint, calibration, threshold — is chosen on the
patient-level validation split only. The weights are rounded to float16 (as stored in the
bundle) *before* validation predictions are made, so the recorded numbers are those of the
served model.
"""

from __future__ import annotations

import json
import logging
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pacs_classifier.errors import PermanentError
from pacs_classifier.infer.bundle import (
    BUNDLE_FORMAT,
    CLASS_NAMES,
    manifest_sha256,
    write_metadata,
    write_model_files,
)
from pacs_classifier.train import metrics as mt
from pacs_classifier.train.data import Split, list_samples, load_arrays, patient_split
from pacs_classifier.train.model import (
    BASE_BLOCKS,
    BASE_NAME,
    BaseWeights,
    build_base,
    build_classifier,
    cut_base,
    set_phase1,
    set_phase2,
)

log = logging.getLogger(__name__)

AUTO_CUT_CANDIDATES = ("mixed7", "mixed8", "mixed9", "mixed10")
THRESHOLD_RULE = "highest threshold keeping validation sensitivity >= {target}"


@dataclass(frozen=True)
class TrainOptions:
    data: Path
    out: Path
    weights: str = "imagenet"
    image_size: int = 299
    epochs_frozen: int = 10
    epochs_finetune: int = 10
    batch_size: int = 32
    seed: int = 1337
    val_fraction: float = 0.2
    base_cut: str = "mixed10"
    unfreeze_from: str = "all"
    base_input_range: str = "symmetric"
    lr_frozen: float = 1e-3
    lr_finetune: float = 1e-5
    dropout: float = 0.3
    target_sensitivity: float = 0.97
    calibration: str = "temperature"
    augment: bool = True
    patience: int = 3
    version: str | None = None
    progress: bool = True
    workers: int = 2


@dataclass
class TrainResult:
    out: Path
    version: str
    metrics: dict[str, Any] = field(default_factory=dict)


def train(opts: TrainOptions) -> TrainResult:
    """Run both phases and write a bundle to ``opts.out``; return its version and metrics."""
    _check_options(opts)
    weights = BaseWeights.parse(opts.weights)
    samples = list_samples(opts.data)
    split = patient_split(samples, opts.val_fraction, opts.seed)
    log.info("data: %d images, split %s", len(samples), split.summary())

    import keras

    keras.utils.set_random_seed(opts.seed)
    x_train = load_arrays(
        split.train, opts.image_size, workers=opts.workers, progress=opts.progress
    )
    x_val = load_arrays(split.val, opts.image_size, workers=opts.workers, progress=opts.progress)
    y_train = np.array([s.label for s in split.train], dtype=np.float32)
    y_val = np.array([s.label for s in split.val], dtype=np.float32)
    class_weight = _class_weights(y_train)

    full_base = build_base(weights, opts.image_size)

    # ---- phase 1: head on cached features of the frozen base
    candidates = AUTO_CUT_CANDIDATES if opts.base_cut == "auto" else (opts.base_cut,)
    feats_train, feats_val = _pooled_features(full_base, candidates, x_train, x_val, opts)
    phase1: dict[str, dict[str, Any]] = {}
    heads: dict[str, Any] = {}
    for block in candidates:
        head, history, p_val = _train_head(
            feats_train[block], y_train, feats_val[block], y_val, class_weight, opts
        )
        thr = mt.threshold_for_sensitivity(y_val, p_val, opts.target_sensitivity)
        phase1[block] = {"val": mt.point_metrics(y_val, p_val, thr), "history": history}
        heads[block] = head
        log.info("phase 1, base cut %s: validation AUC %.4f", block, phase1[block]["val"]["auc"])
    chosen_cut = max(candidates, key=lambda b: phase1[b]["val"]["auc"])
    del feats_train, feats_val

    base = cut_base(full_base, chosen_cut)
    model = build_classifier(base, opts.image_size, opts.base_input_range, opts.dropout)
    model.get_layer("pneumonia").set_weights(heads[chosen_cut].get_layer("dense").get_weights())
    set_phase1(model)

    # ---- phase 2: fine-tune
    trained_layers = set_phase2(model, opts.unfreeze_from)
    history2 = _fine_tune(model, x_train, y_train, x_val, y_val, class_weight, opts)

    # ---- calibrate and choose the threshold on the model as it will be stored
    _round_to_float16(model)
    p_val_raw = _predict(model, x_val, opts.batch_size)
    point = fit_operating_point(
        y_val, p_val_raw, opts.calibration, opts.target_sensitivity, seed=opts.seed
    )
    p_val, final = point.p_val, point.metrics
    log.info(
        "phase 2: validation AUC %.4f, sensitivity %.3f, specificity %.3f at %.3f (ECE %.3f)",
        final["auc"],
        final["sensitivity"],
        final["specificity"],
        point.threshold["value"],
        final["ece"],
    )

    created = datetime.now(UTC)
    files = write_model_files(model, opts.out)
    version = opts.version or f"{created:%Y%m%d-%H%M%S}-{manifest_sha256(files)[:8]}"
    _write_split(opts.out, split)
    metadata: dict[str, Any] = {
        "bundle_format": BUNDLE_FORMAT,
        "version": version,
        "created_at": created.isoformat(),
        "image_size": opts.image_size,
        "class_names": list(CLASS_NAMES),
        "positive_class": "PNEUMONIA",
        "preprocessing": {
            "function": "pacs_classifier.preprocess.normalize_file",
            "output_range": [-1.0, 1.0],
            "channels": 3,
            "resize": "aspect-preserving, centred, padded with black",
            "base_input_range": opts.base_input_range,
        },
        "threshold": point.threshold,
        "calibration": point.calibration,
        "architecture": {
            "base": "InceptionV3",
            "base_cut": chosen_cut,
            "base_cut_candidates": list(candidates),
            "unfreeze_from": opts.unfreeze_from,
            "head": f"global average pooling, dropout {opts.dropout}, dense sigmoid",
            "phase2_trained_layers": len(trained_layers),
            "weights_dtype": "float16",
        },
        "base_weights": weights.describe(),
        "data": {
            "folder": str(opts.data.resolve()),
            "total": _counts(samples),
            "split": split.summary(),
            "split_file": "split.json",
            "val_fraction": opts.val_fraction,
        },
        "training": {
            k: v for k, v in asdict(opts).items() if k not in ("data", "out", "progress", "workers")
        },
        "metrics": {
            "phase1": {b: phase1[b]["val"] for b in candidates},
            "phase1_chosen": phase1[chosen_cut]["val"],
            "final": final,
        },
        "history": {"phase1": phase1[chosen_cut]["history"], "phase2": history2},
        "seed": opts.seed,
        "library_versions": _versions(),
        "files": files,
    }
    write_metadata(opts.out, metadata)
    from pacs_classifier.train.plots import write_training_plots

    write_training_plots(opts.out / "plots", metadata, y_val, p_val)
    write_metadata(opts.out, metadata)  # plots do not change the model files' checksums
    return TrainResult(opts.out, version, metadata["metrics"])


CALIBRATIONS = ("temperature", "platt")


@dataclass(frozen=True)
class OperatingPoint:
    """Calibration and threshold fitted on validation, with the metrics they give there."""

    calibration: dict[str, Any]
    threshold: dict[str, Any]
    metrics: dict[str, Any]
    p_val: npt.NDArray[np.float64]


def fit_operating_point(
    y_val: npt.ArrayLike,
    p_val_raw: npt.ArrayLike,
    method: str,
    target_sensitivity: float,
    *,
    seed: int = 0,
) -> OperatingPoint:
    """Fit the calibration, then the threshold rule, on validation predictions.

    ``temperature``: ``sigmoid(logit / T)``; ``platt``: ``sigmoid(logit / T + b)``, which
    can also undo the shift of the intercept that class weighting causes.
    """
    from pacs_classifier.infer.runtime import calibrate

    if method not in CALIBRATIONS:
        raise PermanentError(
            f"calibration must be one of {', '.join(CALIBRATIONS)}, received {method!r}"
        )
    if method == "platt":
        temperature, bias = mt.fit_platt(y_val, p_val_raw)
    else:
        temperature, bias = mt.fit_temperature(y_val, p_val_raw), 0.0
    p_val = calibrate(p_val_raw, temperature, bias)
    threshold = mt.threshold_for_sensitivity(y_val, p_val, target_sensitivity)
    final = mt.point_metrics(y_val, p_val, threshold)
    final["ci95"] = mt.bootstrap_intervals(y_val, p_val, threshold, seed=seed)
    final["ece_uncalibrated"] = mt.expected_calibration_error(y_val, p_val_raw)
    return OperatingPoint(
        calibration={
            "method": "temperature scaling"
            if method == "temperature"
            else "Platt scaling (temperature and bias)",
            "temperature": temperature,
            "bias": bias,
            "fitted_on": "validation (patient-level split)",
        },
        threshold={
            "value": threshold,
            "rule": THRESHOLD_RULE.format(target=target_sensitivity),
            "target_sensitivity": target_sensitivity,
            "chosen_on": "validation (patient-level split)",
            "applies_to": "calibrated probability",
        },
        metrics=final,
        p_val=p_val,
    )


def _check_options(o: TrainOptions) -> None:
    checks = [
        (o.epochs_frozen >= 1, f"--epochs-frozen must be >= 1, received {o.epochs_frozen}"),
        (o.epochs_finetune >= 0, f"--epochs-finetune must be >= 0, received {o.epochs_finetune}"),
        (o.batch_size >= 1, f"--batch-size must be >= 1, received {o.batch_size}"),
        (o.image_size >= 75, f"--image-size must be >= 75, received {o.image_size}"),
        (
            o.base_cut == "auto" or o.base_cut in BASE_BLOCKS,
            f"--base-cut must be auto or one of mixed0..mixed10, received {o.base_cut!r}",
        ),
        (
            0.5 <= o.target_sensitivity < 1,
            f"target sensitivity must be in [0.5, 1), received {o.target_sensitivity}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise PermanentError(message)
    if o.out.exists() and any(o.out.iterdir()):
        raise PermanentError(f"--out {o.out}: folder exists and is not empty")


def _class_weights(y: npt.NDArray[np.float32]) -> dict[int, float]:
    n = len(y)
    n_pos = float(y.sum())
    return {0: n / (2 * (n - n_pos)), 1: n / (2 * n_pos)}


def _counts(samples: Sequence[Any]) -> dict[str, int]:
    return {name: sum(1 for s in samples if s.label == i) for i, name in enumerate(CLASS_NAMES)}


def _to_rgb(batch: Any) -> Any:
    import tensorflow as tf

    x = tf.cast(batch, tf.float32)[..., tf.newaxis]
    return tf.repeat(x, 3, axis=-1)


def _pooled_features(
    base: Any, blocks: Sequence[str], x_train: Any, x_val: Any, opts: TrainOptions
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Global-average-pooled outputs of each candidate block, one pass over the data."""
    import keras
    import tensorflow as tf

    inputs = keras.Input((opts.image_size, opts.image_size, 3))
    x = (
        keras.layers.Rescaling(0.5, offset=0.5)(inputs)
        if opts.base_input_range == "unit"
        else inputs
    )
    probe = keras.Model(base.input, [base.get_layer(b).output for b in blocks])
    outs = probe(x, training=False)
    outs = outs if isinstance(outs, list | tuple) else [outs]
    pooled = [keras.layers.GlobalAveragePooling2D()(o) for o in outs]
    extractor = keras.Model(inputs, pooled)
    fn = tf.function(lambda t: extractor(t, training=False), reduce_retracing=True)

    def run(x_all: Any, what: str) -> dict[str, Any]:
        from tqdm import tqdm

        parts: list[list[Any]] = [[] for _ in blocks]
        for i in tqdm(
            range(0, len(x_all), opts.batch_size),
            desc=f"features ({what})",
            unit="batch",
            disable=not opts.progress,
            leave=False,
        ):
            res = fn(_to_rgb(x_all[i : i + opts.batch_size]))
            res = res if isinstance(res, list | tuple) else [res]
            for k, r in enumerate(res):
                parts[k].append(np.asarray(r))
        return {b: np.concatenate(parts[k]) for k, b in enumerate(blocks)}

    return run(x_train, "train"), run(x_val, "validation")


def _train_head(
    f_train: Any,
    y_train: Any,
    f_val: Any,
    y_val: Any,
    class_weight: dict[int, float],
    opts: TrainOptions,
) -> tuple[Any, dict[str, list[float]], Any]:
    import keras

    keras.utils.set_random_seed(opts.seed)
    inputs = keras.Input((f_train.shape[1],))
    x = keras.layers.Dropout(opts.dropout)(inputs)
    out = keras.layers.Dense(1, activation="sigmoid", name="dense")(x)
    head = keras.Model(inputs, out)
    head.compile(
        optimizer=keras.optimizers.Adam(opts.lr_frozen),
        loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(name="auc")],
    )
    stop = keras.callbacks.EarlyStopping(
        monitor="val_auc", mode="max", patience=opts.patience, restore_best_weights=True
    )
    hist = head.fit(
        f_train,
        y_train,
        validation_data=(f_val, y_val),
        epochs=opts.epochs_frozen,
        batch_size=opts.batch_size,
        class_weight=class_weight,
        callbacks=[stop],
        verbose=0,
        shuffle=True,
    )
    p_val = head.predict(f_val, verbose=0).reshape(-1)
    return head, _history(hist.history), p_val


def _augmenter(opts: TrainOptions) -> Any:
    import keras

    # Small geometric and contrast changes only: no horizontal flip (the heart is on the
    # left; a flipped chest is not a chest radiograph anyone sends us). Fill is black.
    return keras.Sequential(
        [
            keras.layers.RandomRotation(
                0.02, fill_mode="constant", fill_value=-1.0, seed=opts.seed
            ),
            keras.layers.RandomTranslation(
                0.05, 0.05, fill_mode="constant", fill_value=-1.0, seed=opts.seed + 1
            ),
            keras.layers.RandomZoom(0.1, fill_mode="constant", fill_value=-1.0, seed=opts.seed + 2),
            keras.layers.RandomContrast(0.1, value_range=(-1.0, 1.0), seed=opts.seed + 3),
        ],
        name="augment",
    )


def _fine_tune(
    model: Any,
    x_train: Any,
    y_train: Any,
    x_val: Any,
    y_val: Any,
    class_weight: dict[int, float],
    opts: TrainOptions,
) -> dict[str, list[float]]:
    import keras
    import tensorflow as tf

    if opts.epochs_finetune == 0:
        return {}
    keras.utils.set_random_seed(opts.seed)
    augment = _augmenter(opts) if opts.augment else None
    weights = tf.constant([class_weight[0], class_weight[1]], tf.float32)

    def train_batches() -> Any:
        ds = tf.data.Dataset.from_tensor_slices((x_train, y_train))
        ds = ds.shuffle(len(x_train), seed=opts.seed, reshuffle_each_iteration=True)
        ds = ds.batch(opts.batch_size)

        def prep(x: Any, y: Any) -> Any:
            x = _to_rgb(x)
            if augment is not None:
                x = tf.clip_by_value(augment(x, training=True), -1.0, 1.0)
            w = tf.gather(weights, tf.cast(y, tf.int32))
            return x, y, w

        return ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)

    val_ds = (
        tf.data.Dataset.from_tensor_slices((x_val, y_val))
        .batch(opts.batch_size)
        .map(lambda x, y: (_to_rgb(x), y))
        .prefetch(2)
    )
    model.compile(
        optimizer=keras.optimizers.Adam(opts.lr_finetune),
        loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(name="auc")],
    )
    ckpt = opts.out.parent / f".{opts.out.name}.phase2.best.weights.h5"
    callbacks = [
        keras.callbacks.ModelCheckpoint(
            str(ckpt), monitor="val_auc", mode="max", save_best_only=True, save_weights_only=True
        ),
        keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=opts.patience),
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_auc", mode="max", factor=0.3, patience=1, min_lr=1e-7
        ),
    ]
    hist = model.fit(
        train_batches(),
        validation_data=val_ds,
        epochs=opts.epochs_finetune,
        callbacks=[*callbacks, _log_epochs("phase 2")],
        verbose=2 if opts.progress else 0,
        shuffle=False,  # the dataset shuffles itself each epoch
    )
    if ckpt.exists():
        model.load_weights(str(ckpt))  # the best epoch on validation AUC, not the last
        ckpt.unlink()
    return _history(hist.history)


def _log_epochs(phase: str) -> Any:
    import keras

    def on_epoch_end(epoch: int, logs: dict[str, float] | None = None) -> None:
        values = ", ".join(f"{k} {v:.4f}" for k, v in sorted((logs or {}).items()))
        log.info("%s epoch %d: %s", phase, epoch + 1, values)

    return keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)


def _history(h: dict[str, list[Any]]) -> dict[str, list[float]]:
    return {k: [float(v) for v in values] for k, values in h.items()}


def _round_to_float16(model: Any) -> None:
    for w in model.weights:
        w.assign(np.asarray(w.numpy(), dtype=np.float16).astype(np.float32))


def _predict(model: Any, x: Any, batch_size: int) -> npt.NDArray[np.float64]:
    import tensorflow as tf

    fn = tf.function(lambda t: model(t, training=False), reduce_retracing=True)
    out = [
        np.asarray(fn(_to_rgb(x[i : i + batch_size]))).reshape(-1)
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out).astype(np.float64)


def _write_split(out: Path, split: Split) -> None:
    data = {
        "train": sorted(s.path.name for s in split.train),
        "val": sorted(s.path.name for s in split.val),
        "val_groups": sorted({s.group for s in split.val}),
    }
    (out / "split.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("tensorflow", "keras", "numpy", "pydicom", "scikit-image", "pacs-classifier"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


__all__ = [
    "BASE_NAME",
    "OperatingPoint",
    "TrainOptions",
    "TrainResult",
    "fit_operating_point",
    "train",
]
