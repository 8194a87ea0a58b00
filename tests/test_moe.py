"""LoRA mixtures of experts: equivalences, gates, schedules, losses, queue, round trips, accounting."""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo

from medpeft.adapters import apply_method, set_routing
from medpeft.adapters.accounting import count_method
from medpeft.adapters.moe import (ExpertQueue, LoraMixtureLinear, MoeMethod, expert_representations, experts_at_layer,
                                  moe_losses, supcon_from_similarities)
from medpeft.adapters.peft_lora import LoraMethod
from medpeft.adapters.routing import RoutingState
from medpeft.config import load_config
from medpeft.models import load_model
from medpeft.train import accumulate_gradients

from conftest import copy_lora_into_peft
from test_birg import forward, train_batch


def supcon(reps: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor | None, bank_labels: torch.Tensor | None,
           temperature: float) -> torch.Tensor:
    """The SupCon loss of one module's ``reps`` [n, d] (normalised) against themselves and a bank:
    the reference the stacked implementation is tested against."""
    keys = reps if bank is None or bank.numel() == 0 else torch.cat([reps, bank.to(reps.dtype)])
    key_labels = labels if bank_labels is None or bank_labels.numel() == 0 else torch.cat([labels, bank_labels])
    return supcon_from_similarities((reps @ keys.T).unsqueeze(0), labels, key_labels, temperature)


def moe_method(**kw) -> MoeMethod:
    return load_config(None, [f"method={{preset: {kw.pop('preset', 'moelora')}}}"]
                       + [f"method.{k}={v}" for k, v in kw.items()]).method


def moe_model(**kw):
    loaded = load_model("tiny", device="cpu")
    method = moe_method(**kw)
    torch.manual_seed(0)
    return loaded, apply_method(loaded.model, method), method


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraMixtureLinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("router", ["topk", "route", "soft"])
def test_one_expert_with_gate_one_equals_plain_lora(router):
    loaded, model, _ = moe_model(router=router, n_experts=1, top_k=1, ranks="[8]", alpha=16.0, dropout=0.0, l_con=0.0)
    randomize(model)
    peft_model = apply_method(load_model("tiny", device="cpu").model, LoraMethod(r=8, alpha=16.0, dropout=0.0))
    copy_lora_into_peft(model, peft_model, LoraMixtureLinear)
    model.eval(), peft_model.eval()
    batch = train_batch(loaded)
    batch.specialty = torch.zeros_like(batch.specialty)
    with torch.no_grad():
        torch.testing.assert_close(forward(model, batch), peft_model(input_ids=batch.input_ids,
                                   attention_mask=batch.attention_mask).logits, rtol=1e-5, atol=1e-5)


def _layer(router="topk", n=4, k=2, ranks=(8,), n_anchor=0, **kw):
    state = RoutingState()
    ranks = [ranks[i % len(ranks)] for i in range(n)]
    torch.manual_seed(0)
    layer = LoraMixtureLinear(torch.nn.Linear(12, 10), ranks=[8] * n_anchor + ranks, alphas=[16.0] * (n + n_anchor),
                              n_anchor=n_anchor, router=router, top_k=k, init_tau=1.0, learn_tau=True, dropout=0.0,
                              losses=kw.pop("losses", ()), gate_contrast=kw.pop("gate_contrast", False),
                              con_temperature=0.1, queue_size=kw.pop("queue_size", 0), state=state, name="l")
    return layer, state


@pytest.mark.parametrize("router", ["topk", "soft"])
def test_gate_weights_sum_to_one(router):
    layer, _ = _layer(router, losses=("balance",))
    g, p = layer.gates(torch.randn(3, 5, 12))
    torch.testing.assert_close(g.sum(-1), torch.ones(3, 5))
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 5))
    if router == "topk":
        assert ((g > 0).sum(-1) == 2).all()
        assert _layer(router)[0].gates(torch.randn(3, 5, 12))[1] is None  # p only when the balance loss needs it


@pytest.mark.parametrize("router", ["topk", "soft", "route"])
def test_channel_weights_match_per_channel_gather(router):
    """w = g @ spec_to_channel + anchor_scale equals the definition: each channel's expert gate
    (anchors 1) times that expert's alpha/r, with anchors and unequal ranks."""
    layer, state = _layer(router, n=3, ranks=(4, 8, 2), n_anchor=1)  # alpha/r: 2 (anchor), 4, 2, 8
    state.update(torch.ones(2, 5, dtype=torch.bool), torch.tensor([1, 5]), torch.tensor([0, 3]))
    g, _ = layer.gates(torch.randn(2, 5, 12))
    expert_w = torch.cat([torch.ones(*g.shape[:-1], 1), g], dim=-1)
    reference = expert_w[..., layer.expert_of_channel] * layer.channel_scale
    torch.testing.assert_close(layer.channel_weights(g), reference)
    torch._dynamo.reset()  # compiled, the same weights come from a gather the compiler fuses
    torch.testing.assert_close(torch.compile(layer.channel_weights, fullgraph=True)(g), reference)


def test_learnable_temperature_gets_gradients():
    layer, state = _layer("soft")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 4, 12)
    layer(x).pow(2).sum().backward()
    assert layer.log_tau.grad is not None and layer.log_tau.grad.abs() > 0
    assert layer.router.weight.grad.abs().sum() > 0


def test_expert_schedule_matches_the_formula():
    for layer in range(1, 37):
        assert experts_at_layer(layer, 36, 2, 8, 2.0) == 2 + math.floor(6 * (layer / 36) ** 2)
    assert experts_at_layer(36, 36, 2, 8, 2.0) == 8 and experts_at_layer(1, 36, 2, 8, 2.0) == 2
    for layer in range(1, 37):  # bottom-heavy: the mirror image, N_max at the bottom
        assert experts_at_layer(layer, 36, 2, 8, 2.0, "bottom") == experts_at_layer(37 - layer, 36, 2, 8, 2.0)
    assert experts_at_layer(1, 36, 2, 8, 2.0, "bottom") == 8 and experts_at_layer(36, 36, 2, 8, 2.0, "bottom") == 2
    loaded, model, _ = moe_model(preset="medmoe")
    n_spec = {n: m.n_spec for n, m in model.named_modules() if isinstance(m, LoraMixtureLinear)}
    assert n_spec["model.layers.0.self_attn.q_proj"] == experts_at_layer(1, 2, 2, 8, 2.0) == 3
    assert n_spec["model.layers.1.mlp.down_proj"] == 8
    ranks = next(m for m in model.modules() if isinstance(m, LoraMixtureLinear)).ranks
    assert ranks == [8, 8, 16, 32]  # one anchor, then specialists cycling over {8, 16, 32}
    uniform = apply_method(load_model("tiny", device="cpu").model, moe_method(preset="medmoe-uniform"))
    assert {m.n_spec for m in uniform.modules() if isinstance(m, LoraMixtureLinear)} == {4}
    bottom = apply_method(load_model("tiny", device="cpu").model, moe_method(preset="medmoe-bottom-heavy"))
    n_bottom = {n: m.n_spec for n, m in bottom.named_modules() if isinstance(m, LoraMixtureLinear)}
    assert n_bottom["model.layers.0.self_attn.q_proj"] == 8 and n_bottom["model.layers.1.mlp.down_proj"] == 3
    assert count_method("tiny", "medmoe-bottom-heavy").trainable_params == count_method("tiny", "medmoe").trainable_params


def test_load_balance_losses_match_hand_computed_values():
    layer, state = _layer("topk", n=2, k=1, losses=("balance", "var"))
    with torch.no_grad():  # token 0 -> expert 0 (p = [0.73, 0.27]), token 1 -> expert 1 (p = [0.12, 0.88])
        layer.router.weight.zero_()
        layer.router.weight[0, 0], layer.router.weight[1, 1] = 1.0, 2.0
    x = torch.zeros(1, 2, 12)
    x[0, 0, 0], x[0, 1, 1] = 1.0, 2.0
    state.update(torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    layer.train()
    layer(x)
    aux = moe_losses(state, None)
    p0 = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    p1 = torch.softmax(torch.tensor([0.0, 4.0]), 0)
    p_mean = (p0 + p1) / 2
    f = torch.tensor([0.5, 0.5])
    assert float(aux["balance"]) == pytest.approx(float(2 * (f * p_mean).sum()), rel=1e-6)
    g_mean = torch.tensor([0.5, 0.5])  # top-1 gates are one-hot: each expert takes one token
    assert float(aux["var"]) == pytest.approx(float(g_mean.var(unbiased=False)), abs=1e-7)


def test_stacked_gate_losses_equal_the_mean_of_per_module_losses():
    """L_balance and L_var over modules of different shapes (2 or 3 experts, top-1 or top-2,
    one without the balance loss) and a partial prompt mask = the mean of each module's own."""
    state = RoutingState()
    torch.manual_seed(0)
    specs = [(2, 1, ("balance", "var")), (3, 2, ("balance", "var")), (3, 2, ("balance", "var")), (3, 2, ("var",))]
    layers = [LoraMixtureLinear(torch.nn.Linear(12, 10), ranks=[4] * n, alphas=[8.0] * n, n_anchor=0, router="topk",
                                top_k=k, init_tau=1.0, learn_tau=False, dropout=0.0, losses=losses, gate_contrast=False,
                                con_temperature=0.1, queue_size=0, state=state, name=f"l{i}")
              for i, (n, k, losses) in enumerate(specs)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    state.update(mask, torch.tensor([1, 5]), torch.tensor([0, 3]))
    xs = [torch.randn(2, 5, 12) for _ in layers]
    for layer, x in zip(layers, xs):
        layer.train()(x)
    aux = moe_losses(state, None)

    m = mask.float().unsqueeze(-1)
    balance, var = [], []
    for layer, x, (n, k, losses) in zip(layers, xs, specs):
        logits = layer.router(x)
        p = torch.softmax(logits, -1)
        top = logits.topk(k, -1)
        g = torch.zeros_like(p).scatter(-1, top.indices, torch.softmax(top.values, -1))
        g_mean = (g * m).sum((0, 1)) / m.sum()
        var.append(g_mean.var(unbiased=False))
        if "balance" in losses:
            f = ((g > 0).float() * m).sum((0, 1)) / (m.sum() * k)
            balance.append(n * (f * (p * m).sum((0, 1)) / m.sum()).sum())
    torch.testing.assert_close(aux["balance"], torch.stack(balance).mean())
    torch.testing.assert_close(aux["var"], torch.stack(var).mean())


def test_anchor_norm_is_the_frobenius_norm_of_the_update():
    layer, _ = _layer("soft", n=2, n_anchor=1)
    with torch.no_grad():
        layer.lora_B.normal_()
    a, b = layer.lora_A[:8], layer.lora_B[:, :8]
    assert float(layer._anchor_norm()) == pytest.approx(float((b @ a).pow(2).sum()), rel=1e-5)


def test_route_router_trains_only_the_routes_expert():
    loaded, model, _ = moe_model(preset="multilora")
    batch = train_batch(loaded, n=2)
    batch.specialty = torch.tensor([3, 3])
    set_routing(model, batch.prompt_mask, batch.specialty, batch.operation)
    from medpeft.train import answer_loss_sum

    answer_loss_sum(model, batch).backward()
    layer = next(m for m in model.modules() if isinstance(m, LoraMixtureLinear))
    per_expert = torch.stack([layer.lora_B.grad[:, layer.expert_of_channel == e].abs().sum() for e in range(8)])
    assert per_expert[3] > 0 and per_expert[torch.arange(8) != 3].sum() == 0


@pytest.mark.parametrize("gate_contrast", [False, True])
def test_expert_representations_match_the_definition(gate_contrast):
    """o_bi = (alpha_i/r_i) B_i A_i h_b (SparseDoctor: times the question's mean prompt gate of
    expert i), h_b the mean input over prompt tokens; L2-normalised, labelled by expert."""
    layer, state = _layer("topk", n=3, k=2, ranks=(4, 8, 2), n_anchor=1, gate_contrast=gate_contrast)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    state.update(mask, torch.tensor([1, 5]), torch.tensor([0, 3]))
    g, _ = layer.gates(x)
    h, gbar = layer.contrast_inputs(x, g)
    reps = expert_representations(h[None], layer.lora_A[None], layer.lora_B[None], layer.spec_to_channel[None],
                                  gbar[None] if gate_contrast else None)[0]
    starts = [0, 8, 12, 20]  # channels: anchor 8, then the specialists 4, 8, 2
    expected = []
    for b in range(2):
        h = x[b][mask[b]].mean(0)
        for i in range(3):
            lo, hi = starts[i + 1], starts[i + 1] + (4, 8, 2)[i]
            o = (16.0 / (hi - lo)) * layer.lora_B[:, lo:hi] @ (layer.lora_A[lo:hi] @ h)
            if gate_contrast:
                o = o * g[b, mask[b], i].mean()
            expected.append(torch.nn.functional.normalize(o, dim=0))
    torch.testing.assert_close(reps, torch.stack(expected).detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("queue_size", [7, 0])
def test_stacked_contrastive_loss_equals_the_mean_of_per_module_losses(queue_size):
    """Modules of three shapes and two expert counts (so two SupCon stacks), with or without
    their own partly filled queues: the stacked L_con and its gradients (experts, router,
    inputs) are those of the mean over modules of SupCon(own representations, expert labels,
    own queue), and each module's representations are what it will push to its queue."""
    from types import SimpleNamespace

    state = RoutingState()
    torch.manual_seed(0)
    shapes = [(10, [4, 8, 2]), (6, [4, 8, 2]), (10, [4, 8, 2]), (10, [4, 8])]  # (d_out, expert ranks)
    layers = [LoraMixtureLinear(torch.nn.Linear(12, d_out), ranks=ranks, alphas=[16.0] * len(ranks), n_anchor=0,
                                router="topk", top_k=2, init_tau=1.0, learn_tau=False, dropout=0.0, losses=("con",),
                                gate_contrast=True, con_temperature=0.5, queue_size=queue_size, state=state,
                                name=f"l{i}")
              for i, (d_out, ranks) in enumerate(shapes)]
    for i, layer in enumerate(layers):
        with torch.no_grad():
            layer.lora_B.normal_()
        if queue_size:
            layer.queue.push(torch.randn(3 + i, layer.base.out_features),
                             torch.tensor([0, 2, 1, 1, 0, 1])[:3 + i] % layer.n_spec)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    state.update(mask, torch.tensor([1, 5]), torch.tensor([0, 3]))
    xs = [torch.randn(2, 4, 12, requires_grad=True) for _ in layers]
    for layer, x in zip(layers, xs):
        layer.train()(x)
    loss = moe_losses(state, SimpleNamespace(con_temperature=0.5))["con"]
    wrt = [t for layer in layers for t in (layer.lora_A, layer.lora_B, layer.router.weight)] + xs
    grads = torch.autograd.grad(loss, wrt)

    expected = []
    for layer, x in zip(layers, xs):
        labels = torch.arange(layer.n_spec).repeat(2)
        h, gbar = layer.contrast_inputs(x, layer.gates(x)[0])
        reps = expert_representations(h[None], layer.lora_A[None], layer.lora_B[None], layer.spec_to_channel[None],
                                      gbar[None])[0]
        queue = (layer.queue.items, layer.queue.labels) if queue_size else (None, None)
        expected.append(supcon(reps, labels, *queue, 0.5))
        if queue_size:
            torch.testing.assert_close(layer.pending_push[0], reps.detach())
            assert layer.pending_push[1].tolist() == labels.tolist()
        else:
            assert layer.pending_push is None
    reference = torch.stack(expected).mean()
    torch.testing.assert_close(loss, reference)
    for got, want in zip(grads, torch.autograd.grad(reference, wrt)):
        torch.testing.assert_close(got, want)
    assert all(layer.routing_out is None for layer in layers)  # consumed


def test_supcon_golden_and_queue_semantics():
    reps = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]), dim=-1)
    labels = torch.tensor([0, 0, 1, 1])
    loss = supcon(reps, labels, None, None, 1.0)
    sims = reps @ reps.T
    expected = 0.0
    for i in range(4):
        others = [j for j in range(4) if j != i]
        pos = [j for j in others if labels[j] == labels[i]]
        denom = torch.logsumexp(sims[i, others], 0)
        expected += float(-(sims[i, pos] - denom).mean())
    assert float(loss) == pytest.approx(expected / 4, rel=1e-6)

    # a bank with empty slots (label -1) gives the loss of the bank without them
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [5.0, 1.0], [0.3, 1.0]]), dim=-1)
    bank_labels = torch.tensor([1, -1, 0])
    assert float(supcon(reps, labels, bank, bank_labels, 0.5)) == pytest.approx(
        float(supcon(reps, labels, bank[[0, 2]], bank_labels[[0, 2]], 0.5)), rel=1e-6)

    q = ExpertQueue(size=3, dim=2)
    q.push(torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 1]))
    q.push(torch.tensor([[3.0, 0.0], [4.0, 0.0]], requires_grad=True) * 1, torch.tensor([2, 3]))
    items, lab = q.filled()
    assert lab.tolist() == [3, 1, 2]  # FIFO ring: the oldest entry (label 0) was overwritten first
    assert items[:, 0].tolist() == [4.0, 2.0, 3.0] and not items.requires_grad
    assert q.items.shape == (3, 2)


def test_sparsedoctor_queue_fills_stays_flat_and_carries_no_gradient():
    loaded, model, method = moe_model(preset="sparsedoctor", queue_size=16)
    randomize(model)  # B = 0 at init gives zero expert outputs and no contrastive gradient yet
    model.train()
    layer = next(m for m in model.modules() if isinstance(m, LoraMixtureLinear))
    assert layer.gate_contrast and layer.queue is not None
    sizes = []
    for step in range(6):
        aux = accumulate_gradients(model, method, [train_batch(loaded, n=2)], batch_size=2).aux
        sizes.append(int((layer.queue.labels >= 0).sum()))
        assert layer.queue.items.shape == (16, layer.base.out_features) and not layer.queue.items.requires_grad
    assert sizes == [8, 16, 16, 16, 16, 16]  # 2 questions x 4 experts per step, then a full ring
    assert "con" in aux and layer.router.weight.grad.abs().sum() > 0  # the contrastive term reaches the router


def test_moelora_parameter_count_reproduces_the_paper():
    assert round(count_method("qwen3-8b", "moelora").trainable_params / 1e6, 2) == 92.60
    c = count_method("qwen3-8b", "multilora")
    assert c.active_params * 8 == c.trainable_params  # one of 8 route experts per question


def test_audit_covers_mixtures(tmp_path):
    import json

    from medpeft.cli import main

    out = tmp_path / "medmoe"
    assert main(["train", "quickstart", f"output_dir={out}", "methods=[]", "method={preset: medmoe}", "train.steps=2",
                 "data.max_length=256"]) == 0
    assert main(["audit", str(out)]) == 0
    summary = json.loads((out / "audit" / "summary.json").read_text())
    usage = summary["expert_usage_by_layer"]
    assert set(usage) == {"model.layers.0", "model.layers.1"}
    cell = next(iter(usage["model.layers.1"].values()))
    assert len(cell["usage"]) == 8 and sum(cell["usage"]) == pytest.approx(1.0, abs=1e-3)  # soft gates sum to 1
    assert len(next(iter(usage["model.layers.0"].values()))["usage"]) == 3  # N_l schedule: fewer experts below
    row = json.loads((out / "audit" / "per_question.jsonl").read_text().splitlines()[0])
    assert {"expert_usage", "top_expert"} <= set(next(iter(row["modules"].values())))
    assert (out / "audit" / "expert_usage_last_layer.png").stat().st_size > 1000


def test_sparsedoctor_resume_restores_the_expert_queues(tmp_path):
    from pathlib import Path

    from safetensors.torch import load_file

    from medpeft.dataset import load_train_set
    from medpeft.train import train

    def cfg(sub):
        return load_config("quickstart", [f"output_dir={tmp_path / sub}", "methods=[]", "method={preset: sparsedoctor}",
                                          "method.queue_size=64", "train.steps=5", "train.save_every=2",
                                          "train.log_every=1", "data.max_length=192", "train.lr=0.02"])

    items = load_train_set(cfg("a"))
    train(cfg("a"), load_model("tiny", device="cpu"), items)

    class Killed(Exception):
        pass

    def kill(step):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train(cfg("b"), load_model("tiny", device="cpu"), items, on_step=kill)
    assert (tmp_path / "b" / "checkpoints" / "step-0000002" / "training_state.safetensors").exists()
    import shutil

    from medpeft.errors import MedpeftError

    shutil.copytree(tmp_path / "b", tmp_path / "c")  # a checkpoint without the queues is refused, not resumed empty
    (tmp_path / "c" / "checkpoints" / "step-0000002" / "training_state.safetensors").unlink()
    with pytest.raises(MedpeftError, match="cannot resume from this checkpoint: expert queues do not fit"):
        train(cfg("c"), load_model("tiny", device="cpu"), items, resume=True)
    train(cfg("b"), load_model("tiny", device="cpu"), items, resume=True)
    wa = load_file(str(Path(tmp_path / "a" / "adapter" / "adapter.safetensors")))
    wb = load_file(str(Path(tmp_path / "b" / "adapter" / "adapter.safetensors")))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
