"""Where a device gets its role and its student model: the :class:`RoleProvider` interface.

A provider hands the device a :class:`LoadedRole` (a validated ``Role`` plus the model bytes,
already checked against the role's sha256) through a callback, once or several times (a new
plan replaces the role). The device never cares where it came from:

- :class:`FileRoleProvider`: a local JSON/YAML role file (``model.file`` relative to it);
- :class:`BundleRoleProvider`: one partition of a local bundle directory;
- ``PlanRoleProvider`` (``runtime/plan_client.py``): the retained ``plan/<device>`` topic and
  the model bytes from ``models/<sha256>``; it calls ``on_role(None)`` when ``plan apply``
  withdraws the device's role.

Providers are started with the device's bus; their callbacks may run on the network thread, so
the device only stores the role there and loads it on its worker.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from mqttinfer.bundle import Bundle
from mqttinfer.errors import ProtocolError, RoleError
from mqttinfer.protocol import Role
from mqttinfer.runtime.bus import Bus
from mqttinfer.runtime.runner import read_model

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadedRole:
    """A role with its verified model bytes; ``origin`` says where it came from (for logs)."""

    role: Role
    model: bytes
    origin: str


# None: the role was withdrawn (the device stops serving until a new one comes).
RoleCallback = Callable[[LoadedRole | None], None]
ErrorCallback = Callable[[str], None]


class RoleProvider(Protocol):
    """Supplies a device's role: calls ``on_role`` whenever a (new) role is ready."""

    def start(self, bus: Bus, on_role: RoleCallback, on_error: ErrorCallback) -> None: ...

    def stop(self) -> None: ...

    def describe(self) -> str: ...


class StaticRoleProvider:
    """A role known before the device starts (file or bundle): delivered once, at start."""

    def __init__(self, loaded: LoadedRole) -> None:
        self.loaded = loaded

    def start(self, bus: Bus, on_role: RoleCallback, on_error: ErrorCallback) -> None:
        del bus, on_error  # nothing to fetch, nothing that can fail later
        on_role(self.loaded)

    def stop(self) -> None:
        return None

    def describe(self) -> str:
        return self.loaded.origin


def role_from_file(path: Path, *, device: str, deployment: str) -> LoadedRole:
    """Read a JSON/YAML role file; RoleError names the file, the field and the fix."""
    source = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RoleError(f"cannot read the role file ({exc.strerror})", source=source) from exc
    obj = _parse_role_text(text, path)
    if not isinstance(obj, dict):
        raise RoleError("a role file must hold a map of role fields", source=source)
    obj.setdefault("device", device)
    obj.setdefault("deployment", deployment)
    for field, wanted in (("device", device), ("deployment", deployment)):
        if obj[field] != wanted:
            raise RoleError(
                f"is {obj[field]!r} but this device runs as {wanted!r}",
                source=source,
                field=field,
                fix=f"remove '{field}' from the file or pass the matching --{_option(field)}",
            )
    try:
        role = Role.from_obj(obj)
    except ProtocolError as exc:
        raise RoleError(str(exc), source=source, fix="see docs/protocol.md, role") from exc
    if role.model.file is None:
        raise RoleError("names no model file", source=source, field="model.file")
    model_path = Path(role.model.file)
    if not model_path.is_absolute():
        model_path = path.parent / model_path
    return LoadedRole(role, read_model(model_path, role.model.sha256), f"role file {path}")


def _option(field: str) -> str:
    return "id" if field == "device" else field


def _parse_role_text(text: str, path: Path) -> Any:
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise RoleError(f"not valid JSON/YAML ({exc})", source=str(path)) from exc


def role_from_bundle(
    bundle_dir: Path, *, device: str, deployment: str, partition: int, group: str
) -> LoadedRole:
    """The role serving ``partition`` of a local bundle (the student's hash is checked)."""
    bundle = Bundle.load(bundle_dir)
    role = bundle.role(device, partition, group, deployment=deployment)
    model = read_model(bundle.students[partition].file, role.model.sha256)
    return LoadedRole(role, model, f"bundle {bundle_dir} partition {partition}")
