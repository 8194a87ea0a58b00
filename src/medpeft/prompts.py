"""Answer-only prompts: one template per language, the same for every method.

The target is the gold option letters in alphabetical order (``"B"``, ``"ACD"``) followed
by the end-of-turn token. With a chat template (Qwen3: thinking off) the question is the
user turn and the letters the assistant turn; without one, a plain ``Answer:`` suffix.

A summarisation item's user turn is an instruction and its source text; the target is the
reference summary. A prompt longer than its budget loses tokens from the *middle of the
source text* (its beginning and end are kept, joined by " ... "), so the instruction and the
end of the prompt (the cue the answer follows) stay intact; a QA prompt is left-truncated
(its end holds the options and the cue).
"""

from __future__ import annotations

from dataclasses import dataclass

from .data.record import MULTI, OPEN, SUMMARY, QARecord

INSTRUCTIONS = {
    ("zh", "single"): "以下是一道医学单项选择题，请只回答正确选项的字母。",
    ("zh", "multi"): "以下是一道医学多项选择题（可能有多个正确选项），请只回答所有正确选项的字母。",
    ("en", "single"): "The following is a multiple-choice medical question. Answer with the letter of the correct option only.",
    ("en", "multi"): "The following is a medical question with one or more correct options. "
                     "Answer with the letters of all correct options only, for example ACD.",
    ("en", "open"): "Solve the following problem. End with \"The answer is <number>\".",
    ("zh", "open"): "请解答下面的问题，最后写出“答案是<数字>”。",
    ("en", "summary"): "Summarise the following clinical text.",
    ("zh", "summary"): "请概括以下临床文本。",
}
# ACI-Bench: the note (or one section of it) written from a doctor-patient conversation
NOTE_INSTRUCTION = "Write the {what} for the following doctor-patient conversation."
NOTE_SECTIONS = {"full": "clinical note", "subjective": "SUBJECTIVE section of the clinical note",
                 "objective_exam": "OBJECTIVE EXAM section of the clinical note",
                 "objective_results": "OBJECTIVE RESULTS section of the clinical note",
                 "assessment_and_plan": "ASSESSMENT AND PLAN section of the clinical note"}
ELLIPSIS = " ... "


def instruction(record: QARecord) -> str:
    """The instruction line of ``record``'s prompt."""
    if record.question_type == SUMMARY:
        section = record.metadata.get("note_section") if record.benchmark == "aci-bench" else None
        if section in NOTE_SECTIONS:
            return NOTE_INSTRUCTION.format(what=NOTE_SECTIONS[section])
        return INSTRUCTIONS[(record.language, SUMMARY)]
    kind = MULTI if record.question_type == MULTI else OPEN if record.question_type == OPEN else "single"
    return INSTRUCTIONS[(record.language, kind)]
PLAIN_ANSWER_CUE = {"zh": "答案：", "en": "Answer:"}


def user_message(record: QARecord, text: str | None = None) -> str:
    """Instruction, stem (a summarisation item's source text, or ``text`` in its place) and
    options, as the user turn."""
    lines = [instruction(record), "", record.question if text is None else text]
    lines += [f"{letter}. {text}" for letter, text in record.options.items()]
    return "\n".join(lines)


@dataclass
class EncodedExample:
    input_ids: list[int]
    prompt_len: int  # tokens before the answer; the loss covers input_ids[prompt_len:]
    truncated: bool


class PromptFormatter:
    """Turns records into token ids for training and scoring with one fixed template."""

    def __init__(self, tokenizer, max_length: int = 768):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self._letter_ids: dict[str, dict[str, int]] = {}
        if self.chat:
            self.answer_prefix, self.answer_end = "", self._end_of_turn()
        else:
            self.answer_prefix, self.answer_end = " ", tokenizer.eos_token or ""

    def _end_of_turn(self) -> str:
        for candidate in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
            if candidate in self.tokenizer.get_vocab():
                return candidate
        return self.tokenizer.eos_token or ""

    def prompt_text(self, record: QARecord, text: str | None = None) -> str:
        if self.chat:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user_message(record, text)}],
                tokenize=False, add_generation_prompt=True, enable_thinking=False,
            )
        return user_message(record, text) + "\n" + PLAIN_ANSWER_CUE[record.language]

    def target_text(self, record: QARecord) -> str:
        return self.answer_prefix + record.answer_text + self.answer_end

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_prompt(self, record: QARecord, reserve: int = 0) -> EncodedExample:
        """Prompt ids, left-truncated to ``max_length - reserve`` (the end holds the options and cue)."""
        return self.encode_prompts([record], reserve)[0]

    def encode_prompts(self, records: list[QARecord], reserve: int = 0) -> list[EncodedExample]:
        """:meth:`encode_prompt` of many records with one batched tokenizer call (the scorers
        encode whole evaluation sets; one call per prompt was ~15% of a CPU scoring pass)."""
        if not records:
            return []
        bos = [self.tokenizer.bos_token_id] if not self.chat and self.tokenizer.bos_token_id is not None \
            and getattr(self.tokenizer, "add_bos_token", False) else []
        limit = self.max_length - reserve
        out = []
        encoded = self.tokenizer([self.prompt_text(r) for r in records], add_special_tokens=False)["input_ids"]
        for record, ids in zip(records, encoded):
            ids = bos + ids
            truncated = len(ids) > limit
            if truncated and record.question_type == SUMMARY:
                ids = bos + self._shortened_source_prompt(record, len(ids) - limit)
            if len(ids) > limit:  # a QA prompt (or a summary prompt whose text alone is too long)
                ids = ids[len(ids) - limit:]
            out.append(EncodedExample(ids, len(ids), truncated))
        return out

    def _shortened_source_prompt(self, record: QARecord, excess: int) -> list[int]:
        """The prompt of a summarisation item with ``excess`` (and a few more) tokens cut from the
        middle of its source text: its first and last halves of what fits, joined by " ... "."""
        ids = self._ids(record.question)
        keep = max(len(ids) - excess - len(self._ids(ELLIPSIS)) - 2, 0)  # 2: re-tokenization at the joins
        head, tail = ids[:keep // 2], ids[len(ids) - (keep - keep // 2):] if keep else []
        text = self.tokenizer.decode(head) + ELLIPSIS + self.tokenizer.decode(tail)  # any tokenizer (no offsets needed)
        return self._ids(self.prompt_text(record, text.strip()))

    def encode_train(self, record: QARecord) -> EncodedExample:
        """Prompt + target ids; the prompt and target are tokenized apart so no token spans both.

        A target longer than half of ``max_length`` (a long reference summary) is cut to that
        half -- without its end-of-turn token, so the model is not taught to stop there -- and
        the prompt gets the other half."""
        target = self._ids(self.target_text(record))
        cut = len(target) > self.max_length - self.max_length // 2
        if cut:
            target = target[:self.max_length - self.max_length // 2]
        prompt = self.encode_prompt(record, reserve=len(target))
        return EncodedExample(prompt.input_ids + target, prompt.prompt_len, prompt.truncated or cut)

    def letter_token_ids(self, letters: str) -> dict[str, int]:
        """The single token that starts an answer with each letter (as in the training target).

        Cached per option-letter string: the scorers ask for it once per item."""
        if letters in self._letter_ids:
            return self._letter_ids[letters]
        out = {}
        for letter in letters:
            ids = self._ids(self.answer_prefix + letter)
            if len(ids) != 1:
                raise ValueError(f"answer letter {letter!r} is {len(ids)} tokens for this tokenizer; "
                                 "the 'letters' scorer needs single-token letters (use scorer=generate)")
            out[letter] = ids[0]
        self._letter_ids[letters] = out
        return out

    @property
    def end_token_id(self) -> int | None:
        ids = self._ids(self.answer_end) if self.answer_end else []
        return ids[0] if len(ids) == 1 else self.tokenizer.eos_token_id
