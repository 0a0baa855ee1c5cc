"""``rkd``: Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019 (arXiv:1904.05068)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from edgekd.distill.methods.base import METHODS, DistillMethod, MethodOptions, ModelOutputs


def pairwise_distances(embeddings: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances (B, B) between the rows of ``embeddings``, zero on the diagonal.

    Squared distances are clamped at ``eps`` before the square root, so the gradient stays finite
    for coincident points (RepDistiller's ``pdist``).
    """
    squared = embeddings.pow(2).sum(dim=1)
    gram = embeddings @ embeddings.t()
    distances = (squared[:, None] + squared[None, :] - 2 * gram).clamp(min=eps).sqrt()
    off_diagonal = 1 - torch.eye(len(embeddings), dtype=embeddings.dtype, device=embeddings.device)
    return distances * off_diagonal


def distance_potential(embeddings: torch.Tensor) -> torch.Tensor:
    """ψ_D(i, j) = ‖e_i − e_j‖ / μ, μ the mean non-zero distance in the batch (eq. 3-4 of the paper).

    A batch of one sample (or of identical samples) has no non-zero distance: ψ_D is then all zero.
    """
    distances = pairwise_distances(embeddings)
    positive = distances > 0
    mean = distances.sum() / positive.sum().clamp(min=1)
    return distances / mean.clamp(min=1e-12)


def angle_potential(embeddings: torch.Tensor) -> torch.Tensor:
    """ψ_A(i, j, k) = ⟨(e_i − e_j)/‖e_i − e_j‖, (e_k − e_j)/‖e_k − e_j‖⟩, all B³ triplets (eq. 5), flat."""
    differences = F.normalize(embeddings[None, :, :] - embeddings[:, None, :], p=2, dim=2)
    return torch.bmm(differences, differences.transpose(1, 2)).flatten()


@METHODS.register("rkd", aliases=("relational",))
class RelationalKD(DistillMethod):
    """Relational KD (Park et al., CVPR 2019): distance- and angle-wise relations of the embeddings.

    ``L = CE(s, y) + w_D · mean_{i,j} ℓ(ψ_D^s(i,j), ψ_D^t(i,j)) + w_A · mean_{i,j,k} ℓ(ψ_A^s, ψ_A^t)``

    - e: the penultimate embeddings (B, D) of each model, compared within the batch, so the two
      widths need not match and nothing is trained besides the student;
    - ψ_D: pairwise Euclidean distance divided by the batch's mean non-zero distance (scale-free);
      ψ_A: cosine of the angle formed by every triplet (invariant to scaling and rotation);
    - ℓ: the Huber (smooth L1, δ = 1) loss; means over all B² pairs and B³ triplets (as in
      RepDistiller); w_D = ``distance_weight`` = 25, w_A = ``angle_weight`` = 50 (the paper's).

    ``distill.temperature`` and ``distill.alpha`` are not used; teacher embeddings (cached ones
    work) are detached. Memory grows as B³ for the angle term.
    """

    needs_features = True

    class Options(MethodOptions):
        distance_weight: float = Field(25.0, ge=0, description="w_D: weight of the distance-wise term")
        angle_weight: float = Field(50.0, ge=0, description="w_A: weight of the angle-wise term")

    def relational_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """w_D · L_D + w_A · L_A on embeddings (B, D_s) and (B, D_t)."""
        teacher = teacher.detach()
        with torch.no_grad():
            distance_t, angle_t = distance_potential(teacher), angle_potential(teacher)
        distance = F.smooth_l1_loss(distance_potential(student), distance_t)
        angle = F.smooth_l1_loss(angle_potential(student), angle_t)
        return self.options.distance_weight * distance + self.options.angle_weight * angle

    def loss(
        self, student: ModelOutputs, teacher: ModelOutputs | None, target: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        teacher = self._teacher(teacher)
        if student.features is None or teacher.features is None:
            raise ValueError("rkd needs the student's and the teacher's embeddings, got None")
        ce = F.cross_entropy(student.logits, target)
        return ce + self.relational_loss(student.features, teacher.features.to(student.features.dtype))
