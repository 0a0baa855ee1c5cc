"""DETR's set loss: Hungarian matching of predictions to ground truth, then per-match losses.

DETR (Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020, arXiv:2005.12872)
matches each image's ground-truth objects one-to-one to its queries by the assignment of least cost
(Hungarian algorithm, here ``scipy.optimize.linear_sum_assignment``); matched queries learn the
object's class and box, the others learn "no object". We follow DAB-DETR's variant (Liu et al.,
ICLR 2022, arXiv:2201.12329; from Deformable DETR), the defaults of its public code (main.py):

- classification: sigmoid focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017,
  arXiv:1708.02002), alpha 0.25, gamma 2, one-hot targets over the C classes (all zeros for unmatched
  queries), summed over queries and classes and divided by the number of objects;
- boxes: L1 on normalised (cx, cy, w, h) and ``1 - GIoU`` (:mod:`edgekd.detection.boxes`), over
  matched pairs, divided by the number of objects;
- matching cost: ``2 * focal class cost + 5 * L1 + 2 * (-GIoU)`` where the focal class cost of
  class c is ``alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p))``;
- loss weights: class 1, L1 5, GIoU 2, the same for every decoder layer: each auxiliary output is
  matched on its own and adds its weighted losses (DETR's auxiliary decoding losses).

With query selection the chosen encoder proposals are one more auxiliary layer (RT-DETR's encoder
loss). A model with ``dense_loss_weight`` > 0 (:mod:`edgekd.models.detr`; ours, after Co-DETR's
one-to-many auxiliary heads) adds that weight times the same weighted class / L1 / GIoU terms over
every token's proposal, assigned one-to-many by FCOS's centre sampling (:meth:`SetCriterion.dense_losses`).

The number of objects is summed over the batch (and over processes under torch.distributed, then
divided by the world size, as DETR), at least 1, so images without objects are valid targets.

Targets: one dict per image, ``{"labels": (n,) int64 in [0, C), "boxes": (n, 4) cxcywh in [0, 1]}``,
n >= 0. Outputs: ``{"logits": (B, Q, C), "boxes": (B, Q, 4), "aux": [{"logits", "boxes"}, ...]}``
(what :class:`edgekd.models.detr.DETR` returns).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from edgekd.detection.boxes import cxcywh_to_xyxy, generalized_box_iou

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
CENTRE_RADIUS = 1.5  # FCOS's center_sampling_radius, in cells

Targets = list[dict[str, torch.Tensor]]
Matches = list[tuple[torch.Tensor, torch.Tensor]]


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_boxes: float,
    alpha: float = FOCAL_ALPHA,
    gamma: float = FOCAL_GAMMA,
) -> torch.Tensor:
    """Focal loss (Lin et al., ICCV 2017) of sigmoid ``logits`` against 0/1 ``targets`` (same shape),
    summed over every element and divided by ``num_boxes``."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum() / num_boxes


@dataclass(frozen=True)
class HungarianMatcher:
    """One-to-one matching of queries to objects per image by least total cost (DETR / DAB-DETR)."""

    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    alpha: float = FOCAL_ALPHA
    gamma: float = FOCAL_GAMMA

    def cost_matrix(
        self, logits: torch.Tensor, boxes: torch.Tensor, target: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The (Q, n) cost of one image's queries (``logits`` (Q, C), ``boxes`` (Q, 4)) to its n objects."""
        labels, target_boxes = target["labels"], target["boxes"].to(boxes.dtype)
        prob = logits.sigmoid()
        positive = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
        negative = (1 - self.alpha) * prob**self.gamma * -(1 - prob + 1e-8).log()
        class_cost = (positive - negative)[:, labels]
        l1_cost = torch.cdist(boxes, target_boxes, p=1)
        giou_cost = -generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(target_boxes))
        return self.cost_class * class_cost + self.cost_bbox * l1_cost + self.cost_giou * giou_cost

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, boxes: torch.Tensor, targets: Targets) -> Matches:
        """Per image ``(query_indices, object_indices)``, int64, of length ``min(Q, n)``."""
        matches = []
        for image_logits, image_boxes, target in zip(logits, boxes, targets, strict=True):
            if len(target["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                matches.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(image_logits.float(), image_boxes.float(), target)
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            matches.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return matches


class SetCriterion:
    """DETR's set loss with DAB-DETR's focal classification and weights (see the module docstring).

    ``criterion(outputs, targets)`` returns ``{"loss": weighted total over all decoder layers,
    "class", "bbox", "giou": the last layer's unweighted terms}`` (scalars; only "loss" needs a
    backward pass).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        weight_class: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        alpha: float = FOCAL_ALPHA,
        gamma: float = FOCAL_GAMMA,
        aux: bool = True,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher(alpha=alpha, gamma=gamma)
        self.weights = {"class": weight_class, "bbox": weight_bbox, "giou": weight_giou}
        self.alpha, self.gamma, self.aux = alpha, gamma, aux

    def layer_losses(
        self, logits: torch.Tensor, boxes: torch.Tensor, targets: Targets, matches: Matches, num_boxes: float
    ) -> dict[str, torch.Tensor]:
        """Unweighted ``{"class", "bbox", "giou"}`` of one decoder layer's outputs under ``matches``."""
        batch_index = torch.cat([torch.full_like(rows, i) for i, (rows, _) in enumerate(matches)])
        query_index = torch.cat([rows for rows, _ in matches])
        batch_index, query_index = batch_index.to(logits.device), query_index.to(logits.device)
        pairs = list(zip(targets, matches, strict=True))
        matched_labels = torch.cat([t["labels"][cols.to(t["labels"].device)] for t, (_, cols) in pairs])
        onehot = torch.zeros_like(logits)
        onehot[batch_index, query_index, matched_labels.to(logits.device)] = 1.0
        class_loss = sigmoid_focal_loss(logits, onehot, num_boxes, self.alpha, self.gamma)
        predicted = boxes[batch_index, query_index]
        target_boxes = torch.cat([t["boxes"][cols.to(t["boxes"].device)] for t, (_, cols) in pairs])
        target_boxes = target_boxes.to(predicted)
        if len(predicted) == 0:
            zero = boxes.sum() * 0.0  # keeps the graph connected for images without objects
            return {"class": class_loss, "bbox": zero, "giou": zero}
        bbox_loss = F.l1_loss(predicted, target_boxes, reduction="sum") / num_boxes
        giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(predicted), cxcywh_to_xyxy(target_boxes)))
        return {"class": class_loss, "bbox": bbox_loss, "giou": (1 - giou).sum() / num_boxes}

    def num_boxes(self, targets: Targets, device: torch.device) -> float:
        """Objects in the batch (averaged over processes under torch.distributed), at least 1."""
        count = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(count)
            world = torch.distributed.get_world_size()
        return max(count.item() / world, 1.0)

    def dense_losses(self, dense: dict[str, Any], targets: Targets) -> dict[str, torch.Tensor]:
        """Unweighted ``{"class", "bbox", "giou"}`` of every token's proposal, one-to-many.

        A token is a positive of an object when its cell centre lies inside the object's box and
        within :data:`CENTRE_RADIUS` cells of its centre, or when its cell holds the centre (FCOS's
        centre sampling, Tian et al., ICCV 2019; an object smaller than a cell keeps one positive);
        a token claimed by several objects takes the smallest. Focal classification over all tokens,
        L1 and ``1 - GIoU`` over the positives, each divided by the number of positives.
        """
        logits, boxes, (rows, cols) = dense["logits"], dense["boxes"], dense["grid"]
        centres = dense["anchors"][0, :, :2]  # (T, 2)
        onehot = torch.zeros_like(logits)
        predicted, assigned = [], []
        for image, target in enumerate(targets):
            if len(target["labels"]) == 0:
                continue
            gt = target["boxes"].to(centres)  # (n, 4) cxcywh
            offset = (centres[:, None, :] - gt[None, :, :2]).abs()  # (T, n, 2)
            inside = (offset < gt[None, :, 2:] / 2).all(-1)
            near = (offset < CENTRE_RADIUS * centres.new_tensor([1.0 / cols, 1.0 / rows])).all(-1)
            cell = torch.stack(
                (
                    (gt[:, 0] * cols).long().clamp(0, cols - 1),
                    (gt[:, 1] * rows).long().clamp(0, rows - 1),
                ),
                -1,
            )  # (n, 2): the column and row holding each centre
            holds = torch.zeros_like(inside)
            holds[cell[:, 1] * cols + cell[:, 0], torch.arange(len(gt))] = True
            positive = (inside & near) | holds
            area = (gt[:, 2] * gt[:, 3])[None, :].expand_as(positive)
            area = torch.where(positive, area, torch.full_like(area, float("inf")))
            best_area, best = area.min(-1)
            tokens = torch.nonzero(torch.isfinite(best_area)).squeeze(-1)
            objects = best[tokens]
            onehot[image, tokens, target["labels"].to(tokens.device)[objects]] = 1.0
            predicted.append(boxes[image, tokens])
            assigned.append(gt[objects])
        count = float(max(sum(len(b) for b in predicted), 1))
        class_loss = sigmoid_focal_loss(logits, onehot, count, self.alpha, self.gamma)
        if not predicted:
            zero = boxes.sum() * 0.0
            return {"class": class_loss, "bbox": zero, "giou": zero}
        predicted_boxes, target_boxes = torch.cat(predicted), torch.cat(assigned)
        giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(predicted_boxes), cxcywh_to_xyxy(target_boxes)))
        return {
            "class": class_loss,
            "bbox": F.l1_loss(predicted_boxes, target_boxes, reduction="sum") / count,
            "giou": (1 - giou).sum() / count,
        }

    def __call__(self, outputs: dict[str, Any], targets: Targets) -> dict[str, torch.Tensor]:
        logits, boxes = outputs["logits"], outputs["boxes"]
        if len(targets) != logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {logits.shape[0]} images")
        num_boxes = self.num_boxes(targets, logits.device)
        layers = [(logits, boxes)]
        if self.aux:
            layers += [(aux["logits"], aux["boxes"]) for aux in outputs.get("aux", [])]
        total = logits.new_zeros(())
        last: dict[str, torch.Tensor] = {}
        for index, (layer_logits, layer_boxes) in enumerate(layers):
            matches = self.matcher(layer_logits, layer_boxes, targets)
            terms = self.layer_losses(layer_logits, layer_boxes, targets, matches, num_boxes)
            total = total + sum(self.weights[name] * value for name, value in terms.items())
            if index == 0:
                last = terms
        dense_weight = outputs.get("dense", {}).get("weight", 0.0)
        if self.aux and dense_weight > 0:
            terms = self.dense_losses(outputs["dense"], targets)
            total = total + dense_weight * sum(self.weights[key] * value for key, value in terms.items())
        return {"loss": total, **{name: value.detach() for name, value in last.items()}}
