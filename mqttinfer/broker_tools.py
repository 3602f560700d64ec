"""The command-line tools broker init drives: ``mosquitto_passwd`` and ``openssl``.

No Python crypto dependency: Debian ships both tools (packages ``mosquitto`` and ``openssl``),
and a missing one is a DependencyError that says which package to install.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mqttinfer.broker_files import subject_alt_names
from mqttinfer.errors import ConfigError, DependencyError

# Searched after $PATH (sudo and systemd may run us with a short PATH).
FALLBACK_DIRS: tuple[str, ...] = ("/usr/bin", "/usr/sbin")
CA_DAYS = 3650
LEAF_DAYS = 825


def find_tool(name: str, package: str) -> str:
    """Absolute path of a command-line tool, or DependencyError saying how to install it."""
    found = shutil.which(name) or next(
        (f"{d}/{name}" for d in FALLBACK_DIRS if os.access(f"{d}/{name}", os.X_OK)), None
    )
    if found is None:
        raise DependencyError(
            f"the '{name}' command is not installed; broker init needs it "
            f"(fix: sudo apt-get install {package})"
        )
    return found


def run_tool(argv: Sequence[str], *, output: Path, flag: str, fix: str) -> None:
    """Run ``argv``; on failure, ConfigError naming ``output``, ``flag`` and the tool's error."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"{Path(argv[0]).name} failed: {exc}", source=str(output)) from exc
    if done.returncode != 0:
        detail = " ".join((done.stderr or done.stdout).split())[-400:]
        raise ConfigError(
            f"{Path(argv[0]).name} {argv[1]} failed: {detail}",
            source=str(output),
            field=flag,
            fix=fix,
        )


def write_passwd(path: Path, passwords: dict[str, str]) -> None:
    """A Mosquitto password file with hashed ``passwords`` (hashed in place by ``-U``).

    ``mosquitto_passwd -U`` hashes a plain ``user:password`` file in one call, so no password
    ever appears on a command line (where ``ps`` would show it).
    """
    tool = find_tool("mosquitto_passwd", "mosquitto")
    write_private(path, "".join(f"{user}:{pw}\n" for user, pw in passwords.items()))
    run_tool(
        [tool, "-U", str(path)],
        output=path,
        flag="passwd",
        fix="check that mosquitto_passwd works: mosquitto_passwd -c /tmp/x test",
    )
    hashed = path.read_text()
    if any(f":{pw}\n" in hashed for pw in passwords.values()):
        raise ConfigError("mosquitto_passwd left plain-text passwords", source=str(path))


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write ``text`` to a file created with ``mode`` (never readable by others, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, mode)


_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
[ca_ext]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = {san}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass
class Pki:
    """Issues certificates with the ``openssl`` CLI (EC P-256 keys, SHA-256 signatures)."""

    work: Path
    hostname: str
    openssl: str = field(default_factory=lambda: find_tool("openssl", "openssl"))

    def __post_init__(self) -> None:
        self.cnf = self.work / "openssl.cnf"
        self.cnf.write_text(_OPENSSL_CNF.format(san=subject_alt_names(self.hostname)))

    def _run(self, *args: str, output: Path) -> None:
        run_tool(
            [self.openssl, *args],
            output=output,
            flag="--tls",
            fix="check `openssl version` (OpenSSL 1.1.1 or newer is needed)",
        )

    def new_key(self, key: Path) -> None:
        write_private(key, "")  # created 0600 before openssl writes the secret into it
        self._run(
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            str(key),
            output=key,
        )

    def new_ca(self, cert: Path, key: Path, common_name: str) -> None:
        self.new_key(key)
        self._run(
            "req", "-x509", "-new", "-key", str(key), "-sha256", "-days", str(CA_DAYS),
            "-subj", f"/CN={common_name}", "-config", str(self.cnf), "-extensions", "ca_ext",
            "-out", str(cert),
            output=cert,
        )  # fmt: skip

    def issue(
        self, cert: Path, key: Path, *, common_name: str, ca: tuple[Path, Path], kind: str
    ) -> None:
        """A leaf certificate (``kind`` = server or client) signed by ``ca`` = (cert, key)."""
        self.new_key(key)
        csr = self.work / f"{cert.name}.csr"
        self._run(
            "req", "-new", "-key", str(key), "-subj", f"/CN={common_name}",
            "-config", str(self.cnf), "-out", str(csr),
            output=cert,
        )  # fmt: skip
        self._run(
            "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
            "-set_serial", f"0x{secrets.token_hex(16)}", "-days", str(LEAF_DAYS), "-sha256",
            "-extfile", str(self.cnf), "-extensions", f"{kind}_ext", "-out", str(cert),
            output=cert,
        )  # fmt: skip
        csr.unlink()
