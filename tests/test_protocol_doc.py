"""docs/protocol.md agrees with the code: topics, fields, enums, limits and the worked example."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import msgpack
import numpy as np
import pytest

from mqttinfer.aggregation import COUNTER_NAMES
from mqttinfer.protocol import DEFAULT_LIMITS, PROTOCOL_VERSION, Frame, Stats
from mqttinfer.protocol.control import NODE_KINDS, SERVING, STATES
from mqttinfer.protocol.messages import LATENCY_KEYS, RESULT_REASONS
from mqttinfer.runtime import aggregator as aggregator_module
from mqttinfer.runtime import plan_apply, profile
from mqttinfer.runtime import source as source_module
from mqttinfer.runtime.device import DeviceSettings
from mqttinfer.runtime.model_transfer import MAX_CHUNKS, split_model
from mqttinfer.runtime.retained import probe_topic
from mqttinfer.topics import Topics
from tests.test_protocol import (
    sample_frame,
    sample_partial,
    sample_result,
    sample_role,
    sample_stats,
    sample_status,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
TEXT = DOC.read_text()


def section(title: str) -> str:
    """The text under ``## title`` up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", TEXT, re.M | re.S)
    assert match, f"docs/protocol.md has no '## {title}' section"
    return match.group(1)


def code_names(text: str) -> set[str]:
    return set(re.findall(r"`([^`\s]+)`", text))


def topic_table() -> dict[str, dict[str, str]]:
    rows = {}
    for line in section("Topics").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = {"qos": cells[2], "retained": cells[3]}
    return rows


# Topics ---------------------------------------------------------------------------------------
def topic_builders() -> dict[str, str]:
    """Every topic builder of Topics, called with ``<placeholder>`` arguments, sans prefix."""
    topics = Topics("D")
    out = {}
    for name, member in inspect.getmembers(Topics):
        if name.startswith("_") or name in {"prefix", "last_level", "deployment"}:
            continue
        if isinstance(member, property):
            out[name] = getattr(topics, name)
        elif callable(member):
            params = list(inspect.signature(member).parameters)[1:]
            out[name] = getattr(topics, name)(*(f"<{p}>" for p in params))
    return {name: topic.removeprefix(f"{topics.prefix}/") for name, topic in out.items()}


def test_every_topic_builder_is_documented() -> None:
    builders = topic_builders()
    assert len(builders) >= 15, builders
    names = code_names(section("Topics"))
    table = topic_table()
    for name, topic in builders.items():
        assert name in names or f"{name}(" in TEXT, f"Topics.{name} is not mentioned"
        if "+" in topic or "#" in topic:
            continue  # filters: named above; their patterns are in the subscriptions paragraph
        assert topic in table, f"topic {topic} (Topics.{name}) is missing from the table"
    # Besides the builders' topics, only the private probe topics (retained.py's barrier,
    # profile.py's echo).
    extra = set(table) - {t for t in builders.values() if "+" not in t and "#" not in t}
    assert extra == {"probe/<node>/barrier", "probe/<device>/echo"}
    assert probe_topic(Topics("D"), "<node>") == "mqttinfer/D/probe/<node>"


def test_topic_table_qos_and_retain_match_the_code() -> None:
    table = topic_table()
    assert table["frames/<source>"]["qos"] == str(source_module.FRAME_QOS)
    assert table["partials/<partition>/<device>"]["qos"] == str(DeviceSettings("d").partial_qos)
    assert table["results/<source>"]["qos"] == str(aggregator_module.RESULT_QOS)
    assert source_module.RESULT_QOS == aggregator_module.RESULT_QOS
    assert table["stats/<node>"]["qos"] == str(aggregator_module.STATS_QOS)
    assert table["status/<node>"]["retained"] == "**yes**"
    for topic in ("frames/<source>", "partials/<partition>/<device>", "results/<source>"):
        assert table[topic]["retained"] == "no"


def test_deployment_topics_name_their_publisher() -> None:
    rows = {line.split("`")[1]: line for line in section("Topics").splitlines() if "| `" in line}
    assert not any("reserved" in row for row in rows.values())
    assert "`devices profile" in rows["profile/<device>"]
    assert rows["profile/<device>"].split("|")[3].strip() == str(profile.PROFILE_QOS)
    for topic in ("plan/<device>", "models/<sha256>", "models/<sha256>/<index>"):
        assert "`plan apply`" in rows[topic]
    table = topic_table()
    assert table["plan/<device>"]["qos"] == str(plan_apply.ROLE_QOS)
    assert table["models/<sha256>"]["qos"] == str(plan_apply.MODEL_QOS)


# Fields ---------------------------------------------------------------------------------------
def msgpack_keys(payload: bytes) -> set[str]:
    return set(msgpack.unpackb(payload))


@pytest.mark.parametrize(
    ("title", "keys"),
    [
        ("Frame", lambda: msgpack_keys(sample_frame().encode())),
        ("Partial", lambda: msgpack_keys(sample_partial().encode())),
        ("Result", lambda: msgpack_keys(sample_result().encode())),
        ("Status", lambda: set(json.loads(sample_status().encode()))),
        ("Stats", lambda: set(json.loads(sample_stats().encode()))),
        ("Role", lambda: set(json.loads(sample_role().encode()))),
        (
            "Plan apply and model distribution",
            lambda: set(json.loads(split_model(b"x" * 10, 4, name="s.onnx", arch="a")[0].encode())),
        ),
    ],
)
def test_every_envelope_field_is_documented_in_its_section(title: str, keys) -> None:
    documented = code_names(section(title))
    missing = keys() - documented
    assert not missing, f"## {title} does not mention {sorted(missing)}"


def test_nested_fields_are_documented() -> None:
    role = json.loads(sample_role().encode())
    role_text = section("Role")
    for nested in ("model", "input"):
        for key in role[nested]:
            assert f"`{key}`" in role_text, f"role.{nested}.{key}"
    status = json.loads(sample_status().encode())
    for key in status["role"]:
        assert f"`{key}`" in section("Status"), f"status.role.{key}"
    stats = json.loads(sample_stats().encode())
    for key in next(iter(stats["latency_ms"].values())):
        assert key in section("Stats"), f"stats.latency_ms.*.{key}"
    tensor_keys = {"dtype", "shape", "data", "enc", "scale"}
    assert tensor_keys <= code_names(section("Tensors"))


def test_enumerations_are_documented() -> None:
    result = section("Result")
    assert all(f"`{r}`" in result for r in RESULT_REASONS)
    assert all(f"`{k}`" in result for k in LATENCY_KEYS)
    status = section("Status")
    for value in NODE_KINDS | STATES | SERVING:
        assert f"`{value}`" in status, value
    tensors = section("Tensors")
    for dtype in ("u8", "i8", "f16", "f32", "lz4"):
        assert f"`{dtype}`" in tensors


class RecordingBus:
    """Just enough of a Bus to capture what the aggregator publishes."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def subscribe(self, topic_filter: str, handler: object, qos: int = 0) -> None:
        del topic_filter, handler, qos

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> bool:
        self.published.append((topic, payload))
        return True


def test_aggregator_stats_are_documented() -> None:
    bus = RecordingBus()
    ticks = iter(range(100))
    aggregator = aggregator_module.Aggregator(
        bus,
        widths={0: 1},
        head=aggregator_module.HeadWeights(np.ones((2, 1), np.float32), np.zeros(2, np.float32)),
        clock=lambda: float(next(ticks)),
    )
    for latency in aggregator.latency.values():
        latency.add(1.0)
    aggregator.publish_stats()
    aggregator.publish_stats()  # the second one has rates
    stats = Stats.decode(bus.published[-1][1])
    names = set(stats.counters) | set(stats.gauges) | set(stats.latency_ms)
    assert set(COUNTER_NAMES) <= names and "complete_per_s" in names
    text = section("Stats")
    missing = {n for n in names if f"`{n}`" not in text}
    assert not missing, f"## Stats does not mention {sorted(missing)}"


def test_limits_and_version_match_the_code() -> None:
    limits = section("Limits")
    assert f"{DEFAULT_LIMITS.max_tensor_elements:,}" in limits
    assert f"{DEFAULT_LIMITS.max_deadline_ms:,}" in limits
    assert f"< {DEFAULT_LIMITS.max_partitions}" in limits
    assert f"| {DEFAULT_LIMITS.max_id_length} |" in limits
    assert f"| {DEFAULT_LIMITS.max_tensor_rank} |" in limits
    assert f"{DEFAULT_LIMITS.max_payload_bytes // (1024 * 1024)} MiB" in limits
    assert f"now `{PROTOCOL_VERSION}`" in TEXT
    assert f"at most {MAX_CHUNKS:,}" in section("Plan apply and model distribution")
    assert plan_apply.DEFAULT_CHUNK_SIZE == 256 * 1024 and "256 KiB" in TEXT


# The worked example -----------------------------------------------------------------------------
def example_hex(name: str) -> str:
    match = re.search(rf"^{name}=([0-9a-f]+)$", TEXT, re.M)
    assert match, f"no {name}= line in the worked example"
    return match.group(1)


def annotated_hex() -> str:
    block = re.search(r"```hex\n(.*?)```", TEXT, re.S)
    assert block
    out = []
    for line in block.group(1).splitlines():
        hex_part = re.split(r"\s{2,}", line.strip())[0]  # comments follow two+ spaces
        out.append(hex_part.replace(" ", ""))
    return "".join(out)


def example_frame() -> Frame:
    return Frame(
        id="demo-1",
        source="cli",
        ts=1700000000.0,
        tensor=np.arange(64, dtype=np.uint8).reshape(1, 8, 8),
        deadline_ms=1000,
    )


def test_example_frame_decodes_and_equals_the_codes_own_encoding() -> None:
    payload = bytes.fromhex(example_hex("FRAME_HEX"))
    assert len(payload) == 158 and "158 bytes" in TEXT
    frame = Frame.decode(payload)
    expected = example_frame()
    assert (frame.id, frame.source, frame.ts, frame.deadline_ms, frame.label) == (
        "demo-1",
        "cli",
        1700000000.0,
        1000,
        None,
    )
    np.testing.assert_array_equal(frame.tensor, expected.tensor)
    assert payload == expected.encode()


def test_annotated_hex_is_the_same_frame() -> None:
    assert annotated_hex() == example_hex("FRAME_HEX")


def test_header_plus_raw_pixels_is_a_valid_28x28_frame() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, 784, dtype=np.uint8)
    payload = bytes.fromhex(example_hex("HEADER")) + pixels.tobytes()
    frame = Frame.decode(payload)
    assert frame.tensor.shape == (1, 28, 28) and frame.id == "demo-1"
    np.testing.assert_array_equal(frame.tensor.reshape(-1), pixels)
    twin = Frame(
        id="demo-1",
        source="cli",
        ts=1700000000.0,
        tensor=pixels.reshape(1, 28, 28),
        deadline_ms=1000,
    )
    assert payload == twin.encode(compress="never")


def test_result_reading_hints_match_the_encoding() -> None:
    payload = sample_result(label=2, degraded=True).encode().hex()
    assert "a56c6162656c02" in payload  # "label": 2 as a positive fixint
    assert "a86465677261646564c3" in payload  # "degraded": true
    assert "a5 6c6162656c" in TEXT and "a8 6465677261646564" in TEXT
