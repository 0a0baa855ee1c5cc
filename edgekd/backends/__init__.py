"""Runtime backends behind one interface, looked up by name.

Importing this package imports no runtime (onnxruntime, openvino, tensorrt, torch): each backend
module registers its class here and imports its runtime only when used.
"""

from __future__ import annotations

import importlib
import importlib.util

from edgekd.backends.base import Artifact, Backend, Runner
from edgekd.errors import BackendUnavailable
from edgekd.registry import Registry

BACKENDS: Registry[type[Backend]] = Registry("backend")

# Backend modules of this package, registered when present (each is written independently).
_MODULES = ("onnxruntime", "openvino", "tensorrt", "torch", "litert")


def get_backend(name: str, registry: Registry[type[Backend]] = BACKENDS) -> Backend:
    """The backend called ``name`` (or an alias); BackendUnavailable when its runtime is missing here."""
    backend = registry.get(name)()
    ok, why = backend.available()
    if not ok:
        raise BackendUnavailable(
            f"backend {backend.name!r} is unavailable: {why}; install it with: {backend.install}"
        )
    return backend


for _module in _MODULES:
    if importlib.util.find_spec(f"{__name__}.{_module}") is not None:
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["BACKENDS", "Artifact", "Backend", "Runner", "get_backend"]
