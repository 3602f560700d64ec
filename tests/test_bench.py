"""Benchmarks run on tiny configurations and write well-formed output (no timing assertions,
except lower bounds that an emulated sleep guarantees)."""

from __future__ import annotations

import pytest

from mqttinfer.runtime.cluster import DeviceSpec, LocalCluster
from mqttinfer.runtime.device import DeviceSettings
from mqttinfer.runtime.source import Source
from tests.support.synthetic import SyntheticBundle, random_frames


# --------------------------------------------------------------------------- --link-rate
def test_link_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="link_rate_bps"):
        DeviceSettings(node="d0", link_rate_bps=0.0)
    assert DeviceSpec("d0", 0, link_rate=4000.0).args()[-2:] == ["--link-rate", "4000.0"]


@pytest.mark.broker
def test_link_rate_delays_partials_as_transport(synthetic_bundle: SyntheticBundle) -> None:
    # 4 kbit/s: a partial of ~50 bytes takes ~0.1 s to "send"; the other device is not limited.
    devices = [DeviceSpec("d0", 0, link_rate=4000.0), DeviceSpec("d1", 1)]
    frames = random_frames(3)
    with (
        LocalCluster(synthetic_bundle.path, devices) as cluster,
        Source(
            cluster.url, source_id="cam", deployment=cluster.deployment, deadline_ms=5000
        ) as camera,
    ):
        results = [camera.infer(frame, timeout_s=10) for frame in frames]
    for result in results:
        assert (result.reason, result.degraded) == ("complete", False)
        # The emulated serialisation of a >= 40-byte partial at 4 kbit/s sleeps >= 80 ms.
        assert result.breakdown["transport_ms"] >= 60.0
        assert result.breakdown["compute_ms"] < result.breakdown["transport_ms"]
