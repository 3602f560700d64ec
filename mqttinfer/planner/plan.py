"""The plan: who runs which student on which filters, and what it is predicted to cost.

``plans/<name>.yaml`` (version 1)::

    version: 1
    name: example
    strategy: rocoin                 # rocoin | rocoin-g | nonn | hetnonn
    deployment: default              # MQTT deployment (topic prefix level)
    epsilon: 0.05                    # cumulative failure probability threshold
    delta: 0.3                       # capacity similarity threshold (null: not used)
    channels: 64                     # filters of the teacher's final conv
    input_shape: [1, 28, 28]
    partitioning: contiguous         # contiguous | normalized-cut | louvain | proportional | bundle
    activations: null                # the activations.npy the partitions came from, if any
    bundle: null                     # optional model bundle the students come from
    dropped_filters: []              # filters no partition covers (NoNN's P0), if any
    notes: []                        # what the planner had to repair, in words
    predicted:
      latency_s: 0.41                # expected latency of a completed frame
      all_up_latency_s: 0.40         # no device fails
      worst_case_latency_s: 0.52     # only the slowest replica of each group answers
      completion_probability: 0.97   # every partition gets at least one result
    groups:
      - id: g0
        partition: 0
        filters: [0, 1, 2, ...]
        student: {arch: wrn-16-1, params: 176208, macs: 20283648, memory: 805200}
        failure_probability: 0.01
        latency_s: 0.40              # fastest member
        worst_latency_s: 0.41        # slowest member
        members:
          - {device: cam-1, outage: 0.1, latency_s: 0.40}

:func:`load_plan` validates everything and raises :class:`~mqttinfer.errors.ConfigError`
naming the file, field and fix.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mqttinfer.errors import ConfigError
from mqttinfer.planner.catalog import parse_architecture
from mqttinfer.planner.latency import FramePrediction, frame_prediction
from mqttinfer.topics import is_valid_id

log = logging.getLogger(__name__)

PLAN_VERSION = 1
STRATEGIES = ("rocoin", "rocoin-g", "nonn", "hetnonn")
PARTITIONINGS = ("contiguous", "normalized-cut", "louvain", "proportional", "bundle")


@dataclass(frozen=True, slots=True)
class Student:
    arch: str
    params: int
    macs: int
    memory: int


@dataclass(frozen=True, slots=True)
class Member:
    device: str
    outage: float
    latency_s: float


@dataclass(frozen=True, slots=True)
class GroupPlan:
    id: str
    partition: int
    filters: tuple[int, ...]
    student: Student
    members: tuple[Member, ...]

    @property
    def failure_probability(self) -> float:
        return math.prod(member.outage for member in self.members)

    @property
    def latency_s(self) -> float:
        return min(member.latency_s for member in self.members)

    @property
    def worst_latency_s(self) -> float:
        return max(member.latency_s for member in self.members)


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    strategy: str
    epsilon: float
    delta: float | None
    channels: int
    input_shape: tuple[int, int, int]
    groups: tuple[GroupPlan, ...]
    deployment: str = "default"
    partitioning: str = "contiguous"
    activations: str | None = None
    bundle: str | None = None
    dropped_filters: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()
    version: int = PLAN_VERSION
    predicted: FramePrediction = field(init=False)

    def __post_init__(self) -> None:
        prediction = frame_prediction(
            [[m.latency_s for m in g.members] for g in self.groups],
            [[m.outage for m in g.members] for g in self.groups],
        )
        object.__setattr__(self, "predicted", prediction)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(member.device for group in self.groups for member in group.members)

    def meets_epsilon(self) -> bool:
        """Constraint (1f): every group's failure probability ≤ ε."""
        return all(g.failure_probability <= self.epsilon * (1 + 1e-9) for g in self.groups)


# --------------------------------------------------------------------------- writing


def plan_document(plan: Plan) -> dict[str, Any]:
    """The YAML-ready mapping of a plan (numbers rounded for people, not for maths)."""
    predicted = plan.predicted
    return {
        "version": plan.version,
        "name": plan.name,
        "strategy": plan.strategy,
        "deployment": plan.deployment,
        "epsilon": plan.epsilon,
        "delta": plan.delta,
        "channels": plan.channels,
        "input_shape": list(plan.input_shape),
        "partitioning": plan.partitioning,
        "activations": plan.activations,
        "bundle": plan.bundle,
        "dropped_filters": list(plan.dropped_filters),
        "notes": list(plan.notes),
        "predicted": {
            "latency_s": _round(predicted.latency_s),
            "all_up_latency_s": _round(predicted.all_up_latency_s),
            "worst_case_latency_s": _round(predicted.worst_case_latency_s),
            "completion_probability": _round(predicted.completion_probability),
        },
        "groups": [_group_document(group) for group in plan.groups],
    }


def _group_document(group: GroupPlan) -> dict[str, Any]:
    return {
        "id": group.id,
        "partition": group.partition,
        "filters": list(group.filters),
        "student": {
            "arch": group.student.arch,
            "params": group.student.params,
            "macs": group.student.macs,
            "memory": group.student.memory,
        },
        "failure_probability": _round(group.failure_probability),
        "latency_s": _round(group.latency_s),
        "worst_latency_s": _round(group.worst_latency_s),
        "members": [
            {"device": m.device, "outage": m.outage, "latency_s": _round(m.latency_s)}
            for m in group.members
        ],
    }


def _round(value: float) -> float:
    return float(f"{value:.6g}") if math.isfinite(value) else value


class _PlanDumper(yaml.SafeDumper):
    """Block style for the structure, flow style for lists of numbers and small mappings."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(isinstance(item, (int, float)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_dict(dumper: yaml.SafeDumper, data: dict[str, Any]) -> yaml.Node:
    flow = len(data) <= 4 and all(not isinstance(v, (dict, list)) for v in data.values())
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=flow)


_PlanDumper.add_representer(list, _represent_list)
_PlanDumper.add_representer(dict, _represent_dict)


def dump_plan(plan: Plan) -> str:
    """The plan as YAML text."""
    return yaml.dump(
        plan_document(plan), Dumper=_PlanDumper, sort_keys=False, width=100, allow_unicode=True
    )


def save_plan(plan: Plan, path: str | Path) -> None:
    target = Path(path)
    if target.parent and not target.parent.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(dump_plan(plan), encoding="utf-8")
    log.info("wrote plan %s (%d groups) to %s", plan.name, len(plan.groups), target)


# --------------------------------------------------------------------------- reading


_TOP_KEYS = (
    "version",
    "name",
    "strategy",
    "deployment",
    "epsilon",
    "delta",
    "channels",
    "input_shape",
    "partitioning",
    "activations",
    "bundle",
    "dropped_filters",
    "notes",
    "predicted",
    "groups",
)
_REQUIRED_TOP = ("version", "name", "strategy", "epsilon", "channels", "input_shape", "groups")
_GROUP_KEYS = (
    "id",
    "partition",
    "filters",
    "student",
    "failure_probability",
    "latency_s",
    "worst_latency_s",
    "members",
)
_REQUIRED_GROUP = ("id", "partition", "filters", "student", "members")
_STUDENT_KEYS = ("arch", "params", "macs", "memory")
_MEMBER_KEYS = ("device", "outage", "latency_s")


class _Reader:
    """Validation helpers that know which file they read."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, message: str, where: str, fix: str) -> ConfigError:
        return ConfigError(message, source=self.source, field=where, fix=fix)

    def mapping(
        self, value: object, where: str, allowed: Sequence[str], required: Sequence[str]
    ) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail("must be a mapping", where or "top level", "see docs/planner.md")
        for key in value:
            if key not in allowed:
                raise self.fail(
                    "unknown key",
                    f"{where}.{key}" if where else str(key),
                    f"allowed keys: {', '.join(allowed)}",
                )
        for key in required:
            if key not in value:
                raise self.fail(
                    "missing",
                    f"{where}.{key}" if where else key,
                    "regenerate the plan with 'mqttinfer plan make'",
                )
        return value

    def integer(self, value: object, where: str, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(
                f"must be an integer ≥ {minimum}, got {value!r}",
                where,
                f"write a whole number ≥ {minimum}",
            )
        return value

    def number(self, value: object, where: str, low: float, high: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(
                f"must be a number, got {value!r}", where, f"write a number in [{low}, {high}]"
            )
        if not low <= float(value) <= high:
            raise self.fail(f"{value!r} is out of range", where, f"use a number in [{low}, {high}]")
        return float(value)

    def text(self, value: object, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(f"must be non-empty text, got {value!r}", where, "quote the value")
        return value

    def identifier(self, value: object, where: str) -> str:
        text = self.text(value, where)
        if not is_valid_id(text):
            raise self.fail(
                f"{text!r} is not a valid identifier",
                where,
                "use 1-64 characters from A-Z a-z 0-9 _ . -",
            )
        return text

    def int_list(self, value: object, where: str) -> tuple[int, ...]:
        if not isinstance(value, list):
            raise self.fail("must be a list of integers", where, "write [0, 1, 2]")
        return tuple(self.integer(item, f"{where}[{i}]") for i, item in enumerate(value))


def load_plan(path: str | Path) -> Plan:
    """Read and validate ``plans/<name>.yaml``."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            "plan file not found",
            source=source,
            fix="create one with 'mqttinfer plan make ... --out PLAN'",
        ) from None
    except OSError as err:
        raise ConfigError(
            f"cannot read the plan: {err.strerror}", source=source, fix="check the path"
        ) from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"not valid YAML: {err}",
            source=source,
            fix="fix the YAML syntax or regenerate the plan",
        ) from None
    return parse_plan(document, source=source)


def parse_plan(document: object, *, source: str = "<memory>") -> Plan:
    """Validate a parsed plan document; see the module docstring for the format."""
    read = _Reader(source)
    top = read.mapping(document, "", _TOP_KEYS, _REQUIRED_TOP)
    if top["version"] != PLAN_VERSION:
        raise read.fail(
            f"unsupported plan version {top['version']!r}",
            "version",
            f"regenerate the plan (this mqttinfer writes version {PLAN_VERSION})",
        )
    strategy = top["strategy"]
    if strategy not in STRATEGIES:
        raise read.fail(
            f"unknown strategy {strategy!r}", "strategy", f"use one of {', '.join(STRATEGIES)}"
        )
    partitioning = top.get("partitioning", "contiguous")
    if partitioning not in PARTITIONINGS:
        raise read.fail(
            f"unknown partitioning {partitioning!r}",
            "partitioning",
            f"use one of {', '.join(PARTITIONINGS)}",
        )
    epsilon = read.number(top["epsilon"], "epsilon", 0.0, 1.0)
    delta = top.get("delta")
    if delta is not None:
        delta = read.number(delta, "delta", 0.0, math.inf)
    channels = read.integer(top["channels"], "channels", 1)
    shape = read.int_list(top["input_shape"], "input_shape")
    if len(shape) != 3 or min(shape) < 1:
        raise read.fail(
            f"must be three positive sizes, got {list(shape)}",
            "input_shape",
            "write [C, H, W], e.g. [1, 28, 28]",
        )
    groups_raw = top["groups"]
    if not isinstance(groups_raw, list) or not groups_raw:
        raise read.fail("must be a non-empty list", "groups", "regenerate the plan")
    groups = tuple(_parse_group(read, raw, f"groups[{i}]") for i, raw in enumerate(groups_raw))
    dropped = read.int_list(top.get("dropped_filters", []) or [], "dropped_filters")
    plan = Plan(
        name=read.identifier(top["name"], "name"),
        strategy=strategy,
        epsilon=epsilon,
        delta=delta,
        channels=channels,
        input_shape=(shape[0], shape[1], shape[2]),
        groups=groups,
        deployment=read.identifier(top.get("deployment", "default"), "deployment"),
        partitioning=partitioning,
        activations=_optional_text(read, top.get("activations"), "activations"),
        bundle=_optional_text(read, top.get("bundle"), "bundle"),
        dropped_filters=dropped,
        notes=tuple(str(note) for note in (top.get("notes") or [])),
    )
    check_plan(plan, source=source)
    return plan


def _optional_text(read: _Reader, value: object, where: str) -> str | None:
    return None if value is None else read.text(value, where)


def _parse_group(read: _Reader, raw: object, where: str) -> GroupPlan:
    group = read.mapping(raw, where, _GROUP_KEYS, _REQUIRED_GROUP)
    student_raw = read.mapping(group["student"], f"{where}.student", _STUDENT_KEYS, _STUDENT_KEYS)
    arch = read.text(student_raw["arch"], f"{where}.student.arch")
    # A bundle may bring an architecture the catalog does not know; then keep its name.
    with contextlib.suppress(ConfigError):
        arch = parse_architecture(arch, source=read.source).name
    student = Student(
        arch,
        read.integer(student_raw["params"], f"{where}.student.params", 1),
        read.integer(student_raw["macs"], f"{where}.student.macs", 0),
        read.integer(student_raw["memory"], f"{where}.student.memory", 0),
    )
    members_raw = group["members"]
    if not isinstance(members_raw, list) or not members_raw:
        raise read.fail(
            "must be a non-empty list", f"{where}.members", "every group needs a device"
        )
    members = []
    for index, member_raw in enumerate(members_raw):
        at = f"{where}.members[{index}]"
        member = read.mapping(member_raw, at, _MEMBER_KEYS, _MEMBER_KEYS)
        outage = read.number(member["outage"], f"{at}.outage", 0.0, 1.0)
        if outage >= 1.0:
            raise read.fail(
                "outage 1 means the device never answers",
                f"{at}.outage",
                "use a probability below 1",
            )
        members.append(
            Member(
                read.identifier(member["device"], f"{at}.device"),
                outage,
                read.number(member["latency_s"], f"{at}.latency_s", 0.0, math.inf),
            )
        )
    return GroupPlan(
        id=read.identifier(group["id"], f"{where}.id"),
        partition=read.integer(group["partition"], f"{where}.partition"),
        filters=read.int_list(group["filters"], f"{where}.filters"),
        student=student,
        members=tuple(members),
    )


def check_plan(plan: Plan, *, source: str = "<plan>") -> None:
    """Cross-field checks: partitions 0..K-1 once each, filters cover 0..C-1 exactly once
    (with the dropped ones), every device in one group only, group ids unique."""
    read = _Reader(source)
    partitions = sorted(group.partition for group in plan.groups)
    if partitions != list(range(len(plan.groups))):
        raise read.fail(
            f"partition numbers {partitions} are not 0..{len(plan.groups) - 1} once each",
            "groups[].partition",
            "number the partitions 0..K-1, one per group",
        )
    _check_unique(read, [g.id for g in plan.groups], "groups[].id", "group id")
    _check_unique(read, list(plan.devices), "groups[].members[].device", "device")
    seen: dict[int, str] = {}
    for index, group in enumerate(plan.groups):
        if not group.filters:
            raise read.fail(
                "is empty", f"groups[{index}].filters", "every partition needs a filter"
            )
        for item in group.filters:
            if item >= plan.channels:
                raise read.fail(
                    f"filter {item} ≥ channels ({plan.channels})",
                    f"groups[{index}].filters",
                    f"use filter ids 0..{plan.channels - 1}",
                )
            if item in seen:
                raise read.fail(
                    f"filter {item} is in both {seen[item]} and {group.id}",
                    f"groups[{index}].filters",
                    "give each filter to one partition",
                )
            seen[item] = group.id
    for item in plan.dropped_filters:
        if item in seen or item >= plan.channels:
            raise read.fail(
                f"dropped filter {item} is also assigned or out of range",
                "dropped_filters",
                "list only unassigned filter ids",
            )
    missing = sorted(set(range(plan.channels)) - set(seen) - set(plan.dropped_filters))
    if missing:
        raise read.fail(
            f"filters {missing[:10]}{'...' if len(missing) > 10 else ''} belong to no partition",
            "groups[].filters",
            "assign every filter or list it in dropped_filters",
        )


def _check_unique(read: _Reader, values: list[str], where: str, what: str) -> None:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    repeated = sorted(value for value, count in counts.items() if count > 1)
    if repeated:
        raise read.fail(
            f"{what} {repeated[:5]} appears more than once", where, f"each {what} may appear once"
        )
