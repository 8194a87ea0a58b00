"""Summarisation (issue 16): the ACI-Bench and generic JSONL loaders, their bad-input rules,
tags from the source text only, the prompt and training target with the long-source
truncation rule, mixed QA + summary training; the ROUGE scorer, results and paired
comparisons."""

from __future__ import annotations

import dataclasses
import json

import pytest

from medpeft.cli import main
from medpeft.data import SUMMARY, load_benchmark
from medpeft.errors import DataError
from medpeft.tags import tag_record


@pytest.mark.parametrize("name, count, split, section", [
    ("train_full", 67, "train", "full"),
    ("valid_full", 20, "valid", "full"),
    ("valid_assessment_and_plan", 20, "valid", "assessment_and_plan"),
    ("clinicalnlp_taskB_test1_full", 40, "clinicalnlp_taskB_test1", "full"),
])
def test_aci_bench_release_files_load(data_dir, name, count, split, section):
    path = data_dir / "aci-bench" / f"{name}.json"
    raw = json.loads(path.read_text(encoding="utf-8"))["data"]
    records = load_benchmark("aci-bench", path).records
    assert len(records) == count == len(raw)
    assert len({r.id for r in records}) == count
    for rec, row in zip(records, raw):
        assert rec.question_type == SUMMARY and rec.language == "en"
        assert rec.question == row["src"].strip() and rec.reference == row["tgt"].strip()
        assert rec.id == f"aci-bench/{row['file']}" and not rec.options and not rec.answer
        assert rec.metadata == {"note_section": section, "split": split}
        assert rec.answer_text == rec.reference  # what a training target would be


def test_tags_come_from_the_source_text_never_the_reference(data_dir):
    records = load_benchmark("aci-bench", data_dir / "aci-bench" / "valid_full.json").records
    for rec in records[:5]:
        swapped = dataclasses.replace(rec, reference="Cardiac surgery: coronary artery bypass grafting, ECG, "
                                                     "troponin. Prescribe aspirin.")
        assert tag_record(rec) == tag_record(swapped)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def test_generic_summary_jsonl_round_trip(tmp_path):
    path = write_jsonl(tmp_path / "notes.jsonl", [
        {"id": "n1", "text": "Findings: no acute cardiopulmonary process. Heart size normal.",
         "summary": "No acute disease.", "metadata": {"note_type": "radiology", "section": "impression"}},
        {"id": 2, "text": "患者男，65岁，胸痛2小时。心电图示ST段抬高。", "summary": "急性心肌梗死。", "language": "zh"},
    ])
    first, second = load_benchmark("summary", path).records
    assert (first.id, first.question_type, first.language) == ("summary/n1", SUMMARY, "en")
    assert first.metadata == {"note_type": "radiology", "section": "impression"}
    assert first.reference == "No acute disease."
    assert (second.id, second.language, second.reference) == ("summary/2", "zh", "急性心肌梗死。")


@pytest.mark.parametrize("row, where, field", [
    ({"id": "a", "summary": "s"}, "line 2", "text"),
    ({"id": "a", "text": "t", "summary": "   "}, "line 2", "summary"),
    ({"id": "a", "text": "t", "summary": "s", "language": "fr"}, "line 2", "language"),
    ({"id": "a", "text": "t", "summary": "s", "metadata": ["x"]}, "line 2", "metadata"),
    ({"id": ["a"], "text": "t", "summary": "s"}, "line 2", "id"),
    ({"id": "ok", "text": "t", "summary": "s"}, "line 2", "id"),  # the id of line 1 again
])
def test_generic_summary_bad_records_name_file_line_and_field(tmp_path, row, where, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"id": "ok", "text": "t", "summary": "s"}, row])
    with pytest.raises(DataError) as err:
        load_benchmark("summary", path)
    assert (err.value.path, err.value.where, err.value.field) == (str(path), where, field)
    result = load_benchmark("summary", path, skip_invalid=True)
    assert [r.id for r in result.records] == ["summary/ok"] and len(result.skipped) == 1


def test_aci_bench_bad_files(tmp_path):
    listed = tmp_path / "valid_full.json"
    listed.write_text(json.dumps([{"src": "a", "tgt": "b", "file": "x"}]))
    with pytest.raises(DataError, match="top level: field 'data': expected ACI-Bench's release object"):
        load_benchmark("aci-bench", listed)
    missing = tmp_path / "train_full.json"
    missing.write_text(json.dumps({"data": [{"src": "dialogue", "tgt": "note", "file": "D1"},
                                            {"src": "dialogue", "file": "D2"}]}))
    with pytest.raises(DataError, match=r"train_full.json: record 1: field 'tgt': missing"):
        load_benchmark("aci-bench", missing)
    assert [r.id for r in load_benchmark("aci-bench", missing, skip_invalid=True).records] == ["aci-bench/D1"]


def test_the_tag_command_reads_summarisation_sets(data_dir, capsys):
    assert main(["tag", str(data_dir / "aci-bench" / "valid_full.json"), "--benchmark", "aci-bench"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 20 and all(r["id"].startswith("aci-bench/") for r in rows)


def test_the_summary_is_the_training_target_and_long_sources_lose_their_middle(data_dir, tiny):
    """The loss mask covers exactly the reference summary's tokens (and the end of turn); a
    source too long for max_length loses tokens from its middle: the instruction, the
    source's beginning and end, and the cue the answer follows stay; a reference longer than
    half of max_length is cut to that half without its end-of-turn token."""
    from medpeft.prompts import ELLIPSIS, PromptFormatter, instruction
    from medpeft.train import IGNORE, collate

    tok = tiny.tokenizer
    records = load_benchmark("aci-bench", data_dir / "aci-bench" / "valid_assessment_and_plan.json").records
    short = dataclasses.replace(records[0], question="[doctor] how are you ?\n[patient] my knee hurts .",
                                reference="ASSESSMENT AND PLAN\nKnee pain: ice and rest.")
    fmt = PromptFormatter(tok, 1024)
    example = fmt.encode_train(short)
    target = fmt._ids(fmt.target_text(short))
    assert example.input_ids[example.prompt_len:] == target and not example.truncated
    batch = collate([example], [tag_record(short)], tok.pad_token_id)
    labelled = batch.labels[0][batch.labels[0] != IGNORE].tolist()
    assert labelled == target and tok.decode(labelled).startswith(fmt.answer_prefix + "ASSESSMENT")

    long_record = records[0]
    full_prompt = fmt._ids(fmt.prompt_text(long_record))
    assert len(full_prompt) > 1024
    prompt = fmt.encode_prompts([long_record])[0]
    assert prompt.truncated and len(prompt.input_ids) <= 1024
    text = tok.decode(prompt.input_ids)
    assert instruction(long_record) in text and ELLIPSIS.strip() in text
    assert text.startswith(tok.decode(full_prompt[:60]))  # instruction and the source's beginning
    assert text.endswith(tok.decode(full_prompt[-40:]))  # the source's end and the cue
    trained = fmt.encode_train(long_record)
    assert trained.truncated and len(trained.input_ids) <= 1024
    assert len(trained.input_ids) - trained.prompt_len == 512
    assert fmt.end_token_id not in trained.input_ids[trained.prompt_len:]


def test_a_training_set_mixes_summaries_with_questions(tmp_path, data_dir):
    """ACI-Bench train next to the QA examples: every item is a training example (counts and
    truncations in summary.json), and the loss falls."""
    aci = str(data_dir / "aci-bench" / "train_full.json")
    out = tmp_path / "run"
    assert main(["train", "quickstart", f"output_dir={out}", "methods=[]", "train.steps=6", "train.log_every=1",
                 "data.max_length=512", "train.save_every=0",
                 'data.train=[{"benchmark": "cmb", "path": "pkg:cmb_train.json"}, '
                 f'{{"benchmark": "aci-bench", "name": "aci", "path": "{aci}"}}]']) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_examples"] == 30 + 67
    assert summary["truncated_prompts"] >= 67  # every ACI-Bench dialogue is longer than 512 tokens here
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]


def test_rouge_is_google_rouge_score_on_the_same_pairs():
    from rouge_score import rouge_scorer

    from medpeft.evaluate import rouge_scores

    pairs = [("The patient was started on lisinopril for hypertension.",
              "Hypertension: start lisinopril 10 mg daily."),
             ("Knee pain, likely osteoarthritis; ice and rest.", "Right knee osteoarthritis. Rest, ice, NSAIDs."),
             ("", "No acute disease.")]
    reference = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for generated, gold in pairs:
        direct = reference.score(gold, generated)
        assert rouge_scores(generated, gold, "en") == {k: v.fmeasure for k, v in direct.items()}
    # Chinese: characters as tokens. LCS of 急性心肌梗死 and 心肌梗死急性 is 心肌梗死 (4 of 6 and 6): F = 4/6
    zh = rouge_scores("心肌梗死急性", "急性心肌梗死", "zh")
    assert zh["rougeL"] == pytest.approx(4 / 6) and zh["rouge1"] == pytest.approx(1.0)


def test_summaries_are_generated_in_batches_as_one_at_a_time(data_dir, tiny):
    """Batched greedy generation (left padding, KV cache) gives every item the tokens it gets
    alone, within its limit; the ROUGE of each item is that of its own text."""
    from medpeft.dataset import tag_all
    from medpeft.evaluate import Evaluator, rouge_scores

    records = load_benchmark("aci-bench", data_dir / "aci-bench" / "valid_assessment_and_plan.json").records[:4]
    items = tag_all(records, "aci", False)
    make = lambda batch: Evaluator(tiny.model, tiny.tokenizer, max_length=512, batch_size=batch,  # noqa: E731
                                   summary_max_new_tokens=12, summary_limits={"aci": 6}, device="cpu")
    together, alone = make(4).score(items, "letters"), [make(1).score([t], "letters")[0] for t in items]
    for a, b in zip(together, alone):
        assert a.text == b.text and a.scores == b.scores and a.correct is None
        assert a.scores == rouge_scores(a.text, a.item.record.reference, "en")
    evaluator, limits = make(4), []
    real = evaluator._generate

    def generate(seqs, batch, max_new_tokens, allowed_fn=None):
        limits.append(max_new_tokens)
        out = real(seqs, batch, max_new_tokens, allowed_fn)
        assert all(len(g) <= max_new_tokens for g in out)
        return out

    evaluator._generate = generate
    evaluator.score(items, "letters")
    assert limits == [6]  # the set's own limit, not the default (12)


def test_results_mix_accuracy_and_rouge_and_the_report_says_so(tmp_path, data_dir, capsys):
    aci = str(data_dir / "aci-bench" / "valid_assessment_and_plan.json")
    out = tmp_path / "run"
    benchmarks = ('[{"benchmark": "medqa", "name": "medqa", "path": "pkg:medqa_dev.jsonl"}, '
                  f'{{"benchmark": "aci-bench", "name": "aci", "path": "{aci}", "limit": 3, "max_new_tokens": 5}}]')
    assert main(["run", "quickstart", f"output_dir={out}", "methods=[]", "train.steps=2", "train.save_every=0",
                 f"eval.benchmarks={benchmarks}"]) == 0
    assert "macro (accuracy and ROUGE-L)" in capsys.readouterr().out
    results = json.loads((out / "eval" / "results.json").read_text())
    qa, aci_result = results["benchmarks"]["medqa"], results["benchmarks"]["aci"]
    assert qa["metric"] == "accuracy" and qa["score"] == qa["accuracy"]
    rows = [json.loads(line) for line in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    summaries = [r for r in rows if r["benchmark"] == "aci"]
    assert len(summaries) == 3 and all("correct" not in r and set(r["rouge"]) == {"rouge1", "rouge2", "rougeL"}
                                       for r in summaries)
    assert aci_result["metric"] == "rougeL" and aci_result["n"] == 3
    assert aci_result["rougeL"] == pytest.approx(sum(r["rouge"]["rougeL"] for r in summaries) / 3, abs=1e-6)
    assert aci_result["ci_low"] <= aci_result["rougeL"] <= aci_result["ci_high"]
    assert results["macro_accuracy"] == pytest.approx((qa["accuracy"] + aci_result["rougeL"]) / 2)
    assert results["macro_metrics"] == ["accuracy", "rougeL"]


def test_compare_pairs_rouge_items_like_an_independent_computation(tmp_path):
    """Per-item ROUGE-L deltas: the benchmark-stratified macro delta, the sign test over the items
    where one run scores higher (ties dropped) and the bootstrap interval, recomputed here."""
    import numpy as np
    from scipy.stats import binomtest

    from medpeft.compare import compare_runs

    rng = np.random.default_rng(1)
    a_rouge, b_rouge = rng.uniform(0.2, 0.6, 40), rng.uniform(0.1, 0.5, 40)
    b_rouge[:5] = a_rouge[:5]  # ties
    a_ok, b_ok = rng.random(30) < 0.6, rng.random(30) < 0.5
    for name, rouge, ok in (("a", a_rouge, a_ok), ("b", b_rouge, b_ok)):
        rows = [{"id": f"s{i}", "benchmark": "aci", "score": float(v)} for i, v in enumerate(rouge)]
        rows += [{"id": f"q{i}", "benchmark": "medqa", "correct": bool(v)} for i, v in enumerate(ok)]
        folder = tmp_path / name / "eval"
        folder.mkdir(parents=True)
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pair = compare_runs([tmp_path / "a", tmp_path / "b"], n_resamples=20_000)[0]
    d_rouge, d_qa = a_rouge - b_rouge, a_ok.astype(float) - b_ok.astype(float)
    assert pair["macro_delta"] == pytest.approx(100 * (d_rouge.mean() + d_qa.mean()) / 2)
    wins = int((d_rouge > 0).sum() + (d_qa > 0).sum())
    losses = int((d_rouge < 0).sum() + (d_qa < 0).sum())
    assert (pair["wins"], pair["losses"]) == (wins, losses) and pair["ties"] == 70 - wins - losses
    assert pair["sign_p"] == pytest.approx(binomtest(wins, wins + losses, 0.5).pvalue)
    boot = np.random.default_rng(7)
    macro = [(d_rouge[boot.integers(0, 40, 40)].mean() + d_qa[boot.integers(0, 30, 30)].mean()) / 2
             for _ in range(20_000)]
    low, high = np.quantile(macro, [0.025, 0.975])
    assert pair["ci_low"] == pytest.approx(100 * low, abs=0.6) and pair["ci_high"] == pytest.approx(100 * high, abs=0.6)
    assert pair["benchmarks"]["aci"]["delta"] == pytest.approx(100 * d_rouge.mean())


def test_a_suite_writes_the_med_moe_lora_table_layout(tmp_path, data_dir):
    """Med-MoE-LoRA's Table 1 layout on the tiny model: PubMedQA, MedQA and a clinical
    summarisation set (ACI-Bench valid, ROUGE-L) side by side, and their Average mixing
    accuracy and ROUGE-L -- trained on MedQA examples and ACI-Bench train together."""
    aci = data_dir / "aci-bench"
    cfg = {"output_dir": str(tmp_path / "suite"), "methods": ["lora-r16", "medmoe"], "model": {"name": "tiny"},
           "data": {"max_length": 512, "train": [
               {"benchmark": "medqa", "name": "medqa-train", "path": "pkg:medqa_dev.jsonl"},
               {"benchmark": "aci-bench", "name": "aci-train", "path": str(aci / "train_full.json"), "limit": 12}]},
           "train": {"steps": 3, "batch_size": 4, "micro_batch_size": 2, "lr": 5e-3, "save_every": 0,
                     "log_every": 1, "compile": False},
           "eval": {"scorer": "letters", "batch_size": 4, "benchmarks": [
               {"benchmark": "pubmedqa", "name": "PubMedQA", "path": str(data_dir / "pubmedqa" /
                                                                        "pqal_nontest.first300.jsonl"), "limit": 8},
               {"benchmark": "medqa", "name": "MedQA", "path": "pkg:medqa_dev.jsonl"},
               {"benchmark": "aci-bench", "name": "Clinical-Sum", "path": str(aci / "valid_assessment_and_plan.json"),
                "limit": 3, "max_new_tokens": 8}]}}
    config = tmp_path / "suite.yaml"
    config.write_text(json.dumps(cfg))
    assert main(["suite", str(config)]) == 0
    report = (tmp_path / "suite" / "report" / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| Family | Method"))
    assert "| PubMedQA | MedQA | Clinical-Sum | Avg. (accuracy and ROUGE-L) |" in header
    rows = json.loads((tmp_path / "suite" / "report" / "report.json").read_text())
    assert rows  # the machine-readable report exists alongside
    for method in ("lora-r16", "medmoe"):
        res = json.loads((tmp_path / "suite" / method / "eval" / "results.json").read_text())
        assert res["benchmarks"]["Clinical-Sum"]["metric"] == "rougeL"
        assert res["macro_accuracy"] == pytest.approx(sum(v["score"] for v in res["benchmarks"].values()) / 3)


def test_source_weights_keep_the_configured_proportions():
    """Sampling weights: source s makes up w_s |s| / sum_t w_t |t| of every epoch, each epoch a
    function of (seed, epoch); fractional weights draw a fresh seeded share per epoch."""
    from medpeft.train import step_indices, weighted_epoch

    groups = [list(range(0, 30)), list(range(30, 40))]  # 30 QA items, 10 summaries
    weights = [0.5, 2.0]
    epoch = weighted_epoch(groups, weights, seed=3, epoch=0)
    assert len(epoch) == 15 + 20
    assert sum(i < 30 for i in epoch) == 15 and sorted(i for i in epoch if i >= 30) == sorted(list(range(30, 40)) * 2)
    assert len(set(i for i in epoch if i < 30)) == 15  # without repeats within the share
    assert weighted_epoch(groups, weights, 3, 0) == epoch and weighted_epoch(groups, weights, 3, 1) != epoch
    stream = [i for step in range(7) for i in
              step_indices(35, 10, 3, step, lambda e: weighted_epoch(groups, weights, 3, e))]
    assert stream[:35] == epoch and stream[35:70] == weighted_epoch(groups, weights, 3, 1)


def test_a_weighted_training_run_reads_its_sources_in_proportion(tmp_path, data_dir, monkeypatch):
    """Through train(): the examples of a run with a summary source of weight 3 and a QA source
    of weight 1 are drawn in that proportion (6 steps of 8 = 48 draws over epochs of 30 + 36)."""
    from medpeft import train as train_module

    drawn: list[int] = []
    real_steps = train_module.step_indices

    def recording_steps(*args, **kwargs):
        out = real_steps(*args, **kwargs)
        drawn.extend(out)
        return out

    monkeypatch.setattr(train_module, "step_indices", recording_steps)
    aci = str(data_dir / "aci-bench" / "train_full.json")
    out = tmp_path / "run"
    assert main(["train", "quickstart", f"output_dir={out}", "methods=[]", "train.steps=6", "train.batch_size=11", "train.micro_batch_size=1",
                 "data.max_length=256", "train.save_every=0",
                 'data.train=[{"benchmark": "cmb", "path": "pkg:cmb_train.json"}, '
                 f'{{"benchmark": "aci-bench", "name": "aci", "path": "{aci}", "limit": 12, "weight": 3}}]']) == 0
    assert len(drawn) == 66  # 6 steps x 11 = one epoch of 30 + 3 x 12
    assert sum(i >= 30 for i in drawn) == 36 and sum(i < 30 for i in drawn) == 30


@pytest.mark.parametrize("preset", ["moelora", "birg"])
def test_the_routing_audit_compares_summaries_with_questions(tmp_path, data_dir, preset):
    """A routed run audited on QA and summarisation items: per-question rows for both, and the
    family's summary over each kind apart (what the summaries' gates used vs the questions')."""
    aci = str(data_dir / "aci-bench" / "valid_assessment_and_plan.json")
    out = tmp_path / "run"
    benchmarks = ('[{"benchmark": "medqa", "name": "medqa", "path": "pkg:medqa_dev.jsonl"}, '
                  f'{{"benchmark": "aci-bench", "name": "aci", "path": "{aci}", "limit": 4, "max_new_tokens": 2}}]')
    assert main(["train", "quickstart", f"output_dir={out}", "methods=[]", f"method={{preset: {preset}}}",
                 "train.steps=2", "train.save_every=0", f"eval.benchmarks={benchmarks}"]) == 0
    assert main(["audit", str(out)]) == 0
    summary = json.loads((out / "audit" / "summary.json").read_text())
    kinds = summary["by_item_kind"]
    assert kinds["questions"]["n"] == 10 and kinds["summaries"]["n"] == 4
    assert kinds["questions"]["headline"] != kinds["summaries"]["headline"]
    rows = [json.loads(line) for line in (out / "audit" / "per_question.jsonl").read_text().splitlines()]
    assert sum(r["benchmark"] == "aci" for r in rows) == 4 and all(r["modules"] for r in rows)


def test_generation_stops_per_item(data_dir, tiny):
    """An item that reaches its end of turn stops there (its text ends) while the others of its
    batch go on, and they get the tokens they get alone."""
    from medpeft.dataset import tag_all
    from medpeft.evaluate import Evaluator

    records = load_benchmark("aci-bench", data_dir / "aci-bench" / "valid_assessment_and_plan.json").records[:3]
    items = tag_all(records, "aci", False)

    def evaluator(batch):
        return Evaluator(tiny.model, tiny.tokenizer, max_length=512, batch_size=batch, summary_max_new_tokens=6,
                         device="cpu")

    free = evaluator(3)
    idx, seqs = next(free._batches(items))
    first = free._generate(seqs, [items[i] for i in idx], 6)
    stop = first[0][1]  # make the first item's second token its end of turn
    assert all(stop not in g[:2] for g in first[1:]) or pytest.skip("the other items emit that token too early")
    stopped = evaluator(3)
    stopped.stop_ids, stopped.end_id = [stop], stop
    out = stopped._generate(seqs, [items[i] for i in idx], 6)
    assert out[0][:2] == first[0][:2] and all(t in (stop, tiny.tokenizer.pad_token_id) for t in out[0][2:])
    assert stopped._decode(out[0]) == tiny.tokenizer.decode(first[0][:1], skip_special_tokens=True)
    for row in range(1, len(out)):  # the others go on as without the stop (up to where they would stop)
        cut = next((j for j, t in enumerate(first[row]) if t == stop), len(first[row]))
        assert out[row][:cut] == first[row][:cut]
