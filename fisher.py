"""FW-LoRA, the hypothesis this codebase tests: a Fisher-weighted penalty on every LoRA update ΔW_m.

  1. Warm-up (first K optimiser steps, plain LoRA): for each adapted pretrained weight W_m keep
         F_m <- α·F_m + (1 - α)·‖∇_{W_m} L‖_F²,   α = 0.98 (`decay` here)     (diagonal-Fisher proxy)
  2. Then freeze F once:  I_m = F_m / Σ_m F_m.
  3. From then on:  L = L_task + λ · Σ_m (1 - I_m) · ‖ΔW_m‖_F²,   λ = 1e-4.

Where this differs from the hypothesis's sketch code, on purpose:
  * W_m is frozen, so W_m.grad is None and the sketch's loop records nothing. ∇_W L = Gᵀ X (G: gradient
    at the layer output, X: its input, both tokens × features); hooks capture X and G and compute
    ‖GᵀX‖_F² exactly, or its unbiased random-probe estimate E_z ‖Xᵀ(G z)‖² with z ∈ {±1}^d_out
    (O(tokens·(d_in+d_out)) per probe instead of O(tokens·d_in·d_out)).
  * One backward per step (the sketch calls backward twice after warm-up: gradients double).
  * I_m exists before it is used; scores are keyed by the adapted module, not by name.split(".")[0].
  * The penalty is ‖ΔW‖_F² as the text says, via s²·tr((BᵀB)(AAᵀ)): two r × r Gram products, never the
    d_out × d_in matrix. The sketch's ‖A‖² + ‖B‖² is kept as an option (form="factors").
With 72 matrices I_m averages 1/72, so (1 - I_m) sits near 1. The controls that can refute the idea reuse
the same statistic and code (penalty_weights, every variant at the same mean weight 1 - 1/M):
  * l2lora, uniform: every weight 1 - 1/M. Does the weighting matter at all at this spread?
  * fwshuffle: FW-LoRA's weights under a seeded permutation. Same spread, random assignment: do the
    Fisher scores carry information, or only their spread?
  * fwmax: I_m = F_m / max F, so the most important matrix is not penalised at all: a sharper weighting.
  * fwrank: the signal used for hard reallocation instead (GoRA / FIM-LoRA style): a pre-pass over K
    batches (fisher_prepass), then ranks r_m ∝ I_m at uniform LoRA's parameter count (allocate_ranks),
    then plain LoRA with those ranks and no penalty.
All state (F, the probe generator, the weights) is created like the adapters it serves (device, dtype).
Tests: `python -m pytest tests/test_fisher.py`.
"""
import torch

from lora import LoRALinear, freeze_base, inject, shape_groups

WEIGHTINGS = ("sum", "max", "uniform", "shuffle")  # fwlora (the hypothesis), fwmax, l2lora, fwshuffle


def warmup_length(K: int, max_frac: float, total_steps: int) -> int:
    """K, at most max_frac of the run and at least one step (500 is 7.9% of a full 3-epoch SST-2 run)."""
    return max(1, min(K, int(max_frac * total_steps)))


def penalty_weights(F: torch.Tensor, weighting: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(importance I, weights w) from the Fisher statistic F; every weighting has mean w = 1 - 1/M (the
    hypothesis's), so all variants are compared at the same total penalty scale.
    sum: I = F / Σ F, w = 1 - I (the hypothesis). max: I = F / max F, w ∝ 1 - I (the top matrix gets 0).
    uniform: w = 1 - 1/M everywhere. shuffle: sum's weights permuted by a seeded permutation (never the identity)."""
    M = len(F)
    I = F / (F.max() if weighting == "max" else F.sum())
    w = torch.full_like(F, 1 - 1 / M) if weighting == "uniform" else 1 - I
    if weighting == "shuffle":
        g, perm = torch.Generator().manual_seed(seed), torch.arange(M)
        while M > 1 and torch.equal(perm, torch.arange(M)):
            perm = torch.randperm(M, generator=g)
        w = w[perm.to(w.device)]
    return I, w * (1 - 1 / M) / w.mean()


def allocate_ranks(importance: torch.Tensor, costs: list[int], budget: int, r_min: int, r_max: list[int]) -> list[int]:
    """fwrank: ranks r_m ∝ I_m (r_min <= r_m <= r_max_m) whose adapter count Σ r_m·cost_m stays within one unit of
    rank below `budget`: proportional shares, rounded down, then +1 by largest remainder while it fits."""
    cost = torch.tensor(costs, dtype=torch.float64)
    I = importance.double().cpu()
    share = r_min + (budget - r_min * cost.sum()) * I / (I * cost).sum()  # Σ share·cost = budget
    ranks = share.floor().clamp(r_min, None).long().tolist()
    left = budget - sum(r * c for r, c in zip(ranks, costs))
    for m in torch.argsort(share - share.floor(), descending=True, stable=True).tolist():
        if costs[m] <= left and ranks[m] < r_max[m]:
            ranks[m], left = ranks[m] + 1, left - costs[m]
    return [min(r, r_hi) for r, r_hi in zip(ranks, r_max)]


def fisher_prepass(model, rank: int, batches, autocast, *, decay: float = 0.98, estimator: str = "probe",
                   n_probes: int = 16, seed: int = 0) -> dict[str, float]:
    """fwrank's pre-pass: {module name: F_m} over `batches` (forward and backward, no optimiser step), with the
    FW-LoRA hooks on temporary rank-`rank` adapters (B = 0: the model is the pretrained one), removed after.
    Moves no parameter and draws nothing from the global RNG (dropout's draws are rolled back)."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        layers = inject(model, lambda lin: LoRALinear(lin, rank, alpha=1.0))
        freeze_base(model)
        proxy = FisherProxy(list(layers.values()), decay=decay, estimator=estimator, n_probes=n_probes, seed=seed)
        proxy.start()
        model.train()
        for batch in batches:
            with autocast():
                model(**batch).loss.backward()
            proxy.update()
        proxy.stop()
        model.zero_grad(set_to_none=True)
        for name, layer in layers.items():  # the pretrained nn.Linear back in its place
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.base)
    return dict(zip(layers, proxy.F.tolist()))


def sq_grad_norm_exact(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖∇_W L‖_F² = ‖Gᵀ X‖_F² for y = x Wᵀ; x: (..., d_in), g = ∂L/∂y: (..., d_out)."""
    x, g = x.reshape(-1, x.shape[-1]).float(), g.reshape(-1, g.shape[-1]).float()
    return (g.t() @ x).pow(2).sum()  # the d_out × d_in product the backward of W would form


def sq_grad_norm_probe(x: torch.Tensor, g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Unbiased estimate of ‖GᵀX‖_F² from k Rademacher probes z (d_out × k): mean_k ‖Xᵀ G z_k‖²."""
    x, g = x.reshape(-1, x.shape[-1]).float(), g.reshape(-1, g.shape[-1]).float()
    return (x.t() @ (g @ z)).pow(2).sum() / z.shape[1]  # (d_in × T)(T × k): O(T·k·(d_in + d_out))


class FisherProxy:
    """EMA of ‖∇_{W_m} L‖_F² for every adapted (frozen) weight, collected by hooks during warm-up."""

    def __init__(self, layers: list, *, decay: float = 0.98, estimator: str = "probe", n_probes: int = 16,
                 seed: int = 0):
        if estimator not in ("exact", "probe"):
            raise ValueError(f"fw_estimator must be 'exact' or 'probe', got {estimator!r}")
        if n_probes < 1:
            raise ValueError(f"fw_probes must be >= 1, got {n_probes}")
        self.layers, self.decay, self.estimator, self.n_probes = layers, decay, estimator, n_probes
        like = layers[0].lora_A  # fp32 master adapters (float64 in the device-move test)
        self.F = like.new_zeros(len(layers))        # the EMA statistic
        self.step_sq = like.new_zeros(len(layers))  # this step's ‖∇W‖², written by the hooks
        # Own generator: probes never touch the global RNG, so dropout masks match plain LoRA's.
        self.gen = torch.Generator(device=like.device).manual_seed(seed)
        self.handles = []

    def start(self):
        """Register one forward hook per adapted layer; it hooks the output's gradient."""
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_hook(self._forward_hook(i)))

    def stop(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _forward_hook(self, i):
        def hook(module, inputs, out):
            if out.requires_grad:  # training forward only; the base weight's own input is inputs[0]
                x = inputs[0]
                out.register_hook(lambda g: self._record(i, x, g))
        return hook

    def _record(self, i, x, g):
        with torch.no_grad():
            if self.estimator == "exact":
                self.step_sq[i] += sq_grad_norm_exact(x, g)
            else:
                z = torch.randint(0, 2, (g.shape[-1], self.n_probes), generator=self.gen,
                                  device=g.device, dtype=torch.float32).mul_(2).sub_(1)  # d_out × k, ±1
                self.step_sq[i] += sq_grad_norm_probe(x, g, z)

    @torch.no_grad()
    def update(self):
        """F <- α·F + (1 - α)·‖∇W‖² for all matrices at once; call after backward."""
        self.F.lerp_(self.step_sq, 1 - self.decay)  # F + (1 - α)(s - F) = α·F + (1 - α)·s
        self.step_sq.zero_()


class DeltaWPenalty:
    """Σ_m w_m ‖ΔW_m‖_F², batched over matrices of equal shape (a few kernels, not one per matrix)."""

    def __init__(self, layers: list, weights: torch.Tensor, form: str = "delta"):
        self.form = form
        self.groups = shape_groups(layers)
        position = {id(l): i for i, l in enumerate(layers)}
        order = torch.tensor([position[id(l)] for g in self.groups for l in g])
        self.inverse = torch.argsort(order).to(weights.device)  # group order -> layer order
        self.weights_grouped = weights[order.to(weights.device)].to(layers[0].lora_A.dtype)

    def _grouped(self) -> torch.Tensor:
        """(M,) squared norms in group order, differentiable."""
        parts = []
        for ls in self.groups:
            s = ls[0].scaling
            A = torch.stack([l.lora_A for l in ls])  # g × r × d_in
            B = torch.stack([l.lora_B for l in ls])  # g × d_out × r
            if self.form == "delta":  # ‖s·BA‖² = s²·tr(BᵀB · AAᵀ) = s²·Σ_ij (BᵀB)_ij (AAᵀ)_ij
                parts.append(s * s * ((B.mT @ B) * (A @ A.mT)).sum((1, 2)))
            else:
                parts.append(A.pow(2).sum((1, 2)) + B.pow(2).sum((1, 2)))
        return torch.cat(parts)

    def sq_norms(self) -> torch.Tensor:
        """(M,) vector of ‖ΔW_m‖_F² (or ‖A‖² + ‖B‖²) in layer order."""
        return self._grouped()[self.inverse]

    def __call__(self) -> torch.Tensor:
        return self.weights_grouped @ self._grouped()  # weights pre-permuted: no reorder on the hot path


class FWLoRA:
    """The method's schedule: Fisher warm-up for K steps, then I_m fixed and the weighted penalty on."""

    def __init__(self, layers: list, *, warmup_steps: int, decay: float = 0.98, estimator: str = "probe",
                 n_probes: int = 16, weighting: str = "sum", form: str = "delta", seed: int = 0):
        if warmup_steps < 1:
            raise ValueError(f"FW-LoRA needs at least one warm-up step to score matrices, got {warmup_steps}")
        if form not in ("delta", "factors") or weighting not in WEIGHTINGS:
            raise ValueError(f"fw_form must be 'delta' (‖ΔW‖²) or 'factors' (‖A‖²+‖B‖²), got {form!r}; "
                             f"weighting one of {WEIGHTINGS}, got {weighting!r}")
        self.layers, self.warmup_steps, self.weighting, self.form = layers, warmup_steps, weighting, form
        self.seed = seed
        self.fisher = FisherProxy(layers, decay=decay, estimator=estimator, n_probes=n_probes, seed=seed)
        self.fisher.start()
        self.importance = self.weights = self.penalty_fn = None  # exist only after end_warmup()

    @property
    def in_warmup(self) -> bool:
        return self.penalty_fn is None

    def end_warmup(self):
        """After K steps: drop the hooks, fix I_m and the weights w_m (penalty_weights: 1 - I_m for FW-LoRA)."""
        self.fisher.stop()
        F = self.fisher.F
        if not torch.isfinite(F).all() or F.sum() <= 0:
            raise FloatingPointError(f"Fisher statistics are not usable (sum {F.sum().item()}): "
                                     "did the warm-up see any gradient?")
        self.importance, self.weights = penalty_weights(F, self.weighting, self.seed)
        self.penalty_fn = DeltaWPenalty(self.layers, self.weights, self.form)

    def penalty(self) -> torch.Tensor:
        """Σ_m w_m ‖ΔW_m‖_F² (the loss adds λ times this); only after end_warmup()."""
        return self.penalty_fn()

    def diagnostics(self, names: list[str]) -> dict:
        """F_m, I_m, w_m and ‖ΔW_m‖_F per matrix, plus the spread of the weights."""
        with torch.no_grad():
            norms = DeltaWPenalty(self.layers, torch.ones_like(self.fisher.F), "delta").sq_norms().sqrt()
        out = {"per_matrix": {n: {"fisher": f, "delta_w_fro": d} for n, f, d in
                              zip(names, self.fisher.F.tolist(), norms.tolist())}}
        if not self.in_warmup:
            for n, i, w in zip(names, self.importance.tolist(), self.weights.tolist()):
                out["per_matrix"][n].update(importance=i, weight=w)
            out.update(weight_min=self.weights.min().item(), weight_max=self.weights.max().item(),
                       importance_min=self.importance.min().item(), importance_max=self.importance.max().item())
        return out
