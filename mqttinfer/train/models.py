"""Teacher and student networks: pre-activation WideResNet and CIFAR-style MobileNetV2.

Every model exposes ``features(x)``: the final convolutional activation map. For a teacher
that is the output of the final BN+ReLU (the "fconv" whose channels NoNN partitions); for a
student it is the output of the trailing 1×1 convolution to ``|P_k|`` channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as nnf

from mqttinfer.planner.catalog import MBV2_SETTINGS
from mqttinfer.train.arch import ArchSpec

_MBV2_LAST = 1280


def _divisible(value: float, divisor: int = 8) -> int:
    """Round channels as torchvision's MobileNetV2 does (never below 90% of ``value``)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def wrn_widths(spec: ArchSpec) -> tuple[int, int, int, int]:
    """Stem and group widths of WRN-d-k: 16, 16k, 32k, 64k (at least 1 channel each)."""
    k = spec.width
    return 16, max(1, round(16 * k)), max(1, round(32 * k)), max(1, round(64 * k))


class PreActBlock(nn.Module):
    """BN-ReLU-conv3×3-BN-ReLU-conv3×3 with an identity or 1×1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = nnf.relu(self.bn1(x))
        skip: Tensor = x if self.shortcut is None else self.shortcut(pre)
        out: Tensor = self.conv1(pre)
        out = nnf.relu(self.bn2(out))
        if self.dropout > 0:
            out = nnf.dropout(out, self.dropout, self.training)
        out = self.conv2(out)
        return out + skip


class WRNBackbone(nn.Module):
    """Pre-activation WRN up to (and including) the final BN+ReLU."""

    def __init__(self, spec: ArchSpec, in_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        stem, *groups = wrn_widths(spec)
        self.stem = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        layers: list[nn.Module] = []
        cin = stem
        for index, cout in enumerate(groups):
            for block in range(spec.blocks_per_group):
                stride = 2 if index > 0 and block == 0 else 1
                layers.append(PreActBlock(cin, cout, stride, dropout))
                cin = cout
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.out_channels: int = cin

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.blocks(self.stem(x))
        return nnf.relu(self.bn(out))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand, 3×3 depthwise, 1×1 linear projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [
                nn.Conv2d(cin, hidden, 1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU6(inplace=True),
            ]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.body(x)
        return x + out if self.residual else out


class MobileNetV2Backbone(nn.Module):
    """CIFAR-style MobileNetV2 up to the last inverted-residual stage.

    With ``last_conv`` it also has the final 1×1 conv to 1280·max(1, w) channels + BN + ReLU6
    (the teacher form); students replace that with their 1×1 conv to ``|P_k|`` channels.
    """

    def __init__(self, spec: ArchSpec, in_channels: int, *, last_conv: bool) -> None:
        super().__init__()
        width = spec.width
        stem = _divisible(32 * width)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU6(inplace=True),
        ]
        cin = stem
        for expand, channels, repeats, stride in MBV2_SETTINGS:
            cout = _divisible(channels * width)
            for index in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if index == 0 else 1, expand))
                cin = cout
        if last_conv:
            last = _divisible(_MBV2_LAST * max(1.0, width))
            layers += [
                nn.Conv2d(cin, last, 1, bias=False),
                nn.BatchNorm2d(last),
                nn.ReLU6(inplace=True),
            ]
            cin = last
        self.body = nn.Sequential(*layers)
        self.out_channels: int = cin

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.body(x)
        return out


def make_backbone(
    spec: ArchSpec, in_channels: int, *, student: bool
) -> WRNBackbone | MobileNetV2Backbone:
    """Backbone ending in a non-negative activation map (``.out_channels`` channels)."""
    if spec.family == "wrn":
        return WRNBackbone(spec, in_channels)
    return MobileNetV2Backbone(spec, in_channels, last_conv=not student)


class Classifier(nn.Module):
    """Teacher: backbone → global average pool → FC."""

    def __init__(self, spec: ArchSpec, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = make_backbone(spec, in_channels, student=False)
        self.final_channels = self.backbone.out_channels
        self.fc = nn.Linear(self.final_channels, num_classes)
        init_weights(self)

    def features(self, x: Tensor) -> Tensor:
        """Final-conv activation map after the last BN+ReLU, [N, C, h, w]."""
        out: Tensor = self.backbone(x)
        return out

    def logits_from_features(self, feats: Tensor) -> Tensor:
        """Pool and classify a (possibly channel-masked) final activation map."""
        out: Tensor = self.fc(feats.mean(dim=(2, 3)))
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.logits_from_features(self.features(x))


class Student(nn.Module):
    """Student: backbone → 1×1 conv to ``out_channels`` (the partition's filter count)."""

    def __init__(self, spec: ArchSpec, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = make_backbone(spec, in_channels, student=True)
        self.project = nn.Conv2d(self.backbone.out_channels, out_channels, 1, bias=True)
        self.out_channels = out_channels
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.project(self.backbone(x))
        return out


class StudentNetwork(nn.Module):
    """NoNN: K disjoint students whose pooled outputs are concatenated into one FC head."""

    def __init__(self, students: list[Student], num_classes: int) -> None:
        super().__init__()
        self.students = nn.ModuleList(students)
        self.sizes = [s.out_channels for s in students]
        self.head = nn.Linear(sum(self.sizes), num_classes)

    def student_features(self, x: Tensor) -> list[Tensor]:
        """Each student's feature map, in partition order."""
        return [student(x) for student in self.students]

    def pooled(self, x: Tensor) -> Tensor:
        """Concatenated pooled student outputs, [N, D] (what the aggregator assembles)."""
        return torch.cat([f.mean(dim=(2, 3)) for f in self.student_features(x)], dim=1)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        feats = self.student_features(x)
        pooled = torch.cat([f.mean(dim=(2, 3)) for f in feats], dim=1)
        logits: Tensor = self.head(pooled)
        return logits, feats


def init_weights(model: nn.Module) -> None:
    """He-normal convolutions, unit BatchNorm, zero biases."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            bound = 1.0 / math.sqrt(module.in_features)
            nn.init.uniform_(module.weight, -bound, bound)
            nn.init.zeros_(module.bias)


@dataclass(frozen=True)
class Cost:
    """Parameter count and multiply-accumulates for one input image."""

    params: int
    macs: int


def count_cost(model: nn.Module, input_shape: tuple[int, int, int]) -> Cost:
    """Count parameters and the MACs of convolutions and linear layers for one image.

    BatchNorm, activations and pooling are not counted as MACs (the usual convention); BN
    affine parameters are counted as parameters.
    """
    macs = 0

    def conv_hook(module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal macs
        assert isinstance(module, nn.Conv2d)
        kh, kw = module.kernel_size
        per_out = (module.in_channels // module.groups) * kh * kw
        macs += int(output[0].numel()) * per_out

    def linear_hook(module: nn.Module, _inputs: tuple[Tensor, ...], _output: Tensor) -> None:
        nonlocal macs
        assert isinstance(module, nn.Linear)
        macs += module.in_features * module.out_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    params = sum(int(p.numel()) for p in model.parameters())
    return Cost(params=params, macs=macs)
