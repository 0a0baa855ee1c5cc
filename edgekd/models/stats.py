"""Model size and cost: parameter count and FLOPs per sample."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass on a single sample (one multiply-accumulate = 2 FLOPs).

    Counted by PyTorch's ``FlopCounterMode`` over matmuls and convolutions (elementwise ops,
    normalisation and activations are not counted, as is usual for reported model FLOPs).
    """
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
