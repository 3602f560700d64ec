"""Shared fixtures: a real Mosquitto on a free loopback port and synthetic bundles."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqttinfer.runtime.local_broker import LocalBroker, find_mosquitto
from tests.support.synthetic import SyntheticBundle, build_synthetic_bundle


@pytest.fixture(scope="session")
def broker() -> Iterator[LocalBroker]:
    """One Mosquitto for the session (tests isolate themselves with unique deployments)."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run scripts/setup.sh (CI installs it)")
    with LocalBroker() as running:
        yield running


@pytest.fixture
def fresh_broker() -> Iterator[LocalBroker]:
    """A private Mosquitto for tests that kill or restart the broker."""
    with LocalBroker() as running:
        yield running


@pytest.fixture
def deployment() -> str:
    """A unique deployment name, so tests sharing the session broker never see each other."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def synthetic_bundle(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
    """Two partitions (6 and 5 filters), 1x8x8 uint8 input, 4 classes."""
    return build_synthetic_bundle(Path(tmp_path_factory.mktemp("bundle")))
