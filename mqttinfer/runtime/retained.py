"""Broker round trips for one-shot tools: a barrier, and a snapshot of retained messages.

MQTT has no "end of retained messages" marker, and ``Bus.publish`` does not wait for the
broker. Both come from one fact: a broker handles the packets of one connection in order, and
queues what it sends to one subscriber in order. So when a token this client publishes on its
own probe topic comes back, the broker has handled every packet sent before it: the retained
messages of earlier subscriptions are already delivered, and earlier publishes (retained ones
included) are stored. ``plan apply`` uses it for back-pressure and to read the fleet's
retained state; ``devices profile`` uses the same probe topic for its ping and throughput
measurements.

The probe topic is ``<prefix>/probe/<node>`` (see docs/protocol.md): private to one node,
never retained, never read by anyone else.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable

from mqttinfer.errors import BrokerError
from mqttinfer.runtime.bus import Bus, Message
from mqttinfer.topics import Topics

log = logging.getLogger(__name__)

_RETRY_S = 0.5
PROBE_QOS = 1


def probe_topic(topics: Topics, node: str) -> str:
    """The node's private echo topic."""
    return f"{topics.prefix}/probe/{node}"


class BrokerBarrier:
    """``sync()`` returns once the broker has handled everything this bus sent before it.

    ``owner`` names the probe topic (default: the bus's node): a tool that connects with
    another node's identity (``devices profile`` uses the device's) echoes under that identity,
    the only probe topic a broker ACL lets it use.
    """

    def __init__(self, bus: Bus, owner: str | None = None) -> None:
        self.bus = bus
        self.topic = f"{probe_topic(bus.topics, owner or bus.node)}/barrier"
        self._cond = threading.Condition()
        self._seen: set[bytes] = set()
        self._subscribed = False

    def _on_token(self, message: Message) -> None:
        with self._cond:
            self._seen.add(message.payload)
            self._cond.notify_all()

    def sync(self, timeout_s: float) -> None:
        """Raise BrokerError when no echo came back within ``timeout_s``.

        The token is re-sent every half second: a publish can race ahead of a subscription
        that the bus sends from its network thread on (re)connect.
        """
        if not self._subscribed:
            self.bus.subscribe(self.topic, self._on_token, qos=PROBE_QOS)
            self._subscribed = True
        token = uuid.uuid4().hex.encode()
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while token not in self._seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrokerError(
                        f"the broker at {self.bus.config.url} did not echo a message within "
                        f"{timeout_s:.0f} s (connection lost, or no permission to publish and "
                        f"subscribe on {self.topic})"
                    )
                self._cond.release()
                try:
                    self.bus.publish(self.topic, token, qos=PROBE_QOS)
                finally:
                    self._cond.acquire()
                self._cond.wait(min(left, _RETRY_S))
            self._seen.discard(token)


def retained_snapshot(
    bus: Bus, filters: Iterable[str], barrier: BrokerBarrier, timeout_s: float
) -> dict[str, bytes]:
    """Every retained message under ``filters`` (topic → payload, empty ones left out).

    The subscriptions stay (the bus offers no way to drop one handler of a filter), but the
    snapshot's handler goes quiet once the snapshot is taken.
    """
    found: dict[str, bytes] = {}
    lock = threading.Lock()
    done = threading.Event()

    def keep(message: Message) -> None:
        if message.retain and message.payload and not done.is_set():
            with lock:
                found[message.topic] = message.payload

    if not bus.wait_connected(timeout_s):
        raise BrokerError(f"could not connect to {bus.config.url} within {timeout_s:.0f} s")
    for topic_filter in filters:
        bus.subscribe(topic_filter, keep, qos=1)
    barrier.sync(timeout_s)
    done.set()
    with lock:
        snapshot = dict(found)
    log.debug("retained snapshot: %d messages", len(snapshot))
    return snapshot
