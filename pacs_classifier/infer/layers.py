"""Keras layers that are part of a bundle's architecture (``model.json``).

They are registered under the package name ``pacs_classifier``, so importing this module
before ``keras.models.model_from_json`` is all a loader needs. Each layer uses only
elementwise ops, comparisons and reductions, which the ONNX and TFLite exporters convert
as they are: the exported runtimes compute the very same function.

``HistogramEqualization`` is the intensity normalisation shared by training and serving
(docs/model-quality.md, experiment E2): each image's grey levels are replaced by their
rank within that image (its empirical CDF), which removes any monotone change of the
grey scale — exposure, gamma, window, contrast, most LUT differences between
detectors and processing stations — before the network sees the image. Being a layer of
the model, no runtime can forget to apply it.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

PACKAGE = "pacs_classifier"

# A padded border is exactly -1 (SPEC §6 pads with black); anything above this is image
# content. Half an 8-bit step: an 8-bit pixel of value 1 still counts as content.
_CONTENT_FLOOR = -1.0 + 1.0 / 255.0


@keras.saving.register_keras_serializable(package=PACKAGE)
class HistogramEqualization(keras.layers.Layer):  # type: ignore[misc]
    """Per-image histogram equalisation of a (N, S, S, C) grey tensor in [-1, 1].

    The CDF is sampled at ``bins + 1`` evenly spaced levels over the image's content
    (padding excluded) and each pixel is mapped by linear interpolation between them, so
    the output of an image and of any monotone remapping of its grey levels agree up to
    the bin width. The padding stays at -1. All channels receive channel 0's mapping
    (the three channels are grey copies). No trainable weights.
    """

    def __init__(self, bins: int = 32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(bins, int) or bins < 2:
            raise ValueError(f"bins must be an int >= 2. Received: bins={bins!r}")
        self.bins = bins

    def call(self, inputs: Any) -> Any:
        x = ops.cast(inputs, "float32")
        grey = x[..., :1]  # (N, S, S, 1)
        content = ops.cast(ops.greater(grey, _CONTENT_FLOOR), "float32")
        unit = ops.clip((grey + 1.0) * 0.5, 0.0, 1.0)
        levels = ops.linspace(0.0, 1.0, self.bins + 1)  # (B+1,)
        # CDF at each level over the content pixels: (N, 1, 1, 1, B+1).
        below = ops.cast(ops.less_equal(ops.expand_dims(unit, -1), levels), "float32")
        counts = ops.sum(below * ops.expand_dims(content, -1), axis=(1, 2, 3), keepdims=True)
        n = ops.maximum(ops.sum(content, axis=(1, 2, 3), keepdims=True), 1.0)
        cdf = counts / ops.expand_dims(n, -1)
        # Piecewise-linear interpolation of the CDF at each pixel: the sum over bins of
        # each bin's CDF step times how far the pixel is through that bin.
        steps = cdf[..., 1:] - cdf[..., :-1]  # (N, 1, 1, 1, B)
        through = ops.clip((ops.expand_dims(unit, -1) - levels[:-1]) * self.bins, 0.0, 1.0)
        equalised = cdf[..., 0] + ops.sum(steps * through, axis=-1)
        out = ops.where(content > 0.5, equalised * 2.0 - 1.0, -1.0)
        return ops.broadcast_to(out, ops.shape(x))

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "bins": self.bins}


INTENSITY_LAYERS = {"equalize": HistogramEqualization}
