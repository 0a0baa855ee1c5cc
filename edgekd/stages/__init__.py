"""The pipeline's stages, in order. Each is one small module wiring library parts to the run dir."""

from edgekd.pipeline import Stage
from edgekd.stages import bundle, compile, distill, export, profile, quantize, remote, report, teacher

PIPELINE: list[Stage] = [
    teacher.STAGE,
    distill.STAGE,
    export.STAGE,
    quantize.STAGE,
    compile.STAGE,
    bundle.STAGE,  # before profile: the remote stage profiles this bundle on the device
    profile.STAGE,
    remote.STAGE,
    report.STAGE,
]
STAGE_NAMES = [stage.name for stage in PIPELINE]
