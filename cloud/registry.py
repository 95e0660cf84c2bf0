"""The model registry: signed, packed bundles stored by content, indexed in the cloud store.

Files::

    <data_dir>/registry/<sha256 of the packed file>.lwb    signed, packed bundles
    <data_dir>/keys/signing.key                            Ed25519 private key (0600)
    <data_dir>/keys/signing.pub                            public key: copy to every box

The index lives in the cloud store's SQLite file, in tables this module adds with its own
migrations (recorded in the store's ``_migrations`` table under ``ota_*`` names):

    ota_models        one row per registered bundle: version (unique), sha256 of the packed
                      file, size, manifest, metrics, key id
    ota_rollouts      one row per ``cloud push`` (cloud/rollout.py)
    ota_deployments   one row per (rollout, device): phase, previous version, last state
    ota_transfers     transfer id -> packed file and chunk size, so any chunk server can serve
    ota_device_state  the last ``ota/state`` message of every device

``add`` refuses a bundle whose manifest is invalid, whose model does not match its sha256,
or (by default) whose golden images fail on this machine's runtime, and signs the
manifest before packing, so only bundles that pass here ever reach a device.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from cloud.config import CloudConfig
from cloud.exceptions import CloudError
from cloud.store import SQLiteStore, open_store
from edge.bundle import pack_bundle
from edge.exceptions import LinewatchError
from edge.fsutil import atomic_write, sha256_file
from edge.inference import Classifier, check_golden
from edge.install import unpack_bundle
from edge.protocol import MANIFEST_FILE, PACKED_SUFFIX, read_manifest
from edge.signing import (
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    sign_bundle,
    verify_bundle,
)
from edge.sqlite import Migration, NamedLedger, run_migrations, write_transaction

logger = logging.getLogger(__name__)

REGISTRY_DIR = "registry"
KEYS_DIR = "keys"


# -- schema -------------------------------------------------------------------------------------


def _ota_001(db: sqlite_utils.Database) -> None:
    db.create_table(
        "ota_models",
        {"sha256": str, "version": str, "name": str, "size": int, "model_sha256": str, "manifest_sha256": str,
         "key_id": str, "created": str, "added": float, "manifest": str, "metrics": str, "file": str},
        pk="sha256", not_null=["sha256", "version"],
    )  # fmt: skip
    db.table("ota_models").create_index(["version"], unique=True)
    db.create_table(
        "ota_rollouts",
        {"id": str, "version": str, "sha256": str, "target": str, "devices": str, "canary": str,
         "min_success": float, "state": str, "message": str, "created": float, "updated": float},
        pk="id",
    )  # fmt: skip
    db.create_table(
        "ota_deployments",
        {"rollout": str, "device_id": str, "phase": str, "previous_version": str, "transfer": str,
         "desired_version": str, "state": str, "received": int, "chunks": int, "stage": str, "reason": str,
         "health": str, "model_version": str, "updated": float},
        pk=("rollout", "device_id"),
    )  # fmt: skip
    db.create_table(
        "ota_transfers",
        {"transfer": str, "sha256": str, "chunk_bytes": int, "size": int, "chunks": int, "created": float},
        pk="transfer",
    )
    db.create_table(
        "ota_device_state",
        {"device_id": str, "state": str, "transfer": str, "rollout": str, "version": str, "model_version": str,
         "received": int, "chunks": int, "stage": str, "reason": str, "health": str, "ts": float, "updated": float},
        pk="device_id",
    )  # fmt: skip


OTA_MIGRATIONS: list[Migration] = [Migration("ota_001_registry_rollouts", _ota_001)]


def ensure_schema(db: sqlite_utils.Database) -> None:
    """Apply the OTA migrations to an open cloud store, each in its own transaction."""
    run_migrations(db, OTA_MIGRATIONS, NamedLedger(), what="cloud store")


def open_ota_store(config: CloudConfig) -> SQLiteStore:
    """The cloud store (read-write) with the OTA tables in place."""
    store = open_store(config)
    try:
        ensure_schema(store.db)
    except sqlite3.Error as exc:
        store.close()
        raise CloudError(f"{config.store.path}: cannot add the OTA tables ({exc})") from exc
    return store


# -- keys ---------------------------------------------------------------------------------------


def private_key_path(config: CloudConfig) -> Path:
    return config.data_dir / KEYS_DIR / PRIVATE_KEY_FILE


def public_key_path(config: CloudConfig) -> Path:
    return config.data_dir / KEYS_DIR / PUBLIC_KEY_FILE


def init_keys(config: CloudConfig, *, force: bool = False) -> tuple[str, Path, Path]:
    """Create the cloud's signing key pair; returns ``(key_id, private path, public path)``."""
    priv, pub = private_key_path(config), public_key_path(config)
    kid = generate_keypair(priv, pub, overwrite=force)
    return kid, priv, pub


# -- registry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisteredModel:
    """One signed, packed bundle in the registry."""

    sha256: str  # of the packed file: the transport checksum devices verify
    version: str
    name: str
    size: int
    path: Path
    model_sha256: str
    manifest_sha256: str
    key_id: str | None
    created: str
    added: float
    metrics: dict[str, Any]
    manifest: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """JSON-friendly view for the CLI."""
        return {
            "version": self.version, "name": self.name, "sha256": self.sha256, "size": self.size,
            "model_sha256": self.model_sha256, "key_id": self.key_id, "created": self.created,
            "added": self.added, "path": str(self.path), "metrics": self.metrics,
        }  # fmt: skip


class Registry:
    """Content-addressed packed bundles under ``<data_dir>/registry`` plus their index rows."""

    def __init__(self, config: CloudConfig, store: SQLiteStore) -> None:
        self.config = config
        self.store = store
        self.root = config.data_dir / REGISTRY_DIR

    def _row_to_model(self, row: sqlite3.Row | dict[str, Any]) -> RegisteredModel:
        r = dict(row)
        return RegisteredModel(
            sha256=r["sha256"], version=r["version"], name=r["name"], size=int(r["size"]),
            path=self.root / r["file"], model_sha256=r["model_sha256"], manifest_sha256=r["manifest_sha256"],
            key_id=r["key_id"], created=r["created"], added=float(r["added"]),
            metrics=json.loads(r["metrics"] or "{}"), manifest=json.loads(r["manifest"] or "{}"),
        )  # fmt: skip

    def list(self) -> list[RegisteredModel]:
        """Every registered bundle, newest first."""
        rows = self.store.db.conn.execute("SELECT * FROM ota_models ORDER BY added DESC").fetchall()
        return [self._row_to_model(r) for r in rows]

    def find(self, ref: str) -> RegisteredModel | None:
        """By version, or by sha256 of the packed file (a unique prefix of 8+ hex is enough)."""
        conn = self.store.db.conn
        row = conn.execute("SELECT * FROM ota_models WHERE version = ?", (ref,)).fetchone()
        if row is None and len(ref) >= 8 and all(c in "0123456789abcdef" for c in ref):
            rows = conn.execute("SELECT * FROM ota_models WHERE sha256 LIKE ?", (ref + "%",)).fetchall()
            row = rows[0] if len(rows) == 1 else None
        return None if row is None else self._row_to_model(row)

    def get(self, ref: str) -> RegisteredModel:
        """Like :meth:`find`; :class:`CloudError` names the registered versions when missing."""
        model = self.find(ref)
        if model is None:
            known = ", ".join(m.version for m in self.list()[:10]) or "none"
            raise CloudError(f"no model {ref!r} in the registry (registered: {known}); add it with `linewatch cloud models add BUNDLE`")
        if not model.path.is_file():
            raise CloudError(f"registry file {model.path} of {model.version} is missing; add the bundle again")
        return model

    def add(self, bundle: Path, *, sign: bool = True, check: bool = True, runtime: str | None = None) -> RegisteredModel:
        """Validate, sign and pack a bundle folder or ``.lwb`` file into the registry.

        Adding the same bundle again returns the existing entry; a different bundle under a
        version already registered is refused (versions name one content forever).
        """
        bundle = Path(bundle)
        if not bundle.exists():
            raise CloudError(f"{bundle}: no such bundle folder or .lwb file")
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".add-", dir=self.root) as tmp:
            work = Path(tmp) / "bundle"
            try:
                if bundle.is_dir():
                    shutil.copytree(bundle, work)
                else:
                    unpack_bundle(bundle, work)
                manifest = read_manifest(work)
            except LinewatchError as exc:
                raise CloudError(f"{bundle}: {exc}") from exc
            model_path = work / manifest.model.file
            if not model_path.is_file() or sha256_file(model_path) != manifest.model.sha256:
                raise CloudError(f"{bundle}: model file missing or not matching the manifest's sha256; export the bundle again")
            if check:
                self._check_gate(bundle, manifest.metrics)
                self._check_runs(work, runtime)
            key: str | None = None
            if sign:
                priv = load_private_key(private_key_path(self.config))
                key = sign_bundle(work, priv).key_id
                # Self-check with the exported public key, as devices will check it.
                pub = load_public_key(public_key_path(self.config))
                verify_bundle(work, {key_id(pub): pub})
            manifest_sha = sha256_file(work / MANIFEST_FILE)
            existing = self.find(manifest.version)
            if existing is not None:
                if existing.manifest_sha256 == manifest_sha and existing.path.is_file():
                    logger.info("model %s already registered (%s)", manifest.version, existing.sha256[:12])
                    return existing
                if existing.manifest_sha256 != manifest_sha:
                    raise CloudError(
                        f"version {manifest.version} is already registered with different content "
                        f"(sha256 {existing.sha256[:12]}…); give the new bundle a new version"
                    )
            packed_tmp = Path(tmp) / f"bundle{PACKED_SUFFIX}"
            pack_bundle(work, packed_tmp)
            sha = sha256_file(packed_tmp)
            final = self.root / f"{sha}{PACKED_SUFFIX}"
            atomic_write(final, packed_tmp.read_bytes())
            raw_manifest = json.loads((work / MANIFEST_FILE).read_text())
        row = {
            "sha256": sha, "version": manifest.version, "name": manifest.name, "size": final.stat().st_size,
            "model_sha256": manifest.model.sha256, "manifest_sha256": manifest_sha, "key_id": key,
            "created": manifest.created, "added": time.time(), "manifest": json.dumps(raw_manifest),
            "metrics": json.dumps(manifest.metrics), "file": final.name,
        }  # fmt: skip
        with write_transaction(self.store.db.conn) as conn:
            conn.execute("DELETE FROM ota_models WHERE version = ?", (manifest.version,))  # a stale row whose file vanished
            conn.execute(
                f"INSERT OR REPLACE INTO ota_models ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values())
            )
        logger.info("registered model %s as %s (%d bytes, key %s)", manifest.version, final.name, row["size"], key)
        return self._row_to_model(row)

    @staticmethod
    def _check_gate(bundle: Path, metrics: dict[str, Any]) -> None:
        """Refuse what the trainer itself flagged: an int8 model that lost too much against float."""
        gate = metrics.get("quantization_gate")
        if isinstance(gate, dict) and gate.get("passed") is False:
            raise CloudError(
                f"{bundle}: the trainer's quantization gate failed ({gate.get('message') or 'int8 lost too much against float'}); "
                "retrain it, or pass --no-check to register it anyway"
            )

    @staticmethod
    def _check_runs(bundle: Path, runtime: str | None) -> None:
        try:
            clf = Classifier(bundle, runtime=runtime)
            golden = check_golden(clf)
        except LinewatchError as exc:
            raise CloudError(f"{bundle.name}: the model does not load ({exc}); fix the export, or pass --no-check") from exc
        if not golden.ok:
            raise CloudError(
                "golden images fail on this machine: "
                + "; ".join(golden.failures[:3])
                + " (devices would refuse it; pass --no-check to add anyway)"
            )


def packed_info(path: Path) -> dict[str, Any]:
    """Size and sha256 of a packed file (what a desired message announces)."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


__all__ = [
    "OTA_MIGRATIONS",
    "RegisteredModel",
    "Registry",
    "ensure_schema",
    "init_keys",
    "open_ota_store",
    "packed_info",
    "private_key_path",
    "public_key_path",
]
