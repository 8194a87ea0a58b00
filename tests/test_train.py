"""Training on the tiny model: loss reference, resume exactness, save/load round trips, CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medpeft.cli import main
from medpeft.config import load_config
from medpeft.dataset import load_eval_sets, load_train_set
from medpeft.io import atomic_open, write_json
from medpeft.models import load_model
from medpeft.prompts import PromptFormatter
from medpeft.train import IGNORE, answer_loss_sum, collate, micro_batches, step_indices, train


def small_cfg(tmp_path: Path, *overrides: str):
    return load_config("quickstart", [f"output_dir={tmp_path / 'run'}", "train.steps=6", "train.save_every=3",
                                      "train.log_every=1", "data.max_length=256", *overrides])


def test_answer_loss_equals_hf_reference_loss():
    loaded = load_model("tiny", device="cpu")
    cfg = load_config("quickstart")
    items = load_train_set(cfg)[:3]
    fmt = PromptFormatter(loaded.tokenizer, 256)
    batch = collate([fmt.encode_train(t.record) for t in items], [t.tags for t in items], loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        ours = answer_loss_sum(loaded.model, batch)
        ref = loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    n_targets = int((batch.labels[:, 1:] != IGNORE).sum())
    assert n_targets == batch.n_answer_tokens == sum(len(t.record.answer_text) + 1 for t in items)
    assert float(ours) == pytest.approx(float(ref) * n_targets, rel=1e-5)


def test_data_order_is_a_function_of_seed_and_step():
    assert step_indices(10, 4, 0, 2) == step_indices(10, 4, 0, 2)
    epoch0 = step_indices(10, 5, 0, 0) + step_indices(10, 5, 0, 1)
    assert sorted(epoch0) == list(range(10))  # one epoch covers every example once
    assert step_indices(10, 4, 0, 0) != step_indices(10, 4, 1, 0)
    chunks = micro_batches([5, 1, 3, 0], [9, 1, 2, 8, 0, 7], 2)
    assert chunks == [[1, 5], [3, 0]]  # lengths 1, 7 | 8, 9


def _adapter_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_resume_equals_uninterrupted(tmp_path):
    cfg_a = small_cfg(tmp_path / "a")
    train_set = load_train_set(cfg_a)
    train(cfg_a, load_model("tiny", device="cpu"), train_set)

    cfg_b = small_cfg(tmp_path / "b")

    class Killed(Exception):
        pass

    def kill_at_4(step):
        if step == 4:
            raise Killed

    with pytest.raises(Killed):
        train(cfg_b, load_model("tiny", device="cpu"), train_set, on_step=kill_at_4)
    run_b = Path(cfg_b.output_dir)
    assert not (run_b / "adapter").exists() and (run_b / "checkpoints" / "step-0000003" / "state.json").exists()
    summary = train(cfg_b, load_model("tiny", device="cpu"), train_set, resume=True).summary
    assert summary["resumed_from_step"] == 3

    wa, wb = _adapter_weights(Path(cfg_a.output_dir)), _adapter_weights(run_b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    la = [json.loads(l) for l in (Path(cfg_a.output_dir) / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (run_b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], abs=1e-6)
    assert not (run_b / "checkpoints").exists()


def test_a_checkpoint_of_the_older_training_step_is_not_resumed_silently(tmp_path):
    """A checkpoint without ``step_version`` (an older medpeft: RNG and queue updates per
    micro-batch) is refused by --resume; --force-resume continues and records it."""
    from medpeft.errors import MedpeftError

    cfg = small_cfg(tmp_path)
    train_set = load_train_set(cfg)

    def kill_at_4(step):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, load_model("tiny", device="cpu"), train_set, on_step=kill_at_4)
    state_file = Path(cfg.output_dir) / "checkpoints" / "step-0000003" / "state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("step_version") == 2
    write_json(state_file, state)
    with pytest.raises(MedpeftError, match="written by an older medpeft whose training step differed"):
        train(cfg, load_model("tiny", device="cpu"), train_set, resume=True)
    summary = train(cfg, load_model("tiny", device="cpu"), train_set, resume=True, force_resume=True).summary
    assert summary["resumed_from_step"] == 3 and "training step version" in summary["resumed_with_changes"]


def test_lora_adapter_loads_with_peft_and_gives_the_same_outputs(tmp_path):
    from peft import PeftModel

    cfg = small_cfg(tmp_path, "train.steps=3", "train.lr=0.05")
    loaded = load_model("tiny", device="cpu")
    result = train(cfg, loaded, load_train_set(cfg))
    trained = result.model.eval()
    assert result.summary["trainable_params"] == 2 * 16 * (  # r=16 on q,k,v,o,gate,up,down of 2 layers
        (64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + (64 + 128) + (64 + 128) + (128 + 64))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    reloaded = PeftModel.from_pretrained(load_model("tiny", device="cpu").model, str(Path(cfg.output_dir) / "adapter"))
    base = load_model("tiny", device="cpu").model
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits)
        assert not torch.allclose(base(input_ids=ids).logits, trained(input_ids=ids).logits)
    summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    assert summary["tokens"] > 0 and summary["method"] == "lora" and (Path(cfg.output_dir) / "tb").is_dir()


@pytest.mark.parametrize("method", ["dora", "full"])
def test_dora_and_full_round_trip_through_eval(tmp_path, method):
    from medpeft.adapters import load_trained

    # a whole-section override replaces the quickstart's LoRA keys, which 'full' does not take
    cfg = small_cfg(tmp_path, f"method={{name: {method}, r: 8, alpha: 16}}" if method == "dora" else "method={name: full}",
                    "train.steps=2", "train.lr=0.01")
    result = train(cfg, load_model("tiny", device="cpu"), load_train_set(cfg))
    trained = result.model.eval()
    reloaded = load_trained(load_model("tiny", device="cpu").model, Path(cfg.output_dir))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits)
    base_params = sum(p.numel() for p in load_model("tiny", device="cpu").model.parameters())
    if method == "full":
        assert result.summary["trainable_params"] == base_params
    else:
        assert 0 < result.summary["trainable_params"] < base_params


def test_training_lowers_the_loss(tmp_path):
    cfg = small_cfg(tmp_path, "train.steps=40", "train.save_every=0", "train.lr=5e-3")
    train(cfg, load_model("tiny", device="cpu"), load_train_set(cfg))
    rows = [json.loads(l) for l in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.6 * first


def test_finished_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "quickstart", f"output_dir={out}", "methods=[]", "train.steps=1", "data.max_length=128"]
    assert main(args) == 0
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert main(args) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_run_then_eval_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "quickstart", f"output_dir={out}", "methods=[]", "train.steps=4", "data.max_length=256"]) == 0
    printed = capsys.readouterr().out
    assert "| run | cmexam-examples (n) |" in printed
    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results["benchmarks"]) == {"cmexam-examples", "medqa-examples", "medmcqa-examples"}
    for v in results["benchmarks"].values():
        assert {"n", "accuracy", "wilson_low", "wilson_high"} <= set(v) and v["wilson_low"] <= v["accuracy"] <= v["wilson_high"]
    assert results["macro_accuracy"] == pytest.approx(sum(v["accuracy"] for v in results["benchmarks"].values()) / 3)
    preds = [json.loads(l) for l in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 28
    assert set(preds[0]) >= {"id", "benchmark", "pred", "gold", "correct", "specialty", "operation", "scores"}
    assert all(p["correct"] == (p["pred"] == p["gold"]) for p in preds)
    # re-evaluating the run folder gives the same predictions
    assert main(["eval", str(out), "--out", str(tmp_path / "again")]) == 0
    again = [json.loads(l) for l in (tmp_path / "again" / "predictions.jsonl").read_text().splitlines()]
    assert [p["pred"] for p in again] == [p["pred"] for p in preds]
    # a bare base model
    assert main(["eval", "tiny", f"output_dir={tmp_path / 'base'}", "data.max_length=256"]) == 0
    base = json.loads((tmp_path / "base" / "eval-base" / "results.json").read_text())
    assert base["method"] == "base" and base["benchmarks"]["medqa-examples"]["n"] == 10


def test_train_excludes_named_eval_sets(tmp_path):
    ex = Path(__file__).resolve().parents[1] / "src/medpeft/data/examples/cmb_train.json"
    cfg = load_config("quickstart", [f"eval.benchmarks=[{{benchmark: cmb, name: cmb-dev, path: {ex}, limit: 5}}]",
                                     "data.train.0.exclude=[cmb-dev]"])
    eval_sets = load_eval_sets(cfg.eval.benchmarks)
    train_set = load_train_set(cfg, eval_sets)
    assert len(train_set) == 25
    assert not {t.record.id for t in train_set} & {t.record.id for t in eval_sets["cmb-dev"]}


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "results.json"
    write_json(target, {"ok": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(target) as fh:
            fh.write('{"half": ')
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_skip_invalid_flag_reaches_every_source(tmp_path, capsys, caplog):
    bad = tmp_path / "medqa.jsonl"
    good = {"question": "Q?", "options": {"A": "a", "B": "b"}, "answer_idx": "A"}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "answer_idx": "C"}) + "\n")
    args = ["eval", "tiny", f"eval.benchmarks=[{{benchmark: medqa, path: {bad}}}]", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert f"{bad}: line 2: field 'answer_idx'" in capsys.readouterr().err
    assert main(args + ["--skip-invalid"]) == 0
    assert "medqa: skipped 1 invalid records: 1 x answer_idx: answer 'C' is not among the options AB" in caplog.text
    assert json.loads((tmp_path / "o" / "results.json").read_text())["benchmarks"]["medqa"]["n"] == 1


def test_quickstart_trains_lora_and_birg_side_by_side(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["run", "quickstart", f"output_dir={out}", "train.steps=3", "data.max_length=256"]) == 0
    printed = capsys.readouterr().out
    assert "| lora-r16 |" in printed and "| birg |" in printed
    both = json.loads((out / "results.json").read_text())
    assert set(both) == {"lora-r16", "birg"}
    for name in both:
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["steps"] == 3 and summary["train_examples"] == 30  # the same budget and data
    assert json.loads((out / "birg" / "summary.json").read_text())["method"] == "birg"
    assert (out / "lora-r16" / "adapter" / "adapter_config.json").exists()
    assert (out / "birg" / "adapter" / "adapter.safetensors").exists()
