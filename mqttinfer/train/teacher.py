"""Stage 1: train the teacher (resumable; the checkpoint carries its own configuration)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from torch import Tensor
from torch.nn import functional as nnf

from mqttinfer.errors import ConfigError
from mqttinfer.train.arch import parse_arch
from mqttinfer.train.config import DataConfig, TeacherConfig, from_dict
from mqttinfer.train.datasets import Splits, channel_stats, load_dataset, make_splits
from mqttinfer.train.engine import (
    EpochStats,
    Normalizer,
    accuracy,
    fit,
    load_checkpoint,
    predict,
    save_checkpoint,
    seed_everything,
    sgd,
)
from mqttinfer.train.models import Classifier, count_cost

log = logging.getLogger(__name__)

TEACHER_FILE = "teacher.pt"


@dataclass
class DataContext:
    """The split dataset plus the input normalisation every stage and every device uses."""

    config: DataConfig
    splits: Splits
    mean: list[float]
    std: list[float]

    @property
    def normalize(self) -> Normalizer:
        return Normalizer(self.mean, self.std)

    def info(self) -> dict[str, Any]:
        """The ``dataset`` and ``input`` facts stored in checkpoints and bundle.json."""
        return {
            "name": self.splits.name,
            "classes": list(self.splits.classes),
            "shape": list(self.splits.shape),
            "mean": self.mean,
            "std": self.std,
            "train_size": len(self.splits.train),
            "val_size": len(self.splits.val),
            "test_size": len(self.splits.test),
        }


def load_data(
    config: DataConfig, stats: tuple[list[float], list[float]] | None = None
) -> DataContext:
    """Load and split the dataset; ``stats`` reuses a stored (mean, std)."""
    dataset = load_dataset(config.dataset, config.data_dir)
    splits = make_splits(
        dataset,
        val_fraction=config.val_fraction,
        seed=config.seed,
        limit_train=config.limit_train,
        limit_test=config.limit_test,
    )
    mean, std = stats if stats is not None else channel_stats(splits.train.images)
    return DataContext(config, splits, list(mean), list(std))


def data_from_checkpoint(state: dict[str, Any], data_dir: str | None = None) -> DataContext:
    """Rebuild the exact split a teacher checkpoint was trained on."""
    config: DataConfig = from_dict(DataConfig, state["data"])
    if data_dir is not None:
        config.data_dir = data_dir
    info = state["dataset"]
    return load_data(config, (info["mean"], info["std"]))


def build_teacher(state: dict[str, Any]) -> Classifier:
    """The teacher model of a checkpoint, weights loaded, in eval mode."""
    info = state["dataset"]
    model = Classifier(parse_arch(state["teacher"]["arch"]), info["shape"][0], len(info["classes"]))
    model.load_state_dict(state["model"])
    model.eval()
    return model


def _check_resume(
    state: dict[str, Any], data: DataConfig, config: TeacherConfig, path: Path
) -> None:
    stored_data = {k: v for k, v in state["data"].items() if k != "data_dir"}
    wanted_data = {k: v for k, v in dataclasses.asdict(data).items() if k != "data_dir"}
    if stored_data != wanted_data or state["teacher"] != dataclasses.asdict(config):
        raise ConfigError(
            "an existing teacher checkpoint was trained with a different configuration",
            source=str(path),
            fix="pass --no-resume to start over, or use another --run-dir",
        )


def train_teacher(
    run_dir: Path,
    data: DataConfig,
    config: TeacherConfig,
    *,
    progress: Progress,
    resume: bool = True,
) -> dict[str, Any]:
    """Train (or resume, or reuse) ``run_dir/teacher.pt``; return the final checkpoint."""
    path = run_dir / TEACHER_FILE
    state: dict[str, Any] | None = None
    if resume and path.is_file():
        state = load_checkpoint(path, kind="teacher")
        _check_resume(state, data, config, path)
        if state["complete"]:
            log.info("teacher already trained (%s); reusing it", path)
            return state
        log.info("resuming the teacher from epoch %d", state["epoch"])
    ctx = load_data(data) if state is None else data_from_checkpoint(state, data.data_dir)
    spec = parse_arch(config.arch, source="--teacher-arch")
    seed_everything(config.seed)
    model = Classifier(spec, ctx.splits.shape[0], len(ctx.splits.classes))
    optimizer = sgd(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    if state is None:
        cost = count_cost(model, ctx.splits.shape)
        state = {
            "kind": "teacher",
            "format": 1,
            "data": dataclasses.asdict(data),
            "teacher": dataclasses.asdict(config),
            "dataset": ctx.info(),
            "params": cost.params,
            "macs": cost.macs,
            "final_channels": model.final_channels,
            "epoch": 0,
            "history": [],
            "complete": False,
        }
        log.info(
            "teacher %s: %d params, %d MACs, %d final channels",
            spec.name,
            cost.params,
            cost.macs,
            model.final_channels,
        )
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    normalize = ctx.normalize

    def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits: Tensor = model(x)
        return nnf.cross_entropy(logits, y, label_smoothing=config.label_smoothing), logits

    def end_of_epoch(stats: EpochStats) -> None:
        assert state is not None
        model.eval()
        val_acc = accuracy(predict(model, ctx.splits.val, normalize), ctx.splits.val.labels)
        record = {**dataclasses.asdict(stats), "val_acc": val_acc}
        state["history"].append(record)
        state.update(
            model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=stats.epoch + 1
        )
        save_checkpoint(path, state)
        log.info(
            "teacher epoch %d/%d: loss %.4f train %.4f val %.4f (%.0f s)",
            stats.epoch + 1,
            config.epochs,
            stats.loss,
            stats.train_acc,
            val_acc,
            stats.seconds,
        )

    fit(
        model=model,
        optimizer=optimizer,
        schedule=config,
        train=ctx.splits.train,
        normalize=normalize,
        step=step,
        start_epoch=int(state["epoch"]),
        end_of_epoch=end_of_epoch,
        progress=progress,
        description="teacher",
    )
    model.eval()
    state["val_accuracy"] = accuracy(
        predict(model, ctx.splits.val, normalize), ctx.splits.val.labels
    )
    state["test_accuracy"] = accuracy(
        predict(model, ctx.splits.test, normalize), ctx.splits.test.labels
    )
    state["complete"] = True
    state["model"] = model.state_dict()
    save_checkpoint(path, state)
    log.info("teacher done: val %.4f test %.4f", state["val_accuracy"], state["test_accuracy"])
    return state


def masked_accuracy(model: Classifier, ctx: DataContext, drop: list[int]) -> float:
    """Validation accuracy with final-conv channels ``drop`` zeroed (NoNN's P0 check)."""
    mask = torch.ones(model.final_channels)
    mask[drop] = 0.0
    mask = mask.view(1, -1, 1, 1)

    def masked(x: Tensor) -> Tensor:
        return model.logits_from_features(model.features(x) * mask)

    model.eval()
    return accuracy(predict(masked, ctx.splits.val, ctx.normalize), ctx.splits.val.labels)
