"""The interface of a distillation method, its registry, and the loss terms several methods share.

A method is an ``nn.Module``: its trainable parts (connectors, projectors, extra heads) are
submodules optimised together with the student; :meth:`DistillMethod.loss` turns the student's and
teacher's outputs for a batch into one scalar. Methods register by name in :data:`METHODS` when
:mod:`edgekd.distill.methods` is imported; each method's docstring cites its paper and states its loss.

Hyperparameters: ``distill.temperature`` and ``distill.alpha`` are shared by the methods whose
papers have a softmax temperature and a distillation/label balance; everything else a method needs
is declared in its nested :class:`Options` model (pydantic, the paper's defaults, validated bounds)
and set from the recipe as ``distill.options.<name>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from edgekd.errors import RecipeError
from edgekd.recipe import DistillSpec
from edgekd.registry import Registry


@dataclass
class ModelOutputs:
    """What a model produced for a batch.

    ``logits`` (B, C); ``features`` the penultimate embedding (B, D) when a method asks for it;
    ``feature_maps`` the outputs of the model's ``hint_layers`` (shallow to deep, each (B, C_i, L_i))
    when a method asks for them.
    """

    logits: torch.Tensor
    features: torch.Tensor | None = None
    feature_maps: list[torch.Tensor] | None = None


@dataclass(frozen=True)
class ModelShape:
    """Sizes a method needs to build its connectors: embedding width and hint-layer map shapes (C, L)."""

    feature_dim: int
    map_shapes: tuple[tuple[int, ...], ...] = field(default_factory=tuple)


class MethodOptions(BaseModel):
    """Base of every method's hyperparameters: unknown names are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class MixedBatch:
    """A mixup batch: ``x = lam * x_a + (1 - lam) * x_b`` with ``x_b = x_a[partner]`` for mixed rows.

    ``lam`` (B,) is 1 for rows left unmixed. The label term of a method reads ``y`` and ``y[partner]``.
    """

    partner: torch.Tensor
    lam: torch.Tensor


class DistillMethod(nn.Module):
    """Base of every method; subclasses implement :meth:`loss` and may override the hooks below.

    Capabilities (class attributes the trainer reads):

    - ``needs_teacher``: the trainer passes teacher outputs (else ``teacher`` is ``None``);
    - ``needs_features``: both outputs carry ``features`` (penultimate embeddings);
    - ``needs_feature_maps``: both outputs carry ``feature_maps``; the teacher then runs live (its
      intermediate maps are too large to cache for a whole dataset);
    - ``mixes_inputs``: :meth:`mix_batch` mixes samples, so the teacher runs live on the mixed batch;
    - ``supports_missing_labels``: the method trains with part of the labels missing (``y == -1``);
    - ``needs_teacher_dataset``: :meth:`prepare` receives the teacher's outputs for the train split;
    - ``held_out_fraction``: share of the train split the trainer holds back for :meth:`meta_step`;
    - ``runs_teacher_itself``: the method runs the teacher module it gets from :meth:`bind_models`
      (e.g. only up to a distilled layer, on a masked view), so the trainer passes no teacher outputs.

    Teacher tensors are constants to a method: losses detach them, so no gradient ever reaches the
    teacher, whether its outputs come from a cache or from a live forward pass.
    """

    needs_teacher: ClassVar[bool] = True
    needs_features: bool = False
    needs_feature_maps: ClassVar[bool] = False
    mixes_inputs: ClassVar[bool] = False
    supports_missing_labels: ClassVar[bool] = False
    held_out_fraction: ClassVar[float] = 0.0
    needs_teacher_dataset: ClassVar[bool] = False
    runs_teacher_itself: ClassVar[bool] = False

    Options: ClassVar[type[MethodOptions]] = MethodOptions

    def __init__(self, spec: DistillSpec, num_classes: int, student: ModelShape, teacher: ModelShape) -> None:
        super().__init__()
        self.spec = spec
        self.options = parse_options(type(self), spec)
        self.num_classes = num_classes
        self.student_shape = student
        self.teacher_shape = teacher

    @property
    def uses_teacher_cache(self) -> bool:
        """Whether per-sample teacher outputs (logits, embeddings) can come from the cache."""
        return self.needs_teacher and not self.needs_feature_maps and not self.mixes_inputs

    @property
    def student_dim(self) -> int:
        return self.student_shape.feature_dim

    @property
    def teacher_dim(self) -> int:
        return self.teacher_shape.feature_dim

    def loss(
        self, student: ModelOutputs, teacher: ModelOutputs | None, target: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        """Scalar loss for one batch.

        ``state`` holds ``epoch`` (0-based), ``epochs``, ``step`` (0-based, global), ``steps``
        (total), ``inputs`` (the batch the student saw) and, for methods that mix inputs, ``mix``
        (a :class:`MixedBatch`).
        """
        raise NotImplementedError

    # ---------------------------------------------------------------- optional hooks

    def student_parameters(self) -> list[nn.Parameter]:
        """Parameters optimised together with the student on the training loss (default: all)."""
        return list(self.parameters())

    def prepare(self, model: nn.Module, labels: torch.Tensor, teacher: ModelOutputs | None) -> None:
        """Called once before the optimiser is built, with the student, the train labels (-1:
        unlabelled) and, for methods that set ``needs_teacher_dataset``, the teacher's outputs for
        the whole train split (in order). Methods with their own inference head install it here."""

    @classmethod
    def check_models(cls, method: str, student: nn.Module, teacher: nn.Module) -> None:
        """Preflight, before any training: raise a one-line RecipeError when the built models cannot
        serve this method (e.g. ``dmae`` needs a ViT student). Default: any models."""

    def bind_models(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Called once before training with the student and the teacher module (on the training
        device), for methods that run parts of the models themselves (``dmae``). Default: nothing."""

    def mix_batch(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> MixedBatch | None:
        """Mix the input batch in place of the trainer's plain batch (mixup methods); ``None``: no mixing."""
        return None

    def meta_step(
        self,
        model: nn.Module,
        train_batch: tuple[torch.Tensor, torch.Tensor, ModelOutputs | None],
        held_out_batch: tuple[torch.Tensor, torch.Tensor],
        state: dict[str, Any],
    ) -> None:
        """Update the method's own parameters on a held-out batch (bilevel methods)."""

    def finalize(self, student: nn.Module) -> None:
        """Turn the trained student into the model that is deployed (e.g. fold an extra head in)."""

    def record(self) -> dict[str, Any]:
        """What the method chose during training (e.g. a searched inference mix), for the stage's record."""
        return {}

    def _teacher(self, teacher: ModelOutputs | None) -> ModelOutputs:
        if teacher is None:
            raise ValueError(f"distillation method {type(self).__name__} needs teacher outputs, got None")
        return teacher


METHODS: Registry[type[DistillMethod]] = Registry("distillation method")
_Options = TypeVar("_Options", bound=BaseModel)


def parse_options(method: type[DistillMethod], spec: DistillSpec, name: str | None = None) -> MethodOptions:
    """Options of ``method`` from ``spec.options[name]`` (default: the recipe's method), validated.

    ``spec.options`` maps method names (or aliases) to their hyperparameters, so one recipe can
    carry settings for several methods; a bad value is a one-line RecipeError naming the field.
    """
    name = name or spec.method
    canonical = METHODS.canonical(name)
    given = {
        key: value
        for method_name, values in spec.options.items()
        if METHODS.canonical(method_name) == canonical
        for key, value in values.items()
    }
    return validate_options(method.Options, name, given)


def validate_options(options: type[_Options], name: str, given: dict[str, Any]) -> _Options:
    """``given`` validated into the method ``name``'s ``options`` model; a bad name or value is one
    RecipeError line naming ``distill.options.<name>.<field>`` (classification and detection alike)."""
    try:
        return options.model_validate(given)
    except ValidationError as error:
        first = error.errors()[0]
        where = f"distill.options.{name}." + ".".join(str(part) for part in first["loc"])
        known = ", ".join(f"{key}={info.default!r}" for key, info in options.model_fields.items())
        if first["type"] == "extra_forbidden":
            hint = f"method {name!r} takes: {known}" if known else f"method {name!r} takes no options"
            raise RecipeError(f"{where}: unknown option; {hint}") from None
        raise RecipeError(f"{where}: {first['msg']} (got {first.get('input')!r})") from None


def resolved_options(spec: DistillSpec) -> dict[str, Any]:
    """The recipe method's options with every default filled in (what a run actually used)."""
    return parse_options(METHODS.get(spec.method), spec).model_dump()


def build_method(
    spec: DistillSpec, num_classes: int, student: ModelShape, teacher: ModelShape
) -> DistillMethod:
    """The method named ``spec.method``; an unknown name or option raises ``RecipeError``."""
    return METHODS.get(spec.method)(spec, num_classes, student, teacher)


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-target term of Hinton et al. (2015): ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, batch mean.

    Computed from log-softmax of both sides (``log_target``), so it stays finite for extreme logits;
    the teacher logits are detached. The T² factor keeps its gradients on the scale of a
    cross-entropy term as T changes.
    """
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


def label_ce(logits: torch.Tensor, target: torch.Tensor, mix: MixedBatch | None = None) -> torch.Tensor:
    """Cross-entropy on the labelled rows (``target >= 0``), batch mean; 0 when no row is labelled.

    With a :class:`MixedBatch` it is the mixup label loss ``lam·CE(s, y_a) + (1 − lam)·CE(s, y_b)``.
    """
    if mix is not None:
        per_row = mix.lam * F.cross_entropy(logits, target, reduction="none")
        per_row = per_row + (1 - mix.lam) * F.cross_entropy(logits, target[mix.partner], reduction="none")
        return per_row.mean()
    labelled = target >= 0
    if not bool(labelled.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[labelled], target[labelled])
