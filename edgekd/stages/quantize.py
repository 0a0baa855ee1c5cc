"""Stage 4: INT8 static quantisation (QDQ) calibrated on train frames, with its provenance.

With ``quantize.max_accuracy_drop`` the most sensitive nodes stay in float until the top-1 drop on
``quantize.accuracy_samples`` train frames (never calibration frames) fits. Ops the quantiser has no
INT8 form of (GRU, LSTM, Einsum, ...) stay in float too: ``quantization.kept_in_float`` counts them.
Targets whose backend quantises INT8 itself (OpenVINO: NNCF on the float model, in the compile
stage) skip this stage, unless ``quantize.mode: qad``.

``quantize.mode: qad`` runs quantisation-aware distillation (:mod:`edgekd.quantize.qad`): one QDQ
ONNX that the target's backend compiles as its INT8 artifact: on ONNX Runtime in ORT's own layout
(UINT8 activations, a Q after every conv: QLinearConv fusion) when it passes the parity gate, else
and on every other backend TensorRT's layout (symmetric INT8, zero point 0, per-channel weights).
With ``quantize.max_accuracy_drop`` and ``mode: ptq`` the budget is a ladder: PTQ, then PTQ with the
most damaging nodes in float, then QAD, stopping at the first rung within the budget; ``ladder``
records every rung tried (accuracy, drop, ONNX Runtime CPU latency, seconds). QAD trains on the train
split minus the budget's frames, so its drop is measured on frames it never saw.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.backends import BACKENDS
from edgekd.errors import QuantizeError
from edgekd.pipeline import RunContext, Stage, recipe_fields
from edgekd.quantize.budget import AccuracyBudget
from edgekd.quantize.calibration import CalibrationSet
from edgekd.quantize.ort import quantize_static_int8
from edgekd.quantize.ort_accuracy import ort_accuracy, ort_latency_ms, quantize_within_budget
from edgekd.recipe import Recipe
from edgekd.stages.teacher import trained_teacher

INT8_FILE = "student.int8.onnx"
NAIVE_INT8_FILE = "student.int8-naive.onnx"  # detection: full INT8 without the DETR rules, for comparison
QAD_FILE = "student.qad.int8.onnx"
PARITY_FRAMES = 1000


def may_run_qad(recipe: Recipe) -> bool:
    """Whether QAD can run: asked for, or as the last rung of an accuracy budget."""
    return recipe.quantize.mode == "qad" or recipe.quantize.max_accuracy_drop is not None


def qad_files(ctx: RunContext) -> list[Path]:
    """The files QAD reads (student and teacher checkpoints) when it may run; else none."""
    if not may_run_qad(ctx.recipe) or "teacher" not in ctx.results or "distill" not in ctx.results:
        return []
    return [ctx.path("distill", "model_file"), ctx.path("teacher", "model_file")]


def _inputs(ctx: RunContext) -> list[Path]:
    return [ctx.path("export", "onnx_file"), *qad_files(ctx)]


def _config(recipe: Recipe) -> dict[str, Any]:
    """The recipe slice; with QAD possible also ``distill`` (its loss, temperature, batch size, lr)."""
    fields = ("seed", "data", "quantize", "target", *(("distill",) if may_run_qad(recipe) else ()))
    return recipe_fields(*fields)(recipe)


def _calibration_indices(ctx: RunContext) -> np.ndarray:
    train_set, _, _ = ctx.dataset
    rng = np.random.default_rng([ctx.recipe.seed, 7])
    count = min(ctx.recipe.quantize.calibration_samples, len(train_set))
    return np.sort(rng.choice(len(train_set), size=count, replace=False))


def calibration_set(ctx: RunContext) -> CalibrationSet:
    """A seeded random subset of the train split, of ``quantize.calibration_samples`` frames."""
    train_set, _, meta = ctx.dataset
    spec = ctx.recipe.quantize
    chosen = _calibration_indices(ctx)
    return CalibrationSet(
        (train_set.images if ctx.task == "detection" else train_set.x)[chosen],
        dataset_fingerprint=meta.fingerprint,
        preprocessing=meta.normalisation.get("description", meta.normalisation.get("type", "none")),
        requested=spec.calibration_samples,
        min_samples=spec.min_calibration_samples,
    )


def _budget_indices(ctx: RunContext) -> np.ndarray:
    train_set = ctx.dataset[0]
    remaining = np.setdiff1d(np.arange(len(train_set)), _calibration_indices(ctx))
    rng = np.random.default_rng([ctx.recipe.seed, 8])
    count = min(ctx.recipe.quantize.accuracy_samples, len(remaining))
    return np.sort(rng.choice(remaining, size=count, replace=False))


def accuracy_budget(ctx: RunContext, max_drop: float | None = None) -> AccuracyBudget | None:
    """``quantize.accuracy_samples`` seeded train frames not used for calibration; None without a budget.

    ``max_drop`` overrides ``quantize.max_accuracy_drop`` (QAD measures its drop without a budget too).
    """
    spec = ctx.recipe.quantize
    max_drop = spec.max_accuracy_drop if max_drop is None else max_drop
    if max_drop is None:
        return None
    train_set, _, meta = ctx.dataset
    chosen = _budget_indices(ctx)
    provenance = {
        "split": "train, excluding the calibration frames",
        "requested": spec.accuracy_samples,
        "dataset_fingerprint": meta.fingerprint,
    }
    return AccuracyBudget(max_drop, train_set.x[chosen], train_set.y[chosen], provenance)


def _rung(
    name: str,
    path: Path | None,
    accuracy: float | None,
    fp32: float | None,
    seconds: float,
    budget: AccuracyBudget | None,
    frame: np.ndarray,
    ctx: RunContext,
) -> dict[str, Any]:
    drop = None if accuracy is None or fp32 is None else round(fp32 - accuracy, 6)
    return {
        "rung": name,
        "file": None if path is None else str(path.relative_to(ctx.run_dir)),
        "accuracy": accuracy,
        "drop": drop,
        "met": None if budget is None or drop is None else drop <= budget.max_drop,
        "latency_ms": None if path is None else ort_latency_ms(path, frame),
        "latency": "ONNX Runtime CPU, 1 thread, batch 1, median of 30 (a comparison between rungs)",
        "seconds": round(seconds, 3),
    }


def _ptq_options(ctx: RunContext) -> dict[str, Any]:
    spec = ctx.recipe.quantize
    return {
        "per_channel": spec.per_channel,
        "method": spec.calibration_method,
        # TensorRT's explicit quantisation: INT8 zero points 0, biases in float (no INT32 DequantizeLinear).
        "symmetric_activations": ctx.target.backend == "tensorrt",
        "quantize_bias": ctx.target.backend != "tensorrt",
    }


def _run(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    spec = ctx.recipe.quantize
    if not spec.enabled or "int8" not in ctx.target.precisions:
        return {
            "skipped": "quantize.enabled is false" if not spec.enabled else f"{ctx.target.name} has no int8"
        }
    if ctx.task == "detection":
        return _run_detection(ctx, stage_dir)
    if spec.mode == "qad":
        return _run_qad_mode(ctx, stage_dir)
    if BACKENDS.get(ctx.target.backend).quantizes_itself:
        return {
            "skipped": f"backend {ctx.target.backend!r} of {ctx.target.name} quantises INT8 itself from the "
            f"float model in the compile stage; no QDQ model is made"
        }
    options = _ptq_options(ctx)
    source, target, calib = ctx.path("export", "onnx_file"), stage_dir / INT8_FILE, calibration_set(ctx)
    budget = accuracy_budget(ctx)
    if budget is None:
        info = quantize_static_int8(source, target, calib, **options)
        log_kept_in_float(ctx, info.get("kept_in_float"))
        return {"int8_onnx_file": str(target.relative_to(ctx.run_dir)), "quantization": info}
    started = time.perf_counter()
    info = quantize_within_budget(source, target, calib, budget, **options)
    control = info["accuracy_control"]
    ctx.log(
        f"  INT8 drop {control['drop_before']:.4f} -> {control['drop_after']:.4f} "
        f"(budget {budget.max_drop}) after {control['attempts']} attempt(s), "
        f"{len(control['excluded_nodes'])} node(s) in float: {control['stopped']}"
    )
    frame, fp32 = budget.x[0], control["fp32_accuracy"]
    first = control["history"][0]
    ladder = [
        {**_rung("ptq", None, first["accuracy"], fp32, 0.0, budget, frame, ctx), "seconds": None},
    ]
    if control["attempts"] > 1:
        path = target if control["int8_left"] else None
        ladder.append(
            _rung("ptq_float_nodes", path, control["int8_accuracy"], fp32, 0.0, budget, frame, ctx)
            | {"seconds": None, "nodes_in_float": len(control["excluded_nodes"])}
        )
    else:
        ladder[0]["latency_ms"] = ort_latency_ms(target, frame)
    seconds = round(time.perf_counter() - started, 3)
    ladder[-1]["seconds"] = seconds  # the PTQ rungs are one search: its time is on the last of them
    if control["met"] and control["int8_left"]:
        log_kept_in_float(ctx, info.get("kept_in_float"))
        return {
            "int8_onnx_file": str(target.relative_to(ctx.run_dir)),
            "quantization": info,
            "ladder": ladder,
        }
    ctx.log(f"  PTQ misses quantize.max_accuracy_drop={budget.max_drop}: quantisation-aware distillation")
    qad_info, rung = qad_rung(ctx, stage_dir / QAD_FILE, calib, budget, fp32)
    ladder.append(rung)
    qad_info["accuracy_control"] = {**control, "met": rung["met"], "drop_after": rung["drop"], "rung": "qad"}
    return {
        "int8_onnx_file": str((stage_dir / QAD_FILE).relative_to(ctx.run_dir)),
        "quantization": qad_info,
        "ptq_quantization": info,
        "ladder": ladder,
    }


def _run_detection(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    """A detector: static QDQ with the DETR rule set (:mod:`edgekd.quantize.detr_rules`), and the naive
    full-INT8 model beside it so the report shows what the rules buy. No accuracy ladder: the mAP
    budget (``quantize.max_accuracy_drop``) is applied by the deployment decision. Every backend
    compiles this QDQ model, OpenVINO included: NNCF's INT8 of a DETR loses nearly all of its mAP
    (:data:`edgekd.quantize.detr_rules.NNCF_MEASURED`), OpenVINO running this model does not."""
    from edgekd.quantize.detr_rules import GROUPS, quantize_detr_ort

    if ctx.recipe.quantize.mode == "qad":
        raise QuantizeError(
            "quantize.mode: qad is for classifiers; a detection run quantises with the DETR rule set "
            "(post-training): set quantize.mode: ptq"
        )
    options = _ptq_options(ctx)
    source, calib = ctx.path("export", "onnx_file"), calibration_set(ctx)
    target, naive = stage_dir / INT8_FILE, stage_dir / NAIVE_INT8_FILE
    info = quantize_detr_ort(source, target, calib, GROUPS, **options)
    naive_info = quantize_detr_ort(source, naive, calib, (), **options)
    ctx.log(
        f"  DETR rules: {', '.join(f'{g} x{n}' for g, n in info['float_groups'].items())} node(s) in float; "
        f"naive full INT8 beside it for comparison"
    )
    log_kept_in_float(ctx, info.get("kept_in_float"))
    return {
        "int8_onnx_file": str(target.relative_to(ctx.run_dir)),
        "quantization": info,
        "naive_int8_onnx_file": str(naive.relative_to(ctx.run_dir)),
        "naive_quantization": naive_info,
    }


def _run_qad_mode(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    """``quantize.mode: qad``: QAD straight away; the drop is measured on the budget frames either way."""
    spec = ctx.recipe.quantize
    budget = accuracy_budget(ctx, spec.max_accuracy_drop if spec.max_accuracy_drop is not None else 1.0)
    assert budget is not None
    fp32 = ort_accuracy(ctx.path("export", "onnx_file"), budget)
    info, rung = qad_rung(ctx, stage_dir / QAD_FILE, calibration_set(ctx), budget, fp32)
    if spec.max_accuracy_drop is None:
        rung["met"] = None
    return {
        "int8_onnx_file": str((stage_dir / QAD_FILE).relative_to(ctx.run_dir)),
        "quantization": info,
        "ladder": [rung],
    }


def qad_lr(recipe: Recipe) -> float:
    return recipe.quantize.qad_lr or recipe.distill.train.lr / 30


def qad_rung(
    ctx: RunContext, out_path: Path, calib: CalibrationSet, budget: AccuracyBudget, fp32: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run QAD into ``out_path``: its quantisation record and its ladder rung (drop on ``budget``)."""
    from edgekd.data.base import hide_labels
    from edgekd.distill.teacher_cache import cache_key, cached_teacher_outputs, compute_teacher_outputs
    from edgekd.hashing import sha256_file
    from edgekd.quantize.qad import QadData, qad_loss_method, qdq_layout, quantisation_aware_distillation
    from edgekd.stages.model_import import load_student
    from edgekd.threads import apply_training_threads

    recipe = ctx.recipe
    if "teacher" not in ctx.results or "distill" not in ctx.results:
        raise QuantizeError(
            "quantisation-aware distillation needs the teacher and the distilled PyTorch student "
            "(edgekd compress); this run has none: set quantize.mode: ptq and leave "
            "quantize.max_accuracy_drop unset, or deploy FP32"
        )
    started = time.perf_counter()
    apply_training_threads(ctx.log)
    train_set, val_set, meta = ctx.dataset
    student = load_student(ctx)
    teacher = trained_teacher(ctx).eval()
    labelled = hide_labels(train_set, recipe.distill.label_fraction, recipe.seed)
    rows = np.setdiff1d(np.arange(len(train_set)), _budget_indices(ctx))  # never the budget's frames
    if recipe.distill.teacher_cache:
        key = cache_key(sha256_file(ctx.path("teacher", "model_file")), meta.fingerprint, None)
        cache_dir = recipe.runs_dir.parent / "cache" / "teacher"
        outputs, hit = cached_teacher_outputs(teacher, train_set.x, cache_dir, key, log=ctx.log)
        ctx.log(f"  QAD: teacher outputs {'reused from' if hit else 'computed into'} cache {key}")
        teacher_logits = np.asarray(outputs.logits[0][rows])
    else:
        teacher_logits = compute_teacher_outputs(teacher, train_set.x[rows], 512).logits[0]
    data = QadData(train_set.x[rows], labelled.y[rows], teacher_logits)
    method, method_name = qad_loss_method(recipe.distill, len(meta.classes), int(student.feature_dim))
    lr = qad_lr(recipe)
    ctx.log(
        f"  QAD: {recipe.quantize.qad_epochs} epoch(s) at lr {lr:g}, loss {method_name} + CE, "
        f"{len(rows)} train frames"
    )

    def score(model: Any) -> float:
        from edgekd.quantize.qad import torch_logits

        return budget.accuracy(torch_logits(model, budget.x))

    info = quantisation_aware_distillation(
        student,
        tuple(meta.input_shape),
        calib.data,
        data,
        method,
        out_path,
        val_set.x[:PARITY_FRAMES],
        per_channel=recipe.quantize.per_channel,
        epochs=recipe.quantize.qad_epochs,
        lr=lr,
        batch_size=recipe.distill.train.batch_size,
        seed=recipe.seed,
        score=score,
        layout=qdq_layout(ctx.target.backend),
        learn_ranges=recipe.quantize.qad_learn_ranges,
        range_lr=recipe.quantize.qad_range_lr or 10 * lr,
        log=ctx.log,
    )
    info["loss"] = {"method": method_name, "asked": recipe.distill.method, "plus": "CE on labels"}
    info["calibration"] = calib.provenance()
    accuracy = ort_accuracy(out_path, budget)
    info["onnx_accuracy"] = accuracy
    rung = _rung("qad", out_path, accuracy, fp32, time.perf_counter() - started, budget, budget.x[0], ctx)
    parity = info["parity"]
    ctx.log(
        f"  QAD: drop {rung['drop']:.4f} (PTQ start {fp32 - info['fake_quant_accuracy_start']:.4f}), "
        f"parity top-1 {parity['top1_agreement']:.2%}, {info['layout']} layout, TensorRT rules "
        f"{'hold' if info['tensorrt_rules']['complies'] else 'broken'}, {rung['seconds']:.1f} s"
    )
    return info, rung


def log_kept_in_float(ctx: RunContext, counts: dict[str, int] | None) -> None:
    """Log the op types an INT8 quantiser left in float (ops its runtime has no INT8 form of)."""
    if counts:
        ctx.log(f"  kept in float: {', '.join(f'{op} x{count}' for op, count in counts.items())}")


STAGE = Stage("quantize", _run, _config, _inputs)
