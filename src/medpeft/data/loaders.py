"""One loader per benchmark, each reading the benchmark's *native release format*.

Every loader turns raw rows into :class:`QARecord`. A malformed row raises a
:class:`DataError` naming the file, the line (or record key) and the field; with
``skip_invalid=True`` it is skipped instead and reported in ``LoadResult.skipped``.

Formats (see docs/data.md for examples):

* ``medqa``    JSONL ``{question, options{A..}, answer_idx, answer, meta_info}`` (4 or 5 options)
* ``medmcqa``  JSON lines ``{id, question, opa..opd, cop, subject_name, topic_name, choice_type}``;
               ``cop`` is 1-based in the original release, 0-based in the hub copy (``cop_base``)
* ``pubmedqa`` ``ori_pqal.json`` (dict by PMID, ``QUESTION, CONTEXTS, final_decision``),
               optional ``test_ground_truth.json`` (``{pmid: label}``) selecting the test split
* ``cmb``      native ``{exam_type, exam_class, exam_subject, question, option{A..}, answer, question_type}``
               (JSON list or JSONL); answers may come from a separate answer-key file joined on ``id``
* ``cmexam``   CSV ``Question, Options, Answer, Explanation`` (+ test annotation columns);
               options separated by a newline or the literal two characters ``\\n``
* ``cmmlu``    CSV with an unnamed index column, ``Question, A, B, C, D, Answer``; subject = file name
* ``mmlu``     headerless CSV ``question, A, B, C, D, answer``; subject = file name
* ``gsm8k``    JSONL ``{question, answer}``, gold = the number after ``####``
* ``aci-bench`` summarisation: the release JSON ``{"data": [{src, tgt, file}]}`` (dialogue ->
               clinical note; ``*_full`` files the whole note, ``*_assessment_and_plan`` etc. one section)
* ``summary``  summarisation: JSONL ``{id, text, summary[, language][, metadata]}``
* ``cmb``/``cmexam`` also read the converted ``{question, option, anwer, source}`` format of some
  public copies (detected from the ``anwer`` key).

CSV-native benchmarks also accept ``.jsonl`` files with one CSV row per line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import DataError
from .readers import iter_csv, iter_json_records
from .record import MULTI, OPEN, SINGLE, SUMMARY, QARecord, normalize_number

LETTERS = "ABCDEFGHIJ"


@dataclass
class LoadResult:
    records: list[QARecord]
    skipped: list[DataError] = field(default_factory=list)

    def skip_summary(self) -> str:
        """One line per distinct reason, with counts, for the CLI's report."""
        counts: dict[str, int] = {}
        for err in self.skipped:
            key = f"{err.field or 'record'}: {err.problem}" if isinstance(err, DataError) else str(err)
            counts[key] = counts.get(key, 0) + 1
        return "; ".join(f"{n} x {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))


@dataclass
class _Ctx:
    """Where a row came from, and the source-level options its parser needs."""

    path: Path
    where: str
    benchmark: str
    options: dict[str, Any]

    def error(self, field: str | None, problem: str) -> DataError:
        return DataError(self.path, self.where, field, problem)


def _text(ctx: _Ctx, row: dict, key: str, *, required: bool = True, field: str | None = None) -> str:
    """``row[key]`` as stripped text; null / missing (or NaN) is an error when ``required``."""
    value = row.get(key) if isinstance(row, dict) else None
    if value is None or (isinstance(value, float) and value != value):  # NaN from pandas-made CSVs
        if required:
            raise ctx.error(field or key, "missing" if value is None and key not in (row or {}) else "is null")
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ctx.error(field or key, f"expected text, got {type(value).__name__}")
    return str(value).strip()


def _option_map(ctx: _Ctx, field_name: str, opts: dict, *, null_is_empty: bool = False) -> dict[str, str]:
    """``{letter: text}`` from a release's option object: keys are single letters A-J (case and
    spaces folded, no letter twice), values text (``null`` an empty slot where the release has them)."""
    options: dict[str, str] = {}
    for key, value in opts.items():
        letter = str(key).strip().upper()
        if not re.fullmatch(r"[A-J]", letter):
            raise ctx.error(f"{field_name}.{key}", "an option key must be one letter A-J")
        if letter in options:
            raise ctx.error(f"{field_name}.{key}", f"option {letter} appears twice")
        if value is None and null_is_empty:
            options[letter] = ""
            continue
        options[letter] = _text(ctx, opts, key, field=f"{field_name}.{key}")
    return options


def _letters(ctx: _Ctx, field_name: str, raw: str) -> frozenset[str]:
    """Parse an answer such as ``"B"``, ``"ABD"``, ``"(BCDE)"``, ``"A,C"`` into a set of letters."""
    cleaned = re.sub(r"[\s(),，、;；]", "", raw.upper())
    if not cleaned or not re.fullmatch(r"[A-J]+", cleaned):
        raise ctx.error(field_name, f"answer {raw!r} is not a set of option letters")
    return frozenset(cleaned)


def _record(
    ctx: _Ctx,
    *,
    rid: str,
    question: str,
    options: dict[str, str],
    answer: frozenset[str],
    question_type: str | None,
    metadata: dict[str, Any],
    answer_field: str,
    language: str,
    reference: str | None = None,
) -> QARecord:
    """Validate the common invariants and build the record."""
    if not question:
        raise ctx.error("question", "empty question text")
    for name, text in (("id", rid), ("question", question), *((f"options.{k}", v) for k, v in options.items())):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone UTF-16 surrogate escape (\udXXX): no text can hold it
            raise ctx.error(name, "contains an unpaired surrogate (\\ud800-\\udfff), not text") from None
    if question_type != OPEN:
        options = {k: v for k, v in options.items() if v not in ("", ".")}  # empty slots of 4-of-5 layouts
        if len(options) < 2:
            raise ctx.error("options", f"needs at least 2 non-empty options, got {len(options)}")
        missing = sorted(answer - set(options))
        if missing:
            raise ctx.error(
                answer_field, f"answer {''.join(sorted(answer))!r} is not among the options {''.join(options)}"
            )
        if question_type is None:
            question_type = MULTI if len(answer) > 1 else SINGLE
        if question_type == SINGLE and len(answer) != 1:
            raise ctx.error(answer_field, f"single-answer item has {len(answer)} answer letters")
    return QARecord(
        id=rid,
        benchmark=ctx.benchmark,
        language=language,
        question=question,
        options=options,
        answer=answer,
        question_type=question_type,
        metadata={k: v for k, v in metadata.items() if v not in (None, "")},
        reference=reference,
        source=f"{ctx.path.name}:{ctx.where}",
    )


def _subject_from_filename(path: Path) -> str:
    """``anatomy_test.csv`` / ``anatomy_test.rows0-49.jsonl`` / ``anatomy.csv`` -> ``anatomy``."""
    stem = path.name.split(".")[0]
    return re.sub(r"_(test|val|dev|train)$", "", stem)


def _row_id(ctx: _Ctx, native: Any = None) -> str:
    if native not in (None, ""):
        return f"{ctx.benchmark}/{native}"
    return f"{ctx.benchmark}/{ctx.path.name.split('.')[0]}#{ctx.where.split()[-1].strip(chr(39))}"


def _verbatim(question: object, options: dict[str, object]) -> dict[str, Any] | None:
    """The release's own text of the stem and options where it differs from the stripped text
    medpeft keeps (surrounding spaces): protocols that mirror another tool's prompt render from
    the text that tool reads (``protocols/lm_eval.py``). None when nothing differs."""
    raw = {"question": question, "options": options}
    differs = (isinstance(question, str) and question != question.strip()) or any(
        isinstance(v, str) and v != v.strip() for v in options.values())
    return raw if differs else None


# ----------------------------------------------------------------------------- per benchmark

def _parse_medqa(ctx: _Ctx, row: dict) -> QARecord:
    opts = row.get("options")
    if not isinstance(opts, dict):
        raise ctx.error("options", "expected an object of letter -> text")
    options = _option_map(ctx, "options", opts)
    idx = _text(ctx, row, "answer_idx")
    answer = _letters(ctx, "answer_idx", idx)
    if len(answer) != 1:
        raise ctx.error("answer_idx", f"expected one letter, got {idx!r}")
    text = row.get("answer")
    letter = next(iter(answer))
    if isinstance(text, str) and letter in options and text.strip() != options[letter]:
        raise ctx.error("answer", f"text {text!r} does not match option {letter} ({options[letter]!r})")
    return _record(
        ctx, rid=_row_id(ctx, row.get("id")), question=_text(ctx, row, "question"), options=options,
        answer=answer, question_type=SINGLE,
        metadata={"meta_info": row.get("meta_info"),
                  "verbatim": _verbatim(row.get("question"), {str(k).strip().upper(): v for k, v in opts.items()})},
        answer_field="answer_idx", language="en",
    )


def _parse_medmcqa(ctx: _Ctx, row: dict) -> QARecord:
    base = ctx.options.get("cop_base")
    if base not in (0, 1):
        raise ctx.error("cop", "set the source's cop_base: 1 for the original release, 0 for the hub copy")
    options = {letter: _text(ctx, row, key) for letter, key in zip("ABCD", ("opa", "opb", "opc", "opd"))}
    cop = row.get("cop")
    if isinstance(cop, str) and re.fullmatch(r"-?[0-9]{1,3}", cop.strip()):
        cop = int(cop)
    if isinstance(cop, int) and not isinstance(cop, bool):
        ctx.options.setdefault("_cop_values", set()).add(cop)
    if not isinstance(cop, int) or isinstance(cop, bool) or not base <= cop <= base + 3:
        hint = f"; a file that indexes cop from {1 - base} needs cop_base: {1 - base}" if cop in (base - 1, base + 4) \
            else ""
        raise ctx.error("cop", f"{cop!r} is not an option index {base}..{base + 3} (cop_base={base}){hint}")
    return _record(
        ctx, rid=_row_id(ctx, row.get("id")), question=_text(ctx, row, "question"), options=options,
        answer=frozenset(LETTERS[cop - base]), question_type=SINGLE,
        # choice_type "multi" in MedMCQA marks the question style, not several answers (cop is one index).
        metadata={"subject_name": row.get("subject_name"), "topic_name": row.get("topic_name"),
                  "choice_type": row.get("choice_type"),
                  "verbatim": _verbatim(row.get("question"), {letter: row.get(key) for letter, key in
                                                              zip("ABCD", ("opa", "opb", "opc", "opd"))})},
        answer_field="cop", language="en",
    )


PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}


def _parse_pubmedqa(ctx: _Ctx, row: dict) -> QARecord | None:
    if "__key__" not in row and len(row) == 1:  # JSONL form: one {pmid: record} per line
        key, rec = next(iter(row.items()))
        if not isinstance(rec, dict):
            raise ctx.error(None, "expected {pmid: record}")
        row = {"__key__": key, **rec}
    pmid = row.get("__key__")
    truth = ctx.options.get("_ground_truth")
    if truth is not None and pmid not in truth:
        return None
    label = truth[pmid] if truth is not None else _text(ctx, row, "final_decision")
    label = str(label).strip().lower()
    inverse = {v: k for k, v in PUBMEDQA_OPTIONS.items()}
    if label not in inverse:
        raise ctx.error("final_decision", f"{label!r} is not yes/no/maybe")
    inline = row.get("final_decision")
    if truth is not None and isinstance(inline, str) and inline.strip() and inline.strip().lower() != label:
        # as with CMB's answer key: a file that contradicts its own labels is a wrong pairing, not a choice
        raise ctx.error("final_decision", f"{inline.strip()!r} here, but the ground-truth file says {label!r}")
    contexts = row.get("CONTEXTS")
    if not isinstance(contexts, list) or not contexts or not all(isinstance(c, str) and c.strip() for c in contexts):
        raise ctx.error("CONTEXTS", "expected a non-empty list of abstract sections (text)"
                        if contexts is not None else "missing (the abstract the question is about)")
    stem = _text(ctx, row, "QUESTION")
    if not stem:
        raise ctx.error("QUESTION", "empty question text")
    question = f"Context: {' '.join(c.strip() for c in contexts)}\nQuestion: {stem}"
    return _record(
        ctx, rid=_row_id(ctx, pmid), question=question, options=dict(PUBMEDQA_OPTIONS),
        answer=frozenset(inverse[label]), question_type=SINGLE,
        metadata={"meshes": row.get("MESHES"), "year": row.get("YEAR"),
                  "verbatim": {"question": row.get("QUESTION"), "contexts": list(contexts)}},
        answer_field="final_decision", language="en",
    )


_CMB_QTYPE = {"单项选择题": SINGLE, "多项选择题": MULTI}


def _parse_cmb(ctx: _Ctx, row: dict) -> QARecord:
    if "anwer" in row:
        return _parse_converted(ctx, row)
    opts = row.get("option")
    if not isinstance(opts, dict):
        raise ctx.error("option", "expected an object of letter -> text")
    options = _option_map(ctx, "option", opts, null_is_empty=True)
    native_id = row.get("id")
    raw_answer = row.get("answer")
    keys = ctx.options.get("_answer_key")
    if keys is not None and not raw_answer:
        if native_id is None or str(native_id) not in keys:
            raise ctx.error("id", f"id {native_id!r} not found in the answer-key file")
        raw_answer = keys[str(native_id)]
    elif keys is not None and native_id is not None and str(native_id) in keys:
        inline, keyed = _letters(ctx, "answer", str(raw_answer)), _letters(ctx, "answer", keys[str(native_id)])
        if inline != keyed:
            raise ctx.error("answer", f"{''.join(sorted(inline))!r} here, but the answer-key file says "
                                      f"{''.join(sorted(keyed))!r}")
    if not raw_answer:
        raise ctx.error("answer", "missing (give the answer-key file as the source's answer_file)")
    qtype_raw = str(row.get("question_type", "")).strip()
    if qtype_raw and qtype_raw not in _CMB_QTYPE:
        raise ctx.error("question_type", f"{qtype_raw!r} is not 单项选择题/多项选择题")
    return _record(
        ctx, rid=_row_id(ctx, native_id), question=_text(ctx, row, "question"), options=options,
        answer=_letters(ctx, "answer", str(raw_answer)), question_type=_CMB_QTYPE.get(qtype_raw),
        metadata={k: row.get(k) for k in ("exam_type", "exam_class", "exam_subject")},
        answer_field="answer", language="zh",
    )


_OPTION_LINE = re.compile(r"^\s*\(?([A-J])[\)\.．、:：\s]\s*(.*)$", re.S)


def _split_options(ctx: _Ctx, field_name: str, raw: str) -> dict[str, str]:
    """``"A 文本\\nB 文本"`` (real newline or the literal two characters) or ``"(A) x.\\n(B) y."``."""
    options: dict[str, str] = {}
    for line in re.split(r"\r?\n|\\n", raw):
        if not line.strip():
            continue
        m = _OPTION_LINE.match(line)
        if not m:
            raise ctx.error(field_name, f"cannot read an option letter in {line.strip()[:40]!r}")
        letter, text = m.group(1), m.group(2).strip()
        if letter in options:
            raise ctx.error(field_name, f"option {letter} appears twice")
        options[letter] = text
    return options


def _parse_converted(ctx: _Ctx, row: dict) -> QARecord:
    """The ``{question, option, anwer, source}`` conversion (Apollo/XMedBench) of CMB/CMExam."""
    options = {k: v.rstrip(".").strip() if v.endswith(".") else v
               for k, v in _split_options(ctx, "option", _text(ctx, row, "option")).items()}
    return _record(
        ctx, rid=_row_id(ctx, row.get("id")), question=_text(ctx, row, "question"), options=options,
        answer=_letters(ctx, "anwer", _text(ctx, row, "anwer")), question_type=None,
        metadata={"source": row.get("source")}, answer_field="anwer", language="zh",
    )


# CMExam's test split carries these annotation columns; they describe the question, not the answer.
CMEXAM_ANNOTATIONS = ("Disease Group", "Clinical Department", "Medical Discipline", "Competency Area", "Difficulty Level")


def _parse_cmexam(ctx: _Ctx, row: dict) -> QARecord:
    if "anwer" in row:
        return _parse_converted(ctx, row)
    options = _split_options(ctx, "Options", _text(ctx, row, "Options"))
    return _record(
        ctx, rid=_row_id(ctx, row.get("id")), question=_text(ctx, row, "Question"), options=options,
        answer=_letters(ctx, "Answer", _text(ctx, row, "Answer")), question_type=None,
        metadata={k: row.get(k) for k in CMEXAM_ANNOTATIONS}, answer_field="Answer", language="zh",
    )


def _parse_cmmlu(ctx: _Ctx, row: dict) -> QARecord:
    subject = _subject_from_filename(ctx.path)
    index = row.get("", row.get("Unnamed: 0"))
    return _record(
        ctx, rid=_row_id(ctx, f"{subject}/{index}" if index not in (None, "") else None),
        question=_text(ctx, row, "Question"), options={k: _text(ctx, row, k) for k in "ABCD"},
        answer=_letters(ctx, "Answer", _text(ctx, row, "Answer")), question_type=SINGLE,
        metadata={"subject": subject, "verbatim": _verbatim(row.get("Question"), {k: row.get(k) for k in "ABCD"})},
        answer_field="Answer", language="zh",
    )


def _parse_mmlu(ctx: _Ctx, row: list) -> QARecord:
    if not isinstance(row, list) or len(row) != 6:
        raise ctx.error("row", f"expected 6 columns (question, A, B, C, D, answer), got {len(row) if isinstance(row, list) else type(row).__name__}")
    cells = {str(i): c for i, c in enumerate(row)}
    question, *opts, answer = (_text(ctx, cells, str(i), field=f"column {i + 1}") for i in range(6))
    subject = _subject_from_filename(ctx.path)
    ctx_row = {"question": question, "answer": answer}
    return _record(
        ctx, rid=_row_id(ctx, None).replace(f"{ctx.path.name.split('.')[0]}#", f"{subject}#"),
        question=_text(ctx, ctx_row, "question"), options=dict(zip("ABCD", opts)),
        answer=_letters(ctx, "answer", answer), question_type=SINGLE,
        metadata={"subject": subject, "verbatim": _verbatim(row[0], dict(zip("ABCD", row[1:5])))},
        answer_field="answer", language="en",
    )


def _parse_gsm8k(ctx: _Ctx, row: dict) -> QARecord:
    solution = _text(ctx, row, "answer")
    m = re.search(r"####\s*(-?[\d,]*\.?\d+)\s*$", solution)
    if not m:
        raise ctx.error("answer", "no final '#### <number>' line")
    return _record(
        ctx, rid=_row_id(ctx, row.get("id")), question=_text(ctx, row, "question"), options={},
        answer=frozenset(), question_type=OPEN, metadata={}, answer_field="answer", language="en",
        reference=normalize_number(m.group(1)),
    )


def _summary_record(ctx: _Ctx, *, rid: str, text: str, summary: str, language: str,
                    metadata: dict[str, Any], text_field: str, summary_field: str) -> QARecord:
    """A summarisation item: the source ``text`` to summarise and its reference ``summary``."""
    for name, value in (("id", rid), (text_field, text), (summary_field, summary)):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ctx.error(name, "contains an unpaired surrogate (\\ud800-\\udfff), not text") from None
    if not text.strip():
        raise ctx.error(text_field, "empty source text")
    if not summary.strip():
        raise ctx.error(summary_field, "empty reference summary")
    if language not in ("en", "zh"):
        raise ctx.error("language", f"expected 'en' or 'zh', got {language!r}")
    return QARecord(id=rid, benchmark=ctx.benchmark, language=language, question=text, options={},
                    answer=frozenset(), question_type=SUMMARY,
                    metadata={k: v for k, v in metadata.items() if v not in (None, "")}, reference=summary,
                    source=f"{ctx.path.name}:{ctx.where}")


ACI_SECTIONS = ("full", "subjective", "objective_exam", "objective_results", "assessment_and_plan")


def _aci_split_and_section(path: Path) -> tuple[str, str]:
    """ACI-Bench's split and target from its file name: ``valid_full.json`` -> (valid, full: the
    whole note), ``valid_assessment_and_plan.json`` -> (valid, assessment_and_plan: one section)."""
    stem = path.name.split(".")[0]
    for section in ACI_SECTIONS:
        if stem.endswith("_" + section):
            return stem[:-len(section) - 1], section
    return stem, "full"


def _parse_aci_bench(ctx: _Ctx, row: dict) -> QARecord:
    """ACI-Bench (doctor-patient dialogue -> clinical note): ``{"src", "tgt", "file"}``."""
    native = row.get("file")
    if native is not None and not isinstance(native, (str, int)):
        raise ctx.error("file", f"expected the encounter id as text, got {_json_kind(native)}")
    split, section = _aci_split_and_section(ctx.path)
    return _summary_record(ctx, rid=_row_id(ctx, native), text=_text(ctx, row, "src"),
                           summary=_text(ctx, row, "tgt"), language="en",
                           metadata={"note_section": section, "split": split}, text_field="src",
                           summary_field="tgt")


def _parse_summary(ctx: _Ctx, row: dict) -> QARecord:
    """Generic summarisation JSONL: ``{id, text, summary[, language][, metadata]}``."""
    meta = row.get("metadata", {})
    if not isinstance(meta, dict):
        raise ctx.error("metadata", f"expected an object, got {_json_kind(meta)}")
    language = row.get("language", "en")
    if not isinstance(language, str):
        raise ctx.error("language", f"expected 'en' or 'zh', got {_json_kind(language)}")
    rid = row.get("id")
    if rid is not None and not isinstance(rid, (str, int)):
        raise ctx.error("id", f"expected text or a number, got {_json_kind(rid)}")
    return _summary_record(ctx, rid=_row_id(ctx, rid), text=_text(ctx, row, "text"),
                           summary=_text(ctx, row, "summary"), language=language,
                           metadata={k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))},
                           text_field="text", summary_field="summary")


def _aci_rows(path: Path, opts: dict, errors: list) -> Iterator[tuple[str, Any]]:
    """ACI-Bench's release JSON ``{"data": [record, ...]}`` (or JSON lines of records)."""
    if path.suffix == ".jsonl":
        yield from iter_json_records(path, opts.get("encoding", "utf-8"), errors)
        return
    rows = list(iter_json_records(path, opts.get("encoding", "utf-8"), errors))
    data = [rec for where, rec in rows if where == "record 'data'"]
    if len(rows) != 1 or not data or not isinstance(data[0], list):
        raise DataError(path, "top level", "data", "expected ACI-Bench's release object {\"data\": [records]}")
    for i, rec in enumerate(data[0]):
        yield f"record {i}", rec


# ----------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    language: str
    parse: Callable[[_Ctx, Any], QARecord | None]
    iter_rows: Callable[[Path, dict, list], Iterator[tuple[str, Any]]]
    folder_globs: tuple[str, ...]  # files read when the path is a folder: the first pattern that matches
    row_type: type = dict  # what one row must be (MMLU's headerless CSV rows are lists)


def _json_rows(path: Path, opts: dict, errors: list) -> Iterator[tuple[str, Any]]:
    return iter_json_records(path, opts.get("encoding", "utf-8"), errors)


def _csv_rows(header: bool) -> Callable:
    def rows(path: Path, opts: dict, errors: list) -> Iterator[tuple[str, Any]]:
        return iter_csv(path, header=header, encoding=opts.get("encoding", "utf-8"), errors=errors)
    return rows


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "medqa": BenchmarkSpec("medqa", "en", _parse_medqa, _json_rows, ("*.jsonl",)),
    "medmcqa": BenchmarkSpec("medmcqa", "en", _parse_medmcqa, _json_rows, ("*.json", "*.jsonl")),
    "pubmedqa": BenchmarkSpec("pubmedqa", "en", _parse_pubmedqa, _json_rows, ("ori_pqal.json", "*.jsonl")),
    "cmb": BenchmarkSpec("cmb", "zh", _parse_cmb, _json_rows, ("*.json", "*.jsonl")),
    "cmexam": BenchmarkSpec("cmexam", "zh", _parse_cmexam, _csv_rows(True), ("*.csv", "*.jsonl")),
    "cmmlu": BenchmarkSpec("cmmlu", "zh", _parse_cmmlu, _csv_rows(True), ("*.csv", "*.jsonl")),
    "mmlu": BenchmarkSpec("mmlu", "en", _parse_mmlu, _csv_rows(False), ("*.csv", "*.jsonl"), row_type=list),
    "gsm8k": BenchmarkSpec("gsm8k", "en", _parse_gsm8k, _json_rows, ("*.jsonl",)),
    # summarisation (a source text -> a reference summary)
    "aci-bench": BenchmarkSpec("aci-bench", "en", _parse_aci_bench, _aci_rows, ("*.json", "*.jsonl")),
    "summary": BenchmarkSpec("summary", "en", _parse_summary, _json_rows, ("*.jsonl",)),
}
SUMMARY_BENCHMARKS = ("aci-bench", "summary")


def _answer_key(path: Path, encoding: str) -> dict[str, str]:
    """CMB's separate answer-key file: records ``{id, answer, ...}`` (JSON list or JSONL)."""
    keys: dict[str, str] = {}
    for where, rec in iter_json_records(path, encoding):
        if not isinstance(rec, dict) or "id" not in rec or "answer" not in rec:
            raise DataError(path, where, "id" if isinstance(rec, dict) and "id" not in rec else "answer", "missing")
        if str(rec["id"]) in keys:
            raise DataError(path, where, "id", f"id {rec['id']!r} appears twice in the answer-key file")
        if not isinstance(rec["answer"], str) or not rec["answer"].strip():
            raise DataError(path, where, "answer", f"expected option letters as text, got {rec['answer']!r}")
        keys[str(rec["id"])] = rec["answer"]
    if not keys:
        raise DataError(path, "file", None, "no answers (empty answer-key file)")
    return keys


def _ground_truth(path: Path, encoding: str) -> dict[str, str]:
    """PubMedQA's ``test_ground_truth.json``: ``{pmid: "yes"|"no"|"maybe"}`` (or JSONL of such objects)."""
    truth: dict[str, str] = {}
    if path.suffix == ".jsonl":
        for where, obj in iter_json_records(path, encoding):
            if not isinstance(obj, dict):
                raise DataError(path, where, None, "expected an object {pmid: label}")
            for key, label in obj.items():
                if str(key) in truth:
                    raise DataError(path, where, str(key), "the PMID appears twice in the ground truth")
                truth[str(key)] = str(label)
        return truth
    for where, label in iter_json_records(path, encoding):  # one object {pmid: label}: records by key
        if not where.startswith("record '"):
            raise DataError(path, "top level", None, "expected an object {pmid: label}")
        if not isinstance(label, str):
            raise DataError(path, where, None, f"expected a label yes/no/maybe, got {label!r}")
        truth[where[len("record '"):-1]] = label
    if not truth:
        raise DataError(path, "file", None, "no PMIDs (empty ground truth)")
    return truth


def load_benchmark(
    benchmark: str,
    path: str | Path,
    *,
    skip_invalid: bool = False,
    encoding: str = "utf-8",
    answer_file: str | Path | None = None,
    ground_truth: str | Path | None = None,
    cop_base: int | None = 1,
) -> LoadResult:
    """Read a local benchmark file (or a folder of them) in its native release format.

    ``answer_file``: CMB answer key joined on ``id``. ``ground_truth``: PubMedQA's
    ``test_ground_truth.json`` (only its PMIDs are kept, labelled from it). ``cop_base``:
    MedMCQA's ``cop`` indexing, 1 for the original release, 0 for the hub copy.
    """
    if benchmark not in BENCHMARKS:
        raise DataError(path, "source", "benchmark", f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    spec = BENCHMARKS[benchmark]
    path = Path(path)
    if not path.exists():
        raise DataError(path, "source", "path", "no such file or folder")
    files = [path]
    if path.is_dir():
        files = next((sorted(p for p in path.glob(g) if p.is_file()) for g in spec.folder_globs
                      if any(p.is_file() for p in path.glob(g))), [])
        if not files:
            raise DataError(path, "folder", "path", f"no files matching {' or '.join(spec.folder_globs)}")
    opts: dict[str, Any] = {"encoding": encoding, "cop_base": cop_base}
    for given, option, owner in ((answer_file, "answer_file", "cmb"), (ground_truth, "ground_truth", "pubmedqa")):
        if given is not None and benchmark != owner:
            raise DataError(path, "source", option, f"is read for {owner} only, not {benchmark}")
    if answer_file is not None:
        opts["_answer_key"] = _answer_key(Path(answer_file), encoding)
    if ground_truth is not None:
        opts["_ground_truth"] = _ground_truth(Path(ground_truth), encoding)

    records: list[QARecord] = []
    skipped: list[DataError] = []
    seen: dict[str, str] = {}
    for file in files:
        n_before = len(records) + len(skipped)
        json_errors: list = [] if skip_invalid else None  # type: ignore[assignment]
        for where, row in spec.iter_rows(file, opts, json_errors):
            ctx = _Ctx(file, where, benchmark, opts)
            try:
                if not isinstance(row, spec.row_type):
                    want = "a JSON object" if spec.row_type is dict else "a list of 6 cells"
                    raise ctx.error(None, f"expected {want}, got {_json_kind(row)}")
                rec = spec.parse(ctx, row)
                if rec is None:  # deliberately not selected (e.g. PubMedQA PMID outside the test split)
                    continue
                if rec.id in seen:
                    raise ctx.error("id", f"duplicate id {rec.id!r} (first at {seen[rec.id]})")
            except DataError as err:
                if not skip_invalid:
                    raise
                skipped.append(err)
                continue
            seen[rec.id] = rec.source
            records.append(rec)
        skipped.extend(json_errors or [])
        if len(records) + len(skipped) == n_before:
            raise DataError(file, "file", None, "no records (empty file)")
    if not records:
        raise DataError(path, "file", None, f"no valid records ({len(skipped)} skipped: {LoadResult([], skipped).skip_summary()})")
    _check_cop_base(path, opts)
    truth = opts.get("_ground_truth")
    if truth is not None:
        found = {r.id.split("/", 1)[1] for r in records} | {e.where.split("'")[1] for e in skipped if "'" in e.where}
        absent = sorted(set(truth) - found)
        if absent and not skipped:  # with skipped rows, the absent PMIDs may be among them (reported above)
            raise DataError(ground_truth, f"record '{absent[0]}'", None, f"{len(absent)} ground-truth PMIDs are not in "
                            f"{path.name} (wrong data file?)")
    return LoadResult(records, skipped)


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"a number ({value!r})" if isinstance(value, (int, float)) else type(value).__name__)


def _check_cop_base(path: Path, opts: dict) -> None:
    """MedMCQA: cop values that only fit the other indexing mean ``cop_base`` is wrong, which
    would shift every answer by one -- an error even with ``--skip-invalid``."""
    values, base = opts.get("_cop_values"), opts.get("cop_base")
    if not values or base not in (0, 1):
        return
    # 0-based rows under cop_base 1 hold 0 and never 4; 1-based rows under cop_base 0 hold 4 and never 0
    outside, unused = (0, 4) if base == 1 else (4, 0)
    if outside in values and unused not in values:
        other = 1 - base
        raise DataError(path, "file", "cop", f"values run {min(values)}..{max(values)}: this file indexes cop from "
                                             f"{other}, not {base}; set the source's cop_base: {other}")
