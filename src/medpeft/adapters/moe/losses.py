"""Auxiliary losses of the LoRA mixtures of experts (weights ``l_*``; each a mean over modules)::

    L_balance = N sum_i f_i P_i        f_i: share of top-k slots given to expert i, P_i: mean p_i  (Switch)
    L_var     = Var_i( mean_tokens g_i )                                         (Med-MoE-LoRA L_aux)
    L_anchor  = sum_a ||B_a A_a||_F^2  = sum_a tr((B_a^T B_a)(A_a A_a^T))        (anchors stay near the base)
    L_con     = SupCon over expert representations, labels = expert index       (MoELoRA)

Token statistics use the prompt tokens (pads and answers excluded). For ``L_con`` the
representation of expert i on question b is its output on the mean prompt input,
``o_bi = B_i A_i h_b`` (the mean of ``B_i A_i x`` over prompt tokens, by linearity),
L2-normalised. With temperature ``t``::

    L_con = mean_{(b,i)} -1/|P(b,i)| sum_{(c,i) in P(b,i)} log( exp(o_bi.o_ci/t) / sum_{(c,j) != (b,i)} exp(o_bi.o_cj/t) )

positives ``P(b,i)``: the same expert on the other questions (and in the queue); every
other representation is a negative. **SparseDoctor** (``gate_contrast: true``) weights
each representation by the question's mean gate of that expert, ``o_bi = gbar_bi B_i A_i
h_b``, so the contrastive objective also supervises the router, and keeps an **expert
memory queue** per module: a fixed-size FIFO ring of past (detached) representations with
their expert labels, used as extra positives/negatives so the term needs no large batch.
The queue is updated once per optimizer step with the representations of the step's
micro-batches in micro-batch order (:func:`pending_pushes`, :func:`commit_queues`), so every
micro-batch of a step reads the same queue: the result depends neither on how the step is
split into micro-batches nor on how many processes run them (each rank pushes every
micro-batch's entries, gathered). It holds no gradient and its memory is fixed. Slots not yet filled
carry label -1 and are masked out of the loss, so the queue always has one shape (no host
sync to count entries, no recompilation under ``torch.compile``).

Every term is computed after the forward pass for all modules of one shape at once (from
what each layer kept in ``routing_out``); ``L_con`` in fp32, also under mixed precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..routing import RoutingState
from .layer import LoraMixtureLinear

def supcon_from_similarities(sims: torch.Tensor, labels: torch.Tensor, key_labels: torch.Tensor,
                             temperature: float) -> torch.Tensor:
    """The SupCon loss from stacked similarity matrices ``sims`` [M, n, n + q] (rows: the n
    representations, columns: themselves then the bank), averaged over the M modules.
    ``key_labels``: [n + q], or [M, n + q] when the modules' banks differ."""
    n = sims.shape[1]
    key_labels = key_labels.reshape(-1, 1, sims.shape[2])  # [1 or M, 1, n + q]
    self_mask = torch.zeros(sims.shape[1:], dtype=torch.bool, device=sims.device)
    self_mask[:, :n] = torch.eye(n, dtype=torch.bool, device=sims.device)
    self_mask = self_mask | (key_labels < 0)  # empty queue slots are neither positives nor negatives
    logits = (sims / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    positive = (labels[:, None] == key_labels) & ~self_mask
    n_pos = positive.sum(-1)  # [1 or M, n]
    per_anchor = -(log_prob.masked_fill(~positive, 0.0)).sum(-1) / n_pos.clamp(min=1)  # [M, n]
    has = (n_pos > 0).to(per_anchor.dtype)  # anchors without a positive do not count (no host sync)
    return ((per_anchor * has).sum(-1) / has.sum(-1).clamp(min=1)).mean()


def expert_representations(h: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                           spec_to_channel: torch.Tensor, gbar: torch.Tensor | None) -> torch.Tensor:
    """Normalised ``o_bi = gbar_bi (alpha_i/r_i) B_i A_i h_b`` of M same-shape modules at once.

    ``h`` [M, B, d_in] mean prompt inputs, ``lora_a`` [M, R, d_in], ``lora_b`` [M, d_out, R],
    ``spec_to_channel`` [M, n_spec, R] (expert i's channels times alpha_i/r_i), ``gbar``
    [M, B, n_spec] mean prompt gates or None (MoELoRA: 1). Returns [M, B * n_spec, d_out]
    (rows: question-major, expert-minor), in fp32.
    """
    u = torch.bmm(h, lora_a.transpose(1, 2))  # [M, B, R]
    per_expert = u[:, :, None, :] * spec_to_channel[:, None]  # [M, B, n_spec, R]
    o = torch.bmm(per_expert.flatten(1, 2), lora_b.transpose(1, 2))  # [M, B * n_spec, d_out]
    if gbar is not None:
        o = o * gbar.flatten(1, 2).unsqueeze(-1)
    return F.normalize(o, dim=-1)


def contrastive_losses(layers: list[LoraMixtureLinear], method) -> dict[str, torch.Tensor]:
    """``L_con`` of the modules that kept contrast inputs in this forward, averaged over them.

    Modules of one shape (q, k/v, o, gate/up, down) go through :func:`expert_representations`
    and the similarities among this batch's representations as one stack; without queues, the
    similarity stacks of all shapes with the same expert count then go through one SupCon (the
    products depend on d_out, the loss over similarities does not), so the term costs a few kernels
    per shape and one SupCon per forward instead of per module (launch-bound on a GPU
    otherwise, docs/performance.md); only the products with each module's queue stay per module.
    In fp32, also under mixed precision (small products; normalised vectors over a temperature).
    """
    if not layers:
        return {}
    groups: dict[tuple, list] = {}
    for layer in layers:
        h = layer.routing_out["con"][0]
        key = (tuple(layer.lora_A.shape), tuple(layer.lora_B.shape), layer.n_spec, tuple(h.shape),
               layer.queue.size if layer.queue is not None else 0)
        groups.setdefault(key, []).append(layer)
    total = 0.0
    merged: dict[int, tuple[list, torch.Tensor]] = {}  # expert count -> queue-less similarity stacks, labels
    with torch.autocast(layers[0].lora_A.device.type, enabled=False):
        for members in groups.values():
            inputs = [m.routing_out["con"] for m in members]
            gbars = [g for _, g in inputs]
            reps = expert_representations(
                torch.stack([h for h, _ in inputs]).float(), torch.stack([m.lora_A for m in members]).float(),
                torch.stack([m.lora_B for m in members]).float(), torch.stack([m.spec_to_channel for m in members]),
                torch.stack(gbars).float() if gbars[0] is not None else None)
            n_spec, n_questions = members[0].n_spec, inputs[0][0].shape[0]
            labels = torch.arange(n_spec, device=reps.device).repeat(n_questions)  # expert index
            sims = torch.bmm(reps, reps.transpose(1, 2))
            if members[0].queue is None:  # [M, n, n]: one SupCon for every shape with n_spec experts
                merged.setdefault(n_spec, ([], labels))[0].append(sims)
                continue
            # each module's memory queue: extra positives/negatives. One product per module
            # against its own queue: stacking the queues would copy all of them every
            # micro-batch and keep the copy for backward (GBs at 8B). The [M, n, n + q] stacks
            # stay per shape: concatenating them across shapes measured slower (a large copy)
            banks = [m.queue.filled() for m in members]
            sims = torch.cat([sims, torch.stack([r @ b.to(r.dtype).T for r, (b, _) in zip(reps, banks)])], dim=2)
            key_labels = torch.cat([labels.expand(len(members), -1), torch.stack([lab for _, lab in banks])], dim=1)
            for m, r in zip(members, reps.detach()):
                m.pending_push = (r, labels)
            total = total + len(members) * supcon_from_similarities(sims, labels, key_labels, method.con_temperature)
        for stacks, labels in merged.values():
            sims = torch.cat(stacks) if len(stacks) > 1 else stacks[0]
            # a mean over the stack's modules: weighted by their number, the mean over all modules
            total = total + sims.shape[0] * supcon_from_similarities(sims, labels, labels, method.con_temperature)
    return {"con": total / len(layers)}



def pending_pushes(state: RoutingState) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """The last forward's expert representations and labels by module name (taken: a later
    forward does not see them), or None when no module keeps a queue."""
    out = {}
    for layer in state.layers:
        if getattr(layer, "pending_push", None) is not None:
            out[layer.name] = layer.pending_push
            layer.pending_push = None
    return out or None


def commit_queues(state: RoutingState, pushes: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> None:
    """Push a step's :func:`pending_pushes` (in micro-batch order) into the modules' queues."""
    layers = {layer.name: layer for layer in state.layers}
    for push in pushes:
        for name, (reps, labels) in push.items():
            layers[name].queue.push(reps, labels)


def gate_losses(layers: list[LoraMixtureLinear], prompt_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``L_balance`` and ``L_var`` of the modules that kept their gates, each a mean over them.

    Over the prompt tokens: ``gbar_i`` / ``P_i`` the mean gate / router probability of expert
    i, ``f_i`` its share of top-k slots; ``L_balance = N sum_i f_i P_i`` and ``L_var =
    Var_i(gbar_i)`` per module. Modules with gates of one shape are stacked, so the terms cost
    a few operations per shape and forward instead of ~15 per module.
    """
    if not layers:
        return {}
    m = prompt_mask.to(torch.float32)[:, :, None]  # [B, T, 1]
    n_tok = m.sum().clamp(min=1)
    groups: dict[tuple, list] = {}
    for layer in layers:
        g, p = layer.routing_out["gates"]
        key = (tuple(g.shape), p is not None, "var" in layer.losses, layer.top_k, layer.n_spec)
        groups.setdefault(key, []).append(layer)
    balance, var = [], []
    for (_, with_p, with_var, top_k, n_spec), members in groups.items():
        gates = torch.stack([layer.routing_out["gates"][0] for layer in members]).float()  # [M, B, T, n]
        if with_var:
            var.append(((gates * m).sum((1, 2)) / n_tok).var(-1, unbiased=False))
        if with_p:
            probs = torch.stack([layer.routing_out["gates"][1] for layer in members]).float()
            p_mean = (probs * m).sum((1, 2)) / n_tok
            f = ((gates > 0).float() * m).sum((1, 2)) / (n_tok * max(top_k, 1))
            balance.append(n_spec * (f * p_mean).sum(-1))
    return {k: torch.cat(v).mean() for k, v in (("balance", balance), ("var", var)) if v}


def moe_losses(state: RoutingState, method) -> dict[str, torch.Tensor]:
    """Every auxiliary loss of the last forward, each a mean over the modules that reported it."""
    reported = [m for m in state.layers if m.routing_out is not None]
    # before collect(), which clears routing_out
    con = contrastive_losses([m for m in reported if "con" in m.routing_out], method)
    gated = gate_losses([m for m in reported if "gates" in m.routing_out], state.prompt_mask)
    terms: dict[str, list[torch.Tensor]] = {}
    for out in state.collect():
        for key, value in out.items():
            if key not in ("con", "gates"):
                terms.setdefault(key, []).append(value)
    return {**{k: torch.stack(v).mean() for k, v in terms.items()}, **gated, **con}
