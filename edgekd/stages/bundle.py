"""Stage 6: the deployable bundle ``<run>/bundle/<target>/`` (artifacts, manifest, C array, checksums).

It follows compile (not report) because the remote stage profiles this very bundle on a device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekd.bundle.build import bundle_files, write_bundle
from edgekd.pipeline import RunContext, Stage, recipe_fields


def _inputs(ctx: RunContext) -> list[Path]:
    """The artifacts and the compile/quantize records (quantisation provenance goes in the manifest)."""
    artifacts = [ctx.run_dir / name for name in ctx.output("compile", "artifact_files")]
    return [*artifacts, ctx.results["compile"].record_file, ctx.results["quantize"].record_file]


def _run(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    directory = write_bundle(ctx)
    ctx.log(f"  bundle: {directory}")
    return {
        "bundle_dir": str(directory.relative_to(ctx.run_dir)),
        "bundle_files": bundle_files(directory, ctx.run_dir),
    }


STAGE = Stage("bundle", _run, recipe_fields("seed", "data", "target", "bundle"), _inputs)
