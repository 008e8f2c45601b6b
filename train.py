"""Fine-tune an encoder on GLUE SST-2 / CoLA with one method: LoRA, AdaLoRA, FW-LoRA, its controls
(l2lora, fwshuffle, fwmax, fwrank; fisher.py) or the head-only floor.

    python train.py --task=sst2 --method=fwlora --budget=0.2 --max_train=8000 --epochs=1 --lr=2e-3
    python train.py --help    # every Config field: default, unit and where the default comes from
    python train.py --model=M --task=T --eval_adapters=results/<run>.peft  # its adapters on dev

Top to bottom (Config, its checks and the device and precision are in config.py; evaluation in
evaluate.py): build_method(), prepare() (a run's whole state, `Run`),
train_step(run, batch, step) (each method's extra work is one commented line where it acts),
run_epoch(), train(cfg): check -> prepare -> loop -> finish, which writes <name>.json
(.partial.json per epoch, .error.json on failure: record.py).

Random streams, all derived from `seed`: the global torch RNG (seeded once in prepare(): random
models, adapter and head init, dropout); the training subset (Generator(seed), data.make_batches);
the batch order (Generator(1000·seed + epoch), Run.epoch); FW-LoRA's probes (their own
Generator(seed), fisher.py).
"""
import dataclasses
import itertools
import math
import re
import signal
import sys
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from adalora import AdaLoRALinear, RankAllocator, ada_initial_rank, check_schedule
from config import Config, autocast_for, check_config, resolve_device, resolve_precision
from data import Batches, load_model, make_batches, provenance
from evaluate import evaluate, evaluate_adapters
from fisher import WEIGHTING, FWLoRA, allocate_ranks, fisher_prepass, warmup_length
from lora import (LoRALinear, adapter_params, count_base_params, freeze_base, inject,
                  rank_for_budget, target_names)
from record import (Clock, environment, failure_kept, finish, parse_args, plain_output,
                    result_paths, write_json)


@dataclass
class Method:
    """What build_method adds to a model: the adapter layers and the method's own state."""
    layers: dict                  # module name -> LoRALinear / AdaLoRALinear
    ada: RankAllocator | None     # AdaLoRA's allocator
    fw: FWLoRA | None             # FW-LoRA's statistic, schedule and penalty
    info: dict                    # the budget arithmetic, recorded in the result


def build_method(cfg: Config, model, total_steps: int, prepass=None) -> Method:
    """Freeze the base, inject adapters, build the method's state: all like the model's weights
    (device, dtype). prepass(rank, K) -> {matrix: F_m}: fwrank's Fisher pre-pass (prepare() runs
    it on the run's clock)."""
    n_base, names = count_base_params(model), target_names(model)
    shapes = [tuple(model.get_submodule(n).weight.shape) for n in names]  # (d_out, d_in)
    r = rank_for_budget(cfg.budget, n_base, shapes)
    info = {"n_base_params": n_base, "n_matrices": len(names), "rank": r,
            "target_budget_pct": cfg.budget}
    # K steps: FW-LoRA's warm-up, fwrank's pre-pass
    K = warmup_length(cfg.fw_warmup_steps, cfg.fw_warmup_max_frac, total_steps)
    ada = fw = None
    if cfg.method == "adalora":
        r0 = ada_initial_rank(r, cfg.ada_init_ratio)
        smallest = min(min(s) for s in shapes)
        if r0 > smallest:  # an SVD triplet per unit of rank: at most the smallest side
            raise ValueError(f"AdaLoRA's initial rank {r0} (--ada_init_ratio="
                             f"{cfg.ada_init_ratio:g} × rank {r}) exceeds the smallest matrix "
                             f"side {smallest}: lower --ada_init_ratio or --budget")
        # -1: 10% and 40% of T
        t_init = cfg.ada_t_init if cfg.ada_t_init >= 0 else round(0.1 * total_steps)
        t_final = cfg.ada_t_final if cfg.ada_t_final >= 0 else round(0.4 * total_steps)
        check_schedule(total_steps, t_init, t_final, cfg.ada_delta_t)  # before touching the model
        layers = inject(model, lambda lin: AdaLoRALinear(lin, r0, cfg.lora_alpha, cfg.lora_dropout))
        ada = RankAllocator(list(layers.values()), b_target=r * len(names), total_steps=total_steps,
                            t_init=t_init, t_final=t_final, delta_t=cfg.ada_delta_t,
                            beta1=cfg.ada_beta1, beta2=cfg.ada_beta2)
        info.update(ada_init_rank=r0, ada_target_total_rank=r * len(names),
                    t_init=t_init, t_final=t_final)
    elif cfg.method == "head":  # the floor: no adapters, the head trained as in every method
        layers = {}
    elif cfg.method in ("lora", "fwrank", *WEIGHTING):
        # LoRA and the FW variants at rank r; fwrank at ranks r_m ∝ I_m (0: no adapter) with
        # uniform LoRA's adapter count
        ranks = dict.fromkeys(names, r)
        if cfg.method == "fwrank" and cfg.fw_rank_min > r:  # before the pre-pass: it cannot fit
            raise ValueError(f"--fw_rank_min={cfg.fw_rank_min} on all {len(names)} matrices is "
                             f"over the budget, rank {r} on each: use --fw_rank_min <= {r}, or "
                             "raise --budget")
        if cfg.method == "fwrank":
            F = torch.tensor(list(prepass(r, K).values()))
            importance = F / F.sum()
            costs = [d_in + d_out for d_out, d_in in shapes]
            sides = [min(s) for s in shapes]
            allocated = allocate_ranks(importance, costs, r * sum(costs), cfg.fw_rank_min, sides)
            ranks = dict(zip(names, allocated))
            info.update(fw_prepass_steps=K, fwrank_ranks=ranks,
                        fwrank_importance=dict(zip(names, importance.tolist())))
        rank_of = {id(model.get_submodule(n)): k for n, k in ranks.items()}

        def lora_layer(lin):
            return LoRALinear(lin, rank_of[id(lin)], cfg.lora_alpha, cfg.lora_dropout)
        targets = "|".join(re.escape(n) for n, k in ranks.items() if k > 0)
        layers = inject(model, lora_layer, targets)
    else:  # a method in record.NAMES without a branch here would otherwise train as something else
        raise ValueError(f"build_method has no branch for method {cfg.method!r}: add one "
                         "(README, Adding a method)")
    if cfg.method in WEIGHTING:
        fw = FWLoRA(list(layers.values()), warmup_steps=K, decay=cfg.fw_alpha,
                    estimator=cfg.fw_estimator, n_probes=cfg.fw_probes,
                    weighting=WEIGHTING[cfg.method], form=cfg.fw_form, seed=cfg.seed)
        info["fw_warmup_steps"] = K
    freeze_base(model)
    # at init (AdaLoRA: before pruning)
    info["initial_adapter_params"] = adapter_params(list(layers.values()))
    return Method(layers, ada, fw, info)


@dataclass
class Run:
    """One run's whole state: what train() loops over and bench.py interleaves."""
    cfg: Config
    device: torch.device
    autocast: object              # context factory: bf16 autocast or nullcontext
    precision: str                # the resolved precision, bf16 | fp32 (recorded in the result)
    model: torch.nn.Module
    train_b: Batches
    dev_b: Batches
    method: Method
    opt: torch.optim.Optimizer
    T: int                        # optimiser steps in the run
    clock: Clock
    loss_sum: torch.Tensor        # this epoch's summed task loss, on the device (no sync per step)
    bad_step: torch.Tensor        # first step (1-based) whose loss was NaN/inf;
                                  # -1 if none; on the device
    n_loss: int = 0
    steps: int = 0                # optimiser steps completed (run_epoch counts them)
    # (step, task loss, added terms) at each readout
    penalty_log: list = field(default_factory=list)

    def epoch(self, epoch: int):
        """Train mode (dropout on), then the epoch's batches on the device, in seeded order."""
        self.model.train()
        self.loss_sum.zero_()
        self.n_loss = 0
        seed = self.cfg.seed * 1000 + epoch
        for batch in self.train_b.batches(seed, self.cfg.group_by_length):
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


def get_lr(step: int, cfg: Config, T: int) -> float:
    """HF's linear schedule: warm up over ⌈warmup_ratio·T⌉ steps, then decay to 0.
    `step` counts from 0."""
    warm = math.ceil(cfg.warmup_ratio * T)
    return cfg.lr * (step / warm if step < warm else max(0.0, (T - step) / max(1, T - warm)))


def prepare(cfg: Config, data: tuple | None = None) -> Run:
    """Seed, model, data, adapters, optimiser: the same cfg gives the same run, in any process.
    data: (train, dev) Batches to use instead of GLUE (tests, benchmarks); making them draws
    no global RNG."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.model)
    positions = model.config.max_position_embeddings
    if model.config.model_type in ("roberta", "mpnet"):  # their position ids start after the pad id
        positions -= model.config.pad_token_id + 1
    if cfg.max_length > positions:
        raise ValueError(f"--max_length={cfg.max_length} exceeds {cfg.model}'s {positions} "
                         f"positions: use at most {positions}")
    need = tok.num_special_tokens_to_add() + 1 if tok else 1  # tok None: a test's model, given data
    if cfg.max_length < need:  # below this the tokenizer silently stops truncating
        raise ValueError(f"--max_length={cfg.max_length} leaves no room for a word after "
                         f"{cfg.model}'s {need - 1} special tokens: use at least {need}")
    train_b, dev_b = data or make_batches(cfg.task, cfg.glue_dir, tok, cfg.max_length,
                                          cfg.batch_size, cfg.max_train, cfg.max_eval, cfg.seed,
                                          cfg.heldout)
    T = cfg.epochs * len(train_b)
    model.to(device)  # first, so adapters and every piece of method state are born on the device
    precision, why = resolve_precision(cfg.precision, device.type)
    print(f"precision: {precision} ({why})")
    clock, autocast = Clock(device), autocast_for(device, precision)

    def prepass(rank: int, K: int) -> dict:
        """fwrank: the Fisher pre-pass over the first K training batches, timed."""
        batches = itertools.islice(train_b.batches(cfg.seed * 1000, cfg.group_by_length), K)
        on_device = ({k: v.to(device) for k, v in b.items()} for b in batches)
        with clock("prepass"):
            return fisher_prepass(model, rank, on_device, autocast, decay=cfg.fw_alpha,
                                  estimator=cfg.fw_estimator, n_probes=cfg.fw_probes,
                                  seed=cfg.seed)
    method = build_method(cfg, model, T, prepass)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")
    method.info["n_trainable_params"] = sum(p.numel() for p in trainable)
    return Run(cfg, device, autocast, precision, model, train_b, dev_b, method, opt, T, clock,
               torch.zeros((), device=device), torch.full((), -1, device=device))


def train_step(run: Run, batch: dict, step: int):
    """One optimiser step. `step` = steps completed before it (HF's and the official AdaLoRA code's
    global_step). Returns (loss with the method's terms, task loss), detached; no host sync."""
    cfg, ada, fw, clock = run.cfg, run.method.ada, run.method.fw, run.clock
    with clock("step"):
        with run.autocast():
            loss = run.model(**batch).loss
        loss.backward()  # one backward per step, whatever the method
        loss = loss.detach()
        task_loss = loss
        # The methods' terms on the adapter factors: their value added to the loss, their gradient
        # to .grad by hand (a few batched kernels, equal to autograd's: tests), before clipping, as
        # if in the backward.
        if ada:  # AdaLoRA: + γ·R(P, Q), the orthogonality regulariser (eq. 4)
            with clock("orth"):
                loss = loss + ada.add_orth_grad_(cfg.ada_gamma)
        if fw and not fw.in_warmup:  # FW-LoRA: + λ Σ_m (1 - I_m) ‖ΔW_m‖_F² (after warm-up)
            with clock("penalty"):
                loss = loss + fw.add_penalty_grad_(cfg.fw_lambda)
        # FW-LoRA warm-up: F_m <- αF_m + (1-α)‖∇W_m‖² from this backward's hooks
        if fw and fw.in_warmup:
            with clock("fisher"):
                fw.fisher.update()
        # as the HF Trainer: AdaLoRA's sensitivities then use clipped gradients
        if cfg.max_grad_norm > 0:
            params = run.opt.param_groups[0]["params"]
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=True)
        for group in run.opt.param_groups:
            group["lr"] = get_lr(step, cfg, run.T)
        run.opt.step()
        if ada:  # AdaLoRA: importance EMAs and rank masks, after the step, before zero_grad
            with clock("allocator"):
                ada.update_and_mask(step)
        run.opt.zero_grad(set_to_none=True)
        # FW-LoRA: after K steps, fix I_m = F_m / Σ F, penalty on
        if fw and step + 1 == fw.warmup_steps:
            check_finite(run, step, loss)  # a NaN loss in the warm-up named as such (one sync)
            fw.end_warmup()
    run.bad_step = torch.where((run.bad_step < 0) & ~torch.isfinite(loss), step + 1, run.bad_step)
    run.loss_sum += task_loss
    run.n_loss += 1
    return loss, task_loss


def check_finite(run: Run, step: int = 0, loss: torch.Tensor | None = None) -> None:
    """Raise if a loss so far was NaN or inf; `loss` is this step's, not yet in run.bad_step."""
    bad = run.bad_step.item()
    if bad < 0 and loss is not None and not torch.isfinite(loss):
        bad = step + 1
    if bad >= 0:
        raise FloatingPointError(f"the loss became NaN or inf at step {bad}: lower --lr or check "
                                 "the data")


def run_epoch(run: Run, epoch: int) -> None:
    """One pass over the training set; run.steps counts the optimiser steps completed."""
    cfg, fw = run.cfg, run.method.fw
    bar = tqdm(run.epoch(epoch), total=len(run.train_b), desc=f"epoch {epoch + 1}", leave=False,
               disable=None)
    for batch in bar:  # (moved to the device outside the clock)
        loss, task_loss = train_step(run, batch, run.steps)
        run.steps += 1
        step = run.steps
        if step % cfg.log_every == 0:  # the loop's only host sync
            check_finite(run)
            bar.set_postfix(loss=f"{run.loss_sum.item() / run.n_loss:.4f}")
            if fw and not fw.in_warmup:
                run.penalty_log.append((step, task_loss.item(), (loss - task_loss).item()))
    check_finite(run)
    run.clock.collect()


def record_setup(run: Run, result: dict, glue: bool) -> None:
    """Refuse a penalised run with no penalised step; put the budget, environment and data (the
    GLUE files by digest: the sweep's resume compares them) in the result; say in one line what
    the run trains."""
    cfg, ada, fw, info = run.cfg, run.method.ada, run.method.fw, run.method.info
    if fw and fw.warmup_steps >= run.T:  # T = 1, or --fw_warmup_max_frac=1
        raise ValueError(f"--method={cfg.method}: its Fisher warm-up (K = {fw.warmup_steps}) "
                         f"takes the whole run (T = {run.T} steps), so the penalty never acts: "
                         "give the run more steps (--epochs, --max_train) or a shorter warm-up "
                         "(--fw_warmup_steps)")
    data = provenance(cfg.task, cfg.glue_dir) if glue else {"source": "given"}
    result.update(budget=info, environment=environment(run.device), data=data,
                  precision=run.precision)
    rank = info.get("ada_init_rank", info["rank"])
    pruned = f" pruned to total rank {ada.b_target}" if ada else ""
    print(f"{cfg.task} {cfg.method} budget {cfg.budget}%: rank {rank} on {info['n_matrices']} "
          f"matrices, {info['initial_adapter_params']:,} adapter params{pruned}, {run.T} steps")


def train(cfg: Config, data: tuple | None = None) -> dict:
    """Train one (task, method, budget, seed); return the result dict, also written as JSON."""
    # a rejected flag is not a run: no file (the sweep checks every run's flags up front)
    check_config(cfg)
    paths = result_paths(cfg)
    result = {"config": dataclasses.asdict(cfg), "status": "running", "epochs": []}
    run = None

    def steps_done() -> int:  # read when a failure is recorded: how far the run got
        return run.steps if run else 0
    # any failure from here on leaves <name>.error.json
    with failure_kept(result, paths, steps_done):
        run = prepare(cfg, data)
        record_setup(run, result, glue=data is None)
        for epoch in range(cfg.epochs):
            run_epoch(run, epoch)
            dev, train_loss = evaluate(run), run.loss_sum.item() / run.n_loss
            row = {"epoch": epoch + 1, "train_loss": train_loss, **dev, "steps": run.steps}
            result["epochs"].append(row)
            print(f"epoch {epoch + 1}: train loss {train_loss:.4f}  "
                  f"dev accuracy {dev['accuracy']:.4f}  MCC {dev['mcc']:.4f}")
            write_json(paths["partial"], result)  # survives a crash: per-epoch metrics so far
        ada = run.method.ada
        if ada and ada.calls != run.steps:
            raise RuntimeError(f"the AdaLoRA allocator ran {ada.calls} times in {run.steps} steps")
    return finish(run, result, paths, run.steps)  # writes <name>.json (and the adapters if asked)


def main(argv: list[str]) -> int:
    """train.py's command line (the sweep's workers call it too): a one-line error and exit 1 on bad
    input or a failed run, 130 when stopped; the .error.json says how far it got."""
    plain_output()
    for sig in (signal.SIGTERM, signal.SIGHUP):  # the sweep stopping, a closed terminal: as Ctrl-C
        signal.signal(sig, signal.default_int_handler)
    cfg = parse_args(argv, Config, __doc__)
    try:
        if cfg.eval_adapters:
            evaluate_adapters(cfg)
        else:
            train(cfg)
    except (ValueError, RuntimeError, OSError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
