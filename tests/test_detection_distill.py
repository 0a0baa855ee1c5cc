"""Detection distillation (edgekd.detection.distill): CLoCKDistill, memory-mse, kd-detr, none.

Tiny 64 px images (a 2x2 stride-32 memory grid) and random weights: shapes, the foreground masks
against hand-built ones, zero distillation when the student is the teacher, where gradients go,
and a few optimisation steps lowering each method's loss.
"""

from __future__ import annotations

import copy

import pytest
import torch

from edgekd.detection.boxes import cxcywh_to_xyxy, generalized_box_iou
from edgekd.detection.distill import (
    DETECTION_METHODS,
    CLoCKDistill,
    build_detection_method,
    detection_method_rows,
    foreground_masks,
    grid_shape,
    paired_giou,
    resample_memory,
    teacher_memory_bytes,
)
from edgekd.errors import ModelError, RecipeError
from edgekd.models import build_model
from edgekd.models.detr import DETR

SIZE = 64
CLASSES = 4
METHODS = ["none", "memory-mse", "kd-detr", "clockdistill"]


def _detr(name: str, seed: int = 0) -> DETR:
    torch.manual_seed(seed)
    return build_model(name, CLASSES, 3, kwargs={"task": "detection"})


def _batch() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    torch.manual_seed(1)
    images = torch.randn(2, 3, SIZE, SIZE)
    targets = [
        {
            "labels": torch.tensor([0, 2]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.25], [0.7, 0.6, 0.4, 0.3]]),
        },
        {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.6, 0.5]])},
    ]
    return images, targets


@pytest.fixture(scope="module")
def pair() -> tuple[DETR, DETR]:
    return _detr("edgekd:detr-mnv3", 0), _detr("edgekd:detr-r18", 1)


def test_registry_declares_detection_task_and_rejects_unknown(pair: tuple[DETR, DETR]) -> None:
    assert DETECTION_METHODS.names() == sorted(METHODS)
    assert {row["task"] for row in detection_method_rows()} == {"detection"}
    assert all(row["paper"] for row in detection_method_rows())
    student, teacher = pair
    with pytest.raises(
        RecipeError, match="unknown detection distillation method 'clockdistil'.*clockdistill"
    ):
        build_detection_method("clockdistil", student, teacher, CLASSES)
    with pytest.raises(RecipeError, match=r"distill\.options\.clockdistill\.alpa: unknown option"):
        build_detection_method("clockdistill", student, teacher, CLASSES, {"alpa": 1.0})
    with pytest.raises(RecipeError, match=r"distill\.options\.kd-detr\.l1_weight"):
        build_detection_method("kd-detr", student, teacher, CLASSES, {"l1_weight": -1})
    with pytest.raises(ModelError, match="needs|distils from a teacher"):
        build_detection_method("clockdistill", student, None, CLASSES)
    assert build_detection_method("none", student, None, CLASSES).trainable_parameters() == []


@pytest.mark.parametrize("name", METHODS)
def test_loss_terms_are_scalars_and_adapter_maps_widths(name: str, pair: tuple[DETR, DETR]) -> None:
    student, teacher = pair
    method = build_detection_method(name, student, teacher, CLASSES)
    images, targets = _batch()
    out = method.loss(images, targets, student, teacher)
    assert set(out) == {"loss", "set", "memory", "logit"}
    assert all(value.shape == () and torch.isfinite(value) for value in out.values())
    assert out["loss"].item() == pytest.approx((out["set"] + out["memory"] + out["logit"]).item(), rel=1e-5)
    if name in ("memory-mse", "clockdistill"):
        assert (method.adapter.in_features, method.adapter.out_features) == (64, 128)
        assert out["memory"].item() > 0
    if name in ("kd-detr", "clockdistill"):
        assert out["logit"].item() > 0
    if name == "none":
        assert out["memory"].item() == out["logit"].item() == 0.0


def test_foreground_masks_equal_hand_built_ones() -> None:
    # 4x4 grid. Box A covers column 1, row 1 only (x 0.25..0.5, y 0.25..0.5); box B covers columns
    # 2-3, rows 0-1 (x 0.55..0.95, y 0.1..0.45): 4 cells. The rest, 11 cells, is background.
    boxes = [torch.tensor([[0.375, 0.375, 0.25, 0.25], [0.75, 0.275, 0.4, 0.35]]), torch.zeros(0, 4)]
    location, scale = foreground_masks(boxes, (4, 4))
    expected_m = torch.zeros(4, 4)
    expected_m[1, 1] = 1
    expected_m[0:2, 2:4] = 1
    expected_s = torch.full((4, 4), 1 / 11)
    expected_s[1, 1] = 1.0
    expected_s[0:2, 2:4] = 0.25
    assert torch.equal(location[0], expected_m.flatten())
    assert torch.allclose(scale[0], expected_s.flatten())
    # an image without objects: all background, each cell 1/16
    assert torch.equal(location[1], torch.zeros(16))
    assert torch.allclose(scale[1], torch.full((16,), 1 / 16))
    # overlap: the smaller box's weight wins; a box thinner than a cell still takes one cell
    location, scale = foreground_masks([torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.1, 0.1, 0.01, 0.01]])], (2, 2))
    assert torch.equal(location[0], torch.ones(4))
    assert torch.allclose(scale[0], torch.tensor([1.0, 0.25, 0.25, 0.25]))


def test_paired_giou_is_the_diagonal_of_the_pairwise_one() -> None:
    torch.manual_seed(2)
    a = cxcywh_to_xyxy(torch.rand(7, 4) * 0.5 + 0.1)
    b = cxcywh_to_xyxy(torch.rand(7, 4) * 0.5 + 0.1)
    assert torch.allclose(paired_giou(a, b), torch.diagonal(generalized_box_iou(a, b)), atol=1e-6)
    assert paired_giou(a.reshape(7, 1, 4), b.reshape(7, 1, 4)).shape == (7, 1)
    assert torch.allclose(paired_giou(a, a), torch.ones(7), atol=1e-5)


def test_grids_align_or_are_resampled() -> None:
    assert grid_shape(16, (128, 128)) == (4, 4)
    assert grid_shape(8, (64, 128)) == (2, 4)
    # a per-channel constant memory on a 2x2 grid resampled to 4x4 is the same constant: zero error
    channel = torch.arange(8, dtype=torch.float32)
    coarse = channel.expand(1, 4, 8).clone()
    fine = resample_memory(coarse, (2, 2), (4, 4))
    assert fine.shape == (1, 16, 8) and torch.allclose(fine, channel.expand(1, 16, 8))
    assert resample_memory(coarse, (2, 2), (2, 2)) is coarse
    # the memory term on mismatched grids (student 2x2, teacher 4x4) is finite and zero when they agree
    student, teacher = _detr("edgekd:detr-mnv3"), _detr("edgekd:detr-mnv3", 3)
    method = build_detection_method("clockdistill", student, teacher, CLASSES)
    method.adapter.identity_()
    boxes = [torch.tensor([[0.3, 0.3, 0.2, 0.2]])]
    s_memory = torch.randn(1, 1, 64).expand(1, 4, 64)
    t_memory = s_memory[:, :1].expand(1, 16, 64)
    assert method.memory_loss(s_memory, t_memory, boxes, (2, 2), (4, 4)).item() == pytest.approx(0, abs=1e-10)
    assert method.memory_loss(s_memory, t_memory + 1, boxes, (2, 2), (4, 4)).item() == pytest.approx(3.0)


@pytest.mark.parametrize("name", ["memory-mse", "kd-detr", "clockdistill"])
def test_distillation_is_zero_when_student_is_teacher(name: str) -> None:
    student = _detr("edgekd:detr-mnv3").eval()  # eval: BatchNorm uses the same statistics in both
    teacher = copy.deepcopy(student)
    method = build_detection_method(name, student, teacher, CLASSES)
    if hasattr(method, "adapter"):
        method.adapter.identity_()
    images, targets = _batch()
    out = method.loss(images, targets, student, teacher)
    assert out["memory"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["logit"].item() == pytest.approx(0.0, abs=1e-4)
    assert out["loss"].item() == pytest.approx(out["set"].item(), abs=1e-4)


def test_cached_teacher_memory_gives_the_same_loss(pair: tuple[DETR, DETR]) -> None:
    student, teacher = pair
    method = build_detection_method("clockdistill", student, teacher, CLASSES)
    images, targets = _batch()
    student.eval()
    live = method.loss(images, targets, student, teacher)
    with torch.no_grad():
        memory, _, _ = teacher.encode(images)
    cached = method.loss(images, targets, student, teacher, teacher_memory=memory)
    student.train()
    tokens = (SIZE // 16) ** 2
    assert memory.shape == (2, tokens, 128) and memory.numel() * 4 == 2 * teacher_memory_bytes(128, SIZE, 16)
    for key in live:
        assert cached[key].item() == pytest.approx(live[key].item(), rel=1e-5)
    assert teacher_memory_bytes("edgekd:detr-r18", 128) == 64 * 128 * 4 == 32768
    assert teacher_memory_bytes("edgekd:detr-mnv3", 128) == 16384


@pytest.mark.parametrize("name", ["memory-mse", "kd-detr", "clockdistill"])
def test_gradients_reach_student_and_adapter_not_teacher(name: str) -> None:
    student, teacher = _detr("edgekd:detr-mnv3"), _detr("edgekd:detr-r18", 1)
    method = build_detection_method(name, student, teacher, CLASSES)
    images, targets = _batch()
    out = method.loss(images, targets, student, teacher)
    (out["loss"]).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.input_proj.weight.grad is not None and student.input_proj.weight.grad.abs().sum() > 0
    assert student.class_head.weight.grad.abs().sum() > 0
    if hasattr(method, "adapter"):
        assert method.adapter.weight.grad is not None and method.adapter.weight.grad.abs().sum() > 0
    # the distillation terms alone reach the student's encoder (memory) or decoder (logits)
    student.zero_grad()
    distill_only = build_detection_method(name, student, teacher, CLASSES)
    context_out = distill_only.loss(images, targets, student, teacher)
    assert context_out["memory"].item() + context_out["logit"].item() > 0


def test_target_queries_pad_by_repeating_objects() -> None:
    student, teacher = _detr("edgekd:detr-mnv3"), _detr("edgekd:detr-r18", 1)
    method = build_detection_method("clockdistill", student, teacher, CLASSES)
    assert isinstance(method, CLoCKDistill)
    _, targets = _batch()
    targets = [*targets, {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    anchors, labels, valid = method.target_queries(targets, torch.device("cpu"))
    assert anchors.shape == (3, 2, 4) and labels.shape == (3, 2)
    assert valid.tolist() == [[1, 1], [1, 0], [0, 0]]
    assert torch.allclose(anchors[1, 1], targets[1]["boxes"][0]) and labels[1].tolist() == [3, 3]
    assert method.student_content.shape == (CLASSES, 64) and method.teacher_content.shape == (CLASSES, 128)
    assert method.student_content.norm(dim=1).allclose(torch.full((CLASSES,), 0.1 * 8.0))


@pytest.mark.parametrize("name", METHODS)
def test_a_few_steps_lower_each_methods_loss(name: str) -> None:
    student, teacher = _detr("edgekd:detr-mnv3"), _detr("edgekd:detr-r18", 1)
    method = build_detection_method(name, student, teacher, CLASSES)
    images, targets = _batch()
    params = [*student.parameters(), *method.trainable_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)

    def measure() -> float:
        student.eval()
        torch.manual_seed(5)  # kd-detr's random points: the same before and after
        with torch.no_grad():
            value = method.loss(images, targets, student, teacher)["loss"].item()
        student.train()
        return value

    before = measure()
    for step in range(12):
        torch.manual_seed(100 + step)
        loss = method.loss(images, targets, student, teacher)["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        optimizer.step()
    after = measure()
    assert after < 0.9 * before, (before, after)
