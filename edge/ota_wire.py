"""The OTA wire contract: topics, payload models and the binary chunk format (docs/ota.md).

All topics are under ``<prefix>/devices/<device_id>/ota/``, so the broker ACL that confines
a device to its own subtree covers OTA too::

    desired  cloud -> device, RETAINED, JSON OtaDesired: the model this device should run
    req      device -> cloud, JSON OtaRequest: send me these chunks of this transfer
    chunk    cloud -> device, BINARY (encode_chunk): one chunk and its sha256
    state    device -> cloud, RETAINED, JSON OtaStatePayload: where the update stands

The edge owns this contract (docs/design.md); cloud/ota_server.py and cloud/rollout.py import it.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge import bundle as _bundle
from edge.protocol import MAX_PAYLOAD_BYTES, OTA_CHUNK_BYTES, topic

# The largest packed bundle a desired message may announce (edge/bundle.py's unpack limit).
MAX_BUNDLE_BYTES = _bundle.MAX_UNPACKED_BYTES

OTA = "ota"
DESIRED = "desired"
REQ = "req"
CHUNK = "chunk"
STATE = "state"
CHUNK_MAGIC = b"LWO1"
# The OTA link logs in as "<mqtt.username>-ota": the broker's device listener makes every
# client id the username, and the sync link already uses the plain one (docs/security.md).
OTA_USER_SUFFIX = "-ota"
MIN_CHUNK_BYTES = 1024
MAX_REQ_INDEXES = 64
_TRANSFER = r"^[A-Za-z0-9_.:-]{1,64}$"
_DEVICE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_VERSION = r"^[A-Za-z0-9._+-]{1,64}$"
_SHA256 = r"^[0-9a-f]{64}$"
_CHUNK_HEAD = struct.Struct(">I32s")  # index, sha256 digest

# Device states reported on .../ota/state
DOWNLOADING = "downloading"
VERIFYING = "verifying"
VALIDATING = "validating"
ACTIVE = "active"
FAILED = "failed"
ROLLED_BACK = "rolled_back"
STATES = (DOWNLOADING, VERIFYING, VALIDATING, ACTIVE, FAILED, ROLLED_BACK)
TERMINAL_STATES = (ACTIVE, FAILED, ROLLED_BACK)
# health field of an ``active`` state
HEALTH_WATCHING = "watching"
HEALTH_OK = "ok"


def ota_topic(prefix: str, device_id: str, kind: str) -> str:
    """``<prefix>/devices/<device_id>/ota/<kind>``."""
    return topic(prefix, device_id, OTA, kind)


class _Wire(BaseModel):
    # Unknown keys are ignored so a newer cloud can add fields without breaking old boxes.
    model_config = ConfigDict(extra="ignore", frozen=True)


class OtaDesired(_Wire):
    """``ota/desired`` (retained): the model this device should run.

    ``sha256``/``size``/``chunks`` describe the packed bundle to download. When they are
    absent the device must already hold ``version`` (running, or kept as previous for
    rollback) and switches to it without a download.
    """

    v: Literal[1]
    type: Literal["ota_desired"] = "ota_desired"
    device_id: str = Field(pattern=_DEVICE)
    version: str = Field(pattern=_VERSION)
    transfer: str = Field(pattern=_TRANSFER, description="id of this delivery; chunk replies carry it")
    rollout: str | None = Field(default=None, max_length=64)
    sha256: str | None = Field(default=None, pattern=_SHA256, description="of the packed .lwb file")
    size: int | None = Field(default=None, ge=1, le=MAX_BUNDLE_BYTES)
    chunks: int | None = Field(default=None, ge=1)
    chunk_bytes: int = Field(default=OTA_CHUNK_BYTES, ge=MIN_CHUNK_BYTES, le=OTA_CHUNK_BYTES)
    ts: float | None = None
    # Anti-rollback: a version older than the running one is refused unless the push said
    # --allow-downgrade. The message itself is not signed, so that intent is: an Ed25519
    # signature by a trusted key over downgrade_intent() (docs/ota.md, "Anti-rollback").
    allow_downgrade: bool = False
    intent_key: str | None = Field(default=None, max_length=64, description="key id of the intent signature")
    intent_sig: str | None = Field(default=None, max_length=200, description="base64 Ed25519 signature")

    @model_validator(mode="after")
    def _consistent(self) -> OtaDesired:
        given = [x is not None for x in (self.sha256, self.size, self.chunks)]
        if any(given) and not all(given):
            raise ValueError("sha256, size and chunks come together")
        if self.size is not None and self.chunks != -(-self.size // self.chunk_bytes):
            raise ValueError(
                f"{self.size} bytes in chunks of {self.chunk_bytes} make {-(-self.size // self.chunk_bytes)} chunks, not {self.chunks}"
            )
        return self

    @property
    def download(self) -> bool:
        return self.sha256 is not None


class OtaRequest(_Wire):
    """``ota/req``: the device asks for these chunks of ``transfer``."""

    v: Literal[1]
    type: Literal["ota_req"] = "ota_req"
    device_id: str = Field(pattern=_DEVICE)
    transfer: str = Field(pattern=_TRANSFER)
    indexes: list[int] = Field(min_length=1, max_length=MAX_REQ_INDEXES)

    @field_validator("indexes")
    @classmethod
    def _non_negative(cls, v: list[int]) -> list[int]:
        if min(v) < 0:
            raise ValueError("chunk indexes are >= 0")
        return v


class OtaStatePayload(_Wire):
    """``ota/state`` (retained): where this device's update stands."""

    v: Literal[1]
    type: Literal["ota_state"] = "ota_state"
    device_id: str = Field(pattern=_DEVICE)
    state: Literal["downloading", "verifying", "validating", "active", "failed", "rolled_back"]
    transfer: str | None = None
    rollout: str | None = None
    version: str | None = Field(default=None, description="the version this update is about")
    model_version: str | None = Field(default=None, description="the version running now")
    received: int | None = None
    chunks: int | None = None
    stage: str | None = None
    reason: str | None = Field(default=None, max_length=1000)
    health: str | None = None
    ts: float


def downgrade_intent(desired: OtaDesired) -> bytes:
    """The bytes a downgrade's signature covers: this device, this version, this delivery."""
    return f"linewatch-downgrade:v1:{desired.device_id}:{desired.version}:{desired.transfer}:{desired.sha256 or ''}".encode()


def sign_downgrade(desired: OtaDesired, key: object) -> OtaDesired:
    """``desired`` with ``allow_downgrade`` and its intent signed by ``key`` (an Ed25519 private key)."""
    from edge.signing import key_id

    intent = desired.model_copy(update={"allow_downgrade": True})
    sig = key.sign(downgrade_intent(intent))  # type: ignore[attr-defined]
    return intent.model_copy(update={"intent_key": key_id(key), "intent_sig": base64.b64encode(sig).decode()})  # type: ignore[arg-type]


def downgrade_signed(desired: OtaDesired, trusted: dict[str, object]) -> bool:
    """Whether ``desired`` carries a downgrade intent signed by one of the ``trusted`` keys."""
    if not desired.allow_downgrade or not desired.intent_sig or desired.intent_key not in trusted:
        return False
    from cryptography.exceptions import InvalidSignature

    try:
        trusted[desired.intent_key].verify(base64.b64decode(desired.intent_sig), downgrade_intent(desired))  # type: ignore[attr-defined]
    except (InvalidSignature, ValueError):
        return False
    return True


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Order of model versions: numbers compare as numbers (1.10 > 1.9, tiny-2 > tiny-1)."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.findall(r"\d+|[A-Za-z]+", version))


def is_downgrade(new: str, running: str | None) -> bool:
    """Whether installing ``new`` over ``running`` goes back to an older version."""
    return running is not None and new != running and version_key(new) < version_key(running)


def encode_chunk(transfer: str, index: int, data: bytes) -> bytes:
    """One ``ota/chunk`` message: ``b"LWO1"``, 1-byte id length, transfer id, u32 index,
    32-byte sha256 of ``data``, then ``data``.
    """
    tid = transfer.encode("ascii")
    if not 1 <= len(tid) <= 64:
        raise ValueError("transfer id must be 1..64 ASCII characters")
    return CHUNK_MAGIC + bytes([len(tid)]) + tid + _CHUNK_HEAD.pack(index, hashlib.sha256(data).digest()) + data


def decode_chunk(payload: bytes) -> tuple[str, int, bytes, bytes]:
    """``(transfer, index, sha256 digest, data)`` of a chunk message; ValueError if malformed."""
    if len(payload) < 5 or payload[:4] != CHUNK_MAGIC:
        raise ValueError("not an OTA chunk (bad magic)")
    n = payload[4]
    head_end = 5 + n + _CHUNK_HEAD.size
    if n < 1 or len(payload) < head_end:
        raise ValueError("truncated OTA chunk header")
    try:
        transfer = payload[5 : 5 + n].decode("ascii")
    except UnicodeDecodeError as exc:
        raise ValueError("transfer id is not ASCII") from exc
    index, digest = _CHUNK_HEAD.unpack_from(payload, 5 + n)
    return transfer, int(index), bytes(digest), bytes(payload[head_end:])


def parse_json(model: type[_W], payload: bytes) -> _W:
    """Validate a JSON payload into ``model`` (ValueError with pydantic's reason)."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload of {len(payload)} bytes is over {MAX_PAYLOAD_BYTES}")
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        raise ValueError("; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors())) from exc


_W = TypeVar("_W", bound=_Wire)


__all__ = [
    "ACTIVE",
    "CHUNK",
    "DESIRED",
    "DOWNLOADING",
    "FAILED",
    "HEALTH_OK",
    "HEALTH_WATCHING",
    "MAX_BUNDLE_BYTES",
    "MAX_REQ_INDEXES",
    "OTA",
    "OTA_USER_SUFFIX",
    "REQ",
    "ROLLED_BACK",
    "STATE",
    "STATES",
    "TERMINAL_STATES",
    "VALIDATING",
    "VERIFYING",
    "OtaDesired",
    "OtaRequest",
    "OtaStatePayload",
    "decode_chunk",
    "encode_chunk",
    "ota_topic",
    "parse_json",
]
