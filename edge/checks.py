"""Checks of an agent config against the box it runs on: files, TLS material, risky settings.

``load_config`` only checks the shape of a config. These checks look at the files it
names (CA, client certificate and key, trusted signing keys, a video file or image
folder) and at settings that work but weaken the box (``ota.allow_unsigned``, MQTT in
clear to another host, an operator page open to the LAN without a token).

``linewatch edge validate-config`` prints every finding and fails on errors. The agent
never refuses to start on them: inspection goes on, and a TLS problem turns sync and
OTA off with the reason in the status (docs/security.md).
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from edge.config import AgentConfig, MqttConfig


@dataclass(frozen=True)
class Finding:
    """One problem: ``level`` is ``error`` (it will not work) or ``warning`` (it works, unsafely)."""

    level: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.key}: {self.message}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _file_problem(path: Path | None) -> str | None:
    if path is None:
        return None
    if not path.exists():
        return f"{path}: no such file"
    if not path.is_file():
        return f"{path}: not a file"
    if not os.access(path, os.R_OK):
        return f"{path}: not readable by this user"
    return None


def tls_problem(mqtt: MqttConfig) -> str | None:
    """Why the MQTT TLS settings cannot work on this box (one line saying what to fix), or None.

    Builds the same kind of context the MQTT client builds, so a file that exists but holds
    no certificate, or a key that does not match its certificate, is caught too.
    """
    if not mqtt.tls:
        return None
    for key, path in (("mqtt.ca_file", mqtt.ca_file), ("mqtt.cert_file", mqtt.cert_file), ("mqtt.key_file", mqtt.key_file)):
        problem = _file_problem(path)
        if problem:
            return f"{key} {problem}; copy it to the box or fix the path"
    if (mqtt.cert_file is None) != (mqtt.key_file is None):
        return "mqtt.cert_file and mqtt.key_file go together (the client certificate and its key)"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if mqtt.ca_file is not None:
            context.load_verify_locations(cafile=str(mqtt.ca_file))
        else:
            context.load_default_certs()
    except (ssl.SSLError, OSError, ValueError) as exc:
        return f"mqtt.ca_file {mqtt.ca_file}: not a PEM CA certificate ({exc}); copy the site's ca.crt there"
    if mqtt.cert_file is not None:
        try:
            context.load_cert_chain(str(mqtt.cert_file), str(mqtt.key_file))
        except (ssl.SSLError, OSError, ValueError) as exc:
            return (f"mqtt.cert_file/key_file {mqtt.cert_file}, {mqtt.key_file}: not a matching PEM certificate and key"
                    f" ({exc}); copy the pair `linewatch cloud devices add` made for this device")  # fmt: skip
    return None


def check_config(config: AgentConfig) -> list[Finding]:
    """Every finding about ``config`` on this box, errors first."""
    out: list[Finding] = []
    m = config.mqtt
    if m.enabled:
        problem = tls_problem(m)
        if problem:
            out.append(Finding("error", "mqtt", problem))
        if not m.tls and not is_loopback(m.host):
            out.append(Finding("warning", "mqtt.tls", f"false while the broker {m.host} is another machine: results and"
                                                      " the password travel in clear; set tls = true and ca_file"))  # fmt: skip
        if not m.tls and any((m.ca_file, m.cert_file, m.key_file)):
            out.append(Finding("warning", "mqtt.tls", "false, so ca_file/cert_file/key_file are not used"))
        if m.username and not m.password:
            out.append(Finding("warning", "mqtt.username", "set but LINEWATCH_MQTT_PASSWORD is not in this environment"
                                                           " (the service reads it from /etc/linewatch/agent.env)"))  # fmt: skip
    for i, path in enumerate(config.ota.trusted_keys):
        problem = _file_problem(path)
        if problem:
            out.append(Finding("error", f"ota.trusted_keys[{i}]", f"{problem}; copy the fleet's signing.pub there"))
            continue
        from edge.exceptions import ConfigError
        from edge.signing import load_public_key

        try:
            load_public_key(path)
        except ConfigError as exc:
            out.append(Finding("error", f"ota.trusted_keys[{i}]", str(exc)))
    if config.ota.allow_unsigned:
        out.append(Finding("warning", "ota.allow_unsigned", "true: any unsigned model pushed to this box is installed;"
                                                            " for development only"))  # fmt: skip
    elif not config.ota.trusted_keys and m.enabled:
        out.append(Finding("warning", "ota.trusted_keys", "empty: every model pushed over the air will be refused"))
    from edge.capture import parse_source
    from edge.exceptions import CameraError

    try:
        spec = parse_source(config.camera.source)
    except CameraError as exc:
        out.append(Finding("error", "camera.source", str(exc)))
    else:
        if spec.kind == "video" and isinstance(spec.value, str) and not Path(spec.value).is_file():
            out.append(Finding("error", "camera.source", f"{spec.display}: no such video file; fix the path or copy it"))
        elif (spec.kind == "images" and isinstance(spec.value, str) and not any(c in spec.value for c in "*?[")
              and not Path(spec.value).exists()):
            out.append(Finding("warning", "camera.source", f"{spec.display}: no such folder yet; the agent waits for images"))
        elif spec.kind == "device" and isinstance(spec.value, str) and not Path(spec.value).exists():
            out.append(Finding("warning", "camera.source", f"{spec.display}: no such device now (is the camera plugged in?)"))
    op = config.operator
    if op.enabled and not is_loopback(op.host) and not op.access_token:
        out.append(Finding("warning", "operator.host", f"{op.host}: the operator page is open to the network with no"
                                                       " token; set operator.token or host = \"127.0.0.1\""))  # fmt: skip
    return sorted(out, key=lambda f: f.level != "error")
