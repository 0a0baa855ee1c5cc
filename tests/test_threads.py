"""Threads under load: OpenMP's wait policy set before torch loads, cores left free by other processes."""

import os
import subprocess
import sys
import threading
import time

import pytest

from edgekd import threads
from edgekd.backends.base import default_threads, resolve_threads
from edgekd.threads import (
    CpuSample,
    LoadWindow,
    free_cores,
    is_loaded,
    load_summary,
    sample_load,
    set_wait_policy_default,
    training_threads,
    usable_cores,
)

SPIN = (
    "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"
)


def spinner(seconds: float = 30) -> subprocess.Popen:
    """A real busy process: one pure-python spin loop, bounded in time (killed by the caller)."""
    process = subprocess.Popen([sys.executable, "-c", SPIN, str(seconds)])
    time.sleep(0.3)  # started and spinning
    return process


def gomp(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with libgomp printing its settings (OMP_DISPLAY_ENV)."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**base, "OMP_DISPLAY_ENV": "VERBOSE", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def sample(other: float, cpus: int = 2, own: float = 0.0, window: float = 1.0) -> CpuSample:
    return CpuSample(cpus, cpus, min(cpus, other + own), own, other, window, "/proc/stat")


def test_edgekd_sets_passive_before_torch_loads_openmp() -> None:
    """The API (``import edgekd``) and the CLI module (``edgekd.cli``) both get libgomp's passive policy:
    spin count 0 (the default is 300000 spins before sleeping)."""
    code = "import os, {first}, torch; torch.ones(4).sum(); print(os.environ['OMP_WAIT_POLICY'])"
    for first in ("edgekd", "edgekd.cli"):
        done = gomp(code.format(first=first))
        assert done.stdout.strip() == "PASSIVE"
        assert "GOMP_SPINCOUNT = '0'" in done.stderr


def test_a_users_wait_policy_is_kept() -> None:
    done = gomp(
        "import os, edgekd, torch; torch.ones(4).sum(); print(os.environ['OMP_WAIT_POLICY'])",
        OMP_WAIT_POLICY="active",
    )
    assert done.stdout.strip() == "active"
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in done.stderr and "GOMP_SPINCOUNT = '0'" not in done.stderr


def test_torch_imported_first_is_detected_and_named() -> None:
    code = "import torch, edgekd; from edgekd.threads import wait_policy; print(wait_policy()['source'])"
    done = gomp(code)
    assert "GOMP_SPINCOUNT = '300000'" in done.stderr  # too late for this process: libgomp already read it
    assert "OpenMP was loaded before edgekd" in done.stdout and "OMP_WAIT_POLICY=PASSIVE" in done.stdout


def test_set_wait_policy_default_on_an_environment() -> None:
    saved = threads.wait_policy()
    try:
        environ: dict[str, str] = {}
        set_wait_policy_default(environ)
        assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}
        environ = {"OMP_WAIT_POLICY": "active"}
        state = set_wait_policy_default(environ)
        assert environ == {"OMP_WAIT_POLICY": "active"}
        assert state == {"value": "ACTIVE", "source": "environment"}
    finally:
        threads._POLICY.clear()
        threads._POLICY.update(saved)


def test_a_busy_process_is_seen_and_leaves_fewer_training_threads() -> None:
    cores = usable_cores()
    process = spinner()
    try:
        seen = sample_load(0.5)
    finally:
        process.kill()
        process.wait()
    assert seen.source == "/proc/stat" and seen.cpus == len(os.sched_getaffinity(0))
    assert seen.other_cores >= 0.7, seen  # the spinner holds a whole core (others may add more)
    assert seen.own_cores < 0.2  # we slept
    count, why = training_threads(seen, environ={})
    assert 1 <= count <= max(1, cores - 1)
    assert "other processes busy on" in why


def test_our_own_cpu_time_is_not_counted_as_others() -> None:
    def spin() -> None:  # 0.3 s of CPU in a thread of this process, however loaded the machine is
        start = time.thread_time()
        while time.thread_time() - start < 0.3:
            pass

    worker = threading.Thread(target=spin)
    with LoadWindow() as window:
        worker.start()
        worker.join()
    measured = window.sample
    assert measured is not None
    assert measured.own_cores * measured.window_s >= 0.29, measured  # our CPU seconds, counted as ours
    assert measured.other_cores <= max(0.0, measured.busy_cores - measured.own_cores) + 1e-9


def test_thread_count_from_numbers_and_the_users_choice() -> None:
    assert free_cores(sample(0.0)) == 2
    assert free_cores(sample(0.4)) == 2
    assert free_cores(sample(1.0)) == 1
    assert free_cores(sample(2.0)) == 1  # never below one
    assert free_cores(CpuSample(8, 8, 3.2, 0.0, 3.2, 1.0, "/proc/stat")) == 5
    assert training_threads(sample(1.0), environ={"OMP_NUM_THREADS": "3"}) == (
        3,
        "OMP_NUM_THREADS=3 from the environment",
    )
    assert training_threads(sample(0.0), environ={"OMP_NUM_THREADS": "x"})[0] == 2


def test_profile_threads_stay_as_asked() -> None:
    assert resolve_threads(3) == 3
    assert resolve_threads(None) == default_threads() == usable_cores()
    with pytest.raises(Exception, match="profile.threads must be >= 1"):
        resolve_threads(0)


def test_loaded_or_quiet_from_numbers() -> None:
    assert not is_loaded(sample(0.2), threads=2)
    assert is_loaded(sample(0.6), threads=2)
    assert is_loaded(sample(0.6), threads=1)  # one free core for 1 timed thread + the OS is too few
    many = CpuSample(64, 64, 1.0, 0.0, 1.0, 1.0, "/proc/stat")
    assert not is_loaded(many, threads=1)
    assert is_loaded(CpuSample(64, 64, 40.0, 0.0, 40.0, 1.0, "/proc/stat"), threads=1)
    summary = load_summary(
        sample(0.1), {"a": sample(1.5), "b": sample(1.9, window=0.05), "c": None}, threads=2
    )
    assert summary["loaded"] and summary["loaded_rows"] == ["a"]  # b's window is too short to judge
    assert summary["other_busy_cores_max"] == 1.5
    assert "kept up to 1.5 of 2 cores busy while timing on 2 threads" in summary["warning"]
    assert "latency under load is not the device's latency" in summary["warning"]
    quiet = load_summary(sample(0.1), {"a": sample(0.2)}, threads=2)
    assert not quiet["loaded"] and quiet["warning"] is None
