"""Loading the public hub copies through ``datasets`` (needs internet; not run in tests).

Each hub copy is mapped back to the benchmark's native row shape and parsed by the same
parser as local files, so hub and local loading cannot drift apart. The row adapters are
pure functions and are unit-tested on rows shaped like the hub's.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

from .loaders import LETTERS, LoadResult, load_benchmark

# benchmark -> (hub id, config name or None, default split)
HUB_IDS: dict[str, tuple[str, str | None, str]] = {
    "medqa": ("GBaker/MedQA-USMLE-4-options", None, "test"),
    "medmcqa": ("openlifescienceai/medmcqa", None, "validation"),
    "pubmedqa": ("qiaojin/PubMedQA", "pqa_labeled", "train"),
    "cmb": ("FreedomIntelligence/CMB", "exam", "val"),
    "cmexam": ("fzkuji/CMExam", None, "test"),
    "cmmlu": ("haonan-li/cmmlu", "clinical_knowledge", "test"),
    "mmlu": ("cais/mmlu", "clinical_knowledge", "test"),
    "gsm8k": ("openai/gsm8k", "main", "test"),
}


def _pubmedqa_row(row: dict) -> dict:
    ctx = row.get("context") or {}
    return {str(row["pubid"]): {"QUESTION": row["question"], "CONTEXTS": ctx.get("contexts", []),
                                "MESHES": ctx.get("meshes", []), "final_decision": row["final_decision"]}}


def _mmlu_row(row: dict) -> list:
    return [row["question"], *row["choices"], LETTERS[int(row["answer"])]]


# Hub rows that differ from the native release; the rest are already native.
ROW_ADAPTERS: dict[str, Callable[[dict], Any]] = {"pubmedqa": _pubmedqa_row, "mmlu": _mmlu_row}


def load_hub(
    benchmark: str,
    *,
    hub_id: str | None = None,
    config: str | None = None,
    split: str | None = None,
    skip_invalid: bool = False,
) -> LoadResult:
    """Download a benchmark's public copy and parse it as the native format.

    The rows are written to a temporary JSONL file named after the subject (CMMLU/MMLU
    read the subject from the file name) and read by :func:`load_benchmark`. MedMCQA's hub
    copy indexes ``cop`` from 0, which is passed explicitly.
    """
    from datasets import load_dataset  # heavy import, only on this path; datasets runs no dataset scripts

    if benchmark not in HUB_IDS:
        from ..errors import ConfigError

        raise ConfigError(f"benchmark {benchmark!r} has no hub copy here; known: {', '.join(HUB_IDS)}")
    default_id, default_config, default_split = HUB_IDS[benchmark]
    hub_id, config, split = hub_id or default_id, config or default_config, split or default_split
    dataset = load_dataset(hub_id, config, split=split)
    adapt = ROW_ADAPTERS.get(benchmark, lambda r: r)
    with tempfile.TemporaryDirectory() as tmp:
        name = f"{config or benchmark}_{split}.jsonl" if benchmark in ("cmmlu", "mmlu") else f"{split}.jsonl"
        path = Path(tmp) / name
        with open(path, "w", encoding="utf-8") as fh:
            for row in dataset:
                fh.write(json.dumps(adapt(dict(row)), ensure_ascii=False, default=str) + "\n")
        return load_benchmark(benchmark, path, skip_invalid=skip_invalid, cop_base=0)
