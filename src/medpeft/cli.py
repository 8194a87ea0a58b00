"""Command line: ``medpeft <subcommand>``.

Each subcommand is a small function that parses its arguments and calls a job of
``pipeline.py`` (or a reader: compare, report, params, methods), added to the parser in
:func:`build_parser`. Bad input (config, data) is reported as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import MedpeftError

EXIT_BAD_INPUT = 2
# the subcommands that run on several processes (torchrun / accelerate launch)
MULTI_PROCESS_COMMANDS = ("train", "run", "eval")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file, or a built-in config name (e.g. quickstart)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=20")
    _add_skip_invalid(p)


def _add_skip_invalid(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip malformed benchmark records (reported as counts per reason) instead of stopping")


def _out_dir(value: str, results_of: Path | None = None, *, writes_results: bool = False) -> Path:
    """An ``--out`` folder: refused when a file is in the way, and -- for a command that writes
    results (``writes_results``) -- when it is, or is inside, a run folder other than
    ``results_of``: that run's own results there would be overwritten. Before any work."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise MedpeftError(f"--out {value!r} is a file, not a folder")
    if writes_results:
        own = results_of.resolve() if results_of is not None else None
        for folder in (path.resolve(), *path.resolve().parents):
            if folder == own:
                break
            if (folder / "config.yaml").is_file() and any(
                    (folder / part).exists() for part in ("summary.json", "adapter", "checkpoints")):
                raise MedpeftError(f"--out {value!r} is inside the run folder {folder}, whose results it would "
                                   "overwrite; choose a folder outside other runs")
    return path


def _add_force_resume(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force-resume", action="store_true",
                   help="with --resume: continue even if the config differs from the interrupted run's "
                        "(the differing keys are logged and recorded in summary.json)")


def _load(config: str, overrides: list[str], skip_invalid: bool):
    from .config import load_config

    cfg = load_config(config, overrides)
    if skip_invalid:
        for src in [*cfg.data.train, *cfg.eval.benchmarks]:
            src.skip_invalid = True
    return cfg


def _load_run_config(run_dir: Path, overrides: list[str], skip_invalid: bool):
    """A run folder's config.yaml (with the command line's overrides); its errors name the file."""
    from .errors import ConfigError

    try:
        return _load(str(run_dir / "config.yaml"), overrides, skip_invalid)
    except ConfigError as err:
        where = "config.yaml" + (" with the overrides given" if overrides else "")
        message = str(err)
        raise MedpeftError(message if message.startswith(str(run_dir)) else f"{run_dir / where}: {message}") from None


def _variants(args) -> tuple:
    """The config, and every (grid cell x method x seed) run config of it."""
    from .config import grid_cells, method_variants

    cfg = _load(args.config, args.overrides, args.skip_invalid)
    variants = []
    for _, cell in grid_cells(args.config, args.overrides):
        if args.skip_invalid:
            for src in [*cell.data.train, *cell.eval.benchmarks]:
                src.skip_invalid = True
        variants += method_variants(cell)
    return cfg, variants


def cmd_train(args) -> int:
    from .pipeline import run_train

    _, variants = _variants(args)
    summaries = [run_train(variant, resume=args.resume, force_resume=args.force_resume) for variant in variants]
    from .distributed import processes

    if not processes().is_main:
        return 0
    print(json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=2))
    return 0


def _print_results(results: dict, label: str, out_dir: Path) -> None:
    from .report import results_table

    print(results_table({label: results}), end="")
    print(f"predictions and results in {out_dir}")


def cmd_eval(args) -> int:
    from .pipeline import run_eval

    target = Path(args.target)
    if target.is_dir() and not (target / "config.yaml").exists() and not (target / "config.json").exists():
        raise MedpeftError(f"{target}: neither a run folder (no config.yaml) nor a model folder (no config.json)")
    if (target / "config.yaml").exists():
        cfg = _load_run_config(target, args.overrides, args.skip_invalid)
        out = _out_dir(args.out, target, writes_results=True) if args.out else target / "eval"
        results = run_eval(cfg, run_dir=target, out_dir=out)
        label = f"{cfg.method.name} ({target.name})"
    else:  # a bare base model: hub id, local folder or 'tiny'
        cfg = _load(args.config or "quickstart", [f"model.name={args.target}", *args.overrides], args.skip_invalid)
        out = _out_dir(args.out, writes_results=True) if args.out else Path(cfg.output_dir) / "eval-base"
        results = run_eval(cfg, run_dir=None, out_dir=out)
        label = f"base ({args.target})"
    from .distributed import processes

    if processes().is_main:
        _print_results(results, label, out)
    return 0


def cmd_run(args) -> int:
    from .io import write_json
    from .pipeline import run_cells
    from .report import results_table

    cfg, variants = _variants(args)
    table = run_cells(cfg, variants, resume=args.resume, force_resume=args.force_resume)
    from .distributed import processes

    if not processes().is_main:
        return 0  # the main process prints and writes
    print(results_table(table), end="")
    if cfg.methods or len(cfg.seeds) > 1 or cfg.grid:
        write_json(Path(cfg.output_dir) / "results.json", table)
        print(f"run folders, and all results in results.json, under {cfg.output_dir}")
    else:
        print(f"predictions and results in {Path(cfg.output_dir) / 'eval'}")
    return 0


def cmd_tag(args) -> int:
    from .data import load_benchmark
    from .io import write_jsonl
    from .tagger import TextTagger
    from .tags import tag_record

    if args.out and args.out != "-" and Path(args.out).resolve() == Path(args.file).resolve():
        raise MedpeftError(f"--out {args.out!r} is the input file; the tags would overwrite the data")
    tagger = TextTagger.load(args.tagger) if args.tagger else None
    result = load_benchmark(args.benchmark, args.file, skip_invalid=args.skip_invalid, encoding=args.encoding,
                            answer_file=args.answer_file, ground_truth=args.ground_truth, cop_base=args.cop_base)
    rows = [tag_record(r, text_only=args.text_only, tagger=tagger).to_json(r.id) for r in result.records]
    if tagger is not None:
        seen = tagger.trained_on(result.records)
        if seen:  # tagging is harmless, but these tags are not held-out predictions
            print(f"note: the tagger was trained on {len(seen)} of these {len(result.records)} questions",
                  file=sys.stderr)
    if args.out and args.out != "-":
        if Path(args.out).is_dir():
            raise MedpeftError(f"--out {args.out!r} is a folder; give a file name (or - for standard output)")
        write_jsonl(args.out, rows)
        print(f"wrote {len(rows)} tags to {args.out}", file=sys.stderr)
    else:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    if result.skipped:
        print(f"skipped {len(result.skipped)} invalid records: {result.skip_summary()}", file=sys.stderr)
    return 0


def cmd_tagger_train(args) -> int:
    from .config import load_tagger_config
    from .pipeline import run_tagger_train
    from .tagger import agreement_table

    cfg = load_tagger_config(args.config, args.overrides)
    tagger = run_tagger_train(cfg)
    print(agreement_table(tagger), end="")
    print(f"tagger ({len(tagger.vocabulary)} n-grams; axes {', '.join(tagger.axes)}) written to {cfg.output}")
    return 0


def cmd_clinical_sum(args) -> int:
    from .data.mimic import build_clinical_sum

    if Path(args.out).resolve() == Path(args.noteevents).resolve():
        raise MedpeftError(f"--out {args.out!r} is the input file")
    meta = build_clinical_sum(args.noteevents, args.out, kind=args.kind, n=args.n, seed=args.seed,
                              section=args.section)
    print(f"wrote {meta['written']} pairs ({meta['eligible']} eligible of {meta['rows_read']} notes, seed "
          f"{meta['seed']}) to {args.out}; settings and counts in {args.out}.meta.json")
    return 0


def cmd_params(args) -> int:
    from .adapters.accounting import count_method, params_table
    from .adapters.registry import table_rows

    counts = []
    for name in args.methods or table_rows():
        try:
            counts.append(count_method(args.arch, name))
        except (ValueError, TypeError, KeyError) as err:  # unknown preset, or an architecture it cannot build
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise MedpeftError(f"{name} on {args.arch}: {first}") from None
        except OSError as err:  # an unknown arch name that is no hub id either
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise MedpeftError(f"architecture {args.arch!r}: {first}") from None
    if args.json:
        print(json.dumps([c.to_json(args.arch) for c in counts], indent=2))
    else:
        print(params_table(counts, args.arch), end="")
    return 0


def cmd_methods(args) -> int:
    from .adapters.registry import describe_presets

    rows = describe_presets()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| preset | method | family | built on | changes | about |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        name = r["preset"] + (f" (= {', '.join(r['aliases'])})" if r["aliases"] else "")
        changes = ", ".join(f"{k}: {json.dumps(v)}" for k, v in r["changes"].items()) or "-"
        print(f"| {name} | {r['method']} | {r['label']} | {r['base'] or 'defaults'} | {changes} | {r['about']} |")
    return 0


def cmd_audit(args) -> int:
    from .pipeline import run_audit

    run_dir = Path(args.run_dir)
    overrides = list(args.overrides)
    if args.data:
        sources = []
        for item in args.data:
            bench, sep, path = item.partition("=")
            if not sep:
                raise MedpeftError(f"--data {item!r} must look like BENCHMARK=PATH (e.g. cmb=data/cmb.json)")
            sources.append({"benchmark": bench, "name": bench, "path": str(Path(path).resolve())})
        overrides.append(f"eval.benchmarks={json.dumps(sources, ensure_ascii=False)}")  # JSON is YAML: any path
    cfg = _load_run_config(run_dir, overrides, args.skip_invalid)
    out = _out_dir(args.out, run_dir, writes_results=True) if args.out else run_dir / "audit"
    result = run_audit(cfg, run_dir, out)
    print(result.headline)
    print(f"per-question routes, summary.json and usage heatmaps (PNG) in {out}")
    return 0


def cmd_contamination(args) -> int:
    from .pipeline import run_contamination

    if not 0 < args.threshold <= 1:
        raise MedpeftError(f"--threshold must be a Jaccard similarity in (0, 1], got {args.threshold}")
    cfg = _load(args.config, args.overrides, args.skip_invalid)
    out = _out_dir(args.out) if args.out else Path(cfg.output_dir) / "contamination"
    result = run_contamination(cfg, out, args.threshold)
    print("| training source | evaluation set | eval items | flagged | share |")
    print("|---|---|---|---|---|")
    for c in result["pairs"]:
        print(f"| {c['train_source']} | {c['eval_set']} | {c['eval_items']} | {c['flagged_items']} | "
              f"{100 * c['share']:.1f}% |")
    for run, sets in result["runs"].items():
        for bench, v in sets.items():
            clean = "-" if v["clean_score"] is None else f"{100 * v['clean_score']:.1f}"
            print(f"{run} {bench}: {100 * v['score']:.1f} on {v['n']} items, {clean} on the {v['clean_n']} clean ones")
    print(f"contamination.json and flagged.jsonl in {out}")
    return 0


def cmd_plan(args) -> int:
    """Power planning by simulation with compare's own bootstrap (stats.PlanSettings)."""
    import dataclasses

    from .stats import PlanSettings, items_needed, minimum_detectable_effect, seeds_needed

    items, baseline, discordance, source = args.items, args.baseline, args.discordance, "given"
    if args.pilot:
        from .compare import check_same_items, load_correctness

        a, b = (load_correctness(Path(p)) for p in args.pilot)
        check_same_items([(f"--pilot {p}", Path(p)) for p in args.pilot])
        keys = sorted(set(a) & set(b))
        if not keys:
            raise MedpeftError(f"--pilot {args.pilot[0]} and {args.pilot[1]} share no items")
        benches = sorted({k[0] for k in keys})
        items = items or [sum(1 for k in keys if k[0] == n) for n in benches]
        baseline = sum(b[k] for k in keys) / len(keys)
        discordance = sum(a[k] != b[k] for k in keys) / len(keys)
        source = f"pilot ({len(keys)} paired items, {len(benches)} benchmarks)"
    if not items:
        raise MedpeftError("give --items N [N ...] (items per benchmark) or --pilot A B")
    checks = [(all(n >= 2 for n in items), f"--items must be >= 2, got {items}"),
              (0 < baseline < 1, f"--baseline must be in (0, 1), got {baseline}"),
              (0 < discordance <= 2 * baseline * (1 - baseline), f"--discordance must be in (0, 2 b (1 - b)] = "
               f"(0, {2 * baseline * (1 - baseline):.3f}] for a baseline b = {baseline:.3f}, got {discordance}"),
              (args.seeds >= 1, f"--seeds must be >= 1, got {args.seeds}"),
              (args.seed_sd >= 0, f"--seed-sd must be >= 0, got {args.seed_sd}"),
              (0 < args.power < 1 and 0 < args.alpha < 1, "--power and --alpha must be in (0, 1)"),
              (args.simulations >= 20, f"--simulations must be >= 20, got {args.simulations}")]
    for ok, message in checks:
        if not ok:
            raise MedpeftError(message)
    settings = PlanSettings(items=list(items), seeds=args.seeds, baseline=baseline, discordance=discordance,
                            seed_sd=args.seed_sd / 100, alpha=args.alpha, power=args.power,
                            simulations=args.simulations, resamples=args.resamples)
    result = {"inputs": {**dataclasses.asdict(settings), "seed_sd": args.seed_sd, "source": source},
              "minimum_detectable_effect_pp": 100 * minimum_detectable_effect(settings)}
    lines = [f"inputs ({source}): items per benchmark {list(items)}, {args.seeds} seed(s) per method, baseline "
             f"{100 * baseline:.1f}%, discordance {100 * discordance:.1f}%, seed sd {args.seed_sd} pp; power "
             f"{args.power}, two-sided level {args.alpha}, {args.simulations} simulated studies",
             f"minimum detectable macro difference: {result['minimum_detectable_effect_pp']:.2f} pp"]
    if args.target is not None:
        n = items_needed(args.target / 100, settings)
        result["items_needed_per_benchmark"] = n
        lines.append(f"items per benchmark for {args.target} pp at {args.seeds} seed(s): "
                     + (str(n) if n else "more than 200000 (seed variance dominates: add seeds)"))
        if args.seed_sd > 0:
            k = seeds_needed(args.target / 100, settings)
            result["seeds_needed"] = k
            lines.append(f"seeds per method for {args.target} pp at {list(items)} items: " + (str(k) if k else "> 20"))
    print(json.dumps(result, indent=2) if args.json else "\n".join(lines))
    if args.out:
        from .io import write_json

        write_json(args.out, result)
    return 0


def cmd_compare(args) -> int:
    from .compare import compare_runs, compare_table
    from .io import write_json

    if not 1 <= args.resamples <= 10_000_000:
        raise MedpeftError(f"--resamples must be in 1..10000000, got {args.resamples}")
    if not 0 <= args.seed < 2**32:
        raise MedpeftError(f"--seed must be in 0..2^32-1, got {args.seed}")
    if args.out and Path(args.out).is_dir():
        raise MedpeftError(f"--out {args.out!r} is a folder; give a file name for the JSON")
    if args.out:
        from .compare import find_predictions

        inputs = {p.resolve() for run in args.runs for _, p in find_predictions(Path(run))}
        if Path(args.out).resolve() in inputs:
            raise MedpeftError(f"--out {args.out!r} is one of the prediction files compared; choose another name")
    if args.min_stratum_items < 2:
        raise MedpeftError(f"--min-stratum-items must be >= 2, got {args.min_stratum_items}")
    pairs = compare_runs([Path(p) for p in args.runs], intersect=args.intersect, n_resamples=args.resamples,
                         seed=args.seed, min_stratum_items=args.min_stratum_items)
    if args.json:
        print(json.dumps(pairs, indent=2))
    else:
        print(compare_table(pairs), end="")
    if args.out:
        write_json(args.out, pairs)
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    out = _out_dir(args.out) if args.out else Path(args.root) / "report"
    if args.power_simulations < 20:
        raise MedpeftError(f"--power-simulations must be >= 20, got {args.power_simulations}")
    write_report(Path(args.root), out, compare=not args.no_compare, power=args.power,
                 power_simulations=args.power_simulations)
    print((out / "report.md").read_text(encoding="utf-8"), end="")
    print(f"report.md, report.json and plots in {out}")
    return 0


def _executor_settings(args):
    from .executors import ExecutorSettings

    extra = {}
    for item in args.slurm_arg or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MedpeftError(f"--slurm-arg {item!r} must look like KEY=VALUE (e.g. account=myproject)")
        extra[key] = value
    settings = ExecutorSettings(kind=args.executor, devices=[d.strip() for d in (args.devices or "").split(",")
                                                             if d.strip()],
                                gpus_per_cell=args.gpus_per_cell, partition=args.partition, time_min=args.time,
                                cpus_per_cell=args.cpus_per_cell, mem_gb=args.mem_gb, slurm_args=extra)
    settings.check()
    return settings


def cmd_suite(args) -> int:
    """Every (method, seed) of the config; finished runs are reused; routing audits of the
    routed methods (first seed); then the report. ``--executor local|slurm`` runs the cells
    as submitit jobs; the exit code is the number of cells that failed."""
    from .distributed import processes
    from .io import write_json
    from .pipeline import cell_label, check_cells, run_suite, run_suite_cell
    from .report import results_table

    settings = _executor_settings(args)
    cfg, variants = _variants(args)
    if args.only_cell:  # one cell, as a job of a fanned-out suite runs it
        check_cells([v for v in variants if cell_label(cfg, v) == args.only_cell])
        results = run_suite_cell(cfg, variants, args.only_cell)
        if processes().is_main:
            print(results_table({args.only_cell: results}), end="")
        return 0
    if settings.kind == "sequential":
        table, out = run_suite(cfg, variants)
        print(results_table(table), end="")
        write_json(Path(cfg.output_dir) / "results.json", table)
        print(f"report.md, report.json and plots in {out}")
        return 0
    return _fan_out_suite(args, cfg, variants, settings)


def _fan_out_suite(args, cfg, variants, settings) -> int:
    from .executors import cell_command, fan_out
    from .io import write_json
    from .pipeline import BASE_CELL, cell_label, cell_needs, check_cells, suite_labels
    from .report import read_result_file, results_table, write_report

    check_cells(variants)  # before any job is submitted
    labels = suite_labels(cfg, variants)
    uses_gpus = settings.kind == "slurm" or any(d != "cpu" for d in settings.devices)
    commands = {label: cell_command(args.config, args.overrides, label, skip_invalid=args.skip_invalid,
                                    processes=settings.gpus_per_cell if uses_gpus else 1) for label in labels}
    outcomes = fan_out(commands, cell_needs(cfg, variants), settings, Path(cfg.output_dir) / "jobs")
    root = Path(cfg.output_dir)
    folders = {cell_label(cfg, v): Path(v.output_dir) for v in variants} | {BASE_CELL: root / BASE_CELL}
    table = {label: read_result_file(folders[label] / "eval" / "results.json", ("benchmarks", "macro_accuracy"))
             for label, outcome in outcomes.items() if outcome.ok}
    failed = [o for o in outcomes.values() if not o.ok]
    if table:
        print(results_table(table), end="")
        write_json(root / "results.json", table)
        out = root / "report"
        write_report(root, out)
        print(f"report.md, report.json and plots in {out}")
    for o in failed:
        print(f"medpeft: cell {o.label} failed: {o.reason}" + (f" (log: {o.log})" if o.log else ""), file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(outcomes)} cells failed; run the same command again to retry them (finished "
              "cells are reused)", file=sys.stderr)
    return min(len(failed), 125)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medpeft", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an adapter from a config")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    _add_force_resume(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run folder, or a bare base model")
    p.add_argument("target", help="run folder, or a base model (hub id, local folder, or 'tiny')")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--config", help="config naming the eval benchmarks (base-model evaluation; default quickstart)")
    p.add_argument("--out", help="output folder (default: RUN/eval)")
    _add_skip_invalid(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("run", help="train then evaluate, from one config")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    _add_force_resume(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("tag", help="write specialty/operation tags of a benchmark file")
    p.add_argument("file", help="benchmark file or folder in its native format")
    p.add_argument("--benchmark", required=True, help="medqa, medmcqa, pubmedqa, cmb, cmexam, cmmlu, mmlu, gsm8k, "
                   "aci-bench, summary")
    p.add_argument("--text-only", action="store_true", help="ignore metadata; keyword rules (or --tagger) only")
    p.add_argument("--tagger", help="a learned tagger folder (medpeft tagger train) used instead of the keyword rules")
    p.add_argument("--out", help="write JSON lines here (default, or -: standard output)")
    p.add_argument("--skip-invalid", action="store_true", help="skip malformed records and report them")
    p.add_argument("--answer-file", help="CMB answer-key file")
    p.add_argument("--cop-base", type=int, default=1, choices=(0, 1), help="MedMCQA cop indexing (1 = original)")
    p.add_argument("--ground-truth", help="PubMedQA test_ground_truth.json (keeps its PMIDs, labelled from it)")
    p.add_argument("--encoding", default="utf-8", help="the file's text encoding, e.g. gbk (default utf-8)")
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("tagger", help="learned text-only taggers (docs/tags.md)")
    tagger_sub = p.add_subparsers(dest="tagger_command", required=True, metavar="{train}")
    p = tagger_sub.add_parser("train", help="fit a text-only specialty/operation tagger on metadata-labelled sources")
    p.add_argument("config", help="tagger config YAML (output, sources, exclude, model; docs/tags.md)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.C=4")
    p.set_defaults(func=cmd_tagger_train)

    p = sub.add_parser("clinical-sum", help="build Clinical-Sum pairs from a local MIMIC-III NOTEEVENTS.csv")
    p.add_argument("noteevents", help="your credentialed copy of MIMIC-III's NOTEEVENTS.csv")
    p.add_argument("--out", required=True, help="JSONL to write (the generic 'summary' format)")
    p.add_argument("--kind", default="radiology", help="radiology (FINDINGS -> IMPRESSION) or discharge "
                   "(a discharge summary -> one of its sections)")
    p.add_argument("--section", default="Brief Hospital Course", help="discharge: the section to summarise into")
    p.add_argument("--n", type=int, default=1000, help="pairs to draw (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.set_defaults(func=cmd_clinical_sum)

    p = sub.add_parser("contamination", help="near-duplicates between training sources and evaluation sets "
                       "(MinHash LSH over word 3-grams), and accuracy on the clean items")
    _add_config_args(p)
    p.add_argument("--threshold", type=float, default=0.5, help="Jaccard similarity that flags a pair (default 0.5)")
    p.add_argument("--out", help="output folder (default: OUTPUT_DIR/contamination)")
    p.set_defaults(func=cmd_contamination)

    p = sub.add_parser("audit", help="routing audit of a routed run (rank atoms or experts per question, MI with tags)")
    p.add_argument("run_dir", help="a trained run folder of a routed method")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run's config")
    p.add_argument("--data", action="append", help="BENCHMARK=PATH to audit (repeatable; default: the run's eval sets)")
    p.add_argument("--out", help="output folder (default: RUN/audit)")
    _add_skip_invalid(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("compare", help="paired statistics between runs: stratified bootstrap, sign test, Holm")
    p.add_argument("runs", nargs="+", help="run folders, folders of runs, or predictions.jsonl files (one run "
                   "folder scored under eval.extra_protocols: its protocols against each other)")
    p.add_argument("--intersect", action="store_true", help="compare only the items all runs share")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--json", action="store_true", help="print JSON instead of the Markdown table")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--min-stratum-items", type=int, default=20,
                   help="strata with fewer paired items are reported, not tested (default 20)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("plan", help="power planning: the smallest detectable macro difference, and the items or seeds "
                       "a target difference needs (simulated with compare's bootstrap)")
    p.add_argument("--items", type=int, nargs="+", help="items per benchmark (e.g. --items 300 500)")
    p.add_argument("--pilot", nargs=2, metavar=("A", "B"), help="two pilot predictions.jsonl files: items, baseline "
                   "(B's accuracy) and discordance are read from them")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per method (default 1)")
    p.add_argument("--baseline", type=float, default=0.6, help="B's accuracy (default 0.6)")
    p.add_argument("--discordance", type=float, default=0.2,
                   help="share of items two runs score differently (default 0.2)")
    p.add_argument("--seed-sd", type=float, default=0.0, help="seed-to-seed sd of a run's accuracy, pp (default 0)")
    p.add_argument("--target", type=float, help="a difference to detect, pp: the items (and seeds) it needs")
    p.add_argument("--power", type=float, default=0.8, help="default 0.8")
    p.add_argument("--alpha", type=float, default=0.05, help="two-sided level (default 0.05)")
    p.add_argument("--simulations", type=int, default=400, help="simulated studies per power estimate (default 400)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples per study (default 1000)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--out", help="also write the JSON here")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("report", help="Markdown tables, JSON and plots of the runs below a folder")
    p.add_argument("root", help="a suite's output folder (or any folder holding run folders)")
    p.add_argument("--out", help="output folder (default: ROOT/report)")
    p.add_argument("--no-compare", action="store_true", help="skip the paired comparisons")
    p.add_argument("--power", action="store_true", help="also the design's minimum detectable macro difference "
                   "(medpeft plan's simulation on the runs' items, seeds, accuracy and discordance; seconds to a minute)")
    p.add_argument("--power-simulations", type=int, default=400, help="simulated studies per power estimate "
                   "(default 400)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("suite", help="train and evaluate every method x seed of a config (resumable), then report")
    _add_config_args(p)
    p.add_argument("--executor", default="sequential", help="sequential (this process, default), local (submitit: "
                   "cells in parallel, one per device group) or slurm (submitit: one job per cell)")
    p.add_argument("--devices", help="local: GPU indices to spread cells over (e.g. 0,1,2,3), or cpu,cpu for CPU "
                   "workers")
    p.add_argument("--gpus-per-cell", type=int, default=1, help="devices per cell (more than 1: torchrun in the job)")
    p.add_argument("--partition", help="slurm: partition")
    p.add_argument("--time", type=int, default=24 * 60, help="time limit per cell in minutes (default 1440)")
    p.add_argument("--cpus-per-cell", type=int, help="slurm: CPUs per cell")
    p.add_argument("--mem-gb", type=int, help="slurm: memory per cell in GB")
    p.add_argument("--slurm-arg", action="append", help="slurm: extra sbatch option KEY=VALUE (repeatable)")
    p.add_argument("--only-cell", help=argparse.SUPPRESS)  # what each job of a fanned-out suite runs
    p.set_defaults(func=cmd_suite)

    p = sub.add_parser("methods", help="the method presets: what each is built on and what it changes")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("params", help="trainable and active parameters per method on an architecture")
    p.add_argument("--arch", default="qwen3-8b", help="qwen3-8b, llama-3.1-8b, tiny, a config.json path or a hub id")
    p.add_argument("--methods", nargs="+", help="method presets (default: the paper's table rows)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may also follow the options (e.g. eval MODEL --config C key=value)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        import warnings

        import transformers

        transformers.logging.set_verbosity_error()
        warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not ours
    from . import distributed

    def fail(message: str) -> int:
        """One line, shown once over the processes of a run; every process ends."""
        distributed.report_failure(message, lambda: print(f"medpeft: error: {message}", file=sys.stderr, flush=True))
        if distributed.launched_world_size() > 1:
            distributed.exit_now(EXIT_BAD_INPUT)  # the launcher ends the other ranks
        return EXIT_BAD_INPUT

    try:
        proc = distributed.init_from_environment()
        if proc.distributed and args.command not in MULTI_PROCESS_COMMANDS and not getattr(args, "only_cell", None):
            raise MedpeftError(f"'medpeft {args.command}' runs in one process; launch only "
                               f"{', '.join(MULTI_PROCESS_COMMANDS)} with torchrun or accelerate launch (a suite "
                               "fans its cells out with --executor local --devices ... or --executor slurm)")
        code = args.func(args)
        distributed.finish()
        return code
    except MedpeftError as err:
        return fail(str(err))
    except BrokenPipeError:  # the reader of our output went away (e.g. `| head`): nothing to report to
        return EXIT_BAD_INPUT
    except OSError as err:  # the file system refused: disk full, read-only or unwritable folder, a file in the way
        where = err.filename or "a file"
        return fail(f"{where}: {err.strerror or err}; nothing written before this was lost (files are replaced "
                    "only when complete)")
    except Exception as err:  # noqa: BLE001
        from safetensors import SafetensorError

        if isinstance(err, SafetensorError):
            return fail(f"writing or reading tensors failed: {str(err).splitlines()[0]}")
        if isinstance(err, RuntimeError) and distributed.failed_elsewhere():
            distributed.exit_now(EXIT_BAD_INPUT)  # a collective broke because another rank failed: it said why
        raise


if __name__ == "__main__":
    sys.exit(main())
