"""Broker identities: the site CA, per-device certificates, Mosquitto password and ACL entries.

``linewatch cloud devices add DEVICE`` makes everything one box needs to reach the broker
(docs/security.md has the whole picture):

- a client certificate for CN=DEVICE signed by the site CA (``<data_dir>/ca/``, created on
  first use), because the shipped broker requires one (``require_certificate true``);
- a random password, written as two Mosquitto password entries: ``DEVICE`` (the sync
  link) and ``DEVICE-ota`` (the OTA link). The device listener replaces every client id
  with the username (``use_username_as_clientid``), so the agent's two connections need
  two usernames, and one device's credentials can never take over another's session;
- an ACL block per username: a device may publish only its own data topics, status and
  OTA state/requests, and read only its own acks and OTA desired/chunks.

Password entries use Mosquitto's own format (``mosquitto_passwd``: ``$7$``, PBKDF2-SHA512,
101 iterations, a 12-byte salt), so no Mosquitto tool is needed on the cloud host.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloud.exceptions import CloudError
from edge.config import DEVICE_ID_PATTERN
from edge.fsutil import atomic_write
from edge.ota_wire import CHUNK, DESIRED, OTA, OTA_USER_SUFFIX, REQ, STATE
from edge.protocol import ACK, EVENTS, GAPS, RESULTS, SAMPLES, STATUS, topic

# The head of a new ACL file: the cloud service account (firmware-config/mosquitto.acl has the same).
CLOUD_ACL = """# The cloud service account: reads every device, writes acks, desired models and OTA chunks.
user linewatch-cloud
topic readwrite {prefix}/#
"""
PASSWORD_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes
CERT_DAYS = 3650


def password_entry(username: str, password: str, *, salt: bytes | None = None, iterations: int = PASSWORD_ITERATIONS) -> str:
    """One line of a Mosquitto password file (``mosquitto_passwd`` format ``$7$``)."""
    if ":" in username or "\n" in username:
        raise ValueError(f"username {username!r} may not hold ':' or a newline")
    salt = salt if salt is not None else os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, 64)
    return f"{username}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _write_private(path: Path, text: str, mode: int = 0o640) -> None:
    """Replace ``path`` atomically; created with ``mode`` (never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text, mode=mode)


def set_passwords(path: Path, entries: dict[str, str]) -> None:
    """Add or replace ``{username: password}`` in a Mosquitto password file."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [ln for ln in lines if ln.split(":", 1)[0] not in entries]
    kept += [password_entry(user, pw) for user, pw in entries.items()]
    _write_private(path, "\n".join(kept) + "\n")


def device_acl(device_id: str, prefix: str = "linewatch") -> str:
    """The ACL block of one device: its sync user and its OTA user, each confined."""
    sync_write = [topic(prefix, device_id, k) for k in (STATUS, RESULTS, GAPS, EVENTS, SAMPLES)]
    lines = [f"# begin device {device_id} (linewatch cloud devices add)", f"user {device_id}"]
    lines += [f"topic write {t}" for t in sync_write]
    lines += [f"topic read {topic(prefix, device_id, ACK)}", f"user {device_id}{OTA_USER_SUFFIX}"]
    lines += [f"topic read {topic(prefix, device_id, OTA, k)}" for k in (DESIRED, CHUNK)]
    lines += [f"topic write {topic(prefix, device_id, OTA, k)}" for k in (REQ, STATE)]
    lines.append(f"# end device {device_id}")
    return "\n".join(lines) + "\n"


def set_device_acl(path: Path, device_id: str, prefix: str = "linewatch") -> None:
    """Add (or replace) a device's block in the broker's ACL file (the cloud's block stays)."""
    text = path.read_text() if path.exists() else CLOUD_ACL.format(prefix=prefix)
    block = re.compile(rf"# begin device {re.escape(device_id)} .*?# end device {re.escape(device_id)}\n", re.S)
    text = block.sub("", text)
    if text and not text.endswith("\n"):
        text += "\n"
    _write_private(path, text + device_acl(device_id, prefix))


# -- certificates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """A certificate and its key on disk."""

    cert: Path
    key: Path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def site_ca(ca_dir: Path, *, name: str = "Linewatch site CA") -> Issued:
    """The site CA in ``ca_dir`` (``ca.crt``, ``ca.key``), made on first use."""
    cert_path, key_path = ca_dir / "ca.crt", ca_dir / "ca.key"
    if cert_path.exists() and key_path.exists():
        return Issued(cert_path, key_path)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    _write_private(key_path, _pem_key(key).decode(), 0o600)
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM).decode(), 0o644)
    return Issued(cert_path, key_path)


def issue_certificate(ca: Issued, common_name: str, out_dir: Path, *, hosts: list[str] | None = None) -> Issued:
    """A certificate for ``common_name`` signed by ``ca``: a client certificate, or a server
    one when ``hosts`` (DNS names or IP addresses the broker is reached by) are given."""
    try:
        ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise CloudError(f"site CA in {ca.cert.parent} not usable ({exc}); move it away to make a new one") from exc
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CloudError(f"{ca.key}: not an EC key; the site CA is made by `linewatch cloud devices add`")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )  # fmt: skip
    if hosts:
        names: list[x509.GeneralName] = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", common_name)
    out = Issued(out_dir / f"{stem}.crt", out_dir / f"{stem}.key")
    _write_private(out.key, _pem_key(key).decode(), 0o600)
    _write_private(out.cert, cert.public_bytes(serialization.Encoding.PEM).decode(), 0o644)
    return out


@dataclass(frozen=True)
class DeviceKit:
    """What ``devices add`` made for one device (or cloud account)."""

    name: str
    folder: Path
    ca: Path
    cert: Issued
    env_file: Path  # LINEWATCH_MQTT_PASSWORD=... (0600)
    passwd_file: Path
    acl_file: Path | None


def add_device(
    name: str, *, ca_dir: Path, out_dir: Path, passwd_file: Path, acl_file: Path | None, prefix: str = "linewatch",
    cloud_account: bool = False,
) -> DeviceKit:
    """Credentials for one device (or, with ``cloud_account``, one cloud service account).

    A device gets password entries for ``name`` and ``name-ota`` (one random password) and
    an ACL block; a cloud account gets one password entry (its ACL block is in the shipped
    mosquitto.acl). Both get a client certificate from the site CA.
    """
    if not re.match(DEVICE_ID_PATTERN, name):
        raise CloudError(f"{name!r} is not a device id: letters, digits, '_', '.', '-', at most 64")
    if not cloud_account and name.endswith(OTA_USER_SUFFIX):
        raise CloudError(f"{name!r} ends in {OTA_USER_SUFFIX!r}, the suffix of each device's OTA user; pick another id")
    password = secrets.token_urlsafe(24)
    ca = site_ca(ca_dir)
    folder = out_dir / name
    cert = issue_certificate(ca, name, folder)
    users = {name: password} if cloud_account else {name: password, f"{name}{OTA_USER_SUFFIX}": password}
    set_passwords(passwd_file, users)
    if acl_file is not None and not cloud_account:
        set_device_acl(acl_file, name, prefix)
    variable = "LINEWATCH_CLOUD_MQTT_PASSWORD" if cloud_account else "LINEWATCH_MQTT_PASSWORD"
    env_file = folder / ("cloud.env" if cloud_account else "agent.env")
    _write_private(env_file, f"{variable}={password}\n", 0o600)
    ca_copy = folder / "ca.crt"
    _write_private(ca_copy, ca.cert.read_text(), 0o644)
    return DeviceKit(name, folder, ca_copy, cert, env_file, passwd_file, None if cloud_account else acl_file)
