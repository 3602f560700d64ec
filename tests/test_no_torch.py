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


def test_the_probe_notices_a_forbidden_import() -> None:
    """The check above can fail: a module that imports onnx is seen (onnx is cheaper than
    torch to import, and the probe treats both alike)."""
    if importlib.util.find_spec("onnx") is None:
        pytest.skip("onnx is not installed (dev extra)")
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "mqttinfer.runtime.device", "onnx.helper"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "onnx" in json.loads(done.stdout)
