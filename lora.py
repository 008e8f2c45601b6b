"""LoRA from scratch (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

    h = W x + ΔW x,   ΔW = (alpha / r) · B A,   A: r × d_in,  B: d_out × r        (LoRA eq. 3)

A LoRALinear *wraps* a frozen nn.Linear (composition, as lit-gpt does) and adds two thin matmuls;
ΔW is never formed while training. merge()/unmerge() fold ΔW into W explicitly, in fp32, and are
idempotent; nothing merges as a side effect of train()/eval() (loralib's eval() override did and
was never called). Every adapter parameter is named `lora_*`, so freezing and saving are one filter.

Also here: swapping named modules for adapters, freezing and the budget rule (percent -> rank);
saving and loading adapters is adapters.py. Run the tests: `python -m pytest tests/test_lora.py`.
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

# The six matrices AdaLoRA adapts in every layer: q, k, v, attention output, FFN in, FFN out.
# BERT and RoBERTa name them alike; MPNet names the attention's four attention.attn.{q,k,v,o}.
# Matched against the full module name.
DEFAULT_TARGETS = (r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.attn\.(q|k|v|o)"
                   r"|attention\.output\.dense|intermediate\.dense|output\.dense)")
# The classification head: trained, not counted in the budget (as in the papers). The official
# AdaLoRA code trains every parameter outside the encoder: RoBERTa's head has its own dense layer
# (inside `classifier`); BERT's counterpart is the pooler (dense + tanh over [CLS]), which
# all-MiniLM-L6-v2 never trained for classification, so it trains here too.
HEAD_PATTERN = re.compile(r"(classifier|score)\..*|.*\.pooler\..*")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus the low-rank update (alpha/r)·B·A."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.base, self.r, self.alpha = base, r, alpha
        self.scaling = alpha / r
        # like the weight it serves (the fp32 master)
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **like))   # r × d_in
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **like))  # d_out × r
        # A as nn.Linear inits its weight (Kaiming-uniform, a=√5), B = 0, so ΔW = 0 at step 0.
        # (loralib's comment says the reverse; its code, and this, do it this way round.)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def params_per_rank(self) -> int:
        """Adapter parameters one unit of rank costs: a column of B and a row of A."""
        return self.base.in_features + self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling · B A (d_out × d_in), in fp32: for merging and tests, not training."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def lora_path(self, x: torch.Tensor) -> torch.Tensor:
        # Scale the r-wide intermediate, not the d_out-wide output: same result, fewer multiplies.
        return F.linear(F.linear(self.lora_dropout(x), self.lora_A) * self.scaling, self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y if self.merged else y + self.lora_path(x)

    @torch.no_grad()
    def merge(self):
        """W <- W + ΔW in fp32 (idempotent)."""
        if not self.merged:
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W <- W - ΔW in fp32 (idempotent)."""
        if self.merged:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


def target_names(model: nn.Module, targets: str = DEFAULT_TARGETS) -> list[str]:
    """Names of the nn.Linear modules whose full name matches the `targets` regex."""
    pat = re.compile(targets)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pat.fullmatch(n)]


def inject(model: nn.Module, make_layer, targets: str = DEFAULT_TARGETS) -> dict[str, nn.Module]:
    """Swap every targeted nn.Linear for make_layer(linear); returns {name: adapter layer}."""
    names = target_names(model, targets)
    if not names:
        raise ValueError(f"no nn.Linear in the model matches targets={targets!r}")
    layers = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layers[name] = make_layer(getattr(parent, child))
        setattr(parent, child, layers[name])
    return layers


def is_head(name: str) -> bool:
    return HEAD_PATTERN.fullmatch(name) is not None


def freeze_base(model: nn.Module) -> None:
    """Train only adapter (`lora_*`) and classification-head parameters."""
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n or is_head(n))


def count_base_params(model: nn.Module) -> int:
    """Parameters of the pretrained model: everything except adapters and the head."""
    base = [p for n, p in model.named_parameters() if "lora_" not in n and not is_head(n)]
    return sum(p.numel() for p in base)


def rank_for_budget(budget_pct: float, n_base: int, shapes: list[tuple[int, int]]) -> int:
    """The budget rule: the smallest uniform integer rank whose adapter count reaches the budget
    (rounded up).

    One unit of rank on matrix (d_out, d_in) costs d_in + d_out parameters. On roberta-base's
    6 matrices × 12 layers (165,888 per unit of rank, 124,055,040 base parameters) 0.1 / 0.2 / 0.5%
    are 0.75 / 1.50 / 3.74 units: r = 1, 2, 4, the ranks the hypothesis's budgets mean. (Nearest
    rank would give 0.2% -> r = 1, the same run as 0.1%.) A budget under half of rank 1 is refused:
    rank 1 would overshoot it more than twice.
    """
    if not budget_pct > 0:
        raise ValueError(f"budget must be > 0 (percent of base parameters), got {budget_pct}")
    per_rank = sum(d_in + d_out for d_out, d_in in shapes)
    units = budget_pct / 100 * n_base / per_rank
    if units < 0.5:
        rank_1 = 100 * per_rank / n_base
        raise ValueError(f"budget {budget_pct}% is below half of rank 1 ({rank_1:.3f}%)"
                         f" on these {len(shapes)} matrices: raise --budget to at least "
                         f"{50 * per_rank / n_base:.3f} or adapt fewer matrices")
    r = math.ceil(units - 1e-9)  # a budget that is exactly k units (up to float error) is rank k
    r_max = min(min(s) for s in shapes)
    if r > r_max:  # the largest budget that fits, rounded down so that it still does
        fits = math.floor(100_000 * r_max * per_rank / n_base) / 1000
        raise ValueError(f"budget {budget_pct}% needs rank {r} > the smallest matrix side {r_max}: "
                         f"use --budget={fits:g} or less (rank {r_max})")
    return r


def adapter_params(layers: list, ranks: list[int] | None = None) -> int:
    """Adapter parameters of `layers` at their ranks, or at `ranks` (AdaLoRA's kept ranks)."""
    ranks = ranks or [l.r for l in layers]
    return sum(k * l.params_per_rank for k, l in zip(ranks, layers))


def shape_groups(layers: list) -> list[list]:
    """Adapter layers bucketed by (A shape, B shape, scaling): per-matrix terms batched by group."""
    groups: dict[tuple, list] = {}
    for l in layers:
        key = (tuple(l.lora_A.shape), tuple(l.lora_B.shape), l.scaling)
        groups.setdefault(key, []).append(l)
    return list(groups.values())


def group_order(layers: list) -> tuple[list[list[int]], torch.Tensor]:
    """shape_groups(layers) as layer indices, and the permutation that puts group-ordered values
    back in layer order (values_in_group_order[inverse] is in layer order)."""
    position = {id(l): i for i, l in enumerate(layers)}
    groups = [[position[id(l)] for l in g] for g in shape_groups(layers)]
    return groups, torch.argsort(torch.tensor(sum(groups, [])))


def stack_factors(layers: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one shape group, stacked (g × r × d_in, g × d_out × r), detached: for the terms
    whose gradient is added by hand (add_to_grads_), so that autograd never sends a second gradient
    back through the stack."""
    A = torch.stack([l.lora_A.detach() for l in layers])
    B = torch.stack([l.lora_B.detach() for l in layers])
    return A, B


def add_to_grads_(params: list, grads: torch.Tensor) -> None:
    """p.grad += grads[i] for every p (created if missing): one multi-tensor add, after backward."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    torch._foreach_add_([p.grad for p in params], list(grads.unbind(0)))
