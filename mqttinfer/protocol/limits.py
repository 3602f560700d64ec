"""Size limits that every decoder enforces (bad input never allocates unbounded memory)."""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})


@dataclass(frozen=True, slots=True)
class Limits:
    """Upper bounds applied while decoding a message.

    The defaults fit 224x224x3 uint8 frames and partials of a few thousand channels.
    """

    max_payload_bytes: int = 4 * 1024 * 1024
    max_tensor_elements: int = 1 << 22
    max_tensor_rank: int = 4
    max_id_length: int = 128
    max_partitions: int = 1024
    max_deadline_ms: int = 600_000
    max_list_items: int = 1024


DEFAULT_LIMITS = Limits()
