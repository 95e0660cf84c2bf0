"""Cloud configuration: a TOML file validated by pydantic models.

Every key has a default, so an empty file (or none: ``cloud fleet`` without ``--config``)
is a working config. Unknown keys are errors (``extra="forbid"``); errors are printed as
``key.path = value: message`` lines. Relative paths are resolved against the config file's
folder (against the working directory when there is no file). The MQTT password comes
from the environment only (``LINEWATCH_CLOUD_MQTT_PASSWORD``).

    store.path = "cloud.db"
    data_dir = "cloud-data"
    [mqtt]
    host = "127.0.0.1"
    port = 1883
    topic_prefix = "linewatch"
    [ingest]
    share_group = "linewatch-ingest"
    [fleet]
    offline_after_s = 60
    dead_after_s = 3600
    [web]                      # the fleet pages, /api/fleet and /metrics (off when absent)
    host = "127.0.0.1"
    port = 8090
    token = "..."              # or LINEWATCH_CLOUD_WEB_TOKEN, which wins
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cloud.exceptions import CloudConfigError
from edge.config import format_errors

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: tomli is the same parser (it became tomllib)
    import tomli as tomllib

PASSWORD_ENV = "LINEWATCH_CLOUD_MQTT_PASSWORD"
WEB_TOKEN_ENV = "LINEWATCH_CLOUD_WEB_TOKEN"
DEFAULT_CONFIG_FILE = "cloud.toml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreConfig(_Section):
    """Where ingest keeps what devices sent (SQLite; the Store interface allows PostgreSQL later)."""

    path: Path = Field(default=Path("cloud.db"), description="SQLite file of the cloud store")
    synchronous: Literal["FULL", "NORMAL"] = Field(
        default="FULL", description="FULL: an acked row survives power loss; NORMAL: survives a process crash only"
    )
    busy_timeout_s: float = Field(default=30.0, gt=0, description="how long a writer waits for another ingest worker's lock")


class CloudMqttConfig(_Section):
    """The broker ingest reads from and acks through."""

    host: str = Field(default="127.0.0.1", description="broker host")
    port: int = Field(default=1883, ge=1, le=65535, description="broker port")
    topic_prefix: str = Field(default="linewatch", pattern=r"^[A-Za-z0-9_/-]+$", description="same as the agents' mqtt.topic_prefix")
    client_id: str | None = Field(default=None, description="default: linewatch-ingest-<host>-<pid>, unique per worker")
    username: str | None = Field(default=None, description="password from LINEWATCH_CLOUD_MQTT_PASSWORD")
    tls: bool = Field(default=False, description="connect with TLS")
    ca_file: Path | None = Field(default=None, description="CA bundle for the broker's certificate")
    cert_file: Path | None = Field(default=None, description="client certificate (mutual TLS)")
    key_file: Path | None = Field(default=None, description="client key (mutual TLS)")
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive")

    @property
    def password(self) -> str | None:
        """From the environment only, never from the file."""
        return os.environ.get(PASSWORD_ENV)


class IngestConfig(_Section):
    """How ingest workers share the device traffic."""

    share_group: str = Field(
        default="linewatch-ingest", pattern=r"^[A-Za-z0-9_.-]+$", description="$share group: workers in one group split the messages"
    )
    log_interval_s: float = Field(default=10.0, gt=0, description="at most one log line per rejection reason per interval")


class FleetConfig(_Section):
    """When a device counts as offline or dead."""

    offline_after_s: float = Field(default=60.0, gt=0, description="no status heartbeat for this long: offline_buffering")
    dead_after_s: float = Field(default=3600.0, gt=0, description="no status or message for this long: dead")

    @model_validator(mode="after")
    def _ordered(self) -> FleetConfig:
        if self.dead_after_s < self.offline_after_s:
            raise ValueError("dead_after_s must be at least offline_after_s")
        return self


class WebConfig(_Section):
    """The read-only web pages and /metrics (cloud/web.py)."""

    host: str = Field(default="127.0.0.1", description="0.0.0.0 to serve the plant network (put TLS in front)")
    port: int = Field(default=8090, ge=0, le=65535, description="0 picks a free port (tests)")
    token: str | None = Field(
        default=None, min_length=16, description="the pages' token (Authorization: Bearer, or the login form); LINEWATCH_CLOUD_WEB_TOKEN wins"
    )
    page_size: int = Field(default=200, ge=10, le=5000, description="devices per fleet page")

    @property
    def effective_token(self) -> str | None:
        """The environment's token if set, else the file's."""
        return os.environ.get(WEB_TOKEN_ENV) or self.token


class CloudConfig(_Section):
    """The whole cloud config file."""

    data_dir: Path = Field(default=Path("cloud-data"), description="registry, samples and keys live here")
    store: StoreConfig = StoreConfig()
    mqtt: CloudMqttConfig = CloudMqttConfig()
    ingest: IngestConfig = IngestConfig()
    fleet: FleetConfig = FleetConfig()
    web: WebConfig | None = Field(default=None, description="web pages and /metrics; off when absent")

    @property
    def samples_dir(self) -> Path:
        return self.data_dir / "samples"


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    def fix(section: dict[str, Any], key: str) -> None:
        value = section.get(key)
        if isinstance(value, str) and value:
            p = Path(value).expanduser()
            section[key] = str(p if p.is_absolute() else base / p)

    raw.setdefault("data_dir", "cloud-data")
    fix(raw, "data_dir")
    store = raw.setdefault("store", {})
    if isinstance(store, dict):
        store.setdefault("path", "cloud.db")
        fix(store, "path")
    mqtt = raw.get("mqtt")
    if isinstance(mqtt, dict):
        for key in ("ca_file", "cert_file", "key_file"):
            fix(mqtt, key)
    return raw


def parse_cloud_config(raw: dict[str, Any], *, base: Path, source: str = "cloud config") -> CloudConfig:
    """Validate a config dict, resolving relative paths against ``base``."""
    try:
        return CloudConfig.model_validate(_resolve_paths(copy.deepcopy(raw), base))
    except ValidationError as exc:
        raise CloudConfigError(format_errors(exc, source, example="firmware-config/cloud.example.toml")) from exc


def load_cloud_config(path: Path | None = None) -> CloudConfig:
    """Read a cloud TOML file; with no path use ./cloud.toml if present, else the defaults."""
    if path is None:
        default = Path(DEFAULT_CONFIG_FILE)
        if not default.is_file():
            return parse_cloud_config({}, base=Path.cwd(), source="defaults")
        path = default
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CloudConfigError(f"{path}: no such file; pass --config with an existing cloud TOML file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CloudConfigError(f"{path}: cannot read it ({exc})") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CloudConfigError(f"{path}: not valid TOML ({exc}); fix the syntax at that line") from exc
    return parse_cloud_config(raw, base=path.resolve().parent, source=str(path))
