"""Credentials from broker init's env files, and why a node cannot connect, on a real broker.

The broker is the production one: ``mosquitto -c`` on what ``mqttinfer broker init --tls``
writes (passwords, ACL, a CA and a server certificate for ``localhost`` and ``127.0.0.1``),
started by tests/test_security.py's helper.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqttinfer.broker_files import parse_env
from mqttinfer.broker_tools import Pki
from mqttinfer.runtime.bus import BrokerConfig, Bus
from mqttinfer.runtime.deploy_cli import tool_node_id
from mqttinfer.topics import Topics
from tests.busutil import Inbox, subprocess_env, wait_until
from tests.test_security import DEPLOYMENT, SecuredBroker, secured_broker

BUS_LOGGER = "mqttinfer.runtime.bus"
FULL_ENV = {
    "MQTTINFER_USERNAME": "pi4-a",
    "MQTTINFER_PASSWORD": "s3cret",
    "MQTTINFER_CA_FILE": "/etc/mqttinfer/ca.crt",
    "MQTTINFER_CERT_FILE": "/run/credentials/u/client.crt",
    "MQTTINFER_KEY_FILE": "/run/credentials/u/client.key",
}


# ------------------------------------------------------------------------------ pure
def test_the_env_fills_what_the_url_leaves_out() -> None:
    config = BrokerConfig.from_env_and_url("mqtts://broker.lan:8883", env=FULL_ENV)
    assert (config.host, config.port, config.tls) == ("broker.lan", 8883, True)
    assert (config.username, config.password) == ("pi4-a", "s3cret")
    assert config.ca_file == "/etc/mqttinfer/ca.crt"
    assert (config.certfile, config.keyfile) == (
        "/run/credentials/u/client.crt",
        "/run/credentials/u/client.key",
    )


def test_what_the_url_carries_wins() -> None:
    url = "mqtts://apply:pw@h?ca=/ca.pem&cert=/c.pem&key=/k.pem"
    config = BrokerConfig.from_env_and_url(url, env=FULL_ENV)
    assert (config.username, config.password, config.ca_file) == ("apply", "pw", "/ca.pem")
    assert (config.certfile, config.keyfile) == ("/c.pem", "/k.pem")


def test_the_env_password_goes_only_with_its_own_username() -> None:
    same = BrokerConfig.from_env_and_url("mqtt://pi4-a@h", env=FULL_ENV)
    assert same.password == "s3cret"
    other = BrokerConfig.from_env_and_url("mqtt://monitor@h", env=FULL_ENV)
    assert (other.username, other.password) == ("monitor", None)


def test_without_the_variables_nothing_changes() -> None:
    bare = BrokerConfig.from_url("mqtt://h:1884")
    assert bare.with_env({}) is bare
    empty = dict.fromkeys(FULL_ENV, "")  # an EnvironmentFile line like MQTTINFER_CA_FILE=
    assert bare.with_env(empty) is bare


def test_the_password_is_in_no_repr_or_url() -> None:
    config = BrokerConfig.from_env_and_url("mqtts://h", env=FULL_ENV)
    assert "s3cret" not in repr(config)
    assert "s3cret" not in config.url
    assert config.url == "mqtts://pi4-a@h:8883"


# ------------------------------------------------------------------------------ real broker
@pytest.fixture(scope="module")
def secured() -> Iterator[SecuredBroker]:
    with secured_broker() as running:
        yield running


def node_env(secured: SecuredBroker, identity: str) -> dict[str, str]:
    """The identity's env file as broker init wrote it, with the CA where this test has it."""
    env = parse_env(secured.report.env_file(identity).read_text())
    env["MQTTINFER_CA_FILE"] = str(secured.ca)
    return env


def make_bus(url: str, env: dict[str, str], node: str, kind: str = "device") -> Bus:
    # reconnect_max_s=1: a retry every second, so a test sees several in little time.
    config = BrokerConfig.from_env_and_url(url, env=env, reconnect_max_s=1)
    return Bus(config, node=node, kind=kind, topics=Topics(DEPLOYMENT))


def connect_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == BUS_LOGGER
        and r.levelno == logging.WARNING
        and "cannot connect" in r.getMessage()
    ]


def fail_a_few_times(bus: Bus, attempts: int = 3) -> None:
    with bus:
        assert wait_until(lambda: bus.counters["connect_failures"] >= attempts, 20)
        assert not bus.connected


@pytest.mark.broker
def test_a_node_logs_in_with_its_env_file_alone(secured: SecuredBroker) -> None:
    env = node_env(secured, "dev-a")
    bus = make_bus(env["MQTTINFER_BROKER"], env, "dev-a")  # mqtts://localhost:PORT, no userinfo
    assert bus.config.username == "dev-a" and bus.config.tls
    with bus:
        assert bus.wait_connected(10)


@pytest.mark.broker
@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("localhost", "self-signed certificate in certificate chain"),  # another CA
        ("127.0.0.2", "IP address mismatch"),  # loopback, but not a name in the certificate
    ],
)
def test_a_failed_tls_handshake_is_a_warning_with_its_reason_once(
    secured: SecuredBroker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    host: str,
    expected: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger=BUS_LOGGER)
    env = node_env(secured, "dev-a")
    if host == "localhost":
        pki = Pki(work=tmp_path, hostname="localhost")
        pki.new_ca(tmp_path / "other-ca.crt", tmp_path / "other-ca.key", "someone else")
        env["MQTTINFER_CA_FILE"] = str(tmp_path / "other-ca.crt")
    fail_a_few_times(make_bus(f"mqtts://{host}:{secured.port}", env, "dev-a"))
    warnings = connect_warnings(caplog)
    assert len(warnings) == 1, warnings  # one warning, however many retries
    assert "TLS handshake failed" in warnings[0] and expected in warnings[0], warnings[0]


@pytest.mark.broker
def test_a_refused_login_is_a_warning_naming_the_reason_once(
    secured: SecuredBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=BUS_LOGGER)
    env = node_env(secured, "dev-a")
    env["MQTTINFER_PASSWORD"] = "wrong-Pa55word"
    fail_a_few_times(make_bus(env["MQTTINFER_BROKER"], env, "dev-a"))
    warnings = connect_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "refused" in warnings[0], warnings[0]
    # Mosquitto answers MQTT 5 logins with 0x86 or 0x87 depending on why it refused.
    assert any(
        f"{name} (reason code {code})" in warnings[0]
        for name, code in (("Bad user name or password", 134), ("Not authorized", 135))
    ), warnings[0]
    assert "wrong-Pa55word" not in caplog.text  # not even paho's DEBUG lines


@pytest.mark.broker
def test_devices_list_runs_as_its_login_from_the_env_file_alone(secured: SecuredBroker) -> None:
    """No --broker, --deployment, --id nor credentials: apply.env gives them all, and the node
    id is the username, so the broker lets its status through (the ACL drops any other)."""
    watcher_env = node_env(secured, "monitor")
    watcher = make_bus(watcher_env["MQTTINFER_BROKER"], watcher_env, "monitor", "monitor")
    inbox = Inbox()
    watcher.subscribe(Topics(DEPLOYMENT).all_status, inbox, qos=1)
    env = {**subprocess_env(), **node_env(secured, "apply")}
    with watcher:
        assert watcher.wait_connected(10)
        listed = subprocess.run(
            [sys.executable, "-m", "mqttinfer", "devices", "list", "--timeout", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert listed.returncode == 1, listed.stderr  # connected, found no profile
        assert f"no device profile is retained under mqttinfer/{DEPLOYMENT}" in listed.stderr
        assert inbox.wait(lambda: inbox.statuses("apply"), 10), "no status from node 'apply'"
    assert env["MQTTINFER_PASSWORD"] not in listed.stdout + listed.stderr


def test_operator_tools_take_the_username_as_node_id() -> None:
    login = BrokerConfig.from_env_and_url("mqtt://h", env={"MQTTINFER_USERNAME": "apply"})
    assert tool_node_id(None, login, "plan-apply") == "apply"
    assert tool_node_id("ops-1", login, "plan-apply") == "ops-1"
    assert tool_node_id(None, BrokerConfig.from_url("mqtt://h"), "plan-apply") == "plan-apply"
