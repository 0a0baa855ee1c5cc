"""The pipeline's stages, in order. Each is one small module wiring library parts to the run dir.

``compress`` runs :data:`PIPELINE` (teacher, distillation, then export onward); ``deploy`` runs
:data:`DEPLOY_PIPELINE`, whose ``model`` stage takes a model trained elsewhere as the student.
"""

from edgekd.pipeline import Stage
from edgekd.recipe import Recipe
from edgekd.stages import (
    bundle,
    compile,
    distill,
    export,
    model_import,
    profile,
    quantize,
    remote,
    report,
    teacher,
)

PIPELINE: list[Stage] = [
    teacher.STAGE,
    distill.STAGE,
    export.STAGE,
    quantize.STAGE,
    compile.STAGE,
    profile.STAGE,
    bundle.STAGE,  # after profile: it embeds the deployment decision made from the measurements
    remote.STAGE,  # after bundle: it profiles this bundle on the device
    report.STAGE,
]
STAGE_NAMES = [stage.name for stage in PIPELINE]

DEPLOY_PIPELINE: list[Stage] = [model_import.STAGE, *PIPELINE[2:]]
DEPLOY_STAGE_NAMES = [stage.name for stage in DEPLOY_PIPELINE]


def pipeline_for(recipe: Recipe) -> list[Stage]:
    """The stages of the recipe's mode: compress (distil a student) or deploy (a model as it is)."""
    return DEPLOY_PIPELINE if recipe.mode == "deploy" else PIPELINE
