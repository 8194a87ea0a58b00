"""Config sources -> tagged records: loading, subsets, route balance, train/eval disjointness."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .config import RunConfig, SourceConfig, resolve_data_path
from .data import load_benchmark, route_balanced, seeded_subset, exclude_overlap
from .data.record import QARecord
from .errors import ConfigError
from .tagger import TextTagger
from .tags import OPERATIONS, SPECIALTIES, UNKNOWN, Tags, tag_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaggedRecord:
    record: QARecord
    tags: Tags
    set_name: str


def load_source(src: SourceConfig) -> list[QARecord]:
    """Read one source (local native file or hub copy) and apply its seeded subset."""
    if src.hub:
        from .data.hub import load_hub

        result = load_hub(src.benchmark, hub_id=src.hub_id, config=src.hub_config, split=src.split,
                          skip_invalid=src.skip_invalid)
    else:
        if not src.path:
            raise ConfigError(f"source '{src.display_name}': give 'path' (a local file or folder) or set hub: true")
        result = load_benchmark(
            src.benchmark, resolve_data_path(src.path),
            skip_invalid=src.skip_invalid, encoding=src.encoding,
            answer_file=resolve_data_path(src.answer_file) if src.answer_file else None,
            ground_truth=resolve_data_path(src.ground_truth) if src.ground_truth else None,
            cop_base=1 if src.cop_base is None else src.cop_base,
        )
    if result.skipped:
        log.warning("%s: skipped %d invalid records: %s", src.display_name, len(result.skipped), result.skip_summary())
    records = result.records
    if src.limit is not None and src.per_route is None:
        records = seeded_subset(records, src.limit, src.subset_seed)
    return records


def tag_all(records: list[QARecord], set_name: str, text_only: bool = False,
            tagger: TextTagger | None = None) -> list[TaggedRecord]:
    return [TaggedRecord(r, tag_record(r, text_only=text_only, tagger=tagger), set_name) for r in records]


_TAGGERS: dict[tuple, TextTagger] = {}


def run_tagger(cfg: RunConfig) -> TextTagger | None:
    """The learned tagger of ``data.tagger`` (read again only when its files changed), or None."""
    from pathlib import Path

    from .tagger import CONFIG_FILE, WEIGHTS_FILE

    if cfg.data.tagger is None:
        return None
    folder = Path(cfg.data.tagger)
    stats = tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None
                  for p in (folder / CONFIG_FILE, folder / WEIGHTS_FILE))
    key = (str(folder.resolve()), stats)
    if key not in _TAGGERS:
        _TAGGERS[key] = TextTagger.load(folder)
    return _TAGGERS[key]


def load_eval_sets(sources: list[SourceConfig], tagger: TextTagger | None = None) -> dict[str, list[TaggedRecord]]:
    """Every evaluation set, tagged; a ``tagger`` trained on one of their questions is refused."""
    sets: dict[str, list[TaggedRecord]] = {}
    for src in sources:
        if src.display_name in sets:
            raise ConfigError(f"eval.benchmarks: two sources named '{src.display_name}'; give them distinct 'name's")
        records = load_source(src)
        if tagger is not None:
            seen = tagger.trained_on(records)
            if seen:
                raise ConfigError(f"config key 'data.tagger': {tagger.path} was trained on {len(seen)} questions of "
                                  f"the evaluation set '{src.display_name}' (e.g. id {seen[0].id}); retrain it with "
                                  "that set under 'exclude' (or its run config under 'exclude_runs')")
        sets[src.display_name] = tag_all(records, src.display_name, src.text_only_tags, tagger)
    return sets


def load_train_set(cfg: RunConfig, eval_sets: dict[str, list[TaggedRecord]] | None = None) -> list[TaggedRecord]:
    """All training sources, each made disjoint from the eval sets it names in ``exclude``.

    Exclusion is by id and by normalized question text, so a question copied into two
    releases cannot leak. Route balance (``per_route``) is applied after exclusion.
    """
    if not cfg.data.train:
        raise ConfigError("config key 'data.train' is empty: name at least one training source")
    eval_sets = eval_sets or {}
    tagger = run_tagger(cfg)
    out: list[TaggedRecord] = []
    for i, src in enumerate(cfg.data.train):
        records = load_source(src)
        for name in src.exclude:
            if name not in eval_sets:
                raise ConfigError(f"source '{src.display_name}': exclude names '{name}', which is not an eval set "
                                  f"({', '.join(eval_sets) or 'none'})")
            records, dropped = exclude_overlap(records, [t.record for t in eval_sets[name]])
            if dropped:
                log.info("%s: dropped %d items shared with eval set %s", src.display_name, dropped, name)
        tagged = tag_all(records, src.display_name, src.text_only_tags, tagger)
        if src.per_route is not None:
            from .errors import MedpeftError
            from .tags import SPECIALTIES

            unknown = sorted(set(src.routes or []) - set(SPECIALTIES))
            if unknown:
                raise ConfigError(f"config key 'data.train.{i}.routes' names {unknown[0]!r}, not a specialty "
                                  f"({', '.join(SPECIALTIES)})")
            by_id = {t.record.id: t for t in tagged}
            try:
                picked = route_balanced([t.record for t in tagged], lambda r: by_id[r.id].tags.specialty,
                                        src.per_route, src.subset_seed, src.routes)
            except MedpeftError as err:
                raise MedpeftError(f"config key 'data.train.{i}.per_route' ({src.display_name}): {err}") from None
            tagged = [by_id[r.id] for r in picked]
        open_ended = sum(t.record.question_type == "open" for t in tagged)
        if open_ended:  # answer-only SFT targets option letters; worked solutions are not trained on
            log.warning("%s: %d open-ended items (e.g. GSM8K) are not used for training", src.display_name, open_ended)
        out.extend(t for t in tagged if t.record.question_type != "open")
    if not out:
        raise ConfigError("the training sources hold no multiple-choice or summarisation items")
    return out


def perturb_tags(items: list[TaggedRecord], rate: float, seed: int) -> list[TaggedRecord]:
    """Weak-axis perturbation: for ``round(rate * N)`` items chosen with ``seed``, replace the
    specialty and the operation tag each by a random *other* known value (``why`` records it)."""
    import dataclasses
    import random

    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(items)), round(rate * len(items))))
    out = []
    for i, item in enumerate(items):
        if i in chosen:
            t = item.tags
            spec = rng.choice([v for v in SPECIALTIES if v not in (t.specialty, UNKNOWN)])
            op = rng.choice([v for v in OPERATIONS if v not in (t.operation, UNKNOWN)])
            item = dataclasses.replace(item, tags=Tags(spec, op, f"perturbed (was {t.specialty})",
                                                       f"perturbed (was {t.operation})"))
        out.append(item)
    return out
