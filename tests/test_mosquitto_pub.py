"""The worked example of docs/protocol.md as written: xxd + mosquitto_pub in, mosquitto_sub out.

Device and aggregator processes serve the synthetic bundle (1x8x8 input, like the example frame);
the shell commands are taken from the document itself, with only the host, port and deployment
substituted, so the document cannot describe a command that does not work.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mqttinfer.protocol import Result
from mqttinfer.runtime.cluster import DeviceSpec, LocalCluster
from tests.support.synthetic import SyntheticBundle

pytestmark = pytest.mark.broker

DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
TOOLS = ("xxd", "mosquitto_pub", "mosquitto_sub", "bash")


def doc_command(start: str) -> str:
    """The first line of a ```sh block of the document that starts with ``start``."""
    for block in re.findall(r"```sh\n(.*?)```", DOC, re.S):
        for line in block.splitlines():
            if line.startswith(start):
                return line
    raise AssertionError(f"docs/protocol.md has no command starting with {start!r}")


def localise(command: str, port: int, deployment: str) -> str:
    return (
        command.replace("-h localhost", "-h 127.0.0.1")
        .replace("-p 1883", f"-p {port}")
        .replace("mqttinfer/default/", f"mqttinfer/{deployment}/")
    )


@pytest.fixture(scope="module")
def cluster(synthetic_bundle: SyntheticBundle) -> Iterator[LocalCluster]:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{missing} not installed (scripts/setup.sh installs mosquitto-clients)")
    devices = [DeviceSpec(f"dev{k}", k) for k in range(synthetic_bundle.num_partitions)]
    with LocalCluster(synthetic_bundle.path, devices, deployment="shell") as running:
        yield running


def test_mosquitto_pub_frame_gets_a_result_mosquitto_sub_can_read(
    cluster: LocalCluster, synthetic_bundle: SyntheticBundle
) -> None:
    port = int(cluster.url.rsplit(":", 1)[1])
    frame_hex = re.search(r"^FRAME_HEX=([0-9a-f]+)$", DOC, re.M)
    assert frame_hex
    subscribe = localise(doc_command("mosquitto_sub"), port, cluster.deployment)
    publish = localise(doc_command('echo "$FRAME_HEX"'), port, cluster.deployment)
    assert "-F %x" in subscribe and "mosquitto_pub" in publish and "xxd -r -p" in publish

    reader = subprocess.Popen(
        ["bash", "-c", subscribe], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        time.sleep(1.0)  # mosquitto_sub has no "subscribed" signal; give it a moment
        pub = subprocess.run(
            ["bash", "-c", f"FRAME_HEX={frame_hex.group(1)}\n{publish}"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert pub.returncode == 0, pub.stderr
        out, err = reader.communicate(timeout=40)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0, err
    payload = bytes.fromhex(out.strip())
    # What the document tells a shell user to look for, followed by the label byte.
    label_at = payload.hex().index("a56c6162656c") // 2 + 6
    result = Result.decode(payload)
    assert payload[label_at] == result.label
    assert (result.frame, result.source, result.reason) == ("demo-1", "cli", "complete")
    pixels = np.arange(64, dtype=np.uint8).reshape(1, 1, 8, 8)
    expected = synthetic_bundle.reference_logits(pixels)[0]
    np.testing.assert_allclose(result.logits, expected, rtol=1e-2, atol=2e-2)
    assert result.label == int(np.argmax(expected))
