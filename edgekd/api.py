"""The library entry points behind the CLI: ``compress`` runs the whole pipeline for one target."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgekd.errors import RecipeError
from edgekd.pipeline import RunContext, run_stages
from edgekd.recipe import Recipe, load_recipe
from edgekd.stages import PIPELINE, STAGE_NAMES, pipeline_for
from edgekd.targets import resolve_target

#: The backends a detection run compiles for (the others, e.g. LiteRT for microcontrollers, have no
#: detection export, evaluation or post-processing path).
DETECTION_BACKENDS = ("onnxruntime", "openvino", "tensorrt")


def check_names(recipe: Recipe) -> None:
    """The cheap part of :func:`preflight`: the target, model and method names and options, and the
    runtime (or engine options) of the target's backend (:class:`BackendUnavailable` when missing)."""
    from edgekd.backends import BACKENDS, get_backend
    from edgekd.distill.methods import METHODS, parse_options
    from edgekd.models.sources import check_model_sources

    target = resolve_target(recipe.target)
    check_model_sources(recipe)  # every source resolves; onnx: only as a teacher, without hint maps
    from edgekd.tasks import DETECTION, check_recipe

    detection = check_recipe(recipe) == DETECTION  # models, method and options fit the data's task
    if detection and target.backend not in DETECTION_BACKENDS:
        raise RecipeError(
            f"target {target.name} ({target.backend}) cannot run a DETR detector; detection runs on "
            f"{', '.join(DETECTION_BACKENDS)} targets: choose --target x86-ort, x86-openvino or a jetson"
        )
    method = METHODS.get("none" if detection else recipe.distill.method)
    for name in [] if detection else recipe.distill.options:
        parse_options(METHODS.get(name), recipe.distill, name)
    if recipe.distill.label_fraction < 1 and not method.supports_missing_labels:
        semi = ", ".join(name for name in METHODS.names() if METHODS.get(name).supports_missing_labels)
        raise RecipeError(
            f"distill.label_fraction={recipe.distill.label_fraction}: method {recipe.distill.method!r} "
            f"needs every label; use one of {semi} or set distill.label_fraction: 1.0"
        )
    backend = BACKENDS.get(target.backend)
    if recipe.quantize.mode == "qad" and getattr(backend, "converts_from_torch", False):
        raise RecipeError(
            f"quantize.mode = qad is not available for target {target.name}: its backend "
            f"{target.backend!r} converts the PyTorch student with its own INT8 quantiser; "
            "set quantize.mode: ptq"
        )
    if backend.builds_without_runtime:
        # Builds on the device: without the runtime here the compile stage still writes the bundle.
        from edgekd.stages.device_build import engine_options

        engine_options(recipe, target)
    else:
        get_backend(target.backend)  # a missing runtime stops the run now, with its install hint


def preflight(recipe: Recipe, ctx: RunContext | None = None, until: str | None = None) -> RunContext:
    """Fail in seconds, before any training, on anything named in the recipe that cannot work.

    Checks, in order: :func:`check_names`; the device address and its SSH files; every checkpoint
    (exists, is readable, holds tensors); then it builds the dataset (data files, their contents,
    sizes that cannot fit in memory, at least two classes), builds the teacher and student on it,
    loads their checkpoints (they must fit) and runs each on two samples (inputs too small for a
    model's pooling); and the calibration set's size. Only what the stages up to ``until`` use is
    checked. The dataset is built into ``ctx`` (a new context when None), which is returned so the
    run reuses it.
    """
    from edgekd.models.checkpoint import load_checkpoint

    stages = STAGE_NAMES if until is None else STAGE_NAMES[: STAGE_NAMES.index(until) + 1]
    check_names(recipe)
    check_builtin_teacher(recipe)
    if {"teacher", "distill"} & set(stages):  # distill.accelerator: cuda needs a CUDA device here
        from edgekd import accelerator, distributed

        accelerator.check(recipe, distributed.processes_per_node(recipe))
    if "remote" in stages:
        _check_device(recipe)
    roles = [("teacher", recipe.teacher)] + ([("student", recipe.student)] if "distill" in stages else [])
    for role, spec in roles:
        if spec.checkpoint is not None:  # exists, readable, tensors only: before the dataset is built
            with _field(f"{role}.checkpoint"):
                load_checkpoint(spec.checkpoint)
    ctx = ctx or RunContext(recipe=recipe, run_dir=recipe.run_dir)
    train_set, _, meta = ctx.dataset  # built now: a bad data file fails here, before any training
    built = {
        role: _check_model(role, spec.model, spec.checkpoint, train_set, meta, spec.kwargs, spec.hint_layers)
        for role, spec in roles
    }
    if "student" in built and meta.task != "detection":  # what the method needs (e.g. dmae: a ViT student)
        from edgekd.distill.methods import METHODS

        method = recipe.distill.method
        METHODS.get(method).check_models(method, built["student"], built["teacher"])
    _check_calibration(recipe, stages, train_set, meta)
    return ctx


def _check_calibration(recipe: Recipe, stages: list[str], train_set: Any, meta: Any) -> None:
    """INT8 calibration (when a stage up to ``--until`` quantises) has enough frames to draw from."""
    target = resolve_target(recipe.target)
    quantize = recipe.quantize
    if quantize.enabled and "int8" in target.precisions and {"quantize", "compile"} & set(stages):
        from edgekd.errors import QuantizeError

        if quantize.calibration_samples < quantize.min_calibration_samples:
            raise QuantizeError(
                f"quantize.calibration_samples = {quantize.calibration_samples} is below "
                f"quantize.min_calibration_samples = {quantize.min_calibration_samples}; "
                "raise quantize.calibration_samples"
            )
        if len(train_set) < quantize.min_calibration_samples:
            raise QuantizeError(
                f"{meta.source}: the train split has {len(train_set)} frames, fewer than the "
                f"quantize.min_calibration_samples = {quantize.min_calibration_samples} INT8 calibration "
                "needs; use more data, lower quantize.min_calibration_samples or set quantize.enabled: false"
            )


def check_builtin_teacher(recipe: Recipe) -> None:
    """A shipped teacher (``builtin:NAME``) fits only the model and data its JSON names
    (:func:`edgekd.teachers.task_of`); for another task, one line."""
    from edgekd import teachers

    name = teachers.shipped_name(recipe.teacher.checkpoint)
    differs = None if name is None else teachers.mismatch(name, recipe.teacher.model, recipe.data.name)
    if differs is not None:
        field, value, have = differs
        raise RecipeError(
            f"teacher.checkpoint {teachers.PREFIX}{name} is the shipped teacher for {field}={value}, not "
            f"{have}; set teacher.checkpoint: null (--set teacher.checkpoint=null) to train a teacher on "
            "your data, or pass your own"
        )


@contextmanager
def _field(name: str) -> Iterator[None]:
    """Prefix a checkpoint's :class:`ModelError` with the recipe field that named the file."""
    from edgekd.errors import ModelError

    try:
        yield
    except ModelError as exc:
        raise ModelError(f"{name}: {exc}") from None


def _check_device(recipe: Recipe) -> None:
    """The SSH device's address (``--device`` or the target's) and the files given for it."""
    from edgekd.errors import DeviceError
    from edgekd.profile.remote import DeviceAddress
    from edgekd.stages.remote import device_host

    host = device_host(recipe)
    if host is None:
        return
    target = resolve_target(recipe.target)
    if target.mcu is not None:
        raise DeviceError(
            f"device {host}: target {target.name} is a microcontroller, which edgekd does not reach over "
            "SSH (a board over a serial runner is a later step; the cycle figure is an estimate): drop "
            "--device / device.host"
        )
    DeviceAddress.parse(host)
    for field, path in (
        ("device.known_hosts", recipe.device.known_hosts),
        ("device.identity_file", recipe.device.identity_file),
    ):
        if path is not None and not Path(path).expanduser().is_file():
            state = "is a directory" if Path(path).expanduser().is_dir() else "not found"
            raise DeviceError(f"{field} {path}: {state}; pass an existing file or leave {field} unset")


def _check_model(
    role: str,
    name: str,
    checkpoint: Path | None,
    train_set: Any,
    meta: Any,
    kwargs: dict[str, Any] | None = None,
    hint_layers: list[str] | None = None,
) -> Any:
    """Build ``name`` for the dataset, load ``checkpoint`` into it (it must fit) and run two samples;
    return the model.

    ``kwargs`` and ``hint_layers`` are the recipe section's; an ONNX teacher's input shape is checked
    against the data's as it is built."""
    import torch

    if meta.task == "detection":  # a DETR on images with boxes (edgekd.tasks)
        from edgekd.tasks import check_detector

        return check_detector(role, name, checkpoint, train_set, meta, kwargs)

    from edgekd.errors import DataError, first_line
    from edgekd.models import build_model
    from edgekd.models.checkpoint import load_weights

    shape = tuple(meta.input_shape)
    # pretrained=False: the architecture is what matters here; the stage fetches hub weights itself.
    model = build_model(
        name,
        len(meta.classes),
        shape[0],
        role=role,
        input_shape=shape,
        kwargs=kwargs,
        hint_layers=hint_layers,
    )
    if checkpoint is not None:
        with _field(f"{role}.checkpoint"):
            load_weights(model, checkpoint, name)
    model.eval()
    try:
        with torch.no_grad():
            model(torch.from_numpy(train_set.x[:2]))
    except (RuntimeError, ValueError, AssertionError) as exc:
        what = "frames of length" if len(shape) == 2 else "images of shape"
        size = shape[-1] if len(shape) == 2 else "x".join(map(str, shape))
        raise DataError(
            f"{meta.source}: {what} {size} do not fit the {role} {name!r} ({first_line(exc)[:120]}); "
            "use larger inputs (data.frame_length, data.image_size or another file) or another model"
        ) from None
    return model


def compress(
    recipe: Recipe | Path | str | None = None,
    overrides: list[str] | None = None,
    force: set[str] | None = None,
    until: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the pipeline (optionally only up to stage ``until``) and return the report, or the last results.

    ``recipe`` is a Recipe, a YAML path, or None for the built-in default radio recipe.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(Path(recipe) if recipe is not None else None, overrides or [])
    if recipe.mode == "deploy":  # a recipe of an edgekd deploy run: its stages, its checks
        return _run_deploy(recipe, force, until, log)
    if until is not None and until not in STAGE_NAMES:
        raise RecipeError(f"--until {until!r}: no such stage; stages are {', '.join(STAGE_NAMES)}")
    stages = PIPELINE if until is None else PIPELINE[: STAGE_NAMES.index(until) + 1]
    ctx = preflight(recipe, RunContext(recipe=recipe, run_dir=recipe.run_dir, log=log), until)
    results = run_stages(ctx, stages, force=force)
    if "report" in results:
        return json.loads(
            (ctx.run_dir / results["report"].outputs["report_file"]).read_text(encoding="utf-8")
        )
    return {name: result.outputs for name, result in results.items()}


def finished_run(run_dir: Path, until: str) -> RunContext:
    """The context of a finished run: its recipe (from report.json) and its stages' records up to ``until``.

    Records are read as they are (no fingerprint check), so a command on a finished run never
    retrains; but each stage's output files must still have the SHA-256 its ``stage.json``
    recorded. A damaged ``report.json``, ``stage.json`` or output file is one line naming it and
    what to do.
    """
    from edgekd.errors import OutputError, first_line
    from edgekd.pipeline import STAGE_FILE, StageResult, read_record, stage_dir_name, verify_outputs
    from edgekd.recipe import build_recipe

    report_file = run_dir / "report.json"
    if not report_file.is_file():
        raise RecipeError(f"{run_dir} has no report.json; finish the run first with edgekd compress")
    try:
        report = json.loads(report_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: invalid JSON or UTF-8, e.g. truncated
        raise OutputError(
            f"{report_file} is unreadable ({type(exc).__name__}: {first_line(exc)}); it is truncated or "
            "damaged: rerun edgekd compress for this run (with --force report) to rewrite it"
        ) from None
    if not isinstance(report, dict) or not isinstance(report.get("recipe"), dict):
        raise OutputError(
            f"{report_file} holds no recipe; it is damaged: rerun edgekd compress for this run "
            "(with --force report) to rewrite it"
        )
    recipe = build_recipe(report["recipe"], str(report_file))
    stages = pipeline_for(recipe)
    names = [stage.name for stage in stages]
    ctx = _context(recipe, run_dir)
    for index, stage in enumerate(stages[: names.index(until)], start=1):
        stage_dir = run_dir / stage_dir_name(index, stage)
        record_file = stage_dir / STAGE_FILE
        if not record_file.is_file():
            _refuse_old_layout(run_dir, recipe.mode, stage.name, stage_dir)
            raise RecipeError(f"{run_dir}: stage {stage.name} has not finished ({record_file} is missing)")
        record, why = read_record(record_file)
        why = f"{STAGE_FILE} {why}" if record is None else verify_outputs(record, run_dir, stage_dir)
        if record is None or why is not None:
            raise OutputError(
                f"{run_dir}: stage {stage.name} ({stage_dir.name}): {why}; rerun edgekd compress for this "
                "run: it reruns that stage and keeps the others"
            )
        ctx.results[stage.name] = StageResult(
            stage.name, record["outputs"], record["fingerprint"], record["wall_s"], True, record_file
        )
    return ctx


def _refuse_old_layout(run_dir: Path, mode: str, stage: str, stage_dir: Path) -> None:
    """One line when the run's folders follow an older stage order (before profile moved ahead of
    bundle, ``06-bundle/`` and ``07-profile/``): the stage's folder is missing, under another number."""
    from edgekd.errors import OutputError

    elsewhere = sorted(p.name for p in run_dir.glob(f"[0-9][0-9]-{stage}") if p.is_dir())
    if elsewhere:
        raise OutputError(
            f"{run_dir} was made by an older edgekd whose stages ran in another order ({elsewhere[0]}/ "
            f"where this one reads {stage_dir.name}/); rerun the edgekd {mode} command that made it with "
            f"--force {stage}: it redoes that stage and the ones after it and keeps the others"
        )


def _context(recipe: Recipe, run_dir: Path, log: Callable[[str], None] = print) -> RunContext:
    """The run context of the recipe's mode (deploy: unlabelled data takes the FP32 model's predictions)."""
    from edgekd.stages.model_import import DeployContext

    kind = DeployContext if recipe.mode == "deploy" else RunContext
    return kind(recipe=recipe, run_dir=run_dir, log=log)


def deploy_preflight(recipe: Recipe, ctx: RunContext, until: str | None = None) -> RunContext:
    """:func:`preflight` for ``edgekd deploy``: fail in seconds on anything that cannot work.

    Checks, in order: the target and its backend's runtime; the model source (an ONNX file must exist
    and pass ``onnx.checker``; a PyTorch source must be known) and its checkpoint; the device; then it
    builds the dataset, checks that the model takes its samples (an ONNX input shape, or a forward
    pass of the PyTorch model with its checkpoint loaded on two samples, with one output per class)
    and the calibration set's size.
    """
    from edgekd.models.checkpoint import load_checkpoint
    from edgekd.stages import DEPLOY_STAGE_NAMES
    from edgekd.stages import model_import as imported

    names = DEPLOY_STAGE_NAMES
    stages = names if until is None else names[: names.index(until) + 1]
    _refuse_detection(recipe)
    _check_backend(recipe)
    spec = recipe.student
    proto = None
    if imported.is_onnx(spec.model):
        proto = imported.check_onnx_file(imported.onnx_file(spec.model))  # before anything else
        if spec.checkpoint is not None:
            raise RecipeError(
                f"--checkpoint {spec.checkpoint}: an ONNX model carries its weights; drop --checkpoint"
            )
    else:
        from edgekd.models import model_factory

        model_factory(spec.model)
        if spec.checkpoint is not None:
            with _field("--checkpoint"):
                load_checkpoint(spec.checkpoint)
    if "remote" in stages:
        _check_device(recipe)
    train_set, _, meta = ctx.dataset
    if proto is not None:
        imported.check_fits(proto, imported.onnx_file(spec.model), tuple(meta.input_shape), meta.source)
    else:
        imported.check_torch_model(recipe, train_set, meta)
    _check_calibration(recipe, stages, train_set, meta)
    return ctx


def _refuse_detection(recipe: Recipe) -> None:
    """``edgekd deploy`` takes classifiers only: a detector (DETR checkpoint or ONNX) on detection data
    goes through ``edgekd compress``, which starts the student from the user's weights."""
    from edgekd.tasks import DETECTION, task_of

    if task_of(recipe.data.name) != DETECTION:
        return
    data = recipe.data.name
    raise RecipeError(
        f"edgekd deploy: --data {data} is a detection dataset, and deploy takes classifiers only (a DETR "
        f"deployed as it is is not supported yet); run `edgekd compress --data {data} --student "
        f"edgekd:detr-mnv3 --set student.checkpoint=YOUR.pt` instead (distillation starts from your weights)"
    )


def _check_backend(recipe: Recipe) -> None:
    """The target exists and its backend's runtime is here (or, for device builds, its engine options)."""
    from edgekd.backends import BACKENDS, get_backend

    target = resolve_target(recipe.target)
    if BACKENDS.get(target.backend).builds_without_runtime:
        from edgekd.stages.device_build import engine_options

        engine_options(recipe, target)
    else:
        get_backend(target.backend)


def _run_deploy(
    recipe: Recipe, force: set[str] | None, until: str | None, log: Callable[[str], None]
) -> dict[str, Any]:
    from edgekd.stages import DEPLOY_PIPELINE, DEPLOY_STAGE_NAMES

    if until is not None and until not in DEPLOY_STAGE_NAMES:
        raise RecipeError(f"--until {until!r}: no such stage; stages are {', '.join(DEPLOY_STAGE_NAMES)}")
    stages = DEPLOY_PIPELINE if until is None else DEPLOY_PIPELINE[: DEPLOY_STAGE_NAMES.index(until) + 1]
    ctx = deploy_preflight(recipe, _context(recipe, recipe.run_dir, log), until)
    results = run_stages(ctx, stages, force=force)
    if "report" in results:
        return json.loads(
            (ctx.run_dir / results["report"].outputs["report_file"]).read_text(encoding="utf-8")
        )
    return {name: result.outputs for name, result in results.items()}


def deploy(
    model: str | Path,
    target: str | None = None,
    data: str | None = None,
    checkpoint: Path | str | None = None,
    recipe: Recipe | Path | str | None = None,
    overrides: list[str] | None = None,
    force: set[str] | None = None,
    until: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Deploy a model trained elsewhere (no distillation): export, quantise, compile, profile, bundle, report.

    ``model`` is an ONNX file (``*.onnx`` or ``onnx:FILE``) or any model source (``edgekd:``, ``timm:``,
    ``torchvision:``, ``py:FILE:factory``, ``module:factory``) whose weights are ``checkpoint``. It
    becomes the recipe's ``student.model`` with ``mode: deploy``; the run is named after the model
    file's stem unless ``name=`` is among ``overrides``. Returns the report (or, with ``until``, the
    finished stages' outputs), like :func:`compress`.
    """
    from edgekd.recipe import apply_overrides, build_recipe
    from edgekd.stages.model_import import model_source

    source = model_source(str(model))
    if isinstance(recipe, Recipe):
        base, where = recipe.model_dump(mode="json"), "recipe"
    else:
        path = Path(recipe) if recipe is not None else None
        base, where = load_recipe(path).model_dump(mode="json"), str(path or "deploy")
    # The arguments first (set as values, never parsed), then the overrides, so an explicit --set wins.
    base["mode"] = "deploy"
    base["student"]["model"] = source
    if checkpoint is not None:
        base["student"]["checkpoint"] = str(checkpoint)
    if target is not None:
        base["target"] = target
    if data is not None:
        base["data"]["name"], base["data"]["path"] = data, None
    if recipe is None:
        base["name"] = deploy_run_name(source)
    resolved = build_recipe(apply_overrides(base, overrides or []), where)
    return _run_deploy(resolved, force, until, log)


def deploy_run_name(source: str) -> str:
    """The default run name of a deploy: the model file's stem (``py:``/``onnx:``), else the model's name."""
    from edgekd.stages.model_import import is_onnx, onnx_file

    if is_onnx(source):
        stem = onnx_file(source).stem
    elif source.startswith("py:"):
        stem = Path(source[3:].rpartition(":")[0]).stem
    else:
        stem = source.rpartition(":")[2].replace("/", "-")
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).lstrip(".")
    return cleaned or "deploy"


def bundle(run_dir: Path | str, target: str | None = None, precision: str | None = None) -> Path:
    """Write the bundle of a finished run (see :mod:`edgekd.bundle.build`); returns its directory."""
    from edgekd.bundle.build import deployment_decision, write_decided_bundle

    ctx = finished_run(Path(run_dir), "bundle")
    if target is not None and resolve_target(target).name != ctx.target.name:
        raise RecipeError(
            f"{run_dir} was compiled for target {ctx.target.name}, not {target}; "
            f"run edgekd compress --target {target} for that one"
        )
    if precision is not None and precision not in ("fp32", "fp16", "int8"):
        raise RecipeError(f"--artifact {precision!r}: expected fp32, fp16 or int8")
    decision = deployment_decision(ctx, precision)
    directory = write_decided_bundle(ctx, decision)
    report_follows(Path(run_dir), decision)
    return directory


def report_follows(run_dir: Path, decision: dict[str, Any]) -> bool:
    """Make ``report.json`` and ``report.md`` name the deployment ``decision`` the bundle now embeds
    (``edgekd bundle --artifact`` re-pins it): the report's ``deployment`` and ``headline`` are
    rewritten from its own rows, the rest is kept. False when the report already names it.

    A later ``edgekd compress`` of the run sees the bundle and report changed and rewrites both from
    the recipe's decision, so the two always agree.
    """
    from edgekd import atomic
    from edgekd.report.build import detection_headline, headline
    from edgekd.report.markdown import render_markdown

    report_file = run_dir / "report.json"
    report = json.loads(report_file.read_text(encoding="utf-8"))  # read and checked by finished_run
    if report.get("deployment") == json.loads(json.dumps(decision)):  # as report.json holds it
        return False
    report["deployment"] = decision
    rows = [row for row in report["rows"] if "measured_on" not in row]  # as the report stage: host rows
    report["headline"] = headline(
        rows, report.get("not_measured") or [], deploy=report.get("mode") == "deploy", deployment=decision
    )
    if report.get("task") == "detection":
        report["headline"] = detection_headline(report["headline"], rows)
    atomic.write_json(report_file, report)
    atomic.write_text(run_dir / "report.md", render_markdown(report))
    return True


def search_student(
    recipe: Recipe,
    candidates: list[str],
    budget: Any = None,
    batch: int = 64,
    out: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """DisWOT student search (see :mod:`edgekd.distill.search`) for the recipe's teacher and data.

    The teacher comes from the recipe's teacher stage (its checkpoint, or trained on the labels as
    ``compress`` would); the ranking is written to ``out`` (default ``models/search/<run name>.json``).
    """
    from edgekd import atomic
    from edgekd.backends.base import resolve_threads
    from edgekd.data import build_dataset
    from edgekd.distill.search import LATENCY_PROTOCOL, Budget, check_candidates, check_teacher, rank_students
    from edgekd.models import build_model
    from edgekd.models.checkpoint import load_weights

    check_teacher(recipe.teacher.model)  # an ONNX teacher has no feature maps: refused before any work
    names = check_candidates(candidates)  # unknown names fail before any training
    budget = budget or Budget()
    teacher_outputs = compress(recipe, until="teacher", log=log)["teacher"]
    data = build_dataset(recipe.data, seed=recipe.seed)
    meta = data[2]
    shape = meta.input_shape
    teacher = build_model(
        recipe.teacher.model, len(meta.classes), shape[0], role="teacher", input_shape=shape
    )
    load_weights(teacher, recipe.run_dir / teacher_outputs["model_file"], recipe.teacher.model)
    ranked = rank_students(teacher, names, data, budget, batch=batch, seed=recipe.seed, log=log)
    out = out or Path("models/search") / f"{recipe.name}.json"
    result = {
        "method": "DisWOT (Dong, Li, Wei, CVPR 2023): semantic (Grad-CAM class Gram) + relation "
        "(sample Gram) distances to the teacher, students at random init; lower is better",
        "teacher": {
            "model": recipe.teacher.model,
            "origin": teacher_outputs["origin"],
            "val_accuracy": teacher_outputs["val_accuracy"],
            "checkpoint": str(recipe.run_dir / teacher_outputs["model_file"]),
        },
        "data": {"name": meta.name, "fingerprint": meta.fingerprint, "input_shape": list(meta.input_shape)},
        "batch": min(batch, len(data[0])),
        "seed": recipe.seed,
        "budget": {"max_flops": budget.max_flops, "max_latency_ms": budget.max_latency_ms},
        "latency_protocol": {**LATENCY_PROTOCOL, "threads": resolve_threads(budget.threads)},
        "candidates": [candidate.to_dict() for candidate in ranked],
        "out": str(out),
    }
    atomic.write_json(out, result)
    return result
