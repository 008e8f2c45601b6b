"""Speed, side by side: each method as a ratio to plain LoRA, in one process where the runs take
turns step by step (machine noise hits all alike), built by train.prepare() and stepped by
train.train_step().

    python bench.py          # ops per step on roberta-base's structure, then per step, every
                             # VARIANT, MiniLM, real SST-2 batches: ratios, achieved rate vs the
                             # matmul peak, Fisher estimator error
    python bench.py --model=mpnet --precision=bf16 --budget=0.2 \
        --variants=lora,fwlora_warmup_probe64,adalora
        # the base model: the same, for the variants named (--steps=30 by default)
    python bench.py ops --model=random-roberta-base --device=cpu --precision=bf16 --batch_size=4
        # ops alone
    python bench.py fisher --task=cola --epochs=2 --lr=1e-3 --budget=0.5 --seeds=0,1,2 \
        --out_dir=published/fisher
        # the Fisher estimator against exact on real warm-ups (README, Fisher estimator);
        # --probes=16,32,64 checks several probe counts on the same warm-ups
    python bench.py gpu      # GPU acceptance (a few minutes): roberta-base's shapes, bf16, real
                             # SST-2 batches, 300 steps, every method; PASS/FAIL per criterion,
                             # exit 1 on a FAIL or without CUDA
    python bench.py runs --methods=lora,fwlora,adalora --task=sst2 --max_train=8000 --epochs=1 --lr=2e-3
        # whole runs; a method may carry its own fields: --methods=lora,lora:group_by_length=false
    OMP_NUM_THREADS=1 python bench.py runs ... --clock=cpu   # on cores shared with other jobs: CPU time
"""
import collections
import dataclasses
import itertools
import os
import re
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

from data import hub_reachable, synthetic
from record import (METHODS, Clock, environment, parse_args, plain_output, run_name, timing_file,
                    train_ms, write_json)
from stats import spearman
from train import Config, check_config, check_finite, evaluate, prepare, train_step

WARM = dict(fw_warmup_steps=10**9, fw_warmup_max_frac=1.0)  # FW-LoRA's Fisher warm-up on every step
VARIANTS = {  # per-step mode: name -> Config overrides
    "lora": dict(method="lora"),
    "fwlora_warmup_probe16": dict(method="fwlora", fw_probes=16, **WARM),
    "fwlora_warmup_probe32": dict(method="fwlora", fw_probes=32, **WARM),
    "fwlora_warmup_probe64": dict(method="fwlora", fw_probes=64, **WARM),
    "fwlora_warmup_exact": dict(method="fwlora", fw_estimator="exact", **WARM),
    "fwlora_penalised": dict(method="fwlora", fw_warmup_steps=1),  # one warm-up step, then penalised
    "l2lora_penalised": dict(method="l2lora", fw_warmup_steps=1),
    "adalora": dict(method="adalora", ada_t_init=0, ada_t_final=2),  # decreasing: a mask every 10 steps
    # ranks and mask every step
    "adalora_masking": dict(method="adalora", ada_t_init=0, ada_t_final=2, ada_delta_t=1),
}


CLOCKS = {False: "wall (perf_counter; CUDA events on a GPU)", True: "process CPU time, one thread"}


def rng_state(device, state: tuple | None = None) -> tuple:
    """The global RNG streams a run draws its dropout masks from: set to `state` if given, returned."""
    if state:
        torch.set_rng_state(state[0]), state[1] is not None and torch.cuda.set_rng_state(state[1], device)
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def interleave(cfgs: dict, data: tuple | None = None, steps: int | None = None, warm: int = 3,
               cpu_time: bool = False) -> dict:
    """{name: Config} -> {name: train.Run}, prepared (one tokenised data set for all) and trained one
    step each in turn, for all their epochs or the first `steps`. First, off the clock, a throwaway
    copy of each run takes `warm` steps: the process's one-off set-up (CUDA context, cuBLAS handles,
    kernels, the allocator) is then paid by no method's clock, and the timed runs are untouched (each
    is prepared afresh from its seed). cpu_time (--clock=cpu): every run's clock counts the process's
    CPU time (record.Clock)."""
    runs, rng = {}, {}
    for m, cfg in cfgs.items():
        check_config(cfg)
        throwaway = prepare(cfg, data)
        data = (throwaway.train_b, throwaway.dev_b)
        for step, batch in zip(range(warm), throwaway.epoch(0)):
            train_step(throwaway, batch, step)
    del throwaway
    for m, cfg in cfgs.items():
        runs[m] = prepare(cfg, data)
        runs[m].clock = Clock(runs[m].device, cpu_time)
        rng[m] = rng_state(runs[m].device)  # where train() would start drawing dropout masks
    total = steps or next(iter(runs.values())).T
    # map binds each r
    streams = [itertools.chain.from_iterable(map(r.epoch, range(r.cfg.epochs))) for r in runs.values()]
    in_turn = itertools.islice(zip(*streams), total)
    for step, batches in enumerate(tqdm(in_turn, total=total, disable=None)):
        for (m, r), batch in zip(runs.items(), batches):
            rng_state(r.device, rng[m])  # each run's dropout masks from its own stream (off the clock)
            train_step(r, batch, step)
            rng[m] = rng_state(r.device)
    for r in runs.values():
        r.clock.collect()
        check_finite(r)
    return runs


def matmul_rate(device, dtype, m: int = 2048, k: int = 2048, n: int = 2048,
                cpu_time: bool = False) -> float:
    """GFLOP/s of an (m × k) @ (k × n) matmul here, the median of 10 after a warm-up (2048³: the
    peak a step is compared with)."""
    a, w = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    clock = Clock(device, cpu_time)
    for _ in range(11):
        with clock("mm"):
            a @ w
    clock.collect()
    return 2 * m * k * n / sorted(clock.ms["mm"][1:])[5] / 1e6


def show(title: str, table: dict, cols: tuple) -> None:
    print(f"\n{title}\n| name | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 1) + "|")
    for m, row in table.items():
        print(f"| {m} | " + " | ".join(cell(row.get(c, "-")) for c in cols) + " |")


def cell(value) -> str:
    """A table cell: a float to 4 significant digits, anything else as it prints."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def step_flops(run, batch) -> float:
    """Useful FLOPs on real tokens: forward and input-gradient backward of each adapted (frozen: no
    weight gradient) matmul, 4·d_in·d_out per token; attention, 12·length·d per token and layer;
    adapters left out."""
    n, c = batch["attention_mask"].sum(1).double(), run.model.config
    per_token = 4 * sum(l.base.in_features * l.base.out_features for l in run.method.layers.values())
    return float(per_token * n.sum() + 12 * c.num_hidden_layers * c.hidden_size * n.pow(2).sum())


def real_batches(cfg: Config, n_steps: int) -> tuple:
    """(train, dev) Batches of real sentences of cfg.task (the shipped GLUE copy): n_steps training
    batches."""
    from data import load_model, make_batches
    tokenizer = load_model(cfg.model)[1]
    return make_batches(cfg.task, cfg.glue_dir, tokenizer, cfg.max_length, cfg.batch_size,
                        n_steps * cfg.batch_size, 64, cfg.seed)


def gemm_floor(run, batches: list, dtype, cpu_time: bool = False) -> dict:
    """The step's own frozen GEMMs (forward x Wᵀ and the input gradient of each adapted matrix) at
    their rate measured here, on the median padded batch: what the step would cost if it were those
    matmuls alone."""
    # padded: all are multiplied
    tokens = sorted(int(x["input_ids"].numel()) for x in batches)[len(batches) // 2]
    layers = run.method.layers.values()
    shapes = collections.Counter((l.base.in_features, l.base.out_features) for l in layers)
    rates, ms = {}, 0.0
    for (d_in, d_out), count in shapes.items():
        for k, n in ((d_in, d_out), (d_out, d_in)):  # forward, then the input gradient
            shape = f"{tokens}x{k}x{n}"
            if shape not in rates:  # each distinct shape measured once
                rates[shape] = matmul_rate(run.device, dtype, tokens, k, n, cpu_time)
            ms += count * 2 * tokens * k * n / rates[shape] / 1e6
    return {"tokens_padded_median": tokens, "gflop_per_s_by_shape": rates, "gemm_ms_per_step": ms}


def top_ops(run, batch, step: int, n: int = 8) -> dict:
    """{op: ms of its own (self) time on the host} in one profiled training step: a CPU step's time."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(run, batch, step)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:n]
    return {e.key: round(e.self_cpu_time_total / 1e3, 2) for e in rows}


def steps(b: Config, n_steps: int = 30, skip: int = 6, data: tuple | None = None,
          variants: tuple = tuple(VARIANTS), cpu_time: bool = False) -> dict:
    """`variants` on the same batches (real ones of b.task unless `data`): ms/step, buckets, memory
    (GPU); the achieved rate on real tokens against this process's matmul peak and against the
    step's own GEMMs."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "lora" not in variants:
        raise ValueError(f"--variants: {unknown or 'no lora (the baseline)'}: "
                         f"choose from {', '.join(VARIANTS)}")
    data = data or real_batches(b, n_steps)
    cfgs = {v: dataclasses.replace(b, epochs=1, **VARIANTS[v]) for v in variants}
    runs = interleave(cfgs, data, n_steps, cpu_time=cpu_time)
    lora, table = runs["lora"], {}
    # every run's batches
    batches = list(itertools.islice(lora.train_b.batches(b.seed * 1000, b.group_by_length), n_steps))
    flops = [step_flops(lora, x) for x in batches]
    for v, r in runs.items():
        ms = r.clock.ms["step"]
        buckets = {k: round(sum(t) / n_steps, 3) for k, t in r.clock.ms.items() if k != "step"}
        table[v] = {"ms_per_step_median": float(torch.tensor(ms[skip:]).median()),
                    "ms_per_step_mean": sum(ms[skip:]) / len(ms[skip:]),  # a whole run's time follows it
                    "gflop_per_s": sum(flops[skip:]) / sum(ms[skip:]) / 1e6,
                    "buckets_ms_per_step": buckets}
        table[v]["ratio"] = table[v]["ms_per_step_median"] / table["lora"]["ms_per_step_median"]
        table[v]["mean_ratio"] = table[v]["ms_per_step_mean"] / table["lora"]["ms_per_step_mean"]
        # memory one more step needs above what is resident (every run's model and state)
        if r.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(r.device)
            resident = torch.cuda.memory_allocated(r.device)
            # in the variant's own phase (warm-up variants: still warming)
            train_step(r, next(r.epoch(0)), n_steps)
            table[v]["step_peak_mb"] = (torch.cuda.max_memory_allocated(r.device) - resident) / 2**20
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peak = {p: matmul_rate(lora.device, dt, cpu_time=cpu_time) for p, dt in dtypes.items()}
    env = environment(lora.device)
    show(f"{b.model} ({lora.precision}), budget {b.budget}%, {env['device_name']}, "
         f"median of {n_steps - skip} steps; 2048² matmul here: {peak['fp32']:.0f} GFLOP/s fp32, "
         f"{peak['bf16']:.0f} bf16", table,
         ("ms_per_step_median", "ratio", "mean_ratio", "gflop_per_s", "step_peak_mb",
          "buckets_ms_per_step"))
    floor = gemm_floor(lora, batches, dtypes["bf16" if lora.precision == "bf16" else "fp32"], cpu_time)
    ops_ms = top_ops(lora, batches[0], n_steps)
    step_ms, rate, p = table["lora"]["ms_per_step_median"], table["lora"]["gflop_per_s"], lora.precision
    real = sum(int(x["attention_mask"].sum()) for x in batches)
    padding = sum(x["input_ids"].numel() for x in batches) / real
    gemm_ms = floor["gemm_ms_per_step"]
    print(f"\nLoRA: {rate:.0f} GFLOP/s on real tokens, {rate / peak[p]:.0%} of the 2048² {p} peak; "
          f"padded tokens {padding:.2f}x the real ones")
    print(f"  its frozen GEMMs alone at their own rate ({floor['tokens_padded_median']} padded tokens): "
          f"{gemm_ms:.0f} ms of its {step_ms:.0f} ({gemm_ms / step_ms:.0%})")
    largest = ", ".join(f"{k} {v:g}" for k, v in ops_ms.items())
    print("  its largest ops (self ms in one profiled step): " + largest)
    out = {"config": dataclasses.asdict(b), "environment": env, "precision": p,
           "clock": CLOCKS[cpu_time], "matmul_peak_gflop_per_s": peak,
           "variants": table, "gemm_floor": floor, "lora_top_ops_ms": ops_ms,
           "tokens_per_step": real / n_steps}
    if "fwlora_warmup_exact" in runs:
        # Warm-up steps are plain LoRA steps (the probes have their own RNG): every warm-up variant
        # saw the same gradients, so each estimator's importance I_m can be checked against the
        # exact one's, matrix by matrix.
        F = {u: r.method.fw.fisher.F for u, r in runs.items() if u.startswith("fwlora_warmup")}
        I = {u: f / f.sum() for u, f in F.items()}
        I_exact = I["fwlora_warmup_exact"]
        err = {u: (i - I_exact).abs() / I_exact for u, i in I.items()}
        fisher = {u: {"I_rel_err_median": e.median().item(), "I_rel_err_max": e.max().item()}
                  for u, e in err.items()}
        show(f"I_m's relative error vs the exact estimator ({n_steps} steps)", fisher,
             tuple(fisher["fwlora_warmup_exact"]))
        out["fisher_estimator"] = fisher
    write_json(os.path.join(b.out_dir, f"bench_steps_{b.model}_{p}_{lora.device.type}.json"), out)
    return out


NO_KERNEL = ("_unsafe_view",)  # a view whose schema does not say so; every other view op is marked is_view


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active, views left out: each is a kernel launch on a GPU
    (a fused or multi-tensor op counts once, as it launches a few), the launch-bound cost of a small
    model's step."""

    def __init__(self):
        super().__init__()
        self.n = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in NO_KERNEL:
            self.n[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def ops(b: Config, variants: dict = VARIANTS, warm: int = 3) -> dict:
    """Ops per training step of every variant on `b`'s model (roberta-base's structure by default:
    72 adapters), counted on the CPU under bf16 autocast, with the fused AdamW and the Fisher
    statistic's CUDA layout, as a CUDA run steps. Counts do not depend on sizes, so the batches are
    tiny. The step counted is the `warm`-th: AdaLoRA's variant between masks masks on steps 0, 10,
    ...; its masking variant on every step."""
    data, table = synthetic(8 * b.batch_size, b.batch_size, b.batch_size, seq_len=16, vocab=20000), {}
    for v, over in variants.items():
        run = prepare(dataclasses.replace(b, epochs=1, **over), data)
        run.opt = torch.optim.AdamW(run.opt.param_groups[0]["params"], lr=b.lr, fused=True)  # as on CUDA
        # the Fisher statistic's CUDA layout (per shape group), not the CPU's (per input)
        if run.method.fw:
            run.method.fw.fisher.batched = True
        batches = run.epoch(0)
        for step in range(warm):
            train_step(run, next(batches), step)
        with OpCounter() as c:
            train_step(run, next(batches), warm)
        top = ", ".join(f"{k} {n}" for k, n in c.n.most_common(4))
        table[v] = {"ops_per_step": sum(c.n.values()), "top": top}
        table[v]["vs_lora"] = f"{table[v]['ops_per_step'] / table['lora']['ops_per_step'] - 1:+.1%}"
        del run
    show(f"ops per step (kernel launches on a GPU), {b.model}'s structure, bf16 autocast, "
         "fused AdamW, CPU", table, ("ops_per_step", "vs_lora", "top"))
    return table


def fisher_gate(cfg: Config, seeds: list[int], probes: list[int] | None = None) -> dict:
    """The Fisher estimator against `exact` on real warm-ups: per seed, one FW-LoRA run (exact
    statistic) trains its K warm-up steps while a probe proxy per probe count (cfg.fw_probes unless
    `probes`) reads the same X and G (the same gradients, the same bf16 activations under
    --precision=bf16). Reports the Spearman correlation of I_m, the largest |w_m - w_m(exact)|
    (w = 1 - I: the penalty weights) and the median relative error of F_m.
    The gate for a default estimator: Spearman >= 0.95, max |Δw| <= 0.02."""
    from fisher import FisherProxy
    table, probes = {}, probes or [cfg.fw_probes]
    for seed in seeds:
        c = dataclasses.replace(cfg, method="fwlora", fw_estimator="exact", seed=seed)
        check_config(c)
        run = prepare(c)
        fw = run.method.fw
        proxies = {k: FisherProxy(fw.layers, decay=c.fw_alpha, n_probes=k, seed=seed) for k in probes}
        for proxy in proxies.values():
            proxy.start()
        exact_update = fw.fisher.update

        def update_all():  # the same backward feeds them all
            exact_update()
            for proxy in proxies.values():
                proxy.update()
        fw.fisher.update = update_all
        batches = itertools.chain.from_iterable(map(run.epoch, range(c.epochs)))
        for step, batch in zip(range(fw.warmup_steps), tqdm(batches, total=fw.warmup_steps, disable=None)):
            train_step(run, batch, step)
        for k, proxy in proxies.items():
            proxy.stop()
            F_e, F_p = fw.fisher.F, proxy.F
            I_e, I_p = F_e / F_e.sum(), F_p / F_p.sum()
            row = {"K": fw.warmup_steps, "M": len(F_e), "probes": k,
                   "spearman_I": spearman(I_p, I_e), "max_abs_dw": float((I_p - I_e).abs().max()),
                   "median_rel_err_F": float(((F_p - F_e).abs() / F_e).median()),
                   "max_I": float(I_e.max())}
            passes = row["spearman_I"] >= 0.95 and row["max_abs_dw"] <= 0.02
            row["gate"] = "pass" if passes else "FAIL"
            table[f"{c.task} seed {seed}" + (f" k={k}" if len(probes) > 1 else "")] = row
    counts = "-".join(map(str, probes))
    show(f"probe estimator ({', '.join(map(str, probes))} probes, {run.precision}) against exact, "
         f"{cfg.model}, real warm-ups", table,
         ("K", "M", "probes", "spearman_I", "max_abs_dw", "median_rel_err_F", "max_I", "gate"))
    name = f"bench_fisher_{cfg.task}_{cfg.model}_{cfg.fw_estimator}{counts}_{run.precision}"
    write_json(os.path.join(cfg.out_dir, f"{name}.json"),
               {"config": dataclasses.asdict(cfg), "seeds": seeds, "rows": table,
                "environment": environment(run.device)})
    return table


def runs(cfgs: dict, data: tuple | None = None, cpu_time: bool = False) -> dict:
    """Whole runs of {name: Config}, side by side; total time ratios to the first. Each run keeps its
    own RNG stream, so each ends with the standalone train.py run's loss and metric, bit for bit."""
    prepared = interleave(cfgs, data, cpu_time=cpu_time)
    baseline = prepared["lora"] if "lora" in prepared else next(iter(prepared.values()))
    lora = baseline.clock
    base, table = lora.ms["step"], {}
    for m, r in prepared.items():
        # fwrank: its pre-pass counts
        ms, dev, total = r.clock.ms["step"], evaluate(r), train_ms(r.clock.totals())
        table[m] = {"train_loss": r.loss_sum.item() / r.n_loss, "accuracy": dev["accuracy"],
                    "mcc": dev["mcc"], "train_s": total / 1e3,
                    "total_ratio": total / train_ms(lora.totals()),
                    "buckets_ms_total": r.clock.totals()}
        # the Fisher warm-up steps against LoRA's same steps (same batches), and the rest
        if r.method.fw:
            K = r.method.fw.warmup_steps
            table[m].update(fw_warmup_steps=K, warmup_step_ratio=sum(ms[:K]) / sum(base[:K]),
                            penalised_step_ratio=sum(ms[K:]) / max(1e-9, sum(base[K:])))
    cfg = next(iter(cfgs.values()))
    show(f"{cfg.task}, budget {cfg.budget}%, {len(base)} steps each, side by side", table,
         ("train_loss", "accuracy", "mcc", "train_s", "total_ratio", "warmup_step_ratio",
          "penalised_step_ratio"))
    out = {"configs": {m: dataclasses.asdict(c) for m, c in cfgs.items()}, "steps": len(base),
           "runs": table, "clock": CLOCKS[cpu_time],
           "environment": environment(next(iter(prepared.values())).device)}
    name = run_name(dataclasses.replace(cfg, method="-".join(cfgs))).replace(":", "+").replace("=", "-")
    write_json(timing_file(cfg.out_dir, name), out)
    return out


MEMORY_BOUND_GB = 40  # every VARIANT's model and state at once, plus one step: fits a 40 GB A100 with room


def gpu(cfg: Config, tiny: bool = False, n_steps: int = 300) -> bool:
    """The GPU acceptance check: every criterion printed PASS or FAIL; True when all pass. steps()
    on roberta-base (offline: its shapes, random-roberta-base) under bf16, on batches of real SST-2
    sentences (the shipped copy, the model's tokenizer), then every method for a few steps.
    tiny: tiny-bert on the CPU, 8 steps (the tests)."""
    if tiny:
        cfg, n_steps = dataclasses.replace(cfg, model="tiny-bert", device="cpu"), 8
    check_config(cfg)
    data = real_batches(dataclasses.replace(cfg, task="sst2"), n_steps)
    cuda = cfg.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = steps(cfg, n_steps, skip=2 if tiny else 20, data=data)
    finite, bf16 = {}, {}
    # every method, a few steps each: nothing raises, the loss stays finite, bf16 is on
    for m in METHODS:
        short = dataclasses.replace(cfg, method=m, epochs=1, fw_warmup_steps=2, ada_t_init=1,
                                    ada_t_final=2, ada_delta_t=1)
        run = prepare(short, data)
        losses = [train_step(run, batch, step)[0] for step, batch in zip(range(5), run.epoch(0))]
        finite[m] = bool(torch.isfinite(torch.stack(losses)).all())
        with run.autocast():
            bf16[m] = run.model(**next(run.epoch(0))).logits.dtype == torch.bfloat16
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    on_cuda = out["environment"]["device"].startswith("cuda") if not tiny else None
    all_ran = len(finite) == len(METHODS) and len(out["variants"]) == len(VARIANTS)
    verdicts = {"a CUDA device": on_cuda,
                "bf16 autocast active in every method": all(bf16.values()),
                "every loss finite (the timed variants raise otherwise)": all(finite.values()),
                f"peak memory {peak_gb:.1f} GB <= {MEMORY_BOUND_GB} GB": peak_gb <= MEMORY_BOUND_GB,
                f"every method ran ({len(METHODS)}) and every variant timed ({len(VARIANTS)})": all_ran}
    print("\nacceptance:")
    for what, ok in verdicts.items():
        print(f"  {'skip (tiny CPU mode)' if ok is None else 'PASS' if ok else 'FAIL'}: {what}")
    lora = out["variants"]["lora"]
    ratios = ", ".join(f"{v} {r['ratio']:.3f}" for v, r in out["variants"].items() if v != "lora")
    print("  ratios to LoRA: " + ratios
          + f"; LoRA {lora['ms_per_step_median']:.1f} ms/step, {lora['gflop_per_s']:.0f} GFLOP/s on "
          f"{out['tokens_per_step']:.0f} real tokens per step; peak memory {peak_gb:.2f} GB")
    return all(ok is not False for ok in verdicts.values())


OWN_FLAGS = {"--methods=": "runs", "--seeds=": "fisher", "--probes=": "fisher", "--tiny=": "gpu",
             "--variants=": "steps", "--steps=": "steps"}  # each mode's own flags


def own_flag_problem(mode: str, args: list[str], methods: str, seeds: str) -> str | None:
    """What is wrong with bench.py's own flags (--methods, --seeds, --tiny), or None."""
    for flag, own in OWN_FLAGS.items():
        if mode != own and any(a.startswith(flag) for a in args):
            return f"{flag[:-1]} is read by `bench.py {own}` only, not by the {mode} mode: drop it"
    if not re.fullmatch(r"\d+(,\d+)*", seeds, re.ASCII):
        return f"--seeds takes whole numbers separated by commas (as 0,1,2), got {seeds!r}"
    listed = methods.split(",")
    for i, m in enumerate(listed):
        if m in listed[:i]:
            return f"--methods lists {m} twice: list each run once"
        if "method" in [f.split("=")[0] for f in m.split(":")[1:]]:
            return f"--methods: {m} names its method twice: the method first, then its own fields"
    return None


def method_config(cfg: Config, spec: str) -> Config:
    """--methods' "lora:group_by_length=false": a method, then fields of its own over the shared ones."""
    method, *fields = spec.split(":")
    own = parse_args([f"--{f}" for f in fields], Config)
    return dataclasses.replace(cfg, method=method, **{k: getattr(own, k) for k in (f.split("=")[0] for f in fields)})


def flag(args: list[str], name: str, default: str) -> str:
    """The value of bench.py's own `--name=value` in args, or default."""
    return next((a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")), default)


def main(argv: list[str]) -> int:
    """bench.py's command line (the sweep's timing step calls it too). Exit 2 on bad input (its own
    flags), 1 on an error or a failed check."""
    plain_output()
    named = argv[:1] in (["runs"], ["gpu"], ["ops"], ["fisher"])
    mode, args = (argv[0], argv[1:]) if named else ("steps", argv)
    methods = flag(args, "methods", "lora,fwlora,adalora")
    seeds = flag(args, "seeds", "0,1,2")
    problem = own_flag_problem(mode, args, methods, seeds)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        if mode == "gpu":  # roberta-base's shapes, bf16, on CUDA, unless the arguments say otherwise
            model = "roberta-base" if hub_reachable() else "random-roberta-base"
            defaults = ["--model=" + model, "--device=cuda", "--precision=bf16"]
            given = {a.split("=")[0] for a in args}
            args = [a for a in defaults if a.split("=")[0] not in given] + args
        # bench's own flags
        own = ("--methods=", "--tiny=", "--seeds=", "--probes=", "--variants=", "--steps=", "--clock=")
        cfg = parse_args([a for a in args if not a.startswith(own)], Config, __doc__)
        cpu_time = "--clock=cpu" in args
        if cpu_time and (cfg.device == "cuda" or torch.get_num_threads() > 1):
            raise ValueError("--clock=cpu times a CPU run by its CPU time, on one thread: "
                             "run it on the CPU with OMP_NUM_THREADS=1")
        if mode == "runs":
            runs({m: method_config(cfg, m) for m in methods.split(",")}, cpu_time=cpu_time)
        elif mode == "gpu":
            return 0 if gpu(cfg, tiny="--tiny=true" in args) else 1
        elif mode == "fisher":
            probes = flag(args, "probes", str(cfg.fw_probes))
            gate = fisher_gate(cfg, [int(x) for x in seeds.split(",")],
                               [int(k) for k in probes.split(",")])
            failed = [k for k, row in gate.items() if row["gate"] != "pass"]
            if failed:
                print(f"the gate fails on {', '.join(failed)}", file=sys.stderr)
                return 1
        elif mode == "ops":
            ops(cfg)
        else:
            ops(parse_args(["--model=random-roberta-base", "--device=cpu", "--precision=bf16",
                            "--batch_size=4"], Config))
            variants = flag(args, "variants", ",".join(VARIANTS))
            n_steps = int(flag(args, "steps", "30"))
            steps(cfg, n_steps, variants=variants.split(","), cpu_time=cpu_time)
    except (ValueError, RuntimeError, OSError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
