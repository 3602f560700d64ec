"""plan apply and the device's plan client: pure rules, in-process clients, and real fleets.

The fleet tests run real ``mqttinfer device run`` subprocesses (no --role) and the real
``plan apply`` command against a private Mosquitto, with the synthetic 3-partition bundle.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqttinfer.bundle import Bundle
from mqttinfer.errors import ProtocolError, RoleError
from mqttinfer.planner.plan import load_plan
from mqttinfer.protocol import Frame, ModelRef, Partial, Role, RoleSummary, Status
from mqttinfer.runtime.bus import Bus
from mqttinfer.runtime.local_broker import LocalBroker
from mqttinfer.runtime.model_transfer import (
    ModelAssembly,
    ModelCache,
    ModelManifest,
    default_state_dir,
    sha256_hex,
    split_model,
)
from mqttinfer.runtime.plan_apply import (
    ApplyTarget,
    Outcome,
    RetainedState,
    SeenStatus,
    build_target,
    decide,
    device_progress,
)
from mqttinfer.runtime.plan_client import PlanClientSettings, PlanRoleProvider
from mqttinfer.runtime.roles import LoadedRole
from mqttinfer.topics import Topics
from tests.busutil import Inbox, make_bus, subprocess_env, wait_until
from tests.support.synthetic import SyntheticBundle, build_synthetic_bundle, random_frames

PARTITION_SIZES = (4, 4, 3)


@pytest.fixture(scope="module")
def bundle3(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
    return build_synthetic_bundle(
        tmp_path_factory.mktemp("bundle3"), partition_sizes=PARTITION_SIZES
    )


def write_plan(path: Path, groups: list[list[str]], *, name: str, deployment: str) -> Path:
    """A plan in the planner's YAML format: group k serves partition k with ``groups[k]``."""
    lines = [
        "version: 1",
        f"name: {name}",
        "strategy: rocoin",
        f"deployment: {deployment}",
        "epsilon: 0.05",
        f"channels: {sum(PARTITION_SIZES)}",
        "input_shape: [1, 8, 8]",
        "groups:",
    ]
    first = 0
    for k, members in enumerate(groups):
        filters = list(range(first, first + PARTITION_SIZES[k]))
        first += PARTITION_SIZES[k]
        lines += [
            f"  - id: g{k}",
            f"    partition: {k}",
            f"    filters: {filters}",
            "    student: {arch: wrn-16-1, params: 100, macs: 1000, memory: 4096}",
            "    members:",
            *[f"      - {{device: {d}, outage: 0.1, latency_s: 0.05}}" for d in members],
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def sample_role(version: int = 5, sha: str = "a" * 64, partition: int = 0) -> Role:
    return Role.from_obj(
        {
            "device": "d0",
            "group": f"g{partition}",
            "partition": partition,
            "model": {"sha256": sha, "size": 10},
            "input": {"shape": [1, 8, 8]},
            "plan": "p",
            "plan_version": version,
        }
    )


def target_of(*roles: Role) -> ApplyTarget:
    return ApplyTarget("p", "default", {r.device: r for r in roles}, {})


# -- model transfer (pure) --------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=3000), chunk_size=st.integers(1, 700))
def test_split_then_assemble_in_any_order_gives_the_bytes_back(
    data: bytes, chunk_size: int
) -> None:
    manifest, chunks = split_model(data, chunk_size)
    assert manifest == ModelManifest.decode(manifest.encode())
    assembly = ModelAssembly(manifest, expected_sha256=sha256_hex(data), expected_size=len(data))
    for index in reversed(range(len(chunks))):
        assert not assembly.complete
        assembly.add(index, chunks[index])
    assert assembly.result() == data


def test_assembly_refuses_wrong_lengths_indices_hashes_and_sizes() -> None:
    data = bytes(range(256)) * 4
    manifest, chunks = split_model(data, 300)
    assert [len(c) for c in chunks] == [300, 300, 300, 124]
    assembly = ModelAssembly(manifest, expected_sha256=manifest.sha256)
    with pytest.raises(RoleError, match="chunk 3 is 300 bytes, the manifest needs 124"):
        assembly.add(3, chunks[0])
    with pytest.raises(RoleError, match="outside"):
        assembly.add(4, chunks[0])
    with pytest.raises(RoleError, match="4 of 4 chunks missing"):
        assembly.result()
    for index, chunk in enumerate(chunks):
        assembly.add(index, bytes(len(chunk)) if index == 1 else chunk)
    with pytest.raises(RoleError, match="sha256 mismatch"):
        assembly.result()
    with pytest.raises(RoleError, match="role wants"):
        ModelAssembly(manifest, expected_sha256="b" * 64)
    with pytest.raises(RoleError, match="the role says 7"):
        ModelAssembly(manifest, expected_sha256=manifest.sha256, expected_size=7)
    with pytest.raises(RoleError, match="over this device's limit of 1000"):
        ModelAssembly(manifest, expected_sha256=manifest.sha256, max_bytes=1000)


@pytest.mark.parametrize(
    "body",
    [
        {"sha256": "a" * 64, "size": 10, "chunk_size": 3, "chunks": 3},  # 10/3 needs 4
        {"sha256": "A" * 64, "size": 10, "chunk_size": 10, "chunks": 1},
        {"sha256": "a" * 64, "size": 0, "chunk_size": 10, "chunks": 0},
        {"sha256": "a" * 64, "size": 10**9, "chunk_size": 1, "chunks": 10**9},
        {"sha256": "a" * 64, "size": "10", "chunk_size": 10, "chunks": 1},
    ],
)
def test_inconsistent_manifests_are_protocol_errors(body: dict[str, object]) -> None:
    payload = json.dumps({"v": 1, **body}).encode()
    with pytest.raises(ProtocolError):
        ModelManifest.decode(payload)


def test_model_cache_verifies_replaces_and_prunes(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path, keep=2)
    blobs = [bytes([i]) * (100 + i) for i in range(3)]
    for blob in blobs:
        cache.put(sha256_hex(blob), blob)
        time.sleep(0.01)  # distinct mtimes: pruning keeps the newest
    assert cache.get(sha256_hex(blobs[0])) is None  # pruned: keep=2
    assert cache.get(sha256_hex(blobs[2])) == blobs[2]
    path = cache.path(sha256_hex(blobs[1]))
    path.write_bytes(b"tampered")
    assert cache.get(sha256_hex(blobs[1])) is None
    assert not path.exists()


def test_state_dir_follows_systemd_then_home() -> None:
    assert default_state_dir({"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}) == Path("/var/lib/a")
    assert default_state_dir({}).parts[-2:] == (".cache", "mqttinfer")


# -- decide (pure) ----------------------------------------------------------------------------


def test_reapplying_the_same_roles_publishes_nothing() -> None:
    role = sample_role(version=0)
    retained = RetainedState({"d0": replace(role, plan_version=42)}, {role.model.sha256: None})
    decision = decide(target_of(role), retained, now_ms=1000)
    assert decision.publish == () and decision.clear == ()
    assert decision.version == 42 and decision.roles["d0"].plan_version == 42
    # The manifest was unreadable: the model goes up again, the roles stay.
    assert decision.upload == (role.model.sha256,)


def test_a_change_bumps_one_version_for_every_device_and_withdraws_the_rest() -> None:
    d0 = sample_role(version=0)
    d1 = replace(d0, device="d1")
    retained = RetainedState(
        {"d0": replace(d0, plan_version=7), "d1": replace(d1, group="old", plan_version=7)},
        {},
    )
    gone = replace(d0, device="gone", plan_version=9)
    retained = RetainedState({**retained.roles, "gone": gone}, {"b" * 64: None})
    decision = decide(target_of(d0, d1), retained, now_ms=5, prune=True)
    assert decision.version == 10  # newest retained + 1 beats a clock running behind
    assert decision.publish == ("d0", "d1") and decision.clear == ("gone",)
    assert {r.plan_version for r in decision.roles.values()} == {10}
    assert decision.upload == (d0.model.sha256,) and decision.prune == ("b" * 64,)
    later = decide(target_of(d0, d1), retained, now_ms=10**12, prune=False)
    assert later.version == 10**12 and later.prune == ()


def test_force_republishes_without_a_new_version() -> None:
    role = sample_role(version=0)
    manifest, _ = split_model(b"x" * 10, 4)
    retained = RetainedState({"d0": replace(role, plan_version=3)}, {role.model.sha256: manifest})
    decision = decide(target_of(role), retained, now_ms=99, force=True)
    assert decision.version == 3 and decision.publish == ("d0",)
    assert decision.upload == (role.model.sha256,)


# -- acks (pure) ------------------------------------------------------------------------------


def status_of(role: Role | None, serving: str, *, state: str = "online", error: str = "") -> Status:
    summary = None if role is None else role.summary()
    return Status(
        node="d0",
        kind="device",
        state=state,
        bdseq=1,
        ts=0.0,
        role=summary,
        serving=serving,
        error=error or None,
    )


def test_device_progress_reads_ready_refused_loading_offline_and_stale_errors() -> None:
    want = sample_role(version=8)
    old = sample_role(version=7)

    def judge(status: Status | None, live: bool = True, republished: bool = True) -> Outcome:
        seen = None if status is None else SeenStatus(status, live)
        return device_progress(want, seen, republished=republished).outcome

    assert judge(None) is Outcome.WAITING
    assert judge(status_of(want, "ready")) is Outcome.READY
    assert judge(status_of(want, "ready", state="offline")) is Outcome.OFFLINE
    assert judge(status_of(old, "ready")) is Outcome.WAITING
    assert judge(status_of(old, "loading")) is Outcome.LOADING
    assert judge(status_of(old, "error", error="refused plan p v8 (…): sha256")) is Outcome.REFUSED
    # An error about an older plan does not refuse this one, live or not.
    assert judge(status_of(old, "error", error="refused plan p v7 (…)")) is Outcome.WAITING
    # A live error naming no version (e.g. onnxruntime could not load it) refuses.
    assert judge(status_of(old, "error", error="cannot load")) is Outcome.REFUSED
    assert judge(status_of(old, "error", error="cannot load"), live=False) is Outcome.WAITING
    # A standing refusal of this version counts when nothing was republished to the device,
    # but not when this apply republished the role (--force): the device retries.
    standing = status_of(old, "error", error="refused plan p v8: sha256 mismatch")
    assert judge(standing, live=False, republished=False) is Outcome.REFUSED
    assert judge(standing, live=False, republished=True) is Outcome.WAITING


def test_build_target_refuses_a_bundle_made_for_another_plan(
    bundle3: SyntheticBundle, tmp_path: Path
) -> None:
    plan_path = write_plan(
        tmp_path / "p.yaml", [["a"], ["b", "c"], ["d"]], name="p", deployment="x"
    )
    target = build_target(load_plan(plan_path), Bundle.load(bundle3.path))
    assert sorted(target.roles) == ["a", "b", "c", "d"] and len(target.models) == 3
    assert target.roles["c"].partition == 1 and target.roles["c"].model.file is None
    other = build_synthetic_bundle(tmp_path / "other", partition_sizes=(5, 3, 3))
    with pytest.raises(Exception, match="other filters"):
        build_target(load_plan(plan_path), Bundle.load(other.path))


# -- the plan client in-process, against a real broker ---------------------------------------


class RoleSink:
    """Collects what a PlanRoleProvider hands the device."""

    def __init__(self) -> None:
        self.roles: list[LoadedRole | None] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def on_role(self, loaded: LoadedRole | None) -> None:
        with self.lock:
            self.roles.append(loaded)

    def on_error(self, error: str) -> None:
        with self.lock:
            self.errors.append(error)


def publish_model(bus: Bus, data: bytes, chunk_size: int, *, corrupt: int | None = None) -> str:
    manifest, chunks = split_model(data, chunk_size)
    for index, chunk in enumerate(chunks):
        payload = bytes(len(chunk)) if index == corrupt else chunk
        assert bus.publish(
            bus.topics.model_chunk(manifest.sha256, index), payload, qos=1, retain=True
        )
    assert bus.publish(bus.topics.model(manifest.sha256), manifest.encode(), qos=1, retain=True)
    return manifest.sha256


def plan_role(bundle: Bundle, partition: int, version: int, deployment: str) -> Role:
    role = bundle.role("d0", partition, f"g{partition}", deployment=deployment, plan="p")
    return replace(role, plan_version=version, model=replace(role.model, file=None))


@pytest.fixture
def client_setup(
    broker: LocalBroker, deployment: str, bundle3: SyntheticBundle, tmp_path: Path
) -> Iterator[tuple[Bus, Bus, PlanRoleProvider, RoleSink, Bundle]]:
    bundle = Bundle.load(bundle3.path)
    publisher = make_bus(broker.url, deployment, "publisher", kind="apply")
    device_bus = make_bus(broker.url, deployment, "d0")
    sink = RoleSink()
    provider = PlanRoleProvider(
        "d0",
        cache=ModelCache(tmp_path / "state"),
        settings=PlanClientSettings(fetch_timeout_s=1.0, max_model_bytes=100_000),
    )
    provider.start(device_bus, sink.on_role, sink.on_error)
    with publisher, device_bus:
        assert publisher.wait_connected(10) and device_bus.wait_connected(10)
        yield publisher, device_bus, provider, sink, bundle
        provider.stop()


def test_plan_client_fetches_ignores_repeats_and_older_plans_and_withdraws(
    client_setup: tuple[Bus, Bus, PlanRoleProvider, RoleSink, Bundle], deployment: str
) -> None:
    publisher, _, provider, sink, bundle = client_setup
    topics = Topics(deployment)
    data = bundle.students[1].file.read_bytes()
    publish_model(publisher, data, chunk_size=100)
    role = plan_role(bundle, 1, version=10, deployment=deployment)
    publisher.publish(topics.plan("d0"), role.encode(), qos=1, retain=True)
    assert wait_until(lambda: len(sink.roles) == 1)
    loaded = sink.roles[0]
    assert loaded is not None and loaded.role == role and loaded.model == data

    publisher.publish(topics.plan("d0"), role.encode(), qos=1, retain=True)  # a repeat
    older = plan_role(bundle, 2, version=9, deployment=deployment)
    publisher.publish(topics.plan("d0"), older.encode(), qos=1, retain=True)
    time.sleep(0.5)
    assert len(sink.roles) == 1 and sink.errors == [] and provider.active == role

    publisher.publish(topics.plan("d0"), b"", qos=1, retain=True)
    assert wait_until(lambda: len(sink.roles) == 2)
    assert sink.roles[1] is None and provider.active is None


def test_plan_client_refuses_corrupt_missing_and_oversized_models(
    client_setup: tuple[Bus, Bus, PlanRoleProvider, RoleSink, Bundle], deployment: str
) -> None:
    publisher, _, _, sink, bundle = client_setup
    topics = Topics(deployment)
    publish_model(publisher, bundle.students[0].file.read_bytes(), chunk_size=64, corrupt=2)
    publisher.publish(
        topics.plan("d0"), plan_role(bundle, 0, 11, deployment).encode(), qos=1, retain=True
    )
    assert wait_until(lambda: len(sink.errors) == 1)
    assert "v11" in sink.errors[0] and "sha256 mismatch" in sink.errors[0]

    missing = replace(plan_role(bundle, 0, 12, deployment), model=ModelRef("c" * 64, size=5))
    publisher.publish(topics.plan("d0"), missing.encode(), qos=1, retain=True)
    assert wait_until(lambda: len(sink.errors) == 2, timeout_s=5)
    assert "v12" in sink.errors[1] and "no manifest" in sink.errors[1]

    big = bytes(200_000)
    sha = publish_model(publisher, big, chunk_size=50_000)
    oversized = replace(plan_role(bundle, 0, 13, deployment), model=ModelRef(sha, size=len(big)))
    publisher.publish(topics.plan("d0"), oversized.encode(), qos=1, retain=True)
    assert wait_until(lambda: len(sink.errors) == 3, timeout_s=5)
    assert "over this device's limit" in sink.errors[2]

    publisher.publish(topics.plan("d0"), b"{not json", qos=1, retain=True)
    assert wait_until(lambda: len(sink.errors) == 4, timeout_s=5)
    assert "invalid role" in sink.errors[3]
    assert sink.roles == []


def test_plan_client_uses_its_cache_when_the_broker_has_no_model(
    broker: LocalBroker, deployment: str, bundle3: SyntheticBundle, tmp_path: Path
) -> None:
    bundle = Bundle.load(bundle3.path)
    data = bundle.students[2].file.read_bytes()
    cache = ModelCache(tmp_path / "state")
    cache.put(sha256_hex(data), data)
    sink = RoleSink()
    provider = PlanRoleProvider("d0", cache=cache)
    publisher = make_bus(broker.url, deployment, "publisher", kind="apply")
    device_bus = make_bus(broker.url, deployment, "d0")
    provider.start(device_bus, sink.on_role, sink.on_error)
    with publisher, device_bus:
        assert publisher.wait_connected(10)
        role = plan_role(bundle, 2, version=3, deployment=deployment)
        publisher.publish(Topics(deployment).plan("d0"), role.encode(), qos=1, retain=True)
        assert wait_until(lambda: len(sink.roles) == 1)
        provider.stop()
    loaded = sink.roles[0]
    assert loaded is not None and loaded.model == data and sink.errors == []


# -- real fleets: device subprocesses and the plan apply command ------------------------------


class Fleet:
    """Device subprocesses (``device run`` without a role) and a watcher of the deployment."""

    def __init__(self, broker: LocalBroker, deployment: str, state: Path) -> None:
        self.broker = broker
        self.deployment = deployment
        self.state = state
        self.topics = Topics(deployment)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.inbox = Inbox()
        self.watcher = make_bus(broker.url, deployment, "watcher", kind="monitor")
        for topic_filter in (
            self.topics.all_status,
            self.topics.all_partials,
            f"{self.topics.prefix}/plan/+",
            f"{self.topics.prefix}/models/+",
        ):
            self.watcher.subscribe(topic_filter, self.inbox, qos=1)

    def start(self, *devices: str) -> None:
        for device in devices:
            cmd = [sys.executable, "-m", "mqttinfer.runtime.cli", "device", "run"]
            cmd += ["--id", device, "--broker", self.broker.url, "--deployment", self.deployment]
            cmd += ["--state-dir", str(self.state / device), "--fetch-timeout", "10"]
            cmd += ["--log-level", "WARNING"]
            self.procs[device] = subprocess.Popen(cmd, env=subprocess_env(), stderr=subprocess.PIPE)

    def status(self, device: str) -> Status | None:
        statuses = self.inbox.statuses(device)
        return statuses[-1] if statuses else None

    def wait_status(self, device: str, predicate: object, timeout_s: float = 30) -> Status:
        def check() -> bool:
            status = self.status(device)
            return status is not None and bool(predicate(status))  # type: ignore[operator]

        assert wait_until(check, timeout_s), f"{device}: last status {self.status(device)}"
        status = self.status(device)
        assert status is not None
        return status

    def apply(self, plan: Path, bundle: Path, *extra: str) -> tuple[int, dict[str, object], str]:
        cmd = [sys.executable, "-m", "mqttinfer.runtime.deploy_cli", "plan", "apply", str(plan)]
        cmd += ["--bundle", str(bundle), "--broker", self.broker.url, "--json", *extra]
        done = subprocess.run(
            cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120, check=False
        )
        assert done.stdout, done.stderr
        return done.returncode, json.loads(done.stdout), done.stderr

    def live_messages(self, kind: str, since: int) -> list[str]:
        """Topics of messages of ``kind`` (plan, status...) that arrived live after ``since``."""
        return [
            m.topic
            for m in self.inbox.snapshot()[since:]
            if f"/{kind}/" in m.topic and not m.retain
        ]

    def partials_for(self, frame_id: str) -> dict[str, Partial]:
        out = {}
        for message in self.inbox.snapshot():
            if "/partials/" in message.topic:
                partition, device = message.topic.split("/")[-2:]
                partial = Partial.decode(message.payload, partition=int(partition), device=device)
                if partial.frame == frame_id:
                    out[device] = partial
        return out

    def close(self) -> str:
        for proc in self.procs.values():
            proc.terminate()
        logs = []
        for device, proc in self.procs.items():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            assert proc.stderr is not None
            logs.append(f"--- {device}\n{proc.stderr.read().decode(errors='replace')}")
        self.watcher.stop()
        return "\n".join(logs)


@pytest.fixture
def fleet(broker: LocalBroker, deployment: str, tmp_path: Path) -> Iterator[Fleet]:
    running = Fleet(broker, deployment, tmp_path / "state")
    running.watcher.start()
    assert running.watcher.wait_connected(10)
    yield running
    logs = running.close()
    assert "Traceback" not in logs, logs


def by_device(report: dict[str, object]) -> dict[str, dict[str, object]]:
    devices = report["devices"]
    assert isinstance(devices, list)
    return {d["device"]: d for d in devices}


def serves(version: object, partition: int) -> object:
    def check(status: Status) -> bool:
        role = status.role
        return (
            status.serving == "ready"
            and role is not None
            and (role.plan_version, role.partition) == (version, partition)
        )

    return check


@pytest.mark.slow
@pytest.mark.broker
def test_apply_brings_six_devices_online_and_reapplying_is_a_no_op(
    fleet: Fleet, bundle3: SyntheticBundle, tmp_path: Path
) -> None:
    groups = [["d0", "d1"], ["d2", "d3"], ["d4", "d5"]]
    plan = write_plan(tmp_path / "site.yaml", groups, name="site", deployment=fleet.deployment)
    fleet.start("d0", "d1", "d2", "d3", "d4")  # d5 comes later
    for device in ("d0", "d1", "d2", "d3", "d4"):
        fleet.wait_status(device, lambda s: s.serving == "idle" and s.state == "online")

    code, report, stderr = fleet.apply(plan, bundle3.path, "--timeout", "6", "--chunk-size", "100")
    assert code == 1, stderr
    outcome = by_device(report)
    assert [d for d, r in outcome.items() if r["outcome"] == "ready"] == groups[0] + groups[1] + [
        "d4"
    ]
    assert outcome["d5"]["outcome"] == "waiting" and "no status" in str(outcome["d5"]["detail"])
    assert "d5: waiting: no status" in stderr and "did not ack" in stderr
    version = report["plan_version"]
    assert report["changed"] is True and len(report["models_uploaded"]) == 3  # type: ignore[arg-type]
    manifests = [
        ModelManifest.decode(m.payload) for m in fleet.inbox.on("") if "/models/" in m.topic
    ]
    assert len(manifests) == 3 and all(m.chunks > 1 and m.chunk_size <= 100 for m in manifests)

    # The late device finds its retained role and model by itself.
    fleet.start("d5")
    fleet.wait_status("d5", serves(version, 2))

    # Every device runs its group's student: compare the partials with numpy.
    pixels = random_frames(1)
    frame = Frame(id="check", source="cam", ts=time.time(), tensor=pixels[0], deadline_ms=5000)
    assert fleet.watcher.publish(fleet.topics.frames("cam"), frame.encode(), qos=1)
    assert wait_until(lambda: len(fleet.partials_for("check")) == 6, 15)
    for device, partial in fleet.partials_for("check").items():
        partition = int(device[1]) // 2
        assert partial.partition == partition and partial.plan_version == version
        expected = bundle3.student_features(pixels, partition)[0]
        np.testing.assert_allclose(partial.features, expected, rtol=2e-3, atol=2e-3)

    # Re-applying the same plan publishes nothing and no device reloads.
    mark = len(fleet.inbox.snapshot())
    code, again, stderr = fleet.apply(plan, bundle3.path, "--timeout", "8")
    assert code == 0, stderr
    assert again["changed"] is False and again["plan_version"] == version
    assert again["published"] == [] and again["models_uploaded"] == []
    assert all(r["outcome"] == "ready" for r in by_device(again).values())
    time.sleep(0.5)
    assert fleet.live_messages("plan", mark) == []
    assert fleet.live_messages("models", mark) == []
    assert [t for t in fleet.live_messages("status", mark) if not t.endswith("/plan-apply")] == []


@pytest.mark.slow
@pytest.mark.broker
def test_a_corrupt_model_is_refused_reported_and_repaired_and_withdrawn_devices_go_idle(
    fleet: Fleet, bundle3: SyntheticBundle, tmp_path: Path
) -> None:
    first = write_plan(
        tmp_path / "a.yaml", [["e0"], ["e1"], ["e2", "e3"]], name="a", deployment=fleet.deployment
    )
    fleet.start("e0", "e1", "e2", "e3")
    code, report, stderr = fleet.apply(first, bundle3.path, "--timeout", "30")
    assert code == 0, stderr
    v1 = report["plan_version"]

    # Someone overwrites partition 1's model on the broker with bytes of the right length.
    bundle = Bundle.load(bundle3.path)
    student = bundle.students[1]
    size = student.file.stat().st_size
    fleet.watcher.publish(
        fleet.topics.model_chunk(student.sha256, 0), bytes(size), qos=1, retain=True
    )
    # The next plan moves e0 to partition 1 (not in its cache), swaps e1, drops e3.
    second = write_plan(
        tmp_path / "b.yaml", [["e1"], ["e0"], ["e2"]], name="a", deployment=fleet.deployment
    )
    mark = len(fleet.inbox.snapshot())
    code, report, stderr = fleet.apply(second, bundle3.path, "--timeout", "20")
    assert code == 1
    outcome = by_device(report)
    assert outcome["e0"]["outcome"] == "refused"
    assert "sha256 mismatch" in str(outcome["e0"]["detail"]) and "e0" in stderr
    assert outcome["e1"]["outcome"] == "ready" and outcome["e2"]["outcome"] == "ready"
    assert report["cleared"] == ["e3"]
    v2 = report["plan_version"]
    assert isinstance(v2, int) and isinstance(v1, int) and v2 > v1

    # e0 keeps serving its previous role; e2 kept its student (no reload); e3 goes idle.
    refused = fleet.wait_status("e0", lambda s: s.serving == "error")
    assert refused.role == RoleSummary("g0", 0, "a", v1, bundle.students[0].sha256)
    assert fleet.wait_status("e3", lambda s: s.serving == "idle").role is None
    e2_since = [
        Status.decode(m.payload)
        for m in fleet.inbox.snapshot()[mark:]
        if m.topic == fleet.topics.status("e2")
    ]
    assert [(s.serving, s.role and s.role.plan_version) for s in e2_since] == [("ready", v2)]
    pixels = random_frames(1)
    frame = Frame(id="after-b", source="cam", ts=time.time(), tensor=pixels[0], deadline_ms=5000)
    fleet.watcher.publish(fleet.topics.frames("cam"), frame.encode(), qos=1)
    assert wait_until(lambda: {"e0", "e1", "e2"} <= set(fleet.partials_for("after-b")), 15)
    got = fleet.partials_for("after-b")
    assert "e3" not in got  # unsubscribed from frames
    assert (got["e0"].partition, got["e1"].partition) == (0, 0)

    # --force republishes the model and the roles: e0 retries and gets there.
    code, report, stderr = fleet.apply(second, bundle3.path, "--timeout", "20", "--force")
    assert code == 0, stderr
    assert report["plan_version"] == v2 and len(report["models_uploaded"]) == 3  # type: ignore[arg-type]
    fleet.wait_status("e0", serves(v2, 1))
