"""``mqttinfer broker init``: credentials, ACL, TLS material and a Mosquitto config for one fleet.

Reads a device inventory (``mqttinfer/planner/inventory.py``; only the ids matter here) and
writes into ``--out``::

    mosquitto.conf            Mosquitto drop-in (listeners, auth, ACL, limits), absolute paths
    passwd                    hashed passwords (mosquitto_passwd), one line per identity
    acl                       topic ACL: %u patterns for own topics, a section per identity
    credentials/<name>.env    MQTTINFER_* variables for one identity (systemd EnvironmentFile)
    tls/ca.crt, ca.key        private CA (--tls); ca.key never leaves this directory
    tls/server.crt, .key      broker certificate, SAN = hostname, localhost, 127.0.0.1
    tls/clients/<name>.*      client certificates (--client-certs)

Identities: every device id, the aggregator (``--aggregator-id``), every source
(``--source``), ``apply`` (plan apply) and ``monitor`` (read-only). Re-running with
``--force`` keeps the CA and every existing identity's password, so adding a device changes
nothing on the others; delete a credentials file to rotate that password.

Everything is built in a staging directory inside ``--out`` and moved into place at the end,
so a failure while generating (a tool missing or failing) leaves the previous files untouched.
Only the ``mosquitto_passwd`` and ``openssl`` command-line tools are used (no Python crypto
dependency).
"""

from __future__ import annotations

import grp
import ipaddress
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mqttinfer.broker_files import (
    APPLY_USER,
    MONITOR_USER,
    ConfPaths,
    Identity,
    broker_url,
    client_cert_paths,
    parse_env,
    render_acl,
    render_env,
    render_mosquitto_conf,
)
from mqttinfer.broker_tools import Pki, find_tool, write_passwd, write_private
from mqttinfer.errors import ConfigError, InventoryError
from mqttinfer.planner.inventory import load_inventory
from mqttinfer.topics import DEFAULT_DEPLOYMENT, is_valid_id

log = logging.getLogger(__name__)

DEFAULT_AGGREGATOR = "aggregator"
DEFAULT_SOURCE = "source"
TLS_PORT = 8883
PLAIN_PORT = 1883
BROKER_GROUP = "mosquitto"
_PASSWORD_BYTES = 24  # 32 URL-safe characters: no quoting needed in env files
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
_WORK = ".work"  # scratch files (openssl config, CSRs) inside the staging directory


# --------------------------------------------------------------------------------- identities
def build_identities(
    device_ids: Sequence[str],
    *,
    aggregator_id: str = DEFAULT_AGGREGATOR,
    sources: Sequence[str] = (DEFAULT_SOURCE,),
    fleet: Path | None = None,
) -> list[Identity]:
    """All identities of the fleet; ConfigError when a name is invalid or used twice."""
    if not sources:
        raise ConfigError("at least one source is needed", field="--source", fix="--source cam1")
    fixed = [Identity(APPLY_USER, "apply"), Identity(MONITOR_USER, "monitor")]
    chosen = [(Identity(aggregator_id, "aggregator"), "--aggregator-id")]
    chosen += [(Identity(source, "source"), "--source") for source in sources]
    taken = {identity.name: identity for identity in fixed}
    for identity, flag in chosen:
        _check_option_id(identity.name, flag)
        if identity.name in taken:
            raise ConfigError(
                f"{identity.name!r} is already the name of the {taken[identity.name].role} "
                "identity",
                field=flag,
                fix=f"pick another name ({APPLY_USER!r} and {MONITOR_USER!r} are reserved, "
                "and the aggregator and every source need distinct names)",
            )
        taken[identity.name] = identity
    for index, device in enumerate(device_ids):
        if device in taken:
            raise InventoryError(
                f"device id {device!r} is also the name of the {taken[device].role} identity",
                source=str(fleet) if fleet else None,
                field=f"devices[{index}].id",
                fix="rename the device, or pick another --aggregator-id / --source",
            )
    devices = [Identity(device, "device") for device in device_ids]
    return devices + [identity for identity, _ in chosen] + fixed


def _check_option_id(value: str, option: str) -> None:
    if not is_valid_id(value):
        raise ConfigError(
            f"{value!r} is not a valid identifier",
            field=option,
            fix="use 1-64 characters from A-Z a-z 0-9 _ . -",
        )


def read_device_ids(path: Path) -> list[str]:
    """The device ids of an inventory file (the planner's format, validated the same way)."""
    return list(load_inventory(path).ids)


# --------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class InitOptions:
    """What ``mqttinfer broker init`` was asked for (the CLI flags, one to one)."""

    fleet: Path
    out: Path
    deployment: str = DEFAULT_DEPLOYMENT
    tls: bool = False
    hostname: str = "localhost"
    aggregator_id: str = DEFAULT_AGGREGATOR
    sources: tuple[str, ...] = (DEFAULT_SOURCE,)
    port: int | None = None
    local_port: int | None = None
    client_certs: bool = False
    force: bool = False

    @property
    def listener_port(self) -> int:
        return self.port if self.port is not None else (TLS_PORT if self.tls else PLAIN_PORT)

    @property
    def loopback_port(self) -> int:
        """The loopback plain listener (TLS setups only; 0 = none)."""
        if not self.tls:
            return 0
        return PLAIN_PORT if self.local_port is None else self.local_port

    def check(self) -> None:
        """ConfigError naming the flag when the combination of flags is invalid."""
        if not is_valid_id(self.deployment):
            raise ConfigError(
                f"{self.deployment!r} is not a valid identifier",
                field="--deployment",
                fix="use 1-64 characters from A-Z a-z 0-9 _ . -",
            )
        check_hostname(self.hostname)
        if self.port is not None and not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} is out of range", field="--port", fix="1-65535")
        if self.local_port is not None and not 0 <= self.local_port < 65536:
            raise ConfigError(
                f"port {self.local_port} is out of range",
                field="--local-port",
                fix="1-65535, or 0 for no loopback listener",
            )
        if not self.tls and (self.client_certs or self.local_port is not None):
            flag = "--client-certs" if self.client_certs else "--local-port"
            raise ConfigError(f"{flag} needs TLS", field=flag, fix="add --tls")
        if self.loopback_port and self.loopback_port == self.listener_port:
            raise ConfigError(
                f"the TLS and loopback listeners both use port {self.listener_port}",
                field="--local-port",
                fix="pick another --local-port, or 0 for no loopback listener",
            )


def check_hostname(hostname: str) -> str:
    """``hostname`` when it is a DNS name or an IP address (it goes into certificates)."""
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        if not _HOSTNAME.match(hostname):
            raise ConfigError(
                f"{hostname!r} is not a host name or IP address",
                field="--hostname",
                fix="pass the name devices use to reach the broker, e.g. broker.lan",
            ) from None
    return hostname


# --------------------------------------------------------------------------------- init
@dataclass(frozen=True)
class InitReport:
    """What ``init_broker`` wrote (paths are inside ``out``)."""

    out: Path
    identities: tuple[Identity, ...]
    created: tuple[str, ...]
    kept: tuple[str, ...]
    removed: tuple[str, ...]
    url: str
    tls: bool
    shared_with_broker_group: bool

    @property
    def conf(self) -> Path:
        return self.out / "mosquitto.conf"

    def env_file(self, name: str) -> Path:
        """The credentials file of identity ``name`` (KeyError when there is none)."""
        for identity in self.identities:
            if identity.name == name:
                return self.out / "credentials" / f"{identity.stem}.env"
        raise KeyError(name)


def init_broker(options: InitOptions) -> InitReport:
    """Write the broker configuration for ``options.fleet`` into ``options.out``."""
    options.check()
    identities = build_identities(
        read_device_ids(options.fleet),
        aggregator_id=options.aggregator_id,
        sources=options.sources,
        fleet=options.fleet,
    )
    find_tool("mosquitto_passwd", "mosquitto")
    if options.tls:
        find_tool("openssl", "openssl")
    out = _prepare_out(options)
    try:
        previous = _previous_passwords(out) if options.force else {}
        staging = Path(tempfile.mkdtemp(prefix=".broker-init-", dir=out))
        try:
            passwords = {i.name: previous.get(i.name) or _new_password() for i in identities}
            _stage(staging, out, options, identities, passwords)
            removed = _commit(staging, out, identities)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        shared = _share_with_broker(out, options.tls)
    except OSError as exc:
        raise ConfigError(
            f"cannot write {exc.filename or 'the directory'} ({exc.strerror})",
            source=str(out),
            field="--out",
            fix="run as a user who may write there (e.g. with sudo), or choose another --out",
        ) from exc
    log.info("broker configuration for %d identities written to %s", len(identities), out)
    return InitReport(
        out=out,
        identities=tuple(identities),
        created=tuple(i.name for i in identities if i.name not in previous),
        kept=tuple(i.name for i in identities if i.name in previous),
        removed=tuple(removed),
        url=broker_url(options.hostname, options.listener_port, options.tls),
        tls=options.tls,
        shared_with_broker_group=shared,
    )


def _new_password() -> str:
    return secrets.token_urlsafe(_PASSWORD_BYTES)


def _prepare_out(options: InitOptions) -> Path:
    out = options.out.expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError("exists and is not a directory", source=str(out), field="--out")
    if out.is_dir() and any(out.iterdir()) and not options.force:
        raise ConfigError(
            "directory is not empty",
            source=str(out),
            field="--out",
            fix="pass --force to update it (keeps its CA and existing passwords), "
            "or choose an empty directory",
        )
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the directory ({exc.strerror})",
            source=str(out),
            field="--out",
            fix="choose a directory you can write to, or run with sudo",
        ) from exc
    return out


def _previous_passwords(out: Path) -> dict[str, str]:
    """Passwords of the identities already in ``out/credentials`` (kept on --force)."""
    found: dict[str, str] = {}
    for env in sorted((out / "credentials").glob("*.env")):
        values = parse_env(env.read_text(encoding="utf-8"))
        user, password = values.get("MQTTINFER_USERNAME"), values.get("MQTTINFER_PASSWORD")
        if not user or not password:
            raise ConfigError(
                "has no MQTTINFER_USERNAME/MQTTINFER_PASSWORD",
                source=str(env),
                field="MQTTINFER_PASSWORD",
                fix="delete the file to issue a new password",
            )
        found[user] = password
    return found


def _stage(
    staging: Path,
    out: Path,
    options: InitOptions,
    identities: Sequence[Identity],
    passwords: dict[str, str],
) -> None:
    """Write every output file under ``staging`` (same layout as ``out``)."""
    write_passwd(staging / "passwd", passwords)
    write_private(staging / "acl", render_acl(options.deployment, identities))
    conf = render_mosquitto_conf(
        ConfPaths(out),
        deployment=options.deployment,
        tls=options.tls,
        port=options.listener_port,
        local_port=options.loopback_port,
        client_certs=options.client_certs,
    )
    write_private(staging / "mosquitto.conf", conf, 0o644)
    if options.tls:
        _stage_tls(staging, out, options, identities)
    url = broker_url(options.hostname, options.listener_port, options.tls)
    for identity in identities:
        cert = client_cert_paths(identity, out) if options.client_certs else None
        text = render_env(
            identity,
            url=url,
            deployment=options.deployment,
            password=passwords[identity.name],
            tls=options.tls,
            client_cert=cert,
        )
        write_private(staging / "credentials" / f"{identity.stem}.env", text)


def _stage_tls(
    staging: Path, out: Path, options: InitOptions, identities: Sequence[Identity]
) -> None:
    tls, old = staging / "tls", out / "tls"
    tls.mkdir(mode=0o700)
    work = staging / _WORK
    work.mkdir(mode=0o700)
    pki = Pki(work=work, hostname=options.hostname)
    ca = (tls / "ca.crt", tls / "ca.key")
    if (old / "ca.crt").exists() or (old / "ca.key").exists():
        _reuse_ca(old, ca)
    else:
        pki.new_ca(ca[0], ca[1], f"mqttinfer CA {options.deployment}")
    pki.issue(
        tls / "server.crt", tls / "server.key", common_name=options.hostname, ca=ca, kind="server"
    )
    if not options.client_certs:
        return
    for identity in identities:
        cert = tls / "clients" / f"{identity.stem}.crt"
        key = tls / "clients" / f"{identity.stem}.key"
        kept = old / "clients" / cert.name, old / "clients" / key.name
        if kept[0].exists() and kept[1].exists():
            _copy_private(kept[0], cert)
            _copy_private(kept[1], key)
        else:
            pki.issue(cert, key, common_name=identity.name, ca=ca, kind="client")


def _reuse_ca(old: Path, ca: tuple[Path, Path]) -> None:
    for name in ("ca.crt", "ca.key"):
        if not (old / name).is_file():
            raise ConfigError(
                "the CA certificate and key must both exist to be reused",
                source=str(old / name),
                field="--force",
                fix="restore the missing file, or delete both to create a new CA "
                "(then every node needs the new ca.crt)",
            )
    _copy_private(old / "ca.crt", ca[0])
    _copy_private(old / "ca.key", ca[1])


def _copy_private(src: Path, dst: Path) -> None:
    write_private(dst, src.read_text(encoding="utf-8"))


def _commit(staging: Path, out: Path, identities: Sequence[Identity]) -> list[str]:
    """Move the staged files into ``out``; delete credentials of identities no longer there."""
    staged = sorted(p for p in staging.rglob("*") if p.is_file() and _WORK not in p.parts)
    for src in staged:
        dst = out / src.relative_to(staging)
        dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.replace(src, dst)
    wanted = {f"{i.stem}.env" for i in identities}
    removed: list[str] = []
    for env in sorted((out / "credentials").glob("*.env")):
        if env.name not in wanted:
            removed.append(env.stem)
            env.unlink()
            for suffix in (".crt", ".key"):
                (out / "tls" / "clients" / f"{env.stem}{suffix}").unlink(missing_ok=True)
    return removed


def _share_with_broker(out: Path, tls: bool) -> bool:
    """Let the ``mosquitto`` group read what the broker needs (when run as root).

    Mosquitto 2 drops root privileges to its own user *before* reading the password file,
    ACL and TLS key, so those must be group-readable; credentials and the CA key stay 0600.
    """
    gid = _broker_gid()
    readable = [out / "passwd", out / "acl", out / "mosquitto.conf"]
    if tls:
        readable += [out / "tls" / "ca.crt", out / "tls" / "server.crt", out / "tls" / "server.key"]
    if gid is None:
        return False
    for directory in (out, out / "tls") if tls else (out,):
        os.chown(directory, 0, gid)
        os.chmod(directory, 0o750)
    for path in readable:
        os.chown(path, 0, gid)
        os.chmod(path, 0o640)
    return True


def _broker_gid() -> int | None:
    if os.geteuid() != 0:
        return None
    try:
        return grp.getgrnam(BROKER_GROUP).gr_gid
    except KeyError:
        return None
