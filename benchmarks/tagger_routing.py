"""What the text-only tags do to BiRG's routing: keyword rules vs the learned tagger vs metadata.

    python benchmarks/tagger_routing.py [DATA_DIR] [--steps N] [--seeds 0 1 2]   (default: ../shared/data)

On the built-in tiny model: the shared MedMCQA sample (300 dev rows) is split into a training
part (rows 0-199) and an evaluation part (rows 200-299). A learned tagger is fitted with
``medpeft tagger train`` on the training part only (the evaluation part excluded). The
tag-routed preset (``--preset``; default BiRG-LoRA's main preset) is then trained once per
tag source and seed on the training part and audited on the evaluation part: the tags are the keyword rules (``text_only_tags``), the
learned tagger (``text_only_tags`` + ``data.tagger``), or MedMCQA's subject metadata (the
reference). Printed as Markdown: each source's agreement with the metadata specialty on the
evaluation part, the mean over modules of the audit's mutual information between the
selected rank atoms and the tags the run routed on (what ``medpeft audit`` reports), and
between the atoms and the *metadata* specialty (how much the routing carries the true
specialty), mean and range over seeds; the entropy of the routed specialty bounds the first.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from medpeft.adapters import family_of, reads_tags
from medpeft.adapters.registry import preset_config, table_presets
from medpeft.audit import collect_routing
from medpeft.cli import main as medpeft
from medpeft.config import load_config
from medpeft.dataset import TaggedRecord, load_eval_sets, run_tagger
from medpeft.pipeline import load_run_model, run_train
from medpeft.tags import tag_record

SAMPLE = "medmcqa/dev.rows0-299.jsonl"
TAG_SOURCES = ("keyword rules", "learned tagger", "metadata")


def tag_routed_preset() -> str:
    """The first table preset whose outputs depend on the tags (BiRG-LoRA's main preset)."""
    return next(p for p in table_presets() if reads_tags(preset_config(p)))


def run_config(root: Path, source: str, seed: int, steps: int, preset: str) -> dict:
    text_only = source != "metadata"
    return {
        "output_dir": str(root / f"{source.replace(' ', '-')}-seed{seed}"),
        "model": {"name": "tiny"}, "method": {"preset": preset},
        "data": {"max_length": 384, "tagger": str(root / "tagger") if source == "learned tagger" else None,
                 "train": [{"benchmark": "medmcqa", "path": str(root / "train.jsonl"), "text_only_tags": text_only}]},
        "train": {"steps": steps, "batch_size": 8, "micro_batch_size": 4, "lr": 5e-3, "warmup_steps": 2,
                  "seed": seed, "save_every": 0, "log_every": 10, "compile": False},
        "eval": {"batch_size": 8, "benchmarks": [
            {"benchmark": "medmcqa", "path": str(root / "eval.jsonl"), "text_only_tags": text_only}]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--preset", default=tag_routed_preset(), help="a tag-routed preset (default: BiRG-LoRA's)")
    args = parser.parse_args()
    lines = (Path(args.data) / SAMPLE).read_text(encoding="utf-8").splitlines()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "train.jsonl").write_text("\n".join(lines[:200]) + "\n", encoding="utf-8")
        (root / "eval.jsonl").write_text("\n".join(lines[200:300]) + "\n", encoding="utf-8")
        (root / "tagger.yaml").write_text(json.dumps({
            "output": str(root / "tagger"), "model": {"held_out": 0.0},
            "sources": [{"benchmark": "medmcqa", "path": str(root / "train.jsonl")}],
            "exclude": [{"benchmark": "medmcqa", "path": str(root / "eval.jsonl")}]}), encoding="utf-8")
        assert medpeft(["tagger", "train", str(root / "tagger.yaml")]) == 0
        rows = []
        for source in TAG_SOURCES:
            agreement, mi_tags, mi_meta = [], [], []
            for seed in args.seeds:
                path = root / f"{source}-{seed}.yaml".replace(" ", "-")
                path.write_text(json.dumps(run_config(root, source, seed, args.steps, args.preset)), encoding="utf-8")
                cfg = load_config(str(path))
                run_train(cfg)
                items = load_eval_sets(cfg.eval.benchmarks, run_tagger(cfg))["medmcqa"]
                truth = [TaggedRecord(t.record, tag_record(t.record), t.set_name) for t in items]
                loaded = load_run_model(cfg, Path(cfg.output_dir))
                routes = collect_routing(loaded.model, cfg.method, loaded.tokenizer, items, max_length=384)
                family = family_of(cfg.method)
                mi_tags.append(family.audit(loaded.model, cfg.method, routes, items).summary["mutual_information_bits"])
                mi_meta.append(family.audit(loaded.model, cfg.method, routes, truth).summary["mutual_information_bits"])
                agreement.append(np.mean([a.tags.specialty == b.tags.specialty for a, b in zip(items, truth)]))
            counts = np.unique([t.tags.specialty for t in items], return_counts=True)[1] / len(items)
            entropy = float(-(counts * np.log2(counts)).sum())
            rows.append((source, agreement[0], entropy, [m["specialty"] for m in mi_tags],
                         [m["specialty"] for m in mi_meta]))

    def spread(values: list[float]) -> str:
        return f"{np.mean(values):.3f} [{min(values):.3f}-{max(values):.3f}]"

    print(f"{args.preset} on the tiny model, {args.steps} steps, seeds {args.seeds}; trained on MedMCQA dev rows 0-199, "
          "audited on rows 200-299 (n=100)\n")
    print("| tags routed on | agreement with metadata specialty | entropy of routed specialty, bits "
          "| MI(atoms; routed specialty) bits | MI(atoms; metadata specialty) bits |")
    print("|---|---|---|---|---|")
    for source, agree, entropy, mi_t, mi_m in rows:
        print(f"| {source} | {100 * agree:.0f}% | {entropy:.2f} | {spread(mi_t)} | {spread(mi_m)} |")


if __name__ == "__main__":
    main()
