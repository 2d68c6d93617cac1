"""Reclassification: which instances a run takes, and the CLI end to end."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pipeline_support import (
    Bundles,
    add_instances,
    cli,
    drain_jobs,
    make_config,
    write_config_file,
)
from sqlalchemy import select

from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import (
    AuditEvent,
    Instance,
    Label,
    Model,
    Prediction,
    ReclassificationRun,
    RunState,
    RunTrigger,
)
from pacs_classifier.errors import PermanentError
from pacs_classifier.model.registry import activate_version, register_bundle
from pacs_classifier.reclassify import select_instances, start_run
from pacs_classifier.record.predictions import ModelRef, record_prediction

CHEST = "chest_cr_mono1_10bit_no_file_meta.dcm"


def _ref(m: Model) -> ModelRef:
    return ModelRef(m.id, m.version, m.threshold, m.image_size)


def test_a_run_takes_assessed_instances_not_yet_on_the_active_model(
    database: Database, tmp_path: Path, tiny_bundles: Bundles
) -> None:
    config = make_config(tmp_path, database.url)
    with pytest.raises(PermanentError, match="no active model"):
        start_run(database, trigger=RunTrigger.CLI, actor="test")
    v1 = register_bundle(database, tiny_bundles.v1, config.model_dir, actor="test", activate=True)
    v2 = register_bundle(database, tiny_bundles.v2, config.model_dir, actor="test")
    f = tmp_path / "x.dcm"
    f.write_bytes(b"x")
    on_v1, on_v2, never, busy = (add_instances(database, [f], with_jobs=False)[0] for _ in "abcd")
    add_instances(database, [f])  # a queued job, no prediction: not assessed yet
    with database.session() as s:
        record_prediction(s, instance_id=on_v1, model=_ref(v1), probability=0.4)
        record_prediction(s, instance_id=on_v2, model=_ref(v1), probability=0.4)
        record_prediction(s, instance_id=on_v2, model=_ref(v2), probability=0.4)
        record_prediction(s, instance_id=busy, model=_ref(v1), probability=0.4)
        from pacs_classifier.queue.jobs import enqueue

        enqueue(s, busy)  # already has work pending: left to it
        old = s.get(Instance, on_v1)
        assert old is not None
        old.received_at = datetime.now(UTC) - timedelta(days=3)
    assert never not in (on_v1, on_v2)
    with database.session() as s:
        assert select_instances(s, v2.id) == [on_v1]
        assert select_instances(s, v2.id, all_instances=True) == [on_v1, on_v2]
        yesterday = datetime.now(UTC) - timedelta(days=1)
        assert select_instances(s, v2.id, since=yesterday) == []
        assert select_instances(s, v2.id, until=yesterday) == [on_v1]

    activate_version(database, "tiny-v2", actor="test")
    empty = start_run(database, trigger=RunTrigger.SCHEDULE, actor="test", since=yesterday)
    with database.session() as s:
        run = s.get(ReclassificationRun, empty)
        assert run is not None
        assert (run.state, run.instances_total, run.model_id) == (RunState.DONE, 0, v2.id)


def test_reclassify_command_moves_every_instance_and_counts_changes(
    sqlite_url: str, tmp_path: Path, dicom_dir: Path, tiny_bundles: Bundles
) -> None:
    db = Database(sqlite_url)
    config = make_config(tmp_path, sqlite_url)
    try:
        register_bundle(db, tiny_bundles.v1, config.model_dir, actor="test", activate=True)
        register_bundle(db, tiny_bundles.v2, config.model_dir, actor="test")
        ids = add_instances(db, [dicom_dir / CHEST] * 4)
        drain_jobs(config)
        activate_version(db, "tiny-v2", actor="test")
    finally:
        db.dispose()
    cfg = write_config_file(tmp_path / "config.toml", config)

    done = cli(cfg, "reclassify", timeout_s=180)
    assert done.returncode == 0, done.stderr
    assert "4/4 instance(s) reclassified, 4 label(s) changed" in done.stdout
    again = cli(cfg, "reclassify", timeout_s=180)
    assert again.returncode == 0, again.stderr
    assert "0/0 instance(s) reclassified, 0 label(s) changed" in again.stdout

    db = Database(sqlite_url)
    try:
        with db.session() as s:
            rows = s.execute(
                select(Prediction.instance_id, Model.version, Prediction.label, Prediction.run_id)
                .join(Model, Model.id == Prediction.model_id)
                .order_by(Prediction.id)
            ).all()
            runs = list(s.execute(select(ReclassificationRun)).scalars())
    finally:
        db.dispose()
    assert [(r[0], r[1], r[2]) for r in rows] == [(i, "tiny-v1", Label.NORMAL) for i in ids] + [
        (i, "tiny-v2", Label.PNEUMONIA) for i in ids
    ]
    assert [r.trigger for r in runs] == [RunTrigger.CLI, RunTrigger.CLI]
    assert {r[3] for r in rows[4:]} == {runs[0].id}
    assert (runs[0].labels_changed, runs[0].state) == (4, RunState.DONE)


def _run_state(db: Database, run_id: int) -> tuple[RunState, int]:
    with db.session() as s:
        run = s.get(ReclassificationRun, run_id, populate_existing=True)
        assert run is not None
        return run.state, run.instances_done


def test_a_run_closes_whichever_way_its_last_job_ends(
    database: Database, tmp_path: Path, tiny_bundles: Bundles
) -> None:
    """The queues the wiring builds close a run when its last job ends: by an outcome, or
    by a lease reclaimed from a dead worker; a run left open by a crash is settled."""
    import socket
    import subprocess
    import sys

    from pacs_classifier.queue.jobs import JobQueue, QueuePolicy
    from pacs_classifier.wiring import App

    config = make_config(tmp_path, database.url, worker={"max_attempts": 1})
    v1 = register_bundle(database, tiny_bundles.v1, config.model_dir, actor="test", activate=True)
    register_bundle(database, tiny_bundles.v2, config.model_dir, actor="test")
    f = tmp_path / "x.dcm"
    f.write_bytes(b"x")
    instances = add_instances(database, [f] * 3, with_jobs=False)
    with database.session() as s:
        for i in instances:
            record_prediction(s, instance_id=i, model=_ref(v1), probability=0.4)
    activate_version(database, "tiny-v2", actor="test")
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_worker = f"{socket.gethostname()}:{int(gone.stdout)}"

    with App(config) as app:
        # An outcome: the queue's hook closes the run, no one polls.
        run = start_run(database, trigger=RunTrigger.CLI, actor="test")
        queue = app.job_queue()
        claimed = queue.claim(10, run_id=run)
        assert len(claimed) == 3
        queue.fail([(j, "PermanentError: test", False) for j in claimed[:2]])
        assert _run_state(database, run)[0] == RunState.RUNNING
        queue.fail([(claimed[2], "PermanentError: test", False)])
        assert _run_state(database, run)[0] == RunState.DONE

        # A dead worker's lease, out of attempts: reclaiming ends the job and the run.
        lost = start_run(database, trigger=RunTrigger.CLI, actor="test")
        dead = JobQueue(database, QueuePolicy(max_attempts=1), worker_id=dead_worker)
        assert len(dead.claim(10, run_id=lost)) == 3
        assert app.job_queue().reclaim_dead_local() == 3
        assert _run_state(database, lost)[0] == RunState.DONE

        # Jobs ended by a queue without the hook (a process gone before calling it).
        stale = start_run(database, trigger=RunTrigger.CLI, actor="test")
        unhooked = JobQueue(database, QueuePolicy())
        unhooked.fail([(j, "PermanentError: test", False) for j in unhooked.claim(10)])
        assert _run_state(database, stale)[0] == RunState.RUNNING
        app.runs.settle("test")
        assert _run_state(database, stale)[0] == RunState.DONE
    with database.session() as s:
        closed = s.execute(
            select(AuditEvent.entity_id, AuditEvent.actor).where(
                AuditEvent.action == "reclassify.finish"
            )
        ).all()
    closers = {int(str(e)): actor.split(":")[0] for e, actor in closed}
    assert closers == {run: "worker", lost: "worker", stale: "test"}
