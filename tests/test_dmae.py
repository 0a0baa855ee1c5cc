"""DMAE (Bai et al., CVPR 2023): masked ViT student, teacher run to its distilled block, pixels + features."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekd.data.base import ArrayDataset
from edgekd.distill.methods import METHODS, build_method
from edgekd.distill.methods.base import ModelOutputs
from edgekd.distill.methods.dmae import find_vit, visible_tokens
from edgekd.distill.outputs import probe_shape
from edgekd.distill.trainer import train
from edgekd.errors import RecipeError
from edgekd.models import build_model
from edgekd.recipe import DistillSpec, TrainSpec

SHAPE = (1, 32, 32)  # 8 x 8 = 64 patches of 4 x 4
STUDENT = {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}
TEACHER = {"img_size": 32, "patch_size": 4, "depth": 4, "embed_dim": 48, "num_heads": 3}
VIT = "timm:vit_tiny_patch16_224"


def _vit(kwargs: dict) -> torch.nn.Module:
    return build_model(VIT, 10, 1, kwargs=kwargs, input_shape=SHAPE)


def _method(student, teacher, **options):
    spec = DistillSpec(method="dmae", options={"dmae": options})
    method = build_method(spec, 10, probe_shape(student, SHAPE), probe_shape(teacher, SHAPE))
    method.bind_models(student, teacher)
    return method


def _count_calls(modules) -> list[int]:
    counts = [0] * len(modules)
    for i, module in enumerate(modules):
        module.register_forward_hook(lambda *_args, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.fixture
def models():
    torch.manual_seed(0)
    return _vit(STUDENT), _vit(TEACHER).train().requires_grad_(True)


def test_registered_with_the_authors_defaults() -> None:
    options = METHODS.get("dmae").Options()
    assert options.mask_ratio == 0.75 and options.feature_weight == 1.0 and not options.norm_pix_loss


def test_student_encoder_sees_only_the_visible_patches(models) -> None:
    student, teacher = models
    method = _method(student, teacher, mask_ratio=0.75)
    widths: list[int] = []
    find_vit(student).blocks[0].register_forward_pre_hook(lambda _m, args: widths.append(args[0].shape[1]))
    x = torch.randn(4, *SHAPE)
    method.dmae_loss(x)
    assert widths == [1 + 16]  # class token + (1 - 0.75) * 64 visible patches
    keep = torch.arange(10).expand(4, -1)
    assert visible_tokens(find_vit(student), x, keep).shape == (4, 11, 32)


def test_teacher_runs_only_to_its_distilled_block(models) -> None:
    student, teacher = models
    method = _method(student, teacher, teacher_block=2)
    counts = _count_calls(list(find_vit(teacher).blocks))
    head = _count_calls([find_vit(teacher).norm])
    method.dmae_loss(torch.randn(4, *SHAPE))
    assert counts == [1, 1, 0, 0] and head == [0]
    assert method.teacher_block == 2 and _method(student, teacher).teacher_block == 3  # default: 3/4 of 4


def test_a_cnn_teacher_stops_at_its_hint_layer(models) -> None:
    student, _ = models
    cnn = build_model("timm:resnet10t", 10, 1, input_shape=SHAPE)
    method = _method(student, cnn, teacher_block=2)
    assert method.teacher_layer == cnn.hint_layers[1]
    later = _count_calls([dict(cnn.named_modules())[name] for name in cnn.hint_layers[2:]])
    pixel, feature = method.dmae_loss(torch.randn(4, *SHAPE))
    assert later == [0] * len(later) and torch.isfinite(pixel + feature)


def test_gradients_reach_student_projector_decoder_never_the_teacher(models) -> None:
    student, teacher = models
    method = _method(student, teacher)
    x, y = torch.randn(4, *SHAPE), torch.randint(0, 10, (4,))
    loss = method.loss(ModelOutputs(student(x)), None, y, {"inputs": x, "epoch": 0, "epochs": 1})
    assert torch.isfinite(loss)
    loss.backward()
    blocks = find_vit(student).blocks
    assert blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and blocks[1].mlp.fc2.weight.grad.abs().sum() > 0
    assert method.projector.weight.grad.abs().sum() > 0
    assert method.decoder.predict.weight.grad.abs().sum() > 0 and method.decoder.mask_token.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    assert {id(p) for p in method.student_parameters()} >= {id(p) for p in method.decoder.parameters()}


def test_pretrain_share_trains_on_dmae_alone_then_adds_ce(models) -> None:
    student, teacher = models
    method = _method(student, teacher, pretrain_share=0.5)
    x, y = torch.randn(4, *SHAPE), torch.randint(0, 10, (4,))
    logits = student(x)
    torch.manual_seed(1)
    early = method.loss(ModelOutputs(logits), None, y, {"inputs": x, "epoch": 0, "epochs": 2})
    torch.manual_seed(1)
    late = method.loss(ModelOutputs(logits), None, y, {"inputs": x, "epoch": 1, "epochs": 2})
    ce = torch.nn.functional.cross_entropy(logits, y)
    torch.testing.assert_close(late - early, ce)


def test_a_few_steps_reduce_the_loss(models) -> None:
    student, teacher = models
    method = _method(student, teacher)
    x = torch.randn(8, *SHAPE)
    optimiser = torch.optim.AdamW([*student.parameters(), *method.student_parameters()], lr=3e-3)
    losses = []
    for _ in range(30):
        torch.manual_seed(0)  # the same mask every step: the loss is comparable
        pixel, feature = method.dmae_loss(x)
        loss = pixel + feature
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]  # random pixels: the masked ones cannot be predicted


def test_a_cnn_student_is_refused_in_one_line(models) -> None:
    _, teacher = models
    cnn = build_model("timm:resnet10t", 10, 1, input_shape=SHAPE)
    with pytest.raises(RecipeError, match="needs a timm ViT student") as error:
        METHODS.get("dmae").check_models("dmae", cnn, teacher)
    assert "\n" not in str(error.value)
    with pytest.raises(RecipeError, match=r"distill\.options\.dmae\.student_block = 5.*has 2 blocks"):
        _method(_vit(STUDENT), teacher, student_block=5)


def test_trains_through_the_trainer_and_leaves_the_teacher_unchanged(models, tmp_path: Path) -> None:
    student, teacher = models
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 8)
    x = (rng.standard_normal((24, *SHAPE)) + y[:, None, None, None]).astype(np.float32)
    data = ArrayDataset(x, y, None)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    spec = DistillSpec(method="dmae")
    method = build_method(spec, 3, probe_shape(student, SHAPE), probe_shape(teacher, SHAPE))
    result = train(
        student,
        method,
        data,
        data,
        TrainSpec(epochs=1, batch_size=8),
        seed=0,
        stage_dir=tmp_path,
        fingerprint="dmae",
        teacher=teacher,
        log=lambda _: None,
    )
    assert np.isfinite(result.history[-1]["train_loss"])
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


DIGITS = [
    "data.name=digits",
    "teacher.checkpoint=null",
    "teacher.train.epochs=1",
    "distill.train.epochs=1",
    "distill.method=dmae",
    f"teacher.model={VIT}",
    *(f"teacher.kwargs.{k}={v}" for k, v in TEACHER.items()),
]


def test_preflight_refuses_a_cnn_student_before_any_training(tmp_path: Path) -> None:
    from edgekd.api import compress

    recipe = [f"runs_dir={tmp_path}", "name=r", *DIGITS, "student.model=timm:resnet10t"]
    with pytest.raises(RecipeError, match="needs a timm ViT student"):
        compress(None, recipe, until="distill", log=lambda _: None)
    assert not list(tmp_path.rglob("teacher.pt"))  # refused before the teacher trained


@pytest.mark.slow
def test_compress_until_distill_on_digits(tmp_path: Path) -> None:
    from edgekd.api import compress

    student = [f"student.model={VIT}", *(f"student.kwargs.{k}={v}" for k, v in STUDENT.items())]
    compress(None, [f"runs_dir={tmp_path}", "name=d", *DIGITS, *student], until="distill", log=lambda _: None)
    record = json.loads(next((tmp_path / "d").glob("*-distill/stage.json")).read_text())["outputs"]
    assert record["method"] == "dmae" and record["method_options"]["mask_ratio"] == 0.75
    assert 0.0 <= record["val_accuracy_last"] <= 1.0 and len(record["history"]) == 1
