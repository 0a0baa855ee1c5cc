"""INT8 static post-training quantisation of an ONNX model with onnxruntime.quantization (QDQ format).

Quirks handled here:

- ``quant_pre_process`` (symbolic shape inference + graph optimisation) fails on some graphs: the raw
  model is then quantised and ``preprocess`` records ``"skipped: <reason>"``;
- ``quant_pre_process`` adds opset imports for every domain ORT knows (``com.microsoft``,
  ``ai.onnx.training``, ...) though no node uses them; other runtimes (TensorRT, OpenVINO) receive
  the same file, so unused imports are removed;
- the calibrators print progress and log warnings (e.g. "Axis 1 is out-of-range" for LayerNorm
  weights under per-channel): captured, and written to ``<output>.quantize.log`` on failure;
- the histogram calibrators (entropy, percentile) stack each tensor's per-batch outputs with
  ``np.asarray(list_of_batches)``, which numpy >= 1.24 refuses ("inhomogeneous shape") when the last
  batch is smaller than the others: they are fed equal batches (:func:`calibration_batch`);
- ``quantize_static`` gives the entropy calibrator no way to set its histogram size, and ORT's
  default (128 bins for 128 quantised bins) makes the KL search a no-op that returns the min/max
  range: entropy ranges are computed here with ORT's own calibrator at ENTROPY_BINS bins and handed
  to ``quantize_static`` as its calibration cache (``calibration_cache_path``);
- a model with NaN/inf weights or outputs (a diverged training) makes ORT fail deep inside with
  ``AssertionError: scale issue``: such a model is refused up front with a QuantizeError;
- the quantiser silently leaves in float every op it has no QDQ rule for (GRU, LSTM, Einsum,
  ReduceMean, ...): :func:`kept_in_float` reads them back from the quantised graph, by op type.
"""

from __future__ import annotations

import difflib
import inspect
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from edgekd.atomic import atomic_path
from edgekd.errors import QuantizeError, first_line
from edgekd.export.onnx import captured_output, failure_log_path, write_failure_log
from edgekd.quantize.calibration import DEFAULT_BATCH, CalibrationDataReader, CalibrationSet

METHODS = ("minmax", "entropy", "percentile")
HISTOGRAM_METHODS = frozenset({"entropy", "percentile"})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# Histogram methods: the smallest equal batch used before all samples go in one batch instead.
MIN_EQUAL_BATCH = 8
# Entropy calibration (Migacz, "8-bit Inference with TensorRT", GTC 2017): the KL-optimal threshold
# is searched over a 2048-bin histogram for 128 quantised bins. quantize_static cannot pass bin counts
# and ORT's defaults (128 and 128) leave a single candidate, the full range: minmax under another name.
ENTROPY_BINS = 2048
ENTROPY_QUANTIZED_BINS = 128
# ORT's percentile calibrator defaults, recorded with the result.
PERCENTILE_BINS = 2048
PERCENTILE = 99.999
DIVERGED = "the model diverged in training: lower the learning rate (distill.train.lr) and retrain"


# Ops that move or select values without computing new ones: never "kept in float" themselves; a
# quantised tensor stays quantised through them (ORT and NNCF move Q/DQ and FakeQuantize across them).
DATA_MOVEMENT = frozenset(
    {
        "Broadcast", "Cast", "Concat", "Constant", "ConstantOfShape", "Convert", "DepthToSpace", "Expand",
        "Flatten", "Gather", "GatherElements", "GatherND", "Identity", "Pad", "Parameter", "Range",
        "Reshape", "Result", "Shape", "ShapeOf", "Size", "Slice", "SpaceToDepth", "Split", "Squeeze",
        "StridedSlice", "Tile", "Transpose", "Unsqueeze", "VariadicSplit",
    }
)  # fmt: skip
# Element-wise ops that commute with (or fuse into) the quantised op before them: they run in the
# INT8 domain of their input and are not listed on their own.
ELEMENTWISE = frozenset(
    {
        "Abs", "Clamp", "Clip", "Elu", "Erf", "Gelu", "HardSigmoid", "HardSwish", "HSigmoid", "HSwish",
        "LeakyRelu", "MaxPool", "Mish", "Neg", "PRelu", "Relu", "Sigmoid", "Swish", "Tanh",
    }
)  # fmt: skip
# With one activation operand and the others constant (a bias, a scale): part of the op before them.
_WITH_CONSTANT = frozenset({"Add", "Sub", "Mul", "Div", "Subtract", "Multiply", "Divide"})
_SHAPE_OPS = frozenset({"Shape", "ShapeOf", "Size"})  # their outputs are sizes, not activations


def float_op_types(
    nodes: Sequence[tuple[str, str, list[str | None], list[str], bool]],
    graph_inputs: Sequence[str],
    quantiser_outputs: frozenset[str],
    float_weights: set[str],
    quantizable: frozenset[str] | None = None,
) -> dict[str, int]:
    """Count by op type the compute nodes of a quantised graph that run in float.

    ``nodes`` in topological order as ``(name, op_type, inputs, outputs, float_output)``;
    ``quantiser_outputs`` the op types whose output is a quantised tensor (DequantizeLinear,
    FakeQuantize); ``float_weights`` the tensors that are float weights (rank >= 2 constants not
    behind a quantiser); ``quantizable`` the op types the quantiser has a rule for (None: any).
    A tensor is *activation* when it depends on a graph input other than through its shape, and
    *INT8* when it leaves a quantiser, or an INT8 node, or a data-movement or element-wise op fed an
    INT8 tensor. A compute node (not data movement, not element-wise, not a quantiser) with an
    activation input runs in INT8 when all its activation inputs are INT8, none of its inputs is a
    float weight, and its op type is ``quantizable``; the others are counted.
    """
    activation = set(graph_inputs)
    int8: set[str] = set()
    counts: dict[str, int] = {}
    for _name, op, inputs, outputs, float_output in nodes:
        live = [i for i in inputs if i and i in activation]
        if not live or op in _SHAPE_OPS:
            continue
        activation.update(outputs)
        if op in quantiser_outputs:
            int8.update(outputs)
            continue
        if op in QDQ_OPS:
            continue
        passes = op in DATA_MOVEMENT or op in ELEMENTWISE or (op in _WITH_CONSTANT and len(live) == 1)
        if passes:
            if live[0] in int8:
                int8.update(outputs)
            continue
        quantised = (
            all(i in int8 for i in live)
            and not any(i in float_weights for i in inputs if i)
            and (quantizable is None or op in quantizable)
        )
        if quantised:
            int8.update(outputs)
        elif float_output:
            counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items()))


def kept_in_float(model: onnx.ModelProto, quantizable: frozenset[str] | None = None) -> dict[str, int]:
    """Op types (with counts) of a QDQ model's compute nodes that stay in float: those ONNX Runtime's
    quantiser has no rule for (``quantizable``, by default the op types ``quantize_static`` quantises:
    its QDQ and QLinear registries, which hold no GRU, LSTM, Einsum or ReduceMean) or whose inputs or
    weights were left unquantised (e.g. excluded nodes)."""
    from onnx import numpy_helper

    if quantizable is None:
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        quantizable = frozenset(QDQRegistry) | frozenset(QLinearOpsRegistry)
    graph = model.graph
    constants = {init.name: tuple(init.dims) for init in graph.initializer if _is_float(init.data_type)}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensor = node.attribute[0].t
            if _is_float(tensor.data_type):
                constants[node.output[0]] = tuple(numpy_helper.to_array(tensor).shape)
    float_weights = {name for name, dims in constants.items() if len(dims) >= 2}
    types = {value.name: value.type.tensor_type.elem_type for value in [*graph.value_info, *graph.output]}
    nodes = [
        (node.name, node.op_type, list(node.input), list(node.output), _is_float(types.get(node.output[0])))
        for node in graph.node
    ]
    inputs = [value.name for value in graph.input if value.name not in constants]
    return float_op_types(nodes, inputs, frozenset({"DequantizeLinear"}), float_weights, quantizable)


def _is_float(elem_type: int | None) -> bool:
    """Whether an ONNX element type is floating point (unknown: assumed float)."""
    return elem_type is None or elem_type in (
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.DOUBLE,
    )


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether ``model`` already holds QuantizeLinear/DequantizeLinear nodes."""
    return any(node.op_type in QDQ_OPS for node in model.graph.node)


def _graph_input(model: onnx.ModelProto, path: Path) -> onnx.ValueInfoProto:
    """The model's single real input (graph inputs that are not initializers)."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise QuantizeError(
            f"{path}: expected a model with one input, found {len(inputs)}: {[v.name for v in inputs]}"
        )
    return inputs[0]


def _check_shapes(value: onnx.ValueInfoProto, calib: CalibrationSet, path: Path) -> int | None:
    """Check calibration samples fit the input; return the input's fixed batch size, or None if dynamic."""
    dims = [dim.dim_value if dim.HasField("dim_value") else None for dim in value.type.tensor_type.shape.dim]
    expected = dims[1:]
    if len(expected) != len(calib.sample_shape) or any(
        want is not None and want != got for want, got in zip(expected, calib.sample_shape, strict=True)
    ):
        shown = tuple(d if d is not None else "?" for d in expected)
        raise QuantizeError(
            f"{path}: calibration samples have shape {calib.sample_shape} but input {value.name!r} expects "
            f"{shown}; calibrate with the model's training data and preprocessing"
        )
    return dims[0] if dims else None


def calibration_batch(samples: int, method: str, fixed_batch: int | None) -> int:
    """Batch size the calibration set is fed in.

    A fixed batch axis dictates it. MinMax accepts any batching. The histogram methods (entropy,
    percentile) need every batch of the same size (see the module notes; they flatten all batches
    together, so equal batches give exactly the histogram of the whole set): the largest divisor of
    ``samples`` up to DEFAULT_BATCH, or all samples in one batch when that divisor is below
    MIN_EQUAL_BATCH (e.g. a prime count).
    """
    if fixed_batch:
        return fixed_batch
    if method not in HISTOGRAM_METHODS:
        return DEFAULT_BATCH
    if samples <= DEFAULT_BATCH:
        return max(samples, 1)
    divisor = next(size for size in range(DEFAULT_BATCH, 0, -1) if samples % size == 0)
    return divisor if divisor >= MIN_EQUAL_BATCH else samples


def _check_finite_weights(model: onnx.ModelProto, path: Path) -> None:
    """QuantizeError naming ``path`` when a float initializer or Constant of the model is NaN/inf."""
    from onnx import numpy_helper

    tensors = [(init.name, init) for init in model.graph.initializer]
    tensors += [
        (node.name or node.output[0], attr.t)
        for node in model.graph.node
        if node.op_type == "Constant"
        for attr in node.attribute
        if attr.name == "value"
    ]
    count, first = 0, None
    for name, tensor in tensors:
        values = numpy_helper.to_array(tensor)
        if not np.issubdtype(values.dtype, np.floating):
            continue
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if bad:
            count, first = count + bad, first or name
    if count:
        raise QuantizeError(
            f"{path}: {count} weight values are non-finite (NaN/inf; first in {first}), so no INT8 "
            f"scale exists; {DIVERGED}"
        )


def _check_finite_outputs(path: Path, reader: CalibrationDataReader) -> None:
    """QuantizeError naming ``path`` when the FP32 model outputs NaN/inf on the calibration batches
    ``reader`` yields (the same the calibrator will be fed)."""
    from edgekd.backends.onnxruntime import cpu_session

    try:
        session = cpu_session(path)  # intra-op threads sized as PyTorch's (edgekd.threads)
        bad = 0
        for feed in reader:
            for output in session.run(None, feed):
                values = np.asarray(output)
                if np.issubdtype(values.dtype, np.floating):
                    bad += int(values.size - np.count_nonzero(np.isfinite(values)))
    except Exception as exc:
        raise QuantizeError(
            f"{path}: ONNX Runtime cannot run the FP32 model on the calibration samples: "
            f"{first_line(exc, type(exc).__name__)}; rerun with --force export"
        ) from exc
    if bad:
        raise QuantizeError(
            f"{path}: the FP32 model outputs {bad} non-finite values (NaN/inf) on the calibration "
            f"samples, so no INT8 scale exists; {DIVERGED}"
        )


def _entropy_ranges(model: Path, reader: CalibrationDataReader, symmetric: bool, cache: Path) -> None:
    """Activation ranges of ``model`` by ORT's entropy (KL-divergence) calibrator at ENTROPY_BINS
    histogram bins, saved to ``cache`` in ``quantize_static``'s calibration-cache format."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    calibrator = create_calibrator(
        model,
        sorted(set(QDQRegistry) | set(QLinearOpsRegistry)),  # the op types quantize_static calibrates
        augmented_model_path=str(cache.with_name("entropy.augmented.onnx")),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={
            "symmetric": symmetric,
            "num_bins": ENTROPY_BINS,
            "num_quantized_bins": ENTROPY_QUANTIZED_BINS,
        },
    )
    calibrator.collect_data(reader)
    save_tensors_data(calibrator.compute_data(), cache)


def _prune_opset_imports(model: onnx.ModelProto) -> None:
    """Drop opset imports of domains no node uses (the default domain is always kept)."""
    used = {node.domain for node in model.graph.node} | {""}
    kept = [op for op in model.opset_import if op.domain in used or op.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def quantize_static_int8(
    fp32_onnx: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    calib: CalibrationSet,
    per_channel: bool = True,
    method: str = "minmax",
    symmetric_activations: bool = False,
    exclude_nodes: Sequence[str] = (),
    quantize_bias: bool = True,
) -> dict:
    """Quantise ``fp32_onnx`` to INT8 QDQ at ``out_path`` (written atomically), calibrated on ``calib``.

    Weights are QInt8 and symmetric (per output channel when ``per_channel``); activations are
    QUInt8 asymmetric, or QInt8 symmetric with zero point 0 when ``symmetric_activations`` (the
    form TensorRT's explicit-quantisation path accepts). ``method`` is the calibration method:
    minmax, entropy (the KL-divergence threshold of Migacz, "8-bit Inference with TensorRT", GTC
    2017) or percentile (ONNX Runtime's default 99.999th percentile of the histogram). Nodes named
    in ``exclude_nodes`` stay in float (e.g. the layers whose INT8 outputs diverge most from FP32).
    ``quantize_bias=False`` keeps biases in float (TensorRT rejects the INT32 DequantizeLinear that
    ORT puts on quantised biases). A model with NaN/inf weights or FP32 outputs is refused. Returns
    ``{format, weight_type, activation_type, per_channel, symmetric_activations, quantize_bias, method,
    calibration, nodes_quantized, nodes_excluded, size_bytes, preprocess}``; ``calibration`` is the
    set's provenance with the samples really fed.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    source, target = Path(fp32_onnx), Path(out_path)
    if method not in METHODS:
        close = difflib.get_close_matches(method, METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise QuantizeError(
            f"unknown quantize.calibration_method {method!r}{hint}; choose one of {', '.join(METHODS)}"
        )
    if not source.is_file():
        raise QuantizeError(
            f"FP32 model {source} not found; run the export stage first or pass an existing .onnx file"
        )
    if method == "entropy" and "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        import onnxruntime

        raise QuantizeError(
            f"quantize.calibration_method 'entropy' needs an onnxruntime whose quantize_static accepts "
            f"calibration_cache_path (installed: {onnxruntime.__version__}); upgrade onnxruntime or "
            f"choose minmax or percentile"
        )
    try:
        fp32 = onnx.load(str(source))
    except Exception as exc:
        raise QuantizeError(f"{source} is not a readable ONNX model: {first_line(exc, '')}") from exc
    if is_quantized(fp32):
        raise QuantizeError(f"{source} is already quantised (it holds QuantizeLinear/DequantizeLinear nodes)")
    unknown = sorted(set(exclude_nodes) - {node.name for node in fp32.graph.node})
    if unknown:
        raise QuantizeError(
            f"{source}: no nodes named {', '.join(unknown)} to keep in float; check the node names"
        )
    graph_input = _graph_input(fp32, source)
    fixed_batch = _check_shapes(graph_input, calib, source)
    batch = calibration_batch(len(calib), method, fixed_batch)
    if fixed_batch and len(calib) < fixed_batch:
        raise QuantizeError(
            f"{source} has a fixed batch of {fixed_batch} but only {len(calib)} calibration samples "
            f"are used; raise quantize.calibration_samples to at least {fixed_batch}"
        )
    _check_finite_weights(fp32, source)
    _check_finite_outputs(source, calib.reader(graph_input.name, batch, drop_last=fixed_batch is not None))
    reader = calib.reader(graph_input.name, batch_size=batch, drop_last=fixed_batch is not None)
    activation_type = QuantType.QInt8 if symmetric_activations else QuantType.QUInt8
    calibrate_method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    with tempfile.TemporaryDirectory(prefix="edgekd-quant-") as workdir, captured_output() as captured:
        prepared = Path(workdir) / "preprocessed.onnx"
        try:
            quant_pre_process(str(source), str(prepared))
            model_input, preprocess = prepared, "ok"
        except Exception as exc:
            model_input, preprocess = source, f"skipped: {type(exc).__name__}: {first_line(exc, '')}"
        if model_input == prepared and exclude_nodes:
            renamed = set(exclude_nodes) - {node.name for node in onnx.load(str(prepared)).graph.node}
            if renamed:  # graph optimisation fused or renamed them: quantise the raw model instead
                model_input = source
                preprocess = f"skipped: pre-processing removed excluded nodes {', '.join(sorted(renamed))}"
        with atomic_path(target) as tmp:
            try:
                cached: dict[str, str] = {}
                if method == "entropy":
                    cache = Path(workdir) / "entropy-ranges.json"
                    _entropy_ranges(Path(model_input), reader, symmetric_activations, cache)
                    cached["calibration_cache_path"] = str(cache)
                quantize_static(
                    str(model_input),
                    str(tmp),
                    reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=activation_type,
                    weight_type=QuantType.QInt8,
                    calibrate_method=calibrate_method,
                    nodes_to_exclude=list(exclude_nodes),
                    extra_options={
                        "ActivationSymmetric": symmetric_activations,
                        "WeightSymmetric": True,
                        "CalibTensorRangeSymmetric": symmetric_activations,
                        "QuantizeBias": quantize_bias,
                    },
                    **cached,
                )
                quantized = onnx.load(str(tmp))
                _prune_opset_imports(quantized)
                onnx.checker.check_model(quantized)
                onnx.save(quantized, str(tmp))
            except Exception as exc:
                log = write_failure_log(target, "quantize", captured, exc)
                raise QuantizeError(
                    f"INT8 quantisation of {source} failed: {type(exc).__name__}: {first_line(exc, '')} "
                    f"(full log: {log})"
                ) from exc
    failure_log_path(target, "quantize").unlink(missing_ok=True)
    calibration = calib.provenance()
    calibration["samples_used"] = reader.samples_yielded
    calibration["batch_size"] = batch
    if method == "entropy":
        calibration["histogram"] = {"bins": ENTROPY_BINS, "quantized_bins": ENTROPY_QUANTIZED_BINS}
    elif method == "percentile":
        calibration["histogram"] = {"bins": PERCENTILE_BINS, "percentile": PERCENTILE}
    return {
        "format": "QDQ",
        "weight_type": "QInt8",
        "activation_type": "QInt8" if symmetric_activations else "QUInt8",
        "per_channel": per_channel,
        "symmetric_activations": symmetric_activations,
        "quantize_bias": quantize_bias,
        "method": method,
        "calibration": calibration,
        "nodes_quantized": sum(node.op_type in QDQ_OPS for node in quantized.graph.node),
        "nodes_excluded": list(exclude_nodes),
        # compute nodes left in float by op type: ops without a QDQ rule (GRU, LSTM, ...) and excluded nodes
        "kept_in_float": kept_in_float(quantized),
        "size_bytes": target.stat().st_size,
        "preprocess": preprocess,
    }
