"""Ed25519 bundle signatures: every refusal has its own reason, and only good ones pass."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from edge.exceptions import BundleError, ConfigError
from edge.protocol import MANIFEST_FILE, SIGNATURE_FILE
from edge.signing import (
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    load_trusted_keys,
    read_signature,
    sign_bundle,
    verify_bundle,
)


def _bundle(tmp_path: Path, **fields: object) -> Path:
    d = tmp_path / "bundle"
    d.mkdir(exist_ok=True)
    manifest = {"schema_version": 1, "name": "scratch", "version": "1.0.0", "model": {"sha256": "ab" * 32, "bytes": 10}}
    manifest.update(fields)
    (d / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return d


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    priv, pub = tmp_path / "keys" / "signing.key", tmp_path / "keys" / "signing.pub"
    generate_keypair(priv, pub)
    return priv, pub


def test_keypair_files_private_0600_and_key_id(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    kid = key_id(load_private_key(priv))
    assert kid == key_id(load_public_key(pub))
    assert len(kid) == 16 and all(c in "0123456789abcdef" for c in kid)


def test_keypair_refuses_to_overwrite(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    before = priv.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        generate_keypair(priv, pub)
    assert priv.read_bytes() == before
    generate_keypair(priv, pub, overwrite=True)
    assert priv.read_bytes() != before


def test_signed_bundle_verifies(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    bundle = _bundle(tmp_path)
    info = sign_bundle(bundle, load_private_key(priv))
    on_disk = json.loads((bundle / SIGNATURE_FILE).read_text())
    assert on_disk["algorithm"] == "ed25519" and on_disk["key_id"] == info.key_id
    assert read_signature(bundle) == info
    result = verify_bundle(bundle, [pub])
    assert result.signed and result.key_id == info.key_id


def test_unsigned_refused_unless_allowed(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    bundle = _bundle(tmp_path)
    with pytest.raises(BundleError, match="^unsigned"):
        verify_bundle(bundle, [keys[1]])
    assert not verify_bundle(bundle, [keys[1]], allow_unsigned=True).signed


def test_unknown_key_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    other_priv, other_pub = tmp_path / "other.key", tmp_path / "other.pub"
    generate_keypair(other_priv, other_pub)
    bundle = _bundle(tmp_path)
    sign_bundle(bundle, load_private_key(other_priv))
    with pytest.raises(BundleError, match="^unknown key"):
        verify_bundle(bundle, [keys[1]])
    # allow_unsigned never lets a bundle signed by a stranger through
    with pytest.raises(BundleError, match="^unknown key"):
        verify_bundle(bundle, [keys[1]], allow_unsigned=True)


def test_manifest_altered_after_signing_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    bundle = _bundle(tmp_path)
    sign_bundle(bundle, load_private_key(keys[0]))
    raw = json.loads((bundle / MANIFEST_FILE).read_text())
    raw["model"]["sha256"] = "cd" * 32  # point the manifest at another model
    (bundle / MANIFEST_FILE).write_text(json.dumps(raw, indent=2))
    with pytest.raises(BundleError, match="^manifest altered after signing"):
        verify_bundle(bundle, [keys[1]])


def test_bad_signature_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    bundle = _bundle(tmp_path)
    sign_bundle(bundle, load_private_key(keys[0]))
    sig = json.loads((bundle / SIGNATURE_FILE).read_text())
    # same manifest digest, forged signature bytes
    forged = bytearray(base64.b64decode(sig["signature"]))
    forged[0] ^= 0xFF
    sig["signature"] = base64.b64encode(bytes(forged)).decode()
    (bundle / SIGNATURE_FILE).write_text(json.dumps(sig))
    with pytest.raises(BundleError, match="^bad signature"):
        verify_bundle(bundle, [keys[1]])
    sig["signature"] = "not base64!!"
    (bundle / SIGNATURE_FILE).write_text(json.dumps(sig))
    with pytest.raises(BundleError, match="^bad signature"):
        verify_bundle(bundle, [keys[1]])


def test_garbage_signature_file_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    bundle = _bundle(tmp_path)
    (bundle / SIGNATURE_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="unreadable"):
        verify_bundle(bundle, [keys[1]])
    (bundle / SIGNATURE_FILE).write_text(json.dumps({"key_id": 1}))
    with pytest.raises(BundleError, match="string fields"):
        verify_bundle(bundle, [keys[1]])
    sig = {"key_id": "x", "algorithm": "rsa", "signed": "x", "signature": "x"}
    (bundle / SIGNATURE_FILE).write_text(json.dumps(sig))
    with pytest.raises(BundleError, match="unsupported signature algorithm"):
        verify_bundle(bundle, [keys[1]])


def test_trusted_key_problems_are_config_errors(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match="trusted key not readable"):
        load_trusted_keys([tmp_path / "missing.pub"])
    not_pem = tmp_path / "bad.pub"
    not_pem.write_text("hello")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        load_trusted_keys([not_pem])
    with pytest.raises(ConfigError, match="keys init"):
        load_private_key(tmp_path / "nokey.key")
    assert list(load_trusted_keys([keys[1], keys[1]])) == [key_id(load_public_key(keys[1]))]
