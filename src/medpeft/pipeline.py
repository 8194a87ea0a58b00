"""The jobs behind the CLI: train, eval, audit, run (train then eval), suite (every cell, then the report)."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .adapters import family_of, load_trained, read_adapter_method, reads_tags, routing_state
from .config import RunConfig
from .dataset import load_eval_sets, load_train_set, perturb_tags, run_tagger
from .distributed import processes
from .errors import ConfigError, MedpeftError
from .evaluate import Evaluator, evaluate_sets, set_results
from .io import run_lock
from .models import LoadedModel, load_model
from .report import read_result_file

if TYPE_CHECKING:
    from .tagger import TextTagger

log = logging.getLogger(__name__)


def _loaded(cfg: RunConfig) -> LoadedModel:
    return load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device,
                      attn_implementation=cfg.model.attn_implementation,
                      trust_remote_code=cfg.model.trust_remote_code)


def finished_run(cfg: RunConfig, run_dir: Path) -> dict | None:
    """The summary of the finished run in ``run_dir`` if it was trained with ``cfg``; None if
    the folder holds no finished run; a finished run of another config is refused."""
    from .config import config_differences, load_config
    from .errors import ConfigError

    summary = run_dir / "summary.json"
    if not summary.exists():
        return None
    try:
        saved = load_config(str(run_dir / "config.yaml"))
    except ConfigError as err:  # e.g. a run of an older medpeft whose method settings are no longer valid
        raise MedpeftError(f"{run_dir / 'config.yaml'}: {err}") from None
    differ = [k for k in config_differences(saved, cfg) if k != "output_dir"]  # a folder may have moved
    if differ:
        raise MedpeftError(f"{run_dir} holds a finished run of another config (it differs in {', '.join(differ[:6])}"
                           f"{', ...' if len(differ) > 6 else ''}); choose another output_dir or remove that run")
    recorded = run_dir / TRAIN_FILES
    if recorded.is_file():  # runs of medpeft before 2026-12-03 did not record them
        files = read_result_file(recorded, ())
        if not isinstance(files, dict):
            raise MedpeftError(f"{recorded}: not a JSON object of file digests; re-run the training")
        changed = changed_files(files, source_file_digests(cfg.data.train))
        if changed:
            raise MedpeftError(f"{run_dir} was trained on other data than {changed[0]} now holds"
                               f"{f' (and {len(changed) - 1} more file(s))' if len(changed) > 1 else ''}; "
                               "choose another output_dir or remove that run to train on the new data")
    return read_result_file(summary, ("method", "trainable_params", "steps", "train_time_s"))


def check_method_fits(cfg: RunConfig) -> None:
    """Apply the method to the model's architecture on the meta device (no weights): target
    modules that match nothing are a config error before any data or weights are loaded."""
    import torch

    from .adapters import apply_method
    from .adapters.accounting import build_meta_model
    from .errors import ConfigError

    if not hasattr(cfg.method, "target_modules"):
        return
    try:
        model = build_meta_model(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError, MedpeftError):  # not resolvable here; loading the model reports it
        return
    try:
        with torch.device("meta"):
            apply_method(model, cfg.method)
    except ValueError as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"config key 'method.target_modules' {list(cfg.method.target_modules)} matches no layer "
                          f"of {cfg.model.name!r} ({first})") from None


def run_train(cfg: RunConfig, *, resume: bool = False, force_resume: bool = False) -> dict:
    """Train one run folder (holding its lock); with ``resume`` a finished run of the same
    config is reused and an interrupted one continued -- checked before anything is loaded."""
    from .train import check_processes, resume_changes, train

    run_dir = Path(cfg.output_dir)
    done = finished_run(cfg, run_dir) if resume else None
    if done is not None:  # reading a finished run needs no lock (its folder may be read-only)
        log.info("%s is already trained; reusing it", run_dir)
        return done
    check_method_fits(cfg)  # before the run folder is created
    check_processes(cfg)
    with run_lock(run_dir):
        done = finished_run(cfg, run_dir) if resume else None
        if done is not None:
            log.info("%s is already trained; reusing it", run_dir)
            return done
        if resume:
            resume_changes(cfg, run_dir, force=force_resume)
        elif (run_dir / "summary.json").exists():
            raise MedpeftError(f"{run_dir} already holds a finished run; choose another output_dir or pass --resume")
        eval_sets = load_eval_sets(cfg.eval.benchmarks, run_tagger(cfg)) \
            if any(s.exclude for s in cfg.data.train) or cfg.data.tagger else {}
        train_set = load_train_set(cfg, eval_sets)
        # before the model loads: the cells the method reads (a router's library) and the parts it
        # is made of (a library's routes) are checked; train() builds them again, cheaply
        family = family_of(cfg.method)
        family.parts(family.resolve(cfg.method, run_dir), train_set)
        files = source_file_digests(cfg.data.train)  # as read now; written once training succeeded
        tagger = run_tagger(cfg)
        if tagger is not None:  # the tags this run routes on; evaluation refuses a tagger changed since
            from .io import write_text

            check_tagger_unchanged(cfg, run_dir)
            if processes().is_main:  # only the main process writes
                write_text(run_dir / TAGGER_DIGEST, tagger.digest + "\n")
        summary = train(cfg, _loaded(cfg), train_set, resume=resume, force_resume=force_resume).summary
        if processes().is_main:  # what finished_run compares a reuse with
            from .io import write_json

            write_json(run_dir / TRAIN_FILES, files)
        return summary


TAGGER_DIGEST = "tagger.sha256"  # in a run folder: the learned tagger (data.tagger) it was trained with
TRAIN_FILES = "train_files.json"  # in a run folder: sha256 of the local training files it was trained on


def source_file_digests(sources) -> dict[str, str]:
    """sha256 of every local file the sources read (``path``, ``answer_file``, ``ground_truth``;
    a folder: of its files, in name order), by the path as configured. Hub sources have none
    (their dataset revision is the hub's business)."""
    import hashlib

    def digest(path: Path) -> str:
        h = hashlib.sha256()
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for f in files:
            if path.is_dir():
                h.update(str(f.relative_to(path)).encode("utf-8", "surrogatepass") + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()

    return {f: digest(Path(f)) for src in sources for f in (src.path, src.answer_file, src.ground_truth)
            if f and Path(f).exists()}


def changed_files(recorded: dict, current: dict) -> list[str]:
    """The paths whose recorded digest differs from (or is missing in) ``current``, and new ones."""
    return sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))


def check_tagger_unchanged(cfg: RunConfig, run_dir: Path) -> None:
    """A run trained with a learned tagger is evaluated (or resumed) with the same one: a tagger
    folder rewritten since would silently change the tags the run routes on."""
    recorded = Path(run_dir) / TAGGER_DIGEST
    if not recorded.is_file():
        return
    tagger = run_tagger(cfg)
    if tagger is None:
        raise MedpeftError(f"{run_dir} was trained with a learned tagger ({recorded}), but 'data.tagger' is unset: "
                           "its items would be tagged by other rules than the ones it routes on")
    if recorded.read_text(encoding="utf-8").strip() != tagger.digest:
        raise MedpeftError(f"config key 'data.tagger': {tagger.path} changed since {run_dir} was trained with it "
                           f"({recorded} records another tagger); the tags the run routes on would differ -- "
                           "evaluate with the tagger it was trained with")


def check_base_model(cfg: RunConfig, run_dir: Path, model=None) -> None:
    """An adapter is scored on the base model it was trained on (``summary.json`` records its
    name and revision): another ``model.name`` is refused -- unless it is the same local folder
    moved (equal revision) -- and so is a base model whose revision changed since training (a
    local folder's before loading, a hub model's commit once loaded: ``model``). Runs of medpeft
    before 2026-12-03 recorded no revision and are checked by name."""
    from .models import model_revision

    summary = Path(run_dir) / "summary.json"
    if not summary.is_file():
        return  # not a finished run: loading its adapter reports that
    recorded = read_result_file(summary, ("method",))
    name, revision = recorded.get("base_model"), recorded.get("base_model_revision")
    known = isinstance(revision, str) and revision != "unknown"
    now = model_revision(cfg.model.name, model)  # without the model: a local folder's or a built-in's only
    same_weights = known and now == revision
    if isinstance(name, str) and name != cfg.model.name and not same_weights:
        raise MedpeftError(f"config key 'model.name': {run_dir} was trained on base model {name!r}, not "
                           f"{cfg.model.name!r}; its adapter would be scored on another model "
                           f"(evaluate with model.name={name})")
    if known and now != "unknown" and not same_weights:
        raise MedpeftError(f"{summary}: base model {cfg.model.name!r} changed since the run was trained on it "
                           f"(revision {revision}, now {now}); its adapter would be scored on other weights")


def load_run_model(cfg: RunConfig, run_dir: Path, loaded: LoadedModel | None = None) -> LoadedModel:
    """The base model of ``cfg`` (loaded once, or ``loaded``) with the trained adapter of
    ``run_dir``; the adapter's own method must equal the config's, and the base model the one
    it was trained on (:func:`check_base_model`)."""
    check_base_model(cfg, run_dir)
    loaded = loaded or _loaded(cfg)
    check_base_model(cfg, run_dir, loaded.model)
    model = load_trained(loaded.model, run_dir, expected=cfg.method)
    return LoadedModel(model, loaded.tokenizer, loaded.name, loaded.device)


def _evaluator(cfg: RunConfig, loaded: LoadedModel) -> Evaluator:
    return Evaluator(loaded.model, loaded.tokenizer, max_length=cfg.data.max_length, batch_size=cfg.eval.batch_size,
                     max_new_tokens=cfg.eval.max_new_tokens, summary_max_new_tokens=cfg.eval.summary_max_new_tokens,
                     summary_limits={s.display_name: s.max_new_tokens for s in cfg.eval.benchmarks if s.max_new_tokens},
                     device=loaded.device, compile_decode=cfg.eval.compile_decode,
                     cot_max_new_tokens=cfg.eval.cot_max_new_tokens, apply_chat_template=cfg.eval.apply_chat_template)


def set_protocols(cfg: RunConfig, eval_sets: dict) -> dict[str, str]:
    """Each evaluation set's headline protocol (its source's ``protocol``, else ``eval.protocol``),
    checked to define every item of the set -- before any model is loaded."""
    from .protocols import MEDPEFT, get_protocol

    out = {}
    for i, src in enumerate(cfg.eval.benchmarks):
        name = src.protocol or cfg.eval.protocol
        proto = get_protocol(name)
        if proto is not None:
            undefined = [t for t in eval_sets[src.display_name] if proto.task(t.record) is None]
            if undefined:
                key = f"eval.benchmarks.{i}.protocol" if src.protocol else "eval.protocol"
                rec = undefined[0].record
                raise ConfigError(f"config key '{key}': protocol {name!r} defines no task for {len(undefined)} "
                                  f"item(s) of set '{src.display_name}' (e.g. {rec.id}, a {rec.question_type} "
                                  f"{rec.benchmark} item with options {''.join(rec.options)}); "
                                  f"score that set under another protocol (docs/evaluation.md)")
        out[src.display_name] = name if proto is not None else MEDPEFT
    return out


def extra_protocol_sets(name: str, eval_sets: dict) -> tuple[dict, list[str]]:
    """The sets an extra protocol defines whole, and the names of the others (skipped)."""
    from .protocols import get_protocol

    proto = get_protocol(name)
    if proto is None:
        return dict(eval_sets), []
    kept = {k: v for k, v in eval_sets.items() if v and all(proto.task(t.record) is not None for t in v)}
    return kept, [k for k in eval_sets if k not in kept]


def run_eval(cfg: RunConfig, *, run_dir: Path | None = None, out_dir: Path | None = None) -> dict:
    """Evaluate the trained run in ``run_dir``, or the bare base model when ``run_dir`` is None."""
    if not cfg.eval.benchmarks:
        raise MedpeftError("config key 'eval.benchmarks' is empty: nothing to evaluate")
    if run_dir is not None:
        method = read_adapter_method(run_dir, cfg.method)  # the adapter fits the config, before anything is loaded
        try:
            family_of(method).resolve(method, Path(run_dir))  # e.g. a router's library is there and fits
        except MedpeftError as err:
            raise MedpeftError(f"{Path(run_dir) / 'adapter'}: {err}") from None
    if run_dir is not None:
        check_tagger_unchanged(cfg, Path(run_dir))
        check_base_model(cfg, Path(run_dir))
    eval_sets = load_eval_sets(cfg.eval.benchmarks, run_tagger(cfg))
    set_protocols(cfg, eval_sets)
    loaded = _loaded(cfg)
    if run_dir is not None:
        loaded = load_run_model(cfg, run_dir, loaded)
    evaluator = _evaluator(cfg, loaded)
    out = out_dir or ((run_dir / "eval") if run_dir is not None else Path(cfg.output_dir) / "eval")
    writes_into_run = run_dir is not None and Path(out).resolve().is_relative_to(Path(run_dir).resolve())
    with run_lock(run_dir) if writes_into_run else contextlib.nullcontext():
        return _evaluate(cfg, evaluator, eval_sets, run_dir, out)


def _evaluate(cfg: RunConfig, evaluator: Evaluator, eval_sets: dict, run_dir: Path | None, out: Path) -> dict:
    from .io import write_json
    from .models import model_revision

    meta = {"model": cfg.model.name, "model_revision": model_revision(cfg.model.name, evaluator.model),
            "method": cfg.method.name if run_dir is not None else "base",
            "run_dir": str(run_dir) if run_dir is not None else None,
            "data_files": source_file_digests(cfg.eval.benchmarks)}
    protocols = set_protocols(cfg, eval_sets)
    meta["retention_margin"] = cfg.eval.retention_margin
    fields = {src.display_name: {"retention": src.is_retention} for src in cfg.eval.benchmarks}
    results = evaluate_sets(evaluator, eval_sets, cfg.eval.scorer, out, meta, protocols, cfg.eval.calibration_bins,
                            fields)
    if processes().is_main:
        write_reliability_plots(results, out)
    extra = {}
    for name in cfg.eval.extra_protocols:
        sets, skipped = extra_protocol_sets(name, eval_sets)
        folder = Path(out) / f"protocol-{name}"
        if sets:
            res = evaluate_sets(evaluator, sets, cfg.eval.scorer, folder, {**meta, "skipped_sets": skipped},
                                {k: name for k in sets}, cfg.eval.calibration_bins, fields)
            if processes().is_main:
                write_reliability_plots(res, folder)
            extra[name] = {"dir": folder.name, "macro_accuracy": res["macro_accuracy"], "sets": list(sets),
                           "skipped": skipped}
        else:
            extra[name] = {"dir": None, "sets": [], "skipped": skipped}
    if extra:
        results["extra_protocols"] = extra
    if cfg.eval.permute_options == "cyclic":
        results["robustness"] = run_robustness(evaluator, eval_sets, protocols, cfg, out)
    if cfg.eval.perturb_rates and run_dir is not None and reads_tags(cfg.method):
        results["perturbation"] = run_perturbation(evaluator, eval_sets, cfg, out, results["macro_accuracy"],
                                                   protocols)
    if processes().is_main and (extra or cfg.eval.permute_options != "none"):
        write_json(Path(out) / "results.json", results)  # with the extra protocols and robustness
    if processes().is_main:
        remove_stale_outputs(Path(out), results)
    return results


def remove_stale_outputs(out: Path, results: dict) -> None:
    """Outputs an earlier evaluation into ``out`` wrote and this one did not (a protocol folder,
    a set's reliability plot, robustness or perturbation numbers): left there, ``compare RUN``
    would pair a dropped protocol's old predictions and a reader would take old plots for new."""
    import shutil

    kept_protocols = {f"protocol-{name}" for name in results.get("extra_protocols", {})}
    for folder in out.glob("protocol-*"):
        if folder.is_dir() and folder.name not in kept_protocols and (folder / "results.json").is_file():
            shutil.rmtree(folder)
    for folder in [out, *(out / name for name in kept_protocols)]:
        plotted = {f"reliability-{safe_name(name)}.png" for name, bench in read_sets(folder).items()
                   if bench.get("calibration", {}).get("n")}
        for plot in folder.glob("reliability-*.png"):
            if plot.name not in plotted:
                plot.unlink()
    for name, key in (("robustness.json", "robustness"), ("perturbation.json", "perturbation")):
        if key not in results and (out / name).is_file():
            (out / name).unlink()


def read_sets(folder: Path) -> dict:
    """The ``benchmarks`` of the results.json in ``folder`` ({} when there is none)."""
    path = folder / "results.json"
    return read_result_file(path, ("benchmarks",))["benchmarks"] if path.is_file() else {}


def write_reliability_plots(results: dict, out: Path) -> None:
    """A reliability diagram per set that has calibration numbers (``reliability-<set>.png``)."""
    from .report import plot_reliability

    for name, bench in results["benchmarks"].items():
        if bench.get("calibration", {}).get("n"):
            plot_reliability(bench["calibration"], f"{name} ({bench['protocol']})",
                             Path(out) / f"reliability-{safe_name(name)}.png")


def safe_name(name: str) -> str:
    import re

    return re.sub(r"[^\w.-]+", "_", name)


def run_robustness(evaluator: Evaluator, eval_sets: dict, protocols: dict[str, str], cfg: RunConfig,
                   out: Path) -> dict:
    """Every multiple-choice item re-scored under each cyclic rotation of its options, under its
    set's protocol (``robustness.py``); written to ``robustness.json``."""
    from .io import write_json
    from .protocols import get_protocol
    from .robustness import permutable, robustness_summary, rotated_items

    summary, skipped = {}, {}
    for name, items in eval_sets.items():
        proto = get_protocol(protocols[name])
        items = [t for t in items if permutable(t.record)]
        if proto is not None and not all(proto.order_dependent_for(t.record) for t in items):
            skipped[name] = f"protocol {protocols[name]} shows this set no options (order cannot matter)"
            continue
        if not items:
            skipped[name] = "no multiple-choice items"
            continue
        preds = [[] for _ in items]
        correct = [[] for _ in items]
        for shift in range(max(len(t.record.options) for t in items)):
            idx = [i for i, t in enumerate(items) if len(t.record.options) > shift]
            scored = evaluator.score(rotated_items([items[i] for i in idx], shift), cfg.eval.scorer,
                                     desc=f"rotation {shift} {name}", protocol=protocols[name])
            for i, p in zip(idx, scored):
                preds[i].append(p.pred if isinstance(p.pred, frozenset) else frozenset(p.pred or ""))
                correct[i].append(bool(p.correct))
        summary[name] = robustness_summary([t.record for t in items], preds, correct)
    result = {"sets": summary, "skipped": skipped}
    if processes().is_main:
        write_json(Path(out) / "robustness.json", result)
    return result


def run_perturbation(evaluator: Evaluator, eval_sets: dict, cfg: RunConfig, out: Path, clean: float,
                     protocols: dict[str, str] | None = None) -> dict:
    """Macro accuracy with p% of the items' tags replaced, per rate and perturbation seed (mean, std)."""
    import statistics

    from .io import write_json

    rates = {}
    for rate in cfg.eval.perturb_rates:
        macros = []
        for seed in cfg.eval.perturb_seeds:
            preds = {name: evaluator.score(perturb_tags(items, rate, seed), cfg.eval.scorer,
                                           desc=f"perturb {rate:.0%} {name}",
                                           protocol=(protocols or {}).get(name, "medpeft"))
                     for name, items in eval_sets.items()}
            macros.append(set_results(preds)["macro_accuracy"])
        rates[str(rate)] = {"macro": macros, "mean": statistics.fmean(macros),
                            "std": statistics.stdev(macros) if len(macros) > 1 else 0.0}
    summary = {"clean_macro": clean, "seeds": list(cfg.eval.perturb_seeds), "rates": rates}
    if processes().is_main:
        write_json(out / "perturbation.json", summary)
    return summary


def run_audit(cfg: RunConfig, run_dir: Path, out_dir: Path | None = None):
    """Routing audit of a trained run on ``cfg``'s eval sets (multiple-choice and summarisation
    items; a method that predicts its own way, e.g. a verifier over candidate letters, is
    audited on its multiple-choice items only)."""
    from .audit import audit

    if not family_of(cfg.method).routed:
        raise MedpeftError(f"{run_dir}: method {cfg.method.name!r} has no routed adapters to audit "
                           "(its outputs do not depend on a per-question gate)")
    read_adapter_method(run_dir, cfg.method)  # before anything is loaded
    check_tagger_unchanged(cfg, run_dir)
    check_base_model(cfg, run_dir)
    items = [t for sets in load_eval_sets(cfg.eval.benchmarks, run_tagger(cfg)).values() for t in sets
             if t.record.question_type != "open"]
    if not any(t.record.question_type != "summary" for t in items):
        raise MedpeftError(f"{run_dir}: the audit sets hold no multiple-choice questions (open-ended ones, e.g. GSM8K, "
                           "have no routed prompt to audit)")
    loaded = load_run_model(cfg, run_dir)
    state = routing_state(loaded.model)
    if state is not None and state.predict is not None:  # its decisions are letters: questions only
        items = [t for t in items if t.record.question_type != "summary"]
    return audit(loaded.model, cfg.method, loaded.tokenizer, items, out_dir or run_dir / "audit",
                 max_length=cfg.data.max_length, batch_size=cfg.eval.batch_size)


def check_cells(variants: list[RunConfig]) -> None:
    """Every cell's evaluation sets load and its method fits the model: a bad eval path or
    record, or a method that fits no layer, must not cost a run."""
    checked: list = []
    for variant in variants:
        if (variant.eval.benchmarks, variant.eval.protocol) not in checked:
            set_protocols(variant, load_eval_sets(variant.eval.benchmarks, run_tagger(variant)))
            checked.append((variant.eval.benchmarks, variant.eval.protocol))
        if (variant.model, variant.method) not in checked:
            check_method_fits(variant)
            checked.append((variant.model, variant.method))


def cell_label(cfg: RunConfig, variant: RunConfig) -> str:
    """A cell's name in tables: its run folder below the suite's ``output_dir``."""
    run_dir = Path(variant.output_dir)
    return run_dir.relative_to(cfg.output_dir).as_posix() if run_dir != Path(cfg.output_dir) else run_dir.name


def run_one_cell(cfg: RunConfig, variant: RunConfig, *, resume: bool = False, force_resume: bool = False) -> dict:
    """Train then evaluate one run config (a finished one reused with ``resume``)."""
    run_dir = Path(variant.output_dir)
    with run_lock(run_dir):
        reused = resume and (run_dir / "summary.json").is_file()  # run_train reuses it, or refuses another config
        summary = run_train(variant, resume=resume, force_resume=force_resume)
        done = run_dir / "eval" / "results.json"
        results = read_result_file(done, ("benchmarks", "macro_accuracy")) if resume and done.exists() else None
        recorded = results.get("data_files") if results is not None else None
        if results is not None and changed_files(recorded if isinstance(recorded, dict) else {}, source_file_digests(
                variant.eval.benchmarks)):  # an evaluation file changed since (or the results predate the record)
            log.warning("%s: evaluation files changed since it was scored; evaluating again", run_dir)
            results = None
        if results is None:
            results = run_eval(variant, run_dir=run_dir)
    if processes().is_main:
        print(f"{'reused' if reused else 'trained'} {cell_label(cfg, variant)} ({summary['method']}): "
              f"{summary['trainable_params']:,} trainable "
              f"parameters, {summary['steps']} steps, {summary['train_time_s']:.1f}s", file=sys.stderr)
    return results


def run_cells(cfg: RunConfig, variants: list[RunConfig], *, resume: bool = False,
              force_resume: bool = False) -> dict[str, dict]:
    """Train then evaluate every run config (finished ones reused with ``resume``), by label.
    Every cell's evaluation sets are loaded and checked before the first training starts."""
    check_cells(variants)
    return {cell_label(cfg, v): run_one_cell(cfg, v, resume=resume, force_resume=force_resume) for v in variants}


BASE_CELL = "base"


def run_base_cell(cfg: RunConfig) -> dict:
    """The bare base model scored on the suite's sets, in ``output_dir/base`` (reused when done):
    ``eval/`` as any cell's, and a ``summary.json`` of zero trainable parameters (the report's
    "Base model" row)."""
    import dataclasses

    from .io import write_json

    folder = Path(cfg.output_dir) / BASE_CELL
    done = folder / "eval" / "results.json"
    base_cfg = dataclasses.replace(cfg, methods=[], method_overrides={}, seeds=[], grid={}, output_dir=str(folder),
                                   eval=dataclasses.replace(cfg.eval, base=False))
    with run_lock(folder):
        if done.exists() and (folder / "summary.json").exists():
            return read_result_file(done, ("benchmarks", "macro_accuracy"))
        results = run_eval(base_cfg, out_dir=folder / "eval")
        if processes().is_main:
            write_json(folder / "summary.json", {"method": "base", "base_model": cfg.model.name,
                                                 "trainable_params": 0, "steps": 0, "train_time_s": 0.0})
            print(f"scored the base model {cfg.model.name} ({BASE_CELL})", file=sys.stderr)
    processes().barrier()
    return results


def audited_variants(variants: list[RunConfig]) -> list[RunConfig]:
    """The cells a suite audits: each routed method's first seed."""
    seen: set[str] = set()
    out = []
    for variant in variants:
        run_dir = Path(variant.output_dir)
        method_dir = str(run_dir.parent if run_dir.name.startswith("seed-") else run_dir)
        if family_of(variant.method).routed and method_dir not in seen:
            seen.add(method_dir)
            out.append(variant)
    return out


def run_suite_cell(cfg: RunConfig, variants: list[RunConfig], label: str, audit: bool = True) -> dict:
    """One cell of a suite as every executor runs it: train, evaluate and (``audit``, a routed
    method's first seed) audit; the label ``base`` scores the base model. Finished work is reused."""
    if label == BASE_CELL and cfg.eval.base:
        return run_base_cell(cfg)
    by_label = {cell_label(cfg, v): v for v in variants}
    if label not in by_label:
        raise MedpeftError(f"--only-cell {label!r}: not a cell of this suite ({', '.join(by_label)})")
    variant = by_label[label]
    results = run_one_cell(cfg, variant, resume=True)
    if audit and any(v is variant for v in audited_variants(variants)):
        audit_cell(variant)
    return results


def audit_cell(variant: RunConfig) -> None:
    """The routing audit of a suite cell, unless it is there already."""
    run_dir = Path(variant.output_dir)
    processes().barrier()  # every rank decides on the same files
    if not (run_dir / "audit" / "summary.json").exists():
        run_audit(variant, run_dir)
    processes().barrier()


def suite_labels(cfg: RunConfig, variants: list[RunConfig]) -> list[str]:
    """The suite's cells in order (the base model's last)."""
    return [cell_label(cfg, v) for v in variants] + ([BASE_CELL] if cfg.eval.base else [])


def cell_needs(cfg: RunConfig, variants: list[RunConfig]) -> dict[str, list[str]]:
    """The cells each cell reads (a router: its library's cells in the same grid cell, every
    seed), which an executor must finish first."""
    def preset_and_group(v: RunConfig) -> tuple[str, str]:
        rel = Path(cell_label(cfg, v))
        rel = rel.parent if rel.name.startswith("seed-") else rel
        return rel.name, rel.parent.as_posix()

    keyed = [(cell_label(cfg, v), *preset_and_group(v), v) for v in variants]
    needs = {}
    for label, _, group, v in keyed:
        wanted = set(family_of(v.method).depends_on(v.method))
        needs[label] = [other for other, preset, g, _ in keyed if g == group and preset in wanted]
    if cfg.eval.base:
        needs[BASE_CELL] = []
    return needs


def run_suite(cfg: RunConfig, variants: list[RunConfig]) -> tuple[dict[str, dict], Path]:
    """Every cell of a suite under one budget, one after another in this process (finished
    cells reused), then the report; returns the cells' results and the report folder."""
    from .report import write_report

    check_cells(variants)
    # every cell trained and scored before the audits (as a fanned-out suite's jobs end up)
    table = {label: run_suite_cell(cfg, variants, label, audit=False) for label in suite_labels(cfg, variants)}
    for variant in audited_variants(variants):
        audit_cell(variant)
    out = Path(cfg.output_dir) / "report"
    write_report(Path(cfg.output_dir), out)
    return table, out


def run_contamination(cfg: RunConfig, out: Path, threshold: float) -> dict:
    """Near-duplicates between every training source (as training reads it, after the exact
    ``exclude``) and every evaluation set; the runs below ``output_dir`` re-scored on the clean
    items (``contamination.py``). Writes ``contamination.json`` and ``flagged.jsonl``."""
    from .compare import find_predictions
    from .contamination import DEFAULT_THRESHOLD, NUM_PERM, SHINGLE, clean_accuracy, near_duplicates
    from .io import write_json, write_jsonl

    if not cfg.data.train or not cfg.eval.benchmarks:
        raise ConfigError("config keys 'data.train' and 'eval.benchmarks' must both name sources to audit")
    eval_sets = load_eval_sets(cfg.eval.benchmarks, run_tagger(cfg))
    train: dict[str, list] = {}
    for t in load_train_set(cfg, eval_sets):
        train.setdefault(t.set_name, []).append(t.record)
    flagged, counts = near_duplicates(train, {k: [t.record for t in v] for k, v in eval_sets.items()}, threshold)
    ids: dict[str, set[str]] = {}
    for f in flagged:
        ids.setdefault(f["eval_set"], set()).add(f["eval_id"])
    runs = {}
    root = Path(cfg.output_dir)
    if root.is_dir():
        try:
            found = find_predictions(root)
        except MedpeftError:  # nothing evaluated yet
            found = []
        for label, path in found:
            rel = path.parent.parent.relative_to(root).as_posix() if path.parent.parent != root else label
            runs[rel] = clean_accuracy(path, ids)
    result = {"threshold": threshold, "default_threshold": DEFAULT_THRESHOLD, "shingle_words": SHINGLE,
              "num_perm": NUM_PERM, "pairs": list(counts.values()), "flagged_pairs": len(flagged),
              "flagged_eval_items": {k: len(v) for k, v in ids.items()}, "runs": runs}
    out = Path(out)
    write_json(out / "contamination.json", result)
    write_jsonl(out / "flagged.jsonl", flagged)
    return result


def source_provenance(src) -> dict:
    """Where a source's items came from: its file, or the hub id, config and split it resolves to."""
    if not src.hub:
        return {"benchmark": src.benchmark, "path": src.path}
    from .data.hub import HUB_IDS

    hub_id, config, split = HUB_IDS.get(src.benchmark, (None, None, None))
    return {"benchmark": src.benchmark, "hub_id": src.hub_id or hub_id, "hub_config": src.hub_config or config,
            "split": src.split or split}


def run_tagger_train(tcfg) -> "TextTagger":
    """``medpeft tagger train``: fit a learned tagger on ``tcfg.sources`` minus every excluded
    evaluation set (by id and normalized question text), record where it came from, save it."""
    from .config import load_config
    from .data import exclude_overlap
    from .dataset import load_source
    from .tagger import train_tagger

    names = [src.display_name for src in tcfg.sources]
    for i, name in enumerate(names):
        if names.count(name) > 1:
            raise ConfigError(f"config key 'sources.{i}': two sources are named {name!r}; give them distinct 'name's")
    excluded_sources = [(f"exclude.{i}", src) for i, src in enumerate(tcfg.exclude)]
    for i, run in enumerate(tcfg.exclude_runs):  # every run config is read before any data
        try:
            # its data.tagger may be the very tagger this command writes: not read here
            excluded_sources += [(f"exclude_runs.{i}", src)
                                 for src in load_config(run, ["data.tagger=null"]).eval.benchmarks]
        except ConfigError as err:
            raise ConfigError(f"config key 'exclude_runs.{i}' ({run}): {err}") from None

    def read(key: str, src) -> list:
        try:
            return load_source(src)
        except MedpeftError as err:
            raise MedpeftError(f"config key '{key}' ({src.display_name}): {err}") from None

    excluded = [r for key, src in excluded_sources for r in read(key, src)]
    sources, provenance = {}, {}
    for i, src in enumerate(tcfg.sources):
        read_records = read(f"sources.{i}", src)
        records, dropped = exclude_overlap(read_records, excluded)
        if read_records and not records:
            raise ConfigError(f"config key 'sources.{i}' ({src.display_name}): all {dropped} of its items are in an "
                              "excluded evaluation set ('exclude' / 'exclude_runs'); nothing is left to train on")
        sources[src.display_name] = records
        provenance[src.display_name] = {**source_provenance(src), "limit": src.limit,
                                        "dropped_as_evaluation_items": dropped}
        log.info("%s: %d items (%d dropped: shared with an excluded evaluation set)", src.display_name,
                 len(records), dropped)
    tagger = train_tagger(sources, tcfg.model)
    for name, info in provenance.items():
        tagger.info["sources"][name] = {**info, **tagger.info["sources"][name]}
    tagger.info["excluded_sets"] = [{"name": s.display_name, **source_provenance(s)} for _, s in excluded_sources]
    tagger.save(tcfg.output)
    return tagger
