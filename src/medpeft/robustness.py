"""Option-order robustness (``eval.permute_options: cyclic``).

Every multiple-choice item is re-scored under each cyclic rotation of its options: rotation r
puts the text of option ``(i + r) mod k`` at position i, and the gold letters move with their
texts (multi-answer items too). Per set:

* accuracy under each rotation (rotation 0 is the items as released);
* robust accuracy: the share of items right under every rotation;
* agreement: the share of items whose predicted option *texts* are the same under every rotation;
* position bias: how often each letter position is predicted, against how often it is gold,
  pooled over the rotations (gold positions are then balanced for items of one option count),
  with the largest excess of predicted over gold share.
"""

from __future__ import annotations

import dataclasses

from .data.record import MULTI, SINGLE, QARecord
from .dataset import TaggedRecord


def rotate_options(record: QARecord, shift: int) -> QARecord:
    """``record`` with its option texts rotated by ``shift`` positions (letters kept in place),
    the gold letters following their texts; a verbatim copy of the text rotates with them."""
    letters = list(record.options)
    k = len(letters)
    texts = [record.options[x] for x in letters]
    options = {letters[i]: texts[(i + shift) % k] for i in range(k)}
    answer = frozenset(letters[(letters.index(a) - shift) % k] for a in record.answer)
    metadata = dict(record.metadata)
    raw = metadata.get("verbatim")
    if isinstance(raw, dict) and isinstance(raw.get("options"), dict):
        raw_texts = [raw["options"].get(x, record.options[x]) for x in letters]
        metadata["verbatim"] = {**raw, "options": {letters[i]: raw_texts[(i + shift) % k] for i in range(k)}}
    return dataclasses.replace(record, options=options, answer=answer, metadata=metadata)


def rotated_items(items: list[TaggedRecord], shift: int) -> list[TaggedRecord]:
    return [dataclasses.replace(t, record=rotate_options(t.record, shift)) for t in items]


def original_positions(pred: frozenset[str], letters: list[str], shift: int) -> frozenset[int]:
    """Which of the released options (by index) a prediction under rotation ``shift`` names."""
    k = len(letters)
    return frozenset((letters.index(p) + shift) % k for p in pred if p in letters)


def robustness_summary(records: list[QARecord], preds: list[list[frozenset[str]]],
                       correct: list[list[bool]]) -> dict:
    """The set's robustness numbers from each item's predictions under its rotations
    (``preds[i][r]``: the letters predicted for item i under rotation r; an item of k options
    has k rotations)."""
    n = len(records)
    if n == 0:
        return {"n": 0}
    rotations = max(len(rec.options) for rec in records)
    by_rotation = [[correct[i][r] for i in range(n) if r < len(correct[i])] for r in range(rotations)]
    predicted: dict[str, int] = {}
    gold: dict[str, int] = {}
    agree = 0
    for i, rec in enumerate(records):
        letters = list(rec.options)
        agree += len({original_positions(p, letters, r) for r, p in enumerate(preds[i])}) == 1
        for r, p in enumerate(preds[i]):
            for x in p:
                predicted[x] = predicted.get(x, 0) + 1
            for g in rotate_options(rec, r).answer:
                gold[g] = gold.get(g, 0) + 1
    positions = sorted(set(predicted) | set(gold))
    pred_total, gold_total = sum(predicted.values()) or 1, sum(gold.values()) or 1
    share = {x: {"predicted": predicted.get(x, 0) / pred_total, "gold": gold.get(x, 0) / gold_total}
             for x in positions}
    worst = max(positions, key=lambda x: share[x]["predicted"] - share[x]["gold"])
    return {"n": n, "rotations": rotations,
            "accuracy_by_rotation": [sum(c) / len(c) for c in by_rotation],
            "accuracy": sum(c[0] for c in correct) / n,
            "robust_accuracy": sum(all(c) for c in correct) / n, "agreement": agree / n, "position_share": share,
            "max_position_excess": {"position": worst, "excess": share[worst]["predicted"] - share[worst]["gold"]}}


def permutable(record: QARecord) -> bool:
    return record.question_type in (SINGLE, MULTI) and len(record.options) >= 2
