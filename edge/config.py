"""Agent configuration: a TOML file validated by pydantic models.

Every field is described; unknown keys are errors (``extra="forbid"``) so a typo never
silently falls back to a default. Secrets (MQTT password) come from the environment
only. Relative paths are resolved against the config file's folder, so a config and
its model/buffer can move together.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from edge.configbase import BrokerConfig, Section, read_toml, resolve_paths, validate
from edge.exceptions import ConfigError
from edge.protocol import check_roi

DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
PASSWORD_ENV = "LINEWATCH_MQTT_PASSWORD"
EXAMPLE = "firmware-config/agent.example.toml"


class CameraConfig(Section):
    """Where frames come from."""

    source: str | int = Field(
        description="device index, /dev/videoN, rtsp/http URL, GStreamer pipeline (with ' ! '), video file, image folder or glob"
    )
    fps: float | None = Field(default=None, ge=0, description="replay rate for files and folders; unset = as fast as possible")
    loop: bool = Field(default=False, description="replay a file or folder forever (demos, soak tests)")
    queue_size: int = Field(default=4, ge=1, le=256, description="frames buffered between capture and inference")
    live: bool | None = Field(
        default=None,
        description="drop the oldest frame when inference falls behind; default: yes for cameras and streams, no for files",
    )
    watchdog_s: float = Field(default=10.0, gt=0, description="restart capture when a live camera gives no frame for this long")
    roi: tuple[int, int, int, int] | None = Field(
        default=None, description="region of interest [x, y, width, height] in pixels: the part, without the conveyor around it"
    )

    @field_validator("roi")
    @classmethod
    def _roi_ok(cls, v: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        return check_roi(v, min_side=8)

    @field_validator("source")
    @classmethod
    def _source_ok(cls, v: str | int) -> str | int:
        from edge.capture import validate_source

        problem = validate_source(v)
        if problem:
            raise ValueError(problem)
        return v


class ModelConfig(Section):
    """Which model bundles the agent runs."""

    path: Path = Field(description="model store folder (OTA keeps current/ and previous/ here) or a single bundle folder")
    runtime: Literal["litert", "tflite-runtime", "tensorflow"] | None = Field(
        default=None, description="force one TFLite runtime; default: LiteRT, then tflite-runtime, then tensorflow.lite"
    )
    threads: int = Field(default=1, ge=1, le=64, description="interpreter threads (1 leaves a core for capture)")


class BufferConfig(Section):
    """The local SQLite buffer every decision is written to before it goes anywhere."""

    path: Path = Field(description="SQLite file")
    max_bytes: int = Field(default=200_000_000, ge=256 * 1024, description="byte budget; evicts by value when full")
    synchronous: Literal["FULL", "NORMAL"] = Field(
        default="FULL",
        description="FULL: every decision fsynced before it is reported; NORMAL: faster, may lose the last ones on power loss",
    )


class SamplingConfig(Section):
    """Which frames are kept as JPEG samples for drift checks and retraining."""

    failed: bool = Field(default=True, description="keep a sample of every failed part")
    low_confidence_margin: float = Field(
        default=0.1, ge=0, le=0.5, description="keep parts whose score is within this of the threshold"
    )
    reservoir_per_hour: int = Field(default=30, ge=0, description="random samples of all parts per hour")
    max_per_hour: int = Field(default=600, ge=0, description="cap on all samples per hour, so a bad batch cannot flood the buffer")
    jpeg_quality: int = Field(default=85, ge=10, le=100)
    max_side: int = Field(default=320, ge=32, le=4096, description="samples are downscaled to this longest side")
    draw_box: bool = Field(
        default=True,
        description="outline the deciding tile (tiled models) in red on samples of failed parts;"
        " false keeps those pixels untouched for retraining (the result row keeps the box either way)",
    )


class DriftConfig(Section):
    """Drift checks: is the line still like it was when this model went live (docs/agent.md, "Drift")."""

    enabled: bool = Field(default=True, description="false turns the checks off (the status says so)")
    baseline_parts: int = Field(default=500, ge=20, le=20_000, description="parts after a model goes live that define usual")
    window_parts: int = Field(default=200, ge=10, le=5_000, description="recent parts compared with the baseline")
    check_every: int = Field(default=25, ge=1, le=5_000, description="parts between two comparisons")
    persist_checks: int = Field(default=3, ge=1, le=100, description="consecutive checks out of band before the state rises")
    clear_checks: int = Field(default=6, ge=1, le=100, description="consecutive checks in band before the state falls")
    stride: int = Field(default=8, ge=1, le=64, description="every n-th pixel of every n-th row feeds the picture measures")
    near_margin: float = Field(default=0.1, gt=0, le=0.5, description="a part within this of the threshold counts as borderline")
    samples_per_hour: int = Field(
        default=60, ge=0, le=3600, description="pictures kept per hour while a measure is out of band (on top of sampling)"
    )


class MqttConfig(BrokerConfig):
    """The broker the agent syncs through; inspection never waits for it."""

    password_env: ClassVar[str] = PASSWORD_ENV

    enabled: bool = Field(default=True, description="false: inspect and buffer only, never connect")
    status_interval_s: float = Field(default=10.0, gt=0)
    batch_rows: int = Field(default=500, ge=1, le=5000, description="results per message (also capped at 128 KiB)")
    ack_timeout_s: float = Field(default=10.0, gt=0, description="resend a batch the cloud has not acknowledged after this")
    max_inflight: int = Field(default=8, ge=1, le=256, description="batches sent but not yet acknowledged")


class OtaConfig(Section):
    """Over-the-air model updates."""

    trusted_keys: list[Path] = Field(default_factory=list, description="Ed25519 public keys (PEM) allowed to sign models")
    allow_unsigned: bool = Field(default=False, description="accept unsigned bundles (development only)")
    health_parts: int = Field(default=200, ge=1, description="parts watched after a switch before the new model is trusted")


class OperatorConfig(Section):
    """The operator page (pass/fail as the line sees it)."""

    enabled: bool = Field(default=True, description="serve the operator page")
    host: str = Field(default="127.0.0.1", description="0.0.0.0 to show it on a screen elsewhere on the plant network")
    port: int = Field(default=8080, ge=0, le=65535, description="0 picks a free port (tests)")
    token: str | None = Field(
        default=None, min_length=16,
        description="when set, the page and its API need it (?token=..., or Authorization: Bearer ...);"
        " set it when host is not 127.0.0.1 (env LINEWATCH_OPERATOR_TOKEN overrides)",
    )  # fmt: skip
    max_clients: int = Field(default=8, ge=1, le=64, description="requests served at once; more wait (bounded threads)")

    @property
    def access_token(self) -> str | None:
        """The token from the environment, else from the file."""
        return os.environ.get("LINEWATCH_OPERATOR_TOKEN") or self.token


class MetricsConfig(Section):
    """Prometheus metrics (``GET /metrics``); the section's absence turns them off."""

    host: str = Field(default="127.0.0.1", description="0.0.0.0 to let a Prometheus elsewhere scrape it")
    port: int = Field(ge=0, le=65535, description="port of /metrics; 0 picks a free port (tests)")


class AgentConfig(Section):
    """The whole agent config file."""

    device_id: str = Field(pattern=DEVICE_ID_PATTERN, description="unique per box; used in MQTT topics")
    line: str | None = Field(default=None, description="production line name, for people")
    groups: list[str] = Field(default_factory=list, description="rollout groups this device belongs to")
    camera: CameraConfig
    model: ModelConfig
    buffer: BufferConfig
    sampling: SamplingConfig = SamplingConfig()
    drift: DriftConfig = DriftConfig()
    mqtt: MqttConfig = MqttConfig()
    ota: OtaConfig = OtaConfig()
    operator: OperatorConfig = OperatorConfig()
    metrics: MetricsConfig | None = Field(default=None, description="Prometheus metrics; off when absent")
    state_file: Path | None = Field(default=None, description="live status JSON; default: next to the buffer")

    @field_validator("groups")
    @classmethod
    def _groups_ok(cls, v: list[str]) -> list[str]:
        for g in v:
            if not re.match(DEVICE_ID_PATTERN, g):
                raise ValueError(f"group {g!r} must be letters, digits, '_', '.', '-'")
        return v

    @model_validator(mode="after")
    def _paths_distinct(self) -> AgentConfig:
        if self.buffer.path.resolve() == self.model.path.resolve():
            raise ValueError("buffer.path and model.path must differ")
        return self

    @property
    def live_camera(self) -> bool:
        if self.camera.live is not None:
            return self.camera.live
        from edge.capture import parse_source

        return parse_source(self.camera.source).kind in ("device", "url", "gstreamer")

    @property
    def status_path(self) -> Path:
        return self.state_file or self.buffer.path.with_suffix(".status.json")


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Resolve relative file paths against the config file's folder."""
    resolve_paths(raw.get("model"), ["path"], base)
    resolve_paths(raw.get("buffer"), ["path"], base)
    MqttConfig.resolve_file_paths(raw.get("mqtt"), base)
    cam = raw.get("camera")
    if isinstance(cam, dict) and isinstance(cam.get("source"), str):
        src = cam["source"]
        # Only plain relative paths; URLs, pipelines and device indexes stay as written.
        if not re.match(r"^[a-z][a-z0-9+.-]*://", src) and " ! " not in src and not src.isdigit() and not src.startswith("/"):
            cam["source"] = str(base / src)
    ota = raw.get("ota")
    if isinstance(ota, dict) and isinstance(ota.get("trusted_keys"), list):
        ota["trusted_keys"] = [
            str(base / k) if isinstance(k, str) and not Path(k).is_absolute() else k for k in ota["trusted_keys"]
        ]
    if isinstance(raw.get("state_file"), str) and not Path(raw["state_file"]).is_absolute():
        raw["state_file"] = str(base / raw["state_file"])
    return raw


def parse_config(raw: dict[str, Any], *, base: Path, source: str = "config") -> AgentConfig:
    """Validate a config dict (paths relative to ``base``)."""
    return validate(AgentConfig, _resolve_paths(raw, base), source=source, error=ConfigError, example=EXAMPLE)


def load_config(path: Path) -> AgentConfig:
    """Read and validate an agent TOML file; :class:`ConfigError` lists every problem."""
    path = Path(path)
    raw = read_toml(path, ConfigError, missing=f"copy {EXAMPLE} and edit it")
    return parse_config(raw, base=path.resolve().parent, source=str(path))
