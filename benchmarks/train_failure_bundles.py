"""Train one bundle per strategy (RoCoIn, NoNN, HetNoNN) for ``mqttinfer bench failures``.

    .venv/bin/python benchmarks/train_failure_bundles.py [--out bench-results/failure-bundles]

The strategies partition the teacher's final-conv filters differently, so each needs students
trained for its own partitions. Everything else is shared, so the comparison is fair: ONE
teacher (trained once, same data, same split), the same student architecture, the same epochs
and the same Fashion-MNIST training subset for every strategy.

1. ``teacher/``: the train pipeline's teacher and activations stages (``mqttinfer train
   teacher`` / ``activations``).
2. For each strategy, the planner (``mqttinfer.planner``) plans the fleet
   (``devices/example-fleet.yaml``: 2×Pi 4, 2×Pi Zero 2, 2×ESP32-S3) on the teacher's
   activation matrix: RoCoIn groups the six devices into 3 groups of 2 replicas and cuts the
   filters into 3 balanced normalized-cut partitions; NoNN gives each device one of 6 equal
   partitions (Louvain communities merged); HetNoNN gives each device one of 6 partitions
   sized in proportion to its FLOP/s (sized normalized cut). The plan is saved as
   ``<strategy>/plan.yaml`` and its partitions as the run's ``partition.json``.
3. The train pipeline's students and export stages then distil and export
   ``<strategy>/bundle`` (both heads: ``head.npz`` trained with partition dropout and
   ``head-plain.npz`` without).

Every stage resumes: re-running the script reuses finished checkpoints. Needs the train extra.
The defaults fit the three bundles into roughly a quarter of an hour on 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# Run as a script from a checkout: make the repository's mqttinfer importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_OUT = Path("bench-results/failure-bundles")
DEFAULT_FLEET = Path("devices/example-fleet.yaml")
STRATEGIES = ("rocoin", "nonn", "hetnonn")
INDEX_FILE = "index.json"

log = logging.getLogger("train_failure_bundles")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--fleet", type=Path, default=DEFAULT_FLEET, help="device inventory")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--limit-train", type=int, default=12000, help="training images")
    parser.add_argument("--limit-test", type=int, default=2000, help="test images")
    parser.add_argument("--teacher-arch", default="wrn-16-1")
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--student-arch", default="wrn-10-0.5")
    parser.add_argument("--student-epochs", type=int, default=4)
    parser.add_argument("--head-epochs", type=int, default=8)
    parser.add_argument("--partition-dropout", type=float, default=0.25)
    parser.add_argument("--epsilon", type=float, default=0.05, help="RoCoIn's ε")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _config(args: argparse.Namespace, k: int, archs: list[str], name: str) -> Any:
    from mqttinfer.train.config import build_config

    return build_config(
        None,
        {
            "data": {
                "dataset": "fashion-mnist",
                "limit_train": args.limit_train,
                "limit_test": args.limit_test,
                "seed": args.seed,
            },
            "teacher": {"arch": args.teacher_arch, "epochs": args.teacher_epochs},
            "partition": {"k": k},
            "students": {
                "archs": archs,
                "epochs": args.student_epochs,
                "head_epochs": args.head_epochs,
                "partition_dropout": args.partition_dropout,
                "seed": args.seed,
            },
            "export": {"name": name, "include_teacher": True, "include_activations": False},
        },
    )


def train_teacher(args: argparse.Namespace, progress: Any) -> tuple[Path, np.ndarray[Any, Any]]:
    from mqttinfer.train.activations import ACTIVATIONS_FILE
    from mqttinfer.train.pipeline import stage_activations, stage_teacher

    directory = args.out / "teacher"
    config = _config(args, 1, [args.student_arch], "failure-teacher")
    state = stage_teacher(directory, config, progress, resume=True)
    log.info("teacher %s: test accuracy %.4f", args.teacher_arch, state["test_accuracy"])
    if not (directory / ACTIVATIONS_FILE).is_file():
        stage_activations(directory)
    return directory, np.load(directory / ACTIVATIONS_FILE)


def partition_document(plan: Any, acts: np.ndarray[Any, Any], method: str) -> dict[str, Any]:
    """The train pipeline's ``partition.json`` for the plan's partitions."""
    from mqttinfer import partition as part_lib

    groups = sorted(plan.groups, key=lambda group: group.partition)
    parts = [list(group.filters) for group in groups]
    weights = part_lib.activation_network(acts, "ah")
    return {
        "format": "mqttinfer-partition",
        "version": 1,
        "config": {"k": len(parts), "method": method, "rule": "ah", "from_plan": plan.strategy},
        "channels": int(acts.shape[1]),
        "images": int(acts.shape[0]),
        "partitions": parts,
        "sizes": [len(p) for p in parts],
        "removed": [],
        "p0_check": None,
        "ncut": float(part_lib.ncut_value(weights, [np.asarray(p) for p in parts])),
    }


def train_strategy(
    args: argparse.Namespace,
    strategy: str,
    teacher_dir: Path,
    acts: np.ndarray[Any, Any],
    progress: Any,
) -> dict[str, Any]:
    from mqttinfer.planner.inventory import load_inventory
    from mqttinfer.planner.plan import save_plan
    from mqttinfer.planner.strategies import PlanRequest, make_plan
    from mqttinfer.train.activations import ACTIVATIONS_FILE
    from mqttinfer.train.partitioning import save_partition
    from mqttinfer.train.pipeline import stage_export, stage_students
    from mqttinfer.train.teacher import TEACHER_FILE

    started = time.perf_counter()
    run_dir = args.out / strategy
    run_dir.mkdir(parents=True, exist_ok=True)
    fleet = load_inventory(args.fleet)
    plan = make_plan(
        PlanRequest(
            fleet=fleet,
            strategy=strategy,
            epsilon=args.epsilon,
            activations=acts,
            candidates=(args.student_arch,),
            input_shape=(1, 28, 28),
            name=f"failure-{strategy}",
            seed=args.seed,
        )
    )
    save_plan(plan, run_dir / "plan.yaml")
    document = partition_document(plan, acts, plan.partitioning)
    save_partition(run_dir, document)
    for name in (TEACHER_FILE, ACTIVATIONS_FILE):
        if not (run_dir / name).is_file():
            shutil.copyfile(teacher_dir / name, run_dir / name)
    groups = sorted(plan.groups, key=lambda group: group.partition)
    archs = [group.student.arch for group in groups]
    config = _config(args, len(groups), archs, f"failure-{strategy}")
    log.info("%s: partitions of %s filters, students %s", strategy, document["sizes"], archs)
    stage_students(run_dir, config, progress, resume=True)
    meta = stage_export(run_dir, run_dir / "bundle", config)
    return {
        "strategy": strategy,
        "bundle": str(run_dir / "bundle"),
        "plan": str(run_dir / "plan.yaml"),
        "sizes": document["sizes"],
        "groups": {g.id: [m.device for m in g.members] for g in groups},
        "accuracy": meta["accuracy"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from mqttinfer.errors import MqttInferError
    from mqttinfer.train.deps import require_train_extra

    try:
        require_train_extra("torch", "onnx", "onnxscript")
        from mqttinfer.train.engine import progress_bar, setup_torch

        setup_torch(args.threads)
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        started = time.perf_counter()
        index: dict[str, Any] = {"config": {k: str(v) for k, v in vars(args).items()}}
        with progress_bar(None) as progress:
            teacher_dir, acts = train_teacher(args, progress)
            index["teacher_seconds"] = round(time.perf_counter() - started, 1)
            for strategy in strategies:
                index[strategy] = train_strategy(args, strategy, teacher_dir, acts, progress)
                (args.out / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        index["total_seconds"] = round(time.perf_counter() - started, 1)
        (args.out / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    except MqttInferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for strategy in strategies:
        entry = index[strategy]
        acc = entry["accuracy"]
        print(
            f"{strategy:8s} sizes {entry['sizes']}: ensemble {acc['ensemble']:.4f} "
            f"(plain head {acc['ensemble_plain_head']:.4f}), {entry['seconds']:.0f} s "
            f"→ {entry['bundle']}"
        )
    print(f"total {index['total_seconds']:.0f} s; next: mqttinfer bench failures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
