"""The pipeline's stages, in order. Each is one small module wiring library parts to the run dir."""

from edgekd.pipeline import Stage
from edgekd.stages import compile, distill, export, profile, quantize, report, teacher

PIPELINE: list[Stage] = [
    teacher.STAGE,
    distill.STAGE,
    export.STAGE,
    quantize.STAGE,
    compile.STAGE,
    profile.STAGE,
    report.STAGE,
]
STAGE_NAMES = [stage.name for stage in PIPELINE]
