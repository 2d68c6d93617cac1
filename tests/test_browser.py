"""The dashboard in real headless Chromium, against a real daemon fed over C-STORE.

``serve --roles listener,worker,web`` runs as a subprocess with the committed reference
model; dcmtk's storescu sends two chest radiographs with fresh accession numbers; once the
worker has classified them, Chromium (driven by Selenium through Debian's chromedriver)
is refused without a session, refused with a wrong password, logs in, finds the accession
on the worklist, opens the study and sees the label, the probability and the image as
classified. With ``PACS_CLASSIFIER_SCREENSHOTS=DIR`` the worklist and study screenshots
are also written to DIR (how ``docs/dashboard-*.png`` are made).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import missing
from pipeline_support import REPO, make_config, subprocess_env, wait_for, write_config_file
from pydicom.uid import generate_uid
from sqlalchemy import select
from web_support import (
    PASSWORD,
    cheap_password_hashes,
    make_user,
    register_reference,
    wait_http,
)

from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import (
    AuditEvent,
    Instance,
    Job,
    ResultKind,
    ResultObject,
    UserRole,
)
from pacs_classifier.queue.jobs import TERMINAL_STATES
from pacs_classifier.report.results import ResultQuery, ResultRow, find_results
from pacs_classifier.results.render import RESULTS_DIR
from pacs_classifier.web.images import classified_png

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FILES = ("chest_dx_mono2_8bit_implicit_le.dcm", "chest_cr_mono1_15bit_explicit_le.dcm")
SHOTS_ENV = "PACS_CLASSIFIER_SCREENSHOTS"


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    driver_path = shutil.which("chromedriver") or (
        CHROMEDRIVER if Path(CHROMEDRIVER).exists() else None
    )
    if chromium is None or driver_path is None:
        missing("chromium and chromium-driver are not installed")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium is not installed (the dev extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(driver_path)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _with_accession(src: Path, out: Path, accession: str) -> Path:
    """A copy of a shared file as a new instance of a new study with ``accession``."""
    ds = pydicom.dcmread(src)
    ds.AccessionNumber = accession
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out, enforce_file_format=True)
    return out


def _shot(driver: Any, tmp_path: Path, name: str) -> None:
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(tmp_path / name))
    folder = os.environ.get(SHOTS_ENV)
    if folder:
        shutil.copyfile(tmp_path / name, Path(folder) / name)


def test_log_in_find_the_accession_just_sent_and_see_its_result(
    browser: Any,
    sqlite_url: str,
    tmp_path: Path,
    dicom_dir: Path,
    dcmtk: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    cheap_password_hashes(monkeypatch)
    # Every result is planned an overlay; no sender runs, so its PNG is placed below.
    config = make_config(tmp_path, sqlite_url, results={"sc_overlay": "all"})
    db = Database(sqlite_url)
    register_reference(db, config.model_dir)
    make_user(db, "rad1", UserRole.VIEWER)
    cfg = write_config_file(tmp_path / "config.toml", config)
    accessions = [f"A{uuid.uuid4().hex[:10].upper()}" for _ in FILES]
    files = [
        _with_accession(dicom_dir / name, tmp_path / f"{acc}.dcm", acc)
        for name, acc in zip(FILES, accessions, strict=True)
    ]
    env = subprocess_env()
    env["PACS_CLASSIFIER_WEB_SECRET"] = "browser test"  # noqa: S105
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pacs_classifier",
            "--config",
            str(cfg),
            "serve",
            "--roles",
            "listener,worker,web",
        ],
        cwd=REPO,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{config.web.port}"
    try:
        wait_http(f"{base}/health/ready", 200, 120)
        subprocess.run(
            [
                "storescu",
                "-aet",
                "MODALITY1",
                "-aec",
                config.listener.ae_title,
                "127.0.0.1",
                str(config.listener.port),
                *map(str, files),
            ],
            check=True,
            capture_output=True,
            timeout=60,
            env={**env, "TCP_NODELAY": "1"},
        )

        def classified() -> list[ResultRow]:
            with db.read_session() as s:
                rows = find_results(s, ResultQuery(limit=10))
            return [r for r in rows if r.label is not None]

        # Both jobs end; the reference model's OOD check may refuse the second file (its
        # score sits at the threshold), which the worklist then shows unclassified.
        wait_for(
            lambda: _jobs_ended(db, len(FILES)) and len(classified()) >= 1, 240, "both jobs ended"
        )
        (result,) = [r for r in classified() if r.accession_number == accessions[0]]
        # The overlay as the sender leaves it beside its Secondary Capture (results/render.py).
        with db.read_session() as s:
            sc = s.execute(
                select(ResultObject)
                .join(Instance, Instance.id == ResultObject.instance_id)
                .where(
                    Instance.accession_number == accessions[0],
                    ResultObject.kind == ResultKind.SC,
                )
            ).scalar_one()
            overlay = config.storage_root.joinpath(
                RESULTS_DIR,
                sc.study_instance_uid,
                sc.series_instance_uid,
                f"{sc.sop_instance_uid}.png",
            )
        overlay.parent.mkdir(parents=True)
        overlay.write_bytes(classified_png(dicom_dir / FILES[0], 128))

        # Without a session: the login page, whatever was asked for.
        browser.get(f"{base}/queue")
        assert "/login?next=%2Fqueue" in browser.current_url
        browser.find_element(By.ID, "username").send_keys("rad1")
        browser.find_element(By.ID, "password").send_keys("not my password")
        browser.find_element(By.ID, "login").click()
        error = WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "error"))
        assert "Wrong user name or password" in error.text
        with db.read_session() as s:
            refused = s.execute(
                select(AuditEvent).where(
                    AuditEvent.action == "web.login", AuditEvent.outcome == "refused"
                )
            ).scalar_one()
        assert refused.actor == "web:rad1" and refused.detail["reason"] == "wrong password"

        for field, value in (("username", "rad1"), ("password", PASSWORD)):
            element = browser.find_element(By.ID, field)
            element.clear()  # the refused attempt may have left its text there
            element.send_keys(value)
        browser.find_element(By.ID, "login").click()
        # The click returns when the form is sent, not when the redirect has landed.
        WebDriverWait(browser, 30).until(lambda b: b.current_url == f"{base}/queue")

        browser.get(f"{base}/")
        assert all(a in browser.page_source for a in accessions)
        _shot(browser, tmp_path, "dashboard-worklist.png")
        browser.find_element(By.ID, "q").send_keys(accessions[0])
        browser.find_element(By.ID, "find").click()
        rows = browser.find_elements(By.CSS_SELECTOR, "#results tbody tr")
        assert len(rows) == 1 and accessions[1] not in browser.page_source
        rows[0].find_element(By.CSS_SELECTOR, "a.study-link").click()

        assert f"/studies/{result.study_instance_uid}" in browser.current_url
        label = browser.find_element(By.CSS_SELECTOR, '[data-field="label"]').text
        probability = browser.find_element(By.CSS_SELECTOR, '[data-field="probability"]').text
        version = browser.find_element(By.CSS_SELECTOR, '[data-field="model_version"]').text
        assert label == result.label
        assert probability == f"{result.probability:.3f}"
        assert version == result.model_version
        image = browser.find_element(By.CSS_SELECTOR, "img.classified")
        width = browser.execute_script(
            "return arguments[0].complete ? arguments[0].naturalWidth : 0", image
        )
        assert width == result.image_size
        shown = browser.find_element(By.CSS_SELECTOR, "img.overlay")
        overlay_width = browser.execute_script(
            "return arguments[0].complete ? arguments[0].naturalWidth : 0", shown
        )
        assert overlay_width == 128
        _shot(browser, tmp_path, "dashboard-study.png")

        with db.read_session() as s:
            instance_id = s.execute(
                select(Instance.id).where(Instance.accession_number == accessions[0])
            ).scalar_one()
            views = (
                s.execute(
                    select(AuditEvent.detail).where(
                        AuditEvent.action == "result.view",
                        AuditEvent.actor == "web:rad1",
                        AuditEvent.entity_id == str(instance_id),
                    )
                )
                .scalars()
                .all()
            )
        assert sorted(d["via"] for d in views) == ["image", "overlay", "study_page"]
    finally:
        db.dispose()
        proc.terminate()
        try:
            code = proc.wait(180)  # the worker's and web's graceful stops, on a busy machine
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
            pytest.fail(f"serve did not stop on SIGTERM:\n{log.read_text()[-4000:]}")
    assert code == 0, log.read_text()


def _jobs_ended(db: Database, count: int) -> bool:
    with db.read_session() as s:
        states = list(s.execute(select(Job.state)).scalars())
    return len(states) == count and all(state in TERMINAL_STATES for state in states)
