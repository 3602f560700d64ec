"""Architecture names (torch-free, so the CLI can validate options before loading torch).

Accepted spellings:

- ``wrn-<depth>-<width>``: pre-activation WideResNet WRN-d-k (Zagoruyko & Komodakis 2016),
  ``depth = 6n + 4``; ``width`` may be fractional (``wrn-10-0.5``) for tiny students.
- ``mobilenetv2`` or ``mobilenetv2-<width multiplier>``: CIFAR-style MobileNetV2 (stride 1 in
  the stem and the first two stages, so it suits 28×28 and 32×32 inputs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from mqttinfer.errors import ConfigError

Family = Literal["wrn", "mobilenetv2"]

_WRN = re.compile(r"^wrn-(\d+)-(\d+(?:\.\d+)?)$")
_MBV2 = re.compile(r"^(?:mobilenetv2|mbv2)(?:-(\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class ArchSpec:
    """A parsed architecture name."""

    family: Family
    depth: int
    width: float

    @property
    def name(self) -> str:
        """Canonical spelling (``wrn-16-2``, ``wrn-10-0.5``, ``mobilenetv2-0.5``)."""
        width = f"{self.width:g}"
        if self.family == "wrn":
            return f"wrn-{self.depth}-{width}"
        return "mobilenetv2" if self.width == 1.0 else f"mobilenetv2-{width}"

    @property
    def blocks_per_group(self) -> int:
        """WRN only: residual blocks in each of the three groups."""
        return (self.depth - 4) // 6


def parse_arch(text: str, *, source: str = "--arch") -> ArchSpec:
    """Parse an architecture name; raise :class:`ConfigError` naming the fix when invalid."""
    name = text.strip().lower()
    wrn = _WRN.match(name)
    if wrn:
        depth, width = int(wrn.group(1)), float(wrn.group(2))
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ConfigError(
                f"WRN depth {depth} is not 6n+4 with n >= 1",
                source=source,
                fix="use a depth of 10, 16, 22, 28, 40 ...",
            )
        if not 0.0 < width <= 16.0:
            raise ConfigError(
                f"WRN width {width:g} out of range", source=source, fix="use a width in (0, 16]"
            )
        return ArchSpec("wrn", depth, width)
    mbv2 = _MBV2.match(name)
    if mbv2:
        width = float(mbv2.group(1)) if mbv2.group(1) else 1.0
        if not 0.0 < width <= 4.0:
            raise ConfigError(
                f"MobileNetV2 width multiplier {width:g} out of range",
                source=source,
                fix="use a multiplier in (0, 4]",
            )
        return ArchSpec("mobilenetv2", 0, width)
    raise ConfigError(
        f"unknown architecture {text!r}",
        source=source,
        fix="use wrn-<depth>-<width> (e.g. wrn-16-2, wrn-10-0.5) or mobilenetv2[-<width>]",
    )


def parse_arch_list(text: str, k: int, *, source: str = "--student-arch") -> list[ArchSpec]:
    """Parse a comma-separated list of K architectures; a single name is repeated K times."""
    parts = [part for part in text.split(",") if part.strip()]
    specs = [parse_arch(part, source=source) for part in parts]
    if len(specs) == 1:
        return specs * k
    if len(specs) != k:
        raise ConfigError(
            f"{len(specs)} student architectures given for {k} partitions",
            source=source,
            fix=f"give one architecture or exactly {k}, comma-separated",
        )
    return specs
