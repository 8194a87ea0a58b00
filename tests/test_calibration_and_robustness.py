"""Calibration metrics against hand-computed values, and option-order robustness: rotations,
the summary numbers, and a model biased to "A" seen through the whole evaluator."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medpeft.data.record import QARecord
from medpeft.dataset import tag_all
from medpeft.robustness import robustness_summary, rotate_options
from medpeft.stats import calibration_summary, item_calibration, option_log_probabilities


def _scores(probs: list[float]) -> dict[str, float]:
    # log-likelihoods shifted by a constant: the option probabilities must not depend on it
    return {"ABCD"[i]: math.log(p) - 7.0 for i, p in enumerate(probs)}


# (option probabilities, gold, correct)
HAND = [([0.72, 0.18, 0.10], "A", True), ([0.55, 0.45], "B", False), ([0.93, 0.07], "B", False),
        ([0.64, 0.26, 0.10], "A", True)]


def test_item_calibration_by_hand():
    got = item_calibration(_scores([0.72, 0.18, 0.10]), "A")
    assert got["confidence"] == pytest.approx(0.72)
    assert got["brier"] == pytest.approx(0.28 ** 2 + 0.18 ** 2 + 0.10 ** 2)
    assert got["nll"] == pytest.approx(-math.log(0.72))
    assert sum(math.exp(v) for v in option_log_probabilities(_scores([0.5, 0.3, 0.2])).values()) == pytest.approx(1)


def test_calibration_summary_by_hand():
    rows = [item_calibration(_scores(p), g) for p, g, _ in HAND]
    got = calibration_summary([r["confidence"] for r in rows], [c for *_, c in HAND], [r["brier"] for r in rows],
                              [r["nll"] for r in rows], bins=10)
    # every item alone in its bin: ECE = mean |correct - confidence|
    assert got["ece"] == pytest.approx((0.28 + 0.55 + 0.93 + 0.36) / 4)
    assert got["brier"] == pytest.approx((0.1208 + 0.605 + 1.7298 + 0.2072) / 4)
    assert got["nll"] == pytest.approx(-(math.log(0.72) + math.log(0.45) + math.log(0.07) + math.log(0.64)) / 4)
    assert [b["n"] for b in got["reliability"]] == [0, 0, 0, 0, 0, 1, 1, 1, 0, 1]
    # most confident first: 0.93 wrong, 0.72 right, 0.64 right, 0.55 wrong
    assert got["selective"]["accuracy_at_coverage"] == pytest.approx({"0.25": 0.0, "0.5": 0.5, "0.75": 2 / 3,
                                                                       "1.0": 0.5})
    assert np.array(got["selective"]["curve"]) == pytest.approx(np.array(
        [[0.93, 0.25, 0.0], [0.72, 0.5, 0.5], [0.64, 0.75, 2 / 3], [0.55, 1.0, 0.5]]))


def test_ece_pools_a_bin():
    # two bins: (0, .5] holds .3 (right) and .4 (wrong); (.5, 1] holds .8 (right), .9 (right), .6 (wrong)
    conf, right = [0.3, 0.4, 0.8, 0.9, 0.6], [True, False, True, True, False]
    got = calibration_summary(conf, right, [0.0] * 5, [0.0] * 5, bins=2)
    expected = 2 / 5 * abs(0.5 - 0.35) + 3 / 5 * abs(2 / 3 - (0.8 + 0.9 + 0.6) / 3)
    assert got["ece"] == pytest.approx(expected)
    assert [b["n"] for b in got["reliability"]] == [2, 3]


def _record(options: dict[str, str], answer: str, qtype: str = "single") -> QARecord:
    return QARecord(id="x/1", benchmark="medqa", language="en", question="Which?", options=options,
                    answer=frozenset(answer), question_type=qtype)


def test_rotation_moves_gold_with_its_text():
    rec = _record({"A": "alpha", "B": "beta", "C": "gamma", "D": "delta"}, "C")
    once = rotate_options(rec, 1)
    assert once.options == {"A": "beta", "B": "gamma", "C": "delta", "D": "alpha"}
    assert once.options[next(iter(once.answer))] == "gamma"
    multi = _record({"A": "a", "B": "b", "C": "c", "D": "d", "E": "e"}, "AD", "multi")
    for shift in range(5):
        rotated = rotate_options(multi, shift)
        assert {rotated.options[x] for x in rotated.answer} == {"a", "d"}
    assert rotate_options(rotate_options(rec, 3), 1) == rec


def test_robustness_summary_of_a_content_consistent_and_a_position_biased_predictor():
    recs = [_record({"A": "a", "B": "b", "C": "c", "D": "d"}, g) for g in "ABCD"]
    truthful = [[rotate_options(r, s).answer for s in range(4)] for r in recs]
    got = robustness_summary(recs, truthful, [[True] * 4 for _ in recs])
    assert got["robust_accuracy"] == got["agreement"] == 1.0
    always_a = [[frozenset("A")] * 4 for _ in recs]
    correct = [[rotate_options(r, s).answer == frozenset("A") for s in range(4)] for r in recs]
    got = robustness_summary(recs, always_a, correct)
    assert got["accuracy_by_rotation"] == [0.25] * 4 and got["robust_accuracy"] == 0.0 and got["agreement"] == 0.0
    assert got["position_share"]["A"] == {"predicted": 1.0, "gold": 0.25}
    assert got["max_position_excess"] == {"position": "A", "excess": 0.75}


def test_a_model_biased_to_a_shows_the_bias(tiny_fresh):
    """Through the evaluator: the tiny model with a large bonus on the logit of the letter A
    answers A everywhere; its robust accuracy falls below its plain accuracy."""
    import torch

    from medpeft.config import RunConfig
    from medpeft.evaluate import Evaluator
    from medpeft.pipeline import run_robustness

    model, tok = tiny_fresh.model, tiny_fresh.tokenizer
    a_id = tok("A", add_special_tokens=False)["input_ids"][0]
    model.lm_head.register_forward_hook(lambda mod, inp, out: out.index_add(
        -1, torch.tensor([a_id]), torch.full((*out.shape[:-1], 1), 50.0)))
    recs = [QARecord(id=f"m/{i}", benchmark="medqa", language="en", question=f"Question number {i}?",
                     options={"A": "one", "B": "two", "C": "three", "D": "four"}, answer=frozenset("ABCA"[i % 4]),
                     question_type="single") for i in range(8)]
    items = tag_all(recs, "biased")
    ev = Evaluator(model, tok, batch_size=4)
    assert all(p.pred == frozenset("A") for p in ev.score(items, "letters"))
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as out:
        got = run_robustness(ev, {"biased": items}, {"biased": "medpeft"}, RunConfig(), Path(out))["sets"]["biased"]
    assert got["accuracy"] == 0.5  # gold is A for half the items as released
    assert got["robust_accuracy"] == 0.0 < got["accuracy"]
    assert got["position_share"]["A"]["predicted"] == 1.0
    assert got["position_share"]["A"]["gold"] == pytest.approx(0.25)


def test_compare_reports_paired_brier_and_nll_deltas(tmp_path):
    import json

    from medpeft.compare import compare_runs

    def write(name: str, probs: list[list[float]]) -> None:
        rows = [{"id": f"q{i}", "benchmark": "set", "pred": "AB"[int(np.argmax(p))], "gold": "A",
                 "correct": bool(np.argmax(p) == 0), "scores": {"AB"[j]: math.log(x) for j, x in enumerate(p)}}
                for i, p in enumerate(probs)]
        folder = tmp_path / name / "eval"
        folder.mkdir(parents=True)
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    sharp, vague = [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]], [[0.6, 0.4], [0.5, 0.5], [0.5, 0.5]]
    write("sharp", sharp)
    write("vague", vague)
    (pair,) = compare_runs([tmp_path / "sharp", tmp_path / "vague"], n_resamples=2000)
    brier = lambda p: (1 - p[0]) ** 2 + p[1] ** 2  # noqa: E731  (gold A, two options)
    expected = np.mean([brier(a) - brier(b) for a, b in zip(sharp, vague)])
    got = pair["calibration"]
    assert got["n"] == 3
    assert got["brier"]["delta"] == pytest.approx(expected)
    assert got["nll"]["delta"] == pytest.approx(np.mean([-math.log(a[0]) + math.log(b[0]) for a, b in zip(sharp, vague)]))
    assert got["brier"]["ci_low"] <= got["brier"]["delta"] <= got["brier"]["ci_high"]
