"""Accuracy of a runner on a labelled evaluation set, overall, per group (e.g. SNR) and as a confusion matrix.

Device-side code: imports only numpy (no torch). The same function evaluates the PyTorch
teacher/student (via TorchRunner) and every compiled artifact, so their numbers compare.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edgekd.errors import DataError, ModelError, RecipeError

if TYPE_CHECKING:
    from edgekd.backends.base import Runner


def predict(runner: Runner, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits of ``runner`` on ``x`` ``(N, ...)``, run in batches of ``batch_size``; shape ``(N, C)``."""
    if batch_size < 1:
        raise RecipeError(f"evaluation batch size must be >= 1, got {batch_size}")
    outputs = []
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        logits = np.asarray(runner.run(batch))
        if logits.ndim != 2 or len(logits) != len(batch):
            raise ModelError(
                f"runner ({runner.info.get('backend', '?')}) returned shape {logits.shape} for a batch of "
                f"{len(batch)}; expected logits shaped ({len(batch)}, classes)"
            )
        outputs.append(logits)
    return np.concatenate(outputs)


def group_key(value: float) -> str:
    """``-20.0`` → ``"-20"``, ``2.5`` → ``"2.5"``: integral group values print as integers."""
    number = float(value)
    return str(int(number)) if number.is_integer() else repr(number)


def _group_name(code: float, labels: list[str] | None) -> str:
    """The report key of group ``code``: its name in ``labels`` when given (and in range), else its value."""
    if labels is not None and float(code).is_integer() and 0 <= int(code) < len(labels):
        return str(labels[int(code)])
    return group_key(code)


def evaluate_classifier(
    runner: Runner,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    groups: np.ndarray | None = None,
    reference: np.ndarray | None = None,
    group_labels: list[str] | None = None,
) -> dict:
    """Top-1 accuracy of ``runner`` on ``(x, y)``: :func:`evaluate_logits` of its logits (:func:`predict`)."""
    _check_sizes(len(x), len(y))
    return evaluate_logits(predict(runner, x, batch_size), y, groups, reference, group_labels)


def _check_sizes(samples: int, labels: int) -> None:
    if samples == 0:
        raise DataError("evaluation set is empty; check the dataset split or profile.eval_samples")
    if labels != samples:
        raise DataError(f"evaluation set has {samples} inputs but {labels} labels")


def evaluate_logits(
    logits: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray | None = None,
    reference: np.ndarray | None = None,
    group_labels: list[str] | None = None,
) -> dict:
    """Top-1 accuracy of ``logits`` ``(N, C)`` against labels ``y``.

    Returns ``{accuracy, n, per_group, per_group_n, confusion, agreement}``: ``per_group`` maps each
    value of ``groups`` (one per sample, e.g. the SNR in dB; numerically sorted, keys like ``"-20"``)
    to the accuracy on its samples (None when ``groups`` is None); with ``group_labels`` the groups
    are codes 0..G-1 and the keys are their names (``group_labels[code]``, e.g. a string group of an
    npz dataset); ``confusion[true][predicted]``
    counts samples, over ``max(classes in the logits, largest label + 1)`` classes. With ``reference``
    (another model's predicted classes on the same samples) ``agreement`` is the share of equal
    predictions: how faithfully a compiled artifact reproduces the model it was built from.
    """
    labels = np.asarray(y)
    _check_sizes(len(logits), len(labels))
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise DataError(f"labels must be non-negative integer class indices, got dtype {labels.dtype}")
    predicted = logits.argmax(axis=1)
    correct = predicted == labels
    classes = max(logits.shape[1], int(labels.max()) + 1)
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    result: dict = {
        "accuracy": float(correct.mean()),
        "n": len(labels),
        "per_group": None,
        "per_group_n": None,
        "confusion": confusion.tolist(),
        "agreement": None if reference is None else float(np.mean(predicted == np.asarray(reference))),
    }
    if groups is not None:
        group_values = np.asarray(groups)
        if len(group_values) != len(labels):
            raise DataError(f"evaluation set has {len(labels)} samples but {len(group_values)} group values")
        uniques = np.unique(group_values)  # sorted numerically
        members = {_group_name(g, group_labels): group_values == g for g in uniques}
        result["per_group"] = {key: float(correct[mask].mean()) for key, mask in members.items()}
        result["per_group_n"] = {key: int(np.sum(mask)) for key, mask in members.items()}
    return result
