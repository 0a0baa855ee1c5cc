"""INT8 static QDQ quantisation: structure of the graph, accuracy vs FP32, calibration validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edgekd.errors import QuantizeError
from edgekd.export import export_onnx
from edgekd.quantize import CalibrationSet, quantize_static_int8
from edgekd.quantize.budget import AccuracyBudget
from edgekd.quantize.ort import calibration_batch, is_quantized
from edgekd.quantize.ort_accuracy import quantize_within_budget, rank_sensitive_nodes

CLASSES = 4
INPUT_SHAPE = (2, 128)


class SmallCnn(nn.Module):
    """Enough weights (a 512→64 Linear) for INT8 to shrink the file noticeably."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(2, 8, 7, padding=3),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(8, 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool1d(2),
        )
        self.head = nn.Sequential(nn.Linear(16 * 32, 64), nn.ReLU(), nn.Linear(64, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def tones(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A separable task: noisy complex tones whose frequency encodes the class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    t = np.arange(INPUT_SHAPE[1])
    phase = 2 * np.pi * (0.03 + 0.05 * labels[:, None]) * t + rng.uniform(0, 2 * np.pi, (n, 1))
    x = np.stack([np.cos(phase), np.sin(phase)], axis=1) + 0.3 * rng.standard_normal((n, *INPUT_SHAPE))
    return x.astype(np.float32), labels


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quantize")


@pytest.fixture(scope="module")
def fp32_model(workdir: Path) -> Path:
    torch.manual_seed(0)
    model = SmallCnn()
    x, y = tones(384, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(3):
        for start in range(0, len(x), 96):
            optimizer.zero_grad()
            batch = torch.from_numpy(x[start : start + 96])
            loss = nn.functional.cross_entropy(model(batch), torch.from_numpy(y[start : start + 96]))
            loss.backward()
            optimizer.step()
    path = workdir / "student.onnx"
    export_onnx(model.eval(), INPUT_SHAPE, path)
    return path


@pytest.fixture(scope="module")
def calib() -> CalibrationSet:
    x, _ = tones(200, seed=1)
    return CalibrationSet(x, "tones-seed1", "none (raw IQ)", requested=128, min_samples=16)


@pytest.fixture(scope="module")
def asymmetric(fp32_model: Path, calib: CalibrationSet, workdir: Path) -> tuple[Path, dict]:
    out = workdir / "student.int8.onnx"
    return out, quantize_static_int8(fp32_model, out, calib)


@pytest.fixture(scope="module")
def symmetric(fp32_model: Path, calib: CalibrationSet, workdir: Path) -> tuple[Path, dict]:
    out = workdir / "student.int8-sym.onnx"
    return out, quantize_static_int8(fp32_model, out, calib, symmetric_activations=True)


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in onnx.load(str(path)).graph.initializer}


def predict(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0].argmax(1)


def test_qdq_nodes_and_report(asymmetric, calib) -> None:
    path, info = asymmetric
    nodes = onnx.load(str(path)).graph.node
    count = sum(node.op_type in {"QuantizeLinear", "DequantizeLinear"} for node in nodes)
    assert count > 0 and info["nodes_quantized"] == count
    assert info["format"] == "QDQ" and info["weight_type"] == "QInt8" and info["activation_type"] == "QUInt8"
    assert info["per_channel"] and info["method"] == "minmax" and info["preprocess"] == "ok"
    assert info["size_bytes"] == path.stat().st_size
    provenance = info["calibration"]
    assert provenance["samples_used"] == 128 and provenance["samples_requested"] == 128
    assert provenance["samples_available"] == 200 and provenance["dataset_fingerprint"] == "tones-seed1"
    assert provenance["data_sha256"] == calib.sha256() and provenance["preprocessing"] == "none (raw IQ)"


def test_weights_are_int8_with_per_channel_scales(asymmetric) -> None:
    path, _ = asymmetric
    graph = onnx.load(str(path)).graph
    values = initializers(path)
    conv_weights = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and values.get(node.input[0], np.empty(0)).ndim == 3:
            conv_weights[node.input[0]] = (values[node.input[0]], values[node.input[1]])
    assert len(conv_weights) == 2
    for weight, scale in conv_weights.values():
        assert weight.dtype == np.int8
        assert scale.shape == (weight.shape[0],)  # one scale per output channel
    assert {w.shape[0] for w, _ in conv_weights.values()} == {8, 16}


def test_asymmetric_activations_are_uint8(asymmetric) -> None:
    path, _ = asymmetric
    graph = onnx.load(str(path)).graph
    values = initializers(path)
    input_zero_point = next(
        values[node.input[2]]
        for node in graph.node
        if node.op_type == "QuantizeLinear" and node.input[0] == "input"
    )
    assert input_zero_point.dtype == np.uint8


def test_symmetric_mode_has_zero_zero_points(symmetric) -> None:
    path, info = symmetric
    assert info["activation_type"] == "QInt8" and info["symmetric_activations"]
    graph = onnx.load(str(path)).graph
    values = initializers(path)
    zero_points = [
        values[node.input[2]] for node in graph.node if node.op_type in {"QuantizeLinear", "DequantizeLinear"}
    ]
    assert zero_points
    assert all(np.all(zp == 0) for zp in zero_points)
    assert all(zp.dtype in (np.int8, np.int32) for zp in zero_points)


@pytest.mark.parametrize("variant", ["asymmetric", "symmetric"])
def test_int8_agrees_with_fp32(fp32_model, variant, request) -> None:
    path, _ = request.getfixturevalue(variant)
    x, y = tones(256, seed=2)
    fp32, int8 = predict(fp32_model, x), predict(path, x)
    assert (fp32 == y).mean() > 0.9  # the task is learnt
    assert (fp32 == int8).mean() >= 0.9
    assert (int8 == y).mean() >= (fp32 == y).mean() - 0.05


def test_int8_file_is_smaller(fp32_model, asymmetric) -> None:
    path, _ = asymmetric
    assert path.stat().st_size < 0.5 * fp32_model.stat().st_size


def test_unused_opset_imports_are_pruned(asymmetric) -> None:
    path, _ = asymmetric
    domains = {op.domain for op in onnx.load(str(path)).opset_import}
    assert domains <= {"", "ai.onnx"}


def test_other_calibration_methods(fp32_model, calib, tmp_path) -> None:
    info = quantize_static_int8(
        fp32_model, tmp_path / "p.onnx", calib, per_channel=False, method="percentile"
    )
    assert info["method"] == "percentile" and not info["per_channel"]
    assert info["calibration"]["samples_used"] == len(calib)


def activation_scales(path: Path) -> dict[str, float]:
    """Scale of each activation QuantizeLinear (weights are quantised offline, so these are all inputs
    or outputs of layers), by the tensor it quantises."""
    graph = onnx.load(str(path)).graph
    values = initializers(path)
    return {
        node.input[0]: float(values[node.input[1]])
        for node in graph.node
        if node.op_type == "QuantizeLinear" and values[node.input[1]].size == 1
    }


@pytest.fixture(scope="module")
def calib_100() -> CalibrationSet:
    """100 samples: not a multiple of the batch of 32 (numpy 2 broke ORT's histogram collectors on the
    smaller last batch: "inhomogeneous shape")."""
    x, _ = tones(100, seed=3)
    return CalibrationSet(x, "tones-seed3", "none (raw IQ)", requested=100, min_samples=16)


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_each_calibration_method_gives_a_sane_int8_model(
    fp32_model, calib_100, workdir, method, symmetric
) -> None:
    out = workdir / f"student.int8-{method}-{'sym' if symmetric else 'asym'}.onnx"
    info = quantize_static_int8(fp32_model, out, calib_100, method=method, symmetric_activations=symmetric)
    assert info["method"] == method and info["calibration"]["samples_used"] == 100
    assert info["calibration"]["batch_size"] == (32 if method == "minmax" else 25)
    assert is_quantized(onnx.load(str(out))) and info["nodes_quantized"] > 0
    x, y = tones(256, seed=2)
    fp32, int8 = predict(fp32_model, x), predict(out, x)
    assert (fp32 == int8).mean() >= 0.9
    assert (int8 == y).mean() >= (fp32 == y).mean() - 0.05
    scales = activation_scales(out)
    assert scales and all(np.isfinite(s) and s > 0 for s in scales.values())
    if method != "minmax":  # the histogram algorithms really ran: they clip ranges minmax keeps whole
        reference = workdir / f"student.int8-minmax-{'sym' if symmetric else 'asym'}.onnx"
        if not reference.exists():
            quantize_static_int8(fp32_model, reference, calib_100, symmetric_activations=symmetric)
        minmax = activation_scales(reference)
        shared = set(scales) & set(minmax)
        assert shared and any(scales[name] < 0.9999 * minmax[name] for name in shared)
        assert all(scales[name] <= minmax[name] * 1.01 for name in shared)


@pytest.mark.parametrize(
    ("samples", "method", "fixed", "expected"),
    [
        (100, "minmax", None, 32),
        (100, "entropy", None, 25),
        (512, "percentile", None, 32),
        (20, "entropy", None, 20),
        (101, "percentile", None, 101),  # a prime: no equal batch of 8 or more, so one batch
        (66, "entropy", None, 22),
        (100, "entropy", 8, 8),  # a fixed batch axis dictates (and the reader drops the remainder)
    ],
)
def test_calibration_batch_sizes(samples, method, fixed, expected) -> None:
    assert calibration_batch(samples, method, fixed) == expected


def test_model_with_nan_weights_is_refused_in_one_line(fp32_model, calib, tmp_path) -> None:
    proto = onnx.load(str(fp32_model))
    weight = max(proto.graph.initializer, key=lambda init: numpy_helper.to_array(init).size)
    values = numpy_helper.to_array(weight).copy()
    values[0, :3] = np.nan
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    diverged = tmp_path / "diverged.onnx"
    onnx.save(proto, str(diverged))
    for method in ("minmax", "entropy"):
        with pytest.raises(QuantizeError) as caught:
            quantize_static_int8(diverged, tmp_path / "q.onnx", calib, method=method)
        message = str(caught.value)
        assert "\n" not in message and str(diverged) in message and "AssertionError" not in message
        assert f"3 weight values are non-finite (NaN/inf; first in {weight.name})" in message
        assert "lower the learning rate" in message and not (tmp_path / "q.onnx").exists()


def test_model_with_non_finite_outputs_is_refused_in_one_line(fp32_model, calib, tmp_path) -> None:
    proto = onnx.load(str(fp32_model))
    head = next(init for init in proto.graph.initializer if sorted(init.dims) == [CLASSES, 64])
    values = np.full(numpy_helper.to_array(head).shape, 3e38, dtype=np.float32)  # finite, but sums overflow
    head.CopyFrom(numpy_helper.from_array(values, head.name))
    overflowing = tmp_path / "overflowing.onnx"
    onnx.save(proto, str(overflowing))
    with pytest.raises(QuantizeError) as caught:
        quantize_static_int8(overflowing, tmp_path / "q.onnx", calib, method="percentile")
    message = str(caught.value)
    assert "\n" not in message and str(overflowing) in message and "FP32 model outputs" in message
    assert "non-finite values (NaN/inf) on the calibration samples" in message


def test_excluded_nodes_stay_in_float(fp32_model, calib, tmp_path) -> None:
    graph = onnx.load(str(fp32_model)).graph
    first_conv = next(node for node in graph.node if node.op_type == "Conv")
    out = tmp_path / "partial.onnx"
    info = quantize_static_int8(fp32_model, out, calib, exclude_nodes=[first_conv.name])
    assert info["nodes_excluded"] == [first_conv.name] and info["preprocess"] == "ok"
    values = initializers(out)
    assert values[first_conv.input[1]].dtype == np.float32  # that conv's weight is not quantised
    with pytest.raises(QuantizeError, match="no nodes named nope"):
        quantize_static_int8(fp32_model, tmp_path / "x.onnx", calib, exclude_nodes=["nope"])


def test_preprocess_failure_falls_back_and_is_recorded(fp32_model, calib, tmp_path, monkeypatch) -> None:
    import onnxruntime.quantization

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("symbolic shape inference failed\nmore detail")

    monkeypatch.setattr(onnxruntime.quantization, "quant_pre_process", broken)
    info = quantize_static_int8(fp32_model, tmp_path / "raw.onnx", calib)
    assert info["preprocess"] == "skipped: RuntimeError: symbolic shape inference failed"
    assert info["nodes_quantized"] > 0


def test_quantiser_failure_is_one_line_with_a_log(fp32_model, calib, tmp_path, monkeypatch) -> None:
    import onnxruntime.quantization

    def broken(*args: object, **kwargs: object) -> None:
        print("calibrator chatter")
        raise ValueError("unsupported node\ndetails")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", broken)
    target = tmp_path / "q.onnx"
    with pytest.raises(QuantizeError, match="failed: ValueError: unsupported node") as caught:
        quantize_static_int8(fp32_model, target, calib)
    assert "\n" not in str(caught.value) and not target.exists()
    assert "calibrator chatter" in (tmp_path / "q.onnx.quantize.log").read_text()


@pytest.mark.parametrize(
    ("n", "requested", "minimum", "expected"),
    [
        (0, 512, 16, "0 samples available"),
        (5, 512, 16, "5 samples available but quantize.min_calibration_samples = 16"),
        (100, 8, 16, "quantize.calibration_samples = 8 is below"),
    ],
)
def test_too_small_calibration_set(n, requested, minimum, expected) -> None:
    x = np.zeros((n, *INPUT_SHAPE), dtype=np.float32)
    with pytest.raises(QuantizeError, match=expected) as caught:
        CalibrationSet(x, "fp", "none", requested=requested, min_samples=minimum)
    assert "\n" not in str(caught.value)


def test_non_finite_calibration_data() -> None:
    x = np.zeros((20, *INPUT_SHAPE), dtype=np.float32)
    x[3, 0, 0] = np.nan
    with pytest.raises(QuantizeError, match="1 non-finite"):
        CalibrationSet(x, "fp", "none", requested=20, min_samples=16)


def test_mismatched_calibration_shape_and_bad_method(fp32_model, tmp_path) -> None:
    wrong = CalibrationSet(
        np.zeros((20, 2, 64), dtype=np.float32), "fp", "none", requested=20, min_samples=16
    )
    with pytest.raises(QuantizeError, match=r"calibration samples have shape \(2, 64\)"):
        quantize_static_int8(fp32_model, tmp_path / "q.onnx", wrong)
    assert not (tmp_path / "q.onnx").exists()
    right = CalibrationSet(np.zeros((20, *INPUT_SHAPE), dtype=np.float32), "fp", "none", 20, 16)
    with pytest.raises(QuantizeError, match="did you mean 'entropy'"):
        quantize_static_int8(fp32_model, tmp_path / "q.onnx", right, method="entropie")


def test_reader_batches() -> None:
    calib = CalibrationSet(np.ones((70, 2, 8), dtype=np.float32), "fp", "none", requested=100, min_samples=1)
    reader = calib.reader("input", batch_size=32)
    sizes = [len(batch["input"]) for batch in reader]
    assert sizes == [32, 32, 6] and reader.samples_yielded == 70 and reader.get_next() is None
    dropping = calib.reader("input", batch_size=32, drop_last=True)
    assert [len(b["input"]) for b in dropping] == [32, 32] and dropping.samples_yielded == 64


def budget_frames(max_drop: float) -> AccuracyBudget:
    x, y = tones(200, seed=4)
    return AccuracyBudget(max_drop, x, y, {"split": "tones-seed4"})


def test_accuracy_budget_met_at_once(fp32_model, calib, tmp_path) -> None:
    out = tmp_path / "budget.onnx"
    info = quantize_within_budget(fp32_model, out, calib, budget_frames(0.5))
    control = info["accuracy_control"]
    assert control["met"] and control["attempts"] == 1 and control["excluded_nodes"] == []
    assert control["stopped"] == "within budget" and control["budget"]["frames"] == 200
    assert control["drop_after"] == control["drop_before"] <= 0.5
    assert info["nodes_excluded"] == [] and info["nodes_quantized"] > 0


def test_accuracy_budget_keeps_sensitive_nodes_in_float(fp32_model, tmp_path) -> None:
    x, _ = tones(128, seed=5)
    # Calibrating on frames 50x too weak clips every activation range: a real, large INT8 drop.
    weak = CalibrationSet(0.02 * x, "tones-weak", "scaled by 0.02", requested=128, min_samples=16)
    budget = budget_frames(0.0)
    out = tmp_path / "budget.onnx"
    info = quantize_within_budget(fp32_model, out, weak, budget)
    control = info["accuracy_control"]
    assert control["drop_before"] > 0.2  # the weak calibration really hurt
    assert control["attempts"] == len(control["history"]) >= 2 and control["ranked_nodes"] >= 1
    assert (
        control["excluded_nodes"]
        == info["nodes_excluded"]
        == [r["node"] for r in control["ranking"]][: len(control["excluded_nodes"])]
    )
    assert [h["excluded"] for h in control["history"]][:3] == [0, 1, 2][: len(control["history"])]
    measured = (predict(out, budget.x) == budget.y).mean()  # the file on disk is the last attempt
    assert control["int8_accuracy"] == pytest.approx(measured)
    assert control["drop_after"] == pytest.approx(control["fp32_accuracy"] - measured, abs=1e-6)
    assert control["drop_after"] < control["drop_before"]
    assert control["met"] == (control["drop_after"] <= 0.0)
    if not control["met"]:
        assert len(control["excluded_nodes"]) == control["ranked_nodes"]
        assert control["stopped"].startswith("every ranked node is in float")


def test_a_budget_met_only_in_float_leaves_no_int8(fp32_model, tmp_path) -> None:
    """Calibration ranges 1000x too small wreck every quantised node; with the FP32 model's own
    predictions as labels and no drop allowed, only an all-float model fits: no INT8 is left."""
    x, _ = tones(100, seed=4)
    agree = AccuracyBudget(0.0, x, predict(fp32_model, x), {"split": "tones, FP32 predictions as labels"})
    crushed = CalibrationSet(
        1e-3 * tones(64, seed=1)[0], "tones-crushed", "x 1e-3", requested=64, min_samples=16
    )
    out = tmp_path / "budget.onnx"
    control = quantize_within_budget(fp32_model, out, crushed, agree)["accuracy_control"]
    assert control["drop_before"] > 0.2 and control["met"]
    assert len(control["excluded_nodes"]) == control["ranked_nodes"] >= 1
    assert control["int8_left"] is False and not is_quantized(onnx.load(str(out)))
    met = quantize_within_budget(fp32_model, tmp_path / "met.onnx", crushed, budget_frames(1.0))
    assert met["accuracy_control"]["int8_left"] is True


def test_sensitivity_ranking_names_real_nodes(fp32_model, asymmetric) -> None:
    path, _ = asymmetric
    names = {node.name for node in onnx.load(str(fp32_model)).graph.node}
    x, _ = tones(16, seed=6)
    ranking = rank_sensitive_nodes(fp32_model, path, x, names)
    assert ranking and all(item["node"] in names for item in ranking)
    scores = [item["sqnr_lost_db"] for item in ranking]
    assert scores == sorted(scores, reverse=True)
    assert {item["op"] for item in ranking} & {"Conv", "Gemm", "MatMul"}


def test_budget_out_of_range() -> None:
    with pytest.raises(QuantizeError, match="max_accuracy_drop must be between 0 and 1"):
        budget_frames(1.5)


def test_truncated_int8_model_is_one_line_for_compile(asymmetric, tmp_path) -> None:
    from edgekd.errors import ExportError
    from edgekd.stages.compile import check_readable_onnx

    path, _ = asymmetric
    check_readable_onnx(path, "quantize")  # a whole model passes
    cut = tmp_path / "student.int8.onnx"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(ExportError) as caught:
        check_readable_onnx(cut, "quantize")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{cut}: not a valid ONNX model, truncated or damaged")
    assert message.endswith("rerun with --force quantize")


def test_nncf_refuses_a_model_with_nan_weights(fp32_model, calib, tmp_path) -> None:
    ov = pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from edgekd.quantize.nncf import quantize_openvino

    proto = onnx.load(str(fp32_model))
    weight = max(proto.graph.initializer, key=lambda init: numpy_helper.to_array(init).size)
    weight.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(weight), np.nan), weight.name))
    onnx.save(proto, str(tmp_path / "diverged.onnx"))
    with pytest.raises(QuantizeError) as caught:
        quantize_openvino(ov.convert_model(str(tmp_path / "diverged.onnx")), calib)
    message = str(caught.value)
    assert (
        "\n" not in message and f"{weight.dims[0] * weight.dims[1]} weight values are non-finite" in message
    )
    assert "lower the learning rate" in message
