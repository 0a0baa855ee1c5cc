"""OpenVINO backend: IR at FP32/FP16/INT8 (NNCF), accuracy control, runner info, CLI errors, end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgekd.backends import Artifact, get_backend
from edgekd.data.base import normalise_frames
from edgekd.data.radio import synthesize, to_iq
from edgekd.errors import ModelError, QuantizeError, RecipeError
from edgekd.export import export_onnx
from edgekd.models import build_model
from edgekd.quantize import CalibrationSet
from edgekd.quantize.budget import AccuracyBudget
from tests.test_cli import EDGEKD, assert_user_error, run_cli

HAVE_OPENVINO = all(importlib.util.find_spec(name) is not None for name in ("openvino", "nncf"))
needs_openvino = pytest.mark.skipif(not HAVE_OPENVINO, reason="needs the openvino extra")

CLASSES = ("BPSK", "QPSK", "QAM16", "AM-DSB")
INPUT_SHAPE = (2, 128)


def frames(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised synthetic radio frames at 10-18 dB SNR of :data:`CLASSES`, shuffled."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label, modulation in enumerate(CLASSES):
        snr = rng.choice(np.arange(10, 20, 2), size=per_class)
        xs.append(normalise_frames(to_iq(synthesize(modulation, snr, INPUT_SHAPE[1], rng).received)))
        ys.append(np.full(per_class, label))
    order = rng.permutation(per_class * len(CLASSES))
    return np.concatenate(xs)[order], np.concatenate(ys)[order]


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """edgekd:kd-cnn trained for a few seconds on synthetic radio frames, exported to ONNX."""
    torch.manual_seed(0)
    model = build_model("edgekd:kd-cnn", num_classes=len(CLASSES), in_channels=2)
    x, y = frames(150, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(4):
        for start in range(0, len(x), 64):
            optimizer.zero_grad()
            logits = model(torch.from_numpy(x[start : start + 64]))
            nn.functional.cross_entropy(logits, torch.from_numpy(y[start : start + 64])).backward()
            optimizer.step()
    path = tmp_path_factory.mktemp("openvino") / "student.onnx"
    export_onnx(model.eval(), INPUT_SHAPE, path)
    return path


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, np.ndarray]:
    return frames(60, seed=2)


@pytest.fixture(scope="module")
def calib() -> CalibrationSet:
    x, _ = frames(40, seed=1)
    return CalibrationSet(x, "radio-test-seed1", "unit power", requested=128, min_samples=16)


@pytest.fixture(scope="module")
def compiled(onnx_path, calib, tmp_path_factory) -> dict[str, Artifact]:
    if not HAVE_OPENVINO:
        pytest.skip("needs the openvino extra")
    backend = get_backend("openvino")
    out = tmp_path_factory.mktemp("ir")
    return {
        p: backend.compile(onnx_path, out, p, calib if p == "int8" else None)
        for p in ("fp32", "fp16", "int8")
    }


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    runner = get_backend("onnxruntime").load(Artifact(path, "onnxruntime", "fp32"), threads=1)
    return runner.run(x)


@needs_openvino
def test_ir_files_and_metadata(compiled) -> None:
    for precision, artifact in compiled.items():
        assert artifact.path.name == f"student.{precision}.xml" and artifact.backend == "openvino"
        weights = artifact.path.with_suffix(".bin")
        assert weights.is_file()
        meta = artifact.metadata
        assert meta["size_bytes"] == artifact.path.stat().st_size + weights.stat().st_size
        assert meta["compress_to_fp16"] == (precision == "fp16") and meta["openvino_version"]
    fp32_bin = compiled["fp32"].path.with_suffix(".bin").stat().st_size
    assert compiled["fp16"].path.with_suffix(".bin").stat().st_size < 0.6 * fp32_bin
    assert compiled["int8"].path.with_suffix(".bin").stat().st_size < 0.45 * fp32_bin


@needs_openvino
def test_fp32_and_fp16_match_onnxruntime(compiled, onnx_path, held_out) -> None:
    x = held_out[0][:64]
    want = ort_logits(onnx_path, x)
    backend = get_backend("openvino")
    fp32 = backend.load(compiled["fp32"], threads=1).run(x)
    assert fp32.shape == want.shape and np.abs(fp32 - want).max() < 1e-4
    fp16 = backend.load(compiled["fp16"], threads=1).run(x)
    assert np.abs(fp16 - want).max() < 2e-2 * max(1.0, np.abs(want).max())
    assert (fp16.argmax(1) == want.argmax(1)).mean() >= 0.98


@needs_openvino
def test_runner_reads_the_bound_array_afresh_at_every_call(compiled, onnx_path, held_out) -> None:
    """The input tensor is bound once per array and shares its memory: in-place edits are seen."""
    runner = get_backend("openvino").load(compiled["fp32"], threads=1)
    batch = held_out[0][:8].copy()
    first = runner.run(batch)
    batch[:] = held_out[0][8:16]  # same array object, new values
    np.testing.assert_allclose(runner.run(batch), ort_logits(onnx_path, batch), atol=1e-4)
    other = held_out[0][16:20].copy()  # another array (and batch size) is bound anew
    np.testing.assert_allclose(runner.run(other), ort_logits(onnx_path, other), atol=1e-4)
    np.testing.assert_allclose(runner.run(held_out[0][:8]), first, atol=1e-6)


@needs_openvino
def test_int8_by_nncf_agrees_with_fp32(compiled, onnx_path, held_out, calib) -> None:
    x, y = held_out
    fp32 = ort_logits(onnx_path, x).argmax(1)
    assert (fp32 == y).mean() > 0.6  # the model learnt something: agreement is meaningful
    int8 = get_backend("openvino").load(compiled["int8"], threads=1).run(x).argmax(1)
    assert (int8 == fp32).mean() >= 0.9
    q = compiled["int8"].metadata["quantization"]
    assert q["tool"] == "nncf" and q["nncf_version"] and q["preset"] == "performance"
    assert q["subset_size"] == len(calib) == q["calibration"]["samples_used"] == 128
    assert q["calibration"]["data_sha256"] == calib.sha256() and q["ignored_scope"] == []
    assert q["fake_quantize_nodes"] > 0 and "accuracy_control" not in q


@needs_openvino
def test_runner_info_and_hints(compiled) -> None:
    backend = get_backend("ov")
    info = backend.load(compiled["fp16"], threads=1).info
    assert info["threads"] == 1 and info["hint"] == "latency" and info["device"] == "CPU"
    assert info["num_streams"] == 1 and info["version"] and info["device_name"]
    assert info["inference_precision"] in {"f32", "bf16", "f16"}  # what the CPU really computes in
    assert backend.load(compiled["fp32"], threads=1).info["inference_precision"] == "f32"
    throughput = backend.load(compiled["fp32"], threads=2, hint="throughput")
    assert throughput.info["hint"] == "throughput" and throughput.info["threads"] == 2
    assert throughput.run(np.zeros((3, *INPUT_SHAPE), dtype=np.float32)).shape == (3, len(CLASSES))
    with pytest.raises(RecipeError, match="openvino_hint must be one of latency, throughput"):
        backend.load(compiled["fp32"], hint="fast")


@needs_openvino
def test_mistakes(compiled, onnx_path, calib, tmp_path) -> None:
    backend = get_backend("openvino")
    with pytest.raises(QuantizeError, match="int8 needs a calibration set"):
        backend.compile(onnx_path, tmp_path, "int8", None)
    qdq = get_backend("ort").compile(onnx_path, tmp_path, "int8", calib)
    with pytest.raises(RecipeError, match="already QDQ-quantised"):
        backend.compile(qdq.path, tmp_path, "int8", calib)
    with pytest.raises(ModelError, match="not found"):
        backend.load(Artifact(tmp_path / "gone.xml", "openvino", "fp32"))
    runner = backend.load(compiled["fp32"], threads=1)
    with pytest.raises(ModelError, match=r"rejected a batch of shape \(2, 3\)") as caught:
        runner.run(np.zeros((2, 3), dtype=np.float32))
    assert "\n" not in str(caught.value)


@needs_openvino
@pytest.mark.parametrize("max_drop", [1.0, 0.0])
def test_accuracy_control(onnx_path, calib, max_drop, tmp_path) -> None:
    x, y = frames(25, seed=3)
    budget = AccuracyBudget(max_drop, x, y, {"split": "test frames"})
    artifact = get_backend("openvino").compile(onnx_path, tmp_path, "int8", calib, budget=budget)
    control = artifact.metadata["quantization"]["accuracy_control"]
    assert control["budget"]["max_drop"] == max_drop and control["budget"]["frames"] == 100
    runner = get_backend("openvino").load(artifact, threads=1)
    measured = budget.accuracy(runner.run(x))
    assert control["int8_accuracy"] == pytest.approx(measured)
    assert control["drop_after"] == pytest.approx(control["fp32_accuracy"] - measured, abs=1e-6)
    assert control["met"] == (control["drop_after"] <= max_drop)
    if max_drop == 1.0:
        assert control["met"]


def test_openvino_missing_is_one_line_naming_the_extra(tmp_path) -> None:
    stub = tmp_path / "stub" / "openvino"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError(\"No module named 'openvino' (test stub)\")\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "stub"), os.getcwd()])}
    result = subprocess.run(
        [*EDGEKD, "compress", "--target", "x86-openvino", "--set", f"runs_dir={tmp_path / 'runs'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert_user_error(result, "backend 'openvino' is unavailable", "openvino is not installed", ".[openvino]")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_max_accuracy_drop_out_of_range(value, tmp_path) -> None:
    result = run_cli(
        "compress", "--set", f"quantize.max_accuracy_drop={value}", "--set", f"runs_dir={tmp_path}"
    )
    assert_user_error(result, "quantize.max_accuracy_drop", value)


@needs_openvino
@pytest.mark.slow
def test_compress_for_openvino_end_to_end(tmp_path) -> None:
    from tests.test_end_to_end import SMALL

    result = run_cli(
        "compress", "--target", "x86-openvino", "--name", "ov", "--set", f"runs_dir={tmp_path}", *SMALL,
        "--set", "quantize.max_accuracy_drop=0.05", "--set", "quantize.accuracy_samples=100",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    report = json.loads((tmp_path / "ov" / "report.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    for precision in ("FP32", "FP16", "INT8"):
        row = rows[f"student (openvino {precision})"]
        lat, acc = row["latency"], row["accuracy"]
        assert 0 < lat["p50_ms"] <= lat["p99_ms"] and lat["threads"] >= 1 and lat["iterations"] == 20
        assert 0 <= acc["accuracy"] <= 1 and acc["n"] == report["data"]["eval_frames"]
        assert row["runtime_info"]["hint"] == "latency" and row["runtime_info"]["inference_precision"]
        assert row["size_bytes"] > 0
    assert rows["student (openvino FP32)"]["accuracy"]["agreement"] >= 0.99
    assert "skipped" in report["quantization"]  # no ORT QDQ model for an OpenVINO target
    int8 = next(a for a in report["artifacts"] if a["precision"] == "int8")
    control = int8["metadata"]["quantization"]["accuracy_control"]
    assert control["budget"]["frames"] == 100 and control["budget"]["split"].startswith("train")
    markdown = (tmp_path / "ov" / "report.md").read_text()
    assert "student (openvino INT8)" in markdown and "by NNCF" in markdown and "hint latency" in markdown


@needs_openvino
def test_a_file_openvino_cannot_convert_is_one_model_error_naming_it(tmp_path: Path):
    from edgekd.backends.openvino import convert_onnx

    broken = tmp_path / "student.int8.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(ModelError, match=r"^OpenVINO cannot convert .*student\.int8\.onnx: ") as caught:
        convert_onnx(broken)
    assert "\n" not in str(caught.value)
