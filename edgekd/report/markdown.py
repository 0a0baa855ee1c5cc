"""Render ``report.json`` as Markdown: summary table, per-SNR accuracy, provenance and protocol."""

from __future__ import annotations

from typing import Any


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def human_count(value: float | None) -> str:
    if value is None:
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(int(value))


def human_bytes(value: int) -> str:
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"


def summary_rows(report: dict[str, Any]) -> list[list[Any]]:
    """One line per measured model/artifact; shared by the Markdown and the terminal table."""
    out = []
    for row in report["rows"]:
        lat = row["latency"]
        out.append(
            [
                row["name"],
                human_count(row.get("params")),
                human_count(row.get("flops")),
                human_bytes(row["size_bytes"]),
                f"{row['accuracy']['accuracy']:.4f}",
                "–" if row["accuracy"].get("agreement") is None else f"{row['accuracy']['agreement']:.4f}",
                f"{lat['p50_ms']:.3f}",
                f"{lat['p90_ms']:.3f}",
                f"{lat['p99_ms']:.3f}",
                f"{lat['throughput_per_s']:.0f}",
            ]
        )
    return out


SUMMARY_HEADER = [
    "model",
    "params",
    "FLOPs",
    "size",
    "accuracy",
    "agrees w/ PyTorch",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "samples/s",
]


def _per_snr(report: dict[str, Any]) -> list[str]:
    rows = [row for row in report["rows"] if row["accuracy"].get("per_group")]
    if not rows:
        return []
    snrs = list(rows[0]["accuracy"]["per_group"])
    body = [
        [row["name"], *(f"{row['accuracy']['per_group'].get(s, float('nan')):.2f}" for s in snrs)]
        for row in rows
    ]
    return ["", "## Accuracy per SNR (dB)", "", *_table(["model", *snrs], body)]


def render_markdown(report: dict[str, Any]) -> str:
    data, student, teacher = report["data"], report["student"], report["teacher"]
    head, parity = report["headline"], report["export"]["parity"]
    proto = report["rows"][0]["latency"]
    lines = [
        f"# edgekd report — {report['run']}",
        "",
        f"Target **{report['target']['name']}** ({report['target']['description']}), "
        f"created {report['created']} on {report['environment']['processor']} "
        f"({report['environment']['cpu_count']} cores).",
        "",
        "## Summary",
        "",
        *_table(SUMMARY_HEADER, summary_rows(report)),
        "",
        f"Deployed: **{head['deployed']}**. "
        + ", ".join(f"{key.replace('_', ' ')}: {value}" for key, value in head.items() if key != "deployed")
        + ".",
        *_per_snr(report),
        "",
        "## Training",
        "",
        f"- Data: {data['source']} — {data['train_frames']} train / {data['eval_frames']} held-out frames, "
        f"{len(data['classes'])} classes, input {tuple(data['input_shape'])}, "
        f"normalisation: {data['normalisation'].get('description', data['normalisation'].get('type'))}; "
        f"fingerprint `{data['fingerprint'][:16]}`.",
        f"- Teacher {teacher['model']} ({teacher['origin']}): "
        f"held-out accuracy {teacher['val_accuracy']:.4f}.",
        f"- Student {student['model']} distilled with `{student['method']}`: last epoch "
        f"{student['val_accuracy_last']:.4f}, best epoch {student['best_epoch']} "
        f"{student['val_accuracy_best']:.4f} (the last epoch's weights are deployed); "
        f"seed {report['recipe']['seed']}.",
        "",
        "## Export and quantisation",
        "",
        f"- ONNX opset {report['export']['export']['opset']}; ONNX Runtime vs PyTorch on {parity['samples']} "
        f"held-out frames: max |diff| {parity['max_abs_diff']:.2e} (tolerance {parity['tolerance']:.0e}), "
        f"top-1 agreement {parity['top1_agreement']:.4f}.",
        *_quantization(report["quantization"]),
        "",
        "## Measurement protocol",
        "",
        f"- Latency: {proto['warmup']} warm-up + {proto['iterations']} timed calls, batch {proto['batch']}, "
        f"{proto['threads']} threads, clock {proto['clock']}, percentiles {proto['percentile_method']}; "
        "the table is model-only; end-to-end (with the frame normalisation) p50 is in report.json.",
        "- Agreement: share of held-out frames where an artifact predicts the same class as the PyTorch "
        "student it was compiled from (an INT8 collapse shows here before it shows in accuracy).",
        f"- Accuracy: the held-out split ({report['rows'][0]['accuracy']['n']} frames), same for every row.",
        "",
        "## Stage times",
        "",
        *_table(
            ["stage", "wall s", "cached"],
            [[k, v["wall_s"], v["cached"]] for k, v in report["stages"].items()],
        ),
        "",
    ]
    return "\n".join(lines)


def _quantization(quant: dict[str, Any]) -> list[str]:
    if "skipped" in quant:
        return [f"- INT8: skipped ({quant['skipped']})."]
    q, calib = quant["quantization"], quant["quantization"]["calibration"]
    return [
        f"- INT8 {q['format']}: weights {q['weight_type']} "
        f"({'per-channel' if q['per_channel'] else 'per-tensor'}), "
        f"activations {q['activation_type']}, {q['method']} calibration on {calib['samples_used']} of "
        f"{calib['samples_requested']} requested train frames (data `{calib['dataset_fingerprint'][:16]}`, "
        f"preprocessing: {calib['preprocessing']})."
    ]
