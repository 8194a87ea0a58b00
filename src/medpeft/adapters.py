"""Adapter methods: building, counting, saving and loading.

``lora`` and ``dora`` come from HF ``peft`` (``LoraConfig(use_dora=...)``); ``full``
trains every weight. Later method families register here with their own adapter module.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import FullMethod, LoraMethod
from .io import atomic_dir, write_json

ADAPTER_DIR = "adapter"


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


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor by name: what a checkpoint must hold to resume."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_trained(model: torch.nn.Module, method, run_dir: Path) -> Path:
    """Save the trained weights to ``run_dir/adapter`` atomically.

    lora/dora: ``peft`` format (``adapter_model.safetensors`` + ``adapter_config.json``),
    loadable with ``PeftModel.from_pretrained``. full: a ``save_pretrained`` model folder.
    """
    final = Path(run_dir) / ADAPTER_DIR
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / "medpeft_method.json", {"method": method.name})
    return final


def load_trained(base_model: torch.nn.Module, method, run_dir: Path) -> torch.nn.Module:
    """The base model with the trained adapter of ``run_dir`` applied (eval mode)."""
    path = Path(run_dir) / ADAPTER_DIR
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
