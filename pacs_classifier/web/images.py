"""The pictures of the study page: the image as the model saw it, and its overlay.

The image is rendered from the stored file through the very normalisation the worker
used (``normalize_file`` at the model's input size), so what a person sees is what was
classified, padding included.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from pacs_classifier.db.engine import Database

#: Where the Grad-CAM overlay of an instance is looked for, under ``storage.root``.
OVERLAY_DIR = "overlays"
DEFAULT_IMAGE_SIZE = 299


def classified_png(path: Path, image_size: int | None) -> bytes:
    """PNG bytes of ``path`` normalised to ``image_size`` (raises ``NotAssessable``)."""
    from PIL import Image

    from pacs_classifier.preprocess import normalize_file

    x = normalize_file(path, image_size or DEFAULT_IMAGE_SIZE)
    grey = np.clip((x[..., 0] + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(grey).save(out, format="PNG")
    return out.getvalue()


def overlay_path(db: Database, storage_root: Path, instance_id: int) -> Path | None:
    """The Grad-CAM overlay PNG of an instance, if one was rendered.

    The sender writes each overlay's PNG beside its Secondary Capture
    (``results/<study>/<series>/<sop>.png``, ``results/render.py``); the newest overlay
    object of the instance whose PNG exists is shown. A PNG placed by hand at
    ``<storage.root>/overlays/<instance id>.png`` is shown when there is none.
    """
    from sqlalchemy import select

    from pacs_classifier.db.models import ResultKind, ResultObject
    from pacs_classifier.results.render import RESULTS_DIR

    with db.read_session() as session:
        rows = session.execute(
            select(
                ResultObject.study_instance_uid,
                ResultObject.series_instance_uid,
                ResultObject.sop_instance_uid,
            )
            .where(ResultObject.instance_id == int(instance_id))
            .where(ResultObject.kind == ResultKind.SC)
            .order_by(ResultObject.id.desc())
        ).all()
    for study, series, sop in rows:
        png = storage_root.joinpath(RESULTS_DIR, study, series, f"{sop}.png")
        if png.is_file():
            return png
    candidate = storage_root / OVERLAY_DIR / f"{int(instance_id)}.png"
    return candidate if candidate.is_file() else None
