"""The network: an InceptionV3 base (optionally cut at a block) and a small head.

``input (S×S×3 in [-1, 1])`` → [Rescaling to [0, 1] when the base expects it] →
InceptionV3 up to ``base_cut`` → global average pooling → dropout → one sigmoid unit.

The base is always called with ``training=False``: in phase 1 that keeps it a fixed feature
extractor, and in phase 2 it keeps every BatchNormalization layer in inference mode (its
moving statistics never change) while the unfrozen convolutions learn.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pacs_classifier.errors import ModelError, PermanentError
from pacs_classifier.model.bundle import BASE_NAME

BASE_BLOCKS = tuple(f"mixed{i}" for i in range(11))
INPUT_RANGES = ("symmetric", "unit")
INTENSITIES = ("none", "equalize")


@dataclass(frozen=True)
class BaseWeights:
    """Where the base's weights come from: ``imagenet``, ``none`` or a file."""

    setting: str
    path: Path | None
    sha256: str | None

    @classmethod
    def parse(cls, setting: str) -> BaseWeights:
        if setting in ("imagenet", "none"):
            return cls(setting, None, None)
        path = Path(setting)
        if not path.is_file():
            raise PermanentError(f"--weights {setting}: not 'imagenet', 'none' or a file")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return cls("file", path.resolve(), digest)

    @property
    def keras_arg(self) -> str | None:
        if self.setting == "none":
            return None
        if self.setting == "imagenet":
            return "imagenet"
        return str(self.path)

    def describe(self) -> dict[str, Any]:
        return {
            "setting": self.setting,
            "path": str(self.path) if self.path else None,
            "sha256": self.sha256,
        }


def build_base(weights: BaseWeights, image_size: int) -> Any:
    """The full InceptionV3 convolutional base (no top) with the asked-for weights."""
    import keras

    if image_size < 75:
        raise PermanentError(
            f"--image-size must be at least 75 for InceptionV3, received {image_size}"
        )
    try:
        base = keras.applications.InceptionV3(
            include_top=False, weights=weights.keras_arg, input_shape=(image_size, image_size, 3)
        )
    except (ValueError, OSError, KeyError, TypeError) as exc:
        where = weights.path or weights.setting
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"base weights {where} cannot be loaded into InceptionV3: {first[:300]}"
        ) from None
    except Exception as exc:  # keras wraps h5py and download failures in many types
        where = weights.path or weights.setting
        raise ModelError(
            f"base weights {where} cannot be loaded into InceptionV3: "
            f"{type(exc).__name__}: {str(exc)[:300]}"
        ) from None
    return base


def cut_base(base: Any, block: str) -> Any:
    """The base up to and including ``block`` (``mixed10`` is the whole base)."""
    import keras

    if block not in BASE_BLOCKS:
        raise PermanentError(
            f"base cut must be one of {', '.join(BASE_BLOCKS)}, received {block!r}"
        )
    sub = base if block == "mixed10" else keras.Model(base.input, base.get_layer(block).output)
    return keras.Model(sub.input, sub.output, name=BASE_NAME)


def input_adapter(inputs: Any, input_range: str, intensity: str = "none") -> Any:
    """The layers between the [-1, 1] tensor and the base: the intensity normalisation
    (``equalize``: per-image histogram equalisation, ``model/layers.py``) and, for a base
    trained on [0, 1], a rescaling. Part of the model, so every runtime applies them."""
    import keras

    if input_range not in INPUT_RANGES:
        raise PermanentError(
            f"base input range must be one of {INPUT_RANGES}, received {input_range!r}"
        )
    if intensity not in INTENSITIES:
        raise PermanentError(
            f"intensity normalisation must be one of {INTENSITIES}, received {intensity!r}"
        )
    x = inputs
    if intensity == "equalize":
        from pacs_classifier.model.layers import HistogramEqualization

        x = HistogramEqualization(name="equalize")(x)
    if input_range == "unit":
        # The tensor contract is [-1, 1] (SPEC §6); this base was trained on [0, 1].
        x = keras.layers.Rescaling(0.5, offset=0.5, name="to_unit_range")(x)
    return x


def build_classifier(
    base: Any, image_size: int, input_range: str, dropout: float = 0.3, intensity: str = "none"
) -> Any:
    """Wrap a (cut) base with the input adapter and the head."""
    import keras

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = input_adapter(inputs, input_range, intensity)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="pneumonia")(x)
    return keras.Model(inputs, outputs, name="pneumonia_classifier")


def head_layers(model: Any) -> list[Any]:
    return [model.get_layer("pneumonia")]


def set_phase1(model: Any) -> None:
    """Phase 1: only the head trains."""
    model.get_layer(BASE_NAME).trainable = False


def set_phase2(model: Any, unfreeze_from: str) -> list[str]:
    """Phase 2: unfreeze the base from block ``unfreeze_from`` (or ``all``) upward.

    BatchNormalization layers stay frozen (and, being called with ``training=False``, in
    inference mode). Returns the names of the layers that train.
    """
    import keras

    base = model.get_layer(BASE_NAME)
    base.trainable = True
    start = 0
    if unfreeze_from != "all":
        if unfreeze_from not in BASE_BLOCKS[1:]:
            raise PermanentError(
                f"--unfreeze-from must be 'all' or one of mixed1..mixed10, "
                f"received {unfreeze_from!r}"
            )
        names = [layer.name for layer in base.layers]
        k = int(unfreeze_from.removeprefix("mixed"))
        if unfreeze_from not in names:
            raise PermanentError(f"--unfreeze-from {unfreeze_from} is above the base cut")
        start = names.index(f"mixed{k - 1}") + 1
    trained = []
    for i, layer in enumerate(base.layers):
        train = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = train
        if train and layer.weights:
            trained.append(layer.name)
    return trained
