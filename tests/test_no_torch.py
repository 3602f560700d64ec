"""Edge devices run without torch: the runtime must never import it (nor onnx, a dev extra)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.busutil import subprocess_env

RUNTIME_MODULES = (
    "mqttinfer",
    "mqttinfer.runtime.bus",
    "mqttinfer.runtime.runner",
    "mqttinfer.runtime.device",
    "mqttinfer.runtime.source",
    "mqttinfer.runtime.aggregator",
    "mqttinfer.runtime.aggregator_cli",
    "mqttinfer.runtime.cluster",
    "mqttinfer.runtime.cli",
    "mqttinfer.datasets",
)
PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx"))))
"""


def test_runtime_modules_do_not_load_torch_or_onnx() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *RUNTIME_MODULES],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_the_probe_would_notice_torch() -> None:
    """The check above can fail: importing torch is seen (when the train extra is installed)."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (train extra)")
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "mqttinfer.runtime.device", "torch"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "torch" in json.loads(done.stdout)
