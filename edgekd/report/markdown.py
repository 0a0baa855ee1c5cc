"""Render ``report.json`` as Markdown: summary table, per-SNR accuracy, provenance and protocol."""

from __future__ import annotations

from typing import Any

from edgekd.report.provenance import provenance_lines


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
                _cell((row["accuracy"] or {}).get("accuracy"), ".4f"),
                _agreement(row["accuracy"]),
                f"{lat['p50_ms']:.3f}",
                f"{lat['p90_ms']:.3f}",
                f"{lat['p99_ms']:.3f}",
                f"{lat['throughput_per_s']:.0f}",
                _peak_memory(row),
            ]
        )
    return out


def _peak_memory(row: dict[str, Any]) -> str:
    """Resident memory loading and running the artifact added at its peak (profile stage), or –."""
    peak = (row.get("memory") or {}).get("peak_added_mb")
    return "–" if peak is None else f"{peak:.1f}"


def _agreement(accuracy: dict[str, Any] | None) -> str:
    return "–" if accuracy is None or accuracy.get("agreement") is None else f"{accuracy['agreement']:.4f}"


SUMMARY_HEADER = [
    "model",
    "params",
    "FLOPs",
    "size",
    "accuracy",
    "agrees w/ FP32",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "samples/s",
    "peak MB",
]


# A detection run's columns (the same count, so a terminal table of summary_rows lines up): the
# "accuracy" is COCO mAP@[.5:.95], the agreement the mAP against the PyTorch student's detections.
DETECTION_SUMMARY_HEADER = [
    "model",
    "params",
    "FLOPs",
    "size",
    "mAP",
    "agreement mAP",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "images/s",
    "peak MB",
]


def summary_header(report: dict[str, Any]) -> list[str]:
    """The summary table's header for ``report``'s task."""
    return DETECTION_SUMMARY_HEADER if report.get("task") == "detection" else SUMMARY_HEADER


def _detection(report: dict[str, Any]) -> list[str]:
    """A detection run: mAP@.5 per row, and the INT8 rule set against naive full INT8."""
    if report.get("task") != "detection":
        return []
    lines = [
        "",
        "## Detection",
        "",
        *_table(
            ["model", "mAP@[.5:.95]", "mAP@.5", "agreement mAP", "agreement mAP@.5"],
            [
                [
                    row["name"],
                    _cell(row["accuracy"].get("map"), ".4f"),
                    _cell(row["accuracy"].get("map50"), ".4f"),
                    _cell(row["accuracy"].get("agreement"), ".4f"),
                    _cell(row["accuracy"].get("agreement_map50"), ".4f"),
                ]
                for row in report["rows"]
                if row.get("accuracy")
            ],
        ),
    ]
    if any(
        row["accuracy"].get("agreement") is None and row.get("runtime") != "torch"
        for row in report["rows"]
        if row.get("accuracy") and row.get("role") == "student"
    ):
        lines += [
            "",
            "Agreement mAP –: the PyTorch student has no detection scoring >= 0.5 on these images (an "
            "untrained or weak detector), so there is nothing to agree with; see mAP instead.",
        ]
    summary = report.get("detection") or {}
    if summary.get("int8"):
        lines += [
            "",
            "INT8 with the DETR rule set (attention Softmax, LayerNorm and the class/box heads in float) "
            "and naive full INT8 (every op the quantiser can take), same calibration images; mAP drop vs "
            f"the FP32 PyTorch student ({_cell(summary.get('student_fp32_map'), '.4f')}):",
            "",
            *_table(
                ["artifact", "rules mAP", "rules drop", "rules agreement", "naive mAP", "naive drop",
                 "naive agreement", "naive p50 ms"],
                [
                    [
                        item["row"],
                        _cell(item["rules_map"], ".4f"),
                        _cell(item["rules_map_drop"], ".4f"),
                        _cell(item["rules_agreement"], ".4f"),
                        _cell(item["naive_map"], ".4f"),
                        _cell(item["naive_map_drop"], ".4f"),
                        _cell(item["naive_agreement"], ".4f"),
                        _cell(item["naive_p50_ms"], ".3f"),
                    ]
                    for item in summary["int8"]
                ],
            ),
        ]  # fmt: skip
    return lines


def _per_snr(report: dict[str, Any]) -> list[str]:
    """Accuracy per group of samples: per SNR for the radio data, per ``groups`` value for npz data.

    Rows measured on a device (from the bundle's eval.npz) key string groups by their codes; those
    are mapped to the names in ``data.group_labels``.
    """
    rows = [row for row in report["rows"] if (row["accuracy"] or {}).get("per_group")]
    if not rows:
        return []
    data = report.get("data") or {}
    codes = {name: str(code) for code, name in enumerate(data.get("group_labels") or [])}
    groups = list(rows[0]["accuracy"]["per_group"])

    def cell(per_group: dict[str, float], group: str) -> str:
        value = per_group.get(group, per_group.get(codes.get(group, group), float("nan")))
        return f"{value:.2f}"

    body = [[row["name"], *(cell(row["accuracy"]["per_group"], g) for g in groups)] for row in rows]
    heading = f"## Accuracy per {data.get('group_name', 'SNR (dB)')}"
    return ["", heading, "", *_table(["model", *groups], body)]


LAYER_HEADER = ["layer (runtime node)", "op", "median ms", "mean ms", "share"]


def layer_rows(layers: dict[str, Any]) -> list[list[str]]:
    """The slowest nodes of one artifact (:func:`edgekd.profile.layers.summarize_layers`) as table rows."""
    return [
        [
            f"`{layer['name']}`",
            layer["op"] + (f" ({layer['exec_type']})" if layer.get("exec_type") else ""),
            f"{layer['median_ms']:.4f}",
            f"{layer['mean_ms']:.4f}",
            f"{layer['share']:.1%}",
        ]
        for layer in layers["top"]
    ]


def layer_summary(layers: dict[str, Any]) -> str:
    return (
        f"{layers['source']}, {layers['runs']} runs after warm-up; {layers['nodes']} nodes ran, "
        f"{layers['layers_ms_per_run']:.4f} ms per run in total (sum of medians); ranked by median, "
        "share of that sum."
    )


def slowest_layers(rows: list[dict[str, Any]], heading: str = "##") -> list[str]:
    """Each artifact's slowest nodes where its runtime exposes them (why INT8 is or is not faster)."""
    lines = []
    for row in rows:
        layers = row.get("layer_times")
        if not layers or not layers["top"]:
            continue
        lines += [
            "",
            f"{heading}# {row['name']}: slowest layers",
            "",
            layer_summary(layers),
            "",
            *_table(LAYER_HEADER, layer_rows(layers)),
        ]
    return ["", f"{heading} Slowest layers", *lines] if lines else []


def render_markdown(report: dict[str, Any]) -> str:
    data, teacher = report["data"], report["teacher"]
    head = report["headline"]
    lines = [
        f"# edgekd report — {report['run']}",
        "",
        f"Target **{report['target']['name']}** ({report['target']['description']}), "
        f"created {report['created']} on {report['environment']['processor']} "
        f"({report['environment']['cpu_count']} cores).",
        "",
        "## Summary",
        "",
        *_table(summary_header(report), summary_rows(report)),
        "",
        f"Deployed: **{head['deployed']}**. "
        + ", ".join(f"{key.replace('_', ' ')}: {value}" for key, value in head.items() if key != "deployed")
        + ".",
        *(["", report["labels_note"]] if report.get("labels_note") else []),
        *_deployment(report.get("deployment"), report["rows"]),
        *_not_measured(report),
        *_load_warning(report),
        *_mcu(report),
        *_per_snr(report),
        *_detection(report),
        *slowest_layers(report["rows"]),
        "",
        "## Model" if teacher is None else "## Training",
        "",
        f"- Data: {data['source']} — {data['train_frames']} train / {data['eval_frames']} held-out "
        f"{'images' if report.get('task') == 'detection' else 'frames'}, "
        f"{len(data['classes'])} classes, input {tuple(data['input_shape'])}, "
        f"normalisation: {data['normalisation'].get('description', data['normalisation'].get('type'))}; "
        f"fingerprint `{data['fingerprint'][:16]}`.",
        *provenance_lines(data),
        *(_deployed_model(report) if teacher is None else _training(report)),
        "",
        "## Export and quantisation",
        "",
        _export(report["export"]),
        *_quantization(report["quantization"]),
        *_nncf(report["artifacts"]),
        *_budget_ladder(report.get("budget_ladder")),
        "",
        "## Measurement protocol",
        "",
        *_protocol(report["rows"]),
        *_runtime_settings(report["rows"]),
        *_machine_load(report),
        *_device(report),
        *_agreement_lines(report),
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


DEPLOYMENT_HEADER = [
    "artifact",
    "precision",
    "accuracy",
    "drop vs FP32",
    "p50 ms",
    "speedup vs FP32",
    "peak MB",
    "budget met",
    "chosen",
]


def _cell(value: Any, form: str) -> str:
    return "–" if value is None else format(value, form)


def deployment_rows(decision: dict[str, Any]) -> list[list[str]]:
    """The decision's candidates as table rows (:func:`edgekd.deployment.decide`)."""
    rows = []
    for item in decision["candidates"]:
        met = item["budget_met"]
        rows.append(
            [
                f"`{item['file']}`" + ("" if item["measured"] else " (not measured)"),
                item["precision"].upper(),
                _cell(item["accuracy"], ".4f"),
                _cell(item["drop_vs_fp32"], "+.4f"),
                _cell(item["p50_ms"], ".3f"),
                "–" if item["speedup_vs_fp32"] is None else f"{item['speedup_vs_fp32']:.2f}x",
                _cell(item["peak_memory_mb"], ".1f"),
                "–" if met is None else ("yes" if met else "no"),
                "**yes**" if item["chosen"] else "",
            ]
        )
    return rows


def _c_source(decision: dict[str, Any]) -> str:
    """The bundle's C array file: ``model_data.cc`` for a microcontroller (TFLM is C++), else ``.c``."""
    from edgekd.bundle.carray import SOURCE_FILE
    from edgekd.mcu.firmware import SOURCE_FILE as MCU_SOURCE_FILE

    return MCU_SOURCE_FILE if decision.get("backend") == "litert" else SOURCE_FILE


def _deployment(decision: dict[str, Any] | None, rows: list[dict[str, Any]]) -> list[str]:
    """The deployment decision the bundle embeds: the candidates, the budget, and why."""
    if not decision or not decision.get("candidates"):
        return []
    budget = decision["budget"]
    metric = decision.get("metric", "accuracy")  # a detection run's is mAP
    reference = (
        ""
        if budget["reference_accuracy"] is None
        else f" ({metric} >= {budget['min_accuracy']:.4f}: {budget['reference']} "
        f"{budget['reference_accuracy']:.4f} minus {budget['max_drop']:g}, {budget['source']})"
    )
    return [
        "",
        "## Deployment",
        "",
        f"Rule: {decision['rule']}{reference}; a pinned `bundle.artifact` overrides it. "
        f"**{decision['reason']}.** The bundle's `{_c_source(decision)}` and `manifest.json` embed and "
        "name this artifact.",
        "",
        *_table([metric if c == "accuracy" else c for c in DEPLOYMENT_HEADER], deployment_rows(decision)),
        "",
        "Peak MB: resident memory that loading the artifact and its timed runs added at their peak "
        "(VmHWM, reset before loading, minus VmRSS before; this process, this host; GPU memory not "
        "included).",
        *(
            f"- {row['name']}: the runtime reports {human_bytes(arena['bytes'])} of working memory "
            f"({arena['source']})."
            for row in rows
            if (arena := (row.get("memory") or {}).get("runtime_arena"))
        ),
    ]


def _mcu(report: dict[str, Any]) -> list[str]:
    """Microcontroller targets (issue 15): the ``.tflite``'s accuracy under TFLM, its I/O, the flash and
    SRAM it needs against the target's budget (arena measured by TFLM), and the cycle estimate per core."""
    lines: list[str] = []
    for record in report["artifacts"]:
        mcu = (record.get("metadata") or {}).get("mcu")
        if not mcu:
            continue
        quant = record["metadata"].get("quantization") or {}
        name = str(record["path"]).rsplit("/", 1)[-1]
        row = next(
            (
                r
                for r in report["rows"]
                if r.get("runtime") == record["backend"]
                and r["precision"] == record["precision"]
                and "measured_on" not in r
            ),
            None,
        )
        lines += ["", f"## Microcontroller: {report['target']['name']}", ""]
        if row is not None and row.get("accuracy"):
            info = row.get("runtime_info") or {}
            lines.append(
                f"- Accuracy of `{name}` under {info.get('interpreter', 'TensorFlow Lite Micro')} "
                f"{info.get('version') or ''}: **{row['accuracy']['accuracy']:.4f}** on the held-out split "
                f"({row['accuracy']['n']} frames), agreement with the FP32 model "
                f"{_agreement(row['accuracy'])}. "
                f"Its latency columns above are this host running TFLM's reference kernels, not the "
                f"microcontroller."
            )
        else:
            lines.append(f"- Accuracy of `{name}` under TFLM: not measured here.")
        if agree := mcu.get("interpreter_agreement"):
            lines.append(
                f"- TFLM vs LiteRT interpreter: top-1 agreement {agree['tflm_vs_litert_top1']:.4f} on "
                f"{agree['frames']} frames — {agree['frames_from']}."
            )
        lines.append(f"- Inputs/outputs: {_mcu_io(mcu.get('io'), quant)}.")
        if note := quant.get("budget_not_applied"):
            lines.append(f"- Note: {note}.")
        lines += _mcu_fit(mcu)
        lines += _mcu_cycles(mcu)
    return lines


def _mcu_io(io: dict[str, Any] | None, quant: dict[str, Any]) -> str:
    if io is None:  # a record from before the I/O option
        inp = quant.get("input_quantization")
        return "int8" + (f" (input scale {inp['scale']:.6g}, zero point {inp['zero_point']})" if inp else "")
    inp, out = io["input"], io["output"]
    if inp["dtype"] == "float32" and out["dtype"] == "float32":
        return (
            "float32 (compile.mcu_io: float; QUANTIZE/DEQUANTIZE inside the model, every other tensor INT8)"
        )
    parts = []
    for what, tensor in (("input", inp), ("output", out)):
        if tensor["dtype"] == "int8":
            parts.append(f"{what} int8, scale {tensor['scale']:.6g}, zero point {tensor['zero_point']}")
        else:
            parts.append(f"{what} {tensor['dtype']}")
    return "; ".join(parts) + " (real = scale × (q − zero point); the firmware quantises the frame)"


def _mcu_fit(mcu: dict[str, Any]) -> list[str]:
    fit = mcu.get("fit")
    if fit is None:
        return ["- Fit check: the target has no flash/SRAM budget (no mcu section)."]
    flash, sram = fit["flash"], fit["sram"]
    kernels = flash["kernel_bytes"]
    verdict = "**fits**" if fit["fits"] else "**does NOT fit**: " + "; ".join(fit["problems"])
    arena = mcu.get("arena") or {}
    return [
        "",
        f"Fit against {mcu.get('target', 'the target')}'s budget: {verdict}.",
        "",
        *_table(
            ["memory", "needed", "budget", "share", "made of"],
            [
                [
                    "flash",
                    f"{flash['needed_bytes']:,} B",
                    f"{flash['budget_bytes']:,} B",
                    f"{flash['share']:.1%}",
                    f"model {flash['model_bytes']:,} B (exact) + TFLM framework "
                    f"{flash['framework_bytes']:,} B + {len(kernels)} kernels "
                    f"{sum(kernels.values()):,} B (estimates)",
                ],
                [
                    "SRAM",
                    f"{sram['needed_bytes']:,} B",
                    f"{sram['budget_bytes']:,} B",
                    f"{sram['share']:.1%}",
                    f"tensor arena {sram['arena_bytes']:,} B (kTensorArenaSize; measured "
                    f"{sram['arena_measured_bytes']:,} B) + I/O buffers {sram['io_bytes']:,} B",
                ],
            ],
        ),
        "",
        f"Arena: {arena.get('measured_by', 'TFLM RecordingMicroAllocator')}"
        + (
            f", head {arena['head_bytes']:,} B + tail {arena['tail_bytes']:,} B"
            if arena.get("head_bytes") is not None and arena.get("tail_bytes") is not None
            else ""
        )
        + ". Stack and the application's own memory are not included.",
    ]


def _mcu_cycles(mcu: dict[str, Any]) -> list[str]:
    cycles = mcu.get("cycles")
    lines = []
    if cycles is not None:
        measured = cycles.get("measured_cycles")
        lines += [
            "",
            f"Cycles per inference on {cycles['core']} @ {cycles['clock_mhz']:g} MHz: "
            f"**{cycles['cycles']:,} (estimate)** ≈ {cycles['ms']:.2f} ms, {cycles['macs']:,} MACs "
            f"({cycles['model']}); measured on a board: "
            + ("none (a serial runner is a later step)." if measured is None else f"{measured:,}."),
        ]
    others = mcu.get("by_target")
    if others:
        lines += [
            "",
            "Every shipped microcontroller target (cycles and ms are estimates; flash/SRAM as above):",
            "",
            *_table(
                [
                    "target",
                    "core @ MHz",
                    "flash needed / budget",
                    "SRAM needed / budget",
                    "fits",
                    "est. cycles",
                    "est. ms",
                ],
                [
                    [
                        f"**{o['target']}**" if o["target"] == mcu.get("target") else o["target"],
                        f"{o['core']} @ {o['clock_mhz']:g}",
                        f"{human_bytes(o['flash_needed_bytes'])} / {human_bytes(o['flash_budget_bytes'])}",
                        f"{human_bytes(o['sram_needed_bytes'])} / {human_bytes(o['sram_budget_bytes'])}",
                        "yes" if o["fits"] else "no",
                        f"{o['cycles']:,}",
                        f"{o['ms']:.2f}",
                    ]
                    for o in others
                ],
            ),
        ]
    return lines


def _agreement_lines(report: dict[str, Any]) -> list[str]:
    if report.get("task") == "detection":
        return [
            "- Agreement mAP: an artifact's COCO mAP against "
            f"{report.get('agreement_reference', 'the FP32 PyTorch model')} taken as ground truth "
            "(1.0: it reproduces the model it was compiled from, whatever the model's own mAP).",
            f"- mAP: COCO mAP@[.5:.95] and mAP@.5 (faster-coco-eval, top 100 detections per image, no "
            f"score threshold) on the held-out split ({_frames(report)} images), same for every row.",
        ]
    return [
        "- Agreement: share of held-out frames where an artifact predicts the same class as "
        f"{report.get('agreement_reference', 'the FP32 PyTorch model')} it was compiled from (an INT8 "
        "collapse shows here before it shows in accuracy).",
        f"- Accuracy: the held-out split ({_frames(report)} frames), same for every row.",
    ]


def _training(report: dict[str, Any]) -> list[str]:
    """The teacher and the distilled student (edgekd compress)."""
    if report.get("task") == "detection":
        return _training_detection(report)
    teacher, student = report["teacher"], report["student"]
    accuracy = teacher.get("val_accuracy")
    return [
        f"- Teacher {teacher['model']} ({teacher['origin']}): "
        + ("held-out accuracy not measured." if accuracy is None else f"held-out accuracy {accuracy:.4f}."),
        f"- Student {student['model']} distilled with `{student['method']}`: last epoch "
        f"{student['val_accuracy_last']:.4f}, best epoch {student['best_epoch']} "
        f"{student['val_accuracy_best']:.4f} (the last epoch's weights are deployed); "
        f"seed {report['recipe']['seed']}.",
        _augmentation(student.get("augment")),
    ]


def _training_detection(report: dict[str, Any]) -> list[str]:
    """The detection teacher and student: held-out COCO mAP as their stages recorded it."""
    teacher, student = report["teacher"], report["student"]
    return [
        f"- Teacher {teacher['model']} ({teacher.get('origin', 'trained here')}): held-out mAP "
        f"{_cell(teacher.get('val_map'), '.4f')}, mAP@.5 {_cell(teacher.get('val_map50'), '.4f')}.",
        f"- Student {student['model']} distilled with `{student.get('method')}`: held-out mAP "
        f"{_cell(student.get('val_map'), '.4f')}, mAP@.5 {_cell(student.get('val_map50'), '.4f')}; "
        f"seed {report['recipe']['seed']}.",
    ]


def _deployed_model(report: dict[str, Any]) -> list[str]:
    """The model deployed as it is (edgekd deploy): where it came from, its accuracy as given."""
    model = report["student"]
    kind = "ONNX file" if model.get("format") == "onnx" else "PyTorch model"
    accuracy = model.get("val_accuracy")
    measured = (
        "held-out accuracy not measured (no labels)"
        if accuracy is None
        else f"held-out accuracy as given {accuracy:.4f}"
    )
    return [
        f"- Deployed {kind} {model['model']} (weights: {model['origin']}), trained elsewhere, no "
        f"distillation: {human_count(model.get('params'))} parameters, {measured}.",
    ]


def _export(export: dict[str, Any]) -> str:
    """The ONNX the artifacts were built from, and its parity with PyTorch when edgekd exported it."""
    info, parity = export["export"], export["parity"]
    if parity is not None and "class_agreement" in parity:  # a detector: both outputs compared
        outputs = parity["outputs"]
        return (
            f"- ONNX opset {info['opset']}, outputs logits and boxes; ONNX Runtime vs PyTorch on "
            f"{parity['samples']} held-out images: max |diff| logits {outputs['logits']['max_abs_diff']:.2e},"
            " "
            f"boxes {outputs['boxes']['max_abs_diff']:.2e} (tolerance {parity['tolerance']:.0e}), "
            f"per-query class agreement {parity['class_agreement']:.4f}."
        )
    if parity is None:
        fixed = "; its fixed batch axis was made dynamic" if info.get("dynamic_batch_added") else ""
        return f"- ONNX: the user's file ({info['exporter']}), opset {info['opset']}, not re-exported{fixed}."
    return (
        f"- ONNX opset {info['opset']}; ONNX Runtime vs PyTorch on {parity['samples']} "
        f"held-out frames: max |diff| {parity['max_abs_diff']:.2e} (tolerance {parity['tolerance']:.0e}), "
        f"top-1 agreement {parity['top1_agreement']:.4f}."
    )


def _frames(report: dict[str, Any]) -> int:
    rows = report["rows"]
    return rows[0]["accuracy"]["n"] if rows else report["data"]["eval_frames"]


def _protocol(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["- Latency: nothing was measured here (see Not measured)."]
    proto = rows[0]["latency"]
    return [
        f"- Latency: {proto['warmup']} warm-up + {proto['iterations']} timed calls, batch {proto['batch']}, "
        f"{proto['threads']} threads, clock {proto['clock']}, percentiles {proto['percentile_method']}; "
        "the table is model-only; end-to-end (with the input normalisation) p50 is in report.json."
    ]


def _load_warning(report: dict[str, Any]) -> list[str]:
    """A visible warning under the summary when other processes loaded the machine during profiling."""
    load = report.get("measurement_load") or {}
    return ["", f"> **Warning:** {load['warning']}."] if load.get("warning") else []


def _machine_load(report: dict[str, Any]) -> list[str]:
    """The OpenMP wait policy and the load of other processes while the rows were measured."""
    load, policy = report.get("measurement_load"), report.get("omp_wait_policy")
    lines = []
    if policy:
        lines.append(f"- OpenMP wait policy (PyTorch rows): {policy['value']} ({policy['source']}).")
    if load:
        state, window = "loaded" if load["loaded"] else "quiet", load["window"]
        lines.append(
            f"- Machine load while measuring: {state} — other processes kept {load['other_busy_cores']:.2f} "
            f"of {window['cpus']} cores busy on average (max per row {load['other_busy_cores_max']:.2f}; "
            f"{window['source']}, {window['window_s']:.1f} s)."
        )
    return lines


def _augmentation(augment: dict | None) -> str:
    """The distillation's augmentation, as one bullet: its policy, operations and bank size."""
    if augment is None:
        return "- Augmentation: none (`distill.augment.enabled: false`)."
    return (
        f"- Augmentation (`{augment['policy']}`, {augment['variants']} fixed variants per sample, seed "
        f"{augment['seed']}; {augment['as_in']}): " + "; ".join(augment["ops"]) + "."
    )


def _not_measured(report: dict[str, Any]) -> list[str]:
    """What was measured (the table) and what was not, with why; the device build files if any."""
    missing = report.get("not_measured") or []
    if not missing:
        return []
    build = report.get("device_build") or {}
    lines = [
        "",
        "## Not measured",
        "",
        "These artifacts were **not** built or measured, so no latency or "
        f"{'mAP' if report.get('task') == 'detection' else 'accuracy'} is reported for them "
        "(each line says where and why):",
        "",
        *(f"- {item['name']}: {item['why']}." for item in missing),
    ]
    if build.get("build_script_file"):
        lines += [
            "",
            f"To build them on the device: copy the folder of `{build['build_script_file']}` "
            f"({', '.join(f'`{name}`' for name in build.get('bundle_files', []))}) and run the script.",
        ]
    return lines


def _quantization(quant: dict[str, Any]) -> list[str]:
    if "skipped" in quant:
        control = quant.get("quantization", {}).get("accuracy_control")
        return [f"- INT8 QDQ: skipped ({quant['skipped']}).", *_accuracy_control(control)]
    q, calib = quant["quantization"], quant["quantization"]["calibration"]
    return [
        f"- INT8 {q['format']}: weights {q['weight_type']} "
        f"({'per-channel' if q['per_channel'] else 'per-tensor'}), "
        f"activations {q['activation_type']}, {q['method']} calibration on {calib['samples_used']} of "
        f"{calib['samples_requested']} requested train frames (data `{calib['dataset_fingerprint'][:16]}`, "
        f"preprocessing: {calib['preprocessing']}).",
        *_kept_in_float(q.get("kept_in_float"), "INT8 QDQ model"),
        *_accuracy_control(q.get("accuracy_control")),
    ]


_RUNGS = {
    "ptq": "PTQ",
    "ptq_float_nodes": "PTQ, most damaging nodes in float",
    "nncf_accuracy_control": "NNCF accuracy-aware PTQ",
    "qad": "QAD (quantisation-aware distillation)",
}


def _budget_ladder(ladder: list[dict[str, Any]] | None) -> list[str]:
    """The INT8 accuracy ladder: every rung tried, with accuracy, drop, latency and time."""
    if not ladder:
        return []

    def number(value: Any, form: str) -> str:
        return "—" if value is None else format(value, form)

    lines = [
        "",
        "INT8 accuracy ladder (stops at the first rung within quantize.max_accuracy_drop; accuracy on "
        "the budget's train frames, latency: ONNX Runtime CPU, 1 thread, batch 1):",
        "",
        "| rung | accuracy | drop | budget met | latency (ms) | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for rung in ladder:
        met = {True: "yes", False: "no", None: "—"}[rung.get("met")]
        lines.append(
            f"| {_RUNGS.get(rung['rung'], rung['rung'])} | {number(rung.get('accuracy'), '.4f')} | "
            f"{number(rung.get('drop'), '.4f')} | {met} | {number(rung.get('latency_ms'), '.3f')} | "
            f"{number(rung.get('seconds'), '.1f')} |"
        )
    return lines


def _kept_in_float(counts: dict[str, int] | None, what: str) -> list[str]:
    """The "Kept in float" line of one INT8 model: compute ops its quantiser left in float, by op type."""
    if counts is None:
        return []
    listed = ", ".join(f"{op} ×{count}" for op, count in counts.items()) or "none (every compute op is INT8)"
    return [f"  - Kept in float ({what}): {listed}."]


def _accuracy_control(control: dict[str, Any] | None) -> list[str]:
    if control is None:
        return []
    budget = control["budget"]
    before = (
        f"drop {control['drop_before']:.4f} with every layer INT8, "
        if control.get("drop_before") is not None
        else ""
    )
    kept = control.get("excluded_nodes")
    return [
        f"- Accuracy-aware INT8 (budget {budget['max_drop']} absolute top-1 on {budget['frames']} frames: "
        f"{budget.get('split', 'unknown split')}): {before}drop {control['drop_after']:.4f} after"
        + (
            f" {control['attempts']} attempt(s), {len(kept)} node(s) kept in float"
            if kept is not None
            else ""
        )
        + f" — budget {'met' if control['met'] else 'NOT met'}."
    ]


def _nncf(artifacts: list[dict[str, Any]]) -> list[str]:
    lines = []
    for record in artifacts:
        q = record["metadata"].get("quantization")
        if not q or q.get("tool") != "nncf":
            continue
        lines.append(
            f"- {record['backend']} INT8 by NNCF {q['nncf_version']} from the float model: "
            f"preset {q['preset']}, {q['subset_size']} calibration samples "
            f"(data `{q['calibration']['dataset_fingerprint'][:16]}`), "
            f"{q['fake_quantize_nodes']} FakeQuantize nodes, ignored scope {q['ignored_scope'] or 'none'}."
        )
        lines += _kept_in_float(q.get("kept_in_float"), f"{record['backend']} {record['precision']}")
        lines += _accuracy_control(q.get("accuracy_control"))
    return lines


def _runtime_settings(rows: list[dict[str, Any]]) -> list[str]:
    """Settings that change speed, for runtimes that take a performance hint (OpenVINO)."""
    lines = []
    for row in rows:
        info = row.get("runtime_info") or {}
        if "hint" in info:
            lines.append(
                f"- {row['name']}: {info['device_name']}, hint {info['hint']}, {info['threads']} threads, "
                f"{info['num_streams']} stream(s), {info['requests']}, inference precision "
                f"{info['inference_precision']} (OpenVINO {info['version']})."
            )
    return lines


def _device(report: dict[str, Any]) -> list[str]:
    """Where the rows marked 'on <host>' were measured (remote stage, over SSH)."""
    device = report.get("device")
    if not device:
        return []
    runtimes = ", ".join(f"{k} {v}" for k, v in device["runtimes"].items() if v)
    where = (
        f"({device['arch']}, {device['processor']}, {device['cpu_count']} cores, {device['platform']}, "
        f"Python {device['python']}; {runtimes})"
    )
    lines = _engine_build(report.get("device_engine_build"), device["hostname"])
    rows = [row for row in report["rows"] if row.get("measured_on")]
    if not rows:
        return [
            *lines,
            f"- Device {device['hostname']} {where}: reached over SSH with the bundle `{report['bundle']}`; "
            f"nothing could be measured there (see Not measured).",
        ]
    measured = [row["accuracy"]["n"] for row in rows if row["accuracy"]]
    frames = measured[0] if measured else "no"
    return [
        *lines,
        f"- Rows 'on {device['hostname']}': measured on that device over SSH from the bundle "
        f"`{report['bundle']}` {where}, same latency protocol, model-only; "
        + (
            f"mAP on the bundle's eval.npz ({frames} held-out images; "
            "scored from the device's detections, on the host when the device lacks faster-coco-eval), "
            "agreement mAP against the PyTorch student's detections on the same images."
            if report.get("task") == "detection"
            else f"accuracy on the bundle's eval.npz ({frames} held-out frames)."
        ),
    ]


def _engine_build(build: dict[str, Any] | None, hostname: str) -> list[str]:
    """How the device built the TensorRT engines the bundle left to it, if it did."""
    if not build:
        return []
    built = ", ".join(f"`{name}`" for name in build["built"]) or "no engine"
    why = "" if build["why"] is None else f"; {build['why']}"
    return [f"- Engine build on {hostname} (`{build['script']}`, {build['seconds']} s): built {built}{why}."]
