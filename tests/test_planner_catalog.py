"""The analytic student catalog: names, counts (pinned, and against torch when present)."""

from __future__ import annotations

import pytest

from mqttinfer.errors import ConfigError
from mqttinfer.planner.catalog import (
    DEFAULT_CANDIDATES,
    catalog_table,
    load_candidates,
    parse_architecture,
    parse_input_shape,
    student_cost,
)

# Pinned from mqttinfer.train.models.count_cost (torch) with a 32-channel 1×1 projection.
PINNED = {
    ("wrn-10-1", (3, 32, 32)): (79_280, 12_632_064),
    ("wrn-16-1", (3, 32, 32)): (176_496, 26_787_840),
    ("wrn-16-2", (3, 32, 32)): (694_512, 101_367_808),
    ("wrn-22-1", (3, 32, 32)): (273_712, 40_943_616),
    ("mobilenetv2-0.5", (3, 32, 32)): (485_472, 24_761_344),
    ("mobilenetv2", (3, 32, 32)): (1_821_984, 81_573_888),
    ("wrn-10-0.5", (1, 28, 28)): (21_232, 3_023_104),
    ("mobilenetv2", (1, 28, 28)): (1_821_408, 66_536_064),
}


@pytest.mark.parametrize(("key", "expected"), list(PINNED.items()))
def test_pinned_counts(key, expected):
    name, shape = key
    cost = student_cost(name, shape, 32)
    assert (cost.params, cost.macs) == expected
    assert cost.memory_bytes > 4 * cost.params  # weights plus activations


def test_output_channels_change_only_the_projection():
    small, large = (
        student_cost("wrn-16-1", (3, 32, 32), 10),
        student_cost("wrn-16-1", (3, 32, 32), 20),
    )
    assert large.params - small.params == 10 * (64 + 1)
    assert large.macs - small.macs == 10 * 64 * 8 * 8


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("WRN-16-2", "wrn-16-2"),
        ("mobilenetv2-1.0", "mobilenetv2"),
        ("mbv2-0.5", "mobilenetv2-0.5"),
        ("wrn-10-0.50", "wrn-10-0.5"),
    ],
)
def test_names_are_canonical(text, name):
    assert parse_architecture(text).name == name


@pytest.mark.parametrize(
    ("text", "fix"),
    [
        ("wrn-12-1", r"6n\+4"),
        ("wrn-16-0", "width"),
        ("resnet-18", "wrn-<depth>"),
        ("mobilenetv2-9", "multiplier"),
    ],
)
def test_bad_names(text, fix):
    with pytest.raises(ConfigError, match=fix):
        parse_architecture(text)


def test_default_candidates_are_sorted_by_macs():
    table = catalog_table(DEFAULT_CANDIDATES, (3, 32, 32), 16)
    assert [c.macs for c in table] == sorted(c.macs for c in table)
    assert {c.arch for c in table} == set(DEFAULT_CANDIDATES)


def test_input_shape_parsing():
    assert parse_input_shape("1,28,28") == (1, 28, 28)
    assert parse_input_shape("3x32x32") == (3, 32, 32)
    with pytest.raises(ConfigError, match="C,H,W"):
        parse_input_shape("28,28")
    with pytest.raises(ValueError, match="three positive"):
        student_cost("wrn-16-1", (0, 28, 28), 4)
    with pytest.raises(ValueError, match="output channel"):
        student_cost("wrn-16-1", (1, 28, 28), 0)


def test_load_candidates(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("candidates: [wrn-16-1, WRN-16-1, mobilenetv2-1.0]\n")
    assert load_candidates(path) == ("wrn-16-1", "mobilenetv2")
    path.write_text("candidate: [wrn-16-1]\n")
    with pytest.raises(ConfigError, match="exactly one top-level key"):
        load_candidates(path)
    path.write_text("candidates: [wrn-17-1]\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_candidates(path)
    path.write_text("candidates: []\n")
    with pytest.raises(ConfigError, match="empty"):
        load_candidates(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_candidates(tmp_path / "missing.yaml")


@pytest.mark.train
@pytest.mark.parametrize(
    "name", [*DEFAULT_CANDIDATES, "wrn-10-0.5", "wrn-10-0.25", "mobilenetv2-1.4"]
)
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_counts_match_torch(name, shape):
    pytest.importorskip("torch")
    from mqttinfer.train.arch import parse_arch
    from mqttinfer.train.models import Student, count_cost

    torch_cost = count_cost(Student(parse_arch(name), shape[0], 24), shape)
    cost = student_cost(name, shape, 24)
    assert (cost.params, cost.macs) == (torch_cost.params, torch_cost.macs)
