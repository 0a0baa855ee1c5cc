"""timm models behind edgekd's interface: forward parity, hint maps, names, pretrained, checkpoints."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from edgekd.distill.methods import build_method
from edgekd.distill.outputs import model_outputs, probe_shape
from edgekd.errors import ModelError
from edgekd.models import build_model, model_factory
from edgekd.models.checkpoint import load_weights, save_checkpoint
from edgekd.recipe import DistillSpec
from tests.test_cli import EDGEKD, assert_user_error, run_cli
from tests.test_openvino import needs_openvino

ARCHITECTURES = ("resnet18", "mobilenetv3_small_100", "efficientnet_b0")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_forward_is_head_of_forward_features(architecture: str) -> None:
    torch.manual_seed(0)
    model = build_model(f"timm:{architecture}", num_classes=10, in_channels=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 10
    assert features.shape == (2, model.feature_dim) and logits.shape == (2, 10)
    torch.testing.assert_close(logits, model.head(features), rtol=0, atol=0)
    assert (model.num_classes, model.in_channels, model.input_rank) == (10, 3, 3)


@pytest.mark.parametrize("architecture", ARCHITECTURES[:2])
def test_hint_layers_are_timms_feature_stages(architecture: str) -> None:
    model = build_model(f"timm:{architecture}", num_classes=10, in_channels=3)
    info = model.backbone.feature_info
    shape = probe_shape(model, (3, 32, 32))
    assert len(model.hint_layers) == len(info) >= 4
    assert shape.map_shapes == tuple((i["num_chs"], 32 // i["reduction"], 32 // i["reduction"]) for i in info)
    assert shape.feature_dim == model.feature_dim


@pytest.mark.parametrize("method", ["fitnets", "at", "mgd"])
def test_feature_map_methods_train_a_timm_student_from_a_timm_teacher(method: str) -> None:
    torch.manual_seed(1)
    teacher = build_model("timm:resnet18", 10, 3).eval().requires_grad_(False)
    student = build_model("timm:mobilenetv3_small_100", 10, 3)
    distill = build_method(
        DistillSpec(method=method), 10, probe_shape(student, (3, 32, 32)), probe_shape(teacher, (3, 32, 32))
    )
    x, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 7, 9])
    outputs = model_outputs(student, x, distill.needs_features, feature_maps=True)
    with torch.no_grad():
        hints = model_outputs(teacher, x, distill.needs_features, feature_maps=True)
    loss = distill.loss(outputs, hints, target, {"epoch": 0, "epochs": 1, "step": 0, "steps": 1})
    assert math.isfinite(loss.item())
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in student.parameters())


def test_unknown_timm_name_suggests_close_ones() -> None:
    with pytest.raises(ModelError, match="did you mean timm:resnet18"):
        model_factory("timm:resnet81")
    result = run_cli("compress", "--data", "digits", "--teacher", "timm:mobilenetv3_smal_100")
    assert_user_error(result, "unknown timm model 'timm:mobilenetv3_smal_100'", "timm:mobilenetv3_small_100")


def test_models_refuse_inputs_of_another_kind() -> None:
    with pytest.raises(ModelError, match=r"teacher 'timm:resnet18' takes images \(C, H, W\).*\(2, 128\)"):
        build_model("timm:resnet18", 11, 2, role="teacher", input_shape=(2, 128))
    with pytest.raises(ModelError, match=r"takes IQ frames \(C, L\).*\(3, 32, 32\)"):
        build_model("edgekd:kd-cnn", 10, 3, role="student", input_shape=(3, 32, 32))
    with pytest.raises(ModelError, match="has no pretrained weights; set student.pretrained: false"):
        build_model("edgekd:kd-cnn", 10, 2, pretrained=True, role="student")


def test_pretrained_without_network_is_one_line(tmp_path: Path) -> None:
    # The real hub code path, kept offline: huggingface_hub refuses to reach the network.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path)}
    args = [
        "compress", "--data", "digits", "--teacher", "timm:resnet18",
        "--student", "timm:mobilenetv3_small_100", "--set", "teacher.pretrained=true",
        "--set", f"runs_dir={tmp_path / 'runs'}",
    ]  # fmt: skip
    result = subprocess.run([*EDGEKD, *args], capture_output=True, text=True, env=env, timeout=300)
    assert_user_error(
        result,
        "could not download pretrained weights for timm:resnet18",
        "set teacher.pretrained: false or pass teacher.checkpoint",
    )


# --------------------------------------------------------------------------- checkpoints


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def test_safetensors_and_plain_state_dicts_load(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = build_model("timm:resnet18", 10, 3)
    ours = tmp_path / "ours.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ours)
    loaded = build_model("timm:resnet18", 10, 3)
    load_weights(loaded, ours, "timm:resnet18")
    _same_outputs(model, loaded)

    plain = timm.create_model("resnet18", num_classes=10)  # timm's own tensor names (fc.weight, ...)
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    save_file(plain.state_dict(), tmp_path / "plain.safetensors")
    for file in ("plain.pth", "plain.safetensors"):
        target = build_model("timm:resnet18", 10, 3)
        load_weights(target, tmp_path / file, "timm:resnet18")
        _same_outputs(plain, target)

    save_checkpoint(tmp_path / "edgekd.pt", model, "timm:resnet18")  # edgekd's own format
    again = build_model("timm:resnet18", 10, 3)
    assert load_weights(again, tmp_path / "edgekd.pt", "timm:resnet18")["model"] == "timm:resnet18"
    _same_outputs(model, again)


def test_mismatched_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    save_file(timm.create_model("resnet34", num_classes=10).state_dict(), tmp_path / "r34.safetensors")
    with pytest.raises(ModelError, match=r"does not match the 'timm:resnet18' architecture: unexpected"):
        load_weights(build_model("timm:resnet18", 10, 3), tmp_path / "r34.safetensors", "timm:resnet18")
    save_file(timm.create_model("resnet18", num_classes=5).state_dict(), tmp_path / "five.safetensors")
    with pytest.raises(ModelError, match=r"checkpoint for 5 classes, model built for 10"):
        load_weights(build_model("timm:resnet18", 10, 3), tmp_path / "five.safetensors", "timm:resnet18")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        load_weights(build_model("timm:resnet18", 10, 3), tmp_path / "bad.safetensors", "timm:resnet18")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "odd.pt")
    with pytest.raises(ModelError, match="neither an edgekd checkpoint"):
        load_weights(build_model("timm:resnet18", 10, 3), tmp_path / "odd.pt", "timm:resnet18")


def test_teacher_checkpoint_of_another_architecture_through_the_cli(tmp_path: Path) -> None:
    save_file(timm.create_model("resnet34", num_classes=10).state_dict(), tmp_path / "r34.safetensors")
    result = run_cli(
        "compress", "--data", "digits", "--teacher", "timm:resnet18",
        "--student", "timm:mobilenetv3_small_100", "--teacher-checkpoint", str(tmp_path / "r34.safetensors"),
        "--set", f"runs_dir={tmp_path / 'runs'}",
    )  # fmt: skip
    assert_user_error(result, "r34.safetensors does not match the 'timm:resnet18' architecture")


# --------------------------------------------------------------------------- end to end

DIGITS_RUN = [
    "compress", "--target", "cpu", "--name", "digits", "--data", "digits",
    "--teacher", "timm:resnet18", "--student", "timm:mobilenetv3_small_100",
    "--set", "teacher.train.epochs=2", "--set", "distill.train.epochs=2",
    "--set", "quantize.calibration_samples=64", "--set", "profile.iterations=10", "--set", "profile.warmup=2",
]  # fmt: skip


@pytest.mark.slow
def test_digits_pipeline_with_timm_models_through_the_cli(tmp_path: Path) -> None:
    result = run_cli(*DIGITS_RUN, "--set", f"runs_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    report = json.loads((tmp_path / "digits" / "report.json").read_text())
    assert [row["name"] for row in report["rows"]] == [
        "teacher (PyTorch FP32)",
        "student (PyTorch FP32)",
        "student (onnxruntime FP32)",
        "student (onnxruntime INT8)",
    ]
    assert report["data"]["input_shape"] == [3, 32, 32] and report["data"]["eval_frames"] == 449
    assert report["export"]["export"]["inputs"][0]["shape"][1:] == [3, 32, 32]
    assert isinstance(report["export"]["export"]["inputs"][0]["shape"][0], str)  # dynamic batch
    for row in report["rows"]:
        acc = row["accuracy"]
        assert acc["n"] == 449 and acc["per_group"] is None and 0 <= acc["accuracy"] <= 1
        assert row["latency"]["p50_ms"] > 0 and row["params"] > 0 and row["flops"] > 0
    teacher, student, fp32, int8 = report["rows"]
    assert teacher["accuracy"]["accuracy"] > 0.3  # 2 epochs from scratch: well above chance (0.1)
    assert teacher["params"] > 5 * student["params"]
    assert fp32["accuracy"]["accuracy"] == pytest.approx(student["accuracy"]["accuracy"], abs=0.01)
    assert fp32["accuracy"]["agreement"] >= 0.99 and 0 <= int8["accuracy"]["agreement"] <= 1
    assert report["quantization"]["quantization"]["calibration"]["samples_used"] == 64
    markdown = (tmp_path / "digits" / "report.md").read_text()
    assert "per SNR" not in markdown and "image-mean-std" not in markdown and "ImageNet" in markdown


@needs_openvino
@pytest.mark.slow
def test_accuracy_controlled_int8_of_a_timm_student_for_openvino(tmp_path: Path) -> None:
    """NNCF accuracy control on a vision model: MobileNetV3 INT8 within a 1-point budget, or says not;
    distilled with timm's standard augmentation, which the report and the bundle record."""
    overrides = ["--target", "x86-openvino", "--set", f"runs_dir={tmp_path}"]
    overrides += ["--set", "distill.augment.enabled=true", "--set", "distill.augment.policy=timm"]
    budget = ["--set", "quantize.max_accuracy_drop=0.01", "--set", "quantize.accuracy_samples=200"]
    result = run_cli(DIGITS_RUN[0], *DIGITS_RUN[3:], *overrides, *budget)  # DIGITS_RUN[1:3]: --target cpu
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    report = json.loads((tmp_path / "digits" / "report.json").read_text())
    int8 = next(a for a in report["artifacts"] if a["precision"] == "int8")
    control = int8["metadata"]["quantization"]["accuracy_control"]
    assert control["budget"]["max_drop"] == 0.01 and control["budget"]["frames"] == 200
    assert 0 <= control["int8_accuracy"] <= 1 and 0 <= control["fp32_accuracy"] <= 1
    assert control["drop_after"] == pytest.approx(control["fp32_accuracy"] - control["int8_accuracy"])
    assert control["met"] == (control["drop_after"] <= 0.01)
    rows = {row["name"]: row for row in report["rows"]}
    assert 0 <= rows["student (openvino INT8)"]["accuracy"]["accuracy"] <= 1
    augmentation = report["student"]["augment"]
    assert augmentation["policy"] == "timm" and augmentation["variants"] == 4
    assert "- Augmentation (`timm`, 4 fixed variants" in (tmp_path / "digits" / "report.md").read_text()
    manifest = json.loads((tmp_path / "digits" / "bundle" / "x86-openvino" / "manifest.json").read_text())
    assert manifest["training"]["augmentation"] == augmentation
