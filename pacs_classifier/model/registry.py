"""The model registry: bundles copied under ``model.dir``, one row each in ``models``.

Exactly one model is active (a partial unique index enforces it). Registering and
activating check the bundle's checksums first; a corrupt or mismatched bundle is refused
with :class:`ModelError` and the active model stays as it was. Every change is audited.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacs_classifier.db.audit import append_event
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import Model, utcnow
from pacs_classifier.errors import ModelError, PermanentError
from pacs_classifier.model.bundle import BundleInfo, read_bundle

log = logging.getLogger(__name__)


def register_bundle(
    db: Database,
    source: str | Path,
    model_dir: Path,
    *,
    actor: str,
    activate: bool = False,
    export: bool = False,
    data_root: Path | None = None,
    static_int8: bool = False,
    events: Sequence[tuple[str, Mapping[str, Any]]] = (),
) -> Model:
    """Check ``source``, copy it to ``model_dir/<version>`` and record it.

    ``events``: further audit events about the new model, as (action, detail), written in
    the same transaction as its row (``model calibrate`` records its provenance so).
    With ``export``, the copy is also exported to the faster runtimes that pass their parity
    check (:mod:`pacs_classifier.model.export`, a minute or two per model) on the bundle's
    validation images under ``data_root`` (synthetic inputs without it); a failure there is
    logged and audited, and the model is registered for Keras regardless.
    """
    # DEBUG, not INFO: a bundle that fails its check must leave one line on stderr.
    log.debug("checking the bundle in %s", source)
    info = read_bundle(source)
    with db.session() as session:
        existing = session.execute(
            select(Model).where(Model.version == info.version)
        ).scalar_one_or_none()
        if existing is not None:
            if existing.sha256 != info.sha256:
                raise ModelError(
                    f"model version {info.version} is already registered with different content"
                )
            if activate and not existing.active:
                _activate(session, existing, actor)
            return existing
    dest = _install(info, model_dir)
    log.info("model %s copied to %s", info.version, dest)
    runtimes = _export_runtimes(dest, data_root, static_int8) if export else None
    try:
        with db.session() as session:
            row = Model(
                version=info.version,
                path=str(dest),
                sha256=info.sha256,
                threshold=info.threshold,
                image_size=info.image_size,
                metrics=info.metadata.metrics.final.to_json(),
                created_at=info.created_at,
                registered_at=utcnow(),
                active=False,
            )
            session.add(row)
            session.flush()
            append_event(
                session,
                actor=actor,
                action="model.register",
                entity_type="model",
                entity_id=row.id,
                outcome="ok",
                detail={
                    "version": info.version,
                    "sha256": info.sha256,
                    "source": str(Path(source).resolve()),
                    **({"runtimes": runtimes} if runtimes is not None else {}),
                },
            )
            for action, detail in events:
                append_event(
                    session,
                    actor=actor,
                    action=action,
                    entity_type="model",
                    entity_id=row.id,
                    outcome="ok",
                    detail=detail,
                )
            if activate:
                _activate(session, row, actor)
            return row
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _export_runtimes(dest: Path, data_root: Path | None, static_int8: bool) -> dict[str, Any]:
    """Export the registered copy; a summary for the audit trail. Never raises."""
    from pacs_classifier.model.export import export_runtimes

    try:
        record = export_runtimes(dest, data_root=data_root, static_int8=static_int8)
    except Exception as exc:  # serving falls back to Keras; the failure is recorded
        log.exception("runtime export of %s failed", dest)
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    summary: dict[str, Any] = {n: e["usable"] for n, e in record["runtimes"].items()}
    summary["auto"] = record["auto"]
    summary["parity_inputs"] = record["parity_inputs"]["source"]
    return summary


def activate_version(db: Database, version: str, *, actor: str) -> Model:
    """Make ``version`` the active model after re-checking its files."""
    with db.session() as session:
        row = session.execute(select(Model).where(Model.version == version)).scalar_one_or_none()
        if row is None:
            raise PermanentError(f"no registered model with version {version!r}")
        info = read_bundle(row.path)  # raises ModelError when the files changed on disk
        if info.sha256 != row.sha256:
            raise ModelError(f"{row.path}: bundle content differs from the registered one")
        _activate(session, row, actor)
        return row


def active_model(session: Session) -> Model | None:
    return session.execute(select(Model).where(Model.active.is_(True))).scalar_one_or_none()


def list_models(session: Session) -> list[Model]:
    return list(session.execute(select(Model).order_by(Model.id)).scalars())


def _activate(session: Session, row: Model, actor: str) -> None:
    previous = active_model(session)
    if previous is not None and previous.id == row.id:
        return
    session.execute(update(Model).where(Model.active.is_(True)).values(active=False))
    session.flush()
    row.active = True
    session.flush()
    append_event(
        session,
        actor=actor,
        action="model.activate",
        entity_type="model",
        entity_id=row.id,
        outcome="ok",
        detail={"version": row.version, "previous": previous.version if previous else None},
    )


def _install(info: BundleInfo, model_dir: Path) -> Path:
    """Copy the bundle into the registry folder atomically (temp folder, then rename)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    dest = model_dir / info.version
    if dest.exists():
        try:
            if read_bundle(dest).sha256 == info.sha256:
                return dest
        except ModelError:
            pass
        raise ModelError(f"{dest} exists with other content; remove it or pick a new version")
    tmp = Path(tempfile.mkdtemp(prefix=f".{info.version}.", dir=model_dir))
    try:
        shutil.copytree(info.path, tmp, dirs_exist_ok=True)
        read_bundle(tmp)  # the copy is what will be served: check it, not the source
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
