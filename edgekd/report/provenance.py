"""Where the data sets the report's numbers rest on came from: calibration, accuracy budget, evaluation.

Each set is drawn from the run's dataset (the built-in data or the user's own, e.g. ``npz:FILE``)
the same way: calibration is a seeded random subset of the train split, the accuracy-aware set
other seeded train samples (never calibration ones), the profile's evaluation set and the bundle's
``eval.npz`` the first samples of the held-out split. This module reads what the stages recorded
(how many samples were actually used) and names the dataset, its file and its sha256 fingerprint.
"""

from __future__ import annotations

from typing import Any

from edgekd.pipeline import RunContext


def _quantization_records(ctx: RunContext) -> list[dict[str, Any]]:
    """The INT8 records: the quantize stage's (ONNX Runtime QDQ) and each self-quantised artifact's (NNCF)."""
    records = []
    quantize = ctx.results.get("quantize")
    if quantize is not None and quantize.outputs.get("quantization"):
        records.append(quantize.outputs["quantization"])
    compiled = ctx.results.get("compile")
    for artifact in compiled.outputs.get("artifacts", []) if compiled is not None else []:
        record = (artifact.get("metadata") or {}).get("quantization")
        if record:
            records.append(record)
    return records


def data_provenance(ctx: RunContext) -> dict[str, Any]:
    """Per set (``calibration``, ``accuracy_aware``, ``evaluation``, ``eval_npz``): its origin, or None.

    Each entry: ``dataset`` (registry name), ``source`` (file, folder or generator), ``fingerprint``
    (sha256 of the file or generating spec), ``split``, ``selection`` and ``samples``; None where the
    run made no such set (INT8 skipped, no accuracy budget, ``bundle.eval_samples: 0``).
    """
    train_set, val_set, meta = ctx.dataset
    origin = {"dataset": meta.name, "source": meta.source, "fingerprint": meta.fingerprint}
    records = _quantization_records(ctx)
    calibration = next((r["calibration"] for r in records if r.get("calibration")), None)
    budget = next(
        (r["accuracy_control"]["budget"] for r in records if (r.get("accuracy_control") or {}).get("budget")),
        None,
    )
    profile = ctx.results.get("profile")
    evaluated = profile.outputs.get("eval_frames") if profile is not None else None
    bundle_limit = ctx.recipe.bundle.eval_samples
    return {
        "calibration": None
        if calibration is None
        else {
            **origin,
            "split": "train",
            "selection": f"seeded random subset, seed {ctx.recipe.seed}, size quantize.calibration_samples",
            "samples": calibration.get("samples_used"),
        },
        "accuracy_aware": None
        if budget is None
        else {
            **origin,
            "split": budget.get("split", "train"),
            "selection": f"seeded random subset, seed {ctx.recipe.seed}, size quantize.accuracy_samples",
            "samples": budget.get("frames"),
        },
        "evaluation": None
        if evaluated is None
        else {
            **origin,
            "split": "held-out (val)",
            "selection": "the first samples, up to profile.eval_samples",
            "samples": evaluated,
        },
        "eval_npz": None
        if bundle_limit == 0 or "bundle" not in ctx.results
        else {
            **origin,
            "split": "held-out (val)",
            "selection": "the first samples, up to bundle.eval_samples",
            "samples": min(bundle_limit, len(val_set)),
        },
        "train_samples": len(train_set),
    }


def provenance_lines(data: dict[str, Any]) -> list[str]:
    """Markdown bullets for ``report["data"]["provenance"]`` (nothing for reports without it)."""
    provenance = data.get("provenance")
    if not provenance:
        return []
    names = {
        "calibration": "INT8 calibration set",
        "accuracy_aware": "accuracy-aware INT8 set",
        "evaluation": "evaluation set (accuracy, or mAP for detection, in this report)",
        "eval_npz": "bundle eval.npz",
    }
    parts = [
        f"{label}: {entry['samples']} samples ({entry['split']}; {entry['selection']})"
        for key, label in names.items()
        if (entry := provenance.get(key))
    ]
    if not parts:
        return []
    return [
        f"- Data provenance — every set below is from {data['name']} `{data['source']}` (fingerprint "
        f"`{data['fingerprint'][:16]}`): " + "; ".join(parts) + "."
    ]
