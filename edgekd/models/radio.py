"""Models for automatic modulation recognition (AMR) on IQ frames of shape (B, 2, L).

The teacher and the two students follow Hou, Li, Lin, Liang, Han, "ClST: A Convolutional Transformer
Framework for Automatic Modulation Recognition by Knowledge Distillation", IEEE Trans. Wireless
Commun. 23(7), 2024 (arXiv:2312.17446):

- ``ClST`` (convolution-linked signal transformer): a hierarchy of transformer stages that contain
  convolution; each stage starts with a strided convolutional token embedding and stacks
  convolution-transformer projection (CTP) blocks whose attention is the parallel spatial-channel
  attention (PSCA).
- ``KDCNN`` and ``KDMobileNet``: the lightweight students the paper trains with its signal
  knowledge distillation (SKD), a compact CNN and a MobileNet-style network of depthwise-separable
  convolutions.
- ``CNN``: a plain convolutional baseline (conv + ReLU + max-pool, no normalisation).

What we could consult of the paper (its abstract and published summaries) names these building
blocks without their equations or sizes, so the exact layer forms, widths and depths here are our
choices, each stated where it is made: the teacher (~0.22M parameters) trains in a few seconds per
epoch on two CPU cores and the students stay in the tens of thousands of parameters.

Every model accepts any frame length L >= 32 (128 for RML2016, 1024 for RML2018): tokens and
feature maps are pooled globally before the head, and no layer depends on L.

Every model exposes the same interface: ``forward_features(x) -> (B, feature_dim)`` (penultimate
embedding), ``head: nn.Linear`` with ``forward(x) == head(forward_features(x))``, the attributes
``feature_dim``, ``num_classes`` and ``in_channels``, and ``hint_layers``: the names of the
submodules whose outputs (B, C_i, L_i), shallow to deep, feature-map distillation methods match.
Only standard layers are used (Conv1d, BatchNorm1d, LayerNorm, Linear, matmul, softmax), so the
models export to ONNX with a dynamic batch axis and quantise without custom operators.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RadioModel(nn.Module):
    """Shared interface: ``forward(x) = head(forward_features(x))``."""

    feature_dim: int
    head: nn.Linear
    hint_layers: tuple[str, ...]
    input_rank = 2  # (C, L) per sample

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
        self.num_classes = num_classes
        self.in_channels = in_channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv1d (same padding, no bias) + BatchNorm1d; the pair folds into one conv at export."""
    return nn.Sequential(
        nn.Conv1d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm1d(cout),
    )


# --------------------------------------------------------------------------------------- ClST teacher


class PSCA(nn.Module):
    """Parallel spatial-channel attention over tokens (B, N, C), with a convolutional projection.

    The convolutional projection (CTP) replaces the linear Q/K/V projection of a plain transformer:
    a depthwise convolution along the token (time) axis with BatchNorm mixes each token with its
    neighbours before a pointwise projection to queries, keys and values (in the manner of CvT,
    Wu et al., ICCV 2021). This gives the attention local context and relative position, so no
    positional embedding is needed and any sequence length works.

    Two attention branches run in parallel on the same Q/K/V and are summed:

    - spatial: multi-head self-attention across tokens (each time step attends to all others);
    - channel: per head, attention across the head's channels, computed from the L2-normalised
      token profiles of Q and K with a learned per-head temperature (the cross-covariance form of
      XCiT, El-Nouby et al., NeurIPS 2021), so it does not grow with the sequence length.

    The channel-attention form, the shared Q/K/V and the plain sum of the branches are our choices.
    """

    def __init__(self, dim: int, heads: int, kernel_size: int = 3) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.conv_proj = _conv_bn(dim, dim, kernel_size, groups=dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.channel_temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        local = self.conv_proj(x.transpose(1, 2)).transpose(1, 2)
        qkv = self.qkv(local).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)

        spatial = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1) @ v

        qn, kn = F.normalize(q, dim=-2), F.normalize(k, dim=-2)
        channel_attn = torch.softmax((qn.transpose(-2, -1) @ kn) * self.channel_temperature, dim=-1)
        channel = v @ channel_attn.transpose(-2, -1)

        mixed = (spatial + channel).transpose(1, 2).reshape(batch, tokens, dim)
        return self.out(mixed)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., ECCV 2016): drop a residual branch for a random subset of samples.

    Identity in eval mode, so it leaves no trace in an exported graph.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= self.p
        return x * keep / (1.0 - self.p)


class CTPBlock(nn.Module):
    """Convolution-transformer projection block: pre-norm PSCA and MLP, each a residual branch."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, drop_path: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = PSCA(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ClSTStage(nn.Module):
    """One level of the hierarchy: strided convolutional token embedding, then CTP blocks.

    Takes and returns channels-first maps (B, C, N); each stage shortens the sequence by its stride
    and widens the embedding, so later stages see fewer, richer tokens.
    """

    def __init__(self, cin: int, dim: int, depth: int, heads: int, stride: int, drop_path: float) -> None:
        super().__init__()
        self.embed = nn.Sequential(_conv_bn(cin, dim, 3, stride), nn.GELU())
        self.blocks = nn.Sequential(*[CTPBlock(dim, heads, drop_path=drop_path) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).transpose(1, 2)
        return self.blocks(tokens).transpose(1, 2)


class ClST(RadioModel):
    """Convolution-linked signal transformer (Hou et al., 2024), the AMR teacher.

    A convolutional stem (kernels 7 and 5, BatchNorm + ReLU, full resolution) extracts local
    waveform features, then three ClST stages (token stride 2 each; widths 32, 64, 128; one CTP
    block each) shorten L=128 to 16 tokens of width 128. The final tokens are layer-normalised and
    averaged over time into the embedding. ~0.22M parameters with the defaults.

    Regularisation is strong on purpose: on the few thousand frames of the default synthetic set
    the unregularised model memorises low-SNR noise (99% train vs 48% held-out accuracy after 15
    epochs); stochastic depth ``drop_path`` on every residual branch and ``dropout`` before the
    head bring it to ~52% held-out, above the students trained alone (KD-CNN ~50%). These two
    values are our choice, not the paper's.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 2,
        dims: tuple[int, ...] = (32, 64, 128),
        depths: tuple[int, ...] = (1, 1, 1),
        heads: tuple[int, ...] = (2, 4, 4),
        stem_channels: int = 32,
        drop_path: float = 0.4,
        dropout: float = 0.5,
    ) -> None:
        super().__init__(num_classes, in_channels)
        if not len(dims) == len(depths) == len(heads):
            raise ValueError("dims, depths and heads must have one entry per stage")
        self.stem = nn.Sequential(
            *_conv_bn(in_channels, stem_channels, 7), nn.ReLU(),
            *_conv_bn(stem_channels, stem_channels, 5), nn.ReLU(),
        )  # fmt: skip
        stages, cin = [], stem_channels
        for dim, depth, head_count in zip(dims, depths, heads, strict=True):
            stages.append(ClSTStage(cin, dim, depth, head_count, stride=2, drop_path=drop_path))
            cin = dim
        self.stages = nn.Sequential(*stages)
        self.hint_layers = ("stem", *(f"stages.{index}" for index in range(len(stages))))
        self.norm = nn.LayerNorm(cin)
        self.dropout = nn.Dropout(dropout)
        self.feature_dim = cin
        self.head = nn.Linear(cin, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stages(self.stem(x)).transpose(1, 2)
        return self.dropout(self.norm(tokens).mean(dim=1))


# ------------------------------------------------------------------------------------------ students


class _PooledConvNet(RadioModel):
    """Convolution layers, global average pooling, then one hidden fully connected layer as the embedding."""

    def _pool_and_embed(self, layers: list[nn.Module], channels: int, hidden: int, dropout: float) -> None:
        self.hint_layers = tuple(
            f"features.{i}" for i, layer in enumerate(layers) if isinstance(layer, nn.ReLU)
        )
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.feature_dim = hidden
        self.head = nn.Linear(hidden, self.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class KDCNN(_PooledConvNet):
    """KD-CNN student (Hou et al., 2024): a compact CNN trained by distillation from ClST.

    Four Conv1d + BatchNorm + ReLU layers (16, 32, 48, 64 channels; kernels 7, 5, 3, 3) with max
    pooling between them, global average pooling, and one hidden fully connected layer of width
    ``hidden`` as the embedding. The layer sizes (~22k parameters) are ours.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 2,
        channels: tuple[int, ...] = (16, 32, 48, 64),
        kernels: tuple[int, ...] = (7, 5, 3, 3),
        hidden: int = 64,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(num_classes, in_channels)
        layers: list[nn.Module] = []
        cin = in_channels
        for index, (cout, kernel) in enumerate(zip(channels, kernels, strict=True)):
            layers += [*_conv_bn(cin, cout, kernel), nn.ReLU()]
            if index < len(channels) - 1:
                layers.append(nn.MaxPool1d(2))
            cin = cout
        self._pool_and_embed(layers, cin, hidden, dropout)


class _DepthwiseSeparable(nn.Sequential):
    """MobileNet unit: depthwise conv + BN + ReLU, then pointwise conv + BN + ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__(
            *_conv_bn(cin, cin, kernel, stride=stride, groups=cin),
            nn.ReLU(),
            *_conv_bn(cin, cout, 1),
            nn.ReLU(),
        )


class KDMobileNet(RadioModel):
    """KD-MobileNet student (Hou et al., 2024): a 1-D MobileNet (Howard et al., 2017).

    A standard convolution stem followed by depthwise-separable units (depthwise kernel 5 along
    time, then a pointwise 1x1 convolution), four of them with stride 2, global average pooling as
    the embedding. ReLU rather than ReLU6 keeps the INT8 ranges data-driven. ~15k parameters with
    the defaults; the widths are ours.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 2,
        stem_channels: int = 16,
        channels: tuple[int, ...] = (24, 32, 48, 64, 96),
        strides: tuple[int, ...] = (2, 2, 2, 2, 1),
        kernel: int = 5,
    ) -> None:
        super().__init__(num_classes, in_channels)
        units: list[nn.Module] = [*_conv_bn(in_channels, stem_channels, 7), nn.ReLU()]
        cin = stem_channels
        for cout, stride in zip(channels, strides, strict=True):
            units.append(_DepthwiseSeparable(cin, cout, kernel, stride))
            cin = cout
        self.features = nn.Sequential(*units, nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.hint_layers = ("features.2", *(f"features.{3 + i}" for i in range(len(channels))))
        self.feature_dim = cin
        self.head = nn.Linear(cin, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class CNN(_PooledConvNet):
    """Plain convolutional baseline: three Conv1d + ReLU + max-pool layers, no normalisation.

    In the spirit of the early AMR CNNs (O'Shea, Corgan, Clancy, "Convolutional Radio Modulation
    Recognition Networks", 2016) but pooled globally so it accepts any frame length; a fully
    connected layer of width ``hidden`` is the embedding. ~22k parameters with the defaults.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 2,
        channels: tuple[int, ...] = (32, 48, 64),
        kernels: tuple[int, ...] = (7, 5, 3),
        hidden: int = 64,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(num_classes, in_channels)
        layers: list[nn.Module] = []
        cin = in_channels
        for cout, kernel in zip(channels, kernels, strict=True):
            layers += [nn.Conv1d(cin, cout, kernel, padding=kernel // 2), nn.ReLU(), nn.MaxPool1d(2)]
            cin = cout
        self._pool_and_embed(layers, cin, hidden, dropout)
