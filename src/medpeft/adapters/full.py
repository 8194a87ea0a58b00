"""``full``: full fine-tuning, every weight trainable (the plasticity upper bound), one registration.

With a half-precision base the weights are upcast to fp32 master copies and the forward
runs under bf16 autocast, as ``transformers.Trainer(bf16=True)`` on an fp32-loaded model
(an optimizer step on bf16 weights loses updates below bf16's resolution). At 8B this needs
more memory than one GPU has; the saved model is a ``save_pretrained`` folder in fp32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..precision import COMPUTE_DTYPE_ATTR, HALF, base_dtype
from .registry import MethodFamily, Preset, register_family

log = logging.getLogger(__name__)


@dataclass
class FullMethod:
    """Full fine-tuning: every weight trainable."""

    name: str = "full"


class FullFamily(MethodFamily):
    name = "full"
    methods = {"full": "Full fine-tuning"}
    schema = FullMethod
    presets = (Preset("full", "full", about="full fine-tuning", table=True, benchmark=True),)
    trains_base_weights = True

    def apply(self, model, method):
        dtype = base_dtype(model)
        if dtype in HALF:
            log.info("full fine-tuning: %s weights upcast to fp32 master weights (compute stays %s)", dtype, dtype)
            model.to(torch.float32)
            setattr(model, COMPUTE_DTYPE_ATTR, dtype)
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def remove(self, model):
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(False)
        dtype = getattr(model, COMPUTE_DTYPE_ATTR, None)
        if dtype is not None:
            model.to(dtype)
            delattr(model, COMPUTE_DTYPE_ATTR)
        return model

    def save(self, model, method, folder: Path):
        model.save_pretrained(folder, safe_serialization=True)

    def load(self, base_model, method, folder: Path):
        from safetensors.torch import load_file

        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{folder}: no *.safetensors weights (pickled weight files are not read)")
        state = {}
        for file in files:
            state.update(load_file(file, device=str(next(base_model.parameters()).device)))
        own = base_model.state_dict()
        wrong = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
        missing = [k for k in set(own) - set(state) if "lm_head" not in k]  # tied embeddings are saved once
        unexpected = sorted(set(state) - set(own))
        if wrong or missing or unexpected:
            raise ValueError(f"{folder}: the weights do not fit the base model (missing {sorted(missing)[:3]}, "
                             f"unexpected {unexpected[:3]}, other shapes {wrong[:3]})")
        base_model.load_state_dict(state, strict=False)
        if getattr(base_model.config, "tie_word_embeddings", False):
            base_model.tie_weights()
        return base_model.eval()


register_family(FullFamily())
