"""Paired statistics against independent references."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from medpeft.cli import main
from medpeft.compare import compare_runs
from medpeft.errors import MedpeftError
from medpeft.stats import holm, sign_test, stratified_paired_bootstrap


@pytest.mark.parametrize("wins, losses", [(0, 0), (5, 4), (12, 3), (0, 9), (30, 45), (200, 170)])
def test_sign_test_equals_scipy_binomtest(wins, losses):
    expected = 1.0 if wins + losses == 0 else stats.binomtest(wins, wins + losses, 0.5).pvalue
    assert sign_test(wins, losses) == pytest.approx(expected, rel=1e-9)


def slow_bootstrap(deltas: dict, n_resamples: int, seed: int) -> np.ndarray:
    """The textbook loop: redraw each benchmark's items with replacement, average the benchmark means."""
    rng = np.random.default_rng(seed)
    out = np.empty(n_resamples)
    for r in range(n_resamples):
        out[r] = np.mean([d[rng.integers(0, len(d), len(d))].mean() for d in deltas.values()])
    return out


def random_deltas(seed: int, sizes=(300, 120, 700)) -> dict:
    rng = np.random.default_rng(seed)
    return {f"b{i}": rng.choice([-1, 0, 1], size=n, p=[0.15, 0.65, 0.2]) for i, n in enumerate(sizes)}


def test_stratified_bootstrap_matches_the_slow_loop():
    deltas = random_deltas(1)
    fast = stratified_paired_bootstrap(deltas, n_resamples=10_000, seed=0)
    slow = slow_bootstrap(deltas, 4_000, seed=1)
    assert fast["macro_delta"] == pytest.approx(np.mean([d.mean() for d in deltas.values()]))
    lo, hi = np.quantile(slow, [0.025, 0.975])
    # two independent Monte Carlo estimates of the same interval: they agree to Monte Carlo error
    assert fast["ci_low"] == pytest.approx(lo, abs=0.004) and fast["ci_high"] == pytest.approx(hi, abs=0.004)
    assert fast["resamples"].std() == pytest.approx(slow.std(), rel=0.05)


def test_single_benchmark_bootstrap_matches_scipy():
    rng = np.random.default_rng(3)
    a = rng.random(800) < 0.62
    b = rng.random(800) < 0.55
    d = a.astype(int) - b.astype(int)
    ours = stratified_paired_bootstrap({"only": d}, n_resamples=10_000, seed=0)
    ref = stats.bootstrap((a.astype(float), b.astype(float)), lambda x, y, axis: np.mean(x - y, axis=axis),
                          paired=True, vectorized=True, n_resamples=10_000, method="percentile",
                          random_state=np.random.default_rng(5)).confidence_interval
    assert ours["ci_low"] == pytest.approx(ref.low, abs=0.005) and ours["ci_high"] == pytest.approx(ref.high, abs=0.005)


def test_holm_hand_computed():
    assert holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    assert holm([0.5]) == [0.5]


def write_preds(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_compare_pairs_by_id_and_reports_everything(tmp_path):
    rng = np.random.default_rng(0)
    ids = [("x", f"q{i}") for i in range(60)] + [("y", f"q{i}") for i in range(40)]
    correct = {name: rng.random(len(ids)) < p for name, p in (("a", 0.7), ("b", 0.5), ("c", 0.5))}
    for name in correct:
        write_preds(tmp_path / name / "eval" / "predictions.jsonl",
                    [{"id": i, "benchmark": b, "correct": bool(c)} for (b, i), c in zip(ids, correct[name])])
    pairs = compare_runs([tmp_path / "a", tmp_path / "b", tmp_path / "c"], n_resamples=2_000)
    assert [(p["a"], p["b"]) for p in pairs] == [("a", "b"), ("a", "c"), ("b", "c")]
    ab = pairs[0]
    ca, cb = correct["a"].astype(int), correct["b"].astype(int)
    assert ab["wins"] == int(((ca == 1) & (cb == 0)).sum()) and ab["losses"] == int(((ca == 0) & (cb == 1)).sum())
    assert ab["wins"] + ab["losses"] + ab["ties"] == 100
    assert ab["benchmarks"]["x"]["delta"] == pytest.approx(100 * (ca[:60] - cb[:60]).mean())
    assert ab["macro_delta"] == pytest.approx((ab["benchmarks"]["x"]["delta"] + ab["benchmarks"]["y"]["delta"]) / 2)
    assert ab["ci_low"] <= ab["macro_delta"] <= ab["ci_high"]
    assert [p["sign_p_holm"] for p in pairs] == pytest.approx(holm([p["sign_p"] for p in pairs]))
    # the CLI prints the same as JSON
    out = tmp_path / "cmp.json"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--resamples", "2000", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert set(saved[0]) >= {"a", "b", "macro_delta", "ci_low", "ci_high", "wins", "losses", "ties", "sign_p",
                             "benchmarks"}


def test_missing_items_are_an_error_unless_intersect(tmp_path, capsys):
    write_preds(tmp_path / "a.jsonl", [{"id": "1", "benchmark": "x", "correct": True},
                                        {"id": "2", "benchmark": "x", "correct": False}])
    write_preds(tmp_path / "b.jsonl", [{"id": "1", "benchmark": "x", "correct": False}])
    with pytest.raises(MedpeftError, match="do not cover the same items .1 only in a, 0 only in b, e.g. x/2"):
        compare_runs([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
    (pair,) = compare_runs([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], intersect=True, n_resamples=100)
    assert (pair["n"], pair["wins"], pair["losses"]) == (1, 1, 0)
    assert main(["compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]) == 2
    assert "--intersect" in capsys.readouterr().err


def test_compare_refuses_items_paired_by_id_that_are_other_questions(tmp_path, capsys):
    """MedQA's files have no ids (an item's id is its line): two runs scored on differently ordered
    copies share every id but not the questions. compare refuses that in one line naming both
    files, instead of pairing unrelated questions; the same copy again compares fine. Rows
    without the content digest (older predictions) are still checked on their gold answer."""
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "src/medpeft/data/examples"
    lines = (examples / "medqa_dev.jsonl").read_text(encoding="utf-8").splitlines()
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "one" / "dev.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "two" / "dev.jsonl").write_text("\n".join(lines[::-1]) + "\n", encoding="utf-8")
    for name, folder in (("a", "one"), ("b", "two"), ("c", "one")):
        assert main(["eval", "tiny", "data.max_length=128", "--out", str(tmp_path / name / "eval"),
                     f"eval.benchmarks=[{{benchmark: medqa, path: {tmp_path / folder / 'dev.jsonl'}}}]"]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another question" in err and "Traceback" not in err, err
    assert str(tmp_path / "a" / "eval" / "predictions.jsonl") in err and str(tmp_path / "b") in err
    (pair,) = compare_runs([tmp_path / "a", tmp_path / "c"], n_resamples=100)
    assert pair["n"] == len(lines) and pair["wins"] == pair["losses"] == 0  # the same model on the same items

    write_preds(tmp_path / "old-a.jsonl", [{"id": "1", "benchmark": "x", "gold": "A", "correct": True}])
    write_preds(tmp_path / "old-b.jsonl", [{"id": "1", "benchmark": "x", "gold": "C", "correct": False}])
    with pytest.raises(MedpeftError, match="x/1 is another gold answer in old-b than in old-a"):
        compare_runs([tmp_path / "old-a.jsonl", tmp_path / "old-b.jsonl"])


def test_runs_of_one_name_in_different_folders_get_distinct_labels(tmp_path):
    """``compare a/lora b/lora`` (and two suites with one method name) labels them by their parent
    folders instead of refusing; one method's seeds still share their label."""
    rows = lambda flip: [{"id": str(i), "benchmark": "x", "correct": (i % 3 == 0) != flip} for i in range(30)]  # noqa: E731
    write_preds(tmp_path / "a" / "lora" / "eval" / "predictions.jsonl", rows(False))
    write_preds(tmp_path / "b" / "lora" / "eval" / "predictions.jsonl", rows(True))
    (pair,) = compare_runs([tmp_path / "a" / "lora", tmp_path / "b" / "lora"], n_resamples=100)
    assert (pair["a"], pair["b"]) == ("a/lora", "b/lora") and pair["losses"] == 20
    for suite in ("s1", "s2"):
        for seed in (0, 1):
            write_preds(tmp_path / suite / "lora" / f"seed-{seed}" / "eval" / "predictions.jsonl", rows(suite == "s2"))
    (pair,) = compare_runs([tmp_path / "s1", tmp_path / "s2"], n_resamples=100)
    assert (pair["a"], pair["b"], pair["seeds_a"], pair["seeds_b"]) == ("s1/lora", "s2/lora", 2, 2)
    deep = [tmp_path / "x" / "same" / "lora", tmp_path / "y" / "same" / "lora"]  # the parent alone does not tell
    for folder in deep:
        write_preds(folder / "eval" / "predictions.jsonl", rows(False))
    (pair,) = compare_runs(deep, n_resamples=100)
    assert (pair["a"], pair["b"]) == ("x/same/lora", "y/same/lora")
