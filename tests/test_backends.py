"""Backend registry and the ONNX Runtime / PyTorch backends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgekd.backends import BACKENDS, Artifact, Backend, get_backend
from edgekd.backends.base import default_threads
from edgekd.backends.onnxruntime import OnnxRuntimeBackend
from edgekd.backends.torch import TorchRunner
from edgekd.errors import BackendUnavailable, ModelError, QuantizeError, RecipeError
from edgekd.export import export_onnx
from edgekd.hashing import sha256_file
from edgekd.quantize import CalibrationSet
from edgekd.registry import Registry

INPUT_SHAPE = (2, 32)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(2, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool1d(4), nn.Flatten(), nn.Linear(32, 5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture(scope="module")
def model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture(scope="module")
def onnx_path(model: TinyNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("backends") / "student.onnx"
    export_onnx(model, INPUT_SHAPE, path)
    return path


@pytest.fixture(scope="module")
def calib() -> CalibrationSet:
    data = np.random.default_rng(0).standard_normal((64, *INPUT_SHAPE)).astype(np.float32)
    return CalibrationSet(data, "random", "none", requested=64, min_samples=16)


@pytest.fixture
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def batch(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, *INPUT_SHAPE)).astype(np.float32)


def test_registry_lookup_and_aliases() -> None:
    assert {"onnxruntime", "torch"} <= set(BACKENDS.names())
    assert isinstance(get_backend("onnxruntime"), OnnxRuntimeBackend)
    assert isinstance(get_backend("ort"), OnnxRuntimeBackend)


def test_unknown_backend_suggests_a_name() -> None:
    with pytest.raises(RecipeError, match="did you mean 'onnxruntime'"):
        get_backend("onnxruntim")


def test_missing_runtime_is_backend_unavailable() -> None:
    class Missing(Backend):
        name = "missing"
        install = "pip install missing-runtime"
        precisions = ("fp32",)

        def available(self) -> tuple[bool, str]:
            return False, "missing_runtime cannot be imported"

        def compile(self, onnx_path, out_dir, precision, calib):  # pragma: no cover - never reached
            raise AssertionError

        def load(self, artifact, threads=None):  # pragma: no cover - never reached
            raise AssertionError

    local: Registry[type[Backend]] = Registry("backend")
    local.register("missing")(Missing)
    with pytest.raises(BackendUnavailable) as caught:
        get_backend("missing", registry=local)
    message = str(caught.value)
    assert "\n" not in message
    assert (
        "'missing'" in message
        and "cannot be imported" in message
        and "pip install missing-runtime" in message
    )


def test_ort_fp32_artifact_runs_like_torch(model, onnx_path, tmp_path) -> None:
    backend = get_backend("onnxruntime")
    artifact = backend.compile(onnx_path, tmp_path, "fp32", None)
    assert artifact.path == tmp_path / "student.fp32.onnx" and artifact.precision == "fp32"
    assert artifact.metadata["sha256"] == sha256_file(artifact.path) == sha256_file(onnx_path)
    runner = backend.load(artifact, threads=1)
    x = batch(3)
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(runner.run(x) - want).max() < 1e-5
    assert runner.run(batch(1)).shape == (1, 5)
    info = runner.info
    assert info["threads"] == 1 and info["providers"] == ["CPUExecutionProvider"]
    assert info["graph_optimization"] == "ORT_ENABLE_ALL" and info["execution_mode"] == "sequential"
    assert info["version"] and info["precision"] == "fp32"
    assert backend.load(artifact).info["threads"] == default_threads()


def test_ort_int8_artifact_runs(onnx_path, calib, tmp_path) -> None:
    backend = get_backend("ort")
    artifact = backend.compile(onnx_path, tmp_path, "int8", calib)
    assert artifact.path.name == "student.int8.onnx" and artifact.backend == "onnxruntime"
    assert artifact.metadata["quantization"]["calibration"]["samples_used"] == 64
    runner = backend.load(artifact, threads=2)
    assert runner.run(batch(4)).shape == (4, 5) and runner.info["threads"] == 2
    assert Artifact.from_dict(artifact.to_dict()) == artifact
    again = backend.compile(artifact.path, tmp_path / "copy", "int8", None)  # already QDQ: copied as is
    assert again.path == tmp_path / "copy" / "student.int8.onnx"
    assert sha256_file(again.path) == sha256_file(artifact.path)


def test_ort_compile_mistakes(onnx_path, tmp_path) -> None:
    backend = get_backend("ort")
    with pytest.raises(QuantizeError, match="int8 needs a calibration set"):
        backend.compile(onnx_path, tmp_path, "int8", None)
    with pytest.raises(RecipeError, match="supports precisions fp32, int8, not 'fp16'"):
        backend.compile(onnx_path, tmp_path, "fp16", None)
    with pytest.raises(RecipeError, match="precision 'int4'"):
        Artifact(onnx_path, "onnxruntime", "int4")


def test_ort_load_and_run_mistakes(onnx_path, tmp_path) -> None:
    backend = get_backend("ort")
    with pytest.raises(ModelError, match="not found"):
        backend.load(Artifact(tmp_path / "gone.onnx", "onnxruntime", "fp32"))
    with pytest.raises(RecipeError, match="threads must be >= 1"):
        backend.load(Artifact(onnx_path, "onnxruntime", "fp32"), threads=0)
    runner = backend.load(Artifact(onnx_path, "onnxruntime", "fp32"), threads=1)
    with pytest.raises(ModelError, match=r"rejected a batch of shape \(2, 3\)") as caught:
        runner.run(np.zeros((2, 3), dtype=np.float32))
    assert "\n" not in str(caught.value)


def test_torch_runner_is_the_reference(model, restore_torch_threads) -> None:
    runner = TorchRunner(model, threads=1)
    x = batch(6)
    out = runner.run(x)
    assert out.shape == (6, 5) and out.dtype == np.float32
    assert runner.info["threads"] == 1 and runner.info["backend"] == "torch" and torch.get_num_threads() == 1
    readonly = x.copy()
    readonly.flags.writeable = False
    np.testing.assert_array_equal(runner.run(readonly), out)


def test_torch_backend_builds_no_artifact(onnx_path, tmp_path) -> None:
    backend = get_backend("pytorch")
    assert backend.available() == (True, "")
    with pytest.raises(RecipeError, match="TorchRunner"):
        backend.compile(onnx_path, tmp_path, "fp32", None)
