"""Deployment targets: one YAML per device in ``targets/`` (backend, precisions, arch, specs)."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgekd.errors import RecipeError
from edgekd.registry import Registry

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"
_REQUIRED = ("name", "backend", "precisions")


@dataclass(frozen=True)
class Target:
    """A device kind a model is compiled and profiled for."""

    name: str
    backend: str
    precisions: tuple[str, ...]
    description: str = ""
    arch: str = ""
    aliases: tuple[str, ...] = ()
    specs: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    def matches_host(self) -> bool:
        """Whether this machine has the target's CPU architecture (profiling here is meaningful)."""
        return not self.arch or self.arch == platform.machine()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": self.backend,
            "precisions": list(self.precisions),
            "description": self.description,
            "arch": self.arch,
            "aliases": list(self.aliases),
            "specs": self.specs,
        }


def _read_target(path: Path) -> Target:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(
            f"target file {path}: malformed YAML ({exc.__class__.__name__}); fix its syntax"
        ) from None
    if not isinstance(data, dict):
        raise RecipeError(f"target file {path}: expected a mapping of fields")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise RecipeError(f"target file {path}: missing field(s) {', '.join(missing)}")
    return Target(
        name=str(data["name"]),
        backend=str(data["backend"]),
        precisions=tuple(data["precisions"]),
        description=str(data.get("description", "")),
        arch=str(data.get("arch", "")),
        aliases=tuple(data.get("aliases", ())),
        specs=dict(data.get("specs") or {}),
        source=path,
    )


def load_targets(directory: Path = TARGETS_DIR) -> dict[str, Target]:
    """All targets by name, read from ``directory``."""
    targets = [_read_target(path) for path in sorted(directory.glob("*.yaml"))]
    return {target.name: target for target in targets}


def resolve_target(name: str, directory: Path = TARGETS_DIR) -> Target:
    """The target called ``name`` or aliased so; a clear RecipeError listing known ones otherwise."""
    registry: Registry[Target] = Registry("target")
    for target in load_targets(directory).values():
        registry.register(target.name, target.aliases)(target)
    return registry.get(name)
