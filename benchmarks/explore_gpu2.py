"""One-off GPU exploration 2 (issue 6): regional torch.compile of decoder layers."""
import gc, os, statistics, sys, time
from pathlib import Path
import torch
import torch._dynamo as dynamo
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import make_batches, method_config, random_model  # noqa: E402
from medpeft.adapters import apply_method, auxiliary_losses, set_routing  # noqa: E402
from medpeft.adapters.inject import remove_adapters  # noqa: E402
from medpeft.train import answer_loss_sum, causal_lm_of  # noqa: E402
SMOKE = "--smoke" in sys.argv
DEV = "cpu" if SMOKE else "cuda"
dynamo.config.cache_size_limit = 64
model = random_model("tiny" if SMOKE else "qwen3-8b", DEV, torch.bfloat16)
P = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
def sync():
    if not SMOKE: torch.cuda.synchronize()
def run(name, micro, compiled=True, steps=4):
    global model
    c = {"batch": 8, "micro": micro, "seq": 64 if SMOKE else 768}
    batches = make_batches(c, model.config.vocab_size, DEV)
    method = method_config(name)
    m = apply_method(model, method)
    for p in m.parameters():
        if p.requires_grad: p.data = p.data.float()
    for mod in m.modules():
        if hasattr(mod, "cast_input_dtype_enabled"): mod.cast_input_dtype_enabled = False
    layers = causal_lm_of(m).get_decoder().layers
    if compiled:
        for layer in layers: layer.compile()
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=not SMOKE)
    def step():
        for i, b in enumerate(batches):
            set_routing(m, b.prompt_mask, b.specialty, b.operation, parameter_losses=i == 0)
            with torch.autocast(DEV, dtype=torch.bfloat16):
                loss = answer_loss_sum(m, b) / 16
                aux, _ = auxiliary_losses(m, method, micro / 8)
                if aux is not None: loss = loss + aux
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
    try:
        t0 = time.perf_counter()
        for _ in range(2): step()
        sync(); warm = time.perf_counter() - t0
        if not SMOKE: torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter(); step(); sync(); times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        peak = 0 if SMOKE else torch.cuda.max_memory_allocated() / 2**30
        print(f"RESULT {name:10s} compiled={compiled} micro={micro} warm={warm:.0f}s step={t:.3f}s "
              f"mfu={4 * P * 6144 / t / 989e12:.1%} peak={peak:.1f}G graphs={dynamo.utils.counters['stats']['unique_graphs']}", flush=True)
    except torch.OutOfMemoryError:
        print(f"RESULT {name} micro={micro}: OOM", flush=True)
    opt.state.clear(); del opt, params
    for layer in layers:
        layer._compiled_call_impl = None
    model = m.unload() if hasattr(m, "unload") else remove_adapters(m)
    for p in model.parameters(): p.grad = None
    dynamo.reset(); gc.collect()
    if not SMOKE: torch.cuda.empty_cache()
print(f"RESULT matmul params {P/1e9:.2f}B", flush=True)
for name, micro in [] if "--eval-only" in sys.argv else [("lora-r16", 4), ("birg", 4), ("lora-r16", 8), ("birg", 8), ("rankwise", 4), ("moelora", 4)]:
    run(name, micro)
from medpeft.evaluate import Evaluator  # noqa: E402
from medpeft.models import load_tokenizer  # noqa: E402
from run import eval_items  # noqa: E402
tok = load_tokenizer("tiny"); model.eval(); items = eval_items(16 if SMOKE else 128)
for bs in (32, 64):
    ev = Evaluator(model, tok, batch_size=bs, max_new_tokens=10, max_length=768)
    for scorer in ("letters", "generate"):
        ev.score(items, scorer); sync(); t0 = time.perf_counter(); ev.score(items, scorer); sync()
        print(f"RESULT eval bs={bs} {scorer}: {len(items) / (time.perf_counter() - t0):.1f} q/s", flush=True)
