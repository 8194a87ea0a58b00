"""The two-level (training seeds, then items) bootstrap of `medpeft compare`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medpeft.stats import seed_item_bootstrap, stratified_paired_bootstrap


def synthetic(seed_sd: float, n_items: int = 300, seeds: int = 4, rng_seed: int = 0):
    """Two recipes on two benchmarks: per-item difficulty, a recipe effect of +3 pp for A, and
    each training seed shifting its model's accuracy by ``seed_sd`` times a fixed pattern of
    standard deviation 1 (so the seed variance is exactly ``seed_sd**2`` and the same random
    numbers are drawn whatever ``seed_sd``)."""
    rng = np.random.default_rng(rng_seed)
    out_a, out_b = {}, {}
    for name in ("x", "y"):
        base = rng.uniform(0.2, 0.8, n_items)
        for out, effect in ((out_a, 0.03), (out_b, 0.0)):
            pattern = np.linspace(-1, 1, seeds) if seeds > 1 else np.zeros(1)
            shifts = seed_sd * (pattern / pattern.std() if seeds > 1 else pattern) * (1 if out is out_a else -1)
            p = np.clip(base[None, :] + effect + shifts[:, None], 0, 1)
            out[name] = (rng.random((seeds, n_items)) < p).astype(float)
    return out_a, out_b


def slow_two_level(a: dict, b: dict, n_resamples: int, seed: int) -> np.ndarray:
    """The estimator written out: draw seeds, then items, then average."""
    rng = np.random.default_rng(seed)
    names = sorted(a)
    out = np.empty(n_resamples)
    for r in range(n_resamples):
        sa = rng.integers(0, a[names[0]].shape[0], a[names[0]].shape[0])
        sb = rng.integers(0, b[names[0]].shape[0], b[names[0]].shape[0])
        per = []
        for name in names:
            items = rng.integers(0, a[name].shape[1], a[name].shape[1])
            per.append(a[name][sa][:, items].mean() - b[name][sb][:, items].mean())
        out[r] = np.mean(per)
    return out


def test_matches_a_slow_direct_implementation():
    a, b = synthetic(0.04, n_items=120, seeds=3)
    fast = seed_item_bootstrap(a, b, n_resamples=4000, seed=1)
    slow = slow_two_level(a, b, 4000, seed=2)
    assert fast["macro_delta"] == pytest.approx(np.mean([a[n].mean() - b[n].mean() for n in a]))
    for q in (0.025, 0.5, 0.975):  # same distribution (independent streams): quantiles agree
        assert np.quantile(fast["resamples"], q) == pytest.approx(np.quantile(slow, q), abs=0.006)
    assert fast["resamples"].std() == pytest.approx(slow.std(), rel=0.06)


def test_interval_widens_with_seed_variance():
    widths = []
    for sd in (0.0, 0.03, 0.08):
        a, b = synthetic(sd)
        got = seed_item_bootstrap(a, b, n_resamples=4000, seed=0)
        widths.append(got["ci_high"] - got["ci_low"])
    assert widths[0] < widths[1] < widths[2]
    assert widths[2] > 1.5 * widths[0]


def test_one_seed_each_is_the_item_bootstrap():
    a, b = synthetic(0.0, seeds=1)
    two = seed_item_bootstrap(a, b, n_resamples=6000, seed=0)
    one = stratified_paired_bootstrap({n: a[n][0] - b[n][0] for n in a}, n_resamples=6000, seed=3)
    assert two["ci_low"] == pytest.approx(one["ci_low"], abs=0.006)
    assert two["ci_high"] == pytest.approx(one["ci_high"], abs=0.006)


def test_compare_groups_seed_runs_and_reports_both_intervals(tmp_path):
    from medpeft.compare import compare_runs, compare_table

    a, b = synthetic(0.05, n_items=60, seeds=3)
    for label, data in (("recipe-a", a), ("recipe-b", b)):
        for s in range(3):
            folder = tmp_path / label / f"seed-{s}" / "eval"
            folder.mkdir(parents=True)
            rows = [{"id": f"{name}/{i}", "benchmark": name, "pred": "AB"[not data[name][s, i]], "gold": "A",
                     "correct": bool(data[name][s, i])}
                    for name in data for i in range(data[name].shape[1])]
            (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (pair,) = compare_runs([tmp_path], n_resamples=2000)
    assert (pair["seeds_a"], pair["seeds_b"]) == (3, 3)
    expected = 100 * np.mean([a[n].mean() - b[n].mean() for n in a])
    assert pair["macro_delta"] == pytest.approx(expected) == pair["seeds_and_items"]["macro_delta"]
    assert pair["seeds_and_items"]["ci_high"] - pair["seeds_and_items"]["ci_low"] > pair["ci_high"] - pair["ci_low"]
    assert "seeds-and-items 95% CI" in compare_table([{**pair, "sign_p_holm": pair["sign_p"]}])
