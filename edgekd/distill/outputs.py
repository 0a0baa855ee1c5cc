"""Running a model for distillation: logits plus, on request, its embedding and hint-layer feature maps."""

from __future__ import annotations

import torch
from torch import nn

from edgekd.distill.methods.base import ModelOutputs, ModelShape


def model_outputs(model: nn.Module, x: torch.Tensor, features: bool, feature_maps: bool) -> ModelOutputs:
    """One forward pass of ``model`` on ``x``; the maps are the outputs of ``model.hint_layers``."""
    if not feature_maps:
        embedding = model.forward_features(x)
        return ModelOutputs(model.head(embedding), embedding if features else None)
    captured: list[torch.Tensor] = []
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda _module, _inputs, output: captured.append(output))
        for name in model.hint_layers
    ]
    try:
        embedding = model.forward_features(x)
    finally:
        for handle in handles:
            handle.remove()
    return ModelOutputs(model.head(embedding), embedding if features else None, captured)


@torch.no_grad()
def probe_shape(model: nn.Module, input_shape: tuple[int, ...]) -> ModelShape:
    """Embedding width and hint-layer map shapes of ``model`` for one input of ``input_shape``."""
    was_training = model.training
    model.eval()
    try:
        outputs = model_outputs(model, torch.zeros(1, *input_shape), features=False, feature_maps=True)
    finally:
        model.train(was_training)
    maps = tuple(tuple(feature_map.shape[1:]) for feature_map in outputs.feature_maps or [])
    return ModelShape(int(model.feature_dim), maps)
