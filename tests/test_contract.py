"""The method contract: every preset of the catalogue, on the tiny model, keeps the promises the
pipeline relies on. Parametrized over ``catalogue()``, so a preset or family registered later
(tests/example_family.py is one) is covered without editing this file.

1. a fresh adapter leaves the base model's logits unchanged (unless its family says otherwise);
2. one backward pass: gradients on exactly the adapter's parameters, none on base weights;
3. save -> load gives bit-identical logits; a wrong-shaped base or tampered files: one line naming the file;
4. ``medpeft params`` on tiny = the built model's trainable count; active <= trainable;
5. the auxiliary losses reported are exactly those of non-zero weight, finite, logged with the weights used;
6. compiled == eager (loss and gradients), no graph break;
7. bf16 base: adapter weights stay fp32 and one optimizer step moves them;
8. batched scoring == one at a time; the gold answer changes no routing value; generation == teacher forcing;
9. the declaration "reads tags" is true: perturbing tags changes the logits exactly when declared;
10. routed presets produce an audit; a config written and read back is equal.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from medpeft.adapters import (apply_method, catalogue, family_of, load_trained, preset_config, save_trained,
                              set_routing)
from medpeft.adapters.accounting import count_method
from medpeft.adapters.routing import routing_state
from medpeft.config import dump_config, load_config
from medpeft.dataset import load_train_set
from medpeft.errors import MedpeftError
from medpeft.evaluate import Evaluator
from medpeft.models import load_model, tiny_config
from medpeft.prompts import PromptFormatter
from medpeft.train import (accumulate_gradients, build_optimizer, collate, compile_decoder_layers, train,
                           training_step, uncompile)

PRESETS = catalogue()
QUICKSTART_ITEMS = load_train_set(load_config("quickstart"))


# Runs of presets that read other cells (a router's library) are folders of one suite here,
# next to those cells, which are built once: the cell's preset, weights randomized, saved.
SUITE = Path(tempfile.mkdtemp(prefix="medpeft-contract-"))
atexit.register(shutil.rmtree, SUITE, True)


def dependency_cells(name: str) -> None:
    method = preset_config(name)
    for cell in family_of(method).depends_on(method):
        if not (SUITE / cell / "adapter").is_dir():
            dependency_cells(cell)
            loaded = load_model("tiny", device="cpu")
            torch.manual_seed(3)
            model = apply_method(loaded.model, preset_config(cell))
            randomize(model, seed=3, std=0.2)
            save_trained(model, preset_config(cell), SUITE / cell)


def deterministic(name: str):
    """The preset's config without dropout, so that two forward passes can be compared, as a run
    of the contract's suite builds it (the cells it reads located, MethodFamily.resolve)."""
    method = preset_config(name)
    method = dataclasses.replace(method, dropout=0.0) if hasattr(method, "dropout") else method
    dependency_cells(name)
    return family_of(method).resolve(method, SUITE / name)


def build(name: str, dtype: str = "fp32"):
    loaded = load_model("tiny", device="cpu", dtype=dtype)
    method = deterministic(name)
    torch.manual_seed(0)
    return loaded, apply_method(loaded.model, method), method


def randomize(model: torch.nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Move every trainable weight off its initial value (B != 0, tag tables != 0, ...)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def batch_of(loaded, items, answer_shift: int = 0):
    fmt = PromptFormatter(loaded.tokenizer, 256)
    batch = collate([fmt.encode_train(t.record) for t in items], [t.tags for t in items], loaded.tokenizer.pad_token_id)
    if answer_shift:
        batch.input_ids[~batch.prompt_mask & batch.attention_mask.bool()] += answer_shift
    return batch


def logits(model, batch, specialty=None, operation=None) -> torch.Tensor:
    set_routing(model, batch.prompt_mask, batch.specialty if specialty is None else specialty,
                batch.operation if operation is None else operation)
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------ 1, 2, 4

@pytest.mark.parametrize("name", PRESETS)
def test_fresh_adapter_leaves_the_base_model_unchanged(name):
    loaded, model, method = build(name)
    model.eval()
    batch = batch_of(loaded, QUICKSTART_ITEMS[:4])
    base = load_model("tiny", device="cpu").model.eval()
    with torch.no_grad():
        expected = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    got = logits(model, batch)
    if family_of(method).identity_at_init(method):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:  # the family's documented exception must be true too
        assert not torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", PRESETS)
def test_gradients_reach_exactly_the_adapter(name):
    loaded = load_model("tiny", device="cpu")
    base_params = {id(p): n for n, p in loaded.model.named_parameters()}
    method = deterministic(name)
    torch.manual_seed(0)
    model = apply_method(loaded.model, method)
    if not family_of(method).trains_with_loop(method):  # no answer-loss loop: what it fits (if anything) is its own
        assert all(id(p) not in base_params for p in trainable(model).values())
        assert bool(trainable(model)) != family_of(method).training_free(method)  # training-free: nothing at all
        return
    randomize(model)
    model.train()
    accumulate_gradients(model, method, [batch_of(loaded, QUICKSTART_ITEMS[:2]), batch_of(loaded, QUICKSTART_ITEMS[2:4])],
                         batch_size=4)
    params = dict(model.named_parameters())
    if family_of(method).trains_base_weights:
        assert {id(p) for p in params.values()} == set(base_params)
        assert all(p.requires_grad and p.grad is not None for p in params.values())
        return
    added = {n for n, p in params.items() if id(p) not in base_params}
    assert added and set(trainable(model)) == added  # trainable = exactly what the adapter added
    assert all(params[n].grad is not None for n in added), [n for n in added if params[n].grad is None][:3]
    assert sum(float(params[n].grad.abs().sum()) for n in added) > 0
    frozen = [p for p in params.values() if id(p) in base_params]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)


@pytest.mark.parametrize("name", PRESETS)
def test_params_command_counts_the_built_model(name):
    _, model, method = build(name)
    count = count_method("tiny", name, method)
    free = family_of(method).training_free(method)
    assert count.trainable_params == sum(p.numel() for p in trainable(model).values()) > (-1 if free else 0)
    if free:
        assert count.trainable_params == 0 and count.active_rank >= 0
        return
    assert 0 < count.active_params <= count.trainable_params and count.active_rank >= 0


# ------------------------------------------------------------------------------ 3

def _one_line_naming(err: pytest.ExceptionInfo, path: Path) -> None:
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message


@pytest.mark.parametrize("name", PRESETS)
def test_save_load_is_bit_identical_and_bad_files_are_one_line_errors(name, tmp_path):
    loaded, model, method = build(name)
    randomize(model)
    model.eval()
    run = SUITE / f"save-{name}"  # next to the cells the method reads
    as_written = preset_config(name) if family_of(method).depends_on(method) else method  # the config's method
    save_trained(model, as_written, run, built=method)
    batch = batch_of(loaded, QUICKSTART_ITEMS[:4])
    reloaded = load_trained(load_model("tiny", device="cpu").model, run, expected=as_written)
    assert torch.equal(logits(reloaded, batch), logits(model, batch))

    small = tiny_config(len(loaded.tokenizer))
    small.hidden_size = 32  # every adapted module changes shape
    from transformers import Qwen3ForCausalLM

    with pytest.raises(MedpeftError) as err:
        load_trained(Qwen3ForCausalLM(small), run)
    _one_line_naming(err, run / "adapter")

    meta = run / "adapter" / "medpeft_adapter.json"
    original = json.loads(meta.read_text())
    other = "birg" if family_of(method).name != "birg" else "lora-r16"
    tampered = [
        "{not json",
        json.dumps({**original, "method": {**original["method"], "name": "no-such-method"}}),
        json.dumps({**original, "method": dataclasses.asdict(preset_config(other))}),  # another family's config
    ]
    if "target_modules" in original["method"]:
        tampered.append(json.dumps({**original, "method": {**original["method"], "target_modules": ["q_proj"]}}))
    floats = [k for k, v in original["method"].items() if isinstance(v, float)]
    if floats:  # a value that changes no tensor shape: the weights' own record of the config must catch it
        changed = {**original["method"], floats[0]: original["method"][floats[0]] + 1}
        tampered.append(json.dumps({**original, "method": changed}))
    tampered += [json.dumps({**original, "medpeft_adapter": 99}), json.dumps({**original, "family": "other"})]
    for text in tampered:
        meta.write_text(text)
        with pytest.raises(MedpeftError) as err:
            load_trained(load_model("tiny", device="cpu").model, run)
        _one_line_naming(err, run / "adapter")
    meta.write_text(json.dumps(original))
    weight_files = sorted((run / "adapter").rglob("*.safetensors"))
    if not weight_files:  # a training-free method saves no weights (Arrow: its library's are checked)
        assert family_of(method).training_free(method)
        return
    for weights in weight_files:
        weights.write_bytes(weights.read_bytes()[:100])  # a truncated file
    with pytest.raises(MedpeftError) as err:
        load_trained(load_model("tiny", device="cpu").model, run)
    _one_line_naming(err, run / "adapter")


# ------------------------------------------------------------------------------ 5, 10

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One trained run folder per preset (2 steps, 2 micro-batches, a checkpoint at step 1)."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            dependency_cells(name)
            out = SUITE / f"run-{name}"  # next to the cells the method reads
            cfg = load_config("quickstart", [f"output_dir={out}", "methods=[]", f"method={{preset: {name}}}",
                                             "train.steps=2", "train.batch_size=4", "train.micro_batch_size=2",
                                             "train.save_every=1", "train.log_every=1", "data.max_length=192"])
            train(cfg, load_model("tiny", device="cpu"), QUICKSTART_ITEMS[:8])
            cache[name] = out
        return cache[name]

    return get


@pytest.mark.parametrize("name", PRESETS)
def test_aux_losses_are_the_nonzero_weighted_ones_and_logged_with_their_weights(name, runs):
    loaded, model, method = build(name)
    randomize(model)
    model.train()
    family = family_of(method)
    weights = {k: w for k, w in family.loss_weights(method).items() if w > 0}
    if not family.trains_with_loop(method):  # no training step: nothing is differentiated or logged
        assert not weights and json.loads((runs(name) / "summary.json").read_text())["steps"] == 0
        return
    result = accumulate_gradients(model, method, [batch_of(loaded, QUICKSTART_ITEMS[:2]),
                                                  batch_of(loaded, QUICKSTART_ITEMS[2:4])], batch_size=4)
    assert set(result.aux) == set(weights) and result.aux_weights == weights
    assert all(torch.isfinite(v) for v in result.aux.values())
    # the objective that was differentiated is the logged loss plus the logged weights times the terms
    recomputed = result.loss + sum(weights[k] * result.aux[k] for k in weights)
    torch.testing.assert_close(result.objective, recomputed.reshape(()), rtol=1e-5, atol=1e-6)

    run = runs(name)
    logs = [run / "metrics.jsonl"] if (run / "metrics.jsonl").exists() else sorted(run.glob("parts/*/metrics.jsonl"))
    rows = [json.loads(line) for log in logs for line in log.read_text().splitlines()]  # a method of parts: theirs
    assert rows
    summary = json.loads((run / "summary.json").read_text())
    assert summary["loss_weights"] == weights
    for row in rows:
        assert row["aux_weights"] == weights and {k[4:] for k in row if k.startswith("aux_") and k != "aux_weights"} \
            == set(weights)
        assert row["objective"] == pytest.approx(row["loss"] + sum(w * row[f"aux_{k}"] for k, w in weights.items()),
                                                 rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", PRESETS)
def test_routed_presets_audit_and_configs_round_trip(name, runs, tmp_path):
    from medpeft.pipeline import run_audit

    cfg = load_config(None, [f"method.preset={name}", f"output_dir={tmp_path}"])
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(str(tmp_path / "c.yaml")) == cfg
    run = runs(name)
    run_cfg = load_config(str(run / "config.yaml"))
    assert run_cfg.method == preset_config(name)
    if family_of(run_cfg.method).routed:
        result = run_audit(run_cfg, run, tmp_path / "audit")
        summary = json.loads((tmp_path / "audit" / "summary.json").read_text())
        assert summary == json.loads(json.dumps(result.summary)) and summary["n_questions"] == 28
        rows = (tmp_path / "audit" / "per_question.jsonl").read_text().splitlines()
        assert len(rows) == 28 and json.loads(rows[0])["modules"]
    else:
        with pytest.raises(MedpeftError, match="no routed adapters to audit"):
            run_audit(run_cfg, run, tmp_path / "audit")


# ------------------------------------------------------------------------------ 6

COMPILE_BACKEND = os.environ.get("MEDPEFT_CONTRACT_BACKEND", "aot_eager")


@pytest.mark.parametrize("name", PRESETS)
def test_compiled_equals_eager_without_graph_breaks(name):
    """Regional compilation (train.compile) traced by dynamo and AOT autograd (``aot_eager``:
    the compiled code paths and graph breaks, without C++ code generation, which the inductor
    tests in test_precision_and_compile.py cover for BiRG and SparseDoctor;
    ``MEDPEFT_CONTRACT_BACKEND=inductor`` runs this test with code generation for every preset)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    loaded, model, method = build(name)
    if not family_of(method).trains_with_loop(method):  # never trained by the loop, and evaluation runs eagerly
        return
    randomize(model)
    model.train()
    batches = [batch_of(loaded, QUICKSTART_ITEMS[:2]), batch_of(loaded, QUICKSTART_ITEMS[2:4], answer_shift=1)]

    def step():
        state = [buf.clone() for buf in family_of(method).training_state(model).values()]
        result = accumulate_gradients(model, method, batches, batch_size=4)
        grads = {n: p.grad.clone() for n, p in trainable(model).items()}
        model.zero_grad(set_to_none=True)
        with torch.no_grad():  # the same training state (e.g. expert queues) for both runs
            for buf, saved in zip(family_of(method).training_state(model).values(), state):
                buf.copy_(saved)
        return result, grads

    eager, eager_grads = step()
    torch._dynamo.reset()
    counters.clear()
    layers = compile_decoder_layers(model, backend=COMPILE_BACKEND)
    try:
        compiled, compiled_grads = step()
    finally:
        uncompile(layers)
        torch._dynamo.reset()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    torch.testing.assert_close(compiled.objective, eager.objective, rtol=1e-5, atol=1e-6)
    for key in eager.aux:
        torch.testing.assert_close(compiled.aux[key], eager.aux[key], rtol=1e-5, atol=1e-6)
    for n, g in eager_grads.items():
        torch.testing.assert_close(compiled_grads[n], g, rtol=1e-4, atol=1e-6, msg=n)


# ------------------------------------------------------------------------------ 7

@pytest.mark.parametrize("name", PRESETS)
def test_bf16_base_keeps_fp32_adapter_weights_and_a_step_moves_them(name):
    loaded, model, method = build(name, dtype="bf16")
    randomize(model)
    model.train()
    params = trainable(model)
    if not family_of(method).trains_with_loop(method):  # fitted its own way: its weights are fp32 all the same
        assert all(p.dtype == torch.float32 for p in params.values())
        return
    assert params and all(p.dtype == torch.float32 for p in params.values())
    batches = [batch_of(loaded, QUICKSTART_ITEMS[:2])]
    state = {k: v.clone() for k, v in family_of(method).training_state(model).items()}
    accumulate_gradients(model, method, batches, batch_size=2)  # which weights get a gradient
    with_grad = {n for n, p in params.items() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
    model.zero_grad(set_to_none=True)
    family_of(method).load_training_state(model, state)
    before = {n: p.detach().clone() for n, p in params.items()}
    tc = load_config(None, ["train.steps=1", "train.lr=1e-3", "train.batch_size=2", "train.micro_batch_size=2"]).train
    optimizer, scheduler = build_optimizer(model, tc)
    result = training_step(model, method, batches, optimizer, scheduler, batch_size=2, max_grad_norm=1.0)
    assert torch.isfinite(result.objective)
    assert all(p.dtype == torch.float32 for p in trainable(model).values())
    moved = {n for n, p in trainable(model).items() if not torch.equal(p, before[n])}
    assert with_grad and with_grad <= moved, sorted(with_grad - moved)[:5]


# ------------------------------------------------------------------------------ 8

@pytest.mark.parametrize("name", PRESETS)
def test_batched_scoring_equals_one_at_a_time(name):
    loaded, model, method = build(name)
    randomize(model)
    model.eval()
    items = QUICKSTART_ITEMS[:6] + [t for t in QUICKSTART_ITEMS if t.record.question_type == "multi"][:2]
    batched = Evaluator(model, loaded.tokenizer, batch_size=4, max_length=256).score(items, "letters")
    single = Evaluator(model, loaded.tokenizer, batch_size=1, max_length=256).score(items, "letters")
    assert [p.pred for p in batched] == [p.pred for p in single]
    for a, b in zip(batched, single):
        assert a.scores.keys() == b.scores.keys()
        assert all(abs(a.scores[k] - b.scores[k]) < 1e-4 for k in a.scores)


@pytest.mark.parametrize("name", PRESETS)
def test_the_gold_answer_changes_no_routing_value_or_batch_loss(name):
    loaded, model, method = build(name)
    randomize(model)
    model.train()
    family = family_of(method)
    seen = []
    for shift in (0, 1):
        batch = batch_of(loaded, QUICKSTART_ITEMS[:4], answer_shift=shift)
        set_routing(model, batch.prompt_mask, batch.specialty, batch.operation, record=True)
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        state = routing_state(model)
        if state is not None and state.predict is not None:  # a method that predicts its own way records then
            state.predict(Evaluator(model, loaded.tokenizer, max_length=256, batch_size=4), QUICKSTART_ITEMS[:4],
                          "letters", "routing")
        records = state.records if state is not None else {}
        assert bool(records) == family.routed
        routes = family.question_routing(records, batch.prompt_mask)
        losses = {k: v.detach() for k, v in family.aux_losses(model, method).items()}
        seen.append(({n: {k: v.detach().clone() for k, v in r.items()} for n, r in routes.items()}, losses))
    (routes_a, losses_a), (routes_b, losses_b) = seen
    assert routes_a.keys() == routes_b.keys()
    for module, values in routes_a.items():
        for key, value in values.items():
            assert torch.equal(value, routes_b[module][key]), (module, key)
    assert losses_a.keys() == losses_b.keys()
    for key in losses_a:
        assert torch.equal(losses_a[key], losses_b[key]), key


@pytest.mark.parametrize("name", PRESETS)
def test_generation_with_the_prefill_gate_equals_teacher_forcing(name):
    loaded, model, method = build(name)
    randomize(model)
    model.eval()
    fmt = PromptFormatter(loaded.tokenizer, 768)
    evaluator = Evaluator(model, loaded.tokenizer, max_new_tokens=5)
    for item in QUICKSTART_ITEMS[:2]:
        prompt = fmt.encode_prompt(item.record).input_ids
        generated = evaluator._generate([prompt], [item], 5)[0]
        ids = torch.tensor([prompt + generated])
        prompt_mask = torch.zeros_like(ids, dtype=torch.bool)
        prompt_mask[0, :len(prompt)] = True
        set_routing(model, prompt_mask, torch.tensor([item.tags.specialty_id]), torch.tensor([item.tags.operation_id]))
        with torch.no_grad():
            forced = model(input_ids=ids).logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
        assert forced[:len(generated)] == generated


# ------------------------------------------------------------------------------ 9

@pytest.mark.parametrize("name", PRESETS)
def test_reads_tags_declaration_is_true(name):
    loaded, model, method = build(name)
    randomize(model, std=0.5)
    model.eval()
    batch = batch_of(loaded, QUICKSTART_ITEMS[:8])
    clean = logits(model, batch)
    changed = []
    for shift in range(1, 4):
        other = logits(model, batch, specialty=(batch.specialty + shift) % 8, operation=(batch.operation + shift) % 9)
        changed.append(not torch.equal(other, clean))
    assert any(changed) == family_of(method).reads_tags(method), changed


def test_the_catalogue_covers_every_family_and_the_registered_test_family():
    from medpeft.adapters.registry import families

    assert {family_of(preset_config(p)).name for p in PRESETS} == {f.name for f in families()}
    assert {"tagscale", "tagscale-shifted"} <= set(PRESETS)
