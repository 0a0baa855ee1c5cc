"""Stage 1: the teacher — loaded from the recipe's checkpoint, or trained here on the labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from edgekd.distill.methods import ModelShape, build_method
from edgekd.distill.trainer import predict_accuracy, train
from edgekd.models import build_model
from edgekd.models.checkpoint import load_weights, save_checkpoint
from edgekd.models.stats import count_flops, count_parameters
from edgekd.pipeline import RunContext, Stage, fingerprint, recipe_fields
from edgekd.recipe import DistillSpec
from edgekd.threads import apply_training_threads

MODEL_FILE = "teacher.pt"


def _inputs(ctx: RunContext) -> list[Path]:
    return [ctx.recipe.teacher.checkpoint] if ctx.recipe.teacher.checkpoint else []


def _run(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    apply_training_threads(ctx.log)  # intra-op threads for the cores other processes leave free
    train_set, val_set, meta = ctx.dataset
    spec = ctx.recipe.teacher
    torch.manual_seed(ctx.recipe.seed)  # initial weights follow the seed
    model = build_model(
        spec.model,
        num_classes=len(meta.classes),
        in_channels=meta.input_shape[0],
        pretrained=spec.pretrained and spec.checkpoint is None,
        role="teacher",
        input_shape=meta.input_shape,
    )
    history: list[dict[str, float]] = []
    if spec.checkpoint is not None:
        load_weights(model, spec.checkpoint, spec.model)
        origin = str(spec.checkpoint)
    else:
        shape = ModelShape(model.feature_dim)
        method = build_method(DistillSpec(method="none"), len(meta.classes), shape, shape)
        result = train(
            model,
            method,
            train_set,
            val_set,
            spec.train,
            ctx.recipe.seed,
            stage_dir,
            fingerprint(STAGE, ctx),
            label="teacher",
            log=ctx.log,
            stage="teacher",
            lr_field="teacher.train.lr",
        )
        history = result.history
        origin = "trained here on labels"
    save_checkpoint(stage_dir / MODEL_FILE, model, spec.model, {"data_fingerprint": meta.fingerprint})
    return {
        "model_file": str((stage_dir / MODEL_FILE).relative_to(ctx.run_dir)),
        "model": spec.model,
        "origin": origin,
        "params": count_parameters(model),
        "flops": count_flops(model, meta.input_shape),
        "val_accuracy": round(predict_accuracy(model, val_set), 5),
        "history": history,
    }


STAGE = Stage("teacher", _run, recipe_fields("seed", "data", "teacher"), _inputs)
