"""Suites: methods x seeds under one budget, resumable; perturbation; reports and plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medpeft.cli import main
from medpeft.config import load_config, method_variants
from medpeft.data.record import QARecord
from medpeft.dataset import TaggedRecord, perturb_tags
from medpeft.tags import Tags

TINY_SUITE = str(Path(__file__).resolve().parents[1] / "configs" / "paper" / "birg-main-tiny.yaml")


def test_variants_are_methods_times_seeds_under_one_budget():
    cfg = load_config(TINY_SUITE, ["output_dir=/x"])
    variants = method_variants(cfg)
    assert len(variants) == 12 * 2
    assert {v.output_dir for v in variants} == {f"/x/{m}/seed-{s}" for m in cfg.methods for s in (0, 1)}
    assert {(v.train.steps, v.train.batch_size, v.data.max_length) for v in variants} == {(20, 8, 384)}
    assert sorted({v.train.seed for v in variants}) == [0, 1]
    assert {v.method.name for v in variants} == {"lora", "dora", "birg", "rankwise", "moelora", "lora-library",
                                                 "arrow", "meteora", "lora-mixer", "medadapter"}
    assert {v.method.min_items for v in variants if v.method.name == "lora-library"} == {4}  # method_overrides


def test_perturbation_replaces_the_given_share_with_other_values():
    items = [TaggedRecord(QARecord(f"q{i}", "b", "en", "q", {"A": "a", "B": "b"}, frozenset("A"), "single"),
                          Tags("pharmacy", "medication", "", ""), "s") for i in range(50)]
    out = perturb_tags(items, 0.2, seed=3)
    changed = [o for o, i in zip(out, items) if o.tags != i.tags]
    assert len(changed) == 10
    assert all(o.tags.specialty not in ("pharmacy", "unknown") and o.tags.operation not in ("medication", "unknown")
               for o in changed)
    assert [o.tags for o in out] == [o.tags for o in perturb_tags(items, 0.2, seed=3)]  # seeded
    assert [o.tags for o in out] != [o.tags for o in perturb_tags(items, 0.2, seed=4)]


def test_tiny_suite_end_to_end_resumes_and_reports(tmp_path, capsys):
    out = tmp_path / "suite"
    args = ["suite", TINY_SUITE, f"output_dir={out}", "methods=[lora-r16, birg]", "train.steps=3",
            "eval.perturb_rates=[0.3]", "eval.perturb_seeds=[0, 1]", "eval.base=false"]
    assert main(args) == 0
    adapter = out / "birg" / "seed-1" / "adapter" / "adapter.safetensors"
    stamp = adapter.stat().st_mtime_ns
    assert main(args) == 0  # re-run: finished cells are reused, not retrained
    assert adapter.stat().st_mtime_ns == stamp
    report = json.loads((out / "report" / "report.json").read_text())
    rows = {r["label"]: r for r in report["methods"]}
    assert set(rows) == {"lora-r16", "birg"} and rows["birg"]["seeds"] == 2
    seed_macros = [json.loads((out / "birg" / f"seed-{s}" / "eval" / "results.json").read_text())["macro_accuracy"]
                   for s in (0, 1)]
    assert rows["birg"]["macro"]["mean"] == pytest.approx(100 * sum(seed_macros) / 2)
    # perturbation only for the tag-routed method
    assert (out / "birg" / "seed-0" / "eval" / "perturbation.json").exists()
    assert not (out / "lora-r16" / "seed-0" / "eval" / "perturbation.json").exists()
    assert rows["birg"]["perturbation"]["rates"] == [0.0, 0.3] and rows["lora-r16"]["perturbation"] is None
    (pair,) = report["comparisons"]
    assert (pair["a"], pair["b"]) == ("birg", "lora-r16") and pair["n"] == 28  # folders in sorted order
    md = (out / "report" / "report.md").read_text()
    assert "| Family | Method | Params |" in md and "| birg vs lora-r16 |" in md
    for png in ("accuracy_vs_params.png", "perturbation.png"):
        assert (out / "report" / png).stat().st_size > 5000
    assert "design_power" not in report and "## Design power" not in md  # opt-in: seconds to a minute
    # --power: the design's minimum detectable difference, from these runs' own predictions
    assert main(["report", str(out), "--power", "--power-simulations", "60", "--out", str(tmp_path / "r")]) == 0
    design = json.loads((tmp_path / "r" / "report.json").read_text())["design_power"]
    d = design["inputs"]
    from medpeft.compare import load_correctness

    runs = {k: [load_correctness(out / k / f"seed-{s}" / "eval" / "predictions.jsonl") for s in (0, 1)]
            for k in ("birg", "lora-r16")}
    keys = sorted(runs["birg"][0])
    benches = sorted({b for b, _ in keys})
    assert design["benchmarks"] == benches and d["seeds"] == 2
    assert d["items"] == [sum(1 for k in keys if k[0] == b) for b in benches]

    def macro(run):
        return sum(sum(run[k] for k in keys if k[0] == b) / d["items"][i] for i, b in enumerate(benches)) / len(benches)

    assert d["baseline"] == pytest.approx(np.median([np.mean([macro(r) for r in rs]) for rs in runs.values()]))
    assert d["discordance"] == pytest.approx(min(np.mean([sum(a[k] != b[k] for k in keys) / len(keys) for a, b in zip(
        runs["birg"], runs["lora-r16"])]), 2 * d["baseline"] * (1 - d["baseline"])))
    from medpeft.stats import PlanSettings, minimum_detectable_effect

    mde = 100 * minimum_detectable_effect(PlanSettings(**d))
    assert design["minimum_detectable_effect_pp"] == (pytest.approx(mde) if mde != float("inf") else None)
    assert "## Design power" in (tmp_path / "r" / "report.md").read_text()
    # routed methods get their routing audit (first seed), linked from the report
    assert (out / "birg" / "seed-0" / "audit" / "rank_usage.png").exists()
    assert not (out / "lora-r16" / "seed-0" / "audit").exists()
    assert "## Routing audits" in md and "rank_usage.png" in md


@pytest.mark.parametrize("name", ["birg-main", "birg-main-tiny", "birg-ablations", "birg-transfer", "medmoe-main",
                                  "sparsedoctor"])
def test_paper_suite_configs_are_valid(name):
    cfg = load_config(str(Path(TINY_SUITE).parent / f"{name}.yaml"))
    assert cfg.methods and cfg.eval.benchmarks and method_variants(cfg)


def test_ablation_plot(tmp_path):
    from medpeft.report import plot_ablation_drops

    rows = [{"label": "birg", "macro": {"mean": 69.3}}, {"label": "birg-no-axis", "macro": {"mean": 68.9}},
            {"label": "birg-top8", "macro": {"mean": 69.5}}, {"label": "lora-r16", "macro": {"mean": 68.5}}]
    assert plot_ablation_drops(rows, "birg", tmp_path / "a.png") and (tmp_path / "a.png").stat().st_size > 3000
    assert not plot_ablation_drops(rows[3:], "birg", tmp_path / "b.png")


def test_ablations_are_grouped_by_the_preset_they_are_built_on():
    from medpeft.report import ablation_groups

    labels = ["birg", "birg-no-axis", "birg-top4", "lora-r16", "lora-r4", "medmoe", "medmoe-uniform",
              "medmoe-bottom-heavy", "sparsedoctor", "x/birg", "x/birg-top8", "y/birg-top2"]
    assert ablation_groups(labels) == {"birg": ["birg-no-axis"], "medmoe": ["medmoe-uniform", "medmoe-bottom-heavy"],
                                       "x/birg": ["x/birg-top8"]}  # sparsedoctor's base moelora did not run


@pytest.mark.slow  # its own CI tier (pytest -m slow): the default suite must stay under 15 min
def test_the_tiny_birg_main_suite_runs_as_shipped(tmp_path):
    """configs/paper/birg-main-tiny.yaml unchanged (12 methods x 2 seeds, perturbation), as CI runs it: the
    eleven trainable rows of the BiRG-LoRA paper's Table III and the library they route over."""
    out = tmp_path / "tiny"
    assert main(["suite", TINY_SUITE, f"output_dir={out}"]) == 0
    report = json.loads((out / "report" / "report.json").read_text())
    assert {r["label"] for r in report["methods"]} == {"lora-r4", "lora-r16", "lora-r24", "dora-r24", "birg",
                                                        "rankwise", "moelora", "lora-library", "arrow", "meteora",
                                                        "lora-mixer", "medadapter", "base"}
    assert all(r["seeds"] == (1 if r["label"] == "base" else 2) for r in report["methods"])
    assert len(report["comparisons"]) == 78  # 13 rows, pairwise
    base = next(r for r in report["methods"] if r["label"] == "base")
    assert base["family"] == "Base model" and base["trainable_params"] == 0
    for routed in ("lora-library", "arrow", "meteora", "lora-mixer", "medadapter"):  # each router's audit (seed 0)
        assert (out / routed / "seed-0" / "audit" / "summary.json").exists(), routed
    scored = json.loads((out / "base" / "eval" / "results.json").read_text())
    assert scored["method"] == "base" and base["macro"]["mean"] == pytest.approx(100 * scored["macro_accuracy"])
    assert "| Base model | base | 0.00M |" in (out / "report" / "report.md").read_text()
    for seed in (0, 1):  # each seed's routers read that seed's library (7 specialty routes of 4-5 items)
        library = json.loads((out / "lora-library" / f"seed-{seed}" / "adapter" / "library.json").read_text())
        assert len(library["adapters"]) == 7
        router = json.loads((out / "meteora" / f"seed-{seed}" / "adapter" / "router.json").read_text())
        assert router["library"] == str((out / "lora-library" / f"seed-{seed}" / "adapter").resolve()) or \
            Path(router["library"]).resolve() == (out / "lora-library" / f"seed-{seed}" / "adapter").resolve()
    birg = next(r for r in report["methods"] if r["label"] == "birg")
    assert birg["perturbation"]["rates"] == [0.0, 0.1, 0.2, 0.3]


def test_grid_over_base_models_and_training_sources(tmp_path):
    from medpeft.config import grid_cells

    ex = Path(__file__).resolve().parents[1] / "src/medpeft/data/examples"
    cfg_file = tmp_path / "grid.yaml"
    cfg_file.write_text(f"""
output_dir: {tmp_path / 'g'}
methods: [lora-r16]
grid:
  train.lr: [0.001, 0.005]
  data.train:
    - [{{benchmark: cmb, path: {ex / 'cmb_train.json'}}}]
    - [{{benchmark: medqa, path: {ex / 'medqa_dev.jsonl'}}}]
train: {{steps: 2, save_every: 0}}
data: {{max_length: 256}}
eval:
  benchmarks: [{{benchmark: medmcqa, path: {ex / 'medmcqa_dev.jsonl'}}}]
""")
    cells = grid_cells(str(cfg_file))
    assert [label for label, _ in cells] == ["lr-0.001+train-0", "lr-0.001+train-1", "lr-0.005+train-0",
                                             "lr-0.005+train-1"]
    assert [c.train.lr for _, c in cells] == [0.001, 0.001, 0.005, 0.005]
    assert [c.data.train[0].benchmark for _, c in cells] == ["cmb", "medqa", "cmb", "medqa"]
    assert main(["suite", str(cfg_file)]) == 0
    report = json.loads((tmp_path / "g" / "report" / "report.json").read_text())
    assert sorted(r["label"] for r in report["methods"]) == [f"{label}/lora-r16" for label, _ in cells]
    with pytest.raises(Exception, match="grid"):
        load_config(str(cfg_file), ["grid={train.lr: 3}"])
