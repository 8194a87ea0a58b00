"""Agreement of the text-only tagger with the metadata-derived specialty.

    python benchmarks/tag_agreement.py [DATA_DIR]   (default: ../shared/data)

Prints a Markdown table: for each sample with specialty metadata (MedMCQA subject_name,
CMMLU subject, MMLU subject), the share of items whose keyword-only specialty equals the
metadata one, overall and among items where the keyword rules fired at all.
"""

from __future__ import annotations

import sys
from pathlib import Path

from medpeft.data import load_benchmark
from medpeft.tags import UNKNOWN, tag_record

SAMPLES = [("medmcqa", "medmcqa/dev.rows0-299.jsonl"), ("cmmlu", "cmmlu"), ("mmlu", "mmlu")]


def main() -> None:
    data = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    print("| sample | n | agreement | keyword rule fired | agreement where fired |")
    print("|---|---|---|---|---|")
    for bench, rel in SAMPLES:
        recs = load_benchmark(bench, data / rel).records
        pairs = [(tag_record(r).specialty, tag_record(r, text_only=True).specialty) for r in recs]
        fired = [(m, t) for m, t in pairs if t != UNKNOWN]
        agree = sum(m == t for m, t in pairs) / len(pairs)
        agree_fired = sum(m == t for m, t in fired) / len(fired) if fired else 0.0
        print(f"| {bench} ({rel}) | {len(pairs)} | {100 * agree:.1f}% | {100 * len(fired) / len(pairs):.1f}% "
              f"| {100 * agree_fired:.1f}% |")


if __name__ == "__main__":
    main()
