"""The onnxruntime runner on real synthetic ONNX students, checked against numpy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from mqttinfer.bundle import Bundle
from mqttinfer.errors import InferenceError, RoleError
from mqttinfer.protocol import InputSpec
from mqttinfer.runtime.runner import StudentRunner, sha256_bytes
from tests.support.synthetic import SyntheticBundle, random_frames


@pytest.fixture(scope="module")
def bundle(synthetic_bundle: SyntheticBundle) -> Bundle:
    return Bundle.load(synthetic_bundle.path)


@pytest.mark.parametrize("partition", [0, 1])
def test_features_match_the_numpy_reference(
    synthetic_bundle: SyntheticBundle, bundle: Bundle, partition: int
) -> None:
    runner = StudentRunner.from_role(bundle.role("d1", partition, "g0"), threads=2)
    frames = random_frames(5)
    expected = synthetic_bundle.student_features(frames, partition)
    got = np.stack([runner.features(frame) for frame in frames])
    assert got.dtype == np.float32
    assert got.shape == (5, bundle.partition_sizes()[partition])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert runner.output_dim == bundle.partition_sizes()[partition]
    assert runner.warmup_ms > 0
    assert 0 < runner.warm_run_ms <= runner.warmup_ms


def test_accepts_the_documented_frame_layouts(bundle: Bundle) -> None:
    runner = StudentRunner.from_role(bundle.role("d1", 0, "g0"))
    frame = random_frames(1)[0]  # [1, 8, 8]
    reference = runner.features(frame)
    for variant in (frame[None], frame[0], np.transpose(frame, (1, 2, 0))):
        np.testing.assert_array_equal(runner.features(variant), reference)
    as_float = runner.features(frame.astype(np.float32))
    np.testing.assert_allclose(as_float, reference, rtol=1e-6)


@pytest.mark.parametrize(
    "frame",
    [np.zeros((2, 8, 8), np.uint8), np.zeros((8, 9), np.uint8), np.zeros((1, 8, 8), np.int64)],
    ids=["channels", "width", "dtype"],
)
def test_a_frame_that_does_not_fit_is_an_inference_error(bundle: Bundle, frame: np.ndarray) -> None:
    runner = StudentRunner.from_role(bundle.role("d1", 0, "g0"))
    with pytest.raises(InferenceError, match="frame"):
        runner.features(frame)


def test_preprocess_applies_scale_mean_and_std_per_channel(bundle: Bundle) -> None:
    student = bundle.students[0]
    spec = InputSpec(shape=(1, 8, 8), scale=0.5, mean=(1.0,), std=(4.0,))
    runner = StudentRunner.from_file(student.file, spec, sha256=student.sha256)
    frame = np.full((8, 8), 10, np.uint8)
    np.testing.assert_allclose(runner.preprocess(frame), np.full((1, 1, 8, 8), (5 - 1) / 4))


def test_sha256_mismatch_names_the_file(bundle: Bundle) -> None:
    role = bundle.role("d1", 0, "g0")
    wrong = dataclasses.replace(role, model=dataclasses.replace(role.model, sha256="0" * 64))
    with pytest.raises(RoleError) as err:
        StudentRunner.from_role(wrong)
    assert str(bundle.students[0].file) in str(err.value)
    assert err.value.field == "model.sha256"


def test_missing_model_file_is_a_role_error(bundle: Bundle, tmp_path: Path) -> None:
    role = bundle.role("d1", 0, "g0")
    moved = dataclasses.replace(role, model=dataclasses.replace(role.model, file="student.onnx"))
    with pytest.raises(RoleError, match="cannot read"):
        StudentRunner.from_role(moved, base_dir=tmp_path)


def test_a_corrupt_model_is_an_inference_error(tmp_path: Path) -> None:
    data = b"definitely not onnx"
    path = tmp_path / "bad.onnx"
    path.write_bytes(data)
    with pytest.raises(InferenceError, match=r"bad\.onnx"):
        StudentRunner.from_file(path, InputSpec(shape=(1, 8, 8)), sha256=sha256_bytes(data))


def test_role_input_shape_must_match_the_model(bundle: Bundle) -> None:
    student = bundle.students[0]
    with pytest.raises(RoleError, match="does not match"):
        StudentRunner.from_file(student.file, InputSpec(shape=(1, 16, 16)), sha256=student.sha256)


def test_mean_std_need_one_value_or_one_per_channel(bundle: Bundle) -> None:
    student = bundle.students[0]
    spec = InputSpec(shape=(1, 8, 8), mean=(0.1, 0.2), std=(1.0,))
    with pytest.raises(RoleError) as err:
        StudentRunner.from_file(student.file, spec, sha256=student.sha256)
    assert err.value.field == "input.mean"


def test_unpooled_output_is_the_flattened_feature_map(
    synthetic_bundle: SyntheticBundle, bundle: Bundle
) -> None:
    student = bundle.students[1]
    runner = StudentRunner.from_file(student.file, bundle.input, sha256=student.sha256, pool=False)
    frame = random_frames(1)[0]
    features = runner.features(frame)
    assert features.shape == (student.output_channels * 4 * 4,)
    pooled = features.reshape(student.output_channels, 16).mean(axis=1)
    np.testing.assert_allclose(
        pooled, synthetic_bundle.student_features(frame[None], 1)[0], rtol=1e-5, atol=1e-5
    )
