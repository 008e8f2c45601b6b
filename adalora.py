"""AdaLoRA (Zhang et al., ICLR 2023), as the official code behaves (QingruZhang/AdaLoRA,
loralib/adalora.py).

  ΔW = B · (A ⊙ E) · alpha / r_init                                                (eq. 3)
       A: r × d_in, E: r × 1 ("singular values"), B: d_out × r
  I(p) = |p · ∂L/∂p|;  Ī <- β1·Ī + (1-β1)·I;  Ū <- β2·Ū + (1-β2)·|I - Ī|;  s(p) = Ī·Ū  (eq. 8-10)
  triplet i of matrix m: S = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)              (eq. 11)
  keep the b(t) best triplets of all matrices, zeroing E of the rest; b(t) cubic    (eq. 12)
  loss += γ · mean over A and B of ‖AAᵀ - I‖_F, ‖BᵀB - I‖_F (not squared, each step) (eq. 4)

Where the paper and the official code differ, this follows the code (and says so where it happens).
peft calls t_init/t_final/delta_t `tinit`/`tfinal`/`deltaT`.

Step index: the official trainer calls the allocator with HF's `global_step` *before* incrementing
it, the number of optimiser steps completed before this one (0 on the first step); so does peft's
example. Every `step` in this file is that count: with t_init = 6 and delta_t = 4 the first mask
falls on the 9th step.

One deliberate change: the official mask zeroes every triplet whose score is <= the k-th smallest,
so tied scores prune more than scheduled; here ties are broken by position and exactly b(t) triplets
stay. Scores are read after an EMA update that used the stepped E, so in normal training no two are
equal; ties need exactly-zero gradients (e.g. a matrix that no example reached), and only then does
this differ.

Speed: the score EMAs are a handful of multi-tensor (torch._foreach_*) ops over every A, E, B at
once; the ranking runs only on masking steps, and in the final phase (frozen scores) the mask is
cached. Tests: `python -m pytest tests/test_adalora.py`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import LoRALinear, add_to_grads_, shape_groups, stack_factors


class AdaLoRALinear(LoRALinear):
    """LoRALinear with an SVD-shaped update: adds lora_E; the divisor stays the initial rank."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, r, alpha, dropout)  # scaling = alpha / r_init, never rescaled
        self.lora_E = nn.Parameter(torch.zeros_like(self.lora_A[:, :1]))  # r × 1, starts at 0
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)  # official init, unlike LoRA's
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    @property
    def params_per_rank(self) -> int:
        """A triplet: a row of A, a column of B and one entry of E."""
        return super().params_per_rank + 1

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.float() @ (self.lora_A.float() * self.lora_E.float()))

    def lora_path(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.lora_dropout(x), self.lora_A * self.lora_E) * self.scaling  # ... × r
        return F.linear(h, self.lora_B)


def orth_regularizer(groups: list[list]) -> torch.Tensor:
    """Σ ‖AAᵀ - I‖_F + ‖BᵀB - I‖_F divided by the number of factors (2M), as the official code does.

    `groups` is lora.shape_groups(layers): one batched Gram per shape, not two kernels per matrix.
    """
    total, n = 0.0, 0
    for ls in groups:
        A = torch.stack([l.lora_A for l in ls])  # g × r × d_in
        B = torch.stack([l.lora_B for l in ls])  # g × d_out × r
        eye = torch.eye(A.shape[1], device=A.device, dtype=A.dtype)
        total = total + torch.linalg.matrix_norm(A @ A.mT - eye).sum() \
                      + torch.linalg.matrix_norm(B.mT @ B - eye).sum()
        n += 2 * len(ls)
    return total / n


EYES: dict = {}  # (r, device, dtype) -> the identity: made once, not every step


@torch.no_grad()
def add_orth_grad_(groups: list[list], gamma: float) -> torch.Tensor:
    """After backward: add the gradient of γ·orth_regularizer(groups) to every A and B .grad;
    return its value.

        ∇_A ‖AAᵀ - I‖_F = 2(AAᵀ - I)A / ‖AAᵀ - I‖_F
        ∇_B ‖BᵀB - I‖_F = 2B(BᵀB - I) / ‖BᵀB - I‖_F

    (0 where the norm is 0, as autograd's). Batched per shape group with one multi-tensor add per
    factor: no second gradient sent back through a stack into each of the 2M factors."""
    n = 2 * sum(len(ls) for ls in groups)
    total = 0.0
    for ls in groups:
        A, B = stack_factors(ls)
        key = (A.shape[1], A.device, A.dtype)
        eye = EYES.get(key)
        if eye is None:
            eye = EYES[key] = torch.eye(A.shape[1], device=A.device, dtype=A.dtype)
        P, Q = A @ A.mT - eye, B.mT @ B - eye
        nP, nQ = torch.linalg.matrix_norm(P), torch.linalg.matrix_norm(Q)
        total = total + nP.sum() + nQ.sum()
        cP = torch.where(nP > 0, (2 * gamma / n) / nP, 0.0).view(-1, 1, 1)
        cQ = torch.where(nQ > 0, (2 * gamma / n) / nQ, 0.0).view(-1, 1, 1)
        add_to_grads_([l.lora_A for l in ls], (P * cP) @ A)
        add_to_grads_([l.lora_B for l in ls], B @ (Q * cQ))
    return gamma * total / n


def check_schedule(total_steps: int, t_init: int, t_final: int, delta_t: int) -> None:
    """Fail before training on a schedule with no decreasing phase, or one that cannot end at the
    target budget."""
    if total_steps < 3:  # the shortest schedule that ends at its target: t_init 0, t_final 2, T 3
        raise ValueError(f"AdaLoRA needs at least 3 optimiser steps, this run has T={total_steps}: "
                         "train longer (more --epochs or --max_train, or a smaller --batch_size)")
    if total_steps <= t_init + t_final:
        raise ValueError(f"AdaLoRA needs total steps T > t_init + t_final, got T={total_steps}, "
                         f"t_init={t_init}, t_final={t_final}: lower --ada_t_init or --ada_t_final "
                         f"(or train longer) so a budget-decreasing phase exists")
    last = total_steps - 1  # the last step's index (steps completed before it)
    in_final_phase, target_reached = last > total_steps - t_final, last == total_steps - t_final
    if not (in_final_phase or (target_reached and last % delta_t == 0)):
        also = ""
        if t_init + 2 >= total_steps:
            also = f" and lower --ada_t_init to at most {total_steps - 3}"
        raise ValueError(f"AdaLoRA's last step (index {last}) would not mask to the target budget "
                         f"with T={total_steps}, t_final={t_final}, delta_t={delta_t}: raise "
                         f"--ada_t_final to at least 2{also} (or train longer) so the run ends at "
                         "exactly its target rank")


def budget_schedule(step: int, b0: int, b_target: int, total_steps: int, t_init: int, t_final: int,
                    delta_t: int) -> tuple[int, bool]:
    """(total rank b(t), mask now?) at `step` = optimiser steps completed before it (official).

    The paper prints an extra t_final in the numerator of the cubic; the code's form reaches b_target
    exactly at T - t_final and is used here.
    """
    if step <= t_init:
        return b0, False
    if step > total_steps - t_final:
        return b_target, True
    frac = 1 - (step - t_init) / (total_steps - t_final - t_init)
    return int(b_target + (b0 - b_target) * frac ** 3), step % delta_t == 0


class RankAllocator:
    """Importance EMAs over every A, E, B entry, and the global top-b(t) triplet mask on E."""

    def __init__(self, layers: list, *, b_target: int, total_steps: int, t_init: int, t_final: int,
                 delta_t: int, beta1: float = 0.85, beta2: float = 0.85):
        check_schedule(total_steps, t_init, t_final, delta_t)
        self.layers, self.M = layers, len(layers)
        self.ranks0 = [l.r for l in layers]
        self.b0 = sum(self.ranks0)
        if not 1 <= b_target <= self.b0:
            raise ValueError(f"AdaLoRA target total rank {b_target} must lie in [1, initial "
                             f"{self.b0}]")
        self.b_target, self.T = b_target, total_steps
        self.t_init, self.t_final, self.delta_t = t_init, t_final, delta_t
        self.beta1, self.beta2 = beta1, beta2
        self.params = ([l.lora_A for l in layers] + [l.lora_E for l in layers]
                       + [l.lora_B for l in layers])  # A of every matrix, then every E, then every B
        # State is created like the parameters it serves (device, dtype): build it after the model's move.
        self.ema_ipt = [torch.zeros_like(p) for p in self.params]  # Ī
        self.ema_unc = [torch.zeros_like(p) for p in self.params]  # Ū
        self.keep = [torch.ones_like(l.lora_E) for l in layers]     # last mask applied (1 = kept)
        self.final_keep = None                                       # the final phase's mask
        self.groups = shape_groups(layers)
        self.calls = 0

    def orth_reg(self) -> torch.Tensor:
        """The orthogonality term R(P, Q) over this allocator's matrices, differentiable (the definition)."""
        return orth_regularizer(self.groups)

    def add_orth_grad_(self, gamma: float) -> torch.Tensor:
        """After backward: the gradient of γ·R(P, Q) added to the factors' .grad; returns γ·R(P, Q)."""
        return add_orth_grad_(self.groups, gamma)

    @torch.no_grad()
    def update_ipt(self):
        """Ī, Ū <- EMAs of I = |p·∂L/∂p| for all entries at once (6 multi-tensor ops)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        ipt = torch._foreach_mul(self.params, grads)
        torch._foreach_abs_(ipt)
        torch._foreach_lerp_(self.ema_ipt, ipt, 1 - self.beta1)  # Ī + (1-β1)(I - Ī) = β1·Ī + (1-β1)·I
        torch._foreach_sub_(ipt, self.ema_ipt)                    # I - Ī, with the new Ī (official)
        torch._foreach_abs_(ipt)
        torch._foreach_lerp_(self.ema_unc, ipt, 1 - self.beta2)

    @torch.no_grad()
    def triplet_scores(self) -> torch.Tensor:
        """(b0,) score of every triplet, matrices in layer order: s(E_i) + mean s(A_i·) + mean s(B_·i)."""
        s = torch._foreach_mul(self.ema_ipt, self.ema_unc)
        M = self.M
        return torch.cat([s[M + m].view(-1) + s[m].mean(1) + s[2 * M + m].mean(0) for m in range(M)])

    @torch.no_grad()
    def mask_to_budget(self, b: int) -> list[torch.Tensor]:
        """Keep exactly the b best triplets (ties broken by position); zero E elsewhere."""
        order = torch.argsort(self.triplet_scores(), stable=True)  # ascending
        keep = torch.ones(self.b0, device=order.device, dtype=self.keep[0].dtype)
        keep[order[: self.b0 - b]] = 0.0
        return [k.view(-1, 1) for k in keep.split(self.ranks0)]

    @torch.no_grad()
    def update_and_mask(self, step: int) -> int:
        """Call once per optimiser step, after optimizer.step() and the lr update, before zero_grad, with
        `step` = steps completed before this one (the official trainer's global_step)."""
        self.calls += 1
        if step < self.T - self.t_final:  # the EMAs see steps 1 … T - t_final; frozen after (official)
            self.update_ipt()
        b, mask_now = budget_schedule(step, self.b0, self.b_target, self.T, self.t_init, self.t_final,
                                      self.delta_t)
        if mask_now:
            if step > self.T - self.t_final:  # frozen scores and budget: the same mask every step
                if self.final_keep is None:
                    self.final_keep = self.mask_to_budget(b)
                self.keep = self.final_keep
            else:
                self.keep = self.mask_to_budget(b)
            torch._foreach_mul_([l.lora_E for l in self.layers], self.keep)
        return b

    def rank_pattern(self) -> list[int]:
        """Kept rank of every matrix after the last mask."""
        return [int(k.sum().item()) for k in self.keep]


def ada_initial_rank(r_target: int, init_ratio: float) -> int:
    """Initial rank per matrix: about init_ratio × the target average (paper: b0 ≈ 1.5·bT)."""
    return max(r_target + 1, math.ceil(init_ratio * r_target))
