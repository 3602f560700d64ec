"""What broker init's ACL, passwords and TLS really enforce, on a real Mosquitto.

The broker runs ``mosquitto -c <broker init's mosquitto.conf>``; the only addition is a test
``admin`` that may read and write everything, used to publish into every topic and to watch
what gets through. Access is judged by DELIVERY, not by PUBACK/SUBACK (Mosquitto acknowledges
a refused publish and grants any subscription, then filters each message per reader).

How a negative check stays fast and exact: Mosquitto handles one client's messages in order,
and queues a QoS 1 message to every subscriber before it acknowledges it. So once a later
"sentinel" message has arrived, anything published before it that was going to be delivered
has been delivered already; no sleeping and hoping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from mqttinfer.broker_files import parse_env
from mqttinfer.broker_init import InitOptions, InitReport, init_broker
from mqttinfer.broker_tools import Pki
from mqttinfer.runtime.local_broker import LocalBroker, find_mosquitto, free_port
from mqttinfer.runtime.source import Source
from tests.support.synthetic import SyntheticBundle, random_frames

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
]

DEPLOYMENT = "sec"
PREFIX = f"mqttinfer/{DEPLOYMENT}"
DEVICES = ("dev-a", "dev-b")
SOURCES = ("cam1", "cam2")
ADMIN = "admin"
TIMEOUT_S = 10.0
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ a broker
@dataclass
class SecuredBroker:
    report: InitReport
    port: int  # TLS, all interfaces
    local_port: int  # plain, 127.0.0.1 only
    passwords: dict[str, str]
    broker: LocalBroker

    @property
    def ca(self) -> Path:
        return self.report.out / "tls" / "ca.crt"

    def client(self, user: str | None, **kwargs: object) -> Client:
        password = self.passwords.get(user or "", None)
        return Client(user, password, port=self.port, ca=self.ca, **kwargs)  # type: ignore[arg-type]


def _broker_readable_dir() -> Path:
    base = Path(tempfile.mkdtemp(prefix="mqttinfer-security-"))
    # Mosquitto started as root reads its files as user 'mosquitto': let it reach them.
    os.chmod(base, 0o755)
    return base


def _two_free_ports() -> tuple[int, int]:
    first = free_port()
    second = free_port()
    while second == first:
        second = free_port()
    return first, second


def _add_admin(out: Path, password: str) -> None:
    """A test-only superuser, appended without touching what broker init wrote."""
    scratch = out / "admin.passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", scratch, ADMIN, password], check=True)
    with (out / "passwd").open("a") as passwd:
        passwd.write(scratch.read_text())
    scratch.unlink()
    with (out / "acl").open("a") as acl:
        acl.write(f"\nuser {ADMIN}\ntopic readwrite mqttinfer/#\n")


def start_secured_broker(base: Path, **options: object) -> SecuredBroker:
    fleet = base / "fleet.yaml"
    spec = "flops: 1G, memory: 64MiB, rate: 10Mbit/s, outage: 0.1"
    fleet.write_text("devices:\n" + "".join(f"  - {{id: {d}, {spec}}}\n" for d in DEVICES))
    port, local_port = _two_free_ports()
    report = init_broker(
        InitOptions(
            fleet=fleet,
            out=base / "broker",
            deployment=DEPLOYMENT,
            tls=True,
            hostname="localhost",
            sources=SOURCES,
            port=port,
            local_port=local_port,
            **options,  # type: ignore[arg-type]
        )
    )
    passwords = {
        i.name: parse_env(report.env_file(i.name).read_text())["MQTTINFER_PASSWORD"]
        for i in report.identities
    }
    passwords[ADMIN] = uuid.uuid4().hex
    _add_admin(report.out, passwords[ADMIN])
    broker = LocalBroker(port=port, config_file=report.conf).start()
    return SecuredBroker(report, port, local_port, passwords, broker)


@contextlib.contextmanager
def secured_broker(**options: object) -> Iterator[SecuredBroker]:
    """A broker started from broker init's output; stopped and deleted afterwards."""
    base = _broker_readable_dir()
    broker: LocalBroker | None = None
    try:
        running = start_secured_broker(base, **options)
        broker = running.broker
        yield running
    finally:
        if broker is not None:
            broker.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def secured() -> Iterator[SecuredBroker]:
    with secured_broker() as running:
        yield running


# ------------------------------------------------------------------------------ a client
@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool


@dataclass
class Client:
    """A paho client that waits for CONNACK, SUBACK and PUBACK, and records deliveries."""

    username: str | None
    password: str | None
    port: int
    ca: Path | None = None
    host: str = "localhost"
    tls: bool = True
    certfile: Path | None = None
    keyfile: Path | None = None
    will: tuple[str, bytes] | None = None
    messages: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._connack: ReasonCode | None = None
        self._closed = False
        self._acks: set[int] = set()
        self.mqtt = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-{self.username}-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if self.username is not None:
            self.mqtt.username_pw_set(self.username, self.password)
        if self.tls:
            self.mqtt.tls_set(
                ca_certs=str(self.ca) if self.ca else None,
                certfile=str(self.certfile) if self.certfile else None,
                keyfile=str(self.keyfile) if self.keyfile else None,
            )
        if self.will is not None:
            self.mqtt.will_set(self.will[0], self.will[1], qos=1, retain=False)
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_message = self._on_message
        self.mqtt.on_subscribe = self._on_subscribe
        self.mqtt.on_disconnect = self._on_disconnect

    # paho callbacks (network thread)
    def _on_connect(
        self,
        _c: mqtt.Client,
        _u: object,
        _f: mqtt.ConnectFlags,
        reason: ReasonCode,
        _p: Properties | None,
    ) -> None:
        with self._cond:
            self._connack = reason
            self._cond.notify_all()

    def _on_disconnect(
        self,
        _c: mqtt.Client,
        _u: object,
        _f: mqtt.DisconnectFlags,
        _reason: ReasonCode,
        _p: Properties | None,
    ) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def _on_subscribe(
        self,
        _c: mqtt.Client,
        _u: object,
        mid: int,
        _codes: list[ReasonCode],
        _p: Properties | None,
    ) -> None:
        with self._cond:
            self._acks.add(mid)
            self._cond.notify_all()

    # test API
    def connect(self) -> ReasonCode | None:
        """The CONNACK reason (None: the connection closed first). TLS failures raise here."""
        self.mqtt.connect(self.host, self.port, keepalive=30)
        self.mqtt.loop_start()
        with self._cond:
            self._cond.wait_for(lambda: self._connack is not None or self._closed, TIMEOUT_S)
            return self._connack

    def connected(self) -> Client:
        reason = self.connect()
        assert reason is not None and not reason.is_failure, f"{self.username}: {reason}"
        return self

    def subscribe(self, topic_filter: str) -> None:
        _, mid = self.mqtt.subscribe(topic_filter, qos=1)
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._acks, TIMEOUT_S), "no SUBACK"

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.mqtt.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(TIMEOUT_S)
        assert info.is_published(), f"no PUBACK for {topic}"

    def wait_for(self, topic: str, payload: bytes) -> None:
        def arrived() -> bool:
            return any(m.topic == topic and m.payload == payload for m in self.messages)

        with self._cond:
            assert self._cond.wait_for(arrived, TIMEOUT_S), f"{topic} {payload!r} never arrived"

    def topics(self, *, retained: bool = False) -> set[str]:
        with self._cond:
            return {m.topic for m in self.messages if m.retain == retained}

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def full(suffixes: Sequence[str]) -> set[str]:
    return {f"{PREFIX}/{s}" for s in suffixes}


# ------------------------------------------------------------------------------ writes
# (allowed, forbidden) topic suffixes for each identity's publishes.
WRITES: dict[str, tuple[list[str], list[str]]] = {
    "dev-a": (
        [
            "partials/0/dev-a",
            "partials/3/dev-a",
            "status/dev-a",
            "stats/dev-a",
            "profile/dev-a",
            "probe/dev-a/barrier",
        ],
        [
            "probe/dev-b/barrier",
            "partials/0/dev-b",
            "status/dev-b",
            "stats/dev-b",
            "profile/dev-b",
            "results/cam1",
            "frames/cam1",
            "frames/dev-a",
            "plan/dev-a",
            "models/abc",
            "models/abc/0",
            "partials/0/dev-a/x",
        ],
    ),
    "aggregator": (
        ["results/cam1", "results/cam2", "status/aggregator", "stats/aggregator"],
        [
            "probe/dev-a/echo",
            "partials/0/aggregator",
            "partials/0/dev-a",
            "profile/aggregator",
            "frames/cam1",
            "plan/aggregator",
            "models/abc",
            "status/dev-a",
        ],
    ),
    "cam1": (
        ["frames/cam1", "status/cam1", "stats/cam1"],
        [
            "frames/cam2",
            "results/cam1",
            "partials/0/cam1",
            "profile/cam1",
            "plan/cam1",
            "models/abc",
            "status/cam2",
        ],
    ),
    "apply": (
        [
            "plan/dev-a",
            "plan/dev-b",
            "models/abc",
            "models/abc/0",
            "status/apply",
            "stats/apply",
            "probe/apply/barrier",
        ],
        [
            "partials/0/apply",
            "profile/apply",
            "frames/cam1",
            "frames/apply",
            "results/cam1",
            "status/dev-a",
        ],
    ),
    "monitor": (
        ["probe/monitor/barrier"],
        [
            "status/monitor",
            "stats/monitor",
            "partials/0/monitor",
            "profile/monitor",
            "plan/monitor",
            "frames/cam1",
            "results/cam1",
            "status/dev-a",
        ],
    ),
}


def check_writes(secured: SecuredBroker, publisher: Client, identity: str) -> None:
    allowed, forbidden = WRITES[identity]
    with secured.client(ADMIN).connected() as admin:
        admin.subscribe(f"{PREFIX}/#")
        for suffix in forbidden + allowed:
            publisher.publish(f"{PREFIX}/{suffix}", identity.encode())
        # Every publish above was acknowledged, so it was delivered or dropped by now.
        admin.publish(f"{PREFIX}/sentinel", b"end")
        admin.wait_for(f"{PREFIX}/sentinel", b"end")
        assert admin.topics() - {f"{PREFIX}/sentinel"} == full(allowed)


@pytest.mark.parametrize("identity", list(WRITES))
def test_each_identity_can_publish_only_its_own_topics(
    secured: SecuredBroker, identity: str
) -> None:
    with secured.client(identity).connected() as publisher:
        check_writes(secured, publisher, identity)


def test_the_loopback_listener_enforces_the_same_acl(secured: SecuredBroker) -> None:
    local = Client(
        "dev-a", secured.passwords["dev-a"], port=secured.local_port, host="127.0.0.1", tls=False
    )
    with local.connected() as publisher:
        check_writes(secured, publisher, "dev-a")


# ------------------------------------------------------------------------------ reads
STATUSES = ["status/dev-a", "status/dev-b", "status/aggregator", "status/cam1", "status/monitor"]
STATS = ["stats/dev-a", "stats/dev-b", "stats/aggregator", "stats/monitor"]
TREE = [
    "frames/cam1",
    "frames/cam2",
    "partials/0/dev-a",
    "partials/0/dev-b",
    "results/cam1",
    "results/cam2",
    *STATUSES,
    *STATS,
    "plan/dev-a",
    "plan/dev-b",
    "models/abc",
    "models/abc/0",
    "profile/dev-a",
    "profile/dev-b",
    "probe/dev-a/barrier",
    "probe/apply/echo",
]
# What each identity receives of one message on every topic of TREE.
READS: dict[str, list[str]] = {
    "dev-a": [
        "frames/cam1",
        "frames/cam2",
        "status/dev-a",
        "plan/dev-a",
        "models/abc",
        "models/abc/0",
        "profile/dev-a",
        "probe/dev-a/barrier",
    ],
    "dev-b": [
        "frames/cam1",
        "frames/cam2",
        "status/dev-b",
        "plan/dev-b",
        "models/abc",
        "models/abc/0",
        "profile/dev-b",
    ],
    "aggregator": ["frames/cam1", "frames/cam2", "partials/0/dev-a", "partials/0/dev-b", *STATUSES],
    "cam1": ["results/cam1", "status/cam1"],
    "cam2": ["results/cam2"],
    "apply": [
        "plan/dev-a",
        "plan/dev-b",
        "models/abc",
        "models/abc/0",
        *STATUSES,
        "profile/dev-a",
        "profile/dev-b",
        "probe/apply/echo",
    ],
    "monitor": [s for s in STATUSES + STATS if not s.endswith("/monitor")],
}


@pytest.mark.parametrize("identity", list(READS))
def test_each_identity_receives_only_what_it_may_read(
    secured: SecuredBroker, identity: str
) -> None:
    readable = READS[identity]
    with (
        secured.client(identity).connected() as reader,
        secured.client(ADMIN).connected() as admin,
    ):
        reader.subscribe(f"{PREFIX}/#")  # granted: Mosquitto filters per message
        for suffix in TREE:
            admin.publish(f"{PREFIX}/{suffix}", b"x")
        sentinel = f"{PREFIX}/{readable[0]}"
        admin.publish(sentinel, b"end")
        reader.wait_for(sentinel, b"end")
        assert reader.topics() == full(readable)


def test_retained_messages_obey_the_acl(secured: SecuredBroker) -> None:
    retained = ["plan/dev-a", "plan/dev-b", "models/abc", "results/cam1"]
    with secured.client(ADMIN).connected() as admin:
        for suffix in retained:
            admin.publish(f"{PREFIX}/{suffix}", b"kept", retain=True)
        try:
            with secured.client("dev-a").connected() as device:
                device.subscribe(f"{PREFIX}/#")  # retained ones are queued before the SUBACK
                admin.publish(f"{PREFIX}/frames/cam1", b"end")
                device.wait_for(f"{PREFIX}/frames/cam1", b"end")
                assert device.topics(retained=True) == full(["plan/dev-a", "models/abc"])
        finally:
            for suffix in retained:
                admin.publish(f"{PREFIX}/{suffix}", b"", retain=True)


def test_a_device_cannot_forge_another_devices_will(secured: SecuredBroker) -> None:
    forged = f"{PREFIX}/status/dev-b"
    own = f"{PREFIX}/status/dev-a"
    with secured.client(ADMIN).connected() as admin:
        admin.subscribe(f"{PREFIX}/status/#")
        liar = secured.client("dev-a", will=(forged, b"offline")).connected()
        honest = secured.client("dev-a", will=(own, b"offline")).connected()
        for client in (liar, honest):
            # Drop the TCP connection without DISCONNECT: the broker publishes the will.
            client.mqtt.loop_stop()
            sock = client.mqtt.socket()
            assert isinstance(sock, socket.socket)
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            time.sleep(0.5)  # the liar's connection is gone before the honest one's
        admin.wait_for(own, b"offline")
        assert forged not in admin.topics()


def test_monitor_may_read_the_broker_counters(secured: SecuredBroker) -> None:
    with secured.client("monitor").connected() as monitor:
        monitor.subscribe("$SYS/broker/version")
        with monitor._cond:
            assert monitor._cond.wait_for(lambda: monitor.messages, TIMEOUT_S)
        assert monitor.messages[0].payload.startswith(b"mosquitto version")


# ------------------------------------------------------------------------------ authentication
@pytest.mark.parametrize("listener", ["tls", "loopback"])
@pytest.mark.parametrize(
    ("username", "password"),
    [
        ("dev-a", "wrong"),
        ("dev-a", None),  # the password of another identity, filled in below
        ("nobody", "whatever"),
        (None, None),  # anonymous
    ],
)
def test_wrong_credentials_are_refused(
    secured: SecuredBroker, listener: str, username: str | None, password: str | None
) -> None:
    if username == "dev-a" and password is None:
        password = secured.passwords["dev-b"]
    if listener == "tls":
        client = Client(username, password, port=secured.port, ca=secured.ca)
    else:
        client = Client(username, password, port=secured.local_port, host="127.0.0.1", tls=False)
    with client:
        reason = client.connect()
    assert reason is not None and reason.is_failure, reason
    assert reason.getName() in {"Bad user name or password", "Not authorized"}


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_tls_verifies_against_the_generated_ca(secured: SecuredBroker, host: str) -> None:
    client = Client(
        "dev-a", secured.passwords["dev-a"], port=secured.port, ca=secured.ca, host=host
    )
    with client.connected():
        assert client.mqtt.is_connected()


def test_tls_with_another_ca_fails(secured: SecuredBroker, tmp_path: Path) -> None:
    pki = Pki(work=tmp_path, hostname="localhost")
    pki.new_ca(tmp_path / "other-ca.crt", tmp_path / "other-ca.key", "someone else")
    client = Client(
        "dev-a", secured.passwords["dev-a"], port=secured.port, ca=tmp_path / "other-ca.crt"
    )
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        client.connect()
    client.mqtt.loop_stop()


def test_plain_mqtt_on_the_tls_port_gets_no_connack(secured: SecuredBroker) -> None:
    client = Client("dev-a", secured.passwords["dev-a"], port=secured.port, tls=False)
    try:
        reason = client.connect()
    except OSError:
        reason = None  # the broker may reset the connection while paho sends CONNECT
    finally:
        client.close()
    assert reason is None or reason.is_failure


def _outside_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks a route, sends nothing
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_the_plain_listener_is_not_reachable_from_outside(secured: SecuredBroker) -> None:
    address = _outside_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address, secured.local_port), timeout=2).close()
    socket.create_connection((address, secured.port), timeout=2).close()  # TLS listener is


# ------------------------------------------------------------------------------ client certs
@pytest.fixture(scope="module")
def cert_broker() -> Iterator[SecuredBroker]:
    with secured_broker(client_certs=True) as running:
        yield running


def test_with_client_certs_a_certificate_is_required(cert_broker: SecuredBroker) -> None:
    clients = cert_broker.report.out / "tls" / "clients"
    password = cert_broker.passwords["dev-a"]
    with Client(
        "dev-a",
        password,
        port=cert_broker.port,
        ca=cert_broker.ca,
        certfile=clients / "device-dev-a.crt",
        keyfile=clients / "device-dev-a.key",
    ) as client:
        client.connected()
    without = Client("dev-a", password, port=cert_broker.port, ca=cert_broker.ca)
    try:
        reason = without.connect()
    except (ssl.SSLError, OSError):
        reason = None  # TLS 1.2 fails the handshake; TLS 1.3 drops the connection after it
    finally:
        without.close()
    assert reason is None or reason.is_failure


# ------------------------------------------------------------------------------ real roles
def _role_url(secured: SecuredBroker, identity: str) -> str:
    """The broker URL a role process takes (credentials inline: these are test processes)."""
    password = secured.passwords[identity]
    return f"mqtts://{identity}:{password}@localhost:{secured.port}?ca={secured.ca}"


def _write_plan(path: Path, bundle: SyntheticBundle) -> Path:
    """Group k = device DEVICES[k] serves partition k of ``bundle`` (the planner's format)."""
    sizes = [len(k) for k in bundle.kernels]
    lines = [
        "version: 1",
        "name: security",
        "strategy: rocoin",
        f"deployment: {DEPLOYMENT}",
        "epsilon: 0.05",
        f"channels: {sum(sizes)}",
        f"input_shape: {list(bundle.shape)}",
        "groups:",
    ]
    for k, device in enumerate(DEVICES):
        first = sum(sizes[:k])
        lines += [
            f"  - id: g{k}",
            f"    partition: {k}",
            f"    filters: {list(range(first, first + sizes[k]))}",
            "    student: {arch: wrn-16-1, params: 100, macs: 1000, memory: 4096}",
            f"    members: [{{device: {device}, outage: 0.1, latency_s: 0.05}}]",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_real_roles_work_within_their_permissions(
    secured: SecuredBroker, synthetic_bundle: SyntheticBundle, tmp_path: Path
) -> None:
    """Devices without a role, the aggregator, plan apply and a source, each with its own
    identity over TLS: the plan reaches the devices, and a frame gets a complete result."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    python = [sys.executable, "-m"]
    nodes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for device in DEVICES:
            nodes[device] = subprocess.Popen(
                [
                    *python,
                    *("mqttinfer.runtime.cli", "device", "run", "--id", device),
                    *("--broker", _role_url(secured, device), "--deployment", DEPLOYMENT),
                    *("--state-dir", str(tmp_path / device), "--log-level", "WARNING"),
                ],
                env=env,
            )
        nodes["aggregator"] = subprocess.Popen(
            [
                *python,
                *("mqttinfer.runtime.aggregator_cli", "run", "--id", "aggregator"),
                *("--broker", _role_url(secured, "aggregator"), "--deployment", DEPLOYMENT),
                *("--bundle", str(synthetic_bundle.path), "--log-level", "WARNING"),
            ],
            env=env,
        )
        plan = _write_plan(tmp_path / "plan.yaml", synthetic_bundle)
        applied = subprocess.run(
            [
                *python,
                *("mqttinfer.runtime.deploy_cli", "plan", "apply", str(plan), "--json"),
                *("--bundle", str(synthetic_bundle.path), "--id", "apply", "--timeout", "60"),
                *("--broker", _role_url(secured, "apply"), "--chunk-size", "200"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert applied.returncode == 0, applied.stdout + applied.stderr
        frame = random_frames(1, synthetic_bundle.shape)[0]
        with Source(_role_url(secured, "cam1"), source_id="cam1", deployment=DEPLOYMENT) as cam:
            result = None
            for _ in range(20):  # the aggregator may still be learning who serves what
                result = cam.infer(frame, timeout_s=5)
                if not result.degraded:
                    break
            assert result is not None and not result.degraded, result
    finally:
        for proc in nodes.values():
            proc.terminate()
        for name, proc in nodes.items():
            assert proc.wait(timeout=15) == 0, f"{name} did not stop cleanly"


# ------------------------------------------------------------------------------ operations
def test_adding_a_device_takes_init_force_and_a_reload() -> None:
    """docs/operations.md: re-run broker init --force with the grown inventory, then SIGHUP
    (systemctl reload mosquitto). The new device gets in, the removed one no longer does, and
    everybody else keeps their password."""
    with secured_broker() as running:
        fleet = running.report.out.parent / "fleet.yaml"
        spec = "flops: 1G, memory: 64MiB, rate: 10Mbit/s, outage: 0.1"
        fleet.write_text(f"devices:\n  - {{id: dev-a, {spec}}}\n  - {{id: dev-c, {spec}}}\n")
        report = init_broker(
            InitOptions(
                fleet=fleet,
                out=running.report.out,
                deployment=DEPLOYMENT,
                tls=True,
                hostname="localhost",
                sources=SOURCES,
                port=running.port,
                local_port=running.local_port,
                force=True,
            )
        )
        assert report.created == ("dev-c",)
        new_password = parse_env(report.env_file("dev-c").read_text())["MQTTINFER_PASSWORD"]
        proc = running.broker._proc  # LocalBroker has no public pid; this is its child
        assert proc is not None
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + TIMEOUT_S
        while not _accepted(running, "dev-c", new_password):  # reloads in its next pass
            assert time.monotonic() < deadline, "dev-c is still refused after the reload"
            time.sleep(0.1)
        assert not _accepted(running, "dev-b", running.passwords["dev-b"])
        assert _accepted(running, "dev-a", running.passwords["dev-a"])


def _accepted(running: SecuredBroker, user: str, password: str) -> bool:
    with Client(user, password, port=running.port, ca=running.ca) as client:
        reason = client.connect()
    return reason is not None and not reason.is_failure
