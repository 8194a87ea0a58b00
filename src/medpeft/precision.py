"""Mixed precision: a half-precision base model, fp32 adapter weights, half-precision compute.

With a bf16 base model every method keeps its trainable adapter weights in fp32 (master
weights: ``peft`` does this with ``autocast_adapter_dtype=True``, our routed layers by
construction) and runs the forward pass under ``torch.autocast`` in bf16, as
``transformers.Trainer(bf16=True)`` does. ``peft``'s own habit of casting every LoRA
input to fp32 (a full-size copy of the activations per adapted module, then fp32
matrix products) is switched off, since autocast already gives the adapter matmuls
bf16 inputs with fp32 weights; updates still accumulate in fp32.

Full fine-tuning of a half-precision base keeps fp32 master copies of every weight (the
``full`` family upcasts the model and records the base's dtype as the compute dtype,
:data:`COMPUTE_DTYPE_ATTR`), so the forward still runs under bf16 autocast.

fp16 bases are not trained (fp16 needs loss scaling, which medpeft does not implement):
load the model in bf16 or fp32. Evaluation in fp16 is fine.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

HALF = (torch.bfloat16, torch.float16)
COMPUTE_DTYPE_ATTR = "medpeft_compute_dtype"  # set on a model whose weights were upcast for training


def base_dtype(model: nn.Module) -> torch.dtype:
    """The compute dtype of the base model: the dtype it was loaded in (its input embeddings'
    weights, unless the weights were upcast to fp32 master copies for training)."""
    recorded = getattr(model, COMPUTE_DTYPE_ATTR, None)
    if recorded is not None:
        return recorded
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return emb.weight.dtype if emb is not None else next(model.parameters()).dtype


def autocast_for(model: nn.Module) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in the base model's half dtype, or a no-op for an fp32 base."""
    dtype = base_dtype(model)
    if dtype not in HALF:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)


def half_precision_adapters(model: nn.Module) -> contextlib.AbstractContextManager:
    """Inside: ``peft`` layers leave their input in the base's half dtype, so that autocast (not
    an fp32 copy of the activations) chooses the adapter matmul dtype. Half bases only; the
    previous setting is restored on exit (``peft.helpers.disable_input_dtype_casting``), so
    the model also works outside autocast afterwards. Training holds this for the whole loop
    (gradient checkpointing recomputes layers in the backward pass, which must see the same
    setting as the forward pass)."""
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model, active=base_dtype(model) in HALF)
