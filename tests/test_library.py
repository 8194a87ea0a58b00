"""The adapter library and the routers over it: routes and parts, peft's format, equivalences
(a one-adapter library, a forced route, Arrow == peft), MeteoRA's supervised gate, source-only
routing, resumable parts, a changed library, and bad inputs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from medpeft.adapters import apply_method, family_of, load_trained, preset_config, set_routing
from medpeft.config import load_config
from medpeft.dataset import load_train_set
from medpeft.errors import ConfigError, MedpeftError
from medpeft.models import load_model
from medpeft.prompts import PromptFormatter
from medpeft.train import collate, train

CMB = "pkg:cmb_train.json"


def suite_config(out: Path, *extra: str):
    return load_config(None, [f"output_dir={out}", "model.name=tiny", "data.max_length=192",
                              f"data.train=[{{benchmark: cmb, name: cmb-examples, path: {CMB}}}]",
                              "train.steps=2", "train.batch_size=4", "train.micro_batch_size=4", "train.lr=5e-3",
                              "train.warmup_steps=0", "train.save_every=1", "train.log_every=1", *extra])


def cell(cfg, preset: str, out: Path, **keys):
    from medpeft.adapters.registry import method_from_dict

    return dataclasses.replace(cfg, method=method_from_dict({"preset": preset, **keys}), output_dir=str(out))


@pytest.fixture(scope="module")
def library_run(tmp_path_factory):
    """A trained 7-route library (CMB examples by specialty, 4+ items each), in a suite folder."""
    root = tmp_path_factory.mktemp("suite")
    cfg = suite_config(root / "lora-library")
    cfg = cell(cfg, "lora-library", root / "lora-library", min_items=4)
    items = load_train_set(cfg)
    result = train(cfg, load_model("tiny", device="cpu"), items)
    return root, cfg, items, result.summary


def batch(loaded, items):
    fmt = PromptFormatter(loaded.tokenizer, 192)
    return collate([fmt.encode_train(t.record) for t in items], [t.tags for t in items], loaded.tokenizer.pad_token_id)


def logits(model, b):
    set_routing(model, b.prompt_mask, b.specialty, b.operation)
    with torch.no_grad():
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits


# ------------------------------------------------------------------------------ routes and parts

def test_routes_merge_small_ones_never_drop_and_errors_name_the_cause(library_run):
    from medpeft.adapters.library.routes import library_routes

    root, cfg, items, summary = library_run
    library = json.loads((root / "lora-library" / "adapter" / "library.json").read_text())
    assert len(library["adapters"]) == 7 and sum(a["n_items"] for a in library["adapters"]) == len(items) == 30
    assert [p["name"] for p in summary["parts"]] == [a["name"] for a in library["adapters"]]
    method = preset_config("lora-library")  # min_items 8: every specialty of 30 items is small
    merged = library_routes(method, items)
    assert [v for v, _ in merged] == ["other"] and len(merged[0][1]) == 30
    with pytest.raises(MedpeftError, match="fewer than method.min_items=8"):
        library_routes(dataclasses.replace(method, small_routes="error"), items)
    with pytest.raises(MedpeftError, match="exceed method.max_adapters=3"):
        library_routes(dataclasses.replace(method, min_items=1, max_adapters=3), items)
    with pytest.raises(MedpeftError, match="has no metadata field 'no_such_field'"):
        library_routes(dataclasses.replace(method, routes="metadata:no_such_field"), items)
    by_pair = library_routes(dataclasses.replace(method, routes="pair", min_items=1, max_adapters=64), items)
    assert sum(len(v) for _, v in by_pair) == 30 and all("+" in v for v, _ in by_pair)
    with pytest.raises(ConfigError, match="method.routes"):
        load_config(None, ["method={preset: lora-library, routes: department}"])


def test_each_library_adapter_is_peft_and_the_oracle_route_equals_it(library_run):
    from peft import PeftModel

    root, cfg, items, _ = library_run
    library = json.loads((root / "lora-library" / "adapter" / "library.json").read_text())
    loaded = load_model("tiny", device="cpu")
    routed = load_trained(loaded.model, root / "lora-library").eval()
    for adapter in library["adapters"][:3]:
        mine = [t for t in items if t.tags.specialty == adapter["route"]][:2]
        b = batch(loaded, mine)
        peft_model = PeftModel.from_pretrained(load_model("tiny", device="cpu").model,
                                               str(root / "lora-library" / "adapter" / adapter["name"])).eval()
        with torch.no_grad():
            expected = peft_model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        base = load_model("tiny", device="cpu").model.eval()
        with torch.no_grad():
            bare = base(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        got = logits(routed, b)
        assert not torch.allclose(expected, bare, atol=1e-4)  # the adapter was trained
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _one_adapter_library(root: Path, library_run) -> Path:
    """A library holding only the first adapter of the trained one (a copy with its own library.json)."""
    import shutil

    src = library_run[0] / "lora-library" / "adapter"
    meta = json.loads((src / "library.json").read_text())
    first = meta["adapters"][0]
    dst = root / "one" / "adapter"
    dst.mkdir(parents=True)
    shutil.copytree(src / first["name"], dst / first["name"])
    (dst / "library.json").write_text(json.dumps({**meta, "adapters": [first]}))
    return root / "one"


@pytest.mark.parametrize("router", ["meteora", "lora-mixer", "arrow"])
def test_a_router_over_a_one_adapter_library_equals_that_adapter(router, library_run, tmp_path):
    from peft import PeftModel

    one = _one_adapter_library(tmp_path, library_run)
    items = library_run[2]
    loaded = load_model("tiny", device="cpu")
    method = preset_config(router)
    method = dataclasses.replace(method, library=str(one))
    family = family_of(method)
    torch.manual_seed(0)
    model = apply_method(loaded.model, family.resolve(method, tmp_path / "run")).eval()
    b = batch(loaded, items[:3])
    name = json.loads((one / "adapter" / "library.json").read_text())["adapters"][0]["name"]
    peft_model = PeftModel.from_pretrained(load_model("tiny", device="cpu").model,
                                           str(one / "adapter" / name)).eval()
    with torch.no_grad():
        expected = peft_model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    torch.testing.assert_close(logits(model, b), expected, rtol=1e-5, atol=1e-5)


def test_arrow_preset_equals_peft_arrow_called_directly(library_run):
    from peft import ArrowConfig, create_arrow_model

    root, cfg, items, _ = library_run
    library = root / "lora-library" / "adapter"
    names = [a["name"] for a in json.loads((library / "library.json").read_text())["adapters"]]
    loaded = load_model("tiny", device="cpu")
    method = preset_config("arrow")
    ours = apply_method(loaded.model, family_of(method).resolve(method, root / "arrow")).eval()
    direct = create_arrow_model(load_model("tiny", device="cpu").model, [str(library / n) for n in names],
                                ArrowConfig(top_k=3, router_temperature=1.0, rng_seed=0)).eval()
    b = batch(loaded, items[:4])
    with torch.no_grad():
        expected = direct(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    got = logits(ours, b)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    bare = load_model("tiny", device="cpu").model.eval()
    with torch.no_grad():
        assert not torch.allclose(got, bare(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, atol=1e-4)


# ------------------------------------------------------------------------------ routers learn, read source only

def test_meteora_supervised_gate_learns_the_route(library_run, tmp_path):
    """After training, the gate's top adapter (mean over prompt tokens and modules) is the
    question's route for most training items: far above chance (1/7)."""
    from medpeft.adapters.routing import routing_state

    root, cfg, items, _ = library_run
    run = cell(cfg, "meteora", root / "meteora-learns", l_route=1.0)
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, steps=60, batch_size=8, micro_batch_size=8,
                                                             lr=3e-2, save_every=0))
    loaded = load_model("tiny", device="cpu")
    result = train(run, loaded, items)
    model = result.model.eval()
    b = batch(loaded, items)
    set_routing(model, b.prompt_mask, b.specialty, b.operation, record=True)
    with torch.no_grad():
        model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    state = routing_state(model)
    usage = family_of(run.method).question_routing(state.records, b.prompt_mask)
    mean = torch.stack([u["usage"] for u in usage.values()]).mean(0)
    accuracy = float((mean.argmax(-1) == state.route).float().mean())
    assert accuracy >= 0.6, accuracy


@pytest.mark.parametrize("router", ["lora-library", "meteora", "lora-mixer"])
def test_routing_decisions_do_not_read_target_labels(router, library_run, tmp_path):
    """Evaluating with every target item's gold answer changed routes every question the same."""
    from medpeft.audit import audit

    root, cfg, items, _ = library_run
    run_dir = root / "lora-library" if router == "lora-library" else root / f"{router}-labels"
    if router != "lora-library":
        train(cell(cfg, router, run_dir), load_model("tiny", device="cpu"), items)
    targets = load_train_set(load_config(None, ["data.train=[{benchmark: medqa, name: t, path: pkg:medqa_dev.jsonl}]"]))
    flipped = [dataclasses.replace(t, record=dataclasses.replace(
        t.record, answer=frozenset({"A" if "A" not in t.record.answer else "B"}))) for t in targets]
    runs = []
    for i, sets in enumerate((targets, flipped)):
        loaded = load_model("tiny", device="cpu")
        model = load_trained(loaded.model, run_dir)
        audit(model, preset_config(router), loaded.tokenizer, sets, tmp_path / f"audit-{router}-{i}",
              max_length=192, batch_size=4)
        runs.append((tmp_path / f"audit-{router}-{i}" / "per_question.jsonl").read_text())
    assert runs[0] == runs[1] and runs[0]


# ------------------------------------------------------------------------------ resumable parts, changed library

def test_library_parts_resume_one_by_one(tmp_path):
    cfg = cell(suite_config(tmp_path / "lib"), "lora-library", tmp_path / "lib", min_items=4)
    items = load_train_set(cfg)
    calls = []

    class Stop(Exception):
        pass

    def stop_in_third_part(step):
        calls.append(step)
        if len(calls) == 5:  # parts train 2 steps each: the third part's first step
            raise Stop

    import medpeft.train as train_module

    original = train_module.train

    def counting_train(c, loaded, data, **kw):
        return original(c, loaded, data, on_step=stop_in_third_part if "parts" in c.output_dir else None, **kw)

    train_module.train = counting_train
    try:
        with pytest.raises(Stop):
            original(cfg, load_model("tiny", device="cpu"), items)
    finally:
        train_module.train = original
    parts = sorted(p.name for p in (tmp_path / "lib" / "parts").iterdir())
    done = [p for p in parts if (tmp_path / "lib" / "parts" / p / "summary.json").exists()]
    assert len(done) == 2 and len(parts) == 3
    (interrupted,) = set(parts) - set(done)
    stamps = {p: (tmp_path / "lib" / "parts" / p / "summary.json").stat().st_mtime_ns for p in done}
    result = original(cfg, load_model("tiny", device="cpu"), items, resume=True)
    assert len(result.summary["parts"]) == 7
    assert all((tmp_path / "lib" / "parts" / p / "summary.json").stat().st_mtime_ns == t for p, t in stamps.items())
    resumed = json.loads((tmp_path / "lib" / "parts" / interrupted / "summary.json").read_text())
    assert resumed["resumed_from_step"] == 1


def test_a_router_refuses_a_library_changed_after_training(library_run, tmp_path):
    import shutil

    root, cfg, items, _ = library_run
    suite = tmp_path / "suite"
    shutil.copytree(root / "lora-library", suite / "lora-library")
    train(cell(cfg, "meteora", suite / "meteora"), load_model("tiny", device="cpu"), items)
    load_trained(load_model("tiny", device="cpu").model, suite / "meteora")  # loads while unchanged
    first = json.loads((suite / "lora-library" / "adapter" / "library.json").read_text())["adapters"][0]["name"]
    weights = suite / "lora-library" / "adapter" / first / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    save_file({k: v + 0.01 for k, v in tensors.items()}, str(weights))
    with pytest.raises(MedpeftError, match="changed after this router was trained") as err:
        load_trained(load_model("tiny", device="cpu").model, suite / "meteora")
    assert "\n" not in str(err.value) and str(suite / "meteora" / "adapter") in str(err.value)


# ------------------------------------------------------------------------------ bad inputs, suites

def test_a_library_of_mismatched_ranks_is_a_one_line_error(library_run, tmp_path):
    import shutil

    root = library_run[0]
    copy = tmp_path / "lora-library"
    shutil.copytree(root / "lora-library", copy)
    first = json.loads((copy / "adapter" / "library.json").read_text())["adapters"][1]["name"]
    config_path = copy / "adapter" / first / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "r": 4}))
    method = preset_config("meteora")
    with pytest.raises(MedpeftError, match="mismatched adapters") as err:
        family_of(method).resolve(method, tmp_path / "meteora")
    assert str(config_path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MedpeftError, match="holds no trained library"):
        family_of(method).resolve(method, tmp_path / "elsewhere" / "meteora")
    config_path.write_text(json.dumps(config))
    assert family_of(method).resolve(method, tmp_path / "meteora").n_adapters == 7
    with pytest.raises(MedpeftError, match="method.n_adapters' is 16"):
        family_of(method).resolve(dataclasses.replace(method, n_adapters=16), tmp_path / "meteora")


def test_suite_config_orders_cells_and_overrides_one_preset(tmp_path):
    with pytest.raises(ConfigError, match="'meteora' reads the cell 'lora-library'"):
        load_config(None, [f"output_dir={tmp_path}", "methods=[meteora, lora-library]"])
    cfg = load_config(None, [f"output_dir={tmp_path}", "methods=[lora-library, meteora]",
                             "method_overrides={lora-library: {min_items: 3}}"])
    from medpeft.config import method_variants

    variants = {Path(v.output_dir).name: v for v in method_variants(cfg)}
    assert variants["lora-library"].method.min_items == 3 and variants["meteora"].method.l_route == 1.0
    assert variants["lora-library"].method_overrides == {}
    with pytest.raises(ConfigError, match="method_overrides.no-such-preset"):
        load_config(None, [f"output_dir={tmp_path}", "methods=[lora-library]", "method_overrides={no-such-preset: {}}"])
    kept = load_config(None, [f"output_dir={tmp_path}", "methods=[birg]", "method_overrides={lora-library: {r: 4}}"])
    assert [v.method.name for v in method_variants(kept)] == ["birg"]  # kept for when the preset is listed
    with pytest.raises(ConfigError, match="method_overrides.lora-library"):
        load_config(None, [f"output_dir={tmp_path}", "methods=[lora-library]",
                           "method_overrides={lora-library: {no_such_key: 1}}"])


def test_params_counts_routers_over_a_library_of_n(tmp_path):
    from medpeft.adapters.accounting import count_method

    meteora = count_method("qwen3-8b", "meteora-16x")
    # one gate Linear(d_in, 16) per target module: 36 layers x (4 x 4096 + 2 x 4096 + 12288) inputs
    assert meteora.trainable_params == 36 * 16 * (6 * 4096 + 12288)
    assert count_method("qwen3-8b", "arrow-16x").trainable_params == 0
    with pytest.raises(ValueError, match="'meteora-16x'"):  # a router's size is its library's: say which
        count_method("qwen3-8b", "meteora")
    assert count_method("qwen3-8b", "library-16x-lora-r8").trainable_params == 349_175_808


# ------------------------------------------------------------------------------ medadapter and the pool

def _medadapter(library_run, suite: Path):
    import shutil

    root, cfg, items, _ = library_run
    if not (suite / "lora-library").exists():
        shutil.copytree(root / "lora-library", suite / "lora-library")
    run = cell(cfg, "medadapter", suite / "medadapter", verifier_steps=50)
    result = train(run, load_model("tiny", device="cpu"), items)
    return run, result


def test_medadapter_fits_its_verifier_on_pooled_source_candidates_and_reuses_the_pool(library_run, tmp_path):
    from medpeft.adapters.medadapter import pool
    from medpeft.evaluate import Evaluator

    run, result = _medadapter(library_run, tmp_path)
    verifier = result.summary["verifier"]
    assert verifier["adapters"] == 7 and verifier["candidates"] >= 30 and 0 < verifier["correct_share"] < 1
    assert result.summary["trainable_params"] == 64 + 1  # the head over the tiny model's hidden size
    targets = load_train_set(load_config(None, ["data.train=[{benchmark: medqa, name: t, path: pkg:medqa_dev.jsonl}]"]))
    before = dict(pool.counters)
    loaded = load_model("tiny", device="cpu")
    model = load_trained(loaded.model, tmp_path / "medadapter")
    evaluator = Evaluator(model, loaded.tokenizer, max_length=192, batch_size=4)
    first = evaluator.score(targets, "letters")
    assert pool.counters["computed"] - before["computed"] == 7 * len(targets)
    again = pool.counters["computed"]
    second = Evaluator(model, loaded.tokenizer, max_length=192, batch_size=3).score(targets, "letters")
    assert pool.counters["computed"] == again  # a second run generates nothing
    assert [p.pred for p in first] == [p.pred for p in second]
    table = pool.adapter_candidates(model, evaluator.fmt, targets, family_of(run.method).resolve(
        run.method, tmp_path / "medadapter").library_info, "", tmp_path / "lora-library", 4)
    for p, row in zip(first, table):  # the answer is one of the adapters' candidates, scored by the verifier
        assert "".join(p.pred) in {c["pred"] for c in row} and set(p.scores) == {c["pred"] for c in row}
    # the gold answers are not read: every target label changed, the same answers
    flipped = [dataclasses.replace(t, record=dataclasses.replace(
        t.record, answer=frozenset({"A" if "A" not in t.record.answer else "B"}))) for t in targets]
    assert [p.pred for p in evaluator.score(flipped, "letters")] == [p.pred for p in first]


def test_the_pool_is_invalidated_by_a_changed_adapter_and_refuses_another_models(library_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from medpeft.adapters.library import read_library
    from medpeft.adapters.medadapter import pool

    root, cfg, items, _ = library_run
    import shutil

    shutil.copytree(root / "lora-library", tmp_path / "lora-library")
    info = read_library(tmp_path / "lora-library" / "adapter")
    loaded = load_model("tiny", device="cpu")
    method = family_of(preset_config("medadapter")).resolve(preset_config("medadapter"), tmp_path / "medadapter")
    model = apply_method(loaded.model, method)
    fmt = PromptFormatter(loaded.tokenizer, 192)
    pool.adapter_candidates(model, fmt, items[:5], info, "tiny", tmp_path / "lora-library", 4)
    start = pool.counters["computed"]
    pool.adapter_candidates(model, fmt, items[:5], info, "tiny", tmp_path / "lora-library", 4)
    assert pool.counters["computed"] == start
    weights = info.paths[0] / "adapter_model.safetensors"
    save_file({k: v * 2 for k, v in load_file(str(weights)).items()}, str(weights))
    pool.adapter_candidates(model, fmt, items[:5], info, "tiny", tmp_path / "lora-library", 4)
    assert pool.counters["computed"] == start + 5  # only the changed adapter is recomputed
    (header,) = (tmp_path / "lora-library" / "pool").glob("*/pool.json")
    header.write_text(json.dumps({"model": "other", "model_key": "0123456789abcdef"}))
    with pytest.raises(MedpeftError, match="a candidate pool of another model") as err:
        pool.adapter_candidates(model, fmt, items[:5], info, "tiny", tmp_path / "lora-library", 4)
    assert str(header) in str(err.value) and "\n" not in str(err.value)


def test_the_verifier_ranking_picks_the_answer_among_differing_candidates(library_run, tmp_path):
    from medpeft.adapters.medadapter import VERIFIER_ATTR, choose, verifier_features

    assert choose(["B", "A", "B"], {"A": 0.5, "B": 0.2}) == "A"  # the verifier's score decides
    assert choose(["B", "A", "A"], {"A": 0.3, "B": 0.3}) == "A"  # a tie: more adapters proposed A
    assert choose(["C", "A"], {"A": 0.3, "C": 0.3}) == "C"  # then the earlier adapter
    root, cfg, items, _ = library_run
    loaded = load_model("tiny", device="cpu")
    method = family_of(preset_config("medadapter")).resolve(preset_config("medadapter"), root / "medadapter")
    model = apply_method(loaded.model, method)
    fmt = PromptFormatter(loaded.tokenizer, 192)
    item = items[0]
    feats = verifier_features(model, fmt, [item, item], ["A", "B"], 2)
    head = getattr(model, VERIFIER_ATTR)
    picks = []
    for sign in (1.0, -1.0):  # a head pointing from B's features to A's, then the reverse
        with torch.no_grad():
            head.weight.copy_(sign * (feats[0] - feats[1])[None])
            head.bias.zero_()
        scores = dict(zip("AB", (feats @ head.weight[0] + head.bias[0]).tolist()))
        picks.append(choose(["A", "B"], scores))
    assert picks == ["A", "B"]


def test_medadapter_audit_records_whose_candidate_was_chosen(library_run, tmp_path):
    from medpeft.audit import audit

    run, _ = _medadapter(library_run, tmp_path)
    targets = load_train_set(load_config(None, ["data.train=[{benchmark: medqa, name: t, path: pkg:medqa_dev.jsonl}]"]))
    loaded = load_model("tiny", device="cpu")
    model = load_trained(loaded.model, tmp_path / "medadapter")
    result = audit(model, run.method, loaded.tokenizer, targets, tmp_path / "audit", max_length=192, batch_size=4)
    assert result.summary["n_modules"] == 1 and sum(result.summary["top_adapter_counts"].values()) == len(targets)
    from medpeft.evaluate import Evaluator

    predictions = Evaluator(model, loaded.tokenizer, max_length=192, batch_size=4).score(targets, "letters")
    rows = [json.loads(line) for line in (tmp_path / "audit" / "per_question.jsonl").read_text().splitlines()]
    for p, row in zip(predictions, rows):  # the chosen candidate's voters hold all the usage
        usage = row["modules"]["candidates"]["adapter_usage"]
        assert abs(sum(usage) - 1) < 1e-3 and p.pred  # every question answered by some adapter's candidate
    assert (tmp_path / "audit" / "adapter_usage.png").stat().st_size > 3000


def test_arrow_audit_records_the_coefficients_peft_mixed_with(library_run, tmp_path):
    """The audit's per-token coefficients of an Arrow module reproduce the module's output:
    base + sum_k c_k (alpha/r) B_k A_k x equals what peft's Arrow layer computed."""
    from medpeft.adapters.routing import routing_state
    from medpeft.audit import audit

    root, cfg, items, _ = library_run
    loaded = load_model("tiny", device="cpu")
    method = family_of(preset_config("arrow")).resolve(preset_config("arrow"), root / "arrow")
    model = apply_method(loaded.model, method).eval()
    b = batch(loaded, items[:2])
    captured = {}
    target = model.base_model.model.model.layers[1].self_attn.q_proj
    target.register_forward_hook(lambda m, args, out: captured.update(x=args[0], out=out))
    set_routing(model, b.prompt_mask, b.specialty, b.operation, record=True)
    with torch.no_grad():
        model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    coeff = routing_state(model).records["model.layers.1.self_attn.q_proj"]["gates"]  # [B, T, K]
    x = captured["x"]
    with torch.no_grad():
        expected = target.base_layer(x)
        for k, name in enumerate(target.lora_A.keys() - {"arrow_router"}):
            k = int(name.split("_")[1])
            delta = target.lora_B[name](target.lora_A[name](x)) * target.scaling[name]
            expected = expected + coeff[..., k:k + 1] * delta
    torch.testing.assert_close(captured["out"], expected, rtol=1e-4, atol=1e-5)
    result = audit(model, method, loaded.tokenizer, items[:8], tmp_path / "audit", max_length=192, batch_size=4)
    assert result.summary["n_modules"] == 14 and sum(result.summary["top_adapter_counts"].values()) == 8


def test_the_pool_key_changes_with_the_base_model_and_genknowsub_builds(library_run):
    from medpeft.adapters.medadapter.pool import model_key

    root, cfg, items, _ = library_run
    a, b = load_model("tiny", device="cpu").model, load_model("tiny", device="cpu").model
    assert model_key(a) == model_key(b)
    with torch.no_grad():
        b.get_input_embeddings().weight[0] += 1.0  # another checkpoint of the same architecture
    assert model_key(a) != model_key(b)
    library = root / "lora-library" / "adapter"
    general = json.loads((library / "library.json").read_text())["adapters"][0]["name"]
    loaded = load_model("tiny", device="cpu")
    plain = apply_method(loaded.model, family_of(preset_config("arrow")).resolve(preset_config("arrow"),
                                                                                root / "arrow")).eval()
    bt = batch(loaded, items[:2])
    without = logits(plain, bt)
    gks = dataclasses.replace(preset_config("arrow"), use_gks=True, general_adapters=[str(library / general)])
    with pytest.raises(ConfigError, match="general_adapters"):
        load_config(None, ["method={preset: arrow, use_gks: true}"])
    loaded = load_model("tiny", device="cpu")
    model = apply_method(loaded.model, family_of(gks).resolve(gks, root / "arrow")).eval()
    assert not torch.allclose(logits(model, bt), without, atol=1e-5)  # the general adapter was subtracted


def test_a_library_route_too_small_is_one_line_exit_2_before_training(tmp_path, capsys):
    from medpeft.cli import main

    out = tmp_path / "lib"
    code = main(["train", "quickstart", "methods=[]", "method={preset: lora-library, small_routes: error}",
                 f"output_dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "fewer than method.min_items=8" in err[0] and "training set" in err[0]
    assert not (out / "parts").exists()  # nothing was trained


def test_pool_candidates_are_the_letters_scorers_decisions_with_that_adapter(library_run, tmp_path):
    import shutil

    from medpeft.adapters.library import read_library
    from medpeft.adapters.medadapter import pool
    from medpeft.adapters.routing import routing_state
    from medpeft.evaluate import Evaluator

    root, cfg, items, _ = library_run
    shutil.copytree(root / "lora-library", tmp_path / "lora-library")
    info = read_library(tmp_path / "lora-library" / "adapter")
    loaded = load_model("tiny", device="cpu")
    method = family_of(preset_config("medadapter")).resolve(preset_config("medadapter"), tmp_path / "medadapter")
    model = apply_method(loaded.model, method).eval()
    singles = [t for t in items if t.record.question_type == "single"][:10]
    ev = Evaluator(model, loaded.tokenizer, max_length=192, batch_size=4)
    table = pool.adapter_candidates(model, ev.fmt, singles, info, "tiny", tmp_path / "lora-library", 4)
    state = routing_state(model)
    for k in (0, 3):
        state.forced = k
        scored = ev.score_forward(singles, "letters")
        assert ["".join(p.pred) for p in scored] == [row[k]["pred"] for row in table]
        for p, row in zip(scored, table):
            assert all(abs(p.scores[l] - v) < 1e-4 for l, v in row[k]["logprobs"].items())
    state.forced = -1


def test_a_missing_library_stops_training_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import medpeft.pipeline as pipeline
    from medpeft.cli import main

    monkeypatch.setattr(pipeline, "_loaded", lambda cfg: pytest.fail("the model was loaded"))
    code = main(["train", "quickstart", "methods=[]", "method={preset: meteora}", f"output_dir={tmp_path / 'm'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "holds no trained library" in err[0]
