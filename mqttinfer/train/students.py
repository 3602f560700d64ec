"""Stage 4: distil the teacher into a network of students (NoNN §4.3, RoCoIn eq. 6).

One student per partition P_k, each ending in a 1×1 conv to ``|P_k|`` channels; the FC head
takes the concatenated pooled student outputs. All students and the head are trained jointly
with

    L = α·τ²·KL(softmax(z_T/τ) ‖ softmax(z_S/τ)) + (1−α)·CE(z_S, y)
        + β · Σ_k ‖ v_T(P_k)/‖v_T(P_k)‖ − v_S(k)/‖v_S(k)‖ ‖²

where v_T(P_k) is the teacher's final activation map restricted to the channels of P_k and
v_S(k) student k's output, both vectorised (``at_mode="map"``, NoNN eq. 6) or pooled per
channel (``at_mode="pooled"``).

Then, with the students frozen, two heads are fine-tuned from the joint head on the pooled
training features: a *plain* one and one with *partition dropout* (whole partitions zeroed at
random, as the aggregator zero-fills a partition with no live replica), so a missing partition
at run time costs less accuracy. Both are kept; the bundle ships both.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import Tensor, nn
from torch.nn import functional as nnf

from mqttinfer.errors import ConfigError
from mqttinfer.train.arch import parse_arch_list
from mqttinfer.train.config import StudentConfig, from_dict
from mqttinfer.train.engine import (
    EpochStats,
    accuracy,
    fit,
    load_checkpoint,
    lr_at,
    predict,
    save_checkpoint,
    seed_everything,
    set_lr,
    sgd,
)
from mqttinfer.train.models import Classifier, Student, StudentNetwork
from mqttinfer.train.teacher import DataContext, build_teacher, data_from_checkpoint

log = logging.getLogger(__name__)

STUDENTS_FILE = "students.pt"


def kd_loss(student: Tensor, teacher: Tensor, labels: Tensor, alpha: float, tau: float) -> Tensor:
    """Hinton KD: α·τ²·KL(teacher‖student at temperature τ) + (1−α)·cross-entropy."""
    soft = nnf.kl_div(
        nnf.log_softmax(student / tau, dim=1),
        nnf.softmax(teacher / tau, dim=1),
        reduction="batchmean",
    )
    return alpha * tau * tau * soft + (1.0 - alpha) * nnf.cross_entropy(student, labels)


def at_loss(student: Tensor, teacher: Tensor, mode: str) -> Tensor:
    """NoNN eq. 6 for one partition: squared distance of the L2-normalised activations."""
    if mode == "pooled":
        vs, vt = student.mean(dim=(2, 3)), teacher.mean(dim=(2, 3))
    else:
        if student.shape[2:] != teacher.shape[2:]:
            size = (
                min(student.shape[2], teacher.shape[2]),
                min(student.shape[3], teacher.shape[3]),
            )
            student = nnf.adaptive_avg_pool2d(student, size)
            teacher = nnf.adaptive_avg_pool2d(teacher, size)
        vs, vt = student.flatten(1), teacher.flatten(1)
    diff = nnf.normalize(vs, dim=1) - nnf.normalize(vt, dim=1)
    return diff.pow(2).sum(dim=1).mean()


def build_network(
    archs: list[str], partitions: list[list[int]], in_channels: int, num_classes: int
) -> StudentNetwork:
    """The K students (one per partition, in partition order) and the joint head."""
    specs = parse_arch_list(",".join(archs), len(partitions))
    students = [
        Student(spec, in_channels, len(part)) for spec, part in zip(specs, partitions, strict=True)
    ]
    return StudentNetwork(students, num_classes)


def network_from_checkpoint(state: dict[str, Any], teacher_state: dict[str, Any]) -> StudentNetwork:
    """Rebuild the trained student network of a ``students.pt`` (eval mode)."""
    info = teacher_state["dataset"]
    net = build_network(state["archs"], state["partitions"], info["shape"][0], len(info["classes"]))
    net.load_state_dict(state["model"])
    net.eval()
    return net


def _check_resume(
    state: dict[str, Any], config: StudentConfig, partitions: list[list[int]], path: Path
) -> None:
    if state["students"] != dataclasses.asdict(config) or state["partitions"] != partitions:
        raise ConfigError(
            "an existing students checkpoint used a different configuration or partition",
            source=str(path),
            fix="pass --no-resume to start over, or use another --run-dir",
        )


def train_students(
    run_dir: Path,
    teacher_state: dict[str, Any],
    partition_doc: dict[str, Any],
    config: StudentConfig,
    *,
    progress: Progress,
    resume: bool = True,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Train (or resume, or reuse) ``run_dir/students.pt``; return the final checkpoint."""
    path = run_dir / STUDENTS_FILE
    partitions: list[list[int]] = [list(map(int, p)) for p in partition_doc["partitions"]]
    archs = [s.name for s in parse_arch_list(",".join(config.archs), len(partitions))]
    state: dict[str, Any] | None = None
    if resume and path.is_file():
        state = load_checkpoint(path, kind="students")
        _check_resume(state, config, partitions, path)
        if state["complete"]:
            log.info("students already trained (%s); reusing them", path)
            return state
    ctx = data_from_checkpoint(teacher_state, data_dir)
    teacher = build_teacher(teacher_state)
    seed_everything(config.seed)
    net = build_network(archs, partitions, ctx.splits.shape[0], len(ctx.splits.classes))
    optimizer = sgd(
        net.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    if state is None:
        state = {
            "kind": "students",
            "format": 1,
            "students": dataclasses.asdict(config),
            "archs": archs,
            "partitions": partitions,
            "epoch": 0,
            "history": [],
            "joint_done": False,
            "complete": False,
        }
    else:
        net.load_state_dict(state["model"])
        if not state["joint_done"]:
            optimizer.load_state_dict(state["optimizer"])
    if not state["joint_done"]:
        _joint_training(
            net=net,
            teacher=teacher,
            optimizer=optimizer,
            ctx=ctx,
            config=config,
            state=state,
            path=path,
            progress=progress,
        )
    _fit_heads(net, ctx, config, state)
    state["complete"] = True
    save_checkpoint(path, state)
    return state


def _joint_training(
    *,
    net: StudentNetwork,
    teacher: Classifier,
    optimizer: torch.optim.Optimizer,
    ctx: DataContext,
    config: StudentConfig,
    state: dict[str, Any],
    path: Path,
    progress: Progress,
) -> None:
    index = [torch.tensor(p, dtype=torch.long) for p in state["partitions"]]

    def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            t_feats = teacher.features(x)
            t_logits = teacher.logits_from_features(t_feats)
        logits, feats = net(x)
        loss = kd_loss(logits, t_logits, y, config.alpha, config.tau)
        if config.beta > 0:
            transfer = sum(
                (
                    at_loss(f, t_feats[:, idx], config.at_mode)
                    for f, idx in zip(feats, index, strict=True)
                ),
                torch.zeros(()),
            )
            loss = loss + config.beta * transfer
        return loss, logits

    def end_of_epoch(stats: EpochStats) -> None:
        net.eval()
        val_acc = accuracy(
            predict(lambda x: net(x)[0], ctx.splits.val, ctx.normalize), ctx.splits.val.labels
        )
        state["history"].append({**dataclasses.asdict(stats), "val_acc": val_acc})
        state.update(
            model=net.state_dict(), optimizer=optimizer.state_dict(), epoch=stats.epoch + 1
        )
        save_checkpoint(path, state)
        log.info(
            "students epoch %d/%d: loss %.4f train %.4f val %.4f (%.0f s)",
            stats.epoch + 1,
            config.epochs,
            stats.loss,
            stats.train_acc,
            val_acc,
            stats.seconds,
        )

    fit(
        model=net,
        optimizer=optimizer,
        schedule=config,
        train=ctx.splits.train,
        normalize=ctx.normalize,
        step=step,
        start_epoch=int(state["epoch"]),
        end_of_epoch=end_of_epoch,
        progress=progress,
        description="students",
    )
    net.eval()
    state["joint_done"] = True
    state["model"] = net.state_dict()
    state.pop("optimizer", None)
    save_checkpoint(path, state)


# --------------------------------------------------------------------------- heads


def pooled_features(net: StudentNetwork, data: Any, ctx: DataContext) -> Tensor:
    """Concatenated pooled student outputs ``[N, D]`` for an :class:`ImageSet`."""
    net.eval()
    return predict(net.pooled, data, ctx.normalize)


def partition_mask(n: int, sizes: list[int], p: float, generator: torch.Generator) -> Tensor:
    """``[n, D]`` 0/1 mask dropping whole partitions with probability ``p`` (never all)."""
    keep = torch.rand(n, len(sizes), generator=generator) >= p
    none_kept = ~keep.any(dim=1)
    if bool(none_kept.any()):
        rescue = torch.randint(0, len(sizes), (int(none_kept.sum()),), generator=generator)
        keep[none_kept.nonzero().squeeze(1), rescue] = True
    return keep.float().repeat_interleave(torch.tensor(sizes), dim=1)


def train_head(
    init: nn.Linear,
    feats: Tensor,
    labels: Tensor,
    sizes: list[int],
    *,
    dropout: float,
    epochs: int,
    lr: float,
    seed: int,
) -> nn.Linear:
    """Fine-tune a copy of ``init`` on frozen pooled features (optionally partition dropout)."""
    head = nn.Linear(init.in_features, init.out_features)
    head.load_state_dict(init.state_dict())
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    batch = 256
    per_epoch = max(1, len(labels) // batch)
    total = per_epoch * epochs
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for index in range(per_epoch):
            set_lr(optimizer, lr_at(epoch * per_epoch + index, total, lr, 0))
            idx = order[index * batch : (index + 1) * batch]
            x = feats[idx]
            if dropout > 0:
                x = x * partition_mask(len(idx), sizes, dropout, generator)
            loss = nnf.cross_entropy(head(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    head.eval()
    return head


def head_metrics(
    feats: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, sizes: list[int]
) -> dict[str, Any]:
    """Accuracy with every partition, and with each single partition missing (zero-filled)."""
    bounds = np.cumsum([0, *sizes])
    full = accuracy(feats @ weight.T + bias, labels)
    missing: dict[str, float] = {}
    for k in range(len(sizes)):
        masked = feats.clone()
        masked[:, int(bounds[k]) : int(bounds[k + 1])] = 0.0
        missing[str(k)] = accuracy(masked @ weight.T + bias, labels)
    return {"accuracy": full, "missing_one": missing}


def _fit_heads(
    net: StudentNetwork, ctx: DataContext, config: StudentConfig, state: dict[str, Any]
) -> None:
    train_feats = pooled_features(net, ctx.splits.train, ctx)
    val_feats = pooled_features(net, ctx.splits.val, ctx)
    y_train = torch.from_numpy(ctx.splits.train.labels)
    y_val = torch.from_numpy(ctx.splits.val.labels)
    heads: dict[str, Any] = {}
    for name, dropout in (("plain", 0.0), ("dropout", config.partition_dropout)):
        head = train_head(
            net.head,
            train_feats,
            y_train,
            net.sizes,
            dropout=dropout,
            epochs=config.head_epochs,
            lr=config.head_lr,
            seed=config.seed,
        )
        weight, bias = head.weight.detach().clone(), head.bias.detach().clone()
        metrics = head_metrics(val_feats, y_val, weight, bias, net.sizes)
        heads[name] = {"weight": weight, "bias": bias, "dropout": dropout, "val": metrics}
        log.info(
            "%s head (dropout %.2f): val %.4f, one partition missing %s",
            name,
            dropout,
            metrics["accuracy"],
            {k: round(v, 4) for k, v in metrics["missing_one"].items()},
        )
    state["heads"] = heads


def load_students(run_dir: Path) -> dict[str, Any]:
    """The completed ``students.pt`` of a run."""
    state = load_checkpoint(run_dir / STUDENTS_FILE, kind="students")
    if not state.get("complete"):
        raise ConfigError(
            "the students checkpoint is not complete",
            source=str(run_dir / STUDENTS_FILE),
            fix="finish it with 'mqttinfer train students' (it resumes)",
        )
    return state


def student_config(state: dict[str, Any]) -> StudentConfig:
    config: StudentConfig = from_dict(StudentConfig, state["students"])
    return config
