"""``serve`` with several roles: one OS process per role under a small supervisor.

Each role runs as a child process of our own command line (``serve --roles ROLE``, the
same interpreter), so a segfault or an out-of-memory kill in a pixel codec takes the
worker down and leaves the listener answering. The supervisor:

- starts the roles in order, each once the previous one says it is ready (the listener
  accepts before a worker claims);
- relays each child's stderr to its own, remembering the last lines;
- restarts a role that exits without being asked, after a backoff that doubles from
  :data:`BACKOFF_START_S` to :data:`BACKOFF_CAP_S` (reset once a role has stayed up
  :data:`STABLE_S`), logging its exit status and reason and appending a ``role.crash``
  audit event;
- gives up when a role crashes :data:`MAX_CRASHES` times within :data:`CRASH_WINDOW_S`:
  it stops the others and exits 1, for the service manager to see;
- on SIGTERM or SIGINT (its one signal handler) stops the roles in reverse order, each
  with SIGTERM (each finishes or releases its in-flight work), SIGKILL after
  :data:`STOP_TIMEOUT_S`.

A child is told it is supervised through :data:`SUPERVISOR_ENV` (the supervisor's pid)
and :data:`READY_FD_ENV` (a pipe to write ``ready`` to); see :func:`as_supervised_child`.
It asks the kernel to kill it when the supervisor dies (``PR_SET_PDEATHSIG``), so a
``kill -9`` of ``serve`` leaves no role running behind it: the state a crash leaves is
the same as with one process (leases run out or are reclaimed, files are recovered).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from pacs_classifier.db.audit import append_event
from pacs_classifier.errors import PacsClassifierError, PermanentError
from pacs_classifier.wiring import App

log = logging.getLogger(__name__)

#: The supervisor's pid, in a child's environment.
SUPERVISOR_ENV = "PACS_CLASSIFIER_SUPERVISOR_PID"
#: The file descriptor a child writes ``ready`` to once its role has started.
READY_FD_ENV = "PACS_CLASSIFIER_READY_FD"

BACKOFF_START_S = 0.5
BACKOFF_CAP_S = 30.0
#: A role that stayed up this long starts its backoff afresh after a crash.
STABLE_S = 60.0
#: This many crashes of one role within the window and the whole ``serve`` exits 1.
MAX_CRASHES = 8
CRASH_WINDOW_S = 600.0
#: How long a role may take to start (a worker imports its runtime) and to stop.
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
#: Lines of a child's stderr kept to say why it exited.
TAIL_LINES = 20

EXIT_GAVE_UP = 1

PR_SET_PDEATHSIG = 1


class RoleStartError(PermanentError):
    """A role exited, or did not say it was ready, while ``serve`` was starting."""


@dataclass
class Child:
    """One role's process and what the supervisor knows about it."""

    role: str
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=TAIL_LINES)
    )
    crashes: collections.deque[float] = field(default_factory=collections.deque)
    backoff_s: float = BACKOFF_START_S
    restart_at: float | None = None
    relay: threading.Thread | None = None


def _lines() -> collections.deque[str]:
    return collections.deque(maxlen=TAIL_LINES)


def exit_reason(code: int) -> str:
    """``-9`` → ``killed by SIGKILL``; ``1`` → ``exited with status 1``."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exited with status {code}"


class Supervisor:
    """Runs ``roles`` as child processes until asked to stop or a role keeps crashing."""

    def __init__(
        self,
        app: App,
        roles: Sequence[str],
        *,
        config_path: str | None,
        verbose: bool = False,
    ) -> None:
        self.app = app
        self.children = [Child(role) for role in roles]
        self.config_path = config_path
        self.verbose = verbose
        self.actor = f"supervisor:{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        """Start, watch and restart; stop on a signal. The exit status of ``serve``."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("%s received: stopping the roles", signal.Signals(signum).name)
            self._stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        started: list[Child] = []
        try:
            for child in self.children:
                if self._stop.is_set():
                    break
                self._start(child, initial=True)
                started.append(child)
            if not self._stop.is_set():
                log.info(
                    "serving roles: %s (one process each: %s)",
                    ", ".join(c.role for c in self.children),
                    ", ".join(f"{c.role}={c.proc.pid}" for c in self.children if c.proc),
                )
            status = 0
            while not self._stop.wait(0.2):
                gave_up = self._watch()
                if gave_up is not None:
                    log.error(
                        "role %s keeps crashing (%d times in %.0f s): stopping serve",
                        gave_up.role,
                        len(gave_up.crashes),
                        CRASH_WINDOW_S,
                    )
                    status = EXIT_GAVE_UP
                    break
            return status
        finally:
            for child in reversed(started):
                self._terminate(child)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _watch(self) -> Child | None:
        """Reap exited roles and restart due ones; the role that keeps crashing, if any."""
        now = time.monotonic()
        for child in self.children:
            proc = child.proc
            if proc is not None and proc.poll() is not None:
                code = proc.returncode
                child.proc = None
                if child.relay is not None:
                    child.relay.join(5)
                if self._crashed(child, code, now):
                    return child
            if child.proc is None and child.restart_at is not None and now >= child.restart_at:
                child.restart_at = None
                try:
                    self._start(child, initial=False)
                except RoleStartError as exc:
                    log.error("%s", exc)
                    if self._crashed(child, None, time.monotonic()):
                        return child
        return None

    def _crashed(self, child: Child, code: int | None, now: float) -> bool:
        """Log, audit and schedule the restart of a role that exited; True: give up."""
        if child.started_at and now - child.started_at >= STABLE_S:
            child.backoff_s = BACKOFF_START_S
        while child.crashes and now - child.crashes[0] > CRASH_WINDOW_S:
            child.crashes.popleft()
        child.crashes.append(now)
        give_up = len(child.crashes) >= MAX_CRASHES
        reason = "did not start" if code is None else exit_reason(code)
        last = telling_line(child.tail)
        detail: dict[str, object] = {
            "exit_status": code,
            "reason": reason,
            "last_output": last[-300:],
            "uptime_s": round(now - child.started_at, 1) if child.started_at else None,
            "crashes_in_window": len(child.crashes),
        }
        if give_up:
            log.error("role %s %s (%s)", child.role, reason, last or "no output")
        else:
            detail["restart_in_s"] = child.backoff_s
            log.error(
                "role %s %s (%s); restarting in %.1f s",
                child.role,
                reason,
                last or "no output",
                child.backoff_s,
            )
            child.restart_at = now + child.backoff_s
            child.backoff_s = min(child.backoff_s * 2, BACKOFF_CAP_S)
        self._audit(child.role, "gave_up" if give_up else "restart", detail)
        return give_up

    def _audit(self, role: str, outcome: str, detail: dict[str, object]) -> None:
        try:
            with self.app.db.session() as session:
                append_event(
                    session,
                    actor=self.actor,
                    action="role.crash",
                    entity_type="role",
                    entity_id=role,
                    outcome=outcome,
                    detail=detail,
                )
        except PacsClassifierError as exc:  # the database may be what went away
            log.error("role %s: crash not audited: %s", role, exc)

    # ------------------------------------------------------------------ one child

    def command(self, role: str) -> list[str]:
        cmd = [sys.executable, "-m", "pacs_classifier"]
        if self.config_path:
            cmd += ["--config", self.config_path]
        if self.verbose:
            cmd.append("-v")
        return [*cmd, "serve", "--roles", role]

    def _start(self, child: Child, *, initial: bool) -> None:
        """Start one role and wait until it says it is ready (or exits)."""
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        env[SUPERVISOR_ENV] = str(os.getpid())
        env[READY_FD_ENV] = str(write_fd)
        try:
            # Its own session: a terminal's Ctrl-C reaches the supervisor alone, which
            # stops the roles in order.
            proc = subprocess.Popen(
                self.command(child.role),
                env=env,
                pass_fds=(write_fd,),
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        finally:
            os.close(write_fd)
        child.proc = proc
        child.started_at = time.monotonic()
        child.tail.clear()
        assert proc.stderr is not None
        child.relay = threading.Thread(
            target=_relay,
            args=(proc.stderr, child.tail),
            name=f"relay-{child.role}",
            daemon=True,
        )
        child.relay.start()
        try:
            ready = _wait_ready(read_fd, proc, START_TIMEOUT_S, self._stop)
        finally:
            os.close(read_fd)
        if ready is False:  # the pipe closed: the child is exiting
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT_S)
        if ready:
            log.info(
                "role %s %s (pid %d)", child.role, "started" if initial else "restarted", proc.pid
            )
            return
        if self._stop.is_set():
            return
        if proc.poll() is None:
            self._terminate(child)
            raise RoleStartError(f"role {child.role} did not start within {START_TIMEOUT_S:.0f} s")
        if child.relay is not None:
            child.relay.join(5)
        child.proc = None
        last = telling_line(child.tail)
        if initial:
            # The child printed its own one-line error; say which role it was.
            raise RoleStartError(
                f"role {child.role} {exit_reason(proc.returncode)} while starting"
                + (f": {last}" if last and "error:" not in last else "")
            )
        raise RoleStartError(
            f"role {child.role} {exit_reason(proc.returncode)} while restarting"
            + (f": {last}" if last else "")
        )

    def _terminate(self, child: Child) -> None:
        proc = child.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("role %s did not stop in %.0f s: killing it", child.role, STOP_TIMEOUT_S)
                proc.kill()
                proc.wait()
        if child.relay is not None:
            child.relay.join(5)
        if proc.returncode != 0:
            log.warning("role %s %s while stopping", child.role, exit_reason(proc.returncode))
        child.proc = None


#: Lines that say why a process ended, best first: Python's fatal error (faulthandler),
#: then our own one-line error, then a logged error.
_TELLING = ("Fatal Python error", "pacs-classifier: error:", " CRITICAL ", " ERROR ")


def telling_line(tail: Sequence[str]) -> str:
    """The line of a child's last output that best says why it ended ('' if none)."""
    for marker in _TELLING:
        for line in reversed(tail):
            if marker in line:
                return line.strip()
    return next((line.strip() for line in reversed(tail) if line.strip()), "")


def _relay(stream: IO[bytes], tail: collections.deque[str]) -> None:
    """Copy a child's stderr to ours line by line, keeping the last lines; a telling line
    is kept however many lines follow it (a fatal error's thread stacks can be long)."""
    out = sys.stderr.buffer
    telling = ""
    for line in iter(stream.readline, b""):
        try:
            out.write(line)
            out.flush()
        except (OSError, ValueError):
            pass
        text = line.decode("utf-8", "replace").rstrip()
        if any(marker in text for marker in _TELLING):
            telling = text
        tail.append(text)
    if telling and telling not in tail:
        tail.appendleft(telling)
    stream.close()


def _wait_ready(
    read_fd: int, proc: subprocess.Popen[bytes], timeout_s: float, stop: threading.Event
) -> bool | None:
    """True once the child wrote ``ready``; False once it exited (or closed the pipe
    without a word); None when it timed out or the supervisor is stopping."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        readable, _, _ = select.select([read_fd], [], [], 0.2)
        if readable:
            return os.read(read_fd, 16).startswith(b"ready")  # b"": it is exiting
        if proc.poll() is not None:
            return False
    return None


# --------------------------------------------------------------------------- the child side


def as_supervised_child() -> bool:
    """In a role started by the supervisor: die with it. True when supervised."""
    parent = os.environ.get(SUPERVISOR_ENV)
    if not parent:
        return False
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(parent):  # it died before the line above
        os._exit(EXIT_GAVE_UP)
    import faulthandler

    # A codec's segfault or abort leaves the Python stack of every thread in the log.
    faulthandler.enable()
    return True


def report_ready() -> None:
    """Tell the supervisor this process's roles have started."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return
    try:
        os.write(int(fd), b"ready\n")
        os.close(int(fd))
    except OSError:
        pass


def supervisor_gone() -> bool:
    """True when this child's supervisor is no longer its parent."""
    parent = os.environ.get(SUPERVISOR_ENV)
    return bool(parent) and os.getppid() != int(parent or 0)


def default_config_path(config: str | None) -> str | None:
    """The ``--config`` a child gets: absolute, as the children may resolve it later."""
    return str(Path(config).resolve()) if config else None
