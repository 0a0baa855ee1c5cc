"""The hardware-selection report: one student on several targets, side by side (JSON, Markdown, HTML).

Built from the per-target ``report.json`` of each ``compress`` run (see :mod:`edgekd.hardware`). Every
number is a measured one from those reports, except the share of the target's peak throughput, computed
here from the counted FLOPs, the measured throughput and a peak: the target's dense peak from its
``targets/*.yaml`` where given, else, for rows measured on this host, this host's GEMM ceiling measured
once per report (:mod:`edgekd.profile.host_peak`). Each share names its peak's source.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from html import escape
from typing import Any

from edgekd.profile.host_peak import measure_host_peak
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
    spec_file: str = "its targets/*.yaml",
    fallback: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Achieved ops per second over a peak: ``flops`` (per sample, 2 per multiply-accumulate) x
    ``throughput_per_s`` / the peak for ``precision``, with ``peak_source`` saying where it came from.

    The peak is the target's dense figure in ``specs`` (read from ``spec_file``) or, when that is null,
    ``fallback``: a measured ceiling (``ops_per_s``, ``source``; see :mod:`edgekd.profile.host_peak`)
    or a ``why`` there is none. ``value`` is None (with ``why``) when no peak is known, the FLOPs were
    not counted, or the row was not measured on the target's hardware."""
    spec = PEAK_SPEC.get(precision)
    peak = specs.get(spec) if spec else None
    fallback = fallback or {}
    if peak:
        peak_ops, source = peak * 1e12, f"{spec_file} specs.{spec} (published, dense)"
    else:
        peak_ops, source = fallback.get("ops_per_s"), fallback.get("source")
    out: dict[str, Any] = {"value": None, "spec": spec, "peak_ops_per_s": peak_ops, "peak_source": source}
    if not on_target:
        out["why"] = "measured on this host, not on the target's hardware"
    elif not peak_ops:
        reasons = [f"the target's {spec or precision + ' peak'} is unknown (null in {spec_file})"]
        out["why"] = "; ".join(reasons + ([fallback["why"]] if fallback.get("why") else []))
    elif not flops:
        out["why"] = "FLOPs were not counted"
    else:
        out["value"] = flops * throughput_per_s / peak_ops
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


def _spec_file(target: Any) -> str:
    """``targets/<name>.yaml`` (the folder and file the target was read from)."""
    return f"{target.source.parent.name}/{target.source.name}" if target.source else "its targets/*.yaml"


def _needs_host_peak(source: dict[str, Any], target: Any) -> bool:
    """Whether a target's row is measured on this host, on the target's arch, and its peak is null."""
    spec = PEAK_SPEC.get(source["precision"])
    return (
        "measured_on" not in source
        and target.matches_host()
        and spec is not None
        and not target.specs.get(spec)
    )


def _row(
    source: dict[str, Any], group: str, target: Any, run: str, host_peaks: dict[Any, dict[str, Any]]
) -> dict[str, Any]:
    """One comparison row from a run's report row; ``target`` None for the PyTorch references.
    ``host_peaks``: this host's measured GEMM ceilings by thread count (see :func:`_host_peaks`)."""
    device = source.get("measured_on")
    on_target = target is not None and (device is not None or target.matches_host())
    measured_on = "this host" if on_target or target is None else STAND_IN
    if device:
        measured_on = device["hostname"]
    if target is None:
        share = {"value": None, "why": "reference model on this host"}
    else:
        if device:
            fallback = {"why": f"this host's measured GEMM ceiling says nothing about {device['hostname']}"}
        else:
            fallback = host_peaks.get(source["latency"].get("threads"), {}).get(source["precision"])
        share = peak_ops_share(
            source.get("flops"),
            source["latency"]["throughput_per_s"],
            source["precision"],
            target.specs,
            on_target,
            _spec_file(target),
            fallback,
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
    host_peaks = _host_peaks(measured)
    rows: list[dict[str, Any]] = []
    if measured:
        first = measured[0]["report"]
        rows += [
            _row(row, REFERENCE, None, first["run"], host_peaks)
            for row in first["rows"]
            if "artifact" not in row
        ]
    for entry in measured:
        report = entry["report"]
        rows += [
            _row(row, entry["target"].name, entry["target"], report["run"], host_peaks)
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
        "host_peak": list(host_peaks.values()),
    }


def _host_peaks(measured: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """This host's GEMM ceilings, measured once per thread count used by a row that needs one."""
    threads = {
        row["latency"].get("threads")
        for entry in measured
        for row in entry["report"]["rows"]
        if "artifact" in row and _needs_host_peak(row, entry["target"])
    }
    return {count: measure_host_peak(count) for count in sorted(threads, key=lambda count: count or 0)}


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


def _peak_note(share: dict[str, Any]) -> str:
    """A share's footnote: its peak and where that came from, or why there is no share."""
    if share["value"] is None:
        return f"n/a: {share['why']}"
    return f"peak {share['peak_ops_per_s'] / 1e12:.3g} T ops/s, {share['peak_source']}"


def _marker(index: int) -> str:
    """Footnote markers a, b, ..., z, aa, ab, ..."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return letters


def _peak_markers(comparison: dict[str, Any]) -> dict[str, str]:
    """A footnote marker per distinct peak-ops note, in row order."""
    markers: dict[str, str] = {}
    for row in comparison["rows"]:
        markers.setdefault(_peak_note(row["peak_ops_share"]), _marker(len(markers)))
    return markers


def peak_footnotes(comparison: dict[str, Any]) -> list[str]:
    """'(a) peak ... T ops/s, <source>' or '(b) n/a: <why>': the footnotes of the peak-ops share column."""
    return [f"({marker}) {note}" for note, marker in _peak_markers(comparison).items()]


def measurement_rows(comparison: dict[str, Any]) -> list[list[str]]:
    """The measurement table's cells, shared by the Markdown, the HTML and the terminal."""
    markers = _peak_markers(comparison)
    out = []
    for row in comparison["rows"]:
        share = row["peak_ops_share"]
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
                f"{_share(share)} ({markers[_peak_note(share)]})",
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
        "Peak-ops share = FLOPs per sample (2 per multiply-accumulate) x samples/s / a peak for that "
        "precision: the target's dense peak (targets/*.yaml `specs`) where given; else, for a row measured "
        "on this host, this host's GEMM ceiling measured with ONNX Runtime at the row's thread count (a "
        "measured ceiling, not a datasheet figure; OpenVINO rows too); n/a when neither applies or the row "
        "was not measured on the target's hardware. Each share's footnote below says which.",
        *peak_footnotes(comparison),
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


_NUMERIC = re.compile(r"^([-+]?[\d.,]+( ?(%|B|KB|MB|GB))?|n/a|–|yes|)( \([a-z]+\))?$")  # right-aligned
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
