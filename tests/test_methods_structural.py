"""Methods that change the training structure: ``tgeo`` (meta-learned ratio), ``dho`` (dual head),
``lelp`` (subclass head), ``mixup-kd`` (mixed inputs) and ``kd3`` (sample selection)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgekd.atomic import write_torch
from edgekd.data.base import ArrayDataset
from edgekd.distill.methods import DistillMethod, MixedBatch, ModelOutputs, ModelShape, build_method, soft_kl
from edgekd.distill.methods.mixup_kd import std_scaled
from edgekd.distill.outputs import probe_shape
from edgekd.distill.trainer import train
from edgekd.errors import ModelError, RecipeError
from edgekd.models import build_model
from edgekd.models.checkpoint import load_weights, save_checkpoint
from edgekd.models.heads import DualHead, SubclassHead
from edgekd.recipe import DistillSpec, TrainSpec

STATE = {"epoch": 0, "epochs": 1, "step": 0, "steps": 10}
FRAME = (2, 128)


def _method(
    name: str,
    classes: int = 3,
    student_dim: int = 4,
    teacher_dim: int = 6,
    options: dict | None = None,
    **spec,
) -> DistillMethod:
    return build_method(
        DistillSpec(method=name, options={name: options or {}}, **spec),
        classes,
        ModelShape(student_dim),
        ModelShape(teacher_dim),
    )


def _softmax(logits: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in logits]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


class Tiny(nn.Module):
    """The model interface methods rely on (forward_features, head, feature_dim), with BatchNorm."""

    def __init__(self, inputs: int = 5, dim: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(inputs, dim), nn.BatchNorm1d(dim), nn.ReLU())
        self.head = nn.Linear(dim, classes)
        self.feature_dim = dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def test_bad_options_are_recipe_errors() -> None:
    with pytest.raises(RecipeError, match="inference_alpha"):
        _method("dho", options={"inference_alpha": 2.0})
    with pytest.raises(RecipeError, match="unknown option"):
        _method("mixup-kd", options={"temperature": 4.0})
    with pytest.raises(RecipeError, match="subclasses"):
        _method("lelp", teacher_dim=2, options={"subclasses": 3})


# ---------------------------------------------------------------- tgeo


def _tgeo(**options) -> DistillMethod:
    method = _method("tgeo", options=options, temperature=2.0, alpha=0.5)
    teacher = ModelOutputs(torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0], [5.0, 0.0, 0.0]]))
    method.prepare(Tiny(), torch.tensor([0, 1, 0, -1]), teacher)
    return method


def test_tgeo_class_means_are_hand_averages_of_teacher_probabilities() -> None:
    method = _tgeo()
    p0, p2 = _softmax([2.0, 0.0, 1.0], 2.0), _softmax([1.0, 1.0, 1.0], 2.0)
    expected = [
        [(a + b) / 2 for a, b in zip(p0, p2, strict=True)],
        _softmax([0.0, 3.0, 0.0], 2.0),
        [1 / 3] * 3,  # no labelled sample of class 2 (the -1 row is ignored)
    ]
    torch.testing.assert_close(method.class_means, torch.tensor(expected))
    assert method.held_out_fraction == 0.1 and method.needs_teacher_dataset


def test_tgeo_ratios_lie_in_the_open_unit_interval() -> None:
    method = _tgeo()
    student, teacher = torch.randn(16, 3) * 30, torch.randn(16, 3) * 30
    alpha = method.ratios(student, teacher, torch.randint(0, 3, (16,)))
    assert alpha.shape == (16,) and bool(((alpha > 0) & (alpha < 1)).all())
    features = method.relation_features(student, teacher, torch.zeros(16, dtype=torch.long))
    assert features.shape == (16, 5 * 3 + 5) and not features.requires_grad


def test_tgeo_extreme_ratios_give_hinton_soft_term_and_cross_entropy() -> None:
    method = _tgeo()
    student, teacher, target = torch.randn(8, 3), torch.randn(8, 3), torch.randint(0, 3, (8,))
    with torch.no_grad():
        method.fusion[2].weight.zero_()
        method.fusion[2].bias.fill_(100.0)
    loss = method.loss(ModelOutputs(student), ModelOutputs(teacher), target, STATE)
    torch.testing.assert_close(loss, soft_kl(student, teacher, 2.0))
    with torch.no_grad():
        method.fusion[2].bias.fill_(-100.0)
    loss = method.loss(ModelOutputs(student), ModelOutputs(teacher), target, STATE)
    torch.testing.assert_close(loss, F.cross_entropy(student, target))


def test_tgeo_training_loss_trains_the_student_only() -> None:
    method = _tgeo()
    assert not {id(p) for p in method.student_parameters()} & {id(p) for p in method.fusion.parameters()}
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(4, 3, requires_grad=True)
    method.loss(ModelOutputs(student), ModelOutputs(teacher), torch.tensor([0, 1, 2, 0]), STATE).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    assert all(p.grad is None for p in method.fusion.parameters())


def test_tgeo_meta_step_updates_the_fusion_net_and_leaves_the_student_untouched() -> None:
    torch.manual_seed(0)
    method, model = _tgeo(meta_interval=2), Tiny()
    model.train()
    x, y, x_val, y_val = (
        torch.randn(8, 5),
        torch.randint(0, 3, (8,)),
        torch.randn(8, 5),
        torch.randint(0, 3, (8,)),
    )
    teacher = ModelOutputs(torch.randn(8, 3))
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    fusion_before = [p.clone() for p in method.fusion.parameters()]

    method.meta_step(model, (x, y, teacher), (x_val, y_val), {**STATE, "step": 1})  # not a meta step
    assert all(torch.equal(a, b) for a, b in zip(fusion_before, method.fusion.parameters(), strict=True))

    method.meta_step(model, (x, y, teacher), (x_val, y_val), {**STATE, "step": 2})
    assert any(not torch.equal(a, b) for a, b in zip(fusion_before, method.fusion.parameters(), strict=True))
    for key, value in model.state_dict().items():  # weights and BatchNorm running statistics
        assert torch.equal(value, model_before[key]), key
    assert all(p.grad is None for p in model.parameters())


def _meta_batches(seed: int) -> tuple[tuple, tuple]:
    generator = torch.Generator().manual_seed(seed)
    x, x_val = torch.randn(16, 5, generator=generator), torch.randn(16, 5, generator=generator)
    y, y_val = (
        torch.randint(0, 3, (16,), generator=generator),
        torch.randint(0, 3, (16,), generator=generator),
    )
    return (x, y, ModelOutputs(torch.randn(16, 3, generator=generator))), (x_val, y_val)


def test_tgeo_finite_difference_hypergradient_matches_the_exact_one() -> None:
    """DARTS' central difference agrees with backpropagation through the unroll on a smooth student."""
    from edgekd.distill.methods.trilateral import _Unroll

    torch.manual_seed(0)
    method, model = _tgeo(inner_lr=0.1), Tiny()
    model.body[2] = nn.Tanh()  # smooth, so the exact hypergradient is well defined
    (x, y, teacher), (x_val, y_val) = _meta_batches(1)
    batch = _Unroll(model, x, y, teacher.logits, x_val, y_val)
    exact = torch.cat([g.flatten() for g in method._exact_hypergradient(batch)])
    approx = torch.cat([g.flatten() for g in method._difference_hypergradient(batch)])
    assert exact.norm() > 0
    assert torch.nn.functional.cosine_similarity(exact, approx, dim=0) > 0.999
    assert (approx - exact).norm() < 0.02 * exact.norm()


def test_tgeo_falls_back_to_finite_differences_for_ops_without_second_derivatives() -> None:
    """MobileNetV3's hardsigmoid has no double backward in PyTorch: the meta step still learns."""
    torch.manual_seed(0)
    method, model = _tgeo(meta_interval=1), Tiny()
    model.body[2] = nn.Hardsigmoid()
    train_batch, held_out = _meta_batches(2)
    fusion_before = [p.clone() for p in method.fusion.parameters()]
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    method.meta_step(model, train_batch, held_out, {**STATE, "step": 1})
    assert method.hypergradient == "finite differences"
    assert any(not torch.equal(a, b) for a, b in zip(fusion_before, method.fusion.parameters(), strict=True))
    for key, value in model.state_dict().items():
        assert torch.equal(value, model_before[key]), key
    smooth = _tgeo(meta_interval=1)
    smooth.meta_step(Tiny(), train_batch, held_out, {**STATE, "step": 1})
    assert smooth.hypergradient == "exact"


def test_tgeo_checkpoint_carries_the_fusion_nets_adam_state(tmp_path) -> None:
    """A resumed run continues the outer Adam's moments instead of restarting them."""
    torch.manual_seed(0)
    method, model = _tgeo(meta_interval=1), Tiny()
    batch = (torch.randn(8, 5), torch.randint(0, 3, (8,)), ModelOutputs(torch.randn(8, 3)))
    method.meta_step(model, batch, (torch.randn(8, 5), torch.randint(0, 3, (8,))), {**STATE, "step": 1})
    write_torch(tmp_path / "latest.pt", {"method": method.state_dict()})
    resumed = _tgeo(meta_interval=1)
    resumed.load_state_dict(torch.load(tmp_path / "latest.pt", weights_only=True)["method"])
    saved, loaded = method.meta_optimizer.state_dict(), resumed.meta_optimizer.state_dict()
    assert saved["state"] and saved["state"].keys() == loaded["state"].keys()
    for index, moments in saved["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, loaded["state"][index][name]), (index, name)


# ---------------------------------------------------------------- dho


def test_dual_head_forward_equals_hand_mixture() -> None:
    head = DualHead(2, 3, alpha=0.3, beta=2.0)
    with torch.no_grad():
        head.ce.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        head.ce.bias.zero_()
        head.kd.weight.copy_(torch.tensor([[0.0, 2.0], [2.0, 0.0], [0.0, 0.0]]))
        head.kd.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    f = [0.5, -1.0]
    ce_scores = [0.5, -1.0, -0.5]
    kd_scores = [-2.0, 1.0, 1.0]
    mixed = [0.7 * a + 0.3 * b for a, b in zip(_softmax(ce_scores), _softmax(kd_scores, 2.0), strict=True)]
    out = head(torch.tensor([f]))
    torch.testing.assert_close(out, torch.tensor([[math.log(v) for v in mixed]]))


def test_dual_head_with_alpha_zero_predicts_with_the_ce_head() -> None:
    head = DualHead(4, 5, alpha=0.0)
    f = torch.randn(32, 4)
    assert torch.equal(head(f).argmax(1), head.ce(f).argmax(1))


def test_dho_prepare_installs_dual_head_copied_from_the_old_head() -> None:
    model = Tiny()
    old = model.head
    method = _method("dho", options={"inference_alpha": 0.25, "inference_beta": 2.0})
    method.prepare(model, torch.tensor([0, 1]), None)
    head = model.head
    assert isinstance(head, DualHead) and (head.alpha, head.beta) == (0.25, 2.0)
    for linear in (head.ce, head.kd):
        assert torch.equal(linear.weight, old.weight) and torch.equal(linear.bias, old.bias)
    assert not list(method.parameters())  # the head belongs to the student, not to the method


def test_dho_unlabelled_rows_contribute_only_the_kd_term() -> None:
    torch.manual_seed(0)
    model, method = Tiny(), _method("dho")
    method.prepare(model, torch.tensor([0, 1]), None)
    head = model.head
    features = torch.randn(4, 4, requires_grad=True)
    teacher = torch.randn(4, 3, requires_grad=True)
    target = torch.tensor([0, -1, 2, -1])
    loss = method.loss(ModelOutputs(head(features), features), ModelOutputs(teacher), target, STATE)
    labelled = target >= 0
    # erjui/DHO: 0.5 * CE + 0.5 * (KD over the labelled batch + KD over the unlabelled batch).
    expected = 0.5 * F.cross_entropy(head.ce(features[labelled]), target[labelled])
    kd_labelled = soft_kl(head.kd(features[labelled]), teacher[labelled], 2.0)
    kd_unlabelled = soft_kl(head.kd(features[~labelled]), teacher[~labelled], 2.0)
    expected = expected + 0.5 * (kd_labelled + kd_unlabelled)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert features.grad is not None and teacher.grad is None
    assert head.ce.weight.grad is not None and head.kd.weight.grad is not None

    head.zero_grad(set_to_none=True)
    unlabelled = torch.full((4,), -1)
    loss = method.loss(ModelOutputs(head(features), features), ModelOutputs(teacher), unlabelled, STATE)
    torch.testing.assert_close(loss, 0.5 * 2 * soft_kl(head.kd(features), teacher, 2.0))
    loss.backward()
    assert head.ce.weight.grad is None or not head.ce.weight.grad.any()


def test_dho_equals_hand_value_with_kd_at_the_official_weight() -> None:
    # One labelled row, identity heads on f = s: CE = -ln softmax(s)[1], KD = T^2 KL at T = 2.
    model, method = Tiny(inputs=5, dim=3, classes=3), _method("dho")
    method.prepare(model, torch.tensor([0, 1]), None)
    with torch.no_grad():
        for linear in (model.head.ce, model.head.kd):
            linear.weight.copy_(torch.eye(3))
            linear.bias.zero_()
    s, t = [1.0, 2.0, 0.0], [2.0, 0.0, 1.0]
    loss = method.loss(
        ModelOutputs(torch.zeros(1, 3), torch.tensor([s])), ModelOutputs(torch.tensor([t])),
        torch.tensor([1]), STATE,
    )  # fmt: skip
    # By hand: CE = .4076; KL(p_t || p_s) at T = 2 = .2205, x T^2 = .8820; only labelled rows, so the
    # labelled mean stands for both batches: 0.5 * .4076 + 0.5 * 2 * .8820 = 1.0858.
    ce = -math.log(_softmax(s)[1])
    kd = 4 * _kl(_softmax(t, 2.0), _softmax(s, 2.0))
    assert loss.item() == pytest.approx(0.5 * ce + 0.5 * 2 * kd, rel=1e-6)
    assert loss.item() == pytest.approx(1.0858, abs=1e-4)


def test_dho_search_mix_follows_the_official_grid() -> None:
    from edgekd.distill.methods.dho import search_mix

    labels = torch.tensor([0, 1, 2, 0])
    # The CE head is right on rows 0-1 only, the KD head on rows 2-3 only, each with a margin that
    # decides which head wins a row: the best mix is the one that gets three rows right.
    ce = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    kd = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]])
    alpha, beta, accuracy = search_mix(ce, kd, labels)
    assert accuracy == 1.0  # each head's confident rows win: every row right
    mixed = (1 - alpha) * F.softmax(ce, 1) + alpha * F.softmax(kd / beta, 1)
    assert torch.equal(mixed.argmax(1), labels)
    # By hand at b = 0.5 (visited first): rows 0-1 need w * 1.6607 > 0.6805, i.e. w > 0.4098; rows
    # 2-3 need (1 - w) * 0.99986 > w * 0.3642, i.e. w < 0.7330. The first w on the grid is 0.45,
    # so a = 1 - w = 0.55 (the KD head's weight).
    assert beta == 0.5 and alpha == pytest.approx(0.55)
    only_kd = search_mix(ce[2:], kd[2:], labels[2:])
    assert only_kd == (1.0, 0.5, 1.0)  # the very first grid point, w = 0 (KD head alone), is already 100 %
    hopeless = search_mix(ce[:1], kd[:1], torch.tensor([2]))
    assert hopeless == (1.0, 1.0, 0.0)  # nothing beats 0: the official start (w = 0, b = 1) stays


def test_dho_searches_the_mix_on_the_held_out_slice_through_the_trainer(frames, tmp_path) -> None:
    torch.manual_seed(0)
    teacher = build_model("edgekd:clst", 3).eval().requires_grad_(False)
    student = build_model("edgekd:kd-cnn", 3)
    method = build_method(
        DistillSpec(method="dho"), 3, probe_shape(student, FRAME), probe_shape(teacher, FRAME)
    )
    assert method.held_out_fraction == 0.1
    train(
        student, method, frames, frames, TrainSpec(epochs=2, batch_size=16), seed=0, stage_dir=tmp_path,
        fingerprint="dho", teacher=teacher, log=lambda _: None,
    )  # fmt: skip
    record = method.record()["inference_mix"]
    assert record["source"].startswith("grid search") and 0 <= record["held_out_accuracy"] <= 1
    assert record["beta"] in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)
    assert round(record["alpha"] * 20, 6) == round(record["alpha"] * 20)  # on the 0.05 grid
    assert (student.head.alpha, student.head.beta) == (pytest.approx(record["alpha"]), record["beta"])
    # The search saw exactly the stratified held-out slice: 22 + 22 + 20 rows -> 2 + 2 + 2 = 6.
    from edgekd.distill.trainer import split_held_out

    _, held_out = split_held_out(frames.y, 0.1, 0)
    assert method._held_count == len(held_out) == 6
    fixed = _method("dho", options={"search_mix": False})
    assert fixed.held_out_fraction == 0.0 and fixed.record()["inference_mix"]["source"] == "fixed options"


def _round_trip(model: nn.Module, tmp_path) -> nn.Module:
    save_checkpoint(tmp_path / "student.pt", model, "edgekd:kd-cnn")
    fresh = build_model("edgekd:kd-cnn", 3)
    load_weights(fresh, tmp_path / "student.pt", "edgekd:kd-cnn")
    x = torch.randn(5, *FRAME)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x))
    return fresh


def test_dho_student_round_trips_checkpoint_and_exports_to_onnx(tmp_path) -> None:
    from edgekd.export.onnx import check_parity, export_onnx

    torch.manual_seed(0)
    model = build_model("edgekd:kd-cnn", 3)
    _method("dho", options={"inference_alpha": 0.4, "inference_beta": 1.5}).prepare(
        model, torch.zeros(1), None
    )
    with torch.no_grad():
        model.head.kd.weight.normal_()  # make the two heads differ
    fresh = _round_trip(model, tmp_path)
    assert isinstance(fresh.head, DualHead) and (fresh.head.alpha, fresh.head.beta) == (0.4, 1.5)

    export_onnx(model, FRAME, tmp_path / "student.onnx", opset=18)
    samples = np.random.default_rng(0).standard_normal((8, *FRAME)).astype(np.float32)
    report = check_parity(model, tmp_path / "student.onnx", samples, tolerance=1e-4)
    assert report["passed"] and report["top1_agreement"] == 1.0


# ---------------------------------------------------------------- lelp


def _lelp_fitted(
    classes: int = 3, dim: int = 6, subclasses: int = 2
) -> tuple[DistillMethod, torch.Tensor, Tiny]:
    """LELP prepared on 20 embeddings per class whose logits are an exact linear map of them."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(classes).repeat_interleave(20)
    features = (
        torch.randn(len(labels), dim, generator=generator)
        + 3 * torch.randn(classes, dim, generator=generator)[labels]
    )
    weight = torch.randn(classes, dim, generator=generator)
    logits = features @ weight.T + 0.5
    method = _method("lelp", classes=classes, teacher_dim=dim, options={"subclasses": subclasses})
    model = Tiny(classes=classes)
    method.prepare(model, labels, ModelOutputs(logits, features))
    return method, weight, model


def test_lelp_directions_are_orthonormal_and_in_the_null_space_of_the_logit_map() -> None:
    method, weight, model = _lelp_fitted()
    for directions in method.directions:
        torch.testing.assert_close(directions.T @ directions, torch.eye(2), atol=1e-5, rtol=0)
        torch.testing.assert_close(weight @ directions, torch.zeros(3, 2), atol=1e-4, rtol=0)
    assert isinstance(model.head, SubclassHead) and model.head.subclasses == 2
    assert not list(method.parameters())


def test_lelp_targets_split_each_teacher_class_probability_over_its_subclasses() -> None:
    method, _, _ = _lelp_fitted()
    teacher_logits, teacher_features = torch.randn(7, 3) * 5, torch.randn(7, 6) * 4
    q = method.subclass_targets(teacher_logits, teacher_features)
    assert q.shape == (7, 6)
    torch.testing.assert_close(q.sum(1), torch.ones(7))
    torch.testing.assert_close(q.reshape(7, 3, 2).sum(2), torch.softmax(teacher_logits, 1))


def test_lelp_target_and_loss_equal_hand_values() -> None:
    method = _method("lelp", classes=2, student_dim=2, teacher_dim=2, options={"subclasses": 2})
    method.directions.copy_(torch.eye(2).expand(2, 2, 2))  # u_c = h for both classes, unscaled
    model = Tiny(dim=2, classes=2)
    method._install_head(model)
    p = [0.25, 0.75]  # softmax([0, ln 3])
    within = [math.e / (math.e + 1), 1 / (math.e + 1)]  # softmax(h) with h = (1, 0)
    expected = [p[0] * within[0], p[0] * within[1], p[1] * within[0], p[1] * within[1]]
    teacher = ModelOutputs(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(
        method.subclass_targets(teacher.logits, teacher.features), torch.tensor([expected])
    )
    with torch.no_grad():
        model.head.linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        model.head.linear.bias.zero_()
    features = torch.tensor([[2.0, 1.0]], requires_grad=True)  # subclass scores (2, 0, 1, 0)
    log_probs = [v - math.log(math.exp(2) + 1 + math.e + 1) for v in (2.0, 0.0, 1.0, 0.0)]
    loss = method.loss(ModelOutputs(model.head(features), features), teacher, torch.tensor([1]), STATE)
    assert loss.item() == pytest.approx(
        -sum(q * lp for q, lp in zip(expected, log_probs, strict=True)), rel=1e-6
    )
    loss.backward()
    assert features.grad is not None and model.head.linear.weight.grad is not None


def test_subclass_head_class_softmax_sums_subclass_softmax() -> None:
    head = SubclassHead(4, 3, 5)
    f = torch.randn(6, 4)
    summed = torch.softmax(head.subclass_logits(f), dim=1).reshape(6, 3, 5).sum(2)
    torch.testing.assert_close(torch.softmax(head(f), dim=1), summed)


def test_lelp_head_starts_as_the_old_head_and_round_trips_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("edgekd:kd-cnn", 3)
    x = torch.randn(5, *FRAME)
    with torch.no_grad():
        before = model.eval()(x)
    teacher_features = torch.randn(30, 8)
    method = _method("lelp", teacher_dim=8, options={"subclasses": 3})
    method.prepare(model, torch.arange(3).repeat(10), ModelOutputs(torch.randn(30, 3), teacher_features))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), before)  # logsumexp of S copies minus log S
        model.head.linear.weight.add_(torch.randn_like(model.head.linear.weight))
    fresh = _round_trip(model, tmp_path)
    assert isinstance(fresh.head, SubclassHead) and fresh.head.subclasses == 3


# ---------------------------------------------------------------- mixup-kd


def test_mixup_follows_the_official_partial_mixup_rule() -> None:
    """hchoi71/MIX-KD ``PMU``: int(B * partmixup) rows drawn with replacement are reset to lam = 1."""
    method = _method("mixup-kd")
    assert method.options.partmixup == 0.9
    x, y = torch.randn(40, 2, 8), torch.randint(0, 3, (40,))
    mix = method.mix_batch(x, y, torch.Generator().manual_seed(3))
    assert isinstance(mix, MixedBatch) and mix.lam.shape == (40,)
    # The same draws by hand: numpy seed, partner permutation, then the 36 indices kept unmixed.
    generator = torch.Generator().manual_seed(3)
    torch.randint(0, 2**62, (1,), generator=generator)
    torch.randperm(40, generator=generator)
    kept = torch.randint(0, 40, (36,), generator=generator).unique()
    mixed = mix.lam < 1
    assert torch.equal(torch.nonzero(~mixed).flatten(), kept)
    assert int(mixed.sum()) == 40 - len(kept) and bool((mix.lam > 0).all())
    assert torch.equal(mix.partner[~mixed], torch.arange(40)[~mixed])  # unmixed rows: lam = 1, themselves
    again = method.mix_batch(x, y, torch.Generator().manual_seed(3))
    assert torch.equal(again.lam, mix.lam) and torch.equal(again.partner, mix.partner)
    assert method.mixes_inputs and not method.uses_teacher_cache


def test_mixup_mixes_about_41_percent_of_rows_by_default() -> None:
    # A row escapes all int(0.9 * 128) = 115 draws with probability (1 - 1/128)^115 = 0.4058.
    method = _method("mixup-kd")
    x, y = torch.zeros(128, 2, 8), torch.zeros(128, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    share = torch.stack([(method.mix_batch(x, y, generator).lam < 1).float().mean() for _ in range(200)])
    assert float(share.mean()) == pytest.approx((1 - 1 / 128) ** 115, abs=0.01)
    nothing = _method("mixup-kd", options={"partmixup": 0.0}).mix_batch(x, y, generator)
    assert bool((nothing.lam < 1).all())  # partmixup 0: the official full mixup (every row mixed)


def test_mixup_kd_equals_hand_value() -> None:
    # std([1, 2, 0]) = std([2, 0, 1]) = 1 (unbiased), so the scaled logits are the logits themselves.
    loss = _method("mixup-kd").loss(
        ModelOutputs(torch.tensor([[1.0, 2.0, 0.0]])), ModelOutputs(torch.tensor([[2.0, 0.0, 1.0]])),
        torch.tensor([1]), STATE,
    )  # fmt: skip
    p_s, p_t = _softmax([1.0, 2.0, 0.0]), _softmax([2.0, 0.0, 1.0])
    assert loss.item() == pytest.approx(0.1 * -math.log(p_s[1]) + 0.9 * _kl(p_t, p_s), rel=1e-6)


def test_mixup_kd_kl_vanishes_for_identical_logits_and_ignores_logit_scale() -> None:
    method = _method("mixup-kd")
    student, target = torch.randn(8, 3), torch.randint(0, 3, (8,))
    mix = MixedBatch(torch.randperm(8), torch.rand(8))
    state = {**STATE, "mix": mix}
    loss = method.loss(ModelOutputs(student), ModelOutputs(student.clone()), target, state)
    lam, partner, scaled = mix.lam, mix.partner, std_scaled(student)
    mixed_ce = lam * F.cross_entropy(scaled, target, reduction="none")
    mixed_ce = mixed_ce + (1 - lam) * F.cross_entropy(scaled, target[partner], reduction="none")
    torch.testing.assert_close(loss, 0.1 * mixed_ce.mean())

    teacher = torch.randn(8, 3)
    base = method.loss(ModelOutputs(student), ModelOutputs(teacher), target, state)
    scaled_up = method.loss(ModelOutputs(student * 7.5), ModelOutputs(teacher * 0.2), target, state)
    torch.testing.assert_close(scaled_up, base)


def test_mixup_kd_gradients_reach_the_student_not_the_teacher() -> None:
    student, teacher = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    loss = _method("mixup-kd").loss(
        ModelOutputs(student), ModelOutputs(teacher), torch.tensor([0, 1, 2, 0]), STATE
    )
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None


# ---------------------------------------------------------------- kd3


def test_kd3_teacher_share_falls_linearly_from_one_to_lambda_end() -> None:
    method = _method("kd3", options={"lambda_end": 0.4})
    assert method.teacher_share({"step": 0, "steps": 11}) == 1.0
    assert method.teacher_share({"step": 5, "steps": 11}) == pytest.approx(0.7)
    assert method.teacher_share({"step": 10, "steps": 11}) == pytest.approx(0.4)


def test_kd3_rows_below_threshold_contribute_nothing_to_kd() -> None:
    method = _method("kd3", alpha=0.6, temperature=2.0)
    # Step 0: the combined prediction is the teacher's. Row 0: max p = e^3 / (e^3 + 2) = 0.909, kept;
    # row 1: p = (1/3, 1/3, 1/3), dropped. The KD term is then row 0's KL alone (its weight cancels).
    student = torch.tensor([[1.0, 2.0, 0.0], [0.0, 5.0, -3.0]], requires_grad=True)
    teacher = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([0, 1])
    loss = method.loss(ModelOutputs(student), ModelOutputs(teacher), target, STATE)
    kl0 = 4.0 * _kl(_softmax([3.0, 0.0, 0.0], 2.0), _softmax([1.0, 2.0, 0.0], 2.0))
    ce = (-math.log(_softmax([1.0, 2.0, 0.0])[0]) - math.log(_softmax([0.0, 5.0, -3.0])[1])) / 2
    assert loss.item() == pytest.approx(0.6 * kl0 + 0.4 * ce, rel=1e-6)
    weights = method.selection_weights(student, teacher, STATE)
    torch.testing.assert_close(weights, torch.tensor([math.exp(3) / (math.exp(3) + 2), 0.0]))

    only_kd = _method("kd3", alpha=1.0)
    only_kd.loss(ModelOutputs(student), ModelOutputs(teacher), target, STATE).backward()
    assert student.grad[0].abs().sum() > 0 and not student.grad[1].any()


def test_kd3_without_selected_rows_is_label_loss_and_spares_the_teacher() -> None:
    method = _method("kd3", alpha=0.5, options={"threshold": 1.0})
    student, teacher = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    target = torch.tensor([0, 1, -1, 2])
    loss = method.loss(ModelOutputs(student), ModelOutputs(teacher), target, STATE)
    torch.testing.assert_close(loss, 0.5 * F.cross_entropy(student[target >= 0], target[target >= 0]))
    loss.backward()
    assert student.grad is not None and teacher.grad is None


# ---------------------------------------------------------------- one real epoch through the trainer


@pytest.fixture(scope="module")
def frames() -> ArrayDataset:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 22)[:64]
    x = rng.standard_normal((64, *FRAME)).astype(np.float32) + y[:, None, None].astype(np.float32)
    return ArrayDataset(x, y, None)


@pytest.mark.parametrize("name", ["tgeo", "dho", "lelp", "mixup-kd", "kd3"])
def test_one_epoch_through_the_trainer_leaves_the_teacher_unchanged(name, frames, tmp_path) -> None:
    torch.manual_seed(0)
    teacher = build_model("edgekd:clst", 3).eval().requires_grad_(False)
    student = build_model("edgekd:kd-cnn", 3)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    method = build_method(
        DistillSpec(method=name), 3, probe_shape(student, FRAME), probe_shape(teacher, FRAME)
    )
    own_before = [p.clone() for p in method.parameters()]
    result = train(
        student, method, frames, frames, TrainSpec(epochs=1, batch_size=32), seed=0, stage_dir=tmp_path,
        fingerprint=name, teacher=teacher, log=lambda _: None,
    )  # fmt: skip
    assert np.isfinite(result.history[-1]["train_loss"]) and 0 <= result.deployed_accuracy <= 1
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    if name == "tgeo":  # the fusion net learns through meta_step only
        assert any(not torch.equal(a, b) for a, b in zip(own_before, method.parameters(), strict=True))
    with torch.no_grad():
        assert student.eval()(torch.from_numpy(frames.x[:4])).shape == (4, 3)


@pytest.mark.parametrize("name", ["tgeo", "mixup-kd", "kd3"])
def test_losses_stay_finite_for_extreme_logits(name) -> None:
    method = _tgeo() if name == "tgeo" else _method(name)
    student = torch.tensor([[1e4, -1e4, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[-1e4, 1e4, 0.0], [3e3, 0.0, -3e3]])
    loss = method.loss(ModelOutputs(student), ModelOutputs(teacher), torch.tensor([2, 0]), STATE)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_a_checkpoint_that_does_not_fit_is_a_one_line_error(frames, tmp_path) -> None:
    """A latest.pt of the same configuration but an older state layout: named, with what to do."""

    def run(epochs: int) -> None:
        torch.manual_seed(0)
        teacher = build_model("edgekd:clst", 3).eval().requires_grad_(False)
        student = build_model("edgekd:kd-cnn", 3)
        method = build_method(
            DistillSpec(method="tgeo"), 3, probe_shape(student, FRAME), probe_shape(teacher, FRAME)
        )
        train(
            student, method, frames, frames, TrainSpec(epochs=epochs, batch_size=32), seed=0,
            stage_dir=tmp_path, fingerprint="same", teacher=teacher, log=lambda _: None,
        )  # fmt: skip

    run(1)
    latest = tmp_path / "latest.pt"
    state = torch.load(latest, weights_only=True)
    del state["method"]["_extra_state"]  # as written before the fusion net's Adam state was kept
    from edgekd.hashing import sha256_state  # latest.pt carries a hash of its content: keep it whole

    state.pop("sha256")
    write_torch(latest, {**state, "sha256": sha256_state(state)})
    with pytest.raises(ModelError, match=r"latest.pt does not fit this training .*delete it") as caught:
        run(2)
    assert "\n" not in str(caught.value)


def test_tgeo_trains_a_mobilenetv3_student_through_the_trainer(tmp_path) -> None:
    """The case that failed: timm's MobileNetV3 (hardsigmoid) under TGeo-KD's bilevel step."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 11)[:32]
    images = ArrayDataset(rng.standard_normal((32, 3, 32, 32)).astype(np.float32), y, None)
    teacher = build_model("timm:resnet10t", 3, in_channels=3).eval().requires_grad_(False)
    student = build_model("timm:mobilenetv3_small_100", 3, in_channels=3)
    shape = (3, 32, 32)
    method = build_method(
        DistillSpec(method="tgeo", options={"tgeo": {"meta_interval": 1}}),
        3,
        probe_shape(student, shape),
        probe_shape(teacher, shape),
    )
    fusion_before = [p.clone() for p in method.fusion.parameters()]
    result = train(
        student, method, images, images, TrainSpec(epochs=1, batch_size=16), seed=0, stage_dir=tmp_path,
        fingerprint="tgeo-mbv3", teacher=teacher, log=lambda _: None,
    )  # fmt: skip
    assert np.isfinite(result.history[-1]["train_loss"])
    assert method.hypergradient == "finite differences"
    assert any(not torch.equal(a, b) for a, b in zip(fusion_before, method.fusion.parameters(), strict=True))
