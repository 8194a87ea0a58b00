"""Training-step time and peak memory of routed adapters vs peft LoRA, in one run.

    python benchmarks/step_time.py --config cpu-tiny          # the tiny model on CPU
    python benchmarks/step_time.py --config gpu-8b            # qwen3-8b architecture, random bf16 weights

Every method trains on the same base model (adapters are removed between methods) and the
same batch of random tokens (answer = the last 2 tokens of each row), through the step
training runs (``medpeft.train.training_step``: routing context, answer-only loss with
logits at answer positions only, auxiliary losses, backward, the family's step updates
such as SparseDoctor's queue push, clipping, and training's own optimizer and schedule,
``build_optimizer``). The default methods are the registry's ``benchmark`` presets.
Prints a Markdown table with
ratios to peft LoRA r16 and, for each method, to peft LoRA of equal *active* rank (the rank
a token uses: top-k experts, all soft-merged experts, one route; timed in the same run as
``lora-rN``); ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from medpeft.adapters import family_of, preset_config  # noqa: E402
from medpeft.adapters.accounting import build_meta_model  # noqa: E402
from medpeft.adapters.registry import benchmark_presets  # noqa: E402
from medpeft.config import TrainConfig  # noqa: E402
from medpeft.precision import half_precision_adapters  # noqa: E402
from medpeft.train import (IGNORE, Batch, build_optimizer, causal_lm_of, compile_decoder_layers,  # noqa: E402
                           training_step, uncompile)

# Methods are timed in interleaved rounds (A B C A B C ...) so that drift of the machine
# (frequency, other load) affects every method alike; the table shows medians over all
# timed steps.
CONFIGS = {
    "cpu-tiny": {"arch": "tiny", "device": "cpu", "dtype": torch.float32, "seq": 256, "batch": 8, "micro": 4,
                 "warmup": 2, "steps": 10, "rounds": 5},
    "gpu-8b": {"arch": "qwen3-8b", "device": "cuda", "dtype": torch.bfloat16, "seq": 768, "batch": 8, "micro": 4,
               "warmup": 2, "steps": 5, "rounds": 3},
    # SmolLM2-135M's architecture (random weights) on CPU: a realistic size, unlike tiny
    "cpu-smollm2": {"arch": "smollm2-135m", "device": "cpu", "dtype": torch.float32, "seq": 256, "batch": 8,
                    "micro": 4, "warmup": 1, "steps": 3, "rounds": 1},
}
REFERENCE = "lora-r16"  # every ratio is to this preset (and to lora-r<N> of equal active rank)
PROFILE: dict = {"path": None}
# Dense bf16 tensor-core peak (FLOP/s) for model FLOPs utilisation, by device name.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def matmul_params(model: torch.nn.Module) -> int:
    """Weights of the decoder's linear layers (the LM head runs at answer positions only)."""
    return sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n)


def random_model(arch: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The architecture with random weights (timing does not need real ones), materialised on ``device``."""
    model = build_meta_model(arch).to(dtype=dtype)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for module in model.modules():  # to_empty leaves buffers as garbage: rebuild the rotary tables
            if hasattr(module, "inv_freq") and hasattr(module, "config"):
                with torch.device("cpu"):
                    fresh = type(module)(module.config)
                for name, buf in fresh.named_buffers():
                    module.get_buffer(name).copy_(buf)
    return model


def make_batches(cfg: dict, vocab: int, device: str) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(cfg["batch"] // cfg["micro"]):
        ids = torch.randint(0, vocab, (cfg["micro"], cfg["seq"]), generator=g)
        labels = torch.full_like(ids, IGNORE)
        labels[:, -2:] = ids[:, -2:]
        prompt = torch.ones_like(ids, dtype=torch.bool)
        prompt[:, -2:] = False
        b = Batch(ids, torch.ones_like(ids), labels, prompt, torch.randint(0, 8, (cfg["micro"],), generator=g),
                  torch.randint(0, 9, (cfg["micro"],), generator=g), 2 * cfg["micro"], ids.numel())
        out.append(b.to(torch.device(device)))
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_method(model, name: str, batches: list[Batch], cfg: dict) -> dict:
    method = preset_config(name)  # a preset, or lora-rN for any N
    family = family_of(method)
    torch.manual_seed(0)
    model = family.apply(model, method)
    if cfg.get("gradient_checkpointing"):  # as train.gradient_checkpointing
        causal_lm_of(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    compiled = compile_decoder_layers(model, cfg.get("compile_mode")) if cfg.get("compile") else []
    params = [p for p in model.parameters() if p.requires_grad]
    device = cfg["device"]
    tc = TrainConfig(steps=cfg["warmup"] + cfg["steps"] + 1, batch_size=cfg["batch"], micro_batch_size=cfg["micro"],
                     lr=1e-5)
    opt, scheduler = build_optimizer(model, tc)

    def step():
        training_step(model, method, batches, opt, scheduler, batch_size=tc.batch_size, max_grad_norm=tc.max_grad_norm)

    times, peak, warmup_s = [], None, 0.0
    half = contextlib.ExitStack()  # as train(): fp32 adapter weights, bf16 compute under autocast
    half.enter_context(half_precision_adapters(model))
    try:
        t_warm = time.perf_counter()
        for _ in range(cfg["warmup"]):
            step()
        sync(device)
        warmup_s = time.perf_counter() - t_warm
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(cfg["steps"]):
            t0 = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    except torch.OutOfMemoryError:  # e.g. full fine-tuning of an 8B model: reported, not fatal
        times, peak = [], None
        print(f"  {name}: out of memory", file=sys.stderr, flush=True)
    if PROFILE["path"] and times:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=acts) as prof:
            step()
            sync(device)
        sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
        with open(PROFILE["path"], "a") as fh:
            fh.write(f"\n===== {name}\n" + prof.key_averages().table(sort_by=sort, row_limit=30))
    half.close()
    trainable = sum(p.numel() for p in params)
    opt.state.clear()  # free the optimizer state before the next method is built
    uncompile(compiled)
    if cfg.get("gradient_checkpointing"):
        causal_lm_of(model).gradient_checkpointing_disable()
    base = family.remove(model)  # the bare base model, for the next method
    for p in base.parameters():
        p.grad = None
    gc.collect()
    return {"method": name, "times": times, "peak_gib": peak, "trainable_params": trainable, "model": base,
            "warmup_s": warmup_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=CONFIGS, default="cpu-tiny")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="method presets to time (default: the registry's benchmark presets)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--rounds", type=int, help="override the config's number of interleaved rounds")
    ap.add_argument("--profile", help="write a torch.profiler table of one step of each method to this file")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="torch.compile each decoder layer, as train.compile does (auto: on CUDA)")
    ap.add_argument("--compile-mode", help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute each decoder layer in the backward pass (train.gradient_checkpointing)")
    args = ap.parse_args()
    cfg = dict(CONFIGS[args.config])
    args.methods = args.methods or benchmark_presets()
    cfg["compile_mode"] = args.compile_mode
    cfg["gradient_checkpointing"] = args.gradient_checkpointing
    if args.rounds:
        cfg["rounds"] = args.rounds
    cfg["compile"] = cfg["device"] == "cuda" if args.compile == "auto" else args.compile == "on"
    PROFILE["path"] = args.profile
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu-8b needs a CUDA GPU")
    from medpeft.adapters.accounting import count_method

    # each routed method is also compared with peft LoRA of its active rank (timed in the same run)
    active_rank = {name: count_method(cfg["arch"], name).active_rank for name in args.methods
                   if family_of(preset_config(name)).routed}
    reference = {name: f"lora-r{rank}" for name, rank in active_rank.items()}
    names = list(dict.fromkeys([REFERENCE, *args.methods, *reference.values()]))
    torch.manual_seed(0)
    model = random_model(cfg["arch"], cfg["device"], cfg["dtype"])
    batches = make_batches(cfg, model.config.vocab_size, cfg["device"])
    rows = {name: {"method": name, "times": [], "round_medians": [], "peak_gib": None, "warmup_s": []}
            for name in names}
    n_matmul = matmul_params(model)
    peak = peak_flops()
    for _ in range(cfg["rounds"]):
        for name in names:
            res = time_method(model, name, batches, cfg)
            model = res.pop("model")
            row = rows[name]
            row["times"] += res["times"]
            if res["times"]:
                row["round_medians"].append(statistics.median(res["times"]))
            row["trainable_params"] = res["trainable_params"]
            row["warmup_s"].append(res["warmup_s"])
            if args.json:  # after every method, so a run cut short by a time limit keeps what it measured
                Path(args.json).write_text(json.dumps({"config": args.config, "partial": True,
                                                       "rows": list(rows.values())}, indent=2))
            if res["times"]:
                print(f"  {name}: median step {statistics.median(res['times']):.4f} s, first steps "
                      f"{res['warmup_s']:.1f} s, peak {res['peak_gib'] or 0:.2f} GiB", file=sys.stderr, flush=True)
            if res["peak_gib"] is not None:
                row["peak_gib"] = max(row["peak_gib"] or 0.0, res["peak_gib"])
            gc.collect()
            if cfg["device"] == "cuda":
                torch.cuda.empty_cache()
    rows = list(rows.values())
    if cfg["compile"]:
        from torch._dynamo.utils import counters

        print(f"  compiled graphs: {counters['stats']['unique_graphs']}, graph breaks: "
              f"{dict(counters['graph_break']) or 'none'}", file=sys.stderr, flush=True)
    tokens = cfg["batch"] * cfg["seq"]
    for r in rows:
        if not r["times"]:  # out of memory
            r["step_s"] = r["mfu"] = None
            continue
        r["step_s"] = statistics.median(r["times"])
        r["tokens_per_s"] = tokens / r["step_s"]
        # model FLOPs utilisation: 4 x matmul params x tokens (forward + input gradients; the
        # frozen weights get no weight gradients), over the step time and the device's peak
        r["mfu"] = 4 * n_matmul * tokens / r["step_s"] / peak if peak else None
        r["step_s_iqr"] = [statistics.quantiles(r["times"], n=4)[0], statistics.quantiles(r["times"], n=4)[2]]
    ref = next(r for r in rows if r["method"] == REFERENCE)
    device_name = torch.cuda.get_device_name() if cfg["device"] == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"Training step, {args.config}: {cfg['arch']}, {device_name}, {str(cfg['dtype']).replace('torch.', '')}, "
          f"seq {cfg['seq']}, effective batch {cfg['batch']} (micro {cfg['micro']}), "
          f"median of {cfg['rounds']} interleaved rounds x {cfg['steps']} steps, "
          f"{'compiled decoder layers' if cfg['compile'] else 'eager'}"
          f"{', gradient checkpointing' if cfg['gradient_checkpointing'] else ''}"
          f"{'; [min-max] of the ratio to LoRA r16 within each round' if cfg['rounds'] > 1 else ''}")
    print()
    by_name = {r["method"]: r for r in rows}
    print("| method | trainable | active rank | step (s) | tokens/s | x LoRA r16 | x LoRA of equal active rank | "
          "peak mem (GiB) | x LoRA r16 | MFU | first steps (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["step_s"] is None:
            print(f"| {r['method']} | {r['trainable_params'] / 1e6:.2f}M | - | out of memory | - | - | - | - | - | - | - |")
            continue
        # the same ratio within each round (methods interleaved: drift cancels), min-max over rounds
        paired = [m / lm for m, lm in zip(r["round_medians"], ref["round_medians"])]
        r["x_lora_r16_rounds"] = paired
        spread = f" [{min(paired):.2f}-{max(paired):.2f}]" if len(paired) > 1 else ""
        mem = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        mem_ratio = f"{r['peak_gib'] / ref['peak_gib']:.3f}" if r["peak_gib"] is not None else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        eq = reference.get(r["method"])
        eq = eq if eq and by_name[eq]["step_s"] else None
        eq_ratio = f"{r['step_s'] / by_name[eq]['step_s']:.3f} ({eq})" if eq else "-"
        r["x_equal_active_rank"] = r["step_s"] / by_name[eq]["step_s"] if eq else None
        print(f"| {r['method']} | {r['trainable_params'] / 1e6:.2f}M | {active_rank.get(r['method'], '-')} | "
              f"{r['step_s']:.4f} | {tokens / r['step_s']:,.0f} | {r['step_s'] / ref['step_s']:.3f}{spread} | {eq_ratio} | "
              f"{mem} | {mem_ratio} | "
              f"{mfu} | {r['warmup_s'][0]:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "device": device_name, "compiled": cfg["compile"],
                                               "gradient_checkpointing": cfg["gradient_checkpointing"],
                                               "matmul_params": n_matmul, "peak_flops": peak, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
