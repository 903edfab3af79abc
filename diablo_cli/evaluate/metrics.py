"""The scores the benchmarks report: accuracy, binary F1, Matthews correlation, Pearson and Spearman.

Small closed formulas, written out so that GLUE needs no scikit-learn or scipy; each is tested against a
hand-computed value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def accuracy(correct: Sequence[bool]) -> float:
    """The share of True (0.0 for an empty list)."""
    return sum(map(bool, correct)) / len(correct) if correct else 0.0


def _confusion(predictions: Sequence, references: Sequence, positive) -> tuple[int, int, int, int]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    tp = sum(p == positive and r == positive for p, r in zip(predictions, references, strict=True))
    fp = sum(p == positive and r != positive for p, r in zip(predictions, references, strict=True))
    fn = sum(p != positive and r == positive for p, r in zip(predictions, references, strict=True))
    tn = len(predictions) - tp - fp - fn
    return tp, fp, fn, tn


def f1_score(predictions: Sequence, references: Sequence, positive=1) -> float:
    """Binary F1 of the ``positive`` class (GLUE's MRPC and QQP); a prediction outside the classes counts as
    not positive. 0.0 when there is no positive prediction nor reference."""
    tp, fp, fn, _ = _confusion(predictions, references, positive)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews_corrcoef(predictions: Sequence, references: Sequence, positive=1) -> float:
    """Matthews correlation of a binary task (GLUE's CoLA), 0.0 when a margin is empty (the usual convention)."""
    tp, fp, fn, tn = _confusion(predictions, references, positive)
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation (GLUE's STS-B); 0.0 when either side is constant."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} values against {len(ys)}")
    n = len(xs)
    if n < 2:
        return 0.0
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    cov = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    var_x = sum((x - mean_x) ** 2 for x in xs)
    var_y = sum((y - mean_y) ** 2 for y in ys)
    return cov / math.sqrt(var_x * var_y) if var_x and var_y else 0.0


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks starting at 1, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson of the ranks, ties averaged."""
    return pearson(_ranks(xs), _ranks(ys))
