"""A learned, explainable text-only tagger: TF-IDF n-grams and multinomial logistic regression.

Labels come from the releases' non-answer metadata through the same maps the metadata
tagger uses (``tags.specialty_from_metadata`` / ``operation_from_metadata``: MedMCQA
``subject_name``, CMB ``exam_class``/``exam_type``, CMExam departments and competency
areas, MMLU/CMMLU subjects); features come from the stem and the options only (English
word 1-2-grams, Chinese character 1-3-grams), never from the answer.

Training uses scikit-learn (``TfidfVectorizer`` + ``LogisticRegression``). The artifact is
a folder, ``tagger.json`` (vocabulary, classes, settings, training sources and counts,
held-out agreement) and ``weights.safetensors`` (idf, coefficients, intercepts, and 64-bit
fingerprints of the training questions, which let a run refuse a tagger trained on one of
its evaluation sets). Inference re-implements ``TfidfVectorizer.transform`` +
``LogisticRegression.predict_proba`` in numpy because scikit-learn models persist only as
pickles, which medpeft never loads; a test asserts the two agree.

For a question with n-gram counts ``c_j``:  ``x_j = (1 + ln c_j) idf_j / ||(1 + ln c) idf||_2``,
``p = softmax(W x + b)``; the tag is ``argmax p`` when ``max p >= min_confidence``, else
``unknown``; ``why`` names the n-grams with the largest contributions ``x_j W_kj`` to the
chosen class ``k`` and its probability.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .data.record import QARecord
from .errors import MedpeftError
from .tags import (OPERATIONS, SPECIALTIES, UNKNOWN, item_text, operation_from_metadata, specialty_from_metadata,
                   tag_record)

FORMAT = "medpeft-tagger"
VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "tagger.json", "weights.safetensors"
AXES = ("specialty", "operation")
TOP_NGRAMS = 3  # n-grams named in a tag's why

# CJK ideographs (and extension A, compatibility): runs become character n-grams. Words: runs
# of other letters and digits (any script: "ménière", "β-blocker"), joined by ' ’ or -.
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_LETTER = rf"(?:(?![{_CJK}])[^\W_])"
_TOKENS = re.compile(rf"([{_CJK}]+)|({_LETTER}+(?:['’-]{_LETTER}+)*)")


def ngrams(text: str, word_n: Sequence[int] = (1, 2), char_n: Sequence[int] = (1, 3),
           stop_words: frozenset[str] = frozenset()) -> list[str]:
    """Features of a text after NFKC folding and lower-casing: word ``word_n[0]..word_n[1]``-grams
    of the Latin/digit words other than ``stop_words`` (in order, as scikit-learn's word
    analyzer), and character ``char_n[0]..char_n[1]``-grams inside each run of Chinese
    characters (prefixed ``zh:`` so they never collide with words)."""
    text = unicodedata.normalize("NFKC", text).lower()
    words: list[str] = []
    out: list[str] = []
    for m in _TOKENS.finditer(text):
        if m.group(1):
            run = m.group(1)
            for n in range(char_n[0], char_n[1] + 1):
                out.extend("zh:" + run[i:i + n] for i in range(len(run) - n + 1))
        elif m.group(2) not in stop_words:
            words.append(m.group(2))
    for n in range(word_n[0], word_n[1] + 1):
        out.extend(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
    return out


def fingerprint(record: QARecord) -> int:
    """64-bit hash of the normalized question text (the leakage check's normalization)."""
    from .data.subsets import normalized_question

    digest = hashlib.blake2b(normalized_question(record).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def metadata_label(record: QARecord, axis: str) -> str | None:
    """The training label of ``record`` on ``axis`` from its metadata, or None."""
    found = specialty_from_metadata(record) if axis == "specialty" else operation_from_metadata(record)
    return found[0] if found else None


# ----------------------------------------------------------------------------- inference

@dataclass(frozen=True)
class Prediction:
    tag: str  # UNKNOWN below the confidence threshold
    probability: float  # of the best class
    best: str  # the best class, even when below the threshold
    top_ngrams: tuple[str, ...]

    known: int = 1  # n-grams of the text in the tagger's vocabulary

    @property
    def why(self) -> str:
        if not self.known:
            return "learned: unknown, no n-gram of the text is in the tagger's vocabulary"
        grams = ", ".join(repr(g.removeprefix("zh:")) for g in self.top_ngrams) or f"no n-gram favours {self.best}"
        if self.tag == UNKNOWN:
            return f"learned: unknown, p={self.probability:.2f} for {self.best} is below the threshold ({grams})"
        return f"learned: p={self.probability:.2f} ({grams})"


@dataclass
class AxisModel:
    classes: list[str]
    coef: np.ndarray  # [K, V]
    intercept: np.ndarray  # [K]


@dataclass
class TextTagger:
    """A trained tagger: vocabulary, idf and one linear model per axis that had labels."""

    vocabulary: list[str]
    idf: np.ndarray  # [V]
    axes: dict[str, AxisModel]
    min_confidence: float
    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (1, 3)
    stop_words: frozenset[str] = frozenset()
    fingerprints: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    languages: tuple[str, ...] = ()  # of the training items: other languages keep the keyword rules
    info: dict = field(default_factory=dict)  # sources, counts, held-out agreement, settings
    path: str = ""
    digest: str = ""  # sha256 of the saved files (set by load): a run records the tagger it routed on
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {g: j for j, g in enumerate(self.vocabulary)}
        self._fingerprint_set = set(self.fingerprints.tolist())

    def features(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """The sparse TF-IDF row of ``text``: (column indices, values), l2-normalized."""
        counts = Counter(j for j in (self._index.get(g) for g in ngrams(text, self.word_ngrams, self.char_ngrams,
                                                                       self.stop_words))
                         if j is not None)
        if not counts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        idx = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        tf = 1.0 + np.log(np.fromiter(counts.values(), dtype=np.float64, count=len(counts)))
        values = tf * self.idf[idx]
        return idx, values / np.linalg.norm(values)

    def probabilities(self, text: str, axis: str) -> np.ndarray:
        """``softmax(W x + b)`` over the axis's classes."""
        return self._scores(text, axis)[2]

    def _scores(self, text: str, axis: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        model = self.axes[axis]
        idx, values = self.features(text)
        logits = model.coef[:, idx] @ values + model.intercept
        p = np.exp(logits - logits.max())
        return idx, values, p / p.sum()

    def predict(self, record: QARecord, axis: str) -> Prediction | None:
        """The tag of ``record`` on ``axis``; None when this tagger has no model for the axis or
        was trained on no item of the record's language (the keyword rules tag it). A text with
        no known n-gram is ``unknown`` (its probabilities would be the class prior alone)."""
        model = self.axes.get(axis)
        if model is None or (self.languages and record.language not in self.languages):
            return None
        idx, values, p = self._scores(item_text(record), axis)
        if not len(idx):
            return Prediction(UNKNOWN, float(p.max()), model.classes[int(np.argmax(p))], (), known=0)
        k = int(np.argmax(p))
        contribution = values * model.coef[k, idx]
        order = np.argsort(-contribution, kind="stable")[:TOP_NGRAMS]
        top = tuple(self.vocabulary[int(idx[j])] for j in order if contribution[j] > 0)
        best = model.classes[k]
        tag = best if p[k] >= self.min_confidence else UNKNOWN
        return Prediction(tag, float(p[k]), best, top, known=len(idx))

    def trained_on(self, records: Iterable[QARecord]) -> list[QARecord]:
        """The records whose normalized question this tagger was trained on."""
        return [r for r in records if fingerprint(r) in self._fingerprint_set]

    # ------------------------------------------------------------------ save / load
    def save(self, folder: str | Path) -> None:
        """Write ``tagger.json`` and ``weights.safetensors`` into ``folder`` (replaced whole)."""
        from safetensors.numpy import save_file

        from .io import atomic_dir

        tensors = {"idf": self.idf.astype(np.float32), "train_fingerprints": self.fingerprints.astype(np.int64)}
        for axis, model in self.axes.items():
            tensors[f"{axis}.coef"] = np.ascontiguousarray(model.coef, dtype=np.float32)
            tensors[f"{axis}.intercept"] = model.intercept.astype(np.float32)
        with atomic_dir(folder) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_FILE))
            meta = {"format": FORMAT, "version": VERSION, "min_confidence": self.min_confidence,
                    "word_ngrams": list(self.word_ngrams), "char_ngrams": list(self.char_ngrams),
                    "stop_words": sorted(self.stop_words), "languages": list(self.languages),
                    "axes": {axis: {"classes": m.classes} for axis, m in self.axes.items()},
                    "weights_sha256": hashlib.sha256((tmp / WEIGHTS_FILE).read_bytes()).hexdigest(),
                    **self.info, "vocabulary": self.vocabulary}
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path) -> "TextTagger":
        """Read a saved tagger; a missing or inconsistent file is one error naming it and the field."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        folder = Path(folder)
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        if not folder.exists():
            raise MedpeftError(f"{folder}: no such tagger folder (write one with 'medpeft tagger train CONFIG')")
        if not folder.is_dir():
            raise MedpeftError(f"{folder}: is a file; a tagger is a folder holding {CONFIG_FILE} and {WEIGHTS_FILE}")
        for path in (config_path, weights_path):
            if not path.is_file():
                raise MedpeftError(f"{folder}: not a tagger folder ({path.name} is missing; "
                                   "write one with 'medpeft tagger train CONFIG')")
        try:
            meta = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise MedpeftError(f"{config_path}: not valid JSON ({err})") from None

        def bad(key: str, problem: str) -> MedpeftError:
            return MedpeftError(f"{config_path}: field '{key}' {problem}")

        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise MedpeftError(f"{config_path}: field 'format' is not {FORMAT!r}: not a medpeft tagger")
        if meta.get("version") != VERSION:
            raise bad("version", f"is {meta.get('version')!r}; this medpeft reads {VERSION}")
        weights = weights_path.read_bytes()
        if not isinstance(meta.get("weights_sha256"), str):
            raise bad("weights_sha256", "is missing (the sha256 of weights.safetensors)")
        if meta["weights_sha256"] != hashlib.sha256(weights).hexdigest():
            raise MedpeftError(f"{weights_path}: its sha256 differs from field 'weights_sha256' of {CONFIG_FILE} "
                               "(the weights were changed or replaced after the tagger was written)")
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError) as err:
            raise MedpeftError(f"{weights_path}: not a readable safetensors file ({str(err).splitlines()[0]})") from None
        vocabulary = meta.get("vocabulary")
        if not isinstance(vocabulary, list) or not all(isinstance(g, str) for g in vocabulary) \
                or len(set(vocabulary)) != len(vocabulary):
            raise bad("vocabulary", "must be a list of distinct n-grams")
        ranges = {}
        for key in ("word_ngrams", "char_ngrams"):
            value = meta.get(key)
            if not (isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)
                    and 1 <= value[0] <= value[1]):
                raise bad(key, f"must be [low, high] with 1 <= low <= high, got {value!r}")
            ranges[key] = (value[0], value[1])
        stop_words, languages = meta.get("stop_words"), meta.get("languages")
        for key, value in (("stop_words", stop_words), ("languages", languages)):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise bad(key, f"must be a list of strings, got {value!r}")
        threshold = meta.get("min_confidence")
        if type(threshold) not in (int, float) or not 0 <= threshold <= 1:
            raise bad("min_confidence", f"must be a probability in [0, 1], got {threshold!r}")

        def tensor(name: str, shape: tuple, kind: str = "f") -> np.ndarray:
            value = tensors.get(name)
            if value is None or value.shape != shape or value.dtype.kind != kind \
                    or (kind == "f" and not np.isfinite(value).all()):
                what = "finite floating-point" if kind == "f" else "int64"
                raise MedpeftError(f"{weights_path}: tensor '{name}' must be {what} of shape {list(shape)}")
            return value

        n_vocab = len(vocabulary)
        idf = tensor("idf", (n_vocab,))
        fingerprints = tensors.get("train_fingerprints")
        if fingerprints is None or fingerprints.ndim != 1 or fingerprints.dtype != np.int64:
            raise MedpeftError(f"{weights_path}: tensor 'train_fingerprints' must be 1-D int64 (the training questions "
                               "a run checks its evaluation sets against)")
        axes_meta = meta.get("axes")
        if not isinstance(axes_meta, dict) or not axes_meta:
            raise bad("axes", "must map an axis (specialty, operation) to its classes")
        axes = {}
        for axis, spec in axes_meta.items():
            values = SPECIALTIES if axis == "specialty" else OPERATIONS
            classes = spec.get("classes") if isinstance(spec, dict) else None
            if axis not in AXES or not isinstance(classes, list) or len(classes) < 2 \
                    or len(set(map(str, classes))) != len(classes) \
                    or not all(isinstance(c, str) and c in values and c != UNKNOWN for c in classes):
                raise bad(f"axes.{axis}", f"must be an axis of {AXES} with >= 2 distinct values of it "
                                          f"({', '.join(v for v in values if v != UNKNOWN)})")
            axes[axis] = AxisModel(list(classes), tensor(f"{axis}.coef", (len(classes), n_vocab)).astype(np.float64),
                                   tensor(f"{axis}.intercept", (len(classes),)).astype(np.float64))
        info = {k: v for k, v in meta.items() if k not in ("format", "version", "vocabulary", "axes", "min_confidence",
                                                           "word_ngrams", "char_ngrams", "stop_words", "languages",
                                                           "weights_sha256")}
        digest = hashlib.sha256(config_path.read_bytes() + weights).hexdigest()
        return cls(vocabulary, idf.astype(np.float64), axes, float(threshold), ranges["word_ngrams"],
                   ranges["char_ngrams"], frozenset(stop_words), fingerprints, tuple(languages), info, str(folder),
                   digest)


# ----------------------------------------------------------------------------- training

@dataclass
class TaggerSettings:
    """What ``train_tagger`` fits (the ``model`` section of a tagger config)."""

    word_ngrams: list[int] = field(default_factory=lambda: [1, 2])
    char_ngrams: list[int] = field(default_factory=lambda: [1, 3])
    # english: scikit-learn's English stop-word list is dropped before word n-grams (the list is
    # saved in the tagger, so tags never depend on the installed version); none: keep every word
    stop_words: str = "english"
    min_df: int = 2  # n-grams seen in fewer training items are dropped
    max_features: int | None = 200_000  # the most frequent n-grams kept
    C: float = 10.0  # inverse L2 strength of the logistic regression
    max_iter: int = 1000
    min_confidence: float = 0.4  # below it the tag is 'unknown'
    held_out: float = 0.1  # share of each source's labelled items held out to measure agreement
    seed: int = 0


def split_held_out(records: Sequence[QARecord], share: float, seed: int) -> tuple[list[QARecord], list[QARecord]]:
    """(train, held out), order kept: a seeded ``round(share * Q)`` of the ``Q`` distinct
    normalized questions held out with every copy of them, so that a question repeated in a
    release (MedMCQA train holds repeats) never sits on both sides of the agreement."""
    keys = [fingerprint(r) for r in records]
    distinct = list(dict.fromkeys(keys))
    held = set(random.Random(seed).sample(distinct, round(share * len(distinct)))) if share > 0 else set()
    return ([r for r, k in zip(records, keys) if k not in held], [r for r, k in zip(records, keys) if k in held])


def fit_tagger(train: Sequence[QARecord], settings: TaggerSettings) -> TextTagger:
    """Fit the vectorizer and one classifier per axis with >= 2 labelled classes on ``train``."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from tqdm.auto import tqdm

    word_n, char_n = tuple(settings.word_ngrams), tuple(settings.char_ngrams)
    stop = frozenset(ENGLISH_STOP_WORDS) if settings.stop_words == "english" else frozenset()
    labels = {axis: [metadata_label(r, axis) for r in train] for axis in AXES}
    usable = [i for i, r in enumerate(train) if any(labels[a][i] for a in AXES)]
    if not usable:
        raise MedpeftError("no training item has a specialty or operation label in its metadata (MedMCQA "
                           "subject_name, CMB exam_class/exam_type, CMExam departments, MMLU/CMMLU subjects)")
    texts = [item_text(train[i]) for i in usable]
    vectorizer = TfidfVectorizer(analyzer=lambda t: ngrams(t, word_n, char_n, stop), lowercase=False,
                                 min_df=min(settings.min_df, len(texts)), max_features=settings.max_features,
                                 sublinear_tf=True, norm="l2", smooth_idf=True, dtype=np.float64)
    try:
        matrix = vectorizer.fit_transform(tqdm(texts, desc="tagger n-grams", unit="item", leave=False,
                                               disable=len(texts) < 5000))  # seconds below that
    except ValueError as err:  # scikit-learn: no n-gram is left after min_df / an empty vocabulary
        from .errors import ConfigError

        raise ConfigError(f"config key 'model.min_df' ({settings.min_df}): no n-gram is left to learn from "
                          f"({str(err).splitlines()[0]})") from None
    vocabulary = [""] * len(vectorizer.vocabulary_)
    for gram, j in vectorizer.vocabulary_.items():
        vocabulary[j] = gram
    axes = {}
    for axis in AXES:
        rows = [k for k, i in enumerate(usable) if labels[axis][i]]
        y = [labels[axis][usable[k]] for k in rows]
        if len(set(y)) < 2:
            continue
        clf = LogisticRegression(C=settings.C, max_iter=settings.max_iter)
        clf.fit(matrix[rows], y)
        coef, intercept = clf.coef_, clf.intercept_
        if len(clf.classes_) == 2:  # sklearn keeps one row w: softmax([-w/2, w/2]) is its sigmoid(w)
            coef, intercept = np.vstack([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
        axes[axis] = AxisModel([str(c) for c in clf.classes_], coef.astype(np.float64), intercept.astype(np.float64))
    if not axes:
        raise MedpeftError("the training items carry a single specialty and no operation labels: a classifier "
                           "needs at least two classes")
    fingerprints = np.array(sorted({fingerprint(r) for r in train}), dtype=np.int64)
    languages = tuple(sorted({train[i].language for i in usable}))
    return TextTagger(vocabulary, vectorizer.idf_.astype(np.float64), axes, settings.min_confidence,
                      word_n, char_n, stop, fingerprints, languages)


def agreement(tagger: TextTagger, records: Sequence[QARecord], axis: str) -> dict:
    """Text-only tags with the tagger (what a run with ``data.tagger`` assigns: keyword rules
    for a language it was not trained on) and with the keyword rules alone, against the
    metadata label of the labelled ``records``, with 95% Wilson intervals; arg-max = the best
    class even below the threshold; coverage = share not ``unknown``."""
    from .stats import wilson_interval

    labelled = [(r, metadata_label(r, axis)) for r in records]
    labelled = [(r, y) for r, y in labelled if y]
    n = len(labelled)
    if not n or axis not in tagger.axes:
        return {"n": n}
    learned = [getattr(tag_record(r, text_only=True, tagger=tagger), axis) for r, _ in labelled]
    best = [p.best if p is not None else tag for p, tag in
            zip((tagger.predict(r, axis) for r, _ in labelled), learned)]
    keyword = [getattr(tag_record(r, text_only=True), axis) for r, _ in labelled]
    learned_hits = sum(t == y for t, (_, y) in zip(learned, labelled))
    best_hits = sum(b == y for b, (_, y) in zip(best, labelled))
    keyword_hits = sum(k == y for k, (_, y) in zip(keyword, labelled))
    confident = [(t, y) for t, (_, y) in zip(learned, labelled) if t != UNKNOWN]

    def rate(k: int, m: int) -> dict:
        low, high = wilson_interval(k, m) if m else (0.0, 0.0)
        return {"agreement": k / m if m else 0.0, "wilson_low": low, "wilson_high": high, "agree": k, "n": m}

    return {"n": n, "learned": rate(learned_hits, n), "learned_argmax": rate(best_hits, n),
            "keyword": rate(keyword_hits, n), "coverage": len(confident) / n,
            "learned_where_confident": rate(sum(t == y for t, y in confident), len(confident))}


def train_tagger(sources: dict[str, list[QARecord]], settings: TaggerSettings) -> TextTagger:
    """Hold out ``settings.held_out`` of each source's labelled items, fit on the rest of all
    sources together, and record counts and held-out agreement per source and overall."""
    from .errors import ConfigError

    parts: dict[str, list[QARecord]] = {}
    held: dict[str, list[QARecord]] = {}
    counts = {}
    for i, (name, records) in enumerate(sources.items()):
        labelled = [r for r in records if any(metadata_label(r, a) for a in AXES)]
        if records and not labelled:
            raise ConfigError(f"config key 'sources.{i}' ({name}): none of its {len(records)} items has a specialty "
                              "or operation label in its metadata (MedMCQA subject_name, CMB exam_class/exam_type, "
                              "CMExam departments, MMLU/CMMLU subjects)")
        parts[name], held[name] = split_held_out(labelled, settings.held_out, settings.seed)
        counts[name] = {"items": len(records), "labelled": len(labelled), "held_out": len(held[name])}
    # a question held out in one source is not trained on through another (releases overlap)
    held_keys = {fingerprint(r) for records in held.values() for r in records}
    train: list[QARecord] = []
    for name in sources:
        kept = [r for r in parts[name] if fingerprint(r) not in held_keys]
        counts[name].update(train=len(kept), dropped_as_held_out_elsewhere=len(parts[name]) - len(kept))
        train += kept
    if not train:
        raise ConfigError(f"config key 'model.held_out' ({settings.held_out}): no labelled item is left to train on")
    if len(train) >= 5000:  # a fit of minutes: say so (the n-gram count shows a progress bar)
        import sys

        print(f"fitting the tagger on {len(train)} items ...", file=sys.stderr, flush=True)
    tagger = fit_tagger(train, settings)
    all_held = [r for records in held.values() for r in records]
    for name in counts:
        counts[name]["held_out_agreement"] = {axis: agreement(tagger, held[name], axis) for axis in tagger.axes}
        for axis in AXES:
            seen = Counter(metadata_label(r, axis) for r in sources[name])
            seen.pop(None, None)
            counts[name][f"{axis}_labels"] = dict(sorted(seen.items()))
    tagger.info.update({
        "sources": counts,
        "held_out_agreement": {axis: agreement(tagger, all_held, axis) for axis in tagger.axes},
        "settings": {k: v for k, v in vars(settings).items()},
    })
    return tagger


def agreement_table(tagger: TextTagger) -> str:
    """Markdown: held-out agreement with metadata per source and axis, learned vs keyword rules."""
    lines = ["| source | axis | n | learned | keyword rules | coverage | learned where confident |",
             "|---|---|---|---|---|---|---|"]

    def cell(r: dict) -> str:
        return f"{100 * r['agreement']:.1f}% [{100 * r['wilson_low']:.1f}, {100 * r['wilson_high']:.1f}]"

    rows = [(name, s["held_out_agreement"]) for name, s in tagger.info.get("sources", {}).items()]
    rows.append(("all", tagger.info.get("held_out_agreement", {})))
    if not any("learned" in r for _, by_axis in rows for r in by_axis.values()):
        return "no labelled items were held out (model.held_out = 0): agreement not measured\n"
    for name, by_axis in rows:
        for axis, r in by_axis.items():
            if "learned" in r:
                lines.append(f"| {name} | {axis} | {r['n']} | {cell(r['learned'])} | {cell(r['keyword'])} | "
                             f"{100 * r['coverage']:.1f}% | {cell(r['learned_where_confident'])} |")
    return "\n".join(lines) + "\n"

