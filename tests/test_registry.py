"""The method registry and the pipeline's seams: presets, registration, a family added from a
test running through every command, validation before any work, one model load per
evaluation, self-describing run folders, and the benchmark timing the training step."""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest

from medpeft.adapters import catalogue, family_of, preset_config, register_family
from medpeft.adapters.registry import (MethodFamily, Preset, aliases, base_values, families, method_names,
                                       preset_dict, resolve_preset)
from medpeft.cli import main
from medpeft.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ presets

def test_no_preset_restates_its_base_or_duplicates_another():
    for name in catalogue():
        preset = resolve_preset(name)
        start = base_values(preset)
        restated = {k: v for k, v in preset.overrides.items() if start.get(k) == v}
        assert not restated, f"{name} restates {restated}"
    configs = {}
    for name in catalogue():
        key = json.dumps(dataclasses.asdict(preset_config(name)), sort_keys=True)
        assert key not in configs, f"{name} duplicates {configs.get(key)}"
        configs[key] = name


def test_aliases_and_parametric_presets():
    assert aliases() == {"birg-top4": "birg", "medmoe-asymmetric": "medmoe"}
    assert preset_config("medmoe-asymmetric") == preset_config("medmoe")
    assert preset_config("birg-top4").kappa == 4 == preset_config("birg").kappa
    lora8 = preset_config("lora-r8")
    assert (lora8.name, lora8.r, lora8.alpha) == ("lora", 8, 16.0) and preset_config("dora-r4").name == "dora"
    assert preset_dict("sparsedoctor") == {**preset_dict("moelora"), "name": "sparsedoctor",
                                           "gate_contrast": True, "queue_size": 1024}
    with pytest.raises(ConfigError, match="method.preset"):
        preset_config("lora-r0")


def test_methods_command_lists_the_catalogue(capsys):
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["preset"] for r in rows] == catalogue()
    sparse = next(r for r in rows if r["preset"] == "sparsedoctor")
    assert sparse["base"] == "moelora" and sparse["changes"] == {"gate_contrast": True, "queue_size": 1024}
    assert next(r for r in rows if r["preset"] == "birg")["aliases"] == ["birg-top4"]
    assert main(["methods"]) == 0 and "| medmoe (= medmoe-asymmetric) | medmoe | LoRA-MoE |" in capsys.readouterr().out


def _dummy_family(**attrs):
    @dataclasses.dataclass
    class DummyMethod:
        name: str = "dummy"
        r: int = 2

    return type("Dummy", (MethodFamily,), {"name": "dummy", "methods": {"dummy": "Dummy"}, "schema": DummyMethod,
                                           "presets": (Preset("dummy-r2", "dummy"),), **attrs})()


@pytest.mark.parametrize("attrs, message", [
    ({"name": "birg"}, "already registered"),
    ({"presets": (Preset("birg", "dummy"),)}, "already taken"),
    ({"presets": (Preset("dummy-x", "lora"),)}, "not a method of"),
    ({"presets": (Preset("dummy-r0", "dummy", {"r": 0}),)}, "method.r"),  # presets must validate
    ({"aliases": {"dummy-alias": "nope"}}, "not a preset"),
    ({"presets": (Preset("dummy-a", "dummy", {"r": 3}, base="dummy-b"),
                  Preset("dummy-b", "dummy", {"r": 4}, base="dummy-a"))}, "bases loop"),
    ({"methods": {"dummy": "Dummy", "dummy-r2": "Dummy"}}, "named like a method"),  # dummy-r2 configures 'dummy'
    ({"aliases": {"dummy": "dummy-r2"}}, "named like a method"),
    ({"routed": True}, "has no audit"),
])
def test_a_bad_registration_is_refused_and_leaves_the_registry_unchanged(attrs, message):
    before = (list(catalogue()), list(method_names()), [f.name for f in families()], aliases())
    with pytest.raises((ValueError, ConfigError), match=message):
        register_family(_dummy_family(**attrs))
    assert (list(catalogue()), list(method_names()), [f.name for f in families()], aliases()) == before


# ------------------------------------------------------------------------------ a family from outside src/

def test_a_family_registered_from_tests_runs_through_every_command(tmp_path, capsys):
    """tests/example_family.py (``tagscale``) is registered by conftest.py, with no edit under
    src/: train, eval, save/load, params, audit and the report all take it."""
    out = tmp_path / "suite"
    assert main(["suite", "quickstart", f"output_dir={out}", "methods=[lora-r16, tagscale, tagscale-shifted]",
                 "train.steps=3", "train.save_every=0", "data.max_length=256"]) == 0
    capsys.readouterr()
    run = out / "tagscale"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "tagscale" and summary["loss_weights"] == {"scale": 0.01}
    assert json.loads((run / "adapter" / "medpeft_adapter.json").read_text())["family"] == "tagscale"
    audit = json.loads((run / "audit" / "summary.json").read_text())  # the suite audits routed methods
    assert audit["n_questions"] == 28 and set(audit["mean_scale_by_specialty"]) <= {"clinical_medicine", "pharmacy",
                                                                                     "nursing", "tcm", "public_health",
                                                                                     "medical_technology",
                                                                                     "basic_biomedicine", "unknown"}
    assert not (out / "lora-r16" / "audit").exists()
    report = json.loads((out / "report" / "report.json").read_text())
    families_by_label = {r["label"]: r["family"] for r in report["methods"]}
    assert families_by_label["tagscale"] == "Tag-scaled LoRA (test family)"
    md = (out / "report" / "report.md").read_text()
    assert "ablations of tagscale" in md and (out / "report" / "ablations-tagscale.png").stat().st_size > 2000

    assert main(["eval", str(run), "--out", str(tmp_path / "again")]) == 0  # loads the saved adapter
    again = [json.loads(line)["pred"] for line in (tmp_path / "again" / "predictions.jsonl").read_text().splitlines()]
    first = [json.loads(line)["pred"] for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert again == first
    capsys.readouterr()
    assert main(["audit", str(run), "--out", str(tmp_path / "audit")]) == 0
    assert capsys.readouterr().out.startswith("audited 28 questions: mean scale")
    assert main(["params", "--arch", "tiny", "--methods", "tagscale", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["trainable_params"] == summary["trainable_params"]


# attribute and buffer names of the families' layers, which code outside the families must not look for
LAYER_ATTRIBUTES = ("lora_A", "lora_B", "queue", "gate_tags", "gate_in", "routing_out", "pending_push",
                    "spec_to_channel", "expert_of_channel", "log_tau")


def test_the_registry_is_the_only_place_that_names_methods():
    """Pipeline modules and benchmarks ask the registry: they import no family's internals and
    hold no method or preset name (the benchmarks' reference row aside)."""
    names = set(method_names()) | set(catalogue()) | set(aliases())
    modules = [REPO / "src/medpeft" / m for m in ("train.py", "evaluate.py", "audit.py", "cli.py", "report.py",
                                                  "pipeline.py", "config.py", "adapters/accounting.py")]
    modules += sorted((REPO / "benchmarks").glob("*.py"))
    internals = ("medpeft.adapters.birg", "medpeft.adapters.moe", "medpeft.adapters.peft_lora",
                 "medpeft.adapters.full", ".adapters.birg", ".adapters.moe", ".birg", ".moe", ".peft_lora", ".full")
    for path in modules:
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                assert not module.endswith(internals), f"{path.name} imports {module}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                allowed = path.parent.name == "benchmarks" and node.value == "lora-r16"
                assert allowed, f"{path.name}:{node.lineno} names the method {node.value!r}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                # no sniffing of the families' layer attributes (prose in docstrings aside)
                sniffed = [a for a in LAYER_ATTRIBUTES if a in node.value]
                assert not sniffed, f"{path.name}:{node.lineno} looks for a family's attribute {sniffed}"


# ------------------------------------------------------------------------------ validation first

@pytest.mark.parametrize("section", ["{preset: 5}", "{preset: [birg]}", "{name: [lora]}", "{preset: nope}",
                                     "{preset: lora-r16, name: dora}"])
def test_a_malformed_method_section_is_one_line(section, capsys, tmp_path):
    assert main(["train", "quickstart", f"output_dir={tmp_path / 'r'}", "methods=[]", f"method={section}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config key 'method." in err and "Traceback" not in err, err


@pytest.mark.parametrize("overrides, key", [
    (["method={preset: birg}", "method.kappa=20"], "method.kappa"),
    (["method={preset: birg}", "method.tau=0"], "method.tau"),
    (["method={preset: birg}", "method.l_ent=-0.1"], "method.l_ent"),
    (["method={preset: birg}", "method.hidden_gate=false", "method.clinical_gate=false"], "method.hidden_gate"),
    (["method={preset: moelora}", "method.top_k=5"], "method.top_k"),
    (["method={preset: moelora}", "method.router=nope"], "method.router"),
    (["method={preset: moelora}", "method.l_con=0", "method.gate_contrast=true"], "method.gate_contrast"),
    (["method={preset: medmoe}", "method.n_min=9"], "method.n_min"),
    (["method={preset: medmoe}", "method.ranks=[4, 8]"], "method.ranks"),
    (["method={preset: moe-vanilla}", "method.router=soft"], "method.l_balance"),
    (["method={preset: lora-r16}", "method.r=0"], "method.r"),
    (["method={preset: lora-r16}", "method.dropout=1.0"], "method.dropout"),
    (["train.batch_size=6", "train.micro_batch_size=4"], "train.batch_size"),
])
def test_method_values_are_checked_before_anything_is_loaded_or_written(overrides, key, tmp_path, capsys,
                                                                        monkeypatch):
    import medpeft.pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(medpeft.pipeline, "load_model", no_loading)
    out = tmp_path / "run"
    assert main(["train", "quickstart", f"output_dir={out}", "methods=[]", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"config key '{key}'" in err and "Traceback" not in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------ run folders

def _train_quick(out: Path, *overrides: str) -> None:
    assert main(["train", "quickstart", f"output_dir={out}", "methods=[]", "train.steps=2", "train.save_every=0",
                 "data.max_length=192", *overrides]) == 0


def test_evaluating_a_run_loads_the_base_model_once(tmp_path, monkeypatch, capsys):
    import medpeft.pipeline

    _train_quick(tmp_path / "run", "method={preset: birg}")
    loads = []
    real = medpeft.pipeline.load_model
    monkeypatch.setattr(medpeft.pipeline, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    assert main(["eval", str(tmp_path / "run"), "--out", str(tmp_path / "e")]) == 0
    assert len(loads) == 1


def test_a_copied_run_folder_describes_itself(tmp_path, capsys):
    original = tmp_path / "run"
    _train_quick(original, "method={preset: moelora}")
    assert main(["eval", str(original)]) == 0
    preds = (original / "eval" / "predictions.jsonl").read_text()
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    assert main(["eval", str(copy), "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "predictions.jsonl").read_text() == preds
    capsys.readouterr()

    config = copy / "config.yaml"
    text = config.read_text()
    config.write_text(text.replace("top_k: 2", "top_k: 1"))  # the config no longer matches the adapter
    assert main(["eval", str(copy), "--out", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "medpeft_adapter.json" in err and "differs from the config's method" in err
    assert "top_k" in err
    config.write_text(text)

    meta = copy / "adapter" / "medpeft_adapter.json"
    data = json.loads(meta.read_text())
    meta.write_text(json.dumps({**data, "method": {**data["method"], "name": "mystery"}}))  # an unknown method
    assert main(["eval", str(copy), "--out", str(tmp_path / "e3")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(meta) in err and "'mystery'" in err


def test_adapter_folders_of_the_previous_format_still_load(tmp_path):
    """Before medpeft_adapter.json: medpeft_method.json (the name) and, for our own layers,
    adapter_config.json holding the method config; peft folders took the method from the run."""
    import torch

    from medpeft.adapters import apply_method, load_trained, save_trained
    from medpeft.errors import MedpeftError
    from medpeft.models import load_model

    for name in ("birg", "lora-r16"):
        method = preset_config(name)
        torch.manual_seed(0)
        model = apply_method(load_model("tiny", device="cpu").model, method)
        folder = save_trained(model, method, tmp_path / name)
        (folder / "medpeft_adapter.json").unlink()
        (folder / "medpeft_method.json").write_text(json.dumps({"method": method.name}))
        if name == "birg":
            (folder / "adapter_config.json").write_text(json.dumps({"method": dataclasses.asdict(method)}))
            load_trained(load_model("tiny", device="cpu").model, tmp_path / name)
        else:
            with pytest.raises(MedpeftError, match="evaluate it through its run folder"):
                load_trained(load_model("tiny", device="cpu").model, tmp_path / name)
            load_trained(load_model("tiny", device="cpu").model, tmp_path / name, expected=method)


def test_a_suite_does_not_reuse_a_finished_run_of_another_config(tmp_path, capsys):
    args = ["suite", "quickstart", f"output_dir={tmp_path / 's'}", "methods=[lora-r16]", "train.steps=2",
            "train.save_every=0", "data.max_length=192"]
    assert main(args) == 0
    table = json.loads((tmp_path / "s" / "results.json").read_text())
    assert set(table) == {"lora-r16"}
    capsys.readouterr()
    assert main(args + ["train.lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a finished run of another config" in err and "train.lr" in err


def test_an_adapter_folder_without_its_method_file_is_refused(tmp_path, capsys):
    _train_quick(tmp_path / "run")
    (tmp_path / "run" / "adapter" / "medpeft_adapter.json").unlink()
    assert main(["eval", str(tmp_path / "run"), "--out", str(tmp_path / "e")]) == 2
    assert "medpeft_adapter.json: missing" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the benchmark's step

def test_the_step_benchmark_times_the_training_step_with_its_step_updates(monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import step_time

    import medpeft.train

    seen = []
    real = medpeft.train.training_step

    def spy(model, method, *args, **kwargs):
        result = real(model, method, *args, **kwargs)
        queues = family_of(method).training_state(model)
        seen.append(sum(int((v >= 0).sum()) for k, v in queues.items() if k.endswith(".labels")))
        return result

    monkeypatch.setattr(step_time, "training_step", spy)
    cfg = dict(step_time.CONFIGS["cpu-tiny"], seq=32, warmup=1, steps=1, compile=False)
    model = step_time.random_model("tiny", "cpu", cfg["dtype"])
    res = step_time.time_method(model, "sparsedoctor", step_time.make_batches(cfg, model.config.vocab_size, "cpu"),
                                cfg)
    assert len(res["times"]) == 1 and len(seen) == 2
    assert 0 < seen[0] < seen[1]  # the expert queues are pushed inside the timed step
    assert not any(p.requires_grad for p in res["model"].parameters())  # the bare base model is given back
