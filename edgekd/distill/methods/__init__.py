"""Distillation methods, one module per method or family, registered by name on import.

Every module in this package is imported here, so a new method is one file with a
``@METHODS.register("name")`` class; ``edgekd methods`` lists them with their options and papers.
"""

import importlib
import pkgutil

from edgekd.distill.methods.base import (
    METHODS,
    DistillMethod,
    MethodOptions,
    MixedBatch,
    ModelOutputs,
    ModelShape,
    build_method,
    label_ce,
    parse_options,
    resolved_options,
    soft_kl,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "METHODS",
    "DistillMethod",
    "MethodOptions",
    "MixedBatch",
    "ModelOutputs",
    "ModelShape",
    "build_method",
    "label_ce",
    "parse_options",
    "resolved_options",
    "soft_kl",
]
