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
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from cloud.exceptions import CloudConfigError
from edge.configbase import BrokerConfig, Section, read_toml, resolve_paths, validate

PASSWORD_ENV = "LINEWATCH_CLOUD_MQTT_PASSWORD"
WEB_TOKEN_ENV = "LINEWATCH_CLOUD_WEB_TOKEN"
DEFAULT_CONFIG_FILE = "cloud.toml"
EXAMPLE = "firmware-config/cloud.example.toml"


class StoreConfig(Section):
    """Where ingest keeps what devices sent (SQLite; the Store interface allows PostgreSQL later)."""

    path: Path = Field(default=Path("cloud.db"), description="SQLite file of the cloud store")
    synchronous: Literal["FULL", "NORMAL"] = Field(
        default="FULL", description="FULL: an acked row survives power loss; NORMAL: survives a process crash only"
    )
    busy_timeout_s: float = Field(default=30.0, gt=0, description="how long a writer waits for another ingest worker's lock")


class CloudMqttConfig(BrokerConfig):
    """The broker ingest reads from and acks through."""

    password_env: ClassVar[str] = PASSWORD_ENV

    client_id: str | None = Field(default=None, description="default: linewatch-ingest-<host>-<pid>, unique per worker")


class IngestConfig(Section):
    """How ingest workers share the device traffic."""

    share_group: str = Field(
        default="linewatch-ingest", pattern=r"^[A-Za-z0-9_.-]+$", description="$share group: workers in one group split the messages"
    )
    log_interval_s: float = Field(default=10.0, gt=0, description="at most one log line per rejection reason per interval")


class FleetConfig(Section):
    """When a device counts as offline or dead."""

    offline_after_s: float = Field(default=60.0, gt=0, description="no status heartbeat for this long: offline_buffering")
    dead_after_s: float = Field(default=3600.0, gt=0, description="no status or message for this long: dead")

    @model_validator(mode="after")
    def _ordered(self) -> FleetConfig:
        if self.dead_after_s < self.offline_after_s:
            raise ValueError("dead_after_s must be at least offline_after_s")
        return self


class WebConfig(Section):
    """The read-only web pages and /metrics (cloud/web.py)."""

    host: str = Field(default="127.0.0.1", description="0.0.0.0 to serve the plant network (put TLS in front)")
    port: int = Field(default=8090, ge=0, le=65535, description="0 picks a free port (tests)")
    token: str | None = Field(
        default=None,
        min_length=16,
        description="the pages' token (Authorization: Bearer, or the login form); LINEWATCH_CLOUD_WEB_TOKEN wins",
    )
    page_size: int = Field(default=200, ge=10, le=5000, description="devices per fleet page")

    @property
    def effective_token(self) -> str | None:
        """The environment's token if set, else the file's."""
        return os.environ.get(WEB_TOKEN_ENV) or self.token


class CloudConfig(Section):
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
    raw.setdefault("data_dir", "cloud-data")
    resolve_paths(raw, ["data_dir"], base)
    store = raw.setdefault("store", {})
    if isinstance(store, dict):
        store.setdefault("path", "cloud.db")
    resolve_paths(store, ["path"], base)
    CloudMqttConfig.resolve_file_paths(raw.get("mqtt"), base)
    return raw


def parse_cloud_config(raw: dict[str, Any], *, base: Path, source: str = "cloud config") -> CloudConfig:
    """Validate a config dict, resolving relative paths against ``base``."""
    resolved = _resolve_paths(copy.deepcopy(raw), base)
    return validate(CloudConfig, resolved, source=source, error=CloudConfigError, example=EXAMPLE)


def load_cloud_config(path: Path | None = None) -> CloudConfig:
    """Read a cloud TOML file; with no path use ./cloud.toml if present, else the defaults."""
    if path is None:
        default = Path(DEFAULT_CONFIG_FILE)
        if not default.is_file():
            return parse_cloud_config({}, base=Path.cwd(), source="defaults")
        path = default
    path = Path(path)
    raw = read_toml(path, CloudConfigError, missing="pass --config with an existing cloud TOML file")
    return parse_cloud_config(raw, base=path.resolve().parent, source=str(path))
