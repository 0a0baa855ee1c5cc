"""timm image classifiers (``timm:<name>``) behind edgekd's model interface.

:class:`TimmClassifier` wraps ``timm.create_model(name)``: its final linear classifier becomes
``head`` and the rest ``backbone`` (the classifier replaced by identity), so that
``forward(x) == head(forward_features(x))`` with ``forward_features`` timm's pooled pre-logits
embedding. ``hint_layers`` are the stages timm lists in ``feature_info`` (maps (B, C, H, W), shallow
to deep). timm itself is imported only when such a model is asked for.
"""

from __future__ import annotations

import difflib
from types import ModuleType
from typing import Any

import torch
from torch import nn

from edgekd.errors import ModelError

PREFIX = "timm:"
_SUGGESTED = 3  # close matches listed for an unknown name


def _timm() -> ModuleType:
    try:
        import timm
    except ImportError:  # pragma: no cover - timm is a core dependency
        raise ModelError("timm models need the timm package: pip install timm") from None
    return timm


def check_timm_name(name: str) -> str:
    """``<arch>[.<tag>]`` of ``timm:<arch>[.<tag>]``; a ModelError with close matches for unknown archs."""
    timm = _timm()
    architecture = name.removeprefix(PREFIX).split(".", 1)[0]
    if architecture and timm.is_model(architecture):
        return name.removeprefix(PREFIX)
    close = difflib.get_close_matches(architecture, timm.list_models(), n=_SUGGESTED, cutoff=0.6)
    hint = f"did you mean {', '.join(PREFIX + match for match in close)}? " if close else ""
    raise ModelError(f"unknown timm model {name!r}; {hint}(timm.list_models() lists every name)")


class TimmClassifier(nn.Module):
    """A timm classifier with edgekd's interface (see :mod:`edgekd.models.radio` for its contract).

    ``pretrained`` loads the hub's weights through timm (``timm.create_model(pretrained=True)``);
    failing to fetch them is a one-line :class:`ModelError` naming ``role`` ("teacher", "student").
    """

    input_rank = 3  # (C, H, W) per sample

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        in_channels: int = 3,
        pretrained: bool = False,
        role: str = "model",
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        timm = _timm()
        name = check_timm_name(model_name)
        try:  # timm_kwargs: the recipe's kwargs, to timm.create_model (e.g. img_size, patch_size, depth)
            backbone = timm.create_model(
                name, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels, **timm_kwargs
            )
        except Exception as exc:  # hub/network/file errors come in many types
            if not pretrained:
                raise
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"could not download pretrained weights for {PREFIX}{name} ({type(exc).__name__}: {reason}); "
                f"set {role}.pretrained: false or pass {role}.checkpoint"
            ) from None
        classifier = backbone.get_classifier()
        if not isinstance(classifier, nn.Linear):
            raise ModelError(
                f"{PREFIX}{name}: its classifier is a {type(classifier).__name__}, not one linear layer; "
                "choose a timm model with a linear classifier (e.g. timm:resnet18)"
            )
        self.classifier_name = next(key for key, module in backbone.named_modules() if module is classifier)
        backbone.reset_classifier(0)
        self.model_name = name
        self.backbone = backbone
        self.head = classifier
        self.feature_dim = classifier.in_features
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.hint_layers = tuple(
            f"backbone.{info['module']}"
            for info in getattr(backbone, "feature_info", [])
            if info.get("hook_type", "forward") == "forward" and info.get("module")
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled pre-logits embedding (B, feature_dim): timm's ``forward_head(pre_logits=True)``."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def adapt_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` with a plain timm model's tensor names (``conv1.weight``, ``fc.bias``) mapped to ours.

        A state dict already in our naming (``backbone.*``, ``head.*``) is returned unchanged.
        """
        if all(key.startswith(("backbone.", "head.")) for key in state):
            return state
        prefix = f"{self.classifier_name}."
        return {
            (f"head.{key.removeprefix(prefix)}" if key.startswith(prefix) else f"backbone.{key}"): value
            for key, value in state.items()
        }
