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
        shape = ops.shape(x)
        flat = ops.reshape(x[..., 0], (shape[0], -1, 1))  # (N, P, 1): channel 0, flattened
        content = ops.cast(ops.greater(flat, _CONTENT_FLOOR), "float32")
        unit = ops.clip((flat + 1.0) * 0.5, 0.0, 1.0)
        levels = ops.reshape(ops.linspace(0.0, 1.0, self.bins + 1), (1, 1, -1))
        # CDF at each level over the content pixels, as one batched matmul of the content
        # mask with the (pixel <= level) indicators: (N, 1, P) @ (N, P, B+1).
        below = ops.cast(ops.less_equal(unit, levels), "float32")
        counts = ops.squeeze(ops.matmul(ops.transpose(content, (0, 2, 1)), below), 1)
        cdf = counts / ops.maximum(ops.sum(content, axis=(1, 2)), 1.0)[:, None]  # (N, B+1)
        # Each pixel interpolates linearly between the CDF at the two levels around it.
        scaled = unit[..., 0] * self.bins
        j = ops.cast(ops.clip(ops.floor(scaled), 0, self.bins - 1), "int32")  # (N, P)
        frac = scaled - ops.cast(j, "float32")
        lo = ops.take_along_axis(cdf, j, axis=1)
        hi = ops.take_along_axis(cdf, j + 1, axis=1)
        equalised = lo + (hi - lo) * frac
        out = ops.where(content[..., 0] > 0.5, equalised * 2.0 - 1.0, -1.0)
        out = ops.reshape(out, (shape[0], shape[1], shape[2], 1))
        return ops.broadcast_to(out, shape)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "bins": self.bins}


INTENSITY_LAYERS = {"equalize": HistogramEqualization}
