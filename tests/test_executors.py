"""Suites fanned out through submitit: the local executor with two CPU workers writes the
sequential suite's report; failed cells are reported with their logs and counted in the
exit code; the Slurm executor gets the resources asked for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medpeft.cli import main
from medpeft.executors import ExecutorSettings, cell_command, fan_out, make_executor
from medpeft.errors import MedpeftError


def suite_config(tmp_path: Path, methods: list[str], base: bool = True) -> Path:
    cfg = {"output_dir": str(tmp_path / "seq"), "methods": methods, "model": {"name": "tiny"},
           "data": {"max_length": 256, "train": [{"benchmark": "cmb", "name": "cmb-examples",
                                                  "path": "pkg:cmb_train.json"}]},
           "train": {"steps": 3, "batch_size": 4, "micro_batch_size": 2, "lr": 5e-3, "warmup_steps": 1,
                     "save_every": 0, "log_every": 1, "compile": False},
           "eval": {"scorer": "letters", "batch_size": 4, "base": base,
                    "benchmarks": [{"benchmark": "medqa", "name": "medqa-examples", "path": "pkg:medqa_dev.jsonl"}]}}
    path = tmp_path / "suite.yaml"
    path.write_text(json.dumps(cfg))
    return path


def strip_root(report: dict, root: Path) -> str:
    return json.dumps(report).replace(str(root), "ROOT")


@pytest.mark.slow  # its own CI tier (pytest -m slow): the default suite must stay under 15 min
def test_local_executor_with_two_cpu_workers_writes_the_sequential_report(tmp_path, capsys):
    config = suite_config(tmp_path, ["lora-r16", "birg"])
    assert main(["suite", str(config)]) == 0
    assert main(["suite", str(config), f"output_dir={tmp_path / 'fan'}", "--executor", "local",
                 "--devices", "cpu,cpu"]) == 0
    seq, fan = tmp_path / "seq", tmp_path / "fan"
    assert strip_root(json.loads((fan / "report" / "report.json").read_text()), fan) == \
        strip_root(json.loads((seq / "report" / "report.json").read_text()), seq)
    assert (fan / "report" / "report.md").read_text().replace(str(fan), "ROOT") == \
        (seq / "report" / "report.md").read_text().replace(str(seq), "ROOT")
    for cell in ("lora-r16", "birg", "base"):
        assert (fan / cell / "eval" / "predictions.jsonl").read_bytes() == \
            (seq / cell / "eval" / "predictions.jsonl").read_bytes()
    assert (fan / "birg" / "audit" / "summary.json").exists()  # the routed cell's audit runs in its job
    logs = list((fan / "jobs").glob("*_log.err"))
    assert len(logs) == 3
    # re-running reuses every finished cell: nothing is trained again
    before = {c: (fan / c / "summary.json").stat().st_mtime_ns for c in ("lora-r16", "birg")}
    assert main(["suite", str(config), f"output_dir={fan}", "--executor", "local", "--devices", "cpu,cpu"]) == 0
    assert before == {c: (fan / c / "summary.json").stat().st_mtime_ns for c in ("lora-r16", "birg")}


def test_a_failed_cell_is_reported_with_its_log_and_counted_in_the_exit_code(tmp_path, capsys):
    """The library's folder holds a finished run of another config: that cell fails in its job,
    the router reading it is not run, the independent cell finishes; exit code 2 (two cells)."""
    config = suite_config(tmp_path, ["lora-r16", "lora-library", "arrow"], base=False)
    fan = tmp_path / "fan"
    poisoned = fan / "lora-library"
    poisoned.mkdir(parents=True)
    (poisoned / "config.yaml").write_text((Path(config).read_text()).replace('"steps": 3', '"steps": 5'))
    (poisoned / "summary.json").write_text("{}")
    code = main(["suite", str(config), f"output_dir={fan}", "--executor", "local", "--devices", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    failed = [l for l in err.splitlines() if l.startswith("medpeft: cell ")]
    assert len(failed) == 2, err[-2000:]
    library = next(l for l in failed if "cell lora-library" in l)
    assert "holds a finished run of another config" in library and "(log: " in library
    log = Path(library.split("(log: ")[1].rstrip(")"))
    assert log.is_file() and "holds a finished run of another config" in log.read_text()
    assert "not run: it reads lora-library, which failed" in next(l for l in failed if "cell arrow" in l)
    assert (fan / "lora-r16" / "eval" / "results.json").exists()
    assert "lora-r16" in json.loads((fan / "results.json").read_text())


def test_a_suite_of_one_cell_fans_out_too(tmp_path):
    """No methods list: the suite's one cell is its output folder itself."""
    config = suite_config(tmp_path, [], base=False)
    fan = tmp_path / "fan"
    assert main(["suite", str(config), f"output_dir={fan}", "--executor", "local", "--devices", "cpu"]) == 0
    assert (fan / "eval" / "results.json").exists() and (fan / "report" / "report.md").exists()
    assert list(json.loads((fan / "results.json").read_text())) == ["fan"]


def test_dependencies_start_after_the_cells_they_read():
    """A router waits for its library; cells without dependencies start at once (a fake
    executor records the order)."""
    class FakeJob:
        def __init__(self, label, log):
            self.label, self.job_id = label, label
            self.paths = type("P", (), {"stderr": "/dev/null"})()
            log.append(("start", label))

        def done(self):
            return True

        def result(self):
            return ""

    class FakeExecutor:
        def __init__(self):
            self.log = []

        def update_parameters(self, **_):
            pass

        def submit(self, fn):
            return FakeJob(fn.command[-1], self.log)

    executor = FakeExecutor()
    commands = {label: ["medpeft", label] for label in ("arrow", "lora-library", "lora-r16")}
    outcomes = fan_out(commands, {"arrow": ["lora-library"], "lora-library": [], "lora-r16": []},
                       ExecutorSettings(kind="slurm", partition="p", poll_s=0), Path("/tmp/medpeft-fake-jobs"),
                       executor=executor)
    order = [label for _, label in executor.log]
    assert order.index("lora-library") < order.index("arrow") and all(o.ok for o in outcomes.values())


def test_slurm_executor_gets_partition_time_and_gpus(tmp_path, monkeypatch):
    fake_bin = tmp_path / "bin"  # submitit looks for srun; none here
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{__import__('os').environ['PATH']}")
    settings = ExecutorSettings(kind="slurm", partition="gpu-a100", time_min=300, gpus_per_cell=4, cpus_per_cell=32,
                                mem_gb=200, slurm_args={"account": "medlab"})
    settings.check()
    executor = make_executor(settings, tmp_path)
    script = executor._make_submission_file_text("echo cell", "uid")  # submitit's sbatch script
    for line in ("#SBATCH --partition=gpu-a100", "#SBATCH --time=300", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=32", "#SBATCH --mem=200GB", "#SBATCH --account=medlab"):
        assert line in script, script
    command = cell_command("suite.yaml", ["train.steps=9"], "birg/seed-1", processes=4)
    assert command[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "-m"]
    assert command[-2:] == ["--only-cell", "birg/seed-1"] and "train.steps=9" in command


def test_slurm_without_srun_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MedpeftError, match="submit from a Slurm login node"):
        make_executor(ExecutorSettings(kind="slurm", partition="p"), tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--executor", "local"], "needs --devices"),
    (["--executor", "local", "--devices", "0,x"], "neither a GPU index"),
    (["--executor", "local", "--devices", "0,1,2", "--gpus-per-cell", "2"], "not a multiple"),
    (["--executor", "slurm"], "needs --partition"),
    (["--executor", "local", "--devices", "cpu,0"], "not mixed"),
    (["--executor", "cloud"], "choose one of"),
])
def test_executor_settings_are_checked_before_any_work(tmp_path, capsys, args, message):
    config = suite_config(tmp_path, ["lora-r16"])
    assert main(["suite", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "seq").exists()


def test_settings_reject_bad_values():
    with pytest.raises(MedpeftError, match="gpus-per-cell"):
        ExecutorSettings(kind="local", devices=["0"], gpus_per_cell=0).check()
    assert ExecutorSettings(kind="local", devices=["0", "1", "2", "3"], gpus_per_cell=2).slots() == [(0, 1), (2, 3)]
    assert ExecutorSettings(kind="local", devices=["cpu", "cpu"]).slots() == [(), ()]
