"""TensorRT: availability, build_engine.sh, the QDQ rules, engines on a GPU, `compress --target jetson`.

Engine builds need TensorRT and a CUDA device; those tests skip with the reason where either is
missing. Everything else (the script, the QDQ rules, the bundle of a jetson run) is tested for real here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgekd.backends import BACKENDS, get_backend
from edgekd.backends.trtexec import (
    EXIT_NO_TRTEXEC,
    EngineJob,
    EngineOptions,
    onnx_input,
    trtexec_arguments,
    write_build_script,
)
from edgekd.errors import BackendUnavailable
from edgekd.quantize import quantize_static_int8
from edgekd.quantize.qdq_rules import tensorrt_qdq_violations
from tests.test_cli import run_cli
from tests.test_end_to_end import SMALL
from tests.test_quantize import INPUT_SHAPE, calib, fp32_model, tones, workdir  # noqa: F401 (fixtures)

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_CUDA_PYTHON = importlib.util.find_spec("cuda") is not None and (
    importlib.util.find_spec("cuda.bindings") is not None
)
TRT_OK, TRT_WHY = BACKENDS.get("tensorrt")().available()
needs_gpu = pytest.mark.skipif(
    not TRT_OK, reason=f"TensorRT engines need TensorRT and a CUDA device: {TRT_WHY}"
)


@pytest.fixture(scope="module")
def trt_qdq(fp32_model, calib, workdir) -> Path:  # noqa: F811
    """The QDQ model the quantize stage makes for TensorRT targets."""
    out = workdir / "student.int8.onnx"
    quantize_static_int8(fp32_model, out, calib, symmetric_activations=True, quantize_bias=False)
    return out


# ---------------------------------------------------------------- availability


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_unavailable_names_the_missing_module() -> None:
    ok, why = BACKENDS.get("tensorrt")().available()
    assert not ok and "tensorrt" in why and "cannot be imported" in why
    with pytest.raises(BackendUnavailable, match="backend 'tensorrt' is unavailable: .*tensorrt"):
        get_backend("trt")


@pytest.mark.skipif(not HAS_CUDA_PYTHON, reason="cuda-python is not installed (pip install cuda-python)")
@pytest.mark.skipif(TRT_OK, reason="TensorRT and a CUDA device are here")
def test_without_a_gpu_the_reason_names_the_missing_cuda_device() -> None:
    """cuda-python loads here but finds no device: one line saying so; torch is never imported."""
    code = (
        "import sys; from edgekd.backends import BACKENDS; "
        "print(BACKENDS.get('tensorrt')().available()[1]); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    why, torch_imported = out.stdout.strip().split("\n")
    assert torch_imported == "False" and "cuda-python cannot be imported" not in why
    assert re.search(r"no (usable )?CUDA device: ", why), why
    assert why.startswith("the tensorrt Python module cannot be imported") == (not HAS_TENSORRT)


@pytest.mark.skipif(TRT_OK, reason="TensorRT and a CUDA device are here")
def test_compile_without_runtime_is_one_clear_error(fp32_model, tmp_path) -> None:  # noqa: F811
    with pytest.raises(BackendUnavailable, match="unavailable: .*build_engine.sh"):
        BACKENDS.get("tensorrt")().compile(fp32_model, tmp_path, "fp16", None)


# ---------------------------------------------------------------- build_engine.sh


def _jobs(folder: Path, float_onnx: Path, qdq_onnx: Path, dla: int | None) -> list[EngineJob]:
    name, sample = onnx_input(float_onnx)
    options = EngineOptions(min_batch=1, opt_batch=2, max_batch=8, dla_core=dla)
    sources = {"fp32": float_onnx, "fp16": float_onnx, "int8": qdq_onnx}
    return [
        EngineJob(p, folder / src.name, folder / f"student.{p}.engine", name, sample, options)
        for p, src in sources.items()
    ]


@pytest.mark.parametrize("dla", [None, 1])
def test_build_script(tmp_path, fp32_model, trt_qdq, dla) -> None:  # noqa: F811
    folder = tmp_path / "bundle with space"  # arguments must survive the shell
    folder.mkdir()
    for source in (fp32_model, trt_qdq):
        (folder / source.name).write_bytes(source.read_bytes())
    jobs = _jobs(folder, folder / fp32_model.name, folder / trt_qdq.name, dla)
    script = write_build_script(folder / "build_engine.sh", jobs, "test bundle\nsecond line")
    assert script.stat().st_mode & stat.S_IXUSR
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0

    text = script.read_text()
    calls = [shlex.split(line)[1:] for line in text.splitlines() if line.startswith('"$TRTEXEC"')]
    assert len(calls) == 3
    name, sample = onnx_input(fp32_model)
    assert name == "input" and sample == INPUT_SHAPE
    shapes = "x".join(map(str, sample))
    for precision, args in zip(("fp32", "fp16", "int8"), calls, strict=True):
        flags = dict(arg.split("=", 1) if "=" in arg else (arg, "") for arg in args)
        onnx_file = folder / flags["--onnx"]
        assert onnx_file.is_file() and onnx_input(onnx_file) == (name, sample)
        assert flags["--saveEngine"] == f"student.{precision}.engine"
        assert flags["--minShapes"] == f"input:1x{shapes}"
        assert flags["--optShapes"] == f"input:2x{shapes}"
        assert flags["--maxShapes"] == f"input:8x{shapes}"
        assert flags["--timingCacheFile"] == "timing.cache"  # one cache reused by every build
        assert flags["--exportLayerInfo"] == f"student.{precision}.layers.json" and "--dumpLayerInfo" in flags
        assert ("--fp16" in flags) == (precision != "fp32")
        assert ("--int8" in flags) == (precision == "int8")
        assert (flags["--onnx"] == trt_qdq.name) == (precision == "int8")
        if dla is None:
            assert "--useDLACore" not in flags and "--allowGPUFallback" not in flags
        else:
            assert flags["--useDLACore"] == str(dla) and "--allowGPUFallback" in flags
        if precision == "int8":
            assert tensorrt_qdq_violations(onnx_file) == []

    # Run it with a recorder standing in for the trtexec binary: each call's argv, as the script passes it.
    recorder = tmp_path / "record.sh"
    recorder.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> "$RECORD"; echo ---- >> "$RECORD"\n')
    recorder.chmod(0o755)
    record = tmp_path / "argv.txt"
    env = {**os.environ, "TRTEXEC": str(recorder), "RECORD": str(record)}
    run = subprocess.run([str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    received = [
        block.strip("\n").split("\n") for block in record.read_text().split("----\n") if block.strip()
    ]
    relative = [
        EngineJob(
            j.precision, Path(j.onnx.name), Path(j.engine.name), j.input_name, j.sample_shape, j.options
        )
        for j in jobs
    ]
    assert received == [trtexec_arguments(job) for job in relative]

    # Without trtexec (none on PATH, none at TRTEXEC): one actionable line and its own exit code.
    env = {**os.environ, "TRTEXEC": str(tmp_path / "no-trtexec"), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == EXIT_NO_TRTEXEC and run.stdout == ""
    assert run.stderr.strip() == (
        f"trtexec not found on the device's PATH (nor at {tmp_path / 'no-trtexec'}); install TensorRT "
        "(on a Jetson: sudo apt install nvidia-jetpack) or set TRTEXEC=/path/to/trtexec"
    )


# ---------------------------------------------------------------- TensorRT's QDQ rules


def test_symmetric_qdq_for_tensorrt_follows_the_rules(trt_qdq) -> None:
    assert tensorrt_qdq_violations(trt_qdq) == []


def test_asymmetric_ort_qdq_breaks_the_rules(fp32_model, calib, tmp_path) -> None:  # noqa: F811
    path = tmp_path / "asym.onnx"
    quantize_static_int8(fp32_model, path, calib)  # ORT's default: UINT8 activations, INT32 biases
    problems = tensorrt_qdq_violations(path)
    assert any("zero point is uint8" in p for p in problems)
    assert any("int32 constant (e.g. a quantised bias)" in p for p in problems)


def test_quantised_bias_and_per_tensor_weights_break_the_rules(fp32_model, calib, tmp_path) -> None:  # noqa: F811
    biased = tmp_path / "bias.onnx"
    quantize_static_int8(fp32_model, biased, calib, symmetric_activations=True)
    assert all("bias" in p or "int32" in p for p in tensorrt_qdq_violations(biased))
    assert tensorrt_qdq_violations(biased)
    per_tensor = tmp_path / "per_tensor.onnx"
    quantize_static_int8(
        fp32_model, per_tensor, calib, per_channel=False, symmetric_activations=True, quantize_bias=False
    )
    problems = tensorrt_qdq_violations(per_tensor)
    assert problems and all("per tensor" in p for p in problems)
    assert tensorrt_qdq_violations(per_tensor, per_channel=False) == []
    assert tensorrt_qdq_violations(fp32_model) == [
        "no QuantizeLinear/DequantizeLinear nodes: the model is not QDQ-quantised"
    ]


# ---------------------------------------------------------------- on a GPU with TensorRT


@needs_gpu
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engine_builds_runs_and_is_timed_with_cuda_events(fp32_model, trt_qdq, tmp_path, precision) -> None:  # noqa: F811
    from edgekd.profile.cuda_latency import measure_cuda_latency

    backend = get_backend("tensorrt")
    source = trt_qdq if precision == "int8" else fp32_model
    options = EngineOptions(opt_batch=4, max_batch=8)
    artifact = backend.compile(source, tmp_path, precision, None, options=options)
    assert artifact.path.name == f"student.{precision}.engine" and (tmp_path / "timing.cache").is_file()
    assert json.loads(Path(artifact.metadata["layer_info_file"]).read_text())["Layers"]
    runner = backend.load(artifact)
    x, _ = tones(4, seed=3)
    reference = ort.InferenceSession(str(fp32_model)).run(None, {"input": x})[0]
    out = runner.run(x)
    assert out.shape == reference.shape
    assert (out.argmax(1) == reference.argmax(1)).mean() >= 0.75
    assert runner.info["version"] and runner.info["device_name"]
    latency = measure_cuda_latency(runner, x, warmup=5, iterations=20)
    assert 0 < latency["p50_ms"] <= latency["p99_ms"] and "CUDA events" in latency["clock"]
    with pytest.raises(Exception, match="optimisation profile"):
        runner.run(np.zeros((9, *INPUT_SHAPE), np.float32))
    layers = backend.layer_times(artifact, x, runs=5, warmup=2)
    assert layers["runs"] == 5 and layers["nodes"] >= 1 and layers["top"]
    assert all(item["median_ms"] > 0 and item["op"] for item in layers["top"])


# ---------------------------------------------------------------- the whole pipeline, no GPU


@pytest.mark.slow
@pytest.mark.skipif(TRT_OK, reason="TensorRT and a GPU are here: the engines are built and profiled instead")
def test_compress_for_jetson_without_a_gpu(tmp_path) -> None:
    result = run_cli("compress", "--target", "jetson", "--name", "j", "--set", f"runs_dir={tmp_path}", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    run_dir = tmp_path / "j"
    compile_dir = next(run_dir.glob("*-compile"))
    for name in ("student.onnx", "student.int8.onnx", "build_engine.sh", "calibration.json"):
        assert (compile_dir / name).is_file(), name
    assert subprocess.run(["bash", "-n", str(compile_dir / "build_engine.sh")]).returncode == 0
    assert tensorrt_qdq_violations(compile_dir / "student.int8.onnx") == []
    assert not list(compile_dir.glob("*.engine"))
    report = json.loads((run_dir / "report.json").read_text())
    assert report["target"]["name"] == "jetson-orin-nano"
    assert [row["name"] for row in report["rows"]] == ["teacher (PyTorch FP32)", "student (PyTorch FP32)"]
    missing = report["not_measured"]
    assert [item["precision"] for item in missing] == ["fp32", "fp16", "int8"]
    assert all(item["profiled"] is False and TRT_WHY in item["why"] for item in missing)
    assert report["quantization"]["quantization"]["symmetric_activations"] is True
    assert report["quantization"]["quantization"]["quantize_bias"] is False
    assert "student (tensorrt INT8)" in report["headline"]["not_measured"]
    markdown = (run_dir / "report.md").read_text()
    assert "## Not measured" in markdown and "student (tensorrt INT8)" in markdown and TRT_WHY in markdown
    assert "not measured: student (tensorrt INT8)" in result.stdout
