"""What a run is asked for, and what it resolves to: `Config` (every field a line, with its unit and
where its default comes from), the range of every numeric field, check_config (bad input refused
before any work, saying what to do), and the device and precision resolved once.

    python train.py --help     # every field: its default and its note (record.field_notes)

Edit a default here, or override any field from the command line as `--field=value` (record.parse_args)
or for a whole sweep in run_all.sh's profiles. Method knobs share the dataclass with prefixes (`lora_`,
`ada_`, `fw_`).
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from data import check_task
from fisher import LAMBDA, N_PROBES
from record import METHODS


@dataclass
class Config:
    # what to run
    task: str = "sst2"            # sst2 (accuracy) | cola (Matthews corr.):
                                  # the hypothesis's two tasks
    method: str = "lora"          # lora | adalora | fwlora | the controls l2lora, fwshuffle, fwmax,
                                  # fwrank (fisher.py) | head (the floor: no adapters)
    model: str = "minilm"         # minilm | mpnet (offline: PyPI) | roberta-base (hub) |
                                  # a local folder | random-roberta-base | tiny-bert
    budget: float = 0.2           # adapter parameters, % of the base model
                                  # (hypothesis: 0.1, 0.2, 0.5)
    seed: int = 0                 # every random stream derives from it (module docstring)
    glue_dir: str = ""            # "" = the GLUE copy in ./glue |
                                  # hub (datasets, needs internet) | a folder
    out_dir: str = "results"      # where the run's JSON (and adapters) go
    # optimisation (hypothesis: 3 epochs, batch 32, lr 2e-4, AdamW, linear schedule,
    # warm-up ratio 0.06)
    epochs: int = 3               # passes over the training set (hypothesis)
    batch_size: int = 32          # examples per step (hypothesis)
    lr: float = 2e-4              # peak learning rate (hypothesis)
    weight_decay: float = 0.0     # AdamW; 0: the only regulariser on adapters
                                  # is the method's own penalty
    warmup_ratio: float = 0.06    # fraction of steps of linear lr warm-up,
                                  # then linear decay to 0 (hypothesis)
    max_grad_norm: float = 1.0    # clip the global gradient norm before each step; 0 = off
                                  # (HF Trainer default, used by the official LoRA/AdaLoRA
                                  # GLUE runs)
    max_length: int = 128         # tokens; longer sentences truncated (GLUE sentences rarely are)
    group_by_length: bool = True  # batches of similar length (HF's group_by_length):
                                  # ~1/3 of random batches' padding
    max_train: int = 0            # >0: seeded random subset of the training set (CPU runs); 0 = all
    max_eval: int = 0             # >0: first N dev examples
                                  # (tests only; reported numbers use all of dev)
    heldout: int = 0              # >0: evaluate on this many training examples held out of
                                  # training, not on dev (tuning: dev is the test set)
    # LoRA (Hu et al. 2021)
    lora_alpha: float = 16.0      # scaling = alpha / r; LoRA paper: set once, not tuned
    lora_dropout: float = 0.0     # on the LoRA path's input; the hypothesis sets none
    # AdaLoRA (Zhang et al. 2023, official GLUE scripts); peft: tinit, tfinal, deltaT
    ada_init_ratio: float = 1.5   # initial rank / target average rank (paper: b0 ≈ 1.5 bT)
    ada_t_init: int = -1          # steps before pruning starts; -1 = 10% of T
    ada_t_final: int = -1         # final fixed-budget steps; -1 = 40% of T,
                                  # so ~half of T decreases (author's advice)
    ada_delta_t: int = 10         # steps between masks while decreasing (official CoLA script: 10)
    ada_beta1: float = 0.85       # EMA of sensitivity (official)
    ada_beta2: float = 0.85       # EMA of uncertainty (official)
    ada_gamma: float = 0.1        # orthogonality weight γ (official GLUE scripts;
                                  # peft's default is 0.5)
    # FW-LoRA (the hypothesis)
    fw_lambda: float = LAMBDA     # λ of the penalty (hypothesis: 1e-4)
    fw_warmup_steps: int = 500    # K, Fisher warm-up steps (hypothesis: ~500),
                                  # capped by fw_warmup_max_frac
    fw_warmup_max_frac: float = 0.1   # K <= this fraction of T
                                      # (500 is 7.9% of a full 3-epoch SST-2 run)
    fw_alpha: float = 0.98        # α, EMA decay of ‖∇W‖² (hypothesis)
    fw_estimator: str = "probe"   # probe (unbiased, cheap) | exact (‖GᵀX‖² in full);
                                  # README: Fisher estimator
    fw_probes: int = N_PROBES     # Rademacher probes per step (README, Fisher estimator: the gate)
    fw_form: str = "delta"        # delta: ‖ΔW‖_F² (the text) |
                                  # factors: ‖A‖²+‖B‖² (the sketch)
    fw_rank_min: int = 0          # fwrank: the smallest rank a matrix gets
                                  # (0: left unadapted, as AdaLoRA may prune to 0)
    # running
    device: str = "auto"          # auto (CUDA if present) | cpu | cuda
    precision: str = "auto"       # auto (bf16 on CUDA and on a CPU with AMX/AVX512-BF16,
                                  # else fp32) | bf16 (autocast; weights, adapters,
                                  # statistics stay fp32) | fp32
    log_every: int = 20           # steps between loss readouts (the only host syncs in the loop)
    timing_skip: int = 5          # first steps left out of ms/step (allocator and cache warm-up)
    save_adapters: bool = False   # also write <name>.safetensors (adapters + head)
                                  # and <name>.peft/ (peft's format)
    eval_adapters: str = ""       # a <name>.peft folder: its adapters on --model,
                                  # scored on --task's dev; no training
    overwrite: bool = False       # replace a finished result of the same name (otherwise an error)


# The range of every numeric field: (low, high, low inclusive, high inclusive); the message
# shows it as written here.
RANGES = {
    **dict.fromkeys(("epochs", "batch_size", "max_length", "ada_delta_t", "fw_warmup_steps",
                     "fw_probes", "log_every"), (1, math.inf, True, False)),
    **dict.fromkeys(("max_train", "max_eval", "heldout", "max_grad_norm", "timing_skip",
                     "weight_decay", "fw_rank_min", "fw_lambda", "ada_gamma"),
                    (0, math.inf, True, False)),
    "lr": (0, math.inf, False, False),
    "lora_alpha": (0, 1e4, False, True),  # at 1e38 alpha/r overflows: the adapters never move
    "budget": (0, 100, False, False),
    "warmup_ratio": (0, 1, True, False),
    "lora_dropout": (0, 1, True, False),
    "ada_beta1": (0, 1, False, False),
    "ada_beta2": (0, 1, False, False),
    "fw_alpha": (0, 1, False, False),
    "ada_init_ratio": (1, math.inf, True, False),
    "fw_warmup_max_frac": (0, 1, False, True),
    "seed": (0, 2**32, True, False),  # 1000·seed + epoch must stay a valid generator seed
}


def check_config(cfg: Config) -> None:
    """Fail before any work on input that cannot run, with what to do instead."""
    check_task(cfg.task)
    choices = {"method": METHODS, "device": ("auto", "cpu", "cuda"),
               "precision": ("auto", "bf16", "fp32"), "fw_estimator": ("probe", "exact"),
               "fw_form": ("delta", "factors")}
    for key, allowed in choices.items():
        value = getattr(cfg, key)
        if value not in allowed:
            raise ValueError(f"unknown {key} {value!r}: choose one of {', '.join(allowed)}")
    for key, (lo, hi, lo_in, hi_in) in RANGES.items():
        v = getattr(cfg, key)
        above_lo = lo <= v if lo_in else lo < v
        below_hi = v <= hi if hi_in else v < hi
        if not (above_lo and below_hi):  # NaN fails both
            interval = f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
            raise ValueError(f"--{key}={v} is out of range: it must be in {interval}")
    for key in ("ada_t_init", "ada_t_final"):  # -1 is the default; no other negative means anything
        if getattr(cfg, key) < -1:
            raise ValueError(f"--{key}={getattr(cfg, key)}: give steps >= 0, or -1 for the default")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        build = torch.version.cuda or "none: a CPU-only build"
        raise ValueError(f"--device=cuda, but this torch ({torch.__version__}, CUDA build {build}) "
                         "sees no CUDA GPU: check the driver, CUDA_VISIBLE_DEVICES and the job's "
                         "GPU request, or run with --device=cpu")


def resolve_device(name: str) -> torch.device:
    """The run's device (check_config has refused cuda where there is none), printed with why."""
    if name != "auto":
        dev, why = torch.device(name), "asked for"
    elif torch.cuda.is_available():
        dev, why = torch.device("cuda"), "a CUDA GPU is available"
    else:
        dev, why = torch.device("cpu"), "no CUDA GPU found"
    print(f"device: {dev} ({why})")
    return dev


def cpu_bf16() -> str:
    """This CPU's native bf16 matmul units ("AMX-BF16", "AVX512-BF16", both) or "": Linux's
    /proc/cpuinfo flags amx_bf16 and avx512_bf16, else torch's own CPU checks.
    (torch.backends.cpu.get_cpu_capability() says only "AVX512", with or without bf16.)"""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:  # not Linux
        checks = (("amx_bf16", "_is_amx_tile_supported"),
                  ("avx512_bf16", "_is_avx512_bf16_supported"))
        flags = {flag for flag, check in checks if getattr(torch.cpu, check, lambda: False)()}
    units = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))
    return " and ".join(name for flag, name in units if flag in flags)


def resolve_precision(precision: str, device_type: str) -> tuple[str, str]:
    """(bf16 | fp32, why). auto: bf16 wherever the hardware multiplies bf16 natively (CUDA; a CPU
    with AMX-BF16 or AVX512-BF16), where every real model stepped faster under it; fp32 elsewhere,
    where bf16 would be emulated."""
    if precision != "auto":
        return precision, "asked for"
    if device_type == "cuda":
        return "bf16", "auto: CUDA"
    if cpu_bf16():
        return "bf16", f"auto: this CPU has {cpu_bf16()}"
    return "fp32", "auto: this CPU has neither AMX-BF16 nor AVX512-BF16, so bf16 would be emulated"


def autocast_for(device: torch.device, precision: str):
    """A context factory: bf16 autocast (the matmuls' inputs) or none, for a resolved precision.
    Master weights, adapters, E and the methods' statistics stay fp32 either way."""
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext
