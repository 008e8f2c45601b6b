"""AdaLoRA: init, the budget schedule, masking, the importance EMAs, orthogonality, the error
guard."""
from types import SimpleNamespace

import pytest
import torch

from adalora import (AdaLoRALinear, RankAllocator, add_orth_grad_, budget_schedule, check_schedule,
                     orth_regularizer)
from helpers import tiny_batch, tiny_model
from lora import freeze_base, inject, shape_groups


def ada_model(r=3, alpha=8.0, kind="bert"):
    model = tiny_model(kind)
    layers = list(inject(model, lambda lin: AdaLoRALinear(lin, r, alpha)).values())
    freeze_base(model)
    return model, layers


def test_init_output_equals_base_and_official_init():
    base, batch = tiny_model(), tiny_batch()
    model, layers = ada_model()
    assert torch.equal(model(**batch).logits, base(**batch).logits)  # E = 0
    l = layers[0]
    assert torch.equal(l.lora_E, torch.zeros(3, 1)) and l.scaling == 8.0 / 3
    A = torch.cat([l.lora_A.flatten() for l in layers])
    assert abs(A.std().item() - 0.02) < 0.003 and abs(A.mean().item()) < 0.003


def test_delta_weight_formula_and_merge():
    _, layers = ada_model()
    l = layers[0]
    torch.nn.init.normal_(l.lora_E)
    x = torch.randn(5, l.base.in_features)
    want = l.base(x) + x @ (l.lora_B @ (l.lora_A * l.lora_E) * l.scaling).t()
    torch.testing.assert_close(l(x), want)
    l.merge()
    torch.testing.assert_close(l(x), want, atol=1e-5, rtol=1e-5)


def test_schedule_matches_formula_and_never_increases():
    b0, bT, T, ti, tf, dt = 60, 20, 1000, 100, 300, 10
    # g = steps completed before this one
    bs = [budget_schedule(g, b0, bT, T, ti, tf, dt) for g in range(T)]
    assert bs[ti] == (b0, False)                          # g = t_init: no masking yet
    assert bs[T - tf] == (bT, (T - tf) % dt == 0)         # g = T - t_final: target reached
    # b = bT + (b0 − bT)(1 − (g − t_i)/(T − t_f − t_i))³, rounded down, worked by hand
    # (T − t_f − t_i = 600):
    #   g = 101: 20 + 40·(599/600)³ = 59.80;   250: 20 + 40·0.75³ = 36.875;
    #   g = 333: 20 + 40·(367/600)³ = 29.15;   400: 20 + 40·0.5³ = 25 exactly;
    #   g = 599: 20 + 40·(1/600 + 1/6)³ = 20.19.
    # Masks where g % ΔT == 0.
    hand = {101: (59, False), 250: (36, True), 333: (29, False), 400: (25, True), 599: (20, False)}
    assert {g: bs[g] for g in hand} == hand
    assert all(b == (bT, True) for b in bs[T - tf + 1:])  # final phase: mask every step
    assert all(a[0] >= b[0] for a, b in zip(bs, bs[1:]))  # never increases
    assert not any(m for _, m in bs[:ti + 1])


def masked_steps(T, t_init, t_final, delta_t):
    """1-based optimiser steps on which a real allocator masks E, driven as train.py drives it."""
    model, layers = ada_model(r=3)
    alloc = RankAllocator(layers, b_target=len(layers), total_steps=T, t_init=t_init,
                          t_final=t_final, delta_t=delta_t)
    seen, real = [], alloc.mask_to_budget

    def mask_and_record(b):
        seen.append(n)
        return real(b)
    alloc.mask_to_budget = mask_and_record
    # the n-th optimiser step; the allocator gets n - 1 (official global_step)
    for n in range(1, T + 1):
        for l in layers:
            torch.nn.init.normal_(l.lora_E)
        model.zero_grad()
        model(**tiny_batch(n)).loss.backward()
        alloc.update_and_mask(n - 1)
    return seen, alloc


def test_masks_fall_on_the_official_steps():
    """Worked out by hand from the official trainer: update_and_mask(global_step) before
    global_step += 1. T = 40, t_init = 6, t_final = 10, delta_t = 4: the decreasing phase masks at
    global_step 8, 12, ..., 28 (<= T - t_final = 30, divisible by 4), i.e. on steps 9, 13, ..., 29;
    the final phase (global_step > 30) masks on every step from step 32 on, the first of them
    ranking with frozen scores and the rest reusing it."""
    seen, alloc = masked_steps(40, 6, 10, 4)
    assert seen[0] == 9                         # the first mask: the 9th optimiser step
    assert [s for s in seen if s <= 31][-1] == 29  # the last mask of the decreasing phase
    assert seen[-1] == 32                       # the first final-phase mask (then cached:
                                                # no new ranking)
    assert seen == [9, 13, 17, 21, 25, 29, 32]
    assert alloc.calls == 40 and sum(alloc.rank_pattern()) == alloc.b_target


def test_emas_see_steps_1_to_T_minus_t_final():
    model, layers = ada_model(r=3)
    alloc = RankAllocator(layers, b_target=len(layers), total_steps=20, t_init=2, t_final=5,
                          delta_t=3)
    updates = []
    alloc.update_ipt = lambda: updates.append(alloc.calls)
    for n in range(1, 21):
        alloc.update_and_mask(n - 1)
    assert updates == list(range(1, 16))  # steps 1 … T - t_final = 15; frozen from step 16 on


def test_schedule_must_end_at_the_target():
    too_short = "AdaLoRA needs at least 3 optimiser steps, this run has T=1"
    check_schedule(10, 2, 2, 5)         # last step (index 9) is in the final phase
    check_schedule(10, 2, 1, 3)         # index 9 = T - t_final, and 9 % 3 == 0: masks to target
    with pytest.raises(ValueError, match="raise --ada_t_final"):
        check_schedule(10, 2, 1, 4)     # index 9 would not mask: would end over budget
    with pytest.raises(ValueError, match=too_short):
        check_schedule(1, 0, 0, 10)     # T = 1 (was: "ok" at 0.269% against 0.2%)
    check_schedule(3, 0, 2, 10)         # the shortest schedule that ends at its target


def test_schedule_guard_message():
    with pytest.raises(ValueError, match="lower --ada_t_init or --ada_t_final"):
        check_schedule(100, 60, 40, 10)
    _, layers = ada_model()
    with pytest.raises(ValueError, match="T > t_init \\+ t_final"):
        RankAllocator(layers, b_target=6, total_steps=10, t_init=5, t_final=5, delta_t=1)


def test_ema_and_triplet_scores_by_hand():
    """Two triplets of one 2 × 3 matrix: triplet 0's entries (row 0 of A, E_0, column 0 of B) are
    1, triplet 1's are 2; every gradient is 2 on step 1 and 0.5 on step 2; β1 = 0.8, β2 = 0.7.
    Worked by hand, triplet 0:
      step 1: I = 2, Ī = 0.2·2 = 0.4, Ū = 0.3·|2 − 0.4| = 0.48;
      step 2: I = 0.5, Ī = 0.8·0.4 + 0.2·0.5 = 0.42, Ū = 0.7·0.48 + 0.3·|0.5 − 0.42| = 0.36;
      score per entry 0.42·0.36 = 0.1512, triplet 3·0.1512 = 0.4536.
    Triplet 1 (I doubles): Ī = 0.84, Ū = 0.72, triplet 3·0.6048 = 1.8144."""
    layer = AdaLoRALinear(torch.nn.Linear(3, 2), r=2, alpha=2.0)
    alloc = RankAllocator([layer], b_target=1, total_steps=100, t_init=10, t_final=10, delta_t=5,
                          beta1=0.8, beta2=0.7)
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 1, 1], [2, 2, 2]]))  # r × d_in
        layer.lora_E.copy_(torch.tensor([[1.0], [2]]))             # r × 1
        layer.lora_B.copy_(torch.tensor([[1.0, 2], [1, 2]]))       # d_out × r
    for g in (2.0, 0.5):
        for p in alloc.params:
            p.grad = torch.full_like(p, g)
        alloc.update_ipt()
    torch.testing.assert_close(alloc.ema_ipt[1], torch.tensor([[0.42], [0.84]]))  # E's Ī
    torch.testing.assert_close(alloc.ema_unc[1], torch.tensor([[0.36], [0.72]]))  # E's Ū
    torch.testing.assert_close(alloc.ema_unc[0], torch.tensor([[0.36] * 3, [0.72] * 3]))  # A's Ū
    torch.testing.assert_close(alloc.triplet_scores(), torch.tensor([0.4536, 1.8144]))


@pytest.mark.parametrize("ties", [False, True])
def test_masking_keeps_exactly_the_scheduled_number(ties):
    _, layers = ada_model()
    alloc = RankAllocator(layers, b_target=6, total_steps=100, t_init=10, t_final=10, delta_t=5)
    b0 = alloc.b0
    if not ties:
        for e in alloc.ema_ipt:
            e.copy_(torch.rand_like(e))
        for e in alloc.ema_unc:
            e.fill_(1.0)
    # with ties every score is 0: the official "<= threshold" would prune all; here exactly b stay
    for b in (b0, b0 - 1, 17, 6, 1):
        keep = alloc.mask_to_budget(b)
        assert int(sum(k.sum() for k in keep)) == b
    if not ties:  # the kept triplets are the b best
        scores, keep = alloc.triplet_scores(), torch.cat(alloc.mask_to_budget(10)).view(-1)
        assert scores[keep == 1].min() >= scores[keep == 0].max()


def test_orthogonality_term_zero_for_orthonormal_and_gradcheck():
    lin = torch.nn.Linear(8, 6).double()
    layers = [AdaLoRALinear(lin, 3, 1.0).double()]
    q_a, _ = torch.linalg.qr(torch.randn(8, 3, dtype=torch.double))
    q_b, _ = torch.linalg.qr(torch.randn(6, 3, dtype=torch.double))
    with torch.no_grad():
        layers[0].lora_A.copy_(q_a.t())  # orthonormal rows
        layers[0].lora_B.copy_(q_b)      # orthonormal columns
    assert orth_regularizer(shape_groups(layers)).item() < 1e-12
    a = torch.randn(3, 8, dtype=torch.double, requires_grad=True)
    b = torch.randn(6, 3, dtype=torch.double, requires_grad=True)
    want = (torch.linalg.norm(a @ a.t() - torch.eye(3, dtype=torch.double))
            + torch.linalg.norm(b.t() @ b - torch.eye(3, dtype=torch.double))) / 2

    def f(a, b):  # a stand-in layer holding plain tensors, so gradcheck can differentiate
        return orth_regularizer([[SimpleNamespace(lora_A=a, lora_B=b)]])
    torch.testing.assert_close(f(a, b), want)
    assert torch.autograd.gradcheck(f, (a, b))


def test_orthogonality_gradient_added_by_hand_equals_autograds():
    """add_orth_grad_ (after backward, batched, one multi-tensor add per factor) = autograd of
    γ·R, value too; an exactly orthonormal factor (norm 0) gets gradient 0 from its term, as from
    autograd."""
    _, layers = ada_model(r=3)
    _, more = ada_model(kind="roberta", r=2)
    layers += more
    with torch.no_grad():  # one factor exactly orthonormal: its norm is 0
        layers[0].lora_A.copy_(torch.eye(3, layers[0].lora_A.shape[1]))
    params = [p for l in layers for p in (l.lora_A, l.lora_B)]
    groups, gamma = shape_groups(layers), 0.3
    value = gamma * orth_regularizer(groups)
    want = torch.autograd.grad(value, params)
    for p in params:
        p.grad = torch.ones_like(p)
    torch.testing.assert_close(add_orth_grad_(groups, gamma), value.detach())
    for p, g in zip(params, want):
        torch.testing.assert_close(p.grad, 1 + g, rtol=1e-5, atol=1e-7)


def test_short_run_prunes_to_target_and_final_mask_is_frozen():
    model, layers = ada_model(r=3)
    M, T = len(layers), 40
    alloc = RankAllocator(layers, b_target=M, total_steps=T, t_init=4, t_final=10, delta_t=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    previous = None
    for step in range(T):  # steps completed before this one (the official global_step)
        (model(**tiny_batch(step)).loss + 0.1 * alloc.orth_reg()).backward()
        opt.step()
        b = alloc.update_and_mask(step)
        opt.zero_grad()
        kept = sum(alloc.rank_pattern())  # masks applied so far
        if step > T - 10:  # the final phase
            assert b == M and kept == M
            assert sum(int((l.lora_E != 0).sum()) for l in layers) == M  # E really zeroed
            if previous is not None:  # frozen: the same triplets as on the step before
                assert all(torch.equal(a, b) for a, b in zip(previous, alloc.keep))
            previous = [k.clone() for k in alloc.keep]
    assert previous is not None and alloc.calls == T and sum(alloc.rank_pattern()) == M
