"""CUDA device memory, streams and events through NVIDIA's cuda-python (``cuda.bindings.runtime``).

The TensorRT runner and the CUDA-event latency use these instead of torch, so a device needs only
numpy, TensorRT and ``pip install cuda-python``. Every cudart call returns a tuple whose first item is
a ``cudaError_t``; :func:`call` checks it and returns the rest. Memory, streams and events are
released (``cudaFree``, ``cudaStreamDestroy``, ``cudaEventDestroy``) when their object goes away.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from edgekd.errors import BackendUnavailable

INSTALL = "pip install cuda-python (with a CUDA 12 driver, e.g. JetPack 6: pip install 'cuda-python<13')"


def runtime() -> Any:
    """The ``cuda.bindings.runtime`` module (ImportError when cuda-python is not installed)."""
    from cuda.bindings import runtime as cudart

    return cudart


def _describe(cudart: Any, error: Any) -> str:
    return f"{error.name} ({cudart.cudaGetErrorString(error)[1].decode(errors='replace')})"


def call(function: Any, *args: Any) -> Any:
    """``function(*args)`` of cudart, checked: its value (or tuple of values; None when it has none)."""
    cudart = runtime()
    error, *values = function(*args)
    if error != cudart.cudaError_t.cudaSuccess:
        raise BackendUnavailable(f"CUDA {function.__name__} failed: {_describe(cudart, error)}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


def missing() -> str | None:
    """None when cuda-python is importable and sees a CUDA device; else why, in one line."""
    try:
        cudart = runtime()
    except ImportError as exc:
        return f"cuda-python cannot be imported ({exc}); {INSTALL}"
    error, count = cudart.cudaGetDeviceCount()
    if error == cudart.cudaError_t.cudaSuccess and count > 0:
        return None
    if error == cudart.cudaError_t.cudaSuccess:
        return "no CUDA device: cudaGetDeviceCount found none"
    driver = cudart.cudaDriverGetVersion()[1]
    if not driver:
        return "no CUDA device: no NVIDIA driver found (cudaDriverGetVersion reports none)"
    if error == cudart.cudaError_t.cudaErrorInsufficientDriver:
        runtime_version = cudart.cudaRuntimeGetVersion()[1]
        return (
            f"no usable CUDA device: the driver supports CUDA {_version(driver)}, cuda-python's runtime "
            f"needs {_version(runtime_version)}; {INSTALL}"
        )
    return f"no CUDA device: cudaGetDeviceCount: {_describe(cudart, error)}"


def _version(number: int) -> str:
    return f"{number // 1000}.{number % 1000 // 10}"


def device_name() -> str:
    """The name of the current CUDA device (e.g. 'Orin')."""
    cudart = runtime()
    properties = call(cudart.cudaGetDeviceProperties, call(cudart.cudaGetDevice))
    return properties.name.decode(errors="replace")


class Stream:
    """A CUDA stream; ``handle`` is what cudart takes, ``int(stream)`` what TensorRT takes."""

    def __init__(self) -> None:
        cudart = runtime()
        self.handle = call(cudart.cudaStreamCreate)
        weakref.finalize(self, cudart.cudaStreamDestroy, self.handle)

    def __int__(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        call(runtime().cudaStreamSynchronize, self.handle)


class DeviceBuffer:
    """``nbytes`` of device memory (``cudaMalloc``); copies to and from host arrays on a stream."""

    def __init__(self, nbytes: int) -> None:
        cudart = runtime()
        self.nbytes = nbytes
        self.pointer: int = call(cudart.cudaMalloc, max(nbytes, 1))
        weakref.finalize(self, cudart.cudaFree, self.pointer)

    def _copy(self, host: np.ndarray, to_device: bool, stream: Stream) -> None:
        cudart = runtime()
        kind = cudart.cudaMemcpyKind
        if to_device:
            args = (self.pointer, host.ctypes.data, host.nbytes, kind.cudaMemcpyHostToDevice)
        else:
            args = (host.ctypes.data, self.pointer, host.nbytes, kind.cudaMemcpyDeviceToHost)
        call(cudart.cudaMemcpyAsync, *args, stream.handle)

    def upload(self, host: np.ndarray, stream: Stream) -> None:
        """Queue a copy of ``host`` (C-contiguous, same size) into this buffer on ``stream``."""
        self._copy(host, True, stream)

    def download(self, host: np.ndarray, stream: Stream) -> None:
        """Queue a copy of this buffer into ``host`` (C-contiguous, same size) on ``stream``."""
        self._copy(host, False, stream)


class Event:
    """A CUDA event for timing work on a stream (``cudaEventRecord`` / ``cudaEventElapsedTime``)."""

    def __init__(self) -> None:
        cudart = runtime()
        self.handle = call(cudart.cudaEventCreate)
        weakref.finalize(self, cudart.cudaEventDestroy, self.handle)

    def record(self, stream: Stream) -> None:
        call(runtime().cudaEventRecord, self.handle, stream.handle)

    def elapsed_ms(self, end: Event) -> float:
        """Milliseconds from this event to ``end`` (both recorded and completed)."""
        return float(call(runtime().cudaEventElapsedTime, self.handle, end.handle))
