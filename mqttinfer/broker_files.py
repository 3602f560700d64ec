"""The text of every file ``mqttinfer broker init`` writes: ACL, Mosquitto config, env files.

Pure functions of the fleet's identities and options (no I/O), so they are tested without a
broker; tests/test_security.py then proves against a real Mosquitto that the ACL means what
these comments say.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mqttinfer.topics import Topics

Role = Literal["device", "aggregator", "source", "apply", "monitor"]

APPLY_USER = "apply"
MONITOR_USER = "monitor"
MAX_PACKET_BYTES = 16 * 1024 * 1024
MAX_QUEUED_BYTES = 128 * 1024 * 1024
# Where nodes keep their env file, CA and client certificate (the systemd units read them there).
NODE_ETC = "/etc/mqttinfer"
_ENV_LINE = re.compile(r"^([A-Z_][A-Z0-9_]*)=(.*)$")


@dataclass(frozen=True, slots=True)
class Identity:
    """One MQTT username and what it is for."""

    name: str
    role: Role

    @property
    def stem(self) -> str:
        """File name stem of its env file and client certificate (matches the systemd units)."""
        return f"{self.role}-{self.name}" if self.role in ("device", "source") else self.role

    @property
    def unit(self) -> str | None:
        """The systemd unit that runs it, when one is shipped in systemd/."""
        if self.role in ("device", "source"):
            return f"mqttinfer-{self.role}@{self.name}.service"
        return "mqttinfer-aggregator.service" if self.role == "aggregator" else None


def render_acl(deployment: str, identities: Iterable[Identity]) -> str:
    """The Mosquitto acl_file for ``identities`` (broker/README.md has the access matrix).

    The %u patterns give every device its own topics without one line per device; Mosquitto
    applies patterns to EVERY user, so the sections of the other identities start with
    ``deny`` lines (checked before anything else) that take those grants back.
    """
    prefix = Topics(deployment).prefix
    lines = [
        f"# mqttinfer ACL for deployment '{deployment}' (written by `mqttinfer broker init`).",
        "# Mosquitto checks a user's 'deny' lines first, then its 'topic' lines, then the",
        "# 'pattern' lines, which apply to EVERY user with %u replaced by the username.",
        "# Anything not granted is refused: a refused publish is dropped, and a message a",
        "# client may not read is never delivered to it, whatever it subscribed to.",
        "",
        "# Each node writes only its own partials, status, stats and profile, reads its own",
        "# plan, and echoes to itself on its private probe topics (username = node id).",
        f"pattern write {prefix}/partials/+/%u",
        f"pattern readwrite {prefix}/status/%u",
        f"pattern write {prefix}/stats/%u",
        f"pattern readwrite {prefix}/profile/%u",
        f"pattern read {prefix}/plan/%u",
        f"pattern readwrite {prefix}/probe/%u/#",
    ]
    for identity in identities:
        lines += ["", *_user_section(prefix, identity)]
    return "\n".join(lines) + "\n"


def _user_section(prefix: str, identity: Identity) -> list[str]:
    name = identity.name
    rules: dict[Role, list[str]] = {
        "device": [
            "# device: reads every source's frames and the model store",
            f"topic read {prefix}/frames/+",
            f"topic read {prefix}/models/#",
        ],
        "aggregator": [
            "# aggregator: reads frames, partials and status; writes results (+ own status/stats)",
            f"topic deny {prefix}/partials/+/{name}",
            f"topic deny {prefix}/profile/{name}",
            f"topic deny {prefix}/plan/{name}",
            f"topic read {prefix}/frames/+",
            f"topic read {prefix}/partials/+/+",
            f"topic read {prefix}/status/#",
            f"topic write {prefix}/results/+",
        ],
        "source": [
            f"# source: writes frames/{name}, reads results/{name} (+ own status/stats)",
            f"topic deny {prefix}/partials/#",
            f"topic deny {prefix}/profile/#",
            f"topic deny {prefix}/plan/#",
            f"topic write {prefix}/frames/{name}",
            f"topic read {prefix}/results/{name}",
        ],
        "apply": [
            "# plan apply: writes plans and models, reads them back, reads status and profiles",
            f"topic deny {prefix}/partials/#",
            f"topic deny {prefix}/profile/{name}",
            f"topic readwrite {prefix}/plan/+",
            f"topic readwrite {prefix}/models/#",
            f"topic read {prefix}/status/#",
            f"topic read {prefix}/profile/+",
        ],
        "monitor": [
            "# monitor: reads status, stats and the broker's $SYS counters; publishes nothing",
            "# (but its private probe echo)",
            f"topic deny {prefix}/partials/#",
            f"topic deny {prefix}/profile/#",
            f"topic deny {prefix}/plan/#",
            f"topic deny {prefix}/status/{name}",
            f"topic deny {prefix}/stats/{name}",
            f"topic read {prefix}/status/#",
            f"topic read {prefix}/stats/#",
            "topic read $SYS/#",
        ],
    }
    return [f"user {name}", *rules[identity.role]]


@dataclass(frozen=True, slots=True)
class ConfPaths:
    """Absolute paths the broker reads (they appear verbatim in mosquitto.conf)."""

    root: Path

    @property
    def passwd(self) -> Path:
        return self.root / "passwd"

    @property
    def acl(self) -> Path:
        return self.root / "acl"

    @property
    def ca_cert(self) -> Path:
        return self.root / "tls" / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.root / "tls" / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "tls" / "server.key"


def render_mosquitto_conf(
    paths: ConfPaths,
    *,
    deployment: str,
    tls: bool,
    port: int,
    local_port: int = 0,
    client_certs: bool = False,
) -> str:
    """A Mosquitto 2.x config (a conf.d drop-in; also runs alone with ``mosquitto -c``)."""
    header = [
        f"# Mosquitto configuration for mqttinfer deployment '{deployment}'",
        "# (written by `mqttinfer broker init`; broker/README.md explains every choice).",
        "#",
        "# Debian: copy to /etc/mosquitto/conf.d/mqttinfer.conf. The package's main file",
        "# already sets pid_file, persistence_location and log_dest, which may appear only once.",
        "",
        "# Authentication and ACL are set per listener below, so no listener can inherit an",
        "# open default. Must come before any listener.",
        "per_listener_settings true",
        "",
        "# Retained plans, models and statuses must survive a broker restart. Saved every",
        "# 5 minutes and on a clean stop (more often would wear SD cards with big models).",
        "persistence true",
        "autosave_interval 300",
        "",
        "# One message may be up to 16 MiB: a student model or a frame; plan apply cuts",
        "# bigger models into chunks (models/<sha256>/<n>). Bigger packets are refused.",
        f"max_packet_size {MAX_PACKET_BYTES}",
        "",
        "# QoS 1 messages in flight per client (the default); beyond that they are queued.",
        "max_inflight_messages 20",
        "# A slow client gets at most 1000 queued messages / 128 MiB: stale frames are worthless",
        "# for real-time inference, and the bound keeps one stuck client from eating the",
        "# broker's memory. Model chunks fit: a device subscribes only to its own model.",
        "max_queued_messages 1000",
        f"max_queued_bytes {MAX_QUEUED_BYTES}",
        "# Forget the session of a client that has been gone for a day.",
        "persistent_client_expiration 1d",
        "# Partials are a few hundred bytes: send them at once instead of batching (Nagle).",
        "set_tcp_nodelay true",
        "",
    ]
    auth = [
        "allow_anonymous false",
        f"password_file {paths.passwd}",
        f"acl_file {paths.acl}",
    ]
    if not tls:
        listeners = [
            "# Plain MQTT on every interface: passwords travel in clear text. Use only on a",
            "# trusted network; `mqttinfer broker init --tls` adds TLS.",
            f"listener {port}",
            *auth,
        ]
        return "\n".join(header + listeners) + "\n"
    listeners = [
        "# TLS on every interface: devices, aggregator, sources and operators connect here.",
        f"listener {port}",
        f"cafile {paths.ca_cert}",
        f"certfile {paths.server_cert}",
        f"keyfile {paths.server_key}",
        "# TLS 1.2 is the oldest version accepted.",
        "tls_version tlsv1.2",
    ]
    if client_certs:
        listeners += [
            "# A client must also show a certificate signed by the CA above (and a password).",
            "require_certificate true",
        ]
    listeners += auth
    if local_port:
        listeners += [
            "",
            "# Plain MQTT on loopback only, for tools on the broker host (mosquitto_sub, the",
            "# monitor). Same passwords and ACL: a local user still has to log in.",
            f"listener {local_port} 127.0.0.1",
            *auth,
        ]
    return "\n".join(header + listeners) + "\n"


def broker_url(hostname: str, port: int, tls: bool) -> str:
    host = f"[{hostname}]" if ":" in hostname else hostname
    return f"{'mqtts' if tls else 'mqtt'}://{host}:{port}"


def render_env(
    identity: Identity,
    *,
    url: str,
    deployment: str,
    password: str,
    tls: bool,
    client_cert: tuple[str, str] | None = None,
) -> str:
    """The identity's env file (systemd EnvironmentFile= syntax; also `set -a; . FILE`)."""
    where = f"{NODE_ETC}/{identity.stem}.env"
    lines = [
        f"# mqttinfer credentials of {identity.role} '{identity.name}' (deployment "
        f"'{deployment}').",
        f"# Secret: install as {where}, owned by root, mode 0600.",
        f"MQTTINFER_BROKER={url}",
        f"MQTTINFER_DEPLOYMENT={deployment}",
        f"MQTTINFER_USERNAME={identity.name}",
        f"MQTTINFER_PASSWORD={password}",
    ]
    if tls:
        lines.append(f"MQTTINFER_CA_FILE={NODE_ETC}/ca.crt")
    if client_cert is not None:
        lines += [f"MQTTINFER_CERT_FILE={client_cert[0]}", f"MQTTINFER_KEY_FILE={client_cert[1]}"]
    return "\n".join(lines) + "\n"


def client_cert_paths(identity: Identity, out: Path) -> tuple[str, str]:
    """Where the node process finds its client certificate and key.

    A systemd unit gets them through ``LoadCredential=`` (its DynamicUser cannot read
    /etc/mqttinfer), which exposes them under /run/credentials/<unit>/. Operator tools (apply,
    monitor) read them straight from the broker init directory.
    """
    if identity.unit is not None:
        base = f"/run/credentials/{identity.unit}"
        return f"{base}/client.crt", f"{base}/client.key"
    return str(out / "tls" / "clients" / f"{identity.stem}.crt"), str(
        out / "tls" / "clients" / f"{identity.stem}.key"
    )


def parse_env(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines of an env file (comments and blank lines skipped)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        match = _ENV_LINE.match(line.strip())
        if match:
            values[match.group(1)] = match.group(2)
    return values


def subject_alt_names(hostname: str) -> str:
    """``DNS:``/``IP:`` entries for the server certificate: hostname, localhost, 127.0.0.1."""
    names: list[str] = []
    for name in (hostname, "localhost", "127.0.0.1"):
        try:
            entry = f"IP:{ipaddress.ip_address(name)}"
        except ValueError:
            entry = f"DNS:{name}"
        if entry not in names:
            names.append(entry)
    return ", ".join(names)
