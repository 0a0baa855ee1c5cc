"""Logit-based distillation methods: ``pld``, ``bdkd``, ``sinkd``, ``taid``, ``adakd``.

Each method is checked against a value written out by hand (``math`` on tiny inputs) or an exact
property of its paper's loss, and for gradients: they reach the student logits, never the teacher's.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from edgekd.distill.methods import DistillMethod, ModelOutputs, ModelShape, build_method, soft_kl
from edgekd.distill.methods.sinkd import sinkhorn_distance
from edgekd.errors import RecipeError
from edgekd.recipe import DistillSpec

LOGIT_METHODS = ("pld", "bdkd", "sinkd", "taid", "adakd")
STATE = {"epoch": 0, "epochs": 3, "step": 0, "steps": 100}


def _method(name: str, num_classes: int = 3, temperature: float = 4.0, **options: object) -> DistillMethod:
    spec = DistillSpec(method=name, temperature=temperature, options={name: options} if options else {})
    return build_method(spec, num_classes, ModelShape(4), ModelShape(6))


def _out(rows: list[list[float]] | torch.Tensor) -> ModelOutputs:
    return ModelOutputs(torch.as_tensor(rows, dtype=torch.float64))


def _softmax(logits: list[float], temperature: float = 1.0) -> list[float]:
    top = max(logits)
    exps = [math.exp((v - top) / temperature) for v in logits]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def _entropy(p: list[float]) -> float:
    return -sum(a * math.log(a) for a in p)


# ------------------------------------------------------------------ all methods


@pytest.mark.parametrize("name", LOGIT_METHODS)
@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_finite_scalar_and_gradient_reaches_student_not_teacher(name: str, scale: float) -> None:
    torch.manual_seed(3)
    student = (torch.randn(8, 11) * scale).requires_grad_()
    teacher = (torch.randn(8, 11) * scale).requires_grad_()
    target = torch.randint(0, 11, (8,))
    method = _method(name, num_classes=11)
    assert not method.needs_features and not method.needs_feature_maps and method.uses_teacher_cache
    loss = method.loss(ModelOutputs(student), ModelOutputs(teacher), target, STATE)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None
    assert not list(method.parameters())  # no trainable parts of their own


def test_bad_options_are_recipe_errors() -> None:
    with pytest.raises(RecipeError, match=r"distill\.options\.taid\.t_start"):
        _method("taid", t_start=1.5)
    with pytest.raises(RecipeError, match="unknown option"):
        _method("pld", T=2.0)
    with pytest.raises(RecipeError, match="t_end"):
        _method("taid", t_start=0.6, t_end=0.5)
    with pytest.raises(RecipeError, match="divergence"):
        _method("adakd", divergence="jsd")


# ------------------------------------------------------------------ PLD

STUDENT, TEACHER, LABEL = [1.0, 2.0, 0.0], [2.0, 0.0, 1.0], 1


def _pld_terms() -> list[float]:
    """Ranking π* = (label 1, then class 0 (t=2), then class 2 (t=1)); per-position PL terms."""
    s = STUDENT
    return [
        math.log(math.exp(s[1]) + math.exp(s[0]) + math.exp(s[2])) - s[1],
        math.log(math.exp(s[0]) + math.exp(s[2])) - s[0],
        0.0,  # last position: log exp(s_2) - s_2
    ]


def test_pld_equals_hand_computed_value() -> None:
    q = _softmax(TEACHER, 1.0)
    weights = [q[1], q[0], q[2]]  # teacher probability of the class at each rank
    hand = sum(w * term for w, term in zip(weights, _pld_terms(), strict=True))
    loss = _method("pld").loss(_out([STUDENT]), _out([TEACHER]), torch.tensor([LABEL]), STATE)
    assert loss.item() == pytest.approx(hand, rel=1e-12)
    # By hand: terms (0.4076, 0.3133, 0), weights (0.0900, 0.6652, 0.2447) -> 0.2451.
    assert loss.item() == pytest.approx(0.2451, abs=1e-4)


def test_pld_with_one_hot_teacher_is_cross_entropy() -> None:
    torch.manual_seed(0)
    student = torch.randn(6, 5, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3, 4, 1])
    teacher = torch.randn(6, 5, dtype=torch.float64)
    teacher[torch.arange(6), target] = 200.0  # weights (1, ~e^-195, ...)
    loss = _method("pld", num_classes=5).loss(_out(student), _out(teacher), target, STATE)
    assert loss.item() == pytest.approx(F.cross_entropy(student, target).item(), rel=1e-12)


def test_pld_with_uniform_weights_is_list_mle() -> None:
    loss = _method("pld", tau=1e9).loss(_out([STUDENT]), _out([TEACHER]), torch.tensor([LABEL]), STATE)
    assert loss.item() == pytest.approx(sum(_pld_terms()) / 3, rel=1e-8)


def test_pld_ranks_label_first_even_when_teacher_disagrees() -> None:
    # Teacher's argmax is class 0, the label is 2: ranking (2, 0, 1), weights q_2, q_0, q_1.
    s, t = [0.3, -1.0, 0.8], [3.0, 1.0, 0.0]
    q = _softmax(t)
    terms = [
        math.log(sum(math.exp(v) for v in s)) - s[2],
        math.log(math.exp(s[0]) + math.exp(s[1])) - s[0],
        0.0,
    ]
    hand = q[2] * terms[0] + q[0] * terms[1] + q[1] * terms[2]
    loss = _method("pld").loss(_out([s]), _out([t]), torch.tensor([2]), STATE)
    assert loss.item() == pytest.approx(hand, rel=1e-12)


# ------------------------------------------------------------------ BD-KD


def test_bdkd_with_identical_distributions_is_cross_entropy() -> None:
    torch.manual_seed(1)
    logits = torch.randn(5, 4, dtype=torch.float64)
    target = torch.randint(0, 4, (5,))
    loss = _method("bdkd", num_classes=4).loss(_out(logits), _out(logits.clone()), target, STATE)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-12)


@pytest.mark.parametrize("student_less_confident", [True, False])
def test_bdkd_equals_hand_computed_value(student_less_confident: bool) -> None:
    flat, peaked = [0.5, 0.0, 0.0], [3.0, 0.0, -1.0]
    s, t = (flat, peaked) if student_less_confident else (peaked, flat)
    temperature, delta = 2.0, 3.0
    p_s, p_t = _softmax(s, temperature), _softmax(t, temperature)
    assert (_entropy(p_s) > _entropy(p_t)) == student_less_confident
    w_f, w_r = (1.0, delta) if student_less_confident else (delta, 1.0)
    ce = -math.log(_softmax(s)[0])
    hand = ce + temperature**2 * (w_f * _kl(p_t, p_s) + w_r * _kl(p_s, p_t))
    method = _method("bdkd", temperature=temperature, delta=delta)
    loss = method.loss(_out([s]), _out([t]), torch.tensor([0]), STATE)
    assert loss.item() == pytest.approx(hand, rel=1e-12)


# ------------------------------------------------------------------ SinKD


def test_sinkhorn_of_identical_well_separated_batches_is_nearly_zero() -> None:
    # Rows are near one-hot on different classes: off-diagonal costs are ~2 (L1), so kernel
    # entries exp(-2/0.1) ~ 2e-9 against 1 on the diagonal; the plan is the identity up to ~2e-9
    # per entry, bounding the distance by B(B-1) * 2 * 2e-9 ~ 5e-8.
    p = torch.softmax(10 * torch.eye(4, dtype=torch.float64), dim=1)
    assert sinkhorn_distance(p, p.clone()).item() == pytest.approx(0.0, abs=1e-7)


def test_sinkhorn_is_symmetric_at_convergence() -> None:
    # The plan converges to the unique doubly-stochastic scaling of K, and swapping the arguments
    # transposes K, hence the plan: the distance is symmetric once the normalisation has converged
    # (20 rounds, the default, approximate it).
    torch.manual_seed(2)
    p = torch.softmax(torch.randn(6, 5, dtype=torch.float64), dim=1)
    q = torch.softmax(torch.randn(6, 5, dtype=torch.float64), dim=1)
    forward = sinkhorn_distance(p, q, eps=0.1, iterations=1000)
    backward = sinkhorn_distance(q, p, eps=0.1, iterations=1000)
    assert forward.item() == pytest.approx(backward.item(), abs=1e-9)


def test_sinkhorn_equals_hand_computed_value_for_two_samples() -> None:
    p = [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]
    q = [[0.5, 0.3, 0.2], [0.3, 0.4, 0.3]]
    cost = [[sum(abs(a - b) for a, b in zip(pi, qj, strict=True)) for qj in q] for pi in p]
    kernel = [[math.exp(-c / 0.1) for c in row] for row in cost]
    # The official loop: 20 rounds of row then column normalisation.
    plan = [row[:] for row in kernel]
    for _ in range(20):
        plan = [[v / sum(row) for v in row] for row in plan]
        cols = [plan[0][j] + plan[1][j] for j in range(2)]
        plan = [[plan[i][j] / cols[j] for j in range(2)] for i in range(2)]
    replica = sum(plan[i][j] * cost[i][j] for i in range(2) for j in range(2))
    # Its limit in closed form: P = [[a, 1-a], [1-a, a]] with a^2/(1-a)^2 = K11 K22 / (K12 K21).
    root = math.sqrt(kernel[0][0] * kernel[1][1] / (kernel[0][1] * kernel[1][0]))
    a = root / (1 + root)
    closed = a * (cost[0][0] + cost[1][1]) + (1 - a) * (cost[0][1] + cost[1][0])
    value = sinkhorn_distance(torch.tensor(p, dtype=torch.float64), torch.tensor(q, dtype=torch.float64))
    assert value.item() == pytest.approx(replica, rel=1e-12)
    assert value.item() == pytest.approx(closed, rel=1e-6)


def test_sinkd_loss_equals_hand_value_with_annealed_temperature() -> None:
    s, t, label = [1.0, 2.0, 0.0], [2.0, 0.0, 1.0], 1
    method = _method("sinkd", alpha=0.8, temperature=3.0, beta=0.8, scale=0.002)
    assert method.annealed_temperature(0, 5) == 3.0
    assert method.annealed_temperature(2, 5) == pytest.approx(2.0)
    assert method.annealed_temperature(4, 5) == pytest.approx(1.0)
    temp = 2.0  # epoch 2 of 5
    soft = -sum(a * math.log(b) for a, b in zip(_softmax(t, temp), _softmax(s, temp), strict=True))
    ce = -math.log(_softmax(s)[label])
    # One sample: the plan is the 1x1 matrix [1] and the distance is the L1 cost at T_s = 2.
    l1 = sum(abs(a - b) for a, b in zip(_softmax(s, 2.0), _softmax(t, 2.0), strict=True))
    hand = 0.8 * soft + 0.2 * ce + 0.8 * 0.002 * l1
    state = {"epoch": 2, "epochs": 5, "step": 0, "steps": 10}
    loss = method.loss(_out([s]), _out([t]), torch.tensor([label]), state)
    assert loss.item() == pytest.approx(hand, rel=1e-12)


# ------------------------------------------------------------------ TAID


def _run_taid(method: DistillMethod, steps: int, seed: int = 0) -> list[float]:
    """Feed ``steps`` random batches in training order; the value of t after each."""
    generator = torch.Generator().manual_seed(seed)
    ts = []
    for step in range(steps):
        student, teacher = torch.randn(8, 5, generator=generator), torch.randn(8, 5, generator=generator)
        method.loss(
            ModelOutputs(student),
            ModelOutputs(teacher),
            torch.zeros(8, dtype=torch.long),
            {"epoch": 0, "epochs": 1, "step": step, "steps": steps},
        )
        ts.append(float(method.t))
    return ts


def test_taid_at_the_end_of_the_schedule_is_hinton_kl_at_temperature_one() -> None:
    method = _method("taid", num_classes=5)
    ts = _run_taid(method, steps=6)
    assert ts[-1] == 1.0
    method.eval()
    torch.manual_seed(4)
    student, teacher = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    loss = method.loss(ModelOutputs(student), ModelOutputs(teacher), torch.zeros(7, dtype=torch.long), STATE)
    torch.testing.assert_close(loss, soft_kl(student, teacher, 1.0))


def test_taid_at_t_zero_targets_the_student_itself() -> None:
    method = _method("taid", num_classes=5, t_start=0.0)
    torch.manual_seed(5)
    student = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    loss = method.loss(
        ModelOutputs(student), _out(torch.randn(7, 5)), torch.zeros(7, dtype=torch.long), STATE
    )
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    assert student.grad is not None and student.grad.abs().max().item() < 1e-12


@pytest.mark.parametrize("t_start", [0.4, 0.7])
def test_taid_gradient_is_softmax_minus_the_detached_interpolated_target(t_start: float) -> None:
    """0 < t < 1: d L / d s = (softmax(s) - p_t) / B with p_t = softmax((1 - t) sg(s) + t z_T).

    Without the stop-gradient on the student inside p_t, the target would move with s and the
    gradient would pick up (1 - t) times the target's own Jacobian terms, failing this check.
    """
    method = _method("taid", num_classes=4, t_start=t_start)
    method.eval()  # keep t fixed at t_start
    torch.manual_seed(7)
    student = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 4, dtype=torch.float64) * 3
    loss = method.loss(ModelOutputs(student), ModelOutputs(teacher), torch.zeros(5, dtype=torch.long), STATE)
    loss.backward()
    with torch.no_grad():
        target = torch.softmax((1 - t_start) * student + t_start * teacher, dim=1)
        expected = (torch.softmax(student, dim=1) - target) / 5
    torch.testing.assert_close(student.grad, expected)
    # The same check, row by row, with math only (row 0): p_s - p_t for one sample, over B = 5.
    s0, z0, t = student[0].tolist(), teacher[0].tolist(), float(method.t)  # t as stored (float32)
    p_t = _softmax([(1 - t) * a + t * b for a, b in zip(s0, z0, strict=True)])
    hand = [(a - b) / 5 for a, b in zip(_softmax(s0), p_t, strict=True)]
    assert student.grad[0].tolist() == pytest.approx(hand, rel=1e-9, abs=1e-12)


def test_taid_adaptive_update_equals_hand_value() -> None:
    method = _method("taid", num_classes=3)
    steps = 10**6  # the linear floor stays below the adaptive step
    s1, s2, teacher = [0.0, 1.0, 0.0], [0.5, 1.0, -0.5], [2.0, 0.0, 1.0]

    def cross_entropy(s: list[float], t_mix: float) -> float:
        target = _softmax([(1 - t_mix) * a + t_mix * b for a, b in zip(s, teacher, strict=True)])
        return -sum(p * math.log(q) for p, q in zip(target, _softmax(s), strict=True))

    for step, s in enumerate((s1, s2)):
        method.loss(_out([s]), _out([teacher]), torch.tensor([0]), {"step": step, "steps": steps})
    first, second = cross_entropy(s1, 0.4), cross_entropy(s2, 0.4)
    momentum = 0.01 * (first - second) / first
    hand = 0.4 + 5e-4 * (1 / (1 + math.exp(-momentum))) * 0.6
    assert float(method.momentum) == pytest.approx(momentum, rel=1e-5)
    assert float(method.t) == pytest.approx(hand, rel=1e-6)
    assert float(method.prev_loss) == pytest.approx(second, rel=1e-6)


@pytest.mark.parametrize("adaptive", [True, False])
def test_taid_t_is_monotone_and_reaches_t_end_at_the_last_step(adaptive: bool) -> None:
    ts = _run_taid(_method("taid", num_classes=5, adaptive=adaptive), steps=40)
    assert ts[0] == pytest.approx(0.4)
    assert all(later >= earlier for earlier, later in zip(ts, ts[1:], strict=False))
    assert ts[-1] == 1.0 and max(ts) <= 1.0


def test_taid_state_round_trips_through_state_dict() -> None:
    method = _method("taid", num_classes=5)
    _run_taid(method, steps=7)
    assert {"t", "momentum", "prev_loss"} <= set(method.state_dict())
    restored = _method("taid", num_classes=5)
    restored.load_state_dict(method.state_dict())
    for name in ("t", "momentum", "prev_loss"):
        assert torch.equal(getattr(restored, name), getattr(method, name))
    # Resumed training continues the very same schedule.
    student, teacher = torch.randn(8, 5), torch.randn(8, 5)
    state = {"step": 7, "steps": 1000}
    for m in (method, restored):
        m.loss(ModelOutputs(student), ModelOutputs(teacher), torch.zeros(8, dtype=torch.long), state)
    assert torch.equal(restored.t, method.t) and torch.equal(restored.momentum, method.momentum)


def test_taid_does_not_move_t_in_eval_mode() -> None:
    method = _method("taid", num_classes=5)
    method.eval()
    _run_taid(method, steps=5)
    assert float(method.t) == pytest.approx(0.4) and torch.isinf(method.prev_loss)


# ------------------------------------------------------------------ AdaKD

# Teacher uniform, student increasingly peaked: difficulty grows with the row index.
ADA_TEACHER = [[0.0, 0.0, 0.0]] * 5
ADA_STUDENT = [[k, 0.0, 0.0] for k in (0.5, 1.0, 2.0, 3.0, 4.0)]


def _hellinger(s: list[float], t: list[float], temperature: float) -> float:
    p, q = _softmax(s, temperature), _softmax(t, temperature)
    return math.sqrt(sum((math.sqrt(a) - math.sqrt(b)) ** 2 for a, b in zip(p, q, strict=True)) / 2)


def test_adakd_median_sample_gets_base_temperature_harder_ones_lower() -> None:
    base, c = 1.5, 0.5
    method = _method("adakd", base_temperature=base, temperature_scale=c)
    kept, temps = method.focus(_out(ADA_STUDENT).logits, _out(ADA_TEACHER).logits)
    assert sorted(kept.tolist()) == [0, 1, 2, 3, 4]  # r = 1: every sample kept
    by_row = dict(zip(kept.tolist(), temps.tolist(), strict=True))
    assert by_row[2] == base  # the median difficulty: exactly T_base
    assert by_row[0] > by_row[1] > by_row[2] > by_row[3] > by_row[4]
    d = [_hellinger(s, t, base) for s, t in zip(ADA_STUDENT, ADA_TEACHER, strict=True)]
    for row in range(5):
        hand = base * math.exp(-c * math.tanh(math.log(d[row] / d[2])))
        assert by_row[row] == pytest.approx(hand, rel=1e-9)


def test_adakd_with_full_ratio_and_no_scaling_is_reverse_kl() -> None:
    method = _method("adakd", temperature_scale=0.0)
    loss = method.loss(_out(ADA_STUDENT), _out(ADA_TEACHER), torch.zeros(5, dtype=torch.long), STATE)
    hand = sum(_kl(_softmax(s), _softmax(t)) for s, t in zip(ADA_STUDENT, ADA_TEACHER, strict=True)) / 5
    assert loss.item() == pytest.approx(hand, rel=1e-12)
    forward = _method("adakd", temperature_scale=0.0, divergence="forward")
    loss = forward.loss(_out(ADA_STUDENT), _out(ADA_TEACHER), torch.zeros(5, dtype=torch.long), STATE)
    hand = sum(_kl(_softmax(t), _softmax(s)) for s, t in zip(ADA_STUDENT, ADA_TEACHER, strict=True)) / 5
    assert loss.item() == pytest.approx(hand, rel=1e-12)


def test_adakd_keeps_the_hardest_samples_and_weights_by_temperature_squared() -> None:
    method = _method("adakd")
    method.ratio.fill_(0.5)  # int(5 * 0.5) = 2: the two hardest rows (3 and 4)
    kept, temps = method.focus(_out(ADA_STUDENT).logits, _out(ADA_TEACHER).logits)
    assert sorted(kept.tolist()) == [3, 4]
    loss = method.loss(_out(ADA_STUDENT), _out(ADA_TEACHER), torch.zeros(5, dtype=torch.long), STATE)
    hand = 0.0
    for row, temp in zip(kept.tolist(), temps.tolist(), strict=True):
        p_s, p_t = _softmax(ADA_STUDENT[row], temp), _softmax(ADA_TEACHER[row], temp)
        hand += temp**2 * _kl(p_s, p_t) / 2
    assert loss.item() == pytest.approx(hand, rel=1e-12)


def test_adakd_ratio_shrinks_while_the_loss_decreases_and_grows_when_it_rises() -> None:
    method = _method("adakd", num_classes=5)
    generator = torch.Generator().manual_seed(6)
    teacher = torch.randn(16, 5, generator=generator)
    noise = torch.randn(16, 5, generator=generator) * 3
    steps, ratios = 150, []
    for step in range(steps):
        student = teacher + noise * 0.95**step  # the student steadily approaches the teacher
        method.loss(
            ModelOutputs(student),
            ModelOutputs(teacher),
            torch.zeros(16, dtype=torch.long),
            {"step": step, "steps": steps},
        )
        ratios.append(float(method.ratio))
    assert ratios[0] == 1.0
    assert all(later <= earlier for earlier, later in zip(ratios, ratios[1:], strict=False))
    assert ratios[-1] < 0.5 and min(ratios) >= 0.1
    # The loss jumps back up: the focus widens again (capped at 1).
    for step in range(steps):
        method.loss(
            ModelOutputs(teacher + noise),
            ModelOutputs(teacher),
            torch.zeros(16, dtype=torch.long),
            {"step": step, "steps": steps},
        )
    assert float(method.ratio) > ratios[-1] and float(method.ratio) <= 1.0


def test_adakd_state_round_trips_through_state_dict() -> None:
    method = _method("adakd")
    method.ratio.fill_(0.6)
    method.loss(_out(ADA_STUDENT), _out(ADA_TEACHER), torch.zeros(5, dtype=torch.long), STATE)
    restored = _method("adakd")
    restored.load_state_dict(method.state_dict())
    for name in ("ratio", "ema", "prev_ema"):
        torch.testing.assert_close(getattr(restored, name), getattr(method, name), equal_nan=True)
    assert float(restored.ratio) == 0.6 and not torch.isnan(restored.ema)
