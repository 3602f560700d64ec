"""The onnxruntime adapter: the only module of mqttinfer that imports onnxruntime.

A :class:`StudentRunner` loads one student (verifying its sha256 first), warms it up, turns a
uint8 frame into the model input as the role's ``InputSpec`` says
(``x = (frame * scale - mean[c]) / std[c]``, float32 NCHW), runs it, and returns a 1-D float32
feature vector: global-average-pooled when the model outputs a feature map, since the head is
pool + FC and a pooled partial is what travels over the (slow) link.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from mqttinfer.errors import InferenceError, RoleError
from mqttinfer.protocol import InputSpec, Role

log = logging.getLogger(__name__)

_FRAME_DTYPES = (np.uint8, np.float16, np.float32)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_model(path: Path, expected_sha256: str | None) -> bytes:
    """The model file's bytes, after checking it exists and matches ``expected_sha256``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RoleError(
            f"cannot read the model file ({exc.strerror})",
            source=str(path),
            field="model.file",
            fix="fix the path (relative paths are relative to the role file)",
        ) from exc
    check_sha256(data, expected_sha256, str(path))
    return data


def check_sha256(data: bytes, expected: str | None, source: str) -> None:
    if expected is None:
        return
    actual = sha256_bytes(data)
    if actual != expected:
        raise RoleError(
            f"model sha256 is {actual}, the role expects {expected}",
            source=source,
            field="model.sha256",
            fix="ship the model the plan names, or update the role's sha256",
        )


class StudentRunner:
    """One loaded, warmed-up student. ``features(frame)`` is thread-safe."""

    def __init__(
        self,
        model: bytes,
        spec: InputSpec,
        *,
        name: str = "model",
        threads: int = 1,
        pool: bool = True,
        warmup_runs: int = 2,
    ) -> None:
        if not 1 <= threads <= 64:
            raise ValueError(f"threads must be 1..64, got {threads}")
        self.name = name
        self.spec = spec
        self.pool = pool
        self.shape = _chw(spec, name)
        self._scale, self._offset = _affine(spec, self.shape[0], name)
        self._session = _session(model, name, threads)
        inp = self._session.get_inputs()[0]
        self._input_name: str = inp.name
        self._output_name: str = self._session.get_outputs()[0].name
        _check_input_shape(inp.shape, self.shape, name)
        start = time.perf_counter()
        zeros = np.zeros(self.shape, dtype=np.uint8)
        features = self.features(zeros)
        # The last warm-up run, once the first one's one-off set-up is paid: what a frame costs.
        self.warm_run_ms = (time.perf_counter() - start) * 1000.0
        for _ in range(max(0, warmup_runs - 1)):
            run_start = time.perf_counter()
            self.features(zeros)
            self.warm_run_ms = (time.perf_counter() - run_start) * 1000.0
        self.warmup_ms = (time.perf_counter() - start) * 1000.0
        self.output_dim = int(features.shape[0])
        log.info(
            "loaded %s: input %s, %d features, warm-up %.1f ms on %d thread(s)",
            name,
            self.shape,
            self.output_dim,
            self.warmup_ms,
            threads,
        )

    @classmethod
    def from_file(
        cls, path: Path, spec: InputSpec, *, sha256: str | None, **kwargs: Any
    ) -> StudentRunner:
        return cls(read_model(path, sha256), spec, name=str(path), **kwargs)

    @classmethod
    def from_role(cls, role: Role, *, base_dir: Path | None = None, **kwargs: Any) -> StudentRunner:
        """Load ``role.model.file`` (relative to ``base_dir``) and check it against the role."""
        if role.model.file is None:
            raise RoleError(
                "the role names no local model file",
                field="model.file",
                fix="set model.file, or let the device fetch the model from the broker",
            )
        path = Path(role.model.file)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        kwargs.setdefault("pool", role.pool)
        return cls.from_file(path, role.input, sha256=role.model.sha256, **kwargs)

    def preprocess(self, frame: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """The model input [1, C, H, W] for one frame; InferenceError when it does not fit.

        Accepted layouts: [C, H, W], [1, C, H, W], [H, W] when C = 1, and [H, W, C] when
        that cannot be mistaken for [C, H, W].
        """
        arr = np.asarray(frame)
        if arr.dtype not in _FRAME_DTYPES:
            raise InferenceError(f"{self.name}: frame dtype {arr.dtype} is not uint8/f16/f32")
        chw = self._as_chw(arr)
        x = chw.astype(np.float32) * self._scale - self._offset
        return x[np.newaxis]

    def _as_chw(self, arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
        c, h, w = self.shape
        if arr.shape == (c, h, w):
            return arr
        if arr.shape == (1, c, h, w):
            return arr.reshape(c, h, w)
        if c == 1 and arr.shape == (h, w):
            return arr[np.newaxis]
        if arr.shape == (h, w, c):
            return np.transpose(arr, (2, 0, 1))
        raise InferenceError(
            f"{self.name}: frame shape {list(arr.shape)} does not fit the model input "
            f"[C, H, W] = {list(self.shape)}"
        )

    def run(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Run a preprocessed input; the 1-D float32 feature vector."""
        try:
            outputs = self._session.run([self._output_name], {self._input_name: x})
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InferenceError(f"{self.name}: onnxruntime failed ({exc})") from exc
        out = np.asarray(outputs[0], dtype=np.float32)
        if out.ndim == 4 and self.pool:
            out = out.mean(axis=(2, 3))
        if out.ndim < 1 or out.shape[0] != 1:
            raise InferenceError(f"{self.name}: output shape {list(out.shape)} has no batch of 1")
        return np.ascontiguousarray(out.reshape(-1), dtype=np.float32)

    def features(self, frame: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        return self.run(self.preprocess(frame))


def _chw(spec: InputSpec, name: str) -> tuple[int, int, int]:
    shape = tuple(int(d) for d in spec.shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3:
        raise RoleError(
            f"input shape {list(spec.shape)} is not [C, H, W] or [H, W]",
            source=name,
            field="input.shape",
        )
    return shape[0], shape[1], shape[2]


def _affine(
    spec: InputSpec, channels: int, name: str
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(scale / std, mean / std) per channel, shaped [C, 1, 1]: x = u8 * a - b."""
    values = {}
    for field, seq in (("mean", spec.mean), ("std", spec.std)):
        if len(seq) not in (1, channels):
            raise RoleError(
                f"{len(seq)} values for {channels} channels",
                source=name,
                field=f"input.{field}",
                fix="give one value, or one per channel",
            )
        values[field] = np.broadcast_to(np.asarray(seq, dtype=np.float32), (channels,))
    std = values["std"]
    scale = (np.float32(spec.scale) / std).reshape(channels, 1, 1).astype(np.float32)
    offset = (values["mean"] / std).reshape(channels, 1, 1).astype(np.float32)
    return scale, offset


def _session(model: bytes, name: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise InferenceError(f"{name}: onnxruntime cannot load the model ({exc})") from exc


def _check_input_shape(model_shape: list[Any], chw: tuple[int, int, int], name: str) -> None:
    """The model's declared input must be [N, C, H, W] with fixed dims equal to the role's."""
    if len(model_shape) != 4:
        raise RoleError(
            f"model input has rank {len(model_shape)}, expected [N, C, H, W]",
            source=name,
            field="input.shape",
        )
    for declared, wanted in zip(model_shape[1:], chw, strict=True):
        if isinstance(declared, int) and declared != wanted:
            raise RoleError(
                f"model input {model_shape} does not match the role's input shape {list(chw)}",
                source=name,
                field="input.shape",
                fix="use the model and role from the same bundle/plan",
            )
