"""Render a claimed result object to a file under the storage root.

Layout (relative to ``storage.root``; ``results`` cannot clash with a received study,
whose folder is a UID)::

    results/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   SR or SC
    results/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.png   the overlay as PNG

Files are written to a temporary name, fsynced and renamed into place, so a reader (the
sender, the dashboard) never sees half a file. Rendering again after a crash rewrites the
same names with the same UIDs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacs_classifier.config import Config
from pacs_classifier.db.models import ResultKind
from pacs_classifier.errors import NotAssessable, PermanentError
from pacs_classifier.results.outbound import RenderTask
from pacs_classifier.results.sr import (
    NotAssessedContent,
    ObjectUids,
    SrContent,
    build_not_assessed_sr,
    build_sr,
)
from pacs_classifier.store.storage import check_uid, fsync_dir, fsync_file

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

RESULTS_DIR = "results"


def result_path(root: Path, task: RenderTask, suffix: str = ".dcm") -> Path:
    """Where an object's file lives (every component a validated UID)."""
    return root.joinpath(
        RESULTS_DIR,
        check_uid(task.study_instance_uid, "StudyInstanceUID").uid,
        check_uid(task.series_instance_uid, "SeriesInstanceUID").uid,
        check_uid(task.sop_instance_uid, "SOPInstanceUID").uid + suffix,
    )


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)``, fsync, rename to ``path``, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def source_path(config: Config, task: RenderTask) -> Path:
    p = Path(task.source_path)
    return p if p.is_absolute() else config.storage_root / p


def read_source(config: Config, task: RenderTask, *, pixels: bool) -> Dataset:
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = source_path(config, task)
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels, force=True)
    except FileNotFoundError:
        raise PermanentError(f"source instance file is gone: {path}") from None
    except (InvalidDicomError, ValueError, EOFError) as exc:
        raise PermanentError(f"source instance cannot be read: {exc}") from None


def render_sr(config: Config, task: RenderTask) -> Dataset:
    """The SR dataset of a task: a classification's, or a not-assessed instance's."""
    uids = ObjectUids(task.sop_instance_uid, task.series_instance_uid, task.object_id)
    if task.label is None or task.probability is None or task.threshold is None:
        content = NotAssessedContent(
            reason=task.not_assessed_reason or "",
            model_version=task.model_version,
            model_sha256=task.model_sha256,
        )
        source = read_source(config, task, pixels=False)
        try:
            return build_not_assessed_sr(source, content, uids, task.predecessor)
        except ValueError as exc:  # no usable reason code: rendering again will not help
            raise PermanentError(f"not-assessed SR: {exc}") from None
    return build_sr(
        read_source(config, task, pixels=False),
        SrContent(
            label=task.label,
            probability=task.probability,
            threshold=task.threshold,
            model_version=task.model_version,
            model_sha256=task.model_sha256,
        ),
        uids,
        task.predecessor,
    )


def render(config: Config, task: RenderTask, overlays: Any = None) -> str:
    """Write the task's object; return its path relative to the storage root.

    ``overlays`` is an :class:`~pacs_classifier.results.overlay.OverlayRenderer` (it
    keeps the Keras model loaded between objects); made on demand when absent.
    """
    root = config.storage_root
    if task.kind == ResultKind.SR:
        ds = render_sr(config, task)
    else:
        from pacs_classifier.results.overlay import OverlayRenderer

        renderer = overlays if overlays is not None else OverlayRenderer(config)
        try:
            ds, png = renderer.render(task, read_source(config, task, pixels=True))
        except NotAssessable as exc:
            raise PermanentError(f"overlay: source pixels not usable: {exc.reason}") from None
        write_atomic(result_path(root, task, ".png"), lambda tmp: _write_bytes(tmp, png))
    target = result_path(root, task)
    write_atomic(target, lambda tmp: ds.save_as(tmp, enforce_file_format=True))
    return target.relative_to(root).as_posix()


def _write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)
