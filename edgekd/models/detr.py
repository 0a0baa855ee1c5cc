"""A small single-scale DETR with anchor-box queries, in plain PyTorch (no ``transformers``).

The detector follows DETR (Carion, Massa, Synnaeve, Usunier, Kirillov, Zagoruyko, "End-to-End Object
Detection with Transformers", ECCV 2020, arXiv:2005.12872) with the decoder of DAB-DETR (Liu, Li,
Zhang, Yang, Qi, Su, Zhu, Zhang, "DAB-DETR: Dynamic Anchor Boxes are Better Queries for DETR",
ICLR 2022, arXiv:2201.12329), whose cross-attention is Conditional DETR's (Meng et al., ICCV 2021,
arXiv:2108.06152):

- backbone: a timm CNN (``features_only=True``), its deepest stage of output stride ``feature_stride``
  (the registered sizes: 16, i.e. 8×8 tokens at 128 px; DETR's stride 32 leaves 4×4, too coarse for
  objects a tenth of the image wide), then a 1×1 projection to ``d_model``; the feature map's
  positions get a 2-d sine encoding (DETR; temperature 20, DAB-DETR's default for the image features);
- encoder: post-norm layers, self-attention over the H×W tokens with the positional encoding
  rescaled per layer by an MLP of the content (DAB-DETR's encoder);
- query selection (``query_selection``; RT-DETR: Zhao, Lv, Xu, Wei, Wang, Dang, Liu, Chen, "DETRs Beat
  YOLOs on Real-time Object Detection", CVPR 2024, arXiv:2304.08069, the two-stage scheme of
  Deformable DETR, Zhu et al., ICLR 2021): every encoder token predicts a class and a box (a delta on
  its cell's anchor box); the ``num_queries`` tokens of highest class score start the decoder, their
  boxes (detached) as its anchors and their features (detached) as its content queries, and their
  predictions get the set loss like a decoder layer's (RT-DETR's encoder loss). Without it, one
  learnable anchor per query (DAB-DETR);
- dense auxiliary loss (``dense_loss_weight``, **ours**, after Co-DETR's one-to-many auxiliary heads:
  Zong, Song, Liu, "DETRs with Collaborative Hybrid Assignments Training", ICCV 2023, arXiv:2211.12860):
  every token's proposal is also trained one-to-many, each object owning the cells near its centre
  (FCOS's centre sampling), :meth:`edgekd.detection.criterion.SetCriterion.dense_losses`. One-to-one
  matching gives the backbone a handful of positives per image, which is why DETRs from random weights
  converge so slowly; the dense term gives it a few per object. Measured on the built-in scenes
  (``edgekd:detr-mnv3`` alone, 30 epochs on 900 scenes, lr 1e-3): held-out mAP@.5 0.068 with the term,
  0.031 without (one seed each); the registered sizes use weight 1.0, the class default is 0 (off);
- decoder: one 4-d anchor (cx, cy, w, h) per query. In each layer the query's positional
  embedding is an MLP of the sine encoding of its anchor; the cross-attention concatenates, per head,
  content and position parts of queries and keys (Conditional DETR), the anchor's sine encoding
  rescaled by the content and modulated by the anchor's width and height (DAB-DETR's "modulated
  attention"); a shared box MLP predicts a delta added to the anchor in inverse-sigmoid space, and
  the refined box (detached) is the next layer's anchor (iterative refinement);
- heads: a shared class head (sigmoid focal logits, bias initialised to the prior 0.01, as DAB-DETR)
  and the shared box head, applied to every decoder layer: the last layer's predictions are the
  output, the others auxiliary outputs for the set loss of :mod:`edgekd.detection.criterion`.

Our choices, where the papers' defaults are for COCO on GPUs: small widths and depths (see
:data:`SIZES`), stride 16 with query selection (measured: ``edgekd:detr-r18`` alone, 10 epochs on 900
scenes at lr 2e-4, held-out mAP@.5 0.035 against 0.0015 with stride 32 and learned anchors, one seed),
the dense term above, ReLU feed-forward layers (DAB-DETR uses PReLU), no dropout (DAB-DETR's default
is 0), a plain DETR self-attention in the decoder (query = key = content + position), learned anchors'
centres (without query selection) initialised uniformly over the image and their sizes at
``sigmoid(N(0, 1))``.

Attention is written out as MatMul / Softmax (no fused or custom operator) and normalisation is
LayerNorm, so the model exports to ONNX (opset 18, dynamic batch) and ONNX Runtime / OpenVINO
quantise it with standard rules. :meth:`DETR.for_export` gives a module whose outputs are only
``(logits, boxes)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgekd.errors import ModelError

TASK = "detection"

# What the teacher sizes share: they differ in the backbone only.
_TEACHER_LAYOUT: dict[str, Any] = {
    "d_model": 128,
    "heads": 8,
    "encoder_layers": 3,
    "decoder_layers": 3,
    "ffn_dim": 512,
    "num_queries": 30,
    "feature_stride": 16,
    "query_selection": True,
    "dense_loss_weight": 1.0,
}
#: The registered sizes: teachers (wider, 3+3 layers) on a ResNet-18 backbone (the default: from random
#: weights it learns fastest of all at lr 3e-4, see edgekd.tasks) or a MobileNetV3-large one (lr 1e-3,
#: slower), and the student (MobileNetV3-small, narrow, 1+2 layers). Any field can be overridden by a
#: factory keyword (``teacher.kwargs``).
SIZES: dict[str, dict[str, Any]] = {
    "edgekd:detr-mnv3l": {"backbone": "mobilenetv3_large_100", **_TEACHER_LAYOUT},
    "edgekd:detr-r18": {"backbone": "resnet18", **_TEACHER_LAYOUT},
    "edgekd:detr-mnv3": {
        "backbone": "mobilenetv3_small_100",
        "d_model": 64,
        "heads": 4,
        "encoder_layers": 1,
        "decoder_layers": 2,
        "ffn_dim": 256,
        "num_queries": 30,
        "feature_stride": 16,
        "query_selection": True,
        "dense_loss_weight": 1.0,
    },
}

IMAGE_TEMPERATURE = 20.0  # DAB-DETR's --pe_temperatureH/W for the feature map's sine encoding
ANCHOR_TEMPERATURE = 10000.0  # DAB-DETR's gen_sineembed_for_position
PRIOR_PROBABILITY = 0.01  # class-bias initialisation for sigmoid focal classification (RetinaNet)
PROPOSAL_SIDE = 0.05  # a token anchor's side at stride 8 (Deformable DETR's two-stage proposals)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to [eps, 1 - eps], so refinement stays finite."""
    x = x.clamp(eps, 1.0 - eps)
    return torch.log(x / (1.0 - x))


def sine_encoding(coords: torch.Tensor, dim_per_coord: int, temperature: float) -> torch.Tensor:
    """Sine/cosine encoding of coordinates in [0, 1]: (..., k) → (..., k * dim_per_coord).

    Each coordinate ``c`` becomes ``[sin(2π c / T^(2i/D)), cos(2π c / T^(2i/D))]`` over
    ``i < D / 2`` (interleaved), the encoding of DETR (there for pixel positions) and DAB-DETR (there
    for anchors); the coordinates' encodings are concatenated in their order.
    """
    if dim_per_coord % 2:
        raise ValueError(f"dim_per_coord must be even, got {dim_per_coord}")
    half = torch.arange(dim_per_coord // 2, dtype=coords.dtype, device=coords.device)
    frequencies = temperature ** (-2.0 * half / dim_per_coord)  # (D/2,)
    angles = coords.unsqueeze(-1) * (2.0 * math.pi) * frequencies  # (..., k, D/2)
    encoded = torch.stack((angles.sin(), angles.cos()), dim=-1)  # (..., k, D/2, 2)
    return encoded.flatten(-3)


def cell_centres(
    height: int, width: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The (H*W, 2) centres (x, y) of a feature map's cells, normalised to (0, 1), row by row."""
    ys = (torch.arange(height, dtype=dtype, device=device) + 0.5) / height
    xs = (torch.arange(width, dtype=dtype, device=device) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x, grid_y), dim=-1).reshape(height * width, 2)


def image_positions(height: int, width: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """The (H*W, dim) sine encoding of a feature map's cell centres (:func:`cell_centres`)."""
    return sine_encoding(cell_centres(height, width, device), dim // 2, IMAGE_TEMPERATURE)


class MLP(nn.Module):
    """``layers`` Linear layers with ReLU between them (DETR's box head and DAB-DETR's small MLPs)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int) -> None:
        super().__init__()
        dims = [in_dim, *([hidden_dim] * (layers - 1)), out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head scaled dot-product attention as MatMul → Softmax → MatMul.

    ``query`` (B, Nq, Dk), ``key`` (B, Nk, Dk), ``value`` (B, Nk, Dv), Dk and Dv divisible by
    ``heads``; returns (B, Nq, Dv). Written out (no fused kernel) so the ONNX graph holds only
    standard operators a quantiser knows.
    """
    batch, queries, dim_k = query.shape
    tokens, dim_v = key.shape[1], value.shape[2]
    q = query.reshape(batch, queries, heads, dim_k // heads).transpose(1, 2)
    k = key.reshape(batch, tokens, heads, dim_k // heads).transpose(1, 2)
    v = value.reshape(batch, tokens, heads, dim_v // heads).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(dim_k // heads))
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, v).transpose(1, 2).reshape(batch, queries, dim_v)


def _per_head_concat(content: torch.Tensor, position: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, D) and (B, N, D) → (B, N, 2D) laid out per head as ``[content_h ; position_h]``, so one
    attention's per-head dot product is content similarity plus spatial similarity (Conditional DETR)."""
    batch, tokens, dim = content.shape
    parts = (content.reshape(batch, tokens, heads, dim // heads), position.reshape(batch, tokens, heads, -1))
    return torch.cat(parts, dim=-1).reshape(batch, tokens, 2 * dim)


class SelfAttention(nn.Module):
    """DETR's self-attention: query = key = x + pos, value = x, then an output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        qk = x + pos
        return self.out_proj(attend(self.q_proj(qk), self.k_proj(qk), self.v_proj(x), self.heads))


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer (DETR): self-attention, then a ReLU feed-forward."""

    def __init__(self, dim: int, heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.attention = SelfAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = MLP(dim, ffn_dim, dim, 2)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attention(x, pos))
        return self.norm2(x + self.ffn(x))


class DecoderLayer(nn.Module):
    """DAB-DETR decoder layer: self-attention among queries, conditional cross-attention, feed-forward.

    The cross-attention's query per head is ``[content ; projected anchor sine]`` and its key
    ``[content ; projected image position]`` (Conditional DETR), so the dot product is the sum of a
    content and a spatial similarity; the first layer also adds the positional embeddings to the
    content parts (DAB-DETR, ``keep_query_pos=False``).
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, first: bool) -> None:
        super().__init__()
        self.heads, self.first = heads, first
        self.self_attention = SelfAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.q_content = nn.Linear(dim, dim)
        self.q_sine = nn.Linear(dim, dim)
        self.k_content = nn.Linear(dim, dim)
        self.k_pos = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_pos = nn.Linear(dim, dim) if first else None
        self.out_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = MLP(dim, ffn_dim, dim, 2)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        query_sine: torch.Tensor,
    ) -> torch.Tensor:
        tgt = self.norm1(tgt + self.self_attention(tgt, query_pos))
        batch, tokens, dim = memory.shape
        q, k, k_pos = self.q_content(tgt), self.k_content(memory), self.k_pos(pos)
        if self.q_pos is not None:
            q = q + self.q_pos(query_pos)
            k = k + k_pos
        q = _per_head_concat(q, self.q_sine(query_sine), self.heads)
        k = _per_head_concat(k, k_pos.expand(batch, tokens, dim), self.heads)
        tgt = self.norm2(tgt + self.out_proj(attend(q, k, self.v_proj(memory), self.heads)))
        return self.norm3(tgt + self.ffn(tgt))


class DETR(nn.Module):
    """Single-scale DETR with DAB-DETR anchor queries (see the module docstring for the papers).

    ``forward(images)`` with images (B, in_channels, H, W) returns a dict: ``logits`` (B, Q, C) sigmoid
    class logits (no "no-object" class: focal classification), ``boxes`` (B, Q, 4) (cx, cy, w, h)
    normalised to [0, 1], ``aux``: one ``{"logits", "boxes"}`` per earlier decoder layer (first to
    second-last), and ``memory`` (B, H'*W', d_model), the encoder output on the stride-32 map.

    :meth:`encode` and :meth:`decode` are the two halves, so other queries (e.g. built from
    ground-truth boxes for CLoCKDistill) can be decoded over a model's own memory.
    """

    task = TASK
    input_rank = 3  # (C, H, W) per sample

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        backbone: str = "resnet18",
        d_model: int = 128,
        heads: int = 8,
        encoder_layers: int = 3,
        decoder_layers: int = 3,
        ffn_dim: int = 512,
        num_queries: int = 30,
        feature_stride: int = 32,
        query_selection: bool = False,
        dense_loss_weight: float = 0.0,
        pretrained: bool = False,
        role: str = "model",
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ModelError(f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
        if d_model % heads or d_model % 4:
            raise ModelError(f"d_model {d_model} must be divisible by heads ({heads}) and by 4")
        if decoder_layers < 1 or encoder_layers < 0 or num_queries < 1:
            raise ModelError(
                f"need decoder_layers >= 1, encoder_layers >= 0 and num_queries >= 1, got "
                f"{decoder_layers}, {encoder_layers}, {num_queries}"
            )
        self.num_classes, self.in_channels = num_classes, in_channels
        self.d_model, self.heads, self.num_queries = d_model, heads, num_queries
        self.feature_dim = d_model
        self.backbone_name = backbone
        self.backbone = _timm_backbone(backbone, in_channels, pretrained, role, feature_stride)
        channels = self.backbone.feature_info.channels()[-1]
        self.stride = self.backbone.feature_info.reduction()[-1]
        self.query_selection = query_selection
        self.dense_loss_weight = dense_loss_weight
        if dense_loss_weight and not query_selection:
            raise ModelError(
                "dense_loss_weight trains the proposals of query selection: set query_selection too"
            )
        if query_selection:  # RT-DETR's encoder heads: proposals per token, the top ones become the queries
            self.proposal_output = nn.Sequential(nn.Linear(d_model, d_model), nn.LayerNorm(d_model))
            self.proposal_class_head = nn.Linear(d_model, num_classes)
            self.proposal_box_head = MLP(d_model, d_model, 4, 3)
        self.input_proj = nn.Conv2d(channels, d_model, kernel_size=1)
        self.encoder = nn.ModuleList(EncoderLayer(d_model, heads, ffn_dim) for _ in range(encoder_layers))
        self.encoder_pos_scale = MLP(d_model, d_model, d_model, 2)
        self.decoder = nn.ModuleList(
            DecoderLayer(d_model, heads, ffn_dim, first=index == 0) for index in range(decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(d_model)
        self.anchor_pos = MLP(2 * d_model, d_model, d_model, 2)  # sine(anchor) → query position
        self.query_scale = MLP(d_model, d_model, d_model, 2)  # content-conditioned scale of the sine
        self.anchor_hw = MLP(d_model, d_model, 2, 2)  # reference w, h for the modulated attention
        self.class_head = nn.Linear(d_model, num_classes)
        self.box_head = MLP(d_model, d_model, 4, 3)
        if not query_selection:  # DAB-DETR's learned anchors, inverse-sigmoid (cx, cy, w, h)
            self.anchors = nn.Parameter(torch.empty(num_queries, 4))
        self.hint_layers = ("input_proj",)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for module in (self.encoder, self.decoder, self.encoder_pos_scale, self.anchor_pos, self.query_scale):
            for parameter in module.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)
        prior_bias = -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY)
        nn.init.constant_(self.class_head.bias, prior_bias)
        nn.init.zeros_(self.box_head.layers[-1].weight)
        nn.init.zeros_(self.box_head.layers[-1].bias)
        if self.query_selection:
            nn.init.constant_(self.proposal_class_head.bias, prior_bias)
            nn.init.zeros_(self.proposal_box_head.layers[-1].weight)
            nn.init.zeros_(self.proposal_box_head.layers[-1].bias)
        if not self.query_selection:
            with torch.no_grad():
                self.anchors[:, :2] = inverse_sigmoid(torch.rand(self.num_queries, 2))
                self.anchors[:, 2:].normal_()

    @property
    def head(self) -> nn.Linear:
        """The class head: what :func:`edgekd.models.checkpoint.save_checkpoint` reads the classes from."""
        return self.class_head

    # --------------------------------------------------------------------------------------- halves

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """``(memory (B, HW, d), pos (1, HW, d), (H, W))``: the encoder output, the tokens' sine
        positions and the feature map's grid."""
        feature = self.input_proj(self.backbone(images)[-1])  # (B, d, h, w)
        height, width = feature.shape[-2:]
        memory = feature.flatten(2).transpose(1, 2)
        pos = image_positions(int(height), int(width), self.d_model, feature.device).unsqueeze(0)
        for layer in self.encoder:
            memory = layer(memory, pos * self.encoder_pos_scale(memory))
        return memory, pos, (int(height), int(width))

    def token_anchors(self, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """(1, h*w, 4) boxes (cx, cy, w, h): each feature cell's centre, side ``0.05 · stride / 8``."""
        centres = cell_centres(*grid, like.device, like.dtype).unsqueeze(0)
        return torch.cat((centres, torch.full_like(centres, PROPOSAL_SIDE * self.stride / 8)), dim=-1)

    def proposals(self, memory: torch.Tensor, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
        """RT-DETR's query selection: the ``num_queries`` encoder tokens of highest class score.

        Each token predicts a class and a box from ``proposal_output(memory)``, the box as a delta (in
        inverse-sigmoid space) on the token's own anchor: its cell centre, width and height
        ``0.05 · stride / 8`` (Deformable DETR's two-stage proposals, 0.05 · 2^level from stride 8).
        Returns the selected tokens' ``logits`` (B, K, C) and ``boxes`` (B, K, 4) (trained by the set
        loss like a decoder layer's, RT-DETR's encoder loss), and the decoder's starting point: the
        boxes detached as ``anchors`` and the tokens' features detached as ``content`` (RT-DETR's
        default, ``learnt_init_query=False``).
        """
        features = self.proposal_output(memory)
        logits = self.proposal_class_head(features)
        anchors = self.token_anchors(grid, memory)
        boxes = (self.proposal_box_head(features) + inverse_sigmoid(anchors)).sigmoid()
        k = min(self.num_queries, grid[0] * grid[1])
        index = logits.max(-1).values.topk(k, dim=1).indices.unsqueeze(-1)  # (B, K, 1)
        chosen_boxes = boxes.gather(1, index.expand(-1, -1, 4))
        return {
            "logits": logits.gather(1, index.expand(-1, -1, logits.shape[-1])),
            "boxes": chosen_boxes,
            "anchors": chosen_boxes.detach(),
            "content": features.gather(1, index.expand(-1, -1, features.shape[-1])).detach(),
            "dense": {
                "logits": logits,
                "boxes": boxes,
                "anchors": anchors,
                "grid": grid,
                "weight": self.dense_loss_weight,
            },
        }

    def query_anchors(self, memory: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N, 4) the anchor boxes the decoder starts from over ``memory``: the chosen proposals
        with query selection, else the learned anchors."""
        if self.query_selection:
            return self.proposals(memory, grid)["anchors"]
        return self.anchors.sigmoid().unsqueeze(0).expand(memory.shape[0], -1, -1)

    def decode(
        self,
        memory: torch.Tensor,
        pos: torch.Tensor,
        anchors: torch.Tensor | None = None,
        content: torch.Tensor | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Per decoder layer ``{"logits": (B, N, C), "boxes": (B, N, 4), "hidden": (B, N, d)}``.

        ``anchors`` (B, N, 4) or (N, 4), boxes (cx, cy, w, h) in (0, 1), default the learned ones
        (with query selection, :meth:`predict` passes the encoder's proposals);
        ``content`` (B, N, d) the queries' initial content, default zeros (DAB-DETR).
        """
        batch = memory.shape[0]
        if anchors is None:
            if self.query_selection:
                raise ValueError("a DETR with query selection decodes given anchors (predict() passes them)")
            reference = self.anchors.sigmoid().unsqueeze(0).expand(batch, -1, -1)
        else:
            reference = anchors if anchors.dim() == 3 else anchors.unsqueeze(0).expand(batch, -1, -1)
        tgt = (
            content
            if content is not None
            else torch.zeros(
                batch, reference.shape[1], self.d_model, dtype=memory.dtype, device=memory.device
            )
        )
        half = self.d_model // 2
        outputs = []
        for index, layer in enumerate(self.decoder):
            sine = sine_encoding(reference, half, ANCHOR_TEMPERATURE)  # (B, N, 2d): x, y, w, h
            query_pos = self.anchor_pos(sine)
            query_sine = sine[..., : self.d_model]  # the centre's encoding: x then y
            if index > 0:
                query_sine = query_sine * self.query_scale(tgt)
            wh = self.anchor_hw(tgt).sigmoid()  # modulated attention: reference w, h over the anchor's
            query_sine = torch.cat(
                (
                    query_sine[..., :half] * (wh[..., :1] / reference[..., 2:3]),
                    query_sine[..., half:] * (wh[..., 1:] / reference[..., 3:4]),
                ),
                dim=-1,
            )
            tgt = layer(tgt, memory, pos, query_pos, query_sine)
            hidden = self.decoder_norm(tgt)
            boxes = (self.box_head(hidden) + inverse_sigmoid(reference)).sigmoid()
            outputs.append({"logits": self.class_head(hidden), "boxes": boxes, "hidden": hidden})
            reference = boxes.detach()
        return outputs

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        memory, pos, grid = self.encode(images)
        return {**self.predict(memory, pos, grid), "memory": memory}

    def predict(self, memory: torch.Tensor, pos: torch.Tensor, grid: tuple[int, int]) -> dict[str, Any]:
        """The detector's own predictions over ``memory``: the last decoder layer's ``logits`` and
        ``boxes``, and ``aux``, the earlier layers' and (with query selection) the chosen proposals',
        each ``{"logits", "boxes"}``, all trained by the set loss."""
        chosen = self.proposals(memory, grid) if self.query_selection else None
        layers = self.decode(memory, pos, **({} if chosen is None else _queries(chosen)))
        aux = [{"logits": out["logits"], "boxes": out["boxes"]} for out in layers[:-1]]
        predictions = {"logits": layers[-1]["logits"], "boxes": layers[-1]["boxes"], "aux": aux}
        if chosen is not None:
            aux.append({"logits": chosen["logits"], "boxes": chosen["boxes"]})
            predictions["dense"] = chosen["dense"]
        return predictions

    def for_export(self) -> nn.Module:
        """A module sharing this model's weights whose forward returns only ``(logits, boxes)``."""
        return DETRExport(self).train(self.training)


class DETRExport(nn.Module):
    """``images → (logits (B, Q, C), boxes (B, Q, 4))``: what an exported detector outputs."""

    task = TASK
    input_rank = 3

    def __init__(self, model: DETR) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        predictions = self.model.predict(*self.model.encode(images))
        return predictions["logits"], predictions["boxes"]


def _queries(chosen: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"anchors": chosen["anchors"], "content": chosen["content"]}


def _timm_backbone(name: str, in_channels: int, pretrained: bool, role: str, stride: int) -> nn.Module:
    """timm ``name`` as a feature extractor returning only its stage of output stride ``stride``."""
    from edgekd.models.timm_models import _timm

    timm = _timm()
    reductions = timm.create_model(name, features_only=True, in_chans=in_channels).feature_info.reduction()
    if stride not in reductions:
        raise ModelError(
            f"the {role}'s backbone timm:{name} has no stage of stride {stride}; feature_stride is one of "
            f"{sorted(set(reductions))}"
        )
    stage = len(reductions) - 1 - reductions[::-1].index(stride)  # the deepest stage of that stride
    try:
        return timm.create_model(
            name, features_only=True, out_indices=(stage,), in_chans=in_channels, pretrained=pretrained
        )
    except Exception as exc:  # hub/network/file errors come in many types
        if not pretrained:
            raise
        raise ModelError(
            f"could not download pretrained weights for the {role}'s backbone timm:{name} "
            f"({type(exc).__name__}); set {role}.pretrained: false"
        ) from None


def _factory(name: str) -> Callable[..., DETR]:
    """The registered constructor of size ``name``; it builds only for ``task="detection"``."""
    size = SIZES[name]

    def build(
        num_classes: int,
        in_channels: int = 3,
        pretrained: bool = False,
        role: str = "model",
        task: str = "classification",
        **overrides: Any,
    ) -> DETR:
        if task != TASK:
            raise ModelError(
                f"{role} {name!r} is a detection model (class logits and boxes per query), not a "
                f"classifier; choose a classification model (e.g. edgekd:kd-cnn, timm:resnet18) or "
                f"a detection dataset"
            )
        unknown = sorted(set(overrides) - set(size))
        if unknown:
            raise ModelError(f"{role} {name!r} does not take {unknown}; it takes {sorted(size)}")
        return DETR(num_classes, in_channels, pretrained=pretrained, role=role, **{**size, **overrides})

    build.__name__ = build.__qualname__ = name.removeprefix("edgekd:").replace("-", "_")
    build.__doc__ = f"{name}: :class:`DETR` with {size} (DAB-DETR, Liu et al., ICLR 2022)."
    build.task = TASK  # type: ignore[attr-defined]
    return build


detr_mnv3l = _factory("edgekd:detr-mnv3l")
detr_r18 = _factory("edgekd:detr-r18")
detr_mnv3 = _factory("edgekd:detr-mnv3")
FACTORIES = {"edgekd:detr-mnv3l": detr_mnv3l, "edgekd:detr-r18": detr_r18, "edgekd:detr-mnv3": detr_mnv3}
