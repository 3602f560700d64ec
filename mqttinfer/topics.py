"""The MQTT topic tree of one deployment (docs/protocol.md is the contract).

Every topic lives under ``mqttinfer/<deployment>/``. Identifiers that become topic levels
(deployment, node, source, group, partition) are restricted to ``[A-Za-z0-9_.-]`` so that
they can never inject ``/``, ``+`` or ``#`` into a topic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mqttinfer.errors import ConfigError, ProtocolError

ROOT = "mqttinfer"
DEFAULT_DEPLOYMENT = "default"
_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def is_valid_id(value: str) -> bool:
    """True when ``value`` may be used as one topic level (node, source, group id...)."""
    return bool(_ID_PATTERN.match(value))


def check_id(value: str, what: str) -> str:
    """Return ``value`` or raise ConfigError naming ``what`` and the allowed characters."""
    if not isinstance(value, str) or not is_valid_id(value):
        raise ConfigError(
            f"{what} {value!r} is not a valid identifier",
            field=what,
            fix="use 1-64 characters from A-Z a-z 0-9 _ . -",
        )
    return value


@dataclass(frozen=True, slots=True)
class Topics:
    """Builds (and parses) every topic of one deployment."""

    deployment: str = DEFAULT_DEPLOYMENT

    def __post_init__(self) -> None:
        check_id(self.deployment, "deployment")

    @property
    def prefix(self) -> str:
        return f"{ROOT}/{self.deployment}"

    # Publishing topics -------------------------------------------------------------
    def frames(self, source: str) -> str:
        return f"{self.prefix}/frames/{source}"

    def partial(self, partition: int, device: str) -> str:
        return f"{self.prefix}/partials/{partition}/{device}"

    def result(self, source: str) -> str:
        return f"{self.prefix}/results/{source}"

    def status(self, node: str) -> str:
        return f"{self.prefix}/status/{node}"

    def stats(self, node: str) -> str:
        return f"{self.prefix}/stats/{node}"

    def plan(self, device: str) -> str:
        return f"{self.prefix}/plan/{device}"

    def model(self, sha256: str) -> str:
        return f"{self.prefix}/models/{sha256}"

    def model_chunk(self, sha256: str, index: int) -> str:
        return f"{self.prefix}/models/{sha256}/{index}"

    def profile(self, device: str) -> str:
        return f"{self.prefix}/profile/{device}"

    # Subscription filters ------------------------------------------------------------
    @property
    def all_frames(self) -> str:
        return f"{self.prefix}/frames/+"

    @property
    def all_partials(self) -> str:
        return f"{self.prefix}/partials/+/+"

    @property
    def all_results(self) -> str:
        return f"{self.prefix}/results/+"

    @property
    def all_status(self) -> str:
        return f"{self.prefix}/status/+"

    @property
    def all_stats(self) -> str:
        return f"{self.prefix}/stats/+"

    @property
    def all_profiles(self) -> str:
        return f"{self.prefix}/profile/+"

    @property
    def everything(self) -> str:
        return f"{self.prefix}/#"

    # Parsing ---------------------------------------------------------------------------
    def last_level(self, topic: str, kind: str) -> str:
        """The node/source id at the end of ``<prefix>/<kind>/<id>``; ProtocolError otherwise."""
        head = f"{self.prefix}/{kind}/"
        if not topic.startswith(head):
            raise ProtocolError(f"topic {topic!r} is not under {head}", kind=kind)
        rest = topic[len(head) :]
        if not is_valid_id(rest):
            raise ProtocolError(f"topic {topic!r} ends in an invalid id", kind=kind)
        return rest
