"""The MQTT adapter: the only module of mqttinfer that imports paho-mqtt.

What :class:`Bus` adds to a bare paho client:

- **Birth and will.** A retained ``Status`` (``online``) on ``status/<node>`` after every
  connect, and a retained ``offline`` will registered with the broker. Both carry a ``bdseq``
  that grows on every connect attempt (``max(last + 1, wall-clock ms)``, so it also grows
  across process restarts); the will is rewritten just before each (re)connect, so a monitor
  can drop a will older than the birth it already holds. ``stop()`` publishes ``offline`` with
  ``clean=true`` itself, then disconnects cleanly (the broker then discards the will).
- **Reconnects.** ``connect_async`` + ``loop_start`` + exponential backoff; every subscription
  is re-sent in ``on_connect`` (each filter once, at the highest QoS asked for it).
- **MQTT 5 with fallback.** When a broker answers a v5 CONNECT with "unsupported protocol
  version", the bus rebuilds its client for MQTT 3.1.1 and carries on.
- **Size check.** paho does not check a message against the broker's maximum packet size,
  and an oversized QoS 1 message is dropped by the broker and re-sent forever. ``publish``
  computes the exact packet size and refuses (logs, counts ``dropped_too_large``) anything
  over the broker's limit: the CONNACK ``Maximum-Packet-Size`` when the broker sends it,
  else ``BrokerConfig.max_packet_size``.
- **Says why it is not connecting.** A refused CONNACK (bad credentials: the reason code), a
  failed TLS handshake (wrong CA, host name mismatch) or an unreachable broker is logged at
  WARNING with its reason, once per distinct reason until the next successful connect (the
  retries after it only at DEBUG).
- **Credentials from the environment.** ``BrokerConfig.from_env_and_url`` fills what the URL
  leaves out from the variables of broker init's env files (``MQTTINFER_USERNAME``,
  ``_PASSWORD``, ``_CA_FILE``, ``_CERT_FILE``, ``_KEY_FILE``), so a password never has to be on
  a command line. The password is never logged nor shown in a ``repr``.
- **One dispatcher.** Every message goes through one paho ``on_message``; the bus remembers,
  per topic, which subscribed filters it matches (forgotten whenever subscriptions change),
  so the common case is one dict lookup instead of paho walking its topic trie per message.
- **Callbacks never raise into paho** (an exception there would kill the network thread):
  handler errors are logged and counted. Handlers run on the network thread, so they must
  be quick and bounded: a device computes there only while it is idle and its student fast
  (else its worker thread takes the frame), the aggregator's per-message work (tens of
  microseconds) runs in the handler.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from mqttinfer import __version__
from mqttinfer.errors import BrokerError, ConfigError
from mqttinfer.protocol import RoleSummary, Status
from mqttinfer.runtime.queues import Counters
from mqttinfer.topics import Topics, check_id

log = logging.getLogger(__name__)

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
DEFAULT_MAX_PACKET = 16 * 1024 * 1024
# paho holds at most this many QoS>0 messages while disconnected; beyond it publish fails.
_MAX_QUEUED_MESSAGES = 1000
# Topics whose matching subscriptions are remembered; a deployment has a few dozen topics, so
# the bound only matters against a flood of distinct topics (the memo is then started afresh).
_MAX_ROUTES = 4096
_UNSUPPORTED_PROTOCOL = 132  # CONNACK reason code 0x84 (v5); paho maps a v3 rc=1 to it too
_STATUS_QOS = 1
_LOG_PAYLOAD_CHARS = 80
# BrokerConfig.mqtt_version (the URL's ?version=) -> what paho connects with first ("auto"
# falls back to 3.1.1 when a broker refuses 5). The one table of versions: the cluster and the
# benchmark floor take theirs from it.
MQTT_PROTOCOLS = {
    "auto": MQTTProtocolVersion.MQTTv5,
    "5": MQTTProtocolVersion.MQTTv5,
    "3.1.1": MQTTProtocolVersion.MQTTv311,
}


_SOCKET_ERRORS = ("failed to receive on socket", "timeout on socket")


class _PahoNoise(logging.Filter):
    """paho logs an ERROR on every loop pass after a clean disconnect, and on every failed read
    (so on every retry against a broker that drops us); the bus logs those itself, once."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("Client is not connected"):
            return False
        if message.startswith(_SOCKET_ERRORS):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


_PAHO_LOG = logging.getLogger(f"{__name__}.paho")
_PAHO_LOG.addFilter(_PahoNoise())


class _PahoLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """paho's logger for one bus: logs to ``_PAHO_LOG`` and tells the bus why a read failed.

    This replaces paho's ``on_log`` callback, for which paho formats every packet's debug line
    (with its MQTT 5 properties: ~5 µs a packet) even when nobody logs at DEBUG; through a
    logger, paho's lines are formatted only when enabled.
    """

    def __init__(self, on_socket_error: Callable[[str], None]) -> None:
        super().__init__(_PAHO_LOG, {})
        self._on_socket_error = on_socket_error

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level >= logging.ERROR and isinstance(msg, str) and msg.startswith(_SOCKET_ERRORS):
            self._on_socket_error(msg % args if args else msg)
        if _PAHO_LOG.isEnabledFor(level):  # one cheap check for paho's per-packet DEBUG lines
            _PAHO_LOG.log(level, msg, *args, **kwargs)


_SCHEMES = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True, "tls": True}

# What `mqttinfer broker init` writes into each node's env file (broker_files.render_env).
USERNAME_ENV = "MQTTINFER_USERNAME"
PASSWORD_ENV = "MQTTINFER_PASSWORD"
CA_FILE_ENV = "MQTTINFER_CA_FILE"
CERT_FILE_ENV = "MQTTINFER_CERT_FILE"
KEY_FILE_ENV = "MQTTINFER_KEY_FILE"


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how to connect. ``from_url`` parses ``mqtt[s]://[user[:pass]@]host[:port]``.

    ``mqtt_version`` is ``"auto"`` (MQTT 5, falling back to 3.1.1), ``"5"`` or ``"3.1.1"``.
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # a secret: never in logs or reprs
    tls: bool = False
    ca_file: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    tls_insecure: bool = False
    keepalive_s: int = 5
    max_packet_size: int = DEFAULT_MAX_PACKET
    mqtt_version: str = "auto"
    reconnect_min_s: int = 1
    reconnect_max_s: int = 8

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("broker host is empty", field="broker", fix="mqtt://HOST:PORT")
        if not 0 < self.port < 65536:
            raise ConfigError(f"broker port {self.port} is out of range", field="broker")
        if self.mqtt_version not in MQTT_PROTOCOLS:
            raise ConfigError(
                f"unknown MQTT version {self.mqtt_version!r}",
                field="mqtt_version",
                fix="use auto, 5 or 3.1.1",
            )
        if self.keyfile is not None and self.certfile is None:
            raise ConfigError(
                "a client key needs a client certificate", field="certfile", fix="add ?cert=FILE"
            )
        if self.keepalive_s < 1 or self.max_packet_size < 64:
            raise ConfigError("keepalive_s must be >= 1 and max_packet_size >= 64", field="broker")

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> BrokerConfig:
        """Parse a broker URL; query parameters ``ca``, ``cert``, ``key``, ``insecure``,
        ``keepalive``, ``version`` and ``max_packet`` set the matching fields, and
        ``overrides`` (field names) win over everything."""
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        scheme = parts.scheme.lower()
        if scheme not in _SCHEMES:
            raise ConfigError(
                f"unsupported broker URL scheme {scheme!r} in {_redact(url)!r}",
                field="broker",
                fix="use mqtt://host:1883 or mqtts://host:8883",
            )
        tls = _SCHEMES[scheme]
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"bad port in {_redact(url)!r}", field="broker") from exc
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        values: dict[str, Any] = {
            "host": parts.hostname or "",
            "port": port or (DEFAULT_TLS_PORT if tls else DEFAULT_PORT),
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None,
            "tls": tls,
            "ca_file": query.get("ca"),
            "certfile": query.get("cert"),
            "keyfile": query.get("key"),
            "tls_insecure": query.get("insecure", "") in {"1", "true", "yes"},
            "mqtt_version": query.get("version", "auto"),
        }
        for name, key in (("keepalive_s", "keepalive"), ("max_packet_size", "max_packet")):
            if key in query:
                values[name] = _int_param(query[key], key, url)
        unknown = set(overrides) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown broker options {sorted(unknown)}", field="broker")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_env_and_url(
        cls, url: str, env: Mapping[str, str] | None = None, **overrides: Any
    ) -> BrokerConfig:
        """``from_url(url, **overrides)``, then ``with_env(env)``: what every CLI connects with."""
        return cls.from_url(url, **overrides).with_env(env)

    def with_env(self, env: Mapping[str, str] | None = None) -> BrokerConfig:
        """This config with what it lacks taken from ``env`` (default ``os.environ``).

        ``MQTTINFER_USERNAME``/``_PASSWORD`` apply when no username is set (the password alone
        when the username is the same one), ``MQTTINFER_CA_FILE`` when no CA file is set, and
        ``MQTTINFER_CERT_FILE``/``_KEY_FILE`` when no client certificate is set. Empty
        variables count as unset. Whatever the URL carries wins.
        """
        env = os.environ if env is None else env

        def value(name: str) -> str | None:
            return env.get(name) or None

        changes: dict[str, Any] = {}
        username = value(USERNAME_ENV)
        if self.username is None and username is not None:
            changes.update(username=username, password=value(PASSWORD_ENV))
        elif self.password is None and username is not None and username == self.username:
            changes["password"] = value(PASSWORD_ENV)
        if self.ca_file is None and value(CA_FILE_ENV) is not None:
            changes["ca_file"] = value(CA_FILE_ENV)
        if self.certfile is None and self.keyfile is None and value(CERT_FILE_ENV) is not None:
            changes.update(certfile=value(CERT_FILE_ENV), keyfile=value(KEY_FILE_ENV))
        return replace(self, **changes) if changes else self

    @property
    def url(self) -> str:
        """The URL without the password (safe to log)."""
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def _int_param(value: str, key: str, url: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise ConfigError(f"'{key}' must be an integer in {_redact(url)!r}", field=key) from exc


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


@dataclass(frozen=True, slots=True)
class Message:
    """One received message; ``received`` is ``time.monotonic()`` on arrival."""

    topic: str
    payload: bytes
    retain: bool
    received: float


Handler = Callable[[Message], None]


@dataclass
class _Subscription:
    qos: int
    handlers: list[Handler] = field(default_factory=list)


def packet_size(topic: str, payload_len: int, qos: int, mqtt5: bool) -> int:
    """Bytes of the PUBLISH packet for ``topic`` + payload (what the broker's limit counts)."""
    remaining = 2 + len(topic.encode()) + (2 if qos > 0 else 0) + (1 if mqtt5 else 0)
    remaining += payload_len
    length_bytes = 1
    while remaining >= 128**length_bytes:
        length_bytes += 1
    return 1 + length_bytes + remaining


class Bus:
    """One node's MQTT connection (see the module docstring for what it guarantees).

    ``kind`` is the node kind announced in its status (``device``, ``aggregator``, ``source``...).
    Publish and subscribe are thread-safe; ``stop()`` must not be called from a handler.
    """

    def __init__(
        self,
        config: BrokerConfig,
        *,
        node: str,
        kind: str,
        topics: Topics,
        version: str = __version__,
        client_id: str | None = None,
    ) -> None:
        self.config = config
        self.node = check_id(node, "node")
        self.kind = kind
        self.topics = topics
        self.status_topic = topics.status(node)
        self.client_id = client_id or f"mqttinfer-{topics.deployment}-{kind}-{node}"
        self.counters = Counters(
            "published",
            "publish_failed",
            "dropped_too_large",
            "dropped_not_connected",
            "received",
            "handler_errors",
            "connects",
            "reconnects",
            "disconnects",
            "connect_failures",
            "protocol_fallbacks",
        )
        self.bdseq = 0
        self._version = version
        self._status = Status(
            node=node, kind=kind, state="online", bdseq=0, ts=0.0, version=version
        )
        self._lock = threading.RLock()
        self._subs: dict[str, _Subscription] = {}
        # topic -> the subscribed filters it matches. Replaced (never edited) when subscriptions
        # change, so the network thread reads it without a lock.
        self._routes: dict[str, tuple[str, ...]] = {}
        self._listeners: list[Callable[[bool], None]] = []
        self._connected = threading.Event()
        # Set once the subscriptions sent on connect are acknowledged (SUBACK).
        self._subscribed = threading.Event()
        self._pending_suback: int | None = None
        self._state_changed = threading.Condition()
        self._broker_max_packet: int | None = None
        self._started = False
        self._stopping = False
        # Why connecting fails: each reason is logged at WARNING once, until the next connect.
        self._connect_problems: set[str] = set()
        self._refused = False  # the current attempt got a refusing CONNACK (already reported)
        self._socket_error: str | None = None  # why paho's latest read failed (its log)
        self._protocol = MQTT_PROTOCOLS[config.mqtt_version]
        self._client = self._make_client()

    # ------------------------------------------------------------------ public API
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def mqtt5(self) -> bool:
        return self._protocol == MQTTProtocolVersion.MQTTv5

    @property
    def max_packet_size(self) -> int:
        """The largest PUBLISH packet this bus will send (the broker's limit once known)."""
        broker = self._broker_max_packet
        return self.config.max_packet_size if broker is None else broker

    def max_payload(self, topic: str, qos: int = 1) -> int:
        """The largest payload that fits one message on ``topic`` (plan apply chunks by it)."""
        overhead = packet_size(topic, 0, qos, self.mqtt5)
        # The remaining-length field may grow by up to 3 bytes with the payload.
        return max(0, self.max_packet_size - overhead - 3)

    @property
    def status(self) -> Status:
        return self._status

    def on_connection_change(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(connected)`` on every connect/disconnect (on the network thread)."""
        with self._lock:
            self._listeners.append(callback)

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 0) -> None:
        """Deliver messages matching ``topic_filter`` to ``handler`` (on the network thread)."""
        with self._lock:
            sub = self._subs.get(topic_filter)
            is_new = sub is None
            if sub is None:
                sub = self._subs[topic_filter] = _Subscription(qos=qos)
                self._routes = {}
            raised = qos > sub.qos
            sub.qos = max(sub.qos, qos)
            sub.handlers.append(handler)
            if (is_new or raised) and self.connected:
                self._client.subscribe(topic_filter, qos=sub.qos)

    def unsubscribe(self, topic_filter: str) -> None:
        """Drop every handler of ``topic_filter`` and unsubscribe from the broker."""
        with self._lock:
            if self._subs.pop(topic_filter, None) is None:
                return
            self._routes = {}
            if self.connected:
                self._client.unsubscribe(topic_filter)

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> bool:
        """Queue ``payload`` for sending; False (and counted) when not connected or too large."""
        return self._publish(topic, payload, qos=qos, retain=retain) is not None

    def check_size(self, topic: str, payload_len: int, qos: int = 1) -> None:
        """Raise BrokerError when a payload of ``payload_len`` bytes cannot be published."""
        size = packet_size(topic, payload_len, qos, self.mqtt5)
        if size > self.max_packet_size:
            raise BrokerError(
                f"message on {topic} is {size} bytes, over the broker's maximum packet size "
                f"of {self.max_packet_size} bytes; it would never be delivered"
            )

    def update_status(self, **changes: Any) -> None:
        """Change status fields (``role``, ``serving``, ``error``) and republish the birth.

        The will registered with the broker keeps what was known at connect time; the next
        reconnect registers the new fields.
        """
        allowed = {"role", "serving", "error"}
        if set(changes) - allowed:
            raise ValueError(f"update_status takes only {sorted(allowed)}")
        role = changes.get("role")
        if role is not None and not isinstance(role, RoleSummary):
            raise TypeError("role must be a RoleSummary")
        with self._lock:
            self._status = replace(self._status, **changes)
        if self.connected:
            self._publish_birth()

    def start(self) -> None:
        """Start connecting in the background (returns at once; see ``wait_connected``)."""
        with self._lock:
            if self._started:
                return
            self._started = True
            self._stopping = False
        self._start_client(self._client)

    def wait_connected(self, timeout_s: float) -> bool:
        """True once connected *and* the broker acknowledged every subscription made so far,
        so messages other clients publish from then on are delivered."""
        with self._state_changed:
            return self._state_changed.wait_for(
                lambda: self._connected.is_set() and self._subscribed.is_set(), timeout_s
            )

    def stop(self, timeout_s: float = 2.0) -> None:
        """Publish ``offline`` (clean) if connected, disconnect, and stop the network thread."""
        with self._lock:
            if not self._started or self._stopping:
                return
            self._stopping = True
        client = self._client
        if self.connected:
            offline = self._status_message("offline", clean=True)
            info = self._publish(self.status_topic, offline.encode(), qos=_STATUS_QOS, retain=True)
            if info is not None:
                _wait_published(info, timeout_s)
        client.disconnect()
        client.loop_stop()
        self._connected.clear()
        with self._lock:
            self._started = False

    def __enter__(self) -> Bus:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ client plumbing
    def _make_client(self) -> mqtt.Client:
        mqtt5 = self._protocol == MQTTProtocolVersion.MQTTv5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=self._protocol,
            clean_session=None if mqtt5 else True,
        )
        # paho only ever calls .log(level, fmt, *args) on it.
        client.enable_logger(cast(logging.Logger, _PahoLog(self._on_socket_error)))
        client.reconnect_delay_set(self.config.reconnect_min_s, self.config.reconnect_max_s)
        client.max_queued_messages_set(_MAX_QUEUED_MESSAGES)
        if self.config.username is not None:
            client.username_pw_set(self.config.username, self.config.password)
        if self.config.tls:
            self._configure_tls(client)
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = _disable_nagle
        # One callback for every message: paho's per-filter callbacks would walk its topic trie
        # on every message (~5 µs); the bus remembers which filters each topic matches.
        client.on_message = self._dispatch
        return client

    def _configure_tls(self, client: mqtt.Client) -> None:
        cfg = self.config
        try:
            client.tls_set(
                ca_certs=cfg.ca_file,
                certfile=cfg.certfile,
                keyfile=cfg.keyfile,
                cert_reqs=ssl.CERT_NONE if cfg.tls_insecure else ssl.CERT_REQUIRED,
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load TLS files ({exc})",
                source=cfg.ca_file or cfg.certfile,
                field="ca_file/certfile/keyfile",
                fix="check MQTTINFER_CA_FILE, _CERT_FILE and _KEY_FILE, or ?ca=, ?cert= and "
                "?key= of the broker URL",
            ) from exc
        client.tls_insecure_set(cfg.tls_insecure)

    def _start_client(self, client: mqtt.Client) -> None:
        try:
            client.connect_async(
                self.config.host,
                self.config.port,
                keepalive=self.config.keepalive_s,
                clean_start=True if self.mqtt5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            )
        except ValueError as exc:
            raise ConfigError(f"bad broker address ({exc})", field="broker") from exc
        client.loop_start()

    def _next_bdseq(self) -> int:
        return max(self.bdseq + 1, int(time.time() * 1000))

    def _status_message(self, state: str, *, clean: bool = False) -> Status:
        with self._lock:
            return replace(self._status, state=state, bdseq=self.bdseq, ts=time.time(), clean=clean)

    def _publish_birth(self) -> None:
        birth = self._status_message("online")
        self._publish(self.status_topic, birth.encode(), qos=_STATUS_QOS, retain=True)

    def _publish(
        self, topic: str, payload: bytes, *, qos: int, retain: bool
    ) -> mqtt.MQTTMessageInfo | None:
        size = packet_size(topic, len(payload), qos, self.mqtt5)
        if size > self.max_packet_size:
            self.counters.inc("dropped_too_large")
            log.error(
                "not publishing %d bytes on %s: over the broker's maximum packet size (%d)",
                size,
                topic,
                self.max_packet_size,
            )
            return None
        if not self.connected:
            self.counters.inc("dropped_not_connected")
            return None
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.counters.inc("publish_failed")
            log.warning("publish on %s failed: %s", topic, mqtt.error_string(info.rc))
            return None
        self.counters.inc("published")
        return info

    def _dispatch(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # brokers refuse such topics; never let one stop the loop
            self.counters.inc("handler_errors")
            log.warning("dropped a message whose topic is not UTF-8: %r", msg._topic[:120])
            return
        message = Message(
            topic=topic,
            payload=bytes(msg.payload),
            retain=bool(msg.retain),
            received=time.monotonic(),
        )
        self.counters.inc("received")
        # No lock on this per-message path: reading a dict entry and copying a list to a tuple
        # are single operations under the GIL; subscribe/unsubscribe replace the routes dict and
        # only ever append to a subscription's list or add or remove a dict entry.
        for topic_filter in self._filters_for(message.topic):
            sub = self._subs.get(topic_filter)
            for handler in tuple(sub.handlers) if sub is not None else ():
                try:
                    handler(message)
                except Exception:
                    self.counters.inc("handler_errors")
                    log.exception(
                        "handler for %s failed on a %d-byte message (%r...)",
                        message.topic,
                        len(message.payload),
                        message.payload[:_LOG_PAYLOAD_CHARS],
                    )

    def _filters_for(self, topic: str) -> tuple[str, ...]:
        """The subscribed filters ``topic`` matches, remembered per topic."""
        routes = self._routes
        filters = routes.get(topic)
        if filters is None:
            filters = tuple(f for f in list(self._subs) if mqtt.topic_matches_sub(f, topic))
            if len(routes) >= _MAX_ROUTES:
                routes.clear()
            routes[topic] = filters
        return filters

    # ------------------------------------------------------------------ paho callbacks
    def _on_pre_connect(self, client: mqtt.Client, _userdata: Any) -> None:
        # Runs before every connect attempt: the will must carry this connection's bdseq.
        with self._lock:
            self.bdseq = self._next_bdseq()
            self._refused = False
            self._socket_error = None
        will = self._status_message("offline")
        client.will_set(self.status_topic, will.encode(), qos=_STATUS_QOS, retain=True)

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._on_refused(client, reason)
            return
        self._broker_max_packet = _connack_max_packet(properties)
        with self._lock:
            self._connect_problems.clear()  # the same failure later is news again
        self.counters.inc("connects")
        if self.counters["connects"] > 1:
            self.counters.inc("reconnects")
        with self._lock:
            filters = [(topic_filter, sub.qos) for topic_filter, sub in self._subs.items()]
        self._subscribed.clear()
        if filters:
            # Before `connected` is set: whatever callers publish next reaches the broker after
            # this SUBSCRIBE, so a node sees its own messages and replies to them.
            _rc, self._pending_suback = client.subscribe(filters)
        else:
            self._subscribed.set()
        self._connected.set()
        self._notify_state()
        self._requeue_unacknowledged(client)
        self._publish_birth()
        log.info(
            "%s %s connected to %s (MQTT %s, bdseq %d)",
            self.kind,
            self.node,
            self.config.url,
            "5" if self.mqtt5 else "3.1.1",
            self.bdseq,
        )
        self._notify(True)

    def _requeue_unacknowledged(self, client: mqtt.Client) -> None:
        """Drop status messages the last connection left unacknowledged; re-send the rest.

        paho re-sends unacknowledged QoS 1 messages after a reconnect, *after* whatever
        on_connect publishes: an old birth would land after the new one and stay retained
        with a stale bdseq (seen when the broker crashed right after a birth).
        """
        for message in client.drop_out_messages():
            if message.topic == self.status_topic:
                continue
            info = client.publish(message.topic, message.payload, message.qos, message.retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                self.counters.inc("publish_failed")

    def _on_refused(self, client: mqtt.Client, reason: ReasonCode) -> None:
        # Counted as a connect failure by _on_disconnect, which paho calls next.
        if (
            reason.value == _UNSUPPORTED_PROTOCOL
            and self.mqtt5
            and self.config.mqtt_version == "auto"
            and not self._stopping
        ):
            log.warning("broker %s does not speak MQTT 5; falling back to 3.1.1", self.config.url)
            self.counters.inc("protocol_fallbacks")
            # The paho thread cannot join itself: rebuild the client from a helper thread.
            threading.Thread(
                target=self._fall_back, args=(client,), name="mqtt-fallback", daemon=True
            ).start()
            return
        with self._lock:
            self._refused = True
        self._connect_problem(f"the broker refused it: {reason} (reason code {reason.value})")

    def _fall_back(self, old: mqtt.Client) -> None:
        old.loop_stop()
        with self._lock:
            if self._stopping or old is not self._client:
                return
            self._protocol = MQTTProtocolVersion.MQTTv311
            self._client = self._make_client()
            client = self._client
        self._start_client(client)

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            log.error("%s %s: broker refused subscriptions: %s", self.kind, self.node, refused)
        if mid == self._pending_suback:
            self._subscribed.set()
            self._notify_state()

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        self.counters.inc("connect_failures")
        # paho calls this from inside its `except OSError` around the connect attempt and
        # passes no exception: the one being handled is the reason (refused TCP connect,
        # unknown host, failed TLS handshake).
        self._connect_problem(_failure_reason(sys.exc_info()[1]))

    def _on_socket_error(self, text: str) -> None:
        # The only place paho tells why a read failed, e.g. the broker's TLS alert when it
        # wants a client certificate; _on_disconnect reports it.
        self._socket_error = text

    def _connect_problem(self, reason: str) -> None:
        """Log why connecting failed: at WARNING the first time this reason comes up."""
        with self._lock:
            new = reason not in self._connect_problems
            self._connect_problems.add(reason)
        log.log(
            logging.WARNING if new and not self._stopping else logging.DEBUG,
            "%s %s cannot connect to %s: %s; retrying",
            self.kind,
            self.node,
            self.config.url,
            reason,
        )

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if not was_connected:
            # Refused CONNACK (reported in _on_refused), or the broker hung up before any
            # CONNACK, e.g. a client certificate it rejected after a TLS 1.3 handshake.
            self.counters.inc("connect_failures")
            with self._lock:
                refused = self._refused
            if not refused:
                why = self._socket_error or str(reason)
                self._connect_problem(f"the broker closed the connection ({why})")
            return
        self.counters.inc("disconnects")
        if not self._stopping:
            why = self._socket_error or str(reason)
            log.warning("%s %s lost its broker connection: %s", self.kind, self.node, why)
        self._notify(False)

    def _notify_state(self) -> None:
        with self._state_changed:
            self._state_changed.notify_all()

    def _notify(self, connected: bool) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(connected)
            except Exception:
                self.counters.inc("handler_errors")
                log.exception("connection listener failed")


def _disable_nagle(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """Small messages (partials, results) must leave at once, not wait for the previous ACK:
    with Nagle's algorithm and the peer's delayed ACK a QoS 0 stream stalls ~40 ms a message."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:  # not a TCP socket (unix, websockets wrapper)
        log.debug("cannot set TCP_NODELAY: %s", exc)


def _failure_reason(exc: BaseException | None) -> str:
    if isinstance(exc, ssl.SSLError):
        # Says which: "certificate verify failed: self-signed certificate in certificate chain"
        # (wrong CA file) or "Hostname mismatch" (a name the certificate was not made for).
        return f"TLS handshake failed: {exc}"
    if exc is None:
        return "connection failed"
    return f"{type(exc).__name__}: {exc}"


def _connack_max_packet(properties: Properties | None) -> int | None:
    value = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
    return int(value) if isinstance(value, int) and value > 0 else None


def _wait_published(info: mqtt.MQTTMessageInfo, timeout_s: float) -> None:
    try:
        info.wait_for_publish(timeout_s)
    except (RuntimeError, ValueError) as exc:
        log.debug("offline status not confirmed: %s", exc)
