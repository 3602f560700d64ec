"""``mqttinfer broker init``: inventory errors, generated files, --force, TLS material, CLI.

Runs the real ``mosquitto_passwd`` and ``openssl`` tools; tests/test_security.py starts a
broker on the output and checks what the ACL actually lets each identity do.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mqttinfer import broker_tools
from mqttinfer.broker_cli import broker_app
from mqttinfer.broker_files import (
    ConfPaths,
    Identity,
    parse_env,
    render_acl,
    render_mosquitto_conf,
    subject_alt_names,
)
from mqttinfer.broker_init import (
    InitOptions,
    build_identities,
    init_broker,
    read_device_ids,
)
from mqttinfer.errors import ConfigError, DependencyError, InventoryError

REPO = Path(__file__).resolve().parents[1]
SPEC = "flops: 1G, memory: 64MiB, rate: 10Mbit/s, outage: 0.1"
FLEET = f"devices:\n  - {{id: cam-node-1, {SPEC}}}\n  - {{id: cam-node-2, {SPEC}}}\n"


def fleet_text(*ids: str) -> str:
    return "devices:\n" + "".join(f"  - {{id: {i}, {SPEC}}}\n" for i in ids)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    return write(tmp_path / "fleet.yaml", FLEET)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------ inventory
def test_device_ids_are_read_in_order(fleet: Path) -> None:
    assert read_device_ids(fleet) == ["cam-node-1", "cam-node-2"]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("devices: [\n", None),
        ("nodes:\n  - id: a\n", None),
        ("devices: []\n", "devices"),
        (fleet_text("a", "b/c"), "devices[1] (id 'b/c').id"),
        (fleet_text("a") + "  - {id: c}\n", "devices[1] (id 'c').flops"),
    ],
)
def test_inventory_errors_name_file_field_and_fix(
    tmp_path: Path, text: str, field: str | None
) -> None:
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(InventoryError) as err:
        read_device_ids(path)
    message = str(err.value)
    assert message.startswith(str(path))
    assert "(fix: " in message
    if field:
        assert f"field '{field}'" in message


def test_missing_inventory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match=r"nope\.yaml: file not found \(fix: "):
        read_device_ids(tmp_path / "nope.yaml")


def test_identities_cover_devices_and_every_role() -> None:
    identities = build_identities(["d1", "d2"], aggregator_id="agg", sources=("cam1", "cam2"))
    assert [(i.name, i.role) for i in identities] == [
        ("d1", "device"),
        ("d2", "device"),
        ("agg", "aggregator"),
        ("cam1", "source"),
        ("cam2", "source"),
        ("apply", "apply"),
        ("monitor", "monitor"),
    ]
    assert [i.stem for i in identities[:4]] == [
        "device-d1",
        "device-d2",
        "aggregator",
        "source-cam1",
    ]


@pytest.mark.parametrize(
    ("devices", "kwargs", "field"),
    [
        (["monitor"], {}, "devices[0].id"),
        (["a", "aggregator"], {}, "devices[1].id"),
        (["cam"], {"sources": ("cam",)}, "devices[0].id"),
        (["a"], {"sources": ("apply",)}, "--source"),
        (["a"], {"aggregator_id": "x", "sources": ("x",)}, "--source"),
        (["a"], {"aggregator_id": "monitor"}, "--aggregator-id"),
        (["a"], {"aggregator_id": "has space"}, "--aggregator-id"),
        (["a"], {"sources": ()}, "--source"),
    ],
)
def test_identity_names_must_be_valid_and_unique(
    devices: list[str], kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"field '{field}'")):
        build_identities(devices, **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ file texts
def test_acl_patterns_all_use_the_username() -> None:
    # A pattern without %u applies verbatim to every user (and Mosquitto warns about it).
    acl = render_acl("site", build_identities(["d1"]))
    patterns = [line for line in acl.splitlines() if line.startswith("pattern ")]
    assert patterns
    assert all("%u" in line for line in patterns)
    assert all(line.split()[2].startswith("mqttinfer/site/") for line in patterns)


def test_acl_has_one_section_per_identity_with_denies_for_non_devices() -> None:
    identities = build_identities(["d1", "d2"], sources=("cam1",))
    sections = re.split(r"\n(?=user )", render_acl("site", identities))[1:]
    assert [s.splitlines()[0] for s in sections] == [f"user {i.name}" for i in identities]
    for identity, section in zip(identities, sections, strict=True):
        denies = [line for line in section.splitlines() if line.startswith("topic deny")]
        # Devices need no deny; every other identity takes back what the patterns grant.
        assert bool(denies) == (identity.role != "device")
        assert "partials" in "".join(denies) or identity.role == "device"


def test_conf_without_tls_has_one_authenticated_listener() -> None:
    conf = render_mosquitto_conf(ConfPaths(Path("/x")), deployment="d", tls=False, port=1883)
    settings = [line for line in conf.splitlines() if line and not line.startswith("#")]
    assert settings.count("listener 1883") == 1
    assert "allow_anonymous false" in settings
    assert "password_file /x/passwd" in settings
    assert "acl_file /x/acl" in settings
    assert not any(line.startswith(("certfile", "cafile", "keyfile")) for line in settings)


def test_conf_with_tls_repeats_auth_on_every_listener() -> None:
    conf = render_mosquitto_conf(
        ConfPaths(Path("/x")),
        deployment="d",
        tls=True,
        port=8883,
        local_port=1883,
        client_certs=True,
    )
    settings = [line for line in conf.splitlines() if line and not line.startswith("#")]
    assert settings[0] == "per_listener_settings true"
    assert "listener 8883" in settings
    assert "listener 1883 127.0.0.1" in settings
    # per_listener_settings: each listener needs its own auth lines, or it would be open.
    assert settings.count("allow_anonymous false") == 2
    assert settings.count("acl_file /x/acl") == 2
    assert "require_certificate true" in settings
    assert "keyfile /x/tls/server.key" in settings


def test_checked_in_broker_conf_is_what_broker_init_writes() -> None:
    """broker/mosquitto.conf stays the --tls output for /etc/mosquitto/mqttinfer."""
    expected = render_mosquitto_conf(
        ConfPaths(Path("/etc/mosquitto/mqttinfer")),
        deployment="default",
        tls=True,
        port=8883,
        local_port=1883,
    )
    assert (REPO / "broker" / "mosquitto.conf").read_text() == expected


def test_subject_alt_names() -> None:
    assert subject_alt_names("broker.lan") == "DNS:broker.lan, DNS:localhost, IP:127.0.0.1"
    assert subject_alt_names("10.0.0.5") == "IP:10.0.0.5, DNS:localhost, IP:127.0.0.1"
    assert subject_alt_names("localhost") == "DNS:localhost, IP:127.0.0.1"


def test_env_files_parse_and_skip_comments() -> None:
    assert parse_env("# c\nA=1\n\n B_2=x=y \nlower=no\n") == {"A": "1", "B_2": "x=y"}


# ------------------------------------------------------------------------------ init_broker
@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"hostname": "bad host;rm"}, "--hostname"),
        ({"deployment": "a/b"}, "--deployment"),
        ({"port": 0}, "--port"),
        ({"tls": True, "local_port": 70000}, "--local-port"),
        ({"client_certs": True}, "--client-certs"),
        ({"local_port": 1884}, "--local-port"),
        ({"tls": True, "port": 1883}, "--local-port"),
    ],
)
def test_bad_options_name_their_flag(
    fleet: Path, tmp_path: Path, changes: dict[str, object], field: str
) -> None:
    options = InitOptions(fleet=fleet, out=tmp_path / "out", **changes)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=re.escape(f"field '{field}'")):
        init_broker(options)
    assert not (tmp_path / "out").exists()


def test_plain_init_writes_hashed_passwords_and_private_credentials(
    fleet: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    report = init_broker(InitOptions(fleet=fleet, out=out, hostname="broker.lan", port=1884))
    names = ["cam-node-1", "cam-node-2", "aggregator", "source", "apply", "monitor"]
    assert [i.name for i in report.identities] == names
    assert report.url == "mqtt://broker.lan:1884"
    passwd = (out / "passwd").read_text()
    assert [line.split(":")[0] for line in passwd.splitlines()] == names
    envs = {name: parse_env(report.env_file(name).read_text()) for name in names}
    for name, env in envs.items():
        assert env["MQTTINFER_USERNAME"] == name
        assert env["MQTTINFER_BROKER"] == "mqtt://broker.lan:1884"
        assert env["MQTTINFER_DEPLOYMENT"] == "default"
        assert len(env["MQTTINFER_PASSWORD"]) >= 32
        assert env["MQTTINFER_PASSWORD"] not in passwd  # hashed, never stored in clear
        assert "MQTTINFER_CA_FILE" not in env
        assert mode(report.env_file(name)) == 0o600
    assert len({env["MQTTINFER_PASSWORD"] for env in envs.values()}) == len(names)
    assert mode(out / "credentials") == 0o700
    assert not (out / "tls").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".broker-init-")]


def test_a_non_empty_out_needs_force(fleet: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(ConfigError, match=r"field '--out': directory is not empty.*--force"):
        init_broker(InitOptions(fleet=fleet, out=out))
    assert sorted(p.name for p in out.iterdir()) == ["something"]


def test_tls_init_issues_a_ca_and_a_server_certificate(fleet: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = init_broker(InitOptions(fleet=fleet, out=out, tls=True, hostname="broker.lan"))
    tls = out / "tls"
    assert report.url == "mqtts://broker.lan:8883"
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", tls / "ca.crt", tls / "server.crt"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    text = _x509_text(tls / "server.crt")
    assert re.search(r"DNS:broker\.lan, DNS:localhost, IP Address:127\.0\.0\.1", text)
    assert "TLS Web Server Authentication" in text
    assert "CA:TRUE" in _x509_text(tls / "ca.crt")
    assert mode(tls / "ca.key") == 0o600
    env = parse_env(report.env_file("cam-node-1").read_text())
    assert env["MQTTINFER_CA_FILE"] == "/etc/mqttinfer/ca.crt"
    conf = report.conf.read_text()
    assert f"certfile {tls / 'server.crt'}" in conf
    assert "listener 1883 127.0.0.1" in conf


def _x509_text(cert: Path) -> str:
    return subprocess.run(
        ["openssl", "x509", "-in", cert, "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_force_keeps_ca_and_passwords_adds_and_removes_identities(
    fleet: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = init_broker(
        InitOptions(fleet=fleet, out=out, tls=True, client_certs=True, sources=("cam1", "cam2"))
    )
    before = {i.name: parse_env(first.env_file(i.name).read_text()) for i in first.identities}
    ca_before = (out / "tls" / "ca.crt").read_bytes()
    server_before = (out / "tls" / "server.crt").read_bytes()
    client_before = (out / "tls" / "clients" / "device-cam-node-1.crt").read_bytes()
    grown = write(tmp_path / "grown.yaml", fleet_text("cam-node-1", "cam-node-3"))

    second = init_broker(
        InitOptions(
            fleet=grown, out=out, tls=True, client_certs=True, sources=("cam1",), force=True
        )
    )

    assert set(second.created) == {"cam-node-3"}
    assert set(second.removed) == {"device-cam-node-2", "source-cam2"}
    for name in ("cam-node-1", "aggregator", "cam1", "apply", "monitor"):
        after = parse_env(second.env_file(name).read_text())
        assert after["MQTTINFER_PASSWORD"] == before[name]["MQTTINFER_PASSWORD"]
    assert not (out / "credentials" / "device-cam-node-2.env").exists()
    assert not (out / "tls" / "clients" / "device-cam-node-2.key").exists()
    assert (out / "tls" / "clients" / "device-cam-node-3.key").exists()
    assert (out / "tls" / "ca.crt").read_bytes() == ca_before
    assert (out / "tls" / "clients" / "device-cam-node-1.crt").read_bytes() == client_before
    assert (out / "tls" / "server.crt").read_bytes() != server_before  # renewed every run
    users = [line.split(":")[0] for line in (out / "passwd").read_text().splitlines()]
    assert "cam-node-2" not in users
    assert "cam-node-3" in users
    env = parse_env(second.env_file("cam-node-1").read_text())
    assert env["MQTTINFER_KEY_FILE"] == (
        "/run/credentials/mqttinfer-device@cam-node-1.service/client.key"
    )


def test_force_refuses_half_a_ca(fleet: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    init_broker(InitOptions(fleet=fleet, out=out, tls=True))
    (out / "tls" / "ca.key").unlink()
    passwd_before = (out / "passwd").read_text()
    with pytest.raises(ConfigError, match=r"ca\.key: field '--force'"):
        init_broker(InitOptions(fleet=fleet, out=out, tls=True, force=True))
    assert (out / "passwd").read_text() == passwd_before  # nothing was replaced


def test_a_missing_tool_says_which_package_to_install(
    fleet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(broker_tools, "FALLBACK_DIRS", ())
    with pytest.raises(DependencyError, match=r"mosquitto_passwd.*apt-get install mosquitto"):
        init_broker(InitOptions(fleet=fleet, out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="group ownership needs root")
def test_as_root_the_broker_group_may_read_what_mosquitto_reads(
    fleet: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    report = init_broker(InitOptions(fleet=fleet, out=out, tls=True))
    assert report.shared_with_broker_group
    for path in (out / "passwd", out / "acl", out / "tls" / "server.key"):
        assert mode(path) == 0o640
    assert mode(out / "tls" / "ca.key") == 0o600
    assert mode(out / "credentials" / "device-cam-node-1.env") == 0o600


# ------------------------------------------------------------------------------ CLI
def test_cli_prints_url_identities_and_next_steps(fleet: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        broker_app,
        ["init", "--fleet", str(fleet), "--out", str(out), "--tls", "--hostname", "b.lan"],
    )
    assert result.exit_code == 0, result.output
    assert "mqtts://b.lan:8883" in result.output
    assert "cam-node-1, cam-node-2, aggregator, source, apply, monitor (6 new)" in result.output
    assert "/etc/mosquitto/conf.d/mqttinfer.conf" in result.output


def test_cli_errors_exit_2_without_a_traceback(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", fleet_text("ok", "not/ok"))
    result = CliRunner().invoke(
        broker_app, ["init", "--fleet", str(bad), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert f"error: {bad}: field 'devices[1] (id 'not/ok').id'" in result.output
    assert "fix:" in result.output


def test_identity_stems_match_the_systemd_unit_names() -> None:
    device, source = Identity("cam-1", "device"), Identity("cam1", "source")
    assert device.unit == "mqttinfer-device@cam-1.service"
    assert source.unit == "mqttinfer-source@cam1.service"
    assert Identity("agg", "aggregator").unit == "mqttinfer-aggregator.service"
    assert Identity("apply", "apply").unit is None
