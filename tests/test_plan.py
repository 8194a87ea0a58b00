"""`medpeft plan`: power by simulation with compare's bootstrap, against closed-form cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import norm

from medpeft.stats import PlanSettings, items_needed, minimum_detectable_effect, simulated_power

Z = norm.ppf(0.975) + norm.ppf(0.8)


@pytest.mark.parametrize("discordance, baseline", [(0.2, 0.6), (0.48, 0.6)])
def test_mde_matches_the_paired_normal_approximation(discordance, baseline):
    """One benchmark, one seed: MDE ~ (z_0.975 + z_0.8) sqrt(q / n) (paired delta variance ~ q)."""
    s = PlanSettings(items=[1500], baseline=baseline, discordance=discordance, simulations=250)
    assert minimum_detectable_effect(s) == pytest.approx(Z * np.sqrt(discordance / 1500), rel=0.12)


def test_items_needed_matches_the_closed_form():
    s = PlanSettings(items=[100], discordance=0.2, simulations=250)
    assert items_needed(0.04, s) == pytest.approx(0.2 * Z ** 2 / 0.04 ** 2, rel=0.15)


def test_macro_over_benchmarks_and_seed_variance():
    # two benchmarks of n: the macro's variance is a quarter of the sum -> sqrt(q / (2n))
    two = PlanSettings(items=[800, 800], discordance=0.2, simulations=250)
    assert minimum_detectable_effect(two) == pytest.approx(Z * np.sqrt(0.2 / 1600), rel=0.12)
    quiet = PlanSettings(items=[150], seeds=2, seed_sd=0.0, simulations=80, resamples=400)
    noisy = PlanSettings(items=[150], seeds=2, seed_sd=0.04, simulations=80, resamples=400)
    assert simulated_power(0.08, noisy) < simulated_power(0.08, quiet)
    assert simulated_power(0.0, PlanSettings(items=[400], simulations=400)) == pytest.approx(0.05, abs=0.035)


def test_plan_command_reads_a_pilot_and_refuses_impossible_inputs(tmp_path, capsys):
    from medpeft.cli import main

    rng = np.random.default_rng(0)
    b = rng.random(400) < 0.6
    a = np.where(rng.random(400) < 0.15, ~b, b)
    for name, flags in (("a", a), ("b", b)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"id": str(i), "benchmark": "x", "pred": "AB"[not c],
                                                                    "gold": "A", "correct": bool(c)}) + "\n"
                                                        for i, c in enumerate(flags)))
    assert main(["plan", "--pilot", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--simulations", "60",
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["inputs"]["items"] == [400]
    assert got["inputs"]["discordance"] == pytest.approx(float(np.mean(a != b)))
    assert got["inputs"]["baseline"] == pytest.approx(float(b.mean()))
    assert got["minimum_detectable_effect_pp"] == pytest.approx(100 * Z * np.sqrt(np.mean(a != b) / 400), rel=0.25)
    assert main(["plan", "--items", "300", "--baseline", "0.9", "--discordance", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--discordance" in err and "Traceback" not in err


def test_design_power_reads_accuracy_sets_only_and_says_why_when_it_cannot(tmp_path):
    """The report's design: summarisation (ROUGE-scored) items are left out, the base model is
    left out when two trained methods exist, single-run discordance (seed i vs seed i), the
    fewest seeds; a design that cannot be read says why; an undetectable one is null, not inf."""
    import json

    import numpy as np

    from medpeft.report import design_power

    rng = np.random.default_rng(0)

    def write(label: str, seed: int, correct: list[bool], rouge: list[float]) -> dict:
        folder = tmp_path / label / f"seed-{seed}" / "eval"
        folder.mkdir(parents=True)
        rows = [{"id": str(i), "benchmark": "qa", "correct": bool(c)} for i, c in enumerate(correct)]
        rows += [{"id": str(i), "benchmark": "sum", "score": float(r)} for i, r in enumerate(rouge)]
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {"run_dir": str(folder.parent)}

    truth = rng.random(80) < 0.6
    flips = {("a", 0): 8, ("a", 1): 12, ("b", 0): 0, ("b", 1): 4, ("base", 0): 40}
    runs, rows = {}, []
    for (label, seed), k in flips.items():
        correct = truth.copy()
        correct[:k] = ~correct[:k]
        runs.setdefault(label, {"seeds": []})["seeds"].append(write(label, seed, list(correct), rng.random(30)))
    rows = [{"label": "a", "family": "LoRA"}, {"label": "b", "family": "LoRA"}, {"label": "base", "family": "Base model"}]
    design = design_power(runs, rows, [], simulations=40)
    d = design["inputs"]
    assert design["benchmarks"] == ["qa"] and design["methods"] == ["a", "b"] and d["items"] == [80]
    assert d["seeds"] == 2 and d["discordance"] == pytest.approx(np.mean([8 / 80, 8 / 80]))  # seed i vs seed i
    assert design["minimum_detectable_effect_pp"] is not None and design["minimum_detectable_effect_pp"] > 0
    rouge_only = {k: {"seeds": [write(f"r-{k}", 0, [], rng.random(30))]} for k in ("a", "b")}
    assert "no accuracy benchmark" in design_power(rouge_only, rows, [], simulations=40)["skipped"]
    same = {k: {"seeds": [write(f"s-{k}", 0, list(truth), [])]} for k in ("a", "b")}
    assert "no discordant item" in design_power(same, rows, [], simulations=40)["skipped"]
    tiny = {k: {"seeds": [write(f"t-{k}", 0, [True, k == "a", False], [])]} for k in ("a", "b")}
    result = design_power(tiny, rows, [{"a": "a", "b": "b", "macro_delta": 33.3}], simulations=40)
    assert result["minimum_detectable_effect_pp"] is None and result["pairs_below"] == ["a vs b"]
    json.dumps(result, allow_nan=False)  # strict JSON
