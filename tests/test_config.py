"""Configuration: defaults, overrides, path resolution, and one clear line per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs_classifier.config import Config, load_config
from pacs_classifier.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, body: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
    return path


def _error(path: Path | None, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ or {})
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


def test_shipped_config_toml_holds_exactly_the_defaults() -> None:
    config = load_config(REPO / "config.toml", environ={})
    assert config == Config()
    assert config.base_dir == REPO


def test_missing_default_file_means_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(None, environ={}) == Config()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("[listener]\nprot = 104\n", "listener.prot: unknown key"),
        ("[listner]\nport = 104\n", "listner: unknown key"),
        (
            "[listener]\ntls = { enabled = false, passphrase = 'x' }\n",
            "listener.tls.passphrase: unknown key",
        ),
        ('[listener]\nport = "abc"\n', "listener.port: expected an integer, received 'abc'"),
        ("[listener]\nport = 1.5\n", "listener.port: expected an integer"),
        ("[listener]\nport = true\n", "listener.port: expected an integer"),
        ("[listener]\nport = 70000\n", "listener.port: must be 1-65535"),
        ('[listener]\ntls = { enabled = "yes" }\n', "listener.tls.enabled: expected true or false"),
        (
            '[listener]\nallowed_calling_aets = "A"\n',
            "listener.allowed_calling_aets: expected a list",
        ),
        ("[eligibility]\nmodalities = ['CR', 5]\n", "eligibility.modalities[1]: expected a string"),
        ("[worker]\nretry_backoff_s = 'soon'\n", "worker.retry_backoff_s: expected a number"),
        ("listener = 5\n", "listener: expected a table"),
        ('[model]\nruntime = "tpu"\n', "model.runtime: must be one of"),
        ('[scheduler]\ntimezone = "Mars/Olympus"\n', "scheduler.timezone: unknown time zone"),
        ('[scheduler]\nreclassify_cron = "0 2 * *"\n', "scheduler.reclassify_cron: expected 5"),
        ('[database]\nurl = "mysql://u@h/db"\n', "database.url: only sqlite and postgresql"),
        ('[database]\nurl = "not a url"\n', "database.url: not a database URL"),
        ('[listener]\nae_title = "A_TITLE_LONGER_THAN_16"\n', "listener.ae_title: must be 1-16"),
        (
            '[listener]\ntls = { enabled = true, cert = "no.pem", key = "no.key" }\n',
            "listener.tls.cert: file not found",
        ),
        ('[results]\nsc_overlay = "some"\n', "results.sc_overlay: must be one of off, positives"),
        ("[results]\nretry_backoff_max_s = 1\n", "results.retry_backoff_max_s: must be >="),
        ("[results]\nsr_not_assessed = 1\n", "results.sr_not_assessed: expected true or false"),
        (
            "[results]\nsr = false\nsr_not_assessed = true\n",
            "results.sr_not_assessed: needs results.sr = true",
        ),
        ("[drift]\npsi_alert = -0.1\n", "drift.psi_alert: must be >= 0 (0: off)"),
        ("[drift]\npositive_rate_alert = 1.5\n", "drift.positive_rate_alert: must be 0-1"),
        ("[drift]\nmin_count = 0\n", "drift.min_count: must be >= 1"),
        (
            '[[destinations]]\nae_title = "PACS"\nhost = "h"\nsend = ["pdf"]\n',
            "destinations[0].send",
        ),
        ('[[destinations]]\nae_title = "PACS"\nhost = "h"\nprot = 1\n', "destinations[0].prot"),
        ('[[destinations]]\nae_title = ""\nhost = "h"\n', "destinations[0].ae_title: must be"),
        ('[[destinations]]\nae_title = "P"\n', "destinations[0].host: must not be empty"),
        (
            '[[destinations]]\nae_title = "P"\nhost = "h"\n[[destinations]]\nae_title = "P"\n'
            'host = "i"\n',
            "destinations[1].ae_title: 'P' is listed twice",
        ),
    ],
)
def test_bad_value_names_the_key(tmp_path: Path, body: str, expected: str) -> None:
    assert expected in _error(_write(tmp_path, body))


def test_password_in_the_url_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = _write(tmp_path, '[database]\nurl = "postgresql+psycopg://app:s3cret@db/pacs"\n')
    message = _error(path)
    assert message.startswith("database.url:")
    assert "PACS_CLASSIFIER_DATABASE_PASSWORD" in message
    assert "s3cret" not in message


def test_password_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PACS_CLASSIFIER_DATABASE_PASSWORD", "p@ss")
    path = _write(tmp_path, '[database]\nurl = "postgresql+psycopg://app@db/pacs"\n')
    config = load_config(path, environ={})
    assert config.database.url == "postgresql+psycopg://app@db/pacs"
    assert config.database_url == "postgresql+psycopg://app:p%40ss@db/pacs"


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    message = _error(missing)
    assert str(missing) in message
    assert "not found" in message


def test_missing_file_named_by_environment_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    message = _error(None, {"PACS_CLASSIFIER_CONFIG": str(missing)})
    assert str(missing) in message
    assert "not found" in message


def test_a_folder_is_not_a_config_file(tmp_path: Path) -> None:
    assert "not a file" in _error(tmp_path)


def test_malformed_toml_names_the_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "[listener]\nport = = 5\n")
    message = _error(path)
    assert message.startswith(f"{path}: malformed TOML")
    assert "line 2" in message


def test_undecodable_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"[listener]\nae_title = '\xff\xfe'\n")
    assert str(path) in _error(path)


def test_env_overrides_are_toml_values_or_strings(tmp_path: Path) -> None:
    path = _write(tmp_path, "[listener]\nport = 11112\n")
    config = load_config(
        path,
        environ={
            "PACS_CLASSIFIER__LISTENER__PORT": "104",
            "PACS_CLASSIFIER__LISTENER__AE_TITLE": "GATEWAY",  # not TOML: a string
            "PACS_CLASSIFIER__LISTENER__ALLOWED_CALLING_AETS": '["A", "B"]',
            "PACS_CLASSIFIER__LISTENER__TLS__REQUIRE_CLIENT_CERT": "false",
            "PACS_CLASSIFIER__SCHEDULER__ENABLED": "false",
            "PACS_CLASSIFIER__SCHEDULER__TIMEZONE": '"Europe/Paris"',  # quoted TOML string
            "PACS_CLASSIFIER__WORKER__RETRY_BACKOFF_S": "2.5",
            "PACS_CLASSIFIER__DATABASE__URL": "postgresql+psycopg://app@db/pacs",
            "UNRELATED": "ignored",
        },
    )
    assert config.listener.port == 104
    assert config.listener.ae_title == "GATEWAY"
    assert config.listener.allowed_calling_aets == ("A", "B")
    assert config.listener.tls.require_client_cert is False
    assert config.scheduler.enabled is False
    assert config.scheduler.timezone == "Europe/Paris"
    assert config.worker.retry_backoff_s == 2.5
    assert config.database.url == "postgresql+psycopg://app@db/pacs"


def test_env_override_without_a_file_applies_to_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, environ={"PACS_CLASSIFIER__WORKER__BATCH_SIZE": "4"})
    assert config.worker.batch_size == 4


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("PACS_CLASSIFIER__LISTENER__PORT", "abc", "listener.port: expected an integer"),
        ("PACS_CLASSIFIER__LISTENER__PORT", "0", "listener.port: must be 1-65535"),
        ("PACS_CLASSIFIER__LISTENER__PROT", "104", "listener.prot: unknown key"),
        ("PACS_CLASSIFIER__NOPE__KEY", "1", "nope: unknown key"),
        ("PACS_CLASSIFIER__LISTENER", "1", "PACS_CLASSIFIER__LISTENER: expected"),
        ("PACS_CLASSIFIER__LISTENER__PORT__X", "1", "listener.port: expected an integer"),
        ("PACS_CLASSIFIER__SCHEDULER__ENABLED", "yes", "scheduler.enabled: expected true or false"),
    ],
)
def test_bad_env_override_names_the_key(
    tmp_path: Path, name: str, value: str, expected: str
) -> None:
    path = _write(tmp_path, "")
    message = _error(path, {name: value})
    assert expected in message
    if "." in expected.split(":", maxsplit=1)[0]:  # a config key: say which variable set it
        assert message.endswith(f"(set by {name})")


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    path = _write(
        site,
        '[database]\nurl = "sqlite:///var/pacs.sqlite3"\n'
        '[storage]\nroot = "data/dicom"\n'
        '[model]\ndir = "/opt/models"\n',
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("../site/config.toml"), environ={})
    assert config.storage_root == site / "data" / "dicom"
    assert config.model_dir == Path("/opt/models")
    assert config.database_url == f"sqlite:///{site / 'var' / 'pacs.sqlite3'}"
    assert path.parent == config.base_dir


def test_tls_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("x", encoding="utf-8")
    path = _write(
        tmp_path,
        '[listener]\ntls = { enabled = true, cert = "cert.pem", key = "key.pem", ca = "ca.pem" }\n',
    )
    config = load_config(path, environ={})
    assert config.path(config.listener.tls.cert) == tmp_path / "cert.pem"


def test_destinations_are_a_typed_list(tmp_path: Path) -> None:
    body = (
        '[[destinations]]\nae_title = "PACS"\nhost = "pacs.example"\nport = 104\n'
        'send = ["sr"]\ntls = { enabled = false }\n'
        '[results]\nsc_overlay = "all"\nsr_not_assessed = true\n'
    )
    config = load_config(_write(tmp_path, body), environ={})
    (dest,) = config.destinations
    assert (dest.ae_title, dest.host, dest.port, dest.send) == (
        "PACS",
        "pacs.example",
        104,
        ("sr",),
    )
    assert config.results.sc_overlay == "all"
    assert config.results.sr_not_assessed is True
