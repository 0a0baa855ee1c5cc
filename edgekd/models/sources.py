"""Models from outside edgekd's zoo: a user's Python file, an importable module, torchvision's registry.

Names (one syntax for teacher and student):

- ``py:path/to/file.py:factory`` — ``factory`` in a Python file (path relative to the current
  directory), loaded with :mod:`importlib` under a module name unique to the resolved path;
- ``package.module:factory`` — ``factory`` in an importable module (the current directory is
  searchable, as with ``python -m``);
- ``torchvision:<name>`` — ``torchvision.models.get_model(name, num_classes=...)``.

The factory is called as ``factory(num_classes=..., **kwargs)`` (``kwargs`` from the recipe's
``teacher.kwargs`` / ``student.kwargs``), plus ``in_channels`` when its signature takes it. The
module it returns is wrapped in :class:`UserModel`, which gives it edgekd's model interface
(``forward_features``, ``head``, ``feature_dim``, ``hint_layers``, ``input_rank``,
``adapt_state_dict``): the head is the last ``nn.Linear`` whose ``out_features`` equals
``num_classes``, replaced in the network by ``nn.Identity`` so that
``forward(x) == head(forward_features(x))``, as the linear-probe view of a classifier (a frozen
embedding followed by one linear map) that embedding-based distillation (e.g. RKD, Park et al.,
CVPR 2019; CRD, Tian et al., ICLR 2020) relies on. Hint layers (the maps FitNets, Romero et al.,
ICLR 2015, and its successors match) are the ends of the model's stages: the last top-level child
of each run of equal spatial size, found on a probe forward, or the names the recipe gives.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from edgekd.errors import ModelError, RecipeError, first_line
from edgekd.objects import OBJECT_PREFIX, object_factory

PY_PREFIX = "py:"
TORCHVISION_PREFIX = "torchvision:"
ONNX_PREFIX = "onnx:"
BUILTIN_PREFIXES = ("edgekd:", "timm:")
MAX_HINT_LAYERS = 4  # automatic hint layers: at most the last four stage ends
_PROBE_BATCH = 2
_SHOWN = 5  # close names listed in an error line
_loaded: dict[Path, tuple[tuple[int, int], ModuleType]] = {}  # resolved file -> (mtime_ns, size), module


def is_user_source(name: str) -> bool:
    """Whether ``name`` is a ``py:``, ``module:factory`` or ``torchvision:`` source (built by this module)."""
    if name.startswith((PY_PREFIX, TORCHVISION_PREFIX)):
        return True
    return ":" in name and not name.startswith((*BUILTIN_PREFIXES, ONNX_PREFIX))


def is_onnx(name: str) -> bool:
    return name.startswith(ONNX_PREFIX)


def onnx_path(name: str) -> Path:
    """The file of an ``onnx:FILE`` source; a ModelError when it is not there."""
    path = Path(name.removeprefix(ONNX_PREFIX))
    if not name.removeprefix(ONNX_PREFIX):
        raise ModelError(f"model {name!r}: no file after onnx:; write onnx:path/to/model.onnx")
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "not found"
        raise ModelError(
            f"model {name!r}: {path} {state} (relative to {Path.cwd()}); pass an existing .onnx file"
        )
    return path


# ---------------------------------------------------------------- resolving a name to a factory


def _split(name: str, prefix: str) -> tuple[str, str]:
    """``(where, factory)`` of ``prefix + where:factory``; a ModelError when either part is missing."""
    where, _, factory = name.removeprefix(prefix).rpartition(":")
    if not where or not factory or not factory.isidentifier():
        example = "py:path/to/model.py:FACTORY" if prefix == PY_PREFIX else "package.module:FACTORY"
        raise ModelError(f"model {name!r}: expected {example} (a file or module, a colon, a function name)")
    return where, factory


@contextlib.contextmanager
def _searchable(directory: str) -> Iterator[None]:
    """``directory`` first on ``sys.path`` while a user's module imports (its sibling files import too)."""
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        yield
    finally:
        if added and directory in sys.path:
            sys.path.remove(directory)


def _load_file(name: str, file: Path) -> ModuleType:
    """The module of the Python file ``file``, imported once per content (edits are picked up)."""
    if not file.is_file():
        state = "is a directory" if file.is_dir() else "not found"
        raise ModelError(
            f"model {name!r}: {file} {state} (relative to {Path.cwd()}); pass an existing .py file "
            "as py:FILE.py:FACTORY"
        )
    resolved = file.resolve()
    stat = resolved.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _loaded.get(resolved)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    module_name = f"_edgekd_user_{digest}_{''.join(c if c.isalnum() else '_' for c in resolved.stem)}"
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise ModelError(f"model {name!r}: {file} cannot be loaded as a Python module; pass a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look their module up here
    try:
        with _searchable(str(resolved.parent)):
            spec.loader.exec_module(module)
    except Exception as exc:  # the user's file may raise anything while it runs
        sys.modules.pop(module_name, None)
        raise ModelError(
            f"model {name!r}: {file} fails to import ({type(exc).__name__}: {first_line(exc)[:160]}); "
            "fix the file"
        ) from None
    _loaded[resolved] = (stamp, module)
    return module


def _import_module(name: str, module_name: str) -> ModuleType:
    try:
        with _searchable(os.getcwd()):
            return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):  # the module itself, not one it imports
            raise ModelError(
                f"model {name!r}: module {module_name!r} is not importable ({first_line(exc)}); install "
                "its package, run from the directory that holds it, or use py:path/to/file.py:FACTORY"
            ) from None
        raise ModelError(
            f"model {name!r}: module {module_name!r} fails to import ({type(exc).__name__}: "
            f"{first_line(exc)[:160]}); install what it needs"
        ) from None
    except Exception as exc:  # the module may raise anything while it runs
        raise ModelError(
            f"model {name!r}: module {module_name!r} fails to import ({type(exc).__name__}: "
            f"{first_line(exc)[:160]}); fix the module"
        ) from None


def _module_of(name: str) -> tuple[ModuleType, str]:
    if name.startswith(PY_PREFIX):
        where, factory = _split(name, PY_PREFIX)
        return _load_file(name, Path(where)), factory
    where, factory = _split(name, "")
    return _import_module(name, where), factory


def _callables(module: ModuleType) -> list[str]:
    """Public functions and classes defined in ``module`` (what a factory name can be)."""
    return sorted(
        key
        for key, value in vars(module).items()
        if not key.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and getattr(value, "__module__", None) == module.__name__
    )


def user_factory(name: str) -> Callable[..., Any]:
    """The factory a ``py:`` or ``module:`` source names; one ModelError line for each way it is missing."""
    module, factory = _module_of(name)
    found = getattr(module, factory, None)
    if found is None or not callable(found):
        where = getattr(module, "__file__", None) or module.__name__
        defined = _callables(module)
        close = difflib.get_close_matches(factory, defined, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        listing = ", ".join(defined) if defined else "none"
        raise ModelError(f"model {name!r}: {where} has no function {factory!r}; {hint}it defines: {listing}")
    return found


def _torchvision() -> ModuleType:
    try:
        import torchvision.models
    except ImportError:
        raise ModelError(
            "torchvision: models need the torchvision package: pip install torchvision"
        ) from None
    return torchvision.models


def check_torchvision_name(name: str) -> str:
    """``<arch>`` of ``torchvision:<arch>``; a ModelError with close matches for an unknown one."""
    models = _torchvision()
    arch = name.removeprefix(TORCHVISION_PREFIX)
    known = models.list_models()
    if arch in known:
        return arch
    close = difflib.get_close_matches(arch, known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(TORCHVISION_PREFIX + match for match in close)}? " if close else ""
    raise ModelError(
        f"unknown torchvision model {name!r}; {hint}(torchvision.models.list_models() lists every name)"
    )


def source_factory(name: str) -> Callable[..., Any]:
    """The raw constructor behind a user source (validated: file, module, factory or registry name)."""
    if name.startswith(TORCHVISION_PREFIX):
        return functools.partial(_torchvision().get_model, check_torchvision_name(name))
    if name.startswith(OBJECT_PREFIX):
        return object_factory(name)
    return user_factory(name)


def model_source_files(name: str) -> list[Path]:
    """Files whose content defines the model ``name``: the ``py:`` file, the module's file, the ONNX file.

    Zoo models (``edgekd:``, ``timm:``, ``torchvision:``) are defined by installed packages, and an
    ``object:`` model's name hashes its class's code: none.
    """
    if is_onnx(name):
        return [onnx_path(name)]
    if name.startswith(PY_PREFIX):
        return [Path(_split(name, PY_PREFIX)[0])]
    if is_user_source(name) and not name.startswith((TORCHVISION_PREFIX, OBJECT_PREFIX)):
        module, _ = _module_of(name)
        file = getattr(module, "__file__", None)
        return [Path(file)] if file else []
    return []


# ---------------------------------------------------------------- building and adapting


def _call_factory(
    name: str,
    factory: Callable[..., Any],
    num_classes: int,
    in_channels: int,
    kwargs: dict[str, Any],
    role: str,
) -> nn.Module:
    arguments = {"num_classes": num_classes, **kwargs}
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature
        parameters = {}
    if "in_channels" in parameters and "in_channels" not in arguments:
        arguments["in_channels"] = in_channels
    shown = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
    try:
        model = factory(**arguments)
    except Exception as exc:  # the user's factory may raise anything
        raise ModelError(
            f"{role} {name!r}: the factory raised {type(exc).__name__}: {first_line(exc)[:160]} "
            f"(called with {shown[:120]}); fix the factory or {role}.kwargs"
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"{role} {name!r}: the factory returned a {type(model).__name__}, not a torch.nn.Module; "
            "make it return the model"
        )
    return model


def _torchvision_model(
    name: str, num_classes: int, in_channels: int, pretrained: bool, role: str
) -> nn.Module:
    arch = check_torchvision_name(name)
    models = _torchvision()
    if in_channels != 3:
        raise ModelError(
            f"{role} {name!r}: torchvision classifiers take 3-channel images, the data has {in_channels} "
            "channels; use a py: factory that builds it for your inputs, or another dataset"
        )
    if not pretrained:
        return models.get_model(arch, weights=None, num_classes=num_classes)
    try:
        model = models.get_model(arch, weights="DEFAULT")
    except Exception as exc:  # hub/network/file errors come in many types
        raise ModelError(
            f"could not download pretrained weights for {name} ({type(exc).__name__}: {first_line(exc)}); "
            f"set {role}.pretrained: false or pass {role}.checkpoint"
        ) from None
    path, linear = _last_linear(model, None)
    if linear is not None and linear.out_features != num_classes:  # a fresh classifier for our classes
        model.set_submodule(path, nn.Linear(linear.in_features, num_classes))
    return model


def build_user_model(
    name: str,
    num_classes: int,
    in_channels: int = 2,
    pretrained: bool = False,
    role: str = "model",
    input_shape: tuple[int, ...] | None = None,
    kwargs: dict[str, Any] | None = None,
    hint_layers: list[str] | None = None,
) -> UserModel:
    """A ``py:``, ``module:`` or ``torchvision:`` model for ``num_classes`` classes, adapted to edgekd.

    With ``input_shape`` (one sample's shape) the model runs once on a probe batch: its output must
    be logits (B, num_classes); the head split is verified and hint layers are found.
    """
    kwargs = dict(kwargs or {})
    if name.startswith(TORCHVISION_PREFIX):
        if kwargs:
            raise ModelError(f"{role} {name!r}: torchvision models take no {role}.kwargs; remove them")
        net = _torchvision_model(name, num_classes, in_channels, pretrained, role)
    else:
        if pretrained:
            raise ModelError(
                f"{role} {name!r} has no pretrained weights; set {role}.pretrained: false and pass "
                f"{role}.checkpoint with your trained weights"
            )
        net = _call_factory(name, source_factory(name), num_classes, in_channels, kwargs, role)
    return UserModel(net, name, num_classes, in_channels, role, input_shape, hint_layers)


def _last_linear(net: nn.Module, out_features: int | None) -> tuple[str, nn.Linear | None]:
    """The last ``nn.Linear`` (registration order) with ``out_features`` outputs (any when None)."""
    found: tuple[str, nn.Linear | None] = ("", None)
    for path, module in net.named_modules():
        if isinstance(module, nn.Linear) and (out_features is None or module.out_features == out_features):
            found = (path, module)
    return found


class LogitsHead(nn.Module):
    """The head of a model whose classifier could not be split off: identity on its logits."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.in_features = self.out_features = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@contextlib.contextmanager
def _evaluating(net: nn.Module) -> Iterator[None]:
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        net.train(was_training)


class UserModel(nn.Module):
    """A user's classifier behind edgekd's model interface (see :mod:`edgekd.models.radio`).

    ``net`` is the user's module with its head replaced by ``nn.Identity`` (``head_path`` names
    where it was), so ``forward_features(x) = net(x)`` is the input of ``head``. When the split
    does not reproduce the model's output (e.g. a ``log_softmax`` after the classifier), the model
    is kept whole and ``head`` is the identity on its logits (``feature_dim = num_classes``).
    """

    def __init__(
        self,
        net: nn.Module,
        source: str,
        num_classes: int,
        in_channels: int,
        role: str = "model",
        input_shape: tuple[int, ...] | None = None,
        hint_layers: list[str] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        super().__init__()
        self.source, self.num_classes, self.in_channels = source, num_classes, in_channels
        self.input_rank = len(input_shape) if input_shape is not None else None
        self.net = net
        probe = None
        if input_shape is not None:
            generator = torch.Generator().manual_seed(0)  # the global RNG (weight init) is left alone
            probe = torch.randn(_PROBE_BATCH, *input_shape, generator=generator)
        reference = self._check_output(role, probe, input_shape) if probe is not None else None
        self.head_path, linear = _last_linear(net, num_classes)
        if linear is net:  # the whole model is one linear layer: nothing to split off
            linear = None
        if linear is not None:
            net.set_submodule(self.head_path, nn.Identity())
            self.head: nn.Module = linear
            self.feature_dim = linear.in_features
            if reference is not None and not self._split_reproduces(probe, reference):
                net.set_submodule(self.head_path, linear)
                linear = None
        if linear is None:
            self.head_path = ""
            self.head = LogitsHead(num_classes)
            self.feature_dim = num_classes
            log(
                f"  {role} {source}: no final linear layer with {num_classes} outputs gives its logits; "
                "embedding-based methods see its logits as the embedding"
            )
        if hint_layers is not None:
            self.hint_layers = self._named_hint_layers(hint_layers, role)
        else:
            self.hint_layers = self._stage_ends(probe) if probe is not None else ()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the classifier (B, feature_dim)."""
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def adapt_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` with the user model's own tensor names (``model.state_dict()``) mapped to ours.

        The classifier's tensors go to ``head.*``, everything else under ``net.*``; a state dict
        already in our naming is returned unchanged.
        """
        own = set(self.state_dict())
        if set(state) == own:
            return state
        prefix = f"{self.head_path}." if self.head_path else None
        return {
            (f"head.{key.removeprefix(prefix)}" if prefix and key.startswith(prefix) else f"net.{key}"): value
            for key, value in state.items()
        }

    # ------------------------------------------------------------ probes

    def _check_output(self, role: str, probe: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
        with _evaluating(self.net):
            try:
                output = self.net(probe)
            except Exception as exc:  # a user's forward may raise anything
                raise ModelError(
                    f"{role} {self.source!r} fails on inputs of shape {(_PROBE_BATCH, *input_shape)} "
                    f"({type(exc).__name__}: {first_line(exc)[:140]}); make the model take the data's "
                    "inputs or choose data that fits it"
                ) from None
        if not isinstance(output, torch.Tensor):
            raise ModelError(
                f"{role} {self.source!r} returns a {type(output).__name__}, not a tensor of logits; "
                "make forward return logits of shape (batch, num_classes)"
            )
        if output.shape != (_PROBE_BATCH, self.num_classes):
            width = output.shape[-1] if output.ndim else "no"
            raise ModelError(
                f"{role} {self.source!r} gives outputs of shape {tuple(output.shape)} for a batch of "
                f"{_PROBE_BATCH} ({width} per sample), but the data has {self.num_classes} classes; build "
                "the model with num_classes outputs (the factory receives num_classes)"
            )
        return output

    def _split_reproduces(self, probe: torch.Tensor, reference: torch.Tensor) -> bool:
        with _evaluating(self):
            try:
                split = self.forward(probe)
            except Exception:  # the classifier's input is not what the linear layer sees
                return False
        return split.shape == reference.shape and torch.allclose(split, reference, rtol=1e-4, atol=1e-5)

    def _named_hint_layers(self, names: list[str], role: str) -> tuple[str, ...]:
        modules = [path for path, _ in self.net.named_modules() if path]
        chosen = []
        for name in names:
            inner = name.removeprefix("net.") if name not in modules else name
            if inner not in modules:
                close = difflib.get_close_matches(inner, modules, n=_SHOWN, cutoff=0.4)
                shown = close or [path for path, _ in self.net.named_children()][:_SHOWN]
                raise RecipeError(
                    f"{role}.hint_layers: {name!r} is not a module of {self.source}; "
                    f"{'close names' if close else 'its top-level modules'}: {', '.join(shown)}"
                )
            chosen.append(f"net.{inner}")
        return tuple(chosen)

    def _stage_ends(self, probe: torch.Tensor) -> tuple[str, ...]:
        """The last top-level child of each run of equal spatial size (at most the last four)."""
        children = list(self.net.named_children())
        prefix = "net."
        if len(children) == 1 and isinstance(children[0][1], nn.Sequential):
            prefix = f"net.{children[0][0]}."
            children = list(children[0][1].named_children())
        seen: dict[str, tuple[int, ...]] = {}

        def record(name: str) -> Callable[..., None]:
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                is_map = (
                    isinstance(output, torch.Tensor)
                    and output.ndim >= 3
                    and output.shape[0] == _PROBE_BATCH
                    and output.shape[2:].numel() > 1
                )
                if is_map and name not in seen:
                    seen[name] = tuple(output.shape[2:])

            return hook

        handles = [module.register_forward_hook(record(name)) for name, module in children]
        try:
            with _evaluating(self):
                self.forward(probe)
        finally:
            for handle in handles:
                handle.remove()
        order = list(seen.items())  # call order
        ends = [
            name for i, (name, size) in enumerate(order) if i + 1 == len(order) or order[i + 1][1] != size
        ]
        return tuple(prefix + name for name in ends[-MAX_HINT_LAYERS:])


# ---------------------------------------------------------------- recipe checks


def refuse_feature_maps(method_name: str, teacher: str) -> None:
    """A RecipeError when ``method_name`` needs the teacher's feature maps and ``teacher`` is ONNX."""
    from edgekd.distill.methods import METHODS

    if is_onnx(teacher) and METHODS.get(method_name).needs_feature_maps:
        raise RecipeError(
            f"method {method_name} needs the teacher's feature maps, which an ONNX teacher ({teacher}) "
            "does not give; use a logit or embedding method (kd, skd, dkd, ...) as distill.method"
        )


def check_model_sources(recipe: Any) -> None:
    """The recipe's model names, cheaply: each source resolves (file, module, factory, registry name);
    ``onnx:`` only as the teacher (or the model of ``edgekd deploy``), without a checkpoint or
    pretrained weights, and not with a method that needs the teacher's feature maps."""
    from edgekd.models import model_factory

    teacher, student = recipe.teacher, recipe.student
    deploy = getattr(recipe, "mode", "compress") == "deploy"
    if not deploy:
        model_factory(teacher.model)
        if is_onnx(teacher.model):
            for field, value in (("checkpoint", teacher.checkpoint), ("pretrained", teacher.pretrained)):
                if value:
                    raise ModelError(
                        f"teacher.{field}: an ONNX teacher ({teacher.model}) carries its own weights; "
                        f"remove teacher.{field}"
                    )
            refuse_feature_maps(recipe.distill.method, teacher.model)
        if is_onnx(student.model):
            raise ModelError(
                f"student {student.model!r}: an ONNX model cannot be trained as a student; to quantise, "
                f"compile and profile it as it is, run: edgekd deploy {onnx_path(student.model)}"
            )
    model_factory(student.model)
