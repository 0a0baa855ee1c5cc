"""INT8 post-training quantisation of an OpenVINO model with NNCF, optionally under an accuracy budget.

Calibration samples are fed one per item, so NNCF's ``subset_size`` counts samples and equals the
number used. With a budget, ``nncf.quantize_with_accuracy_control`` reverts the operations that
cost most accuracy to float until the absolute top-1 drop on the budget's frames is within
``max_drop``; edgekd measures the drop of the result itself and records NNCF's own report lines.
NNCF puts no FakeQuantize in front of ops it cannot quantise (e.g. GRUSequence/LSTMSequence, Einsum
with a constant operand): :func:`kept_in_float` lists them by op type from the quantised model.
nncf and openvino are imported inside the functions.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekd.backends.signal_stack import compile_on_cpu, openvino_signal_stack
from edgekd.errors import QuantizeError, first_line
from edgekd.quantize.budget import AccuracyBudget
from edgekd.quantize.calibration import CalibrationSet
from edgekd.quantize.ort import float_op_types

if TYPE_CHECKING:
    import openvino as ov

PRESET = "performance"  # symmetric weights and activations: NNCF's default for CPU
EVAL_BATCH = 64
_DROP = re.compile(r"Accuracy drop: (-?[0-9.eE+-]+)")
_REPORTED = ("metric", "drop", "revert", "removed", "quantizer", "accuracy", "iteration", "ranking")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def _nncf_log() -> Iterator[_Collect]:
    """Collect NNCF's INFO log lines (the accuracy-control report) while quantising."""
    handler = _Collect()
    logger = logging.getLogger("nncf")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def ov_accuracy(model: ov.Model | ov.CompiledModel, budget: AccuracyBudget) -> float:
    """Top-1 accuracy of an OpenVINO model (compiled for CPU if needed) on the budget's frames."""
    import openvino as ov

    compiled = model if isinstance(model, ov.CompiledModel) else compile_on_cpu(model)
    logits = [compiled(budget.x[i : i + EVAL_BATCH])[0] for i in range(0, len(budget), EVAL_BATCH)]
    return budget.accuracy(np.concatenate(logits))


def _fake_quantize_count(model: ov.Model) -> int:
    return sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


def kept_in_float(model: ov.Model) -> dict[str, int]:
    """Op types (with counts) of an NNCF-quantised OpenVINO model's compute ops that run in float.

    An op runs in INT8 when every activation input leaves a FakeQuantize (directly or through data
    movement and element-wise ops) and no weight of it is a float constant; see
    :func:`edgekd.quantize.ort.float_op_types` for the rule.
    """

    def tensor(output: Any) -> str:
        return f"{output.get_node().get_name()}:{output.get_index()}"

    ops = list(model.get_ordered_ops())
    float_weights: set[str] = set()
    nodes = []
    for op in ops:
        kind = op.get_type_name()
        outputs = [tensor(op.output(k)) for k in range(op.get_output_size())]
        inputs = [tensor(op.input_value(k)) for k in range(op.get_input_size())]
        if kind == "Constant" and op.get_output_element_type(0).is_real():
            if op.get_output_partial_shape(0).rank.get_length() >= 2:
                float_weights.update(outputs)
        elif kind == "Convert" and inputs and inputs[0] in float_weights:  # an f16 weight's decompression
            float_weights.update(outputs)
        real = op.get_output_size() > 0 and op.get_output_element_type(0).is_real()
        nodes.append((op.get_friendly_name(), kind, inputs, outputs, real))
    inputs = [tensor(parameter.output(0)) for parameter in model.get_parameters()]
    return float_op_types(nodes, inputs, frozenset({"FakeQuantize"}), float_weights)


def check_finite(model: ov.Model, calib: CalibrationSet) -> None:
    """QuantizeError when a float constant (weight) of ``model`` or its output on a calibration sample
    is NaN/inf: a diverged training, for which no INT8 range exists (NNCF would quantise garbage)."""

    bad_weights = 0
    for op in model.get_ops():
        if op.get_type_name() == "Constant" and op.get_element_type().is_real():
            values = np.asarray(op.data)
            bad_weights += int(values.size - np.count_nonzero(np.isfinite(values)))
    bad_outputs = 0
    if not bad_weights:
        compiled = compile_on_cpu(model)
        for start in range(0, len(calib), EVAL_BATCH):
            values = np.asarray(compiled(calib.data[start : start + EVAL_BATCH])[0])
            bad_outputs += int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad_weights or bad_outputs:
        what = f"{bad_weights} weight values" if bad_weights else f"{bad_outputs} output values"
        raise QuantizeError(
            f"{model.get_friendly_name()}: {what} are non-finite (NaN/inf) on the calibration samples, "
            f"so no INT8 range exists; the model diverged in training: lower the learning rate "
            f"(distill.train.lr) and retrain"
        )


def quantize_openvino(
    model: ov.Model,
    calib: CalibrationSet,
    budget: AccuracyBudget | None = None,
    settings_extra: dict[str, Any] | None = None,
) -> tuple[ov.Model, dict[str, Any]]:
    """INT8 ``model`` calibrated on ``calib`` (and within ``budget`` when given), and what was done.

    ``settings_extra``: more ``nncf.quantize`` keywords (e.g. a ``model_type`` and an ``ignored_scope``;
    ``benchmarks/detr_int8.py`` passes the DETR ones NNCF offers).
    """
    import nncf

    if model.input(0).get_partial_shape().rank.get_length() != len(calib.sample_shape) + 1:
        raise QuantizeError(
            f"calibration samples have shape {calib.sample_shape} but the model input is "
            f"{model.input(0).get_partial_shape()}; calibrate with the model's own data and preprocessing"
        )
    check_finite(model, calib)
    calibration = nncf.Dataset([calib.data[i : i + 1] for i in range(len(calib))])
    settings: dict[str, Any] = {
        "preset": nncf.QuantizationPreset.PERFORMANCE,
        "target_device": nncf.TargetDevice.CPU,
        "subset_size": len(calib),
        "fast_bias_correction": True,
    }
    record: dict[str, Any] = {
        "tool": "nncf",
        "nncf_version": metadata.version("nncf"),
        "preset": PRESET,
        "target_device": "CPU",
        "subset_size": len(calib),
        "fast_bias_correction": True,
        "ignored_scope": [],
        "calibration": {**calib.provenance(), "samples_used": len(calib), "batch_size": 1},
    }
    if settings_extra:
        settings.update(settings_extra)
        if "model_type" in settings_extra:
            record["model_type"] = str(settings_extra["model_type"].value)
        if "ignored_scope" in settings_extra:
            record["ignored_scope"] = list(settings_extra["ignored_scope"].names)
    try:
        with _nncf_log() as log, openvino_signal_stack():  # NNCF makes and frees Cores of its own
            if budget is None:
                quantized = nncf.quantize(model, calibration, **settings)
            else:
                validation = nncf.Dataset(
                    [(budget.x[i : i + 1], budget.y[i : i + 1]) for i in range(len(budget))],
                    lambda item: item[0],
                )

                def validate(compiled: Any, items: Any) -> float:
                    hits = [int(compiled(x)[0].argmax(axis=1)[0] == y[0]) for x, y in items]
                    return float(np.mean(hits))

                quantized = nncf.quantize_with_accuracy_control(
                    model,
                    calibration,
                    validation,
                    validate,
                    max_drop=budget.max_drop,
                    drop_type=nncf.DropType.ABSOLUTE,
                    **settings,
                )
    except Exception as exc:
        raise QuantizeError(f"NNCF quantisation failed: {type(exc).__name__}: {first_line(exc, '')}") from exc
    record["fake_quantize_nodes"] = _fake_quantize_count(quantized)
    record["kept_in_float"] = kept_in_float(quantized)
    if budget is not None:
        fp32_accuracy, int8_accuracy = ov_accuracy(model, budget), ov_accuracy(quantized, budget)
        drop = fp32_accuracy - int8_accuracy
        reported = [float(m.group(1)) for line in log.lines if (m := _DROP.search(line))]
        record["accuracy_control"] = {
            "method": "nncf.quantize_with_accuracy_control (reverts the most harmful quantisers to float)",
            "budget": budget.record(),
            "met": drop <= budget.max_drop,
            "fp32_accuracy": fp32_accuracy,
            "int8_accuracy": int8_accuracy,
            "drop_before": reported[0] if reported else None,  # NNCF's, with every quantiser on
            "drop_after": round(drop, 6),
            "nncf_report": [line for line in log.lines if any(key in line.lower() for key in _REPORTED)],
        }
    return quantized, record
