"""Paired comparison of methods over the same evaluation items (``medpeft compare``).

Inputs are run folders (their ``eval/predictions.jsonl``), suite folders holding
``<method>/eval/predictions.jsonl`` or ``<method>/seed-<s>/eval/predictions.jsonl``, or
prediction files. Items are paired by (benchmark, id), and must be the same question (the
rows' content digest ``item`` and ``gold``); a missing or extra item is an error unless
``intersect`` is set. Differences are A - B in percentage points. A method with
several training seeds is compared on its seed-averaged item scores, and with a two-level
(seeds, then items) bootstrap interval beside the item-only one (docs/statistics.md).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from .errors import MedpeftError
from .stats import holm, seed_item_bootstrap, sign_test, stratified_paired_bootstrap


def find_predictions(path: Path) -> list[tuple[str, Path]]:
    """(label, predictions file) for a file, a run folder, or a folder of run folders."""
    path = Path(path)
    if path.is_file():
        return [(_file_label(path), path)]
    if (path / "eval" / "predictions.jsonl").exists():
        return [(path.name, path / "eval" / "predictions.jsonl")]
    found = sorted((p.parent.parent.name, p) for p in path.glob("*/eval/predictions.jsonl"))
    found += sorted((p.parent.parent.parent.name, p) for p in path.glob("*/seed-*/eval/predictions.jsonl"))
    if not found:
        raise MedpeftError(f"{path}: no predictions.jsonl (expected a run folder, a folder of runs, or a file)")
    return found


def _folder_label(folder: Path) -> str:
    return folder.parent.name if folder.name == "eval" else folder.name


def _file_label(path: Path) -> str:
    """A predictions file's label: its run (``RUN/eval/predictions.jsonl`` -> ``RUN``), with the
    protocol of an extra-protocol folder (``RUN/eval/protocol-lm-eval/...`` -> ``RUN:lm-eval``)."""
    folder = path.parent
    if folder.name.startswith("protocol-"):
        return f"{_folder_label(folder.parent)}:{folder.name[len('protocol-'):]}"
    return _folder_label(folder) if path.stem == "predictions" else path.stem


def load_correctness(path: Path) -> dict[tuple[str, str], float]:
    """(benchmark, id) -> the item's score (:func:`load_predictions`)."""
    return load_predictions(path)[0]


MIN_STRATUM_ITEMS = 20  # strata with fewer paired items are reported, not tested


def load_strata(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    """(benchmark, id) -> the item's strata: its specialty and operation tags and the metadata
    fields written with it (``strata``: department, exam class, difficulty ...)."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        if line.strip():
            row = json.loads(line)
            strata = {k: str(row[k]) for k in ("specialty", "operation") if isinstance(row.get(k), str)}
            if isinstance(row.get("strata"), dict):
                strata.update({k: str(v) for k, v in row["strata"].items()})
            out[(str(row["benchmark"]), str(row["id"]))] = strata
    return out


def load_item_identity(path: Path) -> dict[tuple[str, str], tuple[str | None, str | None]]:
    """(benchmark, id) -> (the item's content digest ``item``, its ``gold``) as the row holds
    them (None where absent: predictions of medpeft before 2026-12-03 have no ``item``)."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        if line.strip():
            row = json.loads(line)
            ident = tuple(str(row[k]) if isinstance(row.get(k), str) else None for k in ("item", "gold"))
            out[(str(row["benchmark"]), str(row["id"]))] = ident
    return out


def check_same_items(files: list[tuple[str, Path]]) -> None:
    """Every file holds the same question under a shared (benchmark, id): pairing by id alone
    would silently compare unrelated questions when two runs were scored on different files
    (or an id-less file reordered: its ids are line numbers). A differing content digest, or
    a differing gold answer, is one line naming both files and the item."""
    seen: dict[tuple[str, str], tuple[str, Path, tuple]] = {}
    for label, path in files:
        for key, ident in load_item_identity(path).items():
            if key not in seen:
                seen[key] = (label, path, ident)
                continue
            first_label, first_path, first = seen[key]
            for j, what in enumerate(("question", "gold answer")):
                if first[j] is not None and ident[j] is not None and first[j] != ident[j]:
                    raise MedpeftError(f"{first_path} and {path}: item {key[0]}/{key[1]} is another {what} in "
                                       f"{label} than in {first_label}; they were scored on different files "
                                       "(compare runs evaluated on the same sets)")


def stratum_effects(a: dict, b: dict, strata: dict, keys: list[tuple[str, str]], *, min_items: int = MIN_STRATUM_ITEMS,
                    n_resamples: int = 10_000, seed: int = 0) -> dict:
    """Per stratum (every value of every stratum field among the paired items): the delta (pp)
    with its benchmark-stratified paired bootstrap interval and the sign test, the p-values
    Benjamini-Hochberg-adjusted over every stratum tested in this pair (``q``). A stratum with
    fewer than ``min_items`` items is listed with ``tested: false``."""
    from .stats import benjamini_hochberg

    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for k in keys:
        for field, value in strata.get(k, {}).items():
            groups.setdefault((field, value), []).append(k)
    out: dict[str, dict[str, dict]] = {}
    tested = []
    for (field, value), members in sorted(groups.items()):
        entry = {"n": len(members)}
        if len(members) < min_items:
            entry.update(tested=False, reason=f"fewer than {min_items} items")
        else:
            ca = np.array([a[k] for k in members])
            cb = np.array([b[k] for k in members])
            bench = np.array([k[0] for k in members])
            boot = stratified_paired_bootstrap({n: (ca - cb)[bench == n] for n in sorted(set(bench.tolist()))},
                                               n_resamples=n_resamples, seed=seed)
            wins, losses = int((ca > cb).sum()), int((ca < cb).sum())
            entry.update(tested=True, delta=100 * boot["macro_delta"], ci_low=100 * boot["ci_low"],
                         ci_high=100 * boot["ci_high"], wins=wins, losses=losses, sign_p=sign_test(wins, losses))
            tested.append(entry)
        out.setdefault(field, {})[value] = entry
    for entry, q in zip(tested, benjamini_hochberg([e["sign_p"] for e in tested])):
        entry["q"] = q
    return out


def _item_calibration(row: dict) -> tuple[float, float] | None:
    """(Brier, NLL) of a single-answer row whose option scores cover its options, else None."""
    from .stats import item_calibration

    scores, gold = row.get("scores"), row.get("gold")
    if not isinstance(scores, dict) or not isinstance(gold, str) or len(gold) != 1 or gold not in scores \
            or len(scores) < 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                          and np.isfinite(v) for v in scores.values()):
        return None
    got = item_calibration(scores, gold)
    return got["brier"], got["nll"]


def load_predictions(path: Path) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], tuple[float, float]]]:
    """(benchmark, id) -> the item's score from a ``predictions.jsonl``: 1/0 for a QA item's
    ``correct``, a summarisation item's ``score`` (ROUGE-L F in [0, 1]). A malformed row is one
    line naming the file, line and field (``correct`` must be a JSON boolean: a string "false"
    would otherwise count as correct). Also (benchmark, id) -> (Brier, NLL) of the
    single-answer items whose option scores are there (``stats.item_calibration``)."""
    out: dict[tuple[str, str], float] = {}
    calibration: dict[tuple[str, str], tuple[float, float]] = {}
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise MedpeftError(f"{path}: not UTF-8 text (byte {err.start}); is it a predictions.jsonl?") from None
    except OSError as err:
        raise MedpeftError(f"{path}: cannot read it ({err.strerror or err})") from None
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise MedpeftError(f"{path}: line {lineno}: not JSON ({err.msg})") from None
        except (ValueError, RecursionError):  # integers beyond 4300 digits, nesting beyond the recursion limit
            raise MedpeftError(f"{path}: line {lineno}: an unreadable JSON value") from None
        if not isinstance(row, dict):
            raise MedpeftError(f"{path}: line {lineno}: expected a prediction object, got {type(row).__name__}")
        for field in ("benchmark", "id", "score" if "score" in row else "correct"):
            if field not in row:
                raise MedpeftError(f"{path}: line {lineno}: field '{field}': missing")
        if "score" in row:
            if isinstance(row["score"], bool) or not isinstance(row["score"], (int, float)) \
                    or not 0 <= row["score"] <= 1:
                raise MedpeftError(f"{path}: line {lineno}: field 'score': must be a number in [0, 1], "
                                   f"got {row['score']!r}")
        elif not isinstance(row["correct"], bool):
            raise MedpeftError(f"{path}: line {lineno}: field 'correct': must be true or false, got {row['correct']!r}")
        elif isinstance(row.get("gold"), str) and "pred" in row and (row["pred"] is None or isinstance(row["pred"], str)) \
                and row["correct"] != (row["pred"] == row["gold"]):  # medpeft writes correct == (pred == gold)
            raise MedpeftError(f"{path}: line {lineno}: field 'correct': {str(row['correct']).lower()}, but pred "
                               f"{row['pred']!r} and gold {row['gold']!r} say otherwise; the file was edited "
                               "(evaluate again)")
        key = (str(row["benchmark"]), str(row["id"]))
        if key in out:
            raise MedpeftError(f"{path}: line {lineno}: field 'id': duplicate item {key[1]!r} in {key[0]}")
        out[key] = float(row["score"]) if "score" in row else float(row["correct"])
        item = _item_calibration(row) if "score" not in row else None
        if item is not None:
            calibration[key] = item
    if not out:
        raise MedpeftError(f"{path}: no prediction rows")
    return out, calibration


def _paired(a: dict, b: dict, names: tuple[str, str], intersect: bool) -> list[tuple[str, str]]:
    keys_a, keys_b = set(a), set(b)
    if keys_a != keys_b and not intersect:
        only_a, only_b = sorted(keys_a - keys_b), sorted(keys_b - keys_a)
        example = (only_a or only_b)[0]
        raise MedpeftError(
            f"{names[0]} and {names[1]} do not cover the same items ({len(only_a)} only in {names[0]}, "
            f"{len(only_b)} only in {names[1]}, e.g. {example[0]}/{example[1]}); pass --intersect to compare the shared ones")
    shared = sorted(keys_a & keys_b)
    if not shared:
        raise MedpeftError(f"{names[0]} and {names[1]} share no items")
    return shared


def calibration_deltas(a: dict, b: dict, keys: list[tuple[str, str]], n_resamples: int, seed: int) -> dict | None:
    """Paired deltas (A - B) of the mean Brier score and NLL over the items both runs have option
    scores for, each with its benchmark-stratified paired bootstrap interval; lower is better."""
    shared = [k for k in keys if k in a and k in b]
    if not shared:
        return None
    bench = np.array([k[0] for k in shared])
    out = {"n": len(shared)}
    for j, metric in enumerate(("brier", "nll")):
        delta = np.array([a[k][j] - b[k][j] for k in shared])
        boot = stratified_paired_bootstrap({name: delta[bench == name] for name in sorted(set(bench.tolist()))},
                                           n_resamples=n_resamples, seed=seed)
        out[metric] = {"delta": boot["macro_delta"], "ci_low": boot["ci_low"], "ci_high": boot["ci_high"],
                       "a": float(np.mean([a[k][j] for k in shared])), "b": float(np.mean([b[k][j] for k in shared]))}
    return out


def compare_pair(a: dict, b: dict, names: tuple[str, str], *, intersect: bool = False,
                 n_resamples: int = 10_000, seed: int = 0, calibration: tuple[dict, dict] | None = None) -> dict:
    keys = _paired(a, b, names, intersect)
    ca = np.array([a[k] for k in keys], dtype=float)
    cb = np.array([b[k] for k in keys], dtype=float)
    bench = np.array([k[0] for k in keys])
    deltas = {name: (ca - cb)[bench == name] for name in sorted(set(bench.tolist()))}
    boot = stratified_paired_bootstrap(deltas, n_resamples=n_resamples, seed=seed)
    # the sign test counts the items where one run scores higher (correct vs wrong, or the
    # higher ROUGE-L); ties are dropped
    wins, losses = int((ca > cb).sum()), int((ca < cb).sum())
    calib = calibration_deltas(*calibration, keys, n_resamples, seed) if calibration else None
    return {**({"calibration": calib} if calib else {}),
        "a": names[0], "b": names[1], "n": len(keys),
        "macro_delta": 100 * boot["macro_delta"], "ci_low": 100 * boot["ci_low"], "ci_high": 100 * boot["ci_high"],
        "wins": wins, "losses": losses, "ties": len(keys) - wins - losses, "sign_p": sign_test(wins, losses),
        "benchmarks": {name: {"n": int(len(d)), "delta": 100 * float(d.mean()),
                              "acc_a": 100 * float(ca[bench == name].mean()),
                              "acc_b": 100 * float(cb[bench == name].mean())} for name, d in deltas.items()},
    }


def _seed_and_item_interval(a: list, b: list, keys: list[tuple[str, str]], n_resamples: int, seed: int) -> dict:
    """The two-level (seeds, then items) bootstrap interval of the macro delta (percentage points)."""
    bench = [k[0] for k in keys]
    names = sorted(set(bench))
    matrix = lambda runs, name: np.array([[s[k] for k in keys if k[0] == name] for s, _ in runs])  # noqa: E731
    boot = seed_item_bootstrap({n: matrix(a, n) for n in names}, {n: matrix(b, n) for n in names},
                               n_resamples=n_resamples, seed=seed)
    return {"macro_delta": 100 * boot["macro_delta"], "ci_low": 100 * boot["ci_low"], "ci_high": 100 * boot["ci_high"]}


def protocol_predictions(path: Path) -> list[tuple[str, Path]]:
    """A run folder's headline predictions and those of its extra protocols
    (``eval/protocol-<name>/``), labelled ``RUN`` and ``RUN:<name>``; [] when it has none."""
    path = Path(path)
    eval_dir = path / "eval" if (path / "eval" / "predictions.jsonl").exists() else path
    extra = sorted(eval_dir.glob("protocol-*/predictions.jsonl"))
    if not extra or not (eval_dir / "predictions.jsonl").exists():
        return []
    return [(_file_label(eval_dir / "predictions.jsonl"), eval_dir / "predictions.jsonl")] + \
        [(_file_label(p), p) for p in extra]


def _unit(path: Path) -> Path:
    """What one label stands for: a method's folder of seeds, a run folder, or a file."""
    if path.parent.name == "eval":
        run = path.parent.parent
        return run.parent if run.name.startswith("seed-") else run
    return path


def distinct_labels(runs: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """Labels that name one input each: where two inputs share a label (``a/lora`` and
    ``b/lora``), each is prefixed with as many of its parent folders as tell them apart
    (``a/lora``, ``b/lora``); the seeds of one method keep their shared label."""
    units: dict[str, set[Path]] = {}
    for label, path in runs:
        units.setdefault(label, set()).add(_unit(Path(path)).resolve())
    out = []
    for label, path in runs:
        unit = _unit(Path(path)).resolve()
        if len(units[label]) > 1:
            others = units[label]
            for depth in range(1, len(unit.parts)):
                prefix = lambda u: "/".join(u.parts[-1 - depth:-1])  # noqa: E731
                if len({prefix(u) for u in others}) == len(others):
                    label = f"{prefix(unit)}/{label}"
                    break
        out.append((label, path))
    return out


def _grouped(runs: list[tuple[str, Path]]) -> list[tuple[str, list[Path]]]:
    """(label, files): the training seeds of one method (``<label>/seed-<s>/eval/...``) under one
    label; any other label appearing twice is an error."""
    groups: dict[str, list[Path]] = {}
    for label, path in runs:
        groups.setdefault(label, []).append(Path(path))
    for label, paths in groups.items():
        seeded = all(p.parent.name == "eval" and p.parent.parent.name.startswith("seed-") for p in paths)
        if len(paths) > 1 and not (seeded and len({p.parent.parent.parent for p in paths}) == 1):
            raise MedpeftError(f"two inputs share the label {label!r}")
    return list(groups.items())


def _seed_average(label: str, per_seed: list[dict], intersect: bool) -> dict:
    """Item scores averaged over a method's seeds (their items must agree unless ``intersect``)."""
    keys = set(per_seed[0])
    for other in per_seed[1:]:
        if set(other) != keys and not intersect:
            raise MedpeftError(f"{label}: its training seeds do not cover the same items; pass --intersect")
        keys &= set(other)
    return {k: float(np.mean([s[k] for s in per_seed])) for k in keys}


def compare_runs(paths: list[Path], *, intersect: bool = False, n_resamples: int = 10_000, seed: int = 0,
                 min_stratum_items: int = MIN_STRATUM_ITEMS) -> list[dict]:
    """Every pair of the given runs (in order), with Holm-adjusted sign-test p-values. One run
    folder scored under extra protocols compares its protocols with each other, on the items
    both define (a protocol may skip sets)."""
    if len(paths) == 1 and protocol_predictions(paths[0]):
        return compare_labeled(protocol_predictions(paths[0]), intersect=True, n_resamples=n_resamples, seed=seed,
                               min_stratum_items=min_stratum_items)
    return compare_labeled(distinct_labels([item for p in paths for item in find_predictions(p)]), intersect=intersect,
                           n_resamples=n_resamples, seed=seed, min_stratum_items=min_stratum_items)


def compare_labeled(runs: list[tuple[str, Path]], *, intersect: bool = False, n_resamples: int = 10_000,
                    seed: int = 0, min_stratum_items: int = MIN_STRATUM_ITEMS) -> list[dict]:
    """Like :func:`compare_runs`, for (label, predictions file) pairs; the seed runs of one
    method (``<label>/seed-<s>/eval/predictions.jsonl``) share a label."""
    groups = _grouped(runs)
    if len(groups) < 2:
        raise MedpeftError("compare needs at least two runs")
    loaded = {label: [load_predictions(p) for p in paths] for label, paths in groups}
    check_same_items([(label, p) for label, paths in groups for p in paths])
    scores = {label: _seed_average(label, [s for s, _ in per_seed], intersect) for label, per_seed in loaded.items()}
    calib = {label: {k: tuple(np.mean([c[k] for _, c in per_seed if k in c], axis=0))
                     for k in set.intersection(*(set(c) for _, c in per_seed))}
             for label, per_seed in loaded.items()}
    strata = {label: load_strata(paths[0]) for label, paths in groups}
    labels = [label for label, _ in groups]
    pairs = []
    for x, y in itertools.combinations(labels, 2):
        pair = compare_pair(scores[x], scores[y], (x, y), intersect=intersect, n_resamples=n_resamples, seed=seed,
                            calibration=(calib[x], calib[y]))
        pair["seeds_a"], pair["seeds_b"] = len(loaded[x]), len(loaded[y])
        keys = _paired(scores[x], scores[y], (x, y), intersect)
        pair["strata"] = stratum_effects(scores[x], scores[y], strata[x], keys, min_items=min_stratum_items,
                                         n_resamples=n_resamples, seed=seed)
        if max(len(loaded[x]), len(loaded[y])) > 1:
            pair["seeds_and_items"] = _seed_and_item_interval(loaded[x], loaded[y], keys, n_resamples, seed)
        pairs.append(pair)
    for pair, adjusted in zip(pairs, holm([p["sign_p"] for p in pairs])):
        pair["sign_p_holm"] = adjusted
    return pairs


def compare_table(pairs: list[dict]) -> str:
    """Markdown: one row per pair, macro delta with its bootstrap interval, pooled sign test, per-benchmark deltas."""
    benches = sorted({b for p in pairs for b in p["benchmarks"]})
    head = "| A vs B | macro delta (pp) [95% CI] | wins / losses / ties | sign p (Holm) | " + \
        " | ".join(f"{b} delta" for b in benches) + " |"
    lines = [head, "|---" * (4 + len(benches)) + "|"]
    for p in pairs:
        cells = [f"{p['benchmarks'][b]['delta']:+.2f}" if b in p["benchmarks"] else "-" for b in benches]
        lines.append(f"| {p['a']} vs {p['b']} | {p['macro_delta']:+.2f} [{p['ci_low']:+.2f}, {p['ci_high']:+.2f}] | "
                     f"{p['wins']} / {p['losses']} / {p['ties']} | {p['sign_p']:.3g} ({p['sign_p_holm']:.3g}) | "
                     + " | ".join(cells) + " |")
    found = [(p, field, value, e) for p in pairs for field, values in p.get("strata", {}).items()
             for value, e in values.items() if e["tested"] and e["q"] <= 0.05]
    if found:
        lines += ["", "Strata where A and B differ (Benjamini-Hochberg q <= 0.05 over each pair's tested strata):", "",
                  "| A vs B | stratum | n | delta (pp) [95% CI] | q |", "|---|---|---|---|---|"]
        lines += [f"| {p['a']} vs {p['b']} | {field}={value} | {e['n']} | {e['delta']:+.2f} "
                  f"[{e['ci_low']:+.2f}, {e['ci_high']:+.2f}] | {e['q']:.3g} |" for p, field, value, e in found]
    seeded = [p for p in pairs if p.get("seeds_and_items")]
    if seeded:
        lines += ["", "Training seeds and items (two-level bootstrap: seeds within each method, then items within "
                  "each benchmark; answers 'is A better than B as a training recipe'):", "",
                  "| A vs B | seeds A / B | macro delta (pp) | item-only 95% CI | seeds-and-items 95% CI |",
                  "|---|---|---|---|---|"]
        for p in seeded:
            t = p["seeds_and_items"]
            lines.append(f"| {p['a']} vs {p['b']} | {p['seeds_a']} / {p['seeds_b']} | {t['macro_delta']:+.2f} | "
                         f"[{p['ci_low']:+.2f}, {p['ci_high']:+.2f}] | [{t['ci_low']:+.2f}, {t['ci_high']:+.2f}] |")
    calibrated = [p for p in pairs if p.get("calibration")]
    if calibrated:
        lines += ["", "Calibration (single-answer items with option scores; A - B, lower is better; stratified "
                  "paired bootstrap 95% CI):", "", "| A vs B | n | Brier delta [95% CI] | NLL delta [95% CI] |",
                  "|---|---|---|---|"]
        for p in calibrated:
            c = p["calibration"]
            lines.append(f"| {p['a']} vs {p['b']} | {c['n']} | {c['brier']['delta']:+.4f} "
                         f"[{c['brier']['ci_low']:+.4f}, {c['brier']['ci_high']:+.4f}] | {c['nll']['delta']:+.4f} "
                         f"[{c['nll']['ci_low']:+.4f}, {c['nll']['ci_high']:+.4f}] |")
    return "\n".join(lines) + "\n"
