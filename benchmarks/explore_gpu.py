"""One-off GPU exploration (issue 6): where does a training step's time go?"""
import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import make_batches, method_config, random_model  # noqa: E402

from medpeft.adapters import apply_method, auxiliary_losses, set_routing  # noqa: E402
from medpeft.adapters.inject import remove_adapters  # noqa: E402
from medpeft.train import answer_loss_sum  # noqa: E402

SMOKE = "--smoke" in sys.argv
DEV = "cpu" if SMOKE else "cuda"
cfg = {"batch": 8, "micro": 4, "seq": 64 if SMOKE else 768}
model = random_model("tiny" if SMOKE else "qwen3-8b", DEV, torch.bfloat16)
print("attn", model.config._attn_implementation, flush=True)
P = sum(m.weight.numel() for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
PEAK = 989e12


def sync():
    if not SMOKE:
        torch.cuda.synchronize()


def run(name, *, autocast=False, fp32_params=False, micro=4, dropout=None, steps=4, profile=False):
    global model
    c = dict(cfg, micro=micro)
    batches = make_batches(c, model.config.vocab_size, DEV)
    method = method_config(name)
    if dropout is not None:
        method.dropout = dropout
    m = apply_method(model, method)
    if fp32_params:
        for p in m.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if autocast:
        for mod in m.modules():
            if hasattr(mod, "cast_input_dtype_enabled"):
                mod.cast_input_dtype_enabled = False
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    n_answer = sum(b.n_answer_tokens for b in batches)
    ctx = (lambda: torch.autocast(DEV, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext

    def step():
        for i, b in enumerate(batches):
            set_routing(m, b.prompt_mask, b.specialty, b.operation, parameter_losses=i == 0)
            with ctx():
                loss = answer_loss_sum(m, b) / n_answer
                aux_total, _ = auxiliary_losses(m, method, b.input_ids.shape[0] / c["batch"])
                if aux_total is not None:
                    loss = loss + aux_total
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        for _ in range(2):
            step()
        sync()
        SMOKE or torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        tokens = c["batch"] * c["seq"]
        msg = (f"{name:10s} ac={autocast!s:5s} fp32={fp32_params!s:5s} micro={micro} drop={dropout} "
               f"step={t:.3f}s mfu={4 * P * tokens / t / PEAK:.1%} peak={0 if SMOKE else torch.cuda.max_memory_allocated() / 2**30:.1f}G")
        if profile:
            from torch.profiler import ProfilerActivity, profile as prof_ctx

            with prof_ctx(activities=[ProfilerActivity.CPU] + ([] if SMOKE else [ProfilerActivity.CUDA])) as prof:
                step()
                sync()
            ka = prof.key_averages()
            busy = sum(e.self_device_time_total for e in ka) / 1e6
            n_kernels = sum(e.count for e in ka if e.self_device_time_total > 0)
            msg += f" gpu_busy={busy:.3f}s kernels~{n_kernels}"
            print(msg, flush=True)
            print(ka.table(sort_by="self_cuda_time_total", row_limit=18), flush=True)
        else:
            print(msg, flush=True)
    except torch.OutOfMemoryError:
        print(f"{name} micro={micro}: OOM", flush=True)
    opt.state.clear()
    del opt, params
    model = m.unload() if hasattr(m, "unload") else remove_adapters(m)
    for p in model.parameters():
        p.grad = None
    gc.collect()
    SMOKE or torch.cuda.empty_cache()


print(f"matmul params {P / 1e9:.2f}B", flush=True)
run("lora-r16", profile=True)
run("lora-r16", autocast=True, profile=True)
run("lora-r16", autocast=True, dropout=0.0)
run("birg", profile=True)
run("birg", autocast=True, fp32_params=True, profile=True)
run("rankwise", autocast=True, fp32_params=True)
run("lora-r16", autocast=True, micro=8)
run("birg", autocast=True, fp32_params=True, micro=8)

# evaluation: prefill vs decode
from medpeft.evaluate import Evaluator  # noqa: E402
from medpeft.models import load_tokenizer  # noqa: E402
from run import eval_items  # noqa: E402

tok = load_tokenizer("tiny")
model.eval()
items = eval_items(16 if SMOKE else 128)
for bs in (32, 64):
    ev = Evaluator(model, tok, batch_size=bs, max_new_tokens=10, max_length=768)
    for scorer in ("letters", "generate"):
        ev.score(items, scorer)
        sync()
        t0 = time.perf_counter()
        ev.score(items, scorer)
        sync()
        print(f"eval bs={bs} {scorer}: {len(items) / (time.perf_counter() - t0):.1f} q/s", flush=True)
