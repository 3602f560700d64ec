"""The knowledge pipeline (mqttinfer.train): datasets, models, losses, partition stage, export.

The slow test runs ``mqttinfer train all --preset test`` (5,000 Fashion-MNIST images:
teacher → activations → partition → 4 students → export) and then checks the bundle under
onnxruntime alone, in a subprocess where torch cannot be imported.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mqttinfer.errors import BundleError, ConfigError, DependencyError
from mqttinfer.train.arch import parse_arch, parse_arch_list
from mqttinfer.train.config import PartitionConfig, build_config
from mqttinfer.train.datasets import load_dataset, make_splits

FMNIST = Path("/usr/share/datasets/fashion-mnist")
ROOT = Path(__file__).resolve().parents[1]

needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt install dataset-fashion-mnist)",
)


# ------------------------------------------------------------------ torch-free parts


def test_cli_module_does_not_import_torch() -> None:
    code = "import sys, mqttinfer.train.cli as c; assert c.app; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "False"


def test_missing_torch_is_a_dependency_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from mqttinfer.train import deps

    real = importlib.util.find_spec
    monkeypatch.setattr(
        deps.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "torch" else real(name, *a),
    )
    with pytest.raises(DependencyError, match=r"pip install 'mqttinfer\[train\]'"):
        deps.require_train_extra()


def test_arch_names() -> None:
    assert parse_arch("WRN-16-2").name == "wrn-16-2"
    assert parse_arch("wrn-10-0.5").width == 0.5
    assert parse_arch("mbv2").name == "mobilenetv2"
    assert parse_arch("mobilenetv2-0.5").name == "mobilenetv2-0.5"
    assert [a.name for a in parse_arch_list("wrn-16-1", 3)] == ["wrn-16-1"] * 3
    for bad in ("wrn-15-1", "resnet18", "wrn-16-0"):
        with pytest.raises(ConfigError, match="fix:"):
            parse_arch(bad)
    with pytest.raises(ConfigError, match="exactly 3"):
        parse_arch_list("wrn-16-1,wrn-10-1", 3)


def test_presets_and_overrides() -> None:
    demo = build_config("demo", {})
    assert demo.partition.k == 3 and demo.export.name == "fmnist-demo"
    cfg = build_config("test", {"students": {"beta": 0.0, "epochs": None}})
    assert cfg.students.beta == 0.0 and cfg.students.epochs == 5
    with pytest.raises(ConfigError, match="--preset"):
        build_config("nope", {})
    with pytest.raises(ConfigError, match="--alpha"):
        build_config(None, {"students": {"alpha": 2.0}})


def test_missing_datasets_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="apt install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path)
    with pytest.raises(ConfigError, match=r"cifar-10-python\.tar\.gz"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(ConfigError, match="--data-dir"):
        load_dataset("imagefolder", tmp_path / "absent")
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("mnist-3d")


def test_digits_needs_sklearn_or_loads() -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        with pytest.raises(DependencyError, match="pip install scikit-learn"):
            load_dataset("digits")
        return
    data = load_dataset("digits")
    assert data.shape == (1, 8, 8) and data.train.images.dtype == np.uint8


def _write_cifar_pickles(root: Path) -> None:
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", 6) for i in range(1, 6)), ("test_batch", 4)]:
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, n)),
        }
        (root / name).write_bytes(pickle.dumps(batch))
    meta = {b"label_names": [c.encode() for c in "abcdefghij"]}
    (root / "batches.meta").write_bytes(pickle.dumps(meta))


def test_cifar10_pickle_layout(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _write_cifar_pickles(folder)
    data = load_dataset("cifar10", tmp_path)
    assert data.shape == (3, 32, 32)
    assert len(data.train) == 30 and len(data.test) == 4
    assert data.classes[0] == "a"


def test_image_folder_layouts(tmp_path: Path) -> None:
    image_mod = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    for split, count in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
                image_mod.fromarray(pixels).save(folder / f"{i}.png")
    for name in ("imagefolder", "cifar10"):
        data = load_dataset(name, tmp_path)
        assert data.classes == ("cat", "dog")
        assert data.train.images.shape == (6, 3, 10, 12)
        assert list(data.test.labels) == [0, 0, 1, 1]


@needs_fmnist
def test_fashion_mnist_split_is_seeded_and_disjoint() -> None:
    data = load_dataset("fashion-mnist")
    assert data.shape == (1, 28, 28) and len(data.train) == 60000 and len(data.test) == 10000
    a = make_splits(data, val_fraction=0.1, seed=3, limit_train=2000, limit_test=100)
    b = make_splits(data, val_fraction=0.1, seed=3, limit_train=2000, limit_test=100)
    assert len(a.train) == 1800 and len(a.val) == 200 and len(a.test) == 100
    assert np.array_equal(a.val.images, b.val.images)
    assert np.array_equal(a.test.images, data.test.images[:100])
    train_keys = {img.tobytes() for img in a.train.images}
    assert not any(img.tobytes() in train_keys for img in a.val.images[:50])


def test_louvain_stage_drops_p0_only_when_accuracy_allows() -> None:
    from mqttinfer.train.partitioning import plan_partitions

    rng = np.random.default_rng(0)
    acts = rng.random((200, 24)).astype(np.float32)
    acts[:, [3, 7, 11]] = 0.0  # dead filters: NoNN's g0
    config = PartitionConfig(k=3, method="louvain")
    cheap = plan_partitions(acts, config, lambda dropped: 0.9)
    assert cheap["removed"] == [3, 7, 11]
    assert sum(cheap["sizes"]) == 21 and len(cheap["partitions"]) == 3
    costly = plan_partitions(acts, config, lambda dropped: 0.9 - 0.1 * bool(dropped))
    assert costly["removed"] == [] and sum(costly["sizes"]) == 24
    assert costly["p0_check"]["removed"] is False


def test_partitions_and_students_from_a_planner_plan(tmp_path: Path) -> None:
    from mqttinfer.train.partitioning import partition_from_plan

    plan = ROOT / "plans" / "example.yaml"
    if not plan.is_file():
        pytest.skip("plans/example.yaml not in this checkout")
    document, archs = partition_from_plan(plan, 64)
    assert len(document["partitions"]) == len(archs) == 3
    assert sorted(f for p in document["partitions"] for f in p) == list(range(64))
    assert document["student_archs"] == archs
    with pytest.raises(ConfigError, match="--channels"):
        partition_from_plan(plan, 128)


# ------------------------------------------------------------------ torch parts


@pytest.mark.train
def test_models_shapes_and_final_channels() -> None:
    torch = pytest.importorskip("torch")
    from mqttinfer.train.models import Classifier, Student, count_cost

    teacher = Classifier(parse_arch("wrn-16-2"), 1, 10)
    x = torch.zeros(2, 1, 28, 28)
    assert teacher.final_channels == 128
    assert tuple(teacher.features(x).shape) == (2, 128, 7, 7)
    assert tuple(teacher(x).shape) == (2, 10)
    mbv2 = Classifier(parse_arch("mobilenetv2-0.5"), 3, 10)
    assert tuple(mbv2(torch.zeros(1, 3, 32, 32)).shape) == (1, 10)
    student = Student(parse_arch("wrn-10-0.5"), 1, 21)
    assert tuple(student(x).shape) == (2, 21, 7, 7)
    cost = count_cost(teacher, (1, 28, 28))
    assert cost.params == sum(p.numel() for p in teacher.parameters())
    assert cost.macs > 70_000_000
    small = count_cost(Student(parse_arch("wrn-16-1"), 1, 32), (1, 28, 28))
    assert cost.macs >= 3 * small.macs  # the full benchmark's ≥3× MAC reduction


@pytest.mark.train
@pytest.mark.parametrize(
    ("name", "shape", "out"),
    [
        ("wrn-16-1", (1, 28, 28), 32),
        ("wrn-10-0.5", (1, 28, 28), 21),
        ("wrn-16-2", (3, 32, 32), 64),
        ("mobilenetv2-0.5", (3, 32, 32), 16),
    ],
)
def test_counts_match_planner_catalog(name: str, shape: tuple[int, int, int], out: int) -> None:
    pytest.importorskip("torch")
    catalog = pytest.importorskip("mqttinfer.planner.catalog")
    from mqttinfer.train.models import Student, count_cost

    ours = count_cost(Student(parse_arch(name), shape[0], out), shape)
    theirs = catalog.student_cost(name, shape, out)
    assert (ours.params, ours.macs) == (theirs.params, theirs.macs)


@pytest.mark.train
def test_augmentation_schedule_and_losses() -> None:
    torch = pytest.importorskip("torch")
    from mqttinfer.train.engine import augment_batch, lr_at
    from mqttinfer.train.students import at_loss, kd_loss, partition_mask

    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    out = augment_batch(images, pad=2, flip=True, generator=gen)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(augment_batch(images, pad=0, flip=False, generator=gen), images)
    assert lr_at(0, 100, 0.1, 10) == pytest.approx(0.01)
    assert lr_at(10, 100, 0.1, 10) == pytest.approx(0.1)
    assert lr_at(100, 100, 0.1, 10) == pytest.approx(0.0)
    maps = torch.rand(4, 5, 7, 7)
    assert float(at_loss(3.0 * maps, maps, "map")) == pytest.approx(0.0, abs=1e-6)
    assert float(at_loss(torch.rand(4, 5, 7, 7), maps, "pooled")) > 0.0
    logits = torch.randn(4, 10)
    labels = torch.tensor([0, 1, 2, 3])
    assert float(kd_loss(logits, logits + 1.0, labels, 0.9, 4.0)) >= 0.0
    mask = partition_mask(1000, [3, 4, 5], 0.9, torch.Generator().manual_seed(1))
    assert mask.shape == (1000, 12)
    assert bool((mask.sum(dim=1) > 0).all())  # never every partition at once


@pytest.mark.train
@needs_fmnist
def test_teacher_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from mqttinfer.train.config import DataConfig, TeacherConfig
    from mqttinfer.train.engine import progress_bar
    from mqttinfer.train.teacher import train_teacher

    data = DataConfig(limit_train=300, limit_test=50)
    first = TeacherConfig(arch="wrn-10-0.25", epochs=1, batch_size=64)
    with progress_bar(False) as bar:
        state = train_teacher(tmp_path, data, first, progress=bar)
        assert state["epoch"] == 1 and state["complete"]
        # A different configuration over the same run directory is refused ...
        with pytest.raises(ConfigError, match="--no-resume"):
            train_teacher(
                tmp_path,
                data,
                TeacherConfig(arch="wrn-10-0.25", epochs=2, batch_size=64),
                progress=bar,
            )
        # ... and an interrupted run (epoch 1 of 2 saved) continues from where it stopped.
        import torch

        state["teacher"]["epochs"] = 2
        state["complete"] = False
        torch.save(state, tmp_path / "teacher.pt")
        second = TeacherConfig(arch="wrn-10-0.25", epochs=2, batch_size=64)
        resumed = train_teacher(tmp_path, data, second, progress=bar)
    assert [h["epoch"] for h in resumed["history"]] == [0, 1]
    assert resumed["complete"] and resumed["teacher"]["epochs"] == 2


# ------------------------------------------------------------------ the whole pipeline


@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("torch")
    from typer.testing import CliRunner

    from mqttinfer.train.cli import app

    run_dir = tmp_path_factory.mktemp("run")
    out = run_dir / "bundle"
    started = time.perf_counter()
    result = CliRunner().invoke(
        app,
        ["all", "--preset", "test", "--run-dir", str(run_dir), "--out", str(out), "--no-progress"],
    )
    elapsed = time.perf_counter() - started
    if result.exception is not None:
        raise result.exception
    assert result.exit_code == 0, result.output
    return {
        "run_dir": run_dir,
        "out": out,
        "seconds": elapsed,
        "meta": json.loads((out / "bundle.json").read_text()),
    }


@pytest.mark.slow
@pytest.mark.train
@needs_fmnist
def test_train_all_on_a_5000_image_subset(trained_bundle: dict[str, Any]) -> None:
    meta, out = trained_bundle["meta"], trained_bundle["out"]
    assert trained_bundle["seconds"] < 180, f"took {trained_bundle['seconds']:.0f} s"
    assert meta["dataset"]["train_size"] + meta["dataset"]["val_size"] == 5000
    assert len(meta["students"]) == 4 and len(meta["partitions"]) == 4
    for name in (
        "bundle.json",
        "head.npz",
        "head-plain.npz",
        "head.onnx",
        "teacher.onnx",
        "activations.npy",
        *(f"student-{k}.onnx" for k in range(4)),
    ):
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if p.suffix == ".data"]  # no external ONNX data
    acc = meta["accuracy"]
    assert acc["teacher"] > 0.6 and acc["ensemble"] > 0.6
    assert abs(acc["ensemble_onnx"] - acc["ensemble"]) <= 0.002
    diffs = meta["training"]["export"]["max_abs_diff"]
    assert max(diffs.values()) <= 1e-3
    acts = np.load(out / "activations.npy")
    assert acts.dtype == np.float32 and acts.shape == (
        meta["dataset"]["val_size"],
        meta["teacher"]["final_channels"],
    )


@pytest.mark.slow
@pytest.mark.train
@needs_fmnist
def test_ncut_partitions_of_a_real_teacher_are_near_equal(trained_bundle: dict[str, Any]) -> None:
    from mqttinfer import partition as part_lib

    meta = trained_bundle["meta"]
    channels = meta["teacher"]["final_channels"]
    sizes = [len(p["filters"]) for p in meta["partitions"]]
    assert sorted(f for p in meta["partitions"] for f in p["filters"]) == list(range(channels))
    equal = channels / len(sizes)
    assert all(abs(size - equal) <= 0.25 * equal for size in sizes), sizes
    # The same holds when the partitioner is called directly on the saved activations.
    weights = part_lib.activation_network(np.load(trained_bundle["out"] / "activations.npy"))
    direct = part_lib.normalized_cut(weights, 4, seed=0, balance=True)
    assert all(abs(len(p) - equal) <= 0.25 * equal for p in direct)


@pytest.mark.slow
@pytest.mark.train
@needs_fmnist
def test_bundle_runs_under_onnxruntime_alone(trained_bundle: dict[str, Any]) -> None:
    out = trained_bundle["out"]
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["torch"] = None  # any torch import now fails
        from mqttinfer.datasets import load_fashion_mnist
        from mqttinfer.train.verify import OnnxEnsemble, check_bundle
        check_bundle({str(out)!r})
        frames = load_fashion_mnist(split="test")
        ens = OnnxEnsemble({str(out)!r})
        n = 1000
        print(json.dumps({{"acc": ens.accuracy(frames.x[:n], frames.y[:n]),
                          "missing0": ens.accuracy(frames.x[:n], frames.y[:n], missing=[0])}}))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    acc = trained_bundle["meta"]["accuracy"]
    assert result["acc"] == pytest.approx(acc["first_1000"], abs=1e-9)
    assert abs(result["acc"] - acc["ensemble"]) <= 0.002  # same accuracy as in torch
    assert result["missing0"] == pytest.approx(acc["missing_one"]["0"], abs=0.002)


@pytest.mark.slow
@pytest.mark.train
@needs_fmnist
def test_bundle_loads_in_the_runtime_and_rejects_tampering(
    trained_bundle: dict[str, Any], tmp_path: Path
) -> None:
    import shutil

    from mqttinfer.bundle import Bundle
    from mqttinfer.train.verify import check_bundle

    out = trained_bundle["out"]
    bundle = Bundle.load(out)
    bundle.verify()
    assert bundle.num_partitions == 4
    assert bundle.head.in_features == sum(bundle.partition_sizes())
    assert bundle.load_head("plain").num_classes == 10
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = bytearray((copy / "student-1.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "student-1.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        check_bundle(copy)


@pytest.mark.slow
@pytest.mark.train
@needs_fmnist
def test_dropout_head_degrades_more_gracefully(trained_bundle: dict[str, Any]) -> None:
    acc = trained_bundle["meta"]["accuracy"]
    dropout = np.mean(list(acc["missing_one"].values()))
    plain = np.mean(list(acc["missing_one_plain_head"].values()))
    assert dropout >= plain - 0.02, (dropout, plain)
    assert trained_bundle["meta"]["head"]["partition_dropout"] == 0.25
