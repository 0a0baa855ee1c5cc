"""Contention benchmark: teacher training alone and beside busy processes, old vs new thread behaviour.

Trains the default recipe's teacher (radio task) for a fixed number of epochs (the teacher stage,
through the pipeline) in a fresh subprocess per configuration, alone and beside 1 and 2 competing
single-threaded busy processes (pure-python spin loops started here, bounded in time, killed at
the end). Modes:

- ``old``: what edgekd did before: ``OMP_WAIT_POLICY`` unset (GNU OpenMP's default: idle threads spin
  ``GOMP_SPINCOUNT``=300000 times before sleeping) and one intra-op thread per core (``OMP_NUM_THREADS``
  = cores, which the thread chooser keeps as asked);
- ``new``: edgekd as shipped: OpenMP's wait policy left alone, the training threads sized to the cores
  other processes leave free when the stage starts and re-judged after every epoch
  (:mod:`edgekd.threads`);
- ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` with one thread per core (what edgekd tried first: it
  keeps the loaded cases fair, but idle threads that sleep at once slow the idle case).

Fair share, two ways (``c`` cores, ``k`` busy single-threaded competitors):

- per process (the column "fair share" and the goal): every process gets an equal share of the
  machine, none more than it asks for (max-min fairness); each competitor asks for one core, so
  this run gets ``c - k`` cores while ``k < c`` and ``c/(k+1)`` beyond: a slowdown of ``c/(c-k)``,
  capped at ``k+1`` (2x for one competitor on 2 cores, 3x for two);
- per thread (recorded too): the kernel's scheduler gives every runnable thread an equal share, so a
  process with one thread per core gets ``c/(c+k)`` of the machine: ``(c+k)/c`` (1.5x for one).

The slowdown of every row is measured against the fastest alone time (``old`` alone when it ran), so a
remedy that slows the idle machine cannot hide behind its own baseline. Goal: the new behaviour's
slowdown within 1.2x of the per-process fair share. Run it on an otherwise idle machine (it says when
the machine is busy).

Prints a table and writes benchmarks/results/contention.json (machine, versions, settings, runs).
    python benchmarks/contention.py [--epochs 3] [--competitors 0 1 2] [--modes old new] [--out PATH]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "contention.json"
ROOT = Path(__file__).resolve().parent.parent
SPIN = (
    "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"
)
MODES = ("old", "new", "passive")


def worker(mode: str, epochs: int, overrides: list[str]) -> None:
    """One configuration, in its own process: the teacher stage for ``epochs`` epochs; JSON on stdout."""
    env = {key: os.environ.get(key) for key in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}  # before edgekd
    importlib.import_module("edgekd")
    import torch

    from edgekd.pipeline import RunContext, run_stages
    from edgekd.recipe import load_recipe
    from edgekd.stages import teacher
    from edgekd.threads import wait_policy

    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edgekd-contention-") as tmp:
        recipe = load_recipe(
            None,
            [
                f"runs_dir={tmp}",
                "name=contention",
                "teacher.checkpoint=null",  # the shipped teacher would skip the training measured here
                "teacher.store=false",
                f"teacher.train.epochs={epochs}",
                *overrides,
            ],
        )
        ctx = RunContext(recipe=recipe, run_dir=recipe.run_dir, log=lines.append)
        ctx.dataset  # noqa: B018 - build the data before the clock starts
        start = time.perf_counter()
        run_stages(ctx, [teacher.STAGE])
        wall = time.perf_counter() - start
    thread_line = next((line.strip() for line in lines if "intra-op thread" in line), None)
    print(
        json.dumps(
            {
                "wall_s": round(wall, 2),
                "threads": torch.get_num_threads(),
                "thread_choice": thread_line,
                "omp_wait_policy": wait_policy(),
                "env": env,
            }
        )
    )


def _env(mode: str, cores: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if mode in ("old", "passive"):
        env["OMP_NUM_THREADS"] = str(cores)
    if mode == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def run_config(mode: str, competitors: int, args: argparse.Namespace, cores: int) -> dict:
    """Start ``competitors`` spinners, then the worker; kill the spinners when it ends."""
    spin_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    spinners = [
        subprocess.Popen([sys.executable, "-c", SPIN, str(args.timeout)], env=spin_env)
        for _ in range(competitors)
    ]
    try:
        if spinners:
            time.sleep(0.5)  # running before the worker starts (and samples the load)
        command = [sys.executable, __file__, "--worker", mode, "--epochs", str(args.epochs)]
        command += [arg for item in args.set for arg in ("--set", item)]
        done = subprocess.run(
            command, env=_env(mode, cores), capture_output=True, text=True, timeout=args.timeout, check=False
        )
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()
    if done.returncode != 0:
        raise SystemExit(f"worker {mode} beside {competitors} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fair_share(cores: int, competitors: int) -> float:
    """Per-process (max-min) fair-share slowdown beside ``competitors`` one-core busy processes."""
    share = max(cores - competitors, cores / (competitors + 1))
    return cores / share


def machine() -> dict:
    from edgekd.report.build import environment
    from edgekd.threads import sample_load, usable_cores

    quiet = sample_load(1.0)
    return {
        **environment(),
        "usable_cores": usable_cores(),
        "other_busy_cores_at_start": round(quiet.other_cores, 2),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="teacher epochs per configuration")
    parser.add_argument("--competitors", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--set", action="append", default=[], help="extra recipe override, e.g. data.x=1")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration (and spinner)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.epochs, args.set)
        return

    from rich.table import Table

    from edgekd import atomic
    from edgekd.console import console
    from edgekd.threads import usable_cores

    cores = usable_cores()
    host = machine()
    if host["other_busy_cores_at_start"] > 0.3:
        console.print(
            f"note: other processes are busy on {host['other_busy_cores_at_start']} cores already; "
            "the numbers below are not those of an idle machine"
        )
    competitors = sorted(set(args.competitors) | {0})
    runs: list[dict] = []
    for count in competitors:
        for mode in args.modes:
            result = run_config(mode, count, args, cores)
            runs.append({"mode": mode, "competitors": count, **result})
            console.print(f"{mode:8s} beside {count}: {result['wall_s']:.1f} s, {result['threads']} threads")
    alone = {run["mode"]: run["wall_s"] for run in runs if run["competitors"] == 0}
    table = Table(title=f"Teacher training, {args.epochs} epochs, {cores} cores")
    columns = ("mode", "competitors", "threads", "wall s", "vs old alone", "slowdown", "fair share",
               "ratio to fair", "fair per thread", "ratio")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "mode" else "right")
    fastest_alone = min(alone.values())
    for run in runs:
        run["slowdown"] = round(run["wall_s"] / fastest_alone, 2)
        run["vs_old_alone"] = round(run["wall_s"] / alone["old"], 2) if "old" in alone else None
        run["fair_share_slowdown"] = round(fair_share(cores, run["competitors"]), 2)
        run["ratio_to_fair_share"] = round(run["slowdown"] / run["fair_share_slowdown"], 2)
        run["fair_share_per_thread_slowdown"] = round((cores + run["competitors"]) / cores, 2)
        run["ratio_to_fair_share_per_thread"] = round(
            run["slowdown"] / run["fair_share_per_thread_slowdown"], 2
        )
        table.add_row(
            run["mode"],
            str(run["competitors"]),
            str(run["threads"]),
            f"{run['wall_s']:.1f}",
            "-" if run["vs_old_alone"] is None else f"{run['vs_old_alone']:.2f}x",
            f"{run['slowdown']:.2f}x",
            f"{run['fair_share_slowdown']:.2f}x",
            f"{run['ratio_to_fair_share']:.2f}",
            f"{run['fair_share_per_thread_slowdown']:.2f}x",
            f"{run['ratio_to_fair_share_per_thread']:.2f}",
        )
    console.print(table)
    new = [run for run in runs if run["mode"] == "new" and run["competitors"] > 0]
    goal_met = all(run["ratio_to_fair_share"] <= 1.2 for run in new) if new else None
    if new:
        console.print(f"goal (new within 1.2x of the fair share): {'met' if goal_met else 'NOT met'}")
    atomic.write_json(
        args.out,
        {
            "benchmark": "contention",
            "machine": host,
            "settings": {
                "epochs": args.epochs,
                "competitors": competitors,
                "modes": args.modes,
                "overrides": args.set,
                "competitor": "single-threaded pure-python spin loop",
                "fair_share": "per process, max-min: cores / max(cores - k, cores / (k + 1)), k competitors",
                "fair_share_per_thread": "(cores + competitors) / cores: an equal share per runnable thread",
                "slowdown": "wall time over the fastest alone time of any mode",
                "goal": "new mode's slowdown <= 1.2 x the per-process fair share",
            },
            "runs": runs,
            "goal_met": goal_met,
        },
    )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
