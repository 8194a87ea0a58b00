"""Routing audit: golden numbers, the QR shortcut, and a mechanism test that fails if routing is broken."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from medpeft.adapters import apply_method
from medpeft.adapters.audit_tools import mutual_information
from medpeft.adapters.birg import RankGatedLoraLinear, effective_rank
from medpeft.adapters.birg.audit import active_effective_rank
from medpeft.audit import audit
from medpeft.cli import main
from medpeft.config import load_config
from medpeft.data.record import QARecord
from medpeft.dataset import TaggedRecord
from medpeft.models import load_model
from medpeft.tags import Tags
from medpeft.train import train


def test_mutual_information_golden():
    hard_a = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=float)
    assert mutual_information(np.array([0, 0, 1, 1]), hard_a) == pytest.approx(1.0)  # tag decides the atom: 1 bit
    assert mutual_information(np.array([0, 1, 0, 1]), hard_a) == pytest.approx(0.0)  # independent
    both = np.ones((4, 2))
    assert mutual_information(np.array([0, 0, 1, 1]), both) == pytest.approx(0.0)


def test_effective_rank_from_qr_core_equals_full_svd():
    torch.manual_seed(0)
    layer = RankGatedLoraLinear(torch.nn.Linear(12, 10), r=6, kappa=3, alpha=12.0, tau=1.0, dropout=0.0,
                                hidden_gate=True, clinical_gate=False, injection=False, losses=(), state=None)
    with torch.no_grad():
        layer.lora_B.normal_()
    atoms = torch.tensor([1, 3, 4])
    hard = torch.zeros(6)
    hard[atoms] = 1
    full = effective_rank(layer.active_update(hard, 0.7).detach())
    assert active_effective_rank(layer, atoms) == pytest.approx(full, rel=1e-4)
    assert 1.0 <= full <= 3.0


def synthetic_items(n_per_tag: int, seed: int = 0) -> list[TaggedRecord]:
    """The answer is fixed by the specialty tag; the text is drawn from the same pool for every tag."""
    rng = random.Random(seed)
    items = []
    for i in range(3 * n_per_tag):
        s = i % 3
        words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega"]) for _ in range(6))
        rec = QARecord(f"syn/{i}", "synthetic", "en", f"Case {words}?", {l: f"choice {l}" for l in "ABC"},
                       frozenset("ABC"[s]), "single")
        items.append(TaggedRecord(rec, Tags(("clinical_medicine", "pharmacy", "nursing")[s], "diagnosis", "test", "test"),
                                  "synthetic"))
    return items


def test_trained_gate_routes_tags_to_different_atoms(tmp_path):
    items = synthetic_items(16)
    cfg = load_config(None, ["model.name=tiny", f"output_dir={tmp_path / 'run'}", "method.preset=birg",
                             "train.steps=60", "train.lr=1e-2", "train.save_every=0", "train.log_every=60",
                             "data.max_length=128", "train.micro_batch_size=8"])
    untrained = apply_method(load_model("tiny", device="cpu").model, cfg.method)
    before = audit(untrained, cfg.method, load_model("tiny", device="cpu").tokenizer, items, plot=False).summary
    loaded = load_model("tiny", device="cpu")
    trained = train(cfg, loaded, items).model
    after = audit(trained, cfg.method, loaded.tokenizer, items, tmp_path / "audit").summary
    mi_before = before["mutual_information_bits"]["specialty"]
    mi_after = after["mutual_information_bits"]["specialty"]
    print(f"MI(specialty; atoms) before {mi_before:.3f} after {mi_after:.3f} bits")
    # measured: 0.003 -> 0.356 bits (log2(3) = 1.58 is the ceiling for 3 tags)
    assert mi_after > 0.2 and mi_after > 10 * max(mi_before, 0.01), (mi_before, mi_after)
    assert (tmp_path / "audit" / "rank_usage.png").stat().st_size > 1000
    rows = [json.loads(l) for l in (tmp_path / "audit" / "per_question.jsonl").read_text().splitlines()]
    first = next(iter(rows[0]["modules"].values()))
    assert len(first["atoms"]) == 4 and 0 < first["rho"] < 1 and 1 <= first["effective_rank"] <= 4


def test_audit_cli_and_refusal_for_unrouted_runs(tmp_path, capsys):
    out = tmp_path / "birg"
    assert main(["train", "quickstart", f"output_dir={out}", "methods=[]", "method.preset=birg", "train.steps=2",
                 "data.max_length=256"]) == 0
    assert main(["audit", str(out)]) == 0
    summary = json.loads((out / "audit" / "summary.json").read_text())
    assert summary["n_questions"] == 28 and summary["n_modules"] == 14 and 0 < summary["mean_rho"] < 1
    lora = tmp_path / "lora"
    assert main(["train", "quickstart", f"output_dir={lora}", "methods=[]", "train.steps=1", "data.max_length=128"]) == 0
    capsys.readouterr()
    assert main(["audit", str(lora)]) == 2
    assert "no routed adapters to audit" in capsys.readouterr().err
