"""Review findings of issues 11 and 13: one rule per thing (model paths, shipped teachers, ORT threads),
a quiet bundle rerun, per-process bundle temporaries, a report that follows ``edgekd bundle --artifact``,
``search-student`` refusing an ONNX teacher, and runs from before the stage reorder."""

import json
import os
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from edgekd import teachers
from edgekd.api import bundle as write_bundle
from edgekd.api import check_builtin_teacher
from edgekd.bundle.checksums import MANIFEST_FILE
from edgekd.bundle.verify import verify_bundle
from edgekd.errors import OutputError, RecipeError
from edgekd.objects import model_argument
from edgekd.recipe import load_recipe
from edgekd.stages.model_import import model_source
from tests.test_bundle import tiny_run  # noqa: F401  (the session's tiny finished run)
from tests.test_cli import assert_user_error, run_cli

SHIPPED = "clst-radio-synthetic"


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


# --- 1. a model path becomes a source by one rule -------------------------------------------------


def test_the_api_and_deploy_turn_a_model_path_into_a_source_by_one_rule(tmp_path: Path):
    for value in ("model.onnx", "dir/Model.ONNX", "timm:resnet18", "onnx:x.onnx", "py:m.py:f"):
        assert model_argument(value, "student", tmp_path) == (model_source(value), None)
    assert model_source("dir/Model.ONNX") == "onnx:dir/Model.ONNX"  # any case, as edgekd deploy takes it
    assert model_argument(Path("m.onnx"), "teacher", tmp_path) == ("onnx:m.onnx", None)
    with pytest.raises(RecipeError, match=r"teacher='w.pt': a file must be an .onnx model"):
        model_argument(Path("w.pt"), "teacher", tmp_path)


# --- 3. the shipped teacher's task comes from its JSON ---------------------------------------------


def _ship(directory: Path, name: str, model: str, data: str) -> None:
    (directory / f"{name}.safetensors").write_bytes(b"weights")  # the recipe checks names, not weights
    (directory / f"{name}.json").write_text(json.dumps({"model": model, "data": {"name": data}}))


def test_a_second_shipped_teacher_is_its_two_files(tmp_path: Path, monkeypatch):
    shutil.copy(teachers.SHIPPED_DIR / f"{SHIPPED}.json", tmp_path / f"{SHIPPED}.json")
    (tmp_path / f"{SHIPPED}.safetensors").write_bytes(b"weights")
    _ship(tmp_path, "kd-cnn-digits", "edgekd:kd-cnn", "digits")
    monkeypatch.setattr(teachers, "SHIPPED_DIR", tmp_path)
    teachers.task_of.cache_clear()
    try:
        assert teachers.names() == [SHIPPED, "kd-cnn-digits"]
        assert load_recipe().teacher.checkpoint == tmp_path / f"{SHIPPED}.safetensors"
        # the default follows the task to the teacher shipped for it, else none (trained on the labels)
        digits = load_recipe(None, ["data.name=digits", "teacher.model=edgekd:kd-cnn"])
        assert digits.teacher.checkpoint == tmp_path / "kd-cnn-digits.safetensors"
        check_builtin_teacher(digits)
        assert load_recipe(None, ["data.name=digits"]).teacher.checkpoint is None
        explicit = load_recipe(None, ["teacher.checkpoint=builtin:kd-cnn-digits"])
        with pytest.raises(RecipeError, match=r"kd-cnn-digits is the shipped teacher for teacher.model"):
            check_builtin_teacher(explicit)
    finally:
        teachers.task_of.cache_clear()


# --- 6. ONNX Runtime outside profiling uses edgekd's thread sizing -----------------------------------


def test_onnx_runtime_sessions_take_pytorchs_intra_op_thread_count(tmp_path: Path):
    from edgekd.backends.onnxruntime import cpu_session, host_threads

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    before = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            assert host_threads() == count
            assert cpu_session(path).get_session_options().intra_op_num_threads == count
            assert cpu_session(path.read_bytes()).get_session_options().intra_op_num_threads == count
    finally:
        torch.set_num_threads(before)


# --- 7. search-student with an ONNX teacher ---------------------------------------------------------


def test_search_student_refuses_an_onnx_teacher_before_any_work(tmp_path: Path):
    teacher = tmp_path / "teacher.onnx"
    teacher.write_bytes(b"never read")
    runs = tmp_path / "runs"
    result = run_cli(
        "search-student",
        "--teacher",
        f"onnx:{teacher}",
        "--candidates",
        "edgekd:cnn",
        "--set",
        f"runs_dir={runs}",
    )
    assert_user_error(result, f"onnx:{teacher}", "needs the teacher's feature maps and their gradients")
    assert not runs.exists()


# --- 4, 5, 8. the bundle command ----------------------------------------------------------------------


def _state(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.iterdir())}


def test_an_unchanged_bundle_is_kept_as_it_is(tiny_run: Path):  # noqa: F811
    directory = write_bundle(tiny_run)  # the run's own decision
    before = _state(directory)
    created = json.loads((directory / MANIFEST_FILE).read_text())["created"]
    assert write_bundle(tiny_run) == directory
    assert _state(directory) == before  # same bytes, not even rewritten
    assert json.loads((directory / MANIFEST_FILE).read_text())["created"] == created
    assert not list(directory.parent.glob(".*"))


def test_bundle_temporaries_are_named_per_process_and_dead_ones_removed(tiny_run: Path):  # noqa: F811
    parent = tiny_run / "bundle"
    dead = parent / ".x86-ort.999999999.abcdef"  # no such PID
    alive = parent / f".x86-ort.{os.getppid()}.abcdef"  # a live process's work in progress
    for work in (dead, alive):
        work.mkdir()
        (work / "student.fp32.onnx").write_bytes(b"partial")
    try:
        write_bundle(tiny_run)
        assert not dead.exists() and alive.is_dir()
    finally:
        shutil.rmtree(alive, ignore_errors=True)


def test_the_report_follows_a_repinned_bundle(tiny_run: Path):  # noqa: F811
    directory = tiny_run / "bundle" / "x86-ort"
    try:
        for precision in ("fp32", "int8"):
            result = run_cli("bundle", str(tiny_run), "--artifact", precision)
            assert result.returncode == 0, result.stderr
            assert f"report: {tiny_run / 'report.md'}" in result.stdout
            manifest = json.loads((directory / MANIFEST_FILE).read_text())
            report = json.loads((tiny_run / "report.json").read_text())
            file = f"student.{precision}.onnx"
            assert manifest["firmware"]["artifact"] == manifest["deployment"]["file"] == file
            assert report["deployment"]["file"] == file and report["deployment"]["how"] == "pinned"
            assert report["headline"]["deployed"] == report["deployment"]["row"]
            assert precision.upper() in report["headline"]["deployed"]
            markdown = (tiny_run / "report.md").read_text()
            assert report["deployment"]["reason"] in markdown
            verify_bundle(directory)
    finally:
        write_bundle(tiny_run)  # back to the run's own decision, report included, for the other tests
    report = json.loads((tiny_run / "report.json").read_text())
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    assert report["deployment"]["file"] == manifest["deployment"]["file"]
    assert report["deployment"]["how"] != "pinned"


# --- 9. runs made before the stage reorder -------------------------------------------------------------


def test_a_run_from_before_the_stage_reorder_is_one_line(tiny_run: Path, tmp_path: Path):  # noqa: F811
    old = Path(shutil.copytree(tiny_run, tmp_path / "old"))
    profile, bundle = old / "06-profile", old / "07-bundle"
    profile.rename(old / "07-profile.tmp")
    bundle.rename(old / "06-bundle")
    (old / "07-profile.tmp").rename(old / "07-profile")  # the layout before bundle followed profile
    with pytest.raises(OutputError, match=r"older edgekd .*\(07-profile/ where this one reads 06-profile/\)"):
        write_bundle(old)
    assert_user_error(run_cli("bundle", str(old)), "rerun the edgekd compress command", "--force profile")
