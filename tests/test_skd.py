"""Distillation losses: ``none`` (labels only), ``kd`` (Hinton et al., 2015), ``skd`` (Hou et al., 2024)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from edgekd.distill.methods import METHODS, DistillMethod, ModelOutputs, ModelShape, build_method
from edgekd.errors import RecipeError
from edgekd.recipe import DistillSpec

STATE = {"epoch": 0, "epochs": 1}

# One sample, three classes: logits small enough to follow by hand.
STUDENT = [1.0, 2.0, 0.0]
TEACHER = [2.0, 0.0, 1.0]
LABEL = 1


def _softmax(logits: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in logits]
    return [e / sum(exps) for e in exps]


def _hand_kd(alpha: float, temperature: float) -> float:
    """alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE, written out with math only."""
    p_s, p_t = _softmax(STUDENT, temperature), _softmax(TEACHER, temperature)
    kl = sum(t * math.log(t / s) for t, s in zip(p_t, p_s, strict=True))
    ce = -math.log(_softmax(STUDENT, 1.0)[LABEL])
    return alpha * temperature**2 * kl + (1 - alpha) * ce


def _method(name: str, student_dim: int = 4, teacher_dim: int = 6, **spec: float) -> DistillMethod:
    options = {name: {"beta": spec.pop("beta")}} if "beta" in spec else {}
    return build_method(
        DistillSpec(method=name, options=options, **spec), 3, ModelShape(student_dim), ModelShape(teacher_dim)
    )


def _one(logits: list[float]) -> torch.Tensor:
    return torch.tensor([logits])


def test_registry_builds_each_method_and_suggests_names() -> None:
    assert {"none", "kd", "skd"} <= set(METHODS.names())
    assert not _method("none").needs_teacher
    assert _method("kd").needs_teacher and not _method("kd").needs_features
    assert _method("skd").needs_teacher and not _method("skd").needs_features  # paper's SKD: logits only
    assert _method("skd", beta=0.5).needs_features  # edgekd's opt-in embedding extension
    with pytest.raises(RecipeError, match="did you mean 'skd'"):
        _method("skdd")


def test_none_is_cross_entropy_without_teacher() -> None:
    loss = _method("none").loss(ModelOutputs(_one(STUDENT)), None, torch.tensor([LABEL]), STATE)
    assert loss.item() == pytest.approx(-math.log(_softmax(STUDENT, 1.0)[LABEL]), rel=1e-6)


def test_kd_equals_hand_computed_value() -> None:
    loss = _method("kd", alpha=0.6, temperature=2.0).loss(
        ModelOutputs(_one(STUDENT)), ModelOutputs(_one(TEACHER)), torch.tensor([LABEL]), STATE
    )
    assert loss.item() == pytest.approx(_hand_kd(0.6, 2.0), rel=1e-5)
    # By hand: p_s = (.3072, .5065, .1863), p_t = (.5065, .1863, .3072) at T = 2, KL = .2205;
    # CE = -ln .6652 = .4076; 0.6 * 4 * .2205 + 0.4 * .4076 = .6923.
    assert loss.item() == pytest.approx(0.6923, abs=1e-4)


def test_kd_with_alpha_zero_is_cross_entropy() -> None:
    student, teacher = torch.randn(8, 5), torch.randn(8, 5)
    target = torch.randint(0, 5, (8,))
    loss = build_method(DistillSpec(method="kd", alpha=0.0), 5, ModelShape(4), ModelShape(4)).loss(
        ModelOutputs(student), ModelOutputs(teacher), target, STATE
    )
    torch.testing.assert_close(loss, F.cross_entropy(student, target))


def test_kd_distillation_term_vanishes_when_student_matches_teacher() -> None:
    logits = torch.randn(8, 5) * 3
    for temperature in (1.0, 4.0, 10.0):
        method = build_method(
            DistillSpec(method="kd", alpha=1.0, temperature=temperature), 5, ModelShape(4), ModelShape(4)
        )
        target = torch.zeros(8, dtype=torch.long)
        loss = method.loss(ModelOutputs(logits.clone()), ModelOutputs(logits.clone()), target, STATE)
        assert abs(loss.item()) < 1e-6


def test_kd_needs_teacher_outputs() -> None:
    with pytest.raises(ValueError, match="needs teacher outputs"):
        _method("kd").loss(ModelOutputs(_one(STUDENT)), None, torch.tensor([LABEL]), STATE)


def test_skd_reduces_to_its_formula_on_a_hand_example() -> None:
    alpha, beta, temperature = 0.7, 0.5, 4.0
    method = _method("skd", student_dim=2, teacher_dim=2, alpha=alpha, beta=beta, temperature=temperature)
    with torch.no_grad():  # connector W = [[1, 0], [0, 2]], b = 0: W f_s = (3, 0) for f_s = (3, 0)
        method.connector.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        method.connector.bias.zero_()
    student = ModelOutputs(_one(STUDENT), torch.tensor([[3.0, 0.0]]))
    teacher = ModelOutputs(_one(TEACHER), torch.tensor([[1.0, 1.0]]))
    loss = method.loss(student, teacher, torch.tensor([LABEL]), STATE)
    # n(W f_s) = (1, 0), n(f_t) = (1/sqrt2, 1/sqrt2): squared distance = 2 - 2 cos 45deg = 2 - sqrt2.
    feature_term = 2 - math.sqrt(2)
    assert loss.item() == pytest.approx(_hand_kd(alpha, temperature) + beta * feature_term, rel=1e-5)


def test_skd_default_is_the_papers_soft_targets_plus_labels() -> None:
    """ClST's SKD: alpha * T^2 * KL + (1 - alpha) * CE; the embedding term is off unless asked for."""
    method = _method("skd", alpha=0.6, temperature=2.0)
    assert method.options.beta == 0.0
    assert not method.needs_features and method.connector is None and not list(method.parameters())
    loss = method.loss(ModelOutputs(_one(STUDENT)), ModelOutputs(_one(TEACHER)), torch.tensor([LABEL]), STATE)
    # The same hand numbers as kd: 0.6 * 4 * .2205 + 0.4 * .4076 = .6923.
    assert loss.item() == pytest.approx(0.6923, abs=1e-4)


def test_skd_with_beta_zero_is_kd_and_needs_no_features() -> None:
    method = _method("skd", beta=0.0, alpha=0.6, temperature=2.0)
    assert not method.needs_features and method.connector is None
    assert not list(method.parameters())
    loss = method.loss(ModelOutputs(_one(STUDENT)), ModelOutputs(_one(TEACHER)), torch.tensor([LABEL]), STATE)
    assert loss.item() == pytest.approx(_hand_kd(0.6, 2.0), rel=1e-5)


def test_skd_needs_features_when_beta_positive() -> None:
    with pytest.raises(ValueError, match="features"):
        _method("skd", beta=0.5).loss(
            ModelOutputs(_one(STUDENT)), ModelOutputs(_one(TEACHER)), torch.tensor([LABEL]), STATE
        )


@pytest.mark.parametrize("name", ["kd", "skd"])
def test_gradients_reach_student_and_connector_never_teacher(name: str) -> None:
    method = _method(name, student_dim=4, teacher_dim=6, **({"beta": 0.5} if name == "skd" else {}))
    student_logits = torch.randn(5, 3, requires_grad=True)
    student_features = torch.randn(5, 4, requires_grad=True)
    teacher_logits = torch.randn(5, 3, requires_grad=True)  # as if the teacher were not frozen
    teacher_features = torch.randn(5, 6, requires_grad=True)
    loss = method.loss(
        ModelOutputs(student_logits, student_features),
        ModelOutputs(teacher_logits, teacher_features),
        torch.randint(0, 3, (5,)),
        STATE,
    )
    loss.backward()
    assert student_logits.grad is not None and student_logits.grad.abs().sum() > 0
    assert teacher_logits.grad is None and teacher_features.grad is None
    if name == "skd":
        assert student_features.grad is not None and student_features.grad.abs().sum() > 0
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.connector.parameters())


@pytest.mark.parametrize("name", ["none", "kd", "skd"])
@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_loss_is_finite_for_extreme_logits(name: str, scale: float) -> None:
    extra = {"beta": 0.5} if name == "skd" else {}
    method = _method(name, student_dim=4, teacher_dim=6, temperature=0.5, **extra)
    student_logits = (torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.5]]) * scale).requires_grad_()
    teacher_logits = torch.tensor([[-1.0, 1.0, 0.0], [1.0, -1.0, 0.0]]) * scale
    student_features = torch.zeros(2, 4, requires_grad=True)  # zero embeddings: no division by zero
    loss = method.loss(
        ModelOutputs(student_logits, student_features),
        ModelOutputs(teacher_logits, torch.zeros(2, 6)),
        torch.tensor([1, 0]),
        STATE,
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(student_logits.grad).all()
