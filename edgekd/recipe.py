"""The recipe: one validated description of an experiment (YAML file + CLI overrides).

Every field is checked by pydantic; a bad field becomes one ``RecipeError`` line naming the
file, the dotted field, the value and what is expected (with a close match for unknown fields).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from yaml.events import AliasEvent

from edgekd import tasks, teachers
from edgekd.errors import RecipeError

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "radio-default.yaml"
BUILTIN_TEACHERS = teachers.SHIPPED_DIR  # trained teachers edgekd ships
BUILTIN_PREFIX = teachers.PREFIX

# Bounds on what a recipe file may hold, checked while it is parsed (before any validation), so a
# hostile file fails in milliseconds: its size, the nesting depth of its collections, and the number
# of nodes it expands to once every alias is replaced by its anchor (a "billion laughs" file expands
# ~10^9 nodes from a few lines).
MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 100_000
# numpy's and torch's generators take seeds in 0..2**32-1 (numpy's legacy seeding is the narrowest).
MAX_SEED = 2**32 - 1
_RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_SHOWN_INPUT = 60  # characters of a bad value repeated in an error line
FILE_SOURCES = ("npz",)  # dataset names that may carry their file: ``npz:FILE``
DETECTION_DATA_FIELDS = ("images", "scenes")  # DataSpec fields only detection sources read


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSpec(Section):
    """Which dataset and how much of it."""

    name: str = Field(
        "radio-synthetic",
        description="dataset registry name: radio-synthetic, rml2016, rml2018, digits, imagefolder, "
        "npz (or npz:FILE, which sets path); detection: scenes (built in), coco, yolo",
    )
    path: Path | None = Field(
        None,
        description="file for rml2016 (.pkl) / rml2018 (.hdf5) / npz (.npz) / coco (annotations .json); "
        "directory for imagefolder / yolo",
    )
    frames_per_class_snr: int = Field(40, ge=1, description="synthetic frames per (modulation, SNR) pair")
    snr_min: int = Field(-20, ge=-40, le=40, description="lowest SNR in dB kept")
    snr_max: int = Field(18, ge=-40, le=40, description="highest SNR in dB kept")
    frame_length: int = Field(128, ge=16, description="IQ samples per frame")
    val_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="held-out share for evaluation")
    max_frames: int | None = Field(None, ge=1, description="cap on frames read from a file dataset")
    image_size: int = Field(
        32, ge=8, le=1024, description="image datasets: side in pixels images are resized to"
    )
    stream: Literal["auto"] | bool = Field(
        "auto",
        description="imagefolder: decode images from disk per batch in data.workers processes instead of "
        "holding them decoded in memory; auto = stream when the train split's decoded float32 images "
        "would exceed a quarter of the memory available at load time; true on another source is an error",
    )
    workers: int = Field(
        2,
        ge=0,
        description="streamed data: DataLoader worker processes that decode (and augment) batches; "
        "0 = decode in the training process",
    )
    # Detection sources only (edgekd.data.detection_sources). Left out of the recipe's dump while unset,
    # so classification recipes (and their stage fingerprints) are exactly what they were.
    images: Path | None = Field(
        None,
        description="coco: the folder the annotations' file_name entries are relative to "
        "(default: the json's folder, then its images/ subfolder)",
    )
    scenes: int | None = Field(
        None,
        ge=2,
        description="scenes (built-in detection set): how many scenes to generate, split into train and "
        "held-out by data.val_fraction (default 1200)",
    )

    @model_serializer(mode="wrap")
    def _without_unset_detection_fields(self, handler: Any) -> dict[str, Any]:
        """The detection-only fields appear in a dump only when set (classification dumps unchanged)."""
        data = handler(self)
        for name in DETECTION_DATA_FIELDS:
            if getattr(self, name) is None:
                data.pop(name, None)
        return data

    @model_validator(mode="before")
    @classmethod
    def _source_with_path(cls, data: Any) -> Any:
        """``name: npz:FILE`` (and ``--data npz:FILE``) means ``name: npz, path: FILE``."""
        if isinstance(data, dict) and isinstance(data.get("name"), str) and ":" in data["name"]:
            kind, _, path = data["name"].partition(":")
            if kind in FILE_SOURCES and path:
                data = {**data, "name": kind, "path": path}
        return data


class TrainSpec(Section):
    """Optimisation settings shared by teacher training and distillation."""

    epochs: int = Field(12, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)


MODEL_SOURCES = "edgekd:<name>, timm:<name>, torchvision:<name>, py:FILE.py:FACTORY, package.module:FACTORY"


class TeacherSpec(Section):
    model: str = Field(
        "edgekd:clst", description=f"teacher model: {MODEL_SOURCES}, or onnx:FILE.onnx (outputs only)"
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments of the model factory (py:/module:; timm.create_model for timm:)",
    )
    hint_layers: list[str] | None = Field(
        None, description="module names whose outputs feature-map methods use (default: found automatically)"
    )
    checkpoint: Path | None = Field(
        "builtin:clst-radio-synthetic",
        validate_default=True,
        description="trained teacher weights (.pt, .safetensors), or builtin:NAME for a teacher edgekd "
        "ships (edgekd/teachers/; the default is the one shipped for the run's teacher.model and data.name: "
        "ClST for the built-in radio task, detr-r18 for the built-in scenes); null: trained here",
    )
    pretrained: bool = Field(False, description="timm models: start from the hub's pretrained weights")
    store: bool = Field(
        True,
        description="reuse a teacher an earlier run trained with the same model, settings, seed and data "
        "(models/cache/teachers); false: always train it here",
    )
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(epochs=15))

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _builtin_teacher(cls, value: Any) -> Any:
        """``builtin:NAME`` is ``edgekd/teachers/NAME.safetensors``, a teacher shipped with edgekd."""
        if isinstance(value, str) and value.startswith(BUILTIN_PREFIX):
            return teachers.resolve(value)
        return value


class StudentSpec(Section):
    model: str = Field(
        "edgekd:kd-cnn",
        description=f"student model: {MODEL_SOURCES}; for edgekd deploy also onnx:FILE.onnx",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments of the model factory (py:/module:; timm.create_model for timm:)",
    )
    hint_layers: list[str] | None = Field(
        None, description="module names whose outputs feature-map methods use (default: found automatically)"
    )
    checkpoint: Path | None = Field(None, description="initial student weights (.pt, .safetensors; optional)")
    pretrained: bool = Field(False, description="timm models: start from the hub's pretrained weights")


class AugmentSpec(Section):
    """A bank of seeded augmentation variants per train sample, each with its cached teacher output."""

    enabled: bool = Field(False, description="train on augmented variants (variant 0 is the sample itself)")
    variants: int = Field(4, ge=1, le=64, description="variants per sample in the bank (K)")
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="seeds the variants' parameters; part of the teacher-cache key"
    )
    policy: Literal["default", "timm"] = Field(
        "default",
        description="default: per input kind (IQ: phase + time shift; images: shifts, flips where "
        "mirror-invariant); timm: timm's standard image train augmentation (crop, flip, colour jitter)",
    )


class DistillSpec(Section):
    """How the student is distilled: the method, the shared temperature/alpha, and per-method options.

    ``options`` maps a method name to its own hyperparameters, validated against that method's
    options (``edgekd methods`` lists them with defaults), e.g. ``{dkd: {nckd_weight: 8.0}}`` or,
    on the command line, ``--set distill.options.skd.beta=0.5`` (SKD's opt-in embedding term,
    edgekd's own extension; 0, off, by default).
    """

    method: str = Field("skd", description="distillation method; `edgekd methods` lists them with options")
    temperature: float = Field(4.0, gt=0, description="softmax temperature of the soft targets")
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the distillation term vs the label term")
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per method name, its own hyperparameters, e.g. {dkd: {nckd_weight: 8.0}} "
        "(`edgekd methods` lists each method's options)",
    )
    teacher_cache: bool = Field(True, description="compute teacher outputs once and reuse them")
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    label_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="share of train labels kept (semi-supervised methods: the rest unlabelled)",
    )
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(epochs=15))
    world_size: int = Field(
        1,
        ge=1,
        le=1024,
        description="processes that train the teacher and distill stages together (torch.distributed, "
        "DDP; --nproc x --nnodes); train.batch_size stays the global batch, each process takes "
        "batch_size / world_size",
    )
    accelerator: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="where teacher training, distillation and the teacher-output pass run: auto = CUDA "
        "when torch sees a GPU, else the CPU; cuda without one is an error (each DDP process: "
        "cuda:LOCAL_RANK, NCCL); export and later stages stay on the CPU",
    )


class ExportSpec(Section):
    opset: int = Field(18, ge=18, le=23, description="ONNX opset (torch 2.14 dynamo exporter: >= 18)")
    tolerance: float = Field(1e-4, gt=0, description="max |ONNX - PyTorch| accepted")
    parity_samples: int = Field(64, ge=1)
    dynamo: bool = Field(
        True, description="torch.export-based exporter; false: the TorchScript one (for untraceable models)"
    )


class QuantizeSpec(Section):
    enabled: bool = True
    calibration_samples: int = Field(512, ge=1, description="train frames used for calibration")
    per_channel: bool = True
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    min_calibration_samples: int = Field(16, ge=1)
    max_accuracy_drop: float | None = Field(
        None,
        ge=0,
        le=1,
        description="accuracy-aware INT8: largest absolute top-1 drop allowed (e.g. 0.01); "
        "layers are kept in float until within it; unset: quantise everything",
    )
    accuracy_samples: int = Field(
        500, ge=1, description="train frames (never calibration frames) the INT8 drop is measured on"
    )
    mode: Literal["ptq", "qad"] = Field(
        "ptq",
        description="ptq: post-training INT8; qad: quantisation-aware distillation (fake-quant student "
        "fine-tuned against the teacher, one QDQ ONNX for every backend); with max_accuracy_drop, "
        "ptq climbs the ladder PTQ -> PTQ with float nodes -> QAD until the budget is met",
    )
    qad_epochs: int = Field(10, ge=0, description="QAD: fine-tuning epochs of the fake-quantised student")
    qad_lr: float | None = Field(None, gt=0, description="QAD: learning rate; null = distill.train.lr / 30")
    qad_learn_ranges: bool = Field(
        False,
        description="QAD: learn the activation scales and zero points (LSQ) from their calibrated values, "
        "then freeze them for export; false: keep the calibrated ranges",
    )
    qad_range_lr: float | None = Field(
        None, gt=0, description="QAD: learning rate of the learned activation ranges; null = 10 x the QAD lr"
    )


class CompileSpec(Section):
    """Engine build options of backends that compile on the device (TensorRT); the I/O type of MCU models."""

    max_batch: int = Field(
        8,
        ge=1,
        description="TensorRT: largest batch of the engine's optimisation profile (min 1, "
        "opt profile.batch_size)",
    )
    dla_core: int | None = Field(
        None, ge=0, description="TensorRT: build for this DLA core (GPU fallback on); null = the GPU"
    )
    mcu_io: Literal["int8", "float"] = Field(
        "int8",
        description="LiteRT/TFLM (cortex-m* targets): the .tflite's input and output type; int8: the "
        "firmware quantises the frame with the recorded input scale/zero point; float: float32 in and out, "
        "QUANTIZE/DEQUANTIZE inside the model at its boundary (every other tensor INT8 either way)",
    )


class ProfileSpec(Section):
    warmup: int = Field(20, ge=0)
    iterations: int = Field(200, ge=1)
    batch_size: int = Field(1, ge=1)
    threads: int | None = Field(None, ge=1, description="intra-op threads; default: all cores")
    eval_samples: int | None = Field(None, ge=1, description="cap on held-out frames evaluated")
    openvino_hint: Literal["latency", "throughput"] = Field(
        "latency", description="OpenVINO performance hint the artifacts are compiled with"
    )


class BundleSpec(Section):
    """The deployable bundle written to ``<run>/bundle/<target>/`` (``edgekd bundle``)."""

    artifact: Literal["fp32", "fp16", "int8"] | None = Field(
        None,
        description="pin the precision whose artifact becomes model_data.c; default: the deployment "
        "decision (the fastest measured within quantize.max_accuracy_drop, 0.01 when unset; unmeasured: "
        "int8 if built, else fp32)",
    )
    eval_samples: int = Field(
        1000, ge=0, description="held-out frames shipped as eval.npz for on-device accuracy; 0: none"
    )


class DeviceSpec(Section):
    """A remote device the bundle is profiled on over SSH (OpenSSH, key auth, host key checked)."""

    host: str | None = Field(
        None, description="user@host[:port] to profile on over SSH; default: the target's device, if any"
    )
    known_hosts: Path | None = Field(
        None, description="known_hosts file the device's host key is checked against (default: the user's)"
    )
    identity_file: Path | None = Field(None, description="SSH private key (default: ssh's own choice)")
    remote_python: str = Field("python3", description="python on the device (with numpy and the runtime)")
    connect_timeout_s: int = Field(10, ge=1, le=300, description="SSH ConnectTimeout")
    timeout_s: int = Field(1800, ge=10, description="limit for the whole remote profiling run")


class Recipe(Section):
    """A whole experiment."""

    name: str = Field(
        "radio-default",
        description="run directory name: letters, digits, '.', '_', '-', not starting with '.'",
    )
    mode: Literal["compress", "deploy"] = Field(
        "compress",
        description="compress: distil a student from the teacher; deploy: take student.model as it is "
        "(edgekd deploy) and run export, quantise, compile, profile, bundle and report",
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of every random source (0..2**32-1)")
    target: str = Field("cpu", description="target name or alias from targets/")
    runs_dir: Path = Field(Path("models/runs"), description="where run directories are created")
    data: DataSpec = Field(default_factory=DataSpec)
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    student: StudentSpec = Field(default_factory=StudentSpec)
    distill: DistillSpec = Field(default_factory=DistillSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    quantize: QuantizeSpec = Field(default_factory=QuantizeSpec)
    compile: CompileSpec = Field(default_factory=CompileSpec)
    profile: ProfileSpec = Field(default_factory=ProfileSpec)
    bundle: BundleSpec = Field(default_factory=BundleSpec)
    device: DeviceSpec = Field(default_factory=DeviceSpec)

    @model_validator(mode="after")
    def _detection_defaults(self) -> Recipe:
        """A detection dataset (:func:`edgekd.tasks.task_of`) takes the detection defaults
        (:data:`edgekd.tasks.DETECTION_DEFAULTS`, :data:`~edgekd.tasks.DETECTION_TRAIN`) for every field
        the recipe leaves unset: the DETR teacher and student, CLoCKDistill, 128 px, DAB-DETR's
        optimiser settings. Fields the recipe sets are kept (and checked by the preflight,
        :func:`edgekd.tasks.check_recipe`). Classification recipes are untouched."""
        if tasks.task_of(self.data.name) != tasks.DETECTION:
            return self
        for dotted, value in tasks.DETECTION_DEFAULTS.items():
            section_name, field_name = dotted.split(".")
            section = getattr(self, section_name)
            if section_name not in self.model_fields_set or field_name not in section.model_fields_set:
                setattr(section, field_name, value)
        for section_name, defaults in tasks.DETECTION_TRAIN.items():
            section = getattr(self, section_name)
            given = section.model_fields_set if section_name in self.model_fields_set else set()
            train = section.train
            kept = train.model_fields_set if "train" in given else set()
            for field_name, value in defaults.items():
                if field_name not in kept:
                    setattr(train, field_name, value)
        return self

    @model_validator(mode="after")
    def _default_teacher_for_its_task_only(self) -> Recipe:
        """The default teacher checkpoint (shipped for ClST on the built-in radio data) stands only for
        the task its JSON names (:func:`edgekd.teachers.task_of`): when the recipe names another teacher
        model or dataset without setting ``teacher.checkpoint``, the shipped teacher trained for that
        task is taken if edgekd ships one, else none (the teacher is trained on the labels). A
        checkpoint the recipe sets is kept (and checked by the preflight)."""
        task = (self.teacher.model, self.data.name)
        default = None if "checkpoint" in self.teacher.model_fields_set else self.teacher.checkpoint
        default = teachers.shipped_name(default)
        if default is not None and teachers.mismatch(default, *task):
            shipped = teachers.shipped_for(*task)
            self.teacher.checkpoint = teachers.weights(shipped) if shipped else None
        return self

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        # One path component inside runs_dir: '.', '..' and hidden names would escape it or hide the run.
        if not _RUN_NAME.fullmatch(value):
            raise ValueError(
                "a run name is one directory name of letters, digits, '.', '_' and '-' that does not "
                "start with '.'; choose another with --name"
            )
        return value

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.name


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names valid at the location of an unknown key (for the did-you-mean hint)."""
    current: Any = model
    for part in loc[:-1]:
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if (
            field is None
            or not isinstance(field.annotation, type)
            or not issubclass(field.annotation, BaseModel)
        ):
            return []
        current = field.annotation
    return list(current.model_fields)


def _describe(error: dict[str, Any], source: str) -> str:
    loc = tuple(error["loc"])
    dotted = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _fields_at(Recipe, loc), n=1, cutoff=0.5)
        hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
        return f"{source}: unknown field {dotted!r}{hint}"
    shown = repr(error.get("input"))
    if len(shown) > _SHOWN_INPUT:
        shown = shown[:_SHOWN_INPUT] + "..."
    return f"{source}: field {dotted!r} = {shown}: {error['msg']}"


def build_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_describe(exc.errors()[0], source)) from None


class YamlLimitError(Exception):
    """A YAML text exceeds :data:`MAX_YAML_DEPTH` or :data:`MAX_YAML_NODES`; ``mark`` is where."""

    def __init__(self, problem: str, mark: Any = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.mark = mark


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing deep nesting, recursive aliases and alias-expansion bombs.

    Composing counts each node's size as the tree expands it (an alias counts its anchor's whole
    size again), so the check is linear in the text even when the expansion is exponential
    ("billion laughs"), and construction never starts on a document over the bounds.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> nodes it expands to (node objects live until done)

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            anchored = self.anchors.get(event.anchor)
            if anchored is not None and id(anchored) not in self._sizes:
                raise YamlLimitError(
                    f"alias *{event.anchor} refers to itself (a recursive structure)", event.start_mark
                )
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise YamlLimitError(f"collections nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        size = self._sizes.get(id(node))
        if size is None:
            if isinstance(node, yaml.MappingNode):
                size = 1 + sum(self._sizes[id(key)] + self._sizes[id(value)] for key, value in node.value)
            elif isinstance(node, yaml.SequenceNode):
                size = 1 + sum(self._sizes[id(item)] for item in node.value)
            else:
                size = 1
            self._sizes[id(node)] = size
        if size > MAX_YAML_NODES:
            raise YamlLimitError(
                f"expands to more than {MAX_YAML_NODES} values once its aliases are resolved",
                event.start_mark,
            )
        return node


def _where(mark: Any) -> str:
    return f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _bounded_load(text: str) -> Any:
    """One YAML document's value; :class:`YamlLimitError` over the bounds, ``yaml.YAMLError`` if malformed."""
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    except RecursionError:  # the depth bound stops composing; this guards the constructor too
        raise YamlLimitError("is nested too deeply") from None
    finally:
        loader.dispose()


def load_yaml_text(text: str, source: str) -> Any:
    """The value of one YAML document, parsed with :class:`BoundedLoader`; :class:`RecipeError` if bad."""
    try:
        return _bounded_load(text)
    except YamlLimitError as exc:
        raise RecipeError(
            f"{source}:{_where(exc.mark)} refused: the YAML {exc.problem}; write the values out plainly"
        ) from None
    except yaml.YAMLError as exc:
        problem = " ".join((getattr(exc, "problem", None) or "invalid YAML").split())
        raise RecipeError(
            f"{source}:{_where(getattr(exc, 'problem_mark', None))} malformed YAML: {problem}; "
            "fix the file's syntax"
        ) from None


def read_yaml(path: Path) -> dict[str, Any] | None:
    """The mapping in recipe file ``path``; None when the file holds no document (empty or comments)."""
    if path.is_dir():
        raise RecipeError(f"recipe file {path} is a directory; pass a YAML file to --recipe")
    if not path.is_file():
        raise RecipeError(f"recipe file {path} not found; pass an existing YAML file to --recipe")
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(
                f"recipe file {path} is {size} bytes, over the {MAX_RECIPE_BYTES}-byte limit for a recipe; "
                "pass the recipe's YAML file, not a data file"
            )
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(
            f"recipe file {path} cannot be read ({exc.strerror or exc}); check its permissions"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"recipe file {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None
    loaded = load_yaml_text(text, str(path))
    if loaded is None:
        return None
    if not isinstance(loaded, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of fields, got {type(loaded).__name__}")
    return loaded


def parse_override(text: str) -> tuple[list[str], Any]:
    """``distill.epochs=5`` → (['distill', 'epochs'], 5); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {text!r}: expected FIELD=VALUE, e.g. --set distill.train.epochs=5")
    try:
        value = _bounded_load(raw) if raw.strip() else None
    except YamlLimitError as exc:
        raise RecipeError(
            f"--set {key.strip()}=...: refused: the YAML value {exc.problem}; write the value out plainly"
        ) from None
    except yaml.YAMLError:
        value = raw  # not YAML: the text itself
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def load_recipe(path: Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Recipe from ``path`` (default: the built-in radio recipe) with dotted ``overrides`` applied."""
    source = path if path is not None else DEFAULT_RECIPE
    data = read_yaml(source) if source.is_file() or path is not None else {}
    if data is None:
        if path is not None:
            raise RecipeError(
                f"recipe file {path} is empty (no fields, only comments or blanks); "
                "add the fields to set, or leave out --recipe for the default recipe"
            )
        data = {}
    if path is None:  # the default recipe's classification choices give way to a detection dataset's
        data = _for_task(data, overrides or [])
    data = apply_overrides(data, overrides or [])
    return build_recipe(data, source=str(source))


# Fields of the default (radio) recipe file that are classification choices: with a detection dataset
# (``edgekd compress --data scenes``) they are left out, so :meth:`Recipe._detection_defaults` fills
# the detection defaults in (an override still sets any of them).
CLASSIFICATION_CHOICES = (
    ("teacher", "model"),
    ("teacher", "train"),
    ("student", "model"),
    ("distill", "method"),
    ("distill", "train"),
    ("data", "image_size"),
)


def _for_task(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The default recipe's fields, without its classification choices when the overrides name a
    detection dataset."""
    import copy

    resolved = apply_overrides(copy.deepcopy(data), overrides)
    name = resolved.get("data", {}).get("name") if isinstance(resolved.get("data"), dict) else None
    if not isinstance(name, str) or tasks.task_of(name) != tasks.DETECTION:
        return data
    data = copy.deepcopy(data)
    for section, field in CLASSIFICATION_CHOICES:
        if isinstance(data.get(section), dict):
            data[section].pop(field, None)
    return data
