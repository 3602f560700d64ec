"""Architecture names for the training CLI (torch-free, so options are checked before torch loads).

The names and their parsing are the planner's (``mqttinfer.planner.catalog``), so a plan's
student architecture and a trained student always mean the same network:

- ``wrn-<depth>-<width>``: pre-activation WideResNet WRN-d-k (Zagoruyko & Komodakis 2016),
  ``depth = 6n + 4``; ``width`` may be fractional (``wrn-10-0.5``) for tiny students.
- ``mobilenetv2`` or ``mobilenetv2-<width multiplier>``: CIFAR-style MobileNetV2 (stride 1 in
  the stem and the first two stages, so it suits 28×28 and 32×32 inputs).
"""

from __future__ import annotations

from mqttinfer.errors import ConfigError
from mqttinfer.planner.catalog import Architecture, parse_architecture

ArchSpec = Architecture


def parse_arch(text: str, *, source: str = "--arch") -> ArchSpec:
    """Parse an architecture name; raise :class:`ConfigError` naming the fix when invalid."""
    return parse_architecture(text, source=source)


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
