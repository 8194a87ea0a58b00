"""Evaluation protocols: how a record becomes a prompt, what is scored, how an answer is read.

Medical-LLM numbers are comparable only under one protocol, so one checkpoint can be scored
under each of the protocols users compare against (docs/evaluation.md):

* ``medpeft`` (the default): medpeft's answer-only prompt (``prompts.py``) and its scorer
  (``eval.scorer``: option-letter likelihood or generation).
* ``lm-eval``: lm-evaluation-harness's zero-shot multiple-choice tasks as the Open Medical-LLM
  Leaderboard runs them (:mod:`.lm_eval`), log-likelihood of each choice, ``acc`` and ``acc_norm``.
* ``opencompass-cmb``: OpenCompass's CMB generation prompt and answer post-processing
  (:mod:`.opencompass`).
* ``cot``: zero-shot chain of thought, greedy, answer read from a final-answer line (:mod:`.cot`).

A protocol either scores choices by log-likelihood (:class:`LoglikelihoodProtocol`) or
generates and parses (:class:`GenerationProtocol`); the scoring loops are the evaluator's.
Each protocol says which items it defines (``task``); a set it does not define is refused
as a headline protocol and skipped (and listed) as an extra one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..data.record import QARecord

MEDPEFT = "medpeft"


@dataclass(frozen=True)
class ChoiceRequest:
    """A log-likelihood protocol's view of one item: the context and one continuation per choice."""

    context: str  # the rendered prompt (chat template applied when asked)
    continuations: list[str]  # what is scored after the context, target delimiter included
    labels: list[str]  # the option letter each choice stands for (the prediction written out)
    choice_lengths: list[int]  # characters of each choice without the delimiter (acc_norm's divisor)


class LoglikelihoodProtocol:
    """Scores every choice by the summed log-probability of its continuation tokens."""

    kind = "loglikelihood"
    name = ""
    source = ""  # what the protocol mirrors (file and version)
    order_dependent = True  # whether the prompt shows the options (option-order robustness applies)

    def task(self, record: QARecord) -> str | None:
        """The reference task this record is scored as, or None when the protocol defines none."""
        raise NotImplementedError

    def request(self, record: QARecord, tokenizer, apply_chat_template: bool) -> ChoiceRequest:
        raise NotImplementedError

    def order_dependent_for(self, record: QARecord) -> bool:
        return self.order_dependent


class GenerationProtocol:
    """Greedy generation from a prompt, then an answer parser; ``None`` from the parser is an
    extraction failure (counted, and scored wrong)."""

    kind = "generate"
    name = ""
    source = ""
    order_dependent = True

    def task(self, record: QARecord) -> str | None:
        raise NotImplementedError

    def prompt(self, record: QARecord, tokenizer) -> str:
        raise NotImplementedError

    def order_dependent_for(self, record: QARecord) -> bool:
        return self.order_dependent

    def parse(self, text: str, record: QARecord) -> frozenset[str] | None:
        raise NotImplementedError


def chat_or_plain(tokenizer, user: str, system: str | None = None) -> str:
    """``user`` (and ``system``) through the tokenizer's chat template with the generation prompt,
    or the plain text when it has none (how lm-eval and OpenCompass render a one-turn prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        return (system or "") + user
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_hash(prompts: list[str]) -> str:
    """sha256 of the rendered prompts of a set, in item order: two runs with the same hash saw
    the same text."""
    digest = hashlib.sha256()
    for text in prompts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def _registry() -> dict[str, object]:
    from .cot import ZeroShotCoT
    from .lm_eval import LmEvalHarness
    from .opencompass import OpenCompassCMB

    return {p.name: p for p in (LmEvalHarness(), OpenCompassCMB(), ZeroShotCoT())}


def protocol_names() -> tuple[str, ...]:
    """Every protocol a config may name: ``medpeft`` and the registered ones (the registry is
    the one list; a new protocol is one class added to :func:`_registry`)."""
    return (MEDPEFT, *_registry())


def get_protocol(name: str):
    """The protocol object of ``name`` (None for ``medpeft``: the evaluator's own path)."""
    if name == MEDPEFT:
        return None
    return _registry()[name]
