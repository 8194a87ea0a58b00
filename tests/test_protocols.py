"""Evaluation protocols proven equal to the tools that define them.

* ``lm-eval``: lm-evaluation-harness itself (``simple_evaluate``, the ``hf`` model on the tiny
  model saved as a local folder) scores the same shared benchmark items through local task
  files made from lm-eval's own task YAMLs (only the data source changed); every item's
  prediction, its log-likelihoods, ``acc`` and ``acc_norm`` must equal medpeft's protocol.
* ``opencompass-cmb``: OpenCompass cannot be installed beside medpeft's stack (0.5.4 pins
  numpy<2, datasets<4, scikit-learn==1.5.0), so its published rules are tested with cases
  taken from its source (``cmb_gen_dfb5c4.py``, ``CMBDataset.load``, ``multiple_select_postprocess``).
* ``cot``: the final-answer extraction, with failures counted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from medpeft.config import SourceConfig
from medpeft.dataset import load_eval_sets
from medpeft.evaluate import Evaluator, evaluate_sets

N_ITEMS = 40  # per task: enough for disagreements to show, seconds on the tiny model

# task -> (benchmark, shared file, lm-eval task folder, task yaml, the yaml it includes)
TASKS = {
    "medqa_4options": ("medqa", "medqa/us_4options_test.rows0-299.jsonl", "medqa", "medqa.yaml", None),
    "medmcqa": ("medmcqa", "medmcqa/dev.rows0-299.jsonl", "medmcqa", "medmcqa.yaml", None),
    "pubmedqa": ("pubmedqa", "pubmedqa/pqal_nontest.first300.jsonl", "pubmedqa", "pubmedqa.yaml", None),
    "mmlu_anatomy": ("mmlu", "mmlu/anatomy_test.rows0-49.jsonl", "mmlu/default", "mmlu_anatomy.yaml",
                     "_default_template_yaml"),
    "mmlu_professional_medicine": ("mmlu", "mmlu/professional_medicine_test.rows0-49.jsonl", "mmlu/default",
                                   "mmlu_professional_medicine.yaml", "_default_template_yaml"),
    "cmmlu_anatomy": ("cmmlu", "cmmlu/anatomy_test.rows0-32.jsonl", "cmmlu", "cmmlu_anatomy.yaml",
                      "_default_template_yaml"),
}


def _padded(value) -> bool:
    if isinstance(value, str):
        return value != value.strip()
    if isinstance(value, dict):
        return any(_padded(v) for v in value.values())
    return isinstance(value, list) and any(_padded(v) for v in value)


def _hf_rows(benchmark: str, rows: list) -> list[dict]:
    """The shared rows in the layout of the hub dataset each lm-eval task reads."""
    out = []
    for row in rows:
        if benchmark == "medqa":  # GBaker/MedQA-USMLE-4-options-hf
            out.append({"sent1": row["question"], **{f"ending{i}": row["options"][k] for i, k in enumerate("ABCD")},
                        "label": "ABCD".index(row["answer_idx"])})
        elif benchmark == "medmcqa":  # openlifescienceai/medmcqa: cop from 0 (the shared release counts from 1)
            out.append({**row, "cop": row["cop"] - 1})
        elif benchmark == "pubmedqa":  # bigbio/pubmed_qa, pubmed_qa_labeled_fold0_source
            (pmid, rec), = row.items()
            out.append({"QUESTION": rec["QUESTION"], "CONTEXTS": rec["CONTEXTS"],
                        "final_decision": rec["final_decision"], "pubid": pmid})
        elif benchmark == "mmlu":  # cais/mmlu
            out.append({"question": row[0], "choices": row[1:5], "answer": "ABCD".index(row[5])})
        else:  # haonan-li/cmmlu
            out.append(row)
    return out


def _local_task(lm_eval_tasks: Path, task: str, data: Path, out: Path) -> str:
    """lm-eval's own task file(s) for ``task`` with the data source replaced by a local JSON file
    and the splits other than the test split removed; the task renamed so it cannot collide."""
    _, _, folder, yaml_name, include = TASKS[task]
    src = lm_eval_tasks / folder
    texts = {yaml_name: (src / yaml_name).read_text(encoding="utf-8")}
    if include:
        texts[include] = (src / include).read_text(encoding="utf-8")
    for name, text in texts.items():
        if name == include or not include:  # the file that holds the data source and splits
            test_split = re.search(r"^test_split: *(\S+)", text, re.M).group(1)
            text = re.sub(r"^dataset_path: .*$", f"dataset_path: json\ndataset_kwargs:\n  data_files:\n"
                          f"    {test_split}: {json.dumps(str(data))}", text, flags=re.M)
            text = re.sub(r"^(dataset_name|training_split|validation_split|fewshot_split): .*\n", "", text, flags=re.M)
            text = re.sub(r"^fewshot_config:\n(  .*\n)+", "", text, flags=re.M)
        texts[name] = text
    task_dir = out / task
    task_dir.mkdir(parents=True, exist_ok=True)
    for py in src.glob("*.py"):  # the task's !function helpers, as lm-eval ships them
        (task_dir / py.name).write_text(py.read_text(encoding="utf-8"), encoding="utf-8")
    for name, text in texts.items():
        if name == yaml_name:
            text = re.sub(r'^"?dataset_name"?: .*\n', "", text, flags=re.M)
            text = re.sub(r'^"?(tag|group)"?: .*\n', "", text, flags=re.M)
            text = re.sub(r'^("?task"?): *"?([\w-]+)"?', lambda m: f'{m.group(1)}: "local_{m.group(2)}"', text,
                          flags=re.M)
        (task_dir / (name if name != yaml_name else f"{task}.yaml")).write_text(text, encoding="utf-8")
    return f"local_{task}"


def _parity_setup(root: Path, loaded, folder: Path, data_dir: Path, tasks: list[str], n_items: int) -> dict:
    """The shared items (first ``n_items`` of each file, and any later row with padded text) as
    medpeft eval sets and as lm-eval local tasks, for the model saved in ``folder``."""
    lm_eval = pytest.importorskip("lm_eval")  # a test extra: CI installs it
    tasks_root = Path(lm_eval.__file__).parent / "tasks"
    sources, names = [], {}
    for task in tasks:
        benchmark, rel = TASKS[task][:2]
        every = [line for line in (data_dir / rel).read_text(encoding="utf-8").split("\n") if line.strip()]
        # and every later row whose text has surrounding spaces (lm-eval reads the text unstripped)
        lines = every[:n_items] + [line for line in every[n_items:] if _padded(json.loads(line))]
        raw = root / "raw" / Path(rel).name
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text("\n".join(lines) + "\n", encoding="utf-8")
        hf = root / "hf" / f"{task}.jsonl"
        hf.parent.mkdir(parents=True, exist_ok=True)
        hf.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                              for r in _hf_rows(benchmark, [json.loads(x) for x in lines])), encoding="utf-8")
        names[task] = _local_task(tasks_root, task, hf, root / "tasks")
        sources.append(SourceConfig(benchmark, str(raw), name=task, **({"cop_base": 1} if benchmark == "medmcqa"
                                                                        else {})))
    return {"root": root, "model_dir": folder, "loaded": loaded, "sets": load_eval_sets(sources), "names": names}


@pytest.fixture(scope="module")
def lm_eval_setup(tmp_path_factory, data_dir):
    """The tiny model saved as a local folder, over every task of TASKS."""
    pytest.importorskip("lm_eval")
    from medpeft.models import load_model

    root = tmp_path_factory.mktemp("lm_eval_parity")
    loaded = load_model("tiny", device="cpu", dtype="fp32")
    loaded.model.save_pretrained(root / "tiny")
    loaded.tokenizer.save_pretrained(root / "tiny")
    return _parity_setup(root, loaded, root / "tiny", data_dir, list(TASKS), N_ITEMS)


def _run_lm_eval(setup, tasks: list[str], chat: bool) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(setup["root"] / "tasks"))
    return lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(setup["model_dir"]), "dtype": "float32", "device": "cpu"},
        tasks=[setup["names"][t] for t in tasks], batch_size=8, task_manager=manager, log_samples=True,
        apply_chat_template=chat, bootstrap_iters=0)


def _assert_same(setup, reference: dict, tasks: list[str], chat: bool) -> None:
    loaded = setup["loaded"]
    ev = Evaluator(loaded.model, loaded.tokenizer, batch_size=5, apply_chat_template=chat)
    for task in tasks:
        name = setup["names"][task]
        items = setup["sets"][task]
        ours = ev.score(items, "letters", protocol="lm-eval")
        samples = sorted(reference["samples"][name], key=lambda s: s["doc_id"])
        assert len(samples) == len(ours) == len(items) > 0
        for p, s in zip(ours, samples):
            theirs = [float(r[0]) for r in s["filtered_resps"]]
            labels = list(p.item.record.options)
            assert [p.scores[k] for k in labels] == pytest.approx(theirs, abs=2e-4), (task, s["doc_id"])
            assert bool(p.correct) == bool(s["acc"]), (task, s["doc_id"])  # the same argmax, so the same item score
            assert "".join(p.pred) == labels[max(range(len(theirs)), key=theirs.__getitem__)]
            if "acc_norm" in s:
                assert p.extra["acc_norm"] == bool(s["acc_norm"]), (task, s["doc_id"])
        metrics = reference["results"][name]
        assert sum(p.correct for p in ours) / len(ours) == pytest.approx(metrics["acc,none"], abs=1e-12)
        if "acc_norm,none" in metrics:
            assert sum(p.extra["acc_norm"] for p in ours) / len(ours) == pytest.approx(metrics["acc_norm,none"],
                                                                                      abs=1e-12)


def test_lm_eval_protocol_equals_lm_eval(lm_eval_setup):
    tasks = list(TASKS)
    _assert_same(lm_eval_setup, _run_lm_eval(lm_eval_setup, tasks, chat=False), tasks, chat=False)


def test_lm_eval_protocol_with_chat_template_equals_lm_eval(lm_eval_setup):
    """``eval.apply_chat_template``: the description as the system turn, no target delimiter."""
    tasks = ["mmlu_anatomy", "medqa_4options"]
    _assert_same(lm_eval_setup, _run_lm_eval(lm_eval_setup, tasks, chat=True), tasks, chat=True)


@pytest.mark.real
@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-template"])
def test_lm_eval_protocol_equals_lm_eval_on_smollm2(tmp_path, data_dir, smollm2_source, chat):
    """The real small model (a BPE tokenizer that merges " A", a real chat template)."""
    from medpeft.models import load_model

    loaded = load_model(smollm2_source, device="cpu", dtype="fp32")
    tasks = ["medqa_4options", "pubmedqa", "mmlu_anatomy", "cmmlu_anatomy"] if not chat else ["mmlu_anatomy",
                                                                                               "medmcqa"]
    setup = _parity_setup(tmp_path, loaded, Path(smollm2_source), data_dir, tasks, 12)
    _assert_same(setup, _run_lm_eval(setup, tasks, chat=chat), tasks, chat=chat)


# ----------------------------------------------------------------------------- OpenCompass CMB

def _cmb(options: dict[str, str], answer: str, qtype: str = "single"):
    from medpeft.data.record import QARecord

    return QARecord(id="cmb/7", benchmark="cmb", language="zh", question="下列哪项正确？", options=options,
                    answer=frozenset(answer), question_type=qtype,
                    metadata={"exam_type": "医师考试", "exam_class": "规培结业", "exam_subject": "内科"})


def test_opencompass_cmb_prompt_is_its_template():
    """cmb_gen_dfb5c4.py's HUMAN prompt with CMBDataset's option_str (options of one character left out)."""
    from medpeft.models import build_tiny_tokenizer
    from medpeft.protocols.opencompass import OpenCompassCMB

    tok = build_tiny_tokenizer()
    tok.chat_template = None  # a base model: the HUMAN text as it is
    rec = _cmb({"A": "发热", "B": "是", "C": "白细胞升高", "D": "咳嗽"}, "C")
    expected = ("以下是中国医师考试中规培结业考试的一道单项选择题，不需要做任何分析和解释，直接输出答案选项。\n"
                "下列哪项正确？\nA. 发热\nC. 白细胞升高\nD. 咳嗽 \n 答案: ")
    assert OpenCompassCMB().prompt(rec, tok) == expected
    multi = _cmb({"A": "发热", "B": "咳嗽"}, "AB", "multi")
    assert "考试的一道多项选择题，" in OpenCompassCMB().prompt(multi, tok)
    converted = _cmb({"A": "x1", "B": "y2"}, "A")
    converted = converted.__class__(**{**converted.__dict__, "metadata": {}})
    assert OpenCompassCMB().task(converted) is None  # no exam type/class: OpenCompass's prompt cannot be built


@pytest.mark.parametrize("output, expected", [
    ("B", "B"), ("答案: B", "B"), ("CA", "AC"), ("A、C、E", "ACE"), ("ACCA", "AC"),
    ("The answer is B", "BT"),  # every capital counts, as in OpenCompass: scored wrong
    ("b", ""), ("", ""), ("答案是：无", ""),
])
def test_opencompass_multiple_select_postprocess(output, expected):
    """Cases of ``multiple_select_postprocess`` (OpenCompass 0.5.4): the sorted set of the capitals."""
    from medpeft.protocols.opencompass import OpenCompassCMB, multiple_select_postprocess

    assert multiple_select_postprocess(output) == expected
    rec = _cmb({"A": "发热", "B": "咳嗽", "C": "白细胞升高"}, "B")
    parsed = OpenCompassCMB().parse(output, rec)
    assert parsed == (expected or None)


def test_opencompass_cmb_scoring_counts_what_it_cannot_read(tiny):
    """Through the evaluator: prediction = the post-processed output, correct iff it equals the
    gold letters, an output with no capital counted as an extraction failure."""
    from medpeft.dataset import tag_all
    from medpeft.evaluate import set_results
    from medpeft.protocols.opencompass import multiple_select_postprocess

    recs = [_cmb({"A": "发热", "B": "咳嗽", "C": "白细胞升高"}, "ABC"[i % 3]) for i in range(6)]
    recs = [r.__class__(**{**r.__dict__, "id": f"cmb/{i}"}) for i, r in enumerate(recs)]
    items = tag_all(recs, "cmb")
    preds = Evaluator(tiny.model, tiny.tokenizer, batch_size=4).score(items, "letters", protocol="opencompass-cmb")
    for p in preds:
        post = multiple_select_postprocess(p.text)
        assert p.extracted == bool(post)
        assert p.correct == (post == p.item.record.answer_text)
    bench = set_results({"cmb": preds}, 15)["benchmarks"]["cmb"]
    assert bench["extraction_failures"] == sum(not multiple_select_postprocess(p.text) for p in preds)


# ----------------------------------------------------------------------------- zero-shot CoT

@pytest.mark.parametrize("text, expected", [
    ("Step 1 ... so the answer is (B).", "B"),
    ("Reasoning.\nThe answer is C", "C"),
    ("The final answer: D\nQ: next question. The answer is A", "D"),  # the text after a new "Q:" is not read
    ("所以答案是B。", "B"),
    ("The answer is Based on the above", None),  # no option letter after the phrase
    ("I think it is B", None),  # no final-answer phrase: a failure, whatever letter appears
    ("The answer is E.", None),  # not an option
])
def test_cot_final_answer_extraction(text, expected):
    from medpeft.data.record import QARecord
    from medpeft.protocols.cot import ZeroShotCoT

    rec = QARecord(id="q/1", benchmark="medqa", language="en", question="Which?",
                   options={"A": "a", "B": "b", "C": "c", "D": "d"}, answer=frozenset("B"), question_type="single")
    got = ZeroShotCoT().parse(text, rec)
    assert got == (frozenset(expected) if expected else None)


def test_cot_multi_answer_reads_the_set():
    from medpeft.data.record import QARecord
    from medpeft.protocols.cot import ZeroShotCoT

    rec = QARecord(id="q/2", benchmark="cmexam", language="zh", question="哪些？",
                   options={"A": "a", "B": "b", "C": "c", "D": "d"}, answer=frozenset("AC"), question_type="multi")
    assert ZeroShotCoT().parse("分析……答案是AC。", rec) == frozenset("AC")
    assert ZeroShotCoT().parse("The answer is A, C and D.", rec) == frozenset("ACD")
    assert "可能有多个正确选项" in ZeroShotCoT().prompt(rec, __import__("medpeft.models", fromlist=["x"])
                                                   .build_tiny_tokenizer())


# ----------------------------------------------------------------------------- in the pipeline

def test_results_record_protocol_hash_revision_and_failures(tmp_path):
    """``medpeft eval`` under two protocols: each result names its protocol, the prompts' hash
    differs between them, the model revision is recorded, the extra protocol lands in its own
    folder and compare pairs the two on the same items."""
    from medpeft.cli import main
    from medpeft.compare import compare_runs

    out = tmp_path / "ev"
    assert main(["eval", "tiny", "--config", "quickstart", "--out", str(out), "eval.extra_protocols=[lm-eval, cot]",
                 "eval.cot_max_new_tokens=4"]) == 0
    head = json.loads((out / "results.json").read_text())
    lm = json.loads((out / "protocol-lm-eval" / "results.json").read_text())
    cot = json.loads((out / "protocol-cot" / "results.json").read_text())
    assert head["protocol"] == "medpeft" and lm["protocol"] == "lm-eval" and cot["protocol"] == "cot"
    assert head["model_revision"] == lm["model_revision"] == "built-in tiny, seed 1234"
    shared = sorted(set(head["benchmarks"]) & set(lm["benchmarks"]))
    assert shared and lm["skipped_sets"] == sorted(set(head["benchmarks"]) - set(lm["benchmarks"]))
    for name in shared:
        assert head["benchmarks"][name]["prompt_hash"] != lm["benchmarks"][name]["prompt_hash"]
        assert "acc_norm" in lm["benchmarks"][name]
    # four new tokens cannot finish a chain of thought: every answer fails to parse, and says so
    assert all(b["extraction_failure_rate"] == 1.0 for b in cot["benchmarks"].values())
    pairs = compare_runs([out / "predictions.jsonl", out / "protocol-lm-eval" / "predictions.jsonl"], intersect=True)
    assert pairs[0]["n"] == sum(head["benchmarks"][b]["n"] for b in shared)
    assert {pairs[0]["a"], pairs[0]["b"]} == {"ev", "ev:lm-eval"}
    # one run folder alone: its protocols against each other, on the items both define
    across = {(p["a"], p["b"]): p for p in compare_runs([out])}
    assert set(across) == {("ev", "ev:cot"), ("ev", "ev:lm-eval"), ("ev:cot", "ev:lm-eval")}
    assert across[("ev", "ev:lm-eval")]["macro_delta"] == pytest.approx(pairs[0]["macro_delta"])
    # evaluated again into the same folder with one protocol and one set: the dropped protocol's
    # folder and the dropped sets' plots go (compare would otherwise pair stale predictions)
    plots = sorted(p.name for p in out.glob("reliability-*.png"))
    assert plots == ["reliability-cmexam-examples.png", "reliability-medmcqa-examples.png",
                     "reliability-medqa-examples.png"]
    assert main(["eval", "tiny", "--config", "quickstart", "--out", str(out), "eval.extra_protocols=[lm-eval]",
                 "eval.benchmarks=[{benchmark: medqa, name: medqa-examples, path: 'pkg:medqa_dev.jsonl'}]"]) == 0
    assert sorted(p.name for p in out.glob("protocol-*")) == ["protocol-lm-eval"]
    assert sorted(p.name for p in out.glob("reliability-*.png")) == ["reliability-medqa-examples.png"]
    assert set(json.loads((out / "protocol-lm-eval" / "results.json").read_text())["benchmarks"]) == {"medqa-examples"}
    assert [(p["a"], p["b"]) for p in compare_runs([out])] == [("ev", "ev:lm-eval")]


def test_a_protocol_that_defines_no_task_for_a_set_is_refused_before_loading(tmp_path, capsys):
    from medpeft.cli import main

    code = main(["eval", "tiny", "--config", "quickstart", "--out", str(tmp_path / "x"), "eval.protocol=lm-eval"])
    err = capsys.readouterr().err
    assert code == 2 and "eval.protocol" in err and "cmexam-examples" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_report_has_protocol_calibration_and_robustness_tables(tmp_path):
    from medpeft.cli import main

    out = tmp_path / "suite"
    assert main(["suite", "quickstart", f"output_dir={out}", "methods=[lora-r16, birg]", "train.steps=2",
                 "eval.extra_protocols=[lm-eval]", "eval.permute_options=cyclic"]) == 0
    report = json.loads((out / "report" / "report.json").read_text())
    md = (out / "report" / "report.md").read_text()
    assert "## Protocols" in md and "## Calibration" in md and "## Option-order robustness" in md
    lm = json.loads((out / "birg" / "eval" / "protocol-lm-eval" / "results.json").read_text())
    for bench, v in lm["benchmarks"].items():
        cell = report["protocols"]["birg"]["lm-eval"][bench]
        assert cell["accuracy"] == pytest.approx(100 * v["accuracy"])
        assert cell["acc_norm"] == pytest.approx(100 * v["acc_norm"])
    head = json.loads((out / "lora-r16" / "eval" / "results.json").read_text())
    calib = {(r["label"], r["protocol"], r["benchmark"]): r for r in report["calibration"]}
    for bench, v in head["benchmarks"].items():
        assert calib[("lora-r16", "medpeft", bench)]["ece"] == pytest.approx(v["calibration"]["ece"])
    rob = {(r["label"], r["benchmark"]): r for r in report["robustness"]}
    for bench, v in head["robustness"]["sets"].items():
        assert rob[("lora-r16", bench)]["robust_accuracy"] == v["robust_accuracy"]
        assert rob[("lora-r16", bench)]["accuracy"] == pytest.approx(head["benchmarks"][bench]["accuracy"])
    assert (out / "birg" / "eval" / "reliability-medqa-examples.png").stat().st_size > 5000
