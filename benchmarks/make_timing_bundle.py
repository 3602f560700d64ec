"""Write the TIMING bundle: a random-weight WRN-16-4 teacher and 4 WRN-16-1 students (32×32×3).

    .venv/bin/python benchmarks/make_timing_bundle.py [--out bench-results/timing-bundle]

The weights are random (He-normal init, untrained): the bundle is for latency and byte
measurements only (``mqttinfer bench latency --bundle bench-results/timing-bundle``); its
accuracy is meaningless and its ``bundle.json`` says so. It is the RoCoIn/NoNN CIFAR-10 shape:
the teacher's final conv has 4·64 = 256 channels, cut into 4 contiguous partitions of 64, one
WRN-16-1 student each (ending in a 1×1 conv to 64 channels), and the FC head takes the 256
pooled features. The models come from ``mqttinfer.train.models`` and are exported by
``mqttinfer.train.export.export_onnx`` (single-file ONNX, opset 18), so they are the very
graphs a trained bundle would contain. Needs the train extra (torch, onnx, onnxscript).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

# Run as a script from a checkout: make the repository's mqttinfer importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_OUT = Path("bench-results/timing-bundle")
INPUT_SHAPE = (3, 32, 32)
TEACHER_ARCH = "wrn-16-4"
STUDENT_ARCH = "wrn-16-1"
PARTITIONS = 4
NUM_CLASSES = 10
# CIFAR-10 channel statistics: any fixed values do for timing.
MEAN = [0.4914, 0.4822, 0.4465]
STD = [0.2470, 0.2435, 0.2616]

log = logging.getLogger("make_timing_bundle")


def build(out: Path, seed: int) -> dict[str, Any]:
    """Export the teacher, the students and a random head into ``out``; return bundle.json."""
    import torch  # noqa: TID251 - an offline script of the train extra, like mqttinfer.train

    from mqttinfer.bundle import sha256_file
    from mqttinfer.train.arch import parse_arch
    from mqttinfer.train.export import check_onnx, export_onnx
    from mqttinfer.train.models import Classifier, Student, count_cost

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.onnx"):
        old.unlink()
    channels = INPUT_SHAPE[0]
    example = torch.randn(4, *INPUT_SHAPE)
    teacher = Classifier(parse_arch(TEACHER_ARCH), channels, NUM_CLASSES).eval()
    final = teacher.final_channels
    export_onnx(teacher, example, out / "teacher.onnx", input_name="input", output_name="logits")
    check_onnx(teacher, example, out / "teacher.onnx", atol=1e-3)
    teacher_cost = count_cost(teacher, INPUT_SHAPE)
    width = final // PARTITIONS
    partitions = [list(range(k * width, (k + 1) * width)) for k in range(PARTITIONS)]
    students = []
    for k, filters in enumerate(partitions):
        student = Student(parse_arch(STUDENT_ARCH), channels, len(filters)).eval()
        path = out / f"student-{k}.onnx"
        export_onnx(student, example, path, input_name="input", output_name="features")
        check_onnx(student, example, path, atol=1e-3)
        cost = count_cost(student, INPUT_SHAPE)
        students.append(
            {
                "partition": k,
                "arch": STUDENT_ARCH,
                "file": path.name,
                "sha256": sha256_file(path),
                "params": cost.params,
                "macs": cost.macs,
                "output_channels": len(filters),
            }
        )
        log.info("student %d: %d params, %.1f M MACs", k, cost.params, cost.macs / 1e6)
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(final)
    weight = rng.uniform(-bound, bound, (NUM_CLASSES, final)).astype(np.float32)
    np.savez(out / "head.npz", weight=weight, bias=np.zeros(NUM_CLASSES, dtype=np.float32))
    meta: dict[str, Any] = {
        "format": "mqttinfer-bundle",
        "version": 1,
        "name": "timing-wrn16-4",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "timing_only": True,
        "note": "RANDOM WEIGHTS: for latency and byte measurements only; accuracy is meaningless",
        "dataset": {
            "name": "none (random weights)",
            "classes": [f"class-{i}" for i in range(NUM_CLASSES)],
        },
        "input": {
            "shape": list(INPUT_SHAPE),
            "dtype": "uint8",
            "scale": 1.0 / 255.0,
            "mean": MEAN,
            "std": STD,
        },
        "teacher": {
            "arch": TEACHER_ARCH,
            "params": teacher_cost.params,
            "macs": teacher_cost.macs,
            "final_channels": final,
            "accuracy": None,
            "file": "teacher.onnx",
            "sha256": sha256_file(out / "teacher.onnx"),
        },
        "partitions": [{"id": k, "filters": p} for k, p in enumerate(partitions)],
        "students": students,
        "head": {"file": "head.npz", "in_features": final, "num_classes": NUM_CLASSES},
        "accuracy": {},
    }
    (out / "bundle.json").write_text(json.dumps(meta, indent=1) + "\n")
    log.info(
        "teacher %s: %d params, %.1f M MACs; wrote %s",
        TEACHER_ARCH,
        teacher_cost.params,
        teacher_cost.macs / 1e6,
        out,
    )
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="bundle directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        from mqttinfer.train.deps import require_train_extra

        require_train_extra("torch", "onnx", "onnxscript")
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    build(args.out, args.seed)
    from mqttinfer.bundle import Bundle

    Bundle.load(args.out).verify()
    print(f"timing bundle (random weights) written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
