"""Detection end to end through the CLI (issue 12): `edgekd compress --data scenes` on ONNX Runtime and
OpenVINO with tiny settings, `edgekd verify-bundle` on each bundle, and a rerun that reuses every stage.

The models are trained for one epoch, so their mAP is near 0; what is asserted is that every stage runs
on a detector and writes real numbers: a finite mAP on every row, the naive full-INT8 model measured
beside the DETR rule set, the manifest's post-processing record and the report's detection sections.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from edgekd.profile.device_runner import profile_bundle
from edgekd.profile.remote import profile_remote
from edgekd.stages.remote import score_device_detections
from tests.test_cli import assert_user_error, run_cli
from tests.test_openvino import needs_openvino
from tests.test_remote import PROTOCOL, sshd  # noqa: F401 - the loopback OpenSSH server fixture

TINY = [
    "--data", "scenes", "--set", "data.scenes=64", "--set", "data.image_size=64", "--epochs", "1",
    "--set", "profile.iterations=5", "--set", "profile.warmup=2", "--set", "quantize.calibration_samples=16",
    "--set", "bundle.eval_samples=8",
]  # fmt: skip


def _compress(runs: Path, target: str) -> dict:
    result = run_cli("compress", *TINY, "--target", target, "--set", f"runs_dir={runs}")
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert "accuracy" not in result.stdout.split("edgekd · scenes")[-1].lower()  # the table says mAP
    return json.loads((runs / "scenes" / "report.json").read_text())


def _check_rows(report: dict, backend: str, precisions: tuple[str, ...]) -> None:
    names = [row["name"] for row in report["rows"]]
    assert names == [
        "teacher (PyTorch FP32)",
        "student (PyTorch FP32)",
        *(f"student ({backend} {precision})" for precision in precisions),
    ]
    for row in report["rows"]:
        scores = row["accuracy"]
        assert math.isfinite(scores["map"]) and 0 <= scores["map"] <= 1, row["name"]
        assert math.isfinite(scores["map50"]) and scores["map50"] >= scores["map"], row["name"]
        assert scores["accuracy"] == scores["map"] and scores["n"] == 16, row["name"]
        assert row["latency"]["p50_ms"] > 0
    int8 = report["rows"][-1]
    naive = int8["naive_int8"]
    assert naive["rules"] == "naive" and math.isfinite(naive["map"]) and naive["p50_ms"] > 0
    (item,) = report["detection"]["int8"]
    assert item["row"] == int8["name"] and item["naive_map"] == naive["map"]
    assert report["task"] == "detection" and "map_gap_vs_teacher" in report["headline"]
    assert report["deployment"]["metric"] == "mAP"


def _check_bundle(runs: Path, report: dict) -> None:
    bundle = runs / "scenes" / report["bundle"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    post = manifest["postprocessing"]
    assert post["task"] == "detection" and post["box_format"] == "cxcywh" and post["top_k"] == 100
    assert post["activation"] == "sigmoid" and post["score_threshold"] == 0.0
    assert manifest["eval_set"]["frames"] == 8 and "gt_boxes" in manifest["eval_set"]["arrays"]
    verified = run_cli("verify-bundle", str(bundle))
    assert verified.returncode == 0, verified.stderr + verified.stdout
    # The device runner (here, on this machine) scores its own detections; a device without
    # faster-coco-eval sends them unscored and the host scores them: the same numbers.
    device = profile_bundle(bundle, warmup=1, iterations=2, batch=1, threads=1, hint="latency")
    assert len(device["rows"]) == len(manifest["artifacts"]) and device["eval_frames"] == 8
    unscored = {**device, "rows": [{**row, "accuracy": None} for row in device["rows"]]}
    for own, host in zip(device["rows"], score_device_detections(unscored, bundle)["rows"], strict=True):
        assert sum(own["detections"]["counts"]) == 8 * 100  # top 100 per image, no threshold
        assert host["accuracy"]["map"] == own["accuracy"]["map"] and math.isfinite(own["accuracy"]["map"])
        assert host["accuracy"]["map50"] == own["accuracy"]["map50"]
        assert host["accuracy"]["scored_on"].startswith("host")


def _check_markdown(runs: Path) -> None:
    markdown = (runs / "scenes" / "report.md").read_text()
    for section in ("## Summary", "## Deployment", "## Detection", "naive mAP", "mAP@.5", "Agreement mAP"):
        assert section in markdown, section
    summary = markdown.split("## Summary")[1].split("## Deployment")[0]
    assert "| mAP | agreement mAP |" in summary and "accuracy" not in summary
    assert "| mAP | drop vs FP32 |" in markdown and "mAP >= " in markdown
    assert "top-1" not in markdown


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One runs folder for the module: later targets reuse the teacher, the student and the export."""
    return tmp_path_factory.mktemp("detection") / "runs"


@needs_openvino
@pytest.mark.slow
def test_detection_compress_on_ort_and_openvino_then_verify_and_resume(runs: Path) -> None:
    ort = _compress(runs, "x86-ort")
    _check_rows(ort, "onnxruntime", ("FP32", "INT8"))
    assert ort["quantization"]["naive_int8_onnx_file"].endswith("student.int8-naive.onnx")
    _check_bundle(runs, ort)
    _check_markdown(runs)

    again = run_cli("compress", *TINY, "--target", "x86-ort", "--set", f"runs_dir={runs}")
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("teacher", "distill", "export", "quantize", "compile", "profile", "bundle"):
        assert f"[{stage}] cached" in again.stdout, (stage, again.stdout[-2000:])

    ov = _compress(runs, "x86-openvino")
    _check_rows(ov, "openvino", ("FP32", "FP16", "INT8"))
    int8 = next(a for a in ov["artifacts"] if a["precision"] == "int8")
    record = int8["metadata"]["quantization"]  # the QDQ model with the DETR rules, read by OpenVINO: not NNCF
    assert record["rules"] == "detr" and record["float_groups"]["heads"] > 0
    assert "reads the QDQ ONNX" in record["converted_by"] and "NNCF" in record["why_not_nncf"]
    assert record["naive"]["source"] == ov["quantization"]["naive_int8_onnx_file"]
    assert (runs / "scenes" / record["naive"]["file"]).is_file() and record["kept_in_float"]
    _check_bundle(runs, ov)

    pinned = run_cli("bundle", str(runs / "scenes"), "--artifact", "int8")  # re-pin: the report follows
    assert pinned.returncode == 0, pinned.stderr[-3000:]
    report = json.loads((runs / "scenes" / "report.json").read_text())
    assert report["deployment"]["precision"] == "int8" and report["deployment"]["metric"] == "mAP"
    assert "int8_map_drop" in report["headline"] and "int8_accuracy_drop" not in report["headline"]


def test_deploy_of_a_detector_is_refused_with_what_to_run() -> None:
    result = run_cli("deploy", "detr.onnx", "--target", "x86-ort", "--data", "scenes")
    assert_user_error(result, "--data scenes is a detection dataset", "edgekd compress --data scenes")


@pytest.mark.slow
def test_detection_jetson_bundle_is_written_without_tensorrt(runs: Path) -> None:
    """No TensorRT here: the bundle holds the float ONNX, the symmetric QDQ ONNX (the DETR rules, zero
    points 0) and build_engine.sh, with the post-processing record, as for a classifier."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    result = run_cli("compress", *TINY, "--target", "jetson-orin-nano", "--set", f"runs_dir={runs}")
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    report = json.loads((runs / "scenes" / "report.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["teacher (PyTorch FP32)", "student (PyTorch FP32)"]
    assert {item["precision"] for item in report["not_measured"]} == {"fp32", "fp16", "int8"}
    bundle = runs / "scenes" / report["bundle"]
    names = {path.name for path in bundle.iterdir()}
    assert {"build_engine.sh", "student.onnx", "student.int8.onnx", "eval.npz", "manifest.json"} <= names
    assert not any("naive" in name for name in names)  # the comparison model is measured, never shipped
    script = (bundle / "build_engine.sh").read_text()
    assert "--onnx=student.int8.onnx" in script and "--int8 --fp16" in script
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["postprocessing"]["task"] == "detection"
    qdq = onnx.load(str(bundle / "student.int8.onnx"))
    initializers = {init.name: numpy_helper.to_array(init) for init in qdq.graph.initializer}
    zero_points = [
        initializers[node.input[2]]
        for node in qdq.graph.node
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in initializers
    ]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)  # symmetric
    verified = run_cli("verify-bundle", str(bundle))
    assert verified.returncode == 0, verified.stderr + verified.stdout


def test_detection_on_a_microcontroller_target_is_refused_before_training(tmp_path: Path) -> None:
    runs = f"runs_dir={tmp_path}"
    result = run_cli("compress", "--data", "scenes", "--target", "cortex-m55", "--set", runs)
    assert_user_error(result, "target cortex-m55 (litert) cannot run a DETR detector", "--target x86-ort")
    assert not (tmp_path / "scenes").exists()


@pytest.mark.slow
def test_detection_bundle_profiled_over_real_ssh(runs: Path, sshd) -> None:  # noqa: F811
    """The x86-ort bundle of the first test through a loopback OpenSSH server (tests/test_remote.py): the
    device ships the runner's detection files, post-processes as the manifest says, and returns mAP and
    its detections; the host scores those the same."""
    bundle = runs / "scenes" / "bundle" / "x86-ort"
    if not (bundle / "manifest.json").is_file():
        pytest.skip("needs the x86-ort bundle of test_detection_compress_on_ort_and_openvino_...")
    address, options, _ = sshd
    result = profile_remote(bundle, address, options, PROTOCOL)
    assert [row["file"] for row in result["rows"]] == ["student.fp32.onnx", "student.int8.onnx"]
    unscored = {**result, "rows": [{**row, "accuracy": None} for row in result["rows"]]}
    for own, host in zip(result["rows"], score_device_detections(unscored, bundle)["rows"], strict=True):
        assert math.isfinite(own["accuracy"]["map"]) and own["accuracy"]["n"] == 8
        assert host["accuracy"]["map"] == own["accuracy"]["map"]
        assert len(own["detections"]["counts"]) == 8 and own["latency"]["p50_ms"] > 0
