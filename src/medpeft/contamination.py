"""Contamination audit (``medpeft contamination CONFIG``): near-duplicates between every
training source and every evaluation set, beyond the exact ``exclude``.

* Text of an item: its stem and options (never the answer), NFKC-normalised, lower-cased,
  punctuation removed; tokens are words, and every CJK character is a token of its own.
* Shingles: word 3-grams of the stem and of each option apart (a text shorter than 3 tokens
  is one shingle), so that reordering the options changes nothing.
* Candidates: MinHash signatures (128 permutations) in a MinHash LSH index over the training
  items (``datasketch``, the established library), at the Jaccard threshold; every candidate
  pair is then confirmed with the exact Jaccard similarity of the two shingle sets, and
  flagged when it is at least ``threshold`` (default 0.5).

A light paraphrase (a few words changed, an option reworded, options reordered) keeps most
shingles and is found; a rewrite in other words is not (this is text overlap, not meaning).
Outputs: ``contamination.json`` (settings; per training source x evaluation set: items,
flagged items, share), ``flagged.jsonl`` (every flagged pair with its similarity and both
texts), and, when the config's runs have been evaluated, each run's accuracy recomputed on the
clean subset (the evaluation items with no flagged pair).
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from .data.record import QARecord

NUM_PERM = 128
SHINGLE = 3
DEFAULT_THRESHOLD = 0.5
_TOKEN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+", re.UNICODE)


def item_text(record: QARecord) -> str:
    """Stem and options: what a leaked copy of the item would share (the answer never enters)."""
    return " ".join([record.question, *record.options.values()])


def shingles(text: str, n: int = SHINGLE) -> set[str]:
    """Word ``n``-grams of the normalised text (CJK characters as words)."""
    tokens = _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())
    if len(tokens) < n:
        return {" ".join(tokens)} if tokens else set()
    return {" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def item_shingles(record: QARecord) -> set[str]:
    """The shingles of the stem and of every option, each text on its own."""
    out = shingles(record.question)
    for text in record.options.values():
        out |= shingles(text)
    return out


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def _minhash(grams: set[str]):
    from datasketch import MinHash

    m = MinHash(num_perm=NUM_PERM, seed=1)
    m.update_batch([g.encode("utf-8") for g in grams])
    return m


def near_duplicates(train: dict[str, list[QARecord]], evals: dict[str, list[QARecord]],
                    threshold: float = DEFAULT_THRESHOLD) -> tuple[list[dict], dict]:
    """Flagged (training item, evaluation item) pairs with Jaccard >= ``threshold``, and the
    counts per (training source, evaluation set)."""
    from datasketch import MinHashLSH

    # LSH recall is below 1 near its threshold: index at a lower one and confirm exactly
    lsh = MinHashLSH(threshold=max(threshold - 0.2, 0.1), num_perm=NUM_PERM)
    grams: dict[str, set[str]] = {}
    where: dict[str, tuple[str, QARecord]] = {}
    for source, records in train.items():
        for i, rec in enumerate(records):
            key = f"{source}\x00{i}"
            grams[key] = item_shingles(rec)
            where[key] = (source, rec)
            if grams[key]:
                lsh.insert(key, _minhash(grams[key]))
    flagged = []
    counts = {f"{s} x {e}": {"train_source": s, "eval_set": e, "eval_items": len(recs), "flagged_items": 0}
              for s in train for e, recs in evals.items()}
    for eval_name, records in evals.items():
        for rec in records:
            mine = item_shingles(rec)
            if not mine:
                continue
            hits = {}
            for key in lsh.query(_minhash(mine)):
                sim = jaccard(mine, grams[key])
                if sim >= threshold:
                    source, train_rec = where[key]
                    hits.setdefault(source, []).append((sim, train_rec))
            for source, found in hits.items():
                counts[f"{source} x {eval_name}"]["flagged_items"] += 1
                for sim, train_rec in sorted(found, key=lambda x: -x[0]):
                    flagged.append({"eval_set": eval_name, "eval_id": rec.id, "train_source": source,
                                    "train_id": train_rec.id, "jaccard": round(sim, 4),
                                    "eval_text": item_text(rec), "train_text": item_text(train_rec)})
    for c in counts.values():
        c["share"] = c["flagged_items"] / c["eval_items"] if c["eval_items"] else 0.0
    return flagged, counts


def clean_accuracy(predictions: Path, flagged_ids: dict[str, set[str]]) -> dict:
    """Per evaluation set of a predictions file: accuracy on every item and on the clean ones."""
    from .compare import load_correctness

    scores = load_correctness(predictions)
    out = {}
    for bench in sorted({b for b, _ in scores}):
        items = {i: v for (b, i), v in scores.items() if b == bench}
        clean = [v for i, v in items.items() if i not in flagged_ids.get(bench, set())]
        out[bench] = {"n": len(items), "score": sum(items.values()) / len(items), "clean_n": len(clean),
                      "clean_score": sum(clean) / len(clean) if clean else None}
    return out
