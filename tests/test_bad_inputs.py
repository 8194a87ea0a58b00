"""Off the happy path: a corpus of bad inputs, interruptions, faults and planted files.

Every case asserts exit code 2, one line on stderr naming the file, record and field (or the
config key), no traceback, and that what was written before is unchanged. The security
cases plant a pickle payload in a checkpoint and a remote-code model folder and assert that
neither runs.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medpeft.cli import main

MEDQA_ROW = {"question": "Which organ?", "options": {"A": "heart", "B": "lung"}, "answer_idx": "A"}


def one_line(capsys, *expected: str) -> str:
    err = capsys.readouterr().err.rsplit("\r", 1)[-1]  # after any progress bar the command drew and cleared
    assert err.startswith("medpeft: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in expected:
        assert part in err, (part, err)
    return err


WATCHED: dict = {}


@pytest.fixture(autouse=True)
def _watch_written_files(tmp_path):
    """Every failing command below must leave the files already under the test's folder as they were."""
    WATCHED["root"] = tmp_path
    yield
    WATCHED.clear()


def _snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def fails(capsys, args: list[str], *expected: str) -> str:
    before = _snapshot(WATCHED["root"])
    assert main(args) == 2
    after = _snapshot(WATCHED["root"])
    changed = [str(p) for p, data in before.items() if after.get(p) != data]
    assert not changed, f"a failing command changed {changed}"
    return one_line(capsys, *expected)


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


@pytest.fixture
def sentinel(tmp_path):
    """A file written before the failing command; it must be unchanged afterwards."""
    path = tmp_path / "out" / "results.json"
    path.parent.mkdir()
    path.write_text('{"kept": true}\n')
    yield path
    assert path.read_text() == '{"kept": true}\n'


# ------------------------------------------------------------------------------ security

def _payload(marker: Path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return Payload()


def _interrupted_run(tmp_path: Path, *overrides: str) -> list[str]:
    args = ["train", "quickstart", f"output_dir={tmp_path / 'run'}", "methods=[]", "train.steps=4",
            "train.save_every=2", "data.max_length=128", *overrides]
    import medpeft.train

    real = medpeft.train.training_step
    calls = []

    class Killed(Exception):
        pass

    def stop_after_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return real(*a, **k)

    medpeft.train.training_step = stop_after_3
    try:
        with pytest.raises(Killed):
            main(args)
    finally:
        medpeft.train.training_step = real
    assert (tmp_path / "run" / "checkpoints" / "step-0000002" / "state.json").exists()
    return args


def test_a_planted_pickle_in_a_checkpoint_never_runs(tmp_path, capsys):
    args = _interrupted_run(tmp_path)
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000002"
    marker = tmp_path / "pwned"
    with open(ckpt / "state.pt", "wb") as fh:  # planted next to the real state: never read
        pickle.dump(_payload(marker), fh)
    saved = (ckpt / "optimizer.safetensors").read_bytes()
    (ckpt / "optimizer.safetensors").unlink()  # only the pickle left: refused
    assert main(args + ["--resume"]) == 2
    one_line(capsys, "state.pt", "pickled checkpoint")
    assert not marker.exists()
    (ckpt / "optimizer.safetensors").write_bytes(saved)
    assert main(args + ["--resume"]) == 0
    assert not marker.exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 2


def test_a_model_folder_with_remote_code_is_refused_even_when_stdin_says_yes(tmp_path):
    folder = tmp_path / "evil-model"
    folder.mkdir()
    marker = tmp_path / "pwned"
    (folder / "configuration_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import PretrainedConfig\nclass EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "evil", "architectures": ["EvilForCausalLM"],
                                                    "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoConfig": "configuration_evil.EvilConfig"},
                                                              "model_type": "evil"}))
    proc = subprocess.run([sys.executable, "-m", "medpeft.cli", "eval", str(folder)], input="y\ny\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("medpeft: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "ships its own Python code" in proc.stderr and str(folder / "config.json") in proc.stderr
    assert not marker.exists()
    # the payload is real: with the key on, transformers imports it
    subprocess.run([sys.executable, "-m", "medpeft.cli", "eval", str(folder), "model.trust_remote_code=true"],
                   capture_output=True, text=True, timeout=120)
    assert marker.exists()


def test_written_files_get_normal_permissions(tmp_path):
    from medpeft.io import write_json

    mask = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(mask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------------ nothing silently wrong

def test_resume_with_a_changed_config_is_refused_unless_forced(tmp_path, capsys):
    args = _interrupted_run(tmp_path)
    fails(capsys, args + ["train.lr=0.01", "--resume"], "interrupted run was started with another config",
          "train.lr")
    assert not (tmp_path / "run" / "summary.json").exists()
    assert main(args + ["train.save_every=1", "--resume"]) == 0  # a change that does not alter the result
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["resumed_with_changes"] is None


def test_force_resume_records_the_changed_keys(tmp_path, capsys):
    args = _interrupted_run(tmp_path)
    assert main(args + ["train.lr=0.01", "--resume", "--force-resume"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["resumed_with_changes"] == ["train.lr"]


def test_one_writer_per_run_folder_and_a_killed_writer_leaves_no_lock(tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom medpeft.io import run_lock\n"
                               f"with run_lock({str(run)!r}):\n    print('locked', flush=True)\n    time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        fails(capsys, ["train", "quickstart", f"output_dir={run}", "methods=[]", "train.steps=1"], str(run.resolve()),
              "is in use by medpeft process")
        assert time.monotonic() - start < 30  # at once, not after training
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", "quickstart", f"output_dir={run}", "methods=[]", "train.steps=1",
                 "data.max_length=128"]) == 0


@pytest.mark.parametrize("override, key", [
    ("train.steps=0", "train.steps"), ("train.batch_size=0", "train.batch_size"),
    ("train.micro_batch_size=0", "train.micro_batch_size"), ("train.log_every=0", "train.log_every"),
    ("train.lr=.nan", "train.lr"), ("train.lr=0", "train.lr"), ("train.lr=-1e-4", "train.lr"),
    ("train.warmup_steps=-1", "train.warmup_steps"), ("data.max_length=16", "data.max_length"),
    ("method.r=0", "method.r"), ("method.dropout=1.0", "method.dropout"), ("method.dropout=-0.1", "method.dropout"),
    ("eval.benchmarks.0.limit=0", "eval.benchmarks.0.limit"), ("data.train.0.limit=-3", "data.train.0.limit"),
    ("model.device=gpu0", "model.device"), ("eval.batch_size=0", "eval.batch_size"),
    ("eval.perturb_rates=[0.0]", "eval.perturb_rates"), ("eval.perturb_rates=[1.5]", "eval.perturb_rates"),
    ("eval.benchmarks.0.encoding=klingon", "eval.benchmarks.0.encoding"),
    ("eval.benchmarks.0.benchmark=medqa2", "eval.benchmarks.0.benchmark"),
    ("method.target_modules=[nope_proj]", "method.target_modules"),
])
def test_meaningless_values_are_refused_before_anything_is_loaded_or_written(override, key, tmp_path, capsys):
    out = tmp_path / "run"
    fails(capsys, ["run", "quickstart", f"output_dir={out}", "methods=[]", override], f"config key '{key}'")
    assert not out.exists()


def test_run_checks_every_eval_source_before_training(tmp_path, capsys):
    bad = jsonl(tmp_path / "eval.jsonl", [MEDQA_ROW, {**MEDQA_ROW, "answer_idx": "Z"}])
    out = tmp_path / "run"
    fails(capsys, ["run", "quickstart", f"output_dir={out}", f"eval.benchmarks=[{{benchmark: medqa, path: {bad}}}]"],
          f"{bad}: line 2: field 'answer_idx'")
    assert not list(out.rglob("summary.json"))  # no training ran
    fails(capsys, ["run", "quickstart", f"output_dir={out}",
                   f"eval.benchmarks=[{{benchmark: medqa, path: {tmp_path / 'missing.jsonl'}}}]"], "missing.jsonl")
    fails(capsys, ["run", "quickstart", f"output_dir={out}", f"eval.benchmarks=[{{benchmark: medqa, path: {bad}, "
                   f"skip_invalid: true}}, {{benchmark: medqa, path: {bad}, skip_invalid: true}}]"],
          "two sources named 'medqa'")
    assert not list(out.rglob("summary.json"))


# ------------------------------------------------------------------------------ data: one case per rule

def tag(path: Path, benchmark: str, *extra: str) -> list[str]:
    return ["tag", str(path), "--benchmark", benchmark, "--out", str(path.parent / "tags.jsonl"), *extra]


@pytest.mark.parametrize("row, field", [
    ({**MEDQA_ROW, "question": None}, "field 'question': is null"),
    ({**MEDQA_ROW, "question": "  "}, "field 'question': empty question text"),
    ({**MEDQA_ROW, "options": {"A": None, "B": "lung"}}, "field 'options.A': is null"),
    ({**MEDQA_ROW, "answer_idx": True}, "field 'answer_idx': expected text"),
])
def test_null_or_empty_text_is_a_field_error(row, field, tmp_path, capsys):
    path = jsonl(tmp_path / "m.jsonl", [MEDQA_ROW, row])
    fails(capsys, tag(path, "medqa"), f"{path}: line 2: {field}")


def _pubmedqa(tmp_path: Path, records: str) -> Path:
    path = tmp_path / "ori_pqal.json"
    path.write_text(records, encoding="utf-8")
    return path


GOOD_PMID = '"{pmid}": {{"QUESTION": "Does it help?", "CONTEXTS": ["An abstract."], "final_decision": "yes"}}'


@pytest.mark.parametrize("body, where", [
    ('{' + GOOD_PMID.format(pmid=1) + ', "2": {"QUESTION": "", "CONTEXTS": ["x"], "final_decision": "no"}}',
     "record '2': field 'QUESTION': empty question text"),
    ('{' + GOOD_PMID.format(pmid=1) + ', "2": {"QUESTION": "Q?", "final_decision": "no"}}',
     "record '2': field 'CONTEXTS': missing"),
    ('{' + GOOD_PMID.format(pmid=1) + ', "2": {"QUESTION": "Q?", "CONTEXTS": [], "final_decision": "no"}}',
     "record '2': field 'CONTEXTS'"),
    ('{' + GOOD_PMID.format(pmid=1) + ', ' + GOOD_PMID.format(pmid=1) + '}',
     "file: field '1': the key appears twice"),
])
def test_pubmedqa_records(body, where, tmp_path, capsys):
    path = _pubmedqa(tmp_path, body)
    fails(capsys, tag(path, "pubmedqa"), f"{path}: {where}")


def test_pubmedqa_ground_truth_must_cover_the_data(tmp_path, capsys):
    data = _pubmedqa(tmp_path, "{" + GOOD_PMID.format(pmid=1) + ", " + GOOD_PMID.format(pmid=2) + "}")
    truth = tmp_path / "test_ground_truth.json"
    truth.write_text('{"1": "yes", "7": "no"}')
    cfg = [f"eval.benchmarks=[{{benchmark: pubmedqa, path: {data}, ground_truth: {truth}}}]"]
    fails(capsys, ["eval", "tiny", *cfg, "--out", str(tmp_path / "e")], f"{truth}: record '7'",
          "not in ori_pqal.json")
    truth.write_text('{"1": "yes", "1": "no"}')
    fails(capsys, ["eval", "tiny", *cfg, "--out", str(tmp_path / "e")], f"{truth}: file: field '1'", "twice")
    fails(capsys, ["eval", "tiny", f"eval.benchmarks=[{{benchmark: pubmedqa, path: {data}, "
                   f"ground_truth: {tmp_path}}}]", "--out", str(tmp_path / "e")], f"{tmp_path}", "is a folder")


CMB_ROW = {"id": 1, "exam_type": "医师考试", "exam_class": "临床医学", "exam_subject": "内科", "question": "哪个？",
           "option": {"A": "甲", "B": "乙"}, "question_type": "单项选择题"}


def test_cmb_answer_keys(tmp_path, capsys):
    data = jsonl(tmp_path / "cmb.jsonl", [CMB_ROW, {**CMB_ROW, "id": 2, "answer": "A"}])
    key = jsonl(tmp_path / "key.jsonl", [{"id": 1, "answer": "A"}, {"id": 1, "answer": "B"}])
    fails(capsys, tag(data, "cmb", "--answer-file", str(key)), f"{key}: line 2: field 'id'", "twice")
    key = jsonl(tmp_path / "key.jsonl", [{"id": 1, "answer": "A"}, {"id": 2, "answer": "B"}])
    fails(capsys, tag(data, "cmb", "--answer-file", str(key)), f"{data}: line 2: field 'answer'",
          "the answer-key file says 'B'")
    fails(capsys, tag(data, "cmb", "--answer-file", str(tmp_path / "nokey.jsonl")), "nokey.jsonl", "cannot read")
    fails(capsys, tag(data, "cmb", "--answer-file", str(tmp_path)), str(tmp_path), "is a folder")


def _medmcqa(path: Path, cops: list[int]) -> Path:
    return jsonl(path, [{"id": f"q{i}", "question": "Which?", "opa": "a", "opb": "b", "opc": "c", "opd": "d",
                         "cop": c} for i, c in enumerate(cops)])


def test_a_cop_base_that_shifts_answers_fails_even_with_skip_invalid(tmp_path, capsys):
    zero_based = _medmcqa(tmp_path / "dev.jsonl", [0, 1, 2, 3, 1, 0])
    fails(capsys, tag(zero_based, "medmcqa"), f"{zero_based}: line 1: field 'cop'", "needs cop_base: 0")
    # skipping the rows with cop 0 would keep the others, each shifted by one: refused
    fails(capsys, tag(zero_based, "medmcqa", "--skip-invalid"), f"{zero_based}: file: field 'cop'",
          "set the source's cop_base: 0")
    assert main(tag(zero_based, "medmcqa", "--cop-base", "0")) == 0
    capsys.readouterr()
    one_based = _medmcqa(tmp_path / "dev1.jsonl", [1, 2, 3, 4, 4])
    fails(capsys, tag(one_based, "medmcqa", "--cop-base", "0", "--skip-invalid"), "cop_base: 1")
    typo = _medmcqa(tmp_path / "dev2.jsonl", [1, 2, 3, 4, 0])  # 1-based with one bad row: that row is skipped
    assert main(tag(typo, "medmcqa", "--skip-invalid")) == 0
    assert "skipped 1 invalid records" in capsys.readouterr().err


def test_medmcqa_dev_json_is_json_lines_under_a_json_name(tmp_path, capsys):
    path = _medmcqa(tmp_path / "dev.jsonl", [1, 2, 3, 4]).rename(tmp_path / "dev.json")
    assert main(tag(path, "medmcqa")) == 0
    assert len((tmp_path / "tags.jsonl").read_text().splitlines()) == 4


def test_compare_rejects_non_boolean_correct_and_malformed_files(tmp_path, capsys):
    good = jsonl(tmp_path / "a.jsonl", [{"benchmark": "b", "id": "1", "correct": True}])
    bad = jsonl(tmp_path / "b.jsonl", [{"benchmark": "b", "id": "1", "correct": "false"}])
    fails(capsys, ["compare", str(good), str(bad)], f"{bad}: line 1: field 'correct'")
    binary = tmp_path / "c.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    fails(capsys, ["compare", str(good), str(binary)], f"{binary}: not UTF-8")
    array = jsonl(tmp_path / "d.jsonl", [[1, 2]])
    fails(capsys, ["compare", str(good), str(array)], f"{array}: line 1")
    missing = jsonl(tmp_path / "e.jsonl", [{"benchmark": "b", "correct": True}])
    fails(capsys, ["compare", str(good), str(missing)], f"{missing}: line 1: field 'id': missing")
    fails(capsys, ["compare", str(good), str(good), "--resamples", "0"], "--resamples")


# ------------------------------------------------------------------------------ no tracebacks, per format

JSON_FORMATS = {
    "medqa": ("m.jsonl", MEDQA_ROW),
    "medmcqa": ("dev.jsonl", {"id": "x", "question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1}),
    "cmb": ("cmb.jsonl", {**CMB_ROW, "answer": "A"}),
    "gsm8k": ("g.jsonl", {"question": "1+1?", "answer": "2\n#### 2"}),
    "pubmedqa": ("p.jsonl", {"9": {"QUESTION": "Q?", "CONTEXTS": ["c"], "final_decision": "yes"}}),
}


@pytest.mark.parametrize("bench", JSON_FORMATS)
@pytest.mark.parametrize("bad", [[1, 2], "text", 5, None, "{not json"])
def test_rows_that_are_not_objects(bench, bad, tmp_path, capsys):
    name, good = JSON_FORMATS[bench]
    path = jsonl(tmp_path / name, [good, bad if bad == "{not json" else json.dumps(bad)])
    fails(capsys, tag(path, bench), f"{path}: line 2")
    assert main(tag(path, bench, "--skip-invalid")) == 0
    assert "skipped 1 invalid records" in capsys.readouterr().err


CSV_FORMATS = {
    "cmexam": ("cmexam.csv", "Question,Options,Answer,Explanation\n{q},A 甲\\nB 乙,A,{e}\n"),
    "cmmlu": ("anatomy.csv", ",Question,A,B,C,D,Answer\n0,{q},a,b,c,d,A\n"),
    "mmlu": ("anatomy_test.csv", "{q},a,b,c,d,A\n"),
}


@pytest.mark.parametrize("bench", CSV_FORMATS)
def test_csv_formats_skip_wrong_column_counts_and_read_long_fields(bench, tmp_path, capsys):
    name, template = CSV_FORMATS[bench]
    long_text = "长" * 200_000  # beyond the csv module's default 128 KiB field limit
    text = template.format(q="问题？", e=long_text) + ("x,y\n" if bench != "mmlu" else "x,y\n")
    if bench == "cmexam":
        text = template.format(q="问题？", e=long_text) + "only,two\n"
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    fails(capsys, tag(path, bench), f"{path}: line")
    assert main(tag(path, bench, "--skip-invalid")) == 0
    path.write_text(template.format(q="长问题" + long_text, e="e"), encoding="utf-8")
    assert main(tag(path, bench)) == 0


def test_a_folder_entry_that_is_a_folder_is_passed_over(tmp_path, capsys):
    (tmp_path / "data" / "trap.jsonl").mkdir(parents=True)
    jsonl(tmp_path / "data" / "real.jsonl", [MEDQA_ROW])
    assert main(["tag", str(tmp_path / "data"), "--benchmark", "medqa", "--out", str(tmp_path / "t.jsonl")]) == 0


def test_paths_that_are_missing_or_of_the_wrong_kind(tmp_path, capsys, sentinel):
    fails(capsys, ["run", str(tmp_path)], "is a folder")  # a config path that is a folder
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    fails(capsys, ["eval", "tiny", "--out", str(a_file)], "is a file, not a folder")
    fails(capsys, ["run", "quickstart", f"output_dir={a_file}", "methods=[]"], "config key 'output_dir'")
    fails(capsys, ["report", str(tmp_path), "--out", str(a_file)], "is a file, not a folder")
    fails(capsys, ["tag", str(tmp_path / "nope.jsonl"), "--benchmark", "medqa"], "nope.jsonl", "no such file")
    fails(capsys, ["eval", "tiny", "eval.benchmarks=[{benchmark: medqa, hub: true}]", "model.name=tiny",
                   "eval.benchmarks.0.benchmark=nope"], "config key 'eval.benchmarks.0.benchmark'")


def test_a_truncated_results_file_in_report(tmp_path, capsys):
    run = tmp_path / "root" / "m"
    (run / "eval").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"method": "lora", "trainable_params": 1}))
    (run / "eval" / "results.json").write_text('{"benchmarks": {"x": ')
    fails(capsys, ["report", str(tmp_path / "root")], f"{run / 'eval' / 'results.json'}: not valid JSON")


@pytest.mark.parametrize("body", ['{"benchmarks": {"x": {"accuracy": NaN}}, "macro_accuracy": 0.5}',
                                  '{"benchmarks": {"x": {"accuracy": 0.5}}, "macro_accuracy": NaN}',
                                  '{"benchmarks": {"x": {"accuracy": 50.0}}, "macro_accuracy": 0.5}'])
def test_a_results_file_with_impossible_numbers_in_report(tmp_path, capsys, body):
    """Python's json reads NaN: a hand-edited or foreign results.json with a NaN or a
    percentage accuracy is refused, not averaged into a table."""
    run = tmp_path / "root" / "m"
    (run / "eval").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"method": "lora", "trainable_params": 1, "steps": 1,
                                                  "train_time_s": 1.0}))
    (run / "eval" / "results.json").write_text(body)
    fails(capsys, ["report", str(tmp_path / "root")], f"{run / 'eval' / 'results.json'}: field '")


def test_compare_rejects_predictions_whose_correct_contradicts_pred_and_gold(tmp_path, capsys):
    rows = [{"benchmark": "b", "id": str(i), "pred": p, "gold": "A", "correct": p == "A"}
            for i, p in enumerate(["A", "B", "A", None])]
    good = jsonl(tmp_path / "a.jsonl", rows)
    edited = jsonl(tmp_path / "b.jsonl", rows[:2] + [{**rows[2], "correct": False}] + rows[3:])
    fails(capsys, ["compare", str(good), str(edited)], f"{edited}: line 3: field 'correct'", "'A'")
    unparsed = jsonl(tmp_path / "c.jsonl", rows[:3] + [{**rows[3], "correct": True}])  # no answer scored right
    fails(capsys, ["compare", str(good), str(unparsed)], f"{unparsed}: line 4: field 'correct'")


def test_a_truncated_checkpoint_names_the_file(tmp_path, capsys):
    args = _interrupted_run(tmp_path)
    weights = tmp_path / "run" / "checkpoints" / "step-0000002" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    fails(capsys, args + ["--resume"], f"{weights}: cannot resume from this checkpoint")


def test_disk_full_and_an_unwritable_output_are_one_line_and_keep_old_files(tmp_path, capsys, monkeypatch, sentinel):
    import medpeft.io

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(medpeft.io.os, "fsync", full)
    fails(capsys, ["eval", "tiny", "--out", str(sentinel.parent)], "No space left on device")
    monkeypatch.undo()
    a_file = tmp_path / "plain"
    a_file.write_text("x")
    fails(capsys, ["eval", "tiny", "--out", str(a_file / "sub")], str(a_file))


def test_an_unknown_architecture_offline_is_one_line_at_once(capsys):
    start = time.monotonic()
    fails(capsys, ["params", "--arch", "no-such-org/no-such-model"], "architecture 'no-such-org/no-such-model'")
    assert time.monotonic() - start < 15


def test_tag_out_dash_writes_to_standard_output(tmp_path, capsys):
    path = jsonl(tmp_path / "m.jsonl", [MEDQA_ROW])
    assert main(["tag", str(path), "--benchmark", "medqa", "--out", "-"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 1 and rows[0]["id"] == "medqa/m#1" and not (tmp_path / "-").exists()


# ------------------------------------------------------------------------------ found by an adversarial pass

def test_a_failed_force_resume_keeps_the_run_config_and_a_fresh_start_clears_old_checkpoints(tmp_path, capsys):
    args = _interrupted_run(tmp_path)
    config = (tmp_path / "run" / "config.yaml").read_text()
    fails(capsys, args + ["method={name: dora}", "--resume", "--force-resume"], "cannot resume from this checkpoint")
    assert (tmp_path / "run" / "config.yaml").read_text() == config  # the run's record is intact
    (tmp_path / "run" / "config.yaml").unlink()
    fails(capsys, args + ["--resume"], "config.yaml: missing")
    (tmp_path / "run" / "config.yaml").write_text(config)
    assert main(args + ["train.steps=1"]) == 0  # a fresh start (no --resume) drops the old checkpoints
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_refuses_changed_training_data_and_tampered_counters(tmp_path, capsys):
    import shutil

    data = tmp_path / "train.json"
    shutil.copy(Path(__file__).resolve().parents[1] / "src/medpeft/data/examples/cmb_train.json", data)
    args = _interrupted_run(tmp_path, f"data.train=[{{benchmark: cmb, path: {data}}}]")
    records = json.loads(data.read_text())
    data.write_text(json.dumps(records[:-3], ensure_ascii=False))  # the data changed under the run
    fails(capsys, args + ["--resume"], "state.json", "training data differ")
    data.write_text(json.dumps(records, ensure_ascii=False))
    state = tmp_path / "run" / "checkpoints" / "step-0000002" / "state.json"
    original = json.loads(state.read_text())
    for tampered in ({**original, "step": 99999}, {**original, "step": "abc"}, {k: v for k, v in original.items()
                                                                               if k != "tokens"}):
        state.write_text(json.dumps(tampered))
        fails(capsys, args + ["--resume"], f"{state}: cannot resume")


def test_a_finished_run_is_not_reused_after_its_data_files_change(tmp_path, capsys):
    """``run --resume`` (and so a suite) reuses a finished run only while its training files are
    the ones it was trained on (refused otherwise, the run untouched), and its evaluation only
    while the evaluation files are unchanged (scored again otherwise)."""
    import shutil

    examples = Path(__file__).resolve().parents[1] / "src/medpeft/data/examples"
    train, dev = tmp_path / "train.json", tmp_path / "dev.jsonl"
    shutil.copy(examples / "cmb_train.json", train)
    shutil.copy(examples / "medqa_dev.jsonl", dev)
    run = tmp_path / "run"
    args = ["run", "quickstart", f"output_dir={run}", "methods=[]", "train.steps=1", "data.max_length=128",
            f"data.train=[{{benchmark: cmb, path: {train}}}]", f"eval.benchmarks=[{{benchmark: medqa, path: {dev}}}]"]
    assert main(args) == 0
    first = json.loads((run / "eval" / "results.json").read_text())
    assert first["benchmarks"]["medqa"]["n"] == len(dev.read_text().splitlines())

    lines = dev.read_text().splitlines()
    dev.write_text("\n".join(lines[:4]) + "\n")  # fewer evaluation items: scored again on resume
    assert main(args + ["--resume"]) == 0
    assert json.loads((run / "eval" / "results.json").read_text())["benchmarks"]["medqa"]["n"] == 4

    adapter = {f: f.read_bytes() for f in run.rglob("*.safetensors")}
    original = train.read_bytes()
    train.write_text(json.dumps(json.loads(original)[:10], ensure_ascii=False))  # other training data: refused
    capsys.readouterr()
    fails(capsys, args + ["--resume"], str(run), "trained on other data", str(train))
    assert {f: f.read_bytes() for f in run.rglob("*.safetensors")} == adapter
    train.write_bytes(original)  # the same file again: reused, and said so
    assert main(args + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "reused run (" in err and "trained run (" not in err, err


def test_report_refuses_runs_scored_on_different_sets(tmp_path, capsys):
    """Two finished runs, one re-evaluated on fewer sets: one line naming that run and the
    missing set (no traceback, no Avg. over unlike sets), and nothing written."""
    import shutil

    root = tmp_path / "runs"
    a = root / "a"
    assert main(["run", "quickstart", f"output_dir={a}", "methods=[]", "train.steps=1", "data.max_length=128"]) == 0
    shutil.copytree(a, root / "b")
    sets = json.loads((a / "eval" / "results.json").read_text())["benchmarks"]
    assert len(sets) >= 2
    results = root / "b" / "eval" / "results.json"
    data = json.loads(results.read_text())
    dropped = sorted(sets)[-1]
    del data["benchmarks"][dropped]
    results.write_text(json.dumps(data))
    capsys.readouterr()
    fails(capsys, ["report", str(root)], str(root / "b"), f"not evaluated on {dropped}")
    assert not (root / "report" / "report.md").exists()


def test_a_diverged_run_stops_instead_of_reporting_results(tmp_path, capsys):
    fails(capsys, ["run", "quickstart", f"output_dir={tmp_path / 'r'}", "methods=[]", "train.lr=1e30",
                   "train.warmup_steps=0", "train.steps=4", "train.log_every=1", "data.max_length=128"],
          "the run diverged")
    assert not (tmp_path / "r" / "eval").exists()


def test_a_peft_setting_added_to_adapter_config_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "quickstart", f"output_dir={run}", "methods=[]", "train.steps=1",
                 "data.max_length=128"]) == 0
    peft_config = run / "adapter" / "adapter_config.json"
    peft_config.write_text(json.dumps({**json.loads(peft_config.read_text()), "use_rslora": True}))
    fails(capsys, ["eval", str(run), "--out", str(tmp_path / "e")], "adapter_config.json", "use_rslora")
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("row, where", [
    ({**MEDQA_ROW, "options": {"A": "x", "a": "y"}}, "field 'options.a': option A appears twice"),
    ({**MEDQA_ROW, "options": {"A": "x", "ZZ": "y"}}, "field 'options.ZZ': an option key must be one letter"),
    ({**MEDQA_ROW, "options": {"A": "x", "甲": "y"}}, "an option key must be one letter"),
    (json.dumps({**MEDQA_ROW, "id": "\ud800x"}), "field 'id': contains an unpaired surrogate"),  # an escape
    ('{"question": "Q?", "options": {"A": "a", "B": "b"}, "answer_idx": "A", "n": ' + "9" * 5000 + "}",
     "unreadable JSON value"),
    ("[" * 100_000 + "]" * 100_000, "unreadable JSON value"),
])
def test_more_malformed_medqa_rows(row, where, tmp_path, capsys):
    path = jsonl(tmp_path / "m.jsonl", [MEDQA_ROW, row])
    fails(capsys, tag(path, "medqa"), f"{path}: line 2", where)


def test_more_malformed_rows_of_other_formats(tmp_path, capsys):
    mm = jsonl(tmp_path / "dev.jsonl", [{"id": "1", "question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d",
                                         "cop": "²"}])
    fails(capsys, tag(mm, "medmcqa"), f"{mm}: line 1: field 'cop'")
    mmlu = jsonl(tmp_path / "anatomy_test.jsonl", [["Q?", "a", None, "c", "d", "A"]])
    fails(capsys, tag(mmlu, "mmlu"), f"{mmlu}: line 1: field 'column 3': is null")
    cmmlu = tmp_path / "anatomy.csv"
    cmmlu.write_text(",Question,A,B,C,D,Answer,Answer\n0,Q?,a,b,c,d,A,B\n", encoding="utf-8")
    fails(capsys, tag(cmmlu, "cmmlu"), f"{cmmlu}: line 1: field 'Answer': the column name appears twice")
    pq = _pubmedqa(tmp_path, '{"7": {"QUESTION": "Q?", "CONTEXTS": ["c"], "final_decision": "yes", "__key__": "9"}}')
    assert main(tag(pq, "pubmedqa")) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "tags.jsonl").read_text().splitlines()[0])["id"] == "pubmedqa/7"
    empty = tmp_path / "cmb.json"
    empty.write_text("")
    fails(capsys, tag(empty, "cmb"), f"{empty}: file: no records (empty file)")


def test_answer_keys_and_ground_truths_that_say_nothing(tmp_path, capsys):
    data = jsonl(tmp_path / "cmb.jsonl", [CMB_ROW])
    for key_rows in ([], [{"id": 1, "answer": None}]):
        key = jsonl(tmp_path / "key.jsonl", key_rows)
        fails(capsys, tag(data, "cmb", "--answer-file", str(key)), str(key))
    pq = _pubmedqa(tmp_path, "{" + GOOD_PMID.format(pmid=1) + "}")
    truth = tmp_path / "gt.json"
    truth.write_text("{}")
    fails(capsys, ["eval", "tiny", f"eval.benchmarks=[{{benchmark: pubmedqa, path: {pq}, ground_truth: {truth}}}]",
                   "--out", str(tmp_path / "e")], f"{truth}: file: no PMIDs")
    fails(capsys, ["eval", "tiny", f"eval.benchmarks=[{{benchmark: medqa, path: {data}, ground_truth: {truth}}}]",
                   "--out", str(tmp_path / "e")], "field 'ground_truth': is read for pubmedqa only")


def test_gsm8k_gold_numbers_are_normalised_like_predictions(tmp_path):
    from medpeft.data import load_benchmark
    from medpeft.evaluate import parse_number

    path = jsonl(tmp_path / "g.jsonl", [{"question": f"Q{i}?", "answer": f"work\n#### {gold}"}
                                        for i, gold in enumerate(["007", "-0.50", "5.00", "1,000"])])
    golds = [r.reference for r in load_benchmark("gsm8k", path).records]
    assert golds == [parse_number(f"The answer is {x}") for x in ("7", "-0.5", "5", "1000")] == ["7", "-0.5", "5", "1000"]


@pytest.mark.parametrize("override, key", [
    ("methods=[lora-r16, lora-r16]", "methods"), ("seeds=[0, 0]", "seeds"),
    ("train.seed=99999999999999999999", "train.seed"), ("grid={method.r: [8]}", "grid.method.r"),
    ("grid={output_dir: [a]}", "grid.output_dir"), ("model.device=meta", "model.device"),
    ("eval.perturb_rates=[0.5]", "eval.perturb_seeds"),
])
def test_more_config_values(override, key, tmp_path, capsys):
    extra = ["eval.perturb_seeds=[]"] if key == "eval.perturb_seeds" else []
    fails(capsys, ["run", "quickstart", f"output_dir={tmp_path / 'r'}", override, *extra], f"config key '{key}'")


def test_config_files_that_are_not_utf8_or_repeat_a_key(tmp_path, capsys):
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfetrain: 1")
    fails(capsys, ["run", str(binary)], f"{binary}: not UTF-8")
    repeated = tmp_path / "r.yaml"
    repeated.write_text("train:\n  steps: 3\n  steps: 4\n")
    fails(capsys, ["run", str(repeated)], f"{repeated}: not valid YAML", "'steps' appears twice")


def test_result_files_of_the_wrong_shape_and_compare_limits(tmp_path, capsys):
    run = tmp_path / "root" / "m"
    (run / "eval").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"method": "lora", "trainable_params": "many"}))
    (run / "eval" / "results.json").write_text(json.dumps({"benchmarks": {}, "macro_accuracy": 0.5}))
    fails(capsys, ["report", str(tmp_path / "root")], f"{run / 'summary.json'}: field 'trainable_params'")
    good = jsonl(tmp_path / "a.jsonl", [{"benchmark": "b", "id": "1", "correct": True}])
    fails(capsys, ["compare", str(good), str(good), "--seed", "-1"], "--seed")
    fails(capsys, ["compare", str(good), str(good), "--resamples", "1000000000000"], "--resamples")
    fails(capsys, ["compare", str(good), str(good), "--out", str(good)], "is one of the prediction files")
    fails(capsys, ["tag", str(good), "--benchmark", "medqa", "--out", str(good)], "is the input file")


def test_architectures_and_audits_that_cannot_work(tmp_path, capsys):
    not_a_config = jsonl(tmp_path / "rows.jsonl", [MEDQA_ROW, MEDQA_ROW])
    fails(capsys, ["params", "--arch", str(not_a_config)], f"{not_a_config}: not a usable model config")
    run = tmp_path / "birg"
    assert main(["train", "quickstart", f"output_dir={run}", "methods=[]", "method={preset: birg}", "train.steps=1",
                 "data.max_length=128"]) == 0
    gsm = jsonl(tmp_path / "g.jsonl", [{"question": "1+1?", "answer": "#### 2"}])
    fails(capsys, ["audit", str(run), "--data", f"gsm8k={gsm}"], "no multiple-choice questions")
    fails(capsys, ["eval", str(run), "eval.perturb_rates=[0.5]", "eval.perturb_seeds=[]", "--out", str(tmp_path / "e")],
          "config key 'eval.perturb_seeds'")


def test_an_adapter_is_not_scored_on_another_base_model(tmp_path, capsys):
    """``eval RUN model.name=OTHER`` is refused before loading (naming the key and the model the
    run was trained on); the same local model folder moved is accepted (equal revision), and
    the folder's model changed since training is refused once loaded -- results untouched."""
    import shutil

    from medpeft.models import TINY, load_model

    base = tmp_path / "base"
    loaded = load_model(TINY)
    loaded.model.save_pretrained(base)
    loaded.tokenizer.save_pretrained(base)
    run = tmp_path / "run"
    assert main(["run", "quickstart", f"output_dir={run}", f"model.name={base}", "methods=[]", "train.steps=1",
                 "data.max_length=128"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["base_model"] == str(base) and summary["base_model_revision"].startswith("local:")
    capsys.readouterr()
    fails(capsys, ["eval", str(run), "model.name=tiny"], "config key 'model.name'", str(base))

    moved = tmp_path / "moved"
    shutil.move(base, moved)
    assert main(["eval", str(run), f"model.name={moved}", "--out", str(tmp_path / "moved-eval")]) == 0
    shutil.move(moved, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))  # the model changed in place
    capsys.readouterr()
    fails(capsys, ["eval", str(run)], str(run / "summary.json"), "changed since the run was trained")
    fails(capsys, ["eval", str(run), f"model.name={moved}"], "config key 'model.name'")  # gone: not the same model


def test_eval_out_inside_another_run_is_refused(tmp_path, capsys):
    """``eval A --out B/eval`` (B another run) and a base-model ``eval --out`` inside a run would
    overwrite that run's results: one line naming it, nothing written; A's own folder is fine."""
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", "quickstart", f"output_dir={a}", "methods=[]", "train.steps=1", "data.max_length=128"]) == 0
    shutil.copytree(a, b)
    capsys.readouterr()
    fails(capsys, ["eval", str(a), "--out", str(b / "eval")], "--out", str(b.resolve()), "overwrite")
    fails(capsys, ["eval", "tiny", "--out", str(b / "base-eval")], str(b.resolve()))
    fails(capsys, ["audit", str(a), "--out", str(b)], str(b.resolve()))
    assert main(["eval", str(a), "--out", str(a / "eval-again")]) == 0
    assert (a / "eval-again" / "results.json").is_file()


def test_tag_reads_the_encoding_and_ground_truth_its_errors_point_to(tmp_path, capsys):
    """The undecodable-file message tells ``medpeft tag`` users to pass --encoding, which exists
    and reads the file; --ground-truth selects and labels PubMedQA's test PMIDs as in a config."""
    f = tmp_path / "gbk.csv"
    f.write_bytes("Question,Options,Answer\n".encode() + "问题,A 甲\\nB 乙,A\n".encode("gbk"))
    fails(capsys, tag(f, "cmexam"), f"{f}: line 2", "--encoding")
    assert main(tag(f, "cmexam", "--encoding", "gbk")) == 0
    assert len((tmp_path / "tags.jsonl").read_text().splitlines()) == 1
    data = _pubmedqa(tmp_path, "{" + GOOD_PMID.format(pmid=1) + ", " + GOOD_PMID.format(pmid=2) + "}")
    truth = tmp_path / "test_ground_truth.json"
    truth.write_text(json.dumps({"2": json.loads("{" + GOOD_PMID.format(pmid=2) + "}")["2"]["final_decision"]}))
    assert main(tag(data, "pubmedqa", "--ground-truth", str(truth))) == 0
    assert [json.loads(r)["id"] for r in (tmp_path / "tags.jsonl").read_text().splitlines()] == ["pubmedqa/2"]
