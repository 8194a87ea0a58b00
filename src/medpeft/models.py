"""Loading base models: any HF causal LM by hub id or local path, or the built-in ``tiny``.

``tiny`` is a 2-layer Qwen3-architecture model built from a config in code, with a
byte-level tokenizer built in code (no download). Its weights are a seeded random init,
so it learns only what it is trained on: it exists to run the whole pipeline in CPU
seconds, not to answer medical questions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

TINY = "tiny"
TINY_SEED = 1234

# Qwen3's chat template, reduced to what QA needs: system/user/assistant turns and the
# ``enable_thinking`` switch (off -> an empty think block, exactly as Qwen3 renders it).
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is one token.

    Any text round-trips (Chinese too, at 3 tokens a character) and option letters are
    single tokens, which is all the pipeline needs.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=TINY_SPECIAL_TOKENS[1:2] + TINY_SPECIAL_TOKENS[3:],
    )
    tok.add_special_tokens({"additional_special_tokens": TINY_SPECIAL_TOKENS})
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.model_max_length = 4096
    return tok


def tiny_config(vocab_size: int):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        tie_word_embeddings=True, rope_theta=10000.0, attn_implementation="sdpa",
        initializer_range=0.1,  # larger than the 0.02 default so logits can separate letters after short LoRA runs
    )


def build_tiny_model(vocab_size: int, seed: int = TINY_SEED):
    """The tiny Qwen3 model; the same seed gives the same weights on every call."""
    from transformers import Qwen3ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(tiny_config(vocab_size))
    model.generation_config.pad_token_id = None
    return model


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` = bf16 on GPU, fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
            "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]


def _not_loadable(name: str, err: Exception):
    from .errors import MedpeftError

    kind = "local folder" if Path(name).exists() else "hub id (or a missing local folder)"
    first = str(err).strip().splitlines()[0].rstrip(": ") if str(err).strip() else type(err).__name__
    return MedpeftError(f"model {name!r}: cannot load it as a {kind}: {first}")


def require_hub_reachable(name: str, what: str = "model") -> None:
    """A name that is neither a local path nor in the hub cache needs the hub: when the hub is
    unreachable, say so in one line at once (huggingface_hub would retry for ~30 s first)."""
    import os
    import socket
    from urllib.parse import urlparse

    if name == TINY or Path(name).exists() or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except ValueError:  # not even a valid repo id
        from .errors import MedpeftError

        raise MedpeftError(f"{what} {name!r}: cannot load it: not a local path and not a valid hub id") from None
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        from .errors import MedpeftError

        raise MedpeftError(f"{what} {name!r}: cannot load it: not a local path, not in the hub cache, and {host} cannot be "
                           "reached (offline?)") from None


def refuse_shipped_code(name: str, trust_remote_code: bool) -> None:
    """A local model folder whose configs map classes to its own Python files (``auto_map``)
    would run that code: refused unless ``model.trust_remote_code`` is on."""
    import json

    folder = Path(name)
    if trust_remote_code or not folder.is_dir():
        return
    for config in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((folder / config).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            from .errors import MedpeftError

            raise MedpeftError(f"{folder / config}: the model ships its own Python code (auto_map), which medpeft "
                               "does not run unless model.trust_remote_code is true")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    if name == TINY:
        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    refuse_shipped_code(name, trust_remote_code)
    require_hub_reachable(name)
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:  # missing folder, bad hub id, no network
        raise _not_loadable(name, err) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, *, dtype: str = "auto", device: str | torch.device | None = None,
               attn_implementation: str | None = "sdpa", trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer: ``tiny``, a hub id, or a local folder.

    ``trust_remote_code`` is passed to transformers explicitly (never its interactive
    default): a model folder that ships code is refused unless it is True.
    """
    dev = torch.device(device) if device else default_device()
    if trust_remote_code and name != TINY:
        import logging

        logging.getLogger(__name__).warning("model.trust_remote_code is on: running Python code shipped with %s",
                                            name)
    tok = load_tokenizer(name, trust_remote_code)
    if name == TINY:
        model = build_tiny_model(len(tok)).to(dtype=resolve_dtype(dtype, dev))
    else:
        from transformers import AutoModelForCausalLM

        kwargs = {"dtype": resolve_dtype(dtype, dev), "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        import pickle

        from safetensors import SafetensorError

        try:
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError, SafetensorError) as err:
            raise _not_loadable(name, err) from None
    model.to(dev)
    return LoadedModel(model, tok, name, dev)
