"""Classic distillation methods: ``dkd``, ``fitnets``, ``at``, ``rkd``, ``mgd``."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from edgekd.distill.methods import METHODS, DistillMethod, ModelOutputs, ModelShape, build_method
from edgekd.distill.methods.dkd import dkd_parts
from edgekd.distill.methods.hint_maps import resample
from edgekd.distill.methods.relational import angle_potential, distance_potential
from edgekd.distill.outputs import model_outputs, probe_shape
from edgekd.errors import RecipeError
from edgekd.models import build_model
from edgekd.recipe import DistillSpec

STATE = {"epoch": 0, "epochs": 1, "step": 0, "steps": 1}
CLASSIC = ("dkd", "fitnets", "at", "rkd", "mgd")


def _method(
    name: str,
    student: ModelShape,
    teacher: ModelShape,
    num_classes: int = 3,
    temperature: float = 4.0,
    **options: Any,
) -> DistillMethod:
    spec = DistillSpec(method=name, temperature=temperature, options={name: options} if options else {})
    return build_method(spec, num_classes, student, teacher)


def _softmax(logits: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in logits]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def _ce(logits: list[float], label: int) -> float:
    return -math.log(_softmax(logits)[label])


# ------------------------------------------------------------------------------------------ registry


def test_registry_names_aliases_and_capabilities() -> None:
    assert set(CLASSIC) <= set(METHODS.names())
    assert "mae-feat" not in METHODS.names()  # MGD is not DMAE (Bai et al., 2023): no misleading alias
    with pytest.raises(RecipeError):
        METHODS.get("mae-feat")
    maps = ModelShape(4, ((2, 8), (3, 4)))
    for name in ("fitnets", "at", "mgd"):
        assert _method(name, maps, maps).needs_feature_maps
    rkd = _method("rkd", ModelShape(4), ModelShape(6))
    assert rkd.needs_features and not rkd.needs_feature_maps and rkd.uses_teacher_cache
    dkd = _method("dkd", ModelShape(4), ModelShape(6))
    assert not dkd.needs_features and dkd.uses_teacher_cache and not list(dkd.parameters())


def test_bad_options_are_recipe_errors() -> None:
    shape = ModelShape(4, ((2, 8),))
    with pytest.raises(RecipeError, match=r"distill\.options\.dkd\.nckd_weight"):
        _method("dkd", shape, shape, nckd_weight=-1.0)
    with pytest.raises(RecipeError, match="unknown option"):
        _method("at", shape, shape, gamma=1.0)
    with pytest.raises(RecipeError, match="mask_ratio"):
        _method("mgd", shape, shape, mask_ratio=1.0)
    with pytest.raises(RecipeError, match="out of range"):
        _method("fitnets", shape, shape, hint_layer=3)
    with pytest.raises(RecipeError, match="no hint layers"):
        _method("fitnets", ModelShape(4), shape)


# ------------------------------------------------------------------------------------------ dkd


def test_dkd_parts_decompose_hinton_kl_exactly() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(16, 7) * 3, torch.randn(16, 7) * 3
    target = torch.randint(0, 7, (16,))
    for temperature in (1.0, 4.0):
        tckd, nckd = dkd_parts(student, teacher, target, temperature)
        log_p_s = F.log_softmax(student.double() / temperature, dim=1)
        log_p_t = F.log_softmax(teacher.double() / temperature, dim=1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
        p_t_target = log_p_t.exp().gather(1, target[:, None]).squeeze(1)
        torch.testing.assert_close(
            (tckd + (1 - p_t_target.float()) * nckd).double(), kl, rtol=1e-5, atol=1e-6
        )
        assert bool((tckd >= -1e-6).all()) and bool((nckd >= -1e-6).all())


def test_dkd_equals_hand_computed_value() -> None:
    student, teacher, label, temperature = [1.0, 2.0, 0.0], [2.0, 0.0, 0.5], 1, 2.0
    p_s, p_t = _softmax(student, temperature), _softmax(teacher, temperature)
    tckd = _kl([p_t[label], 1 - p_t[label]], [p_s[label], 1 - p_s[label]])
    nckd = _kl(_softmax([2.0, 0.5], temperature), _softmax([1.0, 0.0], temperature))
    hand = _ce(student, label) + temperature**2 * (1.0 * tckd + 8.0 * nckd)
    # By hand: b_s = (.5065, .4935), b_t = (.1999, .8001): TCKD = .20074; non-target softmax over
    # classes {0, 2}: q_s = (.6225, .3775), q_t = (.6792, .3208): NCKD = .00700; CE = .40761;
    # .40761 + 4 * (.20074 + 8 * .00700) = 1.43457.
    assert hand == pytest.approx(1.43457, abs=1e-5)
    method = _method("dkd", ModelShape(4), ModelShape(4), temperature=temperature)
    loss = method.loss(
        ModelOutputs(torch.tensor([student])),
        ModelOutputs(torch.tensor([teacher])),
        torch.tensor([label]),
        STATE,
    )
    assert loss.item() == pytest.approx(hand, rel=1e-5)


def test_dkd_warmup_follows_the_papers_ratio() -> None:
    method = _method("dkd", ModelShape(4), ModelShape(4))
    # 240 epochs: the official 20-epoch warm-up, 1-based epoch / 20.
    assert method.warmup_factor({"epoch": 0, "epochs": 240}) == pytest.approx(1 / 20)
    assert method.warmup_factor({"epoch": 9, "epochs": 240}) == pytest.approx(0.5)
    assert method.warmup_factor({"epoch": 19, "epochs": 240}) == 1.0
    assert method.warmup_factor({"epoch": 0, "epochs": 15}) == pytest.approx(0.8)
    assert method.warmup_factor({"epoch": 1, "epochs": 15}) == 1.0
    assert _method("dkd", ModelShape(4), ModelShape(4), warmup_fraction=0.0).warmup_factor(STATE) == 1.0


def test_dkd_is_finite_for_extreme_logits_and_only_trains_the_student() -> None:
    student = torch.tensor([[1e4, -1e4, 0.0], [-50.0, 80.0, 3.0]], requires_grad=True)
    teacher = torch.tensor([[-1e4, 1e4, 0.0], [0.0, 1e3, -1e3]], requires_grad=True)
    method = _method("dkd", ModelShape(4), ModelShape(4))
    loss = method.loss(ModelOutputs(student), ModelOutputs(teacher), torch.tensor([0, 1]), STATE)
    loss.backward()
    assert math.isfinite(loss.item())
    assert student.grad is not None and bool(torch.isfinite(student.grad).all())
    assert teacher.grad is None


# ------------------------------------------------------------------------------------------ fitnets


def _identity_regressor(method: DistillMethod) -> None:
    """Regressor conv = identity on its centre tap, no bias; BatchNorm in eval with fresh statistics."""
    conv = method.regressor[0]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        for channel in range(conv.out_channels):
            conv.weight[channel, channel, 1] = 1.0
    method.eval()


def test_fitnets_equals_hand_value_with_identity_regressor() -> None:
    shape = ModelShape(4, ((1, 8), (2, 3), (4, 2)))  # middle layer: index 1, (2, 3)
    method = _method("fitnets", shape, shape, hint_weight=10.0)
    _identity_regressor(method)
    guided = [[1.0, 2.0, 3.0], [0.0, -1.0, 2.0]]
    hint = [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    scale = 1 / math.sqrt(1 + 1e-5)  # eval BatchNorm with running mean 0, variance 1
    mse = (
        sum(
            (scale * g - h) ** 2
            for gr, hr in zip(guided, hint, strict=True)
            for g, h in zip(gr, hr, strict=True)
        )
        / 6
    )
    logits, label = [1.0, 2.0, 0.0], 1
    unused = torch.zeros(1, 1, 8)
    loss = method.loss(
        ModelOutputs(torch.tensor([logits]), feature_maps=[unused, torch.tensor([guided]), unused]),
        ModelOutputs(torch.zeros(1, 3), feature_maps=[unused, torch.tensor([hint]), unused]),
        torch.tensor([label]),
        STATE,
    )
    # By hand (scale ~ 1): squared errors 0, 1, 4, 1, 4, 1 -> mean 11/6 = 1.8333.
    assert mse == pytest.approx(11 / 6, rel=1e-4)
    assert loss.item() == pytest.approx(_ce(logits, label) + 10.0 * mse, rel=1e-5)


def test_fitnets_resamples_the_student_to_the_teacher_length() -> None:
    method = _method(
        "fitnets", ModelShape(4, ((1, 4),)), ModelShape(4, ((1, 2),)), hint_layer="last", hint_weight=1.0
    )
    _identity_regressor(method)
    student_map = torch.tensor([[[1.0, 3.0, 5.0, 7.0]]])  # average-pooled to (2, 6)
    teacher_map = torch.tensor([[[0.0, 0.0]]])
    hint = method.hint_loss(student_map, teacher_map)
    assert hint.item() == pytest.approx((4.0 + 36.0) / 2 / (1 + 1e-5), rel=1e-5)


def test_fitnets_hint_vanishes_when_the_regressor_reproduces_the_teacher_map() -> None:
    torch.manual_seed(1)
    student_shape, teacher_shape = ModelShape(4, ((3, 6),)), ModelShape(4, ((5, 6),))
    method = _method("fitnets", student_shape, teacher_shape)
    student_map = torch.randn(4, 3, 6)
    teacher_map = method.regressor(student_map).detach()  # training-mode BatchNorm, same batch
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    loss = method.loss(
        ModelOutputs(logits, feature_maps=[student_map]),
        ModelOutputs(torch.randn(4, 3), feature_maps=[teacher_map]),
        target,
        STATE,
    )
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))


# ------------------------------------------------------------------------------------------ at


def test_at_vanishes_for_identical_maps_and_ignores_positive_scale() -> None:
    torch.manual_seed(2)
    shape = ModelShape(4, ((3, 8), (4, 4)))
    method = _method("at", shape, shape)
    maps = [torch.randn(2, 3, 8), torch.randn(2, 4, 4)]
    assert method.attention_loss(maps, maps).item() == pytest.approx(0.0, abs=1e-9)
    other = [torch.randn(2, 3, 8), torch.randn(2, 4, 4)]
    reference = method.attention_loss(maps, other).item()
    assert reference > 0
    scaled = [7.5 * m for m in maps]
    assert method.attention_loss(scaled, [0.01 * m for m in other]).item() == pytest.approx(
        reference, rel=1e-5
    )


def test_at_equals_hand_value_on_a_tiny_map() -> None:
    # Student map (1 sample, 2 channels, length 2); teacher map (1 channel, length 4) pooled to 2.
    student_map = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])
    teacher_map = torch.tensor([[[1.0, 1.0, 0.0, 2.0]]])
    method = _method("at", ModelShape(4, ((2, 2),)), ModelShape(4, ((1, 4),)), beta=1000.0)
    assert method.pairs == 1
    # Student: mean_c A^2 = ((1 + 9) / 2, (4 + 0) / 2) = (5, 2); normalised (5, 2) / sqrt 29.
    # Teacher: A^2 = (1, 1, 0, 4) pooled to (1, 2); normalised (1, 2) / sqrt 5.
    q_s = [5 / math.sqrt(29), 2 / math.sqrt(29)]
    q_t = [1 / math.sqrt(5), 2 / math.sqrt(5)]
    # The authors' code (szagoruyko/attention-transfer cifar.py) and mdistiller weight the mean by
    # beta itself, not beta / 2: 1000 * ((.92848 - .44721)^2 + (.37139 - .89443)^2) / 2 = 252.59.
    hand = 1000.0 * sum((a - b) ** 2 for a, b in zip(q_s, q_t, strict=True)) / 2
    assert hand == pytest.approx(252.59, abs=0.01)
    logits, label = [1.0, 2.0, 0.0], 1
    loss = method.loss(
        ModelOutputs(torch.tensor([logits]), feature_maps=[student_map]),
        ModelOutputs(torch.zeros(1, 3), feature_maps=[teacher_map]),
        torch.tensor([label]),
        STATE,
    )
    assert loss.item() == pytest.approx(_ce(logits, label) + hand, rel=1e-5)


def test_at_pairs_the_deepest_layers() -> None:
    student = ModelShape(4, ((2, 16), (2, 8), (2, 4), (2, 2)))
    teacher = ModelShape(4, ((3, 8), (3, 4)))
    assert _method("at", student, teacher).pairs == 2
    assert _method("at", student, teacher, layers=1).pairs == 1
    method = _method("at", student, teacher, layers=1)
    first = [torch.randn(1, 2, 16), torch.randn(1, 2, 8), torch.randn(1, 2, 4), torch.randn(1, 2, 2)]
    changed = [torch.randn(1, 2, 16), torch.randn(1, 2, 8), torch.randn(1, 2, 4), first[3]]
    teacher_maps = [torch.randn(1, 3, 8), torch.randn(1, 3, 4)]
    assert method.attention_loss(first, teacher_maps).item() == pytest.approx(
        method.attention_loss(changed, teacher_maps).item()
    )


# ------------------------------------------------------------------------------------------ rkd


def test_rkd_distance_potential_on_three_points() -> None:
    points = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    # Distances 3, 4, 5 (a 3-4-5 triangle), mean 4.
    expected = torch.tensor([[0.0, 0.75, 1.0], [0.75, 0.0, 1.25], [1.0, 1.25, 0.0]])
    torch.testing.assert_close(distance_potential(points), expected)
    angles = angle_potential(points).view(3, 3, 3)
    # Angle at vertex 0 between the legs to 1 and 2 is 90 degrees; at vertex 1 its cosine is 3/5.
    assert angles[0, 1, 2].item() == pytest.approx(0.0, abs=1e-6)
    assert angles[1, 0, 2].item() == pytest.approx(3 / 5, rel=1e-6)


def test_rkd_equals_hand_value_on_three_points() -> None:
    teacher = [[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]
    student = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    # Student distances 1, 1, sqrt2 with mean (2 + sqrt2) / 3; teacher 3, 4, 5 with mean 4.
    mean_s = (2 + math.sqrt(2)) / 3
    pairs = [(1 / mean_s, 0.75), (1 / mean_s, 1.0), (math.sqrt(2) / mean_s, 1.25)]

    def huber(a: float, b: float) -> float:
        d = abs(a - b)
        return 0.5 * d * d if d < 1 else d - 0.5

    distance = 2 * sum(huber(a, b) for a, b in pairs) / 9  # each pair twice, over all 9 entries
    method = _method("rkd", ModelShape(2), ModelShape(2), angle_weight=0.0)
    logits, label = [1.0, 2.0, 0.0], 1
    loss = method.loss(
        ModelOutputs(torch.tensor([logits] * 3), torch.tensor(student)),
        ModelOutputs(torch.zeros(3, 3), torch.tensor(teacher)),
        torch.tensor([label] * 3),
        STATE,
    )
    assert loss.item() == pytest.approx(_ce(logits, label) + 25.0 * distance, rel=1e-5)


def test_rkd_vanishes_when_the_teacher_is_a_scaled_rotation_of_the_student() -> None:
    torch.manual_seed(3)
    embeddings = torch.randn(8, 5, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    method = _method("rkd", ModelShape(5), ModelShape(5))
    assert method.relational_loss(embeddings, 3.7 * embeddings @ rotation).item() == pytest.approx(
        0.0, abs=1e-12
    )
    assert method.relational_loss(embeddings, torch.randn(8, 5, dtype=torch.float64)).item() > 0


def test_rkd_handles_a_batch_of_one() -> None:
    method = _method("rkd", ModelShape(3), ModelShape(4))
    student = torch.randn(1, 3, requires_grad=True)
    loss = method.relational_loss(student, torch.randn(1, 4))
    loss.backward()
    assert loss.item() == 0.0 and bool(torch.isfinite(student.grad).all())


# ------------------------------------------------------------------------------------------ mgd


def _identity_conv(conv: torch.nn.Conv1d, gain: float = 1.0) -> None:
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        centre = conv.kernel_size[0] // 2
        for channel in range(conv.out_channels):
            conv.weight[channel, channel, centre] = gain


def test_mgd_equals_hand_value_with_identity_generator_and_no_mask() -> None:
    # Student 1 channel -> align (1x1 conv, weight 2) to 2 teacher channels; generator convs are
    # identities, so G(x) = ReLU(x); mask ratio 0 keeps every channel.
    method = _method(
        "mgd",
        ModelShape(4, ((1, 2),)),
        ModelShape(4, ((2, 2),)),
        alpha_mgd=0.5,
        mask_ratio=0.0,
        scale_to_map=False,
    )
    assert method.align is not None and method.weight == 0.5
    with torch.no_grad():
        method.align.weight.fill_(2.0)
        method.align.bias.copy_(torch.tensor([0.0, -10.0]))
    _identity_conv(method.generator[0])
    _identity_conv(method.generator[2])
    student_map = torch.tensor([[[1.0, -1.0]], [[0.5, 2.0]]])  # (B=2, 1, 2)
    teacher_map = torch.tensor([[[1.0, 1.0], [0.0, 3.0]], [[1.0, 4.0], [0.0, 0.0]]])
    # Aligned: channel 0 = 2x, channel 1 = 2x - 10 (negative, so ReLU gives 0).
    # Sample 1: G = [[2, 0], [0, 0]] vs [[1, 1], [0, 3]] -> 1 + 1 + 0 + 9 = 11.
    # Sample 2: G = [[1, 4], [0, 0]] vs [[1, 4], [0, 0]] -> 0.  Sum / B = 5.5.
    assert method.generation_loss(student_map, teacher_map).item() == pytest.approx(5.5)
    logits, label = [1.0, 2.0, 0.0], 1
    loss = method.loss(
        ModelOutputs(torch.tensor([logits] * 2), feature_maps=[student_map]),
        ModelOutputs(torch.zeros(2, 3), feature_maps=[teacher_map]),
        torch.tensor([label] * 2),
        STATE,
    )
    assert loss.item() == pytest.approx(_ce(logits, label) + 0.5 * 5.5, rel=1e-6)


def test_mgd_mask_comes_from_the_global_generator() -> None:
    shape = ModelShape(4, ((8, 4),))
    method = _method("mgd", shape, shape, mask_ratio=0.5)
    assert method.align is None  # equal channel counts: no alignment layer
    _identity_conv(method.generator[0])
    _identity_conv(method.generator[2])
    student_map = torch.rand(3, 8, 4) + 1.0  # positive, so ReLU passes it through
    teacher_map = torch.zeros(3, 8, 4)
    torch.manual_seed(4)
    first = method.generation_loss(student_map, teacher_map).item()
    torch.manual_seed(4)
    kept = (torch.rand(3, 8, 1) >= 0.5).float()
    assert first == pytest.approx(((student_map * kept) ** 2).sum().item() / 3, rel=1e-6)
    torch.manual_seed(4)
    assert method.generation_loss(student_map, teacher_map).item() == first


def test_mgd_weight_scales_the_authors_alpha_to_the_teacher_map_size() -> None:
    # alpha_mgd = 7e-5 was tuned for 512 x 7 x 7 = 25,088 summed elements (ImageNet, ResNet-18).
    assert _method("mgd", ModelShape(4, ((8, 4),)), ModelShape(4, ((8, 4),))).options.alpha_mgd == 7e-5
    radio = _method("mgd", ModelShape(4, ((32, 16),)), ModelShape(4, ((64, 16),)))
    assert radio.weight == pytest.approx(7e-5 * 25088 / (64 * 16))  # = 1.715e-3
    imagenet = _method("mgd", ModelShape(4, ((256, 7, 7),)), ModelShape(4, ((512, 7, 7),)))
    assert imagenet.weight == pytest.approx(7e-5)  # the reference size: the authors' weight unchanged
    tiny = _method("mgd", ModelShape(4, ((64, 1, 1),)), ModelShape(4, ((512, 1, 1),)))
    assert tiny.weight == pytest.approx(7e-5 * 49)
    fixed = _method("mgd", ModelShape(4, ((32, 16),)), ModelShape(4, ((64, 16),)), scale_to_map=False)
    assert fixed.weight == 7e-5
    # The term per map is then alpha_mgd * 25,088 * mean squared error, whatever the map size:
    torch.manual_seed(0)
    for shape in ((64, 16), (512, 49)):
        method = _method("mgd", ModelShape(4, (shape,)), ModelShape(4, (shape,)), mask_ratio=0.0)
        _identity_conv(method.generator[0])
        _identity_conv(method.generator[2])
        student_map = torch.ones(2, *shape)
        term = method.weight * method.generation_loss(student_map, torch.zeros(2, *shape))
        assert term.item() == pytest.approx(7e-5 * 25088, rel=1e-5)


def test_mgd_gradients_reach_student_align_and_generator() -> None:
    torch.manual_seed(5)
    method = _method("mgd", ModelShape(4, ((3, 8),)), ModelShape(4, ((6, 4),)))
    student_map = torch.randn(2, 3, 8, requires_grad=True)
    teacher_map = torch.randn(2, 6, 4, requires_grad=True)
    method.generation_loss(student_map, teacher_map).backward()
    assert student_map.grad is not None and teacher_map.grad is None
    for parameter in method.parameters():
        assert parameter.grad is not None and float(parameter.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------------------ real models


@pytest.mark.parametrize("student_name", ["edgekd:kd-cnn", "edgekd:kd-mobilenet"])
@pytest.mark.parametrize("name", CLASSIC)
def test_method_on_the_real_student_and_teacher(name: str, student_name: str) -> None:
    torch.manual_seed(6)
    student_model = build_model(student_name, 11)
    teacher_model = build_model("edgekd:clst", 11)
    student_shape = probe_shape(student_model, (2, 128))
    teacher_shape = probe_shape(teacher_model, (2, 128))
    method = _method(name, student_shape, teacher_shape, num_classes=11)
    x, target = torch.randn(4, 2, 128), torch.tensor([0, 3, 7, 10])
    student = model_outputs(student_model, x, method.needs_features, method.needs_feature_maps)
    teacher = model_outputs(teacher_model, x, method.needs_features, method.needs_feature_maps)
    loss = method.loss(student, teacher, target, {"epoch": 0, "epochs": 15, "step": 0, "steps": 10})
    assert loss.dim() == 0 and math.isfinite(loss.item())
    loss.backward()
    student_grads = [p.grad for p in student_model.parameters() if p.grad is not None]
    assert student_grads and any(float(g.abs().sum()) > 0 for g in student_grads)
    assert all(p.grad is None for p in teacher_model.parameters())
    for parameter in method.parameters():
        assert parameter.grad is not None


# ------------------------------------------------------------------------------------------ 2-D maps


def test_resample_pools_and_interpolates_each_spatial_axis() -> None:
    feature_map = torch.arange(8.0).reshape(1, 1, 4, 2)  # rows [0,1], [2,3], [4,5], [6,7]
    pooled = resample(feature_map, (2, 2))
    torch.testing.assert_close(pooled, torch.tensor([[[[1.0, 2.0], [5.0, 6.0]]]]))
    mixed = resample(feature_map, (2, 4))  # H pooled 4 -> 2, then W interpolated 2 -> 4
    expected = F.interpolate(pooled, size=(2, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(mixed, expected)
    assert resample(feature_map, (4, 2)) is feature_map


def test_fitnets_on_2d_maps_uses_conv2d_and_pools_the_student() -> None:
    method = _method(
        "fitnets",
        ModelShape(4, ((1, 4, 4),)),
        ModelShape(4, ((1, 2, 2),)),
        hint_layer="last",
        hint_weight=1.0,
    )
    assert isinstance(method.regressor[0], torch.nn.Conv2d)
    assert isinstance(method.regressor[1], torch.nn.BatchNorm2d)
    with torch.no_grad():  # identity regressor: centre tap 1, no bias
        method.regressor[0].weight.zero_()
        method.regressor[0].bias.zero_()
        method.regressor[0].weight[0, 0, 1, 1] = 1.0
    method.eval()
    student_map = torch.arange(16.0).reshape(1, 1, 4, 4)  # 2x2 average pool: 2.5, 4.5, 10.5, 12.5
    teacher_map = torch.zeros(1, 1, 2, 2)
    hand = (2.5**2 + 4.5**2 + 10.5**2 + 12.5**2) / 4 / (1 + 1e-5)
    assert method.hint_loss(student_map, teacher_map).item() == pytest.approx(hand, rel=1e-5)


def test_at_on_2d_maps_vanishes_for_identical_maps_and_ignores_scale() -> None:
    torch.manual_seed(7)
    shape = ModelShape(4, ((3, 8, 8), (4, 4, 4)))
    method = _method("at", shape, ModelShape(4, ((5, 4, 4), (6, 2, 2))))
    maps = [torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4)]
    assert method.attention_loss(maps, [3.0 * m for m in maps]).item() == pytest.approx(0.0, abs=1e-6)
    teacher_maps = [torch.randn(2, 5, 4, 4), torch.randn(2, 6, 2, 2)]
    assert method.attention_loss(maps, teacher_maps).item() > 0


def test_mgd_on_2d_maps_masks_whole_channels_and_trains_its_parts() -> None:
    torch.manual_seed(8)
    method = _method("mgd", ModelShape(4, ((3, 8, 8),)), ModelShape(4, ((6, 4, 4),)))
    assert isinstance(method.align, torch.nn.Conv2d) and isinstance(method.generator[0], torch.nn.Conv2d)
    student_map = torch.randn(2, 3, 8, 8, requires_grad=True)
    teacher_map = torch.randn(2, 6, 4, 4)
    method.generation_loss(student_map, teacher_map).backward()
    assert student_map.grad is not None
    for parameter in method.parameters():
        assert parameter.grad is not None and float(parameter.grad.abs().sum()) > 0


def test_feature_map_methods_reject_maps_of_different_ranks() -> None:
    with pytest.raises(RecipeError, match="the same for both models"):
        _method("fitnets", ModelShape(4, ((3, 8),)), ModelShape(4, ((3, 4, 4),)))
