"""Device inventory files: parsing, suffixes, strict validation, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mqttinfer.errors import InventoryError
from mqttinfer.planner.inventory import (
    Device,
    Fleet,
    compact_quantity,
    load_inventory,
    parse_inventory,
    save_inventory,
)

REPO = Path(__file__).resolve().parents[1]

GOOD = """
version: 1
description: bench
devices:
  - id: cam-1
    flops: 1.2G
    memory: 512MiB
    rate: 2.5Mbit/s
    outage: 0.05
    labels: {room: lab, shelf: 2}
  - {id: cam-2, flops: 1e9, memory: 64MB, rate: 300kbit, outage: 5%}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    return path


def test_load_good_inventory(tmp_path):
    fleet = load_inventory(write(tmp_path, GOOD))
    assert fleet.ids == ("cam-1", "cam-2")
    first, second = fleet.devices
    assert first == Device("cam-1", 1.2e9, 512 * 2**20, 2.5e6, 0.05, {"room": "lab", "shelf": "2"})
    assert (second.flops, second.memory, second.rate, second.outage) == (1e9, 64e6, 300e3, 0.05)
    assert fleet.description == "bench"
    assert list(fleet.column("rate")) == [2.5e6, 300e3]


def test_round_trip(tmp_path):
    fleet = load_inventory(write(tmp_path, GOOD))
    out = tmp_path / "again.yaml"
    save_inventory(fleet, out)
    again = load_inventory(out)
    assert again.devices == fleet.devices
    text = out.read_text()
    assert "512MiB" in text and "1.2G" in text and "2.5Mbit/s" in text


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        (1.2e9, "flops", "1.2G"),
        (512 * 2**20, "bytes", "512MiB"),
        (64e6, "bytes", "64MB"),
        (123, "bytes", 123),
        (2.5e6, "rate", "2.5Mbit/s"),
        (0.5, "rate", 0.5),
    ],
)
def test_compact_quantity(value, kind, expected):
    assert compact_quantity(value, kind) == expected


@pytest.mark.parametrize(
    ("text", "field", "fix"),
    [
        ("devices:\n  - {id: a, flop: 1G, memory: 1M, rate: 1M, outage: 0.1}", "flop", "flops"),
        ("devices:\n  - {id: a, memory: 1M, rate: 1M, outage: 0.1}", "flops", "every device"),
        ("devices:\n  - {id: a, flops: fast, memory: 1M, rate: 1M, outage: 0.1}", "flops", "1.2G"),
        ("devices:\n  - {id: a, flops: 1G, memory: 1Mb, rate: 1M, outage: 0.1}", "memory", "MiB"),
        ("devices:\n  - {id: a, flops: 1G, memory: 1M, rate: 1MB, outage: 0.1}", "rate", "bit/s"),
        ("devices:\n  - {id: a, flops: 1G, memory: 1M, rate: 1M, outage: 1.5}", "outage", "0.05"),
        ("devices:\n  - {id: a, flops: 1G, memory: 1M, rate: 1M, outage: 1}", "outage", "below 1"),
        ("devices:\n  - {id: a, flops: 0, memory: 1M, rate: 1M, outage: 0.1}", "flops", "measured"),
        ("devices:\n  - {id: a/b, flops: 1G, memory: 1M, rate: 1M, outage: 0.1}", "id", "A-Z"),
        (
            "devices:\n  - {id: a, flops: 1G, memory: 1M, rate: 1M, outage: 0.1, labels: [x]}",
            "labels",
            "room",
        ),
        ("device:\n  - {id: a}", "device", "devices"),
        ("devices: []", "devices", "entries like"),
        ("- just a list", "devices", "start the file"),
        ("version: 2\ndevices:\n  - {id: a}", "version", "version: 1"),
        ("devices:\n  - 17", "devices[0]", "entries like"),
    ],
)
def test_errors_name_file_field_and_fix(tmp_path, text, field, fix):
    path = write(tmp_path, text)
    with pytest.raises(InventoryError) as caught:
        load_inventory(path)
    message = str(caught.value)
    assert str(path) in message
    assert field in (caught.value.field or "")
    assert "fix:" in message and fix in message


def test_unknown_key_names_device_index_and_id(tmp_path):
    text = "devices:\n  - {id: ok, flops: 1G, memory: 1M, rate: 1M, outage: 0.1}\n"
    text += "  - {id: cam-9, flops: 1G, memroy: 1M, rate: 1M, outage: 0.1}\n"
    with pytest.raises(InventoryError) as caught:
        load_inventory(write(tmp_path, text))
    assert caught.value.field == "devices[1] (id 'cam-9').memroy"
    assert "did you mean 'memory'" in str(caught.value)


def test_duplicate_ids_rejected(tmp_path):
    text = "devices:\n" + "  - {id: same, flops: 1G, memory: 1M, rate: 1M, outage: 0.1}\n" * 2
    with pytest.raises(InventoryError, match=r"duplicate device ids \['same'\]"):
        load_inventory(write(tmp_path, text))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(InventoryError, match="file not found"):
        load_inventory(tmp_path / "nope.yaml")
    with pytest.raises(InventoryError, match=r"not valid YAML.*line"):
        load_inventory(write(tmp_path, "devices: [\n  - {"))


def test_fleet_needs_devices():
    with pytest.raises(InventoryError, match="no devices"):
        Fleet(())
    with pytest.raises(InventoryError):
        parse_inventory({"devices": None})


@pytest.mark.parametrize("name", ["example-fleet.yaml", "heterogeneous-20.yaml"])
def test_shipped_inventories_load(name):
    fleet = load_inventory(REPO / "devices" / name)
    assert len(fleet) == {"example-fleet.yaml": 6, "heterogeneous-20.yaml": 20}[name]


def test_example_fleet_has_three_capability_levels():
    fleet = load_inventory(REPO / "devices" / "example-fleet.yaml")
    assert len({(d.flops, d.memory, d.rate) for d in fleet.devices}) == 3
    assert yaml.safe_load((REPO / "devices" / "example-fleet.yaml").read_text())["version"] == 1
