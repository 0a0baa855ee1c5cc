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


def augmentation_bank(meta: DatasetMeta, samples: int, variants: int, seed: int) -> IQAugmentationBank:
    """The bank for ``meta``'s kind of input; a DataError for inputs that have none yet."""
    if len(meta.input_shape) == 2 and meta.input_shape[0] == 2:
        return IQAugmentationBank(samples, variants, seed, meta.input_shape[1])
    raise DataError(
        f"dataset {meta.name!r}: no augmentation bank for inputs of shape {meta.input_shape}; "
        "set distill.augment.enabled: false"
    )
