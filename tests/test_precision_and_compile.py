"""Mixed precision (fp32 adapter weights, half-precision compute) and compiled decoder layers."""

from __future__ import annotations

import pytest
import torch

from medpeft.adapters import apply_method, preset_config, set_routing
from medpeft.config import load_config
from medpeft.dataset import load_train_set
from medpeft.errors import ConfigError
from medpeft.models import LoadedModel, load_model, tiny_config
from medpeft.precision import autocast_for, half_precision_adapters
from medpeft.train import (accumulate_gradients, answer_loss_sum, compile_decoder_layers, compile_fallback,
                           compile_wanted, train, uncompile)
from test_birg import randomize_B, train_batch


def _step_grads(model, method, batches):
    """Loss and gradients of one optimizer step (two micro-batches) through the training path;
    the family's training state (expert queues, which the step pushes to) is put back after."""
    from medpeft.adapters import family_of

    state = {k: v.clone() for k, v in family_of(method).training_state(model).items()}
    total = float(accumulate_gradients(model, method, batches, batch_size=4).objective)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    family_of(method).load_training_state(model, state)
    return total, grads


def test_compiled_topk_mask_equals_eager_topk():
    """Under torch.compile the gate's top-k mask is built from pairwise ranks (fused, no sort
    kernel): same mask as eager topk + scatter; ties go to the lower index."""
    import torch._dynamo

    from medpeft.adapters.routing import topk_mask

    torch._dynamo.reset()
    compiled = torch.compile(topk_mask, backend="inductor", fullgraph=True)
    p = torch.softmax(torch.randn(64, 16), dim=-1)
    for k in (1, 4, 16):
        assert torch.equal(compiled(p, k), topk_mask(p, k))
        assert torch.equal(compiled(p, k).sum(-1), torch.full((64,), float(k)))
    tied = torch.tensor([[0.1, 0.3, 0.3, 0.3], [0.25, 0.25, 0.25, 0.25]])
    assert compiled(tied, 2).tolist() == [[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]


def test_compiled_small_matmul_equals_the_library_product_with_gradients():
    """The gate's few-row products become fused reductions when compiled: same values and gradients."""
    import torch._dynamo

    from medpeft.adapters.routing import small_matmul

    torch._dynamo.reset()
    torch.manual_seed(0)
    a, b, bias = torch.randn(4, 64, requires_grad=True), torch.randn(64, 17, requires_grad=True), torch.randn(17)
    bias.requires_grad_(True)
    compiled = torch.compile(small_matmul, backend="inductor", fullgraph=True)
    for args in ((a, b, bias), (a, b)):
        got = compiled(*args)
        want = torch.addmm(bias, a, b) if len(args) == 3 else a @ b
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(got.square().sum(), args)
        for g, w in zip(grads, torch.autograd.grad(want.square().sum(), args)):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", ["birg", "sparsedoctor"])
def test_compiled_layers_match_eager_and_all_but_the_first_share_one_graph(preset):
    """Regional compilation of a 4-layer model with BiRG (gates, all four losses) and SparseDoctor
    (top-k router, contrastive term, expert queue): same loss and gradients as eager, and the
    routing state adds no per-layer guards (layers 2-4 reuse layer 2's graph)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import Qwen3ForCausalLM

    loaded = load_model("tiny", device="cpu")
    config = tiny_config(len(loaded.tokenizer))
    config.num_hidden_layers = 4
    config.layer_types = ["full_attention"] * 4
    torch.manual_seed(0)
    base = Qwen3ForCausalLM(config)
    method = preset_config(preset)
    method.dropout = 0.0
    torch.manual_seed(0)
    model = apply_method(base, method)
    randomize_B(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B") and not p.any():  # mixture experts: B != 0 so every term has gradients
                p.normal_(0, 0.1)
    for module in model.modules():  # fill the expert queues, so the compiled step reads real entries
        if getattr(module, "queue", None) is not None:
            module.queue.push(torch.nn.functional.normalize(torch.randn(6, module.queue.items.shape[1]), dim=-1),
                              torch.arange(6) % 4)
    model.train()
    batches = [train_batch(loaded, n=2), train_batch(loaded, n=2, answer_shift=1)]
    eager_loss, eager_grads = _step_grads(model, method, batches)

    torch._dynamo.reset()
    counters.clear()
    layers = compile_decoder_layers(model)
    assert len(layers) == 4
    compiled_loss, compiled_grads = _step_grads(model, method, batches)
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    for name, g in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # layer 1 (input without grad) + one graph for layers 2-4; per-layer routing state would give 4+
    assert counters["stats"]["unique_graphs"] == 2
    assert not counters["graph_break"]
    uncompile(layers)
    assert all(layer._compiled_call_impl is None for layer in layers)


@pytest.mark.slow  # its own CI tier (pytest -m slow): the default suite must stay under 15 min
def test_train_with_compile_equals_eager_training(tmp_path):
    from safetensors.torch import load_file

    def run(name, setting):
        cfg = load_config("quickstart", [f"output_dir={tmp_path / name}", "methods=[]", "train.steps=2",
                                         "train.save_every=0", "method.dropout=0.0", "data.max_length=256",
                                         f"train.compile={setting}"])
        summary = train(cfg, load_model("tiny", device="cpu"), load_train_set(cfg)).summary
        return summary, load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))

    eager_summary, eager = run("eager", "false")
    compiled_summary, compiled = run("compiled", "true")
    assert (eager_summary["compiled"], compiled_summary["compiled"]) == (False, True)
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-4, atol=1e-6)


def test_auto_compile_falls_back_to_eager_when_a_layer_cannot_compile():
    import torch._dynamo
    from torch._dynamo import config as dynamo_config

    def broken_backend(gm, example_inputs):
        raise RuntimeError("this backend cannot compile anything")

    loaded = load_model("tiny", device="cpu")
    batch = train_batch(loaded, n=2)
    with torch.no_grad():
        expected = answer_loss_sum(loaded.model, batch)
    torch._dynamo.reset()
    layers = compile_decoder_layers(loaded.model, backend=broken_backend)
    with pytest.raises(Exception, match="cannot compile anything"), torch.no_grad():
        answer_loss_sum(loaded.model, batch)  # train.compile: true surfaces the failure
    uncompile(layers)
    torch._dynamo.reset()
    layers = compile_decoder_layers(loaded.model, backend=broken_backend)
    try:
        with compile_fallback(True), torch.no_grad():  # train.compile: auto trains on, eagerly
            torch.testing.assert_close(answer_loss_sum(loaded.model, batch), expected)
    finally:
        uncompile(layers)
        torch._dynamo.reset()
    assert not dynamo_config.suppress_errors  # scoped to the loop, not left on for the process


def test_compile_setting(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "triton" else real_find_spec(name))
    assert compile_wanted("auto", torch.device("cuda")) and not compile_wanted("auto", torch.device("cpu"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "triton" else real_find_spec(name))
    assert not compile_wanted("auto", torch.device("cuda"))  # no Triton: stay eager rather than fail
    assert compile_wanted(True, torch.device("cpu")) and not compile_wanted(False, torch.device("cuda"))
    with pytest.raises(ConfigError, match="train.compile"):
        load_config("quickstart", ["train.compile=sometimes"])


@pytest.mark.parametrize("preset", ["lora-r16", "dora-r24", "birg", "moelora"])
def test_bf16_base_keeps_fp32_adapter_weights_and_trains_them(preset):
    """A bf16 base: adapter weights stay fp32 (master weights), the forward runs in bf16 under
    autocast, its loss is close to the fp32 model's, and an optimizer step moves the fp32 weights."""
    loaded32 = load_model("tiny", device="cpu")
    loaded16 = load_model("tiny", device="cpu", dtype="bf16")
    method = preset_config(preset)
    method.dropout = 0.0
    torch.manual_seed(0)
    model32 = apply_method(loaded32.model, method)
    torch.manual_seed(0)
    model16 = apply_method(loaded16.model, method)
    model32.train(), model16.train()
    trainable = [p for p in model16.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert loaded16.model.get_input_embeddings().weight.dtype == torch.bfloat16
    with torch.no_grad():  # same adapter weights in both, B non-zero so the adapters matter
        g = torch.Generator().manual_seed(3)
        for (n32, p32), (n16, p16) in zip(
                ((n, p) for n, p in model32.named_parameters() if p.requires_grad),
                ((n, p) for n, p in model16.named_parameters() if p.requires_grad)):
            assert n32 == n16
            p32.copy_(p32 + 0.05 * torch.randn(p32.shape, generator=g))
            p16.copy_(p32)
    batch = train_batch(loaded32, n=2)
    losses = {}
    for name, m in (("fp32", model32), ("bf16", model16)):
        set_routing(m, batch.prompt_mask, batch.specialty, batch.operation)
        with autocast_for(m), half_precision_adapters(m):
            losses[name] = answer_loss_sum(m, batch) / batch.n_answer_tokens
    assert float(losses["bf16"]) == pytest.approx(float(losses["fp32"]), rel=0.05)
    peft_layers = [m for m in model16.modules() if hasattr(m, "cast_input_dtype_enabled")]
    with half_precision_adapters(model16):
        assert not any(m.cast_input_dtype_enabled for m in peft_layers)
    assert all(m.cast_input_dtype_enabled for m in peft_layers)  # restored: the model works without autocast too
    with torch.no_grad():
        plain = answer_loss_sum(model16, batch) / batch.n_answer_tokens
    assert float(plain) == pytest.approx(float(losses["bf16"]), rel=0.05)
    losses["bf16"].backward()
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    opt.step()
    assert all(p.dtype == torch.float32 for p in trainable)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainable))


def test_fp16_training_is_refused_with_a_clear_error(tmp_path):
    cfg = load_config("quickstart", [f"output_dir={tmp_path}", "train.steps=1"])
    loaded = load_model("tiny", device="cpu", dtype="fp16")
    with pytest.raises(ConfigError, match="loss scaling"):
        train(cfg, LoadedModel(loaded.model, loaded.tokenizer, "tiny", torch.device("cpu")), load_train_set(cfg))


@pytest.mark.parametrize("preset", ["birg", "lora-r16"])
def test_compiled_static_cache_decoding_gives_the_same_tokens(preset):
    """eval.compile_decode: static KV cache + compiled decoding step (forced on for CPU) decodes
    the same tokens as the default dynamic cache -- BiRG (gates held from the prefill) and peft
    LoRA -- over batches of different widths that reuse one cache."""
    import torch._dynamo

    from medpeft.evaluate import Evaluator

    loaded = load_model("tiny", device="cpu")
    torch.manual_seed(0)
    model = apply_method(loaded.model, preset_config(preset))
    randomize_B(model)
    model.eval()
    items = load_train_set(load_config("quickstart"))[:6]
    eager = Evaluator(model, loaded.tokenizer, batch_size=3, max_new_tokens=5, max_length=512)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    static = Evaluator(model, loaded.tokenizer, batch_size=3, max_new_tokens=5, max_length=512, compile_decode=True)
    batches = list(eager._batches(items))
    assert len({len(seqs[-1]) for _, seqs in batches}) == 2  # two prompt widths
    for idx, seqs in batches:
        batch_items = [items[i] for i in idx]
        assert static._generate(seqs, batch_items, 5) == eager._generate(seqs, batch_items, 5)
    assert len(static._static_caches) == 1  # both batches decoded into the same cache
    assert counters["stats"]["unique_graphs"] >= 1  # the decoding step did run compiled
