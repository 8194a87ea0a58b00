"""Statistics of evaluation results."""

from __future__ import annotations

import math

from scipy.stats import norm


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    ``(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`` with ``p = correct/n``.
    """
    if n == 0:
        return (0.0, 0.0)
    z = float(norm.ppf(1 - (1 - confidence) / 2))
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy_summary(correct_by_set: dict[str, list[bool]]) -> dict:
    """Per-benchmark n, accuracy and Wilson 95% interval; macro = equal-weighted mean over benchmarks."""
    per = {}
    for name, flags in correct_by_set.items():
        n, k = len(flags), sum(flags)
        low, high = wilson_interval(k, n)
        per[name] = {"n": n, "correct": k, "accuracy": k / n if n else 0.0, "wilson_low": low, "wilson_high": high}
    macro = sum(v["accuracy"] for v in per.values()) / len(per) if per else 0.0
    return {"benchmarks": per, "macro_accuracy": macro}
