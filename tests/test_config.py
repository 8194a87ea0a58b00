import subprocess
import sys

import pytest

from medpeft.cli import main
from medpeft.adapters.peft_lora import LoraMethod
from medpeft.config import load_config
from medpeft.errors import ConfigError


def test_defaults_and_overrides():
    cfg = load_config("quickstart", ["train.steps=7", "method.name=dora", "method.r=4", "eval.benchmarks.0.limit=3",
                                     "train.lr=1e-4"])
    assert cfg.train.steps == 7 and cfg.train.lr == pytest.approx(1e-4)
    assert isinstance(cfg.method, LoraMethod) and cfg.method.name == "dora" and cfg.method.r == 4
    assert cfg.eval.benchmarks[0].limit == 3
    assert cfg.eval.benchmarks[1].limit is None


@pytest.mark.parametrize("override, message", [
    ("train.stpes=3", "unknown config key 'train.stpes' (did you mean 'train.steps'?)"),
    ("train.steps=abc", "config key 'train.steps' must be int, got 'abc'"),
    ("train.steps=true", "config key 'train.steps' must be int"),
    ("eval.benchmarks=[{path: x}]", "missing required config key 'eval.benchmarks.0.benchmark'"),
    ("method.name=nope", "config key 'method.name' must be one of"),
    ("method.kappa=4", "unknown config key 'method.kappa'"),
    ("eval.scorer=vote", "config key 'eval.scorer' must be one of letters, generate"),
    ("eval.benchmarks.9.limit=3", "override key 'eval.benchmarks.9' is not an index of that list"),
    ("nonsense", "must look like key=value"),
])
def test_bad_config_is_one_clear_error(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="no such file, and not a built-in config"):
        load_config(str(tmp_path / "missing.yaml"))


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    cfg_file = tmp_path / "sub" / "c.yaml"
    cfg_file.write_text("eval:\n  benchmarks:\n    - {benchmark: medqa, path: data/x.jsonl}\n")
    cfg = load_config(str(cfg_file))
    assert cfg.eval.benchmarks[0].path == str(tmp_path / "sub" / "data" / "x.jsonl")


def test_cli_bad_config_exits_2_with_one_line(capsys):
    code = main(["train", "quickstart", "train.stpes=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0 and "train.stpes" in err and "Traceback" not in err


def test_console_script_exit_code():
    proc = subprocess.run([sys.executable, "-m", "medpeft.cli", "run", "quickstart", "train.steps=x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "medpeft: error: config key 'train.steps' must be int, got 'x'"


def test_unloadable_model_is_one_clear_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing-run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medpeft: error: model ") and "cannot load it" in err and "Traceback" not in err
    assert main(["eval", str(tmp_path)]) == 2  # an existing folder that is neither a run nor a model
    assert "neither a run folder" in capsys.readouterr().err


def test_overrides_may_follow_the_options(tmp_path, capsys):
    import json

    assert main(["eval", "tiny", "--out", str(tmp_path / "e"), "eval.benchmarks.0.limit=2", "data.max_length=128"]) == 0
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert results["benchmarks"]["cmexam-examples"]["n"] == 2
    with pytest.raises(SystemExit) as err:
        main(["params", "--json", "train.steps=3"])  # params takes no overrides
    assert err.value.code == 2


def test_the_shipped_cpu_demo_config_is_valid():
    from medpeft.config import method_variants

    cfg = load_config("smollm2-demo")
    assert cfg.model.name == "smollm2-135m" and cfg.methods == ["lora-r16", "birg"]
    assert [s.split for s in cfg.data.train] == ["train"] and [s.split for s in cfg.eval.benchmarks] == ["validation"]
    assert [v.output_dir for v in method_variants(cfg)] == ["runs/smollm2-demo/lora-r16", "runs/smollm2-demo/birg"]
