"""Tensor codec: numpy arrays as ``{dtype, shape, data}`` maps inside msgpack envelopes.

- ``dtype`` is one of ``u8``, ``i8``, ``f16``, ``f32`` (little-endian; short because a
  partial's whole envelope must stay within 64 bytes of its feature bytes).
- ``data`` is the raw C-order bytes, optionally lz4-block compressed (``"enc": "lz4"``),
  which is used only when it makes the bytes smaller.
- ``"scale"`` marks an int8 tensor quantised from floats: value = int8 * scale.

Decoding checks everything (types, dtype, rank, element count, byte size, finiteness) and
bounds decompression by the size the shape implies, so a hostile payload cannot blow up memory.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lz4.block
import numpy as np
import numpy.typing as npt

from mqttinfer.errors import ProtocolError
from mqttinfer.protocol.limits import DEFAULT_LIMITS, Limits

DTYPES: dict[str, np.dtype[Any]] = {
    "u8": np.dtype("<u1"),
    "i8": np.dtype("<i1"),
    "f16": np.dtype("<f2"),
    "f32": np.dtype("<f4"),
}
_FLOAT_DTYPES = frozenset({"f16", "f32"})
_ALLOWED_KEYS = frozenset({"dtype", "shape", "data", "enc", "scale"})
# lz4 rarely pays below this many bytes; trying costs more than it saves.
_MIN_COMPRESS_BYTES = 64

Compression = Literal["auto", "never", "always"]


def encode_tensor(
    array: npt.ArrayLike,
    *,
    dtype: str | None = None,
    compress: Compression = "auto",
    int8: bool = False,
) -> dict[str, Any]:
    """Encode ``array`` as a tensor map.

    ``dtype`` casts first (default: keep uint8/int8/float16, turn other floats into float16).
    ``int8=True`` quantises floats symmetrically to int8 with a per-tensor scale.
    ``compress="auto"`` applies lz4 only when the compressed bytes are smaller.
    """
    arr = np.asarray(array)
    scale: float | None = None
    if int8:
        arr, scale = _quantize_int8(arr.astype(np.float32))
        name = "i8"
    else:
        name = dtype or _default_dtype_name(arr)
        if name not in DTYPES:
            raise ValueError(f"unsupported tensor dtype {name!r}; use one of {sorted(DTYPES)}")
        arr = arr.astype(DTYPES[name], copy=False)
    raw = np.ascontiguousarray(arr).tobytes()
    out: dict[str, Any] = {"dtype": name, "shape": list(arr.shape), "data": raw}
    if compress != "never" and (compress == "always" or len(raw) >= _MIN_COMPRESS_BYTES):
        packed = lz4.block.compress(raw, store_size=False)
        if compress == "always" or len(packed) < len(raw):
            out["data"] = packed
            out["enc"] = "lz4"
    if scale is not None:
        out["scale"] = scale
    return out


def decode_tensor(
    obj: Any,
    *,
    kind: str = "tensor",
    limits: Limits = DEFAULT_LIMITS,
    rank: int | None = None,
) -> npt.NDArray[Any]:
    """Decode and validate a tensor map; int8 tensors with a scale come back as float32."""
    if not isinstance(obj, dict):
        raise ProtocolError("tensor must be a map", kind=kind)
    unknown = set(obj) - _ALLOWED_KEYS
    if unknown:
        raise ProtocolError(f"tensor has unknown keys {sorted(map(str, unknown))[:5]}", kind=kind)
    name = obj.get("dtype")
    if not isinstance(name, str) or name not in DTYPES:  # str first: a list is unhashable
        raise ProtocolError(
            f"tensor dtype {str(name)[:20]!r} is not one of {sorted(DTYPES)}", kind=kind
        )
    shape = _checked_shape(obj.get("shape"), kind, limits, rank)
    dtype = DTYPES[name]
    count = math.prod(shape)
    expected = count * dtype.itemsize
    data = _checked_bytes(obj, expected, kind)
    arr = np.frombuffer(data, dtype=dtype).reshape(shape)
    if "scale" in obj:
        return _dequantize(arr, obj["scale"], name, kind)
    if name in _FLOAT_DTYPES and not np.isfinite(arr).all():
        raise ProtocolError("tensor holds NaN or infinity", kind=kind)
    return arr


def _default_dtype_name(arr: npt.NDArray[Any]) -> str:
    if arr.dtype == np.uint8:
        return "u8"
    if arr.dtype == np.int8:
        return "i8"
    # Floats travel as fp16 unless f32 is asked for explicitly.
    return "f16"


def _quantize_int8(arr: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.int8], float]:
    peak = float(np.max(np.abs(arr))) if arr.size else 0.0
    scale = peak / 127.0 if peak > 0 else 1.0
    q = np.clip(np.rint(arr / scale), -127, 127).astype(np.int8)
    return q, scale


def _checked_shape(value: Any, kind: str, limits: Limits, rank: int | None) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ProtocolError("tensor shape must be a list of integers", kind=kind)
    if len(value) > limits.max_tensor_rank:
        raise ProtocolError(f"tensor rank {len(value)} exceeds {limits.max_tensor_rank}", kind=kind)
    if rank is not None and len(value) != rank:
        raise ProtocolError(f"tensor rank is {len(value)}, expected {rank}", kind=kind)
    dims: list[int] = []
    for dim in value:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise ProtocolError("tensor shape must hold non-negative integers", kind=kind)
        if dim > limits.max_tensor_elements:
            raise ProtocolError(f"tensor dimension {dim} is too large", kind=kind)
        dims.append(dim)
    if math.prod(dims) > limits.max_tensor_elements:
        raise ProtocolError(
            f"tensor has {math.prod(dims)} elements, limit {limits.max_tensor_elements}", kind=kind
        )
    return tuple(dims)


def _checked_bytes(obj: dict[str, Any], expected: int, kind: str) -> bytes:
    data = obj.get("data")
    if not isinstance(data, bytes):
        raise ProtocolError("tensor data must be binary", kind=kind)
    enc = obj.get("enc")
    if enc is None:
        if len(data) != expected:
            raise ProtocolError(
                f"tensor data is {len(data)} bytes, shape implies {expected}", kind=kind
            )
        return data
    if enc != "lz4":
        raise ProtocolError(f"tensor encoding {str(enc)[:20]!r} is not 'lz4'", kind=kind)
    if expected == 0:
        raise ProtocolError("empty tensor cannot be lz4-encoded", kind=kind)
    try:
        # uncompressed_size bounds the output: no decompression bomb can exceed the shape.
        raw: bytes = lz4.block.decompress(data, uncompressed_size=expected)
    except Exception as exc:  # lz4 raises LZ4BlockError (a bare Exception subclass)
        raise ProtocolError(f"tensor lz4 data is corrupt ({exc})", kind=kind) from exc
    if len(raw) != expected:
        raise ProtocolError(
            f"tensor decompresses to {len(raw)} bytes, shape implies {expected}", kind=kind
        )
    return raw


def _dequantize(arr: npt.NDArray[Any], scale: Any, name: str, kind: str) -> npt.NDArray[np.float32]:
    if name != "i8":
        raise ProtocolError("only int8 tensors may carry a scale", kind=kind)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ProtocolError("tensor scale must be a number", kind=kind)
    if not math.isfinite(scale) or scale <= 0:
        raise ProtocolError("tensor scale must be finite and positive", kind=kind)
    return arr.astype(np.float32) * np.float32(scale)
