"""Speed: every method's training step, and whole training runs, as ratios to plain LoRA in one process.

    python bench.py                                  # CPU: MiniLM, a few minutes on 2 cores
    python bench.py --model=random-roberta-base      # GPU: roberta-base's exact shapes, CUDA events
    python bench.py runs --methods=lora,fwlora,l2lora --task=sst2 --max_train=8000 --epochs=1 --lr=2e-3
                                                     # whole runs (any train.py --field), step-interleaved

Each variant gets its own copy of the same base model and the exact `train_step` that train.py runs.
Variants take turns step by step (lora, fw-warm-up, ..., lora, ...) so machine noise hits all alike; the
first `warmup` steps of each round are dropped; the table gives the median ms/step over all timed steps.
Writes results/bench_<model>_<device>.json.

`runs` trains each method exactly as train.py would (same seed, data, steps: prepare() + train_step()),
but in one process and taking turns step by step, so the total training times are measured side by side
and their ratio is not swamped by machine noise between separate runs. Each run keeps its own RNG stream
(dropout), so each ends with the same train loss and metric as the standalone run.
Writes results/runs_<task>_b<budget>_<device>.json.
"""
import copy
import dataclasses
import sys

import torch

from train import (Clock, Config, autocast_for, build_method, environment, evaluate, load_model, parse_args,
                   prepare, resolve_device, train_step, write_json)

# name -> (Config overrides, steps of Fisher warm-up before timing starts)
VARIANTS = {
    "lora": dict(method="lora"),
    "fwlora_warmup_probe16": dict(method="fwlora", fw_estimator="probe", fw_probes=16, fw_warmup_steps=10**9),
    "fwlora_warmup_probe8": dict(method="fwlora", fw_estimator="probe", fw_probes=8, fw_warmup_steps=10**9),
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
        f"probe{k}": FisherProxy(layers, estimator="probe", n_probes=k, seed=k) for k in (1, 8, 16, 32)}
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


def rng_state(device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state: tuple, device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def runs(cfg: Config, methods: list[str]) -> dict:
    """Whole runs of `methods` (cfg otherwise shared), one step each in turn; total time ratios to the first."""
    from tqdm import tqdm
    from train import check_config
    for m in methods:
        check_config(dataclasses.replace(cfg, method=m))
    prepared, rng, data = {}, {}, None
    for m in methods:  # each prepared exactly as train() prepares it; the tokenised data is shared
        prepared[m] = prepare(dataclasses.replace(cfg, method=m), data)
        data = (prepared[m].train_b, prepared[m].dev_b)
        rng[m] = rng_state(prepared[m].device)  # where train() would start drawing dropout masks
    first = prepared[methods[0]]
    clocks = {m: Clock(first.device) for m in methods}
    step = 0
    for epoch in range(cfg.epochs):
        loss_sum = {m: torch.zeros((), device=first.device) for m in methods}  # as train() sums it
        for batches in tqdm(zip(*(r.epoch(epoch) for r in prepared.values())), total=len(first.train_b),
                            desc=f"epoch {epoch + 1}", disable=None):
            step += 1
            for (m, r), batch in zip(prepared.items(), batches):
                # Each run draws its dropout masks from its own RNG stream, as it would alone (outside the clock).
                set_rng_state(rng[m], r.device)
                _, task_loss = train_step(r.model, batch, r.opt, r.sched, step, r.cfg, r.ada, r.fw, clocks[m],
                                          r.autocast)
                rng[m] = rng_state(r.device)
                loss_sum[m] += task_loss
    for clock in clocks.values():
        clock.collect()
    base_ms = clocks[methods[0]].ms["step"]
    table = {}
    for m, r in prepared.items():
        ms = clocks[m].ms["step"]
        row = {"train_loss": loss_sum[m].item() / len(first.train_b), "train_ms_total": sum(ms),
               "buckets_ms_total": {k: sum(v) for k, v in clocks[m].ms.items()},
               **evaluate(r.model, r.dev_b, r.device, r.autocast)}
        if r.fw:  # the warm-up steps' cost against LoRA's same steps (same batches)
            K = r.fw.warmup_steps
            row.update(fw_warmup_steps=K, warmup_ms_total=sum(ms[:K]),
                       warmup_step_ratio=sum(ms[:K]) / sum(base_ms[:K]),
                       penalised_step_ratio=sum(ms[K:]) / max(1e-9, sum(base_ms[K:])))
        table[m] = row
    for row in table.values():
        row["total_ratio"] = row["train_ms_total"] / sum(base_ms)
    out = {"config": dataclasses.asdict(cfg) | {"method": methods}, "steps": step,
           "environment": environment(first.device), "runs": table}
    print(f"\n{cfg.task}, budget {cfg.budget}%, {step} steps each, interleaved on "
          f"{out['environment']['device_name']} ({first.device})")
    print(f"| method | train loss | accuracy | MCC | train s | × {methods[0]} | warm-up steps × {methods[0]} |")
    print("|---|---|---|---|---|---|---|")
    for m, t in table.items():
        warm = f"{t['warmup_step_ratio']:.3f} ({t['fw_warmup_steps']} steps)" if "fw_warmup_steps" in t else "-"
        print(f"| {m} | {t['train_loss']:.4f} | {t['accuracy']:.4f} | {t['mcc']:.4f} | "
              f"{t['train_ms_total'] / 1e3:.1f} | {t['total_ratio']:.3f} | {warm} |")
    write_json(f"results/runs_{cfg.task}_b{cfg.budget}_{first.device.type}.json", out)
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["runs"]:
        args = [a for a in sys.argv[2:] if not a.startswith("--methods=")]
        methods = next((a.split("=", 1)[1] for a in sys.argv[2:] if a.startswith("--methods=")),
                       "lora,fwlora,l2lora").split(",")
        try:
            runs(parse_args(args, Config, __doc__), methods)
        except (ValueError, RuntimeError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
    else:
        main(parse_args(sys.argv[1:], Bench, __doc__))
