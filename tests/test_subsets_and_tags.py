from __future__ import annotations

import dataclasses
import json

import pytest

from medpeft.cli import main
from medpeft.data import exclude_overlap, load_benchmark, route_balanced, seeded_subset
from medpeft.errors import MedpeftError
from medpeft.tags import OPERATIONS, SPECIALTIES, tag_record


@pytest.fixture
def medqa(data_dir):
    return load_benchmark("medqa", data_dir / "medqa/us_4options_test.rows0-299.jsonl").records


def test_seeded_subset_is_deterministic_and_ordered(medqa):
    a, b, c = seeded_subset(medqa, 70, 0), seeded_subset(medqa, 70, 0), seeded_subset(medqa, 70, 1)
    assert [r.id for r in a] == [r.id for r in b] and len(a) == 70
    assert [r.id for r in a] != [r.id for r in c]
    positions = [medqa.index(r) for r in a]
    assert positions == sorted(positions)
    assert seeded_subset(medqa, 1000, 0) == medqa


def test_route_balanced_and_disjoint_from_eval(data_dir):
    recs = load_benchmark("cmb", data_dir / "cmb/CONVERTED_apollo_xmedbench_cmb-single.rows0-299.jsonl").records
    eval_set, pool = recs[:50], recs
    kept, dropped = exclude_overlap(pool, eval_set)
    assert dropped == 50 and not {r.id for r in kept} & {r.id for r in eval_set}
    # a copy of an eval question under another id is caught by its normalised text
    clone = dataclasses.replace(eval_set[0], id="cmb/other", question=" " + eval_set[0].question.upper() + "。")
    assert exclude_overlap([clone], eval_set) == ([], 1)
    spec = {r.id: tag_record(r, text_only=True).specialty for r in kept}
    routes = ["clinical_medicine", "basic_biomedicine", "tcm"]
    picked = route_balanced(kept, lambda r: spec[r.id], 8, seed=3, routes=routes)
    assert len(picked) == 24 and len({r.id for r in picked}) == 24
    assert sorted(spec[r.id] for r in picked) == sorted(routes * 8)
    assert [r.id for r in picked] == [r.id for r in route_balanced(kept, lambda r: spec[r.id], 8, 3, routes)]
    with pytest.raises(MedpeftError, match="needs 500 items per route; too few in clinical_medicine"):
        route_balanced(kept, lambda r: spec[r.id], 500, 0, routes)


SAMPLES = [("medqa", "medqa/us_4options_test.rows0-299.jsonl"), ("medmcqa", "medmcqa/dev.rows0-299.jsonl"),
           ("cmexam", "cmexam/val.rows0-299.jsonl"), ("cmb", "cmb/CONVERTED_apollo_xmedbench_cmb-single.rows0-299.jsonl"),
           ("cmmlu", "cmmlu"), ("mmlu", "mmlu"), ("pubmedqa", "pubmedqa/pqal_nontest.first300.jsonl")]


@pytest.mark.parametrize("bench, path", SAMPLES)
def test_tags_never_read_the_gold_answer(data_dir, bench, path):
    for rec in load_benchmark(bench, data_dir / path).records:
        other = next(l for l in rec.options if l not in rec.answer)
        flipped = dataclasses.replace(rec, answer=frozenset(other))
        for text_only in (False, True):
            assert tag_record(rec, text_only=text_only) == tag_record(flipped, text_only=text_only)


def test_tags_are_valid_and_explained(data_dir):
    for benchmark, path in SAMPLES:
        for rec in load_benchmark(benchmark, data_dir / path).records:
            t = tag_record(rec)
            assert t.specialty in SPECIALTIES and t.operation in OPERATIONS
            assert t.why_specialty and t.why_operation


def test_metadata_first_then_keywords(data_dir):
    mc = load_benchmark("medmcqa", data_dir / "medmcqa/dev.rows0-299.jsonl").records[0]
    assert tag_record(mc).specialty == "basic_biomedicine"  # subject_name = Physiology
    assert tag_record(mc).why_specialty == "metadata:subject_name=Physiology"
    assert tag_record(mc, text_only=True).why_specialty.startswith(("keyword:", "no rule"))
    cm = load_benchmark("cmmlu", data_dir / "cmmlu").records
    tcm = [r for r in cm if r.metadata["subject"] == "traditional_chinese_medicine"]
    assert all(tag_record(r).specialty == "tcm" for r in tcm)


def test_keyword_rules_in_both_languages():
    from medpeft.data.record import QARecord

    def rec(q, lang="en"):
        return QARecord("x", "medqa", lang, q, {"A": "a", "B": "b"}, frozenset("A"), "single")

    t = tag_record(rec("A 45-year-old man presents with chest pain. Which of the following is the most likely diagnosis?"))
    assert (t.specialty, t.operation) == ("clinical_medicine", "diagnosis")
    assert t.why_operation.startswith("keyword:diagnosis:")
    t = tag_record(rec("护士为长期卧床患者采取的首要护理措施是", "zh"))
    assert (t.specialty, t.operation) == ("nursing", "nursing_action")
    t = tag_record(rec("六味地黄丸的主治证候是", "zh"))
    assert t.specialty == "tcm"


def test_tag_cli_writes_jsonl(data_dir, tmp_path):
    out = tmp_path / "tags.jsonl"
    assert main(["tag", str(data_dir / "medmcqa/dev.rows0-299.jsonl"), "--benchmark", "medmcqa", "--out", str(out)]) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 300 and set(rows[0]) >= {"id", "specialty", "operation", "why"}
    assert main(["tag", str(data_dir / "medmcqa/dev.rows0-299.jsonl"), "--benchmark", "medmcqa", "--text-only",
                 "--out", str(out)]) == 0
    assert all(not r["why"]["specialty"].startswith("metadata") for r in map(json.loads, out.read_text().splitlines()))


def test_tag_cli_bad_file_exit_2(tmp_path, capsys):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"question": "q"}\n')
    assert main(["tag", str(bad), "--benchmark", "medqa"]) == 2
    assert "x.jsonl: line 1: field 'options'" in capsys.readouterr().err
