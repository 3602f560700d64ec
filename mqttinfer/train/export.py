"""Stage 5: export the bundle (single-file ONNX students, heads, bundle.json) and check it.

Every ONNX file is compared with its torch module on real test images at export time; a max
abs difference above ``atol`` raises :class:`~mqttinfer.errors.BundleError`. The bundle's
ensemble accuracy is then measured twice — in torch and under onnxruntime alone — and both
numbers go into ``bundle.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import io
import json
import logging
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mqttinfer.bundle import sha256_file
from mqttinfer.errors import BundleError
from mqttinfer.train.activations import ACTIVATIONS_FILE
from mqttinfer.train.config import ExportConfig
from mqttinfer.train.models import Classifier, Student, StudentNetwork, count_cost
from mqttinfer.train.students import head_metrics, network_from_checkpoint, pooled_features
from mqttinfer.train.teacher import DataContext, build_teacher, data_from_checkpoint
from mqttinfer.train.verify import OnnxEnsemble, check_bundle, ort_session

log = logging.getLogger(__name__)

OPSET = 18
FIRST_N = 1000


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter prints progress and warnings; keep them out of our output."""
    loggers = [
        logging.getLogger(name)
        for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(
    module: nn.Module, example: Tensor, path: Path, *, input_name: str, output_name: str
) -> None:
    """Export ``module`` to ONE self-contained ONNX file (opset 18, dynamic batch)."""
    module.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    before = set(path.parent.iterdir())
    batch = torch.export.Dim("batch", min=1)
    with _quiet_exporter():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=[output_name],
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    extra = set(path.parent.iterdir()) - before - {path}
    if extra:
        raise BundleError(
            f"the exporter wrote extra files {sorted(p.name for p in extra)}",
            source=str(path),
            fix="export must produce a single ONNX file",
        )


def check_onnx(module: nn.Module, example: Tensor, path: Path, *, atol: float) -> float:
    """Max abs difference between onnxruntime and torch on ``example``.

    Raises :class:`BundleError` when it exceeds ``atol`` × max(1, max |torch output|): float32
    rounding grows with the magnitude of the outputs, a wrong graph does not stay that small.
    """
    with torch.no_grad():
        expected = module(example).numpy()
    session = ort_session(path, threads=2)
    got = session.run(None, {session.get_inputs()[0].name: example.numpy()})[0]
    if got.shape != expected.shape:
        raise BundleError(
            f"ONNX output shape {got.shape} != torch {expected.shape}",
            source=str(path),
            fix="report this exporter bug",
        )
    diff = float(np.abs(got - expected).max())
    allowed = atol * max(1.0, float(np.abs(expected).max()))
    if not diff <= allowed:
        raise BundleError(
            f"ONNX output differs from torch by {diff:.3g} (> {allowed:.3g})",
            source=str(path),
            fix="check the exporter / opset, or raise --atol",
        )
    log.info("%s: max |onnx - torch| = %.3g", path.name, diff)
    return diff


class _Head(nn.Module):
    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        self.linear.load_state_dict({"weight": weight, "bias": bias})

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.linear(x)
        return out


def _save_head(path: Path, head: dict[str, Any]) -> None:
    np.savez(
        path,
        weight=head["weight"].numpy().astype(np.float32),
        bias=head["bias"].numpy().astype(np.float32),
    )


def _examples(ctx: DataContext, count: int = 64) -> Tensor:
    images = torch.from_numpy(ctx.splits.test.images[:count])
    return ctx.normalize(images)


@dataclasses.dataclass
class _Parts:
    teacher: Classifier
    net: StudentNetwork
    ctx: DataContext


def export_bundle(
    out_dir: Path,
    run_dir: Path,
    *,
    teacher_state: dict[str, Any],
    partition_doc: dict[str, Any],
    students_state: dict[str, Any],
    config: ExportConfig,
    training: dict[str, Any] | None = None,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Write the bundle into ``out_dir`` (replacing its bundle files) and return bundle.json."""
    parts = _Parts(
        build_teacher(teacher_state),
        network_from_checkpoint(students_state, teacher_state),
        data_from_checkpoint(teacher_state, data_dir),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():
        if old.is_file() and (old.suffix in {".onnx", ".npz", ".npy"} or old.name == "bundle.json"):
            old.unlink()
    checks, students = _export_students(out_dir, parts, config)
    heads = students_state["heads"]
    _save_head(out_dir / "head.npz", heads["dropout"])
    _save_head(out_dir / "head-plain.npz", heads["plain"])
    head_module = _Head(heads["dropout"]["weight"], heads["dropout"]["bias"])
    example_feats = parts.net.pooled(_examples(parts.ctx)).detach()
    export_onnx(
        head_module,
        example_feats,
        out_dir / "head.onnx",
        input_name="features",
        output_name="logits",
    )
    checks["head.onnx"] = check_onnx(
        head_module, example_feats, out_dir / "head.onnx", atol=config.atol
    )
    teacher_entry = _export_teacher(out_dir, parts, teacher_state, config, checks)
    activations = None
    if config.include_activations and (run_dir / ACTIVATIONS_FILE).is_file():
        shutil.copyfile(run_dir / ACTIVATIONS_FILE, out_dir / ACTIVATIONS_FILE)
        activations = {
            "file": ACTIVATIONS_FILE,
            "images": int(np.load(out_dir / ACTIVATIONS_FILE, mmap_mode="r").shape[0]),
        }
    accuracy = _torch_accuracy(parts, heads, teacher_state)
    meta: dict[str, Any] = {
        "format": "mqttinfer-bundle",
        "version": 1,
        "name": config.name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset": {
            k: v
            for k, v in teacher_state["dataset"].items()
            if k in ("name", "classes", "train_size", "val_size", "test_size")
        },
        "input": {
            "shape": teacher_state["dataset"]["shape"],
            "dtype": "uint8",
            "scale": 1.0 / 255.0,
            "mean": teacher_state["dataset"]["mean"],
            "std": teacher_state["dataset"]["std"],
        },
        "teacher": teacher_entry,
        "partitions": [{"id": i, "filters": p} for i, p in enumerate(students_state["partitions"])],
        "students": students,
        "head": {
            "file": "head.npz",
            "plain": "head-plain.npz",
            "onnx": "head.onnx",
            "in_features": sum(parts.net.sizes),
            "num_classes": len(teacher_state["dataset"]["classes"]),
            "partition_dropout": float(heads["dropout"]["dropout"]),
        },
        "accuracy": accuracy,
        "activations": activations,
        "training": _training_record(
            teacher_state=teacher_state,
            partition_doc=partition_doc,
            students_state=students_state,
            config=config,
            checks=checks,
            extra=training,
        ),
    }
    _write_meta(out_dir, meta)
    _onnx_accuracy(out_dir, meta, parts.ctx)
    _enforce_budget(out_dir, meta, config)
    check = check_bundle(out_dir)
    log.info("bundle %s: %d files, %.2f MB", out_dir, len(check.files), check.total_bytes / 1e6)
    return meta


def _export_students(
    out_dir: Path, parts: _Parts, config: ExportConfig
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    example = _examples(parts.ctx)
    checks: dict[str, float] = {}
    entries: list[dict[str, Any]] = []
    for k, student in enumerate(parts.net.students):
        assert isinstance(student, Student)
        path = out_dir / f"student-{k}.onnx"
        export_onnx(student, example, path, input_name="input", output_name="features")
        checks[path.name] = check_onnx(student, example, path, atol=config.atol)
        cost = count_cost(student, parts.ctx.splits.shape)
        entries.append(
            {
                "partition": k,
                "arch": student.spec.name,
                "file": path.name,
                "sha256": sha256_file(path),
                "params": cost.params,
                "macs": cost.macs,
                "output_channels": parts.net.sizes[k],
            }
        )
    return checks, entries


def _export_teacher(
    out_dir: Path,
    parts: _Parts,
    state: dict[str, Any],
    config: ExportConfig,
    checks: dict[str, float],
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "arch": parts.teacher.spec.name,
        "params": int(state["params"]),
        "macs": int(state["macs"]),
        "final_channels": int(state["final_channels"]),
        "accuracy": float(state["test_accuracy"]),
        "file": None,
        "sha256": None,
    }
    if config.include_teacher:
        path = out_dir / "teacher.onnx"
        example = _examples(parts.ctx)
        export_onnx(parts.teacher, example, path, input_name="input", output_name="logits")
        checks[path.name] = check_onnx(parts.teacher, example, path, atol=config.atol)
        entry.update(file=path.name, sha256=sha256_file(path))
    return entry


def _torch_accuracy(
    parts: _Parts, heads: dict[str, Any], teacher_state: dict[str, Any]
) -> dict[str, Any]:
    test = parts.ctx.splits.test
    feats = pooled_features(parts.net, test, parts.ctx)
    labels = torch.from_numpy(test.labels)
    sizes = parts.net.sizes
    drop = head_metrics(feats, labels, heads["dropout"]["weight"], heads["dropout"]["bias"], sizes)
    plain = head_metrics(feats, labels, heads["plain"]["weight"], heads["plain"]["bias"], sizes)
    return {
        "teacher": float(teacher_state["test_accuracy"]),
        "ensemble": drop["accuracy"],
        "ensemble_plain_head": plain["accuracy"],
        "ensemble_onnx": None,
        "missing_one": drop["missing_one"],
        "missing_one_plain_head": plain["missing_one"],
        "first_1000": None,
        "test_images": len(test),
    }


def _onnx_accuracy(out_dir: Path, meta: dict[str, Any], ctx: DataContext) -> None:
    test = ctx.splits.test
    ensemble = OnnxEnsemble(out_dir)
    pooled = ensemble.pooled(test.images)
    predicted = ensemble.logits(pooled).argmax(axis=1)
    correct = predicted == test.labels
    accuracy = meta["accuracy"]
    accuracy["ensemble_onnx"] = float(correct.mean())
    accuracy["first_1000"] = float(correct[:FIRST_N].mean())
    log.info(
        "ensemble accuracy: torch %.4f, onnxruntime %.4f (first %d: %.4f)",
        accuracy["ensemble"],
        accuracy["ensemble_onnx"],
        FIRST_N,
        accuracy["first_1000"],
    )
    _write_meta(out_dir, meta)


def _enforce_budget(out_dir: Path, meta: dict[str, Any], config: ExportConfig) -> None:
    if config.max_bundle_mb is None:
        return
    budget = int(config.max_bundle_mb * 1e6)

    def total() -> int:
        return sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())

    if total() > budget and meta["activations"] is not None:
        (out_dir / meta["activations"]["file"]).unlink()
        meta["activations"] = None
        log.warning("bundle over %.1f MB: left activations.npy out", config.max_bundle_mb)
    if total() > budget and meta["teacher"]["file"] is not None:
        (out_dir / meta["teacher"]["file"]).unlink()
        meta["teacher"].update(file=None, sha256=None)
        log.warning("bundle over %.1f MB: left teacher.onnx out", config.max_bundle_mb)
    _write_meta(out_dir, meta)
    if total() > budget:
        raise BundleError(
            f"bundle is {total() / 1e6:.2f} MB, over {config.max_bundle_mb} MB",
            source=str(out_dir),
            fix="use smaller students or raise --max-bundle-mb",
        )


def _write_meta(out_dir: Path, meta: dict[str, Any]) -> None:
    (out_dir / "bundle.json").write_text(json.dumps(meta, indent=1) + "\n")


def _training_record(
    *,
    teacher_state: dict[str, Any],
    partition_doc: dict[str, Any],
    students_state: dict[str, Any],
    config: ExportConfig,
    checks: dict[str, float],
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "data": teacher_state["data"],
        "teacher": {
            **teacher_state["teacher"],
            "val_accuracy": teacher_state["val_accuracy"],
            "history": [
                {
                    "epoch": h["epoch"] + 1,
                    "val_acc": round(h["val_acc"], 4),
                    "seconds": round(h["seconds"], 1),
                }
                for h in teacher_state["history"]
            ],
        },
        "partition": {
            k: partition_doc[k]
            for k in ("config", "sizes", "removed", "p0_check", "ncut", "images")
        },
        "students": {
            **students_state["students"],
            "archs": students_state["archs"],
            "history": [
                {
                    "epoch": h["epoch"] + 1,
                    "val_acc": round(h["val_acc"], 4),
                    "seconds": round(h["seconds"], 1),
                }
                for h in students_state["history"]
            ],
            "heads_val": {name: head["val"] for name, head in students_state["heads"].items()},
        },
        "export": {
            **dataclasses.asdict(config),
            "opset": OPSET,
            "max_abs_diff": {k: float(f"{v:.3g}") for k, v in checks.items()},
        },
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
    }
    if extra:
        record.update(extra)
    return record
