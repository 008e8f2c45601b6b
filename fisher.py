"""FW-LoRA, the hypothesis this codebase tests: a Fisher-weighted penalty on each LoRA update ΔW_m.

  1. Warm-up (first K optimiser steps, plain LoRA): for each adapted pretrained weight W_m keep
         F_m <- α·F_m + (1 - α)·‖∇_{W_m} L‖_F²,   α = 0.98 (`decay`)   (diagonal-Fisher proxy)
  2. Then freeze F once:  I_m = F_m / Σ_m F_m.
  3. From then on:  L = L_task + λ · Σ_m (1 - I_m) · ‖ΔW_m‖_F²,   λ = 1e-4.

Where this differs from the hypothesis's sketch code, on purpose:
  * W_m is frozen, so W_m.grad is None and the sketch's loop records nothing. ∇_W L = Gᵀ X
    (G: gradient at the layer output, X: its input, both tokens × features); hooks keep X and
    G; after backward ‖GᵀX‖_F² is computed per shape group, exactly or as its unbiased probe
    estimate E_z ‖Xᵀ(G z)‖², z ∈ {±1}^d_out: O(T·(d_in+d_out)) a probe, not O(T·d_in·d_out).
  * One backward per step (the sketch calls backward twice after warm-up: gradients double).
  * I_m exists before it is used; scores are keyed by the adapted module, not name.split(".")[0].
  * The penalty is ‖ΔW‖_F² as the text says, via s²·tr((BᵀB)(AAᵀ)): two r × r Gram
    products, never the d_out × d_in matrix. The sketch's ‖A‖² + ‖B‖² is an option
    (form="factors"). Its gradient is added to the factors' .grad by hand after the one
    backward (DeltaWPenalty.add_grad_, tested against autograd): a few batched kernels per group.
With 72 matrices I_m averages 1/72, so (1 - I_m) sits near 1. The controls that can refute the
idea reuse the same statistic and code (penalty_weights, all at the mean weight 1 - 1/M):
  * l2lora, uniform: every weight 1 - 1/M. Does the weighting matter at all at this spread?
  * fwshuffle: FW-LoRA's weights under a seeded permutation. Same spread, random assignment:
    do the Fisher scores carry information, or only their spread?
  * fwmax: I_m = F_m / max F, so the top matrix is not penalised at all: a sharper weighting.
  * fwrank: the signal used for hard reallocation instead (GoRA / FIM-LoRA style): a pre-pass
    over K batches (fisher_prepass), then ranks r_m ∝ I_m at uniform LoRA's parameter count
    (allocate_ranks), then plain LoRA with those ranks and no penalty.
All state (F, the probe generator, the weights) is made like the adapters it serves (device, dtype).
Tests: `python -m pytest tests/test_fisher.py`.
"""
import torch

from lora import LoRALinear, add_to_grads_, freeze_base, group_order, inject, shape_groups, stack_factors

# the penalised methods
WEIGHTING = {"fwlora": "sum", "l2lora": "uniform", "fwshuffle": "shuffle", "fwmax": "max"}
N_PROBES = 64  # Rademacher probes per step: the fewest measured (16, 32, 64) that pass the gate (README)
LAMBDA = 1e-4  # the hypothesis's λ, train.py's default; another λ is in the run's name (record.run_name)


def warmup_length(K: int, max_frac: float, total_steps: int) -> int:
    """K, at most max_frac of the run and at least one step (500 is 7.9% of a full 3-epoch SST-2 run)."""
    return max(1, min(K, int(max_frac * total_steps)))


def penalty_weights(F: torch.Tensor, weighting: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(importance I, weights w) from the Fisher statistic F; every weighting has mean w = 1 - 1/M
    (the hypothesis's), so all variants are compared at the same total penalty scale.
    sum: I = F / Σ F, w = 1 - I (the hypothesis). max: I = F / max F, w ∝ 1 - I (top gets 0).
    uniform: w = 1 - 1/M everywhere. shuffle: sum's weights, seeded permutation (never identity)."""
    M = len(F)
    I = F / (F.max() if weighting == "max" else F.sum())
    w = torch.full_like(F, 1 - 1 / M) if weighting == "uniform" else 1 - I
    if weighting == "shuffle":
        g, perm = torch.Generator().manual_seed(seed), torch.arange(M)
        while M > 1 and torch.equal(perm, torch.arange(M)):
            perm = torch.randperm(M, generator=g)
        w = w[perm.to(w.device)]
    return I, w * (1 - 1 / M) / w.mean()


def allocate_ranks(importance: torch.Tensor, costs: list[int], budget: int, r_min: int,
                   r_max: list[int]) -> list[int]:
    """fwrank: ranks r_m ∝ I_m (r_min <= r_m <= r_max_m) whose adapter count Σ r_m·cost_m stays
    within one unit of rank below `budget`: proportional shares, rounded down, then +1 by largest
    remainder while it fits. A share past its matrix's side r_max_m is held there and its excess
    shared among the others (water-filling): the budget is spent, not lost to the cap."""
    cost = torch.tensor(costs, dtype=torch.float64)
    I, hi = importance.double().cpu(), torch.tensor(r_max, dtype=torch.float64)
    if r_min * cost.sum() > budget or r_min > hi.min():  # train.build_method refuses it with advice
        raise ValueError(f"rank {r_min} on every matrix is over the budget {budget} or a side")
    held = torch.zeros(len(costs), dtype=torch.bool)
    while True:  # Σ share·cost = budget, held matrices at their side
        free = (I * cost)[~held].sum()
        rest = budget - (hi * cost)[held].sum() - r_min * cost[~held].sum()
        share = torch.where(held, hi, r_min + rest * I / free.clamp_min(1e-300))
        if not (share > hi).any():
            break
        held |= share > hi
    ranks = share.floor().long().tolist()
    left = budget - sum(r * c for r, c in zip(ranks, costs))
    for m in torch.argsort(share - share.floor(), descending=True, stable=True).tolist():
        if costs[m] <= left and ranks[m] < r_max[m]:
            ranks[m], left = ranks[m] + 1, left - costs[m]
    return ranks


def fisher_prepass(model, rank: int, batches, autocast, *, decay: float = 0.98,
                   estimator: str = "probe", n_probes: int = N_PROBES, seed: int = 0) -> dict[str, float]:
    """fwrank's pre-pass: {module name: F_m} over `batches` (forward and backward, no step),
    with the FW-LoRA hooks on temporary rank-`rank` adapters (B = 0: the pretrained model),
    removed after. Moves no parameter, draws nothing from the global RNG (dropout's rolled back)."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        layers = inject(model, lambda lin: LoRALinear(lin, rank, alpha=1.0))
        freeze_base(model)
        proxy = FisherProxy(list(layers.values()), decay=decay, estimator=estimator,
                            n_probes=n_probes, seed=seed)
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


def sq_grad_norms(X: torch.Tensor, G: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
    """‖∇W_m‖_F² = ‖G_mᵀ X_m‖_F² for a stack of g matrices of one shape (y = x Wᵀ):
    X (g × T × d_in) the inputs, G = ∂L/∂y (g × T × d_out). Exact (forms the g × d_out × d_in
    products the backward of W would), or with Rademacher probes z (d_out × k) the unbiased
    estimate mean_k ‖X_mᵀ G_m z_k‖²: O(T·k·(d_in + d_out))."""
    if z is None:
        return (G.mT @ X).float().pow(2).sum((1, 2))
    return (X.mT @ (G @ z)).float().pow(2).sum((1, 2)) / z.shape[1]  # squares summed in fp32


class FisherProxy:
    """EMA of ‖∇_{W_m} L‖_F² for every adapted (frozen) weight. Hooks only keep each layer's
    input X and output gradient G (references, no kernels); update() turns them into the
    statistic and takes one EMA step for all M. How depends on what bounds the device: on a GPU
    (launch-bound) per shape group, a stack and two batched products, tens of kernels in all; on
    a CPU (memory-bound) per distinct input, no stacks, each X read once: q, k and v share
    theirs, so their probed gradients are multiplied with it in one product."""

    def __init__(self, layers: list, *, decay: float = 0.98, estimator: str = "probe",
                 n_probes: int = N_PROBES, seed: int = 0, batched: bool | None = None):
        if estimator not in ("exact", "probe"):
            raise ValueError(f"fw_estimator must be 'exact' or 'probe', got {estimator!r}")
        if n_probes < 1:
            raise ValueError(f"fw_probes must be >= 1, got {n_probes}")
        self.layers, self.decay, self.estimator, self.n_probes = layers, decay, estimator, n_probes
        like = layers[0].lora_A  # fp32 master adapters (float64 in the device-move test)
        self.batched = like.device.type == "cuda" if batched is None else batched  # else by input
        self.F = like.new_zeros(len(layers))  # the EMA statistic
        self.groups, inverse = group_order(layers)
        self.inverse = inverse.to(like.device)  # group order -> layer order
        self.d_out = max(l.base.out_features for l in layers)
        self.x, self.g = [None] * len(layers), [None] * len(layers)  # this step's, set by the hooks
        # Own generator: probes never touch the global RNG, so dropout masks match plain LoRA's.
        self.gen = torch.Generator(device=like.device).manual_seed(seed)
        self.handles = []

    def start(self):
        """One forward hook per adapted layer: it keeps the input, hooks the output's gradient."""
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_hook(self._forward_hook(i)))

    def stop(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _forward_hook(self, i):
        def hook(module, inputs, out):
            if out.requires_grad:  # training forward only; the base weight's own input is inputs[0]
                self.x[i] = inputs[0]
                out.register_hook(lambda g: self.g.__setitem__(i, g))
        return hook

    @torch.no_grad()
    def step_sq(self) -> torch.Tensor:
        """(M,) this step's ‖∇W_m‖², layer order, from the kept X and G (then released). One probe
        matrix per step serves every matrix (its first d_out rows): each estimate stays unbiased."""
        if any(t is None for t in self.x + self.g):
            raise RuntimeError("the Fisher hooks saw no training forward and backward of every adapted layer")
        # The probes' products run in the output gradients' dtype, as the step's matmuls do: bf16
        # under autocast (fp32 accumulation; ±1 is exact in bf16). exact (the gate's reference): fp32.
        dt = self.g[0].dtype if self.estimator == "probe" else torch.float32
        z = None if self.estimator == "exact" else torch.randint(
            0, 2, (self.d_out, self.n_probes), generator=self.gen, device=self.F.device,
            dtype=torch.float32).mul_(2).sub_(1).to(dt)  # ±1
        rows = {}  # id of each distinct input -> (it as T × d_in in dt, cast once; the layers it feeds)
        for i, x in enumerate(self.x):
            if id(x) not in rows:
                rows[id(x)] = (x.reshape(-1, x.shape[-1]).to(dt), [])
            rows[id(x)][1].append(i)
        grads = [g.reshape(-1, g.shape[-1]).to(dt) for g in self.g]  # T × d_out each
        sq = self._by_group(rows, grads, z) if self.batched else self._by_input(rows, grads, z)
        self.x, self.g = [None] * len(self.layers), [None] * len(self.layers)
        return sq

    def _by_group(self, rows: dict, grads: list, z) -> torch.Tensor:
        """Per shape group: stacks of T × d inputs and gradients, two batched products."""
        X_of = {i: X for X, users in rows.values() for i in users}
        parts = []
        for idx in self.groups:
            X, G = torch.stack([X_of[i] for i in idx]), torch.stack([grads[i] for i in idx])
            parts.append(sq_grad_norms(X, G, None if z is None else z[:G.shape[-1]]))
        return torch.cat(parts)[self.inverse]

    def _by_input(self, rows: dict, grads: list, z) -> torch.Tensor:
        """Per distinct input X (T × d_in) and the n layers it feeds: their probed gradients side
        by side, U = [G_1 z … G_n z] (T × n·k), then one product Xᵀ U (d_in × n·k), squared and
        summed per layer."""
        sq = self.F.new_empty(len(self.layers))
        for X, users in rows.values():
            if z is None:
                exact = [(grads[i].mT @ X).float().pow(2).sum() for i in users]
                sq[users] = torch.stack(exact).to(sq)
                continue
            U = torch.cat([grads[i] @ z[:grads[i].shape[-1]] for i in users], dim=1)
            V = (X.mT @ U).float().view(X.shape[1], len(users), -1)  # d_in × n × k
            sq[users] = (V.pow(2).sum((0, 2)) / z.shape[1]).to(sq)
        return sq

    @torch.no_grad()
    def update(self):
        """F <- α·F + (1 - α)·‖∇W‖² for all matrices at once; call after backward."""
        self.F.lerp_(self.step_sq().to(self.F.dtype), 1 - self.decay)  # F + (1 - α)(s - F)


class DeltaWPenalty:
    """Σ_m w_m ‖ΔW_m‖_F², batched over matrices of one shape (a few kernels, not one a matrix)."""

    def __init__(self, layers: list, weights: torch.Tensor, form: str = "delta"):
        self.form = form
        self.groups = shape_groups(layers)
        groups, inverse = group_order(layers)
        order = torch.tensor(sum(groups, []))
        self.inverse = inverse.to(weights.device)  # group order -> layer order
        w = weights[order.to(weights.device)].to(layers[0].lora_A.dtype)
        self.weights_grouped = w  # weights pre-permuted: no reorder on the hot path
        self.w_by_group = list(w.split([len(g) for g in self.groups]))
        self.coef = None  # (λ, [per group, g × 1 × 1 gradient factors]), made by add_grad_

    def _grouped(self) -> torch.Tensor:
        """(M,) squared norms in group order, differentiable (the definition; add_grad_ by hand)."""
        parts = []
        for ls in self.groups:
            s = ls[0].scaling
            A = torch.stack([l.lora_A for l in ls])  # g × r × d_in
            B = torch.stack([l.lora_B for l in ls])  # g × d_out × r
            if self.form == "delta":  # ‖s·BA‖² = s²·Σ_ij (BᵀB)_ij (AAᵀ)_ij
                parts.append(s * s * ((B.mT @ B) * (A @ A.mT)).sum((1, 2)))
            else:
                parts.append(A.pow(2).sum((1, 2)) + B.pow(2).sum((1, 2)))
        return torch.cat(parts)

    def sq_norms(self) -> torch.Tensor:
        """(M,) vector of ‖ΔW_m‖_F² (or ‖A‖² + ‖B‖²) in layer order."""
        return self._grouped()[self.inverse]

    def __call__(self) -> torch.Tensor:
        return self.weights_grouped @ self._grouped()

    @torch.no_grad()
    def add_grad_(self, lam: float) -> torch.Tensor:
        """After backward: add the gradient of λ·Σ w_m ‖ΔW_m‖² to every factor's .grad; return
        that term's value (what the loss gains). ‖s·BA‖² = s²⟨BᵀB, AAᵀ⟩, so
        ∇_A = 2s²w·(BᵀB)A and ∇_B = 2s²w·B(AAᵀ) (factors: 2w·A, 2w·B). Per shape group: two
        stacks, four small batched products, a dot, and one multi-tensor add per factor, where
        autograd through the stack would send a second gradient into each of the 2M factors."""
        if self.coef is None or self.coef[0] != lam:
            s2 = [ls[0].scaling ** 2 if self.form == "delta" else 1 for ls in self.groups]
            self.coef = (lam, [w.view(-1, 1, 1) * (2 * lam * s) for s, w in zip(s2, self.w_by_group)])
        total = 0.0
        for ls, c in zip(self.groups, self.coef[1]):
            A, B = stack_factors(ls)
            if self.form == "delta":
                BtB, AAt = B.mT @ B, A @ A.mT
                BtBc, AAtc = BtB * c, AAt * c
                gA, gB = BtBc @ A, B @ AAtc
                total = total + torch.vdot(BtB.flatten(), AAtc.flatten())  # Σ 2λs²w⟨BᵀB, AAᵀ⟩
            else:
                gA, gB = A * c, B * c
                total = total + (torch.vdot(gA.flatten(), A.flatten()) + torch.vdot(gB.flatten(), B.flatten()))
            add_to_grads_([l.lora_A for l in ls], gA)
            add_to_grads_([l.lora_B for l in ls], gB)
        return total / 2


class FWLoRA:
    """The method's schedule: Fisher warm-up for K steps, then I_m fixed and the penalty on."""

    def __init__(self, layers: list, *, warmup_steps: int, decay: float = 0.98,
                 estimator: str = "probe", n_probes: int = N_PROBES, weighting: str = "sum",
                 form: str = "delta", seed: int = 0):
        if warmup_steps < 1:
            raise ValueError(f"FW-LoRA needs at least one warm-up step to score matrices, got {warmup_steps}")
        if form not in ("delta", "factors") or weighting not in WEIGHTING.values():
            raise ValueError(f"fw_form must be 'delta' (‖ΔW‖²) or 'factors' (‖A‖²+‖B‖²), "
                             f"got {form!r}; weighting one of {tuple(WEIGHTING.values())}, "
                             f"got {weighting!r}")
        self.layers, self.warmup_steps, self.weighting, self.form = layers, warmup_steps, weighting, form
        self.seed = seed
        self.fisher = FisherProxy(layers, decay=decay, estimator=estimator, n_probes=n_probes, seed=seed)
        self.fisher.start()
        self.importance = self.weights = self.penalty_fn = None  # exist only after end_warmup()

    @property
    def in_warmup(self) -> bool:
        return self.penalty_fn is None

    def end_warmup(self):
        """After K steps: drop the hooks, fix I_m and the weights w_m (1 - I_m for FW-LoRA)."""
        self.fisher.stop()
        F = self.fisher.F
        if not torch.isfinite(F).all() or F.sum() <= 0:
            raise FloatingPointError(f"Fisher statistics are not usable (sum {F.sum().item()}): "
                                     "did the warm-up see any gradient?")
        self.importance, self.weights = penalty_weights(F, self.weighting, self.seed)
        self.penalty_fn = DeltaWPenalty(self.layers, self.weights, self.form)

    def penalty(self) -> torch.Tensor:
        """Σ_m w_m ‖ΔW_m‖_F², differentiable (the definition); only after end_warmup()."""
        return self.penalty_fn()

    def add_penalty_grad_(self, lam: float) -> torch.Tensor:
        """After backward: λ·penalty()'s gradient added to the factors' .grad; returns λ·penalty()."""
        return self.penalty_fn.add_grad_(lam)

    def diagnostics(self, names: list[str]) -> dict:
        """F_m, I_m and w_m per matrix, and the weights' spread (‖ΔW_m‖_F: every method's, record.py)."""
        out = {"per_matrix": {n: {"fisher": f} for n, f in zip(names, self.fisher.F.tolist())}}
        if not self.in_warmup:
            for n, i, w in zip(names, self.importance.tolist(), self.weights.tolist()):
                out["per_matrix"][n].update(importance=i, weight=w)
            w, I = self.weights, self.importance
            out.update(weight_min=w.min().item(), weight_max=w.max().item(),
                       importance_min=I.min().item(), importance_max=I.max().item())
        return out
