"""Stage 2: distil the student from the teacher with the recipe's method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekd.distill.methods import build_method
from edgekd.distill.teacher_cache import cache_key, cached_teacher_outputs
from edgekd.distill.trainer import train
from edgekd.hashing import sha256_file
from edgekd.models import build_model
from edgekd.models.checkpoint import load_weights, save_checkpoint
from edgekd.models.stats import count_flops, count_parameters
from edgekd.pipeline import RunContext, Stage, fingerprint, recipe_fields

MODEL_FILE = "student.pt"


def _inputs(ctx: RunContext) -> list[Path]:
    student_init = [ctx.recipe.student.checkpoint] if ctx.recipe.student.checkpoint else []
    return [ctx.path("teacher", "model_file"), *student_init]


def _run(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    train_set, val_set, meta = ctx.dataset
    recipe = ctx.recipe
    classes, channels = len(meta.classes), meta.input_shape[0]
    teacher_name = ctx.output("teacher", "model")
    teacher_file = ctx.path("teacher", "model_file")
    teacher = build_model(teacher_name, num_classes=classes, in_channels=channels)
    load_weights(teacher, teacher_file, teacher_name)
    teacher.requires_grad_(False)
    student = build_model(recipe.student.model, num_classes=classes, in_channels=channels)
    if recipe.student.checkpoint is not None:
        load_weights(student, recipe.student.checkpoint, recipe.student.model)
    method = build_method(recipe.distill, classes, student.feature_dim, teacher.feature_dim)

    teacher_outputs, cache_info = None, {"enabled": recipe.distill.teacher_cache, "hit": False}
    if method.needs_teacher and recipe.distill.teacher_cache:
        key = cache_key(sha256_file(teacher_file), meta.fingerprint)
        cache_dir = recipe.runs_dir.parent / "cache" / "teacher"
        teacher_outputs, hit = cached_teacher_outputs(teacher, train_set.x, cache_dir, key)
        cache_info = {"enabled": True, "hit": hit, "key": key}
        ctx.log(f"  teacher outputs {'reused from' if hit else 'computed into'} cache {key}")

    result = train(
        student,
        method,
        train_set,
        val_set,
        recipe.distill.train,
        recipe.seed,
        stage_dir,
        fingerprint(STAGE, ctx),
        teacher=teacher,
        teacher_outputs=teacher_outputs,
        label=f"student ({recipe.distill.method})",
        log=ctx.log,
    )
    save_checkpoint(
        stage_dir / MODEL_FILE,
        student,
        recipe.student.model,
        {"data_fingerprint": meta.fingerprint, "method": recipe.distill.method},
    )
    best = result.best
    return {
        "model_file": str((stage_dir / MODEL_FILE).relative_to(ctx.run_dir)),
        "model": recipe.student.model,
        "method": recipe.distill.method,
        "params": count_parameters(student),
        "flops": count_flops(student, meta.input_shape),
        "val_accuracy_last": result.last_accuracy,
        "val_accuracy_best": best["val_accuracy"],
        "best_epoch": best["epoch"],
        "resumed_from_epoch": result.resumed_from_epoch,
        "teacher_cache": cache_info,
        "history": result.history,
    }


STAGE = Stage("distill", _run, recipe_fields("seed", "data", "student", "distill"), _inputs)
