"""Quantities with unit suffixes, as people write them in inventory files and options.

Three kinds, each parsed into one canonical unit:

=========  ===============  ==================================================================
kind       canonical unit   accepted spellings (case of the prefix letter does not matter)
=========  ===============  ==================================================================
bytes      bytes (int)      ``512MiB``, ``1.5GB``, ``64k``, ``64 KiB``, ``4G``, ``1e6``, ``2048``
bit rate   bit/s (float)    ``300kbit``, ``2.5Mbit/s``, ``2.5Mbps``, ``1MB/s`` (×8), ``1e6``
FLOP/s     FLOP/s (float)   ``1.2G``, ``1.2GFLOPS``, ``1.2 GFLOP/s``, ``500M``, ``1e9``
=========  ===============  ==================================================================

SI prefixes (k M G T P) are powers of 1000 and IEC prefixes (Ki Mi Gi Ti Pi) powers of 1024,
for every kind. ``b``/``bit`` means bits and ``B`` bytes; a memory size in bits or a rate in
bare bytes is rejected rather than guessed. Errors are :class:`ValueError` whose message says
what was wrong and shows a valid example; :mod:`mqttinfer.planner.inventory` wraps them in
:class:`~mqttinfer.errors.InventoryError` naming the file and field.
"""

from __future__ import annotations

import math
import re
from typing import Literal

Kind = Literal["bytes", "rate", "flops"]

_SI = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}
_IEC = {"ki": 2.0**10, "mi": 2.0**20, "gi": 2.0**30, "ti": 2.0**40, "pi": 2.0**50}

_QUANTITY = re.compile(
    r"""^\s*
    (?P<number>[+-]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
    \s*
    (?P<prefix>(?:[kKmMgGtTpP]i?)?)
    (?P<unit>[A-Za-z/]*)
    \s*$""",
    re.VERBOSE,
)

# Unit words after the prefix (compared in lower case), per kind: multiplier into the
# canonical unit. Bits and bytes differ only in the case of "b", so rates look at that first.
_BIT_RATE_WORDS = {"", "bit", "bits", "bit/s", "bits/s", "b/s", "bps", "bit/sec"}
_BYTE_RATE_WORDS = {"b/s", "bps", "byte/s", "bytes/s", "byte/sec"}
_BYTE_WORDS = {"", "b", "byte", "bytes"}
_FLOPS_WORDS = {"", "flops", "flop/s", "flop"}

_EXAMPLES: dict[Kind, str] = {
    "bytes": "512MiB, 1.5GB, 64k or 1048576",
    "rate": "300kbit, 2.5Mbit/s, 2.5Mbps, 1MB/s or 1e6",
    "flops": "1.2G, 1.2GFLOPS, 500M or 1e9",
}


def parse_quantity(value: object, kind: Kind) -> float:
    """Parse ``value`` (number or string with suffix) into the canonical unit of ``kind``.

    Raises ValueError with an example of a valid spelling. Negative, NaN and infinite values
    are rejected; zero is allowed (callers decide whether zero makes sense).
    """
    if kind not in _EXAMPLES:
        raise ValueError(f"unknown quantity kind {kind!r}; use one of {sorted(_EXAMPLES)}")
    if isinstance(value, bool):
        raise ValueError(f"expected a {_describe(kind)}, got the boolean {value!r}")
    if isinstance(value, (int, float)):
        return _check_number(float(value), value, kind)
    if not isinstance(value, str):
        raise ValueError(
            f"expected a {_describe(kind)} such as {_EXAMPLES[kind]}; "
            f"got {type(value).__name__} {value!r}"
        )
    match = _QUANTITY.match(value)
    if not match:
        raise ValueError(
            f"cannot read {value!r} as a {_describe(kind)}; write e.g. {_EXAMPLES[kind]}"
        )
    number = float(match.group("number").replace("_", ""))
    scale = _prefix_scale(match.group("prefix"), value, kind)
    unit = match.group("unit")
    return _check_number(number * scale * _unit_scale(unit, value, kind), value, kind)


def _prefix_scale(prefix: str, original: str, kind: Kind) -> float:
    lowered = prefix.lower()
    if lowered in _IEC:
        return _IEC[lowered]
    if lowered in _SI:
        return _SI[lowered]
    raise ValueError(
        f"unknown prefix {prefix!r} in {original!r}; use k M G T P (×1000) or Ki Mi Gi Ti Pi "
        f"(×1024), e.g. {_EXAMPLES[kind]}"
    )


def _unit_scale(unit: str, original: str, kind: Kind) -> float:
    lowered = unit.lower()
    if kind == "rate":
        if unit.startswith("B") or lowered.startswith("byte"):
            if lowered in _BYTE_RATE_WORDS:
                return 8.0
        elif lowered in _BIT_RATE_WORDS:
            return 1.0
    elif kind == "bytes":
        if lowered in _BYTE_WORDS and unit != "b":
            return 1.0
    elif lowered in _FLOPS_WORDS:
        return 1.0
    raise ValueError(
        f"unknown unit {unit!r} in {original!r} for a {_describe(kind)}{_hint(unit, kind)}; "
        f"write e.g. {_EXAMPLES[kind]}"
    )


def _hint(unit: str, kind: Kind) -> str:
    if kind == "bytes" and (unit == "b" or unit.lower().startswith("bit")):
        return " (memory is counted in bytes: write B, e.g. 512MiB, not b or bit)"
    if kind == "rate" and unit.lower() in _BYTE_WORDS:
        return " (a rate needs a time unit: bit/s for bits or B/s for bytes)"
    return ""


def _check_number(number: float, original: object, kind: Kind) -> float:
    if math.isnan(number) or math.isinf(number):
        raise ValueError(f"{original!r} is not a finite {_describe(kind)}")
    if number < 0:
        raise ValueError(f"{original!r} is negative; a {_describe(kind)} must be ≥ 0")
    return number


def _describe(kind: Kind) -> str:
    return {"bytes": "size in bytes", "rate": "bit rate", "flops": "FLOP/s figure"}[kind]


def parse_bytes(value: object) -> int:
    """A memory size in bytes (rounded to the nearest byte)."""
    return round(parse_quantity(value, "bytes"))


def parse_bit_rate(value: object) -> float:
    """A link rate in bit/s."""
    return parse_quantity(value, "rate")


def parse_flops(value: object) -> float:
    """A compute speed in FLOP/s."""
    return parse_quantity(value, "flops")


def parse_probability(value: object) -> float:
    """A probability in [0, 1]; also accepts a percentage string such as ``"5%"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a probability between 0 and 1, got the boolean {value!r}")
    number: float
    if isinstance(value, str) and value.strip().endswith("%"):
        number = _float(value.strip()[:-1], value) / 100.0
    elif isinstance(value, (int, float, str)):
        number = _float(value, value)
    else:
        raise ValueError(f"expected a probability between 0 and 1, got {value!r}")
    if not 0.0 <= number <= 1.0:
        raise ValueError(
            f"{value!r} is not a probability; use a number between 0 and 1 (or 0%–100%)"
        )
    return number


def _float(text: object, original: object) -> float:
    try:
        number = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"cannot read {original!r} as a number between 0 and 1") from None
    if math.isnan(number):
        raise ValueError(f"{original!r} is not a number between 0 and 1")
    return number


# ----------------------------------------------------------------------- formatting


def format_si(value: float, unit: str = "", *, digits: int = 3) -> str:
    """``1.2e9, "FLOP/s"`` → ``"1.2 GFLOP/s"`` (SI prefixes, ``digits`` significant digits)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g} {unit}".rstrip()
    exponent = min(15, max(0, math.floor(math.log10(abs(value)) / 3) * 3))
    prefix = {0: "", 3: "k", 6: "M", 9: "G", 12: "T", 15: "P"}[exponent]
    return f"{value / 10**exponent:.{digits}g} {prefix}{unit}".rstrip()


def format_bytes(value: float) -> str:
    """Bytes with IEC prefixes: ``536870912`` → ``"512 MiB"``."""
    size = float(value)
    for prefix in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(size) < 1024 or prefix == "Ti":
            return f"{size:.4g} {prefix}B"
        size /= 1024
    raise AssertionError("unreachable")


def format_bit_rate(value: float) -> str:
    """``2.5e6`` → ``"2.5 Mbit/s"``."""
    return format_si(value, "bit/s")


def format_flops(value: float) -> str:
    """``1.2e9`` → ``"1.2 GFLOP/s"``."""
    return format_si(value, "FLOP/s")
