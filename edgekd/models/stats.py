"""Model size and compute: parameter count and FLOPs per sample."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one inference forward pass on a single sample of shape ``input_shape`` (no batch axis).

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode`, which reports 2 FLOPs per
    multiply-accumulate of the matrix products and convolutions (mm, bmm, addmm, conv, attention);
    the result is therefore FLOPs = 2 x MACs. Element-wise work (activations, normalisation, softmax,
    pooling) is not counted, as is usual for the MAC/FLOP figures published for CNNs. The model runs
    in eval mode on zeros; its train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        x = torch.zeros(1, *input_shape, device=param.device if param is not None else None)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
