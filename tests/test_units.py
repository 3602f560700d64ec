"""Tests of mqttinfer.units: suffix parsing (SI vs IEC, bits vs bytes) and formatting."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqttinfer.units import (
    format_bit_rate,
    format_bytes,
    format_flops,
    format_si,
    parse_bit_rate,
    parse_bytes,
    parse_flops,
    parse_probability,
    parse_quantity,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * 2**20),
        ("512 MiB", 512 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("64k", 64_000),
        ("64Ki", 65_536),
        ("4G", 4_000_000_000),
        ("4giB", 4 * 2**30),
        ("1e6", 1_000_000),
        ("2048", 2048),
        ("1_000", 1000),
        (1024, 1024),
        (2.5e3, 2500),
        ("7 bytes", 7),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("300kbit", 300e3),
        ("2.5Mbit/s", 2.5e6),
        ("2.5Mbps", 2.5e6),
        ("2.5 mbps", 2.5e6),
        ("1MB/s", 8e6),
        ("1 MBps", 8e6),
        ("1 Mibit/s", 2**20),
        ("1e6", 1e6),
        ("10M", 10e6),
        (54e6, 54e6),
    ],
)
def test_parse_bit_rate(text, expected):
    assert parse_bit_rate(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2G", 1.2e9),
        ("1.2GFLOPS", 1.2e9),
        ("1.2 GFLOP/s", 1.2e9),
        ("500M", 500e6),
        ("1e9", 1e9),
        ("20 MFLOPS", 20e6),
        (3, 3.0),
    ],
)
def test_parse_flops(text, expected):
    assert parse_flops(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("value", "kind", "message"),
    [
        ("512Mb", "bytes", "memory is counted in bytes"),
        ("512kbit", "bytes", "memory is counted in bytes"),
        ("5MB", "rate", "needs a time unit"),
        ("fast", "flops", "cannot read 'fast'"),
        ("-1", "bytes", "negative"),
        (-5, "rate", "negative"),
        ("1Q", "flops", "unknown unit 'Q'"),
        ("nan", "flops", "cannot read"),
        (float("inf"), "flops", "not a finite"),
        (True, "bytes", "boolean"),
        ([1], "bytes", "got list"),
        ("", "rate", "cannot read"),
    ],
)
def test_bad_quantities_name_the_problem(value, kind, message):
    with pytest.raises(ValueError, match=message):
        parse_quantity(value, kind)


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown quantity kind"):
        parse_quantity("1", "volts")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"), [(0, 0.0), ("0.25", 0.25), (1, 1.0), ("5%", 0.05), ("100%", 1.0)]
)
def test_parse_probability(value, expected):
    assert parse_probability(value) == pytest.approx(expected)


@pytest.mark.parametrize("value", [1.5, -0.1, "2", "x", "nan", None, True, "120%"])
def test_parse_probability_rejects(value):
    with pytest.raises(ValueError, match=r"probability|between 0 and 1"):
        parse_probability(value)


def test_formatting():
    assert format_bytes(512 * 2**20) == "512 MiB"
    assert format_bytes(100) == "100 B"
    assert format_bit_rate(2.5e6) == "2.5 Mbit/s"
    assert format_flops(1.2e9) == "1.2 GFLOP/s"
    assert format_si(0, "B") == "0 B"
    assert format_si(999, "x") == "999 x"


@given(st.floats(min_value=0, max_value=1e15, allow_nan=False))
def test_plain_numbers_round_trip(number):
    assert parse_flops(repr(number)) == pytest.approx(number)
    assert parse_bit_rate(number) == number


@given(
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from(["k", "M", "G", "Ki", "Mi", "Gi"]),
)
def test_prefixes_scale_exactly(number, prefix):
    scale = {"k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[prefix]
    assert parse_bytes(f"{number}{prefix}B") == round(number * scale)
