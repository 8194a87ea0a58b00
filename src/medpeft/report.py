"""Human-readable outputs: Markdown tables and PNG plots of runs, suites and comparisons."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from .io import atomic_open, write_json, write_text
from .stats import headline


def _cell(v: dict) -> str:
    """A benchmark's result: accuracy (%) [Wilson 95%] (n), or ROUGE-L F x 100 [bootstrap 95%] (n)."""
    if v.get("metric") == "rougeL":
        return f"R-L {100 * v['rougeL']:.1f} [{100 * v['ci_low']:.1f}, {100 * v['ci_high']:.1f}] ({v['n']})"
    return f"{100 * v['accuracy']:.1f} [{100 * v['wilson_low']:.1f}, {100 * v['wilson_high']:.1f}] ({v['n']})"


def macro_header(results: list[dict], name: str = "macro") -> str:
    """The macro column's header; it says when it mixes accuracy with ROUGE-L (as Med-MoE-LoRA's Average)."""
    mixed = any(v.get("metric") == "rougeL" for r in results for v in r["benchmarks"].values())
    return f"{name} (accuracy and ROUGE-L)" if mixed else name


def results_table(runs: dict[str, dict]) -> str:
    """One row per run: accuracy (%) per benchmark with its Wilson 95% interval (a summarisation
    set: ROUGE-L F x 100 with its bootstrap interval), and the macro average."""
    names: list[str] = []
    for res in runs.values():
        names += [b for b in res["benchmarks"] if b not in names]
    head = "| run | " + " | ".join(f"{b} (n)" for b in names) + f" | {macro_header(list(runs.values()))} |"
    sep = "|---" * (len(names) + 2) + "|"
    lines = [head, sep]
    for run, res in runs.items():
        cells = []
        for b in names:
            v = res["benchmarks"].get(b)
            cells.append("-" if v is None else _cell(v))
        lines.append(f"| {run} | " + " | ".join(cells) + f" | {100 * res['macro_accuracy']:.1f} |")
    return "\n".join(lines) + "\n"


def family_label(method: str) -> str:
    """The Family column: the method family's label from the registry."""
    from .adapters import method_label

    return "Base model" if method == "base" else method_label(method)


def collect_runs(root: Path) -> dict[str, dict]:
    """Every trained run below ``root`` (a folder with summary.json and eval/results.json), by
    method label (its folder path below root, without a trailing seed-<s>), with its seeds."""
    runs: dict[str, dict] = {}
    for summary_path in sorted(Path(root).rglob("summary.json")):
        run_dir = summary_path.parent
        results_path = run_dir / "eval" / "results.json"
        if not results_path.exists():
            continue
        rel = run_dir.relative_to(root).as_posix() if run_dir != Path(root) else run_dir.name
        label = rel.rsplit("/seed-", 1)[0] if "/seed-" in rel else rel
        entry = runs.setdefault(label, {"summary": read_result_file(summary_path, ("method", "trainable_params")),
                                        "seeds": []})
        res = read_result_file(results_path, ("benchmarks", "macro_accuracy"))
        pert = run_dir / "eval" / "perturbation.json"
        entry["seeds"].append({"run_dir": str(run_dir), "results": res,
                               "perturbation": read_result_file(pert, ("rates", "clean_macro")) if pert.exists()
                               else None,
                               "protocols": results_by_protocol(res, run_dir / "eval")})
    return runs


def results_by_protocol(headline_results: dict, eval_dir: Path) -> dict[str, dict[str, dict]]:
    """protocol -> benchmark -> its result, from ``eval/results.json`` (each set under its own
    protocol; results written before protocols existed are ``medpeft``'s) and the extra
    protocols' ``eval/protocol-<name>/results.json``."""
    out: dict[str, dict[str, dict]] = {}
    for name, bench in headline_results["benchmarks"].items():
        out.setdefault(bench.get("protocol", "medpeft"), {})[name] = bench
    for path in sorted(Path(eval_dir).glob("protocol-*/results.json")):
        res = read_result_file(path, ("benchmarks", "macro_accuracy"))
        for name, bench in res["benchmarks"].items():
            out.setdefault(bench.get("protocol", path.parent.name[len("protocol-"):]), {})[name] = bench
    return out


def protocol_table(runs: dict[str, dict]) -> tuple[str, dict] | None:
    """One row per method, one column per (protocol, benchmark): accuracy (%) mean over seeds,
    lm-eval's ``acc_norm`` beside it, and the answer-extraction failure rate where any; None
    when every run was scored under one protocol only."""
    columns: list[tuple[str, str]] = []
    for r in runs.values():
        for s in r["seeds"]:
            columns += [(p, b) for p, benches in s["protocols"].items() for b in benches if (p, b) not in columns]
    if len({p for p, _ in columns}) < 2:
        return None
    columns.sort(key=lambda c: (c[0] != "medpeft", c[0]))
    lines = ["| Method | " + " | ".join(f"{b} [{p}]" for p, b in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    data: dict = {}
    for label, r in runs.items():
        cells = []
        for p, b in columns:
            found = [s["protocols"][p][b] for s in r["seeds"] if b in s["protocols"].get(p, {})]
            if not found:
                cells.append("-")
                continue
            acc = statistics.fmean(100 * headline(v) for v in found)
            cell = f"{acc:.1f}"
            if all("acc_norm" in v for v in found):
                norm = statistics.fmean(100 * v["acc_norm"] for v in found)
                cell += f" (norm {norm:.1f})"
            fail = statistics.fmean(100 * v.get("extraction_failure_rate", 0.0) for v in found)
            if fail > 0:
                cell += f" [no answer {fail:.0f}%]"
            cells.append(cell)
            data.setdefault(label, {}).setdefault(p, {})[b] = {
                "accuracy": acc, "acc_norm": norm if all("acc_norm" in v for v in found) else None,
                "extraction_failure_rate": fail, "seeds": len(found)}
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", data


def forgetting_table(runs: dict[str, dict], n_resamples: int = 10_000) -> tuple[str, list[dict]] | None:
    """Knowledge retention against the base model (Med-MoE-LoRA's Table 2 layout, with deltas):
    per method and retention set, accuracy, its delta from the base model on the same items,
    the one-sided lower 95% bound and the non-inferiority verdict at the margin (stats.non_inferiority).
    None without a base-model run or retention sets."""
    from .compare import load_correctness
    from .stats import RETENTION_MARGIN_PP, non_inferiority

    base_label = next((label for label, r in runs.items() if r["summary"]["method"] == "base"), None)
    if base_label is None:
        return None
    base_seed = runs[base_label]["seeds"][0]
    sets = [b for b, v in base_seed["results"]["benchmarks"].items() if v.get("retention")]
    if not sets:
        return None
    margin = float(base_seed["results"].get("retention_margin", RETENTION_MARGIN_PP))
    base = load_correctness(Path(base_seed["run_dir"]) / "eval" / "predictions.jsonl")
    rows = [{"label": base_label, "sets": {b: {"accuracy": 100 * base_seed["results"]["benchmarks"][b]["accuracy"]}
                                           for b in sets}}]
    for label, r in runs.items():
        if label == base_label:
            continue
        per_seed = [load_correctness(Path(s["run_dir"]) / "eval" / "predictions.jsonl") for s in r["seeds"]]
        entry = {"label": label, "sets": {}}
        for b in sets:
            keys = sorted(k for k in base if k[0] == b and all(k in p for p in per_seed))
            if not keys:
                continue
            ft = [statistics.fmean(p[k] for p in per_seed) for k in keys]
            test = non_inferiority([f - base[k] for f, k in zip(ft, keys)], margin / 100, n_resamples=n_resamples)
            entry["sets"][b] = {"accuracy": 100 * statistics.fmean(ft), "delta": 100 * test["delta"],
                                "lower": 100 * test["lower"], "upper": 100 * test["upper"], "n": test["n"],
                                "verdict": test["verdict"], "margin": margin, "seeds": len(per_seed)}
        rows.append(entry)
    lines = ["| Method | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
    for row in rows:
        cells = []
        for b in sets:
            v = row["sets"].get(b)
            if v is None:
                cells.append("-")
            elif "delta" not in v:
                cells.append(f"{v['accuracy']:.1f}")
            else:
                cells.append(f"{v['accuracy']:.1f} ({v['delta']:+.1f}; >= {v['lower']:+.1f}) {v['verdict']}")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", rows


def calibration_table(runs: dict[str, dict]) -> tuple[str, list[dict]] | None:
    """Calibration of each method's scored sets (first seed), under each protocol that gives
    option probabilities: ECE, Brier, NLL, and accuracy at half coverage."""
    rows = []
    for label, r in runs.items():
        seed = r["seeds"][0]
        for protocol, benches in seed["protocols"].items():
            for bench, v in benches.items():
                c = v.get("calibration")
                if c and c.get("n"):
                    rows.append({"label": label, "protocol": protocol, "benchmark": bench, "n": c["n"],
                                 "bins": c["bins"], "ece": c["ece"], "brier": c["brier"], "nll": c["nll"],
                                 "accuracy_at_half_coverage": c["selective"]["accuracy_at_coverage"]["0.5"]})
    if not rows:
        return None
    lines = ["| Method | protocol | benchmark | n | ECE (%) | Brier | NLL | accuracy at 50% coverage (%) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {x['label']} | {x['protocol']} | {x['benchmark']} | {x['n']} | {100 * x['ece']:.1f} | "
              f"{x['brier']:.3f} | {x['nll']:.3f} | {100 * x['accuracy_at_half_coverage']:.1f} |" for x in rows]
    return "\n".join(lines) + "\n", rows


def robustness_table(runs: dict[str, dict]) -> tuple[str, list[dict]] | None:
    """Option-order robustness of each method (first seed): accuracy as released, robust accuracy,
    agreement across rotations and the most over-predicted position."""
    rows = []
    for label, r in runs.items():
        rob = r["seeds"][0]["results"].get("robustness")
        for bench, v in (rob or {}).get("sets", {}).items():
            if v.get("n"):
                rows.append({"label": label, "benchmark": bench, **v})
    if not rows:
        return None
    lines = ["| Method | benchmark | n | rotations | accuracy (%) | per rotation (%) | robust accuracy (%) | "
             "agreement (%) | most over-predicted position |", "|---" * 9 + "|"]
    for x in rows:
        worst = x["max_position_excess"]
        lines.append(f"| {x['label']} | {x['benchmark']} | {x['n']} | {x['rotations']} | {100 * x['accuracy']:.1f} | "
                     + " / ".join(f"{100 * a:.0f}" for a in x["accuracy_by_rotation"])
                     + f" | {100 * x['robust_accuracy']:.1f} | {100 * x['agreement']:.1f} | "
                     f"{worst['position']} (+{100 * worst['excess']:.0f} pp over gold) |")
    return "\n".join(lines) + "\n", rows


# the type each field of medpeft's result files must have
RESULT_FIELDS = {"method": str, "trainable_params": int, "steps": int, "train_time_s": (int, float),
                 "benchmarks": dict, "macro_accuracy": (int, float), "rates": dict, "clean_macro": (int, float)}


def read_result_file(path: Path, fields: tuple[str, ...]) -> dict:
    """A JSON result file medpeft wrote; truncated, foreign, incomplete or mistyped is one line naming it."""
    from .errors import MedpeftError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise MedpeftError(f"{path}: not valid JSON ({str(err)[:80]}); re-run the step that writes it") from None
    for field in fields:
        if not isinstance(data, dict) or field not in data:
            raise MedpeftError(f"{path}: field '{field}': missing; re-run the step that writes it")
        kind = RESULT_FIELDS[field]
        if isinstance(data[field], bool) or not isinstance(data[field], kind) \
                or (isinstance(data[field], float) and not math.isfinite(data[field])):  # json reads NaN
            raise MedpeftError(f"{path}: field '{field}': {data[field]!r} is not what medpeft writes there")
    for name, bench in data.get("benchmarks", {}).items() if "benchmarks" in fields else ():
        value = bench.get("score", bench.get("accuracy")) if isinstance(bench, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:  # NaN fails too
            raise MedpeftError(f"{path}: field 'benchmarks.{name}': expected an accuracy or a score in [0, 1], "
                               f"got {value!r}")
    if "macro_accuracy" in fields and not 0 <= data["macro_accuracy"] <= 1:
        raise MedpeftError(f"{path}: field 'macro_accuracy': {data['macro_accuracy']!r} is not in [0, 1]")
    return data


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def method_table(runs: dict[str, dict]) -> tuple[str, list[dict]]:
    """The papers' layout: Family | Method | Params | per-benchmark | Avg., mean +- std over seeds."""
    benches: list[str] = []
    for r in runs.values():
        for s in r["seeds"]:
            benches += [b for b in s["results"]["benchmarks"] if b not in benches]
    from .errors import MedpeftError

    for label, r in runs.items():  # an Avg. over other sets, or a blank cell, would compare unlike with unlike
        for s in r["seeds"]:
            missing = [b for b in benches if b not in s["results"]["benchmarks"]]
            if missing:
                raise MedpeftError(f"{s.get('run_dir', label)}: not evaluated on {', '.join(missing[:3])}"
                                   f"{', ...' if len(missing) > 3 else ''}, which other runs here were; evaluate "
                                   "every run on the same sets (medpeft eval RUN) or report them separately")
    avg = macro_header([s["results"] for r in runs.values() for s in r["seeds"]], "Avg.")
    rows, lines = [], ["| Family | Method | Params | " + " | ".join(benches) + f" | {avg} | seeds |",
                       "|---" * (len(benches) + 5) + "|"]
    for label, r in runs.items():
        method = r["summary"]["method"]
        per = {b: _mean_std([100 * headline(s["results"]["benchmarks"][b]) for s in r["seeds"]
                             if b in s["results"]["benchmarks"]]) for b in benches}
        macro = _mean_std([100 * s["results"]["macro_accuracy"] for s in r["seeds"]])
        n = len(r["seeds"])
        fmt = (lambda m, sd: f"{m:.2f} +- {sd:.2f}") if n > 1 else (lambda m, sd: f"{m:.2f}")
        lines.append(f"| {family_label(method)} | {label} | {r['summary']['trainable_params'] / 1e6:.2f}M | "
                     + " | ".join(fmt(*per[b]) for b in benches) + f" | {fmt(*macro)} | {n} |")
        rows.append({"label": label, "method": method, "family": family_label(method),
                     "trainable_params": r["summary"]["trainable_params"], "seeds": n,
                     "benchmarks": {b: {"mean": per[b][0], "std": per[b][1]} for b in benches},
                     "macro": {"mean": macro[0], "std": macro[1]},
                     "perturbation": _perturbation_curve(r)})
    return "\n".join(lines) + "\n", rows


def _perturbation_curve(run: dict) -> dict | None:
    curves = [s["perturbation"] for s in run["seeds"] if s["perturbation"]]
    if not curves:
        return None
    rates = sorted({float(k) for c in curves for k in c["rates"]})
    means = [statistics.fmean(100 * m for c in curves for m in c["rates"][str(r)]["macro"]) for r in rates]
    pooled = [[100 * m for c in curves for m in c["rates"][str(r)]["macro"]] for r in rates]
    stds = [statistics.stdev(p) if len(p) > 1 else 0.0 for p in pooled]
    clean = statistics.fmean(100 * c["clean_macro"] for c in curves)
    return {"rates": [0.0] + rates, "mean": [clean] + means, "std": [0.0] + stds}


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)


def plot_accuracy_vs_params(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in rows:
        x, y = r["trainable_params"] / 1e6, r["macro"]["mean"]
        ax.errorbar(x, y, yerr=r["macro"]["std"] if r["seeds"] > 1 else None, fmt="o", capsize=3)
        ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.margins(x=0.2, y=0.2)  # room for the point labels
    ax.set_xlabel("trainable parameters (millions)")
    ax.set_ylabel("macro-average accuracy (%)")
    ax.set_title("Accuracy vs trainable parameters (bars: std over training seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_perturbation(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in rows:
        c = r["perturbation"]
        if c:
            ax.errorbar([100 * x for x in c["rates"]], c["mean"], yerr=c["std"], marker="o", capsize=3, label=r["label"])
    ax.set_xlabel("items with perturbed tags (%)")
    ax.set_ylabel("macro-average accuracy (%)")
    ax.set_title("Weak-axis perturbation at evaluation (mean +- std over perturbation seeds)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_reliability(calibration: dict, title: str, path: Path) -> None:
    """Reliability diagram: accuracy against mean confidence per equal-width bin (bars), the
    diagonal of perfect calibration, and the share of items per bin; ECE in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = calibration["reliability"]
    width = 1 / calibration["bins"]
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.8, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = [b for b in bins if b["n"]]
    ax.bar([b["low"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
           edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], "o", color="tab:red", markersize=3,
            label="mean confidence")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}: ECE {100 * calibration['ece']:.1f} ({calibration['bins']} bins, n={calibration['n']})",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    hist.bar([b["low"] for b in bins], [b["n"] / calibration["n"] for b in bins], width=width, align="edge",
             edgecolor="black", color="tab:gray")
    hist.set_xlabel("confidence (largest option probability)")
    hist.set_ylabel("share")
    hist.set_xlim(0, 1)
    _save(fig, path)


def plot_strata(pair: dict, path: Path) -> bool:
    """Per-stratum deltas of one pair with their 95% intervals (red: Benjamini-Hochberg q <= 0.05);
    False when no stratum was tested."""
    rows = sorted(((f"{field}={value}", e) for field, values in pair.get("strata", {}).items()
                   for value, e in values.items() if e["tested"]), key=lambda r: r[1]["delta"])
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.32 * len(rows)))
    for y, (name, e) in enumerate(rows):
        ax.errorbar(e["delta"], y, xerr=[[e["delta"] - e["ci_low"]], [e["ci_high"] - e["delta"]]], fmt="o", capsize=3,
                    color="tab:red" if e["q"] <= 0.05 else "tab:blue")
    ax.set_yticks(range(len(rows)), [f"{name} (n={e['n']})" for name, e in rows], fontsize=7)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"{pair['a']} minus {pair['b']} (percentage points)")
    ax.set_title("Per-stratum deltas, 95% bootstrap intervals (red: BH q <= 0.05)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return True


def ablation_groups(labels: list[str]) -> dict[str, list[str]]:
    """Run labels grouped by the preset they ablate: a label whose last part is a preset built
    on another preset (its ``base``) that is also a run here, in the same folder."""
    from .adapters.registry import catalogue, resolve_preset

    presets = set(catalogue())
    groups: dict[str, list[str]] = {}
    present = set(labels)
    for label in labels:
        folder, _, name = label.rpartition("/")
        if name not in presets:
            continue
        base = resolve_preset(name).base
        base_label = f"{folder}/{base}" if folder else base
        if base is not None and base_label in present:
            groups.setdefault(base_label, []).append(label)
    return groups


def plot_ablation_drops(rows: list[dict], full: str, path: Path, ablations: list[str] | None = None) -> bool:
    """Bar chart of each ablation's macro accuracy minus the full method's (percentage points);
    ``ablations``: their labels (default: labels that start with ``full-``)."""
    base = next((r for r in rows if r["label"] == full), None)
    ablations = [r for r in rows if (r["label"] in ablations if ablations is not None
                                     else r["label"].startswith(full + "-"))]
    if base is None or not ablations:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drops = [r["macro"]["mean"] - base["macro"]["mean"] for r in ablations]
    fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.45 * len(ablations)))
    ax.barh([r["label"] for r in ablations], drops, color=["tab:red" if d < 0 else "tab:green" for d in drops])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"macro accuracy minus {full} (percentage points)")
    ax.set_title(f"Ablations of {full}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return True


def design_power(runs: dict[str, dict], rows: list[dict], pairs: list[dict], *, power: float = 0.8,
                 alpha: float = 0.05, simulations: int = 400) -> dict:
    """The smallest macro accuracy difference this suite's design detects with probability
    ``power`` (two-sided level ``alpha``), by ``medpeft plan``'s simulation
    (``stats.minimum_detectable_effect``), with the design read from the runs' per-seed
    predictions on their accuracy benchmarks (items scored 0/1; summarisation sets are left
    out): items per benchmark; the fewest training seeds of a method; the median over methods
    of the macro accuracy (baseline); the median over method pairs of the share of items two
    single runs (seed i of A vs seed i of B) score differently (discordance); the median
    seed-to-seed sd of a method's macro accuracy. Trained methods only when there are two
    (the base model differs from all of them on far more items). ``skipped`` says why when
    the design cannot be read."""
    import dataclasses
    import itertools
    import statistics

    from .compare import load_correctness
    from .stats import PlanSettings, minimum_detectable_effect

    families = {r["label"]: r["family"] for r in rows}
    labels = [k for k in runs if families.get(k) != "Base model"]
    labels = labels if len(labels) >= 2 else list(runs)
    if len(labels) < 2:
        return {"skipped": "fewer than two methods"}
    scores = {k: [load_correctness(Path(seed["run_dir"]) / "eval" / "predictions.jsonl") for seed in runs[k]["seeds"]]
              for k in labels}
    every = [run for per_seed in scores.values() for run in per_seed]
    keys = set.intersection(*(set(run) for run in every))
    graded = {key[0] for run in every for key, value in run.items() if key in keys and value not in (0.0, 1.0)}
    accuracy_benches = sorted({bench for bench, _ in keys} - graded)  # ROUGE-scored sets left out
    keys = sorted(k for k in keys if k[0] in accuracy_benches)
    if not keys:
        return {"skipped": "no accuracy benchmark (items scored right or wrong) shared by the methods"}

    def macro(run: dict) -> float:
        return statistics.mean(statistics.mean(run[k] for k in keys if k[0] == b) for b in accuracy_benches)

    seeds = min(len(per_seed) for per_seed in scores.values())
    baseline = statistics.median(statistics.mean(macro(run) for run in per_seed) for per_seed in scores.values())
    discordance = statistics.median(
        statistics.mean(sum(ra[k] != rb[k] for k in keys) / len(keys) for ra, rb in zip(scores[a], scores[b]))
        for a, b in itertools.combinations(labels, 2))
    if discordance == 0 or not 0 < baseline < 1:
        return {"skipped": "the methods score every item alike (no discordant item) or all right or all wrong"}
    sds = [statistics.stdev(macro(run) for run in per_seed) for per_seed in scores.values() if len(per_seed) > 1]
    settings = PlanSettings(items=[sum(1 for k in keys if k[0] == b) for b in accuracy_benches], seeds=seeds,
                            baseline=baseline,
                            # the simulation draws independent runs: at most 2b(1-b) of their items differ
                            discordance=min(discordance, 2 * baseline * (1 - baseline)),
                            seed_sd=statistics.median(sds) if sds and seeds > 1 else 0.0,
                            alpha=alpha, power=power, simulations=simulations)
    mde = 100 * minimum_detectable_effect(settings)
    mde_pp = mde if mde != float("inf") else None  # not detected even at 50 pp: JSON has no infinity
    return {"inputs": dataclasses.asdict(settings), "benchmarks": accuracy_benches, "methods": labels,
            "minimum_detectable_effect_pp": mde_pp,
            "pairs_below": [f"{p['a']} vs {p['b']}" for p in pairs
                            if mde_pp is None or abs(p["macro_delta"]) < mde_pp]}


def power_text(design: dict, n_pairs: int) -> list[str]:
    """The report's Design power section."""
    if "skipped" in design:
        return ["## Design power", "", f"Not computed: {design['skipped']}.", ""]
    d, mde = design["inputs"], design["minimum_detectable_effect_pp"]
    found = (f"a macro difference of **{mde:.2f} pp** is detected with {100 * d['power']:.0f}% power"
             if mde is not None else f"no macro difference up to 50 pp is detected with {100 * d['power']:.0f}% power")
    below = (f" {len(design['pairs_below'])} of {n_pairs} observed differences are smaller: their intervals say "
             "little either way." if n_pairs else "")
    return ["## Design power", "", f"On the accuracy benchmarks ({', '.join(design['benchmarks'])}): with "
            f"{d['items']} items per benchmark, {d['seeds']} training seed(s) per method, a baseline of "
            f"{100 * d['baseline']:.1f}%, {100 * d['discordance']:.1f}% of items scored differently by two runs and "
            f"a seed sd of {100 * d['seed_sd']:.2f} pp (read from these runs), {found} at a two-sided level of "
            f"{d['alpha']} (`medpeft plan`'s simulation, docs/statistics.md).{below}", ""]


def write_report(root: Path, out: Path, *, compare: bool = True, power: bool = False,
                 power_simulations: int = 400) -> dict:
    """report.md, report.json and PNG plots for every run below ``root``; with ``power`` (and
    the comparisons) also the design's minimum detectable difference (:func:`design_power`)."""
    runs = collect_runs(root)
    if not runs:
        from .errors import MedpeftError

        raise MedpeftError(f"{root}: no finished runs (folders with summary.json and eval/results.json)")
    table, rows = method_table(runs)
    out = Path(out)
    plot_accuracy_vs_params(rows, out / "accuracy_vs_params.png")
    parts = [f"# Results: {root}", "", "Accuracy in percent (mean +- std over training seeds when there are several).",
             "", table, "![accuracy vs trainable parameters](accuracy_vs_params.png)", ""]
    if any(r["perturbation"] for r in rows):
        plot_perturbation(rows, out / "perturbation.png")
        parts += ["## Weak-axis perturbation", "", "![perturbation](perturbation.png)", ""]
    groups = ablation_groups([r["label"] for r in rows])
    if groups:
        parts += ["## Ablations", ""]
        for full, members in groups.items():
            name = f"ablations-{full.replace('/', '_')}.png"
            plot_ablation_drops(rows, full, out / name, members)
            parts += [f"![ablations of {full}]({name})", ""]
    extras: dict = {}
    forgetting = forgetting_table(runs)
    if forgetting:
        margin = next((v["margin"] for r in forgetting[1] for v in r["sets"].values() if "margin" in v), None)
        parts += ["## Knowledge retention (forgetting)", "",
                  "Accuracy (%) on the retention sets, its paired delta from the base model (pp), the one-sided "
                  f"95% lower bound, and the non-inferiority verdict at a margin of {margin} pp "
                  "(eval.retention_margin; docs/statistics.md).", "", forgetting[0]]
        extras["forgetting"] = forgetting[1]
    protocols = protocol_table(runs)
    if protocols:
        parts += ["## Protocols", "", "Accuracy (%) of each method under each evaluation protocol (docs/evaluation.md); "
                  "lm-eval's acc_norm in brackets, answers that could not be parsed as [no answer]. A gap between "
                  "columns of one benchmark is the protocol's, not the method's.", "", protocols[0]]
        extras["protocols"] = protocols[1]
    calibration = calibration_table(runs)
    if calibration:
        plots = sorted(Path(root).rglob("eval/reliability-*.png")) + sorted(Path(root).rglob("eval/protocol-*/reliability-*.png"))
        parts += ["## Calibration", "", f"From the option probabilities (softmax of the option scores), single-answer "
                  f"items; ECE over {calibration[1][0]['bins']} equal-width bins (docs/statistics.md).", "",
                  calibration[0]] + [f"![{p.relative_to(root)}]({Path(p).resolve()})" for p in plots] + [""]
        extras["calibration"] = calibration[1]
    robustness = robustness_table(runs)
    if robustness:
        parts += ["## Option-order robustness", "", "Every item re-scored under each cyclic rotation of its options "
                  "(eval.permute_options: cyclic).", "", robustness[0]]
        extras["robustness"] = robustness[1]
    contamination = Path(root) / "contamination" / "contamination.json"
    if contamination.exists():  # written by `medpeft contamination CONFIG` into the suite's folder
        data = json.loads(contamination.read_text(encoding="utf-8"))
        parts += ["## Contamination audit", "", f"Near-duplicates (Jaccard of word {data['shingle_words']}-gram "
                  f"shingles >= {data['threshold']}, MinHash LSH; docs/statistics.md) between training sources and "
                  "evaluation sets.", "", "| training source | evaluation set | eval items | flagged | share |",
                  "|---|---|---|---|---|"]
        parts += [f"| {c['train_source']} | {c['eval_set']} | {c['eval_items']} | {c['flagged_items']} | "
                  f"{100 * c['share']:.1f}% |" for c in data["pairs"]] + [""]
        extras["contamination"] = data
    audits = sorted(Path(root).rglob("audit/*.png"))
    if audits:  # usage heatmaps written by `medpeft audit` in the run folders
        parts += ["## Routing audits", ""] + [f"![{p.parent.parent.relative_to(root)}]({Path(p).resolve()})"
                                             for p in audits] + [""]
    pairs = []
    if compare and len(runs) > 1:
        from .compare import compare_labeled, compare_table

        pairs = compare_labeled([(label, Path(seed["run_dir"]) / "eval" / "predictions.jsonl")
                                 for label, r in runs.items() for seed in r["seeds"]])
        parts += ["## Paired comparisons", "",
                  "Benchmark-stratified paired bootstrap (10,000 resamples) of the macro delta on the items' "
                  "scores averaged over each method's training seeds, pooled sign test, Holm-corrected; with several "
                  "seeds also the two-level (seeds and items) interval (docs/statistics.md).", "", compare_table(pairs)]
        plots = []
        for pair in pairs:
            name = f"strata-{pair['a']}-vs-{pair['b']}.png".replace("/", "_")
            if plot_strata(pair, out / name):
                plots.append(f"![per-stratum deltas, {pair['a']} vs {pair['b']}]({name})")
        if plots:
            parts += ["### Per-stratum effects", "", "By specialty, operation and the benchmarks' metadata (department, "
                      "exam class, difficulty where present); strata under "
                      "20 paired items are listed in report.json, not tested.", ""] + plots + [""]
    if power:
        design = design_power(runs, rows, pairs, simulations=power_simulations)
        parts += power_text(design, len(pairs))
        extras["design_power"] = design
    write_text(out / "report.md", "\n".join(parts) + "\n")
    report = {"root": str(root), "methods": rows, "comparisons": pairs, **extras}
    write_json(out / "report.json", report)
    return report
