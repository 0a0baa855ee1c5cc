"""Distillation methods, one module per family, registered by name when this package is imported."""

from edgekd.distill.methods import hinton, skd, supervised  # noqa: F401  (registration)
from edgekd.distill.methods.base import METHODS, DistillMethod, ModelOutputs, build_method, soft_kl

__all__ = ["METHODS", "DistillMethod", "ModelOutputs", "build_method", "soft_kl"]
