"""Radio models: interface, sizes, FLOPs, ONNX parity, registry and checkpoints."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgekd.errors import ModelError
from edgekd.models import MODELS, build_model
from edgekd.models.checkpoint import load_checkpoint, load_weights, save_checkpoint
from edgekd.models.stats import count_flops, count_parameters

NAMES = ["edgekd:clst", "edgekd:kd-cnn", "edgekd:kd-mobilenet", "edgekd:cnn"]
STUDENTS = NAMES[1:]
PARAM_RANGES = {
    "edgekd:clst": (100_000, 300_000),
    "edgekd:kd-cnn": (10_000, 50_000),
    "edgekd:kd-mobilenet": (5_000, 30_000),
    "edgekd:cnn": (5_000, 50_000),
}


def _model(name: str, num_classes: int = 11, seed: int = 0) -> nn.Module:
    """A model with non-trivial BatchNorm statistics (so export has something to fold), in eval mode."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("length", [32, 128, 1024])
def test_shapes_and_head_consistency(name: str, length: int) -> None:
    model = _model(name)
    x = torch.randn(3, 2, length)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        assert logits.shape == (3, 11)
        assert features.shape == (3, model.feature_dim)
        assert isinstance(model.head, nn.Linear) and model.head.in_features == model.feature_dim
        torch.testing.assert_close(logits, model.head(features))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_training_mode_backward(name: str) -> None:
    model = build_model(name, 5).train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 2, 128)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_parameter_counts_and_flops() -> None:
    params = {name: count_parameters(build_model(name, 11)) for name in NAMES}
    flops = {name: count_flops(build_model(name, 11), (2, 128)) for name in NAMES}
    for name, (low, high) in PARAM_RANGES.items():
        assert low <= params[name] <= high, (name, params[name])
        assert flops[name] > 0
    for student in STUDENTS:
        assert params["edgekd:clst"] > params[student]
        assert flops["edgekd:clst"] > flops[student]
    # FLOPs grow with the frame length; the count restores the model's mode.
    model = build_model("edgekd:kd-cnn", 11).train()
    assert count_flops(model, (2, 1024)) > 4 * flops["edgekd:kd-cnn"]
    assert model.training


def test_count_flops_matches_a_hand_count() -> None:
    """A single Linear(8 -> 3): 24 multiply-accumulates, reported as 48 FLOPs."""
    assert count_flops(nn.Linear(8, 3), (8,)) == 2 * 8 * 3


@pytest.mark.parametrize("name", NAMES)
def test_onnx_export_matches_onnxruntime(name: str, tmp_path: Path) -> None:
    model = _model(name)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(2, 2, 128),), path, input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 2, 128)
        (onnx_logits,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        assert onnx_logits.shape == expected.shape
        assert np.abs(onnx_logits - expected).max() < 1e-4


def test_unknown_model_name_suggests_a_close_one() -> None:
    with pytest.raises(ModelError, match=r"did you mean 'edgekd:kd-cnn'.*known: .*edgekd:clst"):
        build_model("edgekd:kd-cn", 11)
    with pytest.raises(ModelError, match=r"takes images \(C, H, W\), but the dataset gives .*\(2, 128\)"):
        build_model("timm:resnet18", 11, input_shape=(2, 128))  # timm models are for images
    with pytest.raises(ModelError, match="num_classes"):
        build_model("edgekd:cnn", 0)
    classifiers = [name for name in MODELS.names() if getattr(MODELS.get(name), "task", None) != "detection"]
    assert classifiers == sorted(NAMES)  # the detection models (edgekd.models.detr) are tested in test_detr


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _model("edgekd:clst", num_classes=7, seed=1)
    path = tmp_path / "run" / "teacher.pt"
    save_checkpoint(path, model, "edgekd:clst", {"epoch": 3, "history": [{"acc": 0.5}]})
    assert [p.name for p in path.parent.iterdir()] == ["teacher.pt"]  # no temporary file left behind

    checkpoint = load_checkpoint(path)
    assert checkpoint["model"] == "edgekd:clst"
    assert (checkpoint["num_classes"], checkpoint["in_channels"]) == (7, 2)
    assert checkpoint["epoch"] == 3 and checkpoint["history"] == [{"acc": 0.5}]

    fresh = build_model("edgekd:clst", 7).eval()
    assert load_weights(fresh, path, "edgekd:clst")["epoch"] == 3
    x = torch.randn(2, 2, 128)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)

    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(path, model, "edgekd:clst", {"state_dict": {}})


def _model_error(call: Callable[[], object]) -> str:
    """The message of the ModelError ``call`` raises, checked to be one line."""
    with pytest.raises(ModelError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    good = tmp_path / "kd.pt"
    save_checkpoint(good, build_model("edgekd:kd-cnn", 11), "edgekd:kd-cnn", {})
    student = build_model("edgekd:kd-cnn", 11)

    missing = tmp_path / "nope.pt"
    message = _model_error(lambda: load_weights(student, missing, "edgekd:kd-cnn"))
    assert str(missing) in message and "not found" in message

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    message = _model_error(lambda: load_weights(student, truncated, "edgekd:kd-cnn"))
    assert str(truncated) in message and "truncated or corrupt" in message

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint" * 10)
    message = _model_error(lambda: load_weights(student, garbage, "edgekd:kd-cnn"))
    assert str(garbage) in message and "corrupt" in message

    message = _model_error(lambda: load_weights(build_model("edgekd:cnn", 11), good, "edgekd:cnn"))
    assert str(good) in message and "holds a 'edgekd:kd-cnn' model, expected 'edgekd:cnn'" in message

    other_arch = tmp_path / "other.pt"  # the right name, but another architecture's tensors
    save_checkpoint(other_arch, build_model("edgekd:cnn", 11), "edgekd:kd-cnn", {})
    message = _model_error(lambda: load_weights(student, other_arch, "edgekd:kd-cnn"))
    assert re.search(rf"{re.escape(str(other_arch))} does not match .*missing \d+ .*unexpected \d+", message)

    message = _model_error(lambda: load_weights(build_model("edgekd:kd-cnn", 5), good, "edgekd:kd-cnn"))
    assert str(good) in message and "'head.weight'" in message
    assert "(11, 64) in the checkpoint but (5, 64) in the model" in message and "11 classes" in message
