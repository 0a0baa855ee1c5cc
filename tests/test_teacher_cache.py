"""Augmentation bank, the per-variant teacher cache, semi-supervised labels and method options."""

import numpy as np
import pytest
import torch

from edgekd.data.augment import IQAugmentationBank
from edgekd.data.base import ArrayDataset, hide_labels
from edgekd.distill.methods import METHODS, build_method, parse_options, resolved_options
from edgekd.distill.outputs import model_outputs, probe_shape
from edgekd.distill.teacher_cache import cache_key, cached_teacher_outputs, compute_teacher_outputs
from edgekd.distill.trainer import split_held_out, train
from edgekd.errors import RecipeError
from edgekd.models import build_model
from edgekd.recipe import DistillSpec, TrainSpec


def _frames(n: int = 12, length: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 2, length)).astype(np.float32)


def test_bank_variant_zero_is_identity_and_others_preserve_power() -> None:
    x = torch.from_numpy(_frames())
    bank = IQAugmentationBank(len(x), variants=3, seed=5, frame_length=32)
    indices = np.arange(len(x))
    assert torch.equal(bank.apply(x, indices, np.zeros(len(x), int)), x)
    augmented = bank.apply(x, indices, np.full(len(x), 2))
    assert not torch.allclose(augmented, x)
    power = lambda frames: frames.pow(2).sum(dim=(1, 2))  # noqa: E731
    torch.testing.assert_close(power(augmented), power(x))


def test_bank_is_a_phase_rotation_after_a_circular_shift() -> None:
    x = torch.from_numpy(_frames(n=1))
    bank = IQAugmentationBank(1, variants=2, seed=1, frame_length=32)
    out = bank.apply(x, np.array([0]), np.array([1])).numpy()[0]
    theta, shift = bank.phase[1, 0], bank.shift[1, 0]
    z = np.roll(x.numpy()[0, 0] + 1j * x.numpy()[0, 1], shift) * np.exp(1j * theta)
    np.testing.assert_allclose(out[0] + 1j * out[1], z, atol=1e-5)


def test_bank_is_deterministic_from_its_seed() -> None:
    a, b = (
        IQAugmentationBank(8, 4, seed=3, frame_length=32),
        IQAugmentationBank(8, 4, seed=3, frame_length=32),
    )
    c = IQAugmentationBank(8, 4, seed=4, frame_length=32)
    assert np.array_equal(a.phase, b.phase) and np.array_equal(a.shift, b.shift)
    assert not np.array_equal(a.phase, c.phase)


def test_cache_holds_one_output_per_variant_and_is_reused(tmp_path) -> None:
    teacher = build_model("edgekd:kd-cnn", num_classes=3).eval()
    x = _frames(n=10)
    bank = IQAugmentationBank(len(x), variants=3, seed=0, frame_length=32)
    outputs, hit = cached_teacher_outputs(teacher, x, tmp_path, "key", bank, batch_size=4)
    assert not hit and outputs.logits.shape == (3, 10, 3) and outputs.features.shape == (3, 10, 64)
    again, hit = cached_teacher_outputs(teacher, x, tmp_path, "key", bank, batch_size=4)
    assert hit and isinstance(again.logits, np.memmap)
    np.testing.assert_array_equal(again.logits, outputs.logits)
    with torch.no_grad():  # the cached output of variant 2 is the teacher's output on that very view
        view = bank.apply(torch.from_numpy(x), np.arange(10), np.full(10, 2))
        np.testing.assert_allclose(outputs.logits[2], teacher(view).numpy(), atol=1e-5)


def test_cache_key_changes_with_teacher_data_and_bank() -> None:
    base = cache_key("t", "d", None)
    assert len({base, cache_key("t2", "d"), cache_key("t", "d2"), cache_key("t", "d", {"seed": 1})}) == 4
    assert cache_key("t", "d", {"seed": 1}) != cache_key("t", "d", {"seed": 2})


def test_teacher_outputs_without_bank_have_one_variant() -> None:
    teacher = build_model("edgekd:kd-cnn", num_classes=4).eval()
    outputs = compute_teacher_outputs(teacher, _frames(n=5), batch_size=2)
    assert outputs.logits.shape == (1, 5, 4)


def test_hidden_labels_keep_a_stratified_share() -> None:
    y = np.repeat(np.arange(4), 25)
    data = ArrayDataset(np.zeros((100, 2, 8), np.float32), y, None)
    hidden = hide_labels(data, 0.2, seed=0)
    kept = hidden.y >= 0
    assert kept.sum() == 20 and np.array_equal(hidden.y[kept], y[kept])
    assert np.bincount(hidden.y[kept], minlength=4).tolist() == [5, 5, 5, 5]
    assert hide_labels(data, 1.0, seed=0) is data


def test_held_out_split_is_stratified_and_disjoint() -> None:
    y = np.repeat(np.arange(3), 20)
    fit, held = split_held_out(y, 0.1, seed=0)
    assert len(np.intersect1d(fit, held)) == 0 and len(fit) + len(held) == 60
    assert np.bincount(y[held]).tolist() == [2, 2, 2]
    assert len(split_held_out(y, 0.0, seed=0)[1]) == 0


def test_options_are_per_method_and_validated() -> None:
    spec = DistillSpec(method="skd", options={"skd": {"beta": 0.25}, "kd": {}})
    assert resolved_options(spec) == {"beta": 0.25}
    with pytest.raises(
        RecipeError, match=r"distill\.options\.skd\.gamma: unknown option; method 'skd' takes: beta"
    ):
        parse_options(METHODS.get("skd"), DistillSpec(method="skd", options={"skd": {"gamma": 1}}))
    with pytest.raises(RecipeError, match=r"distill\.options\.skd\.beta"):
        parse_options(METHODS.get("skd"), DistillSpec(method="skd", options={"skd": {"beta": -1}}))
    with pytest.raises(RecipeError, match="did you mean 'skd'"):
        parse_options(METHODS.get("skd"), DistillSpec(method="skd", options={"sdk": {}}), "sdk")


def test_hint_layer_maps_follow_the_model_depth() -> None:
    model = build_model("edgekd:kd-cnn", num_classes=3)
    shape = probe_shape(model, (2, 128))
    assert shape.feature_dim == 64 and shape.map_shapes == ((16, 128), (32, 64), (48, 32), (64, 16))
    outputs = model_outputs(model.eval(), torch.zeros(2, 2, 128), features=True, feature_maps=True)
    assert [tuple(m.shape) for m in outputs.feature_maps] == [
        (2, 16, 128),
        (2, 32, 64),
        (2, 48, 32),
        (2, 64, 16),
    ]
    torch.testing.assert_close(outputs.logits, model(torch.zeros(2, 2, 128)))


def test_training_from_the_cache_equals_training_with_the_live_teacher(tmp_path) -> None:
    """The cache changes where teacher outputs come from, never what the student learns."""
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.standard_normal((48, 2, 32)).astype(np.float32), rng.integers(0, 3, 48), None)
    teacher = build_model("edgekd:kd-cnn", num_classes=3).eval().requires_grad_(False)
    bank = IQAugmentationBank(len(data), variants=2, seed=0, frame_length=32)
    cached, _ = cached_teacher_outputs(teacher, data.x, tmp_path / "cache", "k", bank)
    weights = []
    for outputs in (cached, None):
        torch.manual_seed(0)
        student = build_model("edgekd:cnn", num_classes=3)
        shape = probe_shape(student, (2, 32))
        method = build_method(DistillSpec(method="kd"), 3, shape, probe_shape(teacher, (2, 32)))
        run_dir = tmp_path / ("cached" if outputs is not None else "live")
        spec = TrainSpec(epochs=2, batch_size=16)
        train(student, method, data, data, spec, 0, run_dir, "f", teacher, outputs, bank, log=lambda _: None)
        weights.append(student.head.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], atol=1e-5, rtol=1e-4)


def test_equal_weights_give_byte_identical_checkpoints(tmp_path) -> None:
    """The teacher cache is keyed by the checkpoint's hash, so saving must not depend on the file name."""
    from edgekd.models.checkpoint import save_checkpoint

    model = build_model("edgekd:kd-cnn", num_classes=3)
    save_checkpoint(tmp_path / "a.pt", model, "edgekd:kd-cnn")
    save_checkpoint(tmp_path / "sub" / "b.pt", model, "edgekd:kd-cnn")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "sub" / "b.pt").read_bytes()
