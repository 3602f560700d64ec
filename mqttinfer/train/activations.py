"""Stage 2: the per-image filter activations a_i of the teacher's final convolution.

For every validation image, a_i is the spatial mean of teacher final-conv channel i taken
after the final BN+ReLU (NoNN §4.2). The result is saved as an ``N×C`` float32 ``.npy`` so
the partitioner (:mod:`mqttinfer.partition`) and the planner work without torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from torch import Tensor

from mqttinfer.train.engine import predict
from mqttinfer.train.teacher import build_teacher, data_from_checkpoint

log = logging.getLogger(__name__)

ACTIVATIONS_FILE = "activations.npy"


def compute_activations(
    state: dict[str, Any], data_dir: str | None = None
) -> npt.NDArray[np.float32]:
    """``[N_val, C]`` float32 spatial means of the teacher's final activation map."""
    model = build_teacher(state)
    ctx = data_from_checkpoint(state, data_dir)

    def pooled(x: Tensor) -> Tensor:
        return model.features(x).mean(dim=(2, 3))

    acts = predict(pooled, ctx.splits.val, ctx.normalize).numpy().astype(np.float32)
    log.info("filter activations: %d validation images x %d channels", *acts.shape)
    return np.ascontiguousarray(acts)


def save_activations(run_dir: Path, acts: npt.NDArray[np.float32]) -> Path:
    """Write ``run_dir/activations.npy`` and return its path."""
    path = run_dir / ACTIVATIONS_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, acts)
    return path
