"""`edgekd deploy`: a model trained elsewhere (ONNX file or PyTorch source + checkpoint), no distillation."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from edgekd.api import deploy
from edgekd.models import build_model
from edgekd.models.checkpoint import save_checkpoint
from tests.assets.user_models import small
from tests.test_cli import assert_user_error, run_cli

FAST = [
    "--set", "profile.iterations=10",
    "--set", "profile.warmup=1",
    "--set", "quantize.calibration_samples=64",
    "--set", "bundle.eval_samples=64",
]  # fmt: skip
FAST_API = [item for item in FAST if item != "--set"]
RADIO = ["data.frames_per_class_snr=3", "data.snr_min=0", "data.snr_max=10", *FAST_API]


def export_mobilenet(path: Path, size: int = 32) -> Path:
    """torchvision's MobileNetV3-Small exported by torch.onnx itself (not by edgekd), dynamic batch."""
    torch.manual_seed(0)
    model = __import__("torchvision").models.mobilenet_v3_small(num_classes=10).eval()
    torch.onnx.export(
        model,
        (torch.randn(1, 3, size, size),),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "n"}, "logits": {0: "n"}},
        opset_version=17,
        dynamo=False,
    )
    return path


@pytest.fixture(scope="module")
def onnx_run(tmp_path_factory: pytest.TempPathFactory):
    """`edgekd deploy mnv3.onnx --target cpu --data digits` from the command line."""
    root = tmp_path_factory.mktemp("deploy")
    model = export_mobilenet(root / "mnv3.onnx")
    runs = root / "runs"
    args = ["deploy", str(model), "--target", "cpu", "--data", "digits", "--set", "data.image_size=32"]
    result = run_cli(*args, "--set", f"runs_dir={runs}", *FAST)
    return runs / "mnv3", result, [*args, "--set", f"runs_dir={runs}", *FAST]


def test_onnx_deploy_report(onnx_run):
    run_dir, result, _ = onnx_run
    assert result.returncode == 0, result.stderr + result.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["mode"] == "deploy" and report["teacher"] is None
    assert report["recipe"]["student"]["model"].startswith("onnx:")
    assert report["student"]["format"] == "onnx" and report["student"]["params"] > 1_000_000
    assert report["export"]["export"]["exporter"] == "user ONNX file" and report["export"]["parity"] is None
    stage_dirs = sorted(p.name for p in run_dir.iterdir() if p.is_dir() and p.name[:2].isdigit())
    assert [name[3:] for name in stage_dirs] == [
        "model", "export", "quantize", "compile", "profile", "bundle", "remote", "report"
    ]  # fmt: skip
    rows = {row["precision"]: row for row in report["rows"]}
    assert set(rows) == {"fp32", "int8"} and all(row["role"] == "student" for row in report["rows"])
    # Agreement is with the FP32 ONNX model run by ONNX Runtime: the FP32 artifact is that model.
    assert rows["fp32"]["accuracy"]["agreement"] == 1.0
    assert 0.5 < rows["int8"]["accuracy"]["agreement"] <= 1.0
    assert rows["int8"]["accuracy"]["n"] == report["data"]["eval_frames"] == 449
    head = report["headline"]
    assert head["int8_agreement_with_fp32"] == rows["int8"]["accuracy"]["agreement"]
    assert not any("teacher" in key for key in head)
    markdown = (run_dir / "report.md").read_text()
    assert "## Model" in markdown and "trained elsewhere" in markdown and "Teacher" not in markdown
    assert "not re-exported" in markdown


def test_onnx_deploy_bundle_verifies_and_rebuilds(onnx_run):
    run_dir, result, _ = onnx_run
    assert result.returncode == 0, result.stderr
    bundle_dir = run_dir / "bundle" / "x86-ort"
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert (
        manifest["model"].startswith("onnx:")
        and manifest["training"]["trained"] == "elsewhere (edgekd deploy)"
    )
    assert manifest["inputs"][0]["name"] == "images"
    verified = run_cli("verify-bundle", str(bundle_dir))
    assert verified.returncode == 0, verified.stderr + verified.stdout
    rebuilt = run_cli("bundle", str(run_dir), "--artifact", "fp32")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert json.loads((bundle_dir / "manifest.json").read_text())["firmware"]["precision"] == "fp32"
    assert run_cli("verify-bundle", str(bundle_dir)).returncode == 0


def test_until_quantize_then_rerun_is_cached(tmp_path: Path):
    model = export_mobilenet(tmp_path / "net.onnx")
    overrides = ["data.image_size=32", f"runs_dir={tmp_path}", *FAST_API]
    lines: list[str] = []
    first = deploy(
        model, target="cpu", data="digits", overrides=overrides, until="quantize", log=lines.append
    )
    assert set(first) == {"model", "export", "quantize"} and "int8_onnx_file" in first["quantize"]
    assert (tmp_path / "net" / "03-quantize" / "stage.json").is_file()
    lines.clear()
    again = deploy(
        model, target="cpu", data="digits", overrides=overrides, until="quantize", log=lines.append
    )
    assert again == first
    stages = [line for line in lines if line.startswith("[")]
    assert len(stages) == 3 and all(" cached (" in line for line in stages), stages
    full = deploy(model, target="cpu", data="digits", overrides=overrides, log=lines.append)
    assert full["mode"] == "deploy" and sum("cached" in line for line in lines) == 6  # 3 + 3 reused


def test_pytorch_source_with_checkpoint(tmp_path: Path):
    from edgekd.data import build_dataset
    from edgekd.recipe import DataSpec

    spec = DataSpec(frames_per_class_snr=3, snr_min=0, snr_max=10)
    _, _, meta = build_dataset(spec, seed=0)
    torch.manual_seed(1)
    model = build_model("edgekd:cnn", len(meta.classes), meta.input_shape[0])
    checkpoint = tmp_path / "cnn.pt"
    save_checkpoint(checkpoint, model, "edgekd:cnn")
    lines: list[str] = []
    report = deploy(
        "edgekd:cnn",
        target="cpu",
        data="radio-synthetic",
        checkpoint=checkpoint,
        overrides=[*RADIO, f"runs_dir={tmp_path}"],
        log=lines.append,
    )
    assert report["run"] == "cnn" and report["mode"] == "deploy" and report["teacher"] is None
    assert report["student"]["origin"] == str(checkpoint) and report["student"]["format"] == "pytorch"
    names = [row["name"] for row in report["rows"]]
    assert names == ["student (PyTorch FP32)", "student (onnxruntime FP32)", "student (onnxruntime INT8)"]
    torch_row, fp32, int8 = report["rows"]
    assert torch_row["accuracy"]["agreement"] is None
    assert fp32["accuracy"]["agreement"] == 1.0 and int8["accuracy"]["agreement"] > 0.5
    assert report["export"]["parity"]["passed"] and not any("warning: deploying" in line for line in lines)
    assert report["agreement_reference"] == "the FP32 PyTorch model"


def test_user_model_file_with_factory_kwargs(tmp_path: Path):
    """A user's own file (GRU, attention, GroupNorm, einsum), factory kwargs from the recipe."""
    report = deploy(
        "py:tests/assets/user_models.py:small",
        target="cpu",
        data="radio-synthetic",
        overrides=[*RADIO, f"runs_dir={tmp_path}", "student.kwargs={width: 8}"],
        log=lambda line: None,
    )
    assert report["run"] == "user_models" and report["recipe"]["student"]["kwargs"] == {"width": 8}
    assert report["student"]["origin"] == "untrained (no checkpoint given)"
    width8 = sum(p.numel() for p in small(11, width=8).parameters())
    assert report["student"]["params"] == width8
    int8 = next(row for row in report["rows"] if row["precision"] == "int8")
    assert int8["accuracy"]["agreement"] is not None and report["export"]["parity"]["passed"]


def test_untrained_pytorch_deploy_warns(tmp_path: Path):
    lines: list[str] = []
    out = deploy(
        "edgekd:cnn",
        target="cpu",
        data="radio-synthetic",
        overrides=[*RADIO, f"runs_dir={tmp_path}"],
        until="model",
        log=lines.append,
    )
    assert out["model"]["origin"] == "untrained (no checkpoint given)"
    assert any(line.strip().startswith("warning: deploying edgekd:cnn") for line in lines)


def test_unlabelled_npz_uses_fp32_predictions(tmp_path: Path):
    """Data without labels: accuracy is agreement with the FP32 model, and the report says so."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "signals.npz", x=rng.standard_normal((160, 2, 32)).astype(np.float32))
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv1d(2, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool1d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, 4),
    ).eval()  # fmt: skip
    torch.onnx.export(
        net, (torch.randn(2, 2, 32),), str(tmp_path / "tiny.onnx"), dynamic_axes={"input": {0: "b"}},
        input_names=["input"], opset_version=17, dynamo=False,
    )  # fmt: skip
    report = deploy(
        tmp_path / "tiny.onnx",
        target="cpu",
        data=f"npz:{tmp_path / 'signals.npz'}",
        overrides=[f"runs_dir={tmp_path / 'runs'}", *FAST_API],
    )
    assert report["data"]["classes"] == ["0", "1", "2", "3"]  # from the model's output width
    assert "FP32 model's own predictions" in report["labels_note"]
    fp32 = next(row for row in report["rows"] if row["precision"] == "fp32")
    assert fp32["accuracy"]["accuracy"] == fp32["accuracy"]["agreement"] == 1.0
    assert "predictions stand in as labels" in (tmp_path / "runs" / "tiny" / "report.md").read_text()
    manifest = json.loads((tmp_path / "runs" / "tiny" / "bundle" / "x86-ort" / "manifest.json").read_text())
    assert "predictions" in manifest["eval_set"]["arrays"]["y"]


def test_fixed_batch_onnx_gets_a_dynamic_batch_axis(tmp_path: Path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv1d(2, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool1d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, 11),
    ).eval()  # fmt: skip
    path = tmp_path / "fixed.onnx"  # batch 1 baked into the graph's input and output
    torch.onnx.export(net, (torch.randn(1, 2, 128),), str(path), opset_version=17, dynamo=False)
    lines: list[str] = []
    out = deploy(
        path, target="cpu", data="radio-synthetic", overrides=[*RADIO, f"runs_dir={tmp_path}"],
        until="export", log=lines.append,
    )  # fmt: skip
    assert out["model"]["onnx"]["dynamic_batch_added"] and out["export"]["export"]["dynamic_batch_added"]
    assert any("made it dynamic" in line for line in lines)
    copy = onnx.load(str(tmp_path / "fixed" / out["export"]["onnx_file"]))
    assert copy.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_onnx_checker_rejection_is_one_line(tmp_path: Path):
    # A node reading a tensor nothing produces: the file parses, onnx.checker rejects it.
    graph = helper.make_graph(
        [helper.make_node("Relu", ["missing"], ["y"])],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 32, 32])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "broken.onnx"
    path.write_bytes(model.SerializeToString())
    result = run_cli(
        "deploy", str(path), "--target", "cpu", "--data", "digits", "--set", f"runs_dir={tmp_path}"
    )
    assert_user_error(result, str(path), "onnx.checker rejects it", "missing")
    assert not (tmp_path / "broken").exists()  # rejected before any stage ran


def test_onnx_input_shape_not_fitting_the_data_is_one_line(tmp_path: Path):
    model = export_mobilenet(tmp_path / "mnv3.onnx", size=32)
    result = run_cli(
        "deploy", str(model), "--target", "cpu", "--data", "digits", "--set", "data.image_size=16",
        "--set", f"runs_dir={tmp_path}",
    )  # fmt: skip
    assert_user_error(result, str(model), "3x32x32", "B x 3x16x16")


def test_missing_model_file_and_bad_until(tmp_path: Path):
    result = run_cli("deploy", str(tmp_path / "nope.onnx"), "--target", "cpu", "--data", "digits")
    assert_user_error(result, "nope.onnx", "not found")
    result = run_cli(
        "deploy", "edgekd:cnn", "--target", "cpu", "--data", "digits", "--until", "distill",
        "--set", f"runs_dir={tmp_path}",
    )  # fmt: skip
    assert_user_error(result, "--until 'distill'", "model, export, quantize")
