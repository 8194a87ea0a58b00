"""The learned text-only tagger: equality with scikit-learn, round trip, no answer leakage,
exclusion of evaluation sets, thresholded unknowns with reasons, CLI and config key."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from medpeft.cli import main
from medpeft.data import load_benchmark
from medpeft.data.record import QARecord
from medpeft.tagger import (CONFIG_FILE, WEIGHTS_FILE, TaggerSettings, TextTagger, fit_tagger, metadata_label,
                            ngrams, train_tagger)
from medpeft.tags import UNKNOWN, item_text, tag_record

MEDMCQA = "medmcqa/dev.rows0-299.jsonl"


@pytest.fixture(scope="module")
def samples(data_dir):
    return {"medmcqa": load_benchmark("medmcqa", data_dir / MEDMCQA).records,
            "cmmlu": load_benchmark("cmmlu", data_dir / "cmmlu").records,
            "mmlu": load_benchmark("mmlu", data_dir / "mmlu").records}


@pytest.fixture(scope="module")
def mixed(samples):
    """A tagger on MedMCQA + CMMLU (English words and Chinese characters), a third held out."""
    return train_tagger({"medmcqa": samples["medmcqa"], "cmmlu": samples["cmmlu"]}, TaggerSettings(held_out=0.34))


def test_ngrams_are_english_words_and_chinese_characters():
    grams = ngrams("高血压患者 takes the Aspirin daily", word_n=(1, 2), char_n=(1, 2),
                   stop_words=frozenset({"the"}))
    assert grams[:9] == ["zh:高", "zh:血", "zh:压", "zh:患", "zh:者", "zh:高血", "zh:血压", "zh:压患", "zh:患者"]
    assert grams[9:] == ["takes", "aspirin", "daily", "takes aspirin", "aspirin daily"]  # stop word dropped first
    assert ngrams("ＡＢＣ-12 ｘ") == ngrams("abc-12 x")  # NFKC width folding and lower case
    assert ngrams("Ménière’s β-blocker", word_n=(1, 1)) == ["ménière’s", "β-blocker"]  # letters of any script


@pytest.mark.parametrize("sample", ["mixed", "binary"])
def test_numpy_inference_equals_scikit_learn(samples, sample):
    """Our TF-IDF + softmax on the saved arrays == TfidfVectorizer.transform + predict_proba."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    # MMLU's six medical subjects map to two specialties: sklearn's binary model has one row
    train = samples["medmcqa"][:200] + samples["cmmlu"][:200] if sample == "mixed" else samples["mmlu"][:200]
    test = samples["medmcqa"][200:] + samples["cmmlu"][200:] if sample == "mixed" else samples["mmlu"][200:]
    settings = TaggerSettings()
    tagger = fit_tagger(train, settings)
    vec = TfidfVectorizer(analyzer=lambda t: ngrams(t, (1, 2), (1, 3), frozenset(ENGLISH_STOP_WORDS)),
                          lowercase=False, min_df=2, max_features=200_000, sublinear_tf=True)
    x = vec.fit_transform([item_text(r) for r in train])
    clf = LogisticRegression(C=10.0, max_iter=1000).fit(x, [metadata_label(r, "specialty") for r in train])
    assert (len(clf.classes_) == 2) == (sample == "binary")
    expected = clf.predict_proba(vec.transform([item_text(r) for r in test]))
    ours = np.stack([tagger.probabilities(item_text(r), "specialty") for r in test])
    assert tagger.axes["specialty"].classes == list(clf.classes_)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert [tagger.predict(r, "specialty").best for r in test] == list(clf.predict(vec.transform(
        [item_text(r) for r in test])))


def test_saved_tagger_round_trips_without_pickle(mixed, samples, tmp_path):
    mixed.save(tmp_path / "tg")
    assert sorted(p.name for p in (tmp_path / "tg").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    meta = json.loads((tmp_path / "tg" / CONFIG_FILE).read_text(encoding="utf-8"))  # plain JSON
    assert meta["sources"]["medmcqa"]["train"] + meta["sources"]["medmcqa"]["held_out"] == 300
    assert 0 < meta["held_out_agreement"]["specialty"]["learned"]["agreement"] <= 1
    loaded = TextTagger.load(tmp_path / "tg")
    for r in samples["medmcqa"][:40] + samples["cmmlu"][:40]:
        a, b = mixed.predict(r, "specialty"), loaded.predict(r, "specialty")
        assert a.tag == b.tag and a.top_ngrams == b.top_ngrams and abs(a.probability - b.probability) < 1e-6
    assert len(loaded.trained_on(samples["medmcqa"])) == meta["sources"]["medmcqa"]["train"]


def test_answers_never_enter_features_or_labels(samples):
    """Training on the same items with other gold answers gives the same tagger; tagging an item
    with another answer gives the same tags."""
    def other_answer(r: QARecord) -> QARecord:
        letters = sorted(r.options)
        return dataclasses.replace(r, answer=frozenset({next(x for x in letters if x not in r.answer)}))

    train = samples["medmcqa"][:150] + samples["cmmlu"][:150]
    a, b = fit_tagger(train, TaggerSettings()), fit_tagger([other_answer(r) for r in train], TaggerSettings())
    assert a.vocabulary == b.vocabulary
    np.testing.assert_array_equal(a.axes["specialty"].coef, b.axes["specialty"].coef)
    for r in samples["medmcqa"][150:] + samples["cmmlu"][150:]:
        assert tag_record(r, text_only=True, tagger=a) == tag_record(other_answer(r), text_only=True, tagger=a)


def test_why_names_the_ngrams_that_pushed_the_tag_and_unknown_below_threshold(mixed, samples):
    r = samples["medmcqa"][0]
    p = mixed.predict(r, "specialty")
    idx, values = mixed.features(item_text(r))
    k = mixed.axes["specialty"].classes.index(p.best)
    contribution = dict(zip((mixed.vocabulary[j] for j in idx), values * mixed.axes["specialty"].coef[k, idx]))
    assert p.top_ngrams and set(p.top_ngrams) <= set(ngrams(item_text(r), stop_words=mixed.stop_words))
    assert [contribution[g] for g in p.top_ngrams] == sorted(contribution.values(), reverse=True)[:len(p.top_ngrams)]
    tags = tag_record(r, text_only=True, tagger=mixed)
    assert tags.specialty == p.tag and tags.why_specialty.startswith(f"learned: p={p.probability:.2f}")
    strict = dataclasses.replace(mixed, min_confidence=0.999)
    unsure = tag_record(r, text_only=True, tagger=strict)
    assert unsure.specialty == UNKNOWN and "below the threshold" in unsure.why_specialty and p.best in unsure.why_specialty
    # metadata still comes first unless text_only; operations without a model keep the keyword rules
    assert tag_record(r, tagger=mixed).why_specialty.startswith("metadata:")
    assert tags.why_operation == tag_record(r, text_only=True).why_operation


def test_an_operation_model_is_trained_where_competency_labels_exist():
    """CMExam-like items (our own) whose competency area labels the operation; one discipline
    only, so no specialty model: specialties keep the keyword rules."""
    asks = [("诊断", "最可能的诊断是"), ("治疗", "首选的治疗是"), ("用药", "首选药物是"), ("检查", "首选检查是")]
    records = [QARecord(f"x{i}", "cmexam", "zh", f"患者{20 + i}岁，{'发热' if i % 2 else '咳嗽'}三天，{asks[i % 4][1]}",
                        {"A": "甲", "B": "乙"}, frozenset("A"), "single",
                        {"Competency Area": asks[i % 4][0], "Medical Discipline": "临床医学"}) for i in range(80)]
    tagger = fit_tagger(records, TaggerSettings(min_df=1))
    assert set(tagger.axes) == {"operation"}
    assert tagger.axes["operation"].classes == ["diagnosis", "medication", "test_interpretation", "treatment"]
    probe = QARecord("p", "user", "zh", "患者咳嗽，首选药物是", {"A": "甲", "B": "乙"}, frozenset("A"), "single")
    tags = tag_record(probe, tagger=tagger)
    assert tags.operation == "medication" and tags.why_operation.startswith("learned:")
    assert tags.why_specialty == tag_record(probe).why_specialty  # keyword rules


def write_tagger_config(tmp_path: Path, data_dir: Path, **extra) -> Path:
    cfg = {"output": str(tmp_path / "tg"), "sources": [{"benchmark": "medmcqa", "path": str(data_dir / MEDMCQA)}],
           "model": {"held_out": 0.2}, **extra}
    path = tmp_path / "tagger.yaml"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def test_tagger_train_cli_excludes_evaluation_sets_and_runs_refuse_leaky_taggers(data_dir, tmp_path, capsys):
    lines = (data_dir / MEDMCQA).read_text(encoding="utf-8").splitlines()
    (tmp_path / "eval.jsonl").write_text("\n".join(lines[:60]) + "\n", encoding="utf-8")
    run = {"output_dir": str(tmp_path / "run"), "eval": {"benchmarks": [
        {"benchmark": "medmcqa", "path": str(tmp_path / "eval.jsonl"), "text_only_tags": True}]}}
    (tmp_path / "run.yaml").write_text(json.dumps(run), encoding="utf-8")
    config = write_tagger_config(tmp_path, data_dir, exclude_runs=["run.yaml"])
    assert main(["tagger", "train", str(config)]) == 0
    out = capsys.readouterr().out
    assert "| medmcqa | specialty | 48 |" in out and "written to" in out  # (300 - 60) x 0.2 held out
    tagger = TextTagger.load(tmp_path / "tg")
    evaluation = load_benchmark("medmcqa", tmp_path / "eval.jsonl").records
    assert tagger.trained_on(evaluation) == [] and tagger.info["sources"]["medmcqa"]["dropped_as_evaluation_items"] == 60
    from medpeft.config import load_config
    from medpeft.dataset import load_eval_sets, run_tagger

    cfg = load_config(str(tmp_path / "run.yaml"), [f"data.tagger={tmp_path / 'tg'}"])
    tagged = load_eval_sets(cfg.eval.benchmarks, run_tagger(cfg))["medmcqa"]
    assert all(t.tags.why_specialty.startswith("learned:") for t in tagged)
    # a tagger trained without the exclusion is refused by the run, before any model loads
    assert main(["tagger", "train", str(write_tagger_config(tmp_path, data_dir)),
                 f"output={tmp_path / 'leaky'}"]) == 0
    capsys.readouterr()
    assert main(["eval", "tiny", "--config", str(tmp_path / "run.yaml"), f"data.tagger={tmp_path / 'leaky'}",
                 "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    seen = len(TextTagger.load(tmp_path / "leaky").trained_on(evaluation))  # its held-out fifth was not trained on
    assert 30 < seen < 60 and len(err.splitlines()) == 1 and "data.tagger" in err
    assert f"trained on {seen} questions of the evaluation set 'medmcqa'" in err
    assert not (tmp_path / "e").exists()


def test_tag_cli_uses_a_tagger(data_dir, tmp_path, mixed):
    mixed.save(tmp_path / "tg")
    out = tmp_path / "tags.jsonl"
    assert main(["tag", str(data_dir / "mmlu"), "--benchmark", "mmlu", "--text-only", "--tagger",
                 str(tmp_path / "tg"), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 300 and all(r["why"]["specialty"].startswith("learned:") for r in rows)


def test_a_hub_source_is_read_through_the_hub_loader(data_dir, tmp_path, monkeypatch):
    """No internet here: datasets.load_dataset is replaced by rows shaped like the hub copy
    of MedMCQA (cop indexed from 0); everything after it is the path users run."""
    import datasets

    rows = [json.loads(line) for line in (data_dir / MEDMCQA).read_text(encoding="utf-8").splitlines()]
    for row in rows:
        row["cop"] = int(row["cop"]) - 1
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, config, split: calls.append((hub_id, split)) or rows)
    config = write_tagger_config(tmp_path, data_dir, sources=[{"benchmark": "medmcqa", "hub": True, "split": "train"}])
    assert main(["tagger", "train", str(config)]) == 0
    assert calls == [("openlifescienceai/medmcqa", "train")]
    info = TextTagger.load(tmp_path / "tg").info["sources"]["medmcqa"]
    assert info["split"] == "train" and info["labelled"] == 300


@pytest.mark.parametrize("case, expected", [
    ("missing", "not a tagger folder (tagger.json is missing"),
    ("not_json", "tagger.json: not valid JSON"),
    ("wrong_shape", "tensor 'idf' must be finite floating-point of shape"),
    ("tampered", "its sha256 differs from field 'weights_sha256'"),
    ("classes", "field 'axes.specialty' must be an axis"),
    ("no_fingerprints", "tensor 'train_fingerprints' must be 1-D int64"),
    ("tagger_is_file", "is a file; a tagger is a folder"),
    ("hub_without_split", "config key 'sources.0.split' must be given for a hub source"),
    ("min_df", "config key 'model.min_df' (100000): no n-gram is left"),
    ("no_labels", "config key 'sources.0' (medqa): none of its 300 items has a specialty"),
    ("config_key", "unknown config key 'model.c'"),
    ("non_tagger_output", "config key 'output'"),
])
def test_bad_taggers_and_tagger_configs_are_one_line(data_dir, tmp_path, capsys, mixed, case, expected):
    folder = tmp_path / "tg"
    mixed.save(folder)
    if case == "missing":
        (folder / WEIGHTS_FILE).unlink()
        (folder / CONFIG_FILE).unlink()
    elif case == "not_json":
        (folder / CONFIG_FILE).write_text("{", encoding="utf-8")
    elif case in ("wrong_shape", "classes", "no_fingerprints"):
        from safetensors.numpy import load_file, save_file

        meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        if case == "wrong_shape":
            meta["vocabulary"] = meta["vocabulary"][:-1]
        elif case == "classes":
            meta["axes"]["specialty"]["classes"][0] = "treatment"  # an operation, not a specialty
        else:  # a consistent file whose fingerprints are gone: the leakage check would see nothing
            tensors = load_file(str(folder / WEIGHTS_FILE))
            del tensors["train_fingerprints"]
            save_file(tensors, str(folder / WEIGHTS_FILE))
            import hashlib

            meta["weights_sha256"] = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()
        (folder / CONFIG_FILE).write_text(json.dumps(meta), encoding="utf-8")
    elif case == "tampered":
        data = bytearray((folder / WEIGHTS_FILE).read_bytes())
        data[-3] ^= 1
        (folder / WEIGHTS_FILE).write_bytes(bytes(data))
    if case in ("config_key", "non_tagger_output", "hub_without_split", "min_df", "no_labels"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("mine", encoding="utf-8")
        extra = {"non_tagger_output": {"output": str(tmp_path / "other")},
                 "hub_without_split": {"sources": [{"benchmark": "medmcqa", "hub": True}]},
                 "min_df": {"model": {"min_df": 100000}},
                 "no_labels": {"sources": [{"benchmark": "medqa",
                                            "path": str(data_dir / "medqa/us_4options_test.rows0-299.jsonl")}]}}
        config = write_tagger_config(tmp_path, data_dir, **extra.get(case, {}))
        args = ["tagger", "train", str(config)] + (["model.c=3"] if case == "config_key" else [])
    else:
        target = folder / CONFIG_FILE if case == "tagger_is_file" else folder
        args = ["tag", str(data_dir / "mmlu"), "--benchmark", "mmlu", "--tagger", str(target)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    if (tmp_path / "other").exists():  # nothing written was lost
        assert (tmp_path / "other" / "notes.txt").read_text(encoding="utf-8") == "mine"
        assert not (tmp_path / "tg" / "notes.txt").exists() and (tmp_path / "tg" / CONFIG_FILE).exists()


def test_the_shipped_tagger_config_is_valid():
    from medpeft.config import load_tagger_config

    cfg = load_tagger_config(str(Path(__file__).resolve().parents[1] / "configs/taggers/medmcqa-train.yaml"))
    assert [(s.benchmark, s.hub, s.split) for s in cfg.sources] == [("medmcqa", True, "train")]
    assert [(s.benchmark, s.split) for s in cfg.exclude] == [("medmcqa", "validation")]
    assert cfg.output == "taggers/medmcqa" and cfg.model.held_out == 0.05


def test_held_out_items_never_repeat_a_training_question(samples):
    from medpeft.tagger import fingerprint, split_held_out

    records = samples["mmlu"][:100]
    copies = records + [dataclasses.replace(r, id=r.id + "-copy", question=r.question.upper() + " ?")
                        for r in records[:50]]  # the same questions, other spelling
    train, held = split_held_out(copies, 0.3, seed=0)
    assert {fingerprint(r) for r in train}.isdisjoint({fingerprint(r) for r in held})
    assert len(train) + len(held) == 150 and 25 <= len(held) <= 50  # 30 of 100 distinct questions, with copies


def test_a_run_is_evaluated_only_with_the_tagger_it_was_trained_with(data_dir, tmp_path, capsys):
    lines = (data_dir / MEDMCQA).read_text(encoding="utf-8").splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:200]) + "\n", encoding="utf-8")
    (tmp_path / "eval.jsonl").write_text("\n".join(lines[200:216]) + "\n", encoding="utf-8")
    tagger_cfg = tmp_path / "tagger.yaml"
    tagger_cfg.write_text(json.dumps({"output": str(tmp_path / "tg"), "sources": [
        {"benchmark": "medmcqa", "path": "train.jsonl"}], "exclude_runs": ["run.yaml"]}), encoding="utf-8")
    run = {"output_dir": str(tmp_path / "run"), "model": {"name": "tiny"}, "method": {"preset": "birg"},
           "data": {"max_length": 256, "tagger": "tg", "train": [
               {"benchmark": "medmcqa", "path": "train.jsonl", "text_only_tags": True, "limit": 16}]},
           "train": {"steps": 2, "batch_size": 4, "micro_batch_size": 4, "save_every": 0, "compile": False},
           "eval": {"batch_size": 8, "benchmarks": [{"benchmark": "medmcqa", "path": "eval.jsonl",
                                                     "text_only_tags": True}]}}
    (tmp_path / "run.yaml").write_text(json.dumps(run), encoding="utf-8")
    assert main(["tagger", "train", str(tagger_cfg)]) == 0
    assert main(["run", str(tmp_path / "run.yaml")]) == 0
    assert len((tmp_path / "run" / "tagger.sha256").read_text().strip()) == 64
    assert main(["tagger", "train", str(tagger_cfg), "model.C=1"]) == 0  # the folder is rewritten
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.tagger" in err and "changed since" in err
    assert main(["eval", str(tmp_path / "run"), "data.tagger=null", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trained with a learned tagger" in err and "'data.tagger' is unset" in err
    assert not (tmp_path / "e").exists()


def test_other_languages_keep_the_keyword_rules_and_unknown_text_is_unknown(samples):
    english = fit_tagger(samples["mmlu"], TaggerSettings())
    assert english.languages == ("en",)
    chinese = samples["cmmlu"][0]
    assert english.predict(chinese, "specialty") is None
    assert tag_record(chinese, text_only=True, tagger=english) == tag_record(chinese, text_only=True)
    gibberish = QARecord("g", "user", "en", "Zqxv wplk?", {"A": "qqq", "B": "zzz"}, frozenset("A"), "single")
    p = english.predict(gibberish, "specialty")
    assert p.tag == UNKNOWN and "no n-gram of the text is in the tagger's vocabulary" in p.why


def test_a_question_held_out_in_one_source_is_not_trained_on_through_another(samples):
    from medpeft.tagger import fingerprint

    mmlu = samples["mmlu"]
    tagger = train_tagger({"mmlu": mmlu, "again": [dataclasses.replace(r, id="again-" + r.id) for r in mmlu[:150]]},
                          TaggerSettings(held_out=0.3))
    sources = tagger.info["sources"]
    assert sources["mmlu"]["dropped_as_held_out_elsewhere"] + sources["again"]["dropped_as_held_out_elsewhere"] > 0
    held = {fingerprint(r) for r in mmlu} - set(tagger.fingerprints.tolist())
    assert len(held) >= sources["mmlu"]["held_out"] - 1 and not tagger.trained_on(
        [r for r in mmlu if fingerprint(r) in held])


def test_agreement_counts_what_a_run_assigns_even_for_a_language_the_tagger_never_saw(samples):
    """A source held out whole (here: CMMLU, Chinese) is tagged by the keyword rules in a run
    with an English-only tagger: its recorded agreement is theirs, not a crash."""
    from medpeft.tagger import agreement

    english = fit_tagger(samples["mmlu"], TaggerSettings())
    chinese = samples["cmmlu"]
    result = agreement(english, chinese, "specialty")
    assert result["learned"] == result["keyword"] and result["n"] == len(chinese)
