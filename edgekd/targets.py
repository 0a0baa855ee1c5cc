"""Deployment targets: one YAML per device in ``targets/`` (backend, precisions, arch, hardware, specs).

Each file is validated against :class:`TargetFile`; a bad file is one ``RecipeError`` naming the
file, the field, the value and what is expected.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgekd.errors import RecipeError
from edgekd.registry import Registry

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"
# Names the OS may report for the same instruction set (macOS and Debian say arm64 / amd64).
_ARCH_NAMES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}


def normalise_arch(name: str) -> str:
    """``aarch64`` for arm64, ``x86_64`` for amd64; other names unchanged (lower case)."""
    lowered = name.strip().lower()
    return _ARCH_NAMES.get(lowered, lowered)


def host_arch() -> str:
    return normalise_arch(platform.machine())


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CpuSpec(_Strict):
    model: str
    cores: int = Field(ge=1)
    max_clock_ghz: float | None = Field(None, gt=0)


class GpuSpec(_Strict):
    architecture: str
    sm_count: int = Field(ge=1)
    cuda_cores: int = Field(ge=1)
    tensor_cores: int = Field(0, ge=0)
    max_clock_mhz: float | None = Field(None, gt=0)


class McuSpec(_Strict):
    """A microcontroller's core, clock and memories (from its datasheet): the fit check's budget."""

    core: Literal["cortex-m4", "cortex-m7", "cortex-m55"]
    part: str = Field(description="the datasheet's part, e.g. nRF52840")
    clock_mhz: float = Field(gt=0)
    sram_kb: float = Field(gt=0, description="on-chip SRAM usable for the tensor arena and I/O, KiB")
    flash_kb: float = Field(gt=0, description="on-chip flash (or MRAM) for code and the model, KiB")
    dsp: bool = Field(True, description="Armv7E-M DSP extension (SMLAD): CMSIS-NN's fast path")
    helium: bool = Field(False, description="M-profile vector extension (MVE), Cortex-M55")
    datasheet: str = Field(min_length=1, description="document and revision the figures come from")


class PeakSpecs(_Strict):
    """Peak throughput (dense, no structured sparsity) and memory; null where unknown."""

    peak_int8_tops: float | None = Field(None, ge=0, description="GPU/CPU dense INT8, tera-ops per second")
    peak_fp16_tflops: float | None = Field(None, ge=0)
    peak_fp32_tflops: float | None = Field(None, ge=0)
    dla_int8_tops: float | None = Field(None, ge=0, description="all DLA cores together, dense INT8")
    memory_gb: float | None = Field(None, gt=0)
    memory_bandwidth_gbs: float | None = Field(None, gt=0)


class TargetFile(_Strict):
    """The schema of a ``targets/*.yaml`` file."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    aliases: list[str] = Field(default_factory=list)
    description: str = ""
    backend: str
    precisions: list[Literal["fp32", "fp16", "int8"]] = Field(min_length=1)
    arch: str = Field("", description="x86_64 or aarch64 (arm64); empty: any")
    software: dict[str, str] = Field(default_factory=dict, description="e.g. jetpack, tensorrt, cuda")
    cpu: CpuSpec | None = None
    gpu: GpuSpec | None = None
    dla_cores: int = Field(0, ge=0)
    specs: PeakSpecs = Field(default_factory=PeakSpecs)
    device: str | None = Field(None, description="user@host[:port] of a device to profile on over SSH")
    mcu: McuSpec | None = None

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        arch = normalise_arch(value) if value else ""
        if arch not in ("", "x86_64", "aarch64"):
            raise ValueError("must be x86_64 or aarch64 (arm64)")
        return arch

    @field_validator("software", mode="before")
    @classmethod
    def _versions_as_text(cls, value: Any) -> Any:
        # YAML reads 6.2 as a float; versions are text.
        return {k: str(v) for k, v in value.items()} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _consistent(self) -> TargetFile:
        from edgekd.backends import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS.names())}")
        backend = BACKENDS.get(self.backend)
        unsupported = [p for p in self.precisions if p not in backend.precisions]
        if unsupported:
            raise ValueError(
                f"precisions {unsupported} are not built by backend {self.backend!r} "
                f"(it builds {', '.join(backend.precisions)})"
            )
        if len(set(self.precisions)) != len(self.precisions):
            raise ValueError(f"precisions {self.precisions} list one twice")
        if self.dla_cores and self.backend != "tensorrt":
            raise ValueError(f"dla_cores {self.dla_cores} needs backend 'tensorrt', not {self.backend!r}")
        if self.backend == "litert" and self.mcu is None:
            raise ValueError("backend 'litert' needs an mcu section (core, clock_mhz, sram_kb, flash_kb)")
        if self.backend == "tensorrt" and self.gpu is None:
            raise ValueError("backend 'tensorrt' needs a gpu section (architecture, sm_count, cuda_cores)")
        return self


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
    software: dict[str, str] = field(default_factory=dict)
    cpu: dict[str, Any] | None = None
    gpu: dict[str, Any] | None = None
    dla_cores: int = 0
    device: str | None = None
    source: Path | None = None
    mcu: dict[str, Any] | None = None

    def matches_host(self) -> bool:
        """Whether this machine has the target's CPU architecture (profiling here is meaningful)."""
        return not self.arch or self.arch == host_arch()

    def host_problems(self) -> list[str]:
        """Why this target cannot be compiled and profiled on this host (empty when it can)."""
        from edgekd.backends import BACKENDS

        problems = []
        if not self.matches_host():
            problems.append(f"arch mismatch: target is {self.arch}, this host is {host_arch()}")
        ok, why = BACKENDS.get(self.backend)().available()
        if not ok:
            problems.append(why)
        return problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": self.backend,
            "precisions": list(self.precisions),
            "description": self.description,
            "arch": self.arch,
            "aliases": list(self.aliases),
            "software": self.software,
            "cpu": self.cpu,
            "gpu": self.gpu,
            "dla_cores": self.dla_cores,
            "specs": self.specs,
            "device": self.device,
            **({"mcu": self.mcu} if self.mcu else {}),
        }


def _describe(error: dict[str, Any]) -> str:
    dotted = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown field {dotted!r}"
    if error["type"] == "missing":
        return f"missing field {dotted!r}"
    where = f"field {dotted!r} = {error.get('input')!r}: " if dotted else ""
    return f"{where}{error['msg'].removeprefix('Value error, ')}"


def read_target(path: Path) -> Target:
    """The target described by ``path``; one RecipeError naming the file and the field when it is bad."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(
            f"target file {path}: malformed YAML ({exc.__class__.__name__}); fix its syntax"
        ) from None
    if not isinstance(data, dict):
        raise RecipeError(f"target file {path}: expected a mapping of fields")
    try:
        spec = TargetFile.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"target file {path}: {_describe(exc.errors()[0])}") from None
    return Target(
        name=spec.name,
        backend=spec.backend,
        precisions=tuple(spec.precisions),
        description=spec.description,
        arch=spec.arch,
        aliases=tuple(spec.aliases),
        specs=spec.specs.model_dump(),
        software=dict(spec.software),
        cpu=spec.cpu.model_dump() if spec.cpu else None,
        gpu=spec.gpu.model_dump() if spec.gpu else None,
        dla_cores=spec.dla_cores,
        device=spec.device,
        source=Path(path),
        mcu=spec.mcu.model_dump() if spec.mcu else None,
    )


def load_targets(directory: Path = TARGETS_DIR) -> dict[str, Target]:
    """All targets by name, read from ``directory``; two files claiming one name or alias is an error."""
    targets: dict[str, Target] = {}
    claimed: dict[str, Path | None] = {}
    for path in sorted(directory.glob("*.yaml")):
        target = read_target(path)
        for name in (target.name, *target.aliases):
            if name in claimed:
                raise RecipeError(
                    f"target file {path}: name or alias {name!r} is already used by {claimed[name]}; "
                    f"rename one"
                )
            claimed[name] = path
        targets[target.name] = target
    return targets


def resolve_target(name: str, directory: Path = TARGETS_DIR) -> Target:
    """The target called ``name`` or aliased so; a clear RecipeError listing known ones otherwise."""
    registry: Registry[Target] = Registry("target")
    for target in load_targets(directory).values():
        registry.register(target.name, target.aliases)(target)
    return registry.get(name)
