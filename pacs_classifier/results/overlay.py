"""The Grad-CAM overlay: a Secondary Capture of the image as classified, with a heatmap.

Grad-CAM (Selvaraju et al., 2017): the gradient of the model's output with respect to
the feature maps of its last convolutional block (the InceptionV3 base's output, i.e.
``mixed10`` or where the base was cut), averaged per channel, weights those maps; the
positive part of the weighted sum, scaled to [0, 1], is where the model looked.

The picture is the model's own input (the normalised, padded square that was classified,
shown at :data:`DISPLAY_SIZE` pixels), the heatmap blended over it, and a banner burned in
at the top: label, probability, model version and "NOT FOR DIAGNOSTIC USE". The DICOM
object is an RGB Secondary Capture (PS3.3 A.8.1) in its own series, Burned In Annotation
YES, patient and study attributes copied from the source.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from pacs_classifier.config import Config
from pacs_classifier.errors import PermanentError
from pacs_classifier.results.outbound import RenderTask
from pacs_classifier.results.sr import PRODUCT, evidence_of

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

DISPLAY_SIZE = 512
BANNER_PX = 56
SC_SERIES_NUMBER = 9902
SC_SERIES_DESCRIPTION = "AI pneumonia Grad-CAM overlay (not for diagnostic use)"
#: How much of the heatmap's colour shows over the radiograph.
ALPHA = 0.4


def grad_cam(model: Any, tensor: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The Grad-CAM map (feature-map resolution, values in [0, 1]) of one input tensor."""
    import tensorflow as tf

    from pacs_classifier.model.bundle import BASE_NAME

    base = model.get_layer(BASE_NAME)
    x = tf.convert_to_tensor(tensor[None, ...], dtype=tf.float32)
    with tf.GradientTape() as tape:
        h = x
        features = None
        # The classifier is a straight chain: input adapter, base, pool, dropout, head.
        for layer in model.layers[1:]:
            h = layer(h, training=False)
            if layer is base:
                features = h
        score = h[:, 0]
    if features is None:  # pragma: no cover - every bundle has the base
        raise ValueError(f"model has no {BASE_NAME!r} layer")
    grads = tape.gradient(score, features)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = np.asarray(tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))[0], np.float32)
    top = float(cam.max())
    return cam / top if top > 0 else cam


def compose(
    tensor: npt.NDArray[np.float32], cam: npt.NDArray[np.float32], banner: str
) -> npt.NDArray[np.uint8]:
    """RGB picture: the input image, the heatmap blended over it, the banner on top."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    gray = np.clip((tensor[..., 0] + 1.0) * 127.5, 0, 255).astype(np.uint8)
    image = Image.fromarray(gray).convert("RGB").resize((DISPLAY_SIZE, DISPLAY_SIZE))
    heat = Image.fromarray((cam * 255).astype(np.uint8)).resize(
        (DISPLAY_SIZE, DISPLAY_SIZE), Image.Resampling.BILINEAR
    )
    colours = colormaps["jet"](np.asarray(heat, dtype=np.float32) / 255.0)[..., :3]
    rgb = np.asarray(image, dtype=np.float32) * (1 - ALPHA) + colours * 255.0 * ALPHA
    canvas = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, DISPLAY_SIZE, BANNER_PX), fill=(0, 0, 0))
    font = ImageFont.load_default(size=18)
    for i, line in enumerate(banner.splitlines()[:2]):
        draw.text((8, 6 + 24 * i), line, fill=(255, 255, 0), font=font)
    return np.asarray(canvas, dtype=np.uint8)


def banner_text(task: RenderTask) -> str:
    if task.probability is None:  # only predictions are planned an overlay
        raise PermanentError(f"result object {task.object_id}: an overlay needs a prediction")
    return (
        f"AI: {task.label}  p={task.probability:.3f}  model {task.model_version}\n"
        "NOT FOR DIAGNOSTIC USE"
    )


class OverlayRenderer:
    """Keeps the Keras model of the last bundle used; renders one overlay at a time."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._model: Any = None
        self._model_path: str | None = None
        self._image_size = 0

    def model_for(self, path: str) -> Any:
        from pacs_classifier.model.bundle import load_keras_model, read_bundle

        if self._model is None or self._model_path != path:
            info = read_bundle(path)
            self._model = load_keras_model(info)
            self._model_path = path
            self._image_size = info.image_size
        return self._model

    def render(self, task: RenderTask, source: Dataset) -> tuple[Dataset, bytes]:
        """The SC dataset and the same picture as PNG."""
        from PIL import Image

        from pacs_classifier.preprocess import normalize_dataset

        model = self.model_for(task.model_path)
        tensor = normalize_dataset(source, self._image_size, rules=self.config.eligibility)
        picture = compose(tensor, grad_cam(model, tensor), banner_text(task))
        png = io.BytesIO()
        Image.fromarray(picture).save(png, format="PNG")
        return build_sc(source, picture, task), png.getvalue()


def build_sc(source: Dataset, picture: npt.NDArray[np.uint8], task: RenderTask) -> Dataset:
    """The RGB Secondary Capture of ``picture`` in the source's study."""
    from highdicom import CoordinateSystemNames
    from highdicom.sc import SCImage

    evidence = evidence_of(source)
    # The picture keeps the source's orientation (normalising only pads and scales), so
    # its Patient Orientation holds; unknown stays empty (Type 2) rather than guessed.
    values = [str(v) for v in (source.get("PatientOrientation") or ())]
    known = len(values) == 2 and all(values)
    orientation = (values[0], values[1]) if known else ("L", "F")
    with warnings.catch_warnings():
        # highdicom warns about single-component person names, which sites do send.
        warnings.filterwarnings("ignore", message="The string .* person name", category=UserWarning)
        sc = SCImage.from_ref_dataset(
            ref_dataset=evidence,
            pixel_array=picture,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system=CoordinateSystemNames.PATIENT,
            series_instance_uid=task.series_instance_uid,
            series_number=SC_SERIES_NUMBER,
            sop_instance_uid=task.sop_instance_uid,
            instance_number=task.object_id,
            manufacturer=PRODUCT,
            patient_orientation=orientation,
        )
    if not known:
        sc["PatientOrientation"].value = ""  # Type 2: present and empty
    # Type 2C (General Series): the chest is not a paired part, so empty unless known.
    sc.Laterality = str(source.get("Laterality", "") or "")
    sc.BurnedInAnnotation = "YES"
    # Made by a program on a workstation, not digitised from film or a video interface.
    sc.ConversionType = "WSD"
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    sc.ImageComments = banner_text(task).replace("\n", "  ")
    return sc
