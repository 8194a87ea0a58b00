"""The cost of each evaluation protocol: questions/s of ``Evaluator.score`` (what ``medpeft
eval`` runs) on the same model and the same kind of items.

    python benchmarks/protocols.py --config cpu-tiny      # ~1 minute on 2 CPU cores
    python benchmarks/protocols.py --config cpu-smollm2   # the real small model, a few minutes

Items: the shipped example questions (medpeft's own, single-answer), cycled to ``n`` distinct
items per row: the MedQA/MedMCQA ones (English, what ``lm-eval`` defines) for every protocol, and the
CMB ones for ``opencompass-cmb`` beside ``medpeft`` on the same CMB items. ``cot``
generates up to ``--cot-tokens`` new tokens: a random-weight model never writes its final
line, so it runs to the limit (the worst case). The best of 3 timed runs after a warm-up.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import CONFIGS, load, print_table, save  # noqa: E402


def pools():
    from medpeft.config import load_config
    from medpeft.dataset import load_eval_sets, load_train_set

    cfg = load_config("quickstart")
    every = load_train_set(cfg) + [x for s in load_eval_sets(cfg.eval.benchmarks).values() for x in s]
    single = [t for t in every if t.record.question_type == "single"]
    return {"cmb": [t for t in single if t.record.benchmark == "cmb"],
            "lm-eval": [t for t in single if t.record.benchmark in ("medqa", "medmcqa")]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=[c for c in CONFIGS if c != "gpu-8b"] + ["gpu-8b"], default="cpu-tiny")
    ap.add_argument("--n", type=int, default=None, help="questions per protocol (default: the config's n_eval)")
    ap.add_argument("--cot-tokens", type=int, default=128, help="eval.cot_max_new_tokens for the cot row")
    ap.add_argument("--json", help="also write every number here")
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    n = args.n or cfg["n_eval"]
    from medpeft.evaluate import Evaluator

    loaded = load(cfg)
    model = loaded.model.eval()
    by = pools()
    def cycle(pool):
        """``n`` distinct items (a number appended to each stem): the lm-eval scorer shares one
        forward pass among identical inputs, so repeated items would flatter it."""
        import dataclasses

        return [dataclasses.replace(t, record=dataclasses.replace(
            t.record, id=f"{t.record.id}#{i}", question=f"{t.record.question} ({i})"))
                for i, t in ((i, pool[i % len(pool)]) for i in range(n))]

    plain = dict(batch_size=cfg["eval_batch"], max_length=cfg["max_length"], max_new_tokens=10,
                 cot_max_new_tokens=args.cot_tokens)
    ev, ev_chat = Evaluator(model, loaded.tokenizer, **plain), Evaluator(model, loaded.tokenizer, **plain,
                                                                          apply_chat_template=True)
    en, cmb = cycle(by["lm-eval"]), cycle(by["cmb"])
    rows = [("medpeft, letters", lambda: ev.score(en, "letters")),
            ("medpeft, generate (<= 10 new tokens)", lambda: ev.score(en, "generate")),
            ("lm-eval (MedQA/MedMCQA prompts, no chat template)",
             lambda: ev.score(en, "letters", protocol="lm-eval")),
            ("lm-eval, apply_chat_template", lambda: ev_chat.score(en, "letters", protocol="lm-eval")),
            (f"cot (<= {args.cot_tokens} new tokens)", lambda: ev.score(en, "letters", protocol="cot")),
            ("CMB items: medpeft, letters", lambda: ev.score(cmb, "letters")),
            ("CMB items: opencompass-cmb (<= 10 new tokens)", lambda: ev.score(cmb, "letters",
                                                                                 protocol="opencompass-cmb"))]
    qps, report = {}, {"config": args.config, "n": n}
    for name, fn in rows:
        fn()  # warm-up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            if cfg["device"] == "cuda":
                import torch

                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        qps[name] = n / min(times)
        report["questions_per_s"] = qps
        save(report, args.json)
    def ratio(name: str) -> str:
        base = qps["CMB items: medpeft, letters" if name.startswith("CMB") else "medpeft, letters"]
        return f"{qps[name] / base:.3f}"

    print_table(f"Protocol cost ({args.config}, {n} questions each, batch {cfg['eval_batch']})",
                ["protocol", "questions/s", "x medpeft letters (same items)"],
                [[name, f"{v:.1f}", ratio(name)] for name, v in qps.items()])


if __name__ == "__main__":
    main()
