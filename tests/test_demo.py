"""``mqttinfer demo``: the per-phase tally, the frames it streams, and the whole demo end to end
(real broker, device and aggregator processes, kill -9, restart, SIGINT cleanup)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from mqttinfer import demo_broker
from mqttinfer.bundle import Bundle, demo_bundle_path
from mqttinfer.demo import (
    demo_layout,
    interrupt_on_signals,
    load_demo_frames,
    sample_path,
    victim_group,
)
from mqttinfer.demo_tally import Answer, PhaseTally
from mqttinfer.errors import ConfigError, DependencyError
from tests.support.synthetic import SyntheticBundle, build_synthetic_bundle

ROOT = Path(__file__).resolve().parents[1]
E2E_FRAMES = 150


# --------------------------------------------------------------------------- the tally
def answer(frame_id: str, *, correct: bool = True, missing: tuple[int, ...] = ()) -> Answer:
    reason = "dead" if missing else "complete"
    return Answer(frame_id, correct, bool(missing), missing, reason, latency_ms=10.0)


def test_tally_counts_results_degraded_and_accuracy() -> None:
    tally = PhaseTally("p", timeout_s=5.0)
    for index in range(4):
        tally.sent(f"f{index}", now=float(index))
    assert tally.in_flight == 4
    assert tally.answered(answer("f0"), now=4.0)
    assert tally.answered(answer("f1", correct=False), now=4.0)
    assert tally.answered(answer("f2", missing=(1,)), now=5.0)
    assert not tally.answered(answer("other"), now=5.0)  # not this phase's frame
    assert not tally.answered(answer("f0"), now=5.0)  # a second result for it
    summary = tally.summary()
    assert (summary.frames, summary.results, summary.complete, summary.degraded) == (4, 3, 2, 1)
    assert (summary.in_flight, summary.lost, summary.missing_partitions) == (1, 0, (1,))
    assert summary.accuracy == pytest.approx(2 / 3)
    assert summary.reasons == {"complete": 2, "dead": 1}
    assert summary.duration_s == 5.0  # first send to last result


def test_tally_expires_lost_frames_and_counts_late_results() -> None:
    tally = PhaseTally("p", timeout_s=2.0)
    tally.sent("a", now=0.0)
    tally.sent("b", now=1.0)
    assert tally.expire(now=2.5) == 1  # a is lost, b still has time
    assert tally.oldest_sent() == 1.0
    assert tally.answered(answer("a"), now=3.0)  # late: not a result of the phase
    tally.sent("c", now=3.0)
    tally.unsent("c")  # the broker did not take it
    summary = tally.summary()
    assert (summary.results, summary.lost, summary.late, summary.in_flight) == (0, 2, 1, 1)
    assert summary.accuracy is None and summary.p50_ms is None


def test_tally_latency_quantiles() -> None:
    tally = PhaseTally("p", timeout_s=9.0)
    for index in range(100):
        tally.sent(str(index), now=0.0)
        tally.answered(Answer(str(index), None, False, (), "complete", float(index + 1)), 1.0)
    summary = tally.summary()
    assert summary.p50_ms == pytest.approx(50.5)
    assert summary.p99_ms == pytest.approx(99.01)
    assert summary.labelled == 0 and summary.accuracy is None
    assert summary.as_json()["p99_ms"] == 99.01


# --------------------------------------------------------------------------- layout, frames
def test_layout_is_two_replicas_per_partition_and_the_middle_group_is_killed() -> None:
    groups = demo_layout(3)
    assert [(g.id, g.partition, g.devices) for g in groups] == [
        ("g0", 0, ("g0-a", "g0-b")),
        ("g1", 1, ("g1-a", "g1-b")),
        ("g2", 2, ("g2-a", "g2-b")),
    ]
    assert victim_group(groups).id == "g1"


def test_frames_fall_back_to_the_shipped_sample(tmp_path: Path) -> None:
    frames = load_demo_frames(1000, root=tmp_path / "no-debian-package")
    assert frames.kind == "sample"
    assert frames.x.shape == (1000, 1, 28, 28) and frames.x.dtype == np.uint8
    assert frames.y.shape == (1000,) and set(np.unique(frames.y)) == set(range(10))
    assert sample_path().stat().st_size < 1_000_000
    with pytest.raises(ConfigError, match="--frames 1001"):
        load_demo_frames(1001, root=tmp_path / "no-debian-package")


def test_sample_is_the_start_of_the_debian_test_set() -> None:
    debian = load_demo_frames(1000)
    if debian.kind != "debian":
        pytest.skip("dataset-fashion-mnist is not installed here")
    sample = load_demo_frames(1000, root=Path("/nonexistent"))
    np.testing.assert_array_equal(sample.x, debian.x)
    np.testing.assert_array_equal(sample.y, debian.y)


def test_broker_choice_prefers_mosquitto_then_amqtt_then_says_run_setup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(demo_broker, "find_mosquitto", lambda: "/usr/sbin/mosquitto")
    assert demo_broker.choose_broker().kind == "mosquitto"
    monkeypatch.setattr(demo_broker, "find_mosquitto", lambda: None)
    monkeypatch.setattr(demo_broker, "amqtt_importable", lambda: True)
    choice = demo_broker.choose_broker()
    assert choice.kind == "amqtt"
    assert "3.1.1" in choice.note and "hung client" in choice.note
    monkeypatch.setattr(demo_broker, "amqtt_importable", lambda: False)
    with pytest.raises(DependencyError, match=r"run scripts/setup\.sh"):
        demo_broker.choose_broker()


# --------------------------------------------------------------------------- end to end
def fp16_accuracy(
    bundle: SyntheticBundle,
    x: npt.NDArray[np.uint8],
    y: npt.NDArray[np.int64],
    missing: tuple[int, ...] = (),
) -> float:
    """The ensemble's accuracy as the cluster computes it: fp16 features on the wire."""
    features = []
    for k in range(bundle.num_partitions):
        pooled = bundle.student_features(x, k).astype(np.float16).astype(np.float32)
        features.append(np.zeros_like(pooled) if k in missing else pooled)
    logits = np.concatenate(features, axis=1) @ bundle.head_weight.T + bundle.head_bias
    return float((logits.argmax(axis=1) == y).mean())


@pytest.fixture(scope="module")
def fmnist_bundle(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
    """K=3 random conv students on 1x28x28 and a least-squares head, fitted on test images
    150-999 (not on the ones the end-to-end test streams); accuracy.first_1000 recorded."""
    root = Path(tmp_path_factory.mktemp("fmnist-k3"))
    bundle = build_synthetic_bundle(
        root, partition_sizes=(8, 8, 8), shape=(1, 28, 28), num_classes=10, seed=3, name="k3"
    )
    frames = load_demo_frames(1000)
    fit_x, fit_y = frames.x[E2E_FRAMES:], frames.y[E2E_FRAMES:]
    features = np.concatenate(
        [bundle.student_features(fit_x, k) for k in range(bundle.num_partitions)], axis=1
    )
    design = np.concatenate([features, np.ones((len(features), 1), np.float32)], axis=1)
    target = np.eye(10, dtype=np.float32)[fit_y]
    solution = np.linalg.solve(
        design.T @ design + 1e-2 * np.eye(design.shape[1]), design.T @ target
    )
    bundle.head_weight = np.ascontiguousarray(solution[:-1].T, dtype=np.float32)
    bundle.head_bias = solution[-1].astype(np.float32)
    np.savez(root / "head.npz", weight=bundle.head_weight, bias=bundle.head_bias)
    meta = json.loads((root / "bundle.json").read_text())
    meta["accuracy"] = {"first_1000": fp16_accuracy(bundle, frames.x, frames.y)}
    (root / "bundle.json").write_text(json.dumps(meta))
    return bundle


def demo_argv(bundle: SyntheticBundle, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mqttinfer", "demo", "--bundle", str(bundle.path), *extra]


def child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="120")


@pytest.mark.slow
@pytest.mark.broker
def test_demo_json_end_to_end(fmnist_bundle: SyntheticBundle) -> None:
    done = subprocess.run(
        demo_argv(fmnist_bundle, "--frames", str(E2E_FRAMES), "--rate", "0", "--json"),
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        env=child_env(),
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)  # stdout is the JSON and nothing else
    phases = report["phases"]
    assert list(phases) == ["intact", "replica_killed", "group_killed", "recovered"]
    for name, phase in phases.items():
        assert (phase["frames"], phase["results"], phase["lost"]) == (E2E_FRAMES,) * 2 + (0,), name
        assert phase["p50_ms"] is not None and phase["p99_ms"] >= phase["p50_ms"]

    frames = load_demo_frames(E2E_FRAMES)
    intact = fp16_accuracy(fmnist_bundle, frames.x, frames.y)
    without_g1 = fp16_accuracy(fmnist_bundle, frames.x, frames.y, missing=(1,))
    for name in ("intact", "replica_killed", "recovered"):
        assert phases[name]["degraded"] == 0, name
        assert abs(phases[name]["accuracy"] - intact) <= 0.01, (name, intact)
    lost_group = phases["group_killed"]
    assert lost_group["degraded"] == E2E_FRAMES and lost_group["missing_partitions"] == [1]
    # Partition 1 zero-filled: exactly the ensemble without it.
    assert abs(lost_group["accuracy"] - without_g1) <= 0.01, without_g1
    recorded = json.loads((fmnist_bundle.path / "bundle.json").read_text())["accuracy"]
    assert report["bundle"]["recorded_accuracy"] == recorded["first_1000"]
    assert report["killed_group"] == {"id": "g1", "partition": 1}
    assert report["checks"]["accuracy_matches_bundle"] is None  # 150 frames, not the first 1000
    assert report["ok"] is True
    assert "phase group_killed" in done.stderr  # progress lines go to stderr


@pytest.mark.slow
@pytest.mark.broker
def test_demo_with_the_shipped_bundle_keeps_its_promises() -> None:
    """The done-when of the demo, on the shipped bundle and the first 1000 test images."""
    shipped = demo_bundle_path()
    if not (shipped / "bundle.json").is_file():
        pytest.skip("the shipped demo bundle is not built here")
    recorded = Bundle.load(shipped).accuracy["first_1000"]
    done = subprocess.run(
        [sys.executable, "-m", "mqttinfer", "demo", "--json", "--rate", "0"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(),
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    phases = report["phases"]
    assert all(phase["lost"] == 0 and phase["results"] == 1000 for phase in phases.values())
    for name in ("intact", "replica_killed"):
        assert phases[name]["degraded"] == 0, name
        assert abs(phases[name]["accuracy"] - recorded) <= 0.01, (name, recorded)
    assert phases["group_killed"]["degraded"] == 1000
    assert report["bundle"]["recorded_accuracy"] == recorded
    assert report["checks"]["accuracy_matches_bundle"] is True and report["ok"] is True


def _children(pid: int) -> dict[int, str]:
    """Direct children of ``pid``: their pid and start time (to tell a reused pid apart)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found[int(entry.name)] = fields[19]
    return found


def _still_running(pid: int, started: str) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == started and fields[0] != "Z"


@contextlib.contextmanager
def sigint_disposition(handler: Any) -> Iterator[None]:
    """Set this process's SIGINT handler for a child to inherit, then put it back.

    A child inherits SIG_IGN as it is, and any handler as SIG_DFL (exec resets handlers).
    Without this, the demo's SIGINT behaviour would depend on how pytest itself was started:
    a non-interactive shell starts background jobs with SIGINT ignored, and then so is the
    demo's (it honours that, as Python does).
    """
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def start_demo(bundle: SyntheticBundle, *, sigint: Any) -> subprocess.Popen[str]:
    with sigint_disposition(sigint):
        return subprocess.Popen(
            demo_argv(bundle, "--frames", "1000", "--rate", "50", "--json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
            cwd=ROOT,
        )


@pytest.fixture
def demo_process(fmnist_bundle: SyntheticBundle) -> Iterator[subprocess.Popen[str]]:
    proc = start_demo(fmnist_bundle, sigint=signal.default_int_handler)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.broker
def test_sigint_stops_every_process_the_demo_started(
    demo_process: subprocess.Popen[str],
) -> None:
    lines = interrupt_while_streaming(demo_process, signal.SIGINT)
    assert not any("SIGINT is ignored" in line for line in lines), "".join(lines)[-2000:]


@pytest.mark.slow
@pytest.mark.broker
def test_a_demo_started_with_sigint_ignored_says_so_and_stops_on_sigterm(
    fmnist_bundle: SyntheticBundle,
) -> None:
    proc = start_demo(fmnist_bundle, sigint=signal.SIG_IGN)
    try:
        lines = interrupt_while_streaming(proc, signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    warning = [line for line in lines if "SIGINT is ignored" in line]
    assert warning and f"kill -TERM {proc.pid}" in warning[0], "".join(lines)[-2000:]


def interrupt_while_streaming(proc: subprocess.Popen[str], sig: signal.Signals) -> list[str]:
    """Send ``sig`` once the demo streams; assert it exits 130 leaving none of its children."""
    lines: list[str] = []
    streaming = threading.Event()

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "phase intact" in line:
                streaming.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    assert streaming.wait(120), "".join(lines)[-3000:]
    time.sleep(1.0)  # frames in flight
    children = _children(proc.pid)
    # mosquitto and its orphan guard, six devices and the aggregator, all started by the demo.
    assert len(children) == 9, children
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == 130, "".join(lines)[-3000:]
    reader.join(timeout=5)
    left = [pid for pid, started in children.items() if _still_running(pid, started)]
    assert left == [], f"still running after {sig.name}: {left}"
    assert any("interrupted" in line for line in lines), "".join(lines)[-2000:]
    return lines


def test_interrupt_on_signals_leaves_an_ignored_sighup_ignored() -> None:
    with sigint_disposition(signal.default_int_handler):
        previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            with interrupt_on_signals():
                assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # nohup
                assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        finally:
            signal.signal(signal.SIGHUP, previous)
