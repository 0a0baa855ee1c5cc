"""Task kinds: what a run does with its data — classify whole inputs, or detect objects in images.

Every stage asks the run's task (:attr:`edgekd.pipeline.RunContext.task`, from the dataset source
named in ``data.name``) what to do: which models fit, which distillation methods apply, which loss
trains, which metric evaluates (top-1 accuracy, or COCO mAP), what export outputs, what the report
shows. ``classification`` is every source edgekd had before detection; ``detection`` is the built-in
``scenes`` and the user's ``coco`` / ``yolo`` data (:mod:`edgekd.data.detection_sources`).

Detection follows DETR (Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020)
with DAB-DETR's decoder and optimiser recipe (Liu et al., ICLR 2022) and distils with CLoCKDistill
(Lan & Tian, arXiv:2502.10683) by default.

This module imports only the standard library at import time: the recipe's validators call it. The
checks that need the model and method registries (:func:`check_recipe`) import them when called.
"""

from __future__ import annotations

from typing import Any

CLASSIFICATION = "classification"
DETECTION = "detection"
TASKS = (CLASSIFICATION, DETECTION)

#: Dataset registry names (and aliases) whose task is detection; every other source classifies.
DETECTION_SOURCES = ("scenes", "coco", "yolo")
DETECTION_ALIASES = {"synthetic-scenes": "scenes", "coco-json": "coco", "ultralytics": "yolo"}

#: What ``edgekd compress --data scenes`` (or coco / yolo) uses for every field the recipe leaves at
#: its classification default: the DETR pair, CLoCKDistill, DAB-DETR's optimiser (AdamW, weight decay
#: 1e-4, batch 16; the lr below) and the scenes' own side (128 px).
DETECTION_DEFAULTS: dict[str, Any] = {
    "teacher.model": "edgekd:detr-r18",
    "student.model": "edgekd:detr-mnv3",
    "distill.method": "clockdistill",
    "data.image_size": 128,
}
# The teacher's training settings apply where a teacher is trained here: the user's coco / yolo data,
# another teacher.model, or teacher.checkpoint null. On the built-in scenes edgekd ships its teacher
# (builtin:detr-r18-scenes, benchmarks/detection_teacher.py: 18 epochs on 4,750 other scenes), because
# one trained inside a 15-minute default run on two CPU cores is no stronger than its student
# (benchmarks/results/detr_kd.json of session 8: teacher 6 epochs 1.5 mAP, student alone 5.6).
# The lrs are ours (DAB-DETR's 1e-4 is for an ImageNet backbone), measured from random weights on the
# built-in scenes (benchmarks/results/detr_convergence.json, one seed each, held-out mAP@.5): the
# ResNet-18 teacher learns fastest at 3e-4 (0.156 after 6 epochs on 3,000 scenes) and not at all at
# 1e-3 (0.0004 after 15 epochs on 900); the MobileNetV3 student needs 1e-3 (0.068 after 30 epochs on
# 900 scenes, against 0.012 at 5e-4 after 15), and the MobileNetV3-large teacher (edgekd:detr-mnv3l)
# is slow at 1e-3 (0.072 after 8 epochs on 3,000). The student's 14 epochs: after 7 (the earlier
# default) it is at half of what it reaches after 14 (held-out mAP 5.5 vs 9.9 alone, 6.1 vs 10.1 with
# CLoCKDistill from the MobileNetV3-large teacher: benchmarks/results/detr_kd_mnv3l_teacher_*.json),
# and with 14 the default run takes 9.6 minutes on two CPU cores
# (benchmarks/results/detection_pipeline.json).
DETECTION_TRAIN = {
    "teacher": {"epochs": 6, "batch_size": 16, "lr": 3e-4, "weight_decay": 1e-4},
    "distill": {"epochs": 14, "batch_size": 16, "lr": 1e-3, "weight_decay": 1e-4},
}


def canonical_source(data_name: str) -> str:
    """``data.name`` without a ``KIND:FILE`` tail, detection aliases resolved (other names unchanged)."""
    name = data_name.partition(":")[0].strip().lower()
    return DETECTION_ALIASES.get(name, name)


def task_of(data_name: str) -> str:
    """The task of the dataset source ``data_name``: ``"detection"`` for scenes / coco / yolo (and
    their aliases), else ``"classification"``."""
    return DETECTION if canonical_source(data_name) in DETECTION_SOURCES else CLASSIFICATION


def model_task(name: str) -> str:
    """The task a model source builds for: detection for the registered DETRs, else classification
    (timm, torchvision, user factories and ONNX files are taken as classifiers)."""
    from edgekd.models.detr import FACTORIES

    return DETECTION if name in FACTORIES else CLASSIFICATION


def method_tasks(name: str) -> set[str]:
    """The tasks distillation method ``name`` (aliases too) is registered for: empty if unknown, both
    for ``none`` (the student alone, on the labels or on DETR's set loss)."""
    from edgekd.detection.distill import DETECTION_METHODS
    from edgekd.distill.methods import METHODS

    return {
        task for task, known in ((CLASSIFICATION, METHODS), (DETECTION, DETECTION_METHODS)) if name in known
    }


def methods_for(task: str) -> list[str]:
    """The registered method names of ``task``, sorted."""
    from edgekd.detection.distill import DETECTION_METHODS
    from edgekd.distill.methods import METHODS

    return DETECTION_METHODS.names() if task == DETECTION else METHODS.names()


def check_recipe(recipe: Any) -> str:
    """The recipe's task, after checking that its models and method are of that task; one
    :class:`~edgekd.errors.RecipeError` line naming the field, both tasks and what to choose.

    An unknown method name is left to the method registry's own error (with its close match).
    """
    from edgekd.errors import RecipeError

    task = task_of(recipe.data.name)
    data = f"data.name={recipe.data.name!r} is a {task} dataset"
    for role, spec in (("teacher", recipe.teacher), ("student", recipe.student)):
        kind = model_task(spec.model)
        if kind != task:
            fits = (
                "edgekd:detr-r18 or edgekd:detr-mnv3"
                if task == DETECTION
                else "a classifier (e.g. edgekd:kd-cnn, timm:resnet18)"
            )
            raise RecipeError(
                f"{role}.model={spec.model!r} is a {kind} model but {data}; choose {fits} "
                f"(--{role}), or a {kind} dataset"
            )
    method = recipe.distill.method
    kinds = method_tasks(method)
    if kinds and task not in kinds:
        raise RecipeError(
            f"distill.method={method!r} is a {' and '.join(sorted(kinds))} method but {data}; choose one "
            f"of {', '.join(methods_for(task))} (--method; `edgekd methods` lists them by task)"
        )
    for name in recipe.distill.options:
        kinds = method_tasks(name)
        if kinds and task not in kinds:
            raise RecipeError(
                f"distill.options.{name}: {name!r} is a {' and '.join(sorted(kinds))} method but {data}; "
                f"set options of a {task} method ({', '.join(methods_for(task))})"
            )
    if task == DETECTION:
        check_detection_recipe(recipe)
    return task


def check_detection_recipe(recipe: Any) -> None:
    """What a detection run needs beyond matching models and method (:func:`check_recipe`): a known
    detection method with valid options, and no classification-only setting."""
    from edgekd.detection.distill import DETECTION_METHODS, parse_detection_options
    from edgekd.errors import RecipeError

    spec = recipe.distill
    name = spec.method
    parse_detection_options(DETECTION_METHODS.get(name), name, spec.options.get(name, {}))
    for other, given in spec.options.items():
        if other != name:
            parse_detection_options(DETECTION_METHODS.get(other), other, given)
    unsupported = [
        ("distill.world_size", spec.world_size != 1, "1 (detection trains in one process)"),
        ("distill.label_fraction", spec.label_fraction < 1, "1.0 (detection methods need every box)"),
        ("distill.augment.enabled", spec.augment.enabled, "false (no detection augmentation yet)"),
    ]
    for field, refused, fix in unsupported:
        if refused:
            raise RecipeError(
                f"{field}={getattr_dotted(recipe, field)!r} is not available for the detection dataset "
                f"{recipe.data.name!r}; set {field}: {fix}"
            )


def getattr_dotted(obj: Any, dotted: str) -> Any:
    """``obj.a.b`` for ``"a.b"``."""
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def check_detector(
    role: str,
    name: str,
    checkpoint: Any,
    train_set: Any,
    meta: Any,
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """The preflight of a detection model: build the DETR ``name`` for the data, load ``checkpoint``
    (it must fit) and run it on two images; one line if any of it fails. Returns the model."""
    import torch

    from edgekd.detection.train import build_detector
    from edgekd.errors import DataError, ModelError, first_line
    from edgekd.models.checkpoint import load_weights

    model = build_detector(name, meta, role, kwargs)
    if checkpoint is not None:
        try:
            load_weights(model, checkpoint, name)
        except ModelError as exc:
            raise ModelError(f"{role}.checkpoint: {exc}") from None
    model.eval()
    try:
        with torch.no_grad():
            model(torch.from_numpy(train_set.images[:2]))
    except (RuntimeError, ValueError, AssertionError) as exc:
        size = "x".join(map(str, meta.input_shape))
        raise DataError(
            f"{meta.source}: images of shape {size} do not fit the {role} {name!r} "
            f"({first_line(exc)[:120]}); use larger images (data.image_size) or another model"
        ) from None
    return model
