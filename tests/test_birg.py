"""BiRG-LoRA: equivalences, leakage, gradient checks, generation with a fixed gate, round trips."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import copy_lora_into_peft
from medpeft.adapters import apply_method, set_routing
from medpeft.adapters.birg import (BirgMethod, OffDiagonalCos2, RankGatedLoraLinear, birg_losses, effective_rank,
                                   merge_fixed_gate, straight_through_topk)
from medpeft.adapters.peft_lora import LoraMethod
from medpeft.adapters.routing import RoutingState, routing_state
from medpeft.config import load_config
from medpeft.tags import tag_table_rows
from medpeft.dataset import load_train_set
from medpeft.models import load_model
from medpeft.prompts import PromptFormatter
from medpeft.train import answer_loss_sum, collate


def birg_model(**kw):
    loaded = load_model("tiny", device="cpu")
    method = BirgMethod(**kw)
    torch.manual_seed(0)
    model = apply_method(loaded.model, method)
    return loaded, model, method


def randomize_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, RankGatedLoraLinear):
            with torch.no_grad():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
                if m.gate_tags is not None:
                    m.gate_tags.copy_(torch.randn(m.gate_tags.shape, generator=g))
                if m.injection:
                    m.gate_in.weight[-1].copy_(torch.randn(m.gate_in.weight.shape[1], generator=g) * 0.1)


def train_batch(loaded, n=4, answer_shift=0):
    cfg = load_config("quickstart", ["data.max_length=256"])
    items = load_train_set(cfg)[:n]
    fmt = PromptFormatter(loaded.tokenizer, 256)
    enc = [fmt.encode_train(t.record) for t in items]
    batch = collate(enc, [t.tags for t in items], loaded.tokenizer.pad_token_id)
    if answer_shift:
        batch.input_ids[~batch.prompt_mask & batch.attention_mask.bool()] += answer_shift
    return batch


def forward(model, batch, **kw):
    set_routing(model, batch.prompt_mask, batch.specialty, batch.operation, **kw)
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def test_all_ranks_on_without_injection_equals_peft_lora():
    loaded, model, _ = birg_model(kappa=16, injection=False, dropout=0.0)
    randomize_B(model)
    peft_model = apply_method(load_model("tiny", device="cpu").model,
                              LoraMethod(r=16, alpha=32.0, dropout=0.0))
    copy_lora_into_peft(model, peft_model, RankGatedLoraLinear)
    batch = train_batch(loaded)
    model.eval(), peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(forward(model, batch), peft_model(input_ids=batch.input_ids,
                                   attention_mask=batch.attention_mask).logits, rtol=1e-5, atol=1e-5)
        # and the update is not trivially zero
        base = load_model("tiny", device="cpu").model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        assert not torch.allclose(forward(model, batch), base, atol=1e-3)


def test_straight_through_gradients_reach_every_gate_parameter():
    loaded, model, method = birg_model()
    randomize_B(model)
    batch = train_batch(loaded)
    set_routing(model, batch.prompt_mask, batch.specialty, batch.operation)
    loss = answer_loss_sum(model, batch)
    loss.backward()
    layer = next(m for m in model.modules() if isinstance(m, RankGatedLoraLinear))
    w = layer.gate_in.weight.grad
    assert w[:16].abs().sum() > 0 and w[16].abs().sum() > 0  # a_h rows and the rho row
    rows = set(tag_table_rows(batch.specialty, batch.operation).flatten().tolist())
    used = layer.gate_tags.grad.abs().sum(1) > 0
    assert set(used.nonzero().flatten().tolist()) == rows  # exactly the specialty, operation and pair rows read
    for p in (layer.lora_A, layer.lora_B):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # the hard mask in the forward, the soft probabilities in the backward
    p = torch.softmax(torch.tensor([[3.0, 1.0, 2.0, 0.0]], requires_grad=True), -1)
    zeta, hard = straight_through_topk(p, 2)
    assert zeta.tolist() == [[1.0, 0.0, 1.0, 0.0]] and hard.tolist() == zeta.tolist()
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    (zeta * w).sum().backward()


def test_gradient_checkpointing_gives_identical_gradients():
    grads = []
    for checkpointing in (False, True):
        loaded, model, _ = birg_model(dropout=0.0)
        randomize_B(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        batch = train_batch(loaded)
        set_routing(model, batch.prompt_mask, batch.specialty, batch.operation)
        answer_loss_sum(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_mixed_tags_in_one_batch_route_each_question_by_its_own_tags():
    loaded, model, _ = birg_model(hidden_gate=False, injection=False)
    randomize_B(model)
    model.eval()
    batch = train_batch(loaded, n=4)
    batch.specialty = torch.tensor([0, 1, 2, 0])
    batch.operation = torch.tensor([0, 1, 2, 0])
    forward(model, batch, record=True)
    rec = next(iter(routing_state(model).records.values()))
    assert torch.equal(rec["hard"][0], rec["hard"][3])  # same tags -> same atoms (tag-only gate)
    assert not torch.equal(rec["hard"][0], rec["hard"][1]) or not torch.equal(rec["hard"][1], rec["hard"][2])
    # batched == one question at a time
    full = forward(model, batch)
    for i in range(4):
        single = copy.copy(batch)
        single.input_ids, single.attention_mask = batch.input_ids[i:i + 1], batch.attention_mask[i:i + 1]
        single.prompt_mask, single.specialty, single.operation = (batch.prompt_mask[i:i + 1], batch.specialty[i:i + 1],
                                                                 batch.operation[i:i + 1])
        n = int(batch.attention_mask[i].sum())
        torch.testing.assert_close(forward(model, single)[0, :n], full[i, :n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", ["rankwise", "birg-clinical-only"])
def test_every_variant_scores_multi_answer_items(preset):
    """Constrained decoding (multi-answer items) holds the gate fixed; variants without rho too."""
    from medpeft.evaluate import Evaluator

    loaded = load_model("tiny", device="cpu")
    model = apply_method(loaded.model, load_config(None, [f"method.preset={preset}"]).method).eval()
    cfg = load_config("quickstart")
    items = [t for t in load_train_set(cfg) if t.record.question_type == "multi"]
    preds = Evaluator(model, loaded.tokenizer).score(items, "letters") + \
        Evaluator(model, loaded.tokenizer).score(items, "generate")
    assert len(preds) == 2 * len(items) > 0 and all(p.pred <= set("ABCDE") for p in preds)


def test_merge_is_exact_for_a_tag_only_gate():
    loaded, model, _ = birg_model(hidden_gate=False, injection=False, dropout=0.0)
    randomize_B(model)
    model.eval()
    batch = train_batch(loaded, n=2)
    batch.specialty, batch.operation = torch.tensor([2, 2]), torch.tensor([5, 5])
    with torch.no_grad():
        expected = forward(model, batch)
        merged = merge_fixed_gate(model, 2, 5)
        assert not any(isinstance(m, RankGatedLoraLinear) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                   expected, rtol=1e-5, atol=1e-5)
    _, hidden_model, _ = birg_model()
    with pytest.raises(ValueError, match="depends on the input"):
        merge_fixed_gate(hidden_model, 0, 0)


def test_routing_context_is_required():
    loaded, model, _ = birg_model()
    with pytest.raises(RuntimeError, match="no routing context"):
        model(input_ids=torch.tensor([[5, 6, 7]]))


def test_auxiliary_losses_match_hand_computed_values():
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]])
    hard = straight_through_topk(p, 1)[1]
    state = RoutingState(prompt_mask=torch.ones(2, 3, dtype=torch.bool), specialty=torch.tensor([0, 1]),
                         operation=torch.tensor([3, 3]))
    layers = [RankGatedLoraLinear(torch.nn.Linear(3, 2), r=4, kappa=1, alpha=4.0, tau=1.0, dropout=0.0,
                                  hidden_gate=True, clinical_gate=False, injection=False,
                                  losses=("ent", "bal", "orth", "axis"), state=state) for _ in range(2)]
    for layer in layers:  # two modules with the same gate and atoms: module means are unchanged
        with torch.no_grad():
            layer.lora_A.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0], [0, 0, 1.0]]))
            layer.lora_B.copy_(torch.tensor([[1.0, 0, 0, 1.0], [0, 1.0, 1.0, 0]]))
        layer.keep_for_losses(p, hard)
    method = BirgMethod(r=4, kappa=1)
    losses = {k: float(v) for k, v in birg_losses(state, method).items()}
    h = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1))
    assert losses["ent"] == pytest.approx(-h / math.log(4))
    # f = [0.5, 0.5, 0, 0], P = [0.4, 0.4, 0.1, 0.1] -> 4 * (0.2 + 0.2)
    assert losses["bal"] == pytest.approx(1.6)
    # A rows: pairs (0,2), (1,2) have cos^2 = 1/2, others 0 -> 2*2*(1/2) / 12; B columns: (0,3) and (1,2) identical
    assert losses["orth"] == pytest.approx(2 / 12 + 4 / 12)
    # two specialty prototypes p0, p1; one operation value contributes 0
    assert losses["axis"] == pytest.approx((0.7 * 0.1 * 2 + 0.01 * 2) / (0.49 + 0.03), rel=1e-5)
    assert float(OffDiagonalCos2.apply(torch.eye(3)[None])) == 0.0
    assert all(layer.routing_out is None for layer in layers)  # collected once
    # orth is skipped on micro-batches after the first of a step
    state.parameter_losses = False
    layers[0].keep_for_losses(p, hard)
    later = birg_losses(state, method)
    assert "orth" not in later and later["ent"] == pytest.approx(-h / math.log(4))


def test_effective_rank():
    assert effective_rank(torch.eye(4)) == pytest.approx(4.0)
    assert effective_rank(torch.outer(torch.ones(3), torch.arange(1.0, 4.0))) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3, 3)) == 0.0


def test_presets_are_flags_of_one_method():
    assert load_config(None, ["method.preset=rankwise"]).method == BirgMethod(
        name="rankwise", clinical_gate=False, injection=False, l_orth=0.0, l_axis=0.0)
    assert load_config(None, ["method.name=rankwise"]).method.clinical_gate is False
    assert load_config(None, ["method.preset=birg-top8"]).method.kappa == 8
    assert load_config(None, ["method.preset=lora-r4"]).method == LoraMethod(r=4, alpha=8.0)
    cfg = load_config("quickstart", ["method.preset=birg-no-axis"])  # file's LoRA keys carry over
    assert cfg.method.name == "birg" and cfg.method.l_axis == 0.0 and cfg.method.r == 16
    _, model, _ = birg_model(clinical_gate=False, injection=False)
    assert not any("gate_tags" in n for n, _ in model.named_parameters())
    layer = next(m for m in model.modules() if isinstance(m, RankGatedLoraLinear))
    assert layer.gate_in.out_features == 16  # a_h only, no rho row


def test_orthogonality_loss_hand_written_backward_passes_gradcheck():
    torch.manual_seed(0)
    a = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)  # a stack of two 5 x 7 matrices
    b = torch.randn(1, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: OffDiagonalCos2.apply(a, b), (a, b))

    def reference(m):  # the textbook form through autograd
        n = torch.nn.functional.normalize(m, dim=-1)
        g = n @ n.T
        return (g.pow(2).sum() - g.diagonal().pow(2).sum()) / (m.shape[0] * (m.shape[0] - 1))

    assert float(OffDiagonalCos2.apply(a, b)) == pytest.approx(
        float(reference(a[0]) + reference(a[1]) + reference(b[0])), rel=1e-12)


@pytest.mark.parametrize("kw", [{}, {"hidden_gate": False}, {"clinical_gate": False, "injection": False}])
def test_siblings_gated_together_equal_each_layer_gated_alone(kw):
    """q/k/v and gate/up compute their gates as one stacked product (eager); the logits,
    gates, auxiliary losses and every gradient equal those of each layer's own gate."""
    results = []
    for together in (True, False):
        loaded, model, method = birg_model(dropout=0.0, **kw)
        randomize_B(model)
        layers = [m for m in model.modules() if isinstance(m, RankGatedLoraLinear)]
        grouped = {m.name.rsplit(".", 1)[-1] for m in layers if m.siblings}
        assert grouped == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
        if not together:
            for m in layers:
                m.siblings = []
        model.train()
        batch = train_batch(loaded)
        set_routing(model, batch.prompt_mask, batch.specialty, batch.operation, record=True)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        assert (routing_state(model).sibling_gates is not None) == together  # the stacked path ran
        aux = birg_losses(routing_state(model), method)
        total = logits.float().pow(2).mean() + sum(v for v in aux.values() if v.requires_grad)
        total.backward()
        records = {n: {k: v.clone() for k, v in r.items()} for n, r in routing_state(model).records.items()}
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((logits.detach(), {k: v.detach() for k, v in aux.items()}, records, grads))
    (l1, a1, r1, g1), (l2, a2, r2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)  # fp32 rounding of a wider product
    assert a1.keys() == a2.keys() and r1.keys() == r2.keys() and g1.keys() == g2.keys()
    for k in a1:
        torch.testing.assert_close(a1[k], a2[k], rtol=1e-5, atol=1e-6)
    for name in r1:
        for k in r1[name]:
            torch.testing.assert_close(r1[name][k], r2[name][k], rtol=1e-5, atol=1e-6)
    gate_grads = [g for n, g in g1.items() if "gate_" in n]
    assert gate_grads and all(g.abs().sum() > 0 for g in gate_grads)  # the stacked gate is trained
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-5, atol=1e-6)
