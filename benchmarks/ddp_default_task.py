"""`edgekd compress --nproc 2` on the default task against a single-process run: the same report?

Runs the README's main job twice through the CLI, once on one process and once with the teacher and
distill stages on two (torch.distributed, gloo on CPU), in one runs directory, and compares the
reports row by row: held-out accuracy of the teacher, the PyTorch student and every compiled artifact,
the deployed artifact, and the distill stage's wall time. The two runs take the same optimisation
steps (``train.batch_size`` is the global batch); they differ by BatchNorm statistics over B/2 samples
per rank, dropout masks and padding, so their accuracies agree within the seed-to-seed spread of the
student (about 0.6 points, `kd_methods.json`), not bit for bit.

The pipeline resumes: with ``--runs-dir`` pointing at an earlier invocation's directory the finished
runs are reused and only compared (stage wall times are those recorded when the stages ran).

    python benchmarks/ddp_default_task.py [--runs-dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.table import Table

from edgekd import atomic
from edgekd.console import console
from edgekd.report.build import environment

RESULTS = Path(__file__).resolve().parent / "results" / "ddp_default_task.json"
RUNS = {"single": [], "ddp2": ["--nproc", "2"]}


def _rows(report: dict) -> dict[str, float | None]:
    rows = {}
    for row in report["rows"]:
        key = f"{row.get('role')} ({row.get('runtime')} {row.get('precision')})"
        rows[key] = (row.get("accuracy") or {}).get("accuracy")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", type=Path, default=Path(tempfile.mkdtemp(prefix="edgekd-ddp-default-")))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    reports, distill_s = {}, {}
    for name, extra in RUNS.items():
        command = [sys.executable, "-m", "edgekd", "compress", "--set", f"runs_dir={args.runs_dir}"]
        subprocess.run([*command, "--name", name, *extra], check=True, stdout=subprocess.DEVNULL)
        run = args.runs_dir / name
        reports[name] = json.loads((run / "report.json").read_text(encoding="utf-8"))
        record = json.loads(next(run.glob("*-distill/stage.json")).read_text(encoding="utf-8"))
        distill_s[name] = record["wall_s"]
    rows = {name: _rows(report) for name, report in reports.items()}
    table = Table(title="default task: one process vs --nproc 2 (held-out accuracy)")
    for column in ("row", "1 process", "2 processes", "difference (pts)"):
        table.add_column(column, justify="left" if column == "row" else "right")
    compared = []
    for key, single in rows["single"].items():
        double = rows["ddp2"].get(key)
        difference = None if single is None or double is None else round(100 * (double - single), 2)
        compared.append({"row": key, "single": single, "ddp2": double, "difference_pts": difference})
        table.add_row(key, f"{single:.4f}", f"{double:.4f}", f"{difference:+.2f}")
    deployed = {name: report["headline"]["deployed"] for name, report in reports.items()}
    table.add_row("deployed", deployed["single"], deployed["ddp2"], "")
    table.add_row("distill stage s", f"{distill_s['single']:.1f}", f"{distill_s['ddp2']:.1f}", "")
    console.print(table)
    atomic.write_json(
        args.out,
        {
            "benchmark": "ddp_default_task",
            "commands": {name: ["edgekd", "compress", *extra] for name, extra in RUNS.items()},
            "rows": compared,
            "deployed": deployed,
            "distill_wall_s": distill_s,
            "distill_wall_s_note": "recorded when the stages ran, alongside other work on the machine: "
            "a correctness check, not a speed comparison (that is benchmarks/ddp_scaling.py)",
            "backend": "gloo (CPU)",
            "environment": environment(),
        },
    )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
