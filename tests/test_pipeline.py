"""The stage runner: fingerprints, caching, --force, atomic stage records, unwritable run dirs."""

import json
import os
from pathlib import Path

import pytest

from edgekd.errors import OutputError, RecipeError
from edgekd.pipeline import STAGE_FILE, RunContext, Stage, run_stages
from edgekd.recipe import Recipe


def _stages(calls: list[str], fail_second: bool = False) -> list[Stage]:
    def first(ctx: RunContext, stage_dir: Path) -> dict:
        calls.append("first")
        (stage_dir / "a.txt").write_text(str(ctx.recipe.seed))
        return {"a_file": str((stage_dir / "a.txt").relative_to(ctx.run_dir))}

    def second(ctx: RunContext, stage_dir: Path) -> dict:
        calls.append("second")
        if fail_second:
            raise RuntimeError("crash")
        text = ctx.path("first", "a_file").read_text()
        return {"value": int(text) * 2}

    return [
        Stage("first", first, lambda r: {"seed": r.seed}),
        Stage(
            "second",
            second,
            lambda r: {"temperature": r.distill.temperature},
            lambda ctx: [ctx.path("first", "a_file")],
        ),
    ]


def _run(tmp_path: Path, calls: list[str], force=None, fail_second=False, seed=3, temperature=4.0):
    recipe = Recipe(seed=seed, runs_dir=tmp_path, name="t")
    recipe.distill.temperature = temperature
    ctx = RunContext(recipe=recipe, run_dir=recipe.run_dir, log=lambda _: None)
    return run_stages(ctx, _stages(calls, fail_second), force=force)


def test_second_run_is_fully_cached(tmp_path: Path):
    calls: list[str] = []
    results = _run(tmp_path, calls)
    assert results["second"].outputs["value"] == 6 and not results["second"].cached
    results = _run(tmp_path, calls)
    assert calls == ["first", "second"]
    assert results["first"].cached and results["second"].cached
    record = json.loads((tmp_path / "t" / "02-second" / STAGE_FILE).read_text())
    assert record["fingerprint"] == results["second"].fingerprint and record["wall_s"] >= 0


def test_config_change_reruns_only_the_affected_stage(tmp_path: Path):
    calls: list[str] = []
    _run(tmp_path, calls)
    _run(tmp_path, calls, temperature=2.0)
    assert calls == ["first", "second", "second"]


def test_input_change_propagates(tmp_path: Path):
    calls: list[str] = []
    _run(tmp_path, calls)
    results = _run(tmp_path, calls, seed=5)
    assert calls == ["first", "second", "first", "second"]
    assert results["second"].outputs["value"] == 10


def test_force_reruns_named_stage(tmp_path: Path):
    calls: list[str] = []
    _run(tmp_path, calls)
    _run(tmp_path, calls, force={"second"})
    assert calls == ["first", "second", "second"]
    with pytest.raises(RecipeError, match="no such stage"):
        _run(tmp_path, calls, force={"secnd"})


def test_crashed_stage_leaves_no_record_and_reruns(tmp_path: Path):
    calls: list[str] = []
    with pytest.raises(RuntimeError):
        _run(tmp_path, calls, fail_second=True)
    assert (tmp_path / "t" / "01-first" / STAGE_FILE).is_file()
    assert not (tmp_path / "t" / "02-second" / STAGE_FILE).exists()
    _run(tmp_path, calls)
    assert calls == ["first", "second", "second"]


def test_deleted_output_invalidates_cache(tmp_path: Path):
    calls: list[str] = []
    _run(tmp_path, calls)
    (tmp_path / "t" / "01-first" / "a.txt").unlink()
    _run(tmp_path, calls)
    assert calls == ["first", "second", "first"]  # same content again: the second stage stays cached


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root can write anywhere; covered by the file-as-directory case"
)
def test_unwritable_run_dir(tmp_path: Path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="cannot write the run directory"):
            _run(tmp_path, [])
    finally:
        tmp_path.chmod(0o700)


def test_run_dir_under_a_file_is_a_clear_error(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    recipe = Recipe(runs_dir=blocker, name="t")
    with pytest.raises(OutputError, match=str(blocker)):
        run_stages(RunContext(recipe=recipe, run_dir=recipe.run_dir, log=lambda _: None), _stages([]))
