"""Ed25519 signatures over model bundles: the cloud signs, the edge verifies.

What is signed is the exact bytes of ``manifest.json``. The manifest carries the sha256 of
``model.tflite`` and the int8 outputs expected for every golden image, so one signature
over the manifest covers the model and what it must do. ``signature.json`` sits next to
the manifest::

    {"key_id": "<sha256 of the raw 32-byte public key, first 16 hex>",
     "algorithm": "ed25519",
     "signed": "<sha256 hex of the manifest.json bytes>",
     "signature": "<base64 of the 64-byte Ed25519 signature of the manifest.json bytes>"}

Keys are PEM files: the private key (PKCS#8, unencrypted, mode 0600) stays in the cloud's
``data_dir/keys``; the public key (SubjectPublicKeyInfo) is copied to each box and listed
in the agent config ``ota.trusted_keys``.

This module is shared by edge/ (verify) and cloud/ (sign, keys init); it needs only the
``cryptography`` package, which both extras bring.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.exceptions import BundleError, ConfigError
from edge.fsutil import atomic_write
from edge.protocol import MANIFEST_FILE, MAX_MANIFEST_BYTES, SIGNATURE_FILE, read_bounded

logger = logging.getLogger(__name__)

ALGORITHM = "ed25519"
PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"
# signature.json is tiny; anything bigger is not ours.
MAX_SIGNATURE_FILE_BYTES = 4096


@dataclass(frozen=True)
class SignatureInfo:
    """Content of ``signature.json``."""

    key_id: str
    algorithm: str
    signed: str  # sha256 hex of the manifest bytes
    signature: str  # base64

    def to_json(self) -> str:
        return json.dumps(
            {"key_id": self.key_id, "algorithm": self.algorithm, "signed": self.signed, "signature": self.signature},
            indent=2,
        )


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify_bundle` when the bundle is accepted."""

    signed: bool  # False only when allow_unsigned let an unsigned bundle through
    key_id: str | None
    manifest_sha256: str


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    """The raw 32-byte public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Short public identifier of a key: the first 16 hex of sha256 of the raw public key."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return hashlib.sha256(public_key_bytes(pub)).hexdigest()[:16]


def generate_keypair(private_path: Path, public_path: Path, *, overwrite: bool = False) -> str:
    """Create an Ed25519 key pair as PEM files (private mode 0600); returns the key id.

    Refuses to overwrite an existing private key unless ``overwrite``: every box trusting the
    old public key would refuse models signed by the new one.
    """
    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.exists() and not overwrite:
        raise ConfigError(
            f"{private_path} already exists; it is the key your devices trust. Keep it, "
            "or pass --force to replace it (then copy the new public key to every box)"
        )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write(private_path, pem, mode=0o600)  # created 0600: a chmod after writing leaves a readable window
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write(public_path, pub_pem)
    kid = key_id(key)
    logger.info("new signing key %s: private %s, public %s", kid, private_path, public_path)
    return kid


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a PEM Ed25519 private key; :class:`ConfigError` says how to make one."""
    key = _read_pem(
        path,
        lambda data: serialization.load_pem_private_key(data, password=None),
        missing="{path}: no signing key; create one with `linewatch cloud keys init`",
        unreadable="{path}: cannot read the signing key ({exc})",
        not_pem="{path}: not an unencrypted PEM private key ({exc})",
    )
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: is a {type(key).__name__}, not an Ed25519 key; run `linewatch cloud keys init`")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a PEM Ed25519 public key (as listed in ``ota.trusted_keys``)."""
    unreadable = "{path}: trusted key not readable ({exc}); copy the cloud's signing.pub there or fix ota.trusted_keys"
    key = _read_pem(
        path,
        serialization.load_pem_public_key,
        missing=unreadable,
        unreadable=unreadable,
        not_pem="{path}: not a PEM public key ({exc}); copy the cloud's signing.pub there",
    )
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: is a {type(key).__name__}, not an Ed25519 public key")
    return key


def _read_pem(path: Path, parse: Callable[[bytes], object], *, missing: str, unreadable: str, not_pem: str) -> object:
    """A key file read and parsed by ``parse``. :class:`ConfigError` with one of the
    messages (``{path}`` and ``{exc}`` filled in) when the file is missing, unreadable or
    not PEM."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(missing.format(path=path, exc=exc)) from exc
    except OSError as exc:
        raise ConfigError(unreadable.format(path=path, exc=exc)) from exc
    try:
        return parse(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(not_pem.format(path=path, exc=exc)) from exc


def load_trusted_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """``{key_id: key}`` for every trusted public key file."""
    keys: dict[str, Ed25519PublicKey] = {}
    for p in paths:
        k = load_public_key(p)
        keys[key_id(k)] = k
    return keys


def sign_manifest_bytes(manifest: bytes, key: Ed25519PrivateKey) -> SignatureInfo:
    """Sign the exact bytes of a manifest."""
    sig = key.sign(manifest)
    return SignatureInfo(
        key_id=key_id(key),
        algorithm=ALGORITHM,
        signed=hashlib.sha256(manifest).hexdigest(),
        signature=base64.b64encode(sig).decode("ascii"),
    )


def sign_bundle(bundle_dir: Path, key: Ed25519PrivateKey) -> SignatureInfo:
    """Write ``signature.json`` over the bundle's ``manifest.json``; returns what was written."""
    bundle_dir = Path(bundle_dir)
    manifest_path = bundle_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path} is missing; sign a bundle folder made by `linewatch train fit`")
    info = sign_manifest_bytes(manifest_path.read_bytes(), key)
    atomic_write(bundle_dir / SIGNATURE_FILE, info.to_json())
    return info


def read_signature(bundle_dir: Path) -> SignatureInfo | None:
    """The bundle's signature.json, None if there is none; :class:`BundleError` if it is garbage."""
    path = Path(bundle_dir) / SIGNATURE_FILE
    if not path.exists():
        return None
    try:
        if path.stat().st_size > MAX_SIGNATURE_FILE_BYTES:
            raise BundleError(f"{SIGNATURE_FILE} is {path.stat().st_size} bytes, not a signature; re-sign the bundle")
        raw = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise BundleError(f"{SIGNATURE_FILE} is nested too deeply to be a signature; re-sign the bundle") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{SIGNATURE_FILE} is unreadable ({exc}); re-sign the bundle with `linewatch cloud models add`") from exc
    fields = ("key_id", "algorithm", "signed", "signature")
    if not isinstance(raw, dict) or not all(isinstance(raw.get(f), str) for f in fields):
        raise BundleError(f"{SIGNATURE_FILE} must hold string fields {', '.join(fields)}; re-sign the bundle")
    return SignatureInfo(**{f: raw[f] for f in fields})


def verify_manifest_bytes(
    manifest: bytes,
    info: SignatureInfo | None,
    trusted: dict[str, Ed25519PublicKey],
    *,
    allow_unsigned: bool = False,
) -> VerifyResult:
    """Check ``info`` signs exactly ``manifest`` with a trusted key; :class:`BundleError` says why not.

    Refusals, each with its own message: unsigned (unless ``allow_unsigned``), unsupported
    algorithm, unknown key, manifest altered after signing, bad signature.
    """
    digest = hashlib.sha256(manifest).hexdigest()
    if info is None:
        if allow_unsigned:
            logger.warning("accepting an UNSIGNED bundle because ota.allow_unsigned is set")
            return VerifyResult(signed=False, key_id=None, manifest_sha256=digest)
        raise BundleError(
            "unsigned: the bundle has no signature.json; add it with `linewatch cloud models add` "
            "(or set ota.allow_unsigned = true on development boxes only)"
        )
    if info.algorithm != ALGORITHM:
        raise BundleError(f"unsupported signature algorithm {info.algorithm!r}; only {ALGORITHM} is accepted")
    key = trusted.get(info.key_id)
    if key is None:
        known = ", ".join(sorted(trusted)) or "none"
        raise BundleError(
            f"unknown key: signed by key {info.key_id}, which is not in ota.trusted_keys (trusted: {known}); "
            "copy the cloud's signing.pub to the box and list it in ota.trusted_keys"
        )
    if info.signed != digest:
        raise BundleError(
            f"manifest altered after signing: its sha256 is {digest[:12]}…, the signature covers {info.signed[:12]}…; "
            "re-sign the bundle in the cloud"
        )
    try:
        sig = base64.b64decode(info.signature, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BundleError(f"bad signature: not valid base64 ({exc})") from exc
    try:
        key.verify(sig, manifest)
    except InvalidSignature as exc:
        raise BundleError(
            f"bad signature: it does not verify with key {info.key_id}; the bundle or its signature was tampered with"
        ) from exc
    return VerifyResult(signed=True, key_id=info.key_id, manifest_sha256=digest)


def verify_bundle(
    bundle_dir: Path,
    trusted: dict[str, Ed25519PublicKey] | Iterable[Path],
    *,
    allow_unsigned: bool = False,
) -> VerifyResult:
    """Verify ``bundle_dir/signature.json`` against its ``manifest.json`` and the trusted keys."""
    bundle_dir = Path(bundle_dir)
    keys = trusted if isinstance(trusted, dict) else load_trusted_keys(trusted)
    manifest_path = bundle_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path} is missing; the bundle is incomplete")
    manifest = read_bounded(manifest_path, MAX_MANIFEST_BYTES, "manifest")  # size checked before reading
    return verify_manifest_bytes(manifest, read_signature(bundle_dir), keys, allow_unsigned=allow_unsigned)


__all__ = [
    "ALGORITHM",
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "SignatureInfo",
    "VerifyResult",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "load_trusted_keys",
    "read_signature",
    "sign_bundle",
    "sign_manifest_bytes",
    "verify_bundle",
    "verify_manifest_bytes",
]
