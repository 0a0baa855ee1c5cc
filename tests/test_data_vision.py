"""Image datasets: scikit-learn digits, ImageFolder directories (both layouts, errors), image augmentation."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from edgekd.data import DATASETS, build_dataset, raw_and_preprocess
from edgekd.data.augment import (
    ImageAugmentationBank,
    IQAugmentationBank,
    TimmAugmentationBank,
    augmentation_bank,
)
from edgekd.data.vision import IMAGENET_MEAN, IMAGENET_STD, denormalise_images, normalise_images
from edgekd.errors import DataError
from edgekd.recipe import DataSpec
from tests.test_cli import assert_user_error, run_cli

DIGITS = DataSpec(name="digits")


# --------------------------------------------------------------------------- digits


def test_digits_shapes_split_and_meta() -> None:
    train, val, meta = build_dataset(DIGITS, seed=0)
    assert len(train) + len(val) == 1797 and len(val) == round(1797 * 0.25)
    for part in (train, val):
        assert part.x.dtype == np.float32 and part.x.shape[1:] == (3, 32, 32)
        assert part.y.dtype == np.int64 and part.snr is None
    assert meta.classes == [str(d) for d in range(10)] and meta.input_shape == (3, 32, 32)
    assert meta.mirror_invariant is False
    assert np.bincount(val.y).min() >= 40  # stratified: every digit held out in proportion


def test_digits_preprocessing_is_the_recorded_one() -> None:
    from sklearn.datasets import load_digits

    data, meta = DATASETS.get("digits")(DIGITS, 0)  # unsplit, sklearn's order
    raw = load_digits().images[5].astype(np.float32) / 16
    resized = F.interpolate(torch.from_numpy(raw)[None, None], size=(32, 32), mode="bilinear").numpy()[0, 0]
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    expected = (resized[None] - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(data.x[5], expected, rtol=1e-6, atol=1e-6)
    restored = denormalise_images(data.x)
    assert restored.min() >= -1e-5 and restored.max() <= 1 + 1e-5
    np.testing.assert_allclose(restored[:, 0], restored[:, 2], atol=1e-5)  # gray replicated to RGB
    norm = meta.normalisation
    assert norm["type"] == "image-mean-std" and norm["size"] == [32, 32]
    assert norm["mean"] == list(IMAGENET_MEAN) and "bilinear" in norm["description"]


def test_imagenet_constants_are_timms() -> None:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    assert tuple(IMAGENET_DEFAULT_MEAN) == IMAGENET_MEAN and tuple(IMAGENET_DEFAULT_STD) == IMAGENET_STD


def test_digits_are_deterministic_and_fingerprinted() -> None:
    first, second = build_dataset(DIGITS, seed=0), build_dataset(DIGITS, seed=0)
    np.testing.assert_array_equal(first[0].x, second[0].x)
    np.testing.assert_array_equal(first[1].y, second[1].y)
    assert first[2].fingerprint == second[2].fingerprint
    other_seed = build_dataset(DIGITS, seed=1)
    assert other_seed[2].fingerprint != first[2].fingerprint
    assert not np.array_equal(other_seed[1].y, first[1].y)
    small = build_dataset(DataSpec(name="digits", image_size=16), seed=0)
    assert small[0].x.shape[1:] == (3, 16, 16) and small[2].fingerprint != first[2].fingerprint


def test_raw_and_preprocess_round_trips_images() -> None:
    _, val, meta = build_dataset(DIGITS, seed=0)
    raw, preprocess = raw_and_preprocess(meta, val.x[:4])
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    np.testing.assert_allclose(preprocess(raw), val.x[:4], atol=1e-5)


# --------------------------------------------------------------------------- ImageFolder

COLOURS = {"cat": (200, 30, 30), "dog": (20, 180, 60), "owl": (10, 10, 240)}


def _write_images(folder: Path, count: int, colour: tuple[int, int, int], start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        shade = tuple(min(255, c + 3 * i) for c in colour)
        image = Image.new("RGB", (12, 10), shade)
        suffix = ".png" if i % 2 == 0 else ".jpg"
        image.save(folder / f"img{i}{suffix}")
    Image.new("L", (9, 9), 128).save(folder / "gray.PNG")  # grayscale, upper-case extension
    (folder / "notes.txt").write_text("not an image")


def _flat(root: Path, per_class: int = 5) -> Path:
    for name, colour in COLOURS.items():
        _write_images(root / name, per_class, colour)
    return root


def _split(root: Path) -> Path:
    for name, colour in COLOURS.items():
        _write_images(root / "train" / name, 4, colour)
        _write_images(root / "val" / name, 2, colour, start=10)
    return root


def test_imagefolder_class_subfolders_are_split_by_class(tmp_path: Path) -> None:
    spec = DataSpec(name="imagefolder", path=_flat(tmp_path), image_size=16)
    train, val, meta = build_dataset(spec, seed=0)
    assert meta.classes == ["cat", "dog", "owl"] and meta.input_shape == (3, 16, 16)
    assert len(train) + len(val) == 18 and len(val) == round(18 * 0.25)
    assert sorted(np.bincount(val.y).tolist()) == [1, 1, 2]  # stratified by class
    assert np.bincount(np.concatenate([train.y, val.y])).tolist() == [6, 6, 6]
    assert meta.mirror_invariant is True and meta.source == str(tmp_path)
    # A solid red PNG comes back as its colour after undoing the normalisation.
    data, _ = DATASETS.get("imagefolder")(spec, 0)
    first_cat = denormalise_images(data.x[0])  # cat/gray.PNG sorts first, then img0.png
    np.testing.assert_allclose(first_cat, 128 / 255, atol=1e-5)
    np.testing.assert_allclose(
        denormalise_images(data.x[1])[:, 4, 4], np.array(COLOURS["cat"]) / 255, atol=1e-5
    )
    assert build_dataset(spec, seed=0)[2].fingerprint == meta.fingerprint


def test_imagefolder_train_val_layout_keeps_its_split(tmp_path: Path) -> None:
    spec = DataSpec(name="imagefolder", path=_split(tmp_path))
    train, val, meta = build_dataset(spec, seed=0)
    assert (len(train), len(val)) == (15, 9)  # (4 + gray) and (2 + gray) per class
    assert np.bincount(train.y).tolist() == [5, 5, 5] and np.bincount(val.y).tolist() == [3, 3, 3]
    assert not np.all(np.diff(train.y) >= 0)  # seeded random order, not class-sorted
    assert meta.input_shape == (3, 32, 32)
    capped = build_dataset(DataSpec(name="imagefolder", path=tmp_path, max_frames=6), seed=0)
    assert (len(capped[0]), len(capped[1])) == (6, 6)
    assert capped[2].fingerprint != meta.fingerprint


def _missing(root: Path) -> Path:
    return root / "missing"


def _no_images(root: Path) -> Path:
    (root / "cat").mkdir()
    (root / "cat" / "readme.txt").write_text("no pictures here")
    return root


def _classes_differ(root: Path) -> Path:
    _split(root)
    shutil.rmtree(root / "val" / "owl")
    return root


def _unreadable(root: Path) -> Path:
    _flat(root)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG garbage")
    return root


@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        (_missing, ["missing: not found", "data.path"]),
        (_no_images, ["no images found"]),
        (_classes_differ, ["train/ and val/ have different class folders", "only in train: owl"]),
        (_unreadable, ["broken.png: cannot be read as an image", "fix or remove"]),
    ],
)
def test_imagefolder_mistakes_are_one_line_through_the_cli(tmp_path: Path, make, fragments) -> None:
    root = tmp_path / "images"
    root.mkdir()
    result = run_cli(
        "compress", "--data", "imagefolder", "--data-path", str(make(root)), "--teacher", "timm:resnet18",
        "--student", "timm:mobilenetv3_small_100", "--set", f"runs_dir={tmp_path / 'runs'}",
    )  # fmt: skip
    assert_user_error(result, *fragments)


def test_imagefolder_without_path_or_with_one_class(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs data.path"):
        build_dataset(DataSpec(name="imagefolder"), seed=0)
    _write_images(tmp_path / "only", 3, (1, 2, 3))
    with pytest.raises(DataError, match="need at least 2"):
        build_dataset(DataSpec(name="imagefolder", path=tmp_path), seed=0)


# --------------------------------------------------------------------------- augmentation


def test_image_bank_variant_zero_is_identity_and_shifts_are_translations() -> None:
    bank = ImageAugmentationBank(samples=6, variants=5, seed=3, pad=2, flip=False)
    x = torch.randn(6, 3, 8, 8)
    indices = np.arange(6)
    torch.testing.assert_close(bank.apply(x, indices, np.zeros(6, int)), x)
    assert not bank.flip.any() and np.abs(bank.shift).max() <= 2 and bank.shift[1:].any()
    dot = torch.zeros(1, 1, 8, 8)
    dot[0, 0, 4, 4] = 1.0
    for variant in range(1, 5):
        out = bank.apply(dot, np.array([2]), np.array([variant]))
        dy, dx = bank.shift[variant, 2]
        assert out[0, 0, 4 + dy, 4 + dx] == 1.0 and out.sum() == 1.0  # the dot moved by (dy, dx)


def test_image_bank_is_deterministic_per_sample_and_variant_and_flips_when_allowed() -> None:
    bank = ImageAugmentationBank(samples=10, variants=4, seed=0, pad=1, flip=True)
    again = ImageAugmentationBank(samples=10, variants=4, seed=0, pad=1, flip=True)
    x = torch.randn(10, 3, 6, 6)
    variants = np.array([1, 2, 3, 1, 2, 3, 1, 2, 3, 0])
    whole = bank.apply(x, np.arange(10), variants)
    torch.testing.assert_close(whole, again.apply(x, np.arange(10), variants))
    part = bank.apply(x[3:5], np.array([3, 4]), variants[3:5])  # another batch composition
    torch.testing.assert_close(part, whole[3:5])
    assert bank.flip[1:].any() and not bank.flip[0].any()
    v, i = np.argwhere(bank.flip)[0]
    unshifted = ImageAugmentationBank(samples=10, variants=4, seed=0, pad=1, flip=True)
    unshifted.shift[:] = 0
    torch.testing.assert_close(
        unshifted.apply(x[i : i + 1], np.array([i]), np.array([v])), x[i : i + 1].flip(-1)
    )


def test_augmentation_bank_follows_the_input_kind() -> None:
    _, _, digits = build_dataset(DIGITS, seed=0)
    bank = augmentation_bank(digits, samples=4, variants=3, seed=0)
    assert isinstance(bank, ImageAugmentationBank) and not bank.flip.any()
    assert np.abs(bank.shift).max() <= 4  # 32 // 8
    _, _, radio = build_dataset(DataSpec(frames_per_class_snr=2), seed=0)
    assert isinstance(augmentation_bank(radio, samples=4, variants=3, seed=0), IQAugmentationBank)


def _timm_bank(samples: int, variants: int, seed: int = 0, flip: bool = True) -> TimmAugmentationBank:
    return TimmAugmentationBank(samples, variants, seed, flip, list(IMAGENET_MEAN), list(IMAGENET_STD))


def test_timm_bank_crops_by_its_box_and_keeps_variant_zero() -> None:
    """A horizontal ramp image: a crop's mean is the ramp's value at the box's centre (flips keep it)."""
    bank = _timm_bank(samples=8, variants=6, seed=1)
    bank.jitter[:] = 1.0  # geometry only
    side = 64
    ramp = np.broadcast_to((np.arange(side) + 0.5) / side, (3, side, side))
    x = torch.from_numpy(normalise_images(np.stack([ramp] * 8)))
    indices = np.arange(8)
    torch.testing.assert_close(bank.apply(x, indices, np.zeros(8, int)), x)
    for variant in range(1, 6):
        out = denormalise_images(bank.apply(x, indices, np.full(8, variant)).numpy())
        width, centre = bank.theta[variant, :, 0, 0].abs().numpy(), bank.theta[variant, :, 0, 2].numpy()
        np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), (centre + 1) / 2, atol=0.02)
        spread = out[:, 0, 0, -1] - out[:, 0, 0, 0]  # right edge minus left edge of the crop
        np.testing.assert_allclose(np.abs(spread), width * (side - 1) / side, atol=0.03)
    area = bank.theta[1:, :, 0, 0].abs() * bank.theta[1:, :, 1, 1]
    assert area.min() >= 0.08 - 1e-6 and area.max() <= 1.0 and (bank.theta[1:, :, 0, 0] < 0).any()


def test_timm_bank_jitters_brightness_contrast_saturation_within_04() -> None:
    bank = _timm_bank(samples=4, variants=5, seed=2, flip=False)
    bank.theta[:] = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])  # no crop: colour only
    gray = np.full((4, 3, 8, 8), 0.5, dtype=np.float32)  # a grey image: only brightness changes it
    x = torch.from_numpy(normalise_images(gray))
    for variant in range(1, 5):
        out = denormalise_images(bank.apply(x, np.arange(4), np.full(4, variant)).numpy())
        np.testing.assert_allclose(
            out[:, :, 0, 0], np.repeat(0.5 * bank.jitter[variant, :, :1], 3, axis=1), atol=1e-5
        )
    assert bank.jitter.min() >= 0.6 and bank.jitter.max() <= 1.4
    assert not (bank.theta[..., 0, 0] < 0).any()  # flip=False: never mirrored
    again = _timm_bank(samples=4, variants=5, seed=2, flip=False)
    assert np.array_equal(again.jitter, bank.jitter) and not np.array_equal(
        _timm_bank(4, 5, 3).jitter, bank.jitter
    )


def test_augmentation_policy_timm_is_for_images_and_is_described() -> None:
    _, _, digits = build_dataset(DIGITS, seed=0)
    bank = augmentation_bank(digits, samples=4, variants=3, seed=0, policy="timm")
    assert isinstance(bank, TimmAugmentationBank) and not bank.flips  # digits are not mirror-invariant
    described = bank.describe()
    assert described["policy"] == "timm" and "RandomResizedCrop" in described["ops"][0]
    assert not any("flip" in op for op in described["ops"]) and "ColorJitter 0.4" in described["ops"][-1]
    _, _, radio = build_dataset(DataSpec(frames_per_class_snr=2), seed=0)
    with pytest.raises(DataError, match="distill.augment.policy='timm' applies to images"):
        augmentation_bank(radio, samples=4, variants=3, seed=0, policy="timm")
