"""Cost of the adapter-library routers: evaluation questions/s and training step time.

    python benchmarks/library_cost.py --config cpu-tiny      # about a minute on 2 CPU cores
    python benchmarks/library_cost.py --config gpu-8b        # qwen3-8b architecture, random bf16 weights

A library of one peft LoRA r8 per specialty route (8 adapters; random weights, since the cost
does not depend on them) is built on the benchmark model and saved as a ``lora-library`` run;
each router is resolved against it exactly as a suite cell is. Table 1: questions/s of the
``letters`` scorer (``Evaluator.score``, what ``medpeft eval`` runs) for LoRA r8 (one
adapter), the library with oracle routing, each router, and ``medadapter`` twice -- with an
empty candidate pool (K prompt passes per item plus the verifier) and with the pool cached.
Table 2: training step time (``medpeft.train.training_step``) of the routers trained with the
answer-loss loop (``meteora``, ``lora-mixer``) against LoRA r16, on the step_time.py batches.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from medpeft.adapters import catalogue, family_of, preset_config, save_trained  # noqa: E402
from medpeft.adapters.routing import routing_state  # noqa: E402
from medpeft.config import TrainConfig  # noqa: E402
from medpeft.train import build_optimizer, training_step  # noqa: E402

CONFIGS = {
    "cpu-tiny": {"model": "tiny", "step": "cpu-tiny", "device": "cpu", "n_eval": 96, "eval_batch": 16,
                 "max_length": 256, "steps": 5},
    "cpu-smollm2": {"model": "smollm2-135m", "step": "cpu-smollm2", "device": "cpu", "n_eval": 32, "eval_batch": 16,
                    "max_length": 256, "steps": 2},
    "gpu-8b": {"model": "qwen3-8b", "step": "gpu-8b", "device": "cuda", "n_eval": 128, "eval_batch": 16,
               "max_length": 768, "steps": 5},
}
REFERENCE = "lora-r16"  # the step table's reference, as in step_time.py


def routers() -> list[str]:
    """The presets that read another cell (a library), from the registry."""
    return [p for p in catalogue() if family_of(preset_config(p)).depends_on(preset_config(p))]


def built(model, name: str, suite: Path):
    method = preset_config(name)
    family = family_of(method)
    if family.depends_on(method):
        method = family.resolve(method, suite / name)
    torch.manual_seed(0)
    return family, method, family.apply(model, method)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=CONFIGS, default="cpu-tiny")
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    from run import eval_items, load

    loaded = load({**cfg, "dtype": "fp32" if cfg["device"] == "cpu" else "bf16"})
    model = loaded.model
    suite = Path(tempfile.mkdtemp(prefix="medpeft-library-bench-"))
    names = routers()
    first = preset_config(names[0])
    library_cell = family_of(first).depends_on(first)[0]
    try:
        family, method, lib = built(model, library_cell, suite)
        with torch.no_grad():
            for p in lib.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.02)
        save_trained(lib, method, suite / library_cell)
        one_adapter = f"lora-r{method.r}"  # one adapter of the library's shape
        model = family.remove(lib)
        items = eval_items(cfg["n_eval"])
        from medpeft.evaluate import Evaluator

        rows = []
        for name in [one_adapter, library_cell, *names]:
            family, method, m = built(model, name, suite)
            m.eval()
            ev = Evaluator(m, loaded.tokenizer, batch_size=cfg["eval_batch"], max_length=cfg["max_length"])
            state = routing_state(m)
            candidates = state is not None and state.predict is not None  # predicts over a candidate pool
            runs = ["cold", "warm"]
            times = []
            for _ in runs:
                t0 = time.perf_counter()
                ev.score(items, "letters")
                if cfg["device"] == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            if candidates:
                rows.append((f"{name} (empty pool: K={method.n_adapters} prompt passes + verifier)",
                             len(items) / times[0]))
                rows.append((f"{name} (pool cached: verifier only)", len(items) / times[1]))
            else:
                rows.append((name, len(items) / min(times)))
            model = family.remove(m)
        ref = rows[0][1]
        print(f"Evaluation, {args.config}: letters scorer, {len(items)} questions, a library of "
              f"{method.n_adapters} LoRA r8 adapters")
        print()
        print(f"| method | questions/s | x {one_adapter} |")
        print("|---|---|---|")
        for name, qps in rows:
            print(f"| {name} | {qps:.1f} | {qps / ref:.3f} |")
        print()

        from step_time import CONFIGS as STEP_CONFIGS
        from step_time import make_batches

        step_cfg = STEP_CONFIGS[cfg["step"]]
        batches = make_batches(step_cfg, model.config.vocab_size, cfg["device"])
        step_rows = []
        looped = [n for n in names if family_of(preset_config(n)).trains_with_loop(preset_config(n))]
        for name in [REFERENCE, *looped]:
            family, method, m = built(model, name, suite)
            m.train()
            tc = TrainConfig(steps=cfg["steps"] + 2, batch_size=step_cfg["batch"], micro_batch_size=step_cfg["micro"],
                             lr=1e-5)
            opt, scheduler = build_optimizer(m, tc)
            times = []
            for i in range(cfg["steps"] + 1):
                t0 = time.perf_counter()
                training_step(m, method, batches, opt, scheduler, batch_size=tc.batch_size, max_grad_norm=1.0)
                if cfg["device"] == "cuda":
                    torch.cuda.synchronize()
                if i:  # the first step warms up
                    times.append(time.perf_counter() - t0)
            step_rows.append((name, statistics.median(times)))
            opt.state.clear()
            model = family.remove(m)
        print(f"Training step, {args.config}: {step_cfg['arch']} shapes, seq {step_cfg['seq']}, batch {step_cfg['batch']}, "
              f"median of {cfg['steps']} steps (eager)")
        print()
        print("| method | step (s) | x LoRA r16 |")
        print("|---|---|---|")
        for name, s in step_rows:
            print(f"| {name} | {s:.4f} | {s / step_rows[0][1]:.3f} |")
    finally:
        shutil.rmtree(suite, ignore_errors=True)


if __name__ == "__main__":
    main()
