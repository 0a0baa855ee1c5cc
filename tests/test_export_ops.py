"""Export robustness and INT8 of the ops user models bring (issue 11).

The user model file ``tests/assets/user_models.py`` (GRU/LSTM, MultiheadAttention, GroupNorm, einsum,
dilated depthwise convolutions) goes through both ONNX exporters, ONNX Runtime's static QDQ INT8 and
OpenVINO INT8 by NNCF; the ops a quantiser cannot take stay in float and are listed. A model
torch.export cannot trace fails in one line that points to the TorchScript exporter, which exports it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgekd.errors import ExportError
from edgekd.export.onnx import INPUT_NAME, OUTPUT_NAME, check_parity, export_onnx
from edgekd.quantize.calibration import CalibrationSet
from edgekd.quantize.ort import float_op_types, kept_in_float, quantize_static_int8
from edgekd.report.markdown import _kept_in_float

USER_MODELS = Path(__file__).parent / "assets" / "user_models.py"
SHAPE = (2, 64)
CLASSES = 5
TOLERANCE = 1e-4


def _user_model(factory: str) -> nn.Module:
    spec = importlib.util.spec_from_file_location("edgekd_test_user_models", USER_MODELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return getattr(module, factory)(CLASSES).eval()


def _frames(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *SHAPE)).astype(np.float32)


def _calibration(count: int = 16) -> CalibrationSet:
    return CalibrationSet(_frames(count, 1), "random", "none", requested=count, min_samples=1)


def _ort_logits(path: Path, frames: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: frames})[0]


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(-1) == b.argmax(-1)))


@pytest.fixture(scope="module", params=[True, False], ids=["dynamo", "torchscript"])
def small_onnx(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The student ``small`` (GRU) exported by one exporter: (model, path, export info, dynamo)."""
    model = _user_model("small")
    path = tmp_path_factory.mktemp("export") / "small.onnx"
    return model, path, export_onnx(model, SHAPE, path, dynamo=request.param), request.param


def test_both_exporters_export_the_user_ops_with_a_dynamic_batch(small_onnx: tuple) -> None:
    model, path, info, dynamo = small_onnx
    assert info["exporter"].startswith(f"torch.onnx.export ({'dynamo' if dynamo else 'TorchScript'})")
    assert info["model_class"] == "SequenceNet" and info["opset"] == 18
    assert info["inputs"] == [{"name": INPUT_NAME, "shape": ["batch", *SHAPE], "dtype": "float32"}]
    assert info["outputs"] == [{"name": OUTPUT_NAME, "shape": ["batch", CLASSES], "dtype": "float32"}]
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"GRU", "Einsum", "Conv", "Softmax"} <= ops
    assert not path.with_name("small.onnx.export.log").exists()
    parity = check_parity(model, path, _frames(16, 0), TOLERANCE)
    assert parity["passed"] and parity["max_abs_diff"] <= TOLERANCE
    assert parity["batch_sizes"] == [16, 1] and parity["top1_agreement"] == 1.0


def test_ort_int8_keeps_the_recurrent_and_einsum_ops_in_float(small_onnx: tuple, tmp_path: Path) -> None:
    _, path, _, _ = small_onnx
    info = quantize_static_int8(path, tmp_path / "small.int8.onnx", _calibration())
    # ORT's quantiser has no QDQ rule for GRU, Einsum or ReduceMean: they run in float between Q/DQ
    assert info["kept_in_float"] == {"Einsum": 1, "GRU": 1, "ReduceMean": 1}
    assert info["nodes_quantized"] > 20
    frames = _frames(64, 2)
    fp32, int8 = _ort_logits(path, frames), _ort_logits(tmp_path / "small.int8.onnx", frames)
    assert int8.shape == (64, CLASSES) and np.isfinite(int8).all()
    assert _agreement(int8, fp32) >= 0.8
    # the float model, read the same way, keeps everything in float
    fp32_kept = kept_in_float(onnx.load(str(path)))
    assert fp32_kept["GRU"] == 1 and fp32_kept["Conv"] == 3


def test_openvino_int8_by_nncf_keeps_the_recurrent_op_in_float(small_onnx: tuple) -> None:
    import openvino as ov

    from edgekd.quantize.nncf import quantize_openvino

    _, path, _, _ = small_onnx
    fp32 = ov.convert_model(str(path))
    quantized, record = quantize_openvino(fp32, _calibration())
    assert record["kept_in_float"] == {"Einsum": 1, "GRUSequence": 1}
    assert record["fake_quantize_nodes"] >= 8
    frames = _frames(64, 2)
    core = ov.Core()
    expected = core.compile_model(fp32, "CPU")(frames)[0]
    got = core.compile_model(quantized, "CPU")(frames)[0]
    assert got.shape == (64, CLASSES) and np.isfinite(got).all()
    assert _agreement(got, expected) >= 0.8


class Branchy(nn.Module):
    """Python control flow on a tensor value: torch.export cannot trace it, the TorchScript tracer
    records the branch its example input takes (always this one: a sum of absolute values)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x.flatten(1))
        if x.abs().sum() > 0:
            return h * 2
        return h - 1


def test_untraceable_model_is_one_line_pointing_to_the_torchscript_exporter(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Branchy().eval()
    target = tmp_path / "branchy.onnx"
    with pytest.raises(ExportError) as caught:
        export_onnx(model, (2, 4), target)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("cannot export Branchy to ONNX: torch.export cannot trace Python control flow")
    assert "test_export_ops.py" in message and "`if x.abs().sum() > 0:`" in message
    assert "submodule" not in message  # the failing line is in the top-level forward
    assert "set export.dynamo: false (--set export.dynamo=false) for the TorchScript exporter" in message
    log = tmp_path / "branchy.onnx.export.log"
    assert log.is_file() and str(log) in message and "Traceback" in log.read_text()
    assert not target.exists()

    info = export_onnx(model, (2, 4), target, dynamo=False)
    assert info["exporter"].startswith("torch.onnx.export (TorchScript)")
    assert info["inputs"][0]["shape"] == ["batch", 2, 4]
    assert not log.exists()  # a success removes the failure log
    parity = check_parity(model, target, np.random.default_rng(0).standard_normal((8, 2, 4)), TOLERANCE)
    assert parity["passed"] and parity["top1_agreement"] == 1.0


def test_float_op_rule_on_a_hand_made_graph() -> None:
    # x -> DQ -> Conv(int8 weight) -> Add(bias) -> Relu -> GRU(float weight) -> Mul(x2, two activations)
    nodes = [
        ("q", "QuantizeLinear", ["x"], ["xq"], False),
        ("dq", "DequantizeLinear", ["xq"], ["xd"], True),
        ("conv", "Conv", ["xd", "w8"], ["c"], True),
        ("bias", "Add", ["c", "b"], ["cb"], True),
        ("relu", "Relu", ["cb"], ["r"], True),
        ("gru", "GRU", ["r", "W", "R"], ["g"], True),
        ("mul", "Mul", ["g", "r"], ["m"], True),
        ("shape", "Shape", ["m"], ["s"], False),
        ("size", "Mul", ["s", "two"], ["s2"], False),
    ]
    kept = float_op_types(nodes, ["x"], frozenset({"DequantizeLinear"}), {"W", "R"})
    assert kept == {"GRU": 1, "Mul": 1}
    assert float_op_types(nodes, ["x"], frozenset({"DequantizeLinear"}), set(), frozenset({"Mul"})) == {
        "Conv": 1,
        "GRU": 1,
        "Mul": 1,
    }


def test_report_line_lists_the_ops_kept_in_float() -> None:
    assert _kept_in_float({"GRU": 1, "Einsum": 2}, "openvino int8") == [
        "  - Kept in float (openvino int8): GRU ×1, Einsum ×2."
    ]
    assert _kept_in_float({}, "INT8 QDQ model") == [
        "  - Kept in float (INT8 QDQ model): none (every compute op is INT8)."
    ]
    assert _kept_in_float(None, "x") == []


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_teacher_with_lstm_through_export_and_both_int8_quantisers(dynamo: bool, tmp_path: Path) -> None:
    import openvino as ov

    from edgekd.quantize.nncf import quantize_openvino

    model = _user_model("big")
    path = tmp_path / "big.onnx"
    export_onnx(model, SHAPE, path, dynamo=dynamo)
    assert check_parity(model, path, _frames(16, 0), TOLERANCE)["passed"]
    info = quantize_static_int8(path, tmp_path / "big.int8.onnx", _calibration())
    assert info["kept_in_float"] == {"Einsum": 1, "LSTM": 1, "ReduceMean": 1}
    frames = _frames(64, 2)
    assert _agreement(_ort_logits(tmp_path / "big.int8.onnx", frames), _ort_logits(path, frames)) >= 0.8
    quantized, record = quantize_openvino(ov.convert_model(str(path)), _calibration())
    assert record["kept_in_float"] == {"Einsum": 1, "LSTMSequence": 1}
    got, fp32 = ov.Core().compile_model(quantized, "CPU")(frames)[0], _ort_logits(path, frames)
    # the untrained teacher's logits barely depend on the input (top-2 margins ~0.02), so top-1
    # agreement says nothing here: the INT8 logits' relative error does
    error = float(np.linalg.norm(got - fp32) / np.linalg.norm(fp32))
    print(f"openvino int8 relative error {error:.3f}")
    assert np.isfinite(got).all() and error < 0.3


class _Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return x
        return -x


class Gated(nn.Module):
    """The untraceable branch sits in a submodule's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = _Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x.flatten(1))


def test_untraceable_submodule_is_named(tmp_path: Path) -> None:
    expected = r"`if x.mean\(\) > 0:` of submodule gate \(_Gate\).*export\.dynamo"
    with pytest.raises(ExportError, match=expected):
        export_onnx(Gated(), (2, 4), tmp_path / "gated.onnx")
