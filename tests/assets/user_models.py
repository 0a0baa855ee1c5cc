"""A user's own model file, as a user writes it: plain PyTorch, no edgekd imports.

Sequences of shape (B, channels, length) → logits (B, num_classes). Between them the two networks
use the ops user models bring that zoo models rarely do: LSTM/GRU, ``nn.MultiheadAttention``,
GroupNorm, einsum, dilated and depthwise convolutions. Used by the tests as
``py:tests/assets/user_models.py:big`` (teacher) and ``...:small`` (student).
"""

import torch
from torch import nn


class SequenceNet(nn.Module):
    """Conv front end (GroupNorm, dilated depthwise + pointwise), a recurrent layer, self-attention,
    an einsum channel mix, mean pooling over time, and a linear classifier."""

    def __init__(
        self, num_classes: int, in_channels: int = 2, width: int = 16, recurrent: str = "gru"
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv1d(in_channels, width, kernel_size=5, padding=2),
            nn.GroupNorm(4, width),
            nn.ReLU(),
        )
        self.block = nn.Sequential(
            nn.Conv1d(width, width, kernel_size=3, padding=2, dilation=2, groups=width),  # depthwise, dilated
            nn.Conv1d(width, width, kernel_size=1),  # pointwise
            nn.ReLU(),
            nn.MaxPool1d(2),
        )
        layer = {"gru": nn.GRU, "lstm": nn.LSTM}[recurrent]
        self.recurrent = layer(width, width, batch_first=True)
        self.attention = nn.MultiheadAttention(width, num_heads=2, batch_first=True)
        self.mix = nn.Parameter(torch.eye(width) + 0.01 * torch.randn(width, width))
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(self.stem(x))  # (B, width, L/2)
        seq, _ = self.recurrent(h.transpose(1, 2))  # (B, L/2, width)
        attended, _ = self.attention(seq, seq, seq, need_weights=False)
        seq = torch.einsum("blw,wv->blv", seq + attended, self.mix)
        return self.classifier(seq.mean(dim=1))


def big(num_classes: int, width: int = 32) -> nn.Module:
    """The teacher: wider, with an LSTM."""
    return SequenceNet(num_classes, width=width, recurrent="lstm")


def small(num_classes: int, width: int = 16) -> nn.Module:
    """The student: narrower, with a GRU."""
    return SequenceNet(num_classes, width=width, recurrent="gru")


def raises(num_classes: int) -> nn.Module:
    """A factory with a bug in it."""
    raise ValueError("width must be even")


def not_a_module(num_classes: int) -> dict:
    """A factory that returns something other than a module."""
    return {"num_classes": num_classes}


def wrong_width(num_classes: int) -> nn.Module:
    """A model whose output width is not the data's number of classes."""
    return SequenceNet(num_classes + 3)


def linear(num_classes: int, in_features: int = 256) -> nn.Module:
    """One linear layer on the flattened input: a model with a single node to quantise."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
