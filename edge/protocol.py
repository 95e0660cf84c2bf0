"""The wire contract: model bundle manifest, MQTT topics and payload limits.

The edge agent owns this module because it is the part that runs unattended;
``cloud`` and ``training`` import it so every part speaks the same contract.

Bundle layout (a directory, or a single ``.lwb`` tar file for transport)::

    model.tflite        full-integer int8 model (int8 input and output)
    manifest.json       :class:`Manifest`
    golden/*.png        images with the int8 outputs expected for them
    report/             confusion matrix, ROC/PR curves, model card (for people)
    signature.json      optional Ed25519 signature over manifest.json (OTA)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge.exceptions import BundleError

MANIFEST_SCHEMA_VERSION = 1
MODEL_FILE = "model.tflite"
MANIFEST_FILE = "manifest.json"
GOLDEN_DIR = "golden"
REPORT_DIR = "report"
SIGNATURE_FILE = "signature.json"
PACKED_SUFFIX = ".lwb"

# Every MQTT message stays under this, so the agent also works against cloud IoT brokers.
MAX_PAYLOAD_BYTES = 128 * 1024
# OTA chunks leave room for the envelope inside MAX_PAYLOAD_BYTES.
OTA_CHUNK_BYTES = 64 * 1024
PAYLOAD_VERSION = 1
DEFAULT_TOPIC_PREFIX = "linewatch"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class InputSpec(_Strict):
    """The model's input tensor: NHWC shape, integer dtype and quantization."""

    shape: tuple[int, int, int, int] = Field(description="NHWC, batch 1")
    dtype: Literal["int8", "uint8"] = "int8"
    scale: float = Field(gt=0)
    zero_point: int

    @field_validator("shape")
    @classmethod
    def _batch_one(cls, v: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        if v[0] != 1 or min(v) < 1 or v[3] not in (1, 3):
            raise ValueError("shape must be [1, height, width, 1 or 3]")
        return v


class OutputSpec(_Strict):
    """The model's output tensor: class probabilities in label order."""

    shape: tuple[int, int]
    dtype: Literal["int8", "uint8"] = "int8"
    scale: float = Field(gt=0)
    zero_point: int


class Preprocessing(_Strict):
    """How a camera frame becomes the model input; edge/preprocess.py applies it."""

    color_mode: Literal["gray", "rgb"] = "gray"
    width: int = Field(gt=0, le=4096)
    height: int = Field(gt=0, le=4096)
    interpolation: Literal["area", "linear", "nearest"] = "area"
    normalisation: Literal["divide_255"] = "divide_255"


class GoldenImage(_Strict):
    """One golden image and the int8 output the model must give for it."""

    file: str
    label: str
    expected: tuple[int, ...]


class ModelFile(_Strict):
    file: str = MODEL_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(gt=0)


class Manifest(_Strict):
    """manifest.json of a model bundle (see DESIGN.md, "Model bundle")."""

    schema_version: int
    name: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._+-]+$")
    created: str
    model: ModelFile
    labels: tuple[str, ...] = Field(min_length=2)
    pass_label: str
    threshold: float = Field(ge=0.0, le=1.0, description="fail when defect score >= threshold")
    input: InputSpec
    output: OutputSpec
    preprocessing: Preprocessing
    metrics: dict[str, Any] = Field(default_factory=dict)
    dataset: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    reference: dict[str, Any] = Field(default_factory=dict)
    golden: tuple[GoldenImage, ...] = ()
    golden_tolerance: int = Field(default=2, ge=0, le=255)
    latency_budget_ms: float = Field(default=50.0, gt=0)

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, v: int) -> int:
        if v != MANIFEST_SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {v} is not supported (this agent reads {MANIFEST_SCHEMA_VERSION});"
                " upgrade the agent or re-export the bundle"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.pass_label not in self.labels:
            raise ValueError(f"pass_label {self.pass_label!r} is not one of labels {list(self.labels)}")
        if self.output.shape != (1, len(self.labels)):
            raise ValueError(f"output shape {list(self.output.shape)} does not match {len(self.labels)} labels")
        _, h, w, c = self.input.shape
        p = self.preprocessing
        if (p.height, p.width) != (h, w) or (c == 1) != (p.color_mode == "gray"):
            raise ValueError("preprocessing size or colour mode does not match the input shape")
        return self

    @property
    def pass_index(self) -> int:
        return self.labels.index(self.pass_label)


def read_manifest(bundle_dir: Path) -> Manifest:
    """Read and validate ``bundle_dir/manifest.json``; raise :class:`BundleError` with the reason."""
    path = Path(bundle_dir) / MANIFEST_FILE
    if not Path(bundle_dir).is_dir():
        raise BundleError(f"{bundle_dir} is not a bundle directory; pass the folder `linewatch train fit --out` made")
    if not path.is_file():
        raise BundleError(f"{path} is missing; this folder is not a model bundle (re-run `linewatch train fit`)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); the bundle is damaged, export it again") from exc
    return parse_manifest(raw, source=str(path))


def parse_manifest(raw: Any, source: str = "manifest") -> Manifest:
    """Validate a manifest dict, turning pydantic's report into one readable line."""
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
        )
        raise BundleError(f"{source} is invalid: {problems}") from exc


def topic(prefix: str, device_id: str, *parts: str) -> str:
    """``<prefix>/devices/<device_id>/<parts...>``: each device's traffic in its own subtree."""
    return "/".join([prefix.rstrip("/"), "devices", device_id, *parts])
