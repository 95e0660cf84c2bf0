"""The MQTT client: one factory for every paho client, and the link the sync and ingest drive.

:func:`make_client` sets up each paho client the same way (callback API 2, MQTT 5, client
id, credentials, TLS through :func:`tls_context`): the edge's sync link and OTA client and
the cloud's ingest workers and OTA server. :class:`MqttLink` (connect with backoff, loop,
publish, on a thread its owner drives) is shared by the edge's sync and the cloud's ingest.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from edge.backoff import Backoff
from edge.configbase import BrokerConfig

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0  # TCP + TLS handshake; runs beside the loop so stop() is not held up
CONNACK_TIMEOUT_S = 10.0
TLS_RETRY_S = 30.0  # unusable TLS files: how often MqttLink tries them again
MAX_INFLIGHT_MESSAGES = 20  # paho's default: QoS 1 messages sent and not yet PUBACKed


@dataclass(frozen=True)
class LinkSettings:
    """Everything :class:`MqttLink` needs to reach a broker."""

    host: str
    port: int
    client_id: str
    keepalive_s: int = 30
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @classmethod
    def of(cls, section: BrokerConfig, client_id: str) -> LinkSettings:
        """The settings of a config's ``[mqtt]`` section (password from the environment)."""
        return cls(
            host=section.host, port=section.port, client_id=client_id, keepalive_s=section.keepalive_s,
            username=section.username, password=section.password, tls=section.tls,
            ca_file=None if section.ca_file is None else str(section.ca_file),
            cert_file=None if section.cert_file is None else str(section.cert_file),
            key_file=None if section.key_file is None else str(section.key_file),
        )  # fmt: skip


def make_client(settings: LinkSettings, *, max_inflight_messages: int = MAX_INFLIGHT_MESSAGES,
                tls: bool = True) -> mqtt.Client:
    """A paho client (callback API 2, MQTT 5) with the settings' client id and credentials.

    With ``settings.tls`` it also gets the TLS context (see :func:`set_tls`, which raises when
    a file is unusable); ``tls=False`` leaves that to the caller, for one that retries it.
    """
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=settings.client_id, protocol=mqtt.MQTTv5)
    client.connect_timeout = CONNECT_TIMEOUT_S
    client.max_inflight_messages_set(max_inflight_messages)
    if settings.username:
        client.username_pw_set(settings.username, settings.password)
    if tls:
        set_tls(client, settings)
    return client


def set_tls(client: mqtt.Client, settings: LinkSettings) -> None:
    """Give ``client`` the TLS context of ``settings`` (nothing when TLS is off).

    Raises OSError, ssl.SSLError or ValueError when the CA, certificate or key is missing or
    unusable.
    """
    if settings.tls:
        client.tls_set_context(tls_context(settings.ca_file, settings.cert_file, settings.key_file))


class _ClosingSSLSocket(ssl.SSLSocket):
    """Closes itself when the handshake fails (a wrong CA): paho drops it unclosed, and a
    device retrying for days would leak one socket per attempt until the GC finds it."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def tls_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """A client TLS context: the broker's certificate checked against ``ca_file`` (else the
    system's CAs) and its host name; our certificate and key when given. Raises OSError or
    ssl.SSLError when a file is missing or unusable."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    else:
        context.load_default_certs()
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    context.sslsocket_class = _ClosingSSLSocket
    return context



class MqttLink:
    """A paho client driven by one thread the caller owns: connect with backoff, loop, publish.

    ``step(timeout)`` does whatever is due: start a connect attempt (the blocking TCP/TLS
    part runs in a short helper thread so a stop is never held up), wait for its CONNACK,
    or run paho's ``loop()`` for up to ``timeout`` seconds. Callbacks (``on_message``,
    ``on_connected``) run inside ``step`` on the caller's thread. ``connected`` is True
    only after a CONNACK whose reason code is success.
    """

    def __init__(
        self,
        settings: LinkSettings,
        *,
        stop: threading.Event,
        subscriptions: Sequence[tuple[str, int]] = (),
        on_message: Callable[[mqtt.MQTTMessage], None] | None = None,
        on_connected: Callable[[], None] | None = None,
        will: tuple[str, bytes, int, bool] | None = None,
        backoff: Backoff | None = None,
        max_inflight_messages: int = MAX_INFLIGHT_MESSAGES,
    ) -> None:
        self.settings = settings
        self.stop = stop
        self.subscriptions = list(subscriptions)
        self._on_message = on_message
        self._on_connected = on_connected
        self.backoff = backoff or Backoff()
        self.attempts = 0  # failed connects since the last success: the backoff's step
        self.connected = False
        self.connects = 0
        self.connected_since: float | None = None
        self.last_error: str | None = None
        self._next_attempt = 0.0
        self._attempt: threading.Thread | None = None
        self._attempt_done = threading.Event()
        self._attempt_error: BaseException | None = None
        self._awaiting_connack_since: float | None = None
        c = make_client(settings, max_inflight_messages=max_inflight_messages, tls=False)
        self.client = c
        self.setup_error: str | None = None  # TLS files unusable: no connect until they are fixed
        self._setup_tls()
        if will is not None:
            c.will_set(will[0], will[1], qos=will[2], retain=will[3])
        c.on_socket_open = self._handle_socket_open
        c.on_connect = self._handle_connect
        c.on_disconnect = self._handle_disconnect
        c.on_message = self._handle_message

    def _setup_tls(self) -> bool:
        """Load the CA, certificate and key; on failure say why once, keep running, retry later.

        A wrong path in the config must not take the process down (under systemd that is a
        restart loop): the owner keeps inspecting and buffering, and the status shows
        ``last_error`` until the file is there.
        """
        s = self.settings
        if not s.tls or self.client._ssl_context is not None:  # noqa: SLF001 - paho keeps it private
            return True
        try:
            set_tls(self.client, s)
        except (OSError, ssl.SSLError, ValueError) as exc:
            error = (f"TLS setup failed (ca_file {s.ca_file}, cert_file {s.cert_file}, key_file {s.key_file}): {exc};"
                     " fix the paths in [mqtt], check with `linewatch edge validate-config`")  # fmt: skip
            if error != self.setup_error:
                logger.error("MQTT %s; not connecting, retrying every %.0f s", error, TLS_RETRY_S)
            self.setup_error = self.last_error = error
            self._next_attempt = time.monotonic() + TLS_RETRY_S
            return False
        self.setup_error = None
        return True

    # -- paho callbacks (run inside client.loop on the owner thread) --------------------------

    @staticmethod
    def _handle_socket_open(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        # Small messages (acks, batches) must not wait for Nagle + delayed ACK (~40 ms each).
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _handle_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any) -> None:
        self._awaiting_connack_since = None
        if reason.is_failure:
            # Frigate's slip was to call this connected anyway.
            self.last_error = f"broker refused the connection: {reason}"
            logger.warning("MQTT %s:%s refused the connection (%s); retrying with backoff",
                           self.settings.host, self.settings.port, reason)  # fmt: skip
            self.connected = False
            self._schedule_retry()
            client.disconnect()
            return
        self.connected = True
        self.connects += 1
        self.connected_since = time.time()
        self.last_error = None
        self.attempts = 0
        logger.info("MQTT connected to %s:%s as %s", self.settings.host, self.settings.port, self.settings.client_id)
        for name, qos in self.subscriptions:
            client.subscribe(name, qos=qos)
        if self._on_connected is not None:
            self._on_connected()

    def _handle_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any) -> None:
        was = self.connected
        self.connected = False
        self.connected_since = None
        self._awaiting_connack_since = None
        if was and not self.stop.is_set():
            self.last_error = f"connection lost: {reason}"
            logger.warning("MQTT connection to %s:%s lost (%s); reconnecting", self.settings.host, self.settings.port, reason)
        self._schedule_retry()

    def _handle_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self._on_message is not None:
            self._on_message(message)

    # -- driving ---------------------------------------------------------------------------

    def _schedule_retry(self) -> None:
        if time.monotonic() < self._next_attempt:
            return  # already scheduled (a refused CONNACK is followed by a disconnect)
        delay = self.backoff.delay(self.attempts)
        self.attempts += 1
        self._next_attempt = time.monotonic() + delay
        logger.debug("next MQTT connect attempt in %.2f s", delay)

    def _start_attempt(self) -> None:
        self._attempt_done.clear()
        self._attempt_error = None
        s = self.settings

        def attempt() -> None:
            try:
                self.client.connect(s.host, s.port, keepalive=s.keepalive_s, clean_start=True)
            except BaseException as exc:  # noqa: BLE001 - reported to the owner thread
                self._attempt_error = exc
            finally:
                self._attempt_done.set()

        self._attempt = threading.Thread(target=attempt, name="mqtt-connect", daemon=True)
        self._attempt.start()

    def step(self, timeout: float) -> None:
        """Do what is due for at most about ``timeout`` seconds (never much longer)."""
        now = time.monotonic()
        if self._attempt is not None:
            if not self._attempt_done.wait(timeout):
                return
            self._attempt = None
            if self._attempt_error is not None:
                self.last_error = f"cannot connect to {self.settings.host}:{self.settings.port}: {self._attempt_error}"
                logger.warning("MQTT %s; retrying with backoff", self.last_error)
                self._schedule_retry()
                return
            self._awaiting_connack_since = time.monotonic()
            timeout = 0.0
        if not self.connected and self._awaiting_connack_since is None:
            if self.client.socket() is not None:
                # A refused CONNACK or a lost link left a socket behind: close it first.
                self.client.loop(timeout=0)
                self._close_socket()
            if now >= self._next_attempt and self._setup_tls():
                self._start_attempt()
            else:
                self.stop.wait(min(timeout, self._next_attempt - now))
            return
        if self._awaiting_connack_since is not None and time.monotonic() - self._awaiting_connack_since > CONNACK_TIMEOUT_S:
            self.last_error = "no CONNACK from the broker"
            logger.warning("MQTT %s:%s sent no CONNACK in %.0f s; reconnecting", self.settings.host, self.settings.port, CONNACK_TIMEOUT_S)
            self._awaiting_connack_since = None
            self._close_socket()
            self._schedule_retry()
            return
        rc = self.client.loop(timeout=timeout)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and (self.connected or self._awaiting_connack_since is not None):
            # paho reports most drops through on_disconnect; this catches the rest.
            self.connected = False
            self._awaiting_connack_since = None
            self._close_socket()
            self._schedule_retry()

    def _close_socket(self) -> None:
        with contextlib.suppress(Exception):  # the socket is going away anyway
            self.client.disconnect()
        sock = self.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def publish(self, name: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Queue one message (written to the socket at once or on the next ``step``)."""
        return self.client.publish(name, payload, qos=qos, retain=retain)

    def flush(self, info: mqtt.MQTTMessageInfo, timeout: float) -> bool:
        """Run the loop until ``info`` is acknowledged by the broker (PUBACK) or ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.connected and not info.is_published() and time.monotonic() < deadline:
            self.client.loop(timeout=0.05)
        return info.is_published()

    def close(self) -> None:
        """Disconnect cleanly (the broker then drops the last will) if connected."""
        if self._attempt is not None:
            return  # a connect is still running in its helper; it ends on its own
        if self.connected:
            self.connected = False
            self.client.disconnect()
            self.client.loop(timeout=0.05)
        self._close_socket()


__all__ = [
    "CONNACK_TIMEOUT_S",
    "CONNECT_TIMEOUT_S",
    "MAX_INFLIGHT_MESSAGES",
    "TLS_RETRY_S",
    "LinkSettings",
    "MqttLink",
    "make_client",
    "set_tls",
    "tls_context",
]
