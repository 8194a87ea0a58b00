"""The one record type every benchmark loader produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SINGLE, MULTI, OPEN = "single", "multi", "open"
SUMMARY = "summary"  # a summarisation item: source text in ``question``, the reference summary in ``reference``


def normalize_number(text: str) -> str | None:
    """A number's canonical text, so that gold and predicted answers compare equal whatever
    their spelling: ``"1,000"`` -> ``"1000"``, ``"007"`` -> ``"7"``, ``"5.00"`` -> ``"5"``,
    ``"-0.50"`` -> ``"-0.5"``; None when ``text`` is not a number."""
    import math

    text = text.replace(",", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return str(int(value)) if value == int(value) else repr(value)


@dataclass(frozen=True)
class QARecord:
    """One benchmark item.

    ``answer`` holds the gold option letters (a set, so multi-answer items compare as
    sets); it is empty for open-ended items (GSM8K) and summarisation items (ACI-Bench),
    whose gold is ``reference`` (the final number; the reference summary, never read for
    tags or routing). A summarisation item's source text is its ``question``.
    ``metadata`` holds only *non-answer* fields of the release (exam class, subject,
    department...); explanations are dropped because they reveal the answer.
    """

    id: str
    benchmark: str
    language: str
    question: str
    options: dict[str, str]
    answer: frozenset[str]
    question_type: str
    metadata: dict[str, Any] = field(default_factory=dict)
    reference: str | None = None
    source: str = ""

    @property
    def answer_text(self) -> str:
        """Gold answer as the training target: sorted letters, e.g. ``"ACD"``."""
        return "".join(sorted(self.answer)) if self.answer else (self.reference or "")

    def digest(self) -> str:
        """What identifies the item's content in a prediction row (``item``): the first 16 hex
        digits of sha256 over its question, options, gold letters and reference -- so that
        comparisons pair equal items, not just equal ids (an id-less file's ids are line numbers)."""
        import hashlib
        import json

        content = [self.question, sorted(self.options.items()), sorted(self.answer), self.reference]
        return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "benchmark": self.benchmark,
            "language": self.language,
            "question": self.question,
            "options": self.options,
            "answer": sorted(self.answer),
            "question_type": self.question_type,
            "metadata": self.metadata,
            "reference": self.reference,
            "source": self.source,
        }
