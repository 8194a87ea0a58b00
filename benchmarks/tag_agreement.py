"""Agreement of the text-only taggers (keyword rules, learned) with the metadata-derived specialty.

    python benchmarks/tag_agreement.py [DATA_DIR] [--folds K]   (default: ../shared/data, K = 5)

For each shared sample with specialty metadata (MedMCQA subject_name, CMMLU subject, MMLU
subject) every item is tagged by a learned tagger fitted on the other folds (seeded K-fold
cross-fitting with ``medpeft.tagger.fit_tagger``, the fit ``medpeft tagger train`` runs,
default settings), so each item's learned tag is a held-out prediction. Printed as Markdown:
agreement with the metadata tag of the majority class of the training folds, the keyword
rules, the learned tagger (an ``unknown`` below its threshold counts as a disagreement) and
its arg-max, each with a 95% Wilson interval; then the learned tagger's agreement against
the number of training items (a learning curve on the folds' training parts).
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path

from medpeft.data import load_benchmark
from medpeft.stats import wilson_interval
from medpeft.tagger import TaggerSettings, fit_tagger, metadata_label
from medpeft.tags import UNKNOWN, tag_record

SAMPLES = [("medmcqa", "medmcqa/dev.rows0-299.jsonl"), ("cmmlu", "cmmlu"), ("mmlu", "mmlu")]


def folds(n: int, k: int, seed: int = 0) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [sorted(order[i::k]) for i in range(k)]


def rate(hits: int, n: int) -> str:
    low, high = wilson_interval(hits, n)
    return f"{100 * hits / n:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def cross_fitted(records, k: int, settings: TaggerSettings, train_share: float = 1.0, seed: int = 0):
    """Per item (in order): the learned prediction and the training folds' majority class, fitted
    on ``train_share`` of the other folds' items."""
    learned, majority = [None] * len(records), [None] * len(records)
    for test in folds(len(records), k, seed):
        held = set(test)
        train = [r for i, r in enumerate(records) if i not in held]
        train = random.Random(seed).sample(train, round(train_share * len(train))) if train_share < 1 else train
        tagger = fit_tagger(train, settings)
        common = Counter(metadata_label(r, "specialty") for r in train).most_common(1)[0][0]
        for i in test:
            learned[i], majority[i] = tagger.predict(records[i], "specialty"), common
    return learned, majority


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    data, settings = Path(args.data), TaggerSettings()
    print(f"Held-out agreement with the metadata specialty ({args.folds}-fold cross-fitting, learned threshold "
          f"{settings.min_confidence}):\n")
    print("| sample | n | classes | majority class | keyword rules | learned | learned arg-max | learned coverage |")
    print("|---|---|---|---|---|---|---|---|")
    curves = {}
    for bench, rel in SAMPLES:
        records = load_benchmark(bench, data / rel).records
        gold = [metadata_label(r, "specialty") for r in records]
        keyword = [tag_record(r, text_only=True).specialty for r in records]
        learned, majority = cross_fitted(records, args.folds, settings)
        n = len(records)
        print(f"| {bench} ({rel}) | {n} | {len(set(gold))} | {rate(sum(m == g for m, g in zip(majority, gold)), n)} "
              f"| {rate(sum(k == g for k, g in zip(keyword, gold)), n)} "
              f"| {rate(sum(p.tag == g for p, g in zip(learned, gold)), n)} "
              f"| {rate(sum(p.best == g for p, g in zip(learned, gold)), n)} "
              f"| {100 * sum(p.tag != UNKNOWN for p in learned) / n:.1f}% |")
        curves[bench] = []
        for share in (0.25, 0.5, 1.0):
            part, _ = cross_fitted(records, args.folds, settings, share)
            size = round(share * (n - n // args.folds))
            curves[bench].append((size, rate(sum(p.best == g for p, g in zip(part, gold)), n)))
    print("\nLearned arg-max agreement against training items per fit (same folds):\n")
    print("| sample | " + " | ".join(f"~{size} items" for size, _ in curves["medmcqa"]) + " |")
    print("|---|" + "---|" * len(curves["medmcqa"]))
    for bench, points in curves.items():
        print(f"| {bench} | " + " | ".join(r for _, r in points) + " |")


if __name__ == "__main__":
    main()
