"""Step-time benchmark: every method's training step on the same batches, as a ratio to plain LoRA.

    python bench.py                                  # CPU: MiniLM, a few minutes on 2 cores
    python bench.py --model=random-roberta-base      # GPU: roberta-base's exact shapes, CUDA events

Each variant gets its own copy of the same base model and the exact `train_step` that train.py runs.
Variants take turns step by step (lora, fw-warm-up, ..., lora, ...) so machine noise hits all alike; the
first `warmup` steps of each round are dropped; the table gives the median ms/step over all timed steps.
Writes results/bench_<model>_<device>.json.
"""
import copy
import dataclasses
import sys

import torch

from train import (Clock, Config, autocast_for, build_method, environment, load_model, parse_args, resolve_device,
                   train_step, write_json)

# name -> (Config overrides, steps of Fisher warm-up before timing starts)
VARIANTS = {
    "lora": dict(method="lora"),
    "fwlora_warmup_probe": dict(method="fwlora", fw_estimator="probe", fw_warmup_steps=10**9),
    "fwlora_warmup_exact": dict(method="fwlora", fw_estimator="exact", fw_warmup_steps=10**9),
    "fwlora_penalised": dict(method="fwlora", fw_warmup_steps=1),  # frozen after one step: penalty every step
    "l2lora_penalised": dict(method="l2lora", fw_warmup_steps=1),
    "adalora": dict(method="adalora", ada_t_init=0, ada_t_final=1),  # the decreasing phase: mask every delta_t
}


@dataclasses.dataclass
class Bench:
    model: str = "auto"       # auto: random-roberta-base on a GPU, minilm on CPU
    budget: float = 0.2       # % (the hypothesis's headline budget)
    batch_size: int = 32      # hypothesis
    seq_len: int = 32         # tokens per example, random ids (a padded SST-2 batch of the CPU runs is ~30-60)
    steps: int = 8            # timed steps per variant per round
    warmup: int = 2           # untimed steps per variant per round
    rounds: int = 3           # interleaved rounds; median over all timed steps
    device: str = "auto"
    fisher_steps: int = 30    # warm-up steps for the probe-vs-exact check of the Fisher estimate; 0 = skip


def main(b: Bench) -> dict:
    device = resolve_device(b.device)
    name = b.model if b.model != "auto" else ("random-roberta-base" if device.type == "cuda" else "minilm")
    autocast = autocast_for(device)
    torch.manual_seed(0)
    base, _ = load_model(name)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1000, 20000, (b.batch_size, b.seq_len), generator=g),
                "attention_mask": torch.ones(b.batch_size, b.seq_len, dtype=torch.long),
                "labels": torch.randint(0, 2, (b.batch_size,), generator=g)} for _ in range(4)]
    batches = [{k: v.to(device) for k, v in x.items()} for x in batches]
    T = 10**6  # a long notional run, so schedules sit in their steady phase
    runs = {}
    for v, over in VARIANTS.items():
        cfg = Config(model=name, budget=b.budget, device=str(device), **over)
        model = copy.deepcopy(base)
        layers, ada, fw, info = build_method(cfg, model, T)
        model.to(device).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                fused=device.type == "cuda")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        runs[v] = dict(model=model, cfg=cfg, ada=ada, fw=fw, opt=opt, sched=sched, step=0, info=info)
    # Step-level interleaving (lora, fw, ..., lora, fw, ...): a noisy neighbour or a clock change hits every
    # variant alike, which whole-round blocks did not guarantee on this shared 2-core machine.
    clocks = {v: Clock(device) for v in runs}
    for r in range(b.rounds):
        for i in range(b.warmup + b.steps):
            for v, run in runs.items():
                run["step"] += 1
                clock = clocks[v] if i >= b.warmup else Clock(device)  # warm-up steps go to a throwaway clock
                train_step(run["model"], batches[i % len(batches)], run["opt"], run["sched"], run["step"],
                           run["cfg"], run["ada"], run["fw"], clock, autocast)
        print(f"round {r + 1}/{b.rounds} done", file=sys.stderr)
    for v, run in runs.items():
        clocks[v].collect()
        run["ms"] = clocks[v].ms["step"]
        run["buckets"] = {k: sum(ms) / len(run["ms"]) for k, ms in clocks[v].ms.items()}
        if device.type == "cuda":  # memory a step needs above what is resident (every variant's model and state)
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
            for i in range(2):
                run["step"] += 1
                train_step(run["model"], batches[i], run["opt"], run["sched"], run["step"], run["cfg"],
                           run["ada"], run["fw"], Clock(device), autocast)
            run["peak_mb"] = (torch.cuda.max_memory_allocated(device) - resident) / 2**20
    lora_ms = float(torch.tensor(runs["lora"]["ms"]).median())
    table = {}
    for v, run in runs.items():
        med = float(torch.tensor(run["ms"]).median())
        table[v] = {"ms_per_step_median": med, "ratio_to_lora": med / lora_ms,
                    "buckets_ms_per_step": run["buckets"], "step_mem_mb": run.get("peak_mb"),
                    "adapter_rank": run["info"]["rank"], "ada_init_rank": run["info"].get("ada_init_rank")}
    out = {"bench": dataclasses.asdict(b) | {"model": name}, "environment": environment(device), "variants": table}
    print(f"\n{name} on {out['environment']['device_name']} ({device}), batch {b.batch_size} × {b.seq_len} tokens, "
          f"budget {b.budget}%, median of {b.rounds}×{b.steps} steps")
    print(f"| variant | ms/step | × LoRA | extra buckets (ms/step) | step memory MiB |\n|---|---|---|---|---|")
    for v, t in table.items():
        extra = ", ".join(f"{k} {x:.2f}" for k, x in t["buckets_ms_per_step"].items() if k != "step") or "-"
        mem = f"{t['step_mem_mb']:.0f}" if t["step_mem_mb"] else "-"
        print(f"| {v} | {t['ms_per_step_median']:.1f} | {t['ratio_to_lora']:.3f} | {extra} | {mem} |")
    if b.fisher_steps:
        out["fisher_estimator"] = fisher_check(copy.deepcopy(base), batches, b, device, autocast)
    write_json(f"results/bench_{name}_{device.type}.json", out)
    return out


def fisher_check(model, batches, b: Bench, device, autocast) -> dict:
    """The probe estimate's error: exact and probe proxies watch the same LoRA warm-up steps."""
    from fisher import FisherProxy
    layers, _, _, _ = build_method(Config(method="lora", budget=b.budget), model, 10**6)
    model.to(device).train()
    layers = list(layers.values())
    proxies = {"exact": FisherProxy(layers, estimator="exact")} | {
        f"probe{k}": FisherProxy(layers, estimator="probe", n_probes=k, seed=k) for k in (1, 8, 32)}
    for p in proxies.values():
        p.start()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for i in range(b.fisher_steps):
        with autocast():
            model(**batches[i % len(batches)]).loss.backward()
        for p in proxies.values():
            p.update()
        opt.step()
        opt.zero_grad()
    imp = {k: p.F / p.F.sum() for k, p in proxies.items()}
    res = {}
    for k in proxies:
        if k != "exact":
            rel = (imp[k] - imp["exact"]).abs() / imp["exact"]
            res[k] = {"I_rel_err_median": rel.median().item(), "I_rel_err_max": rel.max().item()}
    res["I_exact_min_max"] = [imp["exact"].min().item(), imp["exact"].max().item()]
    print(f"Fisher estimator after {b.fisher_steps} warm-up steps, relative error of I_m vs exact: " +
          ", ".join(f"{k}: median {v['I_rel_err_median']:.3f}, max {v['I_rel_err_max']:.3f}"
                    for k, v in res.items() if k.startswith("probe")))
    return res


if __name__ == "__main__":
    main(parse_args(sys.argv[1:], Bench, __doc__))
