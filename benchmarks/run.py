"""medpeft's benchmark suite: training steps, evaluation throughput, pipeline vs plain Trainer.

    python benchmarks/run.py --config cpu-tiny [--json results.json]     # ~2 minutes on 2 CPU cores
    python benchmarks/run.py --config gpu-8b   [--json results.json]     # qwen3-8b architecture, random bf16 weights

Three tables, each measured in this one process:

1. Training step time and peak memory per method, with ratios to peft LoRA r16 and to
   LoRA of equal active rank (benchmarks/step_time.py; methods interleaved in rounds).
2. Evaluation throughput in questions/s: a bare batched forward over the prompts (full
   logits), the ``letters`` scorer (logits at the last position only), and the
   ``generate`` scorer (batched greedy, KV cache, at most 10 new tokens, stopping when
   every item has ended). Targets: letters >= 0.9x bare forward; generate >= 0.5x letters.
   ``--compile-decode`` adds the generate scorer with ``eval.compile_decode`` (static KV
   cache, compiled decoding step; experimental).
3. Our training pipeline vs a plain ``transformers.Trainer`` + ``peft`` LoRA r16 loop on the
   same data (padding to the batch maximum, full logits), in real (non-padding) tokens/s.
   Target: ours >= 1.3x.

Targets are printed next to the measurements; nothing here asserts them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = {
    "cpu-tiny": {"model": "tiny", "device": "cpu", "dtype": "fp32", "n_eval": 96, "eval_batch": 16,
                 "train_steps": 20, "batch": 8, "micro": 4, "max_length": 512},
    "gpu-8b": {"model": "qwen3-8b-random", "device": "cuda", "dtype": "bf16", "n_eval": 256, "eval_batch": 32,
               "train_steps": 10, "batch": 8, "micro": 4, "max_length": 768},
    "cpu-smollm2": {"model": "smollm2-135m", "device": "cpu", "dtype": "fp32", "n_eval": 48, "eval_batch": 16,
                    "train_steps": 4, "batch": 8, "micro": 4, "max_length": 256},
}


def load(cfg: dict):
    from medpeft.models import LoadedModel, load_model, load_tokenizer

    if cfg["model"] in ("tiny", "smollm2-135m"):  # built-in models: their real weights and tokenizers
        return load_model(cfg["model"], device=cfg["device"], dtype=cfg["dtype"])
    from step_time import random_model

    model = random_model("qwen3-8b", cfg["device"], torch.bfloat16)
    tok = load_tokenizer("tiny")  # timing needs token ids, not a real vocabulary
    model.resize_token_embeddings(len(tok)) if model.config.vocab_size < len(tok) else None
    return LoadedModel(model, tok, "qwen3-8b-random", torch.device(cfg["device"]))


def eval_items(n: int):
    from medpeft.config import load_config
    from medpeft.dataset import load_eval_sets, load_train_set

    cfg = load_config("quickstart")
    pool = [t for t in load_train_set(cfg) + [x for s in load_eval_sets(cfg.eval.benchmarks).values() for x in s]
            if t.record.question_type == "single"]
    return [pool[i % len(pool)] for i in range(n)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def eval_throughput(cfg: dict, compile_decode: bool = False) -> dict:
    from medpeft.evaluate import Evaluator, left_pad

    loaded = load(cfg)
    model = loaded.model.eval()
    items = eval_items(cfg["n_eval"])
    ev = Evaluator(model, loaded.tokenizer, batch_size=cfg["eval_batch"], max_new_tokens=10,
                   max_length=cfg["max_length"])
    batches = list(ev._batches(items))

    @torch.no_grad()
    def bare():
        for _, seqs in batches:
            ids, mask = left_pad(seqs, loaded.tokenizer.pad_token_id, loaded.device)
            model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False)

    paths = [("bare forward", bare), ("letters", lambda: ev.score(items, "letters")),
             ("generate", lambda: ev.score(items, "generate"))]
    if compile_decode:  # eval.compile_decode (experimental): static cache, compiled decoding step
        ev_static = Evaluator(model, loaded.tokenizer, batch_size=cfg["eval_batch"], max_new_tokens=10,
                              max_length=cfg["max_length"], compile_decode=True)
        paths.append(("generate, compiled decoding", lambda: ev_static.score(items, "generate")))
    out = {}
    for name, fn in paths:
        fn()  # warm-up
        sync(cfg["device"])
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            sync(cfg["device"])
            times.append(time.perf_counter() - t0)
        out[name] = len(items) / min(times)
    return out


def pipeline_vs_trainer(cfg: dict) -> dict:
    """Real tokens/s of medpeft's train() and of a plain Trainer + peft LoRA loop, same data and budget."""
    import tempfile

    from medpeft.config import load_config
    from medpeft.dataset import load_train_set
    from medpeft.prompts import PromptFormatter
    from medpeft.train import train

    steps, batch, micro = cfg["train_steps"], cfg["batch"], cfg["micro"]
    with tempfile.TemporaryDirectory() as tmp:
        def run_cfg(name, n_steps):
            return load_config("quickstart", [f"output_dir={tmp}/{name}", "methods=[]", f"train.steps={n_steps}",
                                              f"train.batch_size={batch}", f"train.micro_batch_size={micro}",
                                              "train.save_every=0", f"train.log_every={n_steps}",
                                              f"data.max_length={cfg['max_length']}", f"model.device={cfg['device']}",
                                              "train.compile=auto"])  # the pipeline's default (quickstart turns it off)

        items = load_train_set(run_cfg("warm", 4))
        # warm-up, untimed: kernels, allocator and, on CUDA, compilation of the decoder layers
        # (several micro-batch widths, so the timed run finds the dynamic-shape graphs ready)
        train(run_cfg("warm", 4), load(cfg), items)
        summary = train(run_cfg("ours", steps), load(cfg), items).summary
        ours = summary["tokens"] / summary["train_time_s"]

        from peft import LoraConfig, get_peft_model
        from transformers import Trainer, TrainingArguments

        loaded = load(cfg)
        fmt = PromptFormatter(loaded.tokenizer, cfg["max_length"])
        rows = []
        for t in items:
            e = fmt.encode_train(t.record)
            rows.append({"input_ids": e.input_ids, "labels": [-100] * e.prompt_len + e.input_ids[e.prompt_len:]})
        pad = loaded.tokenizer.pad_token_id

        def collate(batch_rows):  # pad to the batch maximum, as the usual SFT collators do
            width = max(len(r["input_ids"]) for r in batch_rows)
            ids = torch.full((len(batch_rows), width), pad)
            labels = torch.full((len(batch_rows), width), -100)
            mask = torch.zeros((len(batch_rows), width), dtype=torch.long)
            for i, r in enumerate(batch_rows):
                n = len(r["input_ids"])
                ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
            return {"input_ids": ids, "labels": labels, "attention_mask": mask}

        model = get_peft_model(loaded.model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "up_proj", "down_proj"]))
        args = TrainingArguments(output_dir=f"{tmp}/trainer", max_steps=steps, per_device_train_batch_size=micro,
                                 gradient_accumulation_steps=batch // micro, learning_rate=5e-3, report_to=[],
                                 save_strategy="no", logging_strategy="no", use_cpu=cfg["device"] == "cpu",
                                 bf16=cfg["dtype"] == "bf16", dataloader_num_workers=0, remove_unused_columns=False,
                                 disable_tqdm=True)
        warm_args = TrainingArguments(**{**args.to_dict(), "max_steps": 2, "output_dir": f"{tmp}/warm-trainer"})
        Trainer(model=model, args=warm_args, train_dataset=rows, data_collator=collate).train()  # warm-up, untimed
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
        result = trainer.train()
        mean_tokens = sum(len(r["input_ids"]) for r in rows) / len(rows)
        theirs = steps * batch * mean_tokens / result.metrics["train_runtime"]
    return {"ours_tokens_per_s": ours, "trainer_tokens_per_s": theirs, "ratio": ours / theirs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=CONFIGS, default="cpu-tiny")
    ap.add_argument("--skip-steps", action="store_true", help="skip table 1 (training step times)")
    ap.add_argument("--skip-eval", action="store_true", help="skip table 2 (evaluation throughput)")
    ap.add_argument("--skip-pipeline", action="store_true", help="skip table 3 (pipeline vs Trainer)")
    ap.add_argument("--json", help="also write every number here")
    ap.add_argument("--compile-decode", action="store_true",
                    help="also time the generate scorer with eval.compile_decode (static cache, compiled decoding)")
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu-8b needs a CUDA GPU")
    report: dict = {"config": args.config}
    if not args.skip_steps:
        import step_time

        rounds = {"cpu-tiny": "3", "gpu-8b": "2"}.get(args.config, "1")
        sys.argv = ["step_time.py", "--config", args.config, "--rounds", rounds, "--json", "/tmp/medpeft_step_time.json"]
        step_time.main()
        report["train_steps"] = json.loads(Path("/tmp/medpeft_step_time.json").read_text())
        print()
    if not args.skip_eval:
        evaluation_table(args, cfg, report)
    if not args.skip_pipeline:
        pipeline_table(cfg, report, args.json)


def evaluation_table(args, cfg: dict, report: dict) -> None:
    qps = eval_throughput(cfg, args.compile_decode)
    report["eval_questions_per_s"] = qps
    save(report, args.json)  # after each table, so a run cut short keeps what it measured
    print_table(f"Evaluation throughput ({args.config}, {cfg['n_eval']} single-answer questions, "
                f"batch {cfg['eval_batch']})", ["path", "questions/s", "ratio", "target"], [
        ["bare batched forward (full logits)", f"{qps['bare forward']:.1f}", "1.000", "-"],
        ["letters scorer", f"{qps['letters']:.1f}", f"{qps['letters'] / qps['bare forward']:.3f} x bare", ">= 0.9"],
        ["generate scorer (<= 10 new tokens)", f"{qps['generate']:.1f}",
         f"{qps['generate'] / qps['letters']:.3f} x letters", ">= 0.5"]] + ([
        ["generate scorer, compiled decoding (eval.compile_decode)", f"{qps['generate, compiled decoding']:.1f}",
         f"{qps['generate, compiled decoding'] / qps['letters']:.3f} x letters", ">= 0.5"]]
        if "generate, compiled decoding" in qps else []))


def pipeline_table(cfg: dict, report: dict, json_path: str | None) -> None:
    pvt = pipeline_vs_trainer(cfg)
    report["pipeline_vs_trainer"] = pvt
    save(report, json_path)
    print_table(f"Training pipeline vs plain Trainer + peft LoRA r16 ({cfg['train_steps']} steps, batch {cfg['batch']})",
                ["loop", "real tokens/s", "ratio", "target"], [
        ["transformers.Trainer + peft", f"{pvt['trainer_tokens_per_s']:.0f}", "1.000", "-"],
        ["medpeft train()", f"{pvt['ours_tokens_per_s']:.0f}", f"{pvt['ratio']:.3f}", ">= 1.3"]])


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(title)
    print()
    for cells in (header, ["---"] * len(header), *rows):
        print("| " + " | ".join(cells) + " |")
    print()


def save(report: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
