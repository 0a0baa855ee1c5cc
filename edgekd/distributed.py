"""The teacher and distill stages on ``torch.distributed``: launch, rank helpers, and a dead rank's one line.

Launch. ``edgekd compress --nproc N`` (recipe ``distill.world_size``; ``--nnodes``, ``--node-rank`` and
``--rdzv-endpoint`` for several machines) runs the teacher and distill stages under PyTorch's own
elastic launcher, :mod:`torch.distributed.run` (``--standalone`` on one node, which picks a free
port itself): the pipeline process writes the resolved recipe to a temporary file, starts
``python -m torch.distributed.run ... -m edgekd compress --recipe FILE --until distill``, waits, and
goes on with export and the rest, which find both stages finished. Running ``torchrun
--nproc-per-node N -m edgekd compress ...`` by hand works the same way: every rank trains, then rank 0
alone goes on with the later stages. ``distill.world_size`` counts every process (all nodes).

Inside the workers the process group is gloo for CPU training and NCCL for CUDA (:func:`backend`):
with ``distill.accelerator`` resolving to CUDA (:mod:`edgekd.accelerator`) rank ``r`` trains on
``cuda:LOCAL_RANK``, set as its current device before the NCCL group is created, and the helpers
below (barrier, broadcasts, all-reduces) run their collectives on that device, copying CPU
tensors there and back when needed. The trainer wraps the student *and* the
method (its connectors, projectors, extra heads) in one ``DistributedDataParallel`` (Li et al.,
"PyTorch Distributed: Experiences on Accelerating Data Parallel Training", VLDB 2020), so gradients
are averaged over ranks and no rank drifts; parameters a method updates in its own meta step (not on
the training loss) are averaged after every such step.

Data order and learning rate. Every rank draws the same seeded permutation of the fit split, pads it
with its own first entries to a multiple of N and takes ``perm[r::N]`` (:func:`shard`), so every rank
takes the same number of steps and a run is reproducible for a given N. ``train.batch_size`` stays
the *global* batch: each rank takes ``batch_size / N`` (it must divide), and as DDP averages the
gradients, global step ``i`` sees exactly the samples ``perm[i*B:(i+1)*B]`` of a single-process run
and the same mean gradient. The learning rate and schedule are therefore left as they are (no
linear scaling rule as in Goyal et al., "Accurate, Large Minibatch SGD", 2017, which applies when
the global batch grows with N). What still differs from one process: BatchNorm statistics are per
rank (over ``B / N`` samples; rank 0's running statistics are broadcast at every step and after each
epoch), dropout masks, and the few samples repeated by the padding.

Writes and decisions. The teacher-output cache is built once by rank 0 (atomically) and then
memory-mapped by every rank; checkpoints, stage outputs and ``stage.json`` are written by rank 0
only, after a barrier; whether a stage is cached, divergence and the epoch's validation accuracy
are decided on rank 0 and broadcast. The fingerprints of both stages record the world size when it
is above 1, so a rerun with another N retrains, and ``latest.pt`` resumes a crashed run of the same N.
Several nodes need ``runs_dir`` (and its ``../cache``) on a filesystem they all share.

Failures. A rank that raises writes its error to the launcher's error folder; the pipeline process
ends with one line naming the rank and that error (exit 2 for a user error, 1 otherwise), or the
signal that killed it, and keeps torchrun's output in ``<run_dir>/distributed-launch.log``.
Rerunning the same command resumes from the last epoch saved.

Test hook: ``EDGEKD_TEST_FAIL_RANK=R:E`` makes rank ``R`` raise at the start of epoch ``E`` (1-based),
``R:E:kill`` makes it SIGKILL itself there. It exists for the tests of this module only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from edgekd import atomic
from edgekd.errors import EdgekdError, RecipeError, first_line

if TYPE_CHECKING:
    import numpy as np
    import torch

    from edgekd.pipeline import RunContext, Stage
    from edgekd.recipe import Recipe

TRAINING_STAGES = ("teacher", "distill")
FAIL_HOOK = "EDGEKD_TEST_FAIL_RANK"
ERROR_DIR_ENV = "EDGEKD_DDP_ERROR_DIR"
LAUNCH_LOG = "distributed-launch.log"
_T = TypeVar("_T")


class DistributedError(EdgekdError):
    """A rank of a distributed stage failed; ``exit_code`` is 2 for a user error, 1 otherwise."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class LaunchOptions:
    """How ``torch.distributed.run`` joins this node to the others (one node: all defaults)."""

    nnodes: int = 1
    node_rank: int | None = None
    rdzv_endpoint: str | None = None


_LAUNCH = LaunchOptions()


def set_launch_options(
    nnodes: int = 1, node_rank: int | None = None, rdzv_endpoint: str | None = None
) -> None:
    """Set the node options the next launch passes to ``torch.distributed.run`` (the CLI's flags)."""
    global _LAUNCH
    _LAUNCH = LaunchOptions(nnodes, node_rank, rdzv_endpoint)


def processes_per_node(recipe: Recipe) -> int:
    """How many training processes share this node: torchrun's ``LOCAL_WORLD_SIZE`` inside a worker,
    else ``distill.world_size`` over ``--nnodes``."""
    if in_torchrun() and "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    return max(1, recipe.distill.world_size // _LAUNCH.nnodes)


def _dist():  # noqa: ANN202 - torch.distributed, imported when first needed
    import torch.distributed

    return torch.distributed


# --- rank helpers (all of them are the single-process answer outside a process group) ----------------


def is_active() -> bool:
    """Whether this process is a rank of a process group (torch is not imported for the answer)."""
    module = sys.modules.get("torch.distributed")  # never imported: no process group
    return module is not None and module.is_available() and module.is_initialized()


def world_size() -> int:
    return _dist().get_world_size() if is_active() else 1


def rank() -> int:
    return _dist().get_rank() if is_active() else 0


def is_main() -> bool:
    return rank() == 0


def _collective_device() -> torch.device:
    """Where this group's collectives run: this rank's current CUDA device under NCCL, else the CPU."""
    import torch

    if is_active() and _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if not is_active():
        return
    device = _collective_device()
    if device.type == "cuda":
        _dist().barrier(device_ids=[device.index])  # NCCL: on this rank's own GPU
    else:
        _dist().barrier()


def broadcast_object(value: _T) -> _T:
    """Rank 0's ``value`` on every rank (the value other ranks pass is ignored)."""
    if not is_active():
        return value
    box = [value if is_main() else None]
    _dist().broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]  # type: ignore[return-value]


def decide(compute: Callable[[], _T]) -> _T:
    """Run ``compute`` on rank 0 only and hand its result to every rank."""
    return broadcast_object(compute() if is_main() else None)  # type: ignore[arg-type]


def all_sum(values: Iterable[float]) -> list[float]:
    """The sum over ranks of each value (float64)."""
    values = list(values)
    if not is_active():
        return values
    import torch

    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    _dist().all_reduce(tensor)
    return tensor.tolist()


def _in_place(tensors: Iterable[torch.Tensor], collective: Callable[[torch.Tensor], None]) -> None:
    """Run ``collective`` on each tensor in place; a tensor on another device than the group's
    (a CPU buffer under NCCL, a CUDA one under gloo) goes through a copy on the group's device."""
    device = _collective_device()
    for tensor in tensors:
        data = tensor.data
        if data.device.type == device.type:
            collective(data)
        else:
            buffer = data.to(device)
            collective(buffer)
            data.copy_(buffer)


def average_(tensors: Iterable[torch.Tensor]) -> None:
    """Replace each tensor by its mean over ranks, in place (CPU or CUDA tensors)."""
    if not is_active():
        return
    world = world_size()

    def mean(data: torch.Tensor) -> None:
        _dist().all_reduce(data)
        data.div_(world)

    _in_place(tensors, mean)


def broadcast_(tensors: Iterable[torch.Tensor]) -> None:
    """Give every rank rank 0's values of ``tensors``, in place (CPU or CUDA tensors)."""
    if not is_active():
        return
    _in_place(tensors, lambda data: _dist().broadcast(data, src=0))


def shard(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s share of the epoch's ``order``: padded cyclically to a multiple of ``world``
    (as ``torch.utils.data.DistributedSampler`` does), then every ``world``-th entry from ``rank``."""
    if world == 1:
        return order
    import numpy as np

    padded = np.resize(order, len(order) + (-len(order)) % world)
    return padded[rank::world]


def backend(device: torch.device | None = None) -> str:
    """NCCL for CUDA tensors, gloo for CPU ones."""
    return "nccl" if device is not None and device.type == "cuda" else "gloo"


def test_hook(epoch: int) -> None:
    """The ``EDGEKD_TEST_FAIL_RANK=R:E[:kill]`` test hook (see the module docstring); ``epoch`` 0-based."""
    spec = os.environ.get(FAIL_HOOK)
    if not spec:
        return
    parts = spec.split(":")
    if len(parts) < 2 or int(parts[0]) != rank() or int(parts[1]) != epoch + 1:
        return
    if parts[2:] == ["kill"]:
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"test hook {FAIL_HOOK}={spec}: rank {rank()} fails at epoch {epoch + 1}")


# --- the recipe and the environment -------------------------------------------------------------------


def in_torchrun() -> bool:
    """Whether this process is a worker that ``torch.distributed.run`` started for several processes."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")) and (
        int(os.environ["WORLD_SIZE"]) > 1
    )


def secondary_rank() -> bool:
    """Whether this torchrun worker leaves the run's summary to another process: a rank other than
    0 (it trains, then rank 0 goes on), or any worker that ``edgekd compress --nproc`` started."""
    return in_torchrun() and (os.environ["RANK"] != "0" or ERROR_DIR_ENV in os.environ)


def check_recipe(recipe: Recipe) -> None:
    """What a run on ``distill.world_size`` processes needs from the recipe."""
    world = recipe.distill.world_size
    if world == 1:
        return
    for section in TRAINING_STAGES:
        batch = getattr(recipe, section).train.batch_size
        if batch % world:
            raise RecipeError(
                f"{section}.train.batch_size = {batch} is not a multiple of distill.world_size = {world} "
                f"(it is the global batch; each process takes batch_size / world_size): set it to "
                f"{max(world, batch // world * world)} or use another number of processes"
            )
    for role in ("teacher", "student"):
        model = getattr(recipe, role).model
        if model.startswith("object:"):
            raise RecipeError(
                f"{role}.model is a Python object of this process ({model}); other processes cannot "
                "build it: pass it as a py:FILE.py:FACTORY or package.module:FACTORY source for "
                "distill.world_size > 1, or train with distill.world_size: 1"
            )


def _init_process_group(accelerator: str = "cpu") -> torch.device:
    """Join the group as this worker: NCCL on ``cuda:LOCAL_RANK`` (made the current device first) when
    ``accelerator`` resolves to CUDA, else gloo on the CPU. Returns the device this rank trains on."""
    from edgekd.accelerator import training_device

    device = training_device(accelerator)
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)
        _dist().init_process_group(backend(device), device_id=device)
    else:
        _dist().init_process_group(backend(device))
    return device


# --- the stages -------------------------------------------------------------------------------------


def run_training_stages(
    ctx: RunContext, stages: list[Stage], force: set[str]
) -> tuple[list[Stage], set[str]]:
    """Run the teacher and distill stages among ``stages`` on several processes when asked to.

    In the pipeline process of a run with ``distill.world_size > 1``: launch the workers and wait;
    in a worker started by ``torch.distributed.run``: train here as one rank. Returns the stages this
    process runs next (every stage: the trained ones are then cached; none on ranks other than 0)
    and the ``--force`` set left for them. Otherwise (one process, or already inside a process
    group) returns ``stages`` and ``force`` unchanged.
    """
    names = [stage.name for stage in stages]
    training = [name for name in names if name in TRAINING_STAGES]
    if not training or is_active() or ctx.recipe.mode != "compress":
        return stages, force
    if in_torchrun():
        return _worker(ctx, stages, force, names.index(training[-1]) + 1)
    if ctx.recipe.distill.world_size == 1:
        return stages, force
    check_recipe(ctx.recipe)
    _launch(ctx, training[-1], force)
    _check_finished(ctx, stages[: names.index(training[-1]) + 1])
    left = set(names) - set(TRAINING_STAGES) if "all" in force else force - set(TRAINING_STAGES)
    return stages, left


def _worker(
    ctx: RunContext, stages: list[Stage], force: set[str], count: int
) -> tuple[list[Stage], set[str]]:
    """One rank of a torchrun launch: the training stages here, then (rank 0) the rest."""
    from edgekd.console import console
    from edgekd.pipeline import run_stages

    world = int(os.environ["WORLD_SIZE"])
    if ctx.recipe.distill.world_size != world:
        ctx.log(f"distill.world_size = {world}: the number of processes torchrun started")
        ctx.recipe.distill.world_size = world
    check_recipe(ctx.recipe)
    _init_process_group(ctx.recipe.distill.accelerator)
    if not is_main():
        ctx.log = lambda _line: None
        console.quiet = True
    try:
        run_stages(ctx, stages[:count], force & {*TRAINING_STAGES, "all"})
        barrier()
    except BaseException as exc:
        _write_error(exc)
        raise
    finally:
        if is_active():
            _dist().destroy_process_group()
    if int(os.environ["RANK"]) != 0 or count == len(stages):
        return [], set()  # rank 0 alone goes on with the later stages (if any)
    left = {stage.name for stage in stages[count:]} if "all" in force else force - set(TRAINING_STAGES)
    return stages, left


def _write_error(exc: BaseException) -> None:
    """Record this rank's error for the launching process (when one is listening)."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder or isinstance(exc, KeyboardInterrupt):
        return
    communication = isinstance(exc, _dist().DistBackendError) or "connection" in str(exc).lower()
    record = {
        "rank": int(os.environ.get("RANK", rank())),
        "type": type(exc).__name__,
        "error": first_line(exc),
        "user": isinstance(exc, EdgekdError),
        "communication": communication,
        "time": time.time(),
    }
    with contextlib.suppress(EdgekdError):  # else the launcher names the rank from torchrun's report
        atomic.write_json(Path(folder) / f"rank{record['rank']}.json", record)


def _launch(ctx: RunContext, until: str, force: set[str]) -> None:
    """Start ``torch.distributed.run`` on this node for the training stages up to ``until``; wait."""
    import yaml

    recipe, options = ctx.recipe, _LAUNCH
    world = recipe.distill.world_size
    if world % options.nnodes:
        raise RecipeError(
            f"distill.world_size = {world} does not split over --nnodes {options.nnodes}: use --nproc "
            "for the processes of each node"
        )
    scratch = Path(tempfile.mkdtemp(prefix="edgekd-ddp-"))
    try:
        recipe_file, errors, log_file = scratch / "recipe.yaml", scratch / "errors", scratch / LAUNCH_LOG
        errors.mkdir()
        recipe_file.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), "utf-8")
        command = [sys.executable, "-m", "torch.distributed.run", *_rendezvous(options, recipe.name)]
        command += [f"--nproc-per-node={world // options.nnodes}", "--max-restarts=0", "-m", "edgekd"]
        command += ["compress", "--recipe", str(recipe_file), "--until", until]
        for name in sorted(force & {*TRAINING_STAGES, "all"}):
            command += ["--force", name]
        ctx.log(f"[distributed] {world} processes train the {' and '.join(TRAINING_STAGES)} stages")
        env = {**os.environ, ERROR_DIR_ENV: str(errors)}
        with open(log_file, "wb") as log:
            code = subprocess.run(command, stderr=log, env=env, check=False).returncode
        kept = ctx.run_dir / LAUNCH_LOG
        atomic.write_bytes(kept, log_file.read_bytes())
        if code != 0:
            raise _failure(errors, log_file.read_text("utf-8", errors="replace"), world, code, kept)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _rendezvous(options: LaunchOptions, run_name: str) -> list[str]:
    if options.nnodes == 1 and options.rdzv_endpoint is None:
        return ["--standalone"]
    if options.rdzv_endpoint is None:
        raise RecipeError(
            f"--nnodes {options.nnodes} needs --rdzv-endpoint HOST:PORT (a node every node reaches)"
        )
    args = [f"--nnodes={options.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={options.rdzv_endpoint}"]
    args.append(f"--rdzv-id=edgekd-{run_name}")
    return args + ([f"--node-rank={options.node_rank}"] if options.node_rank is not None else [])


_ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def _failure(errors: Path, log: str, world: int, code: int, kept: Path) -> DistributedError:
    """The one-line error for a failed launch: the rank that failed first and why."""
    records = []
    for path in errors.glob("rank*.json"):
        try:
            records.append(json.loads(path.read_text("utf-8")))
        except (OSError, ValueError):
            continue
    resume = f"rerun the same command to resume from the last epoch saved (torchrun's output: {kept})"
    # A rank that raised wrote its error; the others then fail on the broken connection. A rank
    # killed by a signal wrote nothing: torchrun's root cause names it.
    raised = [record for record in records if not record["communication"]]
    found = _ROOT_CAUSE.search(log)
    if raised or (records and found is None):
        first = min(raised or records, key=lambda r: r["time"])
        if first["user"]:
            return DistributedError(f"rank {first['rank']} of {world}: {first['error']}", 2)
        return DistributedError(
            f"rank {first['rank']} of {world} failed: {first['type']}: {first['error']}; {resume}", 1
        )
    if found is None:
        return DistributedError(f"torch.distributed.run exited with code {code}; {resume}", 1)
    failed, exitcode = int(found.group(1)), int(found.group(2))
    if exitcode < 0:
        try:
            why = f"was killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            why = f"was killed by signal {-exitcode}"
    else:
        why = f"exited with code {exitcode}"
    return DistributedError(f"rank {failed} of {world} {why}; {resume}", 1)


def _check_finished(ctx: RunContext, stages: list[Stage]) -> None:
    """The workers' records must be what this process expects, or it would train the stage alone."""
    from edgekd.pipeline import STAGE_FILE, StageResult, _cached, fingerprint, stage_dir_name

    for index, stage in enumerate(stages, start=1):
        expected = fingerprint(stage, ctx)
        record_file = ctx.run_dir / stage_dir_name(index, stage) / STAGE_FILE
        record, why = _cached(record_file, ctx.run_dir, expected)
        if record is None:
            raise DistributedError(
                f"the distributed {stage.name} stage finished without a usable {record_file}"
                f"{f' ({why})' if why else ''}; rerun, or train with distill.world_size: 1",
                1,
            )
        ctx.results[stage.name] = StageResult(
            stage.name, record["outputs"], expected, record["wall_s"], True, record_file
        )
