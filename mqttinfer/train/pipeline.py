"""The five stages chained: teacher → activations → partition → students → export.

Each stage reads what the previous one wrote in the run directory (``teacher.pt``,
``activations.npy``, ``partition.json``, ``students.pt``) so any of them can be re-run, and
training stages resume from their last completed epoch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from mqttinfer.errors import ConfigError
from mqttinfer.train.activations import ACTIVATIONS_FILE, compute_activations, save_activations
from mqttinfer.train.config import PipelineConfig
from mqttinfer.train.engine import load_checkpoint, progress_bar, setup_torch
from mqttinfer.train.export import export_bundle
from mqttinfer.train.partitioning import (
    load_partition,
    partition_from_plan,
    plan_partitions,
    save_partition,
)
from mqttinfer.train.students import load_students, train_students
from mqttinfer.train.teacher import (
    TEACHER_FILE,
    build_teacher,
    data_from_checkpoint,
    masked_accuracy,
    train_teacher,
)

log = logging.getLogger(__name__)


def load_teacher(run_dir: Path) -> dict[str, Any]:
    """The completed teacher checkpoint of a run."""
    state = load_checkpoint(run_dir / TEACHER_FILE, kind="teacher")
    if not state.get("complete"):
        raise ConfigError(
            "the teacher checkpoint is not complete",
            source=str(run_dir / TEACHER_FILE),
            fix="finish it with 'mqttinfer train teacher' (it resumes)",
        )
    return state


def stage_teacher(
    run_dir: Path, config: PipelineConfig, progress: Progress, resume: bool = True
) -> dict[str, Any]:
    return train_teacher(run_dir, config.data, config.teacher, progress=progress, resume=resume)


def stage_activations(run_dir: Path, data_dir: str | None = None) -> Path:
    return save_activations(run_dir, compute_activations(load_teacher(run_dir), data_dir))


def stage_partition(
    run_dir: Path,
    config: PipelineConfig,
    data_dir: str | None = None,
    plan: Path | None = None,
) -> dict[str, Any]:
    """Cut the filters (or take the partitions of a planner ``plan``): partition.json."""
    if plan is not None:
        channels = int(load_teacher(run_dir)["final_channels"])
        document, _ = partition_from_plan(plan, channels)
        save_partition(run_dir, document)
        return document
    acts_path = run_dir / ACTIVATIONS_FILE
    if not acts_path.is_file():
        raise ConfigError(
            f"{acts_path} not found",
            source=str(acts_path),
            fix="run 'mqttinfer train activations' first",
        )
    acts = np.load(acts_path)
    teacher_state = load_teacher(run_dir)
    cache: dict[str, Any] = {}

    def accuracy_without(filters: list[int]) -> float:
        if "model" not in cache:
            cache["model"] = build_teacher(teacher_state)
            cache["ctx"] = data_from_checkpoint(teacher_state, data_dir)
        return masked_accuracy(cache["model"], cache["ctx"], filters)

    document = plan_partitions(acts, config.partition, accuracy_without)
    save_partition(run_dir, document)
    return document


def stage_students(
    run_dir: Path,
    config: PipelineConfig,
    progress: Progress,
    resume: bool = True,
    data_dir: str | None = None,
) -> dict[str, Any]:
    return train_students(
        run_dir,
        load_teacher(run_dir),
        load_partition(run_dir),
        config.students,
        progress=progress,
        resume=resume,
        data_dir=data_dir,
    )


def stage_export(
    run_dir: Path,
    out_dir: Path,
    config: PipelineConfig,
    training: dict[str, Any] | None = None,
    data_dir: str | None = None,
) -> dict[str, Any]:
    return export_bundle(
        out_dir,
        run_dir,
        teacher_state=load_teacher(run_dir),
        partition_doc=load_partition(run_dir),
        students_state=load_students(run_dir),
        config=config.export,
        training=training,
        data_dir=data_dir,
    )


def run_all(
    config: PipelineConfig,
    run_dir: Path,
    out_dir: Path,
    *,
    preset: str | None = None,
    resume: bool = True,
    show_progress: bool | None = None,
    threads: int | None = None,
    plan: Path | None = None,
) -> dict[str, Any]:
    """Run every stage; return the exported bundle.json (with per-stage timings)."""
    setup_torch(threads)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def timed(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 1)
        log.info("stage %s done in %.1f s", name, now - since)
        return now

    data_dir = config.data.data_dir
    with progress_bar(show_progress) as progress:
        mark = started
        stage_teacher(run_dir, config, progress, resume)
        mark = timed("teacher", mark)
        stage_activations(run_dir, data_dir)
        mark = timed("activations", mark)
        stage_partition(run_dir, config, data_dir, plan)
        mark = timed("partition", mark)
        stage_students(run_dir, config, progress, resume, data_dir)
        mark = timed("students", mark)
    training = {
        "command": " ".join(["mqttinfer", *sys.argv[1:]]) if sys.argv else None,
        "preset": preset,
        "plan": str(plan) if plan is not None else None,
        "config": dataclasses.asdict(config),
        "timings_s": timings,
    }
    meta = stage_export(run_dir, out_dir, config, training, data_dir)
    timed("export", mark)
    meta["training"]["timings_s"]["total"] = round(time.perf_counter() - started, 1)
    (out_dir / "bundle.json").write_text(_dumps(meta))
    return meta


def _dumps(meta: dict[str, Any]) -> str:
    return json.dumps(meta, indent=1) + "\n"
