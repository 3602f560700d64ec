"""Stage 3: cut the teacher's final-conv filters into K partitions (``partition.json``).

The graph maths is :mod:`mqttinfer.partition` (numpy/scipy/networkx). What needs torch — the
NoNN P0 check (zero the candidate filters in the teacher and keep the removal only when the
validation accuracy drops by less than ε) — lives here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mqttinfer import partition as part_lib
from mqttinfer.errors import ConfigError
from mqttinfer.train.config import PartitionConfig

log = logging.getLogger(__name__)

PARTITION_FILE = "partition.json"

AccuracyWithout = Callable[[list[int]], float]


def plan_partitions(
    acts: npt.NDArray[np.float32],
    config: PartitionConfig,
    accuracy_without: AccuracyWithout | None = None,
) -> dict[str, Any]:
    """Partition the filters; return the ``partition.json`` document.

    ``accuracy_without(filters)`` gives the teacher's validation accuracy with those filters
    zeroed; with Louvain it decides whether NoNN's P0 community is dropped.
    """
    weights = part_lib.activation_network(acts, config.rule)
    channels = int(acts.shape[1])
    removed: list[int] = []
    p0_check: dict[str, Any] | None = None
    if config.method == "ncut":
        parts = part_lib.normalized_cut(weights, config.k, seed=config.seed, balance=config.balance)
    elif config.method == "louvain":
        communities = part_lib.louvain_communities(weights, config.resolution, seed=config.seed)
        log.info(
            "louvain: %d communities, sizes %s", len(communities), [len(c) for c in communities]
        )
        candidate = part_lib.useless_community(weights, communities)
        if candidate is not None and config.drop_p0 and accuracy_without is not None:
            p0_check = _check_p0(communities[candidate], config.epsilon, accuracy_without)
            if p0_check["removed"]:
                removed = [int(f) for f in communities[candidate]]
                communities = [c for i, c in enumerate(communities) if i != candidate]
        parts = part_lib.merge_into_k(communities, config.k, weights)
    else:
        raise ConfigError(
            f"unknown partition method {config.method!r}",
            source="--method",
            fix="use ncut or louvain",
        )
    lists = [[int(f) for f in p] for p in parts]
    _check_cover(lists, removed, channels)
    log.info("%s", part_lib.partition_sizes_report(parts))
    return {
        "format": "mqttinfer-partition",
        "version": 1,
        "config": dataclasses.asdict(config),
        "channels": channels,
        "images": int(acts.shape[0]),
        "partitions": lists,
        "sizes": [len(p) for p in lists],
        "removed": removed,
        "p0_check": p0_check,
        "ncut": float(part_lib.ncut_value(weights, parts)),
    }


def _check_p0(
    candidate: npt.NDArray[np.int64], epsilon: float, accuracy_without: AccuracyWithout
) -> dict[str, Any]:
    filters = [int(f) for f in candidate]
    full = accuracy_without([])
    without = accuracy_without(filters)
    drop = full - without
    keep_removal = drop < epsilon
    log.info(
        "P0 candidate of %d filters: val accuracy %.4f -> %.4f (drop %.4f, eps %.4f): %s",
        len(filters),
        full,
        without,
        drop,
        epsilon,
        "removed" if keep_removal else "kept",
    )
    return {
        "filters": filters,
        "val_accuracy": full,
        "val_accuracy_without": without,
        "epsilon": epsilon,
        "removed": keep_removal,
    }


def _check_cover(parts: list[list[int]], removed: list[int], channels: int) -> None:
    every = sorted([f for p in parts for f in p] + removed)
    if every != list(range(channels)) or any(not p for p in parts):
        raise ConfigError(
            "the partitioner returned overlapping, empty or missing filters",
            source="mqttinfer.partition",
            fix="report this with the activations.npy that caused it",
        )


def save_partition(run_dir: Path, document: dict[str, Any]) -> Path:
    path = run_dir / PARTITION_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


def load_partition(run_dir: Path) -> dict[str, Any]:
    path = run_dir / PARTITION_FILE
    if not path.is_file():
        raise ConfigError(
            f"{path} not found", source=str(path), fix="run 'mqttinfer train partition' first"
        )
    document: dict[str, Any] = json.loads(path.read_text())
    if document.get("format") != "mqttinfer-partition" or not document.get("partitions"):
        raise ConfigError(
            "not a partition file", source=str(path), fix="re-run 'mqttinfer train partition'"
        )
    return document


def partition_from_plan(
    plan_path: Path, channels: int | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Take the partitions (and per-partition student architectures) from a planner plan.

    Returns the ``partition.json`` document and the student architecture of each partition,
    in partition order. Several groups may serve one partition (replicas); they must agree.
    ``channels`` (the teacher's final-conv filters) is checked against the plan when given.
    """
    from mqttinfer.planner.plan import load_plan

    plan = load_plan(plan_path)
    source = str(plan_path)
    if channels is not None and plan.channels != channels:
        raise ConfigError(
            f"the plan is for {plan.channels} filters, the teacher has {channels}",
            source=source,
            field="channels",
            fix="make the plan with --channels matching the teacher",
        )
    by_partition: dict[int, tuple[list[int], str]] = {}
    for group in plan.groups:
        entry = ([int(f) for f in group.filters], group.student.arch)
        if by_partition.setdefault(group.partition, entry)[0] != entry[0]:
            raise ConfigError(
                f"two groups give partition {group.partition} different filters",
                source=source,
                field="groups",
            )
    if sorted(by_partition) != list(range(len(by_partition))):
        raise ConfigError(
            f"partition ids {sorted(by_partition)} are not 0..K-1", source=source, field="groups"
        )
    lists = [by_partition[k][0] for k in range(len(by_partition))]
    removed = [int(f) for f in plan.dropped_filters]
    _check_cover(lists, removed, plan.channels)
    archs = [by_partition[k][1] for k in range(len(by_partition))]
    document = {
        "format": "mqttinfer-partition",
        "version": 1,
        "student_archs": archs,
        "config": {
            "method": "plan",
            "plan": source,
            "strategy": plan.strategy,
            "partitioning": plan.partitioning,
            "k": len(lists),
        },
        "channels": plan.channels,
        "images": 0,
        "partitions": lists,
        "sizes": [len(p) for p in lists],
        "removed": removed,
        "p0_check": None,
        "ncut": None,
    }
    return document, archs
