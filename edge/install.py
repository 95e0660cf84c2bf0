"""Installing a model bundle on the device: unpack, verify, check, golden run, atomic swap.

:func:`install_bundle` is the validation pipeline, with no network at all. It unpacks a
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
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from edge import bundle as _bundle
from edge.config import OtaConfig
from edge.enums import TextEnum
from edge.exceptions import (
    BundleError,
    ConfigError,
    LinewatchError,
    ModelLoadError,
    RuntimeUnavailable,
)
from edge.fsutil import fsync_dir, fsync_tree, sha256_file
from edge.inference import Classifier, GoldenResult, check_golden
from edge.models import CURRENT, PREVIOUS, VERSIONS, ModelStore
from edge.ota_wire import is_downgrade
from edge.protocol import Manifest, read_manifest
from edge.signing import verify_bundle

logger = logging.getLogger(__name__)

STAGING = "staging"


class InstallStage(TextEnum):
    """The stages of an OTA update, in order; every refusal names the one that refused.

    ``DESIRED``, ``TRANSFER`` and ``HEALTH`` are edge/ota.py's (the request, the download,
    the health watch after the switch); the ones between are :func:`install_bundle`'s.
    """

    DESIRED = "desired"
    TRANSFER = "transfer"
    STORE = "store"
    UNPACK = "unpack"
    SIGNATURE = "signature"
    MANIFEST = "manifest"
    CHECKSUM = "checksum"
    COMPATIBLE = "compatible"
    DOWNGRADE = "downgrade"
    LOAD = "load"
    GOLDEN = "golden"
    LATENCY = "latency"
    COMMIT = "commit"
    DONE = "done"
    HEALTH = "health"


@dataclass(frozen=True)
class InstallResult:
    """What :func:`install_bundle` did: ``ok`` and the live folder, or the stage and reason it refused."""

    ok: bool
    stage: InstallStage
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
            rmtree(p)
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
            rmtree(d)
            removed.append(str(d))
    return removed


def rmtree(path: Path) -> None:
    """Remove a file, link or folder tree; missing is fine."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The validation pipeline
# ---------------------------------------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, stage: InstallStage, reason: str) -> None:
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


@dataclass
class _Progress:
    """What the stages have learned so far: a refusal reports it too."""

    version: str | None = None
    manifest_sha: str | None = None
    key: str | None = None
    golden: GoldenResult | None = None


def _unpack(source: Path, staging: Path, bundle: Path) -> None:
    rmtree(staging)
    staging.mkdir(parents=True)
    try:
        if source.is_dir():
            shutil.copytree(source, bundle)
        else:
            unpack_bundle(source, bundle)
    except (BundleError, OSError) as exc:
        raise _Refused(InstallStage.UNPACK, str(exc)) from exc


def _verify_and_read(bundle: Path, ota_config: OtaConfig, progress: _Progress) -> tuple[Manifest, str]:
    """The signature, then the manifest it covers, and that manifest's sha256."""
    try:
        verified = verify_bundle(bundle, list(ota_config.trusted_keys), allow_unsigned=ota_config.allow_unsigned)
    except (BundleError, ConfigError) as exc:
        raise _Refused(InstallStage.SIGNATURE, str(exc)) from exc
    progress.key, progress.manifest_sha = verified.key_id, verified.manifest_sha256
    try:
        manifest = read_manifest(bundle)
    except BundleError as exc:
        raise _Refused(InstallStage.MANIFEST, str(exc)) from exc
    progress.version = manifest.version
    return manifest, verified.manifest_sha256


def _check_model_file(bundle: Path, manifest: Manifest) -> None:
    model_path = bundle / Path(manifest.model.file).name
    if Path(manifest.model.file).name != manifest.model.file or not model_path.is_file():
        raise _Refused(InstallStage.CHECKSUM, f"model file {manifest.model.file!r} is missing from the bundle")
    size = model_path.stat().st_size
    if size != manifest.model.bytes:
        raise _Refused(InstallStage.CHECKSUM, f"model file is {size} bytes, the manifest says {manifest.model.bytes}")
    actual = sha256_file(model_path)
    if actual != manifest.model.sha256:
        raise _Refused(
            InstallStage.CHECKSUM,
            f"model sha256 {actual[:12]}… does not match the manifest's {manifest.model.sha256[:12]}…; damaged in transit or altered",
        )


def _check_downgrade(manifest: Manifest, current: Classifier | None, allow_downgrade: bool) -> None:
    """Anti-rollback: an older model (known flaws, a weaker threshold) only on purpose."""
    if current is not None and not allow_downgrade and is_downgrade(manifest.version, current.version):
        raise _Refused(InstallStage.DOWNGRADE, f"version {manifest.version} is older than the running {current.version}; push it with"
                                        " --allow-downgrade if that is what you want")  # fmt: skip


def _check_compatibility(manifest: Manifest, current: Classifier | None) -> None:
    if current is not None:
        problems = check_compatible(manifest, current.manifest)
        if problems:
            raise _Refused(InstallStage.COMPATIBLE, "not compatible with the running model: " + "; ".join(problems))


def _load_and_check_golden(
    bundle: Path, manifest: Manifest, runtime: str | None, num_threads: int | None, progress: _Progress
) -> None:
    """Load the candidate, run its golden images and hold it to its latency budget."""
    try:
        candidate = Classifier(bundle, runtime=runtime, num_threads=num_threads, verify_checksum=False)
    except (ModelLoadError, RuntimeUnavailable, BundleError) as exc:
        raise _Refused(InstallStage.LOAD, str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - a runtime crash on a hostile model is a refusal too
        raise _Refused(InstallStage.LOAD, f"the runtime cannot load the model ({type(exc).__name__}: {exc})") from exc
    golden = progress.golden = check_golden(candidate)
    del candidate  # release the interpreter before the folder moves
    if not golden.ok:
        raise _Refused(InstallStage.GOLDEN, "golden images check failed: " + "; ".join(golden.failures[:3]))
    if golden.p50_invoke_ms > manifest.latency_budget_ms:
        raise _Refused(
            InstallStage.LATENCY,
            f"invoke p50 {golden.p50_invoke_ms:.2f} ms is over the manifest's budget of {manifest.latency_budget_ms} ms",
        )


def _commit(bundle: Path, final: Path, runtime: str | None, num_threads: int | None) -> tuple[Classifier, bool]:
    """Move the bundle into versions/ (durably) and load it from there; True when it was there already."""
    already = False
    try:
        if final.exists():
            # Installed before (e.g. pushed again to roll back to it): the folder on disk
            # came from a complete rename, keep it and drop the new copy.
            already = True
        else:
            fsync_tree(bundle)
            os.rename(bundle, final)
            fsync_dir(final.parent)
        live = Classifier(final, runtime=runtime, num_threads=num_threads)
    except (OSError, LinewatchError) as exc:
        raise _Refused(InstallStage.COMMIT, f"could not commit {final.name}: {exc}") from exc
    return live, already


def _activate(store: ModelStore, final: Path) -> None:
    try:
        store.activate(final)
    except (OSError, BundleError) as exc:
        raise _Refused(InstallStage.COMMIT, f"could not switch current to {final.name}: {exc}") from exc
    prune_versions(store)


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
    allow_downgrade: bool = False,
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
    progress = _Progress()
    try:
        if store.is_single_bundle:
            raise _Refused(
                InstallStage.STORE,
                f"{store.root} holds a single bundle; point model.path at a store folder to receive OTA updates",
            )
        _unpack(source, staging, bundle)
        manifest, manifest_sha = _verify_and_read(bundle, ota_config, progress)
        _check_downgrade(manifest, current, allow_downgrade)
        _check_model_file(bundle, manifest)
        _check_compatibility(manifest, current)
        _load_and_check_golden(bundle, manifest, runtime, num_threads, progress)
        final = store.install_dir(f"{manifest.version}-{manifest_sha[:12]}")
        live, already = _commit(bundle, final, runtime, num_threads)
        cur_link = store.root / CURRENT
        already_active = cur_link.exists() and cur_link.resolve() == final.resolve()
        if activate and not already_active:
            _activate(store, final)
        logger.info(
            "model %s installed at %s%s", manifest.version, final,
            " (already active)" if already_active else " (reused)" if already else "",
        )  # fmt: skip
        return InstallResult(
            ok=True,
            stage=InstallStage.DONE,
            version=manifest.version,
            path=final,
            manifest_sha256=manifest_sha,
            key_id=progress.key,
            golden=progress.golden,
            already_active=already_active,
            classifier=live,
        )
    except _Refused as refused:
        logger.warning("model %s refused at %s: %s", progress.version or source.name, refused.stage, refused.reason)
        return InstallResult(
            ok=False,
            stage=refused.stage,
            reason=refused.reason,
            version=progress.version,
            manifest_sha256=progress.manifest_sha,
            key_id=progress.key,
            golden=progress.golden,
        )
    finally:
        rmtree(staging)


__all__ = [
    "STAGING",
    "InstallResult",
    "InstallStage",
    "check_compatible",
    "install_bundle",
    "prune_versions",
    "recover_store",
    "rmtree",
    "unpack_bundle",
]
