"""Analytic cost of candidate student architectures (no torch).

A student is a backbone followed by a 1×1 convolution (with bias) to ``|P_k|`` channels, the
size of the partition it mimics. Two families, counted exactly as ``mqttinfer.train.models``
builds them:

- ``wrn-<d>-<k>``: pre-activation WideResNet; stem 3×3 conv to 16 channels, three groups of
  n = (d−4)/6 BN-ReLU-conv3×3-BN-ReLU-conv3×3 blocks of widths round(16k), round(32k),
  round(64k) (strides 1, 2, 2; 1×1 projection shortcut where the shape changes), final BN.
- ``mobilenetv2[-<w>]``: CIFAR-style MobileNetV2 (stride 1 in the stem and the first two
  stages), channels rounded to multiples of 8 as torchvision does, no 1280-channel last conv.

Parameters count conv weights, conv biases and BN affine weights (not running statistics).
MACs count convolutions only (BN folds into the convs at export; ReLU and pooling are free),
for one image. Memory is the fp32 weights plus the two largest consecutive activation maps
(what an inference runtime must hold at its peak), an estimate that excludes the runtime
itself.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from mqttinfer.errors import ConfigError

log = logging.getLogger(__name__)

Family = Literal["wrn", "mobilenetv2"]
InputShape = tuple[int, int, int]

BYTES_PER_PARAM = 4
BYTES_PER_ACTIVATION = 4
DEFAULT_INPUT_SHAPE: InputShape = (3, 32, 32)
DEFAULT_CANDIDATES: tuple[str, ...] = (
    "wrn-10-1",
    "wrn-16-1",
    "wrn-16-2",
    "wrn-22-1",
    "mobilenetv2-0.5",
    "mobilenetv2",
)

_WRN = re.compile(r"^wrn-(\d+)-(\d+(?:\.\d+)?)$")
_MBV2 = re.compile(r"^(?:mobilenetv2|mbv2)(?:-(\d+(?:\.\d+)?))?$")
# (expansion t, output channels c, repeats n, stride s) with CIFAR-style strides.
MBV2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


@dataclass(frozen=True, slots=True)
class Architecture:
    """A parsed student architecture name."""

    family: Family
    depth: int
    width: float

    @property
    def name(self) -> str:
        """Canonical spelling: wrn-16-2, wrn-10-0.5, mobilenetv2, mobilenetv2-0.5."""
        width = f"{self.width:g}"
        if self.family == "wrn":
            return f"wrn-{self.depth}-{width}"
        return "mobilenetv2" if self.width == 1.0 else f"mobilenetv2-{width}"

    @property
    def blocks_per_group(self) -> int:
        """WRN only: residual blocks in each of the three groups (depth = 6n + 4)."""
        return (self.depth - 4) // 6


@dataclass(frozen=True, slots=True)
class StudentCost:
    """What one student costs on one image."""

    arch: str
    output_channels: int
    params: int
    macs: int
    memory_bytes: int


def parse_architecture(text: str, *, source: str = "candidates") -> Architecture:
    """Parse ``wrn-<d>-<k>`` or ``mobilenetv2[-<w>]``; ConfigError naming the fix otherwise."""
    name = str(text).strip().lower()
    wrn = _WRN.match(name)
    if wrn:
        depth, width = int(wrn.group(1)), float(wrn.group(2))
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ConfigError(
                f"WRN depth {depth} in {text!r} is not 6n+4 with n ≥ 1",
                source=source,
                fix="use a depth of 10, 16, 22, 28, 40 ...",
            )
        if not 0.0 < width <= 16.0:
            raise ConfigError(
                f"WRN width {width:g} in {text!r} is out of range",
                source=source,
                fix="use a width in (0, 16]",
            )
        return Architecture("wrn", depth, width)
    mbv2 = _MBV2.match(name)
    if mbv2:
        width = float(mbv2.group(1)) if mbv2.group(1) else 1.0
        if not 0.0 < width <= 4.0:
            raise ConfigError(
                f"MobileNetV2 width multiplier {width:g} in {text!r} is out of range",
                source=source,
                fix="use a multiplier in (0, 4]",
            )
        return Architecture("mobilenetv2", 0, width)
    raise ConfigError(
        f"unknown student architecture {text!r}",
        source=source,
        fix="use wrn-<depth>-<width> (e.g. wrn-16-2) or mobilenetv2[-<width>] "
        "(e.g. mobilenetv2-0.5)",
    )


# --------------------------------------------------------------------------- counting


class _Counter:
    """Walks a network layer by layer, tracking shape, parameters, MACs and peak memory."""

    def __init__(self, input_shape: InputShape) -> None:
        self.channels, self.height, self.width = input_shape
        self.params = 0
        self.macs = 0
        self.peak_activations = 0
        self._note_activation(self.channels * self.height * self.width, 0)

    def conv(
        self,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        *,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        before = self.channels * self.height * self.width
        padding = kernel // 2
        self.height = (self.height + 2 * padding - kernel) // stride + 1
        self.width = (self.width + 2 * padding - kernel) // stride + 1
        weights = out_channels * (self.channels // groups) * kernel * kernel
        self.params += weights + (out_channels if bias else 0)
        self.macs += weights * self.height * self.width
        self.channels = out_channels
        self._note_activation(before, out_channels * self.height * self.width)

    def batch_norm(self) -> None:
        self.params += 2 * self.channels

    def _note_activation(self, before: int, after: int) -> None:
        self.peak_activations = max(self.peak_activations, before + after)


def _wrn_widths(arch: Architecture) -> tuple[int, int, int, int]:
    k = arch.width
    return 16, max(1, round(16 * k)), max(1, round(32 * k)), max(1, round(64 * k))


def _count_wrn(counter: _Counter, arch: Architecture) -> None:
    stem, *groups = _wrn_widths(arch)
    counter.conv(stem, 3)
    blocks = (arch.depth - 4) // 6
    for index, width in enumerate(groups):
        for block in range(blocks):
            stride = 2 if index > 0 and block == 0 else 1
            _count_preact_block(counter, width, stride)
    counter.batch_norm()


def _count_preact_block(counter: _Counter, width: int, stride: int) -> None:
    cin, height, in_width = counter.channels, counter.height, counter.width
    counter.batch_norm()
    if stride != 1 or cin != width:
        shortcut = _Counter((cin, height, in_width))
        shortcut.conv(width, 1, stride)
        counter.params += shortcut.params
        counter.macs += shortcut.macs
    counter.conv(width, 3, stride)
    counter.batch_norm()
    counter.conv(width, 3)


def _divisible(value: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: nearest multiple of 8, never below 90% of ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _count_mobilenetv2(counter: _Counter, arch: Architecture) -> None:
    counter.conv(_divisible(32 * arch.width), 3)
    counter.batch_norm()
    for expand, channels, repeats, stride in MBV2_SETTINGS:
        out = _divisible(channels * arch.width)
        for index in range(repeats):
            hidden = counter.channels * expand
            if expand != 1:
                counter.conv(hidden, 1)
                counter.batch_norm()
            counter.conv(hidden, 3, stride if index == 0 else 1, groups=hidden)
            counter.batch_norm()
            counter.conv(out, 1)
            counter.batch_norm()


@functools.lru_cache(maxsize=4096)
def student_cost(arch: str, input_shape: InputShape, output_channels: int) -> StudentCost:
    """Parameters, MACs and memory of student ``arch`` ending in ``output_channels`` channels."""
    spec = parse_architecture(arch)
    _check_shape(input_shape)
    if output_channels < 1:
        raise ValueError(f"a student needs at least one output channel; got {output_channels}")
    counter = _Counter(input_shape)
    if spec.family == "wrn":
        _count_wrn(counter, spec)
    else:
        _count_mobilenetv2(counter, spec)
    counter.conv(output_channels, 1, bias=True)
    memory = counter.params * BYTES_PER_PARAM + counter.peak_activations * BYTES_PER_ACTIVATION
    return StudentCost(spec.name, output_channels, counter.params, counter.macs, memory)


def _check_shape(shape: Sequence[int]) -> None:
    if len(shape) != 3 or any(int(size) < 1 for size in shape):
        raise ValueError(f"input shape must be three positive sizes C,H,W; got {tuple(shape)}")


def parse_input_shape(text: str, *, source: str = "--input-shape") -> InputShape:
    """``"1,28,28"`` (or ``1x28x28``) → (1, 28, 28); ConfigError naming the fix otherwise."""
    pieces = [piece for piece in re.split(r"[,x× ]+", text.strip()) if piece]
    try:
        sizes = tuple(int(piece) for piece in pieces)
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise ConfigError(
            f"cannot read input shape {text!r}",
            source=source,
            fix="give three positive integers C,H,W, e.g. 1,28,28 or 3,32,32",
        )
    return (sizes[0], sizes[1], sizes[2])


# --------------------------------------------------------------------------- candidate lists


def canonical_candidates(names: Iterable[str], *, source: str = "candidates") -> tuple[str, ...]:
    """Validate and canonicalise architecture names, dropping duplicates (order kept)."""
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(parse_architecture(name, source=source).name, None)
    if not seen:
        raise ConfigError(
            "the candidate list is empty", source=source, fix="list at least one architecture"
        )
    return tuple(seen)


def load_candidates(path: str | Path) -> tuple[str, ...]:
    """Read a candidates YAML file: ``candidates: [wrn-16-1, mobilenetv2-0.5, ...]``."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(
            f"cannot read candidates file: {err.strerror}",
            source=source,
            fix="pass an existing YAML file with a 'candidates:' list",
        ) from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"not valid YAML: {err}", source=source, fix="fix the YAML syntax"
        ) from None
    if not isinstance(document, dict) or set(document) != {"candidates"}:
        raise ConfigError(
            "expected exactly one top-level key 'candidates'",
            source=source,
            field="candidates",
            fix="write 'candidates: [wrn-16-1, wrn-16-2, mobilenetv2-0.5]'",
        )
    names = document["candidates"]
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ConfigError(
            "must be a list of architecture names",
            source=source,
            field="candidates",
            fix="write 'candidates: [wrn-16-1, wrn-16-2, mobilenetv2-0.5]'",
        )
    return canonical_candidates(names, source=f"{source}: candidates")


def catalog_table(
    names: Iterable[str], input_shape: InputShape, output_channels: int
) -> list[StudentCost]:
    """Costs of every candidate for one partition size, smallest MACs first."""
    costs = [student_cost(name, input_shape, output_channels) for name in names]
    return sorted(costs, key=lambda cost: (cost.macs, cost.params, cost.arch))


def params_per_mac(cost: StudentCost) -> float:
    """Parameters per MAC: what eq. (5) rewards when accuracy ∝ size and delay ∝ MACs."""
    return cost.params / max(1, cost.macs) if math.isfinite(cost.params) else 0.0
