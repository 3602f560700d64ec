"""The wire protocol: codec round trips, limits, versions, and decoders that fail only politely."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import lz4.block
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqttinfer.errors import ProtocolError
from mqttinfer.protocol import (
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    Frame,
    InputSpec,
    Limits,
    ModelRef,
    Partial,
    Quantiles,
    Result,
    Role,
    RoleSummary,
    Stats,
    Status,
    decode_tensor,
    encode_tensor,
)
from mqttinfer.topics import Topics

SHA = "ab" * 32


# Sample envelopes -----------------------------------------------------------------------------
def sample_frame(**kw: Any) -> Frame:
    base: dict[str, Any] = {
        "id": "cam-1:000042",
        "source": "cam-1",
        "ts": 1700000000.25,
        "tensor": np.arange(64, dtype=np.uint8).reshape(1, 8, 8),
        "deadline_ms": 250,
        "label": 3,
    }
    base.update(kw)
    return Frame(**base)


def sample_partial(**kw: Any) -> Partial:
    base: dict[str, Any] = {
        "frame": "cam-1:000042",
        "partition": 1,
        "device": "dev-a",
        "features": np.linspace(-2, 2, 6, dtype=np.float32),
        "compute_ms": 3.5,
        "queue_ms": 0.25,
        "plan_version": 2,
    }
    base.update(kw)
    return Partial(**base)


def sample_result(**kw: Any) -> Result:
    base: dict[str, Any] = {
        "frame": "cam-1:000042",
        "source": "cam-1",
        "logits": np.array([0.5, -1.0, 2.0, 0.0], np.float32),
        "label": 2,
        "score": 0.7,
        "degraded": True,
        "missing": (1,),
        "reason": "deadline",
        "ts": 1700000000.5,
        "latency": {"e2e_ms": 12.5, "queue_ms": 0.5, "compute_ms": 3.0, "fc_ms": 0.1},
        "contributors": {"0": "dev-a"},
        "truth": 2,
    }
    base.update(kw)
    return Result(**base)


def sample_status(**kw: Any) -> Status:
    base: dict[str, Any] = {
        "node": "dev-a",
        "kind": "device",
        "state": "online",
        "bdseq": 7,
        "ts": 1700000000.0,
        "version": "0.1.0",
        "role": RoleSummary(group="g1", partition=1, plan="p", plan_version=2, model_sha256=SHA),
        "serving": "ready",
    }
    base.update(kw)
    return Status(**base)


def sample_stats() -> Stats:
    return Stats(
        node="aggregator",
        kind="aggregator",
        ts=1700000000.0,
        interval_s=2.0,
        counters={"complete": 10, "degraded": 1},
        gauges={"open": 3.0},
        latency_ms={"e2e": Quantiles(p50=5.0, p99=9.5, mean=5.5, n=11)},
    )


def sample_role() -> Role:
    return Role(
        device="dev-a",
        group="g1",
        partition=1,
        model=ModelRef(sha256=SHA, size=1234, arch="wrn", file="student-1.onnx"),
        input=InputSpec(shape=(1, 28, 28), mean=(0.5,), std=(0.25,)),
        plan="site-a",
        plan_version=3,
    )


# Tensor codec ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("array", "dtype"),
    [
        (np.arange(24, dtype=np.uint8).reshape(2, 3, 4), "u8"),
        (np.arange(-5, 5, dtype=np.int8), "i8"),
        (np.linspace(-1, 1, 10, dtype=np.float16), "f16"),
        (np.linspace(-1, 1, 10, dtype=np.float32), "f32"),
    ],
)
@pytest.mark.parametrize("compress", ["auto", "never", "always"])
def test_tensor_round_trip_is_exact(array: np.ndarray, dtype: str, compress: Any) -> None:
    encoded = encode_tensor(array, dtype=dtype, compress=compress)
    assert encoded["dtype"] == dtype and encoded["shape"] == list(array.shape)
    decoded = decode_tensor(msgpack.unpackb(msgpack.packb(encoded, use_bin_type=True)))
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


def test_empty_tensor_round_trip() -> None:
    empty = np.zeros((0, 3), dtype=np.float16)
    encoded = encode_tensor(empty)
    assert encoded["data"] == b"" and "enc" not in encoded
    np.testing.assert_array_equal(decode_tensor(encoded), empty)


def test_floats_travel_as_fp16_by_default() -> None:
    encoded = encode_tensor(np.array([1.0, 2.5], np.float64))
    assert encoded["dtype"] == "f16" and len(encoded["data"]) == 4


def test_lz4_is_used_only_when_it_makes_the_bytes_smaller() -> None:
    zeros = encode_tensor(np.zeros(4096, np.uint8))
    assert zeros["enc"] == "lz4" and len(zeros["data"]) < 4096
    noise = encode_tensor(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))
    assert "enc" not in noise and len(noise["data"]) == 4096
    tiny = encode_tensor(np.zeros(16, np.uint8))  # compressible but below the threshold
    assert "enc" not in tiny
    forced = encode_tensor(np.zeros(16, np.uint8), compress="always")
    assert forced["enc"] == "lz4"
    np.testing.assert_array_equal(decode_tensor(forced), np.zeros(16, np.uint8))
    assert "enc" not in encode_tensor(np.zeros(4096, np.uint8), compress="never")


def test_int8_quantisation_carries_a_scale_and_bounds_the_error() -> None:
    values = np.random.default_rng(1).normal(0, 3, 200).astype(np.float32)
    encoded = encode_tensor(values, int8=True)
    assert encoded["dtype"] == "i8" and encoded["scale"] == pytest.approx(
        np.abs(values).max() / 127
    )
    decoded = decode_tensor(encoded)
    assert decoded.dtype == np.float32
    assert np.abs(decoded - values).max() <= encoded["scale"] / 2 + 1e-6
    zeros = encode_tensor(np.zeros(5, np.float32), int8=True)
    assert zeros["scale"] == 1.0 and not decode_tensor(zeros).any()


def test_unsupported_encode_dtype_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        encode_tensor(np.zeros(2), dtype="f64")


def good_tensor() -> dict[str, Any]:
    return {"dtype": "f16", "shape": [2, 2], "data": np.ones(4, np.float16).tobytes()}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"extra": 1}, "unknown keys"),
        ({"dtype": "f64"}, "dtype"),
        ({"dtype": ["f16"]}, "dtype"),
        ({"shape": "2x2"}, "shape"),
        ({"shape": [2, -2]}, "non-negative"),
        ({"shape": [True, 4]}, "non-negative"),
        ({"shape": [1, 1, 1, 2, 2]}, "rank"),
        ({"shape": [1 << 23]}, "too large"),
        ({"shape": [4096, 4096]}, "elements"),
        ({"data": "text"}, "binary"),
        ({"data": b"\x00" * 7}, "bytes"),
        ({"enc": "gzip"}, "encoding"),
        ({"enc": "lz4", "data": b"\xff\xff\xff"}, "corrupt"),
        ({"scale": 0.5}, "int8"),
        ({"data": np.array([1, np.nan, 1, 1], np.float16).tobytes()}, "NaN"),
        ({"data": np.array([1, np.inf, 1, 1], np.float16).tobytes()}, "NaN"),
    ],
)
def test_tensor_decoder_rejects(change: dict[str, Any], words: str) -> None:
    tensor = good_tensor() | change
    with pytest.raises(ProtocolError, match=words):
        decode_tensor(tensor)


@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_tensor_decoder_rejects_bad_scales(scale: Any) -> None:
    tensor = {"dtype": "i8", "shape": [2], "data": b"\x01\x02", "scale": scale}
    with pytest.raises(ProtocolError, match="scale"):
        decode_tensor(tensor)


def test_lz4_cannot_decompress_past_the_shape() -> None:
    bomb = lz4.block.compress(b"\x00" * 100_000, store_size=False)
    with pytest.raises(ProtocolError):
        decode_tensor({"dtype": "u8", "shape": [10], "data": bomb, "enc": "lz4"})
    with pytest.raises(ProtocolError, match="empty"):
        decode_tensor({"dtype": "u8", "shape": [0], "data": bomb, "enc": "lz4"})


def test_tensor_rank_can_be_required() -> None:
    with pytest.raises(ProtocolError, match="rank"):
        decode_tensor(good_tensor(), rank=1)


def test_tensor_limits_are_configurable() -> None:
    tight = Limits(max_tensor_elements=3)
    with pytest.raises(ProtocolError):
        decode_tensor(good_tensor(), limits=tight)


# Envelopes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("compress", ["auto", "never"])
def test_frame_round_trip(compress: Any) -> None:
    frame = sample_frame()
    back = Frame.decode(frame.encode(compress=compress))
    assert (back.id, back.source, back.ts, back.deadline_ms, back.label) == (
        frame.id,
        frame.source,
        frame.ts,
        frame.deadline_ms,
        frame.label,
    )
    np.testing.assert_array_equal(back.tensor, frame.tensor)


def test_float_frames_travel_as_fp16_and_defaults_apply() -> None:
    frame = sample_frame(tensor=np.full((1, 2, 2), 0.5, np.float32), label=None)
    back = Frame.decode(frame.encode())
    assert back.tensor.dtype == np.float16 and back.label is None
    body = msgpack.unpackb(frame.encode())
    del body["deadline_ms"]
    assert Frame.decode(msgpack.packb(body)).deadline_ms == 1000
    assert body["type"] == "frame" and body["v"] == PROTOCOL_VERSION


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("deadline_ms", 0),
        ("deadline_ms", DEFAULT_LIMITS.max_deadline_ms + 1),
        ("deadline_ms", 1.5),
        ("id", ""),
        ("id", "has space"),
        ("id", "x" * 129),
        ("src", "a/b"),
        ("src", "+"),
        ("ts", -1.0),
        ("ts", "now"),
        ("label", -1),
        ("type", "partial"),
        ("tensor", None),
    ],
)
def test_frame_decoder_rejects_bad_fields(key: str, value: Any) -> None:
    body = msgpack.unpackb(sample_frame().encode())
    body[key] = value
    with pytest.raises(ProtocolError):
        Frame.decode(msgpack.packb(body, use_bin_type=True))


@pytest.mark.parametrize("int8", [False, True])
def test_partial_round_trip(int8: bool) -> None:
    partial = sample_partial()
    back = Partial.decode(partial.encode(int8=int8), partition=1, device="dev-a")
    assert (back.frame, back.partition, back.device, back.plan_version) == (
        "cam-1:000042",
        1,
        "dev-a",
        2,
    )
    assert back.compute_ms == pytest.approx(3.5) and back.queue_ms == pytest.approx(0.25)
    np.testing.assert_allclose(back.features, partial.features, atol=0.02)


def test_partial_envelope_overhead_is_as_documented() -> None:
    rng = np.random.default_rng(0)
    frame_id = "cam-1:000000042"  # 15 characters
    small = sample_partial(frame=frame_id, features=rng.normal(size=127), plan_version=0)
    assert len(small.encode(compress="never")) - 127 * 2 <= 64
    features = rng.normal(size=32767).astype(np.float32)
    partial = sample_partial(frame=frame_id, features=features, plan_version=2**32 - 1)
    encoded = partial.encode(compress="never")
    assert len(encoded) - 32767 * 2 <= 74
    body = msgpack.unpackb(encoded)
    assert set(body) == {"v", "f", "c", "q", "x", "p"}
    assert "p" not in msgpack.unpackb(sample_partial(plan_version=0).encode())


@pytest.mark.parametrize(
    "tensor",
    [
        {"dtype": "u8", "shape": [3], "data": b"abc"},  # features are never raw uint8
        {"dtype": "f16", "shape": [1, 2], "data": b"\x00" * 4},  # rank 2
    ],
)
def test_partial_decoder_rejects_bad_features(tensor: dict[str, Any]) -> None:
    body = {"v": 1, "f": "x", "c": 1.0, "q": 1.0, "x": tensor}
    with pytest.raises(ProtocolError):
        Partial.decode(msgpack.packb(body), partition=0, device="d")


def test_result_round_trip() -> None:
    result = sample_result()
    back = Result.decode(result.encode())
    assert back.frame == result.frame and back.missing == (1,) and back.truth == 2
    assert back.latency == result.latency and back.contributors == result.contributors
    np.testing.assert_array_equal(back.logits, result.logits)
    assert back.logits.dtype == np.float32


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("reason", "bored"),
        ("score", 1.5),
        ("missing", [-1]),
        ("missing", "0"),
        ("contributors", {"0": 5}),
        ("latency", {"e2e_ms": "fast"}),
        ("latency", {"e2e_ms": float("nan")}),
        ("degraded", 1),
    ],
)
def test_result_decoder_rejects_bad_fields(key: str, value: Any) -> None:
    body = msgpack.unpackb(sample_result().encode())
    body[key] = value
    with pytest.raises(ProtocolError):
        Result.decode(msgpack.packb(body, use_bin_type=True))


def test_status_stats_role_round_trip_as_json() -> None:
    for message, cls in ((sample_status(), Status), (sample_stats(), Stats), (sample_role(), Role)):
        payload = message.encode()
        assert json.loads(payload)["v"] == PROTOCOL_VERSION
        assert cls.decode(payload) == message
    will = sample_status(state="offline", role=None, serving="stopped", error="killed")
    assert Status.decode(will.encode()) == will


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("state", "dozing"),
        ("kind", "toaster"),
        ("serving", "maybe"),
        ("bdseq", -1),
        ("bdseq", 1.5),
        ("ts", 10**400),
        ("node", "a/b"),
        ("error", 5),
        ("role", {"group": "g", "partition": 5000}),
        ("role", "g1"),
    ],
)
def test_status_decoder_rejects_bad_fields(key: str, value: Any) -> None:
    body = json.loads(sample_status().encode())
    body[key] = value
    with pytest.raises(ProtocolError):
        Status.decode(json.dumps(body).encode())


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("model", "sha256"), "AB" * 32),
        (("model", "sha256"), "ab"),
        (("input", "shape"), [0, 4]),
        (("input", "std"), [0.0]),
        (("input", "dtype"), "int64"),
        (("partition",), 1024),
        (("deployment",), "a b"),
    ],
)
def test_role_decoder_rejects_bad_fields(path: tuple[str, ...], value: Any) -> None:
    body = json.loads(sample_role().encode())
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ProtocolError):
        Role.decode(json.dumps(body).encode())


def test_stats_decoder_rejects_bad_counters_and_quantiles() -> None:
    body = json.loads(sample_stats().encode())
    for key, value in (("counters", {"x": 1.5}), ("latency_ms", {"e2e": {"p50": 1}})):
        bad = body | {key: value}
        with pytest.raises(ProtocolError):
            Stats.decode(json.dumps(bad).encode())


# Versions and limits ------------------------------------------------------------------------
BINARY: dict[str, tuple[Callable[[], bytes], Callable[[bytes], Any]]] = {
    "frame": (lambda: sample_frame().encode(), Frame.decode),
    "partial": (
        lambda: sample_partial().encode(),
        lambda b: Partial.decode(b, partition=1, device="d"),
    ),
    "result": (lambda: sample_result().encode(), Result.decode),
}
CONTROL: dict[str, tuple[Callable[[], bytes], Callable[[bytes], Any]]] = {
    "status": (lambda: sample_status().encode(), Status.decode),
    "stats": (lambda: sample_stats().encode(), Stats.decode),
    "role": (lambda: sample_role().encode(), Role.decode),
}


@pytest.mark.parametrize("name", sorted(BINARY))
@pytest.mark.parametrize("version", [None, 0, 2, True, "1", 1.0, [1], {"1": 1}])
def test_binary_envelopes_check_their_version(name: str, version: Any) -> None:
    make, decode = BINARY[name]
    body = msgpack.unpackb(make())
    if version is None:
        del body["v"]
    else:
        body["v"] = version
    with pytest.raises(ProtocolError, match="version"):
        decode(msgpack.packb(body, use_bin_type=True))


@pytest.mark.parametrize("name", sorted(CONTROL))
@pytest.mark.parametrize("version", [None, 0, 2, True, "1", [1]])
def test_control_messages_check_their_version(name: str, version: Any) -> None:
    make, decode = CONTROL[name]
    body = json.loads(make())
    if version is None:
        del body["v"]
    else:
        body["v"] = version
    with pytest.raises(ProtocolError, match="version"):
        decode(json.dumps(body).encode())


def test_oversized_payloads_are_rejected_before_decoding() -> None:
    tiny = Limits(max_payload_bytes=64)
    with pytest.raises(ProtocolError, match="limit"):
        Frame.decode(sample_frame().encode(), tiny)
    with pytest.raises(ProtocolError, match="too large"):
        Status.decode(b" " * 300_000)


def test_decoders_reject_non_maps_and_non_bytes() -> None:
    for decode in [d for _, d in BINARY.values()]:
        with pytest.raises(ProtocolError):
            decode(msgpack.packb([1, 2, 3]))
        with pytest.raises(ProtocolError):
            decode("not bytes")
        with pytest.raises(ProtocolError):
            decode(b"\xc1")  # the one byte msgpack never uses
    for decode in [d for _, d in CONTROL.values()]:
        for payload in (b"[1]", b"\xff\xfe", b"{", b"[" * 100_000):
            with pytest.raises(ProtocolError):
                decode(payload)


# Decoders fail only with ProtocolError ---------------------------------------------------------
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def mutate_map(body: dict[str, Any], key: str, value: Any, delete: bool) -> dict[str, Any]:
    out = dict(body)
    if delete:
        out.pop(key, None)
    else:
        out[key] = value
    return out


def decode_or_protocol_error(decode: Callable[[bytes], Any], payload: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode(payload)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(name=st.sampled_from(sorted(BINARY)), payload=st.binary(max_size=200))
def test_binary_decoders_survive_random_bytes(name: str, payload: bytes) -> None:
    decode_or_protocol_error(BINARY[name][1], payload)


@FUZZ
@given(name=st.sampled_from(sorted(BINARY)), value=msgpack_values)
def test_binary_decoders_survive_random_structures(name: str, value: Any) -> None:
    decode_or_protocol_error(BINARY[name][1], msgpack.packb(value, use_bin_type=True))


@FUZZ
@given(
    data=st.data(), name=st.sampled_from(sorted(BINARY)), value=msgpack_values, delete=st.booleans()
)
def test_binary_decoders_survive_mutated_envelopes(
    data: st.DataObject, name: str, value: Any, delete: bool
) -> None:
    make, decode = BINARY[name]
    body = msgpack.unpackb(make())
    nested = data.draw(st.booleans())
    tensor_key = {"frame": "tensor", "partial": "x", "result": "logits"}[name]
    if nested:
        key = data.draw(st.sampled_from(["dtype", "shape", "data", "enc", "scale", "junk"]))
        body[tensor_key] = mutate_map(body[tensor_key], key, value, delete)
    else:
        key = data.draw(st.sampled_from([*sorted(body), "junk"]))
        body = mutate_map(body, key, value, delete)
    decode_or_protocol_error(decode, msgpack.packb(body, use_bin_type=True))


@FUZZ
@given(
    name=st.sampled_from(sorted(CONTROL)), value=json_values, delete=st.booleans(), data=st.data()
)
def test_control_decoders_survive_mutated_messages(
    name: str, value: Any, delete: bool, data: st.DataObject
) -> None:
    make, decode = CONTROL[name]
    body = json.loads(make())
    key = data.draw(st.sampled_from([*sorted(body), "junk"]))
    decode_or_protocol_error(decode, json.dumps(mutate_map(body, key, value, delete)).encode())
    decode_or_protocol_error(decode, json.dumps(value).encode())


# Topics --------------------------------------------------------------------------------------
def test_topics_build_and_parse() -> None:
    topics = Topics("site-a")
    assert topics.frames("cam-1") == "mqttinfer/site-a/frames/cam-1"
    assert topics.partial(2, "dev-a") == "mqttinfer/site-a/partials/2/dev-a"
    assert topics.last_level(topics.status("dev-a"), "status") == "dev-a"
    for bad in (
        "mqttinfer/other/status/x",
        "mqttinfer/site-a/status/a/b",
        "mqttinfer/site-a/status/",
    ):
        with pytest.raises(ProtocolError):
            topics.last_level(bad, "status")
