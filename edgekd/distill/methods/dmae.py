"""``dmae``: Bai, Wang, Xiao, Wei, Wang, Yuille, Zhou, Xie, "Masked Autoencoders Enable Efficient
Knowledge Distillers", CVPR 2023 (arXiv:2208.12256); authors' code UCSC-VLAA/DMAE (read, not copied).

A ViT student is trained as a masked autoencoder whose intermediate tokens are also pulled towards a
teacher's: the student encoder sees only the visible patches, a light decoder reconstructs the pixels
of the masked ones, and the teacher runs only up to its distilled layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from edgekd.distill.methods.base import METHODS, DistillMethod, MethodOptions, ModelOutputs, ModelShape
from edgekd.distill.methods.hint_maps import resample
from edgekd.errors import RecipeError
from edgekd.recipe import DistillSpec

DEPTH_SHARE = 0.75  # the authors' aligned blocks: 9 of ViT-B's 12 (student), 18 of ViT-L's 24 (teacher)


def find_vit(model: nn.Module) -> nn.Module | None:
    """The first timm ``VisionTransformer`` inside ``model`` (itself, a TimmClassifier's backbone, a
    user model's net), or None."""
    from timm.models.vision_transformer import VisionTransformer

    return next((module for module in model.modules() if isinstance(module, VisionTransformer)), None)


def _grid(vit: nn.Module) -> tuple[int, int]:
    return tuple(int(g) for g in vit.patch_embed.grid_size)  # type: ignore[return-value]


def _patch(vit: nn.Module) -> tuple[int, int]:
    return tuple(int(p) for p in vit.patch_embed.patch_size)  # type: ignore[return-value]


def patchify(images: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) images as (B, N, ph·pw·C) patches, in the row-major order of a ViT's tokens."""
    batch, channels, height, width = images.shape
    ph, pw = patch
    grid = images.reshape(batch, channels, height // ph, ph, width // pw, pw)
    return grid.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // ph) * (width // pw), ph * pw * channels)


def sincos_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (N, dim) of a ``grid`` (as in MAE's decoder); ours."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1))
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float32), torch.arange(grid[1], dtype=torch.float32), indexing="ij"
    )
    parts = []
    for axis in (rows.reshape(-1), cols.reshape(-1)):
        angle = axis[:, None] * omega[None, :]
        parts += [angle.sin(), angle.cos()]
    embedding = torch.cat(parts, dim=1)
    return F.pad(embedding, (0, dim - embedding.shape[1]))


def random_masking(batch: int, tokens: int, mask_ratio: float, device: torch.device) -> torch.Tensor:
    """Per-sample random order of the ``tokens`` patches (B, N): the first ``int(N·(1 − ratio))`` are
    visible (MAE's per-sample noise argsort); drawn from torch's global generator (seeded per epoch)."""
    return torch.rand(batch, tokens, device=device).argsort(dim=1)


def visible_tokens(vit: nn.Module, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The ViT's prefix tokens (class, registers) and the ``keep`` (B, V) patch tokens, each with its
    position embedding, ready for the blocks: (B, P + V, D). Only these tokens enter the encoder."""
    tokens = vit._pos_embed(vit.patch_embed(images))  # noqa: SLF001 - timm's own embedding step
    prefix = vit.num_prefix_tokens
    patches = tokens[:, prefix:]
    index = keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
    return vit.norm_pre(torch.cat([tokens[:, :prefix], patches.gather(1, index)], dim=1))


class _StopForward(Exception):
    """Raised by a hook at the teacher's distilled layer: the layers after it never run."""


def layer_output(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The output of ``model``'s module ``layer`` for input ``x``, running ``model`` only up to it."""
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        captured.append(output)
        raise _StopForward

    handle = dict(model.named_modules())[layer].register_forward_hook(hook)
    try:
        model.forward_features(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


def _depth_default(given: int | None, depth: int) -> int:
    return given if given is not None else max(1, round(DEPTH_SHARE * depth))


@METHODS.register("dmae")
class MaskedAutoencoderKD(DistillMethod):
    """DMAE, masked-autoencoder distillation (Bai et al., CVPR 2023) for timm ViT students, plus labels.

    ``L = w_ce · CE(s(x), y) + λ · [ MSE_masked(D(E_s(x_vis)), pix(x)) + α · L1(n(P(h_s^k)), n(h_t^m)) ]``

    - x_vis: the visible patches, a random ``1 − mask_ratio`` share per image (mask ratio 0.75, the
      authors'); only these tokens (with the class token) enter the student encoder E_s, through the
      ViT's own patch embedding, position embedding and blocks;
    - D: a light MAE decoder (linear embed, mask tokens at the masked positions, fixed sine-cosine
      positions, ``decoder_depth`` timm Blocks of width ``decoder_dim``, linear to pixels) on the
      student's last-block tokens (after its final norm); MSE_masked: squared error on the masked
      patches' pixels only, per patch mean, averaged over masked patches; pix(x): the raw pixels
      (the authors' pretrain.sh), or each patch normalised to zero mean and unit variance with
      ``norm_pix_loss`` (MAE's option);
    - h_s^k: the student's tokens after block k = ``student_block`` (default ¾ of its depth: the
      authors align ViT-B block 9 of 12); h_t^m: the teacher's after block m = ``teacher_block``
      (default ¾ of its depth: their ViT-L block 18 of 24); P: a linear projection from the
      student's width to the teacher's (their ``fc-1layer``); n: L2 normalisation over channels;
      L1: mean absolute error (their ``embedding_distillation_func L1``), weight α = ``feature_weight``
      = 1 (they add it unweighted to the pixel loss);
    - teacher: a timm ViT with the student's patch grid sees the same visible patches (as in the
      authors' code) and runs its first m blocks only; any other teacher (a ViT with another grid, a
      CNN) runs on the full image up to its m-th hint layer (the forward stops there), and its map is
      resampled to the student's patch grid and read at the visible patches. Teacher detached.

    Ours: DMAE is a pre-training objective followed by fine-tuning; edgekd trains a classifier in
    one stage, so the masked view's DMAE loss is added to the cross-entropy of the student on the
    full image with weight λ = ``dmae_weight``, and a first ``pretrain_share`` of the epochs trains
    on the DMAE loss alone (w_ce = 0 there, 1 after). Also ours: the decoder's size (the authors use
    512 wide, 8 blocks for ViT-B; ours defaults to 128 wide, 2 blocks for small students), running
    the teacher only to its distilled block (their code runs it whole), comparing the patch tokens
    alone when student and teacher differ in prefix tokens, and the non-ViT-teacher path. The
    projector and decoder train with the student and are dropped after training.
    ``distill.temperature`` and ``distill.alpha`` are not used.
    """

    needs_teacher = False  # no outputs from the trainer: the method runs the teacher itself, below
    runs_teacher_itself = True  # up to the distilled layer, on the visible patches (bind_models)

    class Options(MethodOptions):
        mask_ratio: float = Field(0.75, gt=0, lt=1, description="share of patches masked per image")
        student_block: int | None = Field(
            None, ge=1, description="student block whose tokens are distilled (default: 3/4 of its depth)"
        )
        teacher_block: int | None = Field(
            None,
            ge=1,
            description="teacher block (or hint layer, non-ViT teacher) distilled from (default: 3/4 depth)",
        )
        feature_weight: float = Field(1.0, ge=0, description="α: weight of the feature distance")
        dmae_weight: float = Field(1.0, ge=0, description="λ: weight of the DMAE loss beside CE (ours)")
        pretrain_share: float = Field(
            0.0, ge=0, le=1, description="first share of epochs on the DMAE loss alone, no CE (ours)"
        )
        norm_pix_loss: bool = Field(False, description="reconstruct per-patch normalised pixels (MAE)")
        decoder_dim: int = Field(128, ge=8, description="width of the light decoder (ours)")
        decoder_depth: int = Field(2, ge=1, description="transformer blocks in the decoder (ours)")
        decoder_heads: int = Field(4, ge=1, description="attention heads of the decoder blocks")

    def __init__(self, spec: DistillSpec, num_classes: int, student: ModelShape, teacher: ModelShape) -> None:
        super().__init__(spec, num_classes, student, teacher)
        if self.options.decoder_dim % self.options.decoder_heads:
            raise RecipeError(
                f"distill.options.dmae.decoder_dim ({self.options.decoder_dim}) must be a multiple of "
                f"distill.options.dmae.decoder_heads ({self.options.decoder_heads})"
            )
        self._models: tuple[nn.Module, nn.Module, nn.Module, nn.Module | None] | None = None
        self.projector: nn.Module | None = None
        self.decoder: nn.Module | None = None

    # ------------------------------------------------------------------ models

    @classmethod
    def check_models(cls, method: str, student: nn.Module, teacher: nn.Module) -> None:
        """A ViT student (timm VisionTransformer), a teacher it can read, blocks that exist."""
        vit = find_vit(student)
        if vit is None:
            raise RecipeError(
                f"distill.method {method!r} trains a masked autoencoder and needs a timm ViT student "
                f"(e.g. timm:vit_tiny_patch16_224), not {type(student).__name__}; choose a ViT student "
                "or another method"
            )
        teacher_vit = find_vit(teacher)
        if teacher_vit is None and not getattr(teacher, "hint_layers", ()):
            raise RecipeError(
                f"distill.method {method!r} distils intermediate tokens or maps, but the teacher "
                f"{type(teacher).__name__} has neither ViT blocks nor hint layers; choose a torch teacher "
                "with hint_layers or another method"
            )

    def _blocks(self, student_vit: nn.Module, teacher_vit: nn.Module | None, teacher: nn.Module) -> None:
        student_depth = len(student_vit.blocks)
        teacher_depth = len(teacher_vit.blocks) if teacher_vit is not None else len(teacher.hint_layers)
        self.student_block = _depth_default(self.options.student_block, student_depth)
        self.teacher_block = _depth_default(self.options.teacher_block, teacher_depth)
        for name, block, depth, what in (
            ("student_block", self.student_block, student_depth, "blocks"),
            ("teacher_block", self.teacher_block, teacher_depth, "blocks" if teacher_vit else "hint layers"),
        ):
            if block > depth:
                raise RecipeError(
                    f"distill.options.dmae.{name} = {block}, but the {name.split('_')[0]} has {depth} "
                    f"{what}; choose 1..{depth}"
                )

    def bind_models(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Find the student's ViT and the teacher's distilled layer; build the projector and decoder."""
        if teacher is None:
            raise ValueError("dmae needs the teacher module, got None")
        self.check_models(self.spec.method, student, teacher)
        student_vit = find_vit(student)
        teacher_vit = find_vit(teacher)
        if teacher_vit is not None and _grid(teacher_vit) != _grid(student_vit):
            teacher_vit = None  # another patch grid: read its block on the full image (hint path)
        self._models = (student, student_vit, teacher, teacher_vit)
        self._blocks(student_vit, teacher_vit, teacher)
        if teacher_vit is None and find_vit(teacher) is None:
            self.teacher_layer = teacher.hint_layers[self.teacher_block - 1]
        elif teacher_vit is None:
            vit = find_vit(teacher)
            prefix = next(name for name, module in teacher.named_modules() if module is vit)
            self.teacher_layer = f"{prefix}.blocks.{self.teacher_block - 1}".lstrip(".")
        else:
            self.teacher_layer = None
        device = next(student.parameters()).device
        student_dim = student_vit.embed_dim
        teacher_dim = self._teacher_width(teacher, student_vit, device)
        options = self.options
        patch, channels = _patch(student_vit), student_vit.patch_embed.proj.in_channels
        self.projector = nn.Linear(student_dim, teacher_dim).to(device)
        self.decoder = _Decoder(
            student_dim,
            options.decoder_dim,
            options.decoder_depth,
            options.decoder_heads,
            _grid(student_vit),
            patch[0] * patch[1] * channels,
        ).to(device)

    @torch.no_grad()
    def _teacher_width(self, teacher: nn.Module, student_vit: nn.Module, device: torch.device) -> int:
        _, _, _, teacher_vit = self._models
        if teacher_vit is not None:
            return int(teacher_vit.embed_dim)
        size = [g * p for g, p in zip(_grid(student_vit), _patch(student_vit), strict=True)]
        probe = torch.zeros(1, student_vit.patch_embed.proj.in_channels, *size, device=device)
        was_training = teacher.training
        teacher.eval()
        try:
            return int(self._teacher_grid_tokens(probe).shape[-1])
        finally:
            teacher.train(was_training)

    def _teacher_grid_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The non-ViT-path teacher output at its distilled layer as (B, N_student, C) grid tokens."""
        _, student_vit, teacher, _ = self._models
        out = layer_output(teacher, self.teacher_layer, images)
        vit = find_vit(teacher)
        if vit is not None:  # a ViT with another grid: patch tokens back to a (B, D, gh, gw) map
            patches = out[:, vit.num_prefix_tokens :]
            out = patches.transpose(1, 2).reshape(out.shape[0], out.shape[-1], *_grid(vit))
        elif out.dim() == 3:  # (B, C, L) map: a 1-row grid
            out = out.unsqueeze(2)
        out = resample(out, _grid(student_vit))
        return out.flatten(2).transpose(1, 2)

    def student_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    # ------------------------------------------------------------------ loss

    def dmae_loss(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel reconstruction loss, feature distance) of one masked view of ``images``."""
        if self._models is None or self.decoder is None or self.projector is None:
            raise ValueError("dmae: bind_models(student, teacher) must be called before the loss")
        _, vit, teacher, teacher_vit = self._models
        batch, tokens = images.shape[0], math.prod(_grid(vit))
        keep_count = max(1, int(tokens * (1 - self.options.mask_ratio)))
        order = random_masking(batch, tokens, self.options.mask_ratio, images.device)
        keep = order[:, :keep_count]
        x = visible_tokens(vit, images, keep)
        distilled = None
        for index, block in enumerate(vit.blocks):
            x = block(x)
            if index + 1 == self.student_block:
                distilled = x
        latent = vit.norm(x)
        prefix = vit.num_prefix_tokens
        predicted = self.decoder(latent[:, prefix:], order, keep_count)
        target = patchify(images, _patch(vit))
        if self.options.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        masked = torch.ones(batch, tokens, device=images.device, dtype=images.dtype)
        masked.scatter_(1, keep, 0.0)
        per_patch = ((predicted - target) ** 2).mean(dim=-1)
        pixel = (per_patch * masked).sum() / masked.sum()

        with torch.no_grad():
            if teacher_vit is not None:
                t = visible_tokens(teacher_vit, images, keep)
                for block in teacher_vit.blocks[: self.teacher_block]:
                    t = block(t)
                teacher_prefix = teacher_vit.num_prefix_tokens
            else:
                grid_tokens = self._teacher_grid_tokens(images)
                index = keep.unsqueeze(-1).expand(-1, -1, grid_tokens.shape[-1])
                t = grid_tokens.gather(1, index)
                teacher_prefix = 0
        s = self.projector(distilled)
        if teacher_prefix != prefix:  # compare the visible patch tokens alone
            s, t = s[:, prefix:], t[:, teacher_prefix:]
        feature = F.l1_loss(F.normalize(s, dim=-1), F.normalize(t.detach(), dim=-1))
        return pixel, feature

    def loss(
        self, student: ModelOutputs, teacher: ModelOutputs | None, target: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        images = state.get("inputs")
        if images is None:
            raise ValueError("dmae needs the input batch in state['inputs']")
        pixel, feature = self.dmae_loss(images)
        dmae = pixel + self.options.feature_weight * feature
        pretraining = state.get("epoch", 0) < self.options.pretrain_share * state.get("epochs", 1)
        ce = F.cross_entropy(student.logits, target)
        return (0.0 if pretraining else 1.0) * ce + self.options.dmae_weight * dmae


class _Decoder(nn.Module):
    """MAE's light decoder (He et al., CVPR 2022), ours: visible tokens and mask tokens in the image's
    order, fixed 2-D sine-cosine positions, timm Blocks, a linear layer to each patch's pixels."""

    def __init__(
        self, in_dim: int, dim: int, depth: int, heads: int, grid: tuple[int, int], pixels: int
    ) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("position", sincos_2d(dim, grid).unsqueeze(0), persistent=False)
        self.blocks = nn.Sequential(*[Block(dim, heads, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.predict = nn.Linear(dim, pixels)

    def forward(self, visible: torch.Tensor, order: torch.Tensor, keep_count: int) -> torch.Tensor:
        """(B, V, in_dim) visible-patch tokens → (B, N, pixels) predictions for every patch."""
        x = self.embed(visible)
        batch, tokens = order.shape
        filler = self.mask_token.expand(batch, tokens - keep_count, -1)
        shuffled = torch.cat([x, filler], dim=1)  # in `order`'s order
        restore = order.argsort(dim=1)
        x = shuffled.gather(1, restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = self.blocks(x + self.position)
        return self.predict(self.norm(x))
