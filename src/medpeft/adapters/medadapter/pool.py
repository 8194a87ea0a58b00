"""The shared candidate pool: each library adapter's greedy answer and letter log-probabilities
per item, computed once and cached on disk.

An adapter's candidate for a multiple-choice item is its greedy answer letter: the argmax of
the next-token log-likelihood over the item's option letters after the prompt (the letters
scorer's decision for a single-answer item), with every letter's log-probability kept. Cached
in the library's run folder::

    <library run>/pool/<model key>/pool.json                the model the pool was computed with
    <library run>/pool/<model key>/<adapter>-<weights sha>.jsonl   {id, prompt_sha, pred, logprobs}

The model key hashes the base model's config and a sample of its weights, the file name the
adapter's weights: a changed model or adapter gets a new cache; an item whose prompt changed
(another template or max_length) is recomputed. Every router that needs candidates reads it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ...distributed import processes

from ...errors import MedpeftError
from ...prompts import PromptFormatter
from ..routing import routing_state, set_routing

POOL_DIR = "pool"
HEADER = "pool.json"
counters = {"computed": 0, "reused": 0}  # items computed / read from the cache (tests read them)


def model_key(model: torch.nn.Module) -> str:
    """SHA-256 (16 hex) of the base model's config and a sample of its weights."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update(json.dumps(config.to_dict() if config is not None else {}, sort_keys=True, default=str).encode())
    # a strided sample of the input embeddings and of the last parameter (an 8B model's full
    # weights would take seconds to hash; a different checkpoint differs in these too)
    last = list(model.parameters())[-1]
    for weight in (model.get_input_embeddings().weight, last):
        digest.update(weight.detach().flatten()[::1009].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def adapter_key(path: Path) -> str:
    digest = hashlib.sha256()
    with open(Path(path) / "adapter_model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def _prompt_sha(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]


def pool_folder(library_run: Path, model: torch.nn.Module, model_name: str) -> Path:
    """The pool folder of this base model, created with its header; a folder whose header names
    another model is refused (a pool copied from elsewhere must not be read as this model's)."""
    key = model_key(model)
    folder = Path(library_run) / POOL_DIR / key
    header = folder / HEADER
    if header.is_file():
        try:
            saved = json.loads(header.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise MedpeftError(f"{header}: unreadable ({type(err).__name__})") from None
        if saved.get("model_key") != key:
            raise MedpeftError(f"{header}: a candidate pool of another model (key {saved.get('model_key')!r}, this "
                               f"model's is {key!r}); remove the folder to recompute it")
    else:
        from ...io import write_json

        folder.mkdir(parents=True, exist_ok=True)
        if processes().is_main:
            write_json(header, {"model": model_name, "model_key": key})
    return folder


@torch.no_grad()
def letter_logprobs(model, fmt: PromptFormatter, items: list, batch_size: int) -> list[dict[str, float]]:
    """Each item's option-letter log-probabilities after its prompt (one forward per batch).

    The letters scorer's forward pass for single-answer items (left padding, position ids,
    logits at the last position), written here because the verifier is fitted during
    training, below the evaluation module (``medpeft.evaluate`` imports the adapters, not the
    reverse); tests/test_library.py checks the answers are the adapters' letters decisions."""
    device = next(model.parameters()).device
    encoded = [e.input_ids for e in fmt.encode_prompts([t.record for t in items])]
    out: list = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(encoded[i]))
    pad = fmt.tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        ids, mask = ids.to(device), mask.to(device)
        spec = torch.tensor([items[i].tags.specialty_id for i in idx], device=device)
        op = torch.tensor([items[i].tags.operation_id for i in idx], device=device)
        set_routing(model, mask.bool(), spec, op)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       logits_to_keep=1, use_cache=False).logits[:, -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        for row, i in enumerate(idx):
            letters = fmt.letter_token_ids("".join(items[i].record.options))
            out[i] = {k: float(logp[row, v]) for k, v in letters.items()}
    return out


def adapter_candidates(model, fmt: PromptFormatter, items: list, library, model_name: str, library_run: Path,
                       batch_size: int) -> list[list[dict]]:
    """``[item][adapter] -> {"pred": letter, "logprobs": {...}}`` from the cache, computing (and
    appending) what it lacks, with each adapter forced in turn."""
    folder = pool_folder(library_run, model, model_name)
    state = routing_state(model)
    prompts = [_prompt_sha(e.input_ids) for e in fmt.encode_prompts([t.record for t in items])]
    table: list[list] = [[None] * len(library.names) for _ in items]
    previous = state.forced
    try:
        for k, (name, path) in enumerate(zip(library.names, library.paths)):
            file = folder / f"{name}-{adapter_key(path)}.jsonl"
            cached = {}
            if file.is_file():
                for line in file.read_text(encoding="utf-8").splitlines():
                    try:
                        row = json.loads(line)
                        cached[(row["id"], row["prompt_sha"])] = row
                    except (ValueError, KeyError):
                        continue  # a line cut by a kill: recomputed
            missing = [i for i, t in enumerate(items) if (t.record.id, prompts[i]) not in cached]
            if missing:
                state.forced = k
                scores = letter_logprobs(model, fmt, [items[i] for i in missing], batch_size)
                rows = [{"id": items[i].record.id, "prompt_sha": prompts[i], "pred": max(s, key=s.get),
                         "logprobs": {l: round(v, 6) for l, v in s.items()}} for i, s in zip(missing, scores)]
                cached.update(((row["id"], row["prompt_sha"]), row) for row in rows)
                if processes().is_main:  # the other processes computed the same rows
                    with open(file, "a", encoding="utf-8") as fh:
                        fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            counters["computed"] += len(missing)
            counters["reused"] += len(items) - len(missing)
            for i, t in enumerate(items):
                table[i][k] = cached[(t.record.id, prompts[i])]
    finally:
        state.forced = previous
    return table
