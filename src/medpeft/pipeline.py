"""The jobs behind the CLI: train, eval, run (train then eval)."""

from __future__ import annotations

import logging
from pathlib import Path

from .adapters import load_trained, uses_tags
from .config import RunConfig
from .dataset import load_eval_sets, load_train_set, perturb_tags
from .errors import MedpeftError
from .evaluate import Evaluator, evaluate_sets
from .models import load_model

log = logging.getLogger(__name__)


def _loaded(cfg: RunConfig):
    return load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device,
                      attn_implementation=cfg.model.attn_implementation)


def run_train(cfg: RunConfig, *, resume: bool = False) -> dict:
    from .train import train

    run_dir = Path(cfg.output_dir)
    if resume and (run_dir / "summary.json").exists():
        import json

        log.info("%s is already trained; reusing it", run_dir)
        return json.loads((run_dir / "summary.json").read_text())
    eval_sets = load_eval_sets(cfg.eval.benchmarks) if any(s.exclude for s in cfg.data.train) else {}
    train_set = load_train_set(cfg, eval_sets)
    return train(cfg, _loaded(cfg), train_set, resume=resume).summary


def load_run_model(cfg: RunConfig, run_dir: Path):
    """The base model of ``cfg`` with the trained adapter of ``run_dir``, and its tokenizer."""
    if not (run_dir / "adapter").exists():
        raise MedpeftError(f"{run_dir}: no trained adapter (folder 'adapter' is missing); train it first")
    loaded = _loaded(cfg)
    return load_trained(loaded.model, cfg.method, run_dir), loaded.tokenizer


def run_eval(cfg: RunConfig, *, run_dir: Path | None = None, out_dir: Path | None = None) -> dict:
    """Evaluate the trained run in ``run_dir``, or the bare base model when ``run_dir`` is None."""
    if not cfg.eval.benchmarks:
        raise MedpeftError("config key 'eval.benchmarks' is empty: nothing to evaluate")
    eval_sets = load_eval_sets(cfg.eval.benchmarks)
    loaded = _loaded(cfg)
    model = loaded.model if run_dir is None else load_run_model(cfg, run_dir)[0]
    evaluator = Evaluator(model, loaded.tokenizer, max_length=cfg.data.max_length, batch_size=cfg.eval.batch_size,
                          max_new_tokens=cfg.eval.max_new_tokens, device=loaded.device,
                          compile_decode=cfg.eval.compile_decode)
    out = out_dir or ((run_dir / "eval") if run_dir is not None else Path(cfg.output_dir) / "eval")
    meta = {"model": cfg.model.name, "method": cfg.method.name if run_dir is not None else "base",
            "run_dir": str(run_dir) if run_dir is not None else None}
    results = evaluate_sets(evaluator, eval_sets, cfg.eval.scorer, out, meta)
    if cfg.eval.perturb_rates and run_dir is not None and uses_tags(cfg.method):
        results["perturbation"] = run_perturbation(evaluator, eval_sets, cfg, out, results["macro_accuracy"])
    return results


def run_perturbation(evaluator: Evaluator, eval_sets: dict, cfg: RunConfig, out: Path, clean: float) -> dict:
    """Macro accuracy with p% of the items' tags replaced, per rate and perturbation seed (mean, std)."""
    import statistics

    from .io import write_json
    from .stats import accuracy_summary

    rates = {}
    for rate in cfg.eval.perturb_rates:
        macros = []
        for seed in cfg.eval.perturb_seeds:
            flags = {name: [p.correct for p in evaluator.score(perturb_tags(items, rate, seed), cfg.eval.scorer,
                                                                 desc=f"perturb {rate:.0%} {name}")]
                     for name, items in eval_sets.items()}
            macros.append(accuracy_summary(flags)["macro_accuracy"])
        rates[str(rate)] = {"macro": macros, "mean": statistics.fmean(macros),
                            "std": statistics.stdev(macros) if len(macros) > 1 else 0.0}
    summary = {"clean_macro": clean, "seeds": list(cfg.eval.perturb_seeds), "rates": rates}
    write_json(out / "perturbation.json", summary)
    return summary

