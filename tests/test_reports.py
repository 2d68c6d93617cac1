"""Every shipped report on both databases, on rows written by the real queue and recorder."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pipeline_support import Bundles, add_instances, cli, make_config, write_config_file

from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import Model
from pacs_classifier.errors import PermanentError
from pacs_classifier.model.registry import register_bundle
from pacs_classifier.queue.jobs import JobQueue, QueuePolicy
from pacs_classifier.record.predictions import ModelRef, record_prediction
from pacs_classifier.report import queries

STUDY = "1.2.826.0.1.3680043.8.498.1"


def _ref(m: Model) -> ModelRef:
    return ModelRef(m.id, m.version, m.threshold, m.image_size)


def _history(db: Database, tmp_path: Path, bundles: Bundles) -> list[int]:
    """Three chest instances classified by v1 then v2, one leg not assessed, one failed."""
    config = make_config(tmp_path, db.url)
    v1 = register_bundle(db, bundles.v1, config.model_dir, actor="test", activate=True)
    v2 = register_bundle(db, bundles.v2, config.model_dir, actor="test")
    f = tmp_path / "x.dcm"
    f.write_bytes(b"x")
    ids = add_instances(db, [f] * 5, study_uid=STUDY)
    q = JobQueue(db, QueuePolicy(max_attempts=1), worker_id="w:1")
    jobs = q.claim(5)
    with db.session() as s:
        for job, p in zip(jobs[:3], (0.2, 0.6, 0.9), strict=True):
            record_prediction(s, instance_id=job.instance_id, model=_ref(v1), probability=p)
            q.mark_done(s, job, {})
    q.mark_not_assessed([(jobs[3], "body_part")])
    q.fail([(jobs[4], "FileNotFoundError: gone", True)])
    with db.session() as s:
        for i, p in zip(ids[:3], (0.3, 0.7, 0.95), strict=True):
            record_prediction(s, instance_id=i, model=_ref(v2), probability=p, run_id=None)
    return ids


def _run(db: Database, name: str, **kw: object) -> list[dict[str, object]]:
    with db.session() as s:
        result = queries.run(s, queries.get(name), **kw)  # type: ignore[arg-type]
    return [dict(zip(result.columns, r, strict=True)) for r in result.rows]


def test_reports_on_both_databases(
    database: Database, tmp_path: Path, tiny_bundles: Bundles
) -> None:
    ids = _history(database, tmp_path, tiny_bundles)
    today = datetime.now(UTC).strftime("%Y-%m-%d")

    (volume,) = _run(database, "daily_volume")
    assert volume == {
        "day": today,
        "received": 5,
        "classified": 3,
        "not_assessed": 1,
        "failed": 1,
        "pneumonia": 3,  # v2's threshold is 0: its labels are all PNEUMONIA
        "positive_rate": 1.0,
    }

    (turn,) = _run(database, "turnaround")
    assert turn["day"] == today and turn["classified"] == 3
    assert 0 <= turn["p50_s"] <= turn["p95_s"] <= turn["max_s"] < 60  # type: ignore[operator]

    changes = _run(database, "label_changes")
    assert [(c["old_model"], c["old_label"], c["new_model"], c["new_label"]) for c in changes] == [
        ("tiny-v1", "NORMAL", "tiny-v2", "PNEUMONIA")
    ] * 3
    assert [c["old_probability"] for c in changes] == [0.2, 0.6, 0.9]

    unclassified = [(r["state"], r["reason"], r["jobs"]) for r in _run(database, "unclassified")]
    assert unclassified == [
        ("failed", "FileNotFoundError: gone", 1),
        ("not_assessed", "body_part", 1),
    ]

    trail = _run(database, "audit_trail", study=STUDY)
    outcomes = {(r["instance_id"], r["action"], r["outcome"]) for r in trail}
    assert {(str(i), "job.classify", "done") for i in ids[:3]} <= outcomes
    assert (str(ids[3]), "job.classify", "not_assessed") in outcomes
    assert (str(ids[4]), "job.classify", "failed") in outcomes
    assert [r["id"] for r in trail] == sorted(r["id"] for r in trail)  # type: ignore[type-var]

    yesterday = datetime.now(UTC) - timedelta(days=1)
    for name in ("daily_volume", "turnaround", "label_changes", "unclassified"):
        assert _run(database, name, until=yesterday) == []
        assert _run(database, name, since=yesterday) != []
    with pytest.raises(Exception, match="--study"):
        _run(database, "audit_trail")


def test_report_command_lists_and_formats(
    sqlite_url: str, tmp_path: Path, tiny_bundles: Bundles
) -> None:
    db = Database(sqlite_url)
    try:
        _history(db, tmp_path, tiny_bundles)
    finally:
        db.dispose()
    cfg = write_config_file(tmp_path / "config.toml", make_config(tmp_path, sqlite_url))
    listing = cli(cfg, "report")
    assert listing.returncode == 0, listing.stderr
    names = [line.split()[0] for line in listing.stdout.splitlines()]
    assert names == [*sorted(queries.available()), "drift"]
    as_json = cli(cfg, "report", "label_changes", "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    assert [r["new_label"] for r in json.loads(as_json.stdout)] == ["PNEUMONIA"] * 3
    as_csv = cli(cfg, "report", "unclassified", "--format", "csv", "--since", "2000-01-01")
    assert as_csv.stdout.splitlines()[0] == "state,reason,jobs,first_at,last_at"
    assert len(as_csv.stdout.splitlines()) == 3
    table = cli(cfg, "report", "daily_volume")
    assert table.stdout.splitlines()[0].split() == [
        "day",
        "received",
        "classified",
        "not_assessed",
        "failed",
        "pneumonia",
        "positive_rate",
    ]
    bad = cli(cfg, "report", "nope")
    assert bad.returncode == 2 and "no report named 'nope'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_docs_show_every_report_with_its_sql() -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "reports.md").read_text("utf-8")
    for report in queries.available().values():
        assert f"## `{report.name}`" in docs
        assert report.sql in docs, f"docs/reports.md has an outdated copy of {report.name}"


def test_results_report_keeps_one_label_on_both_databases(
    database: Database, tmp_path: Path, tiny_bundles: Bundles
) -> None:
    _history(database, tmp_path, tiny_bundles)
    every = _run(database, "results")
    assert [r["accession_number"] for r in every] == ["ACC00000", "ACC00001", "ACC00002"]
    assert [r["patient_id"] for r in every] == ["PID00000", "PID00001", "PID00002"]
    assert {(r["label"], r["model_version"], r["study_date"]) for r in every} == {
        ("PNEUMONIA", "tiny-v2", "20240101")
    }
    assert [r["probability"] for r in every] == [0.3, 0.7, 0.95]
    assert len(_run(database, "results", label="PNEUMONIA")) == 3
    assert _run(database, "results", label="NORMAL") == []
    later = datetime.now(UTC) + timedelta(days=1)
    assert _run(database, "results", since=later) == []
    with pytest.raises(PermanentError, match="has no --label"):
        _run(database, "daily_volume", label="NORMAL")
