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
        self.variants = variants
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


AugmentationBank = IQAugmentationBank | ImageAugmentationBank
IMAGE_PAD_FRACTION = 8  # images shift by up to side // 8 pixels (4 at 32x32, as in CIFAR training)


def augmentation_bank(meta: DatasetMeta, samples: int, variants: int, seed: int) -> AugmentationBank:
    """The bank for ``meta``'s kind of input; a DataError for inputs that have none yet."""
    shape = meta.input_shape
    if len(shape) == 2 and shape[0] == 2:
        return IQAugmentationBank(samples, variants, seed, shape[1])
    if len(shape) == 3:
        pad = max(1, min(shape[1:]) // IMAGE_PAD_FRACTION)
        return ImageAugmentationBank(samples, variants, seed, pad, flip=meta.mirror_invariant)
    raise DataError(
        f"dataset {meta.name!r}: no augmentation bank for inputs of shape {meta.input_shape}; "
        "set distill.augment.enabled: false"
    )
