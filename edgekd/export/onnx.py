"""Export a PyTorch classifier to one self-contained ONNX file and prove it computes the same thing.

The exporter is ``torch.onnx.export`` in its default (dynamo, ``torch.export``-based) mode, or with
``dynamo=False`` the TorchScript tracer (``export.dynamo: false``), for models ``torch.export`` cannot
trace (Python control flow on tensor values: the tracer records the branch the example input takes).
Quirks handled here:

- it prints progress and logs warnings: all of it (Python, logging and C++ output) is captured and,
  on failure, written to ``<output>.export.log`` beside the requested file;
- it silently drops a dynamic batch axis when ``forward`` specialises on the batch size, and
  silently keeps opset 18 when a lower opset is requested and its version conversion fails: both
  are checked on the written file and reported as :class:`~edgekd.errors.ExportError`;
- its errors are long multi-paragraph reports: they are reduced to one line naming the model class,
  the submodule and source line where tracing failed, the failing op and the reason, and, when
  ``torch.export`` could not trace the model, the TorchScript exporter to try instead.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from edgekd.atomic import atomic_path, write_text
from edgekd.errors import ExportError, first_line

if TYPE_CHECKING:
    from torch import nn

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# Batch size of the example input traced by the exporter; not 1, so that torch.export does not
# specialise the batch axis (sizes 0 and 1 are special-cased by its symbolic shapes).
EXPORT_BATCH = 2
# Batch sizes run by check_parity besides the full set: 1 is always different from EXPORT_BATCH.
PARITY_SMALL_BATCH = 1
PARITY_SMALL_RUNS = 4
# What to try when torch.export cannot trace a model.
TORCHSCRIPT_HINT = "or set export.dynamo: false (--set export.dynamo=false) for the TorchScript exporter"
# Op types whose ONNX Runtime result is bit-exact with PyTorch (data movement, comparisons, max):
# they are never the ones to blame for a parity failure.
_EXACT_OPS = frozenset(
    {
        "Cast", "Concat", "Constant", "Expand", "Flatten", "Gather", "Identity", "MaxPool", "Pad",
        "Relu", "Reshape", "Shape", "Slice", "Split", "Squeeze", "Transpose", "Unsqueeze", "Where",
    }
)  # fmt: skip


class CapturedOutput:
    """Text written to stdout/stderr while a :func:`captured_output` block ran."""

    def __init__(self, sink: io.BufferedRandom, text_sink: io.TextIOBase) -> None:
        self._sink = sink
        self._text_sink = text_sink

    def text(self) -> str:
        for stream in (self._text_sink, sys.stdout, sys.stderr, self._sink):
            stream.flush()
        self._sink.seek(0)
        return self._sink.read().decode("utf-8", errors="replace")


@contextlib.contextmanager
def captured_output() -> Iterator[CapturedOutput]:
    """Capture everything written to stdout and stderr, at the file-descriptor level.

    Catches ``print``, ``logging`` handlers bound to the original streams, ``warnings`` and output of
    native code (the ONNX exporter, onnxruntime's quantiser), which ``contextlib.redirect_stdout``
    alone would miss. The text stays readable from the yielded object until the block ends.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        saved = [os.dup(1), os.dup(2)]
        text_sink = open(sink.fileno(), "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(text_sink), contextlib.redirect_stderr(text_sink):
                yield CapturedOutput(sink, text_sink)
        finally:
            text_sink.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            text_sink.close()


def failure_log_path(target: Path, suffix: str) -> Path:
    """Where a failed step writing ``target`` leaves its log (removed again when the step succeeds)."""
    return target.with_name(f"{target.name}.{suffix}.log")


def write_failure_log(target: Path, suffix: str, captured: CapturedOutput, exc: BaseException) -> Path:
    """Write the captured tool output and the full traceback beside ``target``; return the log's path."""
    log = failure_log_path(target, suffix)
    trace = "".join(traceback.format_exception(exc))
    write_text(log, f"{captured.text()}\n--- traceback ---\n{trace}")
    return log


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _first_line(text: str, limit: int = 200) -> str:
    line = first_line(text)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _traced_by_torch_export(chain: list[BaseException], everything: str) -> bool:
    """Whether the failure happened while torch.export traced the model (not in ONNX translation)."""
    names = {type(e).__name__ for e in chain}
    return bool(
        names & {"TorchExportError", "Unsupported", "UserError", "GuardOnDataDependentSymNode"}
        or "Failed to export the model with torch.export" in everything
        or "data-dependent" in everything
    )


def _submodule_at(model: nn.Module | None, file: str, line: int) -> str | None:
    """``name (Class)`` of the submodule of ``model`` whose ``forward`` holds ``file:line``, if any."""
    import inspect

    if model is None:
        return None
    for name, module in model.named_modules():
        forward = type(module).forward
        try:
            source = inspect.getsourcefile(forward)
            lines, start = inspect.getsourcelines(forward)
        except (OSError, TypeError):
            continue
        if source and Path(source).resolve() == Path(file).resolve() and start <= line < start + len(lines):
            return f"{name} ({type(module).__name__})" if name else None
    return None


def describe_export_failure(
    exc: BaseException, opset: int, model: nn.Module | None = None, dynamo: bool = True
) -> str:
    """Reduce an exporter exception to "what failed: why; what to do" on one line.

    With ``model``, the submodule whose ``forward`` holds the failing source line is named. A model
    torch.export cannot trace (``dynamo``) is pointed to the TorchScript exporter (``export.dynamo: false``).
    """
    chain = _exception_chain(exc)
    everything = "\n".join(str(e) for e in chain)
    innermost = chain[-1]
    op_match = re.search(r"op='([\w.:]+)'", everything) or re.search(
        r"target=torch\.ops\.([\w.]+)", everything
    )
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)\n\s+(.+)', everything)
    if op_match and ("No ONNX function found" in everything or "translating node" in everything):
        op = op_match.group(1).removesuffix(".default")
        reason = _first_line(str(innermost))
        if "No ONNX function found" in everything:
            reason = f"no ONNX translation for {op}"
        return (
            f"op {op} cannot be converted at opset {opset} ({reason}); replace it in forward, "
            f"or try another export.opset (18-23){', ' + TORCHSCRIPT_HINT if dynamo else ''}"
        )
    where = ""
    if frames:
        file, line, func, code = frames[-1]
        module = _submodule_at(model, file, int(line))
        where = f" at {Path(file).name}:{line} in {func} `{code.strip()}`"
        where += f" of submodule {module}" if module else ""
    hint = f"; {TORCHSCRIPT_HINT}" if dynamo and _traced_by_torch_export(chain, everything) else ""
    if "data-dependent" in everything:
        return (
            f"torch.export cannot trace Python control flow that depends on tensor values (bool() of a "
            f"tensor){where}; "
            f"rewrite it with torch.where / torch.cond{hint.replace('; or', ', or')}"
        )
    op = f" (op {op_match.group(1).removesuffix('.default')})" if op_match else ""
    return f"{type(innermost).__name__}{where}{op}: {_first_line(str(innermost))}{hint}"


@contextlib.contextmanager
def cpu_eval(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode on the CPU (a CPU copy if it lives elsewhere); training mode is restored."""
    import copy

    import torch

    on_cpu = all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    target = model if on_cpu else copy.deepcopy(model).to(torch.device("cpu"))
    was_training = model.training
    target.eval()
    try:
        yield target
    finally:
        model.train(was_training)


def non_finite_weights(model: nn.Module) -> tuple[int, str | None]:
    """How many values of ``model``'s parameters and floating-point buffers (e.g. BatchNorm running
    statistics) are NaN or infinite, and the name of the first tensor holding one (None if none)."""
    import torch

    count, first = 0, None
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        if not torch.is_floating_point(tensor):
            continue
        bad = int(tensor.numel() - torch.isfinite(tensor.detach()).sum().item())
        if bad:
            count += bad
            first = first or name
    return count, first


def diverged_hint() -> str:
    """What to do about a model whose weights or outputs are NaN/inf."""
    return "the model diverged in training: lower the learning rate (distill.train.lr) and retrain"


def check_finite_weights(model: nn.Module, where: str | os.PathLike[str]) -> None:
    """ExportError naming ``where`` (the model's file) when any weight of ``model`` is NaN or infinite."""
    count, first = non_finite_weights(model)
    if count:
        raise ExportError(
            f"{where}: {count} weight values of {type(model).__name__} are non-finite (NaN/inf; first in "
            f"{first}); {diverged_hint()}"
        )


def _value_info(values: Any) -> list[dict[str, Any]]:
    """[{name, shape, dtype}] of graph inputs/outputs; symbolic dims appear as their names."""
    described = []
    for value in values:
        tensor = value.type.tensor_type
        shape = [dim.dim_param or dim.dim_value for dim in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        described.append({"name": value.name, "shape": shape, "dtype": dtype})
    return described


def export_onnx(
    model: nn.Module,
    input_shape: tuple[int, ...],
    path: str | os.PathLike[str],
    opset: int = 18,
    dynamo: bool = True,
    output_names: Sequence[str] = (OUTPUT_NAME,),
) -> dict:
    """Export ``model`` (input ``(B, *input_shape)`` float32 → logits) to a single ONNX file at ``path``.

    ``output_names`` names the model's outputs in order (a detector's ``logits`` and ``boxes``), each
    with the dynamic batch axis.

    ``dynamo`` selects torch.export-based export (the default); ``dynamo=False`` the TorchScript
    tracer, which follows the branch the example input takes through data-dependent control flow.
    The batch axis is dynamic either way. The file is written atomically and passes ``onnx.checker``.
    A model with NaN/inf weights (diverged in training) is refused before anything is written.
    Returns ``{opset, inputs, outputs, size_bytes, exporter, model_class}``.
    """
    import torch

    target = Path(path)
    name = type(model).__name__
    if not input_shape or any(not isinstance(d, int) or d < 1 for d in input_shape):
        raise ExportError(
            f"cannot export {name}: input_shape {input_shape!r} must be positive ints, e.g. (2, 128)"
        )
    check_finite_weights(model, target)
    example = torch.randn((EXPORT_BATCH, *input_shape), generator=torch.Generator().manual_seed(0))
    with cpu_eval(model) as module, captured_output() as captured, atomic_path(target) as tmp:
        try:
            if dynamo:
                program = torch.onnx.export(
                    module,
                    (example,),
                    None,
                    input_names=[INPUT_NAME],
                    output_names=list(output_names),
                    opset_version=opset,
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                    verbose=False,
                )
                program.save(tmp, external_data=False)
            else:
                _export_torchscript(module, example, tmp, opset, tuple(output_names))
            onnx.checker.check_model(str(tmp))
        except Exception as exc:
            log = write_failure_log(target, "export", captured, exc)
            reason = describe_export_failure(exc, opset, module, dynamo)
            exporter = "" if dynamo else " with the TorchScript exporter (export.dynamo: false)"
            raise ExportError(f"cannot export {name} to ONNX{exporter}: {reason} (full log: {log})") from exc
        proto = onnx.load(str(tmp), load_external_data=False)
        produced = next(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx"))
        if produced != opset:
            raise ExportError(
                f"cannot export {name} at opset {opset}: the exporter produced opset {produced} and "
                f"could not convert it; set export.opset to {produced} or higher"
            )
        inputs, outputs = _value_info(proto.graph.input), _value_info(proto.graph.output)
        if isinstance(inputs[0]["shape"][0], int):
            raise ExportError(
                f"cannot export {name} with a dynamic batch axis: forward fixes the batch size to "
                f"{inputs[0]['shape'][0]} (e.g. x.view({EXPORT_BATCH}, -1)); use x.flatten(1) or "
                f"x.reshape(x.shape[0], -1)"
            )
    failure_log_path(target, "export").unlink(missing_ok=True)
    return {
        "opset": produced,
        "inputs": inputs,
        "outputs": outputs,
        "size_bytes": target.stat().st_size,
        "exporter": f"torch.onnx.export ({'dynamo' if dynamo else 'TorchScript'}) torch {torch.__version__}",
        "model_class": name,
    }


def _export_torchscript(
    module: nn.Module, example: Any, tmp: Path, opset: int, output_names: tuple[str, ...] = (OUTPUT_NAME,)
) -> None:
    """The TorchScript tracer's export of ``module`` to ``tmp`` (batch axis dynamic, one file)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        # its deprecation notice and "batch size other than 1 with GRU/LSTM" warning: the parity check
        # runs batch 1 and the full batch, so a batch-specialised export fails there, with numbers
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*batch_size other than 1.*")
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # "might not generalize": parity checks it
        torch.onnx.export(
            module,
            (example,),
            str(tmp),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=list(output_names),
            opset_version=opset,
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in output_names}},
            verbose=False,
        )


def _abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| in float64 (both finite: :func:`check_parity` refuses NaN/inf before comparing)."""
    return np.abs(a.astype(np.float64) - b.astype(np.float64))


def _non_finite(array: np.ndarray) -> int:
    return int(np.size(array) - np.count_nonzero(np.isfinite(array)))


def _parity_session(path: Path, data: np.ndarray, tolerance: float, what: str) -> Any:
    """The ONNX Runtime CPU session of a parity check, after refusing a negative ``tolerance`` and
    non-finite inputs (``what``: the inputs' name in the message, e.g. ``samples``)."""
    if tolerance < 0:
        raise ExportError(f"parity check of {path}: export.tolerance must be >= 0, got {tolerance}")
    if _non_finite(data):
        raise ExportError(
            f"parity check of {path}: the {what} hold {_non_finite(data)} NaN/inf values; "
            f"fix the dataset's preprocessing"
        )
    try:
        from edgekd.backends.onnxruntime import cpu_session

        return cpu_session(path)  # intra-op threads sized as PyTorch's (edgekd.threads)
    except Exception as exc:
        raise ExportError(f"parity check: ONNX Runtime cannot load {path}: {_first_line(str(exc))}") from exc


def _refuse_non_finite(model: nn.Module, path: Path, bad_torch: int, bad_ort: int, inputs: str) -> None:
    """Raise ExportError when either runtime output NaN/inf (``inputs``: e.g. ``"8 samples"``)."""
    if bad_torch or bad_ort:
        weights, first = non_finite_weights(model)
        in_weights = f"{weights} non-finite weights, first in {first}" if weights else "weights finite"
        raise ExportError(
            f"{path}: outputs are non-finite (NaN/inf in {bad_torch} PyTorch and {bad_ort} ONNX Runtime "
            f"values on {inputs}; {in_weights}); {diverged_hint()}"
        )


def check_parity(
    model: nn.Module, onnx_path: str | os.PathLike[str], samples: np.ndarray, tolerance: float
) -> dict:
    """Compare ONNX Runtime (CPU) with PyTorch on real ``samples`` ``(N, *input_shape)``.

    Runs the whole set as one batch and the first samples at batch size 1 (different from the
    export batch, which proves the batch axis dynamic). Returns ``{max_abs_diff, mean_abs_diff,
    samples, batch_sizes, top1_agreement, tolerance, passed}``; raises ExportError above tolerance,
    and when either runtime outputs any NaN or infinity (NaN in both is a diverged model, not parity).
    """
    import torch

    path = Path(onnx_path)
    data = np.ascontiguousarray(samples, dtype=np.float32)
    if data.ndim < 2 or len(data) == 0:
        raise ExportError(
            f"parity check of {path}: need samples shaped (N, *input_shape) with N >= 1, got {data.shape}"
        )
    session = _parity_session(path, data, tolerance, "samples")
    input_name = session.get_inputs()[0].name
    small = data[:PARITY_SMALL_RUNS]
    with cpu_eval(model) as module, torch.inference_mode():
        expected = module(torch.from_numpy(data.copy()))
    if not isinstance(expected, torch.Tensor):
        raise ExportError(
            f"parity check: {type(model).__name__} must return a logits tensor, got {type(expected).__name__}"
        )
    reference = expected.numpy()
    try:
        full = session.run(None, {input_name: data})[0]
        singles = np.concatenate(
            [session.run(None, {input_name: small[i : i + 1]})[0] for i in range(len(small))]
        )
    except Exception as exc:
        raise ExportError(
            f"parity check: {path} fails on inputs of shape {data.shape} or batch {PARITY_SMALL_BATCH} "
            f"({_first_line(str(exc))}); is the batch axis dynamic and the input shape right?"
        ) from exc
    if full.shape != reference.shape:
        raise ExportError(f"parity check: {path} outputs shape {full.shape}, PyTorch {reference.shape}")
    bad_torch, bad_ort = _non_finite(reference), _non_finite(full) + _non_finite(singles)
    _refuse_non_finite(model, path, bad_torch, bad_ort, f"{len(data)} samples")
    diff_full = _abs_diff(full, reference)
    diff_small = _abs_diff(singles, reference[: len(small)])
    max_abs = float(max(diff_full.max(), diff_small.max()))
    agreement = float(np.mean(full.argmax(-1) == reference.argmax(-1))) if reference.ndim >= 2 else 1.0
    report = {
        "max_abs_diff": max_abs,
        "mean_abs_diff": float(diff_full.mean()),
        "samples": len(data),
        "batch_sizes": [len(data), PARITY_SMALL_BATCH],
        "top1_agreement": agreement,
        "tolerance": tolerance,
        "passed": max_abs <= tolerance,
    }
    if not report["passed"]:
        proto = onnx.load(str(path), load_external_data=False)
        suspects = sorted({node.op_type for node in proto.graph.node} - _EXACT_OPS) or [
            "(none: check the inputs)"
        ]
        raise ExportError(
            f"{path}: ONNX Runtime vs PyTorch max |diff| {max_abs:.3g} > tolerance {tolerance:.3g} "
            f"(mean {report['mean_abs_diff']:.3g}, top-1 agreement {agreement:.3f} "
            f"over {len(data)} samples); "
            f"raise export.tolerance or check ops {', '.join(suspects)}"
        )
    return report
