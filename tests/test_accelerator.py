"""``distill.accelerator`` (auto | cpu | cuda): where the teacher and distill stages train (issue 14).

The CPU tests run everywhere: ``cpu`` and ``auto`` (on a machine without CUDA) give the numbers of
the CPU-only trainer, bit for bit, and keep the stage fingerprints; ``cuda`` without a GPU is one line
and exit 2 from the CLI. The GPU tests need a CUDA device (and two for NCCL) and are skipped with the
reason otherwise; CUDA is never faked.
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

from edgekd import accelerator
from edgekd.data.base import ArrayDataset
from edgekd.distill.methods import ModelShape, build_method
from edgekd.distill.teacher_cache import TeacherOutputs, compute_teacher_outputs
from edgekd.distill.trainer import LATEST, train
from edgekd.errors import RecipeError
from edgekd.recipe import DistillSpec, TrainSpec, load_recipe
from tests.test_distributed import Tiny  # the trainer-interface model without BatchNorm

ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()
NO_CUDA = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")
# CUDA vs CPU on the tiny model below (no BatchNorm, no dropout): the runs differ only by kernel
# rounding (float32 matmuls, TF32 off by default for them), over 3 epochs of 4 steps each.
GPU_PARAM_ATOL = 1e-3
GPU_LOSS_ATOL = 1e-3


def _data() -> tuple[ArrayDataset, ArrayDataset]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((80, 2, 8)).astype(np.float32)
    y = (x[:, 0, :3].sum(1) > 0).astype(np.int64) + (x[:, 1, 0] > 1).astype(np.int64)
    return ArrayDataset(x[:64], y[:64], None), ArrayDataset(x[64:], y[64:], None)


def _train(
    stage_dir: Path, device: str | None, method: str = "kd", cached: bool = True, epochs: int = 3
) -> tuple[nn.Module, list[dict[str, float]], nn.Module]:
    """Distil Tiny(2) from Tiny(1) on 64 samples (batch 16), from cached or live teacher outputs."""
    train_set, val_set = _data()
    teacher = Tiny(seed=1).eval()
    outputs = compute_teacher_outputs(teacher, train_set.x, 32) if cached else None
    model = Tiny(seed=2)
    built = build_method(DistillSpec(method=method), 3, ModelShape(16), ModelShape(16))
    spec = TrainSpec(epochs=epochs, batch_size=16, lr=1e-2, weight_decay=0.0)
    result = train(
        model,
        built,
        train_set,
        val_set,
        spec,
        0,
        stage_dir,
        "fp",
        teacher=teacher,
        teacher_outputs=outputs,
        log=lambda _: None,
        device=device,
    )
    return model, result.history, built


# --- CPU: today's numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["kd", "skd", "dho"])  # logits; a projector; a held-out meta step
def test_cpu_device_is_bit_identical_to_the_default(tmp_path: Path, method: str) -> None:
    default, history, _ = _train(tmp_path / "default", None, method)
    on_cpu, cpu_history, _ = _train(tmp_path / "cpu", "cpu", method)
    assert history == cpu_history
    for name, value in default.state_dict().items():
        assert torch.equal(value, on_cpu.state_dict()[name]), name
    saved = torch.load(tmp_path / "cpu" / LATEST, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 2 and len(saved["history"]) == 3


def test_auto_resolves_to_the_cpu_without_cuda() -> None:
    if HAS_CUDA:
        assert accelerator.training_device("auto").type == "cuda"
        assert accelerator.device_kind("auto") == "cuda"
    else:
        assert accelerator.training_device("auto") == torch.device("cpu")
        assert accelerator.device_kind("auto") == "cpu"
    assert accelerator.training_device("cpu") == torch.device("cpu")
    assert accelerator.describe(torch.device("cpu")) == "cpu"


def test_cpu_and_auto_keep_the_stage_fingerprints() -> None:
    """A CPU run keeps the key it always had: the field is not hashed, no ``device`` entry is added."""
    from edgekd.pipeline import RunContext, fingerprint
    from edgekd.stages import distill, teacher

    if HAS_CUDA:
        pytest.skip("auto resolves to CUDA on this machine: the key gains device: cuda")
    tiny = ["data.frames_per_class_snr=2", "data.snr_min=0"]
    prints = {}
    for setting in ([], ["distill.accelerator=cpu"], ["distill.accelerator=auto"]):
        recipe = load_recipe(None, tiny + setting)
        assert "device" not in distill.STAGE.config(recipe) and "device" not in teacher.STAGE.config(recipe)
        ctx = RunContext(recipe=recipe, run_dir=Path("/nonexistent-run"))
        prints[tuple(setting)] = fingerprint(teacher.STAGE, ctx)
    assert len(set(prints.values())) == 1
    cuda = load_recipe(None, [*tiny, "distill.accelerator=cuda"])
    assert distill.STAGE.config(cuda)["device"] == "cuda" and teacher.STAGE.config(cuda)["device"] == "cuda"


def test_unknown_accelerator_is_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match=r"distill.accelerator"):
        load_recipe(None, ["distill.accelerator=tpu"])


def test_to_cpu_keeps_cpu_states_as_they_are() -> None:
    state = Tiny(0).state_dict()
    assert accelerator.to_cpu(state) is state  # nothing to move: the same object, the same hash
    nested = {"a": [torch.ones(2), 3], "b": (torch.zeros(1),)}
    assert accelerator.to_cpu(nested) is nested


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA device: accelerator=cuda is valid here")
def test_cli_cuda_without_a_gpu_is_one_line_exit_2(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "edgekd", "compress", "--until", "distill", "--name", "nocuda"]
    command += ["--set", f"runs_dir={tmp_path}", "--set", "distill.accelerator=cuda"]
    command += ["--set", "data.frames_per_class_snr=2"]
    done = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("edgekd: error: distill.accelerator = cuda"), errors
    assert "distill.accelerator=cpu" in errors[0]
    assert not list(tmp_path.glob("nocuda/*-teacher/stage.json"))  # stopped before any training


# --- GPU -------------------------------------------------------------------------------------------------


@NO_CUDA
@pytest.mark.parametrize("cached", [True, False])  # teacher logits from the cache, or the live teacher
def test_cuda_train_matches_cpu_and_its_checkpoint_loads_on_cpu(tmp_path: Path, cached: bool) -> None:
    on_cpu, cpu_history, _ = _train(tmp_path / "cpu", "cpu", cached=cached)
    on_gpu, gpu_history, _ = _train(tmp_path / "gpu", "cuda", cached=cached)
    assert accelerator.module_device(on_gpu).type == "cpu"  # handed back where it came from
    for name, value in on_cpu.state_dict().items():
        torch.testing.assert_close(on_gpu.state_dict()[name], value, atol=GPU_PARAM_ATOL, rtol=0)
    for mine, theirs in zip(cpu_history, gpu_history, strict=True):
        assert abs(mine["train_loss"] - theirs["train_loss"]) < GPU_LOSS_ATOL
    saved = torch.load(tmp_path / "gpu" / LATEST, map_location="cpu", weights_only=True)

    def devices(state: object) -> set[str]:
        if isinstance(state, torch.Tensor):
            return {state.device.type}
        if isinstance(state, dict):
            return set().union(*(devices(v) for v in state.values()))
        if isinstance(state, list | tuple):
            return set().union(*(devices(v) for v in state))
        return set()

    assert devices(saved) == {"cpu"}  # device-free: resumes on another machine
    fresh = Tiny(seed=5)
    fresh.load_state_dict(saved["model"])
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(value, on_gpu.state_dict()[name])


@NO_CUDA
def test_cuda_checkpoint_resumes_on_the_cpu(tmp_path: Path) -> None:
    on_gpu, gpu_history, _ = _train(tmp_path / "stage", "cuda")
    train_set, val_set = _data()
    model = Tiny(seed=2)
    method = build_method(DistillSpec(method="kd"), 3, ModelShape(16), ModelShape(16))
    spec = TrainSpec(epochs=3, batch_size=16, lr=1e-2, weight_decay=0.0)
    outputs = compute_teacher_outputs(Tiny(seed=1), train_set.x, 32)
    result = train(
        model, method, train_set, val_set, spec, 0, tmp_path / "stage", "fp",
        teacher_outputs=outputs, log=lambda _: None, device="cpu",
    )  # fmt: skip
    assert result.resumed_from_epoch == 3 and result.history == gpu_history  # read back on the CPU
    for name, value in on_gpu.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


@NO_CUDA
def test_cuda_teacher_outputs_match_cpu() -> None:
    train_set, _ = _data()
    teacher = Tiny(seed=1)
    on_cpu = compute_teacher_outputs(teacher, train_set.x, 32)
    on_gpu = compute_teacher_outputs(teacher.to("cuda"), train_set.x, 32)
    assert isinstance(on_gpu, TeacherOutputs) and on_gpu.logits.shape == (1, 64, 3)
    np.testing.assert_allclose(on_gpu.logits, on_cpu.logits, atol=1e-4)
    np.testing.assert_allclose(on_gpu.features, on_cpu.features, atol=1e-4)
    assert accelerator.describe(torch.device("cuda", 0)).startswith("cuda:0 (")


def _nccl_rank(rank: int, world: int, init_file: str, out: str) -> None:
    """One NCCL rank on cuda:rank: train, then record the parameters and the helpers' answers."""
    import torch.distributed as dist

    from edgekd import distributed

    os.environ["LOCAL_RANK"] = str(rank)
    device = accelerator.training_device("cuda")
    torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl", init_method=f"file://{init_file}", rank=rank, world_size=world, device_id=device
    )
    try:
        summed = distributed.all_sum([rank + 1.0])
        on_gpu, on_cpu = torch.full((2,), float(rank), device=device), torch.full((2,), float(rank))
        distributed.average_([on_gpu, on_cpu])  # a CUDA tensor and a CPU one under NCCL
        distributed.barrier()
        model, history, _ = _train(Path(out) / "stage", str(device))
        distributed.barrier()
    finally:
        dist.destroy_process_group()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, Path(out) / f"params{rank}.pt")
    record = {"sum": summed, "avg": [on_gpu.tolist(), on_cpu.tolist()], "history": history}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))


@pytest.mark.skipif(
    not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for a 2-rank NCCL group"
)
def test_two_nccl_ranks_agree(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    out.mkdir()
    torch.multiprocessing.spawn(_nccl_rank, args=(2, str(tmp_path / "rdzv"), str(out)), nprocs=2, join=True)
    params = [torch.load(out / f"params{r}.pt") for r in range(2)]
    for name in params[0]:
        assert torch.equal(params[0][name], params[1][name]), name  # DDP over NCCL: ranks cannot drift
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["sum"] == ranks[1]["sum"] == [3.0]
    assert ranks[0]["avg"] == [[0.5, 0.5], [0.5, 0.5]]
    assert ranks[0]["history"] == ranks[1]["history"]
