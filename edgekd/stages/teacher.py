"""Stage 1: the teacher — loaded from the recipe's checkpoint, trained here on the labels, or an ONNX file.

A teacher trained here is kept in the teacher store (:mod:`edgekd.distill.teacher_store`), and a later
run with the same model, training settings, seed and data loads it from there instead of training
(``--force teacher`` trains afresh and replaces the stored one).

A detection run (:mod:`edgekd.tasks`) trains a DETR (``edgekd:detr-r18`` by default) on DETR's set loss
with :func:`edgekd.detection.train.train_detector` (or loads ``teacher.checkpoint``, or reuses the
store) and records its held-out COCO mAP (``val_map``, ``val_map50``) instead of an accuracy.

An ``onnx:FILE`` teacher is copied into the stage directory as ``teacher.onnx`` (what later stages
read) and its validation accuracy is measured through ONNX Runtime.

With ``distill.world_size > 1`` the teacher trains on that many processes (:mod:`edgekd.distributed`):
the store lookup and the accuracy are decided on rank 0, which alone writes the checkpoint and
publishes it; the world size is part of the stage fingerprint and of the store key.

A teacher trained here trains on ``distill.accelerator``'s device (:mod:`edgekd.accelerator`; each
rank on its own GPU under DDP) and is saved device-free; the stage records ``device`` (e.g.
``"cuda:0 (NVIDIA H100 80GB HBM3)"``, or ``"cpu"`` for a teacher loaded rather than trained). CUDA
training is part of the fingerprint and the store key (``device: cuda``); CPU training keeps the
keys it always had.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from edgekd import accelerator, atomic, distributed
from edgekd.distill import teacher_store
from edgekd.distill.methods import ModelShape, build_method
from edgekd.distill.trainer import predict_accuracy, train
from edgekd.hashing import sha256_json
from edgekd.models import build_model, is_onnx, model_source_files
from edgekd.models.checkpoint import load_weights, save_checkpoint
from edgekd.models.sources import ONNX_PREFIX
from edgekd.models.stats import count_flops, count_parameters
from edgekd.pipeline import RunContext, Stage, fingerprint, recipe_fields
from edgekd.recipe import DistillSpec, Recipe
from edgekd.threads import apply_training_threads

MODEL_FILE = "teacher.pt"
ONNX_FILE = "teacher.onnx"


def _inputs(ctx: RunContext) -> list[Path]:
    spec = ctx.recipe.teacher
    return [*([spec.checkpoint] if spec.checkpoint else []), *model_source_files(spec.model)]


def _onnx_teacher(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    """Copy the ONNX teacher into the stage (what later stages read) and measure it through ORT."""
    _, val_set, meta = ctx.dataset
    source = model_source_files(ctx.recipe.teacher.model)[0]
    copy = stage_dir / ONNX_FILE
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise atomic.disk_error(source, exc, "read") from None
    atomic.write_bytes(copy, data)
    model = _onnx_copy(copy, meta)
    return {
        "model_file": str(copy.relative_to(ctx.run_dir)),
        "model": ctx.recipe.teacher.model,
        "origin": f"ONNX file {source}",
        "params": model.param_count,
        "flops": None,  # not counted through ONNX Runtime
        "val_accuracy": round(predict_accuracy(model, val_set), 5),
        "history": [],
        "device": "cpu",  # ONNX Runtime's CPU provider
    }


def _onnx_copy(copy: Path, meta: Any) -> torch.nn.Module:
    """The teacher run by ONNX Runtime from the stage's copy of the ONNX file (``onnx:<copy>``)."""
    return build_model(
        f"{ONNX_PREFIX}{copy}",
        len(meta.classes),
        meta.input_shape[0],
        role="teacher",
        input_shape=meta.input_shape,
    )


def _detection_teacher(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    """A DETR teacher (:mod:`edgekd.tasks`: a detection run): loaded from ``teacher.checkpoint``,
    reused from the teacher store, or trained here on DETR's set loss
    (:func:`edgekd.detection.train.train_detector`), and scored with COCO mAP on the held-out split."""
    from edgekd.detection.distill import build_detection_method
    from edgekd.detection.train import build_detector, evaluate_model, train_detector

    train_set, val_set, meta = ctx.dataset
    spec = ctx.recipe.teacher
    torch.manual_seed(ctx.recipe.seed)  # initial weights follow the seed
    model = build_detector(
        spec.model, meta, "teacher", spec.kwargs, spec.pretrained and spec.checkpoint is None
    )
    history: list[dict[str, Any]] = []
    device = "cpu"  # a teacher loaded, not trained, is only evaluated (on the CPU)
    key = None if spec.checkpoint is not None else _detection_store_key(ctx.recipe, model, meta.fingerprint)
    reuse = spec.store and "teacher" not in ctx.forced  # --force teacher trains afresh
    root = teacher_store.store_dir(ctx.recipe)
    stored = teacher_store.find(root, key) if key and reuse else None
    if spec.checkpoint is not None:
        load_weights(model, spec.checkpoint, spec.model)
        origin = str(spec.checkpoint)
    elif stored is not None:
        load_weights(model, stored["model_file"], spec.model)
        history, origin = (
            stored["history"],
            f"teacher store {key} (trained on the set loss by run {stored['run']})",
        )
        ctx.log(
            f"  teacher reused from the store {stored['model_file'].parent} (trained {stored['created']})"
        )
    else:
        where = accelerator.training_device(ctx.recipe.distill.accelerator)
        device = accelerator.describe(where)
        result = train_detector(
            model,
            build_detection_method("none", model, None, len(meta.classes)),
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
            device=where,
        )
        history, origin = result.history, "trained here on the set loss"
    save_checkpoint(stage_dir / MODEL_FILE, model, spec.model, {"data_fingerprint": meta.fingerprint})
    if key is not None and stored is None and spec.store:
        record = {"run": ctx.recipe.name, "model": spec.model, "history": history}
        teacher_store.publish(root, key, stage_dir / MODEL_FILE, record, ctx.log)
    scores = evaluate_model(model, val_set)
    ctx.log(f"  teacher held-out mAP@[.5:.95] {scores.map:.4f}, mAP@.5 {scores.map50:.4f}")
    return {
        "model_file": str((stage_dir / MODEL_FILE).relative_to(ctx.run_dir)),
        "model": spec.model,
        "task": "detection",
        "origin": origin,
        "params": count_parameters(model),
        "flops": _flops(model, meta.input_shape),
        "val_map": round(scores.map, 5),
        "val_map50": round(scores.map50, 5),
        "val_per_class": scores.per_class,
        "history": history,
        "device": device,
    }


def _flops(model: torch.nn.Module, input_shape: Any) -> int | None:
    """FLOPs per sample, or None where the counter cannot trace the model."""
    try:
        return count_flops(model, input_shape)
    except Exception:  # noqa: BLE001  (FlopCounterMode fails on some ops; the figure is optional)
        return None


def _detection_store_key(recipe: Recipe, model: torch.nn.Module, data_fingerprint: str) -> str:
    """The teacher-store key of a DETR trained here: the classification key plus the detection
    training code (the loop and the set loss), so a change to either retrains."""
    from edgekd.detection import criterion
    from edgekd.detection import train as detection_train
    from edgekd.hashing import sha256_file

    code = {Path(m.__file__).name: sha256_file(Path(m.__file__)) for m in (criterion, detection_train)}
    key = {"key": _store_key(recipe, model, data_fingerprint), "task": "detection", "code": code}
    return sha256_json(key)[:24]


def _run(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    apply_training_threads(ctx.log)  # intra-op threads for the cores other processes leave free
    if ctx.task == "detection":
        return _detection_teacher(ctx, stage_dir)
    train_set, val_set, meta = ctx.dataset
    spec = ctx.recipe.teacher
    if is_onnx(spec.model):
        return _onnx_teacher(ctx, stage_dir)
    torch.manual_seed(ctx.recipe.seed)  # initial weights follow the seed
    model = build_model(
        spec.model,
        num_classes=len(meta.classes),
        in_channels=meta.input_shape[0],
        pretrained=spec.pretrained and spec.checkpoint is None,
        role="teacher",
        input_shape=meta.input_shape,
        kwargs=spec.kwargs,
        hint_layers=spec.hint_layers,
    )
    history: list[dict[str, float]] = []
    device = "cpu"  # a teacher loaded, not trained, is only evaluated (on the CPU)
    key = None if spec.checkpoint is not None else _store_key(ctx.recipe, model, meta.fingerprint)
    reuse = spec.store and "teacher" not in ctx.forced  # --force teacher trains afresh
    root = teacher_store.store_dir(ctx.recipe)
    stored = distributed.decide(lambda: teacher_store.find(root, key)) if key and reuse else None
    if spec.checkpoint is not None:
        load_weights(model, spec.checkpoint, spec.model)
        origin = str(spec.checkpoint)
    elif stored is not None:
        load_weights(model, stored["model_file"], spec.model)
        history, origin = stored["history"], f"teacher store {key} (trained on labels by run {stored['run']})"
        ctx.log(
            f"  teacher reused from the store {stored['model_file'].parent} (trained {stored['created']})"
        )
    else:
        shape = ModelShape(model.feature_dim)
        method = build_method(DistillSpec(method="none"), len(meta.classes), shape, shape)
        where = accelerator.training_device(ctx.recipe.distill.accelerator)
        device = accelerator.describe(where)
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
            device=where,
        )
        history = result.history
        origin = "trained here on labels"
    if distributed.is_main():  # under torch.distributed, rank 0 alone writes
        save_checkpoint(stage_dir / MODEL_FILE, model, spec.model, {"data_fingerprint": meta.fingerprint})
        if key is not None and stored is None and spec.store:
            record = {"run": ctx.recipe.name, "model": spec.model, "history": history}
            teacher_store.publish(root, key, stage_dir / MODEL_FILE, record, ctx.log)
    return {
        "model_file": str((stage_dir / MODEL_FILE).relative_to(ctx.run_dir)),
        "model": spec.model,
        "origin": origin,
        "params": count_parameters(model),
        "flops": count_flops(model, meta.input_shape),
        "val_accuracy": round(distributed.decide(lambda: predict_accuracy(model, val_set)), 5),
        "history": history,
        "device": device,
    }


def _store_key(recipe: Recipe, model: torch.nn.Module, data_fingerprint: str) -> str:
    """The teacher-store key; a teacher trained on several processes is keyed by their number too."""
    key = teacher_store.store_key(recipe, model, data_fingerprint)
    world = recipe.distill.world_size
    if accelerator.device_kind(recipe.distill.accelerator) == "cuda":  # CPU: the key it always had
        key = sha256_json({"key": key, "device": "cuda"})[:24]
    return key if world == 1 else sha256_json({"key": key, "world_size": world})[:24]


def trained_teacher(ctx: RunContext) -> torch.nn.Module:
    """The teacher this stage produced (its checkpoint, or its ONNX copy run by ONNX Runtime), frozen."""
    _, _, meta = ctx.dataset
    name, file = ctx.output("teacher", "model"), ctx.path("teacher", "model_file")
    classes, channels = len(meta.classes), meta.input_shape[0]
    if ctx.task == "detection":
        from edgekd.detection.train import build_detector

        teacher = build_detector(name, meta, "teacher", ctx.recipe.teacher.kwargs)
        load_weights(teacher, file, name)
        return teacher.eval().requires_grad_(False)
    if is_onnx(name):
        teacher = _onnx_copy(file, meta)
    else:
        spec = ctx.recipe.teacher
        teacher = build_model(
            name,
            num_classes=classes,
            in_channels=channels,
            role="teacher",
            input_shape=meta.input_shape,
            kwargs=spec.kwargs,
            hint_layers=spec.hint_layers,
        )
        load_weights(teacher, file, name)
    return teacher.requires_grad_(False)


def _config(recipe: Recipe) -> dict[str, Any]:
    """The stage's recipe slice, without ``teacher.store``: it says where the weights come from, not
    what they are (a stored teacher is the one this stage would train)."""
    config = recipe_fields("seed", "data", "teacher")(recipe)
    config["teacher"].pop("store")
    if recipe.distill.world_size > 1:  # trained on that many processes (one: the key it always had)
        config["world_size"] = recipe.distill.world_size
    if accelerator.device_kind(recipe.distill.accelerator) == "cuda":  # CPU: the key it always had
        config["device"] = "cuda"
    return config


STAGE = Stage("teacher", _run, _config, _inputs)
