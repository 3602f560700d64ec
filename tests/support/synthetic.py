"""Tiny synthetic bundles for tests: real ONNX students with a known numpy ensemble function.

Each student is ``Relu(Conv3x3(x, stride 2, pad 1))`` producing a [N, c_k, H/2, W/2] feature
map; the aggregator's result must equal ``reference_logits`` (pooling, concatenation in
partition order, then the FC head) within fp16 tolerance.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

MEAN, STD, SCALE = 0.5, 0.25, 1.0 / 255.0


@dataclass
class SyntheticBundle:
    path: Path
    shape: tuple[int, int, int]
    kernels: list[npt.NDArray[np.float32]]
    biases: list[npt.NDArray[np.float32]]
    head_weight: npt.NDArray[np.float32]
    head_bias: npt.NDArray[np.float32]

    @property
    def num_partitions(self) -> int:
        return len(self.kernels)

    def normalise(self, frames_u8: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        x = frames_u8.astype(np.float32).reshape(-1, *self.shape)
        return ((x * SCALE - MEAN) / STD).astype(np.float32)

    def student_features(self, frames_u8: npt.NDArray[np.uint8], k: int) -> npt.NDArray[np.float32]:
        """Pooled features of student k, computed with numpy (no onnxruntime)."""
        x = self.normalise(frames_u8)
        padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
        windows = windows[:, :, ::2, ::2]  # stride 2: [N, C, H', W', 3, 3]
        out: npt.NDArray[np.float32] = (
            np.einsum("nchwij,ocij->nohw", windows, self.kernels[k]) + self.biases[k][:, None, None]
        )
        pooled: npt.NDArray[np.float32] = np.maximum(out, 0).mean(axis=(2, 3)).astype(np.float32)
        return pooled

    def reference_logits(
        self, frames_u8: npt.NDArray[np.uint8], missing: tuple[int, ...] = ()
    ) -> npt.NDArray[np.float32]:
        feats = []
        for k in range(self.num_partitions):
            f = self.student_features(frames_u8, k)
            feats.append(np.zeros_like(f) if k in missing else f)
        x = np.concatenate(feats, axis=1)
        return (x @ self.head_weight.T + self.head_bias).astype(np.float32)


def _student_model(
    kernel: npt.NDArray[np.float32], bias: npt.NDArray[np.float32], shape: tuple[int, int, int]
) -> onnx.ModelProto:
    c, h, w = shape
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, h, w])
    out = helper.make_tensor_value_info(
        "features", TensorProto.FLOAT, ["N", kernel.shape[0], (h + 1) // 2, (w + 1) // 2]
    )
    nodes = [
        helper.make_node(
            "Conv",
            ["input", "W", "B"],
            ["conv"],
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["conv"], ["features"]),
    ]
    graph = helper.make_graph(
        nodes,
        "student",
        [inp],
        [out],
        initializer=[numpy_helper.from_array(kernel, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def build_synthetic_bundle(
    root: Path,
    *,
    partition_sizes: tuple[int, ...] = (6, 5),
    shape: tuple[int, int, int] = (1, 8, 8),
    num_classes: int = 4,
    seed: int = 0,
    name: str = "synthetic",
) -> SyntheticBundle:
    """Write a complete bundle directory under ``root`` and return its reference model."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    kernels, biases, students, partitions = [], [], [], []
    next_filter = 0
    for k, size in enumerate(partition_sizes):
        kernel = rng.normal(0, 0.5, (size, shape[0], 3, 3)).astype(np.float32)
        bias = rng.normal(0, 0.1, size).astype(np.float32)
        data = _student_model(kernel, bias, shape).SerializeToString()
        file = root / f"student-{k}.onnx"
        file.write_bytes(data)
        kernels.append(kernel)
        biases.append(bias)
        partitions.append({"id": k, "filters": list(range(next_filter, next_filter + size))})
        next_filter += size
        students.append(
            {
                "partition": k,
                "arch": "synthetic-conv3x3",
                "file": file.name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "params": int(kernel.size),
                "macs": int(kernel.size * (shape[1] // 2) * (shape[2] // 2)),
                "output_channels": size,
            }
        )
    head_w = rng.normal(0, 1.0, (num_classes, next_filter)).astype(np.float32)
    head_b = rng.normal(0, 0.1, num_classes).astype(np.float32)
    np.savez(root / "head.npz", weight=head_w, bias=head_b)
    meta = {
        "format": "mqttinfer-bundle",
        "version": 1,
        "name": name,
        "dataset": {"name": "synthetic", "classes": [f"c{i}" for i in range(num_classes)]},
        "input": {
            "shape": list(shape),
            "dtype": "uint8",
            "scale": SCALE,
            "mean": [MEAN] * shape[0],
            "std": [STD] * shape[0],
        },
        "teacher": {"arch": "none", "final_channels": next_filter, "file": None},
        "partitions": partitions,
        "students": students,
        "head": {"file": "head.npz", "in_features": next_filter, "num_classes": num_classes},
        "accuracy": {},
    }
    (root / "bundle.json").write_text(json.dumps(meta, indent=2))
    return SyntheticBundle(root, shape, kernels, biases, head_w, head_b)


def random_frames(
    count: int, shape: tuple[int, int, int] = (1, 8, 8), seed: int = 1
) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)
