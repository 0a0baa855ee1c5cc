"""Threads under load: the cores other processes leave free, re-judged per epoch; the wait policy recorded."""

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
    rebalance_training_threads,
    record_wait_policy,
    sample_load,
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


def test_edgekd_leaves_openmps_wait_policy_alone() -> None:
    """PASSIVE by default was measured and rejected (idle training 1.45x slower): ``import edgekd`` keeps
    libgomp's default (300000 spins before sleeping) and records it."""
    code = (
        "import os, edgekd, torch; torch.ones(4).sum(); from edgekd.threads import wait_policy; "
        "print(os.environ.get('OMP_WAIT_POLICY'), wait_policy()['value'])"
    )
    done = gomp(code)
    assert done.stdout.split() == ["None", "unset"]
    assert "GOMP_SPINCOUNT = '300000'" in done.stderr


def test_a_users_wait_policy_is_kept_and_recorded() -> None:
    code = "import os, edgekd, torch; torch.ones(4).sum(); from edgekd.threads import wait_policy; "
    code += "print(os.environ['OMP_WAIT_POLICY'], wait_policy()['value'], wait_policy()['source'])"
    done = gomp(code, OMP_WAIT_POLICY="passive")
    assert done.stdout.split() == ["passive", "PASSIVE", "environment"]
    assert "GOMP_SPINCOUNT = '0'" in done.stderr


def test_record_wait_policy_on_an_environment() -> None:
    saved = threads.wait_policy()
    try:
        environ: dict[str, str] = {}
        assert record_wait_policy(environ)["value"] == "unset" and environ == {}
        environ = {"OMP_WAIT_POLICY": "active"}
        assert record_wait_policy(environ) == {"value": "ACTIVE", "source": "environment"}
        assert environ == {"OMP_WAIT_POLICY": "active"}
    finally:
        threads._POLICY.clear()
        threads._POLICY.update(saved)


def test_threads_follow_the_load_measured_during_an_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """After each epoch the trainer re-sizes the threads from a real window around it."""
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores, before = usable_cores(), torch.get_num_threads()
    lines: list[str] = []
    try:
        process = spinner()
        try:
            with LoadWindow() as epoch:
                time.sleep(0.5)
        finally:
            process.kill()
            process.wait()
        assert epoch.sample is not None and epoch.sample.other_cores >= 0.7
        busy = rebalance_training_threads(epoch.sample, lines.append)
        assert busy == torch.get_num_threads() == max(1, min(cores - 1, free_cores(epoch.sample)))
        idle = rebalance_training_threads(sample(0.0, cpus=cores), lines.append)
        assert idle == torch.get_num_threads() == cores
        if cores > 1:
            assert "from the next epoch (other processes busy on" in lines[0]
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert rebalance_training_threads(sample(0.0, cpus=cores), lines.append) == cores  # user's: kept
    finally:
        torch.set_num_threads(before)


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
