"""Every loader on the real benchmark samples, in their native formats, plus bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import read_jsonl
from medpeft.data import load_benchmark
from medpeft.data.hub import ROW_ADAPTERS
from medpeft.errors import DataError


def test_medqa_4_and_5_options_agree(data_dir):
    four = load_benchmark("medqa", data_dir / "medqa/us_4options_test.rows0-299.jsonl").records
    five = load_benchmark("medqa", data_dir / "medqa/us_5options_test.rows0-299.jsonl").records
    assert len(four) == len(five) == 300
    assert all(len(r.options) == 4 for r in four) and all(len(r.options) == 5 for r in five)
    raw4 = read_jsonl(data_dir / "medqa/us_4options_test.rows0-299.jsonl")
    for rec, raw in zip(four, raw4):
        assert rec.answer == {raw["answer_idx"]} and rec.options[raw["answer_idx"]] == raw["answer"]
    # same questions, same gold answer *text* in both layouts
    for a, b in zip(four, five):
        assert a.question == b.question
        assert a.options[next(iter(a.answer))] == b.options[next(iter(b.answer))]
    assert four[0].answer == {"B"} and five[0].answer == {"C"} and four[0].metadata["meta_info"] == "step1"


def test_medmcqa_cop_base_is_explicit(data_dir, tmp_path):
    path = data_dir / "medmcqa/dev.rows0-299.jsonl"
    orig = load_benchmark("medmcqa", path, cop_base=1).records
    raw = read_jsonl(path)
    assert len(orig) == 300 and orig[0].id == f"medmcqa/{raw[0]['id']}"
    assert all(r.answer == {"ABCD"[row["cop"] - 1]} for r, row in zip(orig, raw))
    assert orig[0].metadata["subject_name"] == "Physiology"
    # the hub copy indexes from 0: the same items rewritten 0-based give the same gold letters
    hub = tmp_path / "hub.jsonl"
    hub.write_text("".join(json.dumps({**row, "cop": row["cop"] - 1}) + "\n" for row in raw))
    assert [r.answer for r in load_benchmark("medmcqa", hub, cop_base=0).records] == [r.answer for r in orig]
    # reading 1-based data as 0-based fails loudly on the first cop == 4, not silently
    with pytest.raises(DataError, match=r"field 'cop': 4 is not an option index 0..3"):
        load_benchmark("medmcqa", path, cop_base=0)


def test_pubmedqa_native_dict_and_ground_truth(data_dir, tmp_path):
    rows = read_jsonl(data_dir / "pubmedqa/pqal_nontest.first300.jsonl")
    native = {k: v for row in rows for k, v in row.items()}
    ori = tmp_path / "ori_pqal.json"
    ori.write_text(json.dumps(native))
    recs = load_benchmark("pubmedqa", ori).records
    assert len(recs) == 300 and [r.id for r in recs] == [f"pubmedqa/{k}" for k in native]
    assert all(r.options == {"A": "yes", "B": "no", "C": "maybe"} for r in recs)
    assert [r.answer_text for r in recs] == ["ABC"["yes no maybe".split().index(v["final_decision"])] for v in native.values()]
    assert recs[0].question.startswith("Context: ") and native[next(iter(native))]["QUESTION"] in recs[0].question
    # the JSONL container of the samples reads the same
    assert [r.answer for r in load_benchmark("pubmedqa", data_dir / "pubmedqa/pqal_nontest.first300.jsonl").records] \
        == [r.answer for r in recs]
    # test_ground_truth.json selects PMIDs and provides their labels (the release's agree with final_decision)
    pmids = list(native)[:5]
    truth = tmp_path / "test_ground_truth.json"
    truth.write_text(json.dumps({p: native[p]["final_decision"] for p in pmids}))
    sub = load_benchmark("pubmedqa", ori, ground_truth=truth).records
    assert [r.id for r in sub] == [f"pubmedqa/{p}" for p in pmids]
    assert [r.answer_text for r in sub] == [r.answer_text for r in recs[:5]]
    # a ground truth that contradicts the data's own label is a wrong pairing of files: refused
    other = next(v for v in ("yes", "no", "maybe") if v != native[pmids[2]]["final_decision"])
    truth.write_text(json.dumps({**{p: native[p]["final_decision"] for p in pmids}, pmids[2]: other}))
    with pytest.raises(DataError, match=rf"record '{pmids[2]}'.*field 'final_decision'.*ground-truth file says '{other}'"):
        load_benchmark("pubmedqa", ori, ground_truth=truth)


def test_cmb_converted_format(data_dir):
    recs = load_benchmark("cmb", data_dir / "cmb/CONVERTED_apollo_xmedbench_cmb-single.rows0-299.jsonl").records
    assert len(recs) == 300
    assert recs[0].options["D"] == "咽鼓管宽、短、直" and recs[0].answer == {"D"}
    assert all(r.language == "zh" and r.question_type == "single" for r in recs)


def test_cmb_native_questions_joined_with_the_real_answer_key(data_dir, tmp_path):
    """The samples hold CMB's answer key without question text; join it to native question records."""
    key_path = data_dir / "cmb/test_choice_answer.first10_per_exam_class.jsonl"
    keys = read_jsonl(key_path)
    questions = [{"id": k["id"], "exam_type": k["exam_type"], "exam_class": k["exam_class"],
                  "exam_subject": k["exam_subject"], "question_type": k["question_type"],
                  "question": f"问题 {k['id']}", "option": {l: f"选项{l}" for l in "ABCDE"}} for k in keys]
    qfile = tmp_path / "CMB-test-choice-question-merge.json"
    qfile.write_text(json.dumps(questions, ensure_ascii=False), encoding="utf-8")
    recs = load_benchmark("cmb", qfile, answer_file=key_path).records
    assert len(recs) == 280
    assert [r.answer_text for r in recs] == ["".join(sorted(k["answer"])) for k in keys]
    # the release's question_type is kept: a 多项选择题 whose key has one letter is still scored as a set
    assert [r.question_type for r in recs] == ["multi" if k["question_type"] == "多项选择题" else "single" for k in keys]
    assert sum(len(r.answer) > 1 for r in recs) > 0
    assert recs[0].metadata == {"exam_type": "医师考试", "exam_class": "规培结业", "exam_subject": "临床病理科"}
    with pytest.raises(DataError, match="answer-key"):
        load_benchmark("cmb", qfile)


def _write_cmexam_csv(path: Path, rows: list[dict], newline_sep: bool) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["Question", "Options", "Answer", "Explanation"])
        w.writeheader()
        for r in rows:
            opts = r["Options"].replace("\\n", "\n") if newline_sep else r["Options"]
            w.writerow({k: (opts if k == "Options" else r[k]) for k in w.fieldnames})


def test_cmexam_csv_both_separators(data_dir, tmp_path):
    rows = read_jsonl(data_dir / "cmexam/val.rows0-299.jsonl")
    assert "\\n" in rows[0]["Options"]  # the literal two characters, as released in this copy
    literal, real = tmp_path / "literal.csv", tmp_path / "real.csv"
    _write_cmexam_csv(literal, rows, newline_sep=False)
    _write_cmexam_csv(real, rows, newline_sep=True)
    a = load_benchmark("cmexam", literal).records
    b = load_benchmark("cmexam", real).records
    assert len(a) == len(b) == 300
    assert [(r.options, r.answer) for r in a] == [(r.options, r.answer) for r in b]
    assert a[0].options == {"A": "原发病", "B": "出血部位", "C": "出血量", "D": "在胃内停留时间", "E": "以上均非"}
    assert [r.answer_text for r in a] == [row["Answer"] for row in rows]
    assert "Explanation" not in a[0].metadata  # explanations reveal the answer


def test_cmexam_converted_multi_answer(data_dir):
    recs = load_benchmark("cmexam", data_dir / "cmexam/CONVERTED_apollo_xmedbench_cmexam_test.rows0-299.jsonl").records
    multi = [r for r in recs if r.question_type == "multi"]
    assert len(recs) == 300 and len(multi) == 9
    raw = read_jsonl(data_dir / "cmexam/CONVERTED_apollo_xmedbench_cmexam_test.rows0-299.jsonl")
    assert [r.answer_text for r in recs] == [row["anwer"].strip("()") for row in raw]


def test_cmmlu_csv_with_index_column(data_dir, tmp_path):
    folder = tmp_path / "cmmlu"
    folder.mkdir()
    for src in sorted((data_dir / "cmmlu").glob("*.jsonl")):
        rows = read_jsonl(src)
        subject = src.name.split("_test")[0]
        with open(folder / f"{subject}.csv", "w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(list(rows[0].keys()))
            for r in rows:
                w.writerow(list(r.values()))
    recs = load_benchmark("cmmlu", folder).records
    assert len(recs) == 297
    assert recs[0].id == "cmmlu/anatomy/0" and recs[0].answer == {"A"} and recs[0].metadata["subject"] == "anatomy"
    assert {r.metadata["subject"] for r in recs} >= {"traditional_chinese_medicine", "virology"}
    assert [r.answer for r in recs] == [r.answer for r in load_benchmark("cmmlu", data_dir / "cmmlu").records]


def test_mmlu_headerless_csv(data_dir, tmp_path):
    folder = tmp_path / "test"
    folder.mkdir()
    for src in sorted((data_dir / "mmlu").glob("*.jsonl")):
        subject = src.name.split(".")[0]  # anatomy_test
        with open(folder / f"{subject}.csv", "w", encoding="utf-8", newline="") as fh:
            csv.writer(fh).writerows(read_jsonl(src))
    recs = load_benchmark("mmlu", folder).records
    assert len(recs) == 300 and recs[0].metadata["subject"] == "anatomy" and recs[0].answer == {"A"}
    assert recs[0].question.startswith("A lesion causing compression of the facial nerve")


def test_gsm8k_reference_number(data_dir):
    recs = load_benchmark("gsm8k", data_dir / "gsm8k/test.rows0-299.jsonl").records
    assert len(recs) == 300 and recs[0].reference == "18" and recs[0].question_type == "open"
    assert all(r.reference.lstrip("-").replace(".", "").isdigit() for r in recs)


def test_hub_row_adapters_map_back_to_native():
    mm = ROW_ADAPTERS["mmlu"]({"question": "Q?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 2})
    assert mm == ["Q?", "a", "b", "c", "d", "C"]
    pq = ROW_ADAPTERS["pubmedqa"]({"pubid": 1, "question": "Q?", "context": {"contexts": ["x"], "labels": ["L"],
                                   "meshes": ["M"]}, "long_answer": "...", "final_decision": "no"})
    assert pq == {"1": {"QUESTION": "Q?", "CONTEXTS": ["x"], "MESHES": ["M"], "final_decision": "no"}}


# ----------------------------------------------------------------------------- bad input

def _medqa_line(**kw) -> str:
    row = {"question": "Q", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "A", "answer": "a"}
    row.update(kw)
    return json.dumps(row)


def test_empty_file(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty.jsonl: file: no records \(empty file\)"):
        load_benchmark("medqa", f)


def test_answer_not_among_options_names_file_line_field(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(_medqa_line() + "\n" + _medqa_line(answer_idx="F", answer=None) + "\n")
    with pytest.raises(DataError) as err:
        load_benchmark("medqa", f)
    assert str(err.value) == f"{f}: line 2: field 'answer_idx': answer 'F' is not among the options ABCD"


def test_duplicate_ids(tmp_path):
    f = tmp_path / "dup.jsonl"
    row = {"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1, "id": "x1"}
    f.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"line 2: field 'id': duplicate id 'medmcqa/x1' \(first at dup.jsonl:line 1\)"):
        load_benchmark("medmcqa", f)


def test_unreadable_encoding(tmp_path):
    f = tmp_path / "gbk.csv"
    f.write_bytes("Question,Options,Answer\n".encode() + "问题,A 甲\\nB 乙,A\n".encode("gbk"))
    with pytest.raises(DataError, match=r"gbk.csv: line 2: cannot decode byte \d+ as utf-8-sig"):
        load_benchmark("cmexam", f)
    assert load_benchmark("cmexam", f, encoding="gbk").records[0].options == {"A": "甲", "B": "乙"}


def test_skip_invalid_skips_and_reports(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join([_medqa_line(), "{not json", _medqa_line(answer_idx="F", answer=None),
                            _medqa_line(question=""), _medqa_line(question="fine")]) + "\n")
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        load_benchmark("medqa", f)
    result = load_benchmark("medqa", f, skip_invalid=True)
    assert [r.question for r in result.records] == ["Q", "fine"]
    assert len(result.skipped) == 3
    assert {e.where for e in result.skipped} == {"line 2", "line 3", "line 4"}
    assert "answer 'F' is not among the options ABCD" in result.skip_summary()


def test_single_answer_item_with_two_letters(tmp_path):
    f = tmp_path / "cmb.json"
    f.write_text(json.dumps([{"question": "q", "option": {"A": "a", "B": "b"}, "answer": "AB",
                              "question_type": "单项选择题"}], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError, match=r"record 0: field 'answer': single-answer item has 2 answer letters"):
        load_benchmark("cmb", f)
