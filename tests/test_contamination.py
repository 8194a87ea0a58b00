"""The contamination audit: planted paraphrases are found, disjoint real sets give zero, and
accuracy is recomputed on the clean items."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medpeft.contamination import item_text, jaccard, near_duplicates, shingles
from medpeft.data import load_benchmark

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "medpeft" / "data" / "examples"


def paraphrase(row: dict) -> dict:
    """A light paraphrase: a changed opening, one word replaced, the options reordered."""
    q = row["question"].replace("Which", "What", 1).replace("most likely", "likeliest", 1)
    letters = list(row["options"])
    texts = [row["options"][k] for k in letters][::-1]
    options = dict(zip(letters, texts))
    gold = letters[texts.index(row["answer"])]
    return {**row, "question": "Consider this case. " + q, "options": options, "answer_idx": gold}


def test_shingles_treat_chinese_characters_as_words():
    assert shingles("患者 发热三天") == {"患 者 发", "者 发 热", "发 热 三", "热 三 天"}
    assert shingles("Fever, FEVER!") == {"fever fever"}
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)


def test_planted_paraphrases_are_found_and_clean_accuracy_recomputed(tmp_path, data_dir):
    from medpeft.cli import main

    eval_rows = [json.loads(line) for line in (EXAMPLES / "medqa_dev.jsonl").read_text().splitlines() if line.strip()]
    planted = [0, 3, 7]
    real = [json.loads(line) for line in (data_dir / "medqa" / "us_4options_test.rows0-299.jsonl")
            .read_text().splitlines()[:60]]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in real + [paraphrase(eval_rows[i]) for i in planted]))
    out = tmp_path / "run"
    eval_dir = out / "eval"
    eval_dir.mkdir(parents=True)  # an evaluated run below output_dir: every item correct except the planted ones
    ids = [r.id for r in load_benchmark("medqa", EXAMPLES / "medqa_dev.jsonl").records]
    eval_dir.joinpath("predictions.jsonl").write_text("".join(
        json.dumps({"id": i, "benchmark": "medqa-examples", "pred": "A" if k in planted else "B", "gold": "A",
                    "correct": k in planted}) + "\n"
        for k, i in enumerate(ids)))
    (out / "summary.json").write_text("{}")
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {out}\ndata:\n  train:\n    - {{benchmark: medqa, name: medqa-train, path: {train}}}\n"
                      f"eval:\n  benchmarks:\n    - {{benchmark: medqa, name: medqa-examples, path: 'pkg:medqa_dev.jsonl'}}\n")
    assert main(["contamination", str(config)]) == 0
    result = json.loads((out / "contamination" / "contamination.json").read_text())
    flagged = [json.loads(line) for line in (out / "contamination" / "flagged.jsonl").read_text().splitlines()]
    assert sorted({f["eval_id"] for f in flagged}) == sorted(ids[i] for i in planted)
    assert all(f["jaccard"] >= 0.5 for f in flagged)
    (pair,) = result["pairs"]
    assert (pair["eval_items"], pair["flagged_items"]) == (10, 3)
    run = result["runs"]["run"]["medqa-examples"]
    assert run["score"] == pytest.approx(0.3) and run["clean_n"] == 7 and run["clean_score"] == 0.0


def test_disjoint_real_sets_have_no_near_duplicates(data_dir):
    train = {"medmcqa": load_benchmark("medmcqa", data_dir / "medmcqa" / "dev.rows0-299.jsonl", cop_base=1).records}
    evals = {"medqa": load_benchmark("medqa", data_dir / "medqa" / "us_4options_test.rows0-299.jsonl").records,
             "mmlu": load_benchmark("mmlu", data_dir / "mmlu" / "anatomy_test.rows0-49.jsonl").records}
    flagged, counts = near_duplicates(train, evals)
    assert flagged == [] and all(c["flagged_items"] == 0 for c in counts.values())
    # the same set against itself: every item is its own duplicate
    same, _ = near_duplicates({"m": evals["mmlu"]}, {"m": evals["mmlu"]})
    assert {f["eval_id"] for f in same} == {r.id for r in evals["mmlu"]}
    assert all(item_text(r) for r in evals["mmlu"])
