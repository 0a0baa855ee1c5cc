"""Assemble ``report.json`` from the stages' results: every number the report shows comes from here."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from edgekd.pipeline import RunContext
from edgekd.report.provenance import data_provenance

_PACKAGES = ("edgekd", "torch", "numpy", "onnx", "onnxruntime", "openvino", "nncf")


def environment() -> dict[str, Any]:
    """Host and package versions the numbers were measured with."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "packages": versions,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _find(
    rows: list[dict[str, Any]], runtime: str | None, precision: str, role: str = "student"
) -> dict | None:
    for row in rows:
        if (
            row["role"] == role
            and row["precision"] == precision
            and (runtime is None or row["runtime"] == runtime)
        ):
            return row
    return None


def headline(
    rows: list[dict[str, Any]],
    not_measured: list[dict[str, Any]] | None = None,
    deploy: bool = False,
    deployment: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Ratios a reader asks first: deployed student vs teacher speed, size and accuracy; INT8 drop.

    "Deployed" is the bundle's deployment decision (:mod:`edgekd.deployment`): its row when it was
    measured here. With no artifact measured here (``not_measured``: e.g. TensorRT engines on a host
    without a GPU), the ratios are those of the PyTorch student and ``not_measured`` names what is
    missing. ``deploy`` (``edgekd deploy``: no teacher) words the INT8 agreement as with the FP32 model.
    """
    teacher = next((row for row in rows if row["role"] == "teacher" and row["precision"] == "fp32"), None)
    deployed = [row for row in rows if "artifact" in row]
    chosen = None
    if deployment is not None and deployment.get("row") is not None:
        chosen = next((row for row in deployed if row["name"] == deployment["row"]), None)
    best = chosen or _find(rows, "torch", "fp32")
    fp32_artifact = next((row for row in deployed if row["precision"] == "fp32"), None)
    int8_artifact = next((row for row in deployed if row["precision"] == "int8"), None)
    if best is None:  # a deployed ONNX file (no PyTorch row) whose artifacts were all left to the device
        return {
            "deployed": _unmeasured_name(deployment) or "none measured here",
            "not_measured": ", ".join(i["name"] for i in not_measured or []),
        }
    out: dict[str, Any] = {"deployed": best["name"]}
    if chosen is None:
        left = _unmeasured_name(deployment)
        out["deployed"] = (
            f"{left} (not measured here; ratios of {best['name']})"
            if left
            else f"{best['name']} (reference: no deployed artifact was measured here)"
        )
    if not_measured:
        out["not_measured"] = ", ".join(item["name"] for item in not_measured)
    if teacher is not None:
        out["speedup_vs_teacher"] = round(teacher["latency"]["p50_ms"] / best["latency"]["p50_ms"], 2)
        out["size_ratio_vs_teacher"] = round(teacher["size_bytes"] / best["size_bytes"], 2)
        out["accuracy_gap_vs_teacher"] = round(
            best["accuracy"]["accuracy"] - teacher["accuracy"]["accuracy"], 5
        )
    if fp32_artifact is not None and int8_artifact is not None:
        out["int8_accuracy_drop"] = round(
            fp32_artifact["accuracy"]["accuracy"] - int8_artifact["accuracy"]["accuracy"], 5
        )
        out["int8_speedup_vs_fp32"] = round(
            fp32_artifact["latency"]["p50_ms"] / int8_artifact["latency"]["p50_ms"], 2
        )
        key = "int8_agreement_with_fp32" if deploy else "int8_agreement_with_pytorch"
        out[key] = int8_artifact["accuracy"]["agreement"]
    return out


def _unmeasured_name(deployment: dict[str, Any] | None) -> str | None:
    """The deployed artifact's name when the decision chose one not measured here (an engine left to
    the device), worded as the profile stage names its artifacts."""
    if deployment is None or deployment.get("precision") is None or deployment.get("row") is not None:
        return None
    return f"student ({deployment['backend']} {deployment['precision'].upper()})"


def labels_note(ctx: RunContext) -> str | None:
    """One line when accuracy is not against labels: deploy on unlabelled data uses the FP32 model's own."""
    model = ctx.results.get("model")
    if model is None or "labels_file" not in model.outputs:
        return None
    return (
        "The data has no labels: the FP32 model's own predictions stand in as labels, so every accuracy "
        "here is agreement with the FP32 model."
    )


def build_report(ctx: RunContext) -> dict[str, Any]:
    train_set, val_set, meta = ctx.dataset
    remote = ctx.results["remote"].outputs
    rows = ctx.output("profile", "rows") + remote["rows"]  # device rows carry "measured_on"
    not_measured = [  # here (engines without a GPU), then on the device (not built or not loadable there)
        *ctx.results["profile"].outputs.get("not_measured", []),
        *remote.get("not_measured", []),
    ]
    compiled = ctx.results["compile"].outputs
    deploy = "model" in ctx.results  # edgekd deploy: the model stage's model is the student; no teacher
    student = ctx.results["model" if deploy else "distill"].outputs
    profile = ctx.results["profile"].outputs
    # The bundle stage's decision: the headline's "deployed" and the bundle's C array name the same artifact.
    deployment = ctx.results["bundle"].outputs.get("deployment")
    stage_times = {
        name: {"wall_s": round(r.wall_s, 2), "cached": r.cached} for name, r in ctx.results.items()
    }
    report = {
        "edgekd_report": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": ctx.recipe.name,
        "mode": ctx.recipe.mode,
        "recipe": ctx.recipe.model_dump(mode="json"),
        "environment": environment(),
        "target": ctx.target.to_dict(),
        "data": {
            **meta.to_dict(),
            "train_frames": len(train_set),
            "eval_frames": len(val_set),
            "provenance": data_provenance(ctx),
        },
        "teacher": ctx.results["teacher"].outputs if "teacher" in ctx.results else None,
        "student": student,
        "labels_note": labels_note(ctx),
        "agreement_reference": profile.get("agreement_reference", "the FP32 PyTorch model"),
        "export": ctx.results["export"].outputs,
        "quantization": ctx.results["quantize"].outputs,
        "budget_ladder": budget_ladder(ctx),
        "artifacts": ctx.output("compile", "artifacts"),
        "rows": rows,
        "not_measured": not_measured,
        # Load of other processes while the profile stage measured; "warning" is set when it was loaded.
        "measurement_load": ctx.results["profile"].outputs.get("load"),
        "omp_wait_policy": ctx.results["profile"].outputs.get("omp_wait_policy"),
        "device_build": {
            key: compiled[key]
            for key in ("build_script_file", "bundle_files", "qdq_check")
            if key in compiled
        },
        "device": remote.get("device"),
        "device_engine_build": remote.get("engine_build"),
        "bundle": ctx.output("bundle", "bundle_dir"),
        "deployment": deployment,
        "headline": headline(
            [row for row in rows if "measured_on" not in row],
            not_measured,
            deploy=deploy,
            deployment=deployment,
        ),
        "stages": stage_times,
    }
    if ctx.task == "detection":  # classification reports keep exactly their keys
        report["task"] = "detection"
        report["detection"] = detection_summary(rows)
        report["headline"] = detection_headline(report["headline"], rows)
    return report


def detection_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A detection run's INT8 comparison: per INT8 artifact, mAP and agreement with the DETR rules and
    with naive full INT8, beside the FP32 student's mAP, so a reader sees what the rules buy."""
    student = next((r for r in rows if r["role"] == "student" and r["runtime"] == "torch"), None)
    fp32 = None if student is None else student["accuracy"]["map"]

    def drop(value: float | None) -> float | None:
        return None if value is None or fp32 is None else round(fp32 - value, 5)

    int8 = []
    for row in rows:
        if row.get("precision") != "int8" or "artifact" not in row or "measured_on" in row:
            continue  # the device's rows: its naive model is not in the bundle
        naive = row.get("naive_int8") or {}
        int8.append(
            {
                "row": row["name"],
                "rules_map": row["accuracy"]["map"],
                "rules_map_drop": drop(row["accuracy"]["map"]),
                "rules_agreement": row["accuracy"]["agreement"],
                "naive_map": naive.get("map"),
                "naive_map_drop": drop(naive.get("map")),
                "naive_agreement": naive.get("agreement"),
                "naive_p50_ms": naive.get("p50_ms"),
            }
        )
    return {
        "metric": "COCO mAP@[.5:.95] (faster-coco-eval), mAP@.5, agreement mAP vs the PyTorch student",
        "student_fp32_map": fp32,
        "int8": int8,
    }


def detection_headline(head: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline with the detection words: mAP gap and INT8 mAP drop instead of accuracy."""
    renamed = {
        "accuracy_gap_vs_teacher": "map_gap_vs_teacher",
        "int8_accuracy_drop": "int8_map_drop",
        "int8_agreement_with_pytorch": "int8_agreement_map_with_pytorch",
    }
    return {renamed.get(key, key): value for key, value in head.items()}


def budget_ladder(ctx: Any) -> list[dict[str, Any]] | None:
    """Every rung of the INT8 accuracy ladder tried (PTQ, PTQ with float nodes or NNCF, QAD), or None."""
    ladder = ctx.results["quantize"].outputs.get("ladder")
    for artifact in ctx.output("compile", "artifacts"):
        ladder = ((artifact.get("metadata") or {}).get("quantization") or {}).get("ladder") or ladder
    return ladder
