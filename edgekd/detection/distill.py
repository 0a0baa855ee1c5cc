"""Knowledge distillation for DETR detectors: CLoCKDistill and its baselines, a registry of its own.

Every method here declares ``task = "detection"``. A method is an ``nn.Module`` (its trainable parts,
e.g. CLoCKDistill's adapter, are optimised with the student); :meth:`DetectionMethod.loss` takes a
batch of images, their targets (``[{"labels": (n,), "boxes": (n, 4) cxcywh in [0, 1]}]``, as
:mod:`edgekd.detection.criterion`), the student and the teacher (:class:`edgekd.models.detr.DETR`),
and returns ``{"loss", "set", "memory", "logit"}``: the total to minimise, the student's own set loss
and the two distillation terms, already weighted (0 where a method has none). The teacher only ever
runs under ``torch.no_grad()`` in eval mode, so no gradient reaches it.

Registered methods (:data:`DETECTION_METHODS`, :func:`build_detection_method`):

- ``none``: the student alone on DETR's set loss (:class:`~edgekd.detection.criterion.SetCriterion`).
- ``memory-mse``: set loss + plain feature distillation of the encoder memory (student memory through
  a 1×1 adapter, MSE to the teacher's over every cell alike); FitNets-style hints (Romero et al.,
  "FitNets: Hints for Thin Deep Nets", ICLR 2015) applied to the memory, without location masks.
- ``kd-detr``: set loss + prediction distillation on shared queries without ground-truth awareness:
  KD-DETR (Wang, Li, Wen, Yang, Zhang, Zhang, Feng, Han, Ding, "KD-DETR: Knowledge Distillation for
  Detection Transformer with Consistent Distillation Points Sampling", CVPR 2024, arXiv:2211.08071).
- ``clockdistill``: set loss + location-aware memory distillation + target-aware logit distillation:
  CLoCKDistill (Lan and Tian, "CLoCKDistill: Consistent Location-and-Context-aware Knowledge
  Distillation for DETRs", WACV 2026, arXiv:2502.10683).

Teacher cache (what is cached, measured for the registered sizes): the teacher's memory is
``H/16 × W/16`` tokens of ``d_model`` floats per image (:func:`teacher_memory_bytes`). At 128 px that
is 64 tokens: 64 × 128 × 4 B = **32 KiB per image** for the teachers (``d_model`` 128; 16 KiB for
``edgekd:detr-mnv3``), i.e. 94 MiB for the default run's 3,000 training scenes in float32. It is
cached: the images are fixed (no augmentation in the detection data) and the teacher is frozen, so
:func:`edgekd.detection.train.train_detector` computes every training image's memory once
(``distill.teacher_cache``, on by default; up to 2 GiB) and :meth:`DetectionMethod.loss` takes it as
``teacher_memory`` in place of the teacher's backbone and encoder (most of its cost;
benchmarks/detr_teacher_cache.py measures the epoch time both ways). The teacher's decoder still runs
live on the cached memory because CLoCKDistill's and KD-DETR's queries are built per batch (KD-DETR
samples random ones each step); its predictions for the ground-truth queries alone would also be
cacheable (n objects × (C + 4) floats), but the decoder is cheap next to the backbone. At 640 px the
memory is 1,600 tokens, 800 KiB per image (92 GiB for COCO's 118k training images): over the limit,
the teacher runs live (a cache memory-mapped on disk would be the next step).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from edgekd.detection.boxes import EPS as BOX_EPS
from edgekd.detection.boxes import box_area, cxcywh_to_xyxy
from edgekd.detection.criterion import SetCriterion, Targets
from edgekd.distill.methods.base import validate_options
from edgekd.errors import ModelError
from edgekd.models.detr import DETR, SIZES, image_positions
from edgekd.registry import Registry

TASK = "detection"
EPS = 1e-6


# ------------------------------------------------------------------------------------------- options


class DetectionOptions(BaseModel):
    """Base of each method's hyperparameters; an unknown name is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LogitWeights(DetectionOptions):
    """Weights of the prediction distillation: classes, L1 and GIoU boxes (DETR's 1 / 5 / 2)."""

    logit_weight: float = Field(1.0, ge=0.0)
    class_weight: float = Field(1.0, ge=0.0)
    l1_weight: float = Field(5.0, ge=0.0)
    giou_weight: float = Field(2.0, ge=0.0)


# ----------------------------------------------------------------------------------- shared pieces


def teacher_memory_bytes(
    model: str | int, image_size: int, stride: int | None = None, bytes_per_float: int = 4
) -> int:
    """Bytes of one image's encoder memory: ``ceil(S / stride)² × d_model × bytes_per_float``.

    ``model`` is a registered size (e.g. ``"edgekd:detr-r18"``; its ``feature_stride`` unless
    ``stride`` is given) or a ``d_model`` (then ``stride`` is needed).
    """
    if stride is None:
        if not isinstance(model, str):
            raise ValueError("give the stride of a model given by its d_model")
        stride = int(SIZES[model]["feature_stride"])
    d_model = int(SIZES[model]["d_model"]) if isinstance(model, str) else int(model)
    cells = math.ceil(image_size / stride) ** 2
    return cells * d_model * bytes_per_float


def grid_shape(tokens: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a flattened ``tokens``-cell feature map of an image of ``image_hw`` (h·w = tokens,
    aspect nearest the image's)."""
    height, width = image_hw
    rows = max(1, round(math.sqrt(tokens * height / width)))
    for candidate in sorted(range(1, tokens + 1), key=lambda r: abs(r - rows)):
        if tokens % candidate == 0:
            return candidate, tokens // candidate
    raise ValueError(f"no grid for {tokens} tokens")  # pragma: no cover - 1 always divides


def resample_memory(memory: torch.Tensor, source: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """(B, h·w, d) tokens on grid ``source`` → (B, H·W, d) on grid ``target`` (bilinear, half-pixel
    centres, so cell centres of both grids cover the same image positions); identity when equal."""
    if source == target:
        return memory
    batch, _, dim = memory.shape
    grid = memory.transpose(1, 2).reshape(batch, dim, *source)
    grid = F.interpolate(grid, size=target, mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


def foreground_masks(
    boxes: list[torch.Tensor], grid: tuple[int, int], device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the location mask M and scale mask S on a (h, w) grid, flattened row-major: (B, h·w).

    M is 1 on the cells a ground-truth box touches: box (cx, cy, w, h) in [0, 1] covers the columns
    ``floor(x0·w) .. ceil(x1·w) - 1`` and likewise the rows (at least one cell each). S is
    ``1 / (cells of the box)`` on a box's cells (the smallest box wins where boxes overlap, so a small
    object weighs as much as a large one) and ``1 / (background cells)`` elsewhere: FGD's masks (Yang
    et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022), which CLoCKDistill
    uses to put object locations into the memory distillation.
    """
    rows, cols = grid
    location = torch.zeros(len(boxes), rows * cols, device=device)
    scale = torch.zeros(len(boxes), rows * cols, device=device)
    for index, image_boxes in enumerate(boxes):
        fg = torch.zeros(rows, cols, device=device)
        weight = torch.zeros(rows, cols, device=device)
        for cx, cy, w, h in image_boxes.detach().to(device=device, dtype=torch.float64).tolist():
            c0 = min(max(math.floor((cx - w / 2) * cols), 0), cols - 1)
            c1 = max(min(math.ceil((cx + w / 2) * cols), cols), c0 + 1)
            r0 = min(max(math.floor((cy - h / 2) * rows), 0), rows - 1)
            r1 = max(min(math.ceil((cy + h / 2) * rows), rows), r0 + 1)
            share = 1.0 / ((c1 - c0) * (r1 - r0))
            fg[r0:r1, c0:c1] = 1.0
            weight[r0:r1, c0:c1] = torch.clamp(weight[r0:r1, c0:c1], min=share)
        background = rows * cols - int(fg.sum().item())
        if background:
            weight = torch.where(fg > 0, weight, torch.full_like(weight, 1.0 / background))
        location[index], scale[index] = fg.flatten(), weight.flatten()
    return location, scale


def binary_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-element KL(teacher ‖ student) of independent sigmoid (Bernoulli) class probabilities.

    The sigmoid-focal counterpart of the softmax KL of classification KD (Hinton et al., 2015): each
    class is a two-outcome distribution; 0 where the two agree. Its gradient equals that of binary
    cross-entropy against the teacher's probabilities.
    """
    p = torch.sigmoid(teacher_logits)
    log_p, log_not_p = F.logsigmoid(teacher_logits), F.logsigmoid(-teacher_logits)
    log_q, log_not_q = F.logsigmoid(student_logits), F.logsigmoid(-student_logits)
    return p * (log_p - log_q) + (1 - p) * (log_not_p - log_not_q)


def paired_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalized IoU (Rezatofighi et al., CVPR 2019) of corner boxes paired element by element:
    (..., 4) and (..., 4) → (...); the diagonal of :func:`~edgekd.detection.boxes.generalized_box_iou`
    without its N×N matrix."""
    inter_wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    hull_wh = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return inter / (union + BOX_EPS) - (hull - union) / (hull + BOX_EPS)


def prediction_distillation(
    student: dict[str, torch.Tensor],
    teacher: dict[str, torch.Tensor],
    weight: torch.Tensor,
    normaliser: float,
    options: LogitWeights,
) -> torch.Tensor:
    """Σ over queries of ``weight · (w_cls · Σ_c KL + w_l1 · L1 + w_giou · (1 - GIoU))`` / ``normaliser``.

    ``student``/``teacher``: ``{"logits": (B, N, C), "boxes": (B, N, 4)}`` of the same N queries (they
    correspond one to one: no matching); ``weight`` (B, N), 0 for padding queries.
    """
    t_logits, t_boxes = teacher["logits"].detach(), teacher["boxes"].detach()
    kl = binary_kl(student["logits"], t_logits).sum(-1)  # (B, N)
    l1 = (student["boxes"] - t_boxes).abs().sum(-1)
    giou = paired_giou(cxcywh_to_xyxy(student["boxes"]), cxcywh_to_xyxy(t_boxes))
    per_query = options.class_weight * kl + options.l1_weight * l1 + options.giou_weight * (1 - giou)
    return (weight * per_query).sum() / max(normaliser, 1.0)


def layerwise_distillation(
    student_layers: list[dict[str, torch.Tensor]],
    teacher_layers: list[dict[str, torch.Tensor]],
    weight: torch.Tensor,
    normaliser: float,
    options: LogitWeights,
) -> torch.Tensor:
    """:func:`prediction_distillation` summed over the student's decoder layers, aligned from the last:
    the student's last layer learns the teacher's last, its one before from the teacher's one before,
    and so on (a student layer with no teacher counterpart left learns the teacher's first)."""
    offset = len(teacher_layers) - len(student_layers)
    return sum(
        prediction_distillation(out, teacher_layers[max(index + offset, 0)], weight, normaliser, options)
        for index, out in enumerate(student_layers)
    )


# -------------------------------------------------------------------------------------------- base


class DetectionMethod(nn.Module):
    """Base of every detection distillation method (see the module docstring).

    ``needs_teacher``: the method reads the teacher (``none`` does not). Subclasses implement
    :meth:`distill`, which returns the weighted ``memory`` and ``logit`` terms.
    """

    name: ClassVar[str] = ""
    task: ClassVar[str] = TASK
    paper: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True
    Options: ClassVar[type[DetectionOptions]] = DetectionOptions

    def __init__(
        self, student: DETR, teacher: DETR | None, num_classes: int, options: DetectionOptions
    ) -> None:
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise ModelError(f"detection method {self.name!r} distils from a teacher; give one")
        for role, model in (("student", student), ("teacher", teacher)):
            if model is not None and getattr(model, "task", None) != TASK:
                raise ModelError(
                    f"detection method {self.name!r}: the {role} is not a detection model (a DETR with "
                    f"encode/decode); choose edgekd:detr-mnv3l, edgekd:detr-r18 or edgekd:detr-mnv3"
                )
        self.options = options
        self.num_classes = num_classes
        self.student_dim = student.d_model
        self.teacher_dim = teacher.d_model if teacher is not None else student.d_model
        self.criterion = SetCriterion(num_classes)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The method's own parameters optimised with the student (adapters); empty for most."""
        return [p for p in self.parameters() if p.requires_grad]

    def loss(
        self,
        images: torch.Tensor,
        targets: Targets,
        student: DETR,
        teacher: DETR | None = None,
        teacher_memory: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"loss", "set", "memory", "logit"}`` for one batch (see the module docstring).

        ``teacher_memory`` (B, HW, d_teacher), from a cache, replaces the teacher's encoder pass.
        """
        s_memory, s_pos, s_grid = student.encode(images)
        set_loss = self.criterion(student.predict(s_memory, s_pos, s_grid), targets)["loss"]
        zero = set_loss.new_zeros(())
        terms = {"memory": zero, "logit": zero}
        if self.needs_teacher:
            if teacher is None:
                raise ModelError(f"detection method {self.name!r} distils from a teacher; give one")
            teacher.eval()
            with torch.no_grad():
                if teacher_memory is None:
                    t_memory, t_pos, t_grid = teacher.encode(images)
                else:
                    t_memory = teacher_memory.to(s_memory)
                    t_grid = grid_shape(t_memory.shape[1], tuple(images.shape[-2:]))
                    t_pos = image_positions(*t_grid, teacher.d_model, t_memory.device).unsqueeze(0)
            context = {
                "images": images,
                "targets": targets,
                "student": student,
                "teacher": teacher,
                "s_memory": s_memory,
                "s_pos": s_pos,
                "s_grid": s_grid,
                "t_memory": t_memory.detach(),
                "t_pos": t_pos,
                "t_grid": t_grid,
            }
            terms.update(self.distill(context))
        total = set_loss + terms["memory"] + terms["logit"]
        return {"loss": total, "set": set_loss.detach(), **{k: v.detach() for k, v in terms.items()}}

    def distill(self, context: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The weighted ``{"memory", "logit"}`` terms; ``context`` holds the batch, both models and
        memories (``s_memory`` with its graph, ``t_memory`` detached) and their positions."""
        raise NotImplementedError

    def _grids(self, context: dict[str, Any]) -> tuple[tuple[int, int], tuple[int, int]]:
        return context["s_grid"], context["t_grid"]


class MemoryAdapter(nn.Linear):
    """The 1×1 adapter from the student's memory width to the teacher's (a Linear over tokens)."""

    def identity_(self) -> MemoryAdapter:
        """Set to the identity (same widths only): for tests and as a neutral start."""
        if self.in_features != self.out_features:
            raise ValueError(
                f"identity adapter needs equal widths, got {self.in_features}->{self.out_features}"
            )
        with torch.no_grad():
            self.weight.copy_(torch.eye(self.in_features))
            self.bias.zero_()
        return self


DETECTION_METHODS: Registry[type[DetectionMethod]] = Registry("detection distillation method")


def parse_detection_options(
    method: type[DetectionMethod], name: str, given: dict[str, Any]
) -> DetectionOptions:
    """``given`` validated into ``method.Options``; a bad name or value is one RecipeError line."""
    return validate_options(method.Options, name, given)


def build_detection_method(
    name: str,
    student: DETR,
    teacher: DETR | None,
    num_classes: int,
    options: dict[str, Any] | None = None,
) -> DetectionMethod:
    """The registered method ``name`` (RecipeError naming the known ones if unknown), built for the pair."""
    method = DETECTION_METHODS.get(name)
    return method(student, teacher, num_classes, parse_detection_options(method, name, options or {}))


# ------------------------------------------------------------------------------------------ methods


@DETECTION_METHODS.register("none")
class SetLossOnly(DetectionMethod):
    """The student alone on DETR's set loss (Carion et al., ECCV 2020; DAB-DETR's focal variant):
    the baseline every detection method must beat."""

    name = "none"
    paper = "DETR set loss (Carion et al., ECCV 2020, arXiv:2005.12872)"
    needs_teacher = False

    def distill(self, context: dict[str, Any]) -> dict[str, torch.Tensor]:  # pragma: no cover - no teacher
        return {}


@DETECTION_METHODS.register("memory-mse", aliases=("memory_mse",))
class MemoryMSE(DetectionMethod):
    """Feature distillation on the encoder memory without location masks (baseline).

    ``L = set + w · mean_{cells, d} (T - resample(A(S)))²``, ``A`` a 1×1 (Linear) adapter to the
    teacher's width (FitNets' regressor, Romero et al., ICLR 2015), the student grid resampled to the
    teacher's when they differ. Every cell counts alike, so the clutter of the background weighs as
    much as the objects: what CLoCKDistill's location masks change. ``weight`` (our choice, 2.0)
    makes this term start at the scale of CLoCKDistill's foreground term for a one-object image.
    """

    name = "memory-mse"
    paper = "FitNets hints on the DETR memory (Romero et al., ICLR 2015, arXiv:1412.6550)"

    class Options(DetectionOptions):
        weight: float = Field(2.0, ge=0.0)

    def __init__(
        self, student: DETR, teacher: DETR | None, num_classes: int, options: DetectionOptions
    ) -> None:
        super().__init__(student, teacher, num_classes, options)
        self.adapter = MemoryAdapter(self.student_dim, self.teacher_dim)

    def distill(self, context: dict[str, Any]) -> dict[str, torch.Tensor]:
        s_grid, t_grid = self._grids(context)
        adapted = resample_memory(self.adapter(context["s_memory"]), s_grid, t_grid)
        error = (adapted - context["t_memory"]).pow(2).mean()
        return {"memory": self.options.weight * error}


@DETECTION_METHODS.register("kd-detr", aliases=("kd_detr", "kddetr"))
class KDDETR(DetectionMethod):
    """KD-DETR (Wang et al., CVPR 2024, arXiv:2211.08071): prediction distillation on shared queries.

    Distillation points (queries) are fed to both decoders, each over its own memory, so their
    predictions correspond one to one without matching. KD-DETR's general-to-specific sampling:
    *specific* points are the teacher's own object queries' anchor boxes (learned, or its selected
    proposals for this image, :meth:`edgekd.models.detr.DETR.query_anchors`), *general* points
    ``random_queries`` boxes drawn uniformly each step (centres in (0, 1), sides in [0.05, 0.5]); the
    content part of every point is zero, DAB-DETR's query content. Loss per point:
    ``w · (KL_cls + 5 · L1 + 2 · (1 - GIoU))`` for every student decoder layer against the teacher's
    layer aligned from the last (:func:`layerwise_distillation`), normalised by the number of points;
    ``w`` is the teacher's confidence (highest class probability) on specific points and 1 on general
    points.

    Our reconstruction (from the paper, no public code reachable here): the box range of the general
    points, their number (30, as many as the queries) and the per-layer sum. No ground truth enters
    the queries: what CLoCKDistill's target-aware queries add.
    """

    name = "kd-detr"
    paper = "KD-DETR (Wang et al., CVPR 2024, arXiv:2211.08071)"

    class Options(LogitWeights):
        random_queries: int = Field(30, ge=0)

    def distill(self, context: dict[str, Any]) -> dict[str, torch.Tensor]:
        student, teacher = context["student"], context["teacher"]
        batch = context["s_memory"].shape[0]
        device = context["s_memory"].device
        with torch.no_grad():
            specific = teacher.query_anchors(context["t_memory"], context["t_grid"])
        count = self.options.random_queries
        centres = torch.rand(batch, count, 2, device=device)
        sides = 0.05 + 0.45 * torch.rand(batch, count, 2, device=device)
        anchors = torch.cat((specific, torch.cat((centres, sides), -1)), dim=1).to(context["s_memory"])
        with torch.no_grad():
            t_layers = teacher.decode(context["t_memory"], context["t_pos"], anchors=anchors)
        confidence = t_layers[-1]["logits"].sigmoid().amax(-1)
        n_specific = specific.shape[1]
        weight = torch.cat((confidence[:, :n_specific], torch.ones_like(confidence[:, n_specific:])), 1)
        s_layers = student.decode(context["s_memory"], context["s_pos"], anchors=anchors)
        normaliser = float(anchors.shape[0] * anchors.shape[1])
        logit = layerwise_distillation(s_layers, t_layers, weight, normaliser, self.options)
        return {"logit": self.options.logit_weight * logit}


def class_embedding(num_classes: int, dim: int, scale: float) -> torch.Tensor:
    """A fixed (C, dim) class embedding: seeded Gaussian rows scaled to norm ``scale · sqrt(dim)``.

    The same for every model of width ``dim`` (so identical teacher and student get identical queries)
    and never trained, as CLoCKDistill's target-aware queries stay unlearnable during distillation.
    """
    generator = torch.Generator().manual_seed(20250215 + dim)
    rows = torch.randn(num_classes, dim, generator=generator)
    return rows / rows.norm(dim=1, keepdim=True) * scale * math.sqrt(dim)


@DETECTION_METHODS.register("clockdistill", aliases=("clock", "clock-distill"))
class CLoCKDistill(DetectionMethod):
    """CLoCKDistill (Lan & Tian, "Consistent Location-and-Context-aware Knowledge Distillation for
    DETRs", WACV 2026, arXiv:2502.10683): ``L = set + L_mem + w_logit · L_logit``.

    (a) Location-and-context-aware memory distillation. The student's encoder output (memory, the
    tokens that carry the transformer's global context, rather than backbone features) goes through a
    1×1 adapter ``A`` to the teacher's width (resampled bilinearly to the teacher's grid if the two
    differ) and is regressed to the teacher's memory, weighted by ground-truth masks on the memory grid
    (:func:`foreground_masks`): location mask M (cells a box touches) and scale mask S (``1/cells`` of
    the box, ``1/background cells`` elsewhere)::

        L_mem = α Σ_cells M·S·e + β Σ_cells (1 - M)·S·e,   e = mean_d (T - A(S))²   (mean over the batch)

    (b) Target-aware consistent logit distillation. Queries built from the ground truth, one per
    object: anchor = the object's box (each model's own anchor MLP turns its sine encoding into the
    positional query, DAB-DETR's query form) and content = a fixed class embedding of the object's
    label (:func:`class_embedding`). The same queries go through both decoders over their own
    memories, so student and teacher predictions correspond query by query without Hungarian matching,
    and attend to the same, correct, places. Per query, ``w · (KL_cls + 5 · L1 + 2 · (1 - GIoU))``
    against the teacher's layer aligned from the last (:func:`layerwise_distillation`), summed over
    the student's decoder layers (the paper's sum over decoder stages) and divided by the number of
    objects; ``w`` = the teacher's confidence, its highest class probability on the query
    (less trust where the teacher is unsure: the paper's point against believing the teacher blindly).

    What is ours, the authors' code (github.com/lanqz7766/CLoCKDistill) not being reachable here and
    their paper giving the form rather than every constant:

    - e averages over the channels (the paper, as FGD, sums them): the weights then do not depend on
      the width. α = 2.0, β = 1.0 (FGD's 2:1 foreground:background ratio) make the memory term about
      as large as the set loss at the start for our LayerNorm-ed memory; the paper's α, β (FGD-scale,
      e.g. 5e-5 for its unnormalised multi-scale memory) would make the term vanish here.
    - mask rasterisation: a box covers the cells ``floor(x0·w) .. ceil(x1·w) - 1`` (FGD rounds the
      same way but keeps one more cell); where boxes overlap the smaller box's weight wins.
    - class embedding: fixed, seeded, of norm ``content_scale · sqrt(d)`` (0.1: small, because the
      teacher was trained with zero query content, DAB-DETR's, and a large foreign content vector
      would move its predictions away from what it learned); images with fewer objects than the
      batch's most are padded by repeating their own queries (masked out of the loss), so padding
      only adds duplicates of real objects to each query's self-attention.
    - class distillation as a per-class binary KL of sigmoid probabilities (the sigmoid-focal
      counterpart of the softmax KL); box weights 1 / 5 / 2 (DETR's); the student's decoder (2 layers)
      being shallower than the teacher's (3), layers are paired from the last.
    """

    name = "clockdistill"
    paper = "CLoCKDistill (Lan & Tian, WACV 2026, arXiv:2502.10683)"

    class Options(LogitWeights):
        alpha: float = Field(2.0, ge=0.0)  # foreground weight of the memory term
        beta: float = Field(1.0, ge=0.0)  # background weight of the memory term
        content_scale: float = Field(0.1, ge=0.0)

    def __init__(
        self, student: DETR, teacher: DETR | None, num_classes: int, options: DetectionOptions
    ) -> None:
        super().__init__(student, teacher, num_classes, options)
        self.adapter = MemoryAdapter(self.student_dim, self.teacher_dim)
        scale = self.options.content_scale
        self.register_buffer("student_content", class_embedding(num_classes, self.student_dim, scale))
        self.register_buffer("teacher_content", class_embedding(num_classes, self.teacher_dim, scale))

    def memory_loss(
        self,
        s_memory: torch.Tensor,
        t_memory: torch.Tensor,
        boxes: list[torch.Tensor],
        s_grid: tuple[int, int],
        t_grid: tuple[int, int],
    ) -> torch.Tensor:
        """(a): the location-aware memory term on the teacher's grid (see the class docstring)."""
        adapted = resample_memory(self.adapter(s_memory), s_grid, t_grid)
        error = (adapted - t_memory.detach()).pow(2).mean(-1)  # (B, cells)
        location, scale = foreground_masks(boxes, t_grid, device=error.device)
        fg = (location * scale * error).sum(-1)
        bg = ((1 - location) * scale * error).sum(-1)
        return (self.options.alpha * fg + self.options.beta * bg).mean()

    def target_queries(
        self, targets: Targets, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(anchors (B, N, 4), labels (B, N), valid (B, N))`` of the ground truth, N = most objects."""
        most = max((len(t["labels"]) for t in targets), default=0)
        batch = len(targets)
        anchors = torch.full((batch, max(most, 1), 4), 0.5, device=device)
        labels = torch.zeros(batch, max(most, 1), dtype=torch.int64, device=device)
        valid = torch.zeros(batch, max(most, 1), device=device)
        for index, target in enumerate(targets):
            count = len(target["labels"])
            if not count:
                continue
            repeat = torch.arange(most, device=device) % count
            anchors[index] = target["boxes"].to(device=device, dtype=torch.float32)[repeat]
            labels[index] = target["labels"].to(device)[repeat]
            valid[index, :count] = 1.0
        return anchors.clamp(1e-4, 1 - 1e-4), labels, valid

    def distill(self, context: dict[str, Any]) -> dict[str, torch.Tensor]:
        targets, student, teacher = context["targets"], context["student"], context["teacher"]
        s_memory = context["s_memory"]
        s_grid, t_grid = self._grids(context)
        memory = self.memory_loss(
            s_memory, context["t_memory"], [t["boxes"] for t in targets], s_grid, t_grid
        )
        anchors, labels, valid = self.target_queries(targets, s_memory.device)
        if not valid.any():
            return {"memory": memory, "logit": s_memory.sum() * 0.0}
        anchors = anchors.to(s_memory)
        with torch.no_grad():
            t_layers = teacher.decode(
                context["t_memory"], context["t_pos"], anchors=anchors, content=self.teacher_content[labels]
            )
        weight = t_layers[-1]["logits"].sigmoid().amax(-1) * valid
        s_layers = student.decode(
            s_memory, context["s_pos"], anchors=anchors, content=self.student_content[labels]
        )
        normaliser = float(valid.sum().item())
        logit = layerwise_distillation(s_layers, t_layers, weight, normaliser, self.options)
        return {"memory": memory, "logit": self.options.logit_weight * logit}


def detection_method_rows() -> list[dict[str, str]]:
    """``{"name", "task", "paper"}`` per registered method (what ``edgekd methods`` will list)."""
    return [
        {"name": name, "task": DETECTION_METHODS.get(name).task, "paper": DETECTION_METHODS.get(name).paper}
        for name in DETECTION_METHODS.names()
    ]
