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
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"id": str(i), "benchmark": "x", "pred": "A",
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
