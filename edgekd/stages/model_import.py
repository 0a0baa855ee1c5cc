"""Stage 1 of ``edgekd deploy``: the model trained elsewhere, taken as it is (no distillation).

The deployed model plays the student's part for every later stage. A PyTorch source (``edgekd:``,
``timm:``, ``torchvision:``, ``py:FILE:factory``, ``module:factory``) is built, its checkpoint loaded
and saved as ``student.pt`` like the distill stage does; an ONNX file (``onnx:FILE``) is checked with
``onnx.checker``, its batch axis made dynamic where it is fixed, and copied into the stage folder, from
which the export stage passes it on unchanged.

Data without labels: the FP32 model's own predictions on the train and held-out splits stand in as
labels (``labels.npz``), so every later accuracy is agreement with the FP32 model;
:class:`DeployContext` hands them to the later stages in place of the dataset's labels.
"""

from __future__ import annotations

import dataclasses
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from edgekd import atomic
from edgekd.errors import DataError, ExportError, ModelError, RecipeError, first_line
from edgekd.models.sources import ONNX_PREFIX, is_onnx
from edgekd.pipeline import RunContext, Stage, recipe_fields
from edgekd.recipe import Recipe

MODEL_FILE = "student.pt"
ONNX_FILE = "student.onnx"
LABELS_FILE = "labels.npz"
PREDICT_BATCH = 256


def onnx_file(name: str) -> Path:
    """The file an ``onnx:FILE`` source names (whether it exists is :func:`check_onnx_file`'s to say)."""
    return Path(name.removeprefix(ONNX_PREFIX))


def model_source(model: str | Path, role: str = "model") -> str:
    """A model argument as a model source (``edgekd deploy``'s MODEL, the Python API's ``teacher=``,
    ``student=`` and ``model=``): a bare ``*.onnx`` path (any case) is ``onnx:PATH``; a :class:`Path`
    must name an ``.onnx`` file; any other text is a source name, kept as it is."""
    if isinstance(model, Path):
        if model.suffix.lower() != ".onnx":
            raise RecipeError(
                f"{role}={str(model)!r}: a file must be an .onnx model; pass a model source name "
                "(e.g. timm:resnet18) with its checkpoint instead"
            )
        return ONNX_PREFIX + str(model)
    if not is_onnx(model) and model.lower().endswith(".onnx"):
        return ONNX_PREFIX + model
    return model


def student_stage(ctx: RunContext) -> str:
    """The stage whose outputs are the model to export and deploy: ``model`` in deploy, else ``distill``."""
    return "model" if "model" in ctx.results else "distill"


def unlabelled(meta: Any) -> bool:
    return not getattr(meta, "labelled", True)


# --- the ONNX file ---------------------------------------------------------------------------


def check_onnx_file(path: Path) -> Any:
    """The ONNX model at ``path`` after ``onnx.checker``; one-line errors for a missing or rejected file."""
    import onnx

    if not path.is_file():
        state = "is a directory" if path.is_dir() else "not found"
        raise ModelError(f"model file {path}: {state}; pass an existing .onnx file")
    try:
        onnx.checker.check_model(str(path), full_check=False)
        return onnx.load(str(path))
    except Exception as exc:  # the checker raises ValidationError, protobuf DecodeError, ...
        raise ExportError(
            f"{path}: onnx.checker rejects it ({first_line(exc, type(exc).__name__)[:200]}); "
            "export the model again (torch.onnx.export / your framework's exporter) and pass that file"
        ) from None


def _dims(value: Any) -> list[int | str]:
    return [
        dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "?")
        for dim in value.type.tensor_type.shape.dim
    ]


def graph_inputs(proto: Any) -> list[Any]:
    initializers = {init.name for init in proto.graph.initializer}
    return [value for value in proto.graph.input if value.name not in initializers]


def check_fits(proto: Any, path: Path, input_shape: tuple[int, ...], source: str) -> None:
    """One line when the ONNX model's (single) input cannot take the data's samples ``(B, *input_shape)``."""
    inputs = graph_inputs(proto)
    if len(inputs) != 1:
        names = ", ".join(value.name for value in inputs)
        raise DataError(f"{path} takes {len(inputs)} inputs ({names}); edgekd deploys models with one input")
    dims = _dims(inputs[0])
    wanted = ["batch", *input_shape]
    fixed_mismatch = len(dims) != len(wanted) or any(
        isinstance(have, int) and have > 0 and have != want
        for have, want in zip(dims[1:], input_shape, strict=False)
    )
    if fixed_mismatch:
        shown = "x".join(str(d) for d in dims)
        raise DataError(
            f"{path} takes inputs of shape {shown} but {source} gives samples of shape "
            f"B x {'x'.join(map(str, input_shape))}; use data that fits (e.g. data.image_size) or export "
            "the model for this input shape"
        )


def _dynamic_batch(proto: Any) -> bool:
    """Make the first axis of the input and outputs symbolic (``batch``); True if anything changed."""
    changed = False
    for value in [*graph_inputs(proto), *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"  # clears dim_value (a oneof)
            changed = True
    return changed


def _ort_logits(path: Path, x: np.ndarray, batch: int = PREDICT_BATCH) -> np.ndarray:
    """The ONNX model's first output on ``x`` with ONNX Runtime (CPU, edgekd's thread sizing)."""
    from edgekd.backends.onnxruntime import cpu_session

    session = cpu_session(path)
    name = session.get_inputs()[0].name
    out = [
        session.run(None, {name: np.ascontiguousarray(x[i : i + batch], dtype=np.float32)})[0]
        for i in range(0, len(x), batch)
    ]
    return np.concatenate(out)


def copy_onnx(source: Path, target: Path, sample: np.ndarray) -> dict[str, Any]:
    """Copy the user's ONNX into ``target`` (one file, atomically), batch axis made dynamic where fixed.

    ``sample`` (two inputs) proves the copy runs at a batch other than 1 and outputs logits (B, C).
    Returns what was done: ``{dynamic_batch_added, classes, opset, inputs, outputs}``.
    """
    import onnx

    proto = onnx.load(str(source))
    changed = _dynamic_batch(proto)
    with atomic.atomic_path(target) as tmp:
        if changed or any(
            init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer
        ):
            onnx.save_model(proto, str(tmp))
        else:
            shutil.copyfile(source, tmp)
        try:
            logits = _ort_logits(tmp, sample)
        except Exception as exc:
            why = first_line(exc, type(exc).__name__)[:200]
            hint = (
                "its batch axis is fixed and the graph depends on it: export it with a dynamic batch axis "
                "(torch.onnx.export(..., dynamic_shapes=...) or dynamic_axes={'input': {0: 'batch'}})"
                if changed
                else "check that it takes the data's inputs"
            )
            raise ExportError(
                f"{source}: ONNX Runtime cannot run it on a batch of {len(sample)} ({why}); {hint}"
            ) from None
        if logits.ndim != 2 or len(logits) != len(sample):
            raise ExportError(
                f"{source}: its first output has shape {list(logits.shape)} for a batch of {len(sample)}; "
                "edgekd deploys classifiers whose first output is logits (B, classes)"
            )
    opset = next((op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")), None)
    return {
        "dynamic_batch_added": changed,
        "classes": int(logits.shape[1]),
        "opset": opset,
        "inputs": [{"name": v.name, "shape": _dims(v)} for v in graph_inputs(proto)],
        "outputs": [{"name": v.name, "shape": _dims(v)} for v in proto.graph.output],
    }


def initializer_elements(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path))
    return int(sum(int(np.prod(init.dims)) for init in proto.graph.initializer))


# --- the PyTorch model -----------------------------------------------------------------------


def num_classes(meta: Any, role: str = "student") -> int:
    """Classes of the deployed PyTorch model: the data's; one line when unlabelled data names none."""
    if meta.classes:
        return len(meta.classes)
    raise DataError(
        f"{meta.source}: the data has no labels and names no classes, so the {role} model's output width "
        "is unknown; add a 'classes' array to the file, or deploy the model's ONNX export"
    )


def build_student(recipe: Recipe, meta: Any, classes: int | None = None) -> Any:
    """The recipe's student architecture for the data (factory kwargs and hint layers from the recipe)."""
    from edgekd.models import build_model

    spec = recipe.student
    return build_model(
        spec.model,
        num_classes=classes if classes is not None else num_classes(meta),
        in_channels=meta.input_shape[0],
        role="student",
        input_shape=tuple(meta.input_shape),
        kwargs=spec.kwargs,
        hint_layers=spec.hint_layers,
    )


def load_student(ctx: RunContext) -> Any:
    """The PyTorch model the student stage (distill, or model in deploy) saved, in eval mode."""
    from edgekd.models.checkpoint import load_weights

    stage = student_stage(ctx)
    _, _, meta = ctx.dataset
    if ctx.task == "detection":  # a DETR: built for the data's classes with task="detection"
        from edgekd.detection.train import build_detector

        model = build_detector(ctx.recipe.student.model, meta, "student", ctx.recipe.student.kwargs)
    else:
        model = build_student(ctx.recipe, meta)  # the stage's "model" is the recipe's student.model
    load_weights(model, ctx.path(stage, "model_file"), ctx.recipe.student.model)
    return model.eval()


def _torch_logits(model: Any, x: np.ndarray, batch: int = PREDICT_BATCH) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.concatenate(
            [
                model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch]))).numpy()
                for i in range(0, len(x), batch)
            ]
        )


def check_torch_model(recipe: Recipe, train_set: Any, meta: Any) -> None:
    """Preflight of a PyTorch source: build it, load its checkpoint (it must fit), run two samples."""
    from edgekd.models.checkpoint import load_weights

    model = build_student(recipe, meta)
    if recipe.student.checkpoint is not None:
        try:
            load_weights(model, recipe.student.checkpoint, recipe.student.model)
        except ModelError as exc:
            raise ModelError(f"--checkpoint: {exc}") from None
    model.eval()
    try:
        logits = _torch_logits(model, train_set.x[:2])
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise DataError(
            f"{meta.source}: samples of shape {tuple(meta.input_shape)} do not fit the model "
            f"{recipe.student.model!r} ({first_line(exc)[:120]}); use data that fits or another model"
        ) from None
    if logits.ndim != 2 or logits.shape[1] != num_classes(meta):
        raise ModelError(
            f"model {recipe.student.model!r} outputs shape {list(logits.shape)[1:]} per sample but the data "
            f"has {num_classes(meta)} classes; deploy a model with {num_classes(meta)} outputs or other data"
        )


# --- the stage -------------------------------------------------------------------------------


def _inputs(ctx: RunContext) -> list[Path]:
    from edgekd.models import model_source_files

    spec = ctx.recipe.student
    return [*model_source_files(spec.model), *([spec.checkpoint] if spec.checkpoint else [])]


def _save_labels(stage_dir: Path, train: np.ndarray, val: np.ndarray) -> str:
    path = stage_dir / LABELS_FILE
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, train=train.astype(np.int64), val=val.astype(np.int64))
    return LABELS_FILE


def _run(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    train_set, val_set, meta = ctx.dataset
    spec = ctx.recipe.student
    rel = lambda name: str((stage_dir / name).relative_to(ctx.run_dir))  # noqa: E731
    if is_onnx(spec.model):
        source = onnx_file(spec.model)
        info = copy_onnx(source, stage_dir / ONNX_FILE, train_set.x[:2])
        if meta.classes and info["classes"] != len(meta.classes):
            raise ModelError(
                f"{source} outputs {info['classes']} classes but the data has {len(meta.classes)}; "
                "deploy a model for these classes or other data"
            )
        predict = lambda x: _ort_logits(stage_dir / ONNX_FILE, x)  # noqa: E731
        outputs: dict[str, Any] = {
            "model_file": rel(ONNX_FILE),
            "onnx_file": rel(ONNX_FILE),
            "format": "onnx",
            "model": spec.model,
            "origin": str(source),
            "params": initializer_elements(stage_dir / ONNX_FILE),
            "flops": None,
            "classes": info["classes"],
            "onnx": info,
        }
        if info["dynamic_batch_added"]:
            ctx.log(f"  {source}: the batch axis was fixed; made it dynamic in the copy")
    else:
        from edgekd.models.checkpoint import load_weights, save_checkpoint
        from edgekd.models.stats import count_flops, count_parameters

        model = build_student(ctx.recipe, meta)
        if spec.checkpoint is not None:
            load_weights(model, spec.checkpoint, spec.model)
            origin = str(spec.checkpoint)
        else:
            origin = "untrained (no checkpoint given)"
            ctx.log(f"  warning: deploying {spec.model} with its initial weights: no --checkpoint was given")
        model.eval()
        save_checkpoint(stage_dir / MODEL_FILE, model, spec.model, {"data_fingerprint": meta.fingerprint})
        predict = lambda x: _torch_logits(model, x)  # noqa: E731
        outputs = {
            "model_file": rel(MODEL_FILE),
            "format": "pytorch",
            "model": spec.model,
            "origin": origin,
            "params": count_parameters(model),
            "flops": count_flops(model, meta.input_shape),
            "classes": num_classes(meta),
        }
    val_pred = predict(val_set.x).argmax(axis=1)
    if unlabelled(meta):
        train_pred = predict(train_set.x).argmax(axis=1)
        outputs["labels_file"] = rel(_save_labels(stage_dir, train_pred, val_pred))
        outputs["labels"] = "the FP32 model's own predictions (the data has no labels)"
        outputs["val_accuracy"] = None
        ctx.log("  no labels in the data: the FP32 model's predictions stand in (accuracy = agreement)")
    else:
        outputs["labels"] = "the data's labels"
        outputs["val_accuracy"] = round(float(np.mean(val_pred == val_set.y)), 5)
        ctx.log(f"  held-out accuracy of the model as given: {outputs['val_accuracy']:.4f}")
    return outputs


STAGE = Stage("model", _run, recipe_fields("seed", "data", "student", "mode"), _inputs)


# --- the context of a deploy run -------------------------------------------------------------


@dataclasses.dataclass
class DeployContext(RunContext):
    """A run context whose dataset, for data without labels, carries the FP32 model's predictions as
    labels once the model stage has made them (and the model's classes as the class names)."""

    @cached_property
    def source_dataset(self) -> tuple[Any, Any, Any]:
        from edgekd.data import build_dataset

        return build_dataset(self.recipe.data, seed=self.recipe.seed)

    @property
    def dataset(self) -> tuple[Any, Any, Any]:  # type: ignore[override]
        train, val, meta = self.source_dataset
        result = self.results.get("model")
        if not unlabelled(meta) or result is None or "labels_file" not in result.outputs:
            return train, val, meta
        key = result.outputs["labels_file"]
        cached = self.__dict__.get("_pseudo")
        if cached is None or cached[0] != key:
            with np.load(self.run_dir / key) as labels:
                train_y, val_y = labels["train"], labels["val"]
            classes = list(meta.classes) or [str(i) for i in range(int(result.outputs["classes"]))]
            labelled = (
                dataclasses.replace(train, y=train_y),
                dataclasses.replace(val, y=val_y),
                dataclasses.replace(meta, classes=classes),
            )
            self.__dict__["_pseudo"] = cached = (key, labelled)
        return cached[1]

    @dataset.setter
    def dataset(self, value: tuple[Any, Any, Any]) -> None:
        self.__dict__["source_dataset"] = value
