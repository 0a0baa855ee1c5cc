"""Stage 2: distil the student from the teacher with the recipe's method.

A detection run (:mod:`edgekd.tasks`) distils a DETR student with a detection method (CLoCKDistill
by default) and records held-out COCO mAP (``val_map``, ``val_map50``: the last epoch's, the model
handed on; ``*_best`` too) instead of accuracies.

The teacher is the teacher stage's file: an edgekd checkpoint, or ``teacher.onnx`` for an
``onnx:`` teacher (run by ONNX Runtime; its outputs go through the teacher cache like any other's).

With ``distill.world_size > 1`` the student trains on that many processes (:mod:`edgekd.distributed`):
rank 0 builds the teacher cache and every rank memory-maps it; rank 0 alone writes the student.

The teacher-output pass and the training run on ``distill.accelerator``'s device
(:mod:`edgekd.accelerator`); the student is saved device-free and the stage records ``device``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from edgekd import accelerator, distributed
from edgekd.data.augment import augmentation_bank
from edgekd.data.base import hide_labels
from edgekd.distill.methods import build_method, resolved_options
from edgekd.distill.outputs import probe_shape
from edgekd.distill.teacher_cache import cache_key, shared_teacher_outputs
from edgekd.distill.trainer import train
from edgekd.hashing import sha256_file
from edgekd.models import build_model, model_source_files
from edgekd.models.checkpoint import load_weights, save_checkpoint
from edgekd.models.sources import is_onnx, refuse_feature_maps
from edgekd.models.stats import count_flops, count_parameters
from edgekd.pipeline import RunContext, Stage, fingerprint, recipe_fields
from edgekd.recipe import Recipe
from edgekd.stages.teacher import trained_teacher
from edgekd.threads import apply_training_threads

MODEL_FILE = "student.pt"


def _inputs(ctx: RunContext) -> list[Path]:
    recipe = ctx.recipe
    student_init = [recipe.student.checkpoint] if recipe.student.checkpoint else []
    sources = [*model_source_files(recipe.student.model)]
    if not is_onnx(recipe.teacher.model):  # an ONNX teacher is the teacher stage's copy
        sources += model_source_files(recipe.teacher.model)
    return [ctx.path("teacher", "model_file"), *student_init, *sources]


def _detection_run(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    """Distil a DETR student (:mod:`edgekd.tasks`: a detection run) with a detection method
    (:data:`edgekd.detection.distill.DETECTION_METHODS`; CLoCKDistill by default), trained by
    :func:`edgekd.detection.train.train_detector` and scored with COCO mAP on the held-out split.

    The teacher runs live (its memory is not cached: see :mod:`edgekd.detection.distill` for what a
    cache would hold and save)."""
    from edgekd.detection.distill import build_detection_method
    from edgekd.detection.train import build_detector, evaluate_model, train_detector
    from edgekd.stages.teacher import _flops

    train_set, val_set, meta = ctx.dataset
    recipe, spec = ctx.recipe, ctx.recipe.distill
    teacher = trained_teacher(ctx)
    torch.manual_seed(recipe.seed)  # the student's and the method's initial weights follow the seed
    student = build_detector(
        recipe.student.model,
        meta,
        "student",
        recipe.student.kwargs,
        recipe.student.pretrained and recipe.student.checkpoint is None,
    )
    if recipe.student.checkpoint is not None:
        load_weights(student, recipe.student.checkpoint, recipe.student.model)
    method = build_detection_method(
        spec.method, student, teacher, len(meta.classes), spec.options.get(spec.method, {})
    )
    device = accelerator.training_device(spec.accelerator)
    result = train_detector(
        student,
        method,
        train_set,
        val_set,
        spec.train,
        recipe.seed,
        stage_dir,
        fingerprint(STAGE, ctx),
        teacher=teacher if method.needs_teacher else None,
        label=f"student ({spec.method})",
        log=ctx.log,
        stage="distill",
        lr_field="distill.train.lr",
        device=device,
        cache_teacher=spec.teacher_cache,
    )
    save_checkpoint(
        stage_dir / MODEL_FILE,
        student,
        recipe.student.model,
        {"data_fingerprint": meta.fingerprint, "method": spec.method},
    )
    scores = evaluate_model(student, val_set)
    ctx.log(f"  student held-out mAP@[.5:.95] {scores.map:.4f}, mAP@.5 {scores.map50:.4f}")
    best = result.best
    return {
        "model_file": str((stage_dir / MODEL_FILE).relative_to(ctx.run_dir)),
        "model": recipe.student.model,
        "task": "detection",
        "method": spec.method,
        "method_options": method.options.model_dump(),
        "params": count_parameters(student),
        "flops": _flops(student, meta.input_shape),
        "val_map": round(scores.map, 5),
        "val_map50": round(scores.map50, 5),
        "val_map_last": round(scores.map, 5),
        "val_map50_last": round(scores.map50, 5),
        "val_map_best": best["val_map"],
        "val_map50_best": best["val_map50"],
        "best_epoch": best["epoch"],
        "val_per_class": scores.per_class,
        "resumed_from_epoch": result.resumed_from_epoch,
        "history": result.history,
        "device": accelerator.describe(device),
    }


def _run(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    apply_training_threads(ctx.log)  # intra-op threads for the cores other processes leave free
    if ctx.task == "detection":
        return _detection_run(ctx, stage_dir)
    train_set, val_set, meta = ctx.dataset
    recipe, spec = ctx.recipe, ctx.recipe.distill
    classes, channels = len(meta.classes), meta.input_shape[0]
    teacher_name = ctx.output("teacher", "model")
    teacher_file = ctx.path("teacher", "model_file")
    if is_onnx(teacher_name):
        refuse_feature_maps(spec.method, teacher_name)
    teacher = trained_teacher(ctx)
    torch.manual_seed(recipe.seed)  # the student's and the method's initial weights follow the seed
    student = build_model(
        recipe.student.model,
        num_classes=classes,
        in_channels=channels,
        pretrained=recipe.student.pretrained and recipe.student.checkpoint is None,
        role="student",
        input_shape=meta.input_shape,
        kwargs=recipe.student.kwargs,
        hint_layers=recipe.student.hint_layers,
    )
    if recipe.student.checkpoint is not None:
        load_weights(student, recipe.student.checkpoint, recipe.student.model)
    method = build_method(
        spec, classes, probe_shape(student, meta.input_shape), probe_shape(teacher, meta.input_shape)
    )
    device = accelerator.training_device(spec.accelerator)
    accelerator.place(teacher, device)  # for the teacher-output pass and live teacher batches
    train_set = hide_labels(train_set, spec.label_fraction, recipe.seed)
    augment = spec.augment.model_dump() if spec.augment.enabled else None
    bank = (
        augmentation_bank(meta, len(train_set), spec.augment.variants, spec.augment.seed, spec.augment.policy)
        if augment
        else None
    )

    teacher_outputs, cache_info = None, {"enabled": spec.teacher_cache, "used": False, "hit": False}
    if spec.teacher_cache and (method.uses_teacher_cache or method.needs_teacher_dataset):
        key = cache_key(sha256_file(teacher_file), meta.fingerprint, augment)
        cache_dir = recipe.runs_dir.parent / "cache" / "teacher"
        teacher_outputs, hit = shared_teacher_outputs(teacher, train_set.x, cache_dir, key, bank, log=ctx.log)
        cache_info = {"enabled": True, "used": method.uses_teacher_cache, "hit": hit, "key": key}
        ctx.log(f"  teacher outputs {'reused from' if hit else 'computed into'} cache {key}")

    result = train(
        student,
        method,
        train_set,
        val_set,
        spec.train,
        recipe.seed,
        stage_dir,
        fingerprint(STAGE, ctx),
        teacher=teacher,
        teacher_outputs=teacher_outputs,
        bank=bank,
        label=f"student ({spec.method})",
        log=ctx.log,
        stage="distill",
        lr_field="distill.train.lr",
        device=device,
    )
    if distributed.is_main():  # under torch.distributed, rank 0 alone writes
        save_checkpoint(
            stage_dir / MODEL_FILE,
            student,
            recipe.student.model,
            {"data_fingerprint": meta.fingerprint, "method": spec.method},
        )
    best = result.best
    return {
        "model_file": str((stage_dir / MODEL_FILE).relative_to(ctx.run_dir)),
        "model": recipe.student.model,
        "method": spec.method,
        "method_options": method.options.model_dump(),
        "method_record": method.record(),
        "params": count_parameters(student),
        "flops": count_flops(student, meta.input_shape),
        "val_accuracy_last": round(result.deployed_accuracy, 5),
        "val_accuracy_best": best["val_accuracy"],
        "best_epoch": best["epoch"],
        "resumed_from_epoch": result.resumed_from_epoch,
        "teacher_cache": cache_info,
        "augment": None if bank is None else {**augment, **bank.describe()},
        "label_fraction": spec.label_fraction,
        "history": result.history,
        "device": accelerator.describe(device),
    }


def _config(recipe: Recipe) -> dict[str, Any]:
    """The stage's recipe slice, with only the chosen method's options (defaults filled in)."""
    config = recipe_fields("seed", "data", "student", "distill")(recipe)
    config["distill"]["options"] = _options(recipe)
    if config["distill"]["world_size"] == 1:  # one process: the fingerprint it always had
        del config["distill"]["world_size"]
    if accelerator.device_kind(recipe.distill.accelerator) == "cuda":  # CPU: the fingerprint it always had
        config["device"] = "cuda"
    teacher = recipe.teacher
    if teacher.kwargs or teacher.hint_layers is not None:  # they shape the teacher this stage builds
        config["teacher"] = {"kwargs": teacher.kwargs, "hint_layers": teacher.hint_layers}
    return config


def _options(recipe: Recipe) -> dict[str, Any]:
    """The chosen method's options with defaults filled in, from its task's registry."""
    from edgekd.tasks import DETECTION, task_of

    if task_of(recipe.data.name) != DETECTION:
        return resolved_options(recipe.distill)
    from edgekd.detection.distill import DETECTION_METHODS, parse_detection_options

    name = recipe.distill.method
    given = recipe.distill.options.get(name, {})
    return parse_detection_options(DETECTION_METHODS.get(name), name, given).model_dump()


STAGE = Stage("distill", _run, _config, _inputs)
