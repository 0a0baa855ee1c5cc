"""Microcontroller targets (issue 15): targets, fit check, cycle estimate, generated TFLM sources compiled
with g++, and (with the mcu extra) the LiteRT INT8 conversion run under TFLM and LiteRT."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgekd.errors import RecipeError
from edgekd.mcu import missing
from edgekd.mcu.cycles import estimate_cycles
from edgekd.mcu.firmware import MAIN_FILE, OPS_FILE, SOURCE_FILE, TFLM_HEADERS, write_firmware
from edgekd.mcu.fit import FRAMEWORK_FLASH_BYTES, KERNEL_FLASH_BYTES, arena_constant, fit_check
from edgekd.mcu.interpreters import parse_allocations
from edgekd.mcu.tflite_model import RESOLVER_METHODS, OpInfo, TensorInfo, TfliteModel
from edgekd.targets import read_target, resolve_target
from tests.test_cli import assert_user_error, run_cli

MCU_MISSING = missing()
needs_mcu = pytest.mark.skipif(
    bool(MCU_MISSING),
    reason=f"the mcu extra is not installed ({', '.join(MCU_MISSING)}): pip install -e '.[mcu]'",
)
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
M4 = {"core": "cortex-m4", "clock_mhz": 64.0, "sram_kb": 256.0, "flash_kb": 1024.0}


def small_model(size_bytes: int = 38_000, io: str = "int8") -> TfliteModel:
    """A KD-CNN-shaped model description: one conv (16x7x2 weights over 128 outputs) and one FC; with
    ``io="float"`` float32 input and output (QUANTIZE/DEQUANTIZE at the boundary, as mcu_io: float)."""
    ops = [
        OpInfo("CONV_2D", [[1, 1, 128, 2], [16, 1, 7, 2], [16]], [1, 1, 128, 16], 128 * 16 * 14, 128 * 16),
        OpInfo("TRANSPOSE", [[1, 1, 128, 16], [4]], [1, 16, 1, 128], 0, 2048),
        OpInfo("FULLY_CONNECTED", [[1, 2048], [11, 2048], [11]], [1, 11], 11 * 2048, 11),
    ]
    inputs = [TensorInfo("x", [1, 2, 128], "int8", 0.02, 3)]
    outputs = [TensorInfo("y", [1, 11], "int8", 0.15, -13)]
    if io == "float":
        ops = [
            OpInfo("QUANTIZE", [[1, 2, 128]], [1, 2, 128], 0, 256),
            *ops,
            OpInfo("DEQUANTIZE", [[1, 11]], [1, 11], 0, 11),
        ]
        inputs = [TensorInfo("x", [1, 2, 128], "float32")]
        outputs = [TensorInfo("y", [1, 11], "float32")]
    return TfliteModel(size_bytes, ops, inputs, outputs, weight_bytes=size_bytes // 2)


# ------------------------------------------------------------------------------------------ targets


@pytest.mark.parametrize(("name", "core", "sram", "flash"), [("cortex-m4", "cortex-m4", 256, 1024),
                                                             ("cortex-m7", "cortex-m7", 1024, 2048),
                                                             ("m55", "cortex-m55", 13824, 5632)])  # fmt: skip
def test_mcu_targets_carry_their_datasheet_budget(name, core, sram, flash):
    target = resolve_target(name)
    assert target.backend == "litert" and target.precisions == ("int8",)
    assert target.mcu["core"] == core and target.mcu["sram_kb"] == sram and target.mcu["flash_kb"] == flash
    assert target.mcu["datasheet"] and target.to_dict()["mcu"] == target.mcu


def test_litert_target_without_mcu_section_is_one_clear_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nbackend: litert\nprecisions: [int8]\n")
    with pytest.raises(RecipeError, match="bad.yaml: backend 'litert' needs an mcu section"):
        read_target(path)
    path.write_text(path.read_text() + "mcu: {core: cortex-m3, part: x, clock_mhz: 1, sram_kb: 1, "
                    "flash_kb: 1, datasheet: y}\n")  # fmt: skip
    with pytest.raises(RecipeError, match="mcu.core"):
        read_target(path)


# ------------------------------------------------------------------------------- fit and cycles


def test_fit_check_adds_model_framework_kernels_and_arena_plus_io():
    model = small_model()
    fit = fit_check(model, arena_total=11_136, mcu=M4)
    kernels = (
        KERNEL_FLASH_BYTES["CONV_2D"]
        + KERNEL_FLASH_BYTES["TRANSPOSE"]
        + KERNEL_FLASH_BYTES["FULLY_CONNECTED"]
    )
    assert fit["flash"]["needed_bytes"] == 38_000 + FRAMEWORK_FLASH_BYTES + kernels
    assert fit["sram"]["arena_bytes"] == arena_constant(11_136) == 11_152
    assert fit["sram"]["needed_bytes"] == 11_152 + 256 + 11
    assert fit["fits"] and fit["problems"] == []


def test_a_model_too_big_is_reported_with_its_numbers():
    fit = fit_check(small_model(size_bytes=1_100_000), arena_total=300_000, mcu=M4)
    assert not fit["fits"]
    assert any(p.startswith("flash ") and "> 1,048,576 B" in p for p in fit["problems"])
    assert any(p.startswith("SRAM ") and "> 262,144 B" in p for p in fit["problems"])


def test_cycle_estimate_follows_the_documented_per_op_model():
    model = small_model()
    m4 = estimate_cycles(model, "cortex-m4", 64.0)
    conv = 128 * 16 * 14 * 1.0 + 2048 * 4.0 + 400
    transpose = 2048 * 4.0 + 400
    fc = 11 * 2048 * 1.3 + 11 * 4.0 + 400
    assert m4["kind"] == "estimate" and m4["measured_cycles"] is None
    assert m4["cycles"] == round(conv + transpose + fc)
    assert m4["ms"] == pytest.approx(m4["cycles"] / 64e3, abs=1e-3)
    m55 = estimate_cycles(model, "cortex-m55", 400.0)
    assert m55["cycles"] < estimate_cycles(model, "cortex-m7", 480.0)["cycles"] < m4["cycles"]


def test_recording_allocator_report_is_parsed():
    text = (
        "[RecordingMicroAllocator] Arena allocation total 11136 bytes\n"
        "[RecordingMicroAllocator] Arena allocation head 5120 bytes\n"
        "[RecordingMicroAllocator] Arena allocation tail 6016 bytes\n"
        "[RecordingMicroAllocator] 'TfLiteEvalTensor data' used 936 bytes with alignment overhead\n"
    )
    report = parse_allocations(text)
    assert report["total_bytes"] == 11136 and report["head_bytes"] == 5120 and report["tail_bytes"] == 6016
    assert report["by_kind"] == {"TfLiteEvalTensor data": 936}


# ------------------------------------------------------------------------------ firmware sources


def _tflm_syntax_stub(root: Path) -> Path:
    """STUB headers standing in for TFLM, only so g++ can check the syntax of our generated files:
    the declarations those files use, no implementation. Not TFLM; never shipped."""
    resolver_methods = "\n".join(
        f"  TfLiteStatus {method}();" for method in sorted(set(RESOLVER_METHODS.values()))
    )
    files = {
        TFLM_HEADERS[0]: "#pragma once\n// tflm_syntax_stub: NOT TFLM\n"
        "typedef enum { kTfLiteOk = 0, kTfLiteError = 1 } TfLiteStatus;\n"
        "namespace tflite {\ntemplate <unsigned int N> class MicroMutableOpResolver {\n public:\n"
        f"{resolver_methods}\n}};\n}}  // namespace tflite\n",
        TFLM_HEADERS[
            1
        ]: "#pragma once\n// tflm_syntax_stub: NOT TFLM\n#include <stddef.h>\n#include <stdint.h>\n"
        f'#include "{TFLM_HEADERS[0]}"\n#include "{TFLM_HEADERS[2]}"\n'
        "struct TfLiteTensor { union { int8_t* int8; float* f; } data; size_t bytes; };\n"
        "namespace tflite {\nclass MicroInterpreter {\n public:\n"
        "  template <typename R> MicroInterpreter(const Model*, R&, uint8_t*, size_t);\n"
        "  TfLiteStatus AllocateTensors();\n  TfLiteStatus Invoke();\n"
        "  TfLiteTensor* input(size_t);\n  TfLiteTensor* output(size_t);\n};\n}  // namespace tflite\n",
        TFLM_HEADERS[2]: "#pragma once\n// tflm_syntax_stub: NOT TFLM\n#define TFLITE_SCHEMA_VERSION 3\n"
        "namespace tflite {\nstruct Model { unsigned int version() const; };\n"
        "const Model* GetModel(const void* buffer);\n}  // namespace tflite\n",
    }
    stub = root / "tflm_syntax_stub"
    for name, text in files.items():
        (stub / name).parent.mkdir(parents=True, exist_ok=True)
        (stub / name).write_text(text)
    return stub


def _firmware(tmp_path: Path, fits: bool, io: str = "int8") -> tuple[Path, dict]:
    model = small_model(io=io)
    data = b"\x1c\x00\x00\x00TFL3" + bytes(range(256)) * 3
    fit = fit_check(model, 11_136, M4 if fits else {**M4, "sram_kb": 8.0})
    work = tmp_path / f"bundle-{io}"
    work.mkdir()
    labels = ["8PSK", 'A"M', *[f"c{i}" for i in range(9)]]
    entry = write_firmware(work, "m.tflite", data, "0" * 64, model, 11_152, labels, fit, "cortex-m4", "test")
    return work, entry


@needs_gxx
def test_generated_sources_compile_against_the_stub_and_the_array_links(tmp_path):
    work, entry = _firmware(tmp_path, fits=True)
    assert (
        entry["ops"] == ["CONV_2D", "TRANSPOSE", "FULLY_CONNECTED"] and entry["tensor_arena_bytes"] == 11_152
    )
    ops = (work / OPS_FILE).read_text()
    assert "AddConv2D()" in ops and "AddTranspose()" in ops and "AddFullyConnected()" in ops
    assert "kNumOps = 3;" in ops and "kTensorArenaSize = 11152;" in ops and "#error" not in ops
    stub = _tflm_syntax_stub(tmp_path)
    for source in (SOURCE_FILE, MAIN_FILE):
        result = subprocess.run(
            ["g++", "-std=c++17", "-Wall", "-Werror", "-fsyntax-only", "-I", str(work), "-I", str(stub),
             str(work / source)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    # The C array itself needs no TFLM: compile, link and run it; it is the model, aligned.
    check = tmp_path / "check.cc"
    check.write_text(
        '#include <cstdint>\n#include <cstring>\n#include "model_data.h"\n'
        "int main() {\n  if (model_data_len != MODEL_DATA_LEN) return 1;\n"
        '  if (std::memcmp(model_data + 4, "TFL3", 4) != 0) return 2;\n'
        "  return reinterpret_cast<std::uintptr_t>(model_data) % 16 == 0 ? 0 : 3;\n}\n"
    )
    binary = tmp_path / "check"
    subprocess.run(
        ["g++", "-std=c++17", "-I", str(work), str(check), str(work / SOURCE_FILE), "-o", str(binary)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert subprocess.run([str(binary)], timeout=30).returncode == 0


def _syntax_check(work: Path, stub: Path, source: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["g++", "-std=c++17", "-Wall", "-Werror", "-fsyntax-only", "-I", str(work), "-I", str(stub),
         str(work / source)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@needs_gxx
def test_firmware_follows_the_io_type_int8_quantises_the_frame_float_copies_it(tmp_path):
    stub = _tflm_syntax_stub(tmp_path)
    work8, entry8 = _firmware(tmp_path, fits=True, io="int8")
    workf, entryf = _firmware(tmp_path, fits=True, io="float")
    assert entry8["io"]["type"] == "int8" and entryf["io"]["type"] == "float32"
    assert entry8["io"]["input"]["scale"] == 0.02 and entry8["io"]["input"]["zero_point"] == 3
    assert entryf["io"]["input"]["scale"] is None and entryf["ops"][0] == "QUANTIZE"
    ops8, opsf = (work8 / OPS_FILE).read_text(), (workf / OPS_FILE).read_text()
    assert "kInt8Input = true;" in ops8 and "kInputScale = 0.02f;" in ops8 and "kInputZeroPoint = 3;" in ops8
    assert "kOutputScale = 0.15f;" in ops8 and "kOutputZeroPoint = -13;" in ops8
    assert "kInt8Input = false;" in opsf and "kInt8Output = false;" in opsf
    assert "kInputScale" not in opsf and "kOutputScale" not in opsf and "AddQuantize()" in opsf
    main8, mainf = (work8 / MAIN_FILE).read_text(), (workf / MAIN_FILE).read_text()
    assert "input->data.int8[i] = Quantize(frame[i])" in main8 and "output->data.int8[c]" in main8
    assert "input->data.f[i] = frame[i]" in mainf and "output->data.f[c]" in mainf
    assert "Quantize(" not in mainf and "data.int8" not in mainf
    for work in (work8, workf):
        for source in (SOURCE_FILE, MAIN_FILE):
            result = _syntax_check(work, stub, source)
            assert result.returncode == 0, result.stderr
    # the float model's SRAM counts 4-byte I/O buffers
    fit8, fitf = fit_check(small_model(), 11_136, M4), fit_check(small_model(io="float"), 11_136, M4)
    assert fitf["sram"]["io_bytes"] == 4 * fit8["sram"]["io_bytes"] == 4 * (256 + 11)


def test_report_shows_tflm_accuracy_fit_arena_and_cycles_per_core():
    from edgekd.report.markdown import _mcu

    model = small_model()
    fit = fit_check(model, 11_136, M4)
    other = {**fit_check(model, 11_136, {**M4, "sram_kb": 8.0}), "target": "tiny"}
    mcu = {
        "target": "cortex-m4",
        "io": {"type": "int8", "input": model.inputs[0].to_dict(), "output": model.outputs[0].to_dict()},
        "arena": {"total_bytes": 11_136, "head_bytes": 5_120, "tail_bytes": 6_016, "measured_by": "TFLM"},
        "tensor_arena_bytes": 11_152,
        "interpreter_agreement": {"tflm_vs_litert_top1": 0.99, "frames": 256, "frames_from": "calib"},
        "fit": fit,
        "cycles": estimate_cycles(model, "cortex-m4", 64.0),
        "by_target": [
            {"target": name, "core": "cortex-m4", "part": "x", "clock_mhz": 64.0, "fits": f["fits"],
             "flash_needed_bytes": f["flash"]["needed_bytes"],
             "flash_budget_bytes": f["flash"]["budget_bytes"],
             "sram_needed_bytes": f["sram"]["needed_bytes"], "sram_budget_bytes": f["sram"]["budget_bytes"],
             "cycles": 123_456, "ms": 1.93, "cycles_kind": "estimate"}
            for name, f in (("cortex-m4", fit), ("tiny", other))
        ],
    }  # fmt: skip
    quantization = {
        "budget_not_applied": "quantize.max_accuracy_drop=0.02 is not applied on backend 'litert'"
    }
    report = {
        "target": {"name": "cortex-m4"},
        "artifacts": [
            {"path": "05-compile/student.int8.tflite", "backend": "litert", "precision": "int8",
             "metadata": {"mcu": mcu, "quantization": quantization}},
        ],
        "rows": [
            {"name": "student (litert INT8)", "runtime": "litert", "precision": "int8",
             "accuracy": {"accuracy": 0.8123, "agreement": 0.97, "n": 220},
             "runtime_info": {"interpreter": "tflite-micro (reference kernels)", "version": "0.dev1"}},
        ],
    }  # fmt: skip
    text = "\n".join(_mcu(report))
    assert "## Microcontroller: cortex-m4" in text
    assert "`student.int8.tflite` under tflite-micro (reference kernels) 0.dev1: **0.8123**" in text
    assert "(220 frames), agreement with the FP32 model 0.9700" in text
    assert (
        "input int8, scale 0.02, zero point 3" in text and "output int8, scale 0.15, zero point -13" in text
    )
    needed, budget = fit["flash"]["needed_bytes"], fit["flash"]["budget_bytes"]
    assert f"| flash | {needed:,} B | {budget:,} B | {needed / budget:.1%} |" in text
    assert f"| SRAM | {fit['sram']['needed_bytes']:,} B | 262,144 B |" in text
    assert "tensor arena 11,152 B (kTensorArenaSize; measured 11,136 B)" in text and "**fits**" in text
    cycles = mcu["cycles"]["cycles"]
    assert f"cortex-m4 @ 64 MHz: **{cycles:,} (estimate)**" in text
    assert "| **cortex-m4** | cortex-m4 @ 64 |" in text and "| yes | 123,456 | 1.93 |" in text
    assert "| tiny | cortex-m4 @ 64 |" in text and "| no | 123,456 |" in text
    assert "- Note: quantize.max_accuracy_drop=0.02 is not applied" in text
    mcu["io"] = {"type": "float32", **{k: {"dtype": "float32"} for k in ("input", "output")}}
    mcu["fit"] = other
    text = "\n".join(_mcu(report))
    assert "Inputs/outputs: float32 (compile.mcu_io: float" in text
    assert "**does NOT fit**: SRAM" in text
    assert _mcu({**report, "artifacts": [{**report["artifacts"][0], "metadata": {}}]}) == []


def test_mcu_io_is_a_recipe_option_that_reruns_the_compile_stage():
    from edgekd.recipe import Recipe, load_recipe
    from edgekd.stages.compile import _config

    assert Recipe().compile.mcu_io == "int8"
    with pytest.raises(RecipeError, match="mcu_io"):
        load_recipe(None, ["compile.mcu_io=int16"])
    m4 = _config(load_recipe(None, ["target=cortex-m4"]))
    assert m4 != _config(load_recipe(None, ["target=cortex-m4", "compile.mcu_io=float"]))
    ort = load_recipe(None, ["target=x86-ort"])
    assert _config(ort) == _config(load_recipe(None, ["target=x86-ort", "compile.mcu_io=float"]))


@needs_gxx
def test_a_model_that_does_not_fit_stops_the_firmware_build(tmp_path):
    work, entry = _firmware(tmp_path, fits=False)
    assert entry["fits"] is False
    stub = _tflm_syntax_stub(tmp_path)
    result = subprocess.run(
        ["g++", "-std=c++17", "-fsyntax-only", "-I", str(work), "-I", str(stub), str(work / MAIN_FILE)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0 and "does not fit cortex-m4: SRAM" in result.stderr
    forced = subprocess.run(
        ["g++", "-std=c++17", "-fsyntax-only", "-DEDGEKD_IGNORE_FIT_CHECK", "-I", str(work), "-I", str(stub),
         str(work / MAIN_FILE)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert forced.returncode == 0, forced.stderr


# ------------------------------------------------------------------- conversion (mcu extra only)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    import torch

    from edgekd.mcu.convert import convert_int8
    from edgekd.models import build_model
    from edgekd.quantize.calibration import CalibrationSet

    torch.manual_seed(0)
    model = build_model("edgekd:kd-cnn", num_classes=11, in_channels=2, role="student", input_shape=(2, 128))
    frames = np.random.default_rng(0).standard_normal((96, 2, 128)).astype(np.float32)
    calib = CalibrationSet(frames[:64], "fingerprint", "none", requested=64, min_samples=16)
    path = tmp_path_factory.mktemp("mcu") / "student.int8.tflite"
    record = convert_int8(model.eval(), calib, path)
    return model, path, record, frames[64:]


@needs_mcu
def test_litert_pt2e_makes_a_fully_int8_tflite_with_recorded_io_quantisation(converted):
    from edgekd.mcu.tflite_model import read_tflite

    _, path, record, _ = converted
    parsed = read_tflite(path)
    assert [t.dtype for t in (*parsed.inputs, *parsed.outputs)] == ["int8", "int8"]
    assert parsed.inputs[0].shape == [1, 2, 128] and parsed.outputs[0].shape == [1, 11]
    assert record["input_quantization"] == {
        "scale": parsed.inputs[0].scale,
        "zero_point": parsed.inputs[0].zero_point,
    }
    assert record["calibration"]["samples_used"] == 64 and record["tool"] == "litert-torch PT2E"
    assert {"CONV_2D", "FULLY_CONNECTED", "MAX_POOL_2D"} <= set(parsed.op_types)
    assert 400_000 < parsed.macs < 600_000  # KD-CNN: ~0.5 M MACs
    assert parsed.size_bytes == path.stat().st_size < 64_000


@needs_mcu
def test_tflm_and_litert_run_it_and_agree_with_pytorch(converted):
    import torch

    from edgekd.mcu.interpreters import LiteRTRunner, TflmRunner, measure_arena

    model, path, _, frames = converted
    tflm, litert = TflmRunner(path).run(frames), LiteRTRunner(path).run(frames)
    assert tflm.shape == litert.shape == (32, 11)
    with torch.no_grad():
        reference = model(torch.from_numpy(frames)).numpy()
    assert np.mean(tflm.argmax(1) == litert.argmax(1)) >= 0.9
    assert np.mean(tflm.argmax(1) == reference.argmax(1)) >= 0.7
    arena = measure_arena(path, frames[0])
    assert 4_000 < arena["total_bytes"] < 64_000
    assert arena["head_bytes"] + arena["tail_bytes"] == arena["total_bytes"]


@pytest.fixture(scope="module")
def compiled_float(tmp_path_factory, converted):
    """The LiteRT backend's compile with compile.mcu_io: float and an accuracy budget."""
    from edgekd.backends.litert import LiteRTBackend
    from edgekd.quantize.budget import AccuracyBudget
    from edgekd.quantize.calibration import CalibrationSet

    model, _, _, frames = converted
    calib = CalibrationSet(
        np.random.default_rng(0).standard_normal((96, 2, 128)).astype(np.float32)[:64],
        "fingerprint", "none", requested=64, min_samples=16,
    )  # fmt: skip
    budget = AccuracyBudget(0.02, frames, np.zeros(len(frames), np.int64))
    out = tmp_path_factory.mktemp("mcu-float")
    return LiteRTBackend().compile(
        out / "student.onnx", out, "int8", calib, budget=budget, model=model,
        target=resolve_target("cortex-m4"), io="float",
    )  # fmt: skip


@needs_mcu
def test_float_io_keeps_float32_input_output_with_quantize_dequantize_at_the_boundary(
    converted, compiled_float
):
    from edgekd.mcu.interpreters import LiteRTRunner, TflmRunner
    from edgekd.mcu.tflite_model import read_tflite

    _, int8_path, int8_record, frames = converted
    parsed = read_tflite(compiled_float.path)
    assert [t.dtype for t in (*parsed.inputs, *parsed.outputs)] == ["float32", "float32"]
    assert parsed.ops[0].op == "QUANTIZE" and parsed.ops[-1].op == "DEQUANTIZE"
    int8_ops = [op.op for op in read_tflite(int8_path).ops]
    assert [op.op for op in parsed.ops[1:-1]] == int8_ops  # the same INT8 graph inside
    q = compiled_float.metadata["quantization"]
    assert q["io_type"] == "float32" and q["input_quantization"] is None and "io_boundary" in q
    assert int8_record["io_type"] == "int8" and int8_record["input_quantization"]["scale"] > 0
    mcu = compiled_float.metadata["mcu"]
    assert mcu["io"]["type"] == "float32" and mcu["fit"]["sram"]["io_bytes"] == 4 * (256 + 11)
    # float frames in, float logits out; the same decisions as the INT8-I/O model run on quantised frames
    tflm_float, tflm_int8 = TflmRunner(compiled_float.path).run(frames), TflmRunner(int8_path).run(frames)
    assert tflm_float.dtype == np.float32 and tflm_float.shape == (32, 11)
    assert np.mean(tflm_float.argmax(1) == tflm_int8.argmax(1)) >= 0.9
    out_scale = int8_record["output_quantization"]["scale"]
    assert np.median(np.abs(tflm_float - tflm_int8)) <= 2 * out_scale
    assert np.mean(LiteRTRunner(compiled_float.path).run(frames).argmax(1) == tflm_float.argmax(1)) >= 0.9


@needs_mcu
def test_max_accuracy_drop_is_said_not_applied_and_every_mcu_target_is_estimated(compiled_float):
    q = compiled_float.metadata["quantization"]
    assert q["budget_not_applied"].startswith("quantize.max_accuracy_drop=0.02 is not applied on backend")
    by_target = {row["target"]: row for row in compiled_float.metadata["mcu"]["by_target"]}
    assert set(by_target) == {"cortex-m4", "cortex-m7", "cortex-m55"}
    assert all(row["cycles_kind"] == "estimate" and row["fits"] for row in by_target.values())
    assert (
        by_target["cortex-m55"]["cycles"]
        < by_target["cortex-m7"]["cycles"]
        < by_target["cortex-m4"]["cycles"]
    )
    assert by_target["cortex-m4"]["cycles"] == compiled_float.metadata["mcu"]["cycles"]["cycles"]


@needs_mcu
@pytest.mark.slow
def test_compress_for_cortex_m4_makes_a_verified_mcu_bundle(tmp_path):
    from edgekd.bundle.verify import verify_bundle
    from tests.test_cli import run_cli

    result = run_cli(
        "compress", "--target", "cortex-m4", "--set", "distill.train.epochs=1",
        "--set", f"runs_dir={tmp_path}", "--set", "name=m4", "--set", "profile.eval_samples=300",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    bundle = tmp_path / "m4" / "bundle" / "cortex-m4"
    manifest = json.loads((bundle / "manifest.json").read_text())
    firmware = manifest["firmware"]
    assert firmware["fits"] is True and firmware["fit"]["sram"]["arena_measured_bytes"] > 0
    assert firmware["cycles"]["kind"] == "estimate" and firmware["cycles"]["cycles"] > 0
    assert {SOURCE_FILE, "model_data.h", OPS_FILE, MAIN_FILE, "student.int8.tflite"} <= set(manifest["files"])
    rows = dict(verify_bundle(bundle))
    assert "ran 1 input" in rows["student.int8.tflite"]
    assert firmware["io"]["type"] == "int8" and firmware["io"]["input"]["scale"] > 0
    report = json.loads((tmp_path / "m4" / "report.json").read_text())
    assert "litert" in json.dumps(report)
    markdown = (tmp_path / "m4" / "report.md").read_text()
    assert "## Microcontroller: cortex-m4" in markdown and "under tflite-micro" in markdown
    assert "| flash |" in markdown and "| SRAM |" in markdown and "(estimate)**" in markdown
    assert "The bundle's `model_data.cc` and `manifest.json`" in markdown  # TFLM firmware is C++


def test_qad_on_a_microcontroller_target_is_one_line(tmp_path: Path) -> None:
    """litert converts the PyTorch student with its own quantiser: QAD does not apply, said up front."""
    result = run_cli(
        "compress", "--target", "cortex-m4", "--set", "quantize.mode=qad", "--set", f"runs_dir={tmp_path}"
    )
    assert_user_error(result, "quantize.mode = qad is not available for target cortex-m4")
    assert not any(tmp_path.iterdir())


@needs_mcu  # without the extra, the missing backend is the one line (checked first)
def test_a_device_for_a_microcontroller_target_is_one_line(tmp_path: Path) -> None:
    """A Cortex-M board is not an SSH host: said before any work, not after the bundle."""
    result = run_cli(
        "compress", "--target", "cortex-m4", "--device", "pi@127.0.0.1", "--set", f"runs_dir={tmp_path}"
    )
    assert_user_error(result, "target cortex-m4 is a microcontroller", "drop --device")
    assert not any(tmp_path.iterdir())
