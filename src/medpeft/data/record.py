"""The one record type every benchmark loader produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SINGLE, MULTI, OPEN = "single", "multi", "open"


@dataclass(frozen=True)
class QARecord:
    """One benchmark item.

    ``answer`` holds the gold option letters (a set, so multi-answer items compare as
    sets); it is empty for open-ended items (GSM8K), whose gold is ``reference``.
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
