"""Zero-shot chain of thought, in the layout of lm-eval's ``mmlu_flan_cot_zeroshot`` tasks
(lm-eval 0.4.13, ``lm_eval/tasks/mmlu/flan_cot_zeroshot/_mmlu_flan_cot_zeroshot_template_yaml``).

* Prompt: ``Q: {stem}\\n(A) {a} (B) {b} ...\\nA: Let's think step by step.`` (Chinese items:
  ``问题：{stem}\\n(A) ...\\n答：让我们一步一步地思考。``), through the chat template when the
  tokenizer has one (lm-eval's ``--apply_chat_template``). A multi-answer item's prompt says
  that several options may be right.
* Greedy generation up to ``eval.cot_max_new_tokens`` (long enough to finish; a cut-off
  reasoning usually has no final line and counts as an extraction failure); the text is cut at
  a following ``\\nQ:`` (lm-eval's stop sequence).
* The answer is read from the first final-answer phrase, lm-eval's strict-match regex
  (``The answer is`` / ``answer is`` / ``The answer:`` / ``The final answer:``; Chinese ``答案是`` /
  ``答案：``): the option letters in the rest of that line, ``(B)`` or ``B``. No phrase, or no
  option letter after it, is an extraction failure (counted, scored wrong).
"""

from __future__ import annotations

import re

from ..data.record import MULTI, SINGLE, QARecord
from . import GenerationProtocol, chat_or_plain

_FINAL = re.compile(r"(?:The answer is |answer is |The answer: |The final answer: |答案是|答案[:：])\s*([^\n]*)")
_LETTER_RUN = re.compile(r"(?<![A-Za-z])([A-J]+)(?![A-Za-z])")
_MULTI_HINT = {"en": " (one or more options may be correct)", "zh": "（可能有多个正确选项）"}


class ZeroShotCoT(GenerationProtocol):
    name = "cot"
    source = "lm-evaluation-harness 0.4.13, tasks/mmlu/flan_cot_zeroshot (prompt layout and strict-match regex)"
    def task(self, record: QARecord) -> str | None:
        return "cot_zeroshot" if record.question_type in (SINGLE, MULTI) else None

    def max_new_tokens(self, cfg) -> int:
        return cfg.cot_max_new_tokens

    def prompt(self, record: QARecord, tokenizer) -> str:
        hint = _MULTI_HINT[record.language] if record.question_type == MULTI else ""
        options = " ".join(f"({k}) {v}" for k, v in record.options.items())
        if record.language == "zh":
            text = f"问题：{record.question.strip()}{hint}\n{options}\n答：让我们一步一步地思考。"
        else:
            text = f"Q: {record.question.strip()}{hint}\n{options}\nA: Let's think step by step."
        return chat_or_plain(tokenizer, text)

    def parse(self, text: str, record: QARecord) -> frozenset[str] | None:
        text = text.split("\nQ:")[0]
        m = _FINAL.search(text)
        if not m:
            return None
        line = m.group(1)
        # "(B)", "B", "B." or "ACD" / "A, C and D": runs of capitals not inside a Latin word
        found = [c for run in _LETTER_RUN.findall(line) for c in run if c in record.options]
        if not found:
            return None
        return frozenset(found) if record.question_type == MULTI else frozenset(found[0])
