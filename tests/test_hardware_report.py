"""Hardware-selection report: Pareto front, SVG plot, peak-ops share (published or measured peak),
per-layer times, `edgekd benchmark`."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgekd.report.hardware as hardware_report
from edgekd.backends import Artifact, get_backend
from edgekd.profile.host_peak import FP16_WHY, gemm_model, measure_host_peak
from edgekd.report.hardware import build_comparison, peak_ops_share, render_html, render_markdown
from edgekd.report.svg import Point, pareto_front, pareto_svg
from edgekd.targets import resolve_target
from tests.test_cli import assert_user_error, run_cli

SVG = "{http://www.w3.org/2000/svg}"
HAVE_OPENVINO = all(importlib.util.find_spec(name) is not None for name in ("openvino", "nncf"))


def test_pareto_front_hand_example() -> None:
    points = [
        (1.0, 0.50),  # 0: front
        (2.0, 0.60),  # 1: front
        (3.0, 0.55),  # 2: slower and less accurate than 1
        (0.5, 0.40),  # 3: front (fastest)
        (1.5, 0.50),  # 4: slower than 0 at the same accuracy
        (4.0, 0.70),  # 5: front (most accurate)
        (2.0, 0.60),  # 6: equal to 1: neither beats the other
    ]
    assert pareto_front(points) == [3, 0, 1, 6, 5]
    assert pareto_front([(1.0, 0.5)]) == [0]
    assert pareto_front([]) == []


def test_svg_is_well_formed_with_one_circle_per_point() -> None:
    points = [
        Point("1", "teacher <PyTorch>", "PyTorch reference", 17.5, 0.52),
        Point("2", "student ORT FP32", "x86-ort", 0.034, 0.50),
        Point("3", "student ORT INT8", "x86-ort", 0.031, 0.49),
        Point("4", "student OV INT8", "x86-openvino", 0.070, 0.45),
    ]
    svg = pareto_svg(points)
    root = ET.fromstring(svg)  # well-formed XML (the '<' in a label is escaped)
    assert root.tag == f"{SVG}svg"
    circles = root.findall(f".//{SVG}circle")
    assert len(circles) == len(points)
    front = [c for c in circles if "front" in c.get("class", "").split()]
    assert len(front) == len(pareto_front([(p.x, p.y) for p in points])) == 3  # 3, 2, 1; not 4
    assert len(root.findall(f".//{SVG}polyline")) == 1
    texts = [t.text or "" for t in root.iter(f"{SVG}text")]
    assert any("log scale" in text for text in texts)  # 0.031 .. 17.5 ms spans > 20x
    assert {"0.01", "0.1", "1", "10", "100"} <= set(texts)  # decade ticks
    assert {"PyTorch reference", "x86-ort", "x86-openvino"} <= set(texts)  # legend
    xs = {float(c.get("cx")) for c in circles}
    assert len(xs) == len(points) and all(70 <= x <= 760 - 200 for x in xs)  # inside the plot area
    assert not ET.fromstring(pareto_svg([])).findall(f".//{SVG}circle")  # nothing measured: no points


def test_peak_ops_share_hand_value() -> None:
    specs = {"peak_int8_tops": 20, "peak_fp16_tflops": None, "peak_fp32_tflops": 1.28}
    # 1e6 FLOPs per sample x 10,000 samples/s = 1e10 ops/s of 20e12 dense INT8 ops/s = 0.05 %.
    share = peak_ops_share(1e6, 10_000, "int8", specs)
    assert share["value"] == pytest.approx(5e-4) and share["peak_ops_per_s"] == 20e12
    assert peak_ops_share(1e6, 10_000, "fp32", specs)["value"] == pytest.approx(1e10 / 1.28e12)
    unknown = peak_ops_share(1e6, 10_000, "fp16", specs)
    assert unknown["value"] is None and "peak_fp16_tflops" in unknown["why"]
    elsewhere = peak_ops_share(1e6, 10_000, "int8", specs, on_target=False)
    assert elsewhere["value"] is None and "not on the target" in elsewhere["why"]


def test_peak_ops_share_names_its_source() -> None:
    specs = {"peak_int8_tops": 20, "peak_fp16_tflops": None, "peak_fp32_tflops": None}
    measured = {"ops_per_s": 1e11, "source": "measured: ONNX Runtime FP32 MatMul 64³, 1 thread, this host"}
    published = peak_ops_share(1e6, 10_000, "int8", specs, spec_file="targets/t.yaml", fallback=measured)
    assert published["peak_ops_per_s"] == 20e12  # the YAML figure wins over a measured one
    assert published["peak_source"] == "targets/t.yaml specs.peak_int8_tops (published, dense)"
    share = peak_ops_share(1e6, 10_000, "fp32", specs, spec_file="targets/t.yaml", fallback=measured)
    assert share["value"] == pytest.approx(1e10 / 1e11) and share["peak_source"] == measured["source"]
    none = peak_ops_share(1e6, 10_000, "fp16", specs, spec_file="targets/t.yaml", fallback={"why": "no FP16"})
    assert none["value"] is None and none["peak_source"] is None
    assert none["why"] == "the target's peak_fp16_tflops is unknown (null in targets/t.yaml); no FP16"


def test_host_peak_measures_fp32_and_int8_gemm() -> None:
    import onnxruntime as ort

    peak = measure_host_peak(threads=1, size=64)
    for precision, op in (("fp32", "MatMul"), ("int8", "MatMulInteger")):
        entry = peak[precision]
        assert entry["ops_per_s"] > 0 and entry["op"] == op and entry["threads"] == 1
        assert entry["shape"] == {"m": 64, "k": 64, "n": 64} and entry["ops_per_call"] == 2 * 64**3
        assert entry["runtime_version"] == ort.__version__ and entry["median_ms"] >= entry["min_ms"] > 0
        expected = (
            f"measured: ONNX Runtime {ort.__version__} {precision.upper()} {op} 64³, 1 thread, this host"
        )
        assert entry["source"] == expected
    assert peak["fp16"]["ops_per_s"] is None and peak["fp16"]["why"] == FP16_WHY


def test_host_peak_int8_gemm_computes_the_product() -> None:
    import onnxruntime as ort

    model = gemm_model("int8", 8)
    onnx.checker.check_model(model)
    weights = numpy_helper.to_array(model.graph.initializer[0]).astype(np.int32)
    a = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    (y,) = ort.InferenceSession(model.SerializeToString()).run(None, {"A": a})
    np.testing.assert_array_equal(y, (a.astype(np.int32) - 128) @ weights)


def _report_row(precision: str, runtime: str, threads: int, **extra: Any) -> dict[str, Any]:
    """A compress report.json row: 2e6 FLOPs per sample at 1,000 samples/s."""
    latency = {"p50_ms": 1.0, "p90_ms": 1.1, "p99_ms": 1.2, "throughput_per_s": 1000.0, "batch": 1}
    latency |= {"threads": threads, "warmup": 2, "iterations": 20, "clock": "perf_counter"}
    return {
        "name": f"student ({runtime} {precision.upper()})",
        "role": "student",
        "runtime": runtime,
        "precision": precision,
        "latency": latency | {"percentile_method": "numpy linear"},
        "accuracy": {"accuracy": 0.5, "agreement": 1.0, "n": 100},
        "size_bytes": 1000,
        "params": 10,
        "flops": 2e6,
        **extra,
    }


def _report(run: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "run": run,
        "rows": rows,
        "student": {"model": "edgekd:kd-cnn", "method": "skd"},
        "teacher": {"model": "edgekd:clst"},
        "environment": {"processor": "test CPU", "cpu_count": 2, "machine": "x86_64"},
        "not_measured": [],
        "device": None,
    }


def test_comparison_measures_the_host_peak_once_and_labels_every_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []

    def small_peak(threads: int) -> dict[str, Any]:
        calls.append(threads)
        return measure_host_peak(threads, size=64)

    monkeypatch.setattr(hardware_report, "measure_host_peak", small_peak)
    # x86 targets (null peaks) with arch "" so this host counts as their hardware on any machine.
    ort_target = replace(resolve_target("x86-ort"), arch="")
    ov_target = replace(resolve_target("x86-openvino"), arch="")
    jetson = resolve_target("jetson-orin-nano")
    edge_box = {"hostname": "edge-box"}
    entries = [
        {"target": ort_target, "run_dir": "r1", "why": None, "report": _report("r-ort", [
            _report_row("fp32", "torch", 1),  # the PyTorch reference: no artifact
            _report_row("fp32", "onnxruntime", 1, artifact="a.fp32.onnx"),
            _report_row("int8", "onnxruntime", 2, artifact="a.int8.onnx"),
            _report_row("int8", "onnxruntime", 1, artifact="a.int8.onnx", measured_on=edge_box),
        ])},
        {"target": ov_target, "run_dir": "r2", "why": None, "report": _report("r-ov", [
            _report_row("fp16", "openvino", 1, artifact="a.fp16.xml"),
            _report_row("int8", "openvino", 1, artifact="a.int8.xml"),
        ])},
        {"target": jetson, "run_dir": "r3", "why": None, "report": _report("r-jetson", [
            _report_row("int8", "tensorrt", 1, artifact="a.int8.engine", measured_on={"hostname": "orin"}),
        ])},
    ]  # fmt: skip
    comparison = build_comparison("cmp", entries)
    assert sorted(calls) == [1, 2]  # once per thread count, not per row
    assert [peak["fp32"]["threads"] for peak in comparison["host_peak"]] == [1, 2]
    shares = {
        (row["group"], row["precision"], row["latency"]["threads"], row["measured_on"]): row["peak_ops_share"]
        for row in comparison["rows"]
    }
    ort_fp32 = shares[("x86-ort", "fp32", 1, "this host")]
    measured_fp32 = comparison["host_peak"][0]["fp32"]
    assert ort_fp32["value"] == pytest.approx(2e6 * 1000 / measured_fp32["ops_per_s"])
    assert (
        ort_fp32["peak_source"] == measured_fp32["source"]
        and "FP32 MatMul 64³, 1 thread" in measured_fp32["source"]
    )
    assert "INT8 MatMulInteger 64³, 2 threads" in shares[("x86-ort", "int8", 2, "this host")]["peak_source"]
    assert (
        "INT8 MatMulInteger 64³, 1 thread" in shares[("x86-openvino", "int8", 1, "this host")]["peak_source"]
    )
    fp16 = shares[("x86-openvino", "fp16", 1, "this host")]
    assert fp16["value"] is None and FP16_WHY in fp16["why"]
    remote = shares[("x86-ort", "int8", 1, "edge-box")]
    assert remote["value"] is None and "says nothing about edge-box" in remote["why"]
    published = shares[("jetson-orin-nano", "int8", 1, "orin")]
    assert published["value"] == pytest.approx(2e9 / 20e12)
    assert published["peak_source"] == "targets/jetson-orin-nano.yaml specs.peak_int8_tops (published, dense)"

    markdown, html = render_markdown(comparison), render_html(comparison)
    for text in (markdown, html):
        assert measured_fp32["source"] in text and published["peak_source"] in text
        assert "says nothing about edge-box" in text
    table = next(line for line in markdown.splitlines() if "| orin |" in line)
    marker = table.split(" | ")[-2].split()[-1]  # the share cell, e.g. "0.01 % (f)"
    assert f"- {marker} peak 20 T ops/s, {published['peak_source']}" in markdown


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Conv(2->16, k3) -> Relu -> ReduceMean -> Flatten -> Gemm(16->11), named nodes, opset 18."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 2, 3)).astype(np.float32), "conv.w"),
        numpy_helper.from_array(np.zeros(16, np.float32), "conv.b"),
        numpy_helper.from_array(rng.standard_normal((11, 16)).astype(np.float32), "fc.w"),
        numpy_helper.from_array(np.zeros(11, np.float32), "fc.b"),
        numpy_helper.from_array(np.array([2], np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv.w", "conv.b"], ["c"], name="conv1", pads=[1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu1"),
        helper.make_node("ReduceMean", ["r", "axes"], ["m"], name="pool", keepdims=0),
        helper.make_node("Gemm", ["m", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2, 128])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 11])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("layers") / "small.fp32.onnx"
    onnx.save(model, path)
    return path


def test_ort_layer_times_are_real_nodes_with_positive_durations(small_onnx: Path) -> None:
    batch = np.random.default_rng(1).standard_normal((4, 2, 128)).astype(np.float32)
    layers = get_backend("onnxruntime").layer_times(
        Artifact(small_onnx, "onnxruntime", "fp32"), batch, runs=15, warmup=3, threads=1
    )
    graph_nodes = {node.name for node in onnx.load(small_onnx).graph.node}
    assert layers["runs"] == 15 and "onnxruntime" in layers["source"]
    assert layers["top"], layers
    for layer in layers["top"]:
        assert layer["model_node"] in graph_nodes, layer  # e.g. "conv1" (Conv+Relu fused as FusedConv)
        assert layer["median_ms"] > 0 and layer["mean_ms"] > 0 and 0 < layer["share"] <= 1
    assert "conv1" in {layer["model_node"] for layer in layers["top"]}
    medians = [layer["median_ms"] for layer in layers["top"]]
    assert medians == sorted(medians, reverse=True)
    assert sum(layer["share"] for layer in layers["top"]) <= 1 + 1e-9


@pytest.mark.skipif(not HAVE_OPENVINO, reason="openvino/nncf not installed: pip install -e '.[openvino]'")
def test_openvino_layer_times_from_performance_counters(small_onnx: Path, tmp_path: Path) -> None:
    backend = get_backend("openvino")
    artifact = backend.compile(small_onnx, tmp_path, "fp32", None)
    batch = np.zeros((1, 2, 128), np.float32)
    layers = backend.layer_times(artifact, batch, runs=10, warmup=2, threads=1)
    assert "performance counters" in layers["source"] and layers["top"]
    names = {layer["name"] for layer in layers["top"]}
    assert any(name.startswith("conv1") for name in names), names  # the IR keeps the ONNX node names
    assert all(layer["median_ms"] > 0 and layer["exec_type"] for layer in layers["top"])


def test_benchmark_user_errors(tmp_path: Path) -> None:
    assert_user_error(run_cli("benchmark", "--targets", " , "), "--targets is empty")
    assert_user_error(
        run_cli("benchmark", "--targets", "x86-ort,nosuch", "--set", f"runs_dir={tmp_path}"), "nosuch"
    )


TINY = [
    "--set", "data.frames_per_class_snr=4",
    "--set", "teacher.model=edgekd:kd-cnn",
    "--set", "teacher.train.epochs=1",
    "--set", "distill.train.epochs=1",
    "--set", "quantize.calibration_samples=32",
    "--set", "profile.iterations=20",
    "--set", "profile.warmup=2",
]  # fmt: skip


def _chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)


@pytest.mark.slow
def test_benchmark_end_to_end_and_report_renders(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    result = run_cli(
        "benchmark", "--targets", "x86-ort,openvino", "--name", "hw", "--set", f"runs_dir={tmp_path}",
        *TINY, "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [t["name"] for t in report["targets"]] == ["x86-ort", "x86-openvino"]
    by_target: dict[str, list[dict]] = {}
    for row in report["rows"]:
        by_target.setdefault(row["group"], []).append(row)
    assert {row["name"] for row in by_target["PyTorch reference"]} == {
        "teacher (PyTorch FP32)",
        "student (PyTorch FP32)",
    }
    assert [row["precision"] for row in by_target["x86-ort"]] == ["fp32", "int8"]
    if HAVE_OPENVINO:
        assert [row["precision"] for row in by_target["x86-openvino"]] == ["fp32", "fp16", "int8"]
        # The second target reused the first one's teacher, student and ONNX (copied, then cached).
        stages = json.loads((tmp_path / "hw-x86-openvino" / "report.json").read_text())["stages"]
        assert all(stages[name]["cached"] for name in ("teacher", "distill", "export"))
        same = [tmp_path / f"hw-{t}" / "03-export" / "student.onnx" for t in ("x86-ort", "x86-openvino")]
        assert same[0].read_bytes() == same[1].read_bytes()
    else:
        target = report["targets"][1]
        assert target["status"] == "not run" and "pip install" in target["why"]
    artifacts = [row for row in report["rows"] if row["group"] != "PyTorch reference"]
    [host_peak] = report["host_peak"]  # measured once, at the profile's thread count
    assert host_peak["fp32"]["threads"] == report["protocol"]["threads"]
    for row in artifacts:
        assert row["latency"]["p50_ms"] > 0 and row["latency"]["throughput_per_s"] > 0
        assert 0 <= row["accuracy"] <= 1 and row["size_bytes"] > 0
        share = row["peak_ops_share"]  # x86 peaks are null in targets/*.yaml: this host's GEMM ceiling
        if row["precision"] == "fp16":
            assert share["value"] is None and "FP16" in share["why"]
        else:
            assert share["value"] > 0 and share["peak_source"] == host_peak[row["precision"]]["source"]
        assert row["layer_times"]["top"] and row["layer_times"]["top"][0]["median_ms"] > 0
    assert report["pareto_front"] and all(isinstance(number, int) for number in report["pareto_front"])
    markdown = (out / "report.md").read_text()
    assert "## Measurements" in markdown and "Slowest layers" in markdown and "pareto.svg" in markdown
    assert host_peak["int8"]["source"] in markdown
    # The per-target compress report shows the slowest layers too.
    assert "Slowest layers" in (tmp_path / "hw-x86-ort" / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "<script" not in html and 'src="http' not in html and 'href="http' not in html
    svg = ET.fromstring((out / "pareto.svg").read_text())
    assert len(svg.findall(f".//{SVG}circle")) == len(report["rows"])

    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium): report.html not rendered")
    flags = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    flags += ["--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chrome'}"]
    url = (out / "report.html").as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert '<table id="measurements">' in dom.stdout and '<table id="targets">' in dom.stdout
    assert dom.stdout.count("<circle") == len(report["rows"]) and "<svg" in dom.stdout
    png = tmp_path / "report.png"
    shot = subprocess.run(
        [*flags, f"--screenshot={png}", "--window-size=1200,900", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.returncode == 0 and png.is_file() and png.stat().st_size > 0, shot.stderr[-2000:]
    from PIL import Image

    with Image.open(png) as image:
        assert image.size == (1200, 900)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 10  # not a blank page
