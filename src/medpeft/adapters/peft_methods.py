"""``lora`` and ``dora`` through HF ``peft`` (``LoraConfig(use_dora=...)``); ``full`` fine-tuning."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import FullMethod, LoraMethod


def apply_method(model: torch.nn.Module, method) -> torch.nn.Module:
    """Wrap ``model`` for training with ``method``; returns the model to train."""
    if isinstance(method, FullMethod):
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if isinstance(method, LoraMethod):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,
            target_modules=list(method.target_modules), use_dora=method.name == "dora",
            bias="none", task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)
    raise TypeError(f"no adapter for method {method!r}")


def load_trained(base_model: torch.nn.Module, method, path: Path) -> torch.nn.Module:
    """The base model with the trained weights in ``path`` applied (eval mode)."""
    if isinstance(method, FullMethod):
        from safetensors.torch import load_file

        state = {}
        for file in sorted(path.glob("*.safetensors")):
            state.update(load_file(file, device=str(next(base_model.parameters()).device)))
        missing, unexpected = base_model.load_state_dict(state, strict=False)
        real_missing = [k for k in missing if "lm_head" not in k]  # tied embeddings are not saved twice
        if real_missing or unexpected:
            raise RuntimeError(f"{path}: weights do not fit the base model (missing {real_missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
        if getattr(base_model.config, "tie_word_embeddings", False):
            base_model.tie_weights()
        return base_model.eval()
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(path)).eval()
