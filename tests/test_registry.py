"""The model registry: register, activate, refuse corrupt bundles, audit each change."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pipeline_support import Bundles
from sqlalchemy import func, select

from pacs_classifier.db.audit import verify_chain
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import AuditEvent, Model
from pacs_classifier.errors import ModelError
from pacs_classifier.model.registry import (
    activate_version,
    active_model,
    list_models,
    register_bundle,
)
from pacs_classifier.model.runtime import load_predictor

ACTOR = "cli:test"


def _corrupt(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle, dest)
    weights = dest / "weights.npz"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    return dest


def test_register_activate_and_audit(
    database: Database, tiny_bundles: Bundles, tmp_path: Path
) -> None:
    model_dir = tmp_path / "models"
    v1 = register_bundle(database, tiny_bundles.v1, model_dir, actor=ACTOR, activate=True)
    v2 = register_bundle(database, tiny_bundles.v2, model_dir, actor=ACTOR)
    assert Path(v1.path) == model_dir / "tiny-v1"
    with database.session() as s:
        assert [m.version for m in list_models(s)] == ["tiny-v1", "tiny-v2"]
        active = active_model(s)
        assert active is not None
        assert active.version == "tiny-v1"
    activate_version(database, "tiny-v2", actor=ACTOR)
    with database.session() as s:
        assert s.scalar(select(func.count()).where(Model.active.is_(True))) == 1
        active = active_model(s)
        assert active is not None
        assert active.id == v2.id
        actions = s.scalars(select(AuditEvent.action).order_by(AuditEvent.id)).all()
        assert actions == ["model.register", "model.activate", "model.register", "model.activate"]
        assert verify_chain(s).ok
    # registering the same bundle again is a no-op, not a second row
    again = register_bundle(database, tiny_bundles.v2, model_dir, actor=ACTOR)
    assert again.id == v2.id


def test_registered_bundle_predicts_exactly_as_the_source(
    sqlite_url: str, tiny_bundles: Bundles, tmp_path: Path
) -> None:
    db = Database(sqlite_url)
    row = register_bundle(db, tiny_bundles.v1, tmp_path / "models", actor=ACTOR)
    db.dispose()
    rng = np.random.default_rng(0)
    batch = rng.uniform(-1, 1, (4, 75, 75, 3)).astype(np.float32)
    source = load_predictor(tiny_bundles.v1).predict(batch)
    served = load_predictor(row.path).predict(batch)
    np.testing.assert_array_equal(source, served)
    assert np.all((served >= 0) & (served <= 1))


def test_corrupt_bundle_is_refused_and_nothing_changes(
    database: Database, tiny_bundles: Bundles, tmp_path: Path
) -> None:
    model_dir = tmp_path / "models"
    register_bundle(database, tiny_bundles.v1, model_dir, actor=ACTOR, activate=True)
    bad = _corrupt(tiny_bundles.v2, tmp_path / "bad")
    with pytest.raises(ModelError, match="does not match"):
        register_bundle(database, bad, model_dir, actor=ACTOR, activate=True)
    assert sorted(p.name for p in model_dir.iterdir()) == ["tiny-v1"]
    with database.session() as s:
        assert [m.version for m in list_models(s)] == ["tiny-v1"]
        active = active_model(s)
        assert active is not None
        assert active.version == "tiny-v1"


def test_activating_a_bundle_altered_on_disk_keeps_the_active_model(
    database: Database, tiny_bundles: Bundles, tmp_path: Path
) -> None:
    model_dir = tmp_path / "models"
    register_bundle(database, tiny_bundles.v1, model_dir, actor=ACTOR, activate=True)
    v2 = register_bundle(database, tiny_bundles.v2, model_dir, actor=ACTOR)
    (Path(v2.path) / "model.json").write_text("{}")
    with pytest.raises(ModelError, match=r"model\.json"):
        activate_version(database, "tiny-v2", actor=ACTOR)
    with database.session() as s:
        active = active_model(s)
        assert active is not None
        assert active.version == "tiny-v1"


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pacs_classifier", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_model_cli(tmp_path: Path, tiny_bundles: Bundles) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[database]\nurl = "sqlite:///db.sqlite3"\n[model]\ndir = "models"\n')
    assert _cli(config, "db", "upgrade").returncode == 0
    proc = _cli(config, "model", "register", str(tiny_bundles.v1), "--activate", "--no-export")
    assert proc.returncode == 0, proc.stderr
    assert "tiny-v1 active" in proc.stdout
    assert _cli(config, "model", "register", str(tiny_bundles.v2), "--no-export").returncode == 0
    listing = _cli(config, "model", "list").stdout.splitlines()
    assert listing[0].split()[:2] == ["version", "threshold"]
    assert listing[1].startswith("*") and "tiny-v1" in listing[1]
    assert "tiny-v2" in listing[2] and not listing[2].startswith("*")
    proc = _cli(config, "model", "activate", "tiny-v2")
    assert proc.returncode == 0 and "tiny-v2 is now active" in proc.stdout
    proc = _cli(config, "model", "activate", "nope")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "pacs-classifier: error: no registered model with version 'nope'"
    bad = _corrupt(tiny_bundles.v1, tmp_path / "bad")
    (bad / "metadata.json").write_text(
        (bad / "metadata.json").read_text().replace("tiny-v1", "tiny-v3")
    )
    proc = _cli(config, "model", "register", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "does not match" in proc.stderr
    assert (tmp_path / "models" / "tiny-v3").exists() is False
    # a foreign metadata.json: one line naming the key, nothing registered
    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_bundles.v1, foreign)
    meta = json.loads((foreign / "metadata.json").read_text())
    meta["version"], meta["threshold"] = "tiny-v4", {"value": "high"}
    (foreign / "metadata.json").write_text(json.dumps(meta))
    proc = _cli(config, "model", "register", str(foreign), "--no-export")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "threshold.value: expected a number, received 'high'" in proc.stderr
    assert "tiny-v4" not in _cli(config, "model", "list").stdout
    # a dataset root for the parity check that is not there: one line, before any work
    proc = _cli(config, "model", "register", str(foreign), "--data", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"--data {tmp_path / 'nowhere'}: not a folder")
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text(config.read_text() + 'data_root = "nowhere"\n')  # under [model]
    proc = _cli(elsewhere, "model", "register", str(foreign))
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"model.data_root {tmp_path / 'nowhere'}: not a folder")
