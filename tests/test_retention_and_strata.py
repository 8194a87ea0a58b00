"""Non-inferiority for knowledge retention, per-stratum effects with false-discovery control."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import norm

from medpeft.stats import non_inferiority


def paired(n: int, p_gain: float, p_loss: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    return np.where(u < p_gain, 1.0, np.where(u < p_gain + p_loss, -1.0, 0.0))


def test_lower_bound_matches_the_normal_approximation_on_a_large_set():
    d = paired(20_000, 0.10, 0.12)
    got = non_inferiority(d, margin=0.05, n_resamples=20_000)
    closed = d.mean() - norm.ppf(0.95) * d.std(ddof=0) / np.sqrt(len(d))
    assert got["lower"] == pytest.approx(closed, abs=6e-4)
    assert got["delta"] == pytest.approx(d.mean())


@pytest.mark.parametrize("p_gain, p_loss, n, margin, verdict", [
    (0.05, 0.05, 5000, 0.02, "non-inferior"),  # no change, tight: within a 2 pp margin
    (0.02, 0.12, 5000, 0.02, "inferior"),  # 10 pp worse, tight
    (0.10, 0.12, 60, 0.02, "inconclusive"),  # 2 pp worse on 60 items: cannot tell
])
def test_verdicts(p_gain, p_loss, n, margin, verdict):
    got = non_inferiority(paired(n, p_gain, p_loss, seed=1), margin=margin)
    assert got["verdict"] == verdict
    assert got["lower"] <= got["delta"] <= got["upper"]


def test_forgetting_table_tests_retention_sets_against_the_base_model(tmp_path, data_dir):
    from medpeft.cli import main
    from medpeft.compare import load_correctness

    mmlu = data_dir / "mmlu" / "anatomy_test.rows0-49.jsonl"
    out = tmp_path / "suite"
    benches = ('[{benchmark: medqa, name: medqa-examples, path: "pkg:medqa_dev.jsonl"}, '
               f'{{benchmark: mmlu, name: mmlu-anatomy, path: "{mmlu}", limit: 30}}]')
    assert main(["suite", "quickstart", f"output_dir={out}", "methods=[lora-r16]", "train.steps=2", "eval.base=true",
                 f"eval.benchmarks={benches}", "eval.retention_margin=3"]) == 0
    report = json.loads((out / "report" / "report.json").read_text())
    rows = {r["label"]: r for r in report["forgetting"]}
    assert set(rows) == {"base", "lora-r16"} and set(rows["lora-r16"]["sets"]) == {"mmlu-anatomy"}
    got = rows["lora-r16"]["sets"]["mmlu-anatomy"]
    base = load_correctness(out / "base" / "eval" / "predictions.jsonl")
    tuned = load_correctness(out / "lora-r16" / "eval" / "predictions.jsonl")
    keys = [k for k in base if k[0] == "mmlu-anatomy"]
    direct = non_inferiority([tuned[k] - base[k] for k in keys], margin=0.03)
    assert got["delta"] == pytest.approx(100 * direct["delta"]) and got["verdict"] == direct["verdict"]
    assert got["lower"] == pytest.approx(100 * direct["lower"]) and got["margin"] == 3
    md = (out / "report" / "report.md").read_text()
    assert "## Knowledge retention (forgetting)" in md and direct["verdict"] in md


def test_per_stratum_effects_find_the_planted_one_and_control_false_discoveries(tmp_path):
    from scipy.stats import binomtest

    from medpeft.compare import compare_runs

    rng = np.random.default_rng(0)
    rows_a, rows_b = [], []
    plan = [("cardiology", 80, 0.45), ("neurology", 80, 0.0), ("surgery", 80, 0.0), ("rare", 5, 0.0)]
    for specialty, n, effect in plan:
        for i in range(n):
            base = rng.random() < 0.4
            better = base or rng.random() < effect
            common = {"id": f"{specialty}/{i}", "benchmark": "set", "gold": "A",
                      "specialty": specialty, "operation": "diagnosis", "strata": {"Difficulty Level": "hard"}}
            rows_a.append({**common, "pred": "AB"[not better], "correct": bool(better)})
            rows_b.append({**common, "pred": "AB"[not base], "correct": bool(base)})
    for name, rows in (("a", rows_a), ("b", rows_b)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (pair,) = compare_runs([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], n_resamples=2000)
    spec = pair["strata"]["specialty"]
    assert spec["rare"] == {"n": 5, "tested": False, "reason": "fewer than 20 items"}
    assert spec["cardiology"]["q"] <= 0.05 and spec["cardiology"]["ci_low"] > 0
    assert spec["neurology"]["delta"] == 0 and spec["neurology"]["q"] > 0.05
    # independent: the sign tests by scipy, then Benjamini-Hochberg by hand
    tested = [(field, value) for field, values in pair["strata"].items() for value, e in values.items() if e["tested"]]
    p = []
    for field, value in tested:
        e = pair["strata"][field][value]
        p.append(binomtest(e["wins"], e["wins"] + e["losses"]).pvalue if e["wins"] + e["losses"] else 1.0)
    order = np.argsort(p)
    q = np.empty(len(p))
    running = 1.0
    for rank in range(len(p) - 1, -1, -1):
        running = min(running, p[order[rank]] * len(p) / (rank + 1))
        q[order[rank]] = running
    for (field, value), expected in zip(tested, q):
        assert pair["strata"][field][value]["q"] == pytest.approx(expected)
    assert ("operation", "diagnosis") in tested and ("Difficulty Level", "hard") in tested
