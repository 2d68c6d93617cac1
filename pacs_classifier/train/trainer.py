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
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pacs_classifier.errors import ModelError, PermanentError
from pacs_classifier.model import metrics as mt
from pacs_classifier.model.bundle import (
    BASE_NAME,
    CLASS_NAMES,
    manifest_sha256,
    write_metadata,
    write_model_files,
)
from pacs_classifier.model.metadata import (
    SPLIT_FILE,
    Architecture,
    BaseWeightsRecord,
    BundleMetadata,
    Calibration,
    DataSummary,
    FitPool,
    Metrics,
    Preprocessing,
    SplitSummary,
    Threshold,
    ValidationMetrics,
)
from pacs_classifier.model.runtime import calibrate
from pacs_classifier.model.validation_scores import write_validation_scores
from pacs_classifier.train.data import (
    Sample,
    Split,
    list_samples,
    load_arrays,
    load_units,
    patient_folds,
    patient_split,
)
from pacs_classifier.train.model import (
    BASE_BLOCKS,
    BaseWeights,
    build_base,
    build_classifier,
    cut_base,
    input_adapter,
    set_phase1,
    set_phase2,
)
from pacs_classifier.train.stress import SHIFTS, shifted_predictions, stress_report

log = logging.getLogger(__name__)

AUTO_CUT_CANDIDATES = ("mixed7", "mixed8", "mixed9", "mixed10")
AUGMENTATIONS = ("none", "light", "acquisition")
CALIBRATE_ON = ("validation", "validation+shifts")
INTENSITY_DESCRIPTIONS = {
    "none": "none (the [0, 1] grey image as windowed)",
    "equalize": "per-image histogram equalisation over the image content, in the model "
    "(layer 'equalize', pacs_classifier.model.layers.HistogramEqualization)",
}
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
    augment: str = "light"
    intensity: str = "none"
    label_smoothing: float = 0.0
    cv_folds: int = 5
    stress: bool = True
    stress_max_images: int = 0
    calibrate_on: str = "validation"
    patience: int = 3
    version: str | None = None
    progress: bool = True
    workers: int = 2


@dataclass(frozen=True)
class TrainResult:
    out: Path
    metadata: BundleMetadata

    @property
    def version(self) -> str:
        return self.metadata.version

    @property
    def final(self) -> ValidationMetrics:
        """Validation metrics of the model as stored."""
        return self.metadata.metrics.final


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
    phase1: dict[str, ValidationMetrics] = {}
    phase1_history: dict[str, dict[str, list[float]]] = {}
    heads: dict[str, Any] = {}
    for block in candidates:
        head, phase1_history[block], p_val = _train_head(
            feats_train[block], y_train, feats_val[block], y_val, class_weight, opts
        )
        thr = mt.threshold_for_sensitivity(y_val, p_val, opts.target_sensitivity)
        phase1[block] = _validation_metrics(mt.point_metrics(y_val, p_val, thr))
        heads[block] = head
        log.info("phase 1, base cut %s: validation AUC %.4f", block, phase1[block].auc)
    chosen_cut = max(candidates, key=lambda b: _or_nan(phase1[b].auc))
    cross_validation = (
        cross_validate_heads(
            [*split.train, *split.val],
            np.concatenate([feats_train[chosen_cut], feats_val[chosen_cut]]),
            class_weight,
            opts,
        )
        if opts.cv_folds
        else None
    )
    del feats_train, feats_val

    base = cut_base(full_base, chosen_cut)
    model = build_classifier(
        base, opts.image_size, opts.base_input_range, opts.dropout, opts.intensity
    )
    model.get_layer("pneumonia").set_weights(heads[chosen_cut].get_layer("dense").get_weights())
    set_phase1(model)

    # ---- phase 2: fine-tune
    trained_layers = set_phase2(model, opts.unfreeze_from)
    history2 = _fine_tune(model, x_train, y_train, x_val, y_val, class_weight, opts)

    # ---- calibrate and choose the threshold on the model as it will be stored
    _round_to_float16(model)
    del x_train  # the stress suite re-reads validation images at their own size
    point, p_val, final, stress = _operating_point(model, split, x_val, y_val, opts)
    log.info(
        "phase 2: validation AUC %.4f, sensitivity %.3f, specificity %.3f at %.3f (ECE %.3f)",
        final.auc,
        final.sensitivity,
        final.specificity,
        point.threshold.value,
        final.ece,
    )

    created = datetime.now(UTC)
    files = write_model_files(model, opts.out)
    version = opts.version or f"{created:%Y%m%d-%H%M%S}-{manifest_sha256(files)[:8]}"
    _write_split(opts.out, split, opts.data)
    # The drift report's reference: the scores the bundle serves, on validation.
    write_validation_scores(opts.out, y_val, p_val)
    metadata = BundleMetadata(
        version=version,
        created_at=created,
        image_size=opts.image_size,
        class_names=CLASS_NAMES,
        positive_class="PNEUMONIA",
        preprocessing=Preprocessing(
            function="pacs_classifier.preprocess.normalize_file",
            output_range=(-1.0, 1.0),
            channels=3,
            resize="aspect-preserving, centred, padded with black",
            base_input_range=opts.base_input_range,
            intensity=INTENSITY_DESCRIPTIONS[opts.intensity],
        ),
        threshold=point.threshold,
        calibration=point.calibration,
        architecture=Architecture(
            base="InceptionV3",
            base_cut=chosen_cut,
            base_cut_candidates=tuple(candidates),
            unfreeze_from=opts.unfreeze_from,
            head=f"global average pooling, dropout {opts.dropout}, dense sigmoid",
            phase2_trained_layers=len(trained_layers),
            weights_dtype="float16",
        ),
        base_weights=BaseWeightsRecord.from_json(weights.describe(), "base_weights"),
        data=DataSummary(
            folder=str(opts.data.resolve()),
            total=_counts(samples),
            split=SplitSummary.from_json(split.summary(), "data.split"),
            split_file=SPLIT_FILE,
            val_fraction=opts.val_fraction,
        ),
        training={
            k: v for k, v in asdict(opts).items() if k not in ("data", "out", "progress", "workers")
        },
        metrics=Metrics(
            phase1=phase1,
            phase1_chosen=phase1[chosen_cut],
            final=final,
        ),
        history={"phase1": phase1_history[chosen_cut], "phase2": history2},
        cross_validation=cross_validation,
        stress=stress,
        seed=opts.seed,
        library_versions=_versions(),
        files=files,
    )
    write_metadata(opts.out, metadata)
    from pacs_classifier.train.plots import write_training_plots

    write_training_plots(opts.out / "plots", metadata, y_val, p_val)
    write_metadata(opts.out, metadata)  # plots do not change the model files' checksums
    _fit_ood(opts)
    return TrainResult(opts.out, metadata)


def _fit_ood(opts: TrainOptions) -> None:
    """The bundle's out-of-distribution check (``ood.npz``, a file of its own).

    A failure is logged, not raised: the bundle serves without the check, as any bundle
    without ``ood.npz`` does, and ``scripts/fit_ood.py`` can fit it later.
    """
    from pacs_classifier.train.ood import fit_bundle_ood

    try:
        fit_bundle_ood(opts.out, data=opts.data)
    except (ModelError, PermanentError) as exc:
        log.warning("%s: out-of-distribution check not fitted: %s", opts.out, exc)


def _operating_point(
    model: Any,
    split: Split,
    x_val: Any,
    y_val: npt.NDArray[np.float32],
    opts: TrainOptions,
) -> tuple[OperatingPoint, npt.NDArray[np.float64], ValidationMetrics, dict[str, Any] | None]:
    """Stress-suite predictions, then calibration and threshold on what ``calibrate_on``
    names, then the validation metrics and the stress report at that threshold."""
    stress_raw: dict[str, npt.NDArray[np.float64]] = {}
    stress_idx = np.arange(len(split.val))
    if opts.stress:
        stress_idx = _stress_subset(y_val, opts.stress_max_images, opts.seed)
        stress_raw = _stress_predictions(model, [split.val[i] for i in stress_idx], opts)
    p_val_raw = (
        stress_raw["clean"]
        if opts.stress and len(stress_idx) == len(split.val)
        else _predict(model, x_val, opts.batch_size)
    )
    fit_y, fit_p = y_val, p_val_raw
    trained_in = [s.name for s in SHIFTS if s.in_training and s.name in stress_raw]
    if opts.calibrate_on == "validation+shifts":
        fit_y = np.concatenate([y_val, *[y_val[stress_idx] for _ in trained_in]])
        fit_p = np.concatenate([p_val_raw, *[stress_raw[n] for n in trained_in]])
    point = fit_operating_point(
        fit_y, fit_p, opts.calibration, opts.target_sensitivity, seed=opts.seed
    )
    temperature, bias = point.calibration.temperature, point.calibration.bias
    threshold = point.threshold.value
    p_val = calibrate(p_val_raw, temperature, bias)
    final = _validation_metrics(
        mt.point_metrics(y_val, p_val, threshold),
        ci95=mt.bootstrap_intervals(y_val, p_val, threshold, seed=opts.seed),
        ece_uncalibrated=mt.expected_calibration_error(y_val, p_val_raw),
    )
    if opts.calibrate_on != "validation":
        where = (
            "validation (patient-level split) pooled with its trained-in stress-suite "
            f"shifts ({', '.join(trained_in)})"
        )
        point = replace(
            point,
            calibration=point.calibration.replace(fitted_on=where),
            threshold=point.threshold.replace(chosen_on=where),
        )
        final = final.replace(fit_pool=FitPool(n=len(fit_y), metrics=point.metrics))
    stress = None
    if opts.stress:
        calibrated = {k: calibrate(v, temperature, bias) for k, v in stress_raw.items()}
        report = stress_report(y_val[stress_idx], calibrated, threshold)
        stress = report.as_dict() | {"n": len(stress_idx)}
    return point, p_val, final, stress


CALIBRATIONS = ("temperature", "platt")


@dataclass(frozen=True)
class OperatingPoint:
    """Calibration and threshold fitted on validation, with the metrics they give there."""

    calibration: Calibration
    threshold: Threshold
    metrics: ValidationMetrics
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
    return OperatingPoint(
        calibration=Calibration(
            method="temperature scaling"
            if method == "temperature"
            else "Platt scaling (temperature and bias)",
            temperature=temperature,
            bias=bias,
            fitted_on="validation (patient-level split)",
        ),
        threshold=Threshold(
            value=threshold,
            rule=THRESHOLD_RULE.format(target=target_sensitivity),
            target_sensitivity=target_sensitivity,
            chosen_on="validation (patient-level split)",
            applies_to="calibrated probability",
        ),
        metrics=_validation_metrics(
            mt.point_metrics(y_val, p_val, threshold),
            ci95=mt.bootstrap_intervals(y_val, p_val, threshold, seed=seed),
            ece_uncalibrated=mt.expected_calibration_error(y_val, p_val_raw),
        ),
        p_val=p_val,
    )


def _validation_metrics(point: dict[str, Any], **more: Any) -> ValidationMetrics:
    """``model.metrics`` results (plain floats and dicts) as the bundle's typed record."""
    return ValidationMetrics.from_json(point | more)


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


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
        (
            o.augment in AUGMENTATIONS,
            f"--augment must be one of {', '.join(AUGMENTATIONS)}, received {o.augment!r}",
        ),
        (
            o.intensity in INTENSITY_DESCRIPTIONS,
            f"--intensity must be one of {', '.join(INTENSITY_DESCRIPTIONS)}, "
            f"received {o.intensity!r}",
        ),
        (
            0 <= o.label_smoothing < 0.5,
            f"--label-smoothing must be in [0, 0.5), received {o.label_smoothing}",
        ),
        (
            o.cv_folds == 0 or 2 <= o.cv_folds <= 20,
            f"--cv-folds must be 0 (off) or 2..20, received {o.cv_folds}",
        ),
        (
            o.calibrate_on in CALIBRATE_ON,
            f"--calibrate-on must be one of {', '.join(CALIBRATE_ON)}, received {o.calibrate_on!r}",
        ),
        (
            o.calibrate_on == "validation" or o.stress,
            "--calibrate-on validation+shifts needs the stress suite (drop --no-stress)",
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
    x = input_adapter(inputs, opts.base_input_range, opts.intensity)
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
        loss=keras.losses.BinaryCrossentropy(label_smoothing=opts.label_smoothing),
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
    augment = _augmenter(opts) if opts.augment != "none" else None
    acquisition = opts.augment == "acquisition"
    weights = tf.constant([class_weight[0], class_weight[1]], tf.float32)

    def train_batches() -> Any:
        ds = tf.data.Dataset.from_tensor_slices((x_train, y_train))
        ds = ds.shuffle(len(x_train), seed=opts.seed, reshuffle_each_iteration=True)
        ds = ds.batch(opts.batch_size)

        def prep(x: Any, y: Any) -> Any:
            if acquisition:
                x = _acquisition_effects(x)
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
        loss=keras.losses.BinaryCrossentropy(label_smoothing=opts.label_smoothing),
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


def _acquisition_effects(x: Any) -> Any:
    """Random acquisition renderings of a grey batch (N, S, S) in [-1, 1], per image:
    ``augment.random_acquisition`` (the trained-in shifts of the stress suite), run as
    numpy inside the input pipeline, seeded from TensorFlow's seeded random stream."""
    import tensorflow as tf

    from pacs_classifier.train.augment import augment_batch

    seed = tf.random.uniform([], 0, 2**31 - 1, dtype=tf.int64)
    out = tf.numpy_function(
        lambda batch, s: augment_batch(batch, int(s)), [x, seed], tf.float32, stateful=True
    )
    return tf.ensure_shape(out, x.shape)


def cross_validate_heads(
    samples: Sequence[Sample],
    features: npt.NDArray[np.float32],
    class_weight: dict[int, float],
    opts: TrainOptions,
) -> dict[str, Any]:
    """Patient-level k-fold cross-validation of phase 1 (the head on frozen features).

    Every image is predicted once, by the head that did not see its patient. Reports each
    fold's AUC and, at the threshold the rule picks on the pooled out-of-fold
    predictions, each fold's sensitivity and specificity; then mean, spread and range.
    Fine-tuning every fold is beyond two CPU cores; the phase-1 figures say how much one
    split's luck moves the numbers.
    """
    index = {s.path: i for i, s in enumerate(samples)}
    y_all = np.array([s.label for s in samples], dtype=np.float32)
    folds = patient_folds(samples, opts.cv_folds, opts.seed)
    oof = np.zeros(len(samples), dtype=np.float64)
    fold_of = np.zeros(len(samples), dtype=np.int64)
    for k, fold in enumerate(folds):
        tr = np.array([index[s.path] for s in fold.train])
        va = np.array([index[s.path] for s in fold.val])
        _, _, p = _train_head(features[tr], y_all[tr], features[va], y_all[va], class_weight, opts)
        oof[va] = p
        fold_of[va] = k
    thr = mt.threshold_for_sensitivity(y_all, oof, opts.target_sensitivity)
    per_fold = []
    for k in range(len(folds)):
        m = mt.point_metrics(y_all[fold_of == k], oof[fold_of == k], thr)
        per_fold.append(
            {key: float(m[key]) for key in ("n", "auc", "sensitivity", "specificity", "f1")}
        )
    summary = {}
    for key in ("auc", "sensitivity", "specificity", "f1"):
        values = np.array([f[key] for f in per_fold])
        summary[key] = {
            "mean": float(values.mean()),
            "sd": float(values.std(ddof=1)),
            "min": float(values.min()),
            "max": float(values.max()),
        }
    pooled = mt.point_metrics(y_all, oof, thr)
    log.info(
        "cross-validation (%d folds, phase 1): AUC %.4f ± %.4f, specificity %.3f ± %.3f",
        len(folds),
        summary["auc"]["mean"],
        summary["auc"]["sd"],
        summary["specificity"]["mean"],
        summary["specificity"]["sd"],
    )
    return {
        "what": "phase 1 (head on frozen features); threshold rule applied to the pooled "
        "out-of-fold predictions",
        "folds": len(folds),
        "seed": opts.seed,
        "threshold_on_pooled_oof": thr,
        "per_fold": per_fold,
        "summary": summary,
        "pooled_oof": {
            k: float(pooled[k]) for k in ("auc", "sensitivity", "specificity", "f1", "ece")
        },
    }


def _stress_subset(y: npt.NDArray[np.float32], max_images: int, seed: int) -> Any:
    """Indices of a stratified subset of at most ``max_images`` (all when 0), sorted."""
    if max_images <= 0 or max_images >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    picked = []
    for label in (0, 1):
        idx = np.flatnonzero(y == label)
        take = max(1, round(max_images * len(idx) / len(y)))
        picked.append(rng.choice(idx, size=min(take, len(idx)), replace=False))
    return np.sort(np.concatenate(picked))


def _stress_predictions(
    model: Any, samples: Sequence[Sample], opts: TrainOptions
) -> dict[str, npt.NDArray[np.float64]]:
    """Uncalibrated predictions of ``samples`` clean and under every stress-suite shift."""
    import tensorflow as tf

    fn = tf.function(lambda t: model(t, training=False), reduce_retracing=True)
    units = load_units(samples, workers=opts.workers, progress=opts.progress)
    return shifted_predictions(
        lambda batch: np.asarray(fn(batch), dtype=np.float64).reshape(-1),
        units,
        [s.path.name for s in samples],
        opts.image_size,
        SHIFTS,
        batch_size=opts.batch_size,
        progress=opts.progress,
    )


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


def _write_split(out: Path, split: Split, data_root: Path) -> None:
    """``split.json``: each side's images as POSIX paths relative to the dataset root
    (``NORMAL/IM-0115-0001.jpeg``), so whoever has the data elsewhere can find them."""
    data = {
        "train": sorted(s.path.relative_to(data_root).as_posix() for s in split.train),
        "val": sorted(s.path.relative_to(data_root).as_posix() for s in split.val),
        "val_groups": sorted({s.group for s in split.val}),
    }
    (out / SPLIT_FILE).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


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
