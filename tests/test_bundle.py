from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from mqttinfer.bundle import Bundle
from mqttinfer.errors import BundleError
from tests.support.synthetic import SyntheticBundle, build_synthetic_bundle, random_frames


def test_synthetic_bundle_loads_and_matches_reference(synthetic_bundle: SyntheticBundle) -> None:
    bundle = Bundle.load(synthetic_bundle.path)
    bundle.verify()
    assert bundle.partition_sizes() == [6, 5]
    assert bundle.head.in_features == 11
    frames = random_frames(5)
    x = synthetic_bundle.normalise(frames)
    for student in bundle.students:
        session = ort.InferenceSession(str(student.file), providers=["CPUExecutionProvider"])
        (out,) = session.run(["features"], {"input": x})
        pooled = out.mean(axis=(2, 3))
        expected = synthetic_bundle.student_features(frames, student.partition)
        np.testing.assert_allclose(pooled, expected, rtol=1e-4, atol=1e-5)


def test_tampered_student_fails_verification(tmp_path: Path) -> None:
    build_synthetic_bundle(tmp_path)
    (tmp_path / "student-1.onnx").write_bytes(b"not a model")
    with pytest.raises(BundleError, match="sha256"):
        Bundle.load(tmp_path).verify()


def test_missing_bundle_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="mqttinfer train all"):
        Bundle.load(tmp_path)


def test_overlapping_partitions_are_rejected(tmp_path: Path) -> None:
    build_synthetic_bundle(tmp_path)
    meta = json.loads((tmp_path / "bundle.json").read_text())
    meta["partitions"][1]["filters"][0] = 0
    (tmp_path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="overlap"):
        Bundle.load(tmp_path)


def test_role_from_bundle_points_at_student(synthetic_bundle: SyntheticBundle) -> None:
    bundle = Bundle.load(synthetic_bundle.path)
    role = bundle.role("dev-1", 1, "g1", deployment="site")
    assert role.model.sha256 == bundle.students[1].sha256
    assert role.input.shape == (1, 8, 8)
    assert role.summary().partition == 1
