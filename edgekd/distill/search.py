"""Student search without training: DisWOT (Dong, Li, Wei, CVPR 2023, arXiv:2303.15678).

DisWOT ranks candidate students for a given teacher by two similarities measured on one batch, with
the students at random initialisation (no training):

- **semantic**: the class activation maps (Grad-CAM) of teacher and student on the last feature map;
- **relation**: the sample-relation (Gram) matrices of the last feature maps across the batch.

Each similarity is a Gram matrix per model, L2-normalised row by row; teacher and student are
compared by the squared L2 distance of their normalised matrices. The DisWOT score is the sum of
the two distances: **lower is better** (the authors' search maximises its negative).

How this follows the authors' code (the "Core Code" of github.com/lilujunai/DisWOT-CVPR2023) and where
it departs, on purpose:

- Relation (their ``batch_similarity``): features before global pooling flattened per sample,
  ``G = F F^T`` (B x B), ``F.normalize`` per row, squared difference summed. They divide the sum by
  B^2; we divide by B (the mean over rows of the squared row distance, in [0, 4]) so that both terms
  share one scale and neither vanishes with the batch size. The ranking for a fixed batch is the same.
- Semantic (their ``channel_similarity``, an inter-channel-correlation loss on the classifier's weight
  gradient, which needs teacher and student of equal width): we compute Grad-CAM maps
  ``CAM_k = sum_c alpha_kc F_c`` with ``alpha_kc`` the spatial mean of d logit_k / d F_c on the last
  feature map F, one map per class and sample, and compare the class-similarity matrices
  ``G = M M^T`` (K x K, M = the maps of each class over the whole batch, K x (B*S)). Its shape
  depends on the number of classes only, so any teacher and student compare. For a head that is a
  linear layer on globally pooled maps (ResNets), ``alpha_k`` is the classifier's weight row of class
  k divided by S: Grad-CAM is then exactly CAM from the classifier weights. The ReLU Grad-CAM applies
  for display is left out (as the authors' code uses signed weights), so negative evidence counts.
- The teacher is the trained one (the paper scores random-initialised pairs); the students are
  freshly built with their own (timm / edgekd) initialisation seeded from ``seed``, in eval mode.

Maps may be (B, C, H, W) (timm) or (B, C, L) (edgekd's radio models): only the flattened spatial
axes S are used. The last feature map is the output of the model's last ``hint_layers`` entry.

Where the score means little: with fewer than :data:`MIN_POSITIONS` spatial positions in the last
map (e.g. 1x1, which a ResNet reaches on 32x32 inputs), Grad-CAM has no spatial extent: each class
map is one number per sample, ``sum_c alpha_kc F_c``, i.e. (up to the bias) the logit itself, so
the semantic term only compares logit correlations of untrained networks, and the relation term
compares pooled vectors. The paper scores 32x32 CIFAR students whose last maps are 8x8. Such a
candidate is still scored, but flagged: a ``map_warning`` in its JSON entry and a warning line in
the log (raise ``data.image_size``, e.g. 64 or 96, for image data).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgekd.data.base import ArrayDataset, DatasetMeta, seeded_rng
from edgekd.distill.outputs import model_outputs
from edgekd.errors import ModelError, RecipeError
from edgekd.models import build_model, model_factory
from edgekd.models.stats import count_flops, count_parameters

MIN_POSITIONS = 4  # spatial positions (e.g. 2x2) below which Grad-CAM maps degenerate to logits

LATENCY_PROTOCOL = {
    "runtime": "PyTorch FP32 (edgekd.backends.torch.TorchRunner, torch.inference_mode)",
    "batch": 1,
    "statistic": "p50",
    "warmup": 5,
    "iterations": 30,
}


@dataclass(frozen=True)
class Budget:
    """Limits a candidate must meet to be ranked: FLOPs per sample and/or PyTorch p50 latency (ms)."""

    max_flops: int | None = None
    max_latency_ms: float | None = None
    threads: int | None = None  # threads for the latency measurement (None: all cores)

    def __post_init__(self) -> None:
        if self.max_flops is not None and self.max_flops <= 0:
            raise RecipeError(f"--max-flops must be > 0, got {self.max_flops}")
        if self.max_latency_ms is not None and self.max_latency_ms <= 0:
            raise RecipeError(f"--max-latency-ms must be > 0, got {self.max_latency_ms}")


@dataclass
class Candidate:
    """One candidate student: its DisWOT distances (None when excluded), size, compute and latency."""

    name: str
    params: int
    flops: int
    latency_ms: float
    within_budget: bool
    excluded_because: str | None = None
    score: float | None = None  # semantic + relation; lower ranks first
    semantic: float | None = None
    relation: float | None = None
    rank: int | None = None  # 1 = most similar to the teacher; None when excluded
    map_shape: list[int] | None = None  # spatial shape of the candidate's last feature map
    map_warning: str | None = None  # why the score means little here (last map too small), if so

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- the metric, piece by piece


def normalised_gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows @ rows.T`` for a (N, D) matrix, each row of the (N, N) result L2-normalised."""
    return F.normalize(rows @ rows.T, p=2, dim=1)


def gram_distance(gram_teacher: torch.Tensor, gram_student: torch.Tensor) -> float:
    """Mean over rows of the squared L2 distance between two row-normalised Gram matrices (0 to 4)."""
    return float(((gram_teacher - gram_student) ** 2).sum(dim=1).mean())


def grad_cam(feature_map: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps (B, K, S) of every class k on ``feature_map`` (B, C, *spatial), without the ReLU.

    ``alpha_kc`` is the mean over the spatial positions of d logits[:, k] / d feature_map[:, c]; the map
    of class k is ``sum_c alpha_kc * feature_map[:, c]``. The model must be in eval mode so that each
    sample's logits depend on that sample only.
    """
    flat = feature_map.flatten(2)  # (B, C, S)
    maps = []
    for k in range(logits.shape[1]):
        (grad,) = torch.autograd.grad(logits[:, k].sum(), feature_map, retain_graph=True)
        alpha = grad.flatten(2).mean(dim=2, keepdim=True)  # (B, C, 1)
        maps.append((alpha * flat).sum(dim=1))  # (B, S)
    return torch.stack(maps, dim=1).detach()


def semantic_gram(cams: torch.Tensor) -> torch.Tensor:
    """Class-similarity matrix (K, K) of Grad-CAM maps (B, K, S): each class's maps over the batch."""
    per_class = cams.transpose(0, 1).reshape(cams.shape[1], -1)  # (K, B*S)
    return normalised_gram(per_class)


def relation_gram(feature_map: torch.Tensor) -> torch.Tensor:
    """Sample-relation matrix (B, B) of feature maps (B, C, *spatial) flattened per sample."""
    return normalised_gram(feature_map.detach().flatten(1))


def _last_map_and_logits(model: nn.Module, x: torch.Tensor, role: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not getattr(model, "hint_layers", ()):
        raise ModelError(f"{role} has no hint_layers, so DisWOT has no feature map to compare")
    outputs = model_outputs(model, x, features=False, feature_maps=True)
    feature_map = outputs.feature_maps[-1] if outputs.feature_maps else None
    if not isinstance(feature_map, torch.Tensor) or feature_map.dim() < 3:
        shape = None if feature_map is None else tuple(getattr(feature_map, "shape", ()))
        raise ModelError(
            f"{role}: its last hint layer {model.hint_layers[-1]!r} gave {shape}, not a (B, C, ...) map"
        )
    return feature_map, outputs.logits


def last_map_spatial_shape(model: nn.Module, x: torch.Tensor, role: str = "model") -> tuple[int, ...]:
    """Spatial shape (H, W) or (L,) of ``model``'s last hint-layer map on inputs like ``x``."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            feature_map, _ = _last_map_and_logits(model, x[:2], role)
    finally:
        model.train(was_training)
    return tuple(int(n) for n in feature_map.shape[2:])


def map_warning(role: str, spatial: tuple[int, ...]) -> str | None:
    """A one-line warning when a last feature map has fewer than :data:`MIN_POSITIONS` positions."""
    positions = math.prod(spatial)
    if positions >= MIN_POSITIONS:
        return None
    size = "x".join(str(n) for n in spatial) or "1"
    return (
        f"the {role}'s last feature map is {size} ({positions} spatial position"
        f"{'' if positions == 1 else 's'} < {MIN_POSITIONS}): Grad-CAM has no spatial extent there, "
        "so the DisWOT score compares little more than logits; use larger inputs "
        "(e.g. data.image_size=64 or 96)"
    )


def model_grams(model: nn.Module, x: torch.Tensor, role: str = "model") -> tuple[torch.Tensor, torch.Tensor]:
    """(semantic K x K, relation B x B) normalised Gram matrices of ``model`` on batch ``x`` (eval mode)."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            feature_map, logits = _last_map_and_logits(model, x.detach().clone().requires_grad_(True), role)
            cams = grad_cam(feature_map, logits)
    finally:
        model.train(was_training)
    return semantic_gram(cams), relation_gram(feature_map)


def diswot_distances(
    teacher_grams: tuple[torch.Tensor, torch.Tensor],
    student: nn.Module,
    x: torch.Tensor,
    role: str = "student",
) -> dict[str, float]:
    """``semantic``, ``relation`` and ``score`` (their sum) of ``student`` against the teacher's Grams."""
    semantic_s, relation_s = model_grams(student, x, role)
    semantic = gram_distance(teacher_grams[0], semantic_s)
    relation = gram_distance(teacher_grams[1], relation_s)
    return {"semantic": semantic, "relation": relation, "score": semantic + relation}


def diswot_score(teacher: nn.Module, student: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """The DisWOT distances of ``student`` to ``teacher`` on batch ``x`` (0 for identical models)."""
    return diswot_distances(model_grams(teacher, x, "teacher"), student, x)


# ----------------------------------------------------------------------------------------- the search


def check_candidates(names: list[str]) -> list[str]:
    """The names, stripped and de-duplicated in order; a one-line error for an empty list or unknown name."""
    cleaned = list(dict.fromkeys(name.strip() for name in names if name.strip()))
    if not cleaned:
        raise RecipeError(
            "--candidates is empty; pass comma-separated models, e.g. timm:resnet10t,edgekd:cnn"
        )
    for name in cleaned:
        model_factory(name)  # ModelError with close matches for an unknown name
    return cleaned


def check_teacher(model: str) -> None:
    """A one-line error for an ONNX teacher: DisWOT's semantic distance is built from the teacher's
    Grad-CAM maps (feature maps and their gradients), which ONNX Runtime does not give."""
    from edgekd.models import is_onnx

    if is_onnx(model):
        raise RecipeError(
            f"teacher.model {model}: edgekd search-student needs the teacher's feature maps and their "
            "gradients (DisWOT's Grad-CAM), which an ONNX teacher does not give; pass the PyTorch teacher "
            "(e.g. --set teacher.model=py:FILE.py:FACTORY --set teacher.checkpoint=WEIGHTS)"
        )


def search_batch(train: ArrayDataset, batch: int, seed: int) -> torch.Tensor:
    """``batch`` training inputs drawn without replacement by a seeded stream (all of them if fewer)."""
    if batch < 2:
        raise RecipeError(f"--batch must be >= 2 (the relation matrix compares samples), got {batch}")
    rng = seeded_rng(seed, "diswot-batch")
    indices = np.sort(rng.choice(len(train), size=min(batch, len(train)), replace=False))
    return torch.from_numpy(np.ascontiguousarray(train.x[indices], dtype=np.float32))


def pytorch_latency_ms(model: nn.Module, input_shape: tuple[int, ...], threads: int | None) -> float:
    """p50 latency (ms) of ``model`` in PyTorch FP32 at batch 1 (see :data:`LATENCY_PROTOCOL`)."""
    from edgekd.backends.torch import TorchRunner
    from edgekd.profile.latency import measure_latency

    runner = TorchRunner(model, threads=threads)
    sample = np.zeros((1, *input_shape), dtype=np.float32)
    stats = measure_latency(runner, sample, LATENCY_PROTOCOL["warmup"], LATENCY_PROTOCOL["iterations"])
    return float(stats["p50_ms"])


def _over_budget(flops: int, latency_ms: float, budget: Budget) -> str | None:
    if budget.max_flops is not None and flops > budget.max_flops:
        return f"{flops:,} FLOPs > --max-flops {budget.max_flops:,}"
    if budget.max_latency_ms is not None and latency_ms > budget.max_latency_ms:
        return f"p50 {latency_ms:.3f} ms > --max-latency-ms {budget.max_latency_ms}"
    return None


def rank_students(
    teacher: nn.Module,
    candidates: list[str],
    data: tuple[ArrayDataset, ArrayDataset, DatasetMeta],
    budget: Budget | None = None,
    batch: int = 64,
    seed: int = 0,
    log: Any = None,
) -> list[Candidate]:
    """DisWOT ranking of ``candidates`` (model names) for ``teacher`` on one seeded batch of ``data``.

    ``data`` is :func:`edgekd.data.build_dataset`'s (train, val, meta); the batch comes from train.
    Each candidate is built (seeded by ``seed``, random initialisation, no training), measured (params,
    FLOPs, PyTorch p50 latency), and scored unless it is over ``budget``. Returns the ranked candidates
    (lowest score first), then the excluded ones with the reason.
    """
    budget = budget or Budget()
    names = check_candidates(candidates)
    train, _val, meta = data
    x = search_batch(train, batch, seed)
    teacher_grams = model_grams(teacher, x, "teacher")
    teacher_warning = map_warning("teacher", last_map_spatial_shape(teacher, x, "teacher"))
    if teacher_warning is not None and log is not None:
        log(f"[search] warning: {teacher_warning}")
    ranked: list[Candidate] = []
    for name in names:
        torch.manual_seed(seed)
        student = build_model(
            name,
            num_classes=len(meta.classes),
            in_channels=meta.input_shape[0],
            role="candidate",
            input_shape=meta.input_shape,
        )
        flops = count_flops(student, meta.input_shape)
        latency = pytorch_latency_ms(student, meta.input_shape, budget.threads)
        reason = _over_budget(flops, latency, budget)
        candidate = Candidate(name, count_parameters(student), flops, latency, reason is None, reason)
        if reason is None:
            role = f"candidate {name!r}"
            distances = diswot_distances(teacher_grams, student, x, role=role)
            candidate.score, candidate.semantic = distances["score"], distances["semantic"]
            candidate.relation = distances["relation"]
            spatial = last_map_spatial_shape(student, x, role)
            candidate.map_shape = list(spatial)
            warnings = [w for w in (map_warning(role, spatial), teacher_warning) if w is not None]
            candidate.map_warning = "; ".join(warnings) or None
        if log is not None:
            what = f"score {candidate.score:.4f}" if reason is None else f"excluded: {reason}"
            log(f"[search] {name}: {what}")
            if candidate.map_warning is not None and candidate.map_warning != teacher_warning:
                log(f"[search] warning: {name}: {candidate.map_warning}")
        ranked.append(candidate)
    scored = sorted((c for c in ranked if c.score is not None), key=lambda c: c.score)
    for position, candidate in enumerate(scored, start=1):
        candidate.rank = position
    return scored + [c for c in ranked if c.score is None]
