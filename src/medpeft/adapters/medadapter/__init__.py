"""``medadapter``: MedAdapter-style candidate verification over the library (Shi et al., 2024).

Every library adapter proposes its greedy answer for a question (the shared candidate pool,
pool.py); a small outcome-supervised verifier scores each distinct candidate and the best
one is the answer. MedAdapter's verifier is a small model fine-tuned to tell whether a
candidate solution is correct; here it is a logistic head on the frozen base model's
representation of "question + candidate answer" (the mean last hidden state over the answer
tokens, the base model without any adapter)::

    s(x, a) = sigmoid(w . h(x, a) + b),   answer = argmax_{a in candidates(x)} s(x, a)

fitted on the source (training) items' pooled candidates with binary cross-entropy against
"the candidate is the gold answer" (AdamW, full batch, ``verifier_steps`` steps). Ties of the
best score go to the candidate more adapters proposed, then to the earlier adapter. A
candidate set is never empty (every adapter proposes one letter). Multi-answer items get
single-letter candidates (a greedy letter per adapter), so MedAdapter scores them wrong
unless the gold is one letter; this is the candidate form of the pool, documented in
docs/methods.md. Cost: K forward passes per item (one per adapter, cached in the pool) plus
one verifier pass per distinct candidate.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...errors import ConfigError
from ...prompts import PromptFormatter
from ..library import LibraryRouterFamily, RouterMethod
from ..registry import Preset, register_family
from ..routing import routing_state, set_routing
from .pool import adapter_candidates

VERIFIER = "verifier.safetensors"
VERIFIER_ATTR = "medpeft_verifier"


@dataclass
class MedadapterMethod(RouterMethod):
    name: str = "medadapter"
    verifier_steps: int = 200
    verifier_lr: float = 0.01
    verifier_weight_decay: float = 0.01
    batch_size: int = 8  # forward passes over candidates and verifier inputs


def _candidate_record(record, letter: str):
    return dataclasses.replace(record, answer=frozenset(letter), question_type="single")


@torch.no_grad()
def verifier_features(model, fmt: PromptFormatter, items: list, letters: list[str], batch_size: int) -> torch.Tensor:
    """``h(x, a)`` [N, d]: the bare base model's mean last hidden state over the answer tokens of
    each (item, candidate letter) pair."""
    state = routing_state(model)
    previous, state.forced = state.forced, -1
    device = next(model.parameters()).device
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoded = [fmt.encode_train(_candidate_record(t.record, a)) for t, a in zip(items, letters)]
    out = []
    try:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            width = max(len(e.input_ids) for e in chunk)
            ids = torch.full((len(chunk), width), fmt.tokenizer.pad_token_id, dtype=torch.long)
            answer = torch.zeros((len(chunk), width))
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, e in enumerate(chunk):
                ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
                mask[row, :len(e.input_ids)] = 1
                answer[row, e.prompt_len:len(e.input_ids)] = 1
            ids, mask, answer = ids.to(device), mask.to(device), answer.to(device)
            set_routing(model, mask.bool(), torch.zeros(len(chunk), dtype=torch.long, device=device),
                        torch.zeros(len(chunk), dtype=torch.long, device=device))
            hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state.float()
            out.append((hidden * answer[..., None]).sum(1) / answer.sum(1, keepdim=True).clamp(min=1))
    finally:
        state.forced = previous
    return torch.cat(out) if out else torch.zeros(0, lm.config.hidden_size)


def choose(candidates: list[str], scores: dict[str, float]) -> str:
    """The best-scored candidate; ties to the one more adapters proposed, then the earliest."""
    votes = {a: candidates.count(a) for a in candidates}
    return max(dict.fromkeys(candidates), key=lambda a: (scores[a], votes[a], -candidates.index(a)))


class MedadapterFamily(LibraryRouterFamily):
    name = "medadapter"
    methods = {"medadapter": "Adapter library"}
    schema = MedadapterMethod
    router = "route"  # library layers whose adapter is forced: one candidate pass per adapter
    # routed: the audit records, per question, the adapters whose candidate was chosen (their
    # share of the vote for the chosen answer) as the "candidates" module
    presets = (Preset("medadapter", "medadapter", about="MedAdapter-style candidate verifier over the library's "
                      "greedy answers (an outcome-supervised logistic head on the base model)"),)

    def validate(self, method, prefix="method"):
        super().validate(method, prefix)
        if method.verifier_steps < 1 or method.batch_size < 1 or not method.verifier_lr > 0:
            raise ConfigError(f"config key '{prefix}.verifier_steps', '{prefix}.verifier_lr' and "
                              f"'{prefix}.batch_size' must be positive")

    def identity_at_init(self, method) -> bool:
        return True  # its forward pass is the bare base model's (candidates come from forced adapters)

    def layer_kwargs(self, method) -> dict:
        return {}

    def apply(self, model, method):
        model = super().apply(model, method)
        state = routing_state(model)
        state.forced = -1  # a plain forward pass is the base model (the verifier's features)
        hidden = model.get_input_embeddings().weight.shape[1]
        device = next(model.parameters()).device
        head = nn.Linear(hidden, 1, device=device, dtype=torch.float32)
        if device.type != "meta":
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        setattr(model, VERIFIER_ATTR, head)
        info = getattr(method, "library_info", None)
        if info is not None:
            state.predict = lambda evaluator, items, scorer, desc: self.predict(model, method, evaluator, items)
        return model

    def remove(self, model):
        if hasattr(model, VERIFIER_ATTR):
            delattr(model, VERIFIER_ATTR)
        return super().remove(model)

    # -- fitting the verifier on source candidates ------------------------------------------
    def fit(self, model, method, train_set, tokenizer, cfg):
        fmt = PromptFormatter(tokenizer, cfg.data.max_length)
        items = [t for t in train_set if t.record.question_type != "open"]
        table = adapter_candidates(model, fmt, items, method.library_info, getattr(model.config, "_name_or_path", ""),
                                   method.library_info.folder.parent, method.batch_size)
        pairs = [(t, a) for t, row in zip(items, table) for a in dict.fromkeys(c["pred"] for c in row)]
        labels = torch.tensor([float(frozenset(a) == t.record.answer) for t, a in pairs])
        feats = verifier_features(model, fmt, [t for t, _ in pairs], [a for _, a in pairs], method.batch_size)
        head = getattr(model, VERIFIER_ATTR)
        mean, std = feats.mean(0), feats.std(0).clamp(min=1e-6)
        x = (feats - mean) / std  # standardised features; folded into the head afterwards
        weight = torch.zeros(x.shape[1], requires_grad=True)
        bias = torch.zeros((), requires_grad=True)
        optimizer = torch.optim.AdamW([weight, bias], lr=method.verifier_lr, weight_decay=method.verifier_weight_decay)
        positive = labels.mean().clamp(1e-3, 1 - 1e-3)
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=(1 - positive) / positive)  # balance right and wrong candidates
        loss = torch.tensor(float("nan"))
        with torch.enable_grad():
            for _ in range(method.verifier_steps):
                optimizer.zero_grad()
                loss = loss_fn(x @ weight + bias, labels)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            head.weight.copy_((weight / std)[None].to(head.weight.device))
            head.bias.copy_((bias - (weight * mean / std).sum())[None].to(head.bias.device))
            accuracy = float((((feats @ (weight / std)) + bias - (weight * mean / std).sum() > 0).float() == labels)
                             .float().mean()) if len(labels) else 0.0
        return {"verifier": {"candidates": len(pairs), "correct_share": float(labels.mean()) if len(labels) else 0.0,
                             "final_loss": float(loss.detach()), "train_accuracy": accuracy,
                             "adapters": len(method.library_info.names)}}

    # -- predicting: pool candidates, the verifier picks ------------------------------------
    @torch.no_grad()
    def predict(self, model, method, evaluator, items):
        recording = routing_state(model).record  # the audit asks (Evaluator.recorded_batches)
        fmt = evaluator.fmt
        table = adapter_candidates(model, fmt, items, method.library_info, getattr(model.config, "_name_or_path", ""),
                                   method.library_info.folder.parent, evaluator.batch_size)
        head = getattr(model, VERIFIER_ATTR)
        out = []
        letters_of = [list(dict.fromkeys(c["pred"] for c in row)) for row in table]
        flat = [(i, a) for i, ls in enumerate(letters_of) for a in ls]
        feats = verifier_features(model, fmt, [items[i] for i, _ in flat], [a for _, a in flat], evaluator.batch_size)
        scores = (feats.to(head.weight.device) @ head.weight[0] + head.bias[0]).tolist()
        by_item: dict[int, dict[str, float]] = {}
        for (i, a), s in zip(flat, scores):
            by_item.setdefault(i, {})[a] = float(s)
        chosen = torch.zeros(len(items), 1, len(method.library_info.names))
        for i, row in enumerate(table):
            candidates = [c["pred"] for c in row]
            answer = choose(candidates, by_item[i])
            out.append((frozenset(answer), by_item[i]))
            voters = [k for k, c in enumerate(candidates) if c == answer]
            chosen[i, 0, voters] = 1.0 / len(voters)
        if recording:
            state = routing_state(model)
            state.record = True
            state.records = {"candidates": {"gates": chosen.to(next(model.parameters()).device)}}
        return out

    # -- saving: the verifier head and the library's fingerprint ----------------------------
    def save(self, model, method, folder):
        from safetensors.torch import save_file

        from ...io import write_json
        from ..library.store import fingerprint

        head = getattr(model, VERIFIER_ATTR)
        as_written = copy.copy(method)
        save_file({"weight": head.weight.detach().cpu().contiguous(), "bias": head.bias.detach().cpu().contiguous()},
                  str(Path(folder) / VERIFIER))
        info = method.library_info
        write_json(Path(folder) / "router.json", {"library": str(info.folder), "adapters": info.names,
                                                  "library_sha256": fingerprint(info),
                                                  "method": dataclasses.asdict(dataclasses.replace(as_written))})

    def load(self, base_model, method, folder):
        import json

        from safetensors.torch import load_file

        from ..library.store import fingerprint

        saved = json.loads((Path(folder) / "router.json").read_text(encoding="utf-8"))
        if saved.get("library_sha256") != fingerprint(method.library_info):
            raise ValueError(f"{Path(folder) / 'router.json'}: the library {method.library_info.folder} changed after "
                             "this router was trained on it (its weights or routes differ); train the router again")
        model = self.apply(base_model, method)
        head = getattr(model, VERIFIER_ATTR)
        weights = load_file(str(Path(folder) / VERIFIER), device=str(head.weight.device))
        if set(weights) != {"weight", "bias"} or weights["weight"].shape != head.weight.shape:
            raise ValueError(f"{Path(folder) / VERIFIER}: not this model's verifier head")
        with torch.no_grad():
            head.weight.copy_(weights["weight"])
            head.bias.copy_(weights["bias"])
        return model.eval()

    def count_active(self, model, method, trainable):
        return trainable, method.r

    def question_routing(self, records, prompt_mask):
        return {name: {"usage": rec["gates"][:, 0].float()} for name, rec in records.items()}

    def aux_losses(self, model, method):
        routing_state(model).collect()
        return {}


register_family(MedadapterFamily())
