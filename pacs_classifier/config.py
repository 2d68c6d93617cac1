"""The configuration: ``config.toml`` read once into frozen, validated dataclasses.

Every key has a default (the values in the shipped ``config.toml``). A key that is not
known, or a value of the wrong type, is a :class:`ConfigError` whose message names the
key, e.g. ``listener.port: expected an integer, received 'abc'``.

Overrides: ``PACS_CLASSIFIER__SECTION__KEY`` (``PACS_CLASSIFIER__LISTENER__TLS__ENABLED``
for a nested table) replaces a key. Its value is parsed as a TOML value when it parses as
one (``5``, ``true``, ``["CR", "DX"]``) and taken as a string otherwise.

Secrets never live in the file: ``PACS_CLASSIFIER_DATABASE_PASSWORD`` is put into the
database URL and ``PACS_CLASSIFIER_TLS_KEY_PASSPHRASE`` unlocks the TLS key.

Relative paths (``storage.root``, ``model.dir``, ``model.data_root``, a relative SQLite
file) are resolved against the folder of the configuration file, so the daemon behaves
the same whatever directory it is started from.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacs_classifier.errors import ConfigError

ENV_PREFIX = "PACS_CLASSIFIER__"
ENV_CONFIG_PATH = "PACS_CLASSIFIER_CONFIG"
ENV_DB_PASSWORD = "PACS_CLASSIFIER_DATABASE_PASSWORD"  # noqa: S105 - a variable name
ENV_TLS_PASSPHRASE = "PACS_CLASSIFIER_TLS_KEY_PASSPHRASE"  # noqa: S105
#: Signs the dashboard's CSRF tokens; shared by every web process behind one address.
ENV_WEB_SECRET = "PACS_CLASSIFIER_WEB_SECRET"  # noqa: S105
DEFAULT_CONFIG_PATH = Path("config.toml")


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = "sqlite:///var/pacs_classifier.sqlite3"
    connect_timeout_s: int = 5


@dataclass(frozen=True)
class StorageConfig:
    root: str = "var/dicom"
    min_free_mb: int = 1024


@dataclass(frozen=True)
class TlsConfig:
    enabled: bool = False
    cert: str = ""
    key: str = ""
    ca: str = ""
    require_client_cert: bool = True


@dataclass(frozen=True)
class ListenerConfig:
    ae_title: str = "PNEUMONIA_AI"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()
    max_associations: int = 10
    #: Open TCP connections, associated or not; beyond it the oldest connection still
    #: waiting for its A-ASSOCIATE-RQ is closed to make room (receive/gate.py).
    max_connections: int = 50
    #: Open TCP connections from one IP address; beyond it the new one is closed.
    max_connections_per_peer: int = 20
    #: From TCP connect to a complete A-ASSOCIATE-RQ, TLS handshake included.
    handshake_timeout_s: float = 10.0
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    maximum_pdu_size: int = 131072
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass(frozen=True)
class EligibilityConfig:
    modalities: tuple[str, ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ("CHEST", "")
    view_positions: tuple[str, ...] = ("PA", "AP", "")
    min_short_side_px: int = 256
    max_decoded_mb: int = 512


@dataclass(frozen=True)
class ModelConfig:
    dir: str = "var/models"
    runtime: str = "auto"
    #: The labelled dataset root (``NORMAL/``, ``PNEUMONIA/``) that bundles' ``split.json``
    #: paths are relative to; ``model register`` checks exported runtimes on its validation
    #: images. Empty: the parity check runs on synthetic inputs.
    data_root: str = ""


@dataclass(frozen=True)
class AcceptanceConfig:
    """Local acceptance (``model calibrate``): the operating point a site asks for, and
    how sure its labelled sample must make us of it."""

    #: Sensitivity the new threshold keeps on the site's sample; 0: the bundle's own target.
    target_sensitivity: float = 0.0
    #: The lower confidence bound of the sensitivity at the new threshold must reach this.
    sensitivity_floor: float = 0.90
    #: The lower confidence bound of the specificity at the new threshold must reach this.
    specificity_floor: float = 0.50
    #: Two-sided confidence of the exact (Clopper-Pearson) intervals.
    confidence: float = 0.95


@dataclass(frozen=True)
class WorkerConfig:
    batch_size: int = 16
    max_batch_wait_ms: int = 200
    max_attempts: int = 3
    lease_seconds: int = 300
    poll_interval_ms: int = 250
    retry_backoff_s: float = 30.0


@dataclass(frozen=True)
class SchedulerConfig:
    enabled: bool = True
    reclassify_cron: str = "0 2 * * *"
    timezone: str = "UTC"
    misfire_grace_s: int = 6 * 3600


@dataclass(frozen=True)
class WebConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    session_minutes: int = 480
    #: Send the session cookie only over HTTPS (set when a TLS proxy fronts the dashboard).
    secure_cookies: bool = False
    page_size: int = 50


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"


@dataclass(frozen=True)
class DestinationTlsConfig:
    enabled: bool = False
    cert: str = ""
    key: str = ""
    ca: str = ""


@dataclass(frozen=True)
class DestinationConfig:
    """One ``[[destinations]]`` entry: a DICOM peer our results are sent to (SPEC §11)."""

    ae_title: str = ""
    host: str = ""
    port: int = 104
    send: tuple[str, ...] = ("sr", "sc")
    tls: DestinationTlsConfig = field(default_factory=DestinationTlsConfig)


@dataclass(frozen=True)
class ResultsConfig:
    """``[results]``: which DICOM objects are made from results, and how sends retry."""

    sr: bool = True
    #: An SR for an instance the worker did not assess (Pneumonia Undetermined, the reason).
    sr_not_assessed: bool = False
    sc_overlay: str = "positives"
    max_attempts: int = 8
    retry_backoff_s: float = 10.0
    retry_backoff_max_s: float = 900.0
    #: Attempts after which a refusal (association rejected, failure status) is final.
    refused_attempts: int = 2
    timeout_s: float = 30.0
    lease_seconds: int = 300
    poll_interval_ms: int = 500
    #: While classification jobs wait, rendering and sending wait too, up to this long.
    max_defer_s: float = 60.0


@dataclass(frozen=True)
class DriftConfig:
    """``[drift]``: when live traffic has moved too far from the model's validation."""

    #: Population stability index of a version's week of scores against validation.
    psi_alert: float = 0.25
    #: Absolute difference between a week's positive rate and validation's.
    positive_rate_alert: float = 0.15
    #: Share of a week's ended classification jobs that ended not assessed.
    not_assessed_alert: float = 0.10
    #: Weeks with fewer predictions (or ended jobs) are reported but never alert.
    min_count: int = 50


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    listener: ListenerConfig = field(default_factory=ListenerConfig)
    eligibility: EligibilityConfig = field(default_factory=EligibilityConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    acceptance: AcceptanceConfig = field(default_factory=AcceptanceConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    web: WebConfig = field(default_factory=WebConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    destinations: tuple[DestinationConfig, ...] = ()
    #: Folder of the configuration file; relative paths are resolved against it.
    base_dir: Path = field(default_factory=Path.cwd, compare=False)

    def path(self, value: str) -> Path:
        """Resolve a configured path against the configuration file's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def storage_root(self) -> Path:
        return self.path(self.storage.root)

    @property
    def model_dir(self) -> Path:
        return self.path(self.model.dir)

    @property
    def model_data_root(self) -> Path | None:
        return self.path(self.model.data_root) if self.model.data_root else None

    @property
    def database_url(self) -> str:
        """The database URL with relative SQLite paths resolved and the secret password set."""
        return resolve_database_url(self.database.url, self.base_dir)


_RUNTIMES = ("auto", "keras", "onnx", "tflite-int8")
SC_OVERLAY_MODES = ("off", "positives", "all")
SEND_KINDS = ("sr", "sc")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL; None for another database or an in-memory one."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(str(parsed.database))


def resolve_database_url(url: str, base_dir: Path) -> str:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    db = sqlite_path(url)
    if db is not None and not db.is_absolute():
        parsed = parsed.set(database=str(base_dir / db))
    password = os.environ.get(ENV_DB_PASSWORD)
    if password:
        parsed = parsed.set(password=password)
    return parsed.render_as_string(hide_password=False)


# --------------------------------------------------------------------------- loading


def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Read, override and validate the configuration.

    ``path`` defaults to ``$PACS_CLASSIFIER_CONFIG`` or ``./config.toml``. A missing
    default file is not an error (the built-in defaults apply); a missing file that was
    asked for by name is.
    """
    env = os.environ if environ is None else environ
    explicit = path is not None or ENV_CONFIG_PATH in env
    cfg_path = (
        Path(path) if path is not None else Path(env.get(ENV_CONFIG_PATH, DEFAULT_CONFIG_PATH))
    )
    raw: dict[str, Any] = {}
    if cfg_path.exists():
        if not cfg_path.is_file():
            raise ConfigError(f"{cfg_path}: not a file")
        try:
            raw = tomllib.loads(cfg_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{cfg_path}: malformed TOML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{cfg_path}: cannot be read: {exc}") from None
    elif explicit:
        raise ConfigError(f"{cfg_path}: configuration file not found")
    overridden = _apply_env_overrides(raw, env)
    base_dir = cfg_path.resolve().parent
    try:
        config: Config = _build(Config, raw, "")
        config = dataclasses.replace(config, base_dir=base_dir)
        _validate(config)
    except ConfigError as exc:
        raise _name_env_source(exc, overridden) from None
    return config


def _name_env_source(exc: ConfigError, overridden: Mapping[str, str]) -> ConfigError:
    """Say which environment variable set a bad key: the file may look fine."""
    key = str(exc).split(":", 1)[0]
    for dotted, name in overridden.items():
        inside = key.startswith((f"{dotted}.", f"{dotted}[")) or dotted.startswith(f"{key}.")
        if key == dotted or inside:
            return ConfigError(f"{exc} (set by {name})")
    return exc


def config_from_mapping(raw: Mapping[str, Any], base_dir: Path | None = None) -> Config:
    """Build a validated config from an already-parsed mapping (tests, the demo)."""
    config: Config = _build(Config, dict(raw), "")
    config = dataclasses.replace(config, base_dir=base_dir or Path.cwd())
    _validate(config)
    return config


def _apply_env_overrides(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Apply the overrides to ``raw``; return which variable set each dotted key."""
    applied: dict[str, str] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"{name}: expected PACS_CLASSIFIER__SECTION__KEY")
        target = raw
        for part in parts[:-1]:
            node = target.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: {'.'.join(parts[:-1])} is not a table")
            target = node
        target[parts[-1]] = _parse_env_value(value)
        applied[".".join(parts)] = name
    return applied


def _parse_env_value(value: str) -> Any:
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def _build(cls: type[Any], raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "configuration"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table, received {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "base_dir"}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(fields)})")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(typing.cast(type[Any], tp), value, f"{key}.")
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, received {value!r}")
        return tuple(_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is types.UnionType:  # pragma: no cover - no optional keys today
        raise ConfigError(f"{key}: unsupported type")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, received {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, received {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, received {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, received {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover


def _validate(c: Config) -> None:
    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {message}")

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(c.database.url)
    except ArgumentError:
        raise ConfigError(f"database.url: not a database URL: {c.database.url!r}") from None
    need(
        url.get_backend_name() in ("sqlite", "postgresql"),
        "database.url",
        f"only sqlite and postgresql are supported, received {url.get_backend_name()!r}",
    )
    need(
        url.password is None,
        "database.url",
        f"put the password in ${ENV_DB_PASSWORD}, never in the file",
    )
    need(c.database.connect_timeout_s > 0, "database.connect_timeout_s", "must be > 0")
    need(bool(c.storage.root), "storage.root", "must not be empty")
    need(c.storage.min_free_mb >= 0, "storage.min_free_mb", "must be >= 0")
    ae = c.listener.ae_title
    need(
        0 < len(ae) <= 16 and ae.isascii() and "\\" not in ae and ae.strip() == ae,
        "listener.ae_title",
        f"must be 1-16 ASCII characters, received {ae!r}",
    )
    need(
        0 < c.listener.port < 65536, "listener.port", f"must be 1-65535, received {c.listener.port}"
    )
    need(c.listener.max_associations >= 1, "listener.max_associations", "must be >= 1")
    need(
        c.listener.max_connections >= c.listener.max_associations,
        "listener.max_connections",
        f"must be >= listener.max_associations ({c.listener.max_associations})",
    )
    need(
        c.listener.max_connections_per_peer >= 1,
        "listener.max_connections_per_peer",
        "must be >= 1",
    )
    # An empty host binds every interface: a gateway must be told so in as many words.
    need(
        bool(c.listener.host.strip()),
        "listener.host",
        'must not be empty (write "0.0.0.0" to listen on every interface)',
    )
    for name in ("handshake_timeout_s", "acse_timeout_s", "dimse_timeout_s", "network_timeout_s"):
        need(getattr(c.listener, name) > 0, f"listener.{name}", "must be > 0")
    need(
        c.listener.maximum_pdu_size == 0 or c.listener.maximum_pdu_size >= 4096,
        "listener.maximum_pdu_size",
        "must be 0 (unlimited) or >= 4096",
    )
    for aet in c.listener.allowed_calling_aets:
        need(0 < len(aet) <= 16, "listener.allowed_calling_aets", f"bad AE title {aet!r}")
    tls = c.listener.tls
    if tls.enabled:
        for name in ("cert", "key"):
            value = getattr(tls, name)
            need(
                bool(value) and c.path(value).is_file(),
                f"listener.tls.{name}",
                f"file not found: {value!r}",
            )
        if tls.require_client_cert:
            need(
                bool(tls.ca) and c.path(tls.ca).is_file(),
                "listener.tls.ca",
                f"file not found: {tls.ca!r} (needed by require_client_cert)",
            )
    need(c.eligibility.min_short_side_px >= 1, "eligibility.min_short_side_px", "must be >= 1")
    need(c.eligibility.max_decoded_mb >= 1, "eligibility.max_decoded_mb", "must be >= 1")
    need(
        c.model.runtime in _RUNTIMES,
        "model.runtime",
        f"must be one of {', '.join(_RUNTIMES)}, received {c.model.runtime!r}",
    )
    w = c.worker
    need(w.batch_size >= 1, "worker.batch_size", "must be >= 1")
    need(w.max_batch_wait_ms >= 0, "worker.max_batch_wait_ms", "must be >= 0")
    need(w.max_attempts >= 1, "worker.max_attempts", "must be >= 1")
    need(w.lease_seconds >= 1, "worker.lease_seconds", "must be >= 1")
    need(w.poll_interval_ms >= 1, "worker.poll_interval_ms", "must be >= 1")
    need(w.retry_backoff_s >= 0, "worker.retry_backoff_s", "must be >= 0")
    s = c.scheduler
    need(
        len(s.reclassify_cron.split()) in (5, 6),
        "scheduler.reclassify_cron",
        f"expected 5 cron fields (6 with seconds first), received {s.reclassify_cron!r}",
    )
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(s.timezone)
    except (KeyError, ValueError, OSError):
        raise ConfigError(f"scheduler.timezone: unknown time zone {s.timezone!r}") from None
    need(s.misfire_grace_s >= 1, "scheduler.misfire_grace_s", "must be >= 1")
    for section in (
        _validate_results,
        _validate_drift,
        _validate_web,
        _validate_logging,
        _validate_acceptance,
    ):
        section(c, need)


def _valid_ae(ae: str) -> bool:
    return 0 < len(ae) <= 16 and ae.isascii() and "\\" not in ae and ae.strip() == ae


def _validate_logging(c: Config, need: typing.Callable[[bool, str, str], None]) -> None:
    need(
        c.logging.level.upper() in _LOG_LEVELS,
        "logging.level",
        f"must be one of {', '.join(_LOG_LEVELS)}",
    )


def _validate_acceptance(c: Config, need: typing.Callable[[bool, str, str], None]) -> None:
    a = c.acceptance
    need(
        a.target_sensitivity == 0 or 0.5 <= a.target_sensitivity < 1,
        "acceptance.target_sensitivity",
        f"must be 0 (the bundle's) or in [0.5, 1), received {a.target_sensitivity}",
    )
    for name in ("sensitivity_floor", "specificity_floor"):
        value = getattr(a, name)
        need(0 < value < 1, f"acceptance.{name}", f"must be in (0, 1), received {value}")
    need(
        0.5 <= a.confidence < 1,
        "acceptance.confidence",
        f"must be in [0.5, 1), received {a.confidence}",
    )


def _validate_web(c: Config, need: typing.Callable[[bool, str, str], None]) -> None:
    need(bool(c.web.host), "web.host", "must not be empty")
    need(0 < c.web.port < 65536, "web.port", f"must be 1-65535, received {c.web.port}")
    need(c.web.session_minutes >= 1, "web.session_minutes", "must be >= 1")
    need(1 <= c.web.page_size <= 1000, "web.page_size", "must be 1-1000")


def _validate_drift(c: Config, need: typing.Callable[[bool, str, str], None]) -> None:
    d = c.drift
    need(d.psi_alert >= 0, "drift.psi_alert", f"must be >= 0 (0: off), received {d.psi_alert}")
    for key, value in (
        ("positive_rate_alert", d.positive_rate_alert),
        ("not_assessed_alert", d.not_assessed_alert),
    ):
        need(0 <= value <= 1, f"drift.{key}", f"must be 0-1 (0: off), received {value}")
    need(d.min_count >= 1, "drift.min_count", "must be >= 1")


def _validate_results(c: Config, need: typing.Callable[[bool, str, str], None]) -> None:
    r = c.results
    need(
        r.sc_overlay in SC_OVERLAY_MODES,
        "results.sc_overlay",
        f"must be one of {', '.join(SC_OVERLAY_MODES)}, received {r.sc_overlay!r}",
    )
    need(
        r.sr or not r.sr_not_assessed,
        "results.sr_not_assessed",
        "needs results.sr = true (the SRs of assessed instances come first)",
    )
    need(r.max_attempts >= 1, "results.max_attempts", "must be >= 1")
    need(r.refused_attempts >= 1, "results.refused_attempts", "must be >= 1")
    need(r.retry_backoff_s >= 0, "results.retry_backoff_s", "must be >= 0")
    need(
        r.retry_backoff_max_s >= r.retry_backoff_s,
        "results.retry_backoff_max_s",
        "must be >= results.retry_backoff_s",
    )
    need(r.timeout_s > 0, "results.timeout_s", "must be > 0")
    need(r.lease_seconds >= 1, "results.lease_seconds", "must be >= 1")
    need(r.poll_interval_ms >= 1, "results.poll_interval_ms", "must be >= 1")
    need(r.max_defer_s >= 0, "results.max_defer_s", "must be >= 0")
    seen: set[str] = set()
    for i, d in enumerate(c.destinations):
        key = f"destinations[{i}]"
        need(
            _valid_ae(d.ae_title),
            f"{key}.ae_title",
            f"must be 1-16 ASCII characters, received {d.ae_title!r}",
        )
        # send jobs name their destination by AE title: it must say which one.
        need(d.ae_title not in seen, f"{key}.ae_title", f"{d.ae_title!r} is listed twice")
        seen.add(d.ae_title)
        need(bool(d.host), f"{key}.host", "must not be empty")
        need(0 < d.port < 65536, f"{key}.port", f"must be 1-65535, received {d.port}")
        for kind in d.send:
            need(
                kind in SEND_KINDS,
                f"{key}.send",
                f"must list any of {', '.join(SEND_KINDS)}, received {kind!r}",
            )
        if d.tls.enabled:
            for name in ("cert", "key", "ca"):
                value = getattr(d.tls, name)
                need(
                    not value or c.path(value).is_file(),
                    f"{key}.tls.{name}",
                    f"file not found: {value!r}",
                )
