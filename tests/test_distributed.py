"""Teacher and distill stages on torch.distributed (issue 14): two gloo processes on this CPU.

The trainer-level test starts two ranks with a ``file://`` rendezvous (no port to race for) and
compares them with a single-process run of the same global batch. The CLI tests go through
``edgekd compress --nproc 2``, which starts ``torch.distributed.run --standalone`` (it picks a free
port itself), and use the ``EDGEKD_TEST_FAIL_RANK`` test hook of :mod:`edgekd.distributed`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgekd import distributed
from edgekd.data.base import ArrayDataset
from edgekd.distill.methods import ModelShape, build_method
from edgekd.distill.teacher_cache import TeacherOutputs
from edgekd.distill.trainer import train
from edgekd.recipe import DistillSpec, TrainSpec

ROOT = Path(__file__).resolve().parent.parent
# Tolerance of the trainer-level comparison: the models have no BatchNorm and no dropout, the 64
# samples split evenly (no padding), so the two runs differ only by float32 summation order.
PARAM_ATOL = 1e-5
# Tolerance of the pipeline-level comparison (kd-cnn has BatchNorm over B/N samples per rank, and
# dropout): held-out accuracy within 0.1 absolute of the single-process run on this tiny set.
ACCURACY_ATOL = 0.1


class Tiny(nn.Module):
    """The model interface the trainer uses (forward_features, head, feature_dim), without BatchNorm."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.feature_dim = 16
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(2 * 8, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _data() -> tuple[ArrayDataset, ArrayDataset, TeacherOutputs]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((80, 2, 8)).astype(np.float32)
    y = (x[:, 0, :3].sum(1) > 0).astype(np.int64) + (x[:, 1, 0] > 1).astype(np.int64)
    teacher = Tiny(seed=1).eval()
    with torch.no_grad():
        feats = teacher.forward_features(torch.from_numpy(x[:64]))
        logits = teacher.head(feats)
    outputs = TeacherOutputs(logits.numpy()[None], feats.numpy()[None])
    return ArrayDataset(x[:64], y[:64], None), ArrayDataset(x[64:], y[64:], None), outputs


def _train(stage_dir: Path, epochs: int = 2) -> tuple[nn.Module, list[dict[str, float]]]:
    train_set, val_set, outputs = _data()
    model = Tiny(seed=2)
    method = build_method(DistillSpec(method="kd"), 3, ModelShape(16), ModelShape(16))
    spec = TrainSpec(epochs=epochs, batch_size=16, lr=1e-2, weight_decay=0.0)
    result = train(
        model,
        method,
        train_set,
        val_set,
        spec,
        0,
        stage_dir,
        "fp",
        teacher_outputs=outputs,
        log=lambda _: None,
    )
    return model, result.history


def _rank(rank: int, world: int, init_file: str, out: str) -> None:
    """One rank: train, and record the parameters and every file this rank wrote through edgekd."""
    import torch.distributed as dist

    from edgekd import atomic

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    writes: list[str] = []
    real = atomic.atomic_path

    def spy(path):  # noqa: ANN001, ANN202 - the real atomic write, recorded
        writes.append(str(path))
        return real(path)

    atomic.atomic_path = spy
    try:
        model, history = _train(Path(out) / "stage")
    finally:
        atomic.atomic_path = real
        dist.destroy_process_group()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, Path(out) / f"params{rank}.pt")
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"writes": writes, "history": history}))


def test_shard_pads_to_a_multiple_and_interleaves() -> None:
    order = np.array([5, 3, 9, 1, 7])
    parts = [distributed.shard(order, r, 2) for r in range(2)]
    assert parts[0].tolist() == [5, 9, 7] and parts[1].tolist() == [3, 1, 5]  # padded with order[0]
    assert distributed.shard(order, 0, 1) is order


def test_two_gloo_ranks_match_one_process_and_only_rank0_writes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    out.mkdir()
    torch.multiprocessing.spawn(_rank, args=(2, str(tmp_path / "rdzv"), str(out)), nprocs=2, join=True)
    params = [torch.load(out / f"params{r}.pt") for r in range(2)]
    for name in params[0]:
        assert torch.equal(params[0][name], params[1][name]), name  # DDP: ranks cannot drift
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[1]["writes"] == []
    assert ranks[0]["writes"] == [str(out / "stage" / "latest.pt")] * 2  # one checkpoint per epoch
    assert ranks[0]["history"] == ranks[1]["history"]  # decided on rank 0, broadcast

    single, history = _train(tmp_path / "single")  # the same global batch (16) in one process
    for name, value in single.state_dict().items():
        torch.testing.assert_close(params[0][name], value, atol=PARAM_ATOL, rtol=0)
    for mine, theirs in zip(history, ranks[0]["history"], strict=True):
        assert mine["val_accuracy"] == theirs["val_accuracy"]
        assert abs(mine["train_loss"] - theirs["train_loss"]) < 1e-4


def test_batch_must_split_over_the_processes() -> None:
    from edgekd.errors import RecipeError
    from edgekd.recipe import load_recipe

    recipe = load_recipe(None, ["distill.world_size=3"])
    with pytest.raises(RecipeError, match=r"teacher.train.batch_size = 128 is not a multiple"):
        distributed.check_recipe(recipe)


# --- through the CLI ----------------------------------------------------------------------------------

TINY = [
    "--set",
    "data.frames_per_class_snr=2",
    "--set",
    "data.snr_min=0",
    "--epochs",
    "2",
    "--set",
    "teacher.store=false",
    "--set",
    "teacher.checkpoint=null",  # trained here: the failure hook and resume act on the teacher's training
    "--set",
    "distill.train.batch_size=64",
    "--set",
    "teacher.train.batch_size=64",
]


def _edgekd(runs: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "edgekd", "compress", "--until", "distill", "--name", "ddp"]
    command += ["--set", f"runs_dir={runs}", *TINY, *args]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)


def _record(runs: Path, stage: str) -> dict:
    return json.loads(next((runs / "ddp").glob(f"*-{stage}/stage.json")).read_text())


def test_cli_nproc2_dead_rank_one_line_then_rerun_resumes(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    failed = _edgekd(runs, "--nproc", "2", env={distributed.FAIL_HOOK: "1:2"})
    assert failed.returncode == 1, failed.stderr[-2000:]
    lines = failed.stderr.strip().splitlines()
    assert lines[-1].startswith("edgekd: error: rank 1 of 2 failed: RuntimeError: test hook")
    assert "resume" in lines[-1] and len([line for line in lines if "edgekd: error" in line]) == 1
    assert not list((runs / "ddp").glob("*-teacher/stage.json"))  # nothing a later stage would read
    assert (runs / "ddp" / distributed.LAUNCH_LOG).is_file()

    rerun = _edgekd(runs, "--nproc", "2")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming from latest.pt after epoch 1" in rerun.stdout
    teacher, distill = _record(runs, "teacher"), _record(runs, "distill")
    assert teacher["config"]["world_size"] == 2 and distill["config"]["distill"]["world_size"] == 2
    assert [row["epoch"] for row in distill["outputs"]["history"]] == [1, 2]

    single_runs = tmp_path / "single"
    single = _edgekd(single_runs)
    assert single.returncode == 0, single.stderr[-2000:]
    one = _record(single_runs, "distill")
    assert "world_size" not in one["config"]["distill"]  # one process: the fingerprint it always had
    assert one["fingerprint"] != distill["fingerprint"]
    assert abs(one["outputs"]["val_accuracy_last"] - distill["outputs"]["val_accuracy_last"]) <= ACCURACY_ATOL


@pytest.mark.slow
def test_cli_killed_rank_names_the_signal(tmp_path: Path) -> None:
    failed = _edgekd(tmp_path, "--nproc", "2", env={distributed.FAIL_HOOK: "1:1:kill"})
    assert failed.returncode == 1
    assert (
        failed.stderr.strip()
        .splitlines()[-1]
        .startswith("edgekd: error: rank 1 of 2 was killed by signal SIGKILL")
    )
