"""The MQTT adapter against a real Mosquitto: birth/will, bdseq, reconnects, limits, TLS."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from mqttinfer.errors import BrokerError, ConfigError
from mqttinfer.protocol import RoleSummary, Status
from mqttinfer.runtime.bus import BrokerConfig, Bus, Message, packet_size
from mqttinfer.runtime.local_broker import LocalBroker, free_port
from mqttinfer.topics import Topics
from tests.busutil import Inbox, make_bus, subprocess_env

pytestmark = pytest.mark.broker


@pytest.fixture
def monitor(broker: LocalBroker, deployment: str) -> Iterator[tuple[Bus, Inbox]]:
    bus = make_bus(broker.url, deployment, "mon", kind="monitor")
    inbox = Inbox()
    bus.subscribe(Topics(deployment).all_status, inbox, qos=1)
    bus.start()
    assert bus.wait_connected(10)
    yield bus, inbox
    bus.stop()


def retained_status(url: str, deployment: str, node: str) -> Status:
    """A brand-new subscriber's view: the retained status of ``node``."""
    bus = make_bus(url, deployment, "probe", kind="monitor")
    inbox = Inbox()
    bus.subscribe(Topics(deployment).status(node), inbox, qos=1)
    with bus:
        assert inbox.wait(lambda: bool(inbox.messages), 10), "no retained status"
    assert inbox.messages[0].retain
    return Status.decode(inbox.messages[0].payload)


def test_birth_is_retained_and_a_clean_stop_publishes_offline(
    broker: LocalBroker, deployment: str, monitor: tuple[Bus, Inbox]
) -> None:
    _, inbox = monitor
    device = make_bus(broker.url, deployment, "dev1")
    role = RoleSummary(group="g0", partition=1, plan="p", plan_version=2)
    device.update_status(role=role, serving="loading")
    device.start()
    assert device.wait_connected(10)
    device.update_status(serving="ready")

    birth = retained_status(broker.url, deployment, "dev1")
    assert (birth.state, birth.serving, birth.role, birth.kind) == (
        "online",
        "ready",
        role,
        "device",
    )
    assert birth.bdseq == device.bdseq
    assert birth.bdseq >= int(time.time() * 1000) - 60_000  # wall-clock ms seeded

    device.stop()
    assert inbox.wait(lambda: any(s.state == "offline" for s in inbox.statuses("dev1")))
    offline = retained_status(broker.url, deployment, "dev1")
    assert (offline.state, offline.clean, offline.bdseq) == ("offline", True, birth.bdseq)
    assert offline.role == role
    assert not device.connected


VICTIM = textwrap.dedent(
    """
    import sys, time
    from mqttinfer.runtime.bus import BrokerConfig, Bus
    from mqttinfer.topics import Topics
    bus = Bus(BrokerConfig.from_url(sys.argv[1], keepalive_s=30), node="victim", kind="device",
              topics=Topics(sys.argv[2]))
    bus.start()
    assert bus.wait_connected(10)
    print(bus.bdseq, flush=True)
    time.sleep(120)
    """
)


def test_a_sigkilled_client_leaves_its_will(
    broker: LocalBroker, deployment: str, monitor: tuple[Bus, Inbox]
) -> None:
    _, inbox = monitor
    env = subprocess_env()
    proc = subprocess.Popen(
        [sys.executable, "-c", VICTIM, broker.url, deployment],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        bdseq = int(proc.stdout.readline())
        assert inbox.wait(lambda: any(s.state == "online" for s in inbox.statuses("victim")))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        # The socket closes with the process, so the broker sends the will well before the
        # 30 s keepalive would have expired.
        assert inbox.wait(
            lambda: any(s.state == "offline" for s in inbox.statuses("victim")), timeout_s=10
        )
    finally:
        proc.kill()
        proc.wait(timeout=10)
    will = next(s for s in inbox.statuses("victim") if s.state == "offline")
    assert (will.clean, will.bdseq, will.kind) == (False, bdseq, "device")


def test_bdseq_grows_and_subscriptions_return_after_a_broker_restart(
    fresh_broker: LocalBroker, deployment: str
) -> None:
    topics = Topics(deployment)
    device = make_bus(fresh_broker.url, deployment, "dev1")
    frames = Inbox()
    device.subscribe(topics.all_frames, frames, qos=0)
    device.subscribe(topics.all_frames, frames, qos=1)  # same filter, higher QoS: one subscription
    statuses = Inbox()
    device.subscribe(topics.all_status, statuses, qos=1)
    sender = make_bus(fresh_broker.url, deployment, "cam", kind="source")
    with device, sender:
        assert device.wait_connected(10) and sender.wait_connected(10)
        first = device.bdseq
        assert sender.publish(topics.frames("cam"), b"before", qos=1)
        assert frames.wait(lambda: len(frames.messages) == 2)  # two handlers on one filter

        fresh_broker.kill()
        assert statuses.wait(lambda: not device.connected, 10)
        assert not device.publish(topics.frames("cam"), b"while down")
        assert device.counters["dropped_not_connected"] >= 1
        fresh_broker.start()

        assert device.wait_connected(20) and sender.wait_connected(20)
        assert device.bdseq > first
        assert device.counters["reconnects"] >= 1
        assert statuses.wait(
            lambda: any(s.bdseq == device.bdseq for s in statuses.statuses("dev1")), 10
        )
        # The resubscription happens on the network thread; retry until it took effect.
        assert frames.wait(
            lambda: (
                sender.publish(topics.frames("cam"), b"after", qos=1)
                and time.sleep(0.1) is None
                and any(m.payload == b"after" for m in frames.messages)
            ),
            timeout_s=10,
        )
    births = [s.bdseq for s in statuses.statuses("dev1") if s.state == "online"]
    assert births == sorted(births) and len(set(births)) == len(births)


def test_an_unacknowledged_old_birth_is_not_resent_after_the_new_one(
    fresh_broker: LocalBroker, deployment: str
) -> None:
    device = make_bus(fresh_broker.url, deployment, "dev1")
    with device:
        assert device.wait_connected(10)
        broker_pid = fresh_broker._proc.pid  # type: ignore[union-attr]
        os.kill(broker_pid, signal.SIGSTOP)  # the broker hangs: the next birth is never acked
        device.update_status(serving="loading")
        device.publish(Topics(deployment).result("cam"), b"unacked result", qos=1, retain=True)
        time.sleep(0.2)
        fresh_broker.kill()
        fresh_broker.start()
        watcher = make_bus(fresh_broker.url, deployment, "w", kind="monitor")
        results = Inbox()
        watcher.subscribe(Topics(deployment).all_results, results, qos=1)
        with watcher:
            assert device.wait_connected(20) and watcher.wait_connected(10)
            time.sleep(0.5)  # any re-sent message has arrived by now
            retained = retained_status(fresh_broker.url, deployment, "dev1")
            assert retained.bdseq == device.bdseq  # not the birth of the crashed connection
            assert retained.serving == "loading"
            # Other unacknowledged messages are still delivered once the broker is back.
            assert results.wait(
                lambda: [m.payload for m in results.messages] == [b"unacked result"]
            )


def test_oversized_publish_is_refused_and_counted(deployment: str) -> None:
    with LocalBroker(max_packet_size=2048) as small:
        topics = Topics(deployment)
        bus = make_bus(small.url, deployment, "dev1")  # configured limit: 16 MiB default
        inbox = Inbox()
        bus.subscribe(topics.all_results, inbox, qos=1)
        with bus:
            assert bus.wait_connected(10)
            assert bus.max_packet_size == 2048  # taken from the CONNACK, not the config
            topic = topics.result("cam")
            fits = bus.max_payload(topic, qos=1)
            assert packet_size(topic, fits, 1, mqtt5=True) <= 2048
            assert bus.publish(topic, b"x" * fits, qos=1)
            assert not bus.publish(topic, b"x" * 2048, qos=1)
            assert bus.counters["dropped_too_large"] == 1
            with pytest.raises(BrokerError, match="maximum packet size"):
                bus.check_size(topic, 4096)
            assert inbox.wait(lambda: len(inbox.messages) == 1)
            time.sleep(0.3)
            assert len(inbox.messages) == 1
            assert bus.connected  # the broker never saw the oversized packet


def test_a_raising_handler_is_counted_and_the_bus_goes_on(
    broker: LocalBroker, deployment: str
) -> None:
    topics = Topics(deployment)
    bus = make_bus(broker.url, deployment, "dev1")
    good = Inbox()

    def bad(message: Message) -> None:
        raise RuntimeError("handler bug")

    bus.subscribe(topics.all_frames, bad)
    bus.subscribe(topics.all_results, good)
    with bus:
        assert bus.wait_connected(10)
        bus.publish(topics.frames("a"), b"1")
        bus.publish(topics.result("a"), b"2")
        assert good.wait(lambda: len(good.messages) == 1)
        assert bus.counters["handler_errors"] == 1
        assert bus.connected


def test_routing_follows_subscription_changes(broker: LocalBroker, deployment: str) -> None:
    topics = Topics(deployment)
    bus = make_bus(broker.url, deployment, "router")
    frames, results, exact = Inbox(), Inbox(), Inbox()
    bus.subscribe(topics.all_frames, frames)
    bus.subscribe(topics.all_results, results)
    with bus:
        assert bus.wait_connected(10)
        bus.publish(topics.frames("a"), b"1")
        bus.publish(topics.result("a"), b"2")
        assert results.wait(lambda: len(results.messages) == 1)
        assert frames.wait(lambda: len(frames.messages) == 1)
        assert [m.payload for m in frames.messages] == [b"1"]
        assert bus.counters["received"] == 2
        # frames/a is routed to frames/+ by now: after swapping that filter for frames/a, the
        # next frame must reach the new handler only.
        bus.unsubscribe(topics.all_frames)
        bus.subscribe(topics.frames("a"), exact)
        time.sleep(0.3)  # the UNSUBACK and SUBACK
        bus.publish(topics.frames("a"), b"3")
        assert exact.wait(lambda: len(exact.messages) == 1)
        time.sleep(0.1)
        assert [m.payload for m in frames.messages] == [b"1"]
        assert [m.payload for m in exact.messages] == [b"3"]


def test_a_topic_that_is_not_utf8_is_dropped_and_counted(deployment: str) -> None:
    bus = make_bus("mqtt://127.0.0.1:1", deployment, "strict")
    inbox = Inbox()
    bus.subscribe("#", inbox)
    message = mqtt.MQTTMessage(topic=b"mqttinfer/\xff")
    bus._dispatch(bus._client, None, message)  # what paho's network thread would call
    assert inbox.messages == [] and bus.counters["handler_errors"] == 1


class OldBrokerProxy:
    """Stands in for an MQTT 3.1.1-only broker in front of the real Mosquitto.

    A v5 CONNECT is answered with the 3.1.1 CONNACK "unacceptable protocol version"; any
    other connection is piped through unchanged.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.refused_v5 = 0
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        head = _read_connect_head(conn)
        if head[-1] == 5:
            self.refused_v5 += 1
            conn.sendall(b"\x20\x02\x00\x01")
            conn.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        upstream.sendall(head)
        conn.settimeout(None)
        for a, b in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self._server.close()


def _read_exactly(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise ConnectionError("client closed early")
        data += chunk
    return data


def _read_connect_head(conn: socket.socket) -> bytes:
    """The CONNECT's fixed header, protocol name and protocol level (the last byte)."""
    head = _read_exactly(conn, 2)
    while head[-1] & 0x80:  # remaining length is a varint
        head += _read_exactly(conn, 1)
    return head + _read_exactly(conn, 7)  # \0\4 M Q T T, then the level


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def test_falls_back_to_mqtt_311_when_the_broker_refuses_v5(
    broker: LocalBroker, deployment: str, monitor: tuple[Bus, Inbox]
) -> None:
    _, inbox = monitor
    proxy = OldBrokerProxy(broker.port)
    try:
        bus = make_bus(f"mqtt://127.0.0.1:{proxy.port}", deployment, "old")
        with bus:
            assert bus.wait_connected(15)
            assert not bus.mqtt5
            assert proxy.refused_v5 == 1
            assert bus.counters["protocol_fallbacks"] == 1
            assert inbox.wait(lambda: any(s.state == "online" for s in inbox.statuses("old")))
            # The 3.1.1 size check has no properties byte.
            assert bus.max_payload("t", qos=0) == bus.max_packet_size - 5 - 3
    finally:
        proxy.close()


def test_mqtt_311_can_be_forced(broker: LocalBroker, deployment: str) -> None:
    bus = make_bus(broker.url, deployment, "v3", mqtt_version="3.1.1")
    with bus:
        assert bus.wait_connected(10)
        assert not bus.mqtt5
        assert bus.max_packet_size == bus.config.max_packet_size  # no CONNACK property in 3.1.1


# -- configuration ------------------------------------------------------------------------


def test_broker_url_parsing() -> None:
    plain = BrokerConfig.from_url("mqtt://127.0.0.1:1884")
    assert (plain.host, plain.port, plain.tls, plain.username) == ("127.0.0.1", 1884, False, None)
    assert BrokerConfig.from_url("broker.local").port == 1883

    tls = BrokerConfig.from_url(
        "mqtts://dev%40site:p%3Ass@broker.example:8884?ca=/etc/ca.pem&cert=/c.pem&key=/k.pem"
        "&keepalive=20&version=3.1.1"
    )
    assert (tls.tls, tls.port, tls.username, tls.password) == (True, 8884, "dev@site", "p:ss")
    assert (tls.ca_file, tls.certfile, tls.keyfile) == ("/etc/ca.pem", "/c.pem", "/k.pem")
    assert (tls.keepalive_s, tls.mqtt_version) == (20, "3.1.1")
    assert "p:ss" not in tls.url and "p%3Ass" not in tls.url
    assert BrokerConfig.from_url("mqtts://h").port == 8883
    assert BrokerConfig.from_url("mqtt://h", keepalive_s=9, ca_file=None).keepalive_s == 9


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("http://h:1883", "broker"),
        ("mqtt://h:99999", "broker"),
        ("mqtt://:1883", "broker"),
        ("mqtt://h?version=4", "mqtt_version"),
        ("mqtt://h?keepalive=soon", "keepalive"),
        ("mqtts://h?key=/k.pem", "certfile"),
    ],
)
def test_bad_broker_urls_name_the_field(url: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        BrokerConfig.from_url(url)
    assert err.value.field == field


def test_missing_tls_files_are_a_config_error(deployment: str) -> None:
    with pytest.raises(ConfigError, match="TLS"):
        make_bus("mqtts://127.0.0.1:8883?ca=/nonexistent/ca.pem", deployment, "dev1")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_files() -> Iterator[Path]:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate.

    Mosquitto started as root drops to the 'mosquitto' user, so the files must be readable
    by everyone (pytest's tmp_path is private to its user).
    """
    d = Path(tempfile.mkdtemp(prefix="mqttinfer-tls-"))
    d.chmod(0o755)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
                 "-out", f"{name}.pem", cwd=d)  # fmt: skip
    for file in d.iterdir():
        file.chmod(0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_tls_with_client_certificate_against_mosquitto(tls_files: Path, deployment: str) -> None:
    port = free_port()
    extra = (
        f"listener {port} 127.0.0.1\n"
        f"cafile {tls_files / 'ca.pem'}\n"
        f"certfile {tls_files / 'server.pem'}\n"
        f"keyfile {tls_files / 'server.key'}\n"
        "require_certificate true\n"
    )
    with LocalBroker(extra_config=extra) as tls_broker:
        url = (
            f"mqtts://127.0.0.1:{port}?ca={tls_files / 'ca.pem'}"
            f"&cert={tls_files / 'client.pem'}&key={tls_files / 'client.key'}"
        )
        bus = make_bus(url, deployment, "secure")
        with bus:
            assert bus.wait_connected(10)
        # Without the client certificate the broker refuses the handshake.
        anonymous = make_bus(
            f"mqtts://127.0.0.1:{port}?ca={tls_files / 'ca.pem'}", deployment, "anon"
        )
        with anonymous:
            assert not anonymous.wait_connected(2)
        assert anonymous.counters["connect_failures"] >= 1
        assert tls_broker.running


def test_username_and_password_from_the_url(deployment: str) -> None:
    folder = Path(tempfile.mkdtemp(prefix="mqttinfer-pw-"))
    try:
        folder.chmod(0o755)  # mosquitto started as root reads it as user 'mosquitto'
        passwords = folder / "passwords"
        subprocess.run(
            ["mosquitto_passwd", "-c", "-b", str(passwords), "dev1", "s3cret:/@"],
            check=True,
            capture_output=True,
        )
        passwords.chmod(0o644)
        extra = f"allow_anonymous false\npassword_file {passwords}\n"
        with LocalBroker(extra_config=extra) as secured:
            good = make_bus(
                f"mqtt://dev1:s3cret%3A%2F%40@127.0.0.1:{secured.port}", deployment, "a"
            )
            with good:
                assert good.wait_connected(10)
            for url in (
                f"mqtt://dev1:wrong@127.0.0.1:{secured.port}",
                f"mqtt://127.0.0.1:{secured.port}",
            ):
                refused = make_bus(url, deployment, "b")
                with refused:
                    assert not refused.wait_connected(1.5)
                assert refused.counters["connect_failures"] >= 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)
