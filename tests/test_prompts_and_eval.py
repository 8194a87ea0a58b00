from __future__ import annotations


import pytest
import torch

from medpeft.data.record import QARecord
from medpeft.dataset import TaggedRecord
from medpeft.evaluate import Evaluator, parse_answer, parse_number
from medpeft.prompts import PromptFormatter
from medpeft.stats import accuracy_summary, wilson_interval
from medpeft.tags import tag_record


def rec(q="Which drug?", answer="B", lang="en", n=4, qtype=None, rid="x"):
    options = {l: f"option {l}" for l in "ABCDE"[:n]}
    return QARecord(rid, "medqa", lang, q, options, frozenset(answer),
                    qtype or ("multi" if len(answer) > 1 else "single"))


def tagged(r):
    return TaggedRecord(r, tag_record(r), "set")


def test_template_is_chat_with_thinking_off_and_answer_only_target(tiny):
    fmt = PromptFormatter(tiny.tokenizer, 768)
    r = rec(answer="AC")
    text = fmt.prompt_text(r)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "A. option A" in text and "all correct options" in text
    ex = fmt.encode_train(r)
    assert tiny.tokenizer.decode(ex.input_ids[ex.prompt_len:]) == "AC<|im_end|>"
    assert ex.input_ids[:ex.prompt_len] == fmt.encode_prompt(r).input_ids
    zh = fmt.prompt_text(rec(lang="zh"))
    assert "以下是一道医学单项选择题" in zh


def test_truncation_keeps_the_answer_and_the_end_of_the_prompt(tiny):
    fmt = PromptFormatter(tiny.tokenizer, 120)
    r = rec(q="long " * 200)
    ex = fmt.encode_train(r)
    assert ex.truncated and len(ex.input_ids) == 120
    full = PromptFormatter(tiny.tokenizer, 10_000).encode_train(r)
    assert ex.input_ids == full.input_ids[-120:]


def test_batched_prompt_encoding_equals_one_at_a_time(tiny):
    """encode_prompts (one tokenizer call, used by the scorers) = encode_prompt per record,
    truncation included, with and without a chat template."""
    from medpeft.models import build_tiny_tokenizer

    records = [rec(q="long " * 120, rid="a"), rec(lang="zh", q="哪种药物？", rid="b"), rec(answer="AC", rid="c")]
    plain = build_tiny_tokenizer()
    plain.chat_template = None
    for tokenizer in (tiny.tokenizer, plain):
        fmt = PromptFormatter(tokenizer, 500)
        batched = fmt.encode_prompts(records)
        assert batched == [fmt.encode_prompt(r) for r in records]
        assert batched[0].truncated and len(batched[0].input_ids) == 500
        assert not batched[1].truncated and not batched[2].truncated
        assert batched[2].input_ids == tokenizer(fmt.prompt_text(records[2]), add_special_tokens=False)["input_ids"]
    assert PromptFormatter(tiny.tokenizer).encode_prompts([]) == []


@pytest.mark.parametrize("text, options, multi, expected", [
    ("B", "ABCD", False, "B"),
    ("B<|im_end|>", "ABCD", False, "B"),
    ("答案：C", "ABCDE", False, "C"),
    ("正确选项是 D。", "ABCDE", False, "D"),
    ("The answer is (A).", "ABCD", False, "A"),
    ("the correct answer is: c", "ABCD", False, "C"),
    ("(B) is right", "ABCD", False, "B"),
    ("ACD", "ABCDE", True, "ACD"),
    ("答案为A、C、E", "ABCDE", True, "ACE"),
    ("答案：AB", "ABCDE", False, "A"),  # single-answer items keep one letter
    ("E", "ABCD", False, ""),  # letters restricted to the item's options
    ("A patient with", "ABCD", False, ""),  # an English article is not an answer
    ("I do not know", "ABCD", False, ""),
])
def test_parse_answer(text, options, multi, expected):
    assert "".join(sorted(parse_answer(text, options, multi))) == expected


def test_parse_number():
    assert parse_number("so 9 * 2 = 18.\nThe answer is 18") == "18"
    assert parse_number("#### 1,234") == "1234"
    assert parse_number("we get 3.50 dollars") == "3.5"
    assert parse_number("no number") is None


def test_wilson_interval_golden():
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)  # textbook value
    assert wilson_interval(0, 0) == (0.0, 0.0)
    s = accuracy_summary({"a": [True, False], "b": [True, True, True, False]})
    assert s["macro_accuracy"] == pytest.approx((0.5 + 0.75) / 2)


def test_letters_scorer_matches_unbatched_full_forward(tiny):
    """Batched, left-padded, last-position-only scoring == one item at a time with full logits."""
    items = [tagged(rec(q="short?", answer="A", rid="a")), tagged(rec(q="a much longer question " * 8, answer="C", rid="b")),
             tagged(rec(q="mid length question", answer="B", n=5, rid="c"))]
    ev = Evaluator(tiny.model, tiny.tokenizer, batch_size=3)
    preds = ev.score(items, "letters")
    fmt = PromptFormatter(tiny.tokenizer, 768)
    for item, p in zip(items, preds):
        ids = torch.tensor([fmt.encode_prompt(item.record).input_ids])
        with torch.no_grad():
            logits = tiny.model(input_ids=ids).logits[0, -1].log_softmax(-1)
        letter_ids = fmt.letter_token_ids("".join(item.record.options))
        ref = {k: float(logits[v]) for k, v in letter_ids.items()}
        assert p.scores == pytest.approx(ref, abs=1e-4)
        assert p.pred == frozenset([max(ref, key=ref.get)])
        assert p.correct == (p.pred == item.record.answer)


def test_multi_answer_letters_scorer_is_constrained_greedy(tiny):
    item = tagged(rec(answer="BD", n=5, rid="m"))
    ev = Evaluator(tiny.model, tiny.tokenizer)
    (p,) = ev.score([item], "letters")
    assert p.pred and p.pred <= set("ABCDE")
    # reference: greedy over allowed tokens, step by step with full forwards
    fmt = PromptFormatter(tiny.tokenizer, 768)
    ids = fmt.encode_prompt(item.record).input_ids
    letter_ids = fmt.letter_token_ids("ABCDE")
    chosen: list[str] = []
    while True:
        with torch.no_grad():
            logits = tiny.model(input_ids=torch.tensor([ids])).logits[0, -1]
        allowed = {k: v for k, v in letter_ids.items() if not chosen or k > chosen[-1]}
        cand = {k: float(logits[v]) for k, v in allowed.items()}
        if chosen:
            cand["<end>"] = float(logits[fmt.end_token_id])
        if not cand:
            break
        best = max(cand, key=cand.get)
        if best == "<end>":
            break
        chosen.append(best)
        ids = ids + [letter_ids[best]]
    assert p.pred == frozenset(chosen)


def test_generate_scorer_batched_equals_single(tiny):
    items = [tagged(rec(q="q one", rid="a")), tagged(rec(q="question two is longer " * 5, rid="b"))]
    ev = Evaluator(tiny.model, tiny.tokenizer, batch_size=2, max_new_tokens=6)
    batched = ev.score(items, "generate")
    single = [Evaluator(tiny.model, tiny.tokenizer, batch_size=1, max_new_tokens=6).score([i], "generate")[0]
              for i in items]
    assert [p.text for p in batched] == [p.text for p in single]
    assert all(isinstance(p.pred, frozenset) for p in batched)
