"""The device side of ``plan apply``: a role from the retained ``plan/<device>`` topic.

:class:`PlanRoleProvider` is a ``RoleProvider`` (see ``runtime/roles.py``). It subscribes to
``plan/<device>`` (QoS 1) and, on its own worker thread, for every role message:

- an **empty** message (``plan apply`` removed the device from the plan): the role is
  withdrawn, ``on_role(None)``; the device stops serving;
- a role **equal** to the one it serves (a retained re-delivery after a reconnect): ignored;
- a role with an **older** ``plan_version`` than the one it serves: ignored (logged);
- otherwise the model named by ``model.sha256`` is taken from the state directory's cache or
  fetched from ``models/<sha256>`` (manifest, then chunks: every bound checked, the sha256
  verified, see ``model_transfer``), cached, and handed to the device, which loads, warms up,
  and announces ``serving=ready`` with the new role.

Anything that goes wrong becomes ``on_error("refused plan <name> v<version>: <why>")``: the
device sets ``serving=error`` with that text and keeps the role it had. ``plan apply`` matches
the ``v<version>`` to report the refusal. Messages that arrive while a model is being fetched
supersede it: only the newest role is worth fetching.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from mqttinfer.errors import MqttInferError, ProtocolError, RoleError
from mqttinfer.protocol import Role
from mqttinfer.runtime.bus import Bus, Message
from mqttinfer.runtime.model_transfer import (
    DEFAULT_MAX_MODEL_BYTES,
    ModelAssembly,
    ModelCache,
    ModelManifest,
    chunk_index,
)
from mqttinfer.runtime.roles import LoadedRole
from mqttinfer.topics import Topics

log = logging.getLogger(__name__)

PLAN_QOS = 1
MODEL_QOS = 1

RoleUpdate = Callable[[LoadedRole | None], None]
ErrorCallback = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class PlanClientSettings:
    """``fetch_timeout_s`` bounds one model download; ``max_model_bytes`` its size."""

    fetch_timeout_s: float = 120.0
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES

    def __post_init__(self) -> None:
        if self.fetch_timeout_s <= 0 or self.max_model_bytes < 1:
            raise ValueError("fetch_timeout_s and max_model_bytes must be positive")


class _SupersededError(Exception):
    """A newer plan message arrived (or the provider stopped) while a model was fetched."""


class _Fetch:
    """One model download: filled by the network thread, read by the worker (under ``cond``)."""

    def __init__(self, role: Role, topics: Topics, settings: PlanClientSettings) -> None:
        self.role = role
        self.topic = topics.model(role.model.sha256)
        self.settings = settings
        self.assembly: ModelAssembly | None = None
        self.manifest_payload: bytes | None = None
        self.error: RoleError | None = None

    def on_chunk(self, message: Message) -> None:
        """Network thread, ``cond`` held by the caller."""
        if self.assembly is None or self.error is not None or not message.payload:
            return
        try:
            index = chunk_index(message.topic, self.topic)
            self.assembly.add(index, message.payload)
        except ProtocolError as exc:
            self.error = RoleError(str(exc), source=message.topic)
        except RoleError as exc:
            self.error = exc

    def start_assembly(self) -> None:
        """Worker thread, ``cond`` held: decode the manifest and allocate the buffer."""
        assert self.manifest_payload is not None
        try:
            manifest = ModelManifest.decode(self.manifest_payload)
        except ProtocolError as exc:
            raise RoleError(str(exc), source=self.topic) from exc
        self.assembly = ModelAssembly(
            manifest,
            expected_sha256=self.role.model.sha256,
            expected_size=self.role.model.size,
            max_bytes=self.settings.max_model_bytes,
            source=self.topic,
        )


class PlanRoleProvider:
    """Serves the device whatever ``plan apply`` retained on ``plan/<device>``."""

    def __init__(
        self,
        device: str,
        *,
        cache: ModelCache | None = None,
        settings: PlanClientSettings = PlanClientSettings(),
    ) -> None:
        self.device = device
        self.cache = cache
        self.settings = settings
        self._cond = threading.Condition()
        self._latest: Message | None = None
        self._fetch: _Fetch | None = None
        self._active: Role | None = None
        self._stopping = False
        self._bus: Bus | None = None
        self._on_role: RoleUpdate = _ignore
        self._on_error: ErrorCallback = _ignore
        self._worker = threading.Thread(target=self._run, name="plan-client", daemon=True)

    # ------------------------------------------------------------------ RoleProvider
    def start(self, bus: Bus, on_role: RoleUpdate, on_error: ErrorCallback) -> None:
        self._bus = bus
        self._on_role = on_role
        self._on_error = on_error
        bus.subscribe(bus.topics.plan(self.device), self._on_plan, qos=PLAN_QOS)
        self._worker.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._worker.is_alive():
            self._worker.join(timeout=10)

    def describe(self) -> str:
        topic = self._bus.topics.plan(self.device) if self._bus else f"plan/{self.device}"
        return f"retained role on {topic}"

    @property
    def active(self) -> Role | None:
        """The role last handed to the device (None: none yet, or withdrawn)."""
        return self._active

    # ------------------------------------------------------------------ network thread
    def _on_plan(self, message: Message) -> None:
        with self._cond:
            self._latest = message
            self._cond.notify_all()

    def _on_manifest(self, message: Message) -> None:
        with self._cond:
            fetch = self._fetch
            if fetch is not None and message.topic == fetch.topic and message.payload:
                fetch.manifest_payload = message.payload
                self._cond.notify_all()

    def _on_chunk(self, message: Message) -> None:
        with self._cond:
            if self._fetch is not None:
                self._fetch.on_chunk(message)
                self._cond.notify_all()

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while self._latest is None and not self._stopping:
                    self._cond.wait()
                message, self._latest = self._latest, None
                if self._stopping or message is None:
                    return
            try:
                self._handle(message)
            except Exception:  # the worker must outlive any message
                log.exception("plan client: unexpected error on %s", message.topic)

    def _handle(self, message: Message) -> None:
        if not message.payload:
            self._withdraw()
            return
        try:
            role = self._parse(message.payload)
        except RoleError as exc:
            self._report(f"refused the role on {message.topic}: {exc}")
            return
        active = self._active
        if active is not None and role == active:
            log.debug("plan v%d re-delivered; already serving it", role.plan_version)
            return
        if active is not None and role.plan_version < active.plan_version:
            log.warning(
                "ignoring plan %s v%d: older than the v%d this device runs",
                role.plan,
                role.plan_version,
                active.plan_version,
            )
            return
        try:
            model = self._model(role)
        except _SupersededError:
            log.info("plan v%d superseded while its model was fetched", role.plan_version)
            return
        except MqttInferError as exc:
            self._report(f"refused {describe_role(role)}: {exc}")
            return
        self._active = role
        self._on_role(LoadedRole(role, model, f"{describe_role(role)} from the broker"))

    def _parse(self, payload: bytes) -> Role:
        assert self._bus is not None
        topic = self._bus.topics.plan(self.device)
        try:
            role = Role.decode(payload)
        except ProtocolError as exc:
            raise RoleError(str(exc), source=topic, fix="re-run 'mqttinfer plan apply'") from exc
        for field, got, wanted in (
            ("device", role.device, self.device),
            ("deployment", role.deployment, self._bus.topics.deployment),
        ):
            if got != wanted:
                raise RoleError(f"is {got!r}, expected {wanted!r}", source=topic, field=field)
        if role.model.file is not None:
            raise RoleError(
                "a plan role must not name a local file", source=topic, field="model.file"
            )
        return role

    def _withdraw(self) -> None:
        if self._active is None:
            return
        log.info("role withdrawn (plan %s v%d)", self._active.plan, self._active.plan_version)
        self._active = None
        self._on_role(None)

    def _report(self, error: str) -> None:
        log.error("%s", error)
        self._on_error(error[:500])

    # ------------------------------------------------------------------ model download
    def _model(self, role: Role) -> bytes:
        sha = role.model.sha256
        cached = self.cache.get(sha) if self.cache is not None else None
        if cached is not None:
            if role.model.size and len(cached) != role.model.size:
                raise RoleError(
                    f"cached model is {len(cached)} bytes, the role says {role.model.size}",
                    field="model.size",
                )
            log.info("model %s… from the cache", sha[:12])
            return cached
        data = self._download(role)
        if self.cache is not None:
            self.cache.put(sha, data)
        return data

    def _download(self, role: Role) -> bytes:
        bus = self._bus
        assert bus is not None
        fetch = _Fetch(role, bus.topics, self.settings)
        chunk_filter = f"{fetch.topic}/+"
        started = time.monotonic()
        with self._cond:
            self._fetch = fetch
        bus.subscribe(fetch.topic, self._on_manifest, qos=MODEL_QOS)
        try:
            deadline = started + self.settings.fetch_timeout_s
            self._wait(lambda: fetch.manifest_payload is not None, deadline, fetch, "manifest")
            with self._cond:
                fetch.start_assembly()
            bus.subscribe(chunk_filter, self._on_chunk, qos=MODEL_QOS)
            self._wait(lambda: _assembled(fetch), deadline, fetch, "chunks")
            assert fetch.assembly is not None
            data = fetch.assembly.result()
        finally:
            with self._cond:
                self._fetch = None
            bus.unsubscribe(fetch.topic)
            bus.unsubscribe(chunk_filter)
        log.info(
            "fetched model %s… (%d bytes, %d chunks) in %.2f s",
            role.model.sha256[:12],
            len(data),
            fetch.assembly.manifest.chunks,
            time.monotonic() - started,
        )
        return data

    def _wait(self, done: Callable[[], bool], deadline: float, fetch: _Fetch, what: str) -> None:
        """Wait (``cond`` released) until ``done()``; raise on errors, timeouts, newer plans."""
        with self._cond:
            while not done():
                if fetch.error is not None:
                    raise fetch.error
                if self._stopping or self._latest is not None:
                    raise _SupersededError
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _timeout_error(fetch, what, self.settings.fetch_timeout_s)
                self._cond.wait(left)
            if fetch.error is not None:
                raise fetch.error


def _assembled(fetch: _Fetch) -> bool:
    return fetch.assembly is not None and (fetch.assembly.complete or fetch.error is not None)


def _timeout_error(fetch: _Fetch, what: str, timeout_s: float) -> RoleError:
    if what == "manifest":
        return RoleError(
            f"model {fetch.role.model.sha256[:12]}… is not on the broker: no manifest within "
            f"{timeout_s:.0f} s",
            source=fetch.topic,
            fix="run 'mqttinfer plan apply' for this plan (it publishes the models)",
        )
    assembly = fetch.assembly
    got = 0 if assembly is None else assembly.received
    total = 0 if assembly is None else assembly.manifest.chunks
    return RoleError(
        f"only {got} of {total} chunks arrived within {timeout_s:.0f} s",
        source=fetch.topic,
        fix="run 'mqttinfer plan apply --force' to republish the model",
    )


def describe_role(role: Role) -> str:
    """``plan <name> v<version> (partition k, model <sha12>…)``: the words plan apply matches."""
    return (
        f"plan {role.plan or '?'} v{role.plan_version} "
        f"(partition {role.partition}, model {role.model.sha256[:12]}…)"
    )


def _ignore(*_args: object) -> None:
    return None
