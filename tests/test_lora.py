"""LoRA invariants: init = base, only adapters/head move, merge, injection, budget rule (save/load:
test_adapters)."""
import math

import pytest
import torch

from helpers import MPNET_BASE, lora_model, tiny_batch, tiny_model
from lora import (LoRALinear, adapter_params, count_base_params, freeze_base, inject, is_head,
                  rank_for_budget, target_names)


@pytest.mark.parametrize("kind", ["bert", "roberta", "mpnet"])
def test_init_output_equals_base_exactly(kind):
    base, batch = tiny_model(kind), tiny_batch()
    ref = base(**batch).logits
    model, _ = lora_model(kind)
    assert torch.equal(model(**batch).logits, ref)  # B = 0: not close, equal


def test_init_matches_comment():
    lin = torch.nn.Linear(50, 30)
    layer = LoRALinear(lin, r=4, alpha=8)
    assert torch.equal(layer.lora_B, torch.zeros(30, 4))
    bound = 1 / math.sqrt(50)  # kaiming_uniform(a=√5): gain √(1/3) · √(3/fan_in)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    assert layer.scaling == 2.0


def test_one_step_moves_only_adapters_and_head():
    model, _ = lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**tiny_batch()).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        if "lora_" in n or is_head(n):  # adapters, the classifier and (BERT) the pooler
            assert p.requires_grad
            assert moved or "lora_A" in n, n  # A gets no gradient at step 0 (B = 0)
        else:
            assert not p.requires_grad and not moved, n  # base weights bit-identical


def test_merge_idempotent_and_matches_unmerged():
    model, layers = lora_model(b_std=1.0)
    batch = tiny_batch()
    ref = model(**batch).logits
    w0 = [l.base.weight.clone() for l in layers]
    for l in layers:
        l.merge()
        l.merge()  # second merge is a no-op
    assert torch.allclose(model(**batch).logits, ref, atol=1e-5)
    for n, l in enumerate(layers):
        assert torch.allclose(l.base.weight, w0[n] + l.delta_weight(), atol=1e-6)
        l.unmerge()
        l.unmerge()
        assert torch.allclose(l.base.weight, w0[n], atol=1e-6)
    assert torch.allclose(model(**batch).logits, ref, atol=1e-5)
    model.eval()  # train()/eval() never merge
    model.train()
    assert not any(l.merged for l in layers)


SIX = {"bert": ["attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "intermediate.dense", "output.dense"],
       "mpnet": ["attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o",
                 "intermediate.dense", "output.dense"]}


@pytest.mark.parametrize("kind", ["bert", "roberta", "mpnet"])
def test_injection_hits_exactly_the_six_matrices(kind):
    model = tiny_model(kind)
    names = target_names(model)
    assert len(names) == 6 * 2
    suffixes = sorted({n.split(".layer.0.", 1)[1] for n in names if ".layer.0." in n})
    family = "mpnet" if kind == "mpnet" else "bert"  # RoBERTa names them as BERT
    assert suffixes == sorted(SIX[family])
    layers = inject(model, lambda lin: LoRALinear(lin, 2, 4.0))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == set(names) == set(layers)
    freeze_base(model)
    n_adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert n_adapter == 2 * sum(l.base.in_features + l.base.out_features for l in layers.values())
    assert n_adapter == adapter_params(list(layers.values()))
    assert adapter_params(list(layers.values()), [1] * 12) == n_adapter // 2


def test_budget_rule_on_a_real_roberta_base():
    """random-roberta-base (a RobertaForSequenceClassification with roberta-base's config), built on
    the meta device (shapes only) and counted: the published roberta-base count, and three distinct
    ranks."""
    from data import load_model
    with torch.device("meta"):
        model = load_model("random-roberta-base")[0]
    n_base, names = count_base_params(model), target_names(model)
    shapes = [tuple(model.get_submodule(n).weight.shape) for n in names]
    # 12 layers × (4 attention matrices of 768 + 768, FFN in and out of 768 + 3072) = 165,888 per
    # unit of rank
    assert len(names) == 72 and sum(a + b for a, b in shapes) == 165_888
    # roberta-base: 124.6M less the classification head (and no pooler)
    assert n_base == 124_055_040
    # three distinct ranks
    assert [rank_for_budget(b, n_base, shapes) for b in (0.1, 0.2, 0.5)] == [1, 2, 4]
    with pytest.raises(ValueError, match="below half of rank 1"):
        rank_for_budget(0.05, n_base, shapes)
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="must be > 0"):
            rank_for_budget(bad, n_base, shapes)
    with pytest.raises(ValueError, match="smallest matrix side"):
        rank_for_budget(400, n_base, shapes)


def test_budget_rule_on_mpnet_base():
    """all-mpnet-base-v2's config (helpers.MPNET_BASE; the slow test in test_mpnet.py checks it
    against the real folder) on the meta device: roberta-base's 72 matrices, 108,895,872 base
    parameters, r = 1, 2, 4."""
    from transformers import MPNetConfig, MPNetForSequenceClassification
    with torch.device("meta"):
        model = MPNetForSequenceClassification(MPNetConfig(num_labels=2, **MPNET_BASE))
    n_base, names = count_base_params(model), target_names(model)
    shapes = [tuple(model.get_submodule(n).weight.shape) for n in names]
    assert len(names) == 72 and sum(a + b for a, b in shapes) == 165_888  # as roberta-base's
    # the head (classifier.dense, classifier.out_proj) left out; no pooler
    assert n_base == 108_895_872
    n_head = sum(p.numel() for n, p in model.named_parameters() if is_head(n))
    assert n_head == 768 * 768 + 768 + 2 * 768 + 2
    # 0.66, 1.31, 3.28 units
    assert [rank_for_budget(b, n_base, shapes) for b in (0.1, 0.2, 0.5)] == [1, 2, 4]


def test_a_budget_over_the_smallest_side_says_which_budget_fits():
    """Issue 31, unclear case `--budget=5`: the refusal names the largest budget that fits. One
    4 × 8 matrix (12 parameters a unit of rank, side 4) on 1,000 base parameters: rank 4 is 4.8%,
    so 5% needs rank 5."""
    advice = "needs rank 5 > the smallest matrix side 4: use --budget=4.8 or less"
    with pytest.raises(ValueError, match=advice):
        rank_for_budget(5, 1000, [(4, 8)])
    assert rank_for_budget(4.8, 1000, [(4, 8)]) == 4  # the advice can be followed


def test_budget_count_matches_formula_at_each_budget():
    for budget in (10, 20, 40):
        model = tiny_model()
        n_base = count_base_params(model)
        names = target_names(model)
        shapes = [tuple(model.get_submodule(n).weight.shape) for n in names]
        r = rank_for_budget(budget, n_base, shapes)  # the smallest rank that reaches the budget
        inject(model, lambda lin: LoRALinear(lin, r, 1.0))
        n_adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        assert n_adapter == r * sum(a + b for a, b in shapes)
        one_unit = 100 * sum(a + b for a, b in shapes) / n_base
        assert 0 <= 100 * n_adapter / n_base - budget < one_unit  # over by less than one unit
