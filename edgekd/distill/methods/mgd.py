"""``mgd``: Yang, Li, Shen, Li, Yuan, Li, "Masked Generative Distillation", ECCV 2022 (arXiv:2205.01529)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from edgekd.distill.methods.base import METHODS, DistillMethod, MethodOptions, ModelOutputs, ModelShape
from edgekd.distill.methods.hint_maps import conv, feature_maps, require_maps, resample
from edgekd.recipe import DistillSpec

REFERENCE_ELEMENTS = 512 * 7 * 7  # ResNet-18 last stage at 224x224: the official ImageNet config


@METHODS.register("mgd")
class MaskedGenerativeKD(DistillMethod):
    """Masked generative distillation (Yang et al., ECCV 2022), classification variant, plus labels.

    ``L = CE(s, y) + α · Σ_{b,c,l} ( G(R(a(F_s)) ⊙ M) − F_t )² / B``,  ``α = α_mgd · N_ref / N_t``

    - F_s, F_t: the deepest hint-layer maps (B, C, L) or (B, C, H, W) of student and teacher (the
      paper distils the last backbone stage for classification); a: a 1x1 convolution from the
      student's channels to the teacher's, only when they differ; R: resampling of the student map
      to the teacher's size when they differ (average pooling to shrink, (bi)linear interpolation
      to enlarge; ours — the paper's maps have equal sizes);
    - M: a random channel mask (B, C_t, 1[, 1]), 0 with probability λ = ``mask_ratio`` (0.15, the
      paper's classification setting) and 1 otherwise, drawn afresh each batch from torch's global
      generator (which the trainer seeds per epoch, so runs are reproducible);
    - G: the generator Conv(C_t, C_t, 3) → ReLU → Conv(C_t, C_t, 3) (padding 1), the official 3x3
      generator (its 1-D form for (C, L) maps); a and G are trained with the student and dropped
      after training; squared error summed over channels and positions, averaged over the batch
      (the official ``MSELoss(reduction='sum') / N``); teacher map detached;
    - α_mgd = ``alpha_mgd`` = 7e-5, the authors' value (yzd-v/MGD, ImageNet classification config,
      ResNet-34 → ResNet-18), kept as the base weight.

    Scaling to the map size (ours, ``scale_to_map``, on by default): the error is a *sum* over the
    N_t = C_t · L_t (or C_t · H · W) elements of the teacher map, so α_mgd was tuned for the
    N_ref = ``reference_elements`` = 512 · 7 · 7 = 25,088 elements of the ResNet-18 last stage at
    224 x 224. On our maps (e.g. a few thousand elements for the radio students, or 512 · 1 · 1
    for a ResNet on 32 x 32 images) the same α makes the term a fraction of a percent of the loss,
    so ``mgd`` would train as cross-entropy alone. Using ``α = α_mgd · N_ref / N_t`` gives the term
    the same weight per map (α_mgd · N_ref times the mean squared error) as in the authors' setting,
    whatever the map size; with ``scale_to_map`` false, α = α_mgd exactly as in the official code.

    The masked-autoencoder distiller of Bai et al. (DMAE, CVPR 2023) is a different method: ``dmae``
    (:mod:`edgekd.distill.methods.dmae`). ``distill.temperature`` and ``distill.alpha`` are not used.
    """

    needs_feature_maps = True

    class Options(MethodOptions):
        alpha_mgd: float = Field(7e-5, ge=0, description="α_mgd: weight of the summed generation error")
        mask_ratio: float = Field(0.15, ge=0, lt=1, description="λ: probability of masking each channel")
        scale_to_map: bool = Field(
            True, description="use α_mgd · reference_elements / (teacher map elements); false: α_mgd as is"
        )
        reference_elements: int = Field(
            REFERENCE_ELEMENTS, ge=1, description="map elements α_mgd was tuned for (512·7·7, ImageNet)"
        )

    def __init__(self, spec: DistillSpec, num_classes: int, student: ModelShape, teacher: ModelShape) -> None:
        super().__init__(spec, num_classes, student, teacher)
        require_maps(spec.method, student, teacher)
        student_channels = student.map_shapes[-1][0]
        shape = teacher.map_shapes[-1]
        teacher_channels = shape[0]
        self.align = (
            conv(shape, student_channels, teacher_channels, kernel_size=1)
            if student_channels != teacher_channels
            else None
        )
        elements = math.prod(shape)
        scale = self.options.reference_elements / elements if self.options.scale_to_map else 1.0
        self.weight = self.options.alpha_mgd * scale  # α: the weight applied to the summed error
        self.generator = nn.Sequential(
            conv(shape, teacher_channels, teacher_channels, kernel_size=3, padding=1),
            nn.ReLU(),
            conv(shape, teacher_channels, teacher_channels, kernel_size=3, padding=1),
        )

    def generation_loss(self, student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
        """Σ (G(R(a(F_s)) ⊙ M) − F_t)² / B, unweighted."""
        teacher_map = teacher_map.detach()
        aligned = self.align(student_map) if self.align is not None else student_map
        aligned = resample(aligned, teacher_map.shape[2:])
        batch, channels = aligned.shape[:2]
        draw = torch.rand((batch, channels, *[1] * (aligned.dim() - 2)), device=aligned.device)
        mask = (draw >= self.options.mask_ratio).to(aligned.dtype)
        generated = self.generator(aligned * mask)
        return F.mse_loss(generated, teacher_map, reduction="sum") / batch

    def loss(
        self, student: ModelOutputs, teacher: ModelOutputs | None, target: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        teacher = self._teacher(teacher)
        name = type(self).__name__
        student_map = feature_maps(student, "student", name)[-1]
        teacher_map = feature_maps(teacher, "teacher", name)[-1]
        ce = F.cross_entropy(student.logits, target)
        return ce + self.weight * self.generation_loss(student_map, teacher_map)
