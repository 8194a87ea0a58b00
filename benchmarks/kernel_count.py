"""Kernel launches per compiled decoder layer, per method: the host cost of a routed adapter.

    python benchmarks/kernel_count.py [--methods lora-r16 birg ...] [--json FILE]

A compiled training step of an 8B model on a GPU is bound by the host launching kernels
once the adapter adds small operations (docs/performance.md): the number of kernels and
library calls in the compiled graph of one decoder layer (forward and backward) is then
what a method costs on top of LoRA. The count does not need a GPU: it is read from the
code the compiler generates for the tiny model on CPU (C++ kernels there, Triton kernels on
a GPU; the fusion decisions are the compiler's, the same up to backend details). Each
method trains two steps of ``benchmarks/step_time.py``'s cpu-tiny setup with compiled
decoder layers; the table shows the graph shared by layers 2..L.

The count parses inductor's generated wrapper (``TORCH_LOGS=output_code``): kernel calls
``cpp_fused_*`` / ``triton_*``, ``extern_kernels.*`` (matrix products) and fallback
``torch.ops.aten.*`` calls. That text is internal to PyTorch, so a future release may need
the patterns adjusted; a count of zero means they no longer match.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import sys
from collections import Counter
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_time  # noqa: E402


def default_methods() -> list[str]:
    """LoRA r16 (the reference) and every routed preset the benchmarks time."""
    from medpeft.adapters import family_of, preset_config
    from medpeft.adapters.registry import benchmark_presets

    return [step_time.REFERENCE] + [p for p in benchmark_presets() if family_of(preset_config(p)).routed]

_CALL = re.compile(r"^\s+(?:buf\d+ = )?(cpp_fused_\w+|triton_\w+|extern_kernels\.\w+|torch\.ops\.aten\.\w+"
                   r"|aten\.\w+)[.\w]*\(", re.M)


def kind(call: str) -> str:
    if call.startswith(("cpp_fused", "triton_")):
        return "fused"
    if call.startswith("extern_kernels"):
        return "library"
    return "aten"


def count_graphs(output_code: str) -> dict[str, Counter]:
    """Launches in the ``call`` function of every generated graph, keyed by AOT graph id."""
    graphs = {}
    for chunk in output_code.split("# AOT ID:")[1:]:
        graph_id = chunk.split("\n", 1)[0].strip().strip("[]'")
        body = chunk.split("def call(", 1)[-1].split("def benchmark_compiled_module", 1)[0]
        graphs[graph_id] = Counter(kind(c) for c in _CALL.findall(body))
    return graphs


def launches(method: str) -> dict:
    """Forward/backward launches of the graph that layers 2..L share, after two compiled steps."""
    torch._dynamo.reset()
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    torch._logging.set_logs(output_code=True)
    logger = logging.getLogger("torch._inductor")
    logger.addHandler(handler)
    try:
        cfg = dict(step_time.CONFIGS["cpu-tiny"])
        cfg.update(compile=True, compile_mode=None, warmup=2, steps=0)
        torch.manual_seed(0)
        model = step_time.random_model(cfg["arch"], cfg["device"], cfg["dtype"])
        step_time.time_method(model, method, step_time.make_batches(cfg, model.config.vocab_size, "cpu"), cfg)
    finally:
        logger.removeHandler(handler)
        torch._logging.set_logs(output_code=False)
    graphs = count_graphs(captured.getvalue())
    # graph 0 is layer 1 (its input needs no gradient); the last forward/backward pair is layers 2..L
    fwd = [g for g in graphs if g.endswith("_forward")]
    shared = fwd[-1].rsplit("_", 1)[0] if fwd else None
    forward, backward = graphs.get(f"{shared}_forward", Counter()), graphs.get(f"{shared}_backward", Counter())
    return {"method": method, "forward": dict(forward), "backward": dict(backward),
            "total": sum(forward.values()) + sum(backward.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=None, help="presets (default: LoRA r16 and the routed ones)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    rows = [launches(m) for m in args.methods or default_methods()]
    ref = next((r for r in rows if r["method"] == step_time.REFERENCE), rows[0])
    print(f"Kernel launches per compiled decoder layer (tiny model, 7 adapted modules, torch {torch.__version__})\n")
    print("| method | forward (fused / library / aten) | backward (fused / library / aten) | total | x LoRA r16 |")
    print("|---|---|---|---|---|")
    for r in rows:
        f, b = r["forward"], r["backward"]
        print(f"| {r['method']} | {sum(f.values())} ({f.get('fused', 0)} / {f.get('library', 0)} / {f.get('aten', 0)}) "
              f"| {sum(b.values())} ({b.get('fused', 0)} / {b.get('library', 0)} / {b.get('aten', 0)}) | {r['total']} "
              f"| {r['total'] / ref['total']:.2f} |" if ref["total"] else f"| {r['method']} | - | - | 0 | - |")
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
