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
With 72 matrices I_m averages 1/72, so (1 - I_m) sits near 1: the uniform ablation ("l2lora": every
weight set to the mean 1 - 1/M, so the total penalty scale matches) tests whether the weighting matters.
All state (F, the probe generator, the weights) is created like the adapters it serves (device, dtype).
Tests: `python -m pytest tests/test_fisher.py`.
"""
import torch

from lora import shape_groups


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
                 n_probes: int = 16, uniform: bool = False, form: str = "delta", seed: int = 0):
        if warmup_steps < 1:
            raise ValueError(f"FW-LoRA needs at least one warm-up step to score matrices, got {warmup_steps}")
        if form not in ("delta", "factors"):
            raise ValueError(f"fw_form must be 'delta' (‖ΔW‖²) or 'factors' (‖A‖²+‖B‖²), got {form!r}")
        self.layers, self.warmup_steps, self.uniform, self.form = layers, warmup_steps, uniform, form
        self.fisher = FisherProxy(layers, decay=decay, estimator=estimator, n_probes=n_probes, seed=seed)
        self.fisher.start()
        self.importance = self.weights = self.penalty_fn = None  # exist only after end_warmup()

    @property
    def in_warmup(self) -> bool:
        return self.penalty_fn is None

    def end_warmup(self):
        """After K steps: drop the hooks, I_m = F_m / Σ F_m, weights w_m = 1 - I_m (or all 1 - 1/M)."""
        self.fisher.stop()
        F = self.fisher.F
        if not torch.isfinite(F).all() or F.sum() <= 0:
            raise FloatingPointError(f"Fisher statistics are not usable (sum {F.sum().item()}): "
                                     "did the warm-up see any gradient?")
        self.importance = F / F.sum()
        self.weights = torch.full_like(F, 1 - 1 / len(F)) if self.uniform else 1 - self.importance
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
