"""Student models over MQTT: a retained manifest on ``models/<sha256>``, bytes in chunks.

``plan apply`` publishes, retained and in this order, every chunk on ``models/<sha256>/<i>``
(raw bytes, ``i`` = 0 … chunks−1) and then the manifest on ``models/<sha256>`` (JSON, below). A
manifest on the broker therefore means its chunks were accepted before it. There is always a
manifest, even for a one-chunk model, so a reader has one code path. docs/protocol.md,
"Plan apply and model distribution", is the contract::

    {"v": 1, "sha256": "<64 hex>", "size": 182734, "chunk_size": 65536, "chunks": 3,
     "name": "student-1.onnx", "arch": "wrn-16-1"}

Everything here is pure (no MQTT): :func:`split_model` cuts a model into a manifest and chunks,
:class:`ModelAssembly` puts them back together with every bound checked, and
:class:`ModelCache` keeps verified models in a device's state directory.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from mqttinfer.errors import ProtocolError, RoleError
from mqttinfer.protocol import fields as f
from mqttinfer.protocol.control import dump_json, load_json
from mqttinfer.protocol.limits import PROTOCOL_VERSION

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_BYTES = 256 * 1024 * 1024
MAX_CHUNKS = 65_536
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK_LEVEL = re.compile(r"^[0-9]{1,5}$")
_CACHE_SUFFIX = ".onnx"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_sha256(value: str) -> bool:
    return bool(_SHA256.match(value))


@dataclass(frozen=True, slots=True)
class ModelManifest:
    """What a reader needs to fetch and check a model: hash, size and chunking."""

    KIND: ClassVar[str] = "model manifest"
    sha256: str
    size: int
    chunk_size: int
    chunks: int
    name: str = ""
    arch: str = ""

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise ProtocolError(problem, kind=self.KIND)

    def _problem(self) -> str:
        if not is_sha256(self.sha256):
            return "'sha256' must be 64 lowercase hex digits"
        if self.size < 1 or self.chunk_size < 1:
            return "'size' and 'chunk_size' must be positive"
        if self.chunks != math.ceil(self.size / self.chunk_size):
            return (
                f"'chunks' is {self.chunks}, but {self.size} bytes in chunks of "
                f"{self.chunk_size} make {math.ceil(self.size / self.chunk_size)}"
            )
        if self.chunks > MAX_CHUNKS:
            return f"{self.chunks} chunks is over the limit of {MAX_CHUNKS}"
        return ""

    def chunk_length(self, index: int) -> int:
        """The exact byte length chunk ``index`` must have."""
        if not 0 <= index < self.chunks:
            raise ProtocolError(f"chunk {index} is outside 0..{self.chunks - 1}", kind=self.KIND)
        if index < self.chunks - 1:
            return self.chunk_size
        return self.size - self.chunk_size * (self.chunks - 1)

    def encode(self) -> bytes:
        body: dict[str, Any] = asdict(self)
        body["v"] = PROTOCOL_VERSION
        return dump_json(body)

    @classmethod
    def decode(cls, payload: bytes) -> ModelManifest:
        obj = load_json(payload, cls.KIND)
        return cls(
            sha256=f.text(obj, "sha256", cls.KIND, max_length=64),
            size=f.integer(obj, "size", cls.KIND),
            chunk_size=f.integer(obj, "chunk_size", cls.KIND),
            chunks=f.integer(obj, "chunks", cls.KIND, maximum=MAX_CHUNKS),
            name=f.text(obj, "name", cls.KIND, max_length=128, default=""),
            arch=f.text(obj, "arch", cls.KIND, max_length=64, default=""),
        )


def split_model(
    data: bytes, chunk_size: int, *, name: str = "", arch: str = ""
) -> tuple[ModelManifest, list[bytes]]:
    """The manifest and the chunks that carry ``data`` (``chunk_size`` bytes each, the last
    one shorter)."""
    if not data:
        raise ValueError("a model cannot be empty")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    manifest = ModelManifest(
        sha256=sha256_hex(data),
        size=len(data),
        chunk_size=chunk_size,
        chunks=len(chunks),
        name=name[:128],
        arch=arch[:64],
    )
    return manifest, chunks


def chunk_index(topic: str, model_topic: str) -> int:
    """``i`` from ``<model_topic>/<i>``; ProtocolError for anything else."""
    head = f"{model_topic}/"
    level = topic[len(head) :] if topic.startswith(head) else ""
    if not _CHUNK_LEVEL.match(level):
        raise ProtocolError(f"topic {topic[:160]!r} is not {head}<index>", kind="model chunk")
    return int(level)


class ModelAssembly:
    """Collects the chunks of one manifest into a preallocated buffer.

    ``add`` checks index and length (so a reader never holds more than ``manifest.size``
    bytes) and ``result`` checks the sha256; both raise RoleError, naming the model topic.
    Not thread-safe: the caller serialises ``add`` calls.
    """

    def __init__(
        self,
        manifest: ModelManifest,
        *,
        expected_sha256: str,
        expected_size: int = 0,
        max_bytes: int = DEFAULT_MAX_MODEL_BYTES,
        source: str = "models",
    ) -> None:
        self.manifest = manifest
        self.source = source
        if manifest.sha256 != expected_sha256:
            raise RoleError(
                f"manifest names sha256 {manifest.sha256[:12]}…, the role wants "
                f"{expected_sha256[:12]}…",
                source=source,
                fix="re-run 'mqttinfer plan apply --force' to republish the model",
            )
        if expected_size and manifest.size != expected_size:
            raise RoleError(
                f"manifest says {manifest.size} bytes, the role says {expected_size}",
                source=source,
                fix="re-run 'mqttinfer plan apply --force' to republish the model",
            )
        if manifest.size > max_bytes:
            raise RoleError(
                f"model is {manifest.size} bytes, over this device's limit of {max_bytes}",
                source=source,
                fix="raise the device's --max-model-bytes, or plan a smaller student",
            )
        self._buffer = bytearray(manifest.size)
        self._have: set[int] = set()

    @property
    def received(self) -> int:
        return len(self._have)

    @property
    def complete(self) -> bool:
        return len(self._have) == self.manifest.chunks

    def add(self, index: int, payload: bytes) -> None:
        try:
            expected = self.manifest.chunk_length(index)
        except ProtocolError as exc:
            raise RoleError(str(exc), source=self.source) from exc
        if len(payload) != expected:
            raise RoleError(
                f"chunk {index} is {len(payload)} bytes, the manifest needs {expected}",
                source=self.source,
                fix="re-run 'mqttinfer plan apply --force' to republish the model",
            )
        start = index * self.manifest.chunk_size
        self._buffer[start : start + expected] = payload
        self._have.add(index)

    def missing(self) -> list[int]:
        return [i for i in range(self.manifest.chunks) if i not in self._have]

    def result(self) -> bytes:
        """The model bytes, once complete and matching the manifest's sha256."""
        if not self.complete:
            missing = self.missing()
            raise RoleError(
                f"{len(missing)} of {self.manifest.chunks} chunks missing (first: {missing[0]})",
                source=self.source,
                fix="re-run 'mqttinfer plan apply --force' to republish the model",
            )
        data = bytes(self._buffer)
        actual = sha256_hex(data)
        if actual != self.manifest.sha256:
            raise RoleError(
                f"sha256 mismatch: the received bytes hash to {actual[:12]}…, "
                f"the role wants {self.manifest.sha256[:12]}…",
                source=self.source,
                fix="re-run 'mqttinfer plan apply --force' to republish the model",
            )
        return data


def default_state_dir(env: dict[str, str] | None = None) -> Path:
    """``$STATE_DIRECTORY`` (systemd's StateDirectory=, first entry) or ~/.cache/mqttinfer."""
    environ = os.environ if env is None else env
    state = environ.get("STATE_DIRECTORY", "")
    if state:
        return Path(state.split(":")[0])
    return Path.home() / ".cache" / "mqttinfer"


class ModelCache:
    """Verified models under ``<state_dir>/models/<sha256>.onnx``.

    The cache only saves downloads: every failure to read or write it is logged and ignored,
    and a file whose hash no longer matches its name is deleted.
    """

    def __init__(self, state_dir: Path, *, keep: int = 4) -> None:
        self.root = state_dir / "models"
        self.keep = max(1, keep)

    def path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise ValueError(f"not a sha256: {sha256[:80]!r}")
        return self.root / f"{sha256}{_CACHE_SUFFIX}"

    def get(self, sha256: str) -> bytes | None:
        path = self.path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("model cache: cannot read %s: %s", path, exc)
            return None
        if sha256_hex(data) != sha256:
            log.warning("model cache: %s does not match its hash; deleting it", path)
            path.unlink(missing_ok=True)
            return None
        return data

    def put(self, sha256: str, data: bytes) -> None:
        """Store ``data`` atomically (write a temporary file, then rename it into place)."""
        target = self.path(sha256)
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".partial-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        except OSError as exc:
            log.warning("model cache: cannot write %s: %s", target, exc)
            return
        self.prune(keep=(sha256,))

    def prune(self, keep: tuple[str, ...] = ()) -> None:
        """Delete all but the ``self.keep`` most recently written models (``keep`` stay)."""
        try:
            files = sorted(
                self.root.glob(f"*{_CACHE_SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True
            )
        except OSError as exc:
            log.warning("model cache: cannot list %s: %s", self.root, exc)
            return
        others = [path for path in files if path.stem not in keep]
        room = max(0, self.keep - (len(files) - len(others)))
        for path in others[room:]:
            path.unlink(missing_ok=True)
            log.info("model cache: removed %s", path.name)
