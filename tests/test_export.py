"""ONNX export: a checked, self-contained file with a dynamic batch axis, parity, one-line failures."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgekd.errors import ExportError
from edgekd.export import check_parity, export_onnx

INPUT_SHAPE = (2, 64)


class TinyNet(nn.Module):
    """Conv1d/BatchNorm/ReLU/pooling/Linear over IQ frames (B, 2, 64)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(2, 8, 5, padding=2),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
        )
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class BranchOnValues(TinyNet):
    """Python control flow on a tensor value: torch.export cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return super().forward(x)
        return super().forward(-x)


class FixedBatch(TinyNet):
    """Reshapes with a hard-coded batch size, which pins the batch axis."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).reshape(2, -1))


class UsesSvd(TinyNet):
    """Calls an op that has no ONNX translation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + torch.linalg.svd(x[:, :, :2])[1].sum(-1, keepdim=True)


def make_model(seed: int) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them is exercised
        model.features[1].running_mean.uniform_(-0.5, 0.5)
        model.features[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyNet, object, dict]:
    model = make_model(0)
    path = tmp_path_factory.mktemp("export") / "student.onnx"
    info = export_onnx(model, INPUT_SHAPE, path)
    return model, path, info


def samples(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *INPUT_SHAPE)).astype(np.float32)


def assert_one_line(message: str) -> None:
    assert message and "\n" not in message


def test_export_writes_a_checked_self_contained_file(exported) -> None:
    model, path, info = exported
    assert path.is_file()
    assert not list(path.parent.glob("*.tmp")) and not list(path.parent.glob("*.data"))
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path), load_external_data=False)
    assert all(init.data_location != onnx.TensorProto.EXTERNAL for init in proto.graph.initializer)
    assert info["opset"] == 18 and info["size_bytes"] == path.stat().st_size
    assert info["inputs"] == [{"name": "input", "shape": ["batch", 2, 64], "dtype": "float32"}]
    assert info["outputs"][0]["name"] == "logits" and info["outputs"][0]["shape"][1] == 4
    assert info["model_class"] == "TinyNet" and "dynamo" in info["exporter"]


@pytest.mark.parametrize("batch", [1, 7])
def test_batch_axis_is_dynamic(exported, batch: int) -> None:
    model, path, _ = exported
    x = samples(batch)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x})[0]
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).numpy()
    assert got.shape == (batch, 4)
    assert np.abs(got - want).max() < 1e-5


def test_export_is_quiet_and_restores_training_mode(tmp_path, capfd) -> None:
    model = make_model(3).train()
    export_onnx(model, INPUT_SHAPE, tmp_path / "m.onnx")
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert model.training


def test_parity_passes_with_tight_tolerance(exported) -> None:
    model, path, _ = exported
    report = check_parity(model, path, samples(16), tolerance=1e-5)
    assert report["passed"] and report["max_abs_diff"] < 1e-5
    assert report["samples"] == 16 and 1 in report["batch_sizes"]
    assert report["top1_agreement"] == 1.0 and report["tolerance"] == 1e-5


def test_parity_failure_is_one_line_with_numbers(exported) -> None:
    _, path, _ = exported
    with pytest.raises(ExportError) as caught:
        check_parity(make_model(1), path, samples(16), tolerance=1e-4)
    message = str(caught.value)
    assert_one_line(message)
    assert str(path) in message and "> tolerance 0.0001" in message
    assert "raise export.tolerance or check ops" in message and "Conv" in message


def test_data_dependent_control_flow_is_one_line_error(tmp_path) -> None:
    target = tmp_path / "branch.onnx"
    with pytest.raises(ExportError) as caught:
        export_onnx(BranchOnValues(), INPUT_SHAPE, target)
    message = str(caught.value)
    assert_one_line(message)
    assert "BranchOnValues" in message and "torch.where" in message and "if x.mean() > 0" in message
    assert not target.exists()
    log = tmp_path / "branch.onnx.export.log"
    assert "if x.mean() > 0" in log.read_text()
    export_onnx(make_model(0), INPUT_SHAPE, target)  # a later success removes the stale log
    assert target.is_file() and not log.exists()


def test_unsupported_op_names_the_op_and_opset(tmp_path) -> None:
    with pytest.raises(ExportError) as caught:
        export_onnx(UsesSvd(), INPUT_SHAPE, tmp_path / "svd.onnx")
    message = str(caught.value)
    assert_one_line(message)
    assert "UsesSvd" in message and "aten._linalg_svd" in message and "export.opset" in message


def test_batch_specialisation_is_refused(tmp_path) -> None:
    with pytest.raises(ExportError, match=r"flatten\(1\)") as caught:
        export_onnx(FixedBatch(), INPUT_SHAPE, tmp_path / "fixed.onnx")
    assert_one_line(str(caught.value))
    assert not (tmp_path / "fixed.onnx").exists()


def test_opset_below_18_is_not_silently_upgraded(tmp_path) -> None:
    with pytest.raises(ExportError, match="set export.opset to 18 or higher"):
        export_onnx(make_model(0), INPUT_SHAPE, tmp_path / "old.onnx", opset=13)


def test_bad_input_shape_and_samples(tmp_path, exported) -> None:
    model, path, _ = exported
    with pytest.raises(ExportError, match="input_shape"):
        export_onnx(model, (2, 0), tmp_path / "bad.onnx")
    with pytest.raises(ExportError, match="samples shaped"):
        check_parity(model, path, np.zeros((0, *INPUT_SHAPE), dtype=np.float32), tolerance=1e-4)


def poison(model: TinyNet) -> TinyNet:
    """``model`` as a diverged training leaves it: NaN weights (and so NaN logits)."""
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    return model


def test_model_with_nan_weights_is_not_exported(tmp_path) -> None:
    target = tmp_path / "diverged.onnx"
    with pytest.raises(ExportError) as caught:
        export_onnx(poison(make_model(0)), INPUT_SHAPE, target)
    message = str(caught.value)
    assert_one_line(message)
    assert str(target) in message and "64 weight values" in message and "head.weight" in message
    assert "non-finite" in message and "lower the learning rate" in message
    assert not target.exists()


def test_nan_in_both_outputs_fails_parity(tmp_path) -> None:
    """A diverged model whose ONNX file is NaN too: NaN == NaN must not pass as parity."""
    path = tmp_path / "nan.onnx"
    export_onnx(make_model(0), INPUT_SHAPE, path)
    proto = onnx.load(str(path))
    for init in proto.graph.initializer:
        values = onnx.numpy_helper.to_array(init)
        if values.dtype == np.float32 and values.shape == (4, 16):  # the head's weight
            init.CopyFrom(onnx.numpy_helper.from_array(np.full_like(values, np.nan), init.name))
    onnx.save(proto, str(path))
    x = samples(8)
    assert np.isnan(ort.InferenceSession(str(path)).run(None, {"input": x})[0]).all()
    with pytest.raises(ExportError) as caught:
        check_parity(poison(make_model(0)), path, x, tolerance=1e-4)
    message = str(caught.value)
    assert_one_line(message)
    assert str(path) in message and "outputs are non-finite" in message
    assert "32 PyTorch and 48 ONNX Runtime values" in message  # 8x4 logits; 8x4 + 4 batch-1 runs x 4
    assert "64 non-finite weights, first in head.weight" in message and "lower the learning rate" in message


def test_nan_in_one_runtime_only_fails_parity(exported) -> None:
    model, path, _ = exported
    with pytest.raises(ExportError, match=r"NaN/inf in 64 PyTorch and 0 ONNX Runtime values"):
        check_parity(poison(make_model(0)), path, samples(16), tolerance=1e-4)
    bad = samples(4)
    bad[0, 0, 0] = np.inf
    with pytest.raises(ExportError, match="the samples hold 1 NaN/inf values"):
        check_parity(model, path, bad, tolerance=1e-4)
