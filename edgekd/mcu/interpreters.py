"""Run a fully-INT8 ``.tflite`` here: with TensorFlow Lite Micro's own Python interpreter (the kernels
the microcontroller runs, reference versions) and with the LiteRT interpreter; and measure the tensor
arena TFLM needs with its ``RecordingMicroAllocator``.

Both runners take float frames and return float logits: an INT8 input is quantised with the model's
recorded input scale / zero point and an INT8 output dequantised, exactly as firmware does; a float32
input or output (``compile.mcu_io: float``: the model quantises at its boundary) is passed as it is. The
models are converted with batch 1 (as they run on the device), so a batch is run frame by frame.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import BackendUnavailable, ModelError, first_line
from edgekd.mcu.convert import dequantize, quantize_input
from edgekd.mcu.tflite_model import TfliteModel, read_tflite

# Arena given to TFLM while measuring: large enough for any model that fits a microcontroller.
PROBE_ARENA_BYTES = 16 * 1024 * 1024
_TOTAL = re.compile(r"Arena allocation total (\d+) bytes")
_HEAD = re.compile(r"Arena allocation head (\d+) bytes")
_TAIL = re.compile(r"Arena allocation tail (\d+) bytes")
_USED = re.compile(r"'([^']+)' used (\d+) bytes")


def _tflm() -> Any:
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError as exc:
        raise BackendUnavailable(
            f"TensorFlow Lite Micro's interpreter cannot be imported ({exc}); install it with: "
            f"pip install -e '.[mcu]'"
        ) from None
    return runtime


class _QuantisedRunner:
    """Shared: quantise float frames (INT8 input), run each, dequantise the logits (INT8 output)."""

    info: dict[str, Any]

    def __init__(self, model: TfliteModel, path: Path) -> None:
        self._in, self._out = model.inputs[0], model.outputs[0]
        for tensor in (self._in, self._out):
            if tensor.dtype not in ("int8", "float32"):
                raise ModelError(
                    f"{path}: tensor {tensor.name} is {tensor.dtype}; edgekd runs INT8 or float32 inputs "
                    f"and outputs: reconvert it (compile.mcu_io: int8 or float)"
                )
            if tensor.dtype == "int8" and tensor.scale is None:
                raise ModelError(
                    f"{path}: INT8 tensor {tensor.name} has no per-tensor quantisation; reconvert it"
                )
        self._shape = tuple(self._in.shape[1:])
        self._path = path

    def _invoke(self, frame: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, np.float32)
        if batch.shape[1:] != self._shape:
            raise ModelError(
                f"{self._path} takes frames of shape {list(self._shape)}, "
                f"got a batch of shape {list(batch.shape)}"
            )
        if self._in.dtype == "int8":
            batch = quantize_input(batch, self._in.scale, self._in.zero_point)
        out = np.stack([self._invoke(frame[None])[0] for frame in batch]) if len(batch) else np.zeros((0,))
        if self._out.dtype == "int8":
            return dequantize(out, self._out.scale, self._out.zero_point)
        return np.asarray(out, np.float32)


class TflmRunner(_QuantisedRunner):
    """TFLM's Python interpreter (``tflite_micro.runtime.Interpreter``) with a given arena."""

    def __init__(self, path: Path, arena_bytes: int = PROBE_ARENA_BYTES) -> None:
        runtime = _tflm()
        data = Path(path).read_bytes()
        super().__init__(read_tflite(data), Path(path))
        try:
            self._interpreter = runtime.Interpreter.from_bytes(data, arena_size=arena_bytes)
        except Exception as exc:  # the C++ wrapper raises RuntimeError with TFLM's message
            raise ModelError(f"TFLM cannot load {path}: {first_line(exc, '')}") from None
        self.info = {
            "backend": "litert",
            "interpreter": "tflite-micro (reference kernels)",
            "artifact": str(path),
            "threads": 1,
            "arena_bytes_given": arena_bytes,
            "version": _version("tflite-micro"),
        }

    def _invoke(self, frame: np.ndarray) -> np.ndarray:
        self._interpreter.set_input(frame, 0)
        self._interpreter.invoke()
        return self._interpreter.get_output(0)


class LiteRTRunner(_QuantisedRunner):
    """The LiteRT interpreter (``ai_edge_litert.interpreter.Interpreter``), one thread."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as exc:
            raise BackendUnavailable(
                f"the LiteRT interpreter cannot be imported ({exc}); install it with: pip install -e '.[mcu]'"
            ) from None
        data = Path(path).read_bytes()
        super().__init__(read_tflite(data), Path(path))
        try:
            self._interpreter = Interpreter(model_content=data, num_threads=threads)
            self._interpreter.allocate_tensors()
        except Exception as exc:
            raise ModelError(f"LiteRT cannot load {path}: {first_line(exc, '')}") from None
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self.info = {
            "backend": "litert",
            "interpreter": "ai-edge-litert",
            "artifact": str(path),
            "threads": threads,
            "version": _version("ai-edge-litert"),
        }

    def _invoke(self, frame: np.ndarray) -> np.ndarray:
        self._interpreter.set_tensor(self._input, frame)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output)


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _captured_output(call: Any) -> str:
    """What ``call()`` writes to file descriptors 1 and 2 (TFLM's C++ ``MicroPrintf`` writes to stderr,
    bypassing ``sys.stdout`` / ``sys.stderr``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile(mode="w+b") as sink:
        for fd in saved:
            os.dup2(sink.fileno(), fd)
        try:
            call()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
        sink.seek(0)
        return sink.read().decode("utf-8", errors="replace")


def parse_allocations(text: str) -> dict[str, Any]:
    """The ``RecordingMicroAllocator`` report as numbers; ModelError when it has no total."""
    total = _TOTAL.search(text)
    if total is None:
        raise ModelError(f"TFLM printed no arena report (got {text.strip()[:120]!r}); check tflite-micro")
    head, tail = _HEAD.search(text), _TAIL.search(text)
    return {
        "total_bytes": int(total.group(1)),
        "head_bytes": int(head.group(1)) if head else None,
        "tail_bytes": int(tail.group(1)) if tail else None,
        "by_kind": {name: int(size) for name, size in _USED.findall(text)},
    }


def measure_arena(path: Path, frame: np.ndarray | None = None) -> dict[str, Any]:
    """The tensor arena TFLM really uses for ``path``: its recording allocator's total after one
    inference (on ``frame``, float, or zeros), and the breakdown it prints.

    Measured on this 64-bit host: TFLM's own structs (``TfLiteEvalTensor``, ``NodeAndRegistration``)
    hold pointers, which are half the size on a 32-bit Cortex-M, so the figure bounds the device's
    arena from above; tensor buffers (the head) are the same size on both.
    """
    runner = TflmRunner(Path(path))
    shape = (1, *runner._shape)
    sample = np.zeros(shape, np.float32) if frame is None else np.asarray(frame, np.float32).reshape(shape)
    runner.run(sample)
    report = parse_allocations(_captured_output(runner._interpreter.print_allocations))
    report["measured_by"] = (
        "tflite-micro RecordingMicroAllocator on this 64-bit host (an upper bound on 32-bit)"
    )
    return report
