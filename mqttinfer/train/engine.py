"""Shared training machinery: batches, augmentation, schedule, checkpoints, progress, eval."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor, nn
from torch.nn import functional as nnf

from mqttinfer.errors import ConfigError
from mqttinfer.train.datasets import ImageSet

log = logging.getLogger(__name__)

DEFAULT_THREADS = 2


def setup_torch(threads: int | None = None) -> None:
    """Limit torch to ``threads`` CPU threads (default: $MQTTINFER_TRAIN_THREADS or 2)."""
    count = threads or int(os.environ.get("MQTTINFER_TRAIN_THREADS", DEFAULT_THREADS))
    torch.set_num_threads(max(1, count))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (model initialisation is then reproducible)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Normalizer:
    """uint8 [N, C, H, W] → float32 ``(u8 / 255 − mean) / std``, exactly as a device does."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: Tensor) -> Tensor:
        scaled = images.to(torch.float32) * torch.tensor(1.0 / 255.0, dtype=torch.float32)
        return (scaled - self.mean) / self.std


def augment_batch(images: Tensor, *, pad: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Random crop with zero padding ``pad`` and (optionally) random horizontal flips (uint8)."""
    n, _, h, w = images.shape
    out = images
    if pad > 0:
        padded = nnf.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
        batch = torch.arange(n)[:, None, None, None]
        chans = torch.arange(images.shape[1])[None, :, None, None]
        out = padded[batch, chans, rows, cols]
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    return out


def iterate_batches(
    data: ImageSet,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    augment: str = "none",
    pad: int = 0,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield uint8 image batches and int64 labels; seeded shuffle and augmentation."""
    n = len(data)
    order = (
        np.random.default_rng(shuffle_seed).permutation(n)
        if shuffle_seed is not None
        else np.arange(n)
    )
    generator = torch.Generator().manual_seed(shuffle_seed or 0)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = np.sort(order[start : start + batch_size])
        images = torch.from_numpy(data.images[idx])
        labels = torch.from_numpy(data.labels[idx])
        if augment != "none":
            images = augment_batch(
                images, pad=pad, flip=augment == "crop+flip", generator=generator
            )
        yield images, labels


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in one epoch with ``drop_last`` batches (at least one)."""
    return max(1, n // batch_size)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def sgd(params: Any, *, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """Nesterov SGD without weight decay on BatchNorm and bias parameters."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in params:
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)


@torch.no_grad()
def predict(
    fn: Callable[[Tensor], Tensor], data: ImageSet, normalize: Normalizer, batch_size: int = 500
) -> Tensor:
    """Stack ``fn(normalized batch)`` over ``data`` in order (no augmentation)."""
    outputs = [fn(normalize(images)) for images, _ in iterate_batches(data, batch_size)]
    return torch.cat(outputs) if outputs else torch.empty(0)


def accuracy(logits: Tensor, labels: np.ndarray[Any, Any] | Tensor) -> float:
    """Top-1 accuracy of ``logits`` against ``labels``."""
    target = torch.as_tensor(labels)
    if len(target) == 0:
        return 0.0
    correct = int((logits.argmax(dim=1) == target).sum())
    return correct / len(target)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (temporary file + rename) so an interrupted save never corrupts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, *, kind: str) -> dict[str, Any]:
    """Load a checkpoint of ``kind`` (teacher/students); raise ConfigError if absent or wrong."""
    if not path.is_file():
        raise ConfigError(
            f"checkpoint {path} not found",
            source=str(path),
            fix=f"run 'mqttinfer train {kind}' first (or 'mqttinfer train all')",
        )
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("kind") != kind:
        raise ConfigError(
            f"{path} is a {state.get('kind')!r} checkpoint, not {kind!r}",
            source=str(path),
            fix="point at the right run directory",
        )
    return state


@contextmanager
def progress_bar(enabled: bool | None = None) -> Iterator[Progress]:
    """A rich progress display (silent when stderr is not a terminal, unless forced)."""
    console = Console(stderr=True)
    show = console.is_terminal if enabled is None else enabled
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not show,
        transient=False,
    )
    with progress:
        yield progress


class Schedule(Protocol):
    """The schedule fields shared by the teacher and student configurations."""

    @property
    def epochs(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def lr(self) -> float: ...
    @property
    def warmup_epochs(self) -> float: ...
    @property
    def augment(self) -> str: ...
    @property
    def pad(self) -> int: ...
    @property
    def seed(self) -> int: ...


@dataclass
class EpochStats:
    """What one training epoch measured (training accuracy is on augmented batches)."""

    epoch: int
    loss: float
    train_acc: float
    lr: float
    seconds: float


StepFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def fit(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    train: ImageSet,
    normalize: Normalizer,
    step: StepFn,
    start_epoch: int,
    end_of_epoch: Callable[[EpochStats], None],
    progress: Progress,
    description: str,
) -> None:
    """Run epochs ``start_epoch .. schedule.epochs - 1``.

    ``step(x, y)`` returns ``(loss, logits)`` for a normalised, augmented batch; ``fit`` does
    the backward pass, the LR schedule (a pure function of the step, so resuming needs no
    scheduler state) and calls ``end_of_epoch`` (which evaluates and checkpoints).
    """
    per_epoch = steps_per_epoch(len(train), schedule.batch_size)
    total = per_epoch * schedule.epochs
    warmup = round(schedule.warmup_epochs * per_epoch)
    task = progress.add_task(description, total=total, completed=start_epoch * per_epoch, info="")
    for epoch in range(start_epoch, schedule.epochs):
        model.train()
        started = time.perf_counter()
        loss_sum, correct, seen, lr = 0.0, 0, 0, 0.0
        batches = iterate_batches(
            train,
            schedule.batch_size,
            shuffle_seed=schedule.seed * 100003 + epoch,
            augment=schedule.augment,
            pad=schedule.pad,
            drop_last=True,
        )
        for index, (images, labels) in enumerate(batches):
            lr = lr_at(epoch * per_epoch + index, total, schedule.lr, warmup)
            set_lr(optimizer, lr)
            loss, logits = step(normalize(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            loss_sum += float(loss.detach()) * len(labels)
            correct += int((logits.detach().argmax(1) == labels).sum())
            seen += len(labels)
            progress.update(
                task,
                advance=1,
                info=f"epoch {epoch + 1}/{schedule.epochs} loss {loss_sum / seen:.3f}",
            )
        stats = EpochStats(
            epoch,
            loss_sum / max(1, seen),
            correct / max(1, seen),
            lr,
            time.perf_counter() - started,
        )
        end_of_epoch(stats)
    progress.update(task, completed=total)
