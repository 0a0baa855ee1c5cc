"""Box utilities: (cx, cy, w, h) ↔ (x0, y0, x1, y1), pairwise IoU and generalized IoU.

Generalized IoU is Rezatofighi, Tsoi, Gwak, Sadeghian, Reid, Savarese, "Generalized Intersection over
Union: A Metric and a Loss for Bounding Box Regression", CVPR 2019 (arXiv:1902.09630):
``GIoU = IoU - (|C| - |A ∪ B|) / |C|`` with C the smallest box enclosing A and B, in [-1, 1]. DETR
(Carion et al., ECCV 2020) uses ``1 - GIoU`` as its box loss and ``-GIoU`` in its matching cost.
"""

from __future__ import annotations

import torch

EPS = 1e-7  # keeps degenerate (zero-area) boxes finite


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre, width, height → (..., 4) corners."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) corners → (..., 4) centre, width, height."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of (..., 4) corner boxes (0 for inverted ones)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise ``(iou (N, M), union (N, M))`` of corner boxes ``a`` (N, 4) and ``b`` (M, 4)."""
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / (union + EPS), union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise generalized IoU (N, M) of corner boxes ``a`` (N, 4) and ``b`` (M, 4) (Rezatofighi et al.)."""
    iou, union = box_iou(a, b)
    top_left = torch.minimum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.maximum(a[:, None, 2:], b[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / (enclosing + EPS)
