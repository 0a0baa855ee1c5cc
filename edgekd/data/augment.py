"""Seeded augmentation banks: K fixed variants per train sample, so a teacher's output on each can be cached.

Variant 0 of every sample is the sample itself; variants 1..K-1 draw their parameters once from the
bank's seed, so variant ``k`` of sample ``i`` is the same tensor in every epoch, run and process.
That is what lets the teacher run once per (sample, variant) and its outputs be stored and reused
(Beyer et al., "Knowledge distillation: A good teacher is patient and consistent", CVPR 2022, show
the teacher must see the very view the student sees; a fixed bank keeps that while caching).
"""

from __future__ import annotations

import numpy as np
import torch

from edgekd.data.base import DatasetMeta
from edgekd.errors import DataError


class IQAugmentationBank:
    """Label-preserving views of IQ frames (2, L): a carrier-phase rotation and a circular time shift.

    Rotating the complex baseband signal ``I + jQ`` by a phase ``θ`` and shifting the frame's start
    change neither the modulation nor the SNR: the receiver's carrier phase and frame timing are
    arbitrary in the first place. Per-frame power is unchanged, so normalisation still holds.
    """

    def __init__(self, samples: int, variants: int, seed: int, frame_length: int) -> None:
        if variants < 1:
            raise ValueError(f"variants must be >= 1, got {variants}")
        rng = np.random.default_rng([seed, samples, variants, frame_length])
        self.variants = variants
        self.phase = rng.uniform(0.0, 2 * np.pi, size=(variants, samples)).astype(np.float32)
        self.shift = rng.integers(0, frame_length, size=(variants, samples))
        self.phase[0] = 0.0
        self.shift[0] = 0

    def apply(self, x: torch.Tensor, indices: np.ndarray, variants: np.ndarray) -> torch.Tensor:
        """Variant ``variants[j]`` of sample ``indices[j]`` for each frame ``x[j]`` of a batch (B, 2, L)."""
        phase = torch.from_numpy(self.phase[variants, indices])
        shift = torch.from_numpy(self.shift[variants, indices])
        length = x.shape[-1]
        positions = (torch.arange(length).unsqueeze(0) - shift.unsqueeze(1)) % length
        shifted = torch.gather(x, 2, positions.unsqueeze(1).expand(-1, x.shape[1], -1))
        cos, sin = torch.cos(phase)[:, None], torch.sin(phase)[:, None]
        i, q = shifted[:, 0], shifted[:, 1]
        return torch.stack((i * cos - q * sin, i * sin + q * cos), dim=1)

    def describe(self) -> dict:
        return {
            "policy": "default",
            "ops": ["carrier phase rotation U(0, 2π)", "circular time shift U{0..L-1} samples"],
            "as_in": "variant 0 is the frame itself",
        }


class ImageAugmentationBank:
    """Label-preserving views of images (C, H, W): a translation and, optionally, a horizontal flip.

    Each variant shifts the image by (dy, dx) pixels, each drawn uniformly from [-pad, pad]: the
    usual pad-and-random-crop, with the border filled by repeating the edge pixels (so a digit's
    uniform background stays uniform, and no colour foreign to the image enters). With ``flip``,
    half the variants are also mirrored left-right; leave it off where a mirrored input is another
    class (digits, text).
    """

    def __init__(self, samples: int, variants: int, seed: int, pad: int, flip: bool) -> None:
        if variants < 1:
            raise ValueError(f"variants must be >= 1, got {variants}")
        rng = np.random.default_rng([seed, samples, variants, pad, int(flip)])
        self.variants, self.pad, self.flips = variants, pad, flip
        self.shift = rng.integers(-pad, pad + 1, size=(variants, samples, 2))
        self.flip = (rng.random((variants, samples)) < 0.5) & flip
        self.shift[0] = 0
        self.flip[0] = False

    def apply(self, x: torch.Tensor, indices: np.ndarray, variants: np.ndarray) -> torch.Tensor:
        """Variant ``variants[j]`` of sample ``indices[j]`` for image ``x[j]`` of a batch (B, C, H, W)."""
        shift = torch.from_numpy(self.shift[variants, indices])
        flip = torch.from_numpy(self.flip[variants, indices])
        height, width = x.shape[-2:]
        rows = (torch.arange(height).unsqueeze(0) - shift[:, :1]).clamp(0, height - 1)  # (B, H)
        cols = (torch.arange(width).unsqueeze(0) - shift[:, 1:]).clamp(0, width - 1)  # (B, W)
        cols = torch.where(flip.unsqueeze(1), width - 1 - cols, cols)
        batch = torch.arange(len(x))[:, None, None]
        picked = x[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C): advanced axes first
        return picked.permute(0, 3, 1, 2).contiguous()

    def describe(self) -> dict:
        return {
            "policy": "default",
            "ops": [
                f"translate by up to ±{self.pad} px per axis (pad-and-random-crop, edge pixels repeated)",
                *(["horizontal flip p=0.5"] if self.flips else []),
            ],
            "as_in": "CIFAR-style small-image training (variant 0 is the image itself)",
        }


class TimmAugmentationBank:
    """timm's standard train augmentation for images (C, H, W), as fixed variants.

    The defaults of ``timm.data.transforms_imagenet_train`` (Wightman, timm; the Inception-style
    crop of Szegedy et al., "Going deeper with convolutions", CVPR 2015): RandomResizedCrop with an
    area share drawn from U(0.08, 1) and a log-uniform aspect ratio in [3/4, 4/3], resized back to
    the input size (bilinear); a horizontal flip with p = 0.5 (only with ``flip``: never for digits
    or text); ColorJitter 0.4, i.e. brightness, contrast and saturation factors each from
    U(0.6, 1.4) (hue unchanged), applied in that order (torchvision draws a random order). Jitter
    works on the [0, 1] pixels, so the images are denormalised with ``mean``/``std`` and normalised
    back. Where timm redraws a crop that does not fit, the crop's sides are clipped to the image.
    """

    AREA = (0.08, 1.0)
    RATIO = (3 / 4, 4 / 3)
    JITTER = 0.4

    def __init__(
        self, samples: int, variants: int, seed: int, flip: bool, mean: list[float], std: list[float]
    ) -> None:
        if variants < 1:
            raise ValueError(f"variants must be >= 1, got {variants}")
        rng = np.random.default_rng([seed, samples, variants, int(flip), 2])
        size = (variants, samples)
        area = rng.uniform(*self.AREA, size=size)
        ratio = np.exp(rng.uniform(np.log(self.RATIO[0]), np.log(self.RATIO[1]), size=size))
        width, height = np.minimum(np.sqrt(area * ratio), 1.0), np.minimum(np.sqrt(area / ratio), 1.0)
        left, top = rng.uniform(size=size) * (1 - width), rng.uniform(size=size) * (1 - height)
        mirror = np.where((rng.random(size) < 0.5) & flip, -1.0, 1.0)
        zeros = np.zeros(size)
        # affine_grid's theta per variant and sample: output [-1, 1] coordinates -> the crop box
        theta = np.stack(
            [
                np.stack([width * mirror, zeros, 2 * left + width - 1], axis=-1),
                np.stack([zeros, height, 2 * top + height - 1], axis=-1),
            ],
            axis=-2,
        )
        self.variants, self.flips = variants, flip
        self.theta = torch.from_numpy(theta.astype(np.float32))
        self.jitter = rng.uniform(1 - self.JITTER, 1 + self.JITTER, size=(*size, 3)).astype(np.float32)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def apply(self, x: torch.Tensor, indices: np.ndarray, variants: np.ndarray) -> torch.Tensor:
        """Variant ``variants[j]`` of sample ``indices[j]`` for image ``x[j]`` of a batch (B, C, H, W)."""
        theta = self.theta[variants, indices]
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        cropped = torch.nn.functional.grid_sample(
            x, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        brightness, contrast, saturation = torch.from_numpy(self.jitter[variants, indices]).unbind(-1)
        pixels = (cropped * self.std + self.mean).clamp(0, 1) * brightness[:, None, None, None]
        pixels = pixels.clamp(0, 1)
        mean_gray = _grayscale(pixels).mean(dim=(1, 2, 3), keepdim=True)
        pixels = ((pixels - mean_gray) * contrast[:, None, None, None] + mean_gray).clamp(0, 1)
        gray = _grayscale(pixels)
        pixels = ((pixels - gray) * saturation[:, None, None, None] + gray).clamp(0, 1)
        out = (pixels - self.mean) / self.std
        identity = torch.from_numpy(variants == 0)
        return torch.where(identity[:, None, None, None], x, out)

    def describe(self) -> dict:
        return {
            "policy": "timm",
            "ops": [
                f"RandomResizedCrop: area U{self.AREA}, aspect ratio log-uniform in "
                f"[{self.RATIO[0]:.3f}, {self.RATIO[1]:.3f}], bilinear resize back",
                *(["horizontal flip p=0.5"] if self.flips else []),
                f"ColorJitter {self.JITTER}: brightness, contrast, saturation factors U"
                f"({1 - self.JITTER:.1f}, {1 + self.JITTER:.1f}), in that order",
            ],
            "as_in": "timm.data.transforms_imagenet_train defaults (variant 0 is the image itself)",
        }


def _grayscale(pixels: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma of RGB pixels (B, 3, H, W), as torchvision's rgb_to_grayscale; (B, 1, H, W)."""
    red, green, blue = pixels.unbind(1)
    return (0.299 * red + 0.587 * green + 0.114 * blue).unsqueeze(1)


AugmentationBank = IQAugmentationBank | ImageAugmentationBank | TimmAugmentationBank
IMAGE_PAD_FRACTION = 8  # images shift by up to side // 8 pixels (4 at 32x32, as in CIFAR training)
POLICIES = ("default", "timm")


def augmentation_bank(
    meta: DatasetMeta, samples: int, variants: int, seed: int, policy: str = "default"
) -> AugmentationBank:
    """The bank of ``policy`` for ``meta``'s kind of input; a DataError where that policy does not apply."""
    shape = meta.input_shape
    if len(shape) == 3:
        if policy == "timm":
            norm = meta.normalisation
            return TimmAugmentationBank(
                samples, variants, seed, meta.mirror_invariant, norm["mean"], norm["std"]
            )
        pad = max(1, min(shape[1:]) // IMAGE_PAD_FRACTION)
        return ImageAugmentationBank(samples, variants, seed, pad, flip=meta.mirror_invariant)
    if policy != "default":
        raise DataError(
            f"distill.augment.policy={policy!r} applies to images; dataset {meta.name!r} has inputs of "
            f"shape {meta.input_shape}: set distill.augment.policy: default"
        )
    if len(shape) == 2 and shape[0] == 2:
        return IQAugmentationBank(samples, variants, seed, shape[1])
    raise DataError(
        f"dataset {meta.name!r}: no augmentation bank for inputs of shape {meta.input_shape}; "
        "set distill.augment.enabled: false"
    )
