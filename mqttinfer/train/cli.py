"""``mqttinfer train …``: the knowledge pipeline's commands (typer object: ``app``).

torch is imported inside the commands, never at module level: the main CLI imports this
module at start-up, and devices run without torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mqttinfer.train.deps import require_train_extra

if TYPE_CHECKING:
    from mqttinfer.train.config import PipelineConfig

app = typer.Typer(
    help="Train a teacher, partition its final-conv filters, distil students, export a bundle.",
    no_args_is_help=True,
)

# ---------------------------------------------------------------------------- options
PresetOpt = Annotated[
    str | None,
    typer.Option(
        "--preset",
        help="Start from a preset: demo (K=3, shipped bundle), test (5k images, CI), "
        "full (WRN-16-2 teacher, 4 WRN-16-1 students). Options override it.",
    ),
]
RunDirOpt = Annotated[
    Path | None,
    typer.Option("--run-dir", help="Checkpoints and intermediate files [default: runs/<name>]."),
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", help="Bundle directory to write [default: <run-dir>/bundle]."),
]
DatasetOpt = Annotated[
    str | None, typer.Option("--dataset", help="fashion-mnist | cifar10 | digits | imagefolder.")
]
DataDirOpt = Annotated[
    str | None,
    typer.Option("--data-dir", help="Where the dataset is (default: the standard place for it)."),
]
LimitTrainOpt = Annotated[
    int | None,
    typer.Option("--limit-train", help="Use a seeded random subset of this many training images."),
]
LimitTestOpt = Annotated[
    int | None, typer.Option("--limit-test", help="Evaluate on the first N test images only.")
]
ValFractionOpt = Annotated[
    float | None,
    typer.Option("--val-fraction", help="Share of the training images held out for validation."),
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed for every stage.")]
TeacherArchOpt = Annotated[
    str | None, typer.Option("--teacher-arch", help="wrn-<depth>-<width> or mobilenetv2[-<width>].")
]
TeacherEpochsOpt = Annotated[int | None, typer.Option("--teacher-epochs")]
TeacherLrOpt = Annotated[float | None, typer.Option("--teacher-lr")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", help="Teacher and student batch.")]
KOpt = Annotated[int | None, typer.Option("--k", help="Number of partitions (= students).")]
MethodOpt = Annotated[
    str | None,
    typer.Option(
        "--method", help="ncut (RoCoIn normalized cut) | louvain (NoNN communities + P0 + merge)."
    ),
]
RuleOpt = Annotated[str | None, typer.Option("--rule", help="ah (activation hubs) | ca.")]
ResolutionOpt = Annotated[float | None, typer.Option("--resolution", help="Louvain γ.")]
BalanceOpt = Annotated[
    bool | None, typer.Option("--balance/--no-balance", help="ncut: equal-size discretisation.")
]
DropP0Opt = Annotated[
    bool | None,
    typer.Option(
        "--drop-p0/--keep-p0", help="louvain: drop the useless community if accuracy allows."
    ),
]
EpsilonOpt = Annotated[
    float | None,
    typer.Option("--epsilon", help="louvain: max validation accuracy drop for removing P0."),
]
StudentArchOpt = Annotated[
    str | None,
    typer.Option("--student-arch", help="One architecture for all students, or K comma-separated."),
]
StudentEpochsOpt = Annotated[int | None, typer.Option("--student-epochs")]
StudentLrOpt = Annotated[float | None, typer.Option("--student-lr")]
AlphaOpt = Annotated[float | None, typer.Option("--alpha", help="KD weight of the soft loss.")]
TauOpt = Annotated[float | None, typer.Option("--tau", help="KD temperature.")]
BetaOpt = Annotated[float | None, typer.Option("--beta", help="Activation-transfer weight.")]
AtModeOpt = Annotated[
    str | None, typer.Option("--at-mode", help="map (NoNN eq. 6 on the activation maps) | pooled.")
]
DropoutOpt = Annotated[
    float | None,
    typer.Option(
        "--partition-dropout", help="Probability of zeroing a whole partition (dropout head)."
    ),
]
HeadEpochsOpt = Annotated[int | None, typer.Option("--head-epochs")]
NameOpt = Annotated[str | None, typer.Option("--name", help="Bundle name.")]
TeacherOnnxOpt = Annotated[
    bool | None,
    typer.Option("--teacher-onnx/--no-teacher-onnx", help="Ship teacher.onnx in the bundle."),
]
ActsOpt = Annotated[
    bool | None,
    typer.Option("--activations/--no-activations", help="Ship activations.npy in the bundle."),
]
MaxMbOpt = Annotated[
    float | None,
    typer.Option("--max-bundle-mb", help="Size budget; optional files are dropped first."),
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume/--no-resume", help="Continue from existing checkpoints of the same config."
    ),
]
ProgressOpt = Annotated[
    bool | None,
    typer.Option("--progress/--no-progress", help="Progress bars [default: when on a terminal]."),
]
AtolOpt = Annotated[
    float | None,
    typer.Option("--atol", help="Export check: max |onnx - torch| per unit of output scale."),
]
PlanOpt = Annotated[
    Path | None,
    typer.Option(
        "--plan",
        help="Take the partitions and per-partition student architectures from a planner "
        "plan (plans/<name>.yaml) instead of cutting the filter network.",
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", help="torch CPU threads [default: $MQTTINFER_TRAIN_THREADS or 2]."),
]


def _setup() -> None:
    require_train_extra("torch", "onnx", "onnxscript")
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")


def _config(preset: str | None, sections: dict[str, dict[str, Any]]) -> PipelineConfig:
    from mqttinfer.train.config import build_config

    students = sections.get("students", {})
    if students.get("archs") is not None:
        students["archs"] = [a.strip() for a in students["archs"].split(",") if a.strip()]
    return build_config(preset, sections)


def _run_dir(run_dir: Path | None, config: PipelineConfig) -> Path:
    return run_dir if run_dir is not None else Path("runs") / config.export.name


def _data(
    *,
    dataset: str | None,
    data_dir: str | None,
    limit_train: int | None,
    limit_test: int | None,
    val_fraction: float | None,
    seed: int | None,
) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "data_dir": data_dir,
        "limit_train": limit_train,
        "limit_test": limit_test,
        "val_fraction": val_fraction,
        "seed": seed,
    }


# ---------------------------------------------------------------------------- commands
@app.command()
def teacher(
    *,
    preset: PresetOpt = None,
    run_dir: RunDirOpt = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    limit_train: LimitTrainOpt = None,
    limit_test: LimitTestOpt = None,
    val_fraction: ValFractionOpt = None,
    seed: SeedOpt = None,
    arch: TeacherArchOpt = None,
    epochs: TeacherEpochsOpt = None,
    lr: TeacherLrOpt = None,
    batch_size: BatchOpt = None,
    name: NameOpt = None,
    resume: ResumeOpt = True,
    progress: ProgressOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Train (or resume) the teacher: <run-dir>/teacher.pt."""
    _setup()
    from mqttinfer.train.engine import progress_bar, setup_torch
    from mqttinfer.train.pipeline import stage_teacher

    config = _config(
        preset,
        {
            "data": _data(
                dataset=dataset,
                data_dir=data_dir,
                limit_train=limit_train,
                limit_test=limit_test,
                val_fraction=val_fraction,
                seed=seed,
            ),
            "teacher": {
                "arch": arch,
                "epochs": epochs,
                "lr": lr,
                "batch_size": batch_size,
                "seed": seed,
            },
            "export": {"name": name},
        },
    )
    setup_torch(threads)
    with progress_bar(progress) as bar:
        state = stage_teacher(_run_dir(run_dir, config), config, bar, resume)
    typer.echo(
        f"teacher {state['teacher']['arch']}: val {state['val_accuracy']:.4f}, "
        f"test {state['test_accuracy']:.4f}"
    )


@app.command()
def activations(
    *,
    run_dir: RunDirOpt = None,
    preset: PresetOpt = None,
    name: NameOpt = None,
    data_dir: DataDirOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Per validation image, the spatial mean of every teacher final-conv channel (N×C .npy)."""
    _setup()
    from mqttinfer.train.engine import setup_torch
    from mqttinfer.train.pipeline import stage_activations

    config = _config(preset, {"export": {"name": name}})
    setup_torch(threads)
    path = stage_activations(_run_dir(run_dir, config), data_dir)
    typer.echo(f"wrote {path}")


@app.command()
def partition(
    *,
    run_dir: RunDirOpt = None,
    preset: PresetOpt = None,
    name: NameOpt = None,
    k: KOpt = None,
    method: MethodOpt = None,
    rule: RuleOpt = None,
    resolution: ResolutionOpt = None,
    balance: BalanceOpt = None,
    drop_p0: DropP0Opt = None,
    epsilon: EpsilonOpt = None,
    seed: SeedOpt = None,
    data_dir: DataDirOpt = None,
    plan: PlanOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Cut the filter activation network into K partitions: <run-dir>/partition.json."""
    _setup()
    from mqttinfer.train.engine import setup_torch
    from mqttinfer.train.pipeline import stage_partition

    config = _config(
        preset,
        {
            "partition": {
                "k": k,
                "method": method,
                "rule": rule,
                "resolution": resolution,
                "balance": balance,
                "drop_p0": drop_p0,
                "epsilon": epsilon,
                "seed": seed,
            },
            "export": {"name": name},
        },
    )
    setup_torch(threads)
    document = stage_partition(_run_dir(run_dir, config), config, data_dir, plan)
    typer.echo(
        f"{len(document['partitions'])} partitions, sizes {document['sizes']}, "
        f"removed {len(document['removed'])} filters, ncut {document['ncut']:.4f}"
    )


@app.command()
def students(
    *,
    run_dir: RunDirOpt = None,
    preset: PresetOpt = None,
    name: NameOpt = None,
    arch: StudentArchOpt = None,
    epochs: StudentEpochsOpt = None,
    lr: StudentLrOpt = None,
    batch_size: BatchOpt = None,
    alpha: AlphaOpt = None,
    tau: TauOpt = None,
    beta: BetaOpt = None,
    at_mode: AtModeOpt = None,
    partition_dropout: DropoutOpt = None,
    head_epochs: HeadEpochsOpt = None,
    seed: SeedOpt = None,
    data_dir: DataDirOpt = None,
    resume: ResumeOpt = True,
    progress: ProgressOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Distil one student per partition (KD + activation transfer) and fit both heads."""
    _setup()
    from mqttinfer.train.engine import progress_bar, setup_torch
    from mqttinfer.train.partitioning import load_partition
    from mqttinfer.train.pipeline import stage_students

    sections: dict[str, dict[str, Any]] = {
        "students": {
            "archs": arch,
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "alpha": alpha,
            "tau": tau,
            "beta": beta,
            "at_mode": at_mode,
            "partition_dropout": partition_dropout,
            "head_epochs": head_epochs,
            "seed": seed,
        },
        "export": {"name": name},
    }
    base = _config(preset, {"export": {"name": name}})
    directory = _run_dir(run_dir, base)
    document = load_partition(directory)
    sections["partition"] = {"k": len(document["partitions"])}
    if arch is None and document.get("student_archs"):
        sections["students"]["archs"] = ",".join(document["student_archs"])
    config = _config(preset, sections)
    setup_torch(threads)
    with progress_bar(progress) as bar:
        state = stage_students(directory, config, bar, resume, data_dir)
    for head_name, head in state["heads"].items():
        typer.echo(f"{head_name} head: val {head['val']['accuracy']:.4f}")


@app.command()
def export(
    *,
    run_dir: RunDirOpt = None,
    out: OutOpt = None,
    preset: PresetOpt = None,
    name: NameOpt = None,
    teacher_onnx: TeacherOnnxOpt = None,
    with_activations: ActsOpt = None,
    max_bundle_mb: MaxMbOpt = None,
    atol: AtolOpt = None,
    data_dir: DataDirOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Write the bundle (ONNX students, heads, bundle.json), checked against torch."""
    _setup()
    from mqttinfer.train.engine import setup_torch
    from mqttinfer.train.pipeline import stage_export

    config = _config(
        preset,
        {
            "export": {
                "name": name,
                "include_teacher": teacher_onnx,
                "include_activations": with_activations,
                "max_bundle_mb": max_bundle_mb,
                "atol": atol,
            }
        },
    )
    setup_torch(threads)
    directory = _run_dir(run_dir, config)
    meta = stage_export(directory, out or directory / "bundle", config, None, data_dir)
    _summary(meta, out or directory / "bundle")


@app.command("all")
def all_stages(
    *,
    preset: PresetOpt = None,
    run_dir: RunDirOpt = None,
    out: OutOpt = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    limit_train: LimitTrainOpt = None,
    limit_test: LimitTestOpt = None,
    val_fraction: ValFractionOpt = None,
    seed: SeedOpt = None,
    teacher_arch: TeacherArchOpt = None,
    teacher_epochs: TeacherEpochsOpt = None,
    teacher_lr: TeacherLrOpt = None,
    batch_size: BatchOpt = None,
    k: KOpt = None,
    method: MethodOpt = None,
    rule: RuleOpt = None,
    resolution: ResolutionOpt = None,
    balance: BalanceOpt = None,
    drop_p0: DropP0Opt = None,
    epsilon: EpsilonOpt = None,
    student_arch: StudentArchOpt = None,
    student_epochs: StudentEpochsOpt = None,
    student_lr: StudentLrOpt = None,
    alpha: AlphaOpt = None,
    tau: TauOpt = None,
    beta: BetaOpt = None,
    at_mode: AtModeOpt = None,
    partition_dropout: DropoutOpt = None,
    head_epochs: HeadEpochsOpt = None,
    name: NameOpt = None,
    teacher_onnx: TeacherOnnxOpt = None,
    with_activations: ActsOpt = None,
    max_bundle_mb: MaxMbOpt = None,
    atol: AtolOpt = None,
    plan: PlanOpt = None,
    resume: ResumeOpt = True,
    progress: ProgressOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """teacher → activations → partition → students → export, in one go (resumable)."""
    _setup()
    from mqttinfer.train.partitioning import partition_from_plan
    from mqttinfer.train.pipeline import run_all

    if plan is not None:
        planned, planned_archs = partition_from_plan(plan)
        k = len(planned["partitions"])
        student_arch = student_arch or ",".join(planned_archs)

    config = _config(
        preset,
        {
            "data": _data(
                dataset=dataset,
                data_dir=data_dir,
                limit_train=limit_train,
                limit_test=limit_test,
                val_fraction=val_fraction,
                seed=seed,
            ),
            "teacher": {
                "arch": teacher_arch,
                "epochs": teacher_epochs,
                "lr": teacher_lr,
                "batch_size": batch_size,
                "seed": seed,
            },
            "partition": {
                "k": k,
                "method": method,
                "rule": rule,
                "resolution": resolution,
                "balance": balance,
                "drop_p0": drop_p0,
                "epsilon": epsilon,
                "seed": seed,
            },
            "students": {
                "archs": student_arch,
                "epochs": student_epochs,
                "lr": student_lr,
                "batch_size": batch_size,
                "alpha": alpha,
                "tau": tau,
                "beta": beta,
                "at_mode": at_mode,
                "partition_dropout": partition_dropout,
                "head_epochs": head_epochs,
                "seed": seed,
            },
            "export": {
                "name": name,
                "include_teacher": teacher_onnx,
                "include_activations": with_activations,
                "max_bundle_mb": max_bundle_mb,
                "atol": atol,
            },
        },
    )
    directory = _run_dir(run_dir, config)
    bundle_dir = out or directory / "bundle"
    meta = run_all(
        config,
        directory,
        bundle_dir,
        preset=preset,
        resume=resume,
        show_progress=progress,
        threads=threads,
        plan=plan,
    )
    _summary(meta, bundle_dir)


def _summary(meta: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    acc = meta["accuracy"]
    table = Table(title=f"bundle {meta['name']} → {out}")
    table.add_column("what")
    table.add_column("value", justify="right")
    teacher_info = meta["teacher"]
    table.add_row(
        f"teacher {teacher_info['arch']}",
        f"{acc['teacher']:.4f}  ({teacher_info['macs'] / 1e6:.1f} M MACs)",
    )
    for entry in meta["students"]:
        table.add_row(
            f"student {entry['partition']} {entry['arch']} → {entry['output_channels']} ch",
            f"{entry['params']} params, {entry['macs'] / 1e6:.2f} M MACs",
        )
    table.add_row("ensemble (dropout head, torch)", f"{acc['ensemble']:.4f}")
    table.add_row("ensemble (dropout head, onnxruntime)", f"{acc['ensemble_onnx']:.4f}")
    table.add_row("ensemble (plain head)", f"{acc['ensemble_plain_head']:.4f}")
    for key, value in acc["missing_one"].items():
        plain = acc["missing_one_plain_head"][key]
        table.add_row(
            f"partition {key} missing (dropout / plain head)", f"{value:.4f} / {plain:.4f}"
        )
    Console().print(table)
