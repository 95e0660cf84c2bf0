"""Over-the-air model updates on the device: receive, verify, validate, switch, watch.

Two layers, usable apart:

* :func:`install_bundle` is the validation pipeline, with no network at all. It unpacks a
  packed bundle (or copies a bundle folder) into ``<store>/staging/<id>/``, and refuses it
  unless every check passes, in this order:

  ========== ===========================================================================
  stage      check
  ========== ===========================================================================
  store      model.path is an OTA store folder, not a single bundle
  unpack     the .lwb tar is complete, holds only regular files and folders, no ``..``
  signature  signature.json verifies with a key in ``ota.trusted_keys`` (edge.signing)
  manifest   manifest.json validates (edge.protocol.Manifest)
  checksum   model.tflite matches the manifest's sha256 and size
  compatible same input shape and dtype, same labels and pass label as the running model
  load       the runtime (LiteRT, ...) loads it and its tensors match the manifest
  golden     every golden image gives the expected int8 output within golden_tolerance
  latency    golden invoke p50 within manifest.latency_budget_ms
  commit     files fsynced, staging renamed to versions/<version>-<manifest sha12>,
             then ModelStore.activate (atomic symlink rename)
  ========== ===========================================================================

  Any refusal removes the staging folder and leaves the store untouched. The ``current``
  link only ever moves by an atomic rename to a complete, fsynced, validated folder, so a
  ``kill -9`` at any moment leaves it on a working model (old or new).
  :func:`recover_store` removes leftover staging folders at start-up.

* :class:`OtaClient` receives bundles over MQTT (its own paho client, independent of the
  sync client), resumes transfers after cuts, runs :func:`install_bundle`, hands the new
  model to the agent, reports states, and rolls back when the new model misbehaves in its
  first ``ota.health_parts`` parts. The wire protocol is in docs/ota.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import queue
import shutil
import struct
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge import bundle as _bundle
from edge.bundle import pack_bundle
from edge.config import AgentConfig, OtaConfig
from edge.exceptions import (
    BundleError,
    ConfigError,
    LinewatchError,
    ModelLoadError,
    RuntimeUnavailable,
)
from edge.inference import Classifier, GoldenResult, Prediction, check_golden, sha256_file
from edge.models import CURRENT, PREVIOUS, VERSIONS, ModelStore
from edge.protocol import (
    MAX_PAYLOAD_BYTES,
    OTA_CHUNK_BYTES,
    Manifest,
    read_manifest,
    topic,
)
from edge.signing import verify_bundle

logger = logging.getLogger(__name__)

STAGING = "staging"
DOWNLOADS = "downloads"
# The largest packed bundle a desired message may announce (edge/bundle.py's unpack limit).
MAX_BUNDLE_BYTES = _bundle.MAX_UNPACKED_BYTES

# Stages of install_bundle, in order (reported with every refusal).
STAGE_STORE = "store"
STAGE_UNPACK = "unpack"
STAGE_SIGNATURE = "signature"
STAGE_MANIFEST = "manifest"
STAGE_CHECKSUM = "checksum"
STAGE_COMPATIBLE = "compatible"
STAGE_LOAD = "load"
STAGE_GOLDEN = "golden"
STAGE_LATENCY = "latency"
STAGE_COMMIT = "commit"
STAGE_DONE = "done"


@dataclass(frozen=True)
class InstallResult:
    """What :func:`install_bundle` did: ``ok`` and the live folder, or the stage and reason it refused."""

    ok: bool
    stage: str
    reason: str | None = None
    version: str | None = None
    path: Path | None = None
    manifest_sha256: str | None = None
    key_id: str | None = None
    golden: GoldenResult | None = None
    already_active: bool = False
    # The validated model loaded from its final folder, ready for Agent.swap_model.
    classifier: Classifier | None = field(default=None, compare=False, repr=False)


# ---------------------------------------------------------------------------------------------
# Packing: edge/bundle.py owns the .lwb format (deterministic tar, safe unpack).
# ---------------------------------------------------------------------------------------------


def unpack_bundle(packed: Path, dest: Path) -> Path:
    """:func:`edge.bundle.unpack_bundle`, with every failure as a :class:`BundleError`."""
    try:
        return _bundle.unpack_bundle(Path(packed), Path(dest))
    except (EOFError, zlib.error, ValueError) as exc:  # a damaged file may fail below tarfile's own errors
        raise BundleError(f"{Path(packed).name}: truncated or damaged packed bundle ({exc}); push it again") from exc


# ---------------------------------------------------------------------------------------------
# Store housekeeping
# ---------------------------------------------------------------------------------------------


def recover_store(store: ModelStore) -> list[str]:
    """Remove what an interrupted install left behind; returns what was removed.

    Leftover staging folders and half-made link files go; version folders that neither
    ``current`` nor ``previous`` point at (a crash between commit and activate) go too,
    as they would never be used. ``current`` itself is never touched.
    """
    removed: list[str] = []
    root = store.root
    staging = root / STAGING
    if staging.is_dir():
        for p in staging.iterdir():
            _rmtree(p)
            removed.append(str(p))
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((f".{CURRENT}.tmp-", f".{PREVIOUS}.tmp-")):
                p.unlink(missing_ok=True)
                removed.append(str(p))
    removed += prune_versions(store)
    if removed:
        logger.info("recovered model store %s: removed %s", root, ", ".join(removed))
    return removed


def prune_versions(store: ModelStore) -> list[str]:
    """Delete version folders that are neither current nor previous."""
    versions = store.root / VERSIONS
    if not versions.is_dir() or store.is_single_bundle:
        return []
    keep = {p.resolve() for p in (store.root / CURRENT, store.root / PREVIOUS) if p.exists()}
    removed = []
    for d in versions.iterdir():
        if d.resolve() not in keep:
            _rmtree(d)
            removed.append(str(d))
    return removed


def _rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every folder bottom-up, so a rename publishes complete data."""
    dirs: list[Path] = []
    for dirpath, _dirnames, filenames in os.walk(root):
        dirs.append(Path(dirpath))
        for name in filenames:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        _fsync_dir(d)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# The validation pipeline
# ---------------------------------------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


def check_compatible(new: Manifest, current: Manifest) -> list[str]:
    """Why ``new`` cannot replace ``current`` on this line (empty when it can)."""
    problems = []
    if new.input.shape != current.input.shape:
        problems.append(f"input shape {list(new.input.shape)} != running model's {list(current.input.shape)}")
    if new.input.dtype != current.input.dtype:
        problems.append(f"input dtype {new.input.dtype} != running model's {current.input.dtype}")
    if tuple(new.labels) != tuple(current.labels):
        problems.append(f"labels {list(new.labels)} != running model's {list(current.labels)}")
    if new.pass_label != current.pass_label:
        problems.append(f"pass label {new.pass_label!r} != running model's {current.pass_label!r}")
    return problems


def install_bundle(
    source: Path,
    store: ModelStore,
    ota_config: OtaConfig,
    current: Classifier | None,
    *,
    runtime: str | None = None,
    num_threads: int | None = None,
    activate: bool = True,
    staging_id: str | None = None,
) -> InstallResult:
    """Validate a packed bundle (``.lwb``) or bundle folder and make it the live model.

    Never raises for a bad bundle: the result says at which stage and why it was refused,
    and the store is then exactly as before. ``current`` is the running model the new
    one must be compatible with (None on a first install). With ``activate=False`` the
    bundle is validated and committed to versions/ but ``current`` is not switched.
    """
    source = Path(source)
    staging = store.root / STAGING / (staging_id or uuid.uuid4().hex[:12])
    bundle = staging / "bundle"
    version: str | None = None
    manifest_sha: str | None = None
    key: str | None = None
    golden: GoldenResult | None = None
    try:
        if store.is_single_bundle:
            raise _Refused(
                STAGE_STORE,
                f"{store.root} holds a single bundle; point model.path at a store folder to receive OTA updates",
            )
        # -- unpack ------------------------------------------------------------------------
        _rmtree(staging)
        staging.mkdir(parents=True)
        try:
            if source.is_dir():
                shutil.copytree(source, bundle)
            else:
                unpack_bundle(source, bundle)
        except (BundleError, OSError) as exc:
            raise _Refused(STAGE_UNPACK, str(exc)) from exc
        # -- signature ---------------------------------------------------------------------
        try:
            verified = verify_bundle(bundle, list(ota_config.trusted_keys), allow_unsigned=ota_config.allow_unsigned)
        except (BundleError, ConfigError) as exc:
            raise _Refused(STAGE_SIGNATURE, str(exc)) from exc
        key, manifest_sha = verified.key_id, verified.manifest_sha256
        # -- manifest ----------------------------------------------------------------------
        try:
            manifest = read_manifest(bundle)
        except BundleError as exc:
            raise _Refused(STAGE_MANIFEST, str(exc)) from exc
        version = manifest.version
        # -- checksum ----------------------------------------------------------------------
        model_path = bundle / Path(manifest.model.file).name
        if Path(manifest.model.file).name != manifest.model.file or not model_path.is_file():
            raise _Refused(STAGE_CHECKSUM, f"model file {manifest.model.file!r} is missing from the bundle")
        size = model_path.stat().st_size
        if size != manifest.model.bytes:
            raise _Refused(STAGE_CHECKSUM, f"model file is {size} bytes, the manifest says {manifest.model.bytes}")
        actual = sha256_file(model_path)
        if actual != manifest.model.sha256:
            raise _Refused(
                STAGE_CHECKSUM,
                f"model sha256 {actual[:12]}… does not match the manifest's {manifest.model.sha256[:12]}…; damaged in transit or altered",
            )
        # -- compatibility -----------------------------------------------------------------
        if current is not None:
            problems = check_compatible(manifest, current.manifest)
            if problems:
                raise _Refused(STAGE_COMPATIBLE, "not compatible with the running model: " + "; ".join(problems))
        # -- load --------------------------------------------------------------------------
        try:
            candidate = Classifier(bundle, runtime=runtime, num_threads=num_threads, verify_checksum=False)
        except (ModelLoadError, RuntimeUnavailable, BundleError) as exc:
            raise _Refused(STAGE_LOAD, str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - a runtime crash on a hostile model is a refusal too
            raise _Refused(STAGE_LOAD, f"the runtime cannot load the model ({type(exc).__name__}: {exc})") from exc
        # -- golden ------------------------------------------------------------------------
        golden = check_golden(candidate)
        del candidate  # release the interpreter before the folder moves
        if not golden.ok:
            raise _Refused(STAGE_GOLDEN, "golden images check failed: " + "; ".join(golden.failures[:3]))
        if golden.p50_invoke_ms > manifest.latency_budget_ms:
            raise _Refused(
                STAGE_LATENCY,
                f"invoke p50 {golden.p50_invoke_ms:.2f} ms is over the manifest's budget of {manifest.latency_budget_ms} ms",
            )
        # -- commit ------------------------------------------------------------------------
        final = store.install_dir(f"{version}-{manifest_sha[:12]}")
        already = False
        try:
            if final.exists():
                # Installed before (e.g. pushed again to roll back to it): the folder on disk
                # came from a complete rename, keep it and drop the new copy.
                already = True
            else:
                _fsync_tree(bundle)
                os.rename(bundle, final)
                _fsync_dir(final.parent)
            live = Classifier(final, runtime=runtime, num_threads=num_threads)
        except (OSError, LinewatchError) as exc:
            raise _Refused(STAGE_COMMIT, f"could not commit {final.name}: {exc}") from exc
        cur_link = store.root / CURRENT
        already_active = cur_link.exists() and cur_link.resolve() == final.resolve()
        if activate and not already_active:
            try:
                store.activate(final)
            except (OSError, BundleError) as exc:
                raise _Refused(STAGE_COMMIT, f"could not switch current to {final.name}: {exc}") from exc
            prune_versions(store)
        logger.info(
            "model %s installed at %s%s", version, final, " (already active)" if already_active else " (reused)" if already else ""
        )
        return InstallResult(
            ok=True,
            stage=STAGE_DONE,
            version=version,
            path=final,
            manifest_sha256=manifest_sha,
            key_id=key,
            golden=golden,
            already_active=already_active,
            classifier=live,
        )
    except _Refused as refused:
        logger.warning("model %s refused at %s: %s", version or source.name, refused.stage, refused.reason)
        return InstallResult(
            ok=False,
            stage=refused.stage,
            reason=refused.reason,
            version=version,
            manifest_sha256=manifest_sha,
            key_id=key,
            golden=golden,
        )
    finally:
        _rmtree(staging)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file (the packed bundle's transport checksum)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Wire: topics and payloads of the transfer (docs/ota.md). All under
# <prefix>/devices/<device_id>/ota/, so the broker ACL that confines a device to its own
# subtree covers OTA too.
#
#   desired  cloud -> device, RETAINED, JSON OtaDesired: the model this device should run
#   req      device -> cloud, JSON OtaRequest: send me these chunks of this transfer
#   chunk    cloud -> device, BINARY (encode_chunk): one chunk and its sha256
#   state    device -> cloud, RETAINED, JSON OtaStatePayload: where the update stands
# ---------------------------------------------------------------------------------------------

OTA = "ota"
DESIRED = "desired"
REQ = "req"
CHUNK = "chunk"
STATE = "state"
CHUNK_MAGIC = b"LWO1"
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

    @model_validator(mode="after")
    def _consistent(self) -> OtaDesired:
        given = [x is not None for x in (self.sha256, self.size, self.chunks)]
        if any(given) and not all(given):
            raise ValueError("sha256, size and chunks come together")
        if self.size is not None and self.chunks != -(-self.size // self.chunk_bytes):
            raise ValueError(f"{self.size} bytes in chunks of {self.chunk_bytes} make {-(-self.size // self.chunk_bytes)} chunks, not {self.chunks}")
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


# ---------------------------------------------------------------------------------------------
# A resumable download: the packed file at its offsets, one byte per chunk on disk
# ---------------------------------------------------------------------------------------------


class Download:
    """``downloads/<transfer>/``: ``meta.json`` (the desired message), ``bundle.part``
    (chunks written at their offsets) and ``bitmap``, one byte per chunk: 0 missing,
    1 written, 2 requested and not yet received (so a restarted device can wait for chunks
    its persistent MQTT session still holds instead of asking for them again).

    The bitmap byte is written after its chunk's data, so after a killed process every
    chunk marked received is in the file; fsync happens every second and at the end
    (after a power loss the whole-file sha256 catches what the page cache lost, and the
    transfer starts again).
    """

    def __init__(self, root: Path, desired: OtaDesired) -> None:
        assert desired.size is not None and desired.chunks is not None
        self.desired = desired
        self.dir = Path(root) / desired.transfer
        self.part = self.dir / "bundle.part"
        self.bitmap_path = self.dir / "bitmap"
        self.meta_path = self.dir / "meta.json"
        self.size = desired.size
        self.chunks = desired.chunks
        self.chunk_bytes = desired.chunk_bytes
        self.resumed = self._open_existing()
        if not self.resumed:
            self._create()
        self.received = sum(1 for b in self.bitmap if b == 1)
        self._last_sync = time.monotonic()

    def _open_existing(self) -> bool:
        try:
            meta = json.loads(self.meta_path.read_text())
            same = all(meta.get(k) == getattr(self.desired, k) for k in ("transfer", "sha256", "size", "chunk_bytes"))
            if not same or self.part.stat().st_size != self.size or self.bitmap_path.stat().st_size != self.chunks:
                return False
            self.bitmap = bytearray(self.bitmap_path.read_bytes())
        except (OSError, ValueError):
            return False
        if any(b not in (0, 1, 2) for b in self.bitmap):
            return False
        self._fd = os.open(self.part, os.O_RDWR)
        self._bfd = os.open(self.bitmap_path, os.O_RDWR)
        return True

    def _create(self) -> None:
        _rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self._fd = os.open(self.part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, self.size)
        self.bitmap = bytearray(self.chunks)
        self._bfd = os.open(self.bitmap_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self._bfd, bytes(self.bitmap))
        os.fsync(self._fd)
        os.fsync(self._bfd)
        # meta.json last: a folder without it is not a resumable download
        tmp = self.meta_path.with_name("meta.json.tmp")
        tmp.write_text(self.desired.model_dump_json())
        os.replace(tmp, self.meta_path)
        _fsync_dir(self.dir)

    def expected_len(self, index: int) -> int:
        return min(self.chunk_bytes, self.size - index * self.chunk_bytes)

    def missing(self) -> list[int]:
        """Chunks neither received nor requested."""
        return [i for i, b in enumerate(self.bitmap) if b == 0]

    def requested(self) -> list[int]:
        """Chunks requested (maybe before a restart) and not received yet."""
        return [i for i, b in enumerate(self.bitmap) if b == 2]

    def mark_requested(self, indexes: list[int]) -> None:
        for i in indexes:
            if self.bitmap[i] == 0:
                self.bitmap[i] = 2
                os.pwrite(self._bfd, b"\x02", i)

    @property
    def complete(self) -> bool:
        return self.received == self.chunks

    def has(self, index: int) -> bool:
        return self.bitmap[index] == 1

    def write(self, index: int, data: bytes) -> None:
        os.pwrite(self._fd, data, index * self.chunk_bytes)
        os.pwrite(self._bfd, b"\x01", index)
        self.bitmap[index] = 1
        self.received += 1
        if time.monotonic() - self._last_sync > 1.0:
            self.sync()

    def sync(self) -> None:
        if self._fd < 0:
            return
        os.fsync(self._fd)
        os.fsync(self._bfd)
        self._last_sync = time.monotonic()

    def reset(self) -> None:
        """Forget every chunk (the whole file failed its sha256)."""
        self.bitmap = bytearray(self.chunks)
        os.pwrite(self._bfd, bytes(self.bitmap), 0)
        self.received = 0
        self.sync()

    def close(self) -> None:
        for fd in (self._fd, self._bfd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._bfd = -1

    def remove(self) -> None:
        self.close()
        _rmtree(self.dir)


# ---------------------------------------------------------------------------------------------
# Health watch after a switch
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HealthVerdict:
    """The end of a health watch: ``ok`` or the reason to roll back."""

    ok: bool
    version: str
    parts: int
    reason: str | None = None


class HealthWatch:
    """Watches the first ``parts`` decisions of a new model against the previous one's.

    Rollback when, among those parts:
      * any output is NaN/inf (at once);
      * invoke errors exceed max(2, parts/20) (at once);
      * at the end, every raw output was identical while the previous model's were not;
      * at the end, the fail rate is over 2 x the previous model's + 0.10 (needs 20
        decisions of the previous model to compare with).
    """

    def __init__(self, version: str, parts: int, baseline: Sequence[tuple[bool, tuple[int, ...]]]) -> None:
        self.version = version
        self.parts = parts
        self.baseline = list(baseline)
        self.seen = 0
        self.failed = 0
        self.errors = 0
        self.raws: set[tuple[int, ...]] = set()
        self.verdict: HealthVerdict | None = None

    def _trip(self, reason: str) -> HealthVerdict:
        self.verdict = HealthVerdict(False, self.version, self.seen, reason)
        return self.verdict

    def add(self, prediction: Prediction) -> HealthVerdict | None:
        """Count one decision of the new model; returns the verdict once there is one."""
        if self.verdict is not None:
            return None
        self.seen += 1
        values = (prediction.score, *prediction.probabilities)
        if not all(math.isfinite(x) for x in values):
            return self._trip(f"non-finite output (NaN or inf) at part {self.seen}")
        self.failed += 0 if prediction.passed else 1
        if len(self.raws) < 2:
            self.raws.add(tuple(prediction.raw))
        return self._maybe_finish()

    def add_error(self, error: str) -> HealthVerdict | None:
        """Count one invoke error of the new model."""
        if self.verdict is not None:
            return None
        self.seen += 1
        self.errors += 1
        if self.errors > max(2, self.parts // 20):
            return self._trip(f"{self.errors} invoke errors in {self.seen} parts (last: {error[:200]})")
        return self._maybe_finish()

    def _maybe_finish(self) -> HealthVerdict | None:
        if self.seen < self.parts:
            return None
        decided = self.seen - self.errors
        base = self.baseline
        if decided >= 2 and len(self.raws) == 1 and len(base) >= 10 and len({r for _, r in base}) > 1:
            return self._trip(f"constant output {list(next(iter(self.raws)))} over {decided} parts")
        if len(base) >= 20 and decided > 0:
            prev_rate = sum(1 for passed, _ in base if not passed) / len(base)
            rate = self.failed / decided
            if rate > 2 * prev_rate + 0.10:
                return self._trip(f"fail rate {rate:.0%} over {decided} parts, previous model {prev_rate:.0%}")
        self.verdict = HealthVerdict(True, self.version, self.seen)
        return self.verdict


# ---------------------------------------------------------------------------------------------
# The device side of the transfer
# ---------------------------------------------------------------------------------------------


class AgentLike(Protocol):
    """What :class:`OtaClient` needs from the agent (edge.agent.Agent has all of it)."""

    classifier: Classifier

    def swap_model(self, classifier: Classifier) -> None: ...

    def note_event(self, kind: str, **detail: Any) -> None: ...


STATE_FILE = "ota-state.json"
# The broker keeps an offline device's OTA session (and chunks sent to it) this long.
SESSION_EXPIRY_S = 3600
OTA_THREAD_NICE = 10
# After a reconnect to a kept session, how long to wait for replies to earlier requests.
RESUME_GRACE_S = 1.0


class OtaClient:
    """Receives models over MQTT, installs them with :func:`install_bundle`, watches them.

    Runs its own paho client (client id ``<device_id>-ota``) and one worker thread that
    owns the download and the store; MQTT callbacks only queue messages for it, so a slow
    disk never stalls the network loop and nothing here ever blocks inspection. The
    agent calls :meth:`observe` (and :meth:`observe_error`) once per decision.

    ``agent`` may be None (a bench or a box without the inspection loop): the store is
    then still updated, and the running model is read from it.
    """

    def __init__(
        self,
        config: AgentConfig,
        agent: AgentLike | None = None,
        *,
        window: int = 4,
        request_timeout_s: float = 5.0,
        progress_interval_s: float = 1.0,
    ) -> None:
        self.config = config
        self.agent = agent
        self.store = ModelStore(config.model.path)
        self.prefix = config.mqtt.topic_prefix
        self.device_id = config.device_id
        self.window = max(1, window)
        self.request_timeout_s = request_timeout_s
        self.progress_interval_s = progress_interval_s
        self.stop_event = threading.Event()
        self.stats: dict[str, int] = {
            "chunks": 0, "duplicates": 0, "corrupt": 0, "unknown_transfer": 0, "bad_messages": 0,
            "requests": 0, "requested_chunks": 0, "re_requested": 0, "bytes_in": 0, "bytes_out": 0,
            "installs": 0, "refusals": 0, "rollbacks": 0,
        }  # fmt: skip
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._connected = threading.Event()
        self._client: mqtt.Client | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._current: Classifier | None = agent.classifier if agent is not None else None
        self._desired: OtaDesired | None = None
        self._dl: Download | None = None
        self._todo: deque[int] = deque()
        self._outstanding: dict[int, float] = {}
        self._verify_failures = 0
        self._session_present: bool | None = None  # of the last connection; None before one
        self._last_progress = 0.0
        self._persisted: dict[str, Any] = {}
        self._last_state: OtaStatePayload | None = None
        self._watch: HealthWatch | None = None
        self._baseline: deque[tuple[bool, tuple[int, ...]]] = deque(maxlen=max(50, min(1000, config.ota.health_parts)))

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect (in the background: a missing broker never blocks) and start the worker."""
        if not self.store.is_single_bundle:
            recover_store(self.store)
        self._persisted = self._load_persisted()
        cfg = self.config.mqtt
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"{self.device_id}-ota", protocol=mqtt.MQTTv5
        )
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            client.tls_set(
                ca_certs=str(cfg.ca_file) if cfg.ca_file else None,
                certfile=str(cfg.cert_file) if cfg.cert_file else None,
                keyfile=str(cfg.key_file) if cfg.key_file else None,
            )
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        # Before connecting: chunks the broker kept for our session must find their download.
        self._restore_download()
        # A persistent session: chunks in flight when the link or this process dies wait in
        # the broker and arrive after the reconnect, so they are not requested twice.
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive_s, clean_start=False, properties=props)
        client.loop_start()
        self._thread = threading.Thread(target=self._main, name="ota", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stop_event.set()

    def join(self, timeout: float = 2.0) -> None:
        """Disconnect, wait for the worker, keep what arrived; a download resumes next start.

        The link goes first so that no chunk is acknowledged to the broker and then lost:
        chunks already received are written before returning, the rest wait in the
        broker's session for the next start.
        """
        deadline = time.monotonic() + timeout
        if self._client is not None:
            try:
                self._client.disconnect()
            finally:
                self._client.loop_stop()
        if self._thread is not None:
            self._thread.join(max(0.05, deadline - time.monotonic()))
        if self._thread is None or not self._thread.is_alive():
            self._drain_chunks()
        if self._dl is not None:
            self._dl.sync()
            self._dl.close()

    def _drain_chunks(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == CHUNK:
                try:
                    self._handle_chunk(item)
                except OSError as exc:
                    logger.warning("chunk not kept at shutdown: %s", exc)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def state(self) -> dict[str, Any] | None:
        """The last state reported (for the agent's status), or None before any update."""
        s = self._last_state
        return None if s is None else s.model_dump(exclude_none=True)

    # -- hooks the agent calls -------------------------------------------------------------

    def observe(self, prediction: Prediction, model_version: str | None = None) -> None:
        """One decision of the running model (cheap: called by the inspection loop per part)."""
        version = model_version or self._running_version()
        with self._lock:
            watch = self._watch
            if watch is not None and version == watch.version:
                verdict = watch.add(prediction)
                if verdict is not None:
                    self._inbox.put(("health", verdict))
            else:
                self._baseline.append((prediction.passed, tuple(prediction.raw)))

    def observe_error(self, error: BaseException | str, model_version: str | None = None) -> None:
        """One frame the running model could not decide (invoke error)."""
        version = model_version or self._running_version()
        with self._lock:
            watch = self._watch
            if watch is not None and version == watch.version:
                verdict = watch.add_error(str(error))
                if verdict is not None:
                    self._inbox.put(("health", verdict))

    def _running_version(self) -> str | None:
        clf = self.agent.classifier if self.agent is not None else self._current
        return clf.version if clf is not None else None

    # -- MQTT callbacks (paho's thread): queue and return ----------------------------------

    def _on_connect(self, client: mqtt.Client, _userdata: Any, flags: Any, reason_code: Any, _props: Any) -> None:
        if reason_code.is_failure:
            logger.warning("OTA connection to %s:%s refused: %s", self.config.mqtt.host, self.config.mqtt.port, reason_code)
            return
        _lower_priority()  # paho's network thread: the line's inference comes first
        client.subscribe(
            [(ota_topic(self.prefix, self.device_id, DESIRED), 1), (ota_topic(self.prefix, self.device_id, CHUNK), 1)]
        )
        self._connected.set()
        self._inbox.put(("connected", bool(getattr(flags, "session_present", False))))

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        self._connected.clear()
        if not self.stop_event.is_set():
            logger.info("OTA link lost (%s); reconnecting", reason_code)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.stats["bytes_in"] += len(msg.payload) + len(msg.topic)
        kind = msg.topic.rsplit("/", 1)[-1]
        if kind in (DESIRED, CHUNK):
            self._inbox.put((kind, bytes(msg.payload)))

    def _publish(self, kind: str, payload: bytes, *, retain: bool = False) -> None:
        if self._client is None:
            return
        name = ota_topic(self.prefix, self.device_id, kind)
        self.stats["bytes_out"] += len(payload) + len(name)
        self._client.publish(name, payload, qos=1, retain=retain)

    # -- the worker ------------------------------------------------------------------------

    def _main(self) -> None:
        _lower_priority()
        while not self.stop_event.is_set():
            try:
                kind, item = self._inbox.get(timeout=0.2)
            except queue.Empty:
                kind, item = "", None
            try:
                if kind == "connected":
                    self._handle_connected(bool(item))
                elif kind == DESIRED:
                    self._handle_desired(item)
                elif kind == CHUNK:
                    self._handle_chunk(item)
                elif kind == "health":
                    self._handle_health(item)
                self._pump()
            except Exception:  # noqa: BLE001 - the OTA worker must outlive any one bad update
                logger.exception("OTA worker error (continuing)")
                time.sleep(0.2)

    def _handle_connected(self, session_present: bool) -> None:
        self._session_present = session_present
        if self._last_state is not None:
            # the broker may have lost the retained state (restart without persistence)
            self._publish(STATE, self._last_state.model_dump_json(exclude_none=True).encode(), retain=True)
        if self._dl is None:
            return
        if session_present:
            # the broker kept our session: replies to requests in flight come right after
            # the CONNACK; wait RESUME_GRACE_S for them before asking again
            since = time.monotonic() - max(0.0, self.request_timeout_s - RESUME_GRACE_S)
            for i in self._outstanding:
                self._outstanding[i] = since
        else:
            # session lost (new broker, expired): those replies are gone, ask again
            self._todo.extendleft(sorted(self._outstanding, reverse=True))
            self._outstanding.clear()

    def _handle_desired(self, payload: bytes) -> None:
        if not payload:
            return  # retained message cleared by the cloud
        try:
            desired = parse_json(OtaDesired, payload)
        except ValueError as exc:
            self.stats["bad_messages"] += 1
            logger.warning("ignoring a bad OTA desired message: %s", exc)
            return
        if desired.device_id != self.device_id:
            self.stats["bad_messages"] += 1
            return
        if self._dl is not None and self._dl.desired.transfer == desired.transfer and self._dl.desired.sha256 == desired.sha256:
            self._desired = desired  # the same delivery announced again (reconnect): carry on
            return
        done = self._persisted
        if done.get("transfer") == desired.transfer and done.get("state") in (FAILED, ROLLED_BACK):
            # Already refused or rolled back: never retried automatically; re-report.
            self._desired = desired
            self._report(done["state"], desired, reason=done.get("reason"), stage=done.get("stage"), note=False)
            return
        self._abandon_download()
        self._prune_downloads(keep=desired.transfer)
        self._desired = desired
        running = self._running_version()
        if running == desired.version:
            same = done.get("transfer") == desired.transfer
            watching = self._watch is not None and self._watch.verdict is None
            if same and done.get("health") == HEALTH_WATCHING and not watching:
                # restarted during the health watch: watch again (no baseline: NaN and errors only)
                with self._lock:
                    self._watch = HealthWatch(desired.version, self.config.ota.health_parts, [])
                watching = True
            self._finish(ACTIVE, desired, health=HEALTH_WATCHING if watching else HEALTH_OK, note=not same)
            return
        prev = self.store.previous() if not self.store.is_single_bundle else None
        if prev is not None and _version_of(prev) == desired.version:
            self._switch_to_previous(desired)
            return
        if not desired.download:
            self._finish(FAILED, desired, stage="desired", reason=f"version {desired.version} is not on this device and no download was offered")
            return
        if self.store.is_single_bundle:
            self._finish(FAILED, desired, stage=STAGE_STORE, reason=f"{self.store.root} holds a single bundle; point model.path at a store folder to receive OTA updates")
            return
        self._start_download(desired)

    def _abandon_download(self) -> None:
        """Drop the download in progress (a newer desired replaced it); its folder goes too."""
        if self._dl is not None:
            self._dl.remove()
            self._dl = None
        self._todo.clear()
        self._outstanding.clear()

    def _prune_downloads(self, keep: str) -> None:
        """Partial downloads of older desired messages are never needed again."""
        downloads = self.store.root / DOWNLOADS
        if self.store.is_single_bundle or not downloads.is_dir():
            return
        for p in downloads.iterdir():
            if p.name != keep:
                _rmtree(p)

    def _restore_download(self) -> None:
        """Pick up the download a previous run left (its meta.json is the desired message)."""
        downloads = self.store.root / DOWNLOADS
        if self.store.is_single_bundle or not downloads.is_dir():
            return
        for d in sorted(downloads.iterdir()):
            try:
                desired = parse_json(OtaDesired, (d / "meta.json").read_bytes())
            except (OSError, ValueError):
                continue
            done = self._persisted
            if desired.device_id != self.device_id or not desired.download or done.get("transfer") == desired.transfer:
                continue
            self._desired = desired
            self._start_download(desired)
            return

    def _start_download(self, desired: OtaDesired) -> None:
        dl = Download(self.store.root / DOWNLOADS, desired)
        self._dl = dl
        self._todo = deque(dl.missing())
        self._outstanding.clear()
        if self._session_present is False:
            self._todo.extendleft(reversed(dl.requested()))
        else:
            # requested before a restart: the broker may still hold the replies for us
            since = time.monotonic() - max(0.0, self.request_timeout_s - RESUME_GRACE_S)
            self._outstanding = {i: since for i in dl.requested()}
        self._verify_failures = 0
        logger.info(
            "OTA %s: %s %s (%d bytes, %d chunks, %d already here)",
            desired.transfer, "resuming" if dl.resumed else "downloading", desired.version, desired.size, desired.chunks, dl.received,
        )
        self._report(DOWNLOADING, desired, note=True, detail={"size": desired.size, "resumed": dl.received})

    def _handle_chunk(self, payload: bytes) -> None:
        try:
            transfer, index, digest, data = decode_chunk(payload)
        except ValueError:
            self.stats["bad_messages"] += 1
            return
        dl = self._dl
        if dl is None or transfer != dl.desired.transfer:
            self.stats["unknown_transfer"] += 1
            return
        if not 0 <= index < dl.chunks:
            self.stats["bad_messages"] += 1
            return
        self._outstanding.pop(index, None)
        if dl.has(index):
            self.stats["duplicates"] += 1
            return
        if hashlib.sha256(data).digest() != digest or len(data) != dl.expected_len(index):
            self.stats["corrupt"] += 1
            self._todo.appendleft(index)  # ask again at once
            return
        dl.write(index, data)
        self.stats["chunks"] += 1

    def _pump(self) -> None:
        dl = self._dl
        if dl is None:
            return
        if dl.complete:
            self._complete_download(dl)
            return
        now = time.monotonic()
        late = [i for i, t in self._outstanding.items() if now - t > self.request_timeout_s]
        for i in sorted(late, reverse=True):
            del self._outstanding[i]
            self._todo.appendleft(i)
            self.stats["re_requested"] += 1
        if self._connected.is_set():
            want: list[int] = []
            while self._todo and len(self._outstanding) + len(want) < self.window and len(want) < MAX_REQ_INDEXES:
                i = self._todo.popleft()
                if not dl.has(i) and i not in self._outstanding:
                    want.append(i)
            if want:
                req = OtaRequest(v=1, device_id=self.device_id, transfer=dl.desired.transfer, indexes=want)
                self._publish(REQ, req.model_dump_json().encode())
                self.stats["requests"] += 1
                self.stats["requested_chunks"] += len(want)
                for i in want:
                    self._outstanding[i] = now
                dl.mark_requested(want)
        if now - self._last_progress >= self.progress_interval_s:
            self._report(DOWNLOADING, dl.desired, note=False)

    def _complete_download(self, dl: Download) -> None:
        desired = dl.desired
        self._report(VERIFYING, desired, note=True)
        dl.sync()
        actual = file_sha256(dl.part)
        if actual != desired.sha256:
            self._verify_failures += 1
            if self._verify_failures >= 2:
                dl.remove()
                self._dl = None
                self._finish(FAILED, desired, stage="transfer", reason=f"packed bundle sha256 {actual[:12]}… != {str(desired.sha256)[:12]}… twice; the registry copy may be damaged")
                return
            logger.warning("OTA %s: whole-file sha256 mismatch; downloading again", desired.transfer)
            dl.reset()
            self._todo = deque(dl.missing())
            self._outstanding.clear()
            self._report(DOWNLOADING, desired, note=True, detail={"restart": "sha256 mismatch"})
            return
        self._report(VALIDATING, desired, note=True)
        result = install_bundle(
            dl.part, self.store, self.config.ota, self._current_classifier(),
            runtime=self.config.model.runtime, num_threads=self.config.model.threads,
        )  # fmt: skip
        dl.remove()
        self._dl = None
        if not result.ok:
            self.stats["refusals"] += 1
            self._finish(FAILED, desired, stage=result.stage, reason=result.reason)
            return
        self.stats["installs"] += 1
        if result.version != desired.version:
            logger.warning("OTA %s: bundle version %s, desired said %s", desired.transfer, result.version, desired.version)
        assert result.classifier is not None
        if not result.already_active:
            self._swap(result.classifier)
            with self._lock:
                self._watch = HealthWatch(result.classifier.version, self.config.ota.health_parts, list(self._baseline))
        self._finish(ACTIVE, desired, health=HEALTH_WATCHING if not result.already_active else HEALTH_OK)

    def _current_classifier(self) -> Classifier | None:
        if self._current is None and not self.store.is_single_bundle:
            try:
                self._current = Classifier(self.store.current(), runtime=self.config.model.runtime)
            except LinewatchError as exc:
                logger.warning("no running model to compare the new one with: %s", exc)
        return self._current

    def _swap(self, classifier: Classifier) -> None:
        self._current = classifier
        if self.agent is not None:
            self.agent.swap_model(classifier)

    def _switch_to_previous(self, desired: OtaDesired) -> None:
        """The desired version is the one kept for rollback: switch back without a download."""
        try:
            clf, reason = self._load_previous()
        except LinewatchError as exc:
            self._finish(FAILED, desired, stage=STAGE_LOAD, reason=f"kept previous model unusable: {exc}")
            return
        if reason:
            self._finish(FAILED, desired, stage=STAGE_GOLDEN, reason=reason)
            return
        self.store.rollback()
        with self._lock:
            self._watch = None
        self._swap(clf)
        self._finish(ACTIVE, desired, health=HEALTH_OK, detail={"switched_to": "previous"})

    def _load_previous(self) -> tuple[Classifier, str | None]:
        prev = self.store.previous()
        if prev is None:
            raise BundleError(f"no previous model in {self.store.root}")
        clf = Classifier(prev, runtime=self.config.model.runtime, num_threads=self.config.model.threads)
        golden = check_golden(clf)
        return clf, None if golden.ok else "previous model fails its golden images: " + "; ".join(golden.failures[:3])

    def _handle_health(self, verdict: HealthVerdict) -> None:
        desired = self._desired
        with self._lock:
            if self._watch is None or self._watch.version != verdict.version:
                return
            self._watch = None
        if verdict.ok:
            logger.info("model %s healthy after %d parts", verdict.version, verdict.parts)
            if self.agent is not None:
                self.agent.note_event("ota_healthy", version=verdict.version, parts=verdict.parts)
            if desired is not None and desired.version == verdict.version:
                self._finish(ACTIVE, desired, health=HEALTH_OK, note=False)
            return
        logger.warning("model %s unhealthy: %s; rolling back", verdict.version, verdict.reason)
        try:
            clf, golden_problem = self._load_previous()
            if golden_problem:
                raise BundleError(golden_problem)
            self.store.rollback()
        except LinewatchError as exc:
            logger.error("cannot roll back from %s: %s; keeping it", verdict.version, exc)
            if desired is not None:
                self._finish(ACTIVE, desired, health="unhealthy", reason=f"{verdict.reason}; rollback impossible: {exc}")
            return
        self._swap(clf)
        self.stats["rollbacks"] += 1
        if desired is not None:
            self._finish(ROLLED_BACK, desired, stage="health", reason=verdict.reason, detail={"to": clf.version})

    # -- reporting -------------------------------------------------------------------------

    def _report(
        self,
        state: str,
        desired: OtaDesired,
        *,
        stage: str | None = None,
        reason: str | None = None,
        health: str | None = None,
        note: bool = True,
        detail: dict[str, Any] | None = None,
    ) -> None:
        dl = self._dl if self._dl is not None and self._dl.desired.transfer == desired.transfer else None
        payload = OtaStatePayload(
            v=1,
            device_id=self.device_id,
            state=state,  # type: ignore[arg-type]
            transfer=desired.transfer,
            rollout=desired.rollout,
            version=desired.version,
            model_version=self._running_version_after_swap(),
            received=dl.received if dl is not None else None,
            chunks=desired.chunks,
            stage=stage,
            reason=reason[:1000] if reason else None,
            health=health,
            ts=time.time(),
        )
        if note and self.agent is not None:
            extra = {k: v for k, v in (("stage", stage), ("reason", reason), ("health", health)) if v}
            self.agent.note_event(f"ota_{state}", version=desired.version, transfer=desired.transfer, rollout=desired.rollout, **extra, **(detail or {}))
        self._last_progress = time.monotonic()
        self._publish(STATE, payload.model_dump_json(exclude_none=True).encode(), retain=True)
        self._last_state = payload

    def _running_version_after_swap(self) -> str | None:
        # The agent picks a swapped model up at its next frame; report the one handed over.
        clf = self._current or (self.agent.classifier if self.agent is not None else None)
        return clf.version if clf is not None else None

    def _finish(self, state: str, desired: OtaDesired, **kwargs: Any) -> None:
        self._report(state, desired, **kwargs)
        self._persisted = {
            "transfer": desired.transfer, "rollout": desired.rollout, "version": desired.version, "state": state,
            "stage": kwargs.get("stage"), "reason": kwargs.get("reason"), "health": kwargs.get("health"), "ts": time.time(),
        }  # fmt: skip
        self._save_persisted()

    def _state_path(self) -> Path:
        return self.store.root / STATE_FILE

    def _load_persisted(self) -> dict[str, Any]:
        if self.store.is_single_bundle:
            return {}
        try:
            raw = json.loads(self._state_path().read_text())
            return raw if isinstance(raw, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_persisted(self) -> None:
        if self.store.is_single_bundle:
            return
        path = self._state_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self._persisted))
        os.replace(tmp, path)


def _lower_priority() -> None:
    """Nice the calling thread (Linux: per thread) so OTA work yields to inspection."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed: normal priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), OTA_THREAD_NICE)


def _version_of(bundle_dir: Path) -> str | None:
    try:
        return read_manifest(bundle_dir).version
    except BundleError:
        return None


__all__ = [
    "ACTIVE",
    "DOWNLOADING",
    "FAILED",
    "ROLLED_BACK",
    "VALIDATING",
    "VERIFYING",
    "Download",
    "HealthVerdict",
    "HealthWatch",
    "InstallResult",
    "OtaClient",
    "OtaDesired",
    "OtaRequest",
    "OtaStatePayload",
    "check_compatible",
    "decode_chunk",
    "encode_chunk",
    "install_bundle",
    "ota_topic",
    "pack_bundle",
    "prune_versions",
    "recover_store",
    "unpack_bundle",
]
