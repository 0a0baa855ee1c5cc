"""The Python API with objects: ``edgekd.compress(teacher=module, student=module, train=(x, y), ...)``.

The stages rebuild models by name and read data from files, so that a run resumes, caches and can be
bundled again later. Objects handed to the API are turned into exactly that, then the same stages as
the CLI run:

- an ``nn.Module`` is registered in this process as the model source ``object:<Class>-<digest>`` (the
  digest hashes its class's source code and its architecture, ``repr(module)``), and its weights are
  written to ``<run>/inputs/<role>.safetensors``, which becomes the role's checkpoint: a teacher
  handed over as an object is taken as trained (it is not trained again), a student object gives the
  student's initial weights;
- arrays ``(x, y)`` or ``(x, y, groups)`` and torch ``Dataset``\\ s yielding ``(x, y)`` pairs are
  written to ``<run>/inputs/data.npz`` and read by the ``npz`` source (``train`` alone is split by
  ``data.val_fraction``; with ``val`` it is the split).

Unchanged objects write byte-identical files, so a second call reuses every finished stage; changed
weights or data rerun what depends on them. The object's module source is only valid in this
process: a later ``edgekd bundle`` on the run works from its files, but rerunning a stage that builds
the model needs the object again (call the API again).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekd import atomic
from edgekd.errors import DataError, ModelError, RecipeError

OBJECT_PREFIX = "object:"
INPUTS_DIR = "inputs"
_OBJECTS: dict[str, nn.Module] = {}  # object:<Class>-<digest> -> the module handed to the API


def register_module(module: nn.Module, role: str) -> str:
    """The model-source name of ``module`` (registered in this process); a ModelError if not a module."""
    if not isinstance(module, nn.Module):
        raise ModelError(
            f"{role}: expected a torch.nn.Module, a model name or a file, got {type(module).__name__}"
        )
    cls = type(module)
    try:
        code = inspect.getsource(cls)
    except (OSError, TypeError):  # defined interactively: its architecture text stands for it
        code = f"{cls.__module__}.{cls.__qualname__}"
    digest = hashlib.sha256(f"{code}\n{module!r}".encode()).hexdigest()[:12]
    name = f"{OBJECT_PREFIX}{cls.__name__}-{digest}"
    _OBJECTS[name] = module
    return name


def object_factory(name: str) -> Callable[..., nn.Module]:
    """A factory returning a copy of the registered module ``name`` (its weights come from the checkpoint)."""
    module = _OBJECTS.get(name)
    if module is None:
        raise ModelError(
            f"model {name!r} was handed to the Python API in another process; call edgekd.compress or "
            "edgekd.deploy with the module again to rerun the stages that build it"
        )

    def build(num_classes: int, **_: Any) -> nn.Module:
        return copy.deepcopy(module).cpu()

    return build


def write_weights(module: nn.Module, file: Path) -> Path:
    """``module``'s state dict as safetensors at ``file`` (atomic; byte-identical for identical weights)."""
    from safetensors.torch import save

    state = {key: value.detach().cpu().contiguous().clone() for key, value in module.state_dict().items()}
    atomic.write_bytes(file, save(state))
    return file


def _as_arrays(split: Any, name: str) -> tuple[np.ndarray, ...]:
    """``x``, ``(x, y)``, ``(x, y, groups)`` (numpy arrays or tensors) or a torch Dataset of (x, y) items."""
    if isinstance(split, torch.utils.data.Dataset) and not isinstance(split, tuple):
        if not hasattr(split, "__len__"):
            raise DataError(f"{name}: an iterable Dataset has no length; pass a map-style Dataset or arrays")
        items = [split[index] for index in range(len(split))]
        if not items or not all(isinstance(item, (tuple, list)) and len(item) >= 2 for item in items[:1]):
            raise DataError(
                f"{name}: a Dataset must yield (x, y) pairs; its first item is {type(items[0]).__name__}"
            )
        columns = list(zip(*[item[:2] for item in items], strict=True))
        return tuple(np.stack([np.asarray(value) for value in column]) for column in columns)
    if isinstance(split, (np.ndarray, torch.Tensor)):
        split = (split,)  # inputs without labels
    if isinstance(split, (tuple, list)) and len(split) in (1, 2, 3):
        return tuple(
            value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            for value in split
        )
    raise DataError(
        f"{name}: expected x, (x, y), (x, y, groups) or a torch Dataset, got {type(split).__name__}"
    )


def write_data(file: Path, train: Any, val: Any = None, classes: list[str] | None = None) -> Path:
    """``train`` (and ``val``) as the npz file the ``npz`` source reads; returns ``file``."""
    arrays: dict[str, np.ndarray] = {}
    splits = {"train": train, "val": val} if val is not None else {"": train}
    for split, value in splits.items():
        suffix = f"_{split}" if split else ""
        x, *labels = _as_arrays(value, split or "train")
        arrays[f"x{suffix}"] = x
        if labels:
            arrays[f"y{suffix}"] = labels[0]
        if len(labels) == 2:
            arrays[f"groups{suffix}"] = labels[1]
    if classes is not None:
        arrays["classes"] = np.asarray([str(label) for label in classes])
    atomic.write_bytes(file, npz_bytes(arrays))
    return file


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` archive of ``arrays`` whose bytes depend only on the arrays (``np.savez`` stamps the
    time into each member, so equal data would hash differently on every call)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, value in arrays.items():
            member = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(member, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.asanyarray(value), allow_pickle=False)
    return buffer.getvalue()


@dataclass
class Result:
    """What a run gave: its report (``report.json``'s content) and where its files are."""

    report: dict[str, Any]
    run_dir: Path

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Every measured model (teacher, student, each artifact) with latency, size and accuracy."""
        return self.report["rows"]

    @property
    def deployed(self) -> dict[str, Any]:
        """The row of the deployed model (the fastest artifact measured here)."""
        name = self.report["headline"]["deployed"]
        return next((row for row in self.rows if row["name"] == name), self.rows[-1])

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy of the deployed model on the held-out split (agreement with FP32 without labels)."""
        return self.deployed["accuracy"]["accuracy"]

    @property
    def latency_ms(self) -> float:
        """Median latency of the deployed model at the profile batch size, in milliseconds."""
        return self.deployed["latency"]["p50_ms"]

    @property
    def artifact(self) -> Path | None:
        """The deployed artifact's file (None when only the PyTorch model was measured)."""
        artifact = self.deployed.get("artifact")
        return None if artifact is None else self.run_dir / artifact

    @property
    def bundle_dir(self) -> Path:
        """The firmware bundle's directory (``edgekd verify-bundle`` checks it)."""
        return self.run_dir / self.report["bundle"]

    @property
    def report_file(self) -> Path:
        return self.run_dir / "report.json"

    def __repr__(self) -> str:
        return (
            f"Result(run_dir={str(self.run_dir)!r}, deployed={self.deployed['name']!r}, "
            f"accuracy={self.accuracy:.4f}, latency_ms={self.latency_ms:.3f})"
        )


def model_argument(value: Any, role: str, inputs: Path) -> tuple[str, Path | None]:
    """(model source name, checkpoint or None) for a module object, a source name or a file path (the
    path rule is :func:`edgekd.stages.model_import.model_source`'s)."""
    from edgekd.stages.model_import import model_source

    if isinstance(value, nn.Module):
        return register_module(value, role), write_weights(value, inputs / f"{role}.safetensors")
    if isinstance(value, (str, Path)):
        return model_source(value, role), None
    raise ModelError(
        f"{role}: expected an nn.Module, a model source name (e.g. timm:resnet18) or an .onnx path, "
        f"got {type(value).__name__}"
    )


def _recipe(recipe: Any, overrides: list[str] | None, flags: dict[str, Any]) -> Any:
    """A new recipe: ``recipe`` (a Recipe, a YAML path or None for the default) with the API's keyword
    flags and then ``overrides`` applied (a Recipe handed in is copied, never changed)."""
    from edgekd.recipe import Recipe, apply_overrides, build_recipe, load_recipe

    sets = [f"{field}={value}" for field, value in flags.items() if value is not None] + list(overrides or [])
    if isinstance(recipe, Recipe):
        return build_recipe(apply_overrides(recipe.model_dump(mode="json"), sets), "recipe")
    return load_recipe(Path(recipe) if recipe is not None else None, sets)


def _use_model(recipe: Any, section: str, value: Any) -> None:
    """Point ``recipe.<section>`` at ``value`` (a module object, a source name or an .onnx path)."""
    name, checkpoint = model_argument(value, section, recipe.run_dir / INPUTS_DIR)
    spec = getattr(recipe, section)
    spec.model = name
    if checkpoint is not None:
        spec.checkpoint = checkpoint


def _use_data(recipe: Any, train: Any, val: Any, classes: list[str] | None) -> None:
    if train is None:
        if val is not None or classes is not None:
            raise DataError("val= and classes= come with train=: pass the training arrays or Dataset too")
        return
    file = write_data(recipe.run_dir / INPUTS_DIR / "data.npz", train, val, classes)
    recipe.data.name, recipe.data.path = "npz", file


def compress(
    recipe: Any = None,
    *,
    teacher: Any = None,
    student: Any = None,
    train: Any = None,
    val: Any = None,
    classes: list[str] | None = None,
    data: str | None = None,
    target: str | None = None,
    method: str | None = None,
    name: str | None = None,
    epochs: int | None = None,
    overrides: list[str] | None = None,
    force: set[str] | None = None,
    until: str | None = None,
    log: Callable[[str], None] = print,
) -> Result | dict[str, Any]:
    """Distil ``student`` from ``teacher`` on ``train``/``val``, deploy it to ``target``; a :class:`Result`.

    ``teacher``/``student``: an ``nn.Module`` (a teacher object is taken as trained; a student
    object's weights are its starting point), a model source name (``timm:resnet18``,
    ``py:my.py:small``, ``onnx:teacher.onnx`` for the teacher) or None for the recipe's.
    ``train``/``val``: ``(x, y)``, ``(x, y, groups)`` (numpy arrays or tensors) or a torch Dataset of
    ``(x, y)`` pairs; or ``data``, a dataset name or ``npz:FILE``. ``overrides`` are ``FIELD=VALUE``
    strings as ``--set`` takes them. The CLI's ``edgekd compress`` runs the same stages. With
    ``until``, the stages' outputs so far (a dict) instead of a Result.
    """
    from edgekd.api import compress as run

    objects_given = any(value is not None for value in (teacher, student, train))
    flags = {
        "target": target,
        "distill.method": method,
        "teacher.train.epochs": epochs,
        "distill.train.epochs": epochs,
        "name": name or ("python-api" if objects_given and recipe is None else None),
        # named before the recipe is built, so that its default (shipped) teacher is dropped for them
        "teacher.model": teacher if isinstance(teacher, str) else None,
        "data.name": data or ("npz" if train is not None else None),
    }
    resolved = _recipe(recipe, overrides, flags)
    if teacher is not None:
        _use_model(resolved, "teacher", teacher)
    if student is not None:
        _use_model(resolved, "student", student)
    _use_data(resolved, train, val, classes)
    report = run(resolved, force=force, until=until, log=log)
    return report if until is not None else Result(report, resolved.run_dir)


def _classes_without_labels(model: nn.Module, train: Any) -> list[str] | None:
    """For inputs without labels: class names "0".."C-1" from the module's output width on one sample."""
    arrays = _as_arrays(train, "train")
    if len(arrays) > 1:
        return None  # labelled: the npz source names the classes
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            width = model(torch.as_tensor(arrays[0][:1], dtype=torch.float32)).shape[-1]
    finally:
        model.train(was_training)
    return [str(index) for index in range(int(width))]


def deploy(
    model: Any,
    *,
    target: str | None = None,
    data: str | None = None,
    train: Any = None,
    val: Any = None,
    classes: list[str] | None = None,
    checkpoint: Path | str | None = None,
    recipe: Any = None,
    name: str | None = None,
    overrides: list[str] | None = None,
    force: set[str] | None = None,
    until: str | None = None,
    log: Callable[[str], None] = print,
) -> Result | dict[str, Any]:
    """Deploy ``model`` as it is (no distillation) to ``target``; a :class:`Result`.

    ``model``: an ``nn.Module`` (its current weights are deployed), an ``.onnx`` path, or a model
    source name with its ``checkpoint``. Data as for :func:`compress` (``train`` gives the calibration
    set, ``val`` the evaluation set; labels may be left out: ``(x,)`` or ``x`` alone, and agreement
    with the FP32 model stands for accuracy). ``edgekd deploy`` runs the same stages.
    """
    from edgekd.api import deploy as run
    from edgekd.api import deploy_run_name
    from edgekd.stages.model_import import model_source

    if isinstance(model, nn.Module):
        default_name = type(model).__name__.lower()
    elif isinstance(model, (str, Path)):
        default_name = deploy_run_name(model_source(model, "model"))
    else:
        raise RecipeError(
            f"model: expected an nn.Module, an .onnx path or a model source name, got {type(model).__name__}"
        )
    flags = {"target": target, "data.name": data, "name": name or (default_name if recipe is None else None)}
    resolved = _recipe(recipe, overrides, flags)
    source, weights = model_argument(model, "student", resolved.run_dir / INPUTS_DIR)
    if classes is None and isinstance(model, nn.Module) and train is not None:
        classes = _classes_without_labels(model, train)
    _use_data(resolved, train, val, classes)
    report = run(source, checkpoint=weights or checkpoint, recipe=resolved, force=force, until=until, log=log)
    return report if until is not None else Result(report, resolved.run_dir)
