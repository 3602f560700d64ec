"""The systemd units: ``systemd-analyze verify``, their hardening score, their contract with
broker init's env files, and MemoryDenyWriteExecute= against the real runtime stack.

``systemd-analyze verify`` refuses a unit whose ExecStart binary does not exist, so it checks
copies whose ExecStart points at a stub; everything else in the unit is verified as shipped.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mqttinfer.broker_files import NODE_ETC, Identity
from tests.support.synthetic import SyntheticBundle

REPO = Path(__file__).resolve().parents[1]
UNITS = sorted((REPO / "systemd").glob("*.service"))
INSTALLED_CLI = "/opt/mqttinfer/venv/bin/mqttinfer"
ANALYZE = shutil.which("systemd-analyze") or (
    "/usr/bin/systemd-analyze" if os.access("/usr/bin/systemd-analyze", os.X_OK) else None
)
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
# Which broker init identity each unit runs as (its EnvironmentFile is that identity's env).
ROLES = {
    "mqttinfer-device@.service": "device",
    "mqttinfer-aggregator.service": "aggregator",
    "mqttinfer-source@.service": "source",
}


def test_every_shipped_unit_is_covered() -> None:
    assert sorted(unit.name for unit in UNITS) == sorted(ROLES)


def parse_unit(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> values in order (systemd allows a key several times)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


def staged(unit: Path, directory: Path, *, extra: str = "") -> Path:
    """A copy of ``unit`` whose ExecStart runs a stub; the instance name for templates."""
    stub = directory / "bin" / "mqttinfer"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = unit.read_text()
    assert INSTALLED_CLI in text
    text = text.replace(INSTALLED_CLI, str(stub))
    if extra:
        text = text.replace("[Service]\n", f"[Service]\n{extra}\n", 1)
    (directory / unit.name).write_text(text)
    return directory / unit.name.replace("@.", "@cam-node-1.")


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, "verify", "--man=no", "--recursive-errors=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@needs_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify_passes_without_warnings(unit: Path, tmp_path: Path) -> None:
    done = verify(staged(unit, tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == ""


@needs_analyze
def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a typo'd key and a bad value are reported."""
    broken = staged(UNITS[0], tmp_path, extra="Restart=sometimes\nWatchdogSecs=30")
    done = verify(broken)
    assert "Unknown key" in done.stderr
    assert "restart specifier" in done.stderr


@needs_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_units_are_hardened(unit: Path, tmp_path: Path) -> None:
    assert ANALYZE is not None
    done = subprocess.run(
        [ANALYZE, "security", "--offline=yes", str(staged(unit, tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "--offline" in done.stderr:
        pytest.skip("systemd-analyze is older than 250 (no offline security review)")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    # 0 is a fully locked-down unit, 10 an unprotected one; "OK" ends at 3.9.
    assert float(match.group(1)) <= 2.0, done.stdout


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_contract(unit: Path) -> None:
    settings = parse_unit(unit.read_text())

    def one(key: str) -> str:
        values = settings.get(f"Service.{key}", [])
        assert len(values) == 1, f"{unit.name}: {key} = {values}"
        return values[0]

    assert one("Type") == "notify"
    assert int(one("WatchdogSec")) >= 10
    assert one("Restart") == "on-failure"
    assert one("KillSignal") == "SIGTERM"
    assert int(one("TimeoutStopSec")) >= 5
    for key in ("DynamicUser", "ProtectHome", "PrivateTmp", "NoNewPrivileges"):
        assert one(key) == "yes", key
    assert one("MemoryDenyWriteExecute") == "yes"
    assert one("ProtectSystem") == "strict"
    assert one("CapabilityBoundingSet") == ""
    assert one("RestrictAddressFamilies") == "AF_UNIX AF_INET AF_INET6"
    assert "@system-service" in settings["Service.SystemCallFilter"]
    assert one("StateDirectory").startswith("mqttinfer/")
    # The password reaches the process only through the environment, never on argv.
    assert "PASSWORD" not in one("ExecStart")
    assert "${MQTTINFER_BROKER}" in one("ExecStart")


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_environment_file_is_the_one_broker_init_writes(unit: Path) -> None:
    """The unit reads /etc/mqttinfer/<stem>.env, the name broker init gives that identity."""
    settings = parse_unit(unit.read_text())
    instance = "cam-node-1"
    identity = Identity(instance, ROLES[unit.name])  # type: ignore[arg-type]
    [env_file] = settings["Service.EnvironmentFile"]
    assert env_file.replace("%i", instance) == f"{NODE_ETC}/{identity.stem}.env"
    expected_unit = identity.unit or ""
    assert unit.name.replace("@.", f"@{instance}.") == expected_unit


# ------------------------------------------------------------------------ MemoryDenyWriteExecute
# systemd implements MemoryDenyWriteExecute=yes as a seccomp filter that makes these calls fail
# with EPERM: mmap() asking for PROT_WRITE|PROT_EXEC, mprotect()/pkey_mprotect() adding
# PROT_EXEC, shmat() with SHM_EXEC. The child below installs the same filter on itself, checks
# that it bites, then imports the runtime and runs an onnxruntime session.
_MDWE_CHILD = textwrap.dedent(
    """
    import ctypes, mmap, platform, struct, sys

    SYSCALLS = {  # audit arch, then mmap, mprotect, pkey_mprotect, shmat
        "x86_64": (0xC000003E, 9, 10, 329, 30),
        "aarch64": (0xC00000B7, 222, 226, 288, 196),
    }
    arch, mmap_nr, mprotect_nr, pkey_nr, shmat_nr = SYSCALLS[platform.machine()]
    LD, JEQ, JSET, AND, RET = 0x20, 0x15, 0x45, 0x54, 0x06
    ALLOW, DENY = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ERRNO | EPERM
    W, X, SHM_EXEC = 2, 4, 0o100000

    def op(code, k, jt=0, jf=0):
        return struct.pack("HBBI", code, jt, jf, k)

    def arg(n):  # low 32 bits of syscall argument n (little endian)
        return op(LD, 16 + 8 * n)

    def rule(nr, body):  # when the syscall is nr, run body (which returns); else skip it
        return [op(JEQ, nr, 0, len(body))] + body

    prog = [op(LD, 4), op(JEQ, arch, 1, 0), op(RET, ALLOW), op(LD, 0)]
    prog += rule(mmap_nr, [arg(2), op(AND, W | X), op(JEQ, W | X, 0, 1), op(RET, DENY),
                           op(RET, ALLOW)])
    for nr in (mprotect_nr, pkey_nr):
        prog += rule(nr, [arg(2), op(JSET, X, 0, 1), op(RET, DENY), op(RET, ALLOW)])
    prog += rule(shmat_nr, [arg(2), op(JSET, SHM_EXEC, 0, 1), op(RET, DENY), op(RET, ALLOW)])
    prog.append(op(RET, ALLOW))
    code = b"".join(prog)

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = Fprog(len(prog), ctypes.cast(buffer, ctypes.c_char_p))
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0, ctypes.get_errno()  # SECCOMP

    try:  # the filter bites: writable+executable memory is refused
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        sys.exit("W+X mmap was allowed: the filter is not active")
    except PermissionError:
        pass

    import numpy as np
    import onnxruntime as ort
    import mqttinfer.runtime.aggregator, mqttinfer.runtime.bus, mqttinfer.runtime.device
    import mqttinfer.runtime.source, mqttinfer.protocol

    session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 2 for d in feed.shape]
    outputs = session.run(None, {feed.name: np.random.rand(*shape).astype(np.float32)})
    print("inference ok", outputs[0].shape)
    """
)


@pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"),
    reason="the seccomp emulation knows the syscall numbers of x86_64 and aarch64 only",
)
def test_runtime_runs_under_memory_deny_write_execute(synthetic_bundle: SyntheticBundle) -> None:
    model = sorted(synthetic_bundle.path.glob("*.onnx"))[0]
    done = subprocess.run(
        [sys.executable, "-c", _MDWE_CHILD, str(model)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "inference ok" in done.stdout
