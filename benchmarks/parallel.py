"""Training throughput on 1 vs N processes (the reduction's overhead), in one run.

    python benchmarks/parallel.py --config cpu-tiny                 # 1 and 2 gloo processes on CPU
    python benchmarks/parallel.py --config cpu-smollm2               # SmolLM2-135M's architecture on CPU
    python benchmarks/parallel.py --config gpu-8b --processes 1 2 4 8          # qwen3-8b arch, NCCL
    python benchmarks/parallel.py --config gpu-8b --methods full --fsdp --processes 8  # peak memory per GPU

Each process count is one ``torchrun --standalone`` launch of this file, timing the step
training runs (``medpeft.train.training_step`` with the processes' reduction) on the same
global batch of random tokens: every rank builds the step's micro-batches and runs every
``world``-th one, as ``train()`` does. ``--fsdp`` sets accelerate's FSDP2 plugin variables
(what ``configs/accelerate/fsdp2.yaml`` exports). The table shows seconds per step, tokens
per second over all processes, the ratio to one process, and the share of the step spent in
the gradient reduction; ``--json PATH`` writes the numbers.

On a CPU the processes share the machine's cores: one process runs with every core, N
processes with cores/N threads each, so the ratio measures what N processes cost or gain on
the same hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = {
    "cpu-tiny": {"arch": "tiny", "device": "cpu", "dtype": "float32", "seq": 256, "batch": 8, "micro": 2,
                 "warmup": 2, "steps": 10},
    "cpu-smollm2": {"arch": "smollm2-135m", "device": "cpu", "dtype": "float32", "seq": 256, "batch": 8,
                    "micro": 2, "warmup": 1, "steps": 4},
    "gpu-8b": {"arch": "qwen3-8b", "device": "cuda", "dtype": "bfloat16", "seq": 768, "batch": 16, "micro": 2,
               "warmup": 2, "steps": 5},
}


def worker(cfg: dict, methods: list[str], out: Path) -> None:
    """One launch: time each method's training step under this launch's processes."""
    from step_time import make_batches, random_model, sync

    from medpeft import distributed
    from medpeft.adapters import family_of, preset_config
    from medpeft.config import TrainConfig
    from medpeft.precision import half_precision_adapters
    from medpeft import train as train_module

    proc = distributed.init_from_environment()
    device = str(proc.device) if proc.device is not None else cfg["device"]
    rows = []
    reduce_times: list[float] = []
    real_reduce = train_module.reduce_step

    def timed_reduce(*args, **kwargs):
        sync(cfg["device"])
        t0 = time.perf_counter()
        real_reduce(*args, **kwargs)
        sync(cfg["device"])
        reduce_times.append(time.perf_counter() - t0)

    train_module.reduce_step = timed_reduce
    for name in methods:
        torch.manual_seed(0)
        model = random_model(cfg["arch"], device, getattr(torch, cfg["dtype"]))
        batches = make_batches(cfg, model.config.vocab_size, device)
        method = preset_config(name)
        model = family_of(method).apply(model, method)
        model.train()
        if proc.fsdp:
            train_module.shard_model(model, method, proc)
        tc = TrainConfig(steps=cfg["warmup"] + cfg["steps"] + 1, batch_size=cfg["batch"],
                         micro_batch_size=cfg["micro"], lr=1e-5)
        opt, scheduler = train_module.build_optimizer(model, tc)
        times = []
        if cfg["device"] == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with half_precision_adapters(model):
            for i in range(cfg["warmup"] + cfg["steps"]):
                if i == cfg["warmup"]:
                    reduce_times.clear()
                proc.barrier()
                t0 = time.perf_counter()
                train_module.training_step(model, method, batches, opt, scheduler, batch_size=tc.batch_size,
                                           max_grad_norm=tc.max_grad_norm, proc=proc)
                sync(cfg["device"])
                times.append(time.perf_counter() - t0)
        times = times[cfg["warmup"]:]
        peak = torch.cuda.max_memory_allocated() / 2**30 if cfg["device"] == "cuda" else None
        peaks = proc.gather(peak)
        step_s = statistics.median(times)
        rows.append({"method": name, "processes": proc.world, "fsdp": proc.fsdp, "step_s": step_s,
                     "tokens_per_s": sum(b.n_tokens for b in batches) / step_s,
                     "reduce_share": (statistics.median(reduce_times) / step_s) if reduce_times else 0.0,
                     "peak_gib_per_process": peaks, "threads": torch.get_num_threads()})
        del model, opt
    if proc.is_main:
        out.write_text(json.dumps(rows))
    distributed.finish()


def launch(n: int, args, out: Path) -> list[dict]:
    env = dict(os.environ)
    if CONFIGS[args.config]["device"] == "cpu":  # the processes share the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    if args.fsdp:
        env.update({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), __file__,
           "--config", args.config, "--methods", *args.methods, "--worker-out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"the {n}-process launch failed")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cpu-tiny", choices=sorted(CONFIGS))
    parser.add_argument("--methods", nargs="+", help="method presets (default: the registry's benchmark presets)")
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (accelerate's plugin variables)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = CONFIGS[args.config]
    if not args.methods:
        from medpeft.adapters.registry import benchmark_presets

        args.methods = list(benchmark_presets())
    if args.worker_out:
        worker(cfg, args.methods, Path(args.worker_out))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.processes:
            rows += launch(n, args, Path(tmp) / f"{n}.json")
    one = {r["method"]: r for r in rows if r["processes"] == min(args.processes)}
    print(f"| method | processes | threads/process | s/step | tokens/s | vs {min(args.processes)} process(es) | "
          "reduction share | peak GiB/process |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "-" if r["peak_gib_per_process"][0] is None else \
            "/".join(f"{p:.1f}" for p in r["peak_gib_per_process"])
        print(f"| {r['method']} | {r['processes']}{' (FSDP2)' if r['fsdp'] else ''} | {r['threads']} | "
              f"{r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / one[r['method']]['tokens_per_s']:.2f}x "
              f"| {r['reduce_share']:.1%} | {peak} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
