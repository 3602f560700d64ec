"""``mqttinfer plan apply``: push a plan to the fleet over MQTT and wait for every device.

One apply, in order (docs/protocol.md, "Plan apply and model distribution"):

1. **Read the fleet's retained state**: roles on ``plan/+``, model manifests on ``models/+`` and
   statuses on ``status/+`` (a broker barrier marks the end of the retained messages).
2. **Decide** (pure, :func:`decide`): a device's role changes when anything but its
   ``plan_version`` differs from the retained one. When nothing changes and no device must be
   withdrawn, nothing is published: re-applying a plan is a no-op. Otherwise every device of the
   plan gets the role stamped with one new version, ``max(now in ms, newest retained + 1)``, so
   versions grow across applies and restarts of the tool (a device with the same student keeps
   it and only announces the new version).
3. **Upload the models** that have no manifest on the broker yet: chunks first, then the
   manifest, every chunk window confirmed by a broker barrier (back-pressure without reaching
   into paho).
4. **Publish the roles** (retained, QoS 1), and clear ``plan/<device>`` (an empty retained
   message) for devices that had a role but are no longer in the plan; then delete retained
   models no role refers to any more (``prune``).
5. **Wait for the acks**: a device has applied the plan when its status is ``online``,
   ``serving=ready`` and its role has the expected ``plan_version`` and ``model_sha256``. A
   ``serving=error`` status is a refusal, reported in the device's words and not waited for,
   when its error names ``v<version>`` of this plan and either arrived after the roles were
   published or no role was published to the device (a re-apply reports the standing refusal);
   a live error that names no version at all counts too.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from mqttinfer.bundle import Bundle
from mqttinfer.errors import BrokerError, ConfigError, ProtocolError
from mqttinfer.planner.plan import Plan
from mqttinfer.protocol import ModelRef, Role, Status
from mqttinfer.runtime.bus import Bus, Message
from mqttinfer.runtime.model_transfer import ModelManifest, is_sha256, split_model
from mqttinfer.runtime.retained import BrokerBarrier, retained_snapshot
from mqttinfer.topics import Topics, is_valid_id

log = logging.getLogger(__name__)

ROLE_QOS = 1
MODEL_QOS = 1
DEFAULT_CHUNK_SIZE = 256 * 1024
_WINDOW_BYTES = 4 * 1024 * 1024
_WINDOW_CHUNKS = 16
_POLL_S = 0.1


# --------------------------------------------------------------------------- what to apply


@dataclass(frozen=True, slots=True)
class ModelBlob:
    """One student's bytes, as the bundle holds them."""

    data: bytes
    name: str = ""
    arch: str = ""


@dataclass(frozen=True, slots=True)
class ApplyTarget:
    """The roles (``plan_version`` 0, no local file) and the models they need."""

    plan: str
    deployment: str
    roles: Mapping[str, Role]
    models: Mapping[str, ModelBlob]


def build_target(plan: Plan, bundle: Bundle, *, deployment: str | None = None) -> ApplyTarget:
    """The roles of every device of ``plan``, serving the students of ``bundle``.

    ConfigError when the bundle was not made for this plan: other partitions (filter sets),
    another input shape, or a student file whose hash differs from bundle.json.
    """
    source = str(bundle.root / "bundle.json")
    _check_bundle_fits(plan, bundle, source)
    bundle.verify()
    target_deployment = deployment or plan.deployment
    roles: dict[str, Role] = {}
    models: dict[str, ModelBlob] = {}
    for group in plan.groups:
        student = bundle.students[group.partition]
        if student.arch and student.arch != group.student.arch:
            log.warning(
                "group %s: the plan chose %s, the bundle's student is %s; applying the bundle's",
                group.id,
                group.student.arch,
                student.arch,
            )
        data = student.file.read_bytes()
        models[student.sha256] = ModelBlob(data, student.file.name, student.arch)
        for member in group.members:
            roles[member.device] = Role(
                device=member.device,
                group=group.id,
                partition=group.partition,
                model=ModelRef(sha256=student.sha256, size=len(data), arch=student.arch),
                input=bundle.input,
                plan=plan.name,
                plan_version=0,
                deployment=target_deployment,
                pool=True,
            )
    return ApplyTarget(plan.name, target_deployment, roles, models)


def _check_bundle_fits(plan: Plan, bundle: Bundle, source: str) -> None:
    fix = "apply the plan with the bundle trained for it (or re-plan for this bundle)"
    if len(plan.groups) != bundle.num_partitions:
        raise ConfigError(
            f"the plan has {len(plan.groups)} partitions, the bundle {bundle.num_partitions}",
            source=source,
            field="partitions",
            fix=fix,
        )
    if tuple(plan.input_shape) != tuple(bundle.input.shape):
        raise ConfigError(
            f"the plan's input shape {list(plan.input_shape)} differs from the bundle's "
            f"{list(bundle.input.shape)}",
            source=source,
            field="input.shape",
            fix=fix,
        )
    for group in plan.groups:
        if sorted(group.filters) != sorted(bundle.partitions[group.partition]):
            raise ConfigError(
                f"partition {group.partition} has other filters in the plan (group {group.id})",
                source=source,
                field=f"partitions[{group.partition}].filters",
                fix=fix,
            )


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True, slots=True)
class RetainedState:
    """What the broker retains for a deployment: roles (None: undecodable) and manifests."""

    roles: Mapping[str, Role | None] = field(default_factory=dict)
    manifests: Mapping[str, ModelManifest | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ApplyDecision:
    """What one apply publishes. ``roles`` holds every plan device's role as it will stand."""

    version: int
    roles: Mapping[str, Role]
    publish: tuple[str, ...]
    clear: tuple[str, ...]
    upload: tuple[str, ...]
    prune: tuple[str, ...]

    @property
    def changes_roles(self) -> bool:
        return bool(self.publish or self.clear)


def same_role(a: Role | None, b: Role | None) -> bool:
    """Equal in everything but ``plan_version``."""
    if a is None or b is None:
        return a is b
    return replace(a, plan_version=0) == replace(b, plan_version=0)


def decide(
    target: ApplyTarget,
    retained: RetainedState,
    *,
    now_ms: int,
    force: bool = False,
    prune: bool = True,
) -> ApplyDecision:
    """Which roles to publish or clear, which models to upload or delete, and the version.

    ``force`` republishes every role (same version when nothing changed: devices that already
    run it ignore it, devices that refused it try again) and every model.
    """
    changed = [d for d in target.roles if not same_role(retained.roles.get(d), target.roles[d])]
    clear = tuple(sorted(d for d in retained.roles if d not in target.roles))
    newest = max((r.plan_version for r in retained.roles.values() if r is not None), default=0)
    if changed or clear:
        version = max(now_ms, newest + 1)
        roles = {d: replace(r, plan_version=version) for d, r in target.roles.items()}
        publish = tuple(roles)
    else:
        # Nothing changed: every role stands as retained, with the version it has.
        roles = {d: retained.roles[d] or target.roles[d] for d in target.roles}
        version = max((r.plan_version for r in roles.values()), default=newest)
        publish = tuple(roles) if force else ()
    needed = {r.model.sha256 for r in roles.values()}
    upload = tuple(sorted(s for s in needed if force or retained.manifests.get(s) is None))
    stale = sorted(s for s in retained.manifests if s not in needed) if prune else []
    return ApplyDecision(version, roles, publish, clear, upload, tuple(stale))


# --------------------------------------------------------------------------- the acks


class Outcome(str, Enum):
    WAITING = "waiting"
    OFFLINE = "offline"
    LOADING = "loading"
    READY = "ready"
    REFUSED = "refused"

    @property
    def final(self) -> bool:
        return self in (Outcome.READY, Outcome.REFUSED)


@dataclass(frozen=True, slots=True)
class SeenStatus:
    """A device's latest status; ``live`` when it arrived after the apply published."""

    status: Status
    live: bool


@dataclass(frozen=True, slots=True)
class DeviceProgress:
    device: str
    group: str
    partition: int
    model_sha256: str
    outcome: Outcome
    detail: str


def device_progress(
    expected: Role, seen: SeenStatus | None, *, republished: bool = True
) -> DeviceProgress:
    """Where one device stands against the role it should run (pure).

    ``republished``: the role was published to the device by this apply, so only a status that
    arrived afterwards (``live``) can refuse it.
    """
    outcome, detail = _judge(expected, seen, republished)
    return DeviceProgress(
        expected.device, expected.group, expected.partition, expected.model.sha256, outcome, detail
    )


def _judge(expected: Role, seen: SeenStatus | None, republished: bool) -> tuple[Outcome, str]:
    if seen is None:
        return Outcome.WAITING, "no status yet (never connected to this deployment?)"
    status = seen.status
    role = status.role
    if status.state == "offline":
        return Outcome.OFFLINE, "offline" + (" (stopped cleanly)" if status.clean else "")
    applied = (
        role is not None
        and role.plan_version == expected.plan_version
        and role.model_sha256 == expected.model.sha256
        and role.partition == expected.partition
    )
    if applied and status.serving == "ready":
        return Outcome.READY, f"ready, plan v{expected.plan_version}"
    if status.serving == "error" and _refuses(status.error or "", expected, seen.live, republished):
        return Outcome.REFUSED, status.error or "error (no details)"
    if status.serving == "loading":
        return Outcome.LOADING, "loading the student"
    running = "no role" if role is None else f"runs v{role.plan_version}"
    return Outcome.WAITING, f"serving={status.serving}, {running}"


def _refuses(error: str, expected: Role, live: bool, republished: bool) -> bool:
    versions = {int(v) for v in _VERSION_WORD.findall(error)}
    if expected.plan_version in versions:
        return live or not republished
    return live and not versions


_VERSION_WORD = re.compile(r"\bv(\d{1,16})\b")


# --------------------------------------------------------------------------- the session


@dataclass(frozen=True, slots=True)
class ApplySettings:
    timeout_s: float = 120.0
    force: bool = False
    prune: bool = True
    chunk_size: int = DEFAULT_CHUNK_SIZE
    broker_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.timeout_s < 0 or self.chunk_size < 1 or self.broker_timeout_s <= 0:
            raise ConfigError(
                "timeout must be ≥ 0, chunk size and broker timeout > 0", field="--timeout"
            )


@dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot for a progress display: the phase, model bytes, and each device."""

    phase: str
    uploaded_bytes: int
    upload_bytes: int
    devices: tuple[DeviceProgress, ...]


@dataclass(frozen=True, slots=True)
class ApplyReport:
    plan: str
    deployment: str
    version: int
    changed: bool
    devices: tuple[DeviceProgress, ...]
    published: tuple[str, ...]
    cleared: tuple[str, ...]
    uploaded: tuple[str, ...]
    pruned: tuple[str, ...]
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return all(d.outcome is Outcome.READY for d in self.devices)

    @property
    def failed(self) -> tuple[DeviceProgress, ...]:
        return tuple(d for d in self.devices if d.outcome is not Outcome.READY)

    def to_json(self) -> dict[str, Any]:
        return {
            "plan": self.plan,
            "deployment": self.deployment,
            "plan_version": self.version,
            "changed": self.changed,
            "ok": self.ok,
            "elapsed_s": round(self.elapsed_s, 3),
            "published": list(self.published),
            "cleared": list(self.cleared),
            "models_uploaded": list(self.uploaded),
            "models_pruned": list(self.pruned),
            "devices": [
                {
                    "device": d.device,
                    "group": d.group,
                    "partition": d.partition,
                    "model_sha256": d.model_sha256,
                    "outcome": d.outcome.value,
                    "detail": d.detail,
                }
                for d in self.devices
            ],
        }


ProgressCallback = Callable[[Progress], None]


class PlanApplier:
    """Runs one apply on a bus (kind ``apply``); ``run`` starts and stops the bus itself.

    Progress callbacks run on the caller's thread, never on the network thread.
    """

    def __init__(
        self,
        bus: Bus,
        settings: ApplySettings = ApplySettings(),
        *,
        on_progress: ProgressCallback | None = None,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.bus = bus
        self.topics: Topics = bus.topics
        self.settings = settings
        self._on_progress = on_progress
        self._clock_ms = clock_ms
        self._barrier = BrokerBarrier(bus)
        self._cond = threading.Condition()
        self._statuses: dict[str, SeenStatus] = {}
        self._published = False
        self._phase = "reading"
        self._uploaded = 0
        self._upload_total = 0

    # ------------------------------------------------------------------ entry point
    def run(self, target: ApplyTarget) -> ApplyReport:
        if target.deployment != self.topics.deployment:
            raise ConfigError(
                f"the target is for deployment {target.deployment!r}, the bus for "
                f"{self.topics.deployment!r}",
                field="--deployment",
            )
        started = time.monotonic()
        self.bus.subscribe(self.topics.all_status, self._on_status, qos=1)
        with self.bus:
            retained = self._read_retained()
            decision = decide(
                target,
                retained,
                now_ms=self._clock_ms(),
                force=self.settings.force,
                prune=self.settings.prune,
            )
            self._log_decision(decision)
            self._upload_models(decision, target)
            self._publish_roles(decision)
            self._prune_models(decision, retained)
            devices = self._wait_for_acks(decision)
        return ApplyReport(
            plan=target.plan,
            deployment=target.deployment,
            version=decision.version,
            changed=decision.changes_roles,
            devices=devices,
            published=decision.publish,
            cleared=decision.clear,
            uploaded=decision.upload,
            pruned=decision.prune,
            elapsed_s=time.monotonic() - started,
        )

    # ------------------------------------------------------------------ network thread
    def _on_status(self, message: Message) -> None:
        if not message.payload:
            return
        try:
            node = self.topics.last_level(message.topic, "status")
            status = Status.decode(message.payload)
        except ProtocolError as exc:
            log.debug("ignoring a bad status on %s: %s", message.topic, exc)
            return
        if status.node != node or status.kind != "device":
            return
        with self._cond:
            previous = self._statuses.get(node)
            # A will older than the birth already seen is stale (docs/protocol.md, status).
            if previous is not None and status.bdseq < previous.status.bdseq:
                return
            live = self._published and not message.retain
            self._statuses[node] = SeenStatus(status, live)
            self._cond.notify_all()

    # ------------------------------------------------------------------ steps
    def _read_retained(self) -> RetainedState:
        timeout = self.settings.broker_timeout_s
        if not self.bus.wait_connected(timeout):
            raise BrokerError(f"could not connect to {self.bus.config.url} within {timeout:.0f} s")
        snapshot = retained_snapshot(
            self.bus,
            (f"{self.topics.prefix}/plan/+", f"{self.topics.prefix}/models/+"),
            self._barrier,
            timeout,
        )
        roles: dict[str, Role | None] = {}
        manifests: dict[str, ModelManifest | None] = {}
        for topic, payload in snapshot.items():
            kind, _, name = topic[len(self.topics.prefix) + 1 :].partition("/")
            if kind == "plan" and is_valid_id(name):
                roles[name] = _decode_or_none(Role.decode, payload, topic)
            elif kind == "models" and is_sha256(name):
                manifest = _decode_or_none(ModelManifest.decode, payload, topic)
                manifests[name] = manifest if manifest and manifest.sha256 == name else None
        log.info("retained: %d roles, %d models", len(roles), len(manifests))
        return RetainedState(roles, manifests)

    def _log_decision(self, decision: ApplyDecision) -> None:
        if not decision.changes_roles and not decision.upload:
            log.info("nothing to change: the plan is applied as v%d", decision.version)
            return
        log.info(
            "plan v%d: %d roles to publish, %d to clear, %d models to upload, %d to prune",
            decision.version,
            len(decision.publish),
            len(decision.clear),
            len(decision.upload),
            len(decision.prune),
        )

    def _upload_models(self, decision: ApplyDecision, target: ApplyTarget) -> None:
        self._phase = "uploading models"
        self._upload_total = sum(len(target.models[sha].data) for sha in decision.upload)
        self._report_progress(decision)
        for sha in decision.upload:
            self._upload_model(sha, target.models[sha], decision)

    def _upload_model(self, sha: str, blob: ModelBlob, decision: ApplyDecision) -> None:
        # The longest chunk topic this model can have bounds the chunk payload.
        widest = self.topics.model_chunk(sha, 99_999)
        chunk_size = min(self.settings.chunk_size, self.bus.max_payload(widest))
        if chunk_size < 1:
            raise BrokerError(
                f"the broker's maximum packet size ({self.bus.max_packet_size} B) leaves no "
                "room for model chunks"
            )
        manifest, chunks = split_model(blob.data, chunk_size, name=blob.name, arch=blob.arch)
        if manifest.sha256 != sha:
            raise ConfigError(f"model {blob.name} does not hash to {sha}", field="students")
        window = 0
        for index, chunk in enumerate(chunks):
            self._publish(self.topics.model_chunk(sha, index), chunk, MODEL_QOS)
            window += len(chunk)
            self._uploaded += len(chunk)
            if window >= _WINDOW_BYTES or (index + 1) % _WINDOW_CHUNKS == 0:
                self._barrier.sync(self.settings.broker_timeout_s)
                window = 0
                self._report_progress(decision)
        self._barrier.sync(self.settings.broker_timeout_s)
        # The manifest goes last: its presence means every chunk is on the broker.
        self._publish(self.topics.model(sha), manifest.encode(), MODEL_QOS)
        log.info("uploaded model %s… (%d bytes, %d chunks)", sha[:12], manifest.size, len(chunks))

    def _publish_roles(self, decision: ApplyDecision) -> None:
        self._phase = "publishing roles"
        for device in decision.publish:
            role = decision.roles[device]
            self.bus.check_size(self.topics.plan(device), len(role.encode()), ROLE_QOS)
        with self._cond:
            # Statuses from here on answer this apply's roles.
            self._published = bool(decision.publish)
        for device in decision.publish:
            self._publish(self.topics.plan(device), decision.roles[device].encode(), ROLE_QOS)
        for device in decision.clear:
            self._publish(self.topics.plan(device), b"", ROLE_QOS)
            log.info("withdrew the role of %s (no longer in the plan)", device)
        self._barrier.sync(self.settings.broker_timeout_s)

    def _prune_models(self, decision: ApplyDecision, retained: RetainedState) -> None:
        for sha in decision.prune:
            manifest = retained.manifests.get(sha)
            self._publish(self.topics.model(sha), b"", MODEL_QOS)
            for index in range(manifest.chunks if manifest is not None else 0):
                self._publish(self.topics.model_chunk(sha, index), b"", MODEL_QOS)
            log.info("deleted model %s… (no role refers to it)", sha[:12])
        if decision.prune:
            self._barrier.sync(self.settings.broker_timeout_s)

    def _wait_for_acks(self, decision: ApplyDecision) -> tuple[DeviceProgress, ...]:
        self._phase = "waiting for devices"
        deadline = time.monotonic() + self.settings.timeout_s
        last: tuple[DeviceProgress, ...] = ()
        while True:
            devices = self._progress(decision)
            if devices != last:
                self._report_progress(decision, devices)
                last = devices
            if all(d.outcome.final for d in devices):
                return devices
            left = deadline - time.monotonic()
            if left <= 0:
                return devices
            with self._cond:
                self._cond.wait(min(left, _POLL_S * 5))

    # ------------------------------------------------------------------ helpers
    def _progress(self, decision: ApplyDecision) -> tuple[DeviceProgress, ...]:
        with self._cond:
            seen = dict(self._statuses)
        return tuple(
            device_progress(role, seen.get(d), republished=d in decision.publish)
            for d, role in decision.roles.items()
        )

    def _report_progress(
        self, decision: ApplyDecision, devices: tuple[DeviceProgress, ...] | None = None
    ) -> None:
        if self._on_progress is None:
            return
        self._on_progress(
            Progress(
                phase=self._phase,
                uploaded_bytes=self._uploaded,
                upload_bytes=self._upload_total,
                devices=devices if devices is not None else self._progress(decision),
            )
        )

    def _publish(self, topic: str, payload: bytes, qos: int) -> None:
        if not self.bus.publish(topic, payload, qos=qos, retain=True):
            raise BrokerError(
                f"could not publish {len(payload)} bytes on {topic} (disconnected from "
                f"{self.bus.config.url}, or the message is over the broker's limit)"
            )


def _decode_or_none(decoder: Callable[[bytes], Any], payload: bytes, topic: str) -> Any:
    try:
        return decoder(payload)
    except ProtocolError as exc:
        log.warning("retained message on %s is invalid (%s); it will be replaced", topic, exc)
        return None
