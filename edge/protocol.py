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

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

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


def check_roi(roi: tuple[int, int, int, int] | None, *, min_side: int) -> tuple[int, int, int, int] | None:
    """``roi`` [x, y, width, height] as given; ValueError (for a pydantic validator) unless
    x, y >= 0 and width, height >= ``min_side``."""
    if roi is not None and (roi[0] < 0 or roi[1] < 0 or roi[2] < min_side or roi[3] < min_side):
        raise ValueError(f"roi is [x, y, width, height] with x, y >= 0 and width, height >= {min_side}")
    return roi


class Tiling(_Strict):
    """How a frame is cut into model inputs (edge/tiling.py; docs/training.md, "Tiles").

    The frame (or its ``roi``, in frame pixels) is resized by ``scale`` and covered by a
    grid of ``width`` x ``height`` tiles that overlap by at least ``overlap`` of a tile;
    with ``whole_frame`` one more input is the whole ROI squeezed to the tile size, for
    defects that are about the whole part (shading). All inputs go through the model
    together and the part's score is the ``rule`` over them: ``max``, the worst input's
    score; ``fused``, the worst tile's defect logit plus ``whole_weight`` times the whole
    view's (edge/tiling.py ``part_score``; docs/training.md, "Decision rule").
    """

    width: int = Field(ge=16, le=4096, description="tile width in scaled pixels (the model input)")
    height: int = Field(ge=16, le=4096)
    scale: float = Field(gt=0.0, le=4.0, description="scaled pixels per frame pixel; 1.0 = native")
    overlap: float = Field(default=0.0, ge=0.0, lt=0.9)
    roi: tuple[int, int, int, int] | None = Field(default=None, description="x, y, width, height in frame pixels")
    whole_frame: bool = True
    rule: Literal["max", "fused"] = "max"
    whole_weight: float = Field(default=0.0, ge=0.0, le=8.0, description="the whole view's weight in the fused rule")

    @field_validator("roi")
    @classmethod
    def _roi_ok(cls, v: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        return check_roi(v, min_side=1)

    @model_validator(mode="after")
    def _fused_needs_whole_view(self) -> Tiling:
        if self.rule == "fused" and not self.whole_frame:
            raise ValueError("the fused rule weighs the whole view in: it needs whole_frame")
        return self


class GoldenImage(_Strict):
    """One golden image and the int8 output the model must give for it.

    For a tiled bundle the image is a whole frame, ``expected`` is the deciding input's
    output and ``expected_tiles`` every input's, in the order edge/tiling.py cuts them.
    """

    file: str
    label: str
    expected: tuple[int, ...]
    expected_tiles: tuple[tuple[int, ...], ...] | None = None


class OperatingPoint(_Strict):
    """How the threshold was chosen and what it gives (training/operating_point.py).

    ``Manifest.threshold`` is what the agent applies; a hand-edited threshold that no longer
    matches this record is still a valid bundle (the record then describes the trainer's
    choice, not the shipped one).
    """

    threshold: float = Field(ge=0.0, le=1.0)
    rule: str = Field(description="risk, recall, false_reject, middle or edge (docs/training.md)")
    scores_from: str = Field(description="validation, or out-of-fold (k folds)")
    target_recall: float = Field(gt=0.0, le=1.0)
    max_false_reject: float = Field(ge=0.0, lt=1.0)
    n_defect: int = Field(ge=0)
    n_pass: int = Field(ge=0)
    recall: float = Field(ge=0.0, le=1.0, description="on the scores it was chosen from")
    false_reject_rate: float = Field(ge=0.0, le=1.0)
    recall_lower_95: float = Field(ge=0.0, le=1.0, description="one-sided Clopper-Pearson bound")
    feasible: bool | None = None
    warnings: tuple[str, ...] = ()


class ModelFile(_Strict):
    file: str = MODEL_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(gt=0)


class Manifest(_Strict):
    """manifest.json of a model bundle (see docs/design.md, "Model bundle")."""

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
    operating_point: OperatingPoint | None = None
    tiling: Tiling | None = None

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
        if self.tiling is not None and (self.tiling.height, self.tiling.width) != (h, w):
            raise ValueError(
                f"tiling {self.tiling.width}x{self.tiling.height} does not match the model input {w}x{h}"
            )
        return self

    @property
    def pass_index(self) -> int:
        return self.labels.index(self.pass_label)


# A real manifest is 10-40 KB (reference statistics included); anything far larger is
# refused before it is read, so a hostile bundle cannot make the box read 64 MiB.
MAX_MANIFEST_BYTES = 1024 * 1024


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of ``path`` if it holds at most ``limit`` (checked before and while reading)."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise BundleError(f"{path}: {what} of {size} bytes is over the {limit} byte limit; the bundle is not"
                              " one `linewatch train fit` makes")  # fmt: skip
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the {what} ({exc})") from exc
    if len(data) > limit:  # grew while we looked
        raise BundleError(f"{path}: {what} is over the {limit} byte limit")
    return data


def load_json_bounded(path: Path, limit: int, what: str) -> Any:
    """JSON from ``path``, size-capped; too deep a nesting is a clean BundleError, not a RecursionError."""
    data = read_bounded(path, limit, what)
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise BundleError(f"{path}: {what} is nested too deeply to be one Linewatch writes") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); the bundle is damaged, export it again") from exc


def read_manifest(bundle_dir: Path) -> Manifest:
    """Read and validate ``bundle_dir/manifest.json``; raise :class:`BundleError` with the reason."""
    path = Path(bundle_dir) / MANIFEST_FILE
    if not Path(bundle_dir).is_dir():
        raise BundleError(f"{bundle_dir} is not a bundle directory; pass the folder `linewatch train fit --out` made")
    if not path.is_file():
        raise BundleError(f"{path} is missing; this folder is not a model bundle (re-run `linewatch train fit`)")
    raw = load_json_bounded(path, MAX_MANIFEST_BYTES, "manifest")
    return parse_manifest(raw, source=str(path))


def parse_manifest(raw: Any, source: str = "manifest") -> Manifest:
    """Validate a manifest dict, turning pydantic's report into one readable line."""
    try:
        return Manifest.model_validate(raw)
    except RecursionError:
        raise BundleError(f"{source} is nested too deeply to be one Linewatch writes") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
        )
        raise BundleError(f"{source} is invalid: {problems}") from exc


def topic(prefix: str, device_id: str, *parts: str) -> str:
    """``<prefix>/devices/<device_id>/<parts...>``: each device's traffic in its own subtree."""
    return "/".join([prefix.rstrip("/"), "devices", device_id, *parts])


# ---------------------------------------------------------------------------------------------
# MQTT payloads (version PAYLOAD_VERSION). See docs/sync.md for the whole protocol.
#
# Device -> cloud, under ``<prefix>/devices/<device_id>/``:
#   status   retained; ``online`` on connect and every status interval, ``offline`` on a clean
#            stop and as the last will
#   results  a batch of result rows in seq order, as column arrays     (ResultsBatch; version 2
#            when it carries the deciding tile's ``box`` column)
#   gaps     evictions of unsynced rows, as column arrays               (GapsBatch)
#   events   agent events, as column arrays                             (EventsBatch)
#   samples  one chunk of one JPEG sample, base64 in JSON               (SampleChunk)
# Cloud -> device:
#   ack      sent only after the cloud COMMITTED the rows; lists the stored seq ranges (Ack)
#
# Every payload is compact JSON (no spaces) of at most MAX_PAYLOAD_BYTES, carries ``v`` and
# the device_id, which must equal the device in the topic. ``seq`` is the buffer's own
# per-table sequence, never an MQTT message id: the cloud stores each (device_id, seq) once.
# ---------------------------------------------------------------------------------------------

STATUS = "status"
ACK = "ack"
RESULTS = "results"
GAPS = "gaps"
EVENTS = "events"
SAMPLES = "samples"
# Tables a device drains to the cloud, in the order it serves them.
DATA_KINDS: tuple[str, ...] = (GAPS, RESULTS, EVENTS, SAMPLES)
# Raw JPEG bytes per sample message: base64 makes it 4/3 larger (87 KiB), leaving room for
# the envelope inside MAX_PAYLOAD_BYTES.
SAMPLE_CHUNK_BYTES = 64 * 1024
MAX_BATCH_ROWS = 5000
MAX_SAMPLE_BYTES = 256 * SAMPLE_CHUNK_BYTES  # 16 MiB: any JPEG the sampler makes

RESULT_COLUMNS: tuple[str, ...] = (
    "ts", "part_id", "model_version", "label", "score", "passed",
    "capture_ms", "preprocess_ms", "invoke_ms", "record_ms",
)  # fmt: skip
GAP_COLUMNS: tuple[str, ...] = ("ts", "table_name", "first_seq", "last_seq", "count", "passed_count", "failed_count")
EVENT_COLUMNS: tuple[str, ...] = ("ts", "kind", "detail")
COLUMNS: dict[str, tuple[str, ...]] = {RESULTS: RESULT_COLUMNS, GAPS: GAP_COLUMNS, EVENTS: EVENT_COLUMNS}

# Results version 2 = version 1's columns plus BOX_COLUMN: per row the deciding tile's
# [x, y, width, height] in camera-frame pixels, or null (whole-frame models). A device sends
# version 2 only for a batch holding at least one box, so a line with whole-frame models
# keeps talking to a cloud that reads only version 1.
RESULTS_BOX_VERSION = 2
BOX_COLUMN = "box"
# Larger than any camera side; keeps a box's numbers sane before they reach a store.
MAX_BOX_PIXELS = 1_000_000
# Payload versions a receiver reads, per kind; kinds not listed read PAYLOAD_VERSION only.
READ_VERSIONS: dict[str, tuple[int, ...]] = {RESULTS: (PAYLOAD_VERSION, RESULTS_BOX_VERSION)}


def read_versions(kind: str) -> tuple[int, ...]:
    """The payload versions of ``kind`` this code reads."""
    return READ_VERSIONS.get(kind, (PAYLOAD_VERSION,))


def box_problem(box: Any) -> str | None:
    """Why ``box`` is not a valid (x, y, width, height) in pixels, or None when it is."""
    if (
        not isinstance(box, (tuple, list))
        or len(box) != 4
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in box)
    ):
        return f"box {str(box)[:60]} is not four integers [x, y, width, height]"
    x, y, w, h = box
    if x < 0 or y < 0 or w < 1 or h < 1 or max(box) > MAX_BOX_PIXELS:
        return f"box {list(box)} needs x, y >= 0, width, height >= 1 and every value at most {MAX_BOX_PIXELS}"
    return None

_DEVICE_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_BATCH_ID = r"^[A-Za-z0-9_.:-]{1,64}$"
# A buffer's incarnation id: random hex made when the buffer file is created (edge/buffer/).
BUFFER_ID_PATTERN = r"^[0-9a-f]{8,32}$"
_BUFFER_ID_DOC = (
    "the sending buffer's random id (new for every new buffer file); the cloud dedups on"
    " (device_id, buffer_id, seq). Optional: payloads without it (older agents) still ingest."
)


def device_topic_filter(prefix: str, *parts: str) -> str:
    """``<prefix>/devices/+/<parts...>``: one kind of message from every device."""
    return topic(prefix, "+", *parts)


def shared_filter(group: str, topic_filter: str) -> str:
    """``$share/<group>/<filter>``: the broker hands each message to one member of the group."""
    return f"$share/{group}/{topic_filter}"


def parse_topic(prefix: str, name: str) -> tuple[str, str] | None:
    """``(device_id, kind)`` of ``<prefix>/devices/<device_id>/<kind>``, or None if it is not one."""
    head = prefix.rstrip("/") + "/devices/"
    if not name.startswith(head):
        return None
    rest = name[len(head):].split("/")
    if len(rest) != 2 or not rest[0] or not rest[1]:
        return None
    return rest[0], rest[1]


def encode_payload(payload: dict[str, Any]) -> bytes:
    """Compact JSON, the one wire encoding (callers check the size against MAX_PAYLOAD_BYTES)."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def seq_ranges(seqs: list[int] | tuple[int, ...]) -> list[tuple[int, int]]:
    """Sorted seqs as inclusive ``(first, last)`` runs: [1,2,3,7] -> [(1,3),(7,7)]."""
    out: list[tuple[int, int]] = []
    for s in sorted(set(seqs)):
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Batch(_Wire):
    """Common envelope of a table batch: which rows of which device, under which batch id."""

    v: int = Field(description="the payload version; each kind lists the ones it reads")
    device_id: str = Field(pattern=_DEVICE_ID)
    batch: str = Field(pattern=_BATCH_ID, description="sender's id for this message; echoed in the ack")
    buffer_id: str | None = Field(default=None, pattern=BUFFER_ID_PATTERN, description=_BUFFER_ID_DOC)
    first_seq: int = Field(ge=1)
    last_seq: int = Field(ge=1)
    seq: list[int] = Field(min_length=1, max_length=MAX_BATCH_ROWS, description="strictly increasing buffer seqs")

    def _check_envelope(self, cols: BaseModel) -> None:
        if self.seq[0] != self.first_seq or self.seq[-1] != self.last_seq:
            raise ValueError("first_seq/last_seq do not match the seq list")
        if any(b <= a for a, b in zip(self.seq, self.seq[1:], strict=False)):
            raise ValueError("seq must be strictly increasing")
        n = len(self.seq)
        for name, values in cols:
            if values is not None and len(values) != n:
                raise ValueError(f"column {name} has {len(values)} values for {n} seqs")

    def rows(self) -> list[dict[str, Any]]:
        """The batch as one dict per row, seq included."""
        cols = {k: v for k, v in getattr(self, "cols") if v is not None}  # noqa: B009 - every subclass has cols
        names = list(cols)
        return [
            {"seq": s, **{name: cols[name][i] for name in names}} for i, s in enumerate(self.seq)
        ]


class ResultColumns(_Wire):
    ts: list[float]
    part_id: list[int | None]
    model_version: list[str | None]
    label: list[str | None]
    score: list[float]
    passed: list[bool]
    capture_ms: list[float | None]
    preprocess_ms: list[float | None]
    invoke_ms: list[float | None]
    record_ms: list[float | None]
    # Version 2 only: the deciding tile's box per row (strict ints: 1.5 or "1" is refused).
    box: list[tuple[StrictInt, StrictInt, StrictInt, StrictInt] | None] | None = None

    @field_validator("box")
    @classmethod
    def _boxes_ok(cls, v: list[tuple[int, int, int, int] | None] | None) -> list[tuple[int, int, int, int] | None] | None:
        for i, box in enumerate(v or ()):
            problem = None if box is None else box_problem(box)
            if problem:
                raise ValueError(f"row {i}: {problem}")
        return v


class ResultsBatch(_Batch):
    """``results``: decisions in seq order, as column arrays (compact: ~60 bytes per row).

    Version 1 has no ``box`` column; version 2 always has one (see RESULTS_BOX_VERSION).
    """

    v: Literal[1, 2] = Field(description="PAYLOAD_VERSION, or RESULTS_BOX_VERSION with the box column")
    type: Literal["results"]
    cols: ResultColumns

    @model_validator(mode="after")
    def _envelope(self) -> ResultsBatch:
        if self.v == PAYLOAD_VERSION and self.cols.box is not None:
            raise ValueError(f"the box column needs payload version {RESULTS_BOX_VERSION}")
        if self.v == RESULTS_BOX_VERSION and self.cols.box is None:
            raise ValueError(f"a version {RESULTS_BOX_VERSION} results batch carries the box column")
        self._check_envelope(self.cols)
        return self


class GapColumns(_Wire):
    ts: list[float]
    table_name: list[str]
    first_seq: list[int]
    last_seq: list[int]
    count: list[int]
    passed_count: list[int | None]
    failed_count: list[int | None]


class GapsBatch(_Batch):
    """``gaps``: the buffer evicted unsynced rows ``first_seq..last_seq`` of ``table_name``."""

    v: Literal[1] = Field(description="PAYLOAD_VERSION")
    type: Literal["gaps"]
    cols: GapColumns

    @model_validator(mode="after")
    def _envelope(self) -> GapsBatch:
        self._check_envelope(self.cols)
        return self


class EventColumns(_Wire):
    ts: list[float]
    kind: list[str]
    detail: list[dict[str, Any]]


class EventsBatch(_Batch):
    """``events``: agent events (start, stop, camera_down, model_switched, ...)."""

    v: Literal[1] = Field(description="PAYLOAD_VERSION")
    type: Literal["events"]
    cols: EventColumns

    @model_validator(mode="after")
    def _envelope(self) -> EventsBatch:
        self._check_envelope(self.cols)
        return self


class SampleChunk(_Wire):
    """``samples``: chunk ``chunk`` of ``chunks`` of one JPEG sample (base64 of its bytes).

    A sample of at most SAMPLE_CHUNK_BYTES travels in one message (chunks=1). The cloud
    acks the sample's seq only once every chunk is stored; a chunk is acked by its batch id.
    """

    v: Literal[1]
    type: Literal["sample"]
    device_id: str = Field(pattern=_DEVICE_ID)
    batch: str = Field(pattern=_BATCH_ID)
    buffer_id: str | None = Field(default=None, pattern=BUFFER_ID_PATTERN, description=_BUFFER_ID_DOC)
    seq: int = Field(ge=1)
    result_seq: int | None = None
    ts: float
    reason: str | None = Field(default=None, max_length=64)
    label: str | None = Field(default=None, max_length=128)
    score: float | None = None
    width: int | None = Field(default=None, ge=0)
    height: int | None = Field(default=None, ge=0)
    bytes: int = Field(ge=1, le=MAX_SAMPLE_BYTES, description="size of the whole JPEG")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="of the whole JPEG")
    chunk: int = Field(ge=0)
    chunks: int = Field(ge=1, le=MAX_SAMPLE_BYTES // SAMPLE_CHUNK_BYTES)
    data: str = Field(min_length=1, max_length=(SAMPLE_CHUNK_BYTES * 4) // 3 + 4, description="base64")

    @model_validator(mode="after")
    def _chunk_in_range(self) -> SampleChunk:
        if self.chunk >= self.chunks:
            raise ValueError(f"chunk {self.chunk} is not below chunks {self.chunks}")
        if self.chunks != -(-self.bytes // SAMPLE_CHUNK_BYTES):
            raise ValueError(f"{self.bytes} bytes make {-(-self.bytes // SAMPLE_CHUNK_BYTES)} chunks, not {self.chunks}")
        return self


class StatusPayload(BaseModel):
    """``status`` (retained): the agent's own report; unknown keys are kept as they come."""

    model_config = ConfigDict(extra="allow", frozen=True)

    v: Literal[1]
    state: Literal["online", "offline"]
    device_id: str = Field(pattern=_DEVICE_ID)
    ts: float | None = None
    reason: str | None = None
    model_version: str | None = None
    unsynced: int | None = None
    groups: list[str] | None = None
    buffer_id: str | None = Field(default=None, pattern=BUFFER_ID_PATTERN, description=_BUFFER_ID_DOC)


class Ack(_Wire):
    """``ack``: the cloud committed these seqs (inclusive ranges per table) from batch ``batch``."""

    v: Literal[1]
    type: Literal["ack"]
    device_id: str = Field(pattern=_DEVICE_ID)
    batch: str = Field(pattern=_BATCH_ID)
    ts: float
    acked: dict[Literal["results", "gaps", "events", "samples"], list[tuple[int, int]]] = Field(default_factory=dict)


DATA_MODELS: dict[str, type[BaseModel]] = {
    RESULTS: ResultsBatch,
    GAPS: GapsBatch,
    EVENTS: EventsBatch,
    SAMPLES: SampleChunk,
}
