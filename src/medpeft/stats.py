"""Statistics of evaluation results."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (scipy's ``binomtest(...).proportion_ci``):
    ``(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`` with ``p = correct/n``."""
    if n == 0:
        return (0.0, 0.0)
    ci = binomtest(correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def headline(bench: dict) -> float:
    """A benchmark's headline number in ``results.json``: its ``score`` (accuracy, or ROUGE-L F
    of a summarisation set), or the ``accuracy`` of results written before scores existed."""
    return bench["score"] if "score" in bench else bench["accuracy"]


def mean_interval(values, n_resamples: int = 10_000, seed: int = 0, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (``scipy.stats.bootstrap``, seeded)."""
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=float)
    if len(values) < 2 or np.all(values == values[0]):  # no spread to resample
        mean = float(values.mean()) if len(values) else 0.0
        return mean, mean
    ci = bootstrap((values,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                   random_state=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)


def results_summary(correct_by_set: dict[str, list[bool]], rouge_by_set: dict[str, list[dict]] | None = None,
                    order: list[str] | None = None) -> dict:
    """Every benchmark's results and the macro average of their headline numbers.

    A QA set: n, correct, accuracy with its Wilson 95% interval (``score`` = accuracy). A
    summarisation set: n, mean ROUGE-1/2/L F over its items with a bootstrap 95% interval
    of ROUGE-L (``score`` = ROUGE-L F). ``macro_accuracy`` is the equal-weighted mean of the
    scores, mixing accuracy and ROUGE-L as Med-MoE-LoRA's Average does (``macro_metrics``
    says which sets contribute what).
    """
    per = {name: {"metric": "accuracy", "score": v["accuracy"], **v}
           for name, v in accuracy_summary(correct_by_set)["benchmarks"].items()}
    for name, rows in (rouge_by_set or {}).items():
        means = {k: float(np.mean([r[k] for r in rows])) if rows else 0.0 for k in ("rouge1", "rouge2", "rougeL")}
        low, high = mean_interval([r["rougeL"] for r in rows])
        per[name] = {"metric": "rougeL", "score": means["rougeL"], "n": len(rows), **means, "ci_low": low,
                     "ci_high": high}
    if order is not None:
        per = {name: per[name] for name in order}
    macro = sum(headline(v) for v in per.values()) / len(per) if per else 0.0
    return {"benchmarks": per, "macro_accuracy": macro,
            "macro_metrics": sorted({v["metric"] for v in per.values()})}


def accuracy_summary(correct_by_set: dict[str, list[bool]]) -> dict:
    """Per-benchmark n, accuracy and Wilson 95% interval; macro = equal-weighted mean over benchmarks."""
    per = {}
    for name, flags in correct_by_set.items():
        n, k = len(flags), sum(flags)
        low, high = wilson_interval(k, n)
        per[name] = {"n": n, "correct": k, "accuracy": k / n if n else 0.0, "wilson_low": low, "wilson_high": high}
    macro = sum(v["accuracy"] for v in per.values()) / len(per) if per else 0.0
    return {"benchmarks": per, "macro_accuracy": macro}


# ----------------------------------------------------------------------------- paired comparisons

def stratified_paired_bootstrap(
    deltas: dict[str, np.ndarray],
    n_resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Benchmark-stratified paired bootstrap of the macro-average score difference.

    ``deltas[b]`` holds, per item of benchmark b, ``score_A - score_B``: in {-1, 0, 1} for
    correctness, any real value otherwise (a summarisation set's ROUGE-L, per-item Brier or NLL).
    Each resample redraws every benchmark's items with replacement (stratified) and
    averages the per-benchmark mean deltas (the macro average). The percentile interval
    of the resampled macro deltas is returned.

    Vectorised without materialising the resampled items: a resample's mean of a
    {-1, 0, 1} variable depends only on how many +1 and -1 items it drew, and drawing n
    items with replacement gives those counts a Multinomial(n; p+, p0, p-) law, which is
    sampled directly (10,000 resamples of 20,000 items take milliseconds). Other deltas (ROUGE)
    are resampled by drawing item indices, in chunks of 1,000 resamples.
    """
    rng = np.random.default_rng(seed)
    macro = np.zeros(n_resamples)
    observed = []
    for values in deltas.values():
        values = np.asarray(values)
        n = len(values)
        if n == 0:
            raise ValueError("a benchmark with no paired items")
        if np.isin(values, (-1, 0, 1)).all():
            counts = np.array([(values == 1).sum(), (values == 0).sum(), (values == -1).sum()])
            draws = rng.multinomial(n, counts / n, size=n_resamples)
            macro += (draws[:, 0] - draws[:, 2]) / n
        else:
            for start in range(0, n_resamples, 1000):
                size = min(1000, n_resamples - start)
                macro[start:start + size] += values[rng.integers(0, n, size=(size, n))].mean(axis=1)
        observed.append(values.mean())
    macro /= len(deltas)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(macro, [alpha, 1 - alpha])
    return {"macro_delta": float(np.mean(observed)), "ci_low": float(low), "ci_high": float(high),
            "resamples": macro}


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test over the discordant pairs (ties dropped). Written out rather
    than calling ``scipy.stats.binomtest`` so that the tests can use binomtest as an independent check:
    ``p = min(1, 2 min(P[X <= w], P[X >= w]))``, ``X ~ Binomial(wins + losses, 1/2)``."""
    from scipy.stats import binom

    n = wins + losses
    if n == 0:
        return 1.0
    return float(min(1.0, 2 * min(binom.cdf(wins, n, 0.5), binom.sf(wins - 1, n, 0.5))))


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone), in the input order."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    m = len(p_values)
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


# ----------------------------------------------------------------------------- calibration

CALIBRATION_BINS = 15  # equal-width confidence bins of the ECE (Guo et al., 2017)
SELECTIVE_COVERAGES = (0.25, 0.5, 0.75, 1.0)


def option_log_probabilities(scores: dict[str, float]) -> dict[str, float]:
    """``log p_k = s_k - logsumexp(s)``: the options' scores (log-likelihoods) renormalised over
    the options (lm-eval's ``prob_norm`` is the same softmax)."""
    from scipy.special import logsumexp

    values = np.array(list(scores.values()), dtype=float)
    norm = float(logsumexp(values))
    return {k: float(v) - norm for k, v in scores.items()}


def item_calibration(scores: dict[str, float], gold: str) -> dict[str, float]:
    """One single-answer item's confidence (max option probability), Brier score
    ``sum_k (p_k - y_k)^2`` over the options and negative log-likelihood ``-log p_gold``."""
    logp = option_log_probabilities(scores)
    probs = {k: float(np.exp(v)) for k, v in logp.items()}
    return {"confidence": max(probs.values()), "brier": sum((p - (k == gold)) ** 2 for k, p in probs.items()),
            "nll": -logp[gold]}


def calibration_summary(confidence: list[float], correct: list[bool], brier: list[float], nll: list[float],
                        bins: int = CALIBRATION_BINS) -> dict:
    """Calibration of a set's single-answer predictions.

    * ECE = ``sum_m |B_m|/n |acc(B_m) - conf(B_m)|`` over ``bins`` equal-width bins of the
      confidence, bin m holding confidences in ``(m/M, (m+1)/M]`` (the first also 0).
    * Brier and NLL: means of the per-item values (:func:`item_calibration`).
    * Selective prediction: abstaining below a confidence threshold, the accuracy of the items
      kept against their share (coverage), at every distinct confidence (``curve``: threshold,
      coverage, accuracy); and the accuracy of the ``ceil(c n)`` most confident items at the
      coverages ``c`` of ``SELECTIVE_COVERAGES`` (ties in confidence kept in item order).
    """
    conf = np.asarray(confidence, dtype=float)
    right = np.asarray(correct, dtype=float)
    n = len(conf)
    if n == 0:
        return {"n": 0}
    index = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    table, ece = [], 0.0
    for m in range(bins):
        members = index == m
        count = int(members.sum())
        acc = float(right[members].mean()) if count else None
        mean_conf = float(conf[members].mean()) if count else None
        if count:
            ece += count / n * abs(acc - mean_conf)
        table.append({"low": m / bins, "high": (m + 1) / bins, "n": count, "accuracy": acc, "confidence": mean_conf})
    order = np.argsort(-conf, kind="stable")
    kept_right = np.cumsum(right[order])
    curve = []
    for threshold in sorted(set(conf.tolist()), reverse=True):
        k = int((conf >= threshold).sum())
        curve.append([threshold, k / n, float(kept_right[k - 1] / k)])
    if len(curve) > 200:  # a readable curve: 200 points spread over the thresholds, the last kept
        curve = [curve[i] for i in np.unique(np.linspace(0, len(curve) - 1, 200).round().astype(int))]
    at = {str(c): float(kept_right[max(int(np.ceil(c * n)), 1) - 1] / max(int(np.ceil(c * n)), 1))
          for c in SELECTIVE_COVERAGES}
    return {"n": n, "bins": bins, "ece": float(ece), "brier": float(np.mean(brier)), "nll": float(np.mean(nll)),
            "accuracy": float(right.mean()), "mean_confidence": float(conf.mean()), "reliability": table,
            "selective": {"accuracy_at_coverage": at, "curve": curve}}


# ----------------------------------------------------------------------------- seeds and items

def seed_item_bootstrap(scores_a: dict[str, np.ndarray], scores_b: dict[str, np.ndarray], n_resamples: int = 10_000,
                        seed: int = 0, confidence: float = 0.95) -> dict:
    """Two-level paired bootstrap of the macro difference between two training *recipes*.

    ``scores_a[b]`` is a (seeds of A) x (items of benchmark b) array of per-item scores, one row
    per training seed (likewise B; the same items in the same order). Each resample

    1. redraws A's seeds with replacement and B's seeds with replacement (one draw per method
       for all benchmarks: a seed is one trained model), giving seed weights ``w_A``, ``w_B``;
    2. redraws every benchmark's items with replacement (stratified; the same items for A and
       B: paired), ``n_b`` item indices ``i_1 .. i_n``;
    3. computes ``macro = mean_b (1/n_b) sum_j (w_A . S_A[:, i_j] - w_B . S_B[:, i_j])``.

    The percentile interval of ``macro`` covers both seed-to-seed and item sampling variance;
    with one seed per method it reduces to the item-only stratified bootstrap (no seed
    variance can be seen). Returns the observed macro difference (means over seeds and
    items), the interval and the resamples.
    """
    rng = np.random.default_rng(seed)
    names = sorted(scores_a)
    n_a, n_b = scores_a[names[0]].shape[0], scores_b[names[0]].shape[0]
    macro = np.zeros(n_resamples)
    observed = float(np.mean([scores_a[b].mean() - scores_b[b].mean() for b in names]))
    for start in range(0, n_resamples, 500):
        size = min(500, n_resamples - start)
        w_a = rng.multinomial(n_a, np.full(n_a, 1 / n_a), size=size) / n_a
        w_b = rng.multinomial(n_b, np.full(n_b, 1 / n_b), size=size) / n_b
        total = np.zeros(size)
        for b in names:
            n = scores_a[b].shape[1]
            per_item = w_a @ scores_a[b] - w_b @ scores_b[b]  # (size, items): the seed-averaged paired deltas
            # drawn item indices (a gather), several times faster than Multinomial(n, uniform) counts
            total += np.take_along_axis(per_item, rng.integers(0, n, size=(size, n)), axis=1).sum(axis=1) / n
        macro[start:start + size] = total / len(names)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(macro, [alpha, 1 - alpha])
    return {"macro_delta": observed, "ci_low": float(low), "ci_high": float(high), "resamples": macro}


# ----------------------------------------------------------------------------- non-inferiority

RETENTION_MARGIN_PP = 2.0  # default non-inferiority margin for knowledge retention, percentage points
NON_INFERIORITY_ALPHA = 0.05


def non_inferiority(deltas, margin: float, n_resamples: int = 10_000, seed: int = 0,
                    alpha: float = NON_INFERIORITY_ALPHA) -> dict:
    """One-sided test that a fine-tuned run is not worse than the base model by more than
    ``margin`` (same units as ``deltas``: per-item fine-tuned minus base scores, paired).

    H0: ``mean(delta) <= -margin`` against H1: ``mean(delta) > -margin``, at level ``alpha``, by
    the paired item bootstrap: ``lower`` is the ``alpha`` percentile of the resampled mean
    (the one-sided ``1 - alpha`` lower confidence bound), ``upper`` the ``1 - alpha`` one.
    Verdict: ``non-inferior`` when ``lower > -margin``; ``inferior`` when ``upper < -margin``
    (worse than the margin allows, at the same level); otherwise ``inconclusive``.
    """
    values = np.asarray(deltas, dtype=float)
    boot = stratified_paired_bootstrap({"set": values}, n_resamples=n_resamples, seed=seed,
                                       confidence=1 - 2 * alpha)
    lower, upper = boot["ci_low"], boot["ci_high"]
    verdict = "non-inferior" if lower > -margin else "inferior" if upper < -margin else "inconclusive"
    return {"n": int(len(values)), "delta": float(values.mean()), "lower": lower, "upper": upper,
            "margin": margin, "alpha": alpha, "verdict": verdict}


def benjamini_hochberg(p_values: list[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (q-values; ``scipy.stats.false_discovery_control``):
    rejecting every q <= 0.05 controls the false discovery rate at 5% (independent or
    positively dependent tests)."""
    from scipy.stats import false_discovery_control

    if not p_values:
        return []
    return [float(q) for q in false_discovery_control(np.asarray(p_values, dtype=float), method="bh")]


# ----------------------------------------------------------------------------- power planning

@dataclass
class PlanSettings:
    """What ``medpeft plan`` simulates: per benchmark ``items``, ``seeds`` per method, B's
    accuracy ``baseline``, the discordance rate ``discordance`` (share of items two runs score
    differently), the seed-to-seed standard deviation of a run's accuracy ``seed_sd``."""

    items: list[int]
    seeds: int = 1
    baseline: float = 0.6
    discordance: float = 0.2
    seed_sd: float = 0.0
    alpha: float = 0.05
    power: float = 0.8
    simulations: int = 400
    resamples: int = 1000
    seed: int = 0


def _item_probabilities(rng, n: int, baseline: float, discordance: float) -> np.ndarray:
    """Per-item accuracies with mean ``baseline`` whose spread makes two independent runs
    disagree on a share ``discordance`` of the items: ``2 (b - b^2 - Var p) = q``, so
    ``Var p = b(1-b) - q/2``, drawn from a Beta of that mean and variance (constant when 0)."""
    var = baseline * (1 - baseline) - discordance / 2
    if var <= 1e-9:
        return np.full(n, baseline)
    total = baseline * (1 - baseline) / var - 1
    return rng.beta(baseline * total, (1 - baseline) * total, n)


def simulated_power(difference: float, s: PlanSettings) -> float:
    """Share of simulated studies whose two-sided ``1 - alpha`` interval excludes 0 when A's
    true accuracy is ``difference`` above B's on every benchmark: each study draws item
    accuracies (:func:`_item_probabilities`), one accuracy shift ``N(0, seed_sd)`` per trained
    seed, Bernoulli item scores per seed, and computes the interval ``medpeft compare``
    reports (the stratified item bootstrap with one seed per method, the two-level one with more)."""
    rng = np.random.default_rng(s.seed)
    hits = 0
    for _ in range(s.simulations):
        a, b = {}, {}
        for k, n in enumerate(s.items):
            p = _item_probabilities(rng, n, s.baseline, s.discordance)
            shift_a = rng.normal(0, s.seed_sd, (s.seeds, 1))
            shift_b = rng.normal(0, s.seed_sd, (s.seeds, 1))
            # A's item accuracies move towards 1 in proportion to their room, so that their mean
            # rises by exactly ``difference`` and none leaves [0, 1] (no clipping to shrink it)
            p_a = p + difference * (1 - p) / (1 - s.baseline)
            a[f"b{k}"] = (rng.random((s.seeds, n)) < np.clip(p_a + shift_a, 0, 1)).astype(float)
            b[f"b{k}"] = (rng.random((s.seeds, n)) < np.clip(p + shift_b, 0, 1)).astype(float)
        if s.seeds == 1:
            ci = stratified_paired_bootstrap({k: a[k][0] - b[k][0] for k in a}, n_resamples=s.resamples,
                                             seed=int(rng.integers(2**31)), confidence=1 - s.alpha)
        else:
            ci = seed_item_bootstrap(a, b, n_resamples=s.resamples, seed=int(rng.integers(2**31)),
                                     confidence=1 - s.alpha)
        hits += ci["ci_low"] > 0 or ci["ci_high"] < 0
    return hits / s.simulations


def minimum_detectable_effect(s: PlanSettings, high: float = 0.5, tolerance: float = 0.002) -> float:
    """The smallest true macro difference detected with probability ``s.power`` (bisection
    over :func:`simulated_power`, the same simulated studies at every difference)."""
    low = 0.0
    if simulated_power(high, s) < s.power:
        return float("inf")
    while high - low > tolerance:
        mid = (low + high) / 2
        low, high = (mid, high) if simulated_power(mid, s) < s.power else (low, mid)
    return high


def items_needed(difference: float, s: PlanSettings, most: int = 200_000) -> int | None:
    """Items per benchmark for which ``difference`` is detected with probability ``s.power``
    (every benchmark the same size; bisection over :func:`simulated_power`); None when even
    ``most`` items are not enough (e.g. seed variance dominates: more seeds are needed)."""
    import dataclasses

    k = len(s.items)
    power = lambda n: simulated_power(difference, dataclasses.replace(s, items=[n] * k))  # noqa: E731
    low, high = 10, 20
    while power(high) < s.power:  # doubling, then bisection
        if high >= most:
            return None
        low, high = high, min(2 * high, most)
    while high - low > max(2, low // 50):
        mid = (low + high) // 2
        low, high = (mid, high) if power(mid) < s.power else (low, mid)
    return high


def seeds_needed(difference: float, s: PlanSettings, most: int = 20) -> int | None:
    """Training seeds per method for which ``difference`` is detected with probability
    ``s.power`` at the given items (None when ``most`` are not enough)."""
    import dataclasses

    for seeds in range(1, most + 1):
        if simulated_power(difference, dataclasses.replace(s, seeds=seeds)) >= s.power:
            return seeds
    return None
