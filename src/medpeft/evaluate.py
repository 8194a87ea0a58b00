"""Scoring: two scorers, one answer parser, the same for every method.

* ``letters``: one forward pass over the prompt with logits only at the last position;
  the prediction is the argmax of the next-token log-likelihood over the item's option
  letters. Multi-answer items continue with *constrained greedy decoding* from that
  point: each next token is restricted to a later option letter or the end-of-answer
  token (the training target writes letters in alphabetical order, e.g. ``ACD``), using
  ``generate`` with ``prefix_allowed_tokens_fn`` and the KV cache. The predicted set is
  then compared with the gold set exactly.
* ``generate``: greedy decoding (at most ``max_new_tokens``, batched, KV cache, stops when
  every item has ended), then :func:`parse_answer`. ``compile_decode``: the same with a
  static cache and a compiled decoding step (experimental).

Open-ended items (GSM8K) are always generated and scored by the final number.
Summarisation items (ACI-Bench) are generated greedily (KV cache, batched, each item stopping
at its end of turn) up to their set's ``max_new_tokens`` and scored with ROUGE-1/2/L F by
Google's ``rouge-score`` (:func:`rouge_scores`).

Other protocols (``eval.protocol``: ``lm-eval``, ``opencompass-cmb``, ``cot``; ``protocols/``) render
their own prompts: a log-likelihood protocol scores each choice's continuation
(:meth:`Evaluator._score_choices`), a generation protocol generates greedily and parses with its
own rule (:meth:`Evaluator._score_protocol_generate`); items where no answer could be parsed
are counted as extraction failures.

Under ``torchrun`` / ``accelerate launch`` each process scores every ``world``-th batch and
the predictions are gathered: the same files and numbers as one process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapters import routing_state, set_routing
from .data.record import OPEN, SUMMARY, normalize_number
from .dataset import TaggedRecord
from .distributed import processes
from .errors import MedpeftError
from .io import write_json, write_jsonl
from .precision import autocast_for, half_precision_adapters
from .prompts import PromptFormatter
from .protocols import MEDPEFT, get_protocol, prompt_hash
from .protocols.lm_eval import encode_pair, max_length as lm_eval_max_length
from .stats import calibration_summary, item_calibration, results_summary

# Patterns tried in order; the first that yields letters among the item's options wins.
_ANSWER_PATTERNS = [
    re.compile(r"(?:答案|正确答案|正确选项|最佳答案|应选)\s*(?:是|为|应为|应该是)?\s*[:：]?\s*[(（]?\s*([A-J](?:\s*[,，、和及]?\s*[A-J])*)"),
    re.compile(r"(?:the\s+)?(?:correct\s+|final\s+|best\s+)?answers?\s*(?:is|are|would be|:)\s*:?\s*(?:option\s*)?[(\[]?"
               r"([A-J](?:\s*(?:,|and|&)?\s*[A-J])*)\b", re.I),
    re.compile(r"^\s*[(\[]?([A-J]{1,10})[)\]]?\s*(?:$|[\.．、:：,，;；)\n<])"),
    re.compile(r"^\s*([A-J]{1,10})\s*$", re.M),
    re.compile(r"[(（]([A-J])[)）]"),
    re.compile(r"(?:option|选项|选)\s*([A-J])\b", re.I),
]
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def parse_answer(text: str, options: str, multi: bool) -> frozenset[str]:
    """Answer letters in generated ``text``, restricted to the item's ``options``.

    Single-answer items keep the first letter found; multi-answer items keep the set.
    Returns an empty set when no pattern yields a valid letter (scored wrong).
    """
    for pattern in _ANSWER_PATTERNS:
        for m in pattern.finditer(text):
            letters = [c for c in m.group(1).upper() if c in options]
            if letters:
                return frozenset(letters) if multi else frozenset(letters[0])
    return frozenset()


def parse_number(text: str) -> str | None:
    """The final number of a worked solution (after 'answer is' / '####' when present)."""
    cue = re.search(r"(?:answer is|####|答案是)\s*:?\s*\$?\s*(-?\d[\d,]*\.?\d*)", text, re.I)
    found = cue.group(1) if cue else (_NUMBER.findall(text) or [None])[-1]
    return normalize_number(found) if found is not None else None


_ROUGE: dict[str, object] = {}


class _CharTokenizer:
    """rouge-score's tokenizer interface for Chinese: every non-space character is a token
    (its default tokenizer keeps only [a-z0-9] and would see no Chinese text at all)."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text.lower() if not c.isspace()]


def rouge_scores(generated: str, reference: str, language: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures of ``generated`` against ``reference`` with Google's
    ``rouge-score`` (the reference implementation): Porter stemming for English, characters
    as tokens for Chinese."""
    scorer = _ROUGE.get(language)
    if scorer is None:
        from rouge_score import rouge_scorer

        kinds = ["rouge1", "rouge2", "rougeL"]
        scorer = _ROUGE[language] = (rouge_scorer.RougeScorer(kinds, tokenizer=_CharTokenizer()) if language == "zh"
                                     else rouge_scorer.RougeScorer(kinds, use_stemmer=True))
    return {k: float(v.fmeasure) for k, v in scorer.score(reference, generated).items()}


@dataclass
class Prediction:
    item: TaggedRecord
    pred: frozenset[str] | str | None
    correct: bool | None  # None: a summarisation item (scored by ROUGE in ``scores``)
    scores: dict[str, float] | None = None  # per option: its log-likelihood (what the option probabilities come from)
    text: str | None = None
    extracted: bool = True  # False: a generated answer where no answer could be parsed (scored wrong)
    extra: dict | None = None  # protocol-specific fields (lm-eval: acc_norm and its prediction)


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (ids, attention mask) on ``device`` (prompts end at the same position)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


class Evaluator:
    """Scores tagged records with a model; one instance per (model, tokenizer)."""

    def __init__(self, model, tokenizer, *, max_length: int = 768, batch_size: int = 16,
                 max_new_tokens: int = 10, open_max_new_tokens: int = 256, summary_max_new_tokens: int = 512,
                 summary_limits: dict[str, int] | None = None, device=None, compile_decode: bool = False,
                 cot_max_new_tokens: int = 512, apply_chat_template: bool = False):
        self.model, self.tok = model, tokenizer
        self.cot_max_new_tokens = cot_max_new_tokens
        self.apply_chat_template = apply_chat_template  # lm-eval protocol: its --apply_chat_template
        self.compile_decode = compile_decode
        self._static_caches: dict[tuple[int, int], object] = {}
        self.fmt = PromptFormatter(tokenizer, max_length)
        self.batch_size, self.max_new_tokens, self.open_max_new_tokens = batch_size, max_new_tokens, open_max_new_tokens
        self.summary_max_new_tokens = summary_max_new_tokens
        self.summary_limits = dict(summary_limits or {})  # a summarisation set's own limit, by set name
        self.device = device or next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id
        self.end_id = self.fmt.end_token_id
        self.stop_ids = sorted({i for i in (self.end_id, tokenizer.eos_token_id) if i is not None})

    # -- batching -------------------------------------------------------------------------
    def _batches(self, items: list[TaggedRecord]):
        """Length bucketing: sort by prompt length, then cut into batches."""
        encoded = [e.input_ids for e in self.fmt.encode_prompts([t.record for t in items])]
        order = sorted(range(len(items)), key=lambda i: len(encoded[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            yield idx, [encoded[i] for i in idx]

    def _route(self, items: list[TaggedRecord], mask: torch.Tensor, freeze: bool, record: bool = False) -> None:
        """Routing context of routed adapters: every non-pad token of a prompt is prompt."""
        spec = torch.tensor([t.tags.specialty_id for t in items], device=self.device)
        op = torch.tensor([t.tags.operation_id for t in items], device=self.device)
        set_routing(self.model, mask.bool(), spec, op, freeze=freeze, record=record)

    @torch.no_grad()
    def _prompt_forward(self, seqs: list[list[int]], items: list[TaggedRecord], record: bool = False,
                        keep: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass over left-padded prompts: (fp32 logits of the last ``keep`` positions
        [B, keep, V], attention mask)."""
        ids, mask = left_pad(seqs, self.pad_id, self.device)
        self._route(items, mask, freeze=False, record=record)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with autocast_for(self.model):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=keep,
                             use_cache=False)
        return out.logits[:, -keep:].float(), mask

    def _last_logits(self, seqs: list[list[int]], items: list[TaggedRecord]) -> torch.Tensor:
        """Next-token logits [B, V] of left-padded prompts."""
        return self._prompt_forward(seqs, items)[0][:, -1]

    def recorded_batches(self, items: list[TaggedRecord]):
        """The scoring forward pass over the items' prompts with the routing state recording
        each routed module's gate outputs: yields ``(item indices, records, prompt mask)``
        per batch (the audit reads these)."""
        with half_precision_adapters(self.model):
            for idx, seqs in self._batches(items):
                _, mask = self._prompt_forward(seqs, [items[i] for i in idx], record=True)
                state = routing_state(self.model)
                if state is not None and state.predict is not None:  # its decisions are its predictions:
                    state.predict(self, [items[i] for i in idx], "letters", "audit")  # it records them
                yield idx, (state.records if state is not None else {}), mask.bool()

    @torch.no_grad()
    def _generate(self, seqs: list[list[int]], items: list[TaggedRecord], max_new_tokens: int,
                  allowed_fn=None) -> list[list[int]]:
        ids, mask = left_pad(seqs, self.pad_id, self.device)
        self._route(items, mask, freeze=True)  # gates computed at prefill, held while decoding
        static = self._static_decoding(ids.shape, max_new_tokens) if self.compile_decode and allowed_fn is None else {}
        with autocast_for(self.model):
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=self.stop_ids, pad_token_id=self.pad_id, prefix_allowed_tokens_fn=allowed_fn,
                temperature=None, top_p=None, top_k=None, **static,
            )
        return [row[ids.shape[1]:].tolist() for row in out]

    def _static_decoding(self, shape: torch.Size, max_new_tokens: int) -> dict:
        """``generate`` arguments for a static KV cache and a compiled decoding step.

        transformers compiles the decoding forward when the cache is static (on CPU only if
        asked, ``_compile_all_devices``). One cache per (batch size, length), reused across
        batches: its length is the prompt limit plus the new tokens whatever the batch's
        width, so every batch of that size decodes with the same shapes (no recompilation)
        and, on a GPU, into the same memory (CUDA graphs need fixed addresses).
        """
        from transformers import StaticCache
        from transformers.generation import CompileConfig

        length = max(self.fmt.max_length, shape[1]) + max_new_tokens
        cache = self._static_caches.get((shape[0], length))
        if cache is None:
            cache = self._static_caches[(shape[0], length)] = StaticCache(config=self.model.config,
                                                                          max_cache_len=length)
        else:
            cache.reset()
        on_gpu = self.device.type == "cuda"
        compile_config = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead" if on_gpu else "default")
        if not on_gpu:  # transformers auto-compiles on accelerators only; this private flag allows CPU (tests)
            compile_config._compile_all_devices = True
        return {"past_key_values": cache, "compile_config": compile_config}

    def _decode(self, tokens: list[int]) -> str:
        if self.end_id in tokens:
            tokens = tokens[: tokens.index(self.end_id)]
        return self.tok.decode(tokens, skip_special_tokens=True)

    # -- scorers --------------------------------------------------------------------------
    def score(self, items: list[TaggedRecord], scorer: str, desc: str = "eval",
              protocol: str = MEDPEFT) -> list[Prediction]:
        """Predictions of ``items`` under ``protocol`` (``medpeft``: with ``scorer``)."""
        state = routing_state(self.model)
        if protocol != MEDPEFT:
            if state is not None and state.predict is not None:
                raise MedpeftError(f"eval.protocol {protocol!r}: this method predicts through its own verifier, "
                                   "which only the medpeft protocol runs")
            return self.score_protocol(items, protocol, desc)
        if state is not None and state.predict is not None:  # the method predicts its own way
            return self._score_by_method(items, scorer, state.predict, desc)
        return self.score_forward(items, scorer, desc)

    def rendered_prompts(self, items: list[TaggedRecord], protocol: str = MEDPEFT) -> list[str]:
        """The prompt text of every item under ``protocol`` (what ``prompt_hash`` digests)."""
        proto = get_protocol(protocol)
        if proto is None:
            return [self.fmt.prompt_text(t.record) for t in items]
        if proto.kind == "loglikelihood":
            return [proto.request(t.record, self.tok, self.apply_chat_template).context for t in items]
        return [proto.prompt(t.record, self.tok) for t in items]

    def _sharded(self, batches: list, fn, sizes: list[int], bar) -> dict:
        """``fn(batch)`` -> {index: row} over the batches this process owns (batch b on rank
        b mod world, the one-process batches), gathered onto every process."""
        proc = processes()
        out: dict = {}
        for b in proc.shard(len(batches)):
            out.update(fn(batches[b]))
            bar.update(sum(sizes[c] for c in range(b, min(b + proc.world, len(batches)))))
        if proc.distributed:
            for part in proc.gather(list(out.items())):
                out.update(dict(part))
        return out

    def score_protocol(self, items: list[TaggedRecord], protocol: str, desc: str = "eval") -> list[Prediction]:
        """Score ``items`` under another tool's protocol (``protocols/``); every item must be one
        the protocol defines (``Protocol.task``)."""
        proto = get_protocol(protocol)
        undefined = [t for t in items if proto.task(t.record) is None]
        if undefined:
            raise MedpeftError(f"eval.protocol {protocol!r} defines no task for {undefined[0].record.benchmark} item "
                               f"{undefined[0].record.id} ({undefined[0].record.question_type})")
        with tqdm(total=len(items), desc=desc, unit="q", leave=False, disable=not processes().is_main) as bar, \
                half_precision_adapters(self.model):
            if proto.kind == "loglikelihood":
                return self._score_choices(items, proto, bar)
            return self._score_protocol_generate(items, proto, bar)

    @torch.no_grad()
    def _score_choices(self, items: list[TaggedRecord], proto, bar) -> list[Prediction]:
        """Log-likelihood of every choice's continuation (lm-eval's ``_loglikelihood_tokens``):
        ``sum_t log p(cont_t | context, cont_<t)``. Choices whose inputs are the same token
        sequence (single-token continuations after one context) share one forward pass."""
        limit = lm_eval_max_length(self.model, self.tok)
        requests = [proto.request(t.record, self.tok, self.apply_chat_template) for t in items]
        inputs: dict[tuple, int] = {}  # unique (input sequence, routing tags) -> its index
        seqs: list[list[int]] = []
        owners: list[int] = []  # item index of each unique input (its routing tags)
        needs: list[set[tuple[int, ...]]] = []  # continuations scored from each input
        wanted = []  # per item, per choice: (input index, continuation ids)
        for i, req in enumerate(requests):
            row = []
            tags = items[i].tags
            for cont_text in req.continuations:
                ctx, cont = encode_pair(self.tok, req.context, cont_text)
                if not cont:
                    raise MedpeftError(f"item {items[i].record.id}: the choice {cont_text!r} encodes to no tokens")
                seq = (ctx + cont)[-(limit + 1):][:-1]
                key = (tuple(seq), tags.specialty_id, tags.operation_id)
                if key not in inputs:
                    inputs[key] = len(owners)
                    seqs.append(seq)
                    owners.append(i)
                    needs.append(set())
                needs[inputs[key]].add(tuple(cont))
                row.append((inputs[key], tuple(cont)))
            wanted.append(row)
        order = sorted(range(len(seqs)), key=lambda k: len(seqs[k]))
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]

        def forward(batch: list[int]) -> dict[int, dict[tuple[int, ...], float]]:
            """Per input of the batch, the summed log-likelihood of each continuation it scores
            (only those numbers leave the batch: full rows of the vocabulary would not fit)."""
            width = max(len(c) for k in batch for c in needs[k])
            logits, _ = self._prompt_forward([seqs[k] for k in batch], [items[owners[k]] for k in batch], keep=width)
            logprobs = torch.log_softmax(logits, dim=-1)
            result = {}
            for r, k in enumerate(batch):
                result[k] = {}
                for cont in needs[k]:  # the last len(cont) positions predict the continuation's tokens
                    rows = logprobs[r, width - len(cont):]
                    picked = rows[torch.arange(len(cont), device=rows.device), torch.tensor(cont, device=rows.device)]
                    result[k][cont] = float(picked.sum())
            return result

        batch_of = {k: b for b, batch in enumerate(batches) for k in batch}
        sizes = [0] * len(batches)
        for row in wanted:  # progress counts an item with the batch of its first input
            sizes[batch_of[row[0][0]]] += 1
        lls_by_input = self._sharded(batches, forward, sizes, bar)
        out = []
        for t, req, row in zip(items, requests, wanted):
            lls = [lls_by_input[k][cont] for k, cont in row]
            scores = dict(zip(req.labels, lls))
            best = max(range(len(lls)), key=lambda j: lls[j])
            best_norm = max(range(len(lls)), key=lambda j: lls[j] / req.choice_lengths[j])
            pred, pred_norm = frozenset(req.labels[best]), frozenset(req.labels[best_norm])
            out.append(Prediction(t, pred, pred == t.record.answer, scores,
                                  extra={"pred_norm": req.labels[best_norm], "acc_norm": pred_norm == t.record.answer}))
        return out

    def _score_protocol_generate(self, items: list[TaggedRecord], proto, bar) -> list[Prediction]:
        """Greedy generation from the protocol's prompt, read by its parser."""
        limit = proto.max_new_tokens(self)
        bos = self.tok.bos_token
        texts = [proto.prompt(t.record, self.tok) for t in items]
        encoded = [self.tok(x, add_special_tokens=not (bos and x.startswith(bos)))["input_ids"] for x in texts]
        encoded = [ids[max(len(ids) - self.fmt.max_length, 0):] for ids in encoded]  # left-truncated like a QA prompt
        order = sorted(range(len(items)), key=lambda i: len(encoded[i]))
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]

        def generate(batch: list[int]) -> dict[int, str]:
            gen = self._generate([encoded[i] for i in batch], [items[i] for i in batch], limit)
            return {i: self._decode(g) for i, g in zip(batch, gen)}

        outputs = self._sharded(batches, generate, [len(b) for b in batches], bar)
        out = []
        for i, t in enumerate(items):
            pred = proto.parse(outputs[i], t.record)
            gold = t.record.answer_text if isinstance(pred, str) else t.record.answer
            out.append(Prediction(t, pred if pred is not None else frozenset(), pred == gold, None, outputs[i],
                                  extracted=pred is not None))
        return out

    def _score_by_method(self, items: list[TaggedRecord], scorer: str, predict, desc: str) -> list[Prediction]:
        """Multiple-choice items through the method's ``predict`` (open-ended ones as usual)."""
        choice = [t for t in items if t.record.question_type not in (OPEN, SUMMARY)]
        by_id = dict(zip((id(t) for t in choice), predict(self, choice, scorer, desc)))
        open_items = [t for t in items if t.record.question_type in (OPEN, SUMMARY)]
        opened = dict(zip((id(t) for t in open_items), self.score_forward(open_items, scorer, desc)))
        out = []
        for t in items:
            if id(t) in opened:
                out.append(opened[id(t)])
                continue
            pred, scores = by_id[id(t)]
            out.append(Prediction(t, pred, pred == t.record.answer, scores))
        return out

    def score_forward(self, items: list[TaggedRecord], scorer: str, desc: str = "eval") -> list[Prediction]:
        """Score with the model's forward pass (what :meth:`score` does for every method that
        does not predict its own way; such a method calls this for its candidates)."""
        proc = processes()
        preds: list[Prediction | None] = [None] * len(items)
        choice = [i for i, t in enumerate(items) if t.record.question_type not in (OPEN, SUMMARY)]
        open_ = [i for i, t in enumerate(items) if t.record.question_type == OPEN]
        summaries = [i for i, t in enumerate(items) if t.record.question_type == SUMMARY]
        total = len(items)
        with tqdm(total=total, desc=desc, unit="q", leave=False, disable=not proc.is_main) as bar, \
                half_precision_adapters(self.model):
            for group, fn in ((choice, self._score_letters if scorer == "letters" else self._score_generate),
                              (open_, self._score_open), (summaries, self._score_summary)):
                sub = [items[i] for i in group]
                batches = list(self._batches(sub))
                # with several processes, batch b is scored by rank b mod world: the batches are the
                # one-process ones, so every item is scored in the same padded batch (same numbers)
                for b in proc.shard(len(batches)):
                    idx, seqs = batches[b]
                    for j, p in zip(idx, fn([sub[j] for j in idx], seqs)):
                        preds[group[j]] = p
                    bar.update(sum(len(batches[c][0]) for c in range(b, min(b + proc.world, len(batches)))))
        if proc.distributed:
            mine = [(i, p.pred, p.correct, p.scores, p.text, p.extracted, p.extra) for i, p in enumerate(preds)
                    if p is not None]
            for rows in proc.gather(mine):
                for i, pred, correct, scores, text, extracted, extra in rows:
                    preds[i] = Prediction(items[i], pred, correct, scores, text, extracted, extra)
        return preds  # type: ignore[return-value]

    def _score_letters(self, items: list[TaggedRecord], seqs: list[list[int]]) -> list[Prediction]:
        logits = self._last_logits(seqs, items)
        logprobs = torch.log_softmax(logits, dim=-1)
        out: list[Prediction | None] = []
        multi_rows, multi_scores = [], {}
        for row, t in enumerate(items):
            letters = "".join(t.record.options)
            ids = self.fmt.letter_token_ids(letters)
            scores = {k: float(logprobs[row, v]) for k, v in ids.items()}
            if t.record.question_type == "multi":
                out.append(None)
                multi_rows.append(row)
                multi_scores[row] = scores
                continue
            pred = frozenset(max(scores, key=scores.get))
            out.append(Prediction(t, pred, pred == t.record.answer, scores))
        if multi_rows:
            for row, pred in zip(multi_rows, self._constrained_sets([items[r] for r in multi_rows],
                                                                    [seqs[r] for r in multi_rows])):
                t = items[row]
                out[row] = Prediction(t, pred, pred == t.record.answer, multi_scores[row])
        return out  # type: ignore[return-value]

    def _constrained_sets(self, items: list[TaggedRecord], seqs: list[list[int]]) -> list[frozenset[str]]:
        """Greedy decoding restricted to ascending option letters, then the end token."""
        letter_ids = [self.fmt.letter_token_ids("".join(t.record.options)) for t in items]
        id_to_letter = [{v: k for k, v in ids.items()} for ids in letter_ids]
        width = max(len(s) for s in seqs)

        def allowed(batch_id: int, prefix: torch.Tensor) -> list[int]:
            chosen = [id_to_letter[batch_id].get(int(x)) for x in prefix[width:]]
            if any(c is None for c in chosen):  # ended (or padding after end)
                return [self.pad_id if self.pad_id is not None else self.end_id]
            last = max(chosen) if chosen else ""
            later = [v for k, v in letter_ids[batch_id].items() if k > last]
            return later + ([self.end_id] if chosen else [])

        gen = self._generate(seqs, items, max_new_tokens=max(len(i) for i in letter_ids) + 1, allowed_fn=allowed)
        return [frozenset(id_to_letter[b][x] for x in g if x in id_to_letter[b]) for b, g in enumerate(gen)]

    def _score_generate(self, items: list[TaggedRecord], seqs: list[list[int]]) -> list[Prediction]:
        out = []
        for t, gen in zip(items, self._generate(seqs, items, self.max_new_tokens)):
            text = self._decode(gen)
            pred = parse_answer(text, "".join(t.record.options), t.record.question_type == "multi")
            out.append(Prediction(t, pred, pred == t.record.answer, None, text, extracted=bool(pred)))
        return out

    def _score_summary(self, items: list[TaggedRecord], seqs: list[list[int]]) -> list[Prediction]:
        out = []
        limit = max(self.summary_limits.get(t.set_name, self.summary_max_new_tokens) for t in items)
        for t, gen in zip(items, self._generate(seqs, items, limit)):
            text = self._decode(gen)
            out.append(Prediction(t, None, None, rouge_scores(text, t.record.reference or "", t.record.language),
                                  text))
        return out

    def _score_open(self, items: list[TaggedRecord], seqs: list[list[int]]) -> list[Prediction]:
        out = []
        for t, gen in zip(items, self._generate(seqs, items, self.open_max_new_tokens)):
            text = self._decode(gen)
            pred = parse_number(text)
            out.append(Prediction(t, pred, pred is not None and pred == t.record.reference, None, text,
                                  extracted=pred is not None))
        return out


# metadata fields that describe an item's stratum (department, exam class, difficulty...): written
# with each prediction so that `medpeft compare` can report per-stratum effects
STRATUM_FIELDS = ("exam_type", "exam_class", "Clinical Department", "Medical Discipline", "Competency Area",
                  "Difficulty Level", "subject_name", "subject", "note_section")


def item_strata(rec) -> dict[str, str]:
    return {k: str(rec.metadata[k]) for k in STRATUM_FIELDS if rec.metadata.get(k) not in (None, "")}


def prediction_row(p: Prediction) -> dict:
    rec = p.item.record
    if rec.question_type == SUMMARY:  # per-item ROUGE F (``score``: ROUGE-L, what compare pairs) and the text
        return {"id": rec.id, "benchmark": p.item.set_name, "item": rec.digest(), "score": round(p.scores["rougeL"], 6),
                "rouge": {k: round(v, 6) for k, v in p.scores.items()}, "output": p.text, "gold": rec.answer_text,
                "specialty": p.item.tags.specialty, "operation": p.item.tags.operation,
                **({"strata": item_strata(rec)} if item_strata(rec) else {})}
    pred = "".join(sorted(p.pred)) if isinstance(p.pred, frozenset) else p.pred
    row = {"id": rec.id, "benchmark": p.item.set_name, "item": rec.digest(), "pred": pred, "gold": rec.answer_text,
           "correct": bool(p.correct), "specialty": p.item.tags.specialty, "operation": p.item.tags.operation}
    if p.scores is not None:
        row["scores"] = {k: round(v, 5) for k, v in p.scores.items()}
    if p.text is not None:
        row["output"] = p.text
    if not p.extracted:
        row["extracted"] = False
    if p.extra:
        row.update(p.extra)
    strata = item_strata(rec)
    if strata:
        row["strata"] = strata
    return row


def set_calibration(preds: list[Prediction], bins: int) -> dict | None:
    """Calibration of a set's single-answer items that have option scores (None when none has)."""
    rows = [(item_calibration(p.scores, next(iter(p.item.record.answer))), bool(p.correct)) for p in preds
            if p.scores is not None and p.item.record.question_type == "single"
            and set(p.scores) == set(p.item.record.options)]
    if not rows:
        return None
    return calibration_summary([r["confidence"] for r, _ in rows], [c for _, c in rows],
                               [r["brier"] for r, _ in rows], [r["nll"] for r, _ in rows], bins)


def set_results(preds_by_set: dict[str, list[Prediction]], calibration_bins: int | None = None) -> dict:
    """``results.json``'s benchmarks and macro average from each set's predictions: accuracy of
    a QA set, mean ROUGE of a summarisation set (:func:`medpeft.stats.results_summary`); with
    ``calibration_bins``, also each QA set's answer-extraction failures, ``acc_norm`` where the
    protocol has it, and calibration where the scorer gives option probabilities."""
    flags = {name: [p.correct for p in preds] for name, preds in preds_by_set.items()
             if not any(p.correct is None for p in preds)}
    rouge = {name: [p.scores for p in preds] for name, preds in preds_by_set.items() if name not in flags}
    summary = results_summary(flags, rouge, order=list(preds_by_set))
    if calibration_bins is None:
        return summary
    for name in flags:
        preds, bench = preds_by_set[name], summary["benchmarks"][name]
        failures = sum(not p.extracted for p in preds)
        bench["extraction_failures"], bench["extraction_failure_rate"] = failures, failures / len(preds) if preds \
            else 0.0
        if preds and all(p.extra and "acc_norm" in p.extra for p in preds):
            bench["acc_norm"] = sum(p.extra["acc_norm"] for p in preds) / len(preds)
        calibration = set_calibration(preds, calibration_bins)
        if calibration is not None:
            bench["calibration"] = calibration
    return summary


def evaluate_sets(evaluator: Evaluator, eval_sets: dict[str, list[TaggedRecord]], scorer: str,
                  out_dir: Path, meta: dict | None = None, protocols: dict[str, str] | None = None,
                  calibration_bins: int = 15, set_fields: dict[str, dict] | None = None) -> dict:
    """Score every eval set (under its protocol in ``protocols``, default ``medpeft``); write
    ``predictions.jsonl`` and ``results.json`` to ``out_dir``. Every set's result records its
    protocol, the hash of its rendered prompts and its answer-extraction failure rate."""
    was_training = evaluator.model.training
    evaluator.model.eval()
    protocols = {name: (protocols or {}).get(name, MEDPEFT) for name in eval_sets}
    rows, by_set = [], {}
    for name, items in eval_sets.items():
        preds = evaluator.score(items, scorer, desc=f"eval {name}", protocol=protocols[name])
        rows.extend(prediction_row(p) for p in preds)
        by_set[name] = preds
    if was_training:
        evaluator.model.train()
    summary = set_results(by_set, calibration_bins)
    for name, items in eval_sets.items():
        bench = summary["benchmarks"][name]
        bench["protocol"] = protocols[name]
        bench["prompt_hash"] = prompt_hash(evaluator.rendered_prompts(items, protocols[name]))
        bench.update((set_fields or {}).get(name, {}))  # e.g. whether it is a retention set
    uniform = set(protocols.values())
    results = {**(meta or {}), "scorer": scorer, "protocol": uniform.pop() if len(uniform) == 1 else "mixed",
               **summary}
    out_dir = Path(out_dir)
    if processes().is_main:
        write_jsonl(out_dir / "predictions.jsonl", rows)
        write_json(out_dir / "results.json", results)
    processes().barrier()
    return results
