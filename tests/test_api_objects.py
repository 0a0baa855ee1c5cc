"""The Python API with objects: modules, arrays and torch Datasets in, a Result with figures and paths out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import edgekd
from edgekd.errors import DataError, ModelError
from edgekd.objects import Result, npz_bytes
from tests.assets import user_models

FAST = [
    "quantize.calibration_samples=32",
    "quantize.min_calibration_samples=8",
    "profile.warmup=2",
    "profile.iterations=10",
    "bundle.eval_samples=16",
    "export.parity_samples=8",
]
CLASSES = 3


def sequences(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (2, 32) two-tone sequences of 3 classes (the tone's frequency), with noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    t = np.arange(32)
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    frequency = 0.3 * (y[:, None] + 1)
    x = np.stack([np.sin(frequency * t + phase), np.cos(frequency * t + phase)], axis=1)
    x += 0.2 * rng.standard_normal(x.shape)
    return x.astype(np.float32), y


@pytest.fixture
def runs(tmp_path):
    return [f"runs_dir={tmp_path / 'runs'}", *FAST]


def test_compress_with_modules_and_arrays_returns_a_result_and_reuses_its_stages(runs):
    torch.manual_seed(0)
    teacher, student = user_models.big(CLASSES, width=16), user_models.small(CLASSES, width=8)
    train, val = sequences(160, 1), sequences(48, 2)
    logs: list[str] = []
    result = edgekd.compress(
        teacher=teacher, student=student, train=train, val=val, target="cpu", method="kd", epochs=1,
        name="objects", overrides=runs, log=logs.append,
    )  # fmt: skip
    assert isinstance(result, Result)
    assert result.report_file.is_file()
    assert result.report["data"]["name"] == "npz"
    assert result.report["data"]["train_frames"] == 160 and result.report["data"]["eval_frames"] == 48
    # The teacher object is taken as trained: loaded from the weights the API wrote, not trained again.
    assert result.report["teacher"]["history"] == []
    assert result.report["teacher"]["origin"].endswith("inputs/teacher.safetensors")
    assert result.report["teacher"]["model"].startswith("object:SequenceNet-")
    assert 0.0 <= result.accuracy <= 1.0 and result.latency_ms > 0
    assert result.artifact is not None and result.artifact.is_file()
    assert (result.bundle_dir / "manifest.json").is_file()
    assert result.deployed["name"] == result.report["headline"]["deployed"]
    assert "accuracy=" in repr(result)

    again: list[str] = []
    edgekd.compress(
        teacher=teacher, student=student, train=train, val=val, target="cpu", method="kd", epochs=1,
        name="objects", overrides=runs, log=again.append,
    )  # fmt: skip
    assert not [line for line in again if line.endswith("running") and not line.startswith("[report]")]

    with torch.no_grad():  # new teacher weights: the teacher stage and what follows rerun
        teacher.classifier.bias.add_(1.0)
    third: list[str] = []
    edgekd.compress(
        teacher=teacher, student=student, train=train, val=val, target="cpu", method="kd", epochs=1,
        name="objects", overrides=runs, log=third.append, until="teacher",
    )  # fmt: skip
    assert "[teacher] running" in third


def test_deploy_a_module_on_inputs_without_labels(runs):
    torch.manual_seed(0)
    model = user_models.small(CLASSES, width=8)
    (x_train, _), (x_val, _) = sequences(96, 3), sequences(32, 4)
    result = edgekd.deploy(model, train=x_train, val=x_val, target="cpu", name="unlabelled", overrides=runs)
    assert result.report["mode"] == "deploy"
    assert result.report["teacher"] is None
    assert result.report["data"]["classes"] == ["0", "1", "2"]  # the module's output width
    fp32 = next(row for row in result.rows if row.get("precision") == "fp32" and "artifact" in row)
    assert fp32["accuracy"]["accuracy"] == pytest.approx(1.0)  # the FP32 model's predictions are the labels
    saved = json.loads(result.report_file.read_text())
    assert saved["run"] == "unlabelled"


def test_a_torch_dataset_is_read_as_arrays(runs, tmp_path):
    x, y = sequences(64, 5)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    outputs = edgekd.compress(
        teacher="py:tests/assets/user_models.py:big", student=user_models.small(CLASSES, width=8),
        train=dataset, target="cpu", epochs=1, name="dataset", overrides=runs, until="teacher",
        log=lambda line: None,
    )  # fmt: skip
    assert outputs["teacher"]["val_accuracy"] >= 0
    with np.load(tmp_path / "runs" / "dataset" / "inputs" / "data.npz") as saved:
        np.testing.assert_array_equal(saved["x"], x)
        np.testing.assert_array_equal(saved["y"], y)


def test_wrong_objects_are_one_line_errors(runs):
    with pytest.raises(DataError, match=r"train: expected x, \(x, y\), \(x, y, groups\) or a torch Dataset"):
        edgekd.compress(train={"x": 1}, overrides=runs, until="teacher")
    with pytest.raises(ModelError, match="teacher: expected an nn.Module, a model source name"):
        edgekd.compress(teacher=42, overrides=runs, until="teacher")
    with pytest.raises(DataError, match="val= and classes= come with train="):
        edgekd.compress(val=sequences(8, 0), overrides=runs, until="teacher")


def test_npz_bytes_depend_only_on_the_arrays():
    arrays = {"x": np.ones((2, 3), np.float32), "y": np.arange(2), "classes": np.array(["a", "b"])}
    first = npz_bytes(arrays)
    assert first == npz_bytes(dict(arrays))
    assert first != npz_bytes({**arrays, "y": np.array([1, 0])})
