"""The deployment decision: which compiled artifact the bundle embeds and the report calls deployed.

One rule, in one place (the bundle stage calls it; the manifest, ``model_data.c`` and the report read
its record):

1. **Budget.** An artifact meets the accuracy budget when its accuracy is at least the FP32 student's
   (its FP32 artifact's row, else its PyTorch row) minus ``quantize.max_accuracy_drop``
   (:data:`DEFAULT_MAX_DROP`, one point, when unset).
2. **Rule.** Among the artifacts measured on the target that meet the budget, the one with the lowest
   measured p50 latency is deployed. INT8 is not assumed faster: on small models it often is not
   (quantize/dequantize overhead and INT8 kernels that do not pay off at small sizes), so the choice
   follows the measurement, not the precision's name.
3. **Pin.** A pinned precision (``bundle.artifact``, ``edgekd bundle --artifact``) overrides the rule;
   the decision says what the rule would have chosen.
4. **Fallback.** With no artifact measured on the target (TensorRT engines without a GPU here: the
   profile stage's ``not_measured``), the recipe's precision is deployed — the pinned one, else INT8 if
   built, else FP32 — and the decision says so.

No artifact within the budget (none measured is FP32) deploys the most accurate one measured, and the
reason says the budget was missed. The record carries the candidates table (precision, accuracy, drop
vs FP32, p50, speedup vs FP32, peak memory, budget met, chosen) and one sentence of reason.
"""

from __future__ import annotations

from typing import Any

from edgekd.errors import RecipeError

DEFAULT_MAX_DROP = 0.01
RULE = "lowest measured p50 among the artifacts within the accuracy budget"
_EPSILON = 1e-9  # accuracy equal to the floor meets the budget despite float rounding


def _ratio(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") if value < 10 else f"{value:.0f}"


def _reference(rows: list[dict[str, Any]], artifacts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The FP32 student's row: its FP32 artifact's row, else its PyTorch row."""
    paths = {record["path"] for record in artifacts if record["precision"] == "fp32"}
    by_artifact = next((row for row in rows if row.get("artifact") in paths), None)
    torch_row = next(
        (
            row
            for row in rows
            if row.get("role") == "student" and row.get("runtime") == "torch" and row["precision"] == "fp32"
        ),
        None,
    )
    return by_artifact or torch_row


def _accuracy(row: dict[str, Any] | None) -> float | None:
    accuracy = None if row is None else row.get("accuracy")
    return None if accuracy is None else accuracy.get("accuracy")


def _candidates(
    rows: list[dict[str, Any]],
    artifacts: list[dict[str, Any]],
    unbuilt: list[dict[str, Any]],
    reference: dict[str, Any] | None,
    floor: float | None,
) -> list[dict[str, Any]]:
    """One entry per artifact (built here, then left to the device), with its measurement if any."""
    ref_accuracy = _accuracy(reference)
    fp32_p50 = None
    if reference is not None and reference.get("artifact") is not None:
        fp32_p50 = reference["latency"]["p50_ms"]
    out = []
    for record in artifacts:
        row = next((row for row in rows if row.get("artifact") == record["path"]), None)
        accuracy = _accuracy(row)
        p50 = None if row is None else row["latency"]["p50_ms"]
        memory = (row or {}).get("memory") or {}
        out.append(
            {
                "precision": record["precision"],
                "backend": record["backend"],
                "artifact": record["path"],
                "file": record["path"].rsplit("/", 1)[-1],
                "row": None if row is None else row["name"],
                "measured": row is not None,
                "accuracy": accuracy,
                "drop_vs_fp32": None
                if accuracy is None or ref_accuracy is None
                else round(ref_accuracy - accuracy, 6),
                "p50_ms": p50,
                "speedup_vs_fp32": None if p50 is None or fp32_p50 is None else round(fp32_p50 / p50, 3),
                "peak_memory_mb": memory.get("peak_added_mb"),
                "budget_met": None if accuracy is None or floor is None else accuracy >= floor - _EPSILON,
                "chosen": False,
            }
        )
    for item in unbuilt:
        out.append(
            {
                "precision": item["precision"],
                "backend": item["backend"],
                "artifact": None,
                "file": item["engine"].rsplit("/", 1)[-1],
                "row": None,
                "measured": False,
                "why_not_measured": item["why"],
                "accuracy": None,
                "drop_vs_fp32": None,
                "p50_ms": None,
                "speedup_vs_fp32": None,
                "peak_memory_mb": None,
                "budget_met": None,
                "chosen": False,
            }
        )
    return out


def _label(candidate: dict[str, Any]) -> str:
    return candidate["precision"].upper()


def _rule_reason(
    chosen: dict[str, Any], measured: list[dict[str, Any]], max_drop: float, metric: str = "accuracy"
) -> str:
    """One sentence: how each other measured candidate compares, then what is deployed."""
    parts = []
    for other in measured:
        if other is chosen:
            continue
        if not other["budget_met"]:
            parts.append(
                f"{_label(other)} drops {other['drop_vs_fp32']:.4f} {metric}, over the budget of {max_drop:g}"
            )
        elif other["speedup_vs_fp32"] is not None and other["precision"] != "fp32":
            parts.append(f"{_label(other)} is {_ratio(other['speedup_vs_fp32'])}x FP32 on this target")
        else:
            parts.append(f"{_label(other)} runs at p50 {other['p50_ms']:.3f} ms on this target")
    if chosen["precision"] != "fp32" and chosen["speedup_vs_fp32"] is not None:
        parts.append(
            f"{_label(chosen)} is {_ratio(chosen['speedup_vs_fp32'])}x FP32 within the budget "
            f"(drop {chosen['drop_vs_fp32']:.4f} <= {max_drop:g})"
        )
    lead = "; ".join(parts) if parts else f"{_label(chosen)} is the only artifact measured on this target"
    return f"{lead}: deploying {_label(chosen)}"


def decide(
    rows: list[dict[str, Any]],
    artifacts: list[dict[str, Any]],
    unbuilt: list[dict[str, Any]] | None = None,
    max_drop: float | None = None,
    pinned: str | None = None,
    target: str = "the target",
    metric: str = "accuracy",
) -> dict[str, Any]:
    """The deployment decision (see the module docstring) as a JSON-ready record.

    ``rows``: the profile stage's rows measured on the target (artifact rows carry ``artifact``, the
    run-relative path of the compile record they measured); ``artifacts``: the compile stage's
    records (``path``, ``backend``, ``precision``); ``unbuilt``: artifacts left to the device (its
    ``unbuilt_artifacts``); ``max_drop``: ``quantize.max_accuracy_drop``; ``pinned``: a precision
    that overrides the rule. A pinned precision that was not built is a RecipeError. ``metric`` names
    what the rows' ``accuracy`` measures in the reason (a detection run's is COCO mAP: the budget is
    then on the mAP drop); the record adds ``metric`` only when it is not ``"accuracy"``.
    """
    unbuilt = unbuilt or []
    budget_drop = DEFAULT_MAX_DROP if max_drop is None else max_drop
    reference = _reference(rows, artifacts)
    ref_accuracy = _accuracy(reference)
    floor = None if ref_accuracy is None else ref_accuracy - budget_drop
    candidates = _candidates(rows, artifacts, unbuilt, reference, floor)
    built = [c["precision"] for c in candidates]
    if pinned is not None and pinned not in built:
        raise RecipeError(
            f"bundle.artifact {pinned!r}: target {target} built {', '.join(built) or 'nothing'}; "
            "choose one of them (or unset it to deploy the fastest within the accuracy budget)"
        )
    measured = [c for c in candidates if c["measured"] and c["p50_ms"] is not None]
    within = [c for c in measured if c["budget_met"] or (c["budget_met"] is None and floor is None)]
    ruled: dict[str, Any] | None = None
    if within:
        ruled = min(within, key=lambda c: c["p50_ms"])
    elif measured:  # nothing meets the budget: the most accurate
        ruled = max(measured, key=lambda c: c["accuracy"] if c["accuracy"] is not None else -1.0)
    if pinned is not None:
        how = "pinned"
        chosen = next(c for c in candidates if c["precision"] == pinned)
        rule_says = "" if ruled is None else f"; the rule would deploy {_label(ruled)}"
        if ruled is chosen:
            rule_says = f"; the rule agrees ({_rule_reason(ruled, measured, budget_drop, metric)})"
        reason = (
            f"{_label(chosen)} is pinned (bundle.artifact or edgekd bundle --artifact): deploying "
            f"{_label(chosen)}{rule_says}"
        )
    elif ruled is not None:
        how = "rule" if within else "rule (budget missed)"
        chosen = ruled
        reason = _rule_reason(chosen, measured, budget_drop, metric)
        if not within:
            reason = (
                f"no artifact meets the {metric} budget (FP32 {ref_accuracy:.4f} - {budget_drop:g}): "
                f"deploying the most accurate, {_label(chosen)}"
            )
    elif candidates:
        how = "fallback"
        default = "int8" if "int8" in built else ("fp32" if "fp32" in built else built[0])
        chosen = next(c for c in candidates if c["precision"] == default)
        why = next((c.get("why_not_measured") for c in candidates if c.get("why_not_measured")), None)
        reason = (
            f"no artifact was measured on {target} here"
            + (f" ({why})" if why else "")
            + f": deploying the recipe's precision, {_label(chosen)} (bundle.artifact unset: INT8 if built, "
            "else FP32)"
        )
    else:
        return {
            "rule": RULE,
            "how": "none",
            "precision": None,
            "backend": None,
            "artifact": None,
            "file": None,
            "row": None,
            "reason": f"target {target} built no artifact: nothing to deploy",
            "budget": _budget(max_drop, budget_drop, reference, floor),
            "candidates": [],
        }
    chosen["chosen"] = True
    record = {
        "rule": RULE if metric == "accuracy" else RULE.replace("accuracy budget", f"{metric} budget"),
        "how": how,
        "precision": chosen["precision"],
        "backend": chosen["backend"],
        "artifact": chosen["artifact"],
        "file": chosen["file"],
        "row": chosen["row"],
        "reason": reason,
        "budget": _budget(max_drop, budget_drop, reference, floor),
        "candidates": candidates,
    }
    if metric != "accuracy":
        record["metric"] = metric
    return record


def _budget(
    max_drop: float | None, budget_drop: float, reference: dict[str, Any] | None, floor: float | None
) -> dict[str, Any]:
    return {
        "max_drop": budget_drop,
        "source": "quantize.max_accuracy_drop"
        if max_drop is not None
        else "the default: max_accuracy_drop unset",
        "reference": None if reference is None else reference["name"],
        "reference_accuracy": _accuracy(reference),
        "min_accuracy": None if floor is None else round(floor, 6),
    }
