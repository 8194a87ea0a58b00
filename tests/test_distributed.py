"""Several processes (torchrun, gloo on CPU): the same run as one process.

Each test launches ``torchrun --standalone --nproc_per_node 2`` on ``tests/dist_launch.py``
(medpeft's CLI, with test-only faults) and compares with the same config run in this
process. Tolerances (fp32): the ranks' gradients are summed in another order than one
process accumulates them, so per-step numbers agree to 1e-5 (absolute, or relative for
large gradient norms) and trained tensors to 5e-5 (measured: 5e-7 and 1.3e-5); evaluation files are identical byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medpeft.cli import main

HERE = Path(__file__).resolve().parent
PRESETS = ["lora-r16", "birg", "moelora", "sparsedoctor", "medmoe", "full"]
LOSS_ATOL, WEIGHT_ATOL = 1e-5, 5e-5


def write_config(tmp_path: Path, methods: list[str], **train) -> Path:
    """Tiny model, the shipped example questions; 6 examples per step in micro-batches of 2:
    three micro-batches, so the two ranks hold unequal numbers of them."""
    settings = {"steps": 4, "batch_size": 6, "micro_batch_size": 2, "lr": 5e-3, "warmup_steps": 1, "seed": 0,
                "save_every": 0, "log_every": 1, "compile": False, **train}
    cfg = {"output_dir": str(tmp_path / "runs"), "methods": methods, "model": {"name": "tiny"},
           "method": {"name": "lora", "r": 4, "alpha": 8},
           "data": {"max_length": 256, "train": [{"benchmark": "cmb", "name": "cmb-examples",
                                                  "path": "pkg:cmb_train.json"}]},
           "train": settings,
           "eval": {"scorer": "letters", "batch_size": 4,
                    "benchmarks": [{"benchmark": "medqa", "name": "medqa-examples", "path": "pkg:medqa_dev.jsonl"}]}}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def torchrun(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun`` with two CPU processes; the test fails (instead of hanging) past ``timeout``."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(HERE / "dist_launch.py"), *args], env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tensors(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted((run / "adapter").rglob("*.safetensors")):
        out.update({f"{f.relative_to(run / 'adapter')}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def assert_same_run(one: Path, two: Path) -> None:
    """Same per-step numbers (every logged term, of the run and of its parts), the same trained
    tensors and the same adapter description."""
    logs = sorted(p.relative_to(one) for p in one.rglob("metrics.jsonl"))
    assert logs == sorted(p.relative_to(two) for p in two.rglob("metrics.jsonl"))
    for rel in logs:
        m1, m2 = metrics((one / rel).parent), metrics((two / rel).parent)
        assert [r["step"] for r in m1] == [r["step"] for r in m2]
        for r1, r2 in zip(m1, m2):
            keys = [k for k in r1 if k in ("loss", "objective", "grad_norm")
                    or (k.startswith("aux_") and k != "aux_weights")]
            assert set(keys) <= set(r2), (one.name, r1["step"], set(keys) - set(r2))
            for k in keys:
                assert r2[k] == pytest.approx(r1[k], rel=LOSS_ATOL, abs=LOSS_ATOL), (str(rel), r1["step"], k)
            assert r1["tokens"] == r2["tokens"]
    w1, w2 = tensors(one), tensors(two)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=WEIGHT_ATOL, msg=f"{one.name}: {k}")
    meta = sorted(p.relative_to(one) for p in (one / "adapter").rglob("*.json"))
    assert meta == sorted(p.relative_to(two) for p in (two / "adapter").rglob("*.json"))
    for rel in meta:
        assert described(one / rel, one.parent) == described(two / rel, two.parent), rel


def described(path: Path, root: Path) -> dict:
    """An adapter's JSON, with peft's ``target_modules`` (a set, written in hash order) sorted and
    a router's ``library_sha256`` dropped (a hash of library tensors, compared to tolerance above);
    paths below ``root`` (a router's library) relative to it."""
    data = json.loads(path.read_text().replace(str(root), "ROOT"))
    data.pop("library_sha256", None)
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
    return data


def no_leftovers(root: Path) -> None:
    """Written once, atomically: no temporary folders or files of a second writer."""
    assert not [p for p in root.rglob("*") if p.name.endswith((".tmp", ".old")) or ".tmp." in p.name]


def test_every_preset_trains_on_two_processes_to_the_one_process_result(tmp_path):
    config = write_config(tmp_path, PRESETS)
    done = torchrun("train", str(config), f"output_dir={tmp_path / 'two'}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["train", str(config), f"output_dir={tmp_path / 'one'}"]) == 0
    for preset in PRESETS:
        one, two = tmp_path / "one" / preset, tmp_path / "two" / preset
        assert_same_run(one, two)
        assert json.loads((two / "summary.json").read_text())["processes"] == 2
        assert len(metrics(two)) == 4  # one writer: each step logged once
    no_leftovers(tmp_path / "two")
    assert done.stdout.count('"method": "lora"') == 1  # the summary is printed by the main process only


@pytest.mark.slow  # its own CI tier (pytest -m slow): the default suite must stay under 15 min
def test_every_other_preset_trains_alike_on_two_processes(tmp_path):
    """The rest of the registry's presets (ablations, DoRA, the adapter library and its four
    routers, which read the library cell trained first): same numbers and files as one process."""
    from medpeft.adapters.registry import describe_presets

    others = [r["preset"] for r in describe_presets() if r["preset"] not in PRESETS
              and not r["preset"].startswith("tagscale")]  # tagscale: the tests' own example family
    assert {"lora-library", "arrow", "meteora", "lora-mixer", "medadapter", "dora-r24"} <= set(others)
    config = write_config(tmp_path, others, steps=3)
    small_routes = 'method_overrides={"lora-library": {"min_items": 3}}'  # several routes of the 30 examples
    done = torchrun("run", str(config), f"output_dir={tmp_path / 'two'}", small_routes)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["run", str(config), f"output_dir={tmp_path / 'one'}", small_routes]) == 0
    for preset in others:
        one, two = tmp_path / "one" / preset, tmp_path / "two" / preset
        assert_same_run(one, two)
        if preset == "lora-library":
            assert len(list((two / "parts").iterdir())) >= 2  # several routes, each a part
    no_leftovers(tmp_path / "two")


def test_resume_continues_exactly_with_the_same_and_another_number_of_processes(tmp_path):
    """A 2-process run stopped after step 3 (checkpoint at step 2) resumes with 2 processes and
    with 1, and a 1-process checkpoint resumes with 2: all equal the uninterrupted run
    (SparseDoctor: its expert queues are part of the checkpoint)."""
    config = write_config(tmp_path, ["sparsedoctor"], steps=5, save_every=2)
    assert main(["train", str(config), f"output_dir={tmp_path / 'ref'}"]) == 0
    stop = {"MEDPEFT_TEST_STOP_AFTER": "3"}
    stopped = torchrun("train", str(config), f"output_dir={tmp_path / 'two'}", env=stop)
    assert stopped.returncode != 0 and "exitcode  : 75" in stopped.stderr and "[rank" not in stopped.stderr, \
        stopped.stderr[-3000:]  # stopped by the test, not by an error
    ckpt = tmp_path / "two" / "sparsedoctor" / "checkpoints" / "step-0000002"
    assert (ckpt / "state.json").exists() and not (tmp_path / "two" / "sparsedoctor" / "adapter").exists()
    assert json.loads((ckpt / "state.json").read_text())["processes"] == 2
    shutil.copytree(tmp_path / "two", tmp_path / "two-then-one")
    resumed = torchrun("train", str(config), f"output_dir={tmp_path / 'two'}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert main(["train", str(config), f"output_dir={tmp_path / 'two-then-one'}", "--resume"]) == 0
    ref = tmp_path / "ref" / "sparsedoctor"
    for run in ("two", "two-then-one"):
        done = tmp_path / run / "sparsedoctor"
        assert json.loads((done / "summary.json").read_text())["resumed_from_step"] == 2
        assert_same_run(ref, done)
    # and a 1-process checkpoint continued by 2 processes
    from medpeft import train as train_module

    calls = [0]
    real = train_module.training_step

    def stop_after_3(*args, **kwargs):
        if calls[0] == 3:
            raise KeyboardInterrupt
        calls[0] += 1
        return real(*args, **kwargs)

    train_module.training_step = stop_after_3
    try:
        with pytest.raises(KeyboardInterrupt):
            main(["train", str(config), f"output_dir={tmp_path / 'one-then-two'}"])
    finally:
        train_module.training_step = real
    resumed = torchrun("train", str(config), f"output_dir={tmp_path / 'one-then-two'}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(ref, tmp_path / "one-then-two" / "sparsedoctor")


def test_evaluation_shards_items_and_writes_the_one_process_files(tmp_path, data_dir):
    """Scored by two processes (each every other batch): predictions.jsonl and results.json
    equal the one-process files byte for byte -- single-answer, multi-answer (constrained
    decoding) and open-ended (generated) items, a routed method; the extra protocols'
    files (log-likelihood and generation protocols) and the option-order robustness too."""
    config = write_config(tmp_path, ["moelora"], steps=2)
    benchmarks = [{"benchmark": "cmb", "name": "cmb-examples", "path": "pkg:cmb_train.json"},
                  {"benchmark": "medqa", "name": "medqa-examples", "path": "pkg:medqa_dev.jsonl"},
                  {"benchmark": "gsm8k", "name": "gsm8k", "path": str(data_dir / "gsm8k" / "test.rows0-299.jsonl"),
                   "limit": 6}]
    overrides = [f"eval.benchmarks={json.dumps(benchmarks)}", "eval.max_new_tokens=4",
                 "eval.extra_protocols=[lm-eval, opencompass-cmb]", "eval.permute_options=cyclic"]
    assert main(["train", str(config), f"output_dir={tmp_path / 'one'}", *overrides]) == 0
    run = tmp_path / "one" / "moelora"
    assert main(["eval", str(run), "--out", str(tmp_path / "eval-one")]) == 0
    done = torchrun("eval", str(run), "--out", str(tmp_path / "eval-two"))
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("predictions.jsonl", "results.json", "robustness.json", "protocol-lm-eval/predictions.jsonl",
                 "protocol-lm-eval/results.json", "protocol-opencompass-cmb/predictions.jsonl"):
        assert (tmp_path / "eval-two" / name).read_bytes() == (tmp_path / "eval-one" / name).read_bytes(), name
    rows = [json.loads(line) for line in (tmp_path / "eval-two" / "predictions.jsonl").read_text().splitlines()]
    assert {r["benchmark"] for r in rows} == {"cmb-examples", "medqa-examples", "gsm8k"}
    assert done.stdout.count("predictions and results in") == 1


def test_a_failure_on_one_rank_ends_every_rank_with_the_error_shown_once(tmp_path):
    """Rank 1 alone reads a training file with a bad record: one line naming the file, record
    and field, shown once; every rank ends (no hang: the timeout would fail the test); nothing
    of the run is written."""
    bad = tmp_path / "bad.jsonl"
    good = json.loads(Path(__file__).resolve().parents[1].joinpath(
        "src/medpeft/data/examples/medqa_dev.jsonl").read_text().splitlines()[0])
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "answer_idx": "Q"}) + "\n")
    config = write_config(tmp_path, ["lora-r16"])
    train_override = json.dumps([{"benchmark": "medqa", "name": "m", "path": str(bad)}])
    done = torchrun("train", str(config), f"output_dir={tmp_path / 'two'}",
                    env={"MEDPEFT_TEST_RANK_OVERRIDE": f"1:data.train={train_override}"}, timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "medpeft: error:" in line]
    assert len(errors) == 1, done.stderr[-3000:]
    assert str(bad) in errors[0] and "line 2" in errors[0] and "answer_idx" in errors[0]
    assert "site-packages/medpeft" not in done.stderr and "/src/medpeft/" not in done.stderr  # no traceback of ours
    assert not (tmp_path / "two" / "lora-r16" / "summary.json").exists()


def test_an_error_every_rank_hits_is_shown_once(tmp_path):
    config = write_config(tmp_path, ["no-such-preset"])
    done = torchrun("train", str(config), timeout=120)
    errors = [line for line in done.stderr.splitlines() if "medpeft: error:" in line]
    assert done.returncode != 0 and len(errors) == 1 and "no-such-preset" in errors[0], done.stderr[-2000:]


def test_commands_that_run_in_one_process_refuse_a_multi_process_launch(tmp_path):
    config = write_config(tmp_path, ["lora-r16"])
    done = torchrun("suite", str(config), timeout=120)
    errors = [line for line in done.stderr.splitlines() if "medpeft: error:" in line]
    assert done.returncode != 0 and len(errors) == 1 and "--executor" in errors[0]


def accelerate_env(name: str) -> dict[str, str]:
    """The variables ``accelerate launch --config_file configs/accelerate/<name>.yaml`` exports for
    medpeft (accelerate's own parsing and launch preparation)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = HERE.parent / "configs" / "accelerate" / f"{name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "medpeft", "train", "x"])
    args, _, _ = _validate_launch_command(args)
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def test_the_shipped_accelerate_configs_select_what_their_comments_say():
    from medpeft import distributed

    ddp, full, grad_op = accelerate_env("ddp"), accelerate_env("fsdp2"), accelerate_env("fsdp2-grad-op")
    assert "ACCELERATE_USE_FSDP" not in ddp and ddp["ACCELERATE_MIXED_PRECISION"] == "no"
    for env, reshard in ((full, True), (grad_op, False)):
        os.environ.update(env)
        try:
            assert distributed._fsdp_settings() == {"version": 2, "reshard_after_forward": reshard,
                                                    "cpu_offload": False}
        finally:
            for key in env:
                os.environ.pop(key)


def test_accelerate_mixed_precision_is_refused_in_one_line(tmp_path):
    config = write_config(tmp_path, ["lora-r16"])
    done = torchrun("train", str(config), env={"ACCELERATE_MIXED_PRECISION": "bf16"}, timeout=120)
    errors = [line for line in done.stderr.splitlines() if "medpeft: error:" in line]
    assert done.returncode != 0 and len(errors) == 1 and "model.dtype" in errors[0]


def test_fsdp2_trains_like_one_process_and_saves_full_adapters(tmp_path):
    """accelerate's FSDP2 plugin settings (what ``accelerate launch --config_file
    configs/accelerate/fsdp2.yaml`` exports): decoder layers sharded over the two ranks; the
    per-step losses and the saved adapter equal the one-process run's, and the saved adapter
    loads in one process to the one-process model's logits."""
    from medpeft.adapters import set_routing
    from medpeft.config import load_config
    from medpeft.pipeline import load_run_model

    methods = ["lora-r16", "full", "birg", "sparsedoctor"]  # gates, tag tables, routers, expert queues
    config = write_config(tmp_path, methods)
    env = accelerate_env("fsdp2")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    done = torchrun("train", str(config), f"output_dir={tmp_path / 'two'}", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["train", str(config), f"output_dir={tmp_path / 'one'}"]) == 0
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    for method in methods:
        one, two = tmp_path / "one" / method, tmp_path / "two" / method
        assert_same_run(one, two)
        logits = []
        for run in (one, two):
            cfg = load_config(str(run / "config.yaml"))
            model = load_run_model(cfg, run).model.eval()
            set_routing(model, torch.ones_like(ids, dtype=torch.bool), torch.tensor([1]), torch.tensor([2]))
            with torch.no_grad():
                logits.append(model(input_ids=ids).logits)
        torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-4)


def test_fsdp2_checkpoints_resume_exactly_under_fsdp2_and_in_one_process(tmp_path):
    """A fully sharded `full` run stopped after step 3 (checkpoint at step 2, gathered into the
    one-process format) resumes under FSDP2 and in one process, both to the uninterrupted run."""
    config = write_config(tmp_path, ["full"], steps=5, save_every=2)
    assert main(["train", str(config), f"output_dir={tmp_path / 'ref'}"]) == 0
    env = accelerate_env("fsdp2")
    stopped = torchrun("train", str(config), f"output_dir={tmp_path / 'two'}",
                       env={**env, "MEDPEFT_TEST_STOP_AFTER": "3"})
    assert stopped.returncode != 0 and "exitcode  : 75" in stopped.stderr and "[rank" not in stopped.stderr, \
        stopped.stderr[-3000:]  # stopped by the test, not by an error
    ckpt = tmp_path / "two" / "full" / "checkpoints" / "step-0000002"
    assert (ckpt / "state.json").exists()
    shutil.copytree(tmp_path / "two", tmp_path / "two-then-one")
    resumed = torchrun("train", str(config), f"output_dir={tmp_path / 'two'}", "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert main(["train", str(config), f"output_dir={tmp_path / 'two-then-one'}", "--resume"]) == 0
    for run in ("two", "two-then-one"):
        assert json.loads((tmp_path / run / "full" / "summary.json").read_text())["resumed_from_step"] == 2
        assert_same_run(tmp_path / "ref" / "full", tmp_path / run / "full")


def test_the_step_reduction_keeps_unused_tensors_out_of_the_optimizer():
    """``reduce_step`` with a simulated second rank: a tensor only the other rank used gets its
    gradient; a tensor no rank used keeps ``grad=None`` (AdamW skips it, as in one process);
    losses and auxiliary terms are summed, a term only one rank reported is kept."""
    from medpeft.distributed import Processes
    from medpeft.train import StepResult, reduce_step

    class TwoRanks(Processes):
        def __init__(self, other):
            super().__init__(rank=0, world=2)
            self.other = other  # the second rank's flat contribution, in call order

        def sum_(self, tensors):
            for t, o in zip(tensors, self.other):
                t.add_(o)

    model = torch.nn.Module()
    model.used_here = torch.nn.Parameter(torch.zeros(2))
    model.used_there = torch.nn.Parameter(torch.zeros(3))
    model.unused = torch.nn.Parameter(torch.zeros(1))
    model.used_here.grad = torch.tensor([1.0, 2.0])
    result = StepResult(torch.tensor(0.5), torch.tensor(0.7), {"con": torch.tensor(0.2)}, {"con": 0.1}, 10, 4)
    other = [torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0]),  # presence: used_here, used_there, unused; con, var
             torch.tensor([0.25, 0.35, 0.0, 0.3]),  # loss, objective, aux con, aux var
             torch.tensor([0.5, 0.5]), torch.tensor([3.0, 3.0, 3.0]), torch.tensor([0.0])]
    reduce_step(model, result, TwoRanks(other), {"con": 0.1, "var": 0.2, "off": 0.0})
    torch.testing.assert_close(model.used_here.grad, torch.tensor([1.5, 2.5]))
    torch.testing.assert_close(model.used_there.grad, torch.tensor([3.0, 3.0, 3.0]))
    assert model.unused.grad is None
    assert float(result.loss) == pytest.approx(0.75) and float(result.objective) == pytest.approx(1.05)
    assert set(result.aux) == {"con", "var"} and float(result.aux["var"]) == pytest.approx(0.3)
    assert result.aux_weights == {"con": 0.1, "var": 0.2}
