"""Durable files under ``storage.root``: one file per received instance version.

A file reaches its final name only through a temporary file in ``<root>/.tmp`` that has
been fsynced, an atomic ``rename`` and an fsync of the directory that now holds it, so a
crash at any point leaves either the old state or the complete file, never a partial
one. Temporary files left by a crash are removed when the storage is opened.

A file that reached its final name but whose database row was never committed (a crash,
or a commit that failed and whose outcome could not be checked) would be referenced by
nothing. So, before the rename, an intent marker is created in ``<root>/.pending``
(:meth:`Storage.write_intent`): an empty file whose *name* is the final path, so that only
the directory needs an fsync. It is removed once the commit (or the cleanup after a failed
one) is done; at start-up, :meth:`~pacs_classifier.store.ingest.Ingestor.recover_pending`
compares every marker left with the ``instances`` table. No scan of the archive is needed.

Layout: ``<root>/<study uid>/<series uid>/<sop instance uid>.<sha256[:16]>.dcm``. UIDs
are validated before they become path components, so ``1.2.3/../../x`` cannot escape
the root.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pacs_classifier.errors import PermanentError, StorageFull

log = logging.getLogger(__name__)

TMP_DIR_NAME = ".tmp"
PENDING_DIR_NAME = ".pending"
#: Suffix of an intent marker; its name is the final path with ``/`` written as ``_``.
INTENT_SUFFIX = ".intent"
_INTENT_SEP = "_"
#: Prefix of every temporary file we create, so cleanup never touches anything else.
TMP_PREFIX = "rx-"
MAX_UID_LENGTH = 64
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
#: The last part of a marker's name: ``<sop instance uid>.<sha256[:16]>.dcm``.
_MARKED_FILE_RE = re.compile(r"([0-9.]+)\.([0-9a-f]{16})\.dcm")
_COPY_CHUNK = 1 << 20


class InvalidUID(PermanentError):
    """A UID that is not digits and dots of at most 64 characters (PS3.5 §9.1)."""


@dataclass(frozen=True)
class UIDCheck:
    """A UID that passed :func:`check_uid`; ``leading_zero`` is worth a warning."""

    uid: str
    leading_zero: bool


def check_uid(value: object, name: str) -> UIDCheck:
    """Validate a UID for use as a path component (PS3.5 §9.1).

    Digits and dots, at most 64 characters, no empty component. A component with a
    leading zero (``1.02.3``) breaks the standard but some devices write it: it is
    accepted and reported so the caller can audit a warning.
    """
    text = "" if value is None else str(value)
    # A trailing NUL is the standard's padding for UI values of odd length.
    text = text.rstrip("\x00").strip()
    if not text:
        raise InvalidUID(f"{name} is empty")
    if len(text) > MAX_UID_LENGTH:
        raise InvalidUID(f"{name} is longer than {MAX_UID_LENGTH} characters ({len(text)})")
    if not _UID_RE.fullmatch(text):
        raise InvalidUID(f"{name} is not a UID of digits and dots: {text[:80]!r}")
    leading_zero = any(len(part) > 1 and part.startswith("0") for part in text.split("."))
    return UIDCheck(text, leading_zero)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Intent:
    """An intent marker left in ``.pending``: the final file it announced."""

    marker: Path
    final: Path
    #: ``<study>/<series>/<sop>.<sha256[:16]>.dcm``, as in ``instances.file_path``.
    file_path: str
    sop_instance_uid: str


class Storage:
    """The folder of received instances, with crash-safe writes."""

    def __init__(self, root: Path, min_free_mb: int) -> None:
        self.root = root.resolve()
        self.tmp_dir = self.root / TMP_DIR_NAME
        self.pending_dir = self.root / PENDING_DIR_NAME
        self.min_free_mb = min_free_mb

    def ensure_dirs(self) -> None:
        """Create the storage folders; touches nothing already there."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.pending_dir.mkdir(exist_ok=True)

    def open(self) -> int:
        """Create the folders and delete temporary files left by a crash; return how many.

        Only the listener calls this, at start: another process storing into the same root
        while a listener runs (``classify --record``) uses :meth:`ensure_dirs`, or it would
        delete the listener's transfers in flight.
        """
        self.ensure_dirs()
        return self.sweep_temp()

    def sweep_temp(self, idle_s: float = 0.0) -> int:
        """Delete our temporary files not written to for ``idle_s`` seconds.

        With ``idle_s = 0`` (start, shutdown) every one of them is an orphan. While
        running, a file nobody wrote to for longer than the network timeout belongs to
        a transfer that was aborted.
        """
        cutoff = time.time() - idle_s
        removed = 0
        for entry in self.tmp_dir.iterdir():
            if not entry.name.startswith(TMP_PREFIX):
                continue
            try:
                if idle_s and entry.stat().st_mtime > cutoff:
                    continue
                entry.unlink()
            except FileNotFoundError:
                continue
            removed += 1
        if removed:
            fsync_dir(self.tmp_dir)
            log.warning("removed %d orphan temporary file(s) from %s", removed, self.tmp_dir)
        return removed

    # ------------------------------------------------------------------ space

    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / (1024 * 1024)

    def check_free_space(self) -> None:
        """Raise :class:`StorageFull` when free space is below ``min_free_mb``."""
        free = self.free_mb()
        if free < self.min_free_mb:
            raise StorageFull(
                f"storage.root {self.root}: {free:.0f} MB free, below "
                f"storage.min_free_mb = {self.min_free_mb}"
            )

    # ------------------------------------------------------------------ temporaries

    def new_temp_path(self) -> Path:
        return self.tmp_dir / f"{TMP_PREFIX}{uuid.uuid4().hex}.part"

    def adopt_temp(self, src: Path) -> Path:
        """Bring a file written elsewhere (pynetdicom's receive buffer) into ``.tmp``.

        A rename when ``src`` is on the same file system (the normal case: the listener
        points pynetdicom at ``.tmp``), a copy otherwise.
        """
        if src.parent == self.tmp_dir and src.name.startswith(TMP_PREFIX):
            return src
        dst = self.new_temp_path()
        try:
            os.replace(src, dst)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            with src.open("rb") as fin, dst.open("wb") as fout:
                shutil.copyfileobj(fin, fout, _COPY_CHUNK)
            src.unlink(missing_ok=True)
        return dst

    def write_temp(self, data: bytes) -> Path:
        """Write ``data`` to a new temporary file (not yet fsynced)."""
        path = self.new_temp_path()
        with path.open("wb") as f:
            f.write(data)
        return path

    def discard(self, path: Path | None) -> None:
        if path is not None:
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ final files

    def final_path(self, study_uid: str, series_uid: str, sop_uid: str, sha256: str) -> Path:
        """Where an instance version lives; every component is a validated UID or hex."""
        parts = [
            check_uid(study_uid, "StudyInstanceUID").uid,
            check_uid(series_uid, "SeriesInstanceUID").uid,
            f"{check_uid(sop_uid, 'SOPInstanceUID').uid}.{sha256[:16]}.dcm",
        ]
        path = self.root.joinpath(*parts)
        # Belt and braces: validated UIDs cannot contain separators, but check anyway.
        if path.resolve().parent.parent.parent != self.root:
            raise InvalidUID(f"refusing a path outside storage.root: {path}")
        return path

    def commit_file(self, tmp: Path, final: Path) -> None:
        """Atomically move an fsynced temporary file to ``final`` and make it durable."""
        self._ensure_dir(final.parent)
        os.replace(tmp, final)
        fsync_dir(final.parent)

    def remove_final(self, final: Path) -> None:
        """Undo :meth:`commit_file` (the database refused the row)."""
        try:
            final.unlink()
        except FileNotFoundError:
            return
        fsync_dir(final.parent)

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    # ------------------------------------------------------------------ intent journal

    def intent_marker(self, final: Path) -> Path:
        """The marker announcing ``final``: its relative path, ``/`` written as ``_``.

        Validated UIDs and hex hold no ``_``, so the name maps back to one path; it is
        at most 222 characters, under every file system's 255.
        """
        name = self.relative(final).replace("/", _INTENT_SEP)
        return self.pending_dir / f"{name}{INTENT_SUFFIX}"

    def write_intent(self, final: Path) -> Path:
        """Durably announce that ``final`` is about to appear; call before the rename.

        An empty file and one fsync of ``.pending``: the name carries the intent, so the
        directory entry is all that must reach the disk before the rename does.
        Re-announcing a path already announced is harmless.
        """
        marker = self.intent_marker(final)
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT, 0o600))
        fsync_dir(self.pending_dir)
        return marker

    def clear_intent(self, marker: Path) -> None:
        """Drop a marker whose outcome is settled.

        Not fsynced: a marker that reappears after a crash is settled again at start-up
        (its row exists, or its file is already gone), which costs nothing but a query.
        """
        marker.unlink(missing_ok=True)

    def pending_intents(self) -> list[Intent]:
        """Markers left by a crash or by an unsettled commit, in name order.

        A file in ``.pending`` that is not a well-formed marker is logged and left
        alone: it is not ours, and its name is never trusted as a path.
        """
        if not self.pending_dir.is_dir():
            return []
        intents: list[Intent] = []
        for entry in sorted(self.pending_dir.iterdir()):
            try:
                intents.append(self._parse_intent(entry))
            except InvalidUID as exc:
                log.warning("ignoring %s in %s: %s", entry.name, self.pending_dir, exc)
        return intents

    def _parse_intent(self, marker: Path) -> Intent:
        name = marker.name
        if not name.endswith(INTENT_SUFFIX):
            raise InvalidUID("not an intent marker")
        parts = name[: -len(INTENT_SUFFIX)].split(_INTENT_SEP)
        match = _MARKED_FILE_RE.fullmatch(parts[-1]) if len(parts) == 3 else None
        if match is None:
            raise InvalidUID("not <study>_<series>_<sop>.<sha16>.dcm")
        sop_uid, sha_prefix = match.group(1), match.group(2)
        # final_path validates every UID component and that the path stays under root.
        final = self.final_path(parts[0], parts[1], sop_uid, sha_prefix)
        return Intent(marker, final, self.relative(final), sop_uid)

    def _ensure_dir(self, path: Path) -> None:
        if path.is_dir():
            return
        missing: list[Path] = []
        p = path
        while not p.is_dir():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            fsync_dir(d.parent)
