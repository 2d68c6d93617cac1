"""The job queue on both databases: claims, leases, retries, release, concurrency."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

from pipeline_support import add_instances
from sqlalchemy import select

from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import AuditEvent, Job, JobState, utcnow
from pacs_classifier.queue.jobs import JobQueue, QueuePolicy


def _file(tmp_path: Path) -> Path:
    f = tmp_path / "x.dcm"
    f.write_bytes(b"not read by the queue")
    return f


def _jobs(db: Database) -> dict[int, Job]:
    with db.session() as s:
        return {j.id: j for j in s.execute(select(Job)).scalars()}


def test_claim_leases_a_batch_oldest_first_and_never_twice(
    database: Database, tmp_path: Path
) -> None:
    add_instances(database, [_file(tmp_path)] * 5)
    q = JobQueue(database, QueuePolicy(lease_seconds=60), worker_id="a:1")
    first = q.claim(3)
    second = JobQueue(database, QueuePolicy(), worker_id="b:2").claim(3)
    assert [j.attempts for j in first] == [1, 1, 1]
    assert len(second) == 2
    assert [j.id for j in first] == sorted(j.id for j in first)
    assert not {j.id for j in first} & {j.id for j in second}
    assert q.claim(3) == []
    jobs = _jobs(database)
    held = jobs[first[0].id]
    assert held.state == JobState.RUNNING
    assert held.worker_id == "a:1"
    assert held.lease_until is not None and held.lease_until > utcnow() + timedelta(seconds=50)


def test_retryable_failure_backs_off_then_fails_after_max_attempts(
    database: Database, tmp_path: Path
) -> None:
    (instance_id,) = add_instances(database, [_file(tmp_path)])
    q = JobQueue(database, QueuePolicy(max_attempts=2, retry_backoff_s=0.3), worker_id="a:1")
    (job,) = q.claim(1)
    (outcome,) = q.fail([(job, "DatabaseUnavailable: gone", True)])
    assert outcome.state == JobState.QUEUED
    assert q.claim(1) == []  # not before the backoff
    time.sleep(0.4)
    (again,) = q.claim(1)
    assert again.attempts == 2
    (outcome,) = q.fail([(again, "DatabaseUnavailable: gone", True)])
    assert outcome.state == JobState.FAILED
    row = _jobs(database)[job.id]
    assert (row.state, row.reason) == (JobState.FAILED, "DatabaseUnavailable: gone")
    with database.session() as s:
        outcomes = list(
            s.execute(
                select(AuditEvent.outcome)
                .where(
                    AuditEvent.action == "job.classify", AuditEvent.entity_id == str(instance_id)
                )
                .order_by(AuditEvent.id)
            ).scalars()
        )
    assert outcomes == ["retry", "failed"]


def test_permanent_failure_and_not_assessed_end_at_once(database: Database, tmp_path: Path) -> None:
    add_instances(database, [_file(tmp_path)] * 2)
    q = JobQueue(database, QueuePolicy(max_attempts=5), worker_id="a:1")
    a, b = q.claim(2)
    q.fail([(a, "ModelError: corrupt", False)])
    q.mark_not_assessed([(b, "body_part")])
    jobs = _jobs(database)
    assert (jobs[a.id].state, jobs[a.id].attempts) == (JobState.FAILED, 1)
    assert (jobs[b.id].state, jobs[b.id].reason) == (JobState.NOT_ASSESSED, "body_part")


def test_release_requeues_without_counting_the_claim(database: Database, tmp_path: Path) -> None:
    add_instances(database, [_file(tmp_path)] * 2)
    q = JobQueue(database, QueuePolicy(), worker_id="a:1")
    claimed = q.claim(2)
    assert q.release(claimed) == 2
    jobs = _jobs(database)
    assert {(j.state, j.attempts, j.worker_id) for j in jobs.values()} == {
        (JobState.QUEUED, 0, None)
    }
    assert len(q.claim(5)) == 2


def test_expired_lease_is_reclaimed_and_lost_lease_cannot_finish(
    database: Database, tmp_path: Path
) -> None:
    add_instances(database, [_file(tmp_path)])
    dead = JobQueue(database, QueuePolicy(lease_seconds=0.2), worker_id="gone:1")
    (job,) = dead.claim(1)
    time.sleep(0.3)
    alive = JobQueue(database, QueuePolicy(), worker_id="b:2")
    (again,) = alive.claim(1)
    assert again.id == job.id and again.attempts == 2
    dead.mark_not_assessed([(job, "modality")])  # too late: b holds it now
    row = _jobs(database)[job.id]
    assert (row.state, row.worker_id) == (JobState.RUNNING, "b:2")


def test_jobs_of_a_dead_local_process_are_reclaimed_at_once(
    database: Database, tmp_path: Path
) -> None:
    import socket
    import subprocess
    import sys

    add_instances(database, [_file(tmp_path)])
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_id = f"{socket.gethostname()}:{int(proc.stdout)}"
    JobQueue(database, QueuePolicy(lease_seconds=600), worker_id=dead_id).claim(1)
    me = JobQueue(database, QueuePolicy(lease_seconds=600))
    assert me.reclaim_dead_local() == 1
    assert len(me.claim(1)) == 1


def test_concurrent_claimers_share_jobs_without_overlap(database: Database, tmp_path: Path) -> None:
    add_instances(database, [_file(tmp_path)] * 120)
    got: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        q = JobQueue(database, QueuePolicy(), worker_id=name)
        mine: list[int] = []
        try:
            while batch := q.claim(7):
                mine += [j.id for j in batch]
                q.mark_not_assessed([(j, "modality") for j in batch])
        except BaseException as exc:
            errors.append(exc)
        got[name] = mine

    threads = [threading.Thread(target=work, args=(f"w:{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    every = [i for ids in got.values() for i in ids]
    assert len(every) == 120 == len(set(every))


_CLAIMER = """
import sys, time
from pacs_classifier.db.engine import Database
from pacs_classifier.queue.jobs import JobQueue, QueuePolicy
from pacs_classifier.queue.liveness import WorkerLocks
from pathlib import Path
locks = WorkerLocks(Path(sys.argv[2]))
q = JobQueue(Database(sys.argv[1]), QueuePolicy(lease_seconds=600), locks=locks)
locks.hold(q.worker_id)
print(len(q.claim(1)), flush=True)
time.sleep(600)
"""


def test_jobs_of_a_killed_worker_are_reclaimed_while_it_is_still_a_zombie(
    db_url: str, database: Database, tmp_path: Path
) -> None:
    """kill -9, not reaped yet (its PID still answers): its lock is gone, so are its leases."""
    import os
    import signal
    import subprocess
    import sys

    from pacs_classifier.queue.liveness import WorkerLocks

    add_instances(database, [_file(tmp_path)])
    locks_dir = tmp_path / ".workers"
    child = subprocess.Popen(
        [sys.executable, "-c", _CLAIMER, db_url, str(locks_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "1"
        me = JobQueue(database, QueuePolicy(lease_seconds=600), locks=WorkerLocks(locks_dir))
        assert me.reclaim_dead_local() == 0  # alive: its lease is respected
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while not Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1].startswith("Z"):
            assert time.monotonic() < deadline, "the child did not die"
            time.sleep(0.01)
        os.kill(child.pid, 0)  # a zombie: the PID still looks alive
        assert me.reclaim_dead_local() == 1
        assert len(me.claim(1)) == 1
        assert list(locks_dir.iterdir()) == []  # the dead worker's lock file is gone too
    finally:
        child.kill()
        child.wait()


def test_a_reused_pid_is_not_taken_for_the_worker_that_had_it(
    database: Database, tmp_path: Path
) -> None:
    """A holder whose PID is alive (ours, here) but whose lock is free is gone."""
    import os
    import socket

    from pacs_classifier.queue.liveness import WorkerLocks

    add_instances(database, [_file(tmp_path)])
    locks = WorkerLocks(tmp_path / ".workers")
    old_id = f"{socket.gethostname()}:{os.getpid()}:0ld0ne"
    old = WorkerLocks(tmp_path / ".workers")
    old.hold(old_id)
    JobQueue(database, QueuePolicy(lease_seconds=600), worker_id=old_id).claim(1)
    me = JobQueue(database, QueuePolicy(lease_seconds=600), locks=locks)
    assert me.reclaim_dead_local() == 0
    os.close(old._fd)  # type: ignore[arg-type]  # the process "dies" without cleaning up
    assert me.reclaim_dead_local() == 1
