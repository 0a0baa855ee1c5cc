"""``mgd``: Yang, Li, Shen, Li, Yuan, Li, "Masked Generative Distillation", ECCV 2022 (arXiv:2205.01529)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from edgekd.distill.methods.base import METHODS, DistillMethod, MethodOptions, ModelOutputs, ModelShape
from edgekd.distill.methods.hint_maps import conv, feature_maps, require_maps, resample
from edgekd.recipe import DistillSpec


@METHODS.register("mgd", aliases=("mae-feat",))
class MaskedGenerativeKD(DistillMethod):
    """Masked generative distillation (Yang et al., ECCV 2022), classification variant, plus labels.

    ``L = CE(s, y) + α_mgd · Σ_{b,c,l} ( G(R(a(F_s)) ⊙ M) − F_t )² / B``

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
      after training;
    - α_mgd = ``alpha_mgd`` = 7e-5 (the official ImageNet classification config); squared error
      summed over channels and positions, averaged over the batch; teacher map detached.

    The student must regenerate the teacher's full map from its own partly masked map, which is the
    masked-autoencoder idea applied to distillation (see also Bai et al., "Masked Autoencoders
    Enable Efficient Knowledge Distillers", CVPR 2023, arXiv:2208.12256); hence the alias
    ``mae-feat``. ``distill.temperature`` and ``distill.alpha`` are not used. The weight was tuned
    for 512x7x7 ImageNet maps; our maps have fewer elements, so the term is comparatively small.
    """

    needs_feature_maps = True

    class Options(MethodOptions):
        alpha_mgd: float = Field(7e-5, ge=0, description="α_mgd: weight of the summed generation error")
        mask_ratio: float = Field(0.15, ge=0, lt=1, description="λ: probability of masking each channel")

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
        return ce + self.options.alpha_mgd * self.generation_loss(student_map, teacher_map)
