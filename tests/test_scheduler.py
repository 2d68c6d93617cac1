"""The nightly job on both databases: once on time, one leader, a missed run caught up once."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pipeline_support import (
    Bundles,
    add_instances,
    all_jobs_ended,
    drain_jobs,
    make_config,
    wait_for,
)
from sqlalchemy import select

from pacs_classifier.config import Config
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import Model, Prediction, ReclassificationRun, RunState, RunTrigger
from pacs_classifier.model.registry import activate_version, register_bundle
from pacs_classifier.reclassify import run_finished
from pacs_classifier.scheduler import NightlyScheduler, build_trigger
from pacs_classifier.wiring import App

CHEST = "chest_cr_mono1_10bit_no_file_meta.dcm"


def _cron_in(seconds: float) -> tuple[str, datetime]:
    """A 6-field cron that fires once a minute, ``seconds`` from now (and its time)."""
    at = (datetime.now(UTC) + timedelta(seconds=seconds)).replace(microsecond=0)
    return f"{at.second} * * * * *", at


def _runs(db: Database) -> list[ReclassificationRun]:
    with db.session() as s:
        return list(
            s.execute(select(ReclassificationRun).order_by(ReclassificationRun.id)).scalars()
        )


def _scheduler(config: Config, holder: str) -> tuple[NightlyScheduler, Database]:
    db = Database(config.database_url)  # its own engine, as another process would have
    return NightlyScheduler(db, config.scheduler, holder=holder, renew_seconds=0.3), db


def test_cron_accepts_seconds_first_and_five_fields() -> None:
    assert "second='7'" in str(build_trigger("7 * * * * *", "UTC"))
    assert "hour='2'" in str(build_trigger("0 2 * * *", "Europe/Paris"))


def test_nightly_run_happens_once_with_one_leader(
    database: Database, tmp_path: Path, dicom_dir: Path, tiny_bundles: Bundles
) -> None:
    config = make_config(tmp_path, database.url)
    register_bundle(database, tiny_bundles.v1, config.model_dir, actor="test", activate=True)
    register_bundle(database, tiny_bundles.v2, config.model_dir, actor="test")
    instances = add_instances(database, [dicom_dir / CHEST] * 3)
    drain_jobs(config)
    activate_version(database, "tiny-v2", actor="test")

    cron, at = _cron_in(3)
    config = replace(config, scheduler=replace(config.scheduler, reclassify_cron=cron))
    first, db1 = _scheduler(config, "host-a:1")
    second, db2 = _scheduler(config, "host-b:2")
    try:
        first.start()
        assert first.is_leader.wait(10)
        second.start()
        wait_for(lambda: len(_runs(database)) >= 1, 30, "the scheduled run")
        time.sleep(1.5)  # a second firing would show up by now
        assert not second.is_leader.is_set()
    finally:
        first.stop()
        second.stop()
        db1.dispose()
        db2.dispose()
    (run,) = _runs(database)
    assert run.trigger == RunTrigger.SCHEDULE
    assert run.started_at >= at - timedelta(seconds=1)
    # The wiring's worker closes the run when its last job ends: nothing polls for it.
    with App(config) as app:
        app.worker().drain(
            until=lambda: run_finished(database, run.id) and all_jobs_ended(database),
            timeout_s=120,
        )
    with database.session() as s:
        v2 = s.execute(select(Model).where(Model.version == "tiny-v2")).scalar_one()
        appended = list(s.execute(select(Prediction).where(Prediction.run_id == run.id)).scalars())
        closed = s.get(ReclassificationRun, run.id, populate_existing=True)
    assert closed is not None
    assert sorted(p.instance_id for p in appended) == instances
    assert {p.model_id for p in appended} == {v2.id}
    assert (closed.state, closed.model_id, closed.instances_total, closed.instances_done) == (
        RunState.DONE,
        v2.id,
        3,
        3,
    )
    assert closed.labels_changed == 3  # v1 said NORMAL to all, v2 says PNEUMONIA


def test_missed_run_is_caught_up_once_after_restart(
    database: Database, tmp_path: Path, tiny_bundles: Bundles
) -> None:
    cron, at = _cron_in(3)
    config = make_config(tmp_path, database.url, scheduler={"reclassify_cron": cron})
    register_bundle(database, tiny_bundles.v1, config.model_dir, actor="test", activate=True)
    before, db1 = _scheduler(config, "host-a:1")
    before.start()
    assert before.is_leader.wait(10)
    before.stop()  # the daemon goes down before the run is due
    db1.dispose()
    wait_for(lambda: datetime.now(UTC) > at + timedelta(seconds=1.5), 10, "the missed time")
    assert _runs(database) == []

    after, db2 = _scheduler(config, "host-a:3")
    try:
        after.start()
        wait_for(lambda: len(_runs(database)) >= 1, 15, "the caught-up run")
        time.sleep(1.0)
    finally:
        after.stop()
        db2.dispose()
    (run,) = _runs(database)
    assert run.trigger == RunTrigger.SCHEDULE
    assert run.state == RunState.DONE and run.instances_total == 0  # nothing assessed yet


def test_two_serve_processes_run_the_nightly_job_once(
    pg_url: str, tmp_path: Path, tiny_bundles: Bundles
) -> None:
    """Two real ``serve --roles scheduler`` processes on PostgreSQL: one run, not two."""
    import signal

    from pipeline_support import start_cli, write_config_file

    db = Database(pg_url)
    config = make_config(tmp_path, pg_url)
    register_bundle(db, tiny_bundles.v1, config.model_dir, actor="test", activate=True)
    # Far enough ahead for both processes to start (TensorFlow is not imported by them).
    cron, at = _cron_in(12)
    config = replace(config, scheduler=replace(config.scheduler, reclassify_cron=cron))
    cfg = write_config_file(tmp_path / "config.toml", config)
    procs = [
        start_cli(cfg, "serve", "--roles", "scheduler", log=tmp_path / f"serve{i}.log")
        for i in range(2)
    ]
    try:
        wait_for(lambda: len(_runs(db)) >= 1, timeout_s=60, what="the nightly run")
        # past the fire time, long enough for a second leader to have fired too
        time.sleep(max(0.0, (at - datetime.now(UTC)).total_seconds()) + 3)
        runs = _runs(db)
        assert len(runs) == 1
        assert runs[0].trigger == RunTrigger.SCHEDULE
        assert all(p.poll() is None for p in procs), "a scheduler process died"
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(60) for p in procs]
        db.dispose()
    assert codes == [0, 0], [(tmp_path / f"serve{i}.log").read_text()[-2000:] for i in range(2)]
