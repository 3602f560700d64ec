"""Device inventory files: what every device can do, as the planner needs it.

Format (YAML; keep it stable — ``mqttinfer devices profile`` writes it, people edit it)::

    version: 1                       # optional; only 1 exists
    description: lab bench fleet     # optional, free text
    devices:
      - id: cam-node-1               # 1-64 of A-Z a-z 0-9 _ . - (it becomes a topic level)
        flops: 1.2G                  # sustained FLOP/s (suffixes: k M G T, Ki Mi Gi ...)
        memory: 512MiB               # bytes available to the student model
        rate: 2.5Mbit/s              # uplink bit/s to the broker (kbit, Mbps, MB/s, ...)
        outage: 0.05                 # probability a frame's result is lost (0 ≤ p < 1)
        labels: {room: lab}          # optional string labels, ignored by the planner

Every loading problem raises :class:`~mqttinfer.errors.InventoryError` naming the file, the
device (index and id), the field and the fix. Unknown keys are rejected (a typo such as
``flop:`` must not silently fall back to a default), as are duplicate ids.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml

from mqttinfer.errors import InventoryError
from mqttinfer.topics import is_valid_id
from mqttinfer.units import parse_bit_rate, parse_bytes, parse_flops, parse_probability

log = logging.getLogger(__name__)

INVENTORY_VERSION = 1
_TOP_LEVEL = ("version", "description", "devices")
_REQUIRED = ("id", "flops", "memory", "rate", "outage")
_OPTIONAL = ("labels",)
_EXAMPLE_DEVICE = "- {id: cam-1, flops: 1.2G, memory: 512MiB, rate: 2.5Mbit/s, outage: 0.05}"


@dataclass(frozen=True, slots=True)
class Device:
    """One edge device: FLOP/s, bytes of memory, uplink bit/s, outage probability."""

    id: str
    flops: float
    memory: int
    rate: float
    outage: float
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Fleet:
    """The devices of one inventory, in file order."""

    devices: tuple[Device, ...]
    source: str = "<memory>"
    description: str = ""

    def __post_init__(self) -> None:
        if not self.devices:
            raise InventoryError(
                "the fleet has no devices",
                source=self.source,
                field="devices",
                fix=f"list at least one device, e.g. {_EXAMPLE_DEVICE}",
            )
        ids = [device.id for device in self.devices]
        duplicates = sorted({name for name in ids if ids.count(name) > 1})
        if duplicates:
            raise InventoryError(
                f"duplicate device ids {duplicates}",
                source=self.source,
                field="devices[].id",
                fix="give every device a unique id",
            )

    def __len__(self) -> int:
        return len(self.devices)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(device.id for device in self.devices)

    def column(self, name: str) -> npt.NDArray[np.float64]:
        """One capacity as an array in fleet order: flops, memory, rate or outage."""
        if name not in ("flops", "memory", "rate", "outage"):
            raise ValueError(f"unknown device column {name!r}")
        return np.array([float(getattr(device, name)) for device in self.devices])

    def by_id(self, device_id: str) -> Device:
        for device in self.devices:
            if device.id == device_id:
                return device
        raise KeyError(device_id)


# --------------------------------------------------------------------------- reading


def load_inventory(path: str | Path) -> Fleet:
    """Read and validate an inventory file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InventoryError(
            "file not found",
            source=source,
            fix="pass an existing inventory, e.g. devices/example-fleet.yaml (docs/planner.md)",
        ) from None
    except OSError as err:
        raise InventoryError(
            f"cannot read the file: {err.strerror}", source=source, fix="check the path"
        ) from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InventoryError(
            f"not valid YAML: {_yaml_problem(err)}", source=source, fix="fix the YAML syntax"
        ) from None
    return parse_inventory(document, source=source)


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    if mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(problem)


def parse_inventory(document: object, *, source: str = "<memory>") -> Fleet:
    """Validate an already-parsed YAML document (a mapping with a ``devices`` list)."""
    if not isinstance(document, Mapping):
        raise InventoryError(
            "the top level must be a mapping with a 'devices' list",
            source=source,
            field="devices",
            fix=f"start the file with 'devices:' then entries like {_EXAMPLE_DEVICE}",
        )
    _reject_unknown(document, _TOP_LEVEL, source=source, where="")
    version = document.get("version", INVENTORY_VERSION)
    if version != INVENTORY_VERSION:
        raise InventoryError(
            f"unsupported version {version!r}",
            source=source,
            field="version",
            fix=f"use version: {INVENTORY_VERSION} (or leave it out)",
        )
    description = document.get("description", "")
    if not isinstance(description, str):
        raise InventoryError(
            "must be text", source=source, field="description", fix="quote the description"
        )
    entries = document.get("devices")
    if not isinstance(entries, list) or not entries:
        raise InventoryError(
            "must be a non-empty list of devices",
            source=source,
            field="devices",
            fix=f"write 'devices:' followed by entries like {_EXAMPLE_DEVICE}",
        )
    devices = tuple(
        _parse_device(entry, index, source=source) for index, entry in enumerate(entries)
    )
    return Fleet(devices, source=source, description=description)


def _parse_device(entry: object, index: int, *, source: str) -> Device:
    where = f"devices[{index}]"
    if not isinstance(entry, Mapping):
        raise InventoryError(
            "each device must be a mapping",
            source=source,
            field=where,
            fix=f"write entries like {_EXAMPLE_DEVICE}",
        )
    device_id = entry.get("id")
    if device_id is not None:
        where = f"devices[{index}] (id {device_id!r})"
    _reject_unknown(entry, _REQUIRED + _OPTIONAL, source=source, where=where)
    missing = [key for key in _REQUIRED if key not in entry]
    if missing:
        raise InventoryError(
            f"missing {', '.join(missing)}",
            source=source,
            field=f"{where}.{missing[0]}",
            fix=f"every device needs {', '.join(_REQUIRED)}, e.g. {_EXAMPLE_DEVICE}",
        )
    if not isinstance(device_id, str) or not is_valid_id(device_id):
        raise InventoryError(
            f"invalid device id {device_id!r}",
            source=source,
            field=f"{where}.id",
            fix="use 1-64 characters from A-Z a-z 0-9 _ . - (it becomes an MQTT topic level)",
        )
    flops = _field(
        entry, "flops", parse_flops, where=where, source=source, example="e.g. 1.2G or 500MFLOPS"
    )
    memory = _field(
        entry, "memory", parse_bytes, where=where, source=source, example="e.g. 512MiB or 64MB"
    )
    rate = _field(
        entry,
        "rate",
        parse_bit_rate,
        where=where,
        source=source,
        example="e.g. 2.5Mbit/s or 300kbit",
    )
    outage = _field(
        entry, "outage", parse_probability, where=where, source=source, example="e.g. 0.05"
    )
    for name, value in (("flops", flops), ("memory", memory), ("rate", rate)):
        if not value > 0:
            raise InventoryError(
                f"must be greater than zero, got {entry[name]!r}",
                source=source,
                field=f"{where}.{name}",
                fix="give the device's measured capacity",
            )
    if outage >= 1.0:
        raise InventoryError(
            "outage probability 1 means the device never answers",
            source=source,
            field=f"{where}.outage",
            fix="use a probability below 1, or remove the device",
        )
    labels = _labels(entry.get("labels", {}), where, source)
    return Device(device_id, float(flops), int(memory), float(rate), float(outage), labels)


def _field(
    entry: Mapping[str, Any], name: str, parser: Any, *, where: str, source: str, example: str
) -> float:
    try:
        value = float(parser(entry[name]))
    except ValueError as err:
        raise InventoryError(
            str(err), source=source, field=f"{where}.{name}", fix=f"write {name} as {example}"
        ) from None
    if not math.isfinite(value):
        raise InventoryError(
            "must be finite", source=source, field=f"{where}.{name}", fix=f"write {example}"
        )
    return value


def _labels(value: object, where: str, source: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(key, str) and isinstance(item, (str, int, float, bool))
        for key, item in value.items()
    ):
        raise InventoryError(
            "labels must map names to plain values",
            source=source,
            field=f"{where}.labels",
            fix="write labels: {room: lab, shelf: 2}",
        )
    return {key: str(item) for key, item in value.items()}


def _reject_unknown(
    mapping: Mapping[Any, Any], allowed: Sequence[str], *, source: str, where: str
) -> None:
    for key in mapping:
        if key in allowed:
            continue
        close = difflib.get_close_matches(str(key), allowed, n=1)
        fix = f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(allowed)}"
        field_name = f"{where}.{key}" if where else str(key)
        raise InventoryError("unknown key", source=source, field=field_name, fix=fix)


# --------------------------------------------------------------------------- writing


def inventory_document(fleet: Fleet | Iterable[Device], description: str = "") -> dict[str, Any]:
    """The YAML-ready mapping for a fleet, quantities written with readable suffixes."""
    devices = fleet.devices if isinstance(fleet, Fleet) else tuple(fleet)
    text = description or (fleet.description if isinstance(fleet, Fleet) else "")
    document: dict[str, Any] = {"version": INVENTORY_VERSION}
    if text:
        document["description"] = text
    document["devices"] = [_device_entry(device) for device in devices]
    return document


def _device_entry(device: Device) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": device.id,
        "flops": compact_quantity(device.flops, "flops"),
        "memory": compact_quantity(device.memory, "bytes"),
        "rate": compact_quantity(device.rate, "rate"),
        "outage": round(device.outage, 12),
    }
    if device.labels:
        entry["labels"] = dict(device.labels)
    return entry


def compact_quantity(value: float, kind: str) -> str | float | int:
    """A suffix spelling that parses back to exactly ``value`` (else the plain number)."""
    unit = {"flops": "", "bytes": "B", "rate": "bit/s"}[kind]
    prefixes: list[tuple[str, float]] = [("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)]
    if kind == "bytes":
        prefixes = [("Ti", 2.0**40), ("Gi", 2.0**30), ("Mi", 2.0**20), ("Ki", 2.0**10), *prefixes]
    # Fewest significant digits wins (64MB, not 61.03515625MiB); ties go to the larger prefix.
    spellings = [
        (
            len(f"{value / scale:.12g}".replace(".", "").lstrip("0")),
            -scale,
            f"{value / scale:.12g}{prefix}{unit}",
        )
        for prefix, scale in prefixes
        if value / scale >= 1 and float(f"{value / scale:.12g}") * scale == value
    ]
    if spellings:
        return min(spellings)[2]
    if kind == "bytes":
        return int(value)
    return float(value)


def save_inventory(
    fleet: Fleet | Iterable[Device], path: str | Path, description: str = ""
) -> None:
    """Write an inventory file that :func:`load_inventory` reads back to the same fleet."""
    document = inventory_document(fleet, description)
    text = yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=100)
    Path(path).write_text(text, encoding="utf-8")
    log.info("wrote %d devices to %s", len(document["devices"]), path)
