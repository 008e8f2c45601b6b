"""Speed, side by side: each method as a ratio to plain LoRA, measured in one process where the runs take
turns step by step, so machine noise hits every method alike.

    python bench.py                   # per step: MiniLM on CPU (random-roberta-base on a GPU), synthetic batches
    python bench.py runs --methods=lora,fwlora,adalora --task=sst2 --max_train=8000 --epochs=1 --lr=2e-3
    python bench.py gpu               # GPU acceptance: every method, roberta-base shapes, bf16, CUDA events

Every mode builds its runs with train.prepare() and steps them with train.train_step(): what is timed is
the run train.py makes. Each run keeps its own RNG stream, so `runs` ends with the standalone runs' train
loss and dev metric, bit for bit. Results go to results/bench_*.json.
"""
import dataclasses
import itertools
import sys

import torch
from tqdm import tqdm

from data import synthetic
from fisher import FisherProxy
from train import (METHODS, Config, check_config, check_finite, environment, evaluate, load_model, parse_args,
                   prepare, resolve_device, run_name, train_step, write_json)

WARM = dict(fw_warmup_steps=10**9, fw_warmup_max_frac=1.0)  # FW-LoRA's Fisher warm-up on every step
VARIANTS = {  # per-step mode: name -> Config overrides
    "lora": dict(method="lora"),
    "fwlora_warmup_probe16": dict(method="fwlora", **WARM),
    "fwlora_warmup_probe8": dict(method="fwlora", fw_probes=8, **WARM),
    "fwlora_warmup_exact": dict(method="fwlora", fw_estimator="exact", **WARM),
    "fwlora_penalised": dict(method="fwlora", fw_warmup_steps=1),  # warm-up of one step: penalty on every step
    "l2lora_penalised": dict(method="l2lora", fw_warmup_steps=1),
    "adalora": dict(method="adalora", ada_t_init=0, ada_t_final=2),  # decreasing phase: a mask every 10 steps
    "adalora_masking": dict(method="adalora", ada_t_init=0, ada_t_final=2, ada_delta_t=1),  # ranks + mask every step
}


def rng_state(device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state: tuple, device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def all_epochs(run):
    for e in range(run.cfg.epochs):
        yield from run.epoch(e)


def interleave(cfgs: dict, data: tuple | None = None, steps: int | None = None) -> dict:
    """Prepare a train.Run per {name: Config} (sharing one tokenised data set), then train them one step each
    in turn, for all their epochs or the first `steps`. Returns {name: Run}."""
    runs, rng = {}, {}
    for m, cfg in cfgs.items():
        runs[m] = prepare(cfg, data)
        data = (runs[m].train_b, runs[m].dev_b)
        rng[m] = rng_state(runs[m].device)  # where train() would start drawing dropout masks
    streams = [all_epochs(r) for r in runs.values()]  # (a generator expression here would bind the last r)
    total = steps or next(iter(runs.values())).T
    for step, batches in enumerate(tqdm(itertools.islice(zip(*streams), total), total=total, disable=None)):
        for (m, r), batch in zip(runs.items(), batches):
            set_rng_state(rng[m], r.device)  # each run's dropout masks come from its own stream (outside the clock)
            train_step(r, batch, step)
            rng[m] = rng_state(r.device)
    for r in runs.values():
        r.clock.collect()
        check_finite(r)
    return runs


def step_table(runs: dict, skip: int) -> dict:
    """Median ms/step after `skip` warm-up steps, ratio to the first run, each method's buckets per step."""
    med = {m: float(torch.tensor(r.clock.ms["step"][skip:]).median()) for m, r in runs.items()}
    base = next(iter(med.values()))
    return {m: {"ms_per_step_median": med[m], "ratio": med[m] / base, "buckets_ms_per_step":
                {k: sum(v) / len(r.clock.ms["step"]) for k, v in r.clock.ms.items() if k != "step"}}
            for m, r in runs.items()}


def show(title: str, table: dict, cols: tuple) -> None:
    print(f"\n{title}\n| name | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 1) + "|")
    for m, row in table.items():
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in cols]
        print(f"| {m} | " + " | ".join(cells) + " |")


def steps(b: Config, n_steps: int = 30, skip: int = 6, fisher_steps: int = 30) -> dict:
    """Per-step mode: every VARIANT on the same synthetic batches (lengths 32-64), median ms/step."""
    dev = resolve_device(b.device)
    if b.model == "minilm" and dev.type == "cuda":
        b = dataclasses.replace(b, model="random-roberta-base")
    data = synthetic(n_steps * b.batch_size, b.batch_size, b.batch_size, seq_len=64, vocab=20000)
    runs = interleave({v: dataclasses.replace(b, epochs=1, **over) for v, over in VARIANTS.items()}, data, n_steps)
    table = step_table(runs, skip)
    show(f"{b.model}, budget {b.budget}%, median of {n_steps - skip} steps", table,
         ("ms_per_step_median", "ratio", "buckets_ms_per_step"))
    out = {"config": dataclasses.asdict(b), "environment": environment(dev), "variants": table}
    if fisher_steps:
        out["fisher_estimator"] = fisher_check(prepare(b, data), fisher_steps)
    write_json(f"results/bench_steps_{b.model}_{dev.type}.json", out)
    return out


def fisher_check(run, n_steps: int) -> dict:
    """The probe estimate's error: exact and probe proxies watch the same LoRA warm-up steps."""
    layers = list(run.method.layers.values())
    proxies = {"exact": FisherProxy(layers, estimator="exact")} | {
        f"probe{k}": FisherProxy(layers, n_probes=k, seed=k) for k in (1, 8, 16, 32)}
    for p in proxies.values():
        p.start()
    for step, batch in zip(range(n_steps), run.epoch(0)):
        train_step(run, batch, step)  # each proxy's hooks see the backward; update() after it
        for p in proxies.values():
            p.update()
    imp = {k: p.F / p.F.sum() for k, p in proxies.items()}
    rel = {k: (imp[k] - imp["exact"]).abs() / imp["exact"] for k in proxies if k != "exact"}
    res = {k: {"I_rel_err_median": e.median().item(), "I_rel_err_max": e.max().item()} for k, e in rel.items()}
    show(f"Fisher estimator: relative error of I_m against exact after {n_steps} LoRA steps", res,
         ("I_rel_err_median", "I_rel_err_max"))
    return res | {"I_exact_min_max": [imp["exact"].min().item(), imp["exact"].max().item()]}


def runs(cfg: Config, methods: list[str], data: tuple | None = None) -> dict:
    """Whole runs of `methods` (cfg otherwise shared), side by side; total time ratios to the first."""
    for m in methods:
        check_config(dataclasses.replace(cfg, method=m))
    prepared = interleave({m: dataclasses.replace(cfg, method=m) for m in methods}, data)
    base = prepared[methods[0]].clock.ms["step"]
    table = {}
    for m, r in prepared.items():
        ms = r.clock.ms["step"]
        dev = evaluate(r)
        table[m] = {"train_loss": r.loss_sum.item() / r.n_loss, "accuracy": dev["accuracy"], "mcc": dev["mcc"],
                    "train_s": sum(ms) / 1e3,
                    "total_ratio": sum(ms) / sum(base), "buckets_ms_total": {k: sum(v) for k, v in r.clock.ms.items()}}
        if r.method.fw:  # the Fisher warm-up steps against LoRA's same steps (same batches), and the rest
            K = r.method.fw.warmup_steps
            table[m].update(fw_warmup_steps=K, warmup_step_ratio=sum(ms[:K]) / sum(base[:K]),
                            penalised_step_ratio=sum(ms[K:]) / max(1e-9, sum(base[K:])))
    show(f"{cfg.task}, budget {cfg.budget}%, {len(base)} steps each, side by side", table,
         ("train_loss", "accuracy", "mcc", "train_s", "total_ratio", "warmup_step_ratio", "penalised_step_ratio"))
    out = {"config": dataclasses.asdict(cfg) | {"method": methods}, "steps": len(base),
           "environment": environment(prepared[methods[0]].device), "runs": table}
    write_json(f"results/bench_runs_{run_name(dataclasses.replace(cfg, method='-'.join(methods)))}.json", out)
    return out


def gpu(tiny: bool = False, n_steps: int = 300) -> dict:
    """GPU acceptance: every method for n_steps of SST-2 under bf16 on roberta-base (random weights if the hub
    is out of reach); fails on any error or non-finite loss. tiny: tiny-bert on CPU, a few steps (the test)."""
    cfg = Config(model="tiny-bert" if tiny else "roberta-base", precision="bf16", epochs=1, task="sst2",
                 max_train=n_steps * 32, fw_warmup_steps=n_steps // 3, fw_warmup_max_frac=1.0, log_every=10**9)
    try:
        load_model(cfg.model)
    except RuntimeError as e:
        print(f"{e}\n-> random-roberta-base instead (roberta-base's exact shapes)")
        cfg = dataclasses.replace(cfg, model="random-roberta-base")
    runs = interleave({m: dataclasses.replace(cfg, method=m) for m in METHODS})  # raises on a non-finite loss
    skip = min(5, n_steps // 10)
    table = step_table(runs, skip)
    for m, r in runs.items():
        ms, fw = r.clock.ms["step"], r.method.fw
        table[m]["loss_last_epoch"] = r.loss_sum.item() / r.n_loss
        if fw:
            K = fw.warmup_steps
            table[m].update(warmup_ms=sum(ms[skip:K]) / (K - skip), penalised_ms=sum(ms[K:]) / len(ms[K:]))
        if r.device.type == "cuda":  # memory one step needs above what is resident (every run's model and state)
            torch.cuda.reset_peak_memory_stats(r.device)
            resident = torch.cuda.memory_allocated(r.device)
            train_step(r, next(r.epoch(0)), 0)
            table[m]["step_peak_mb"] = (torch.cuda.max_memory_allocated(r.device) - resident) / 2**20
    show(f"GPU check: {cfg.model}, {n_steps} steps, bf16, {environment(runs['lora'].device)['device_name']}",
         table, ("ms_per_step_median", "ratio", "warmup_ms", "penalised_ms", "step_peak_mb", "loss_last_epoch"))
    out = {"config": dataclasses.asdict(cfg), "environment": environment(runs["lora"].device), "methods": table}
    write_json(f"results/bench_gpu_{cfg.model}_{runs['lora'].device.type}.json", out)
    return out


if __name__ == "__main__":
    mode, args = (sys.argv[1], sys.argv[2:]) if sys.argv[1:2] in (["runs"], ["gpu"]) else ("steps", sys.argv[1:])
    try:
        if mode == "gpu":
            gpu(tiny="--tiny" in args)
        elif mode == "runs":
            methods = next((a.split("=", 1)[1] for a in args if a.startswith("--methods=")), "lora,fwlora,adalora")
            runs(parse_args([a for a in args if not a.startswith("--methods=")], Config, __doc__), methods.split(","))
        else:
            steps(parse_args(args, Config, __doc__))
    except (ValueError, RuntimeError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
