"""Every registered method, through the real trainer on real models: it trains, the teacher stays frozen."""

import numpy as np
import pytest
import torch

from edgekd.data.base import ArrayDataset
from edgekd.distill.methods import METHODS, build_method
from edgekd.distill.outputs import probe_shape
from edgekd.distill.trainer import train
from edgekd.models import build_model
from edgekd.recipe import DistillSpec, TrainSpec

FRAME = (2, 64)


@pytest.fixture(scope="module")
def tiny_data() -> ArrayDataset:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    x = rng.standard_normal((60, *FRAME)).astype(np.float32) + y[:, None, None].astype(np.float32)
    return ArrayDataset(x, y, None)


@pytest.mark.parametrize("name", [name for name in METHODS.names() if name != "dmae"])  # dmae: ViT, test_dmae
def test_method_trains_the_student_and_never_the_teacher(name, tiny_data, tmp_path) -> None:
    torch.manual_seed(0)
    # A teacher that is *not* frozen and left in train mode: if the trainer or a method let a
    # gradient, an optimiser step or a BatchNorm update reach it, the checks below fail.
    teacher = build_model("edgekd:clst", num_classes=3).train().requires_grad_(True)
    student = build_model("edgekd:kd-cnn", num_classes=3)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    method = build_method(
        DistillSpec(method=name), 3, probe_shape(student, FRAME), probe_shape(teacher, FRAME)
    )
    result = train(
        student,
        method,
        tiny_data,
        tiny_data,
        TrainSpec(epochs=1, batch_size=16),
        seed=0,
        stage_dir=tmp_path,
        fingerprint=name,
        teacher=teacher if method.needs_teacher else None,
        log=lambda _: None,
    )
    assert np.isfinite(result.history[-1]["train_loss"])
    assert 0.0 <= result.deployed_accuracy <= 1.0
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), f"{name} changed the teacher's {key}"
    assert all(p.grad is None for p in teacher.parameters()), f"{name} sent a gradient to the teacher"
    assert all(p.requires_grad for p in teacher.parameters())  # the trainer does not rely on freezing it
    changed = [
        k
        for k, v in student.state_dict().items()
        if k in student_before and not torch.equal(v, student_before[k])
    ]
    assert changed, f"{name} did not update the student"
    with torch.no_grad():
        logits = student.eval()(torch.from_numpy(tiny_data.x[:4]))
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()


def test_every_method_cites_its_paper() -> None:
    for name in set(METHODS.names()) - {"none"}:  # `none` is plain supervised training
        doc = METHODS.get(name).__doc__ or ""
        module_doc = __import__(METHODS.get(name).__module__, fromlist=["_"]).__doc__ or ""
        assert any(char.isdigit() for char in doc + module_doc), f"{name}: no year/venue cited"
