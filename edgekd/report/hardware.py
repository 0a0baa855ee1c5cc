"""The hardware-selection report: one student on several targets, side by side (JSON, Markdown, HTML).

Built from the per-target ``report.json`` of each ``compress`` run (see :mod:`edgekd.hardware`). Every
number is a measured one from those reports, except the share of the target's peak throughput, computed
here from the counted FLOPs, the measured throughput and the target's published dense peak.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from html import escape
from typing import Any

from edgekd.report.markdown import LAYER_HEADER, human_bytes, layer_rows, layer_summary, slowest_layers
from edgekd.report.svg import Point, pareto_front, pareto_svg

# The target spec (targets/*.yaml ``specs``, tera-ops per second, dense) that bounds each precision.
PEAK_SPEC = {"int8": "peak_int8_tops", "fp16": "peak_fp16_tflops", "fp32": "peak_fp32_tflops"}
REFERENCE = "PyTorch reference"
STAND_IN = "this host (stand-in)"  # a target of another arch, profiled here because no device was given


def peak_ops_share(
    flops: float | None,
    throughput_per_s: float,
    precision: str,
    specs: dict[str, Any],
    on_target: bool = True,
) -> dict[str, Any]:
    """Achieved ops per second over the target's peak: ``flops`` (per sample, 2 per multiply-accumulate)
    x ``throughput_per_s`` / peak for ``precision``. ``value`` is None (with ``why``) when the peak is
    unknown, the FLOPs were not counted, or the row was not measured on the target's hardware."""
    spec = PEAK_SPEC.get(precision)
    peak = specs.get(spec) if spec else None
    out: dict[str, Any] = {
        "value": None,
        "spec": spec,
        "peak_ops_per_s": None if peak is None else peak * 1e12,
    }
    if not on_target:
        out["why"] = "measured on this host, not on the target's hardware"
    elif not peak:
        out["why"] = f"the target's {spec or precision + ' peak'} is unknown (null in its targets/*.yaml)"
    elif not flops:
        out["why"] = "FLOPs were not counted"
    else:
        out["value"] = flops * throughput_per_s / (peak * 1e12)
    return out


def hardware_line(target: dict[str, Any]) -> str:
    """One short line: GPU/DLA or CPU, memory and dense peak INT8 throughput where known."""
    parts = []
    if target.get("gpu"):
        gpu = target["gpu"]
        parts.append(f"{gpu['architecture']} GPU {gpu['cuda_cores']} CUDA cores/{gpu['sm_count']} SM")
        parts.append(f"{target['dla_cores']} DLA")
    elif target.get("cpu"):
        parts.append(f"{target['cpu']['cores']}x {target['cpu']['model']}")
    specs = target.get("specs") or {}
    if specs.get("memory_gb"):
        parts.append(f"{specs['memory_gb']:g} GB")
    if specs.get("peak_int8_tops"):
        parts.append(f"{specs['peak_int8_tops']:g} INT8 TOPS dense")
    return ", ".join(parts) or "host-dependent"


def _row(source: dict[str, Any], group: str, target: Any, run: str) -> dict[str, Any]:
    """One comparison row from a run's report row; ``target`` None for the PyTorch references."""
    device = source.get("measured_on")
    on_target = target is not None and (device is not None or target.matches_host())
    measured_on = "this host" if on_target or target is None else STAND_IN
    if device:
        measured_on = device["hostname"]
    if target is None:
        share = {"value": None, "why": "reference model on this host"}
    else:
        share = peak_ops_share(
            source.get("flops"),
            source["latency"]["throughput_per_s"],
            source["precision"],
            target.specs,
            on_target,
        )
    lat, acc = source["latency"], source.get("accuracy")
    return {
        "target": None if target is None else target.name,
        "group": group,
        "name": source["name"],
        "role": source["role"],
        "runtime": source["runtime"],
        "precision": source["precision"],
        "measured_on": measured_on,
        "on_target_hardware": on_target,
        "run": run,
        "latency": {
            key: lat.get(key)
            for key in ("p50_ms", "p90_ms", "p99_ms", "throughput_per_s", "batch", "threads")
        },
        "accuracy": None if acc is None else acc["accuracy"],
        "agreement": None if acc is None else acc.get("agreement"),
        "size_bytes": source["size_bytes"],
        "params": source.get("params"),
        "flops": source.get("flops"),
        "rss_added_mb": (source.get("memory") or {}).get("rss_added_mb"),
        "peak_ops_share": share,
        "layer_times": source.get("layer_times"),
    }


def _target_record(entry: dict[str, Any]) -> dict[str, Any]:
    target, report = entry["target"], entry["report"]
    if report is None:
        status, not_measured = "not run", []
    else:
        not_measured = report.get("not_measured") or []
        measured = any("artifact" in row for row in report["rows"])
        status = "measured" if measured else "built, not measured here"
        if measured and not target.matches_host() and report.get("device") is None:
            status = "measured on this host as a stand-in (not the target's hardware)"
    return {
        **target.to_dict(),
        "hardware": hardware_line(target.to_dict()),
        "run_dir": str(entry["run_dir"]),
        "status": status,
        "why": entry["why"],
        "host_problems": target.host_problems(),
        "not_measured": not_measured,
    }


def build_comparison(run: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The report: one row per measured artifact (PyTorch references once), each target with its status.

    ``entries``: per target, ``target`` (a Target), ``run_dir``, ``report`` (its report.json, or None
    when it could not run here) and ``why`` (the reason it did not run).
    """
    measured = [entry for entry in entries if entry["report"] is not None]
    rows: list[dict[str, Any]] = []
    if measured:
        first = measured[0]["report"]
        rows += [_row(row, REFERENCE, None, first["run"]) for row in first["rows"] if "artifact" not in row]
    for entry in measured:
        report = entry["report"]
        rows += [
            _row(row, entry["target"].name, entry["target"], report["run"])
            for row in report["rows"]
            if "artifact" in row
        ]
    for number, row in enumerate(rows, start=1):
        row["id"] = number
    plotted = [row for row in rows if row["accuracy"] is not None]
    front = {
        plotted[i]["id"] for i in pareto_front([(r["latency"]["p50_ms"], r["accuracy"]) for r in plotted])
    }
    for row in rows:
        row["pareto"] = row["id"] in front if row["accuracy"] is not None else None
    first_report = measured[0]["report"] if measured else None
    return {
        "edgekd_hardware_report": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": run,
        "targets": [_target_record(entry) for entry in entries],
        "rows": rows,
        "pareto_front": sorted(front),
        "student": None if first_report is None else first_report["student"]["model"],
        "teacher": None if first_report is None else first_report["teacher"]["model"],
        "method": None if first_report is None else first_report["student"]["method"],
        "eval_frames": None if first_report is None else first_report["rows"][0]["accuracy"]["n"],
        "protocol": None if first_report is None else _protocol(first_report["rows"][0]["latency"]),
        "environment": None if first_report is None else first_report["environment"],
    }


def _protocol(latency: dict[str, Any]) -> dict[str, Any]:
    keys = ("warmup", "iterations", "batch", "threads", "clock", "percentile_method")
    return {key: latency.get(key) for key in keys}


def pareto_plot(comparison: dict[str, Any]) -> str:
    """The accuracy-vs-latency SVG of the comparison's rows (those with an accuracy)."""
    points = [
        Point(
            key=str(row["id"]),
            label=f"#{row['id']} {row['group']}: {row['name']} on {row['measured_on']}",
            group=row["group"],
            x=row["latency"]["p50_ms"],
            y=row["accuracy"],
        )
        for row in comparison["rows"]
        if row["accuracy"] is not None
    ]
    return pareto_svg(points, f"Accuracy vs latency (p50) — {comparison['run']}")


MEASUREMENT_HEADER = [
    "#",
    "target",
    "model / artifact",
    "measured on",
    "p50 ms",
    "p99 ms",
    "samples/s",
    "accuracy",
    "size",
    "RSS added",
    "peak-ops share",
    "Pareto",
]


def _share(share: dict[str, Any]) -> str:
    return "n/a" if share["value"] is None else f"{share['value'] * 100:.3g} %"


def measurement_rows(comparison: dict[str, Any]) -> list[list[str]]:
    """The measurement table's cells, shared by the Markdown, the HTML and the terminal."""
    out = []
    for row in comparison["rows"]:
        lat = row["latency"]
        out.append(
            [
                str(row["id"]),
                row["group"],
                row["name"],
                row["measured_on"],
                f"{lat['p50_ms']:.4f}",
                f"{lat['p99_ms']:.4f}",
                f"{lat['throughput_per_s']:.0f}",
                "–" if row["accuracy"] is None else f"{row['accuracy']:.4f}",
                human_bytes(row["size_bytes"]),
                "–" if row["rss_added_mb"] is None else f"{row['rss_added_mb']:.1f} MB",
                _share(row["peak_ops_share"]),
                {True: "yes", False: "", None: "–"}[row["pareto"]],
            ]
        )
    return out


def target_rows(comparison: dict[str, Any]) -> list[list[str]]:
    out = []
    for target in comparison["targets"]:
        if target["status"] == "not run":
            note = target["why"]
        else:
            note = "; ".join(target["host_problems"]) or "runs here"
        out.append([target["name"], target["backend"], target["hardware"], target["status"], note])
    return out


TARGET_HEADER = ["target", "backend", "hardware", "status", "notes"]


def _not_measured(comparison: dict[str, Any]) -> list[str]:
    """'name: why' for each target that did not run and each artifact built but not measured here."""
    items = []
    for target in comparison["targets"]:
        if target["status"] == "not run":
            items.append(f"{target['name']} (every precision): {target['why']}")
        items += [f"{target['name']} {item['name']}: {item['why']}" for item in target["not_measured"]]
    return items


def _intro(comparison: dict[str, Any]) -> str:
    env = comparison["environment"]
    if env is None:
        return "No target could run here; see the targets table for why."
    return (
        f"Student {comparison['student']} distilled from teacher {comparison['teacher']} with "
        f"`{comparison['method']}` (one training, shared by every target), accuracy on "
        f"{comparison['eval_frames']} held-out frames; rows measured on 'this host' ran on "
        f"{env['processor']} ({env['cpu_count']} cores, {env['machine']})."
    )


def _notes(comparison: dict[str, Any]) -> list[str]:
    proto = comparison["protocol"]
    front = ", ".join(f"#{number}" for number in comparison["pareto_front"]) or "none"
    lines = [
        f"Pareto front (no other row is both faster and more accurate): {front}.",
        "Peak-ops share = FLOPs per sample (2 per multiply-accumulate) x samples/s / the target's dense "
        "peak for that precision (targets/*.yaml `specs`); n/a when that peak is unknown or the row was "
        "not measured on the target's hardware.",
        "RSS added: resident memory this process gained while loading, evaluating and timing the artifact.",
        f"'{STAND_IN}': the target's artifact run on this host because no --device was given; its "
        "numbers are this host's, not the target's.",
    ]
    if proto:
        lines.append(
            f"Latency protocol: {proto['warmup']} warm-up + {proto['iterations']} timed calls, batch "
            f"{proto['batch']}, {proto['threads']} threads, clock {proto['clock']}, percentiles "
            f"{proto['percentile_method']}; model-only."
        )
    return lines


def _layer_sections(comparison: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"name": f"#{row['id']} {row['group']}: {row['name']}", "layer_times": row["layer_times"]}
        for row in comparison["rows"]
        if row.get("layer_times")
    ]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]


def render_markdown(comparison: dict[str, Any]) -> str:
    missing = _not_measured(comparison)
    lines = [
        f"# edgekd hardware-selection report — {comparison['run']}",
        "",
        f"Created {comparison['created']}. {_intro(comparison)}",
        "",
        "## Targets",
        "",
        *_md_table(TARGET_HEADER, target_rows(comparison)),
        "",
        "## Measurements",
        "",
        *_md_table(MEASUREMENT_HEADER, measurement_rows(comparison)),
        "",
        *(f"- {line}" for line in _notes(comparison)),
        "",
        "## Accuracy vs latency",
        "",
        "![Accuracy vs latency, Pareto front ringed](pareto.svg)",
    ]
    if missing:
        lines += ["", "## Not measured", "", *(f"- {item}." for item in missing)]
    lines += slowest_layers(_layer_sections(comparison))
    return "\n".join(lines) + "\n"


_NUMERIC = re.compile(r"^([-+]?[\d.,]+( ?(%|B|KB|MB|GB))?|n/a|–|yes|)$")  # right-aligned cells
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f0f0f0; }
th, td.text { text-align: left; }
tr.pareto td { background: #eef6ee; }
code { font-size: 12px; }
ul.notes { font-size: 13px; color: #444; }
"""


def _html_table(
    header: list[str], rows: list[list[str]], css_id: str, classes: list[str] | None = None
) -> str:
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = []
    for index, row in enumerate(rows):
        cls = f' class="{classes[index]}"' if classes and classes[index] else ""
        cells = "".join(
            f"<td>{escape(cell)}</td>" if _NUMERIC.match(cell) else f'<td class="text">{escape(cell)}</td>'
            for cell in row
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f'<table id="{css_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def render_html(comparison: dict[str, Any]) -> str:
    """One self-contained page: inline CSS and SVG, no scripts, no external resources."""
    rows = measurement_rows(comparison)
    classes = ["pareto" if row["pareto"] else "" for row in comparison["rows"]]
    missing = _not_measured(comparison)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>edgekd hardware-selection report — {escape(comparison['run'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>edgekd hardware-selection report — {escape(comparison['run'])}</h1>",
        f"<p>Created {escape(comparison['created'])}. {escape(_intro(comparison).replace('`', ''))}</p>",
        "<h2>Targets</h2>",
        _html_table(TARGET_HEADER, target_rows(comparison), "targets"),
        "<h2>Measurements</h2>",
        _html_table(MEASUREMENT_HEADER, rows, "measurements", classes),
        '<ul class="notes">'
        + "".join(f"<li>{escape(line.replace('`', ''))}</li>" for line in _notes(comparison))
        + "</ul>",
        "<h2>Accuracy vs latency</h2>",
        f'<figure id="pareto">{pareto_plot(comparison)}</figure>',
    ]
    if missing:
        parts += [
            "<h2>Not measured</h2>",
            "<ul>" + "".join(f"<li>{escape(i)}</li>" for i in missing) + "</ul>",
        ]
    sections = _layer_sections(comparison)
    if sections:
        parts.append("<h2>Slowest layers</h2>")
        for index, section in enumerate(sections):
            layers = section["layer_times"]
            cells = [[cell.strip("`") for cell in row] for row in layer_rows(layers)]
            parts += [
                f"<h3>{escape(section['name'])}</h3>",
                f"<p>{escape(layer_summary(layers))}</p>",
                _html_table(LAYER_HEADER, cells, f"layers-{index + 1}"),
            ]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
