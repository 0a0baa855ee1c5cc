"""Stage 7: the deployable bundle ``<run>/bundle/<target>/`` (artifacts, manifest, C array, checksums).

It follows profile because what it embeds is the deployment decision (:mod:`edgekd.deployment`), made
from the profile stage's measurements: the fastest artifact within the accuracy budget, unless
``bundle.artifact`` pins one. It precedes remote, which profiles this very bundle on a device, and
report, which names the same decision. The stage's ``deployment`` output is that decision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekd.bundle.build import bundle_files, deployment_decision, write_decided_bundle
from edgekd.pipeline import RunContext, Stage, recipe_fields


def _inputs(ctx: RunContext) -> list[Path]:
    """The artifacts and the compile/quantize/profile records: provenance goes in the manifest, and a
    new measurement may change the decision."""
    artifacts = [ctx.run_dir / name for name in ctx.output("compile", "artifact_files")]
    records = [ctx.results[name].record_file for name in ("compile", "quantize", "profile")]
    return [*artifacts, *records]


def _config(recipe: Any) -> dict[str, Any]:
    """The recipe's seed, data, target and bundle sections, and the accuracy budget of the decision."""
    return {
        **recipe_fields("seed", "data", "target", "bundle")(recipe),
        "max_accuracy_drop": recipe.quantize.max_accuracy_drop,
    }


def _run(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    decision = deployment_decision(ctx)
    directory = write_decided_bundle(ctx, decision)
    ctx.log(f"  deployment: {decision['reason']}")
    ctx.log(f"  bundle: {directory}")
    return {
        "bundle_dir": str(directory.relative_to(ctx.run_dir)),
        "bundle_files": bundle_files(directory, ctx.run_dir),
        "deployment": decision,
    }


STAGE = Stage("bundle", _run, _config, _inputs)
