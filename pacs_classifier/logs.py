"""How the program speaks: one logging set-up for every command, and quiet libraries.

:func:`setup` runs once, in ``cli.main``, before any command and so before TensorFlow is
imported. It

- writes log lines as ``2026-12-02 14:27:00.148Z WARNING name: message`` (UTC, with its
  zone, as :mod:`pacs_classifier.times` writes every time);
- sends Python warnings through logging, so a library's ``UserWarning`` is one log line,
  not a raw warning with a source line under it;
- stops pydicom validating values as it reads them: it warns, and logs, each time an
  element is read, so one odd UID gave ten lines per instance; pynetdicom's own
  complaints about the same UID are dropped too. The listener checks the values it relies
  on itself (``receive.inspect.check_uid``) and the ingest warns once per instance;
- keeps pynetdicom's per-association and per-message INFO lines out (WARNING and above
  stay); ``--verbose`` shows them;
- keeps TensorFlow's native logging out of the terminal. Since TensorFlow 2.20 it logs
  through absl before ``absl::InitializeLog()``, which no setting silences:
  ``TF_CPP_MIN_LOG_LEVEL`` does not reach those lines, and ``CUDA_VISIBLE_DEVICES=-1``
  does not stop the ``cuInit`` error on a machine without a GPU (both measured with
  TensorFlow 2.21). So, when this process is the program (not a test calling
  ``cli.main``), file descriptor 2 goes through a filter that drops TensorFlow's
  INFO/WARNING lines and the ERROR lines that only say there is no GPU. Everything else,
  a crash report included, passes. ``--verbose`` turns the filter off.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
from datetime import UTC, datetime

from pacs_classifier.times import format_utc

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: One line of native (C++) logging: severity, MMDD, time (before absl is initialised,
#: ``00:00:<seconds since 1970>``), thread id, file:line].
_NATIVE_LINE = re.compile(rb"[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w./+-]+:\d+\] ")
#: absl's notice above the first native line, the second line of TensorFlow's
#: "optimised for these CPU instructions" message, and LiteRT's greeting.
_NATIVE_PREAMBLE = (
    b"WARNING: All log messages before absl::InitializeLog() is called",
    b"To enable the following instructions:",
    b"INFO: Created TensorFlow Lite XNNPACK delegate",
)
#: ERROR lines that only say that this machine has no (usable) GPU.
_NO_GPU_ERRORS = (b"failed call to cuInit", b"Unable to register cu")

#: Set once the filter runs: file descriptor 2 is taken over once per process.
_filtering = threading.Event()


class UTCFormatter(logging.Formatter):
    """Times in UTC with the zone written out, to the millisecond."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        return format_utc(datetime.fromtimestamp(record.created, UTC), "milliseconds")


def setup(*, verbose: bool, program: bool) -> None:
    """Configure logging and the libraries' output, before any command runs.

    ``program``: this process is the ``pacs-classifier`` program itself, so it may take
    over its standard error, logging and the libraries' settings. A caller running
    ``cli.main`` inside its own process (a test) keeps all of that as it was, as
    ``logging.basicConfig`` would: it only gets a handler if it has none.
    """
    root = logging.getLogger()
    level = logging.DEBUG if verbose else logging.INFO
    if not program:
        if not root.handlers:
            root.addHandler(_handler())
            root.setLevel(level)
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")
    if not verbose:
        _filter_native_stderr()  # first: the handler writes to the new sys.stderr
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(_handler())
    root.setLevel(level)
    logging.captureWarnings(True)
    if not verbose:
        # TensorFlow's and absl's Python loggers repeat, at INFO/WARNING, what our own
        # lines already say (models loading, functions retracing).
        for name in ("tensorflow", "absl", "h5py", "tf2onnx"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # pynetdicom logs every association and every C-STORE at INFO; the listener logs
        # what was stored, and the audit trail has the associations.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        # highdicom logs each module it copies into an SR or SC at INFO (~20 lines each).
        logging.getLogger("highdicom").setLevel(logging.WARNING)
    # pynetdicom warns about a non-conformant UID each time it reads one (twice per
    # C-STORE); the ingest warns once per instance and audits it.
    logging.getLogger("pynetdicom.utils").addFilter(_not_a_uid_complaint)
    _quiet_pydicom()


def _handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(UTCFormatter(FORMAT))
    return handler


def _not_a_uid_complaint(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Non-conformant '")


def _quiet_pydicom() -> None:
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE


def keep_native_line(line: bytes) -> bool:
    """Whether a line written to file descriptor 2 should reach the terminal."""
    if line.startswith(_NATIVE_PREAMBLE):
        return False
    if _NATIVE_LINE.match(line):
        severity = line[:1]
        if severity in (b"I", b"W"):
            return False
        if severity == b"E" and any(text in line for text in _NO_GPU_ERRORS):
            return False
    return True


def _filter_native_stderr() -> None:
    """Route file descriptor 2 through :func:`keep_native_line`; Python's own writes
    (``sys.stderr``, so our log lines and error messages) go straight to the terminal."""
    if _filtering.is_set():
        return
    _filtering.set()
    sys.stderr.flush()
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = os.fdopen(
        os.dup(terminal), "w", buffering=1, encoding="utf-8", errors="backslashreplace"
    )
    pump = threading.Thread(
        target=_pump, args=(read_end, terminal), name="stderr-filter", daemon=True
    )
    pump.start()

    def restore() -> None:
        # Closing our last write end lets the pump see the end and flush what is left.
        os.dup2(terminal, 2)
        pump.join(timeout=2)

    atexit.register(restore)


def _pump(read_end: int, terminal: int) -> None:
    pending = b""
    while chunk := os.read(read_end, 65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        kept = b"".join(line + b"\n" for line in lines if keep_native_line(line))
        if kept:
            os.write(terminal, kept)
    if pending and keep_native_line(pending):
        os.write(terminal, pending)
    os.close(read_end)
