"""A damaged run directory: changed outputs, unreadable records, stale temporary files, full disks,
unwritable caches, divergent training, --force and resume on the real teacher/distill stages."""

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekd import atomic
from edgekd.api import compress, finished_run
from edgekd.data.base import ArrayDataset
from edgekd.distill.methods import build_method
from edgekd.distill.outputs import probe_shape
from edgekd.distill.teacher_cache import ENTRY_FILE, cached_teacher_outputs
from edgekd.distill.trainer import LATEST, train
from edgekd.errors import OutputError, TrainingError
from edgekd.hashing import sha256_file, sha256_state
from edgekd.models import build_model
from edgekd.pipeline import STAGE_FILE, RunContext, Stage, run_stages
from edgekd.recipe import DistillSpec, Recipe, TrainSpec, load_recipe

# ---------------------------------------------------------------- the stage runner, on tiny stages


def _stages(calls: list[str]) -> list[Stage]:
    def first(ctx: RunContext, stage_dir: Path) -> dict:
        calls.append("first")
        atomic.write_text(stage_dir / "a.txt", "payload " * 50)
        (stage_dir / "checkpoint.bin").write_bytes(b"resume me")  # like latest.pt: not an output
        return {"a_file": str((stage_dir / "a.txt").relative_to(ctx.run_dir))}

    def second(ctx: RunContext, stage_dir: Path) -> dict:
        calls.append("second")
        return {"length": len(ctx.path("first", "a_file").read_text())}

    return [
        Stage("first", first, lambda r: {"seed": r.seed}),
        Stage("second", second, lambda r: {}, lambda ctx: [ctx.path("first", "a_file")]),
    ]


def _run(tmp_path: Path, calls: list[str], force=None, log=None):
    recipe = Recipe(runs_dir=tmp_path, name="t")
    ctx = RunContext(recipe=recipe, run_dir=recipe.run_dir, log=(log.append if log is not None else print))
    return run_stages(ctx, _stages(calls), force=force)


def test_stage_json_records_the_sha256_of_every_output(tmp_path: Path):
    _run(tmp_path, [])
    record = json.loads((tmp_path / "t" / "01-first" / STAGE_FILE).read_text())
    assert record["files"] == {"01-first/a.txt": sha256_file(tmp_path / "t" / "01-first" / "a.txt")}


@pytest.mark.parametrize("damage", ["flip", "truncate", "zero"])
def test_a_changed_output_reruns_its_stage_and_says_so(tmp_path: Path, damage: str):
    calls: list[str] = []
    _run(tmp_path, calls)
    output = tmp_path / "t" / "01-first" / "a.txt"
    data = bytearray(output.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "zero":
        data = bytearray(len(data))
    else:
        data = data[: len(data) // 3]
    output.write_bytes(bytes(data))
    log: list[str] = []
    results = _run(tmp_path, calls, log=log)
    assert "[first] a.txt changed since it was written (sha256 mismatch); rerunning" in log
    assert calls == ["first", "second", "first"]  # same content again: the second stage stays cached
    assert results["second"].cached and output.read_text() == "payload " * 50


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\xff\xfe{not utf-8", "is not valid UTF-8"),
        (b"[1, 2, 3]", "holds a JSON list, not an object"),
        (b'{"fingerprint": 3, "outputs": [], "wall_s": "x", "files": {}}', "has no valid 'fingerprint'"),
        (b'{"fingerprint": "f", "outputs": {}, "wall_s": 1.0', "is not valid JSON"),
        (b'{"fingerprint": "f", "outputs": {}, "wall_s": 1.0}', "records no file hashes"),
    ],
)
def test_an_unusable_stage_json_means_not_finished(tmp_path: Path, content: bytes, why: str):
    calls: list[str] = []
    _run(tmp_path, calls)
    (tmp_path / "t" / "02-second" / STAGE_FILE).write_bytes(content)
    log: list[str] = []
    results = _run(tmp_path, calls, log=log)
    assert calls == ["first", "second", "second"] and not results["second"].cached
    assert any(line.startswith(f"[second] 02-second/stage.json {why}") for line in log), log
    assert json.loads((tmp_path / "t" / "02-second" / STAGE_FILE).read_text())["outputs"]["length"] == 400


def test_force_removes_the_stage_folder_first(tmp_path: Path):
    calls: list[str] = []
    _run(tmp_path, calls)
    stale = tmp_path / "t" / "01-first" / "checkpoint.bin"
    stale.write_bytes(b"from the previous run")
    log: list[str] = []
    _run(tmp_path, calls, force={"first"}, log=log)
    assert "[first] --force: removed 01-first/ (outputs and checkpoints)" in log
    assert stale.read_bytes() == b"resume me"  # written afresh by the forced run
    assert calls == ["first", "second", "first"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _aged(path: Path, content: bytes = b"half") -> Path:
    path.write_bytes(content)
    past = time.time() - 3600
    os.utime(path, (past, past))
    return path


def test_temporary_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path: Path):
    calls: list[str] = []
    _run(tmp_path, calls)
    stage_dir, run_dir = tmp_path / "t" / "01-first", tmp_path / "t"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _aged(stage_dir / f".a.txt.{_dead_pid()}.abcd_123.tmp")
        dead_top = _aged(run_dir / f".report.json.{_dead_pid()}.zz99zz99.tmp")
        legacy = _aged(stage_dir / ".teacher.pt.k3j4h5g6.tmp")  # written before the PID was in the name
        live = _aged(stage_dir / f".a.txt.{sleeper.pid}.abcd_124.tmp")
        mine = _aged(stage_dir / f".a.txt.{os.getpid()}.abcd_125.tmp")
        fresh = stage_dir / f".a.txt.{_dead_pid()}.abcd_126.tmp"
        fresh.write_bytes(b"written after this process started")
        other = _aged(stage_dir / ".keep.me.tmp")  # not atomic.py's naming
        log: list[str] = []
        _run(tmp_path, calls, log=log)
        assert not dead.exists() and not dead_top.exists() and not legacy.exists()
        assert live.exists() and mine.exists() and fresh.exists() and other.exists()
        assert any("removed 3 temporary file(s)" in line for line in log), log
        assert calls == ["first", "second"]  # cleaning does not invalidate finished stages
    finally:
        sleeper.kill()
        sleeper.wait()


def test_atomic_temporary_names_carry_the_writer_pid(tmp_path: Path):
    with atomic.atomic_path(tmp_path / "out.bin") as tmp:
        assert tmp.name.startswith(f".out.bin.{os.getpid()}.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"x")
    assert (tmp_path / "out.bin").read_bytes() == b"x" and list(tmp_path.iterdir()) == [tmp_path / "out.bin"]


# ------------------------------------------------------------------------- disk full, unwritable


def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails as on a full disk, at the atomic write boundary (a real full disk cannot be
    made safely here: no tmpfs, no loop devices)."""

    real = Path.write_bytes

    def full(self: Path, data: bytes) -> int:
        if not self.name.endswith(".tmp"):  # only atomic writes fail (not the run-dir probe)
            return real(self, data)
        with open(self, "wb") as handle:
            handle.write(data[: len(data) // 2])  # half the bytes reach the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_bytes", full)


def test_a_full_disk_is_one_line_leaves_nothing_half_written_and_a_rerun_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    calls: list[str] = []
    with monkeypatch.context() as patch:
        _disk_full(patch)
        with pytest.raises(OutputError) as caught:
            _run(tmp_path, calls, log=[])
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "t" / "01-first" / "a.txt") in message
    assert "No space left on device" in message and "free space" in message
    stage_dir = tmp_path / "t" / "01-first"
    assert not (stage_dir / "a.txt").exists() and not (stage_dir / STAGE_FILE).exists()
    assert not list(stage_dir.glob(".*.tmp"))  # the half-written temporary file is gone
    results = _run(tmp_path, calls, log=[])  # space freed: the rerun finishes
    assert results["second"].outputs["length"] == 400 and calls == ["first", "first", "second"]


def test_a_full_disk_writing_a_checkpoint_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _disk_full(monkeypatch)
    with pytest.raises(OutputError, match=r"cannot write .*latest\.pt: No space left on device"):
        atomic.write_torch(tmp_path / "latest.pt", {"w": torch.ones(3)})
    assert list(tmp_path.iterdir()) == []


def test_the_cli_renders_a_full_disk_outside_atomic_writes_as_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    from edgekd import cli

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/03-export/student.onnx")

    monkeypatch.setattr(cli, "app", full)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "edgekd: error: cannot write /runs/x/03-export/student.onnx: No space left on device; free space"
    )


def test_an_unwritable_cache_parent_is_one_line(tmp_path: Path):
    blocker = tmp_path / "models" / "cache"
    blocker.parent.mkdir()
    blocker.write_text("a regular file where the cache folder should be")
    teacher = build_model("edgekd:kd-cnn", num_classes=3).eval()
    x = np.zeros((4, 2, 32), np.float32)
    with pytest.raises(OutputError) as caught:
        cached_teacher_outputs(teacher, x, blocker / "teacher", "key", log=lambda _: None)
    message = str(caught.value)
    assert "\n" not in message and str(blocker / "teacher") in message
    assert "--set distill.teacher_cache=false" in message


# ------------------------------------------------------------------------------- teacher cache


def _entry(tmp_path: Path) -> tuple[torch.nn.Module, np.ndarray, Path]:
    teacher = build_model("edgekd:kd-cnn", num_classes=3).eval()
    x = np.random.default_rng(0).standard_normal((10, 2, 32)).astype(np.float32)
    cached_teacher_outputs(teacher, x, tmp_path, "key", batch_size=4, log=lambda _: None)
    return teacher, x, tmp_path / "key"


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("zero", "logits.npy changed since it was written (sha256 mismatch)"),
        ("truncate", "features.npy changed since it was written (sha256 mismatch)"),
        ("entry", f"{ENTRY_FILE} is missing"),
        ("entry-garbage", f"{ENTRY_FILE} is unreadable"),
    ],
)
def test_a_damaged_cache_entry_is_recomputed_and_says_so(tmp_path: Path, damage: str, why: str):
    teacher, x, folder = _entry(tmp_path)
    good = np.load(folder / "logits.npy").copy()
    if damage == "zero":
        size = (folder / "logits.npy").stat().st_size
        (folder / "logits.npy").write_bytes(bytes(size))
    elif damage == "truncate":
        data = (folder / "features.npy").read_bytes()
        (folder / "features.npy").write_bytes(data[: len(data) // 2])
    elif damage == "entry":
        (folder / ENTRY_FILE).unlink()
    else:
        (folder / ENTRY_FILE).write_bytes(b"\x00\x01")
    log: list[str] = []
    outputs, hit = cached_teacher_outputs(teacher, x, tmp_path, "key", batch_size=4, log=log.append)
    assert not hit and any(line.startswith(f"  teacher cache key: {why}") for line in log), log
    np.testing.assert_allclose(outputs.logits, good, atol=1e-6)
    again, hit = cached_teacher_outputs(teacher, x, tmp_path, "key", batch_size=4, log=log.append)
    assert hit and np.array_equal(again.logits, good) and len(log) == 1


def test_cache_entry_records_each_file_hash(tmp_path: Path):
    _, _, folder = _entry(tmp_path)
    entry = json.loads((folder / ENTRY_FILE).read_text())
    assert entry["logits"]["sha256"] == sha256_file(folder / "logits.npy")
    assert entry["features"]["shape"] == [1, 10, 64]


# --------------------------------------------------------------------- trainer: divergence, resume


def _tiny_training(tmp_path: Path, epochs: int = 2, lr: float = 1e-3, log=None, stage="distill"):
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.standard_normal((32, 2, 32)).astype(np.float32), rng.integers(0, 3, 32), None)
    torch.manual_seed(0)
    student = build_model("edgekd:cnn", num_classes=3)
    shape = probe_shape(student, (2, 32))
    method = build_method(DistillSpec(method="none"), 3, shape, shape)
    spec = TrainSpec(epochs=epochs, batch_size=16, lr=lr)
    result = train(
        student, method, data, data, spec, 0, tmp_path, "f", log=log.append if log is not None else print,
        stage=stage, lr_field=f"{stage}.train.lr",
    )  # fmt: skip
    return student, result


def test_diverged_training_stops_with_one_line_and_saves_no_checkpoint(tmp_path: Path):
    with pytest.raises(TrainingError) as caught:
        _tiny_training(tmp_path, epochs=3, lr=1e30)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("[distill] training diverged in epoch 1 of 3 (train loss nan")
    assert "lower distill.train.lr (now 1e+30)" in message
    assert not (tmp_path / LATEST).exists()


def test_resume_from_latest_and_a_damaged_latest_is_ignored(tmp_path: Path):
    _, first = _tiny_training(tmp_path, epochs=2)
    state = torch.load(tmp_path / LATEST, weights_only=True)
    recorded = state.pop("sha256")
    assert recorded == sha256_state(state) and state["epoch"] == 1
    log: list[str] = []
    _, resumed = _tiny_training(tmp_path, epochs=2, log=log)
    assert resumed.resumed_from_epoch == 2 and resumed.history == first.history
    assert "  resuming from latest.pt after epoch 2" in log

    state["model"]["head.weight"][0, 0] += 1.0  # a changed weight with the old content hash
    atomic.write_torch(tmp_path / LATEST, {**state, "sha256": recorded})
    log = []
    _, fresh = _tiny_training(tmp_path, epochs=2, log=log)
    assert fresh.resumed_from_epoch == 0 and fresh.history == first.history
    assert any("changed since it was written (sha256 mismatch); starting from epoch 1" in s for s in log)

    data = (tmp_path / LATEST).read_bytes()
    (tmp_path / LATEST).write_bytes(data[: len(data) // 2])
    log = []
    _, fresh = _tiny_training(tmp_path, epochs=2, log=log)
    assert fresh.resumed_from_epoch == 0 and fresh.history == first.history
    assert len(log) == 1 and "unreadable" in log[0] and "starting from epoch 1" in log[0]


# ------------------------------------------------ the real teacher and distill stages, via the API

# The teacher is trained here (not the shipped one): these tests follow its training and checkpoints.
TINY = [
    "data.frames_per_class_snr=2",
    "teacher.checkpoint=null",
    "teacher.train.epochs=2",
    "distill.train.epochs=2",
]


def _compress(tmp_path: Path, *overrides: str, force=None, until="distill"):
    log: list[str] = []
    sets = [*TINY, f"runs_dir={tmp_path / 'models' / 'runs'}", "name=r", *overrides]
    results = compress(None, sets, force=force, until=until, log=log.append)
    return results, log, tmp_path / "models" / "runs" / "r"


def test_force_distill_retrains_from_epoch_one(tmp_path: Path):
    first, _, run_dir = _compress(tmp_path)
    results, log, _ = _compress(tmp_path, force={"distill"})
    assert "[teacher] cached" in " ".join(log) and "[distill] running" in log
    assert not any("resuming from" in line for line in log)
    assert results["distill"]["resumed_from_epoch"] == 0
    assert [row["epoch"] for row in results["distill"]["history"]] == [1, 2]
    assert results["distill"]["history"] == first["distill"]["history"]  # deterministic retraining


def test_a_flipped_byte_in_teacher_pt_reruns_the_teacher_from_its_checkpoint(tmp_path: Path):
    _, _, run_dir = _compress(tmp_path)
    teacher = run_dir / "01-teacher" / "teacher.pt"
    original = teacher.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x10  # inside a weight tensor: torch.load would not notice
    teacher.write_bytes(bytes(damaged))
    _, log, _ = _compress(tmp_path)
    assert "[teacher] teacher.pt changed since it was written (sha256 mismatch); rerunning" in log
    assert any("teacher reused from the store" in line for line in log)  # no retraining
    assert teacher.read_bytes() == original
    assert "[distill] cached" in " ".join(log)  # the same teacher again: the student stays
    teacher.write_bytes(bytes(damaged))  # without the store: resumed from the stage's own checkpoint
    _, log, _ = _compress(tmp_path, "teacher.store=false")
    assert "  resuming from latest.pt after epoch 2" in log


def test_a_zeroed_teacher_cache_entry_is_recomputed_in_the_pipeline(tmp_path: Path):
    first, _, run_dir = _compress(tmp_path, "distill.method=kd")
    key = first["distill"]["teacher_cache"]["key"]
    logits = tmp_path / "models" / "cache" / "teacher" / key / "logits.npy"
    logits.write_bytes(bytes(logits.stat().st_size))
    results, log, _ = _compress(tmp_path, "distill.method=kd", force={"distill"})
    assert (
        f"  teacher cache {key}: logits.npy changed since it was written (sha256 mismatch); recomputing"
        in log
    )
    assert results["distill"]["history"] == first["distill"]["history"]


def test_finished_run_on_damaged_files_is_one_line(tmp_path: Path):
    _, _, run_dir = _compress(tmp_path)
    (run_dir / "report.json").write_text('{"recipe": {"seed": 0, "na')  # truncated
    with pytest.raises(OutputError, match=r"report\.json is unreadable .*rerun edgekd compress"):
        finished_run(run_dir, "export")
    recipe = load_recipe(None, [*TINY, f"runs_dir={run_dir.parent}", "name=r"])
    (run_dir / "report.json").write_text(json.dumps({"recipe": recipe.model_dump(mode="json")}))
    assert set(finished_run(run_dir, "export").results) == {"teacher", "distill"}
    student = run_dir / "02-distill" / "student.pt"
    student.write_bytes(student.read_bytes()[:100])
    with pytest.raises(OutputError, match=r"stage distill \(02-distill\): student\.pt changed since"):
        finished_run(run_dir, "export")
    (run_dir / "01-teacher" / STAGE_FILE).write_text("[]")
    with pytest.raises(OutputError, match=r"stage teacher .*stage\.json holds a JSON list"):
        finished_run(run_dir, "export")


def test_divergence_through_the_cli_is_one_line_and_writes_nothing_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    from edgekd import cli

    runs = tmp_path / "runs"
    sets = [arg for item in [*TINY, f"runs_dir={runs}", "teacher.train.lr=1e30"] for arg in ("--set", item)]
    monkeypatch.setattr(sys, "argv", ["edgekd", "compress", "--until", "distill", "--name", "d", *sets])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgekd: error: [teacher] training diverged in epoch 1")
    assert "lower teacher.train.lr (now 1e+30)" in lines[0]
    assert not (runs / "d" / "01-teacher" / STAGE_FILE).exists()
    assert not (runs / "d" / "01-teacher" / "teacher.pt").exists()
    assert not (runs / "d" / "01-teacher" / LATEST).exists()


@pytest.mark.slow  # two CLI processes and 30 teacher epochs: ~30 s on 2 cores
def test_killed_teacher_resumes_and_its_leftover_temporary_file_is_removed(tmp_path: Path):
    from tests.test_cli import EDGEKD

    args = [*EDGEKD, "compress", "--until", "teacher", "--name", "k", "--set", f"runs_dir={tmp_path}",
            "--set", "data.frames_per_class_snr=2", "--set", "teacher.train.epochs=30",
            "--set", "teacher.checkpoint=null"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stage_dir = tmp_path / "k" / "01-teacher"
    deadline = time.monotonic() + 240
    while not (stage_dir / LATEST).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "training finished before it could be interrupted"
    process.kill()
    process.wait()
    leftover = _aged(stage_dir / f".latest.pt.{process.pid}.k1ll3d00.tmp")  # as if killed mid-write
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from latest.pt after epoch" in resumed.stdout
    assert "removed 1 temporary file(s)" in resumed.stdout and not leftover.exists()
    record = json.loads((stage_dir / STAGE_FILE).read_text())
    assert [row["epoch"] for row in record["outputs"]["history"]] == list(range(1, 31))
