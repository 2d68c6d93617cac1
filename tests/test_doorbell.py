"""The job doorbell: the listener's commit wakes the idle worker, not its next poll.

The database stays the truth (a lost ring only costs a poll), so what is checked here is
that a ring arrives where it should and nowhere else, that a second holder falls back to
polling and takes over later, and that a real C-STORE to a real listener gets its job
ended by a worker whose poll interval and batch wait are both far longer than the wait.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pipeline_support import Bundles, make_config
from sqlalchemy import select
from test_listener import send, small_instance

from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import Job, JobState
from pacs_classifier.model.registry import register_bundle
from pacs_classifier.queue import doorbell
from pacs_classifier.queue.doorbell import Bell, Doorbell, bell_address
from pacs_classifier.wiring import App

pytestmark = pytest.mark.skipif(not doorbell.SUPPORTED, reason="abstract Unix sockets: Linux")


def _address(tmp_path: Path, name: str) -> str:
    return bell_address(f"sqlite:{tmp_path / name}")


def test_a_ring_wakes_the_bell_of_its_own_deployment_only(tmp_path: Path) -> None:
    ours, theirs = Bell(_address(tmp_path, "a.db")), Bell(_address(tmp_path, "b.db"))
    ringer = Doorbell(ours.address)
    try:
        assert not ours.wait(0.01)  # takes the bell; nothing rang yet
        assert not theirs.wait(0.01)
        for _ in range(5):
            ringer.ring()
        assert ours.wait(1.0)
        assert not ours.wait(0.05)  # the five rings were one wake-up, all consumed
        assert not theirs.wait(0.05)
    finally:
        for part in (ours, theirs, ringer):
            part.close()


def test_ringing_with_nobody_listening_is_silent(tmp_path: Path) -> None:
    ringer = Doorbell(_address(tmp_path, "nobody.db"))
    ringer.ring()
    ringer.ring()
    ringer.close()


def test_a_second_holder_polls_then_takes_over(tmp_path: Path) -> None:
    address = _address(tmp_path, "shared.db")
    first, second = Bell(address), Bell(address)
    ringer = Doorbell(address)
    try:
        assert not first.wait(0.01) and first.held()
        started = time.monotonic()
        assert not second.wait(0.1)  # cannot take it: sleeps as the poll did
        assert not second.held()
        assert time.monotonic() - started >= 0.09
        first.close()
        assert not second.wait(0.01) and second.held()
        ringer.ring()
        assert second.wait(1.0)
    finally:
        for part in (first, second, ringer):
            part.close()


def test_a_stored_instance_wakes_the_idle_worker_at_once(
    tmp_path: Path, sqlite_url: str, tiny_bundles: Bundles
) -> None:
    # Poll and batch wait far longer than the bound: only the doorbell, and sending a
    # lone image at once to an idle model, end the job inside it.
    config = make_config(
        tmp_path,
        sqlite_url,
        worker={"poll_interval_ms": 60_000, "max_batch_wait_ms": 60_000, "batch_size": 8},
        listener={"ae_title": "PNEUMONIA_AI"},
    )
    database = Database(sqlite_url)
    register_bundle(database, tiny_bundles.v1, config.model_dir, actor="test", activate=True)
    with App(config) as app:
        listener = app.listener()
        listener.start()
        worker = app.worker(woken=True)
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        try:
            time.sleep(0.5)  # the worker's first claim finds nothing; it waits
            ended: list[float] = []
            for seed in (1, 2):  # the first also loads the model
                started = time.monotonic()
                assert send(config.listener.port, [small_instance(seed=seed)]) == [0]
                deadline = started + 30
                while time.monotonic() < deadline:
                    with database.read_session() as s:
                        states = list(s.execute(select(Job.state)).scalars())
                    if len(states) == seed and not {JobState.QUEUED, JobState.RUNNING} & set(
                        states
                    ):
                        break
                    time.sleep(0.02)
                ended.append(time.monotonic() - started)
            assert max(ended) < 30, f"jobs took {ended} s with a 60 s poll"
        finally:
            stop.set()
            thread.join(timeout=30)
            listener.stop(grace_s=10)
    with database.read_session() as s:
        states = list(s.execute(select(Job.state)).scalars())
    assert len(states) == 2 and not set(states) & {JobState.QUEUED, JobState.RUNNING}
