"""Answer-only supervised fine-tuning under a matched budget, resumable and atomic.

Budget knobs: ``steps`` optimizer steps of ``batch_size`` examples each (gradient
accumulation over ``micro_batch_size``), ``lr`` with ``warmup_steps`` and a schedule,
``max_length``, ``seed``.

Data order is a pure function of (seed, step): epoch ``e`` is ``randperm(N)`` drawn from
``seed + e``, and step ``s`` takes examples ``[s*B, (s+1)*B)`` of the epoch stream. So a
resumed run needs only the step number, the trainable weights, the optimizer, scheduler
and RNG states -- all in each checkpoint -- to continue exactly as if never stopped. The
RNG (dropout) is re-seeded per micro-batch from (seed, step, micro-batch).

Several processes (``torchrun`` / ``accelerate launch``): every rank builds the same step
and micro-batches; micro-batch ``i`` runs on rank ``i mod world``; the gradients are summed
over ranks once per step (or reduce-scattered by FSDP2). Per-step losses and the trained
adapter equal the one-process run's whatever the number of processes (docs/training.md).

Loss: cross-entropy on the answer tokens only, normalised by the number of answer
tokens in the whole optimizer step (so the micro-batch split does not change the
update). Logits are computed only at answer positions: the decoder's hidden states are
gathered there before the LM head, so no full-vocabulary logits over the prompt exist.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.utils import send_to_device

from .adapters import apply_method, family_of, save_trained, set_routing
from .config import RunConfig, TrainConfig, dump_config
from .dataset import TaggedRecord
from .distributed import Processes, processes
from .errors import ConfigError, MedpeftError
from .io import atomic_dir, write_json, write_text
from .models import LoadedModel
from .precision import autocast_for, base_dtype, half_precision_adapters
from .prompts import EncodedExample, PromptFormatter

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class TrainResult:
    model: torch.nn.Module  # the trained model (adapters applied), in train mode
    summary: dict  # what summary.json holds


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T], right-padded
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE outside the answer
    prompt_mask: torch.Tensor  # [B, T] bool, prompt tokens only (what routed gates may read)
    specialty: torch.Tensor  # [B] tag ids, for routed adapters
    operation: torch.Tensor  # [B]
    n_answer_tokens: int
    n_tokens: int

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     self.prompt_mask.to(device), self.specialty.to(device), self.operation.to(device),
                     self.n_answer_tokens, self.n_tokens)


def collate(examples: list[EncodedExample], tags: list, pad_id: int) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    prompt = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        prompt[i, :e.prompt_len] = True
        labels[i, e.prompt_len:n] = ids[i, e.prompt_len:n]
    return Batch(ids, mask, labels, prompt,
                 torch.tensor([t.specialty_id for t in tags]), torch.tensor([t.operation_id for t in tags]),
                 int((labels != IGNORE).sum()), int(mask.sum()))


def causal_lm_of(model: torch.nn.Module) -> torch.nn.Module:
    """The ``*ForCausalLM`` inside a ``peft`` wrapper (adapters are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_loss_sum(model: torch.nn.Module, batch: Batch, full_forward: bool = False) -> torch.Tensor:
    """Sum of token cross-entropies over answer tokens.

    ``L = sum_{t in answer} -log p(x_t | x_<t)``; hidden states are gathered at the
    positions that predict answer tokens and only those go through the LM head.
    ``full_forward``: through the model's own forward (full logits), as FSDP2 needs its root
    module's forward to run.
    """
    lm = causal_lm_of(model)
    targets_mask = batch.labels[:, 1:] != IGNORE  # position t predicts token t+1
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if softcap or full_forward or not hasattr(lm, "get_decoder"):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits[:, :-1]
        picked = logits[targets_mask]
    else:
        hidden = lm.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  use_cache=False).last_hidden_state
        picked = lm.get_output_embeddings()(hidden[:, :-1][targets_mask])
    targets = batch.labels[:, 1:][targets_mask]
    return torch.nn.functional.cross_entropy(picked.float(), targets, reduction="sum")


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def weighted_epoch(groups: list[list[int]], weights: list[float], seed: int, epoch: int) -> list[int]:
    """One epoch of a training set mixed from sources with sampling weights.

    (By hand rather than ``datasets.interleave_datasets``: its probabilities draw a stream
    whose epoch length and per-source counts vary, and the data order here must be a pure
    function of (seed, step) for exact resumes and any number of processes.)

    Source ``s`` (example indices ``groups[s]``, weight ``w_s``) contributes
    ``floor(w_s)`` copies of every example plus a seeded ``round(frac(w_s) * |s|)`` of them,
    drawn afresh each epoch; the pool is then shuffled. Every epoch has the same length, so
    the stream stays a function of (seed, step), and source ``s`` makes up
    ``w_s |s| / sum_t w_t |t|`` of it (up to the rounding).
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 500_000_017)
    pool: list[int] = []
    for items, weight in zip(groups, weights):
        whole = int(weight)
        pool += items * whole
        extra = round((weight - whole) * len(items))
        if extra:
            pool += [items[i] for i in torch.randperm(len(items), generator=g)[:extra].tolist()]
    return [pool[i] for i in torch.randperm(len(pool), generator=g).tolist()]


def step_indices(n: int, batch_size: int, seed: int, step: int, epoch_fn: Callable[[int], list[int]] | None = None
                 ) -> list[int]:
    """Example indices of optimizer step ``step`` (0-based) in the seeded epoch stream
    (``epoch_fn(e)``: epoch ``e``'s order, of length ``n``; default a permutation of ``n``)."""
    epoch_fn = epoch_fn or (lambda e: epoch_order(n, seed, e))
    out: list[int] = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        order = epoch_fn(epoch)
        out.extend(order[offset: offset + batch_size - len(out)])
    return out


def epoch_stream(cfg: RunConfig, train_set: list) -> tuple[int, Callable[[int], list[int]] | None]:
    """The epoch length and order function of ``cfg``'s training set: a plain permutation, or
    :func:`weighted_epoch` when a source has a sampling ``weight`` other than 1."""
    weights = {src.display_name: src.weight for src in cfg.data.train}
    if all(w == 1 for w in weights.values()):
        return len(train_set), None
    names = list(dict.fromkeys(t.set_name for t in train_set))
    groups = [[i for i, t in enumerate(train_set) if t.set_name == name] for name in names]
    ws = [weights.get(name, 1.0) for name in names]
    length = len(weighted_epoch(groups, ws, cfg.train.seed, 0))
    cache: dict[int, list[int]] = {}

    def order(epoch: int) -> list[int]:
        if epoch not in cache:
            cache.clear()
            cache[epoch] = weighted_epoch(groups, ws, cfg.train.seed, epoch)
        return cache[epoch]

    return length, order


def micro_batches(indices: list[int], lengths: list[int], micro: int) -> list[list[int]]:
    """Length bucketing inside a step: sort by length, then cut into micro-batches.

    It reduces padding without changing the update, because the step's loss is the
    same sum whatever the split.
    """
    ordered = sorted(indices, key=lambda i: lengths[i])
    return [ordered[i:i + micro] for i in range(0, len(ordered), micro)]


def compile_wanted(setting, device: torch.device) -> bool:
    """``train.compile``: true, false, or ``auto`` (on for CUDA devices where Triton, which
    compiled GPU kernels need, is installed)."""
    if setting == "auto":
        import importlib.util

        return device.type == "cuda" and importlib.util.find_spec("triton") is not None
    return bool(setting)


def compile_decoder_layers(model: torch.nn.Module, mode: str | None = None,
                           backend="inductor") -> list[torch.nn.Module]:
    """Regional compilation: ``torch.compile`` each decoder layer in place, as torchtune does.

    The decoder layers are identical modules, so all after the first (whose input does not
    require grad) share one compiled graph; adapters, routing gates and their auxiliary
    terms are fused with the layer (docs/performance.md). The rest of the step (embedding,
    loss, optimizer) stays eager. Returns the compiled layers (see :func:`uncompile`).
    """
    decoder = causal_lm_of(model).get_decoder() if hasattr(causal_lm_of(model), "get_decoder") else None
    layers = list(getattr(decoder, "layers", []))
    if not layers:
        log.warning("train.compile: no decoder layers found in %s; training uncompiled", type(model).__name__)
    from torch._dynamo import config as dynamo_config

    # Each method (and Med-MoE-LoRA's per-depth expert counts) adds graphs of the same layer
    # code; past the default limit of 8 dynamo would silently fall back to eager.
    dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)
    for layer in layers:
        layer.compile(mode=mode, backend=backend)
    return layers


def compile_fallback(enabled: bool):
    """Inside (if ``enabled``): a layer that fails to compile runs eagerly with a warning instead
    of stopping training -- what ``train.compile: auto`` asks for. Compilation happens at the
    first call (and at recompiles), so this must span the training loop."""
    from torch._dynamo import config as dynamo_config

    return dynamo_config.patch(suppress_errors=enabled)


def uncompile(layers: list[torch.nn.Module]) -> None:
    """Undo :func:`compile_decoder_layers` (evaluation decodes with a KV cache: other shapes, eager)."""
    for layer in layers:
        layer._compiled_call_impl = None  # what nn.Module.compile() set; torch has no public undo


# ----------------------------------------------------------------------------- checkpoints

CKPT_DIR = "checkpoints"
TRAINING_STATE = "training_state.safetensors"  # a family's extra state (MethodFamily.training_state)
LEGACY_TRAINING_STATE = "buffers.safetensors"  # its name before the method registry (same tensor names)
OPTIMIZER_STATE = "optimizer.safetensors"  # optimizer and RNG tensors; the rest of their state is in state.json
# What a step does, in checkpoints: 2 = RNG re-seeded per micro-batch and the family's step
# updates (expert queues) applied once per step; 1 (unrecorded) = the RNG ran on and queues
# were pushed after each micro-batch. A resume across versions would mix two procedures.
STEP_VERSION = 2


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders whose ``state.json`` (written last) exists, oldest first."""
    root = run_dir / CKPT_DIR
    return sorted(p for p in root.glob("step-*") if (p / "state.json").exists()) if root.exists() else []


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def split_tensors(obj, tensors: dict[str, torch.Tensor], prefix: str = "t"):
    """``obj`` (nested dicts, lists, tuples, tensors, numbers, strings) as a JSON-able skeleton
    whose tensors are moved into ``tensors`` under generated keys: the optimizer, scheduler
    and RNG states are stored as safetensors + JSON, so resuming never unpickles anything."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().contiguous().cpu()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, split_tensors(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [split_tensors(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [split_tensors(v, tensors, prefix) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def join_tensors(skeleton, tensors: dict[str, torch.Tensor]):
    """Inverse of :func:`split_tensors`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__tuple__" in skeleton:
            return tuple(join_tensors(v, tensors) for v in skeleton["__tuple__"])
        return {k: join_tensors(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [join_tensors(v, tensors) for v in skeleton]
    return skeleton


def _check_counters(meta: Any, steps: int | None) -> None:
    """``state.json``'s counters: a step inside the run and non-negative counts."""
    if not isinstance(meta, dict):
        raise ValueError("expected a JSON object")
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1 or (steps is not None and step >= steps):
        raise ValueError(f"field 'step': {step!r} is not a step inside this run (1..{(steps or 0) - 1})")
    for key, kind in (("tokens", int), ("answer_tokens", int), ("elapsed_s", (int, float))):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, kind) or value < 0:
            raise ValueError(f"field '{key}': {value!r} is not a non-negative number")
    if not isinstance(meta.get("state"), dict):
        raise ValueError("field 'state': missing")


def training_data_hash(train_set: list, encoded: list) -> str:
    """SHA-256 of the training examples as the model sees them (ids and token ids, in order):
    a resume checks that the data are the same as the interrupted run's."""
    import hashlib

    digest = hashlib.sha256()
    for item, example in zip(train_set, encoded):
        digest.update(f"{item.record.id}\t{example.prompt_len}\t".encode("utf-8", "surrogatepass"))
        digest.update(",".join(map(str, example.input_ids)).encode() + b"\n")
    return digest.hexdigest()


def gather_sharded_state(model, optimizer) -> tuple[dict, dict]:
    """Under FSDP2: the trainable weights and the optimizer state as one process holds them
    (full tensors on the main process; every rank must call this). The optimizer state is
    turned from ``torch.distributed.checkpoint``'s by-name form into ``optimizer.state_dict()``'s
    by-index form, so a checkpoint is the same whatever wrote it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    full = get_model_state_dict(model, options=options)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if "param_groups" not in by_name:  # cpu_offload: the full state is on the main process only
        return {}, {}
    index = {n: i for i, n in enumerate(names)}
    weights = {n: full[n] for n in names if n in full}
    state = {"state": {index[n]: v for n, v in by_name.get("state", {}).items()},
             "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}
    return weights, state


def load_sharded_state(model, optimizer, weights: dict, optimizer_state: dict) -> None:
    """Under FSDP2: load one-process-form weights and optimizer state (every rank read the same
    checkpoint) into the sharded model and optimizer."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    by_name = {"state": {names[int(i)]: v for i, v in optimizer_state["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                for g in optimizer_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def save_checkpoint(run_dir: Path, step: int, model, method, optimizer, scheduler, stats: dict,
                    gathered: tuple[dict, dict] | None = None) -> None:
    """``checkpoints/step-N/``: trainable weights, the method's training state, and the optimizer,
    scheduler and RNG states -- safetensors and JSON only (no pickle); ``state.json`` last.
    ``gathered``: the weights and optimizer state of a sharded model (:func:`gather_sharded_state`)."""
    from safetensors.torch import save_file

    family = family_of(method)
    final = run_dir / CKPT_DIR / f"step-{step:07d}"
    weights, optimizer_state = gathered if gathered is not None else (
        {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, optimizer.state_dict())
    with atomic_dir(final) as tmp:
        save_file({n: t.contiguous().cpu() for n, t in weights.items()}, str(tmp / "trainable.safetensors"))
        extra = {n: t.detach().contiguous().cpu() for n, t in family.training_state(model).items()}
        if extra:  # e.g. SparseDoctor's expert memory queues: part of the training state
            save_file(extra, str(tmp / TRAINING_STATE))
        tensors: dict[str, torch.Tensor] = {}
        skeleton = split_tensors({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                                  "rng_cpu": torch.get_rng_state(),
                                  "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                                 tensors)
        save_file(tensors, str(tmp / OPTIMIZER_STATE))
        write_json(tmp / "state.json", {"step": step, **stats, "state": skeleton})  # last: marks the folder complete
    for old in (run_dir / CKPT_DIR).glob("step-*"):  # keep only the newest
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt: Path, model, method, optimizer, scheduler, steps: int | None = None,
                    sharded: bool = False) -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint`; a missing, truncated or foreign
    file is one line naming it (a pickled ``state.pt`` of an older medpeft is refused).
    ``sharded``: ``model`` is sharded with FSDP2 (every rank loads the same files)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file


    if (ckpt / "state.pt").exists() and not (ckpt / OPTIMIZER_STATE).exists():
        raise MedpeftError(f"{ckpt / 'state.pt'}: a pickled checkpoint (older medpeft) is not loaded, since "
                           "unpickling can run code; train again without --resume")
    device = next(model.parameters()).device
    current = ckpt / "state.json"
    try:
        meta = json.loads(current.read_text(encoding="utf-8"))
        _check_counters(meta, steps)
        current = ckpt / "trainable.safetensors"
        weights = load_file(str(current), device=str(device))
        params = dict(model.named_parameters())
        bad = sorted(set(weights) ^ {n for n, p in params.items() if p.requires_grad})
        bad += sorted(n for n in weights if n in params and weights[n].shape != params[n].shape)
        if bad:
            raise ValueError(f"its tensors do not fit this model ({', '.join(bad[:3])})")
        if not sharded:
            with torch.no_grad():
                for name, value in weights.items():
                    params[name].copy_(value)
        current = next((p for p in (ckpt / TRAINING_STATE, ckpt / LEGACY_TRAINING_STATE) if p.exists()), ckpt)
        family_of(method).load_training_state(model, load_file(str(current), device=str(device))
                                              if current != ckpt else {})
        current = ckpt / OPTIMIZER_STATE
        state = join_tensors(meta["state"], load_file(str(current), device="cpu"))
        current = ckpt / "state.json"
        if sharded:
            load_sharded_state(model, optimizer, weights, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError, SafetensorError,
            UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MedpeftError(f"{current}: cannot resume from this checkpoint: {first}") from None
    if state.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return {k: v for k, v in meta.items() if k != "state"}


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from (they will be re-logged)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut by a kill
            break
    write_text(path, "".join(l + "\n" for l in keep))


# ----------------------------------------------------------------------------- the loop

def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total}


def build_optimizer(model: torch.nn.Module, tc: TrainConfig):
    """AdamW over the trainable parameters (the fused kernel on CUDA) and the LR schedule."""
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.is_cuda and p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=fused or None)
    scheduler = get_scheduler(tc.lr_schedule if tc.lr_schedule != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=tc.warmup_steps, num_training_steps=tc.steps)
    return optimizer, scheduler


class _NoWriter(contextlib.nullcontext):
    """The metrics file and TensorBoard writer of a process that does not write."""

    def __enter__(self):
        return self

    def write(self, *_):
        pass

    def flush(self):
        pass

    def add_scalar(self, *_):
        pass

    def close(self):
        pass


@dataclass
class StepResult:
    """One optimizer step's numbers, kept on the device (read back only when logged)."""

    loss: torch.Tensor  # the answer loss (mean over the step's answer tokens)
    objective: torch.Tensor  # what was differentiated: loss + sum_k weight_k * aux_k
    aux: dict[str, torch.Tensor]  # each auxiliary term, as a mean over the step
    aux_weights: dict[str, float]  # the weight each term had in the objective
    tokens: int
    answer_tokens: int
    grad_norm: torch.Tensor | None = None


def micro_batch_seed(seed: int, step: int, micro: int) -> int:
    """The RNG seed of micro-batch ``micro`` of step ``step`` (dropout, noisy gates): a function of
    (seed, step, micro-batch) only, so it does not depend on which process runs it."""
    return (seed * 1_000_003 + step) * 1_009 + micro + 1


def accumulate_gradients(model: torch.nn.Module, method, batches: list[Batch], batch_size: int,
                         proc: Processes | None = None, seed_of=None) -> StepResult:
    """Forward, losses, backward and the family's step updates over a step's micro-batches.

    ``objective = sum_micro [ L_ans(micro) / n_answer + sum_k w_k s_k L_k(micro) ]`` where
    ``s_k`` is the micro-batch's share of the step's examples for a batch statistic and 1 for
    a term of the weights only (computed on the first micro-batch). So ``aux[k]`` is the
    share-weighted mean of term k over the step and ``objective = loss + sum_k w_k aux[k]``.

    With several processes (``proc``), micro-batch ``i`` runs on rank ``i mod world``; the
    micro-batches themselves are the one-process ones (a function of seed, step and
    ``micro_batch_size`` only), so every batch statistic is computed over the same examples
    as in one process, and summing the ranks' gradients (:func:`reduce_step`) gives the
    one-process gradient of the step. ``seed_of(i)``: the RNG seed of micro-batch ``i``
    (:func:`micro_batch_seed`; None: the RNG runs on).
    """
    proc = proc or processes()
    family = family_of(method)
    weights = family.loss_weights(method)
    # the compute device (FSDP2 with CPU offload keeps the sharded weights in CPU memory)
    device = proc.device if proc.fsdp and proc.device is not None else next(model.parameters()).device
    n_answer = sum(b.n_answer_tokens for b in batches)  # every rank builds every micro-batch: known locally
    loss_value = torch.zeros((), device=device)
    objective = torch.zeros((), device=device)
    aux_values: dict[str, torch.Tensor] = {}
    updates: list[tuple[int, object]] = []
    mine = proc.shard(len(batches))
    # FSDP2 gathers parameters in every forward: every rank runs as many as the busiest one
    # (a rank short of micro-batches repeats one with the loss scaled by 0)
    rounds = -(-len(batches) // proc.world) if proc.fsdp else len(mine)
    for r in range(rounds):
        i, dummy = (mine[r], False) if r < len(mine) else (mine[0] if mine else 0, True)
        b = batches[i].to(device)
        if seed_of is not None:
            torch.manual_seed(seed_of(i))
        set_routing(model, b.prompt_mask, b.specialty, b.operation, parameter_losses=i == 0 and not dummy)
        with autocast_for(model):
            answer = answer_loss_sum(model, b, full_forward=proc.fsdp) / n_answer
            terms = family.aux_losses(model, method)
        loss = answer
        share = b.input_ids.shape[0] / batch_size
        for key, value in terms.items():
            if weights.get(key, 0.0) <= 0:
                raise RuntimeError(f"method family {family.name!r} reported loss {key!r}, whose weight is "
                                   f"{weights.get(key)}; a family reports exactly its terms of non-zero weight")
            w = 1.0 if key in family.parameter_losses else share
            loss = loss + weights[key] * w * value
            if not dummy:
                aux_values[key] = aux_values.get(key, 0.0) + w * value.detach().float()
        if dummy:
            loss = loss * 0.0
        else:
            loss_value += answer.detach()
            objective += loss.detach()
        loss.backward()
        update = family.micro_batch_update(model)
        if not dummy and update is not None:
            updates.append((i, send_to_device(update, "cpu") if proc.distributed else update))
    if proc.distributed and has_step_updates(family):  # a collective only for the families that need it
        updates = [u for rank_updates in proc.gather(updates) for u in rank_updates]
    if updates:
        family.apply_step_updates(model, [u for _, u in sorted(updates, key=lambda x: x[0])])
    tokens = sum(b.n_tokens for b in batches)
    return StepResult(loss_value, objective, aux_values, {k: weights[k] for k in aux_values}, tokens, n_answer)


def has_step_updates(family) -> bool:
    """Whether ``family`` overrides :meth:`MethodFamily.micro_batch_update` (e.g. expert queues)."""
    from .adapters.registry import MethodFamily

    return type(family).micro_batch_update is not MethodFamily.micro_batch_update


def reduce_step(model: torch.nn.Module, result: StepResult, proc: Processes, weights: dict[str, float]) -> None:
    """Sum the step's gradients and numbers over the ranks, in place.

    A step-level reduction instead of DDP's per-backward one: ranks hold unequal numbers of
    micro-batches (the split is the one-process one), the loss calls the decoder past any
    wrapper's forward (hidden states are gathered before the LM head), and a routed expert
    that a rank's micro-batches did not use must neither hang nor be updated where one
    process would not update it -- so every trainable tensor is reduced once per step, with
    a flag of whether any rank gave it a gradient (AdamW skips a tensor without one).
    Under FSDP2 the sharded tensors were already reduce-scattered by FSDP itself.
    """
    if not proc.distributed:
        return
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]
    keys = sorted(k for k, w in weights.items() if w > 0)
    device = result.loss.device
    present = torch.tensor([p.grad is not None for p in params] + [k in result.aux for k in keys],
                           dtype=torch.float32, device=device)
    numbers = torch.stack([result.loss.float(), result.objective.float(),
                           *(torch.as_tensor(result.aux.get(k, 0.0), dtype=torch.float32, device=device)
                             for k in keys)])
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    proc.sum_([present, numbers, *(p.grad for p in params)])
    for p, flag in zip(params, present[:len(params)].tolist()):
        if flag == 0:
            p.grad = None
    result.loss, result.objective = numbers[0], numbers[1]
    result.aux = {k: numbers[2 + j] for j, k in enumerate(keys) if present[len(params) + j] > 0}
    result.aux_weights = {k: weights[k] for k in result.aux}


def training_step(model: torch.nn.Module, method, batches: list[Batch], optimizer, scheduler, *,
                  batch_size: int, max_grad_norm: float, proc: Processes | None = None,
                  seed_of=None) -> StepResult:
    """One optimizer step as training runs it: :func:`accumulate_gradients`, the reduction over
    processes, gradient clipping, the optimizer and scheduler steps. Used by :func:`train` and
    ``benchmarks/step_time.py``."""
    proc = proc or processes()
    result = accumulate_gradients(model, method, batches, batch_size, proc, seed_of)
    reduce_step(model, result, proc, family_of(method).loss_weights(method))
    result.grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.requires_grad], max_grad_norm if max_grad_norm > 0 else math.inf)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return result


# Config keys that change how a run is executed or logged, not what it computes: a resume
# may change them. Every other difference from the interrupted run's config is refused.
RESUMABLE_CHANGES = ("output_dir", "train.save_every", "train.log_every", "train.compile",
                     "train.gradient_checkpointing", "model.device", "eval.")


def check_processes(cfg: RunConfig) -> None:
    """What this launch's processes cannot do with ``cfg``, as a config error before anything loads."""
    proc = processes()
    if proc.fsdp:
        from .adapters.registry import MethodFamily

        if type(family_of(cfg.method)).parts is not MethodFamily.parts:
            raise ConfigError(f"config key 'method': {cfg.method.name!r} trains its parts on one shared base model, "
                              "which FSDP2 would leave sharded; train it with configs/accelerate/ddp.yaml")
    if proc.fsdp and cfg.train.compile not in (False, "auto"):
        raise ConfigError("config key 'train.compile': not combined with FSDP2 here; set it to false")
    if proc.distributed:
        n_micro = -(-cfg.train.batch_size // cfg.train.micro_batch_size)
        if n_micro < proc.world:
            log.warning("train.batch_size / train.micro_batch_size = %d micro-batches per step on %d processes: "
                        "%d process(es) idle each step; set train.micro_batch_size to %d or less", n_micro,
                        proc.world, proc.world - n_micro, max(1, cfg.train.batch_size // proc.world))


def resume_changes(cfg: RunConfig, run_dir: Path, *, force: bool = False) -> list[str]:
    """The keys in which ``cfg`` differs from the config an interrupted run in ``run_dir``
    started with (those that change its result); refused unless ``force``."""
    from .config import config_differences, load_config

    if latest_checkpoint(run_dir) is None:
        return []
    if not (run_dir / "config.yaml").exists():
        if force:
            log.warning("%s: resuming without the interrupted run's config.yaml, as --force-resume asks", run_dir)
            return ["config.yaml missing"]
        raise MedpeftError(f"{run_dir / 'config.yaml'}: missing, so the interrupted run's config cannot be checked; "
                           "restore it, or use --force-resume")
    try:
        saved = load_config(str(run_dir / "config.yaml"))
    except ConfigError as err:
        raise MedpeftError(f"{run_dir / 'config.yaml'}: {err}") from None
    differ = [k for k in config_differences(saved, cfg) if not k.startswith(RESUMABLE_CHANGES)]
    if differ and not force:
        raise MedpeftError(f"{run_dir}: the interrupted run was started with another config (it differs in "
                           f"{', '.join(differ[:6])}{', ...' if len(differ) > 6 else ''}); resuming would mix two "
                           "runs -- use the same config, another output_dir, or --force-resume")
    if differ:
        log.warning("%s: resuming with a changed config (%s), as --force-resume asks", run_dir, ", ".join(differ))
    return differ


def base_model_fields(cfg: RunConfig, loaded: LoadedModel) -> dict[str, str]:
    """What a summary records of the base model the adapter was trained on: its name and what
    identifies its weights (:func:`medpeft.models.model_revision`); evaluation refuses another."""
    from .models import model_revision

    return {"base_model": cfg.model.name, "base_model_revision": model_revision(cfg.model.name, loaded.model)}


def train(
    cfg: RunConfig,
    loaded: LoadedModel,
    train_set: list[TaggedRecord],
    *,
    resume: bool = False,
    force_resume: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``cfg.method`` on ``train_set``; write the run folder.

    ``resume``: continue from the newest checkpoint, refused when the config differs from the
    interrupted run's in a key that changes the result (``force_resume`` allows it).
    ``on_step(step)`` is called after each optimizer step (tests use it to interrupt).
    """
    if base_dtype(loaded.model) == torch.float16:
        raise ConfigError("config key 'model.dtype': training an fp16 model needs loss scaling, which medpeft "
                          "does not implement; use bf16 (mixed precision, fp32 adapter weights) or fp32")
    run_dir = Path(cfg.output_dir)
    from .io import run_lock

    with run_lock(run_dir):
        if not resume and (run_dir / "summary.json").exists():
            raise MedpeftError(f"{run_dir} already holds a finished run; choose another output_dir or pass --resume")
        changed = resume_changes(cfg, run_dir, force=force_resume) if resume else []
        return _train_locked(cfg, loaded, train_set, run_dir, resume, force_resume, changed, on_step)


def _train_locked(cfg: RunConfig, loaded: LoadedModel, train_set: list[TaggedRecord], run_dir: Path, resume: bool,
                  force_resume: bool, changed: list[str], on_step) -> TrainResult:
    family = family_of(cfg.method)
    method = family.resolve(cfg.method, run_dir)  # what is built; cfg.method is what the config says
    parts = family.parts(method, train_set)
    if parts is not None:
        return _train_parts(cfg, method, parts, loaded, run_dir, resume, force_resume)
    if not family.trains_with_loop(method):
        return _build_untrained(cfg, method, loaded, train_set, run_dir)
    tc = cfg.train
    proc = processes()
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(run_dir) if resume else None
    proc.agree(ckpt.name if ckpt else None, f"checkpoints in {run_dir}")  # before the main process changes them
    if ckpt is None and proc.is_main:  # a fresh start: no stale checkpoint of an earlier attempt may be resumed
        shutil.rmtree(run_dir / CKPT_DIR, ignore_errors=True)
        write_text(run_dir / "config.yaml", dump_config(cfg))

    torch.manual_seed(tc.seed)
    formatter = PromptFormatter(loaded.tokenizer, cfg.data.max_length)
    encoded = [formatter.encode_train(t.record) for t in train_set]
    data_hash = training_data_hash(train_set, encoded)
    proc.agree(data_hash, "training data (ids or token ids)")
    n_truncated = sum(e.truncated for e in encoded)
    if n_truncated:
        log.warning("%d of %d training examples were longer than max_length=%d and were truncated (docs/training.md)",
                    n_truncated, len(encoded), cfg.data.max_length)
    lengths = [len(e.input_ids) for e in encoded]
    pad_id = loaded.tokenizer.pad_token_id
    stream_length, epoch_fn = epoch_stream(cfg, train_set)

    model = apply_method(loaded.model, method)
    if tc.gradient_checkpointing:
        causal_lm_of(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    if proc.fsdp:
        shard_model(model, method, proc)
    # FSDP2's sharded layers are trained eagerly (compile: auto is off under FSDP2; untested with it)
    compiled = compile_decoder_layers(model) if compile_wanted(tc.compile, loaded.device) and not proc.fsdp else []
    optimizer, scheduler = build_optimizer(model, tc)
    params = count_parameters(model)

    start_step, tokens_seen, answer_tokens_seen, elapsed_before = 0, 0, 0, 0.0
    metrics_path = run_dir / "metrics.jsonl"
    if ckpt is not None:
        try:
            state = load_checkpoint(ckpt, model, cfg.method, optimizer, scheduler, steps=tc.steps, sharded=proc.fsdp)
        except MedpeftError as err:
            older = [p for p in complete_checkpoints(run_dir) if p != ckpt]
            hint = f"; an older checkpoint exists: remove {ckpt} to resume from {older[-1].name}" if older else ""
            raise MedpeftError(f"{err}{hint}") from None
        if state.get("train_data") != data_hash:
            if not force_resume:
                raise MedpeftError(f"{ckpt / 'state.json'}: the training data differ from the interrupted run's "
                                   "(another file, subset or tokenizer); resuming would mix two runs -- use "
                                   "--force-resume to continue anyway")
            changed = [*changed, "training data"]
        if state.get("step_version", 1) != STEP_VERSION:
            if not force_resume:
                raise MedpeftError(f"{ckpt / 'state.json'}: written by an older medpeft whose training step differed "
                                   "(its RNG and the methods' step updates, docs/training.md); resuming would mix two "
                                   "procedures -- train again, or use --force-resume to continue anyway")
            changed = [*changed, "training step version"]
        start_step, tokens_seen = state["step"], state["tokens"]
        answer_tokens_seen, elapsed_before = state["answer_tokens"], state["elapsed_s"]
        if proc.is_main:
            _truncate_metrics(metrics_path, start_step)
            write_text(run_dir / "config.yaml", dump_config(cfg))  # only once the checkpoint has loaded
        log.info("resuming %s from step %d", run_dir, start_step)
    elif metrics_path.exists() and proc.is_main:
        metrics_path.unlink()

    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    # logs, TensorBoard and progress on the main process only
    writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None) \
        if proc.is_main else _NoWriter()
    t0 = time.perf_counter()
    progress = tqdm(total=tc.steps, initial=start_step, desc=f"train {cfg.method.name}", unit="step", leave=False,
                    disable=not proc.is_main)
    with (open(metrics_path, "a", encoding="utf-8") if proc.is_main else _NoWriter()) as metrics, \
            half_precision_adapters(model), compile_fallback(tc.compile == "auto"), contextlib.closing(progress), \
            contextlib.closing(writer):
        for step in range(start_step, tc.steps):
            indices = step_indices(stream_length, tc.batch_size, tc.seed, step, epoch_fn)
            chunks = micro_batches(indices, lengths, tc.micro_batch_size)
            batches = [collate([encoded[i] for i in c], [train_set[i].tags for i in c], pad_id) for c in chunks]
            result = training_step(model, cfg.method, batches, optimizer, scheduler, batch_size=tc.batch_size,
                                   max_grad_norm=tc.max_grad_norm, proc=proc,
                                   seed_of=lambda i, step=step: micro_batch_seed(tc.seed, step, i))
            tokens_seen += result.tokens
            answer_tokens_seen += result.answer_tokens
            done = step + 1
            progress.update(1)
            if done % tc.log_every == 0 or done == tc.steps or done == 1:
                if not bool(torch.isfinite(result.objective)):  # NaN/inf weights make every later number meaningless
                    raise MedpeftError(f"{run_dir}: the training loss is {float(result.objective)} at step {done}; "
                                       "the run diverged (lower train.lr or raise train.warmup_steps); the last "
                                       "checkpoint, if any, is kept")
                aux = sorted(result.aux)
                row = {"step": done, "loss": float(result.loss), "objective": float(result.objective),
                       "lr": scheduler.get_last_lr()[0], "grad_norm": float(result.grad_norm), "tokens": tokens_seen,
                       "elapsed_s": elapsed_before + time.perf_counter() - t0,
                       **{f"aux_{k}": float(result.aux[k]) for k in aux},
                       "aux_weights": {k: result.aux_weights[k] for k in aux}}
                progress.set_postfix(loss=f"{row['loss']:.3f}")
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                for key in ("loss", "objective", "lr", "grad_norm", *(f"aux_{k}" for k in aux)):
                    writer.add_scalar(f"train/{key}", row[key], done)
            if tc.save_every and done % tc.save_every == 0 and done < tc.steps:
                gathered = gather_sharded_state(model, optimizer) if proc.fsdp else None  # every rank
                if proc.is_main:  # every rank holds the same weights, optimizer and training state
                    save_checkpoint(run_dir, done, model, cfg.method, optimizer, scheduler,
                                    {"tokens": tokens_seen, "answer_tokens": answer_tokens_seen,
                                     "train_data": data_hash, "elapsed_s": elapsed_before + time.perf_counter() - t0,
                                     "processes": proc.world, "step_version": STEP_VERSION}, gathered=gathered)
                proc.barrier()
            if on_step is not None:
                on_step(done)
    loop_time = elapsed_before + time.perf_counter() - t0
    uncompile(compiled)

    if proc.fsdp:
        model = unsharded_copy(model, cfg, method, proc)  # full tensors, on the main process only
    if proc.is_main:
        save_trained(model, cfg.method, run_dir, built=method)
    summary = {
        "method": cfg.method.name, **base_model_fields(cfg, loaded), **params,
        "loss_weights": {k: w for k, w in family_of(cfg.method).loss_weights(cfg.method).items() if w > 0},
        "steps": tc.steps, "batch_size": tc.batch_size, "train_examples": len(encoded),
        "truncated_prompts": n_truncated, "tokens": tokens_seen, "answer_tokens": answer_tokens_seen,
        "train_time_s": round(loop_time, 3),  # the training loop, without the final save
        "resumed_from_step": start_step or None, "resumed_with_changes": changed or None,
        "device": str(loaded.device), "compiled": bool(compiled), "processes": proc.world,
    }
    if proc.is_main:
        write_json(run_dir / "summary.json", summary)
        shutil.rmtree(run_dir / CKPT_DIR, ignore_errors=True)  # the adapter supersedes them
    proc.barrier()  # the other ranks may read the adapter next (evaluation)
    return TrainResult(model, summary)


# ----------------------------------------------------------------------------- FSDP2

def shard_model(model: torch.nn.Module, method, proc: Processes) -> None:
    """Shard ``model`` with FSDP2 (``torch.distributed.fsdp.fully_shard``, what accelerate's FSDP2
    plugin applies): each decoder layer is one unit, then the whole model (the root).

    Gradients are reduce-scattered as sums (divide factor 1), the one-process gradient of the
    step. A family with auxiliary losses reads its weights after the forward pass (e.g.
    BiRG's L_orth, a mixture's expert representations), so its parameters stay gathered
    between forward and backward (``reshard_after_forward: false``, ZeRO-2-like memory).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

    if not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        raise MedpeftError(f"FSDP2 training needs a newer torch than {torch.__version__} (FSDPModule lacks "
                           "set_force_sum_reduction_for_comms); upgrade torch or train with ddp.yaml")
    reshard = bool(proc.fsdp_settings.get("reshard_after_forward", True))
    if reshard and any(w > 0 for w in family_of(method).loss_weights(method).values()):
        log.warning("FSDP2: %s reads its weights in its auxiliary losses; keeping them gathered after the forward "
                    "pass (reshard_after_forward false)", method.name)
        reshard = False
    offload = CPUOffloadPolicy() if proc.fsdp_settings.get("cpu_offload") else OffloadPolicy()
    decoder = causal_lm_of(model).get_decoder() if hasattr(causal_lm_of(model), "get_decoder") else None
    units = [*getattr(decoder, "layers", []), model]
    for unit in units:
        fully_shard(unit, reshard_after_forward=reshard, offload_policy=offload)
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo (CPU) has no pre-multiplied sum


def unsharded_copy(model: torch.nn.Module, cfg: RunConfig, method, proc: Processes) -> torch.nn.Module:
    """The trained model with full tensors, on the main process, for saving: the sharded
    model's full state (gathered by every rank: ``get_model_state_dict``) loaded into a fresh
    copy of the base model with the method applied. Other ranks get the sharded model back."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .models import load_model

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not proc.is_main:
        return model
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(base_dtype(model), "fp32")  # as trained
    fresh = apply_method(load_model(cfg.model.name, dtype=dtype, device="cpu",
                                    attn_implementation=cfg.model.attn_implementation,
                                    trust_remote_code=cfg.model.trust_remote_code).model, method)
    missing = trainable - set(full)
    if missing:
        raise RuntimeError(f"FSDP2 state dict lacks trained tensors {sorted(missing)[:3]}")
    own = dict(fresh.named_parameters())
    with torch.no_grad():
        for name in trainable:
            own[name].copy_(full[name].to(own[name].dtype))
    return fresh


PARTS_DIR = "parts"


def _train_parts(cfg: RunConfig, method, parts: list, loaded: LoadedModel, run_dir: Path, resume: bool,
                 force_resume: bool) -> TrainResult:
    """A method made of independent trainings (an adapter library): each part is its own run
    folder under ``run_dir/parts`` with the run's budget, trained one after another (finished
    parts reused and an interrupted one continued with ``resume``), then assembled."""
    import dataclasses

    from .adapters import load_trained, save_assembled
    from .config import config_differences, load_config

    root = run_dir / PARTS_DIR
    proc = processes()
    proc.barrier()
    if not resume and proc.is_main:  # a fresh start: parts of an earlier attempt must not be reused
        shutil.rmtree(root, ignore_errors=True)
    proc.barrier()  # no rank looks at the parts before they are gone
    run_dir.mkdir(parents=True, exist_ok=True)
    if proc.is_main:
        write_text(run_dir / "config.yaml", dump_config(cfg))
    summaries, run_dirs = [], {}
    for i, part in enumerate(parts):
        part_cfg = dataclasses.replace(cfg, method=part.method, methods=[], seeds=[], grid={},
                                       output_dir=str(root / part.name))
        part_dir = root / part.name
        run_dirs[part.name] = part_dir
        if (part_dir / "summary.json").exists():
            differ = [k for k in config_differences(load_config(str(part_dir / "config.yaml")), part_cfg)
                      if k != "output_dir"]
            if not differ and not force_resume:
                log.info("%s is already trained; reusing it", part_dir)
                summaries.append(json.loads((part_dir / "summary.json").read_text(encoding="utf-8")))
                continue
            proc.barrier()
            if proc.is_main:
                shutil.rmtree(part_dir)
            proc.barrier()
        log.info("training part %d/%d of %s: %s (%d items)", i + 1, len(parts), run_dir, part.name, len(part.items))
        result = train(part_cfg, loaded, part.items, resume=latest_checkpoint(part_dir) is not None,
                       force_resume=force_resume)
        family_of(part.method).remove(result.model)  # the bare base model again, for the next part
        summaries.append(result.summary)
    if proc.is_main:
        save_assembled(cfg.method, method, parts, run_dirs, run_dir)
    summary = {
        "method": cfg.method.name, **base_model_fields(cfg, loaded),
        "trainable_params": sum(s["trainable_params"] for s in summaries),
        "total_params": summaries[0]["total_params"] if summaries else 0,
        "loss_weights": {}, "steps": cfg.train.steps, "batch_size": cfg.train.batch_size,
        "train_examples": sum(s["train_examples"] for s in summaries),
        "truncated_prompts": sum(s["truncated_prompts"] for s in summaries),
        "tokens": sum(s["tokens"] for s in summaries), "answer_tokens": sum(s["answer_tokens"] for s in summaries),
        "train_time_s": round(sum(s["train_time_s"] for s in summaries), 3),
        "parts": [{"name": p.name, "train_examples": s["train_examples"], "train_time_s": s["train_time_s"],
                   **p.about} for p, s in zip(parts, summaries)],
        "device": str(loaded.device), "compiled": any(s.get("compiled") for s in summaries),
        "processes": proc.world,
    }
    if proc.is_main:
        write_json(run_dir / "summary.json", summary)
    proc.barrier()
    model = load_trained(loaded.model, run_dir, expected=cfg.method)
    return TrainResult(model, summary)


def _build_untrained(cfg: RunConfig, method, loaded: LoadedModel, train_set: list, run_dir: Path) -> TrainResult:
    """A method without the answer-loss loop: training-free (e.g. Arrow over a trained library)
    or fitted its own way (:meth:`MethodFamily.fit`, e.g. a verifier); build it, fit it, save its
    adapter folder, and write a summary of zero loop steps."""
    proc = processes()
    run_dir.mkdir(parents=True, exist_ok=True)
    if proc.is_main:
        write_text(run_dir / "config.yaml", dump_config(cfg))
    t0 = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    model = apply_method(loaded.model, method)
    params = count_parameters(model)
    fitted = family_of(method).fit(model, method, train_set, loaded.tokenizer, cfg)  # the same on every rank
    if proc.is_main:
        save_trained(model, cfg.method, run_dir, built=method)
    summary = {"method": cfg.method.name, **base_model_fields(cfg, loaded), **params,
               "loss_weights": {}, "steps": 0, "batch_size": cfg.train.batch_size,
               "train_examples": len(train_set) if fitted is not None else 0,
               "truncated_prompts": 0, "tokens": 0, "answer_tokens": 0,
               "train_time_s": round(time.perf_counter() - t0, 3), "training_free": fitted is None,
               **(fitted or {}), "device": str(loaded.device), "compiled": False, "processes": proc.world}
    if proc.is_main:
        write_json(run_dir / "summary.json", summary)
    proc.barrier()
    return TrainResult(model, summary)
