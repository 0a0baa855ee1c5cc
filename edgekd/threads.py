"""CPU threads on a shared machine: OpenMP's wait policy, the cores other processes leave free, and
whether a measurement ran on a loaded machine.

PyTorch's CPU kernels run on GNU OpenMP (libgomp). Between parallel regions its worker threads spin
on the CPU before they sleep (``GOMP_SPINCOUNT`` 300000 by default). When other processes hold some
of the cores, a spinning thread burns the time slice that a thread with work needs, and every
parallel region waits for its slowest thread: the slowdown goes far beyond a fair share of the cores
(``benchmarks/contention.py`` on 2 cores: 2.8x beside one busy process, 6.9x beside two). This is the
oversubscription effect studied by Iancu, Hofmeyr, Blagojevic and Zheng, "Oversubscription on
Multicore Processors", IPDPS 2010.

Training stages therefore size PyTorch's intra-op threads to the cores other processes leave free
(:func:`training_threads`, measured from ``/proc/stat`` minus this process's own CPU time) when the
stage starts, and re-judge the count after every epoch from the load measured during that epoch
(:func:`rebalance_training_threads`), so a job started beside a running edgekd (or after it) costs
no more than its share. With one thread there is no OpenMP team left to spin. A user's
``OMP_NUM_THREADS`` is kept as asked.

``OMP_WAIT_POLICY`` is left as the user has it. Making OpenMP wait passively by default was measured
and rejected: on an idle machine it made teacher training 1.45x slower (sleeping threads wake late
for PyTorch's many short parallel regions), while the thread sizing alone keeps the loaded cases
within their fair share (benchmarks/results/contention.json). :func:`wait_policy` records the policy
in effect for the report.

The profile stage keeps the thread count the recipe asked for (latency is measured with a fixed,
recorded count); it measures the load of other processes while it times (:class:`LoadWindow`) and
the report warns when the machine was loaded (:func:`load_warning`).

This module imports only the standard library: ``edgekd/__init__.py`` imports it before torch.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

WAIT_POLICY = "OMP_WAIT_POLICY"
SAMPLE_S = 0.25  # /proc/stat counts in 10 ms ticks: a quarter second resolves ~0.04 core per CPU
LOADED_CORES = 0.5  # others busier than this (in cores) may disturb a measurement
MIN_ROW_WINDOW_S = 0.25  # shorter per-row windows are too coarse to judge on their own

_POLICY: dict[str, str] = {}


# --- OpenMP wait policy ------------------------------------------------------------------------------


def record_wait_policy(environ: dict[str, str] | os._Environ | None = None) -> dict[str, str]:
    """Remember the OpenMP wait policy this process runs with (``{"value", "source"}``) for the report."""
    environ = os.environ if environ is None else environ
    user = (environ.get(WAIT_POLICY) or "").strip()
    if user:
        state = {"value": user.upper(), "source": "environment"}
    else:
        state = {"value": "unset", "source": "OpenMP default (idle threads spin briefly, then sleep)"}
    _POLICY.clear()
    _POLICY.update(state)
    return dict(state)


def wait_policy() -> dict[str, str]:
    """The OpenMP wait policy of this process, as decided when edgekd was imported."""
    return dict(_POLICY) if _POLICY else {"value": os.environ.get(WAIT_POLICY, "unset"), "source": "unknown"}


def _wait_policy_phrase() -> str:
    policy = wait_policy()
    if policy["source"] == "environment":
        return f"OMP_WAIT_POLICY={policy['value']} (from the environment)"
    return "OpenMP's default wait policy"


# --- cores and their load ----------------------------------------------------------------------------


def _cgroup_cpu_limit() -> float | None:
    """The container's CPU quota in cores (cgroup v2 ``cpu.max`` or v1 CFS quota), None if unlimited."""
    candidates = (
        (Path("/sys/fs/cgroup/cpu.max"), None),
        (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")),
    )
    for quota_file, period_file in candidates:
        try:
            if period_file is None:
                quota, period = quota_file.read_text().split()[:2]
            else:
                quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
        except (OSError, ValueError):
            continue
        if quota in ("max", "-1"):
            return None
        try:
            return max(int(quota) / int(period), 1.0)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def usable_cpus() -> list[int]:
    """The CPU ids this process may run on (its affinity), or ``range(cpu_count)`` where unknown."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a container's CPU quota."""
    count = len(usable_cpus())
    limit = _cgroup_cpu_limit()
    return max(1, min(count, math.ceil(limit))) if limit is not None else max(1, count)


def _proc_stat(cpus: list[int]) -> tuple[int, int] | None:
    """(busy, total) clock ticks summed over ``cpus`` from /proc/stat; None off Linux."""
    wanted = {f"cpu{cpu}" for cpu in cpus}
    busy = total = 0
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            for line in handle:
                if not line.startswith("cpu"):
                    break
                name, *fields = line.split()
                if name not in wanted:
                    continue
                ticks = [int(value) for value in fields[:8]]  # user nice system idle iowait irq softirq steal
                idle = ticks[3] + ticks[4]
                busy += sum(ticks) - idle
                total += sum(ticks)
    except (OSError, ValueError, IndexError):
        return None
    return (busy, total) if total else None


@dataclass(frozen=True)
class CpuSample:
    """CPU use over a window on the CPUs this process may run on, split into ours and others'.

    ``other_cores`` is the average number of cores kept busy by every other process (and by the
    hypervisor: steal time counts as busy): all busy time minus this process's own CPU time.
    """

    cores: int
    cpus: int
    busy_cores: float
    own_cores: float
    other_cores: float
    window_s: float
    source: str  # "/proc/stat", or "loadavg" (1-minute average, off Linux)

    def to_dict(self) -> dict[str, Any]:
        return {
            key: round(value, 3) if isinstance(value, float) else value for key, value in asdict(self).items()
        }


class LoadWindow:
    """Measure the load of other processes between :meth:`start` and :meth:`stop` (a context manager).

    Works from two /proc/stat snapshots and ``time.process_time`` (all of this process's threads),
    so the window can enclose our own busy measurement: what is not ours was someone else's.
    """

    def __init__(self) -> None:
        self.cpus = usable_cpus()
        self.sample: CpuSample | None = None
        self._start: tuple[tuple[int, int] | None, float, float] | None = None

    def start(self) -> LoadWindow:
        self._start = (_proc_stat(self.cpus), time.process_time(), time.monotonic())
        return self

    def stop(self) -> CpuSample:
        if self._start is None:
            raise RuntimeError("LoadWindow.stop() before start()")
        stat0, own0, wall0 = self._start
        stat1, own1, wall1 = _proc_stat(self.cpus), time.process_time(), time.monotonic()
        window = max(wall1 - wall0, 1e-6)
        own = (own1 - own0) / window
        cores, count = usable_cores(), len(self.cpus)
        if stat0 is not None and stat1 is not None and stat1[1] > stat0[1]:
            busy = (stat1[0] - stat0[0]) / (stat1[1] - stat0[1]) * count
            source = "/proc/stat"
        elif hasattr(os, "getloadavg"):
            busy, source = min(float(count), os.getloadavg()[0]), "loadavg"
        else:
            busy, source = own, "none"
        other = min(float(count), max(0.0, busy - own))
        self.sample = CpuSample(cores, count, busy, own, other, window, source)
        return self.sample

    def __enter__(self) -> LoadWindow:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sample_load(seconds: float = SAMPLE_S) -> CpuSample:
    """Load of other processes over the next ``seconds`` (this process sleeps meanwhile)."""
    window = LoadWindow().start()
    time.sleep(seconds)
    return window.stop()


def free_cores(sample: CpuSample) -> int:
    """Cores left by other processes, rounded to the nearest whole core; at least 1, at most ``cores``."""
    return max(1, min(sample.cores, math.floor(sample.cpus - sample.other_cores + 0.5)))


def _user_threads(environ: dict[str, str] | os._Environ) -> int | None:
    """``OMP_NUM_THREADS`` as the user set it (its first level), None when unset or not a count."""
    value = (environ.get("OMP_NUM_THREADS") or "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) >= 1 else None


def training_threads(
    sample: CpuSample | None = None, environ: dict[str, str] | os._Environ | None = None
) -> tuple[int, str]:
    """Intra-op threads for a training stage and why: the user's ``OMP_NUM_THREADS`` when set, else the
    cores other processes leave free (``sample``, or a fresh :func:`sample_load`)."""
    environ = os.environ if environ is None else environ
    user = _user_threads(environ)
    if user is not None:
        return user, f"OMP_NUM_THREADS={user} from the environment"
    sample = sample or sample_load()
    count = free_cores(sample)
    if sample.other_cores < 0.05:
        return count, f"{sample.cores} cores, idle"
    return count, f"{sample.cores} cores, other processes busy on {sample.other_cores:.1f} of them"


def rebalance_training_threads(sample: CpuSample, log: Callable[[str], None] | None = None) -> int:
    """After an epoch: set PyTorch's threads to the cores others left free during it (``sample``, a
    :class:`LoadWindow` around the epoch), logging a change in one line. The user's count is kept."""
    import torch

    if _user_threads(os.environ) is not None:
        return torch.get_num_threads()
    count, current = free_cores(sample), torch.get_num_threads()
    if count != current:
        torch.set_num_threads(count)
        if log is not None:
            log(
                f"  {count} intra-op thread{'s' if count != 1 else ''} from the next epoch (other processes "
                f"busy on {sample.other_cores:.1f} of {sample.cores} cores during the last one)"
            )
    return count


def apply_training_threads(log: Callable[[str], None] | None = None) -> int:
    """Choose :func:`training_threads`, give them to PyTorch, and log the choice in one line."""
    import torch

    count, why = training_threads()
    torch.set_num_threads(count)
    if log is not None:
        plural = "s" if count != 1 else ""
        log(f"  {count} intra-op thread{plural} ({why}); {_wait_policy_phrase()}")
    return count


# --- was a measurement disturbed? --------------------------------------------------------------------


def is_loaded(sample: CpuSample, threads: int) -> bool:
    """Whether others' load could have slowed a measurement on ``threads`` threads: others kept at
    least :data:`LOADED_CORES` busy and either fewer than ``threads + 1`` cores stayed free (one for the
    timing thread and the OS) or others held half the machine (shared caches and memory bandwidth)."""
    if sample.other_cores < LOADED_CORES:
        return False
    return sample.cpus - sample.other_cores < threads + 1 or sample.other_cores >= sample.cpus / 2


def load_summary(stage: CpuSample, rows: dict[str, CpuSample | None], threads: int) -> dict[str, Any]:
    """The profile stage's load record: the whole measurement's window, the rows timed while loaded,
    and the warning the report shows (None when the machine was quiet)."""
    loaded_rows = [
        name
        for name, sample in rows.items()
        if sample is not None and sample.window_s >= MIN_ROW_WINDOW_S and is_loaded(sample, threads)
    ]
    worst = max(
        [stage.other_cores]
        + [s.other_cores for s in rows.values() if s is not None and s.window_s >= MIN_ROW_WINDOW_S]
    )
    loaded = is_loaded(stage, threads) or bool(loaded_rows)
    return {
        "loaded": loaded,
        "threads": threads,
        "cores": stage.cores,
        "other_busy_cores": round(stage.other_cores, 2),
        "other_busy_cores_max": round(worst, 2),
        "loaded_rows": loaded_rows,
        "window": stage.to_dict(),
        "warning": load_warning(worst, stage.cpus, threads) if loaded else None,
    }


def load_warning(other_cores: float, cpus: int, threads: int) -> str:
    """The one-line warning shown in the log, ``report.json`` and ``report.md``."""
    return (
        f"measured while the machine was loaded (other processes kept up to {other_cores:.1f} of {cpus} "
        f"cores busy while timing on {threads} thread{'s' if threads != 1 else ''}); latency under load "
        "is not the device's latency: rerun `edgekd compress --force profile` on a quiet machine"
    )
