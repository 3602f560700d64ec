"""Device profiling: the reference model, the measurements, the profile message, and the
``devices profile`` / ``devices list`` commands against a real Mosquitto."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from mqttinfer.broker_files import Identity, render_acl
from mqttinfer.errors import BrokerError, ProtocolError
from mqttinfer.planner.inventory import load_inventory
from mqttinfer.protocol import InputSpec
from mqttinfer.runtime.local_broker import LocalBroker
from mqttinfer.runtime.profile import (
    ComputeResult,
    LinkResult,
    LinkSettings,
    Profile,
    available_memory,
    build_profile,
    collect_profiles,
    measure_compute,
    measure_link,
    reference_model,
)
from mqttinfer.runtime.retained import BrokerBarrier, retained_snapshot
from mqttinfer.runtime.runner import StudentRunner
from mqttinfer.topics import Topics
from tests.busutil import make_bus, subprocess_env


def numpy_conv_relu(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """3×3 convolution, padding 1, stride 1, no bias, then ReLU; x is [C, H, W]."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))
    return np.maximum(np.einsum("chwij,ocij->ohw", windows, weight), 0)


def test_reference_model_is_valid_onnx_and_computes_two_conv_layers() -> None:
    model = reference_model(channels=4, size=6, layers=2)
    proto = onnx.load_from_string(model.data)
    onnx.checker.check_model(proto, full_check=True)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert model.macs == 2 * 4 * 4 * 9 * 6 * 6 and model.shape == (4, 6, 6)

    x = np.random.default_rng(3).normal(size=(4, 6, 6)).astype(np.float32)
    runner = StudentRunner(model.data, InputSpec(shape=model.shape), pool=False)
    got = runner.run(x[np.newaxis])
    expected = numpy_conv_relu(numpy_conv_relu(x, weights["w0"]), weights["w1"])
    np.testing.assert_allclose(got, expected.reshape(-1), rtol=1e-4, atol=1e-5)


def test_measured_flops_are_two_macs_over_the_median_time() -> None:
    model = reference_model(channels=8, size=16)
    result = measure_compute(model, min_runs=5, budget_s=0.2)
    assert result.runs >= 5 and result.macs == model.macs
    assert result.flops == pytest.approx(2 * model.macs / (result.median_ms / 1000), rel=1e-9)
    assert 1e6 < result.flops < 1e13  # any real CPU lies in between


def test_available_memory_reads_meminfo_and_the_cgroup_limit(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  8000000 kB\nMemFree: 100 kB\nMemAvailable:    2000000 kB\n")
    no_cgroup = tmp_path / "none"
    assert available_memory(meminfo, no_cgroup) == 2_000_000 * 1024
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("5\n")
    assert available_memory(meminfo, cgroup) == 2_000_000 * 1024
    (cgroup / "memory.max").write_text(f"{512 * 1024 * 1024}\n")
    (cgroup / "memory.current").write_text(f"{100 * 1024 * 1024}\n")
    assert available_memory(meminfo, cgroup) == 412 * 1024 * 1024
    assert available_memory() > 0  # this machine's


def sample_profile(**changes: object) -> Profile:
    compute = ComputeResult(1.23456e9, 2.0, 10, 1000, "m")
    link = LinkResult((1.0, 2.0, 3.0), pings=4, lost=1, burst_bytes=1000, burst_s=0.01)
    profile = build_profile("cam-1", compute, 300 * 1024 * 1024 + 5, link, labels={"room": "lab"})
    body = json.loads(profile.encode())
    body.update(changes)
    return Profile.decode(json.dumps(body).encode())


def test_profile_round_trips_with_rounded_figures() -> None:
    profile = sample_profile()
    assert Profile.decode(profile.encode()) == profile
    assert profile.flops == 1.23e9 and profile.rate == 800_000.0 and profile.outage == 0.25
    assert profile.memory == 300 * 1024 * 1024
    assert profile.measured["pings_lost"] == 1 and profile.labels == {"room": "lab"}
    device = profile.inventory_device()
    assert (device.id, device.flops, device.memory, device.outage) == (
        "cam-1",
        1.23e9,
        300 * 1024 * 1024,
        0.25,
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"outage": 1.0},
        {"flops": 0},
        {"memory": -1},
        {"rate": "fast"},
        {"device": "a/b"},
        {"labels": {"k": 3}},
        {"measured": {"x": [1]}},
        {"v": 2},
    ],
)
def test_invalid_profiles_are_protocol_errors(changes: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        sample_profile(**changes)


# -- against a real broker ---------------------------------------------------------------------


@pytest.mark.broker
def test_link_measurement_counts_pings_lost_while_the_broker_is_down(
    fresh_broker: LocalBroker, deployment: str
) -> None:
    bus = make_bus(fresh_broker.url, deployment, "cam-1.profiler", kind="profiler")
    with bus:
        assert bus.wait_connected(10)
        healthy = measure_link(
            bus, LinkSettings(pings=5, burst_bytes=200_000, message_bytes=10_000)
        )
        assert (healthy.pings, healthy.lost, healthy.outage) == (5, 0, 0.0)
        assert all(0 < rtt < 1000 for rtt in healthy.rtt_ms)
        assert healthy.burst_bytes == 200_000 and healthy.rate > 0

        def outage() -> None:
            time.sleep(0.5)
            fresh_broker.kill()
            time.sleep(0.3)
            fresh_broker.start()

        thread = threading.Thread(target=outage)
        thread.start()
        settings = LinkSettings(
            pings=40, ping_interval_s=0.05, ping_timeout_s=0.3, burst_bytes=10_000
        )
        flaky = measure_link(bus, settings)
        thread.join()
    assert 0 < flaky.lost < flaky.pings
    assert flaky.outage == flaky.lost / 40


def test_link_measurement_fails_clearly_without_a_broker(deployment: str) -> None:
    bus = make_bus("mqtt://127.0.0.1:1", deployment, "x.profiler", kind="profiler")
    with pytest.raises(BrokerError, match=r"did not echo a message within 0 s"):
        measure_link(bus, LinkSettings(pings=2, ping_timeout_s=0.04))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mqttinfer.runtime.deploy_cli", "devices", *args]
    return subprocess.run(
        cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.broker
def test_profile_publishes_retained_json_and_list_writes_an_inventory(
    broker: LocalBroker, deployment: str, tmp_path: Path
) -> None:
    common = ["--broker", broker.url, "--deployment", deployment]
    empty = run_cli("list", *common)
    assert empty.returncode == 1 and "no device profile" in empty.stderr

    for device, labels in (("cam-1", ["--label", "room=lab"]), ("cam-2", [])):
        done = run_cli(
            "profile", "--id", device, *common, "--publish", "--json",
            "--compute-seconds", "0.2", "--pings", "5", "--burst", "64KiB", *labels,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        printed = Profile.decode(done.stdout.encode())
        assert printed.device == device and printed.measured["pings"] == 5

    # The profiles are retained: a client connecting now reads them.
    bus = make_bus(broker.url, deployment, "reader", kind="monitor")
    with bus:
        retained = {p.device: p for p in collect_profiles(bus)}
        statuses = retained_snapshot(bus, [Topics(deployment).all_status], BrokerBarrier(bus), 10)
    assert sorted(retained) == ["cam-1", "cam-2"]
    assert retained["cam-1"].labels == {"room": "lab"}
    assert retained["cam-2"].flops > 0 and retained["cam-2"].outage == 0.0
    # The profiler announces itself under its own node id, never over the device's status.
    nodes = {topic.rsplit("/", 1)[1] for topic in statuses}
    assert {"cam-1.profiler", "cam-2.profiler"} <= nodes and "cam-1" not in nodes

    out = tmp_path / "devices" / "fleet.yaml"
    listed = run_cli("list", *common, "--out", str(out), "--description", "bench")
    assert listed.returncode == 0, listed.stderr
    fleet = load_inventory(out)
    assert fleet.ids == ("cam-1", "cam-2") and fleet.description == "bench"
    for device in fleet.devices:
        profile = retained[device.id]
        assert device.flops == pytest.approx(profile.flops, rel=1e-9)
        assert device.memory == profile.memory and device.rate == pytest.approx(profile.rate)
        assert device.outage == profile.outage
    assert fleet.by_id("cam-1").labels == {"room": "lab"}


def test_every_profile_field_is_documented() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    section = text.split("## Device profiles", 1)[1].split("\n## ", 1)[0]
    profile = json.loads(sample_profile().encode())
    for key in [*profile, *profile["measured"]]:
        assert f"`{key}`" in section, f"## Device profiles does not mention {key}"


@pytest.mark.broker
def test_profile_runs_with_the_devices_identity_under_the_broker_acl(
    deployment: str,
) -> None:
    # Mosquitto started as root reads its files as user 'mosquitto': a world-readable place.
    where = Path(tempfile.mkdtemp(prefix="mqttinfer-profile-acl-"))
    where.chmod(0o755)
    acl = where / "acl"
    acl.write_text(render_acl(deployment, [Identity("cam-1", "device")]))
    acl.chmod(0o644)
    with LocalBroker(extra_config=f"acl_file {acl}") as secured:
        as_device = secured.url.replace("mqtt://", "mqtt://cam-1@")
        done = run_cli(
            "profile", "--id", "cam-1", "--broker", as_device, "--deployment", deployment,
            "--publish", "--compute-seconds", "0.1", "--pings", "3", "--burst", "16KiB",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        reader = make_bus(secured.url.replace("mqtt://", "mqtt://cam-1@"), deployment, "cam-1")
        with reader:
            assert reader.wait_connected(10)
            snapshot = retained_snapshot(
                reader, [Topics(deployment).profile("cam-1")], BrokerBarrier(reader), 10
            )
    shutil.rmtree(where)
    assert Profile.decode(snapshot[Topics(deployment).profile("cam-1")]).device == "cam-1"
