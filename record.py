"""One run's record: its arguments (`--field=value`), its name and files, its metrics, its clock, the JSON it
leaves, and reading that JSON back. train.py and bench.py write through it; sweep.py and report.py read through
it. It imports no project module above data.py, lora.py and fisher.py.

A finished run is `<out_dir>/<task>_<method>_b<budget>_s<seed>.json`; `.partial.json` holds the epochs so far,
`.error.json` a failure. Every file is written atomically (a temp file, then a rename), so a crash or a full
disk never leaves a half-written result, table or figure where a good one was.
"""
import dataclasses
import inspect
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from data import TASKS
from fisher import LAMBDA, WEIGHTING
from lora import DEFAULT_TARGETS, adapter_params, save_adapters

NAMES = {"lora": "LoRA", "head": "head only (floor)", "adalora": "AdaLoRA", "fwlora": "FW-LoRA",
         "l2lora": "uniform L2 (control)", "fwshuffle": "shuffled FW (control)", "fwmax": "max-normalised FW (control)",
         "fwrank": "Fisher ranks (control)"}
METHODS = tuple(NAMES)  # the one list of methods: train.py, the sweep and the tables take it from here
# Config fields that cannot change a result: a finished run is reused whatever they were.
IGNORED = ("out_dir", "log_every", "timing_skip", "save_adapters", "overwrite")
# What report.py reads from a finished result: one schema, for the sweep's "done" and the report's reading alike.
REQUIRED = ("config", "status", "metric", "final", "best", "epochs", "dev_labels", "budget", "environment")
CONFIG_KEYS = ("task", "method", "budget", "seed", "model")


def parse_args(argv: list[str], cls, doc: str = ""):
    """`--field=value` for any field of the dataclass `cls`, typed from its defaults; `--help` lists them."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if any(a in ("-h", "--help") for a in argv):
        print(doc)
        notes = dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))  # each field's comment
        for f in fields.values():
            print(f"  --{f.name}={f.default!r}".ljust(32) + f" {notes.get(f.name, '')}")
        sys.exit(0)
    kw = {}
    for arg in argv:
        key, eq, val = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq or key not in fields:
            raise SystemExit(f"bad argument {arg!r}: use --field=value with a {cls.__name__} field (see --help)")
        if key in kw:
            raise SystemExit(f"--{key} is given twice ({kw[key]!r}, then {val!r}): give each field once")
        typ = type(fields[key].default)
        try:
            kw[key] = {"true": True, "1": True, "false": False, "0": False}[val.lower()] if typ is bool else typ(val)
        except (KeyError, ValueError):
            raise SystemExit(f"--{key} takes a {typ.__name__}, got {val!r}") from None
    return cls(**kw)


def run_name(cfg) -> str:
    """The one run-name formula (train.py's files, the sweep's resume, bench.py's output). A penalised method at
    a λ other than the hypothesis's carries it (the dose-response); a tuning run (held-out train) its lr."""
    lam = getattr(cfg, "fw_lambda", LAMBDA)
    return (f"{cfg.task}_{cfg.method}_b{cfg.budget:g}_s{cfg.seed}"
            + (f"_lam{lam:g}" if cfg.method in WEIGHTING and lam != LAMBDA else "")
            + (f"_heldout{cfg.heldout}_lr{cfg.lr:g}" if getattr(cfg, "heldout", 0) else ""))


def score(preds: torch.Tensor, labels: torch.Tensor, metric: str) -> torch.Tensor:
    """Accuracy or Matthews correlation over the last dimension (any leading batch dims, as the bootstrap's);
    MCC is 0 when a class is never predicted, as scikit-learn gives."""
    p, y = preds.long(), labels.long()
    tp, tn = ((p == 1) & (y == 1)).sum(-1).double(), ((p == 0) & (y == 0)).sum(-1).double()
    fp, fn = ((p == 1) & (y == 0)).sum(-1).double(), ((p == 0) & (y == 1)).sum(-1).double()
    if metric == "accuracy":
        return (tp + tn) / p.shape[-1]
    den = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)).sqrt()
    return torch.where(den > 0, (tp * tn - fp * fn) / den.clamp_min(1e-300), 0.0)


def metrics(preds: torch.Tensor, labels: torch.Tensor) -> dict:
    """{'accuracy', 'mcc'} of one prediction vector."""
    return {m: score(preds, labels, m).item() for m in ("accuracy", "mcc")}


def result_paths(cfg) -> dict[str, str]:
    """Where the run writes; fails before any work if out_dir is not writable or the run is already done."""
    stem = os.path.join(cfg.out_dir, run_name(cfg))
    paths = {k: stem + ext for k, ext in (("final", ".json"), ("partial", ".partial.json"),
                                          ("error", ".error.json"), ("adapters", ".safetensors"))}
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        open(paths["error"] + ".tmp", "w").close()
        os.remove(paths["error"] + ".tmp")
    except OSError as e:
        raise ValueError(f"--out_dir={cfg.out_dir} is not a writable folder ({e.strerror}): choose another") from None
    if os.path.exists(paths["final"]) and not cfg.overwrite:
        raise ValueError(f"{paths['final']} already holds a finished run: pass --overwrite=true to replace it, "
                         f"or another --out_dir")
    return paths


def write_file(path: str, write, mode: str = "w") -> None:
    """Atomic: `write(f)` into a temp file, then rename it over `path`. On failure (a full disk) the temp file is
    removed, `path` keeps what it held, and the error names `path`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(e.errno, f"could not write {path}: {e.strerror}") from None


def write_json(path: str, obj: dict) -> None:
    write_file(path, lambda f: json.dump(obj, f, indent=1))


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


def summarise(run, result: dict, paths: dict) -> dict:
    """A finished train.Run's result: the final metric, achieved budget, timing, each method's diagnostics;
    written to <name>.json (adapters to <name>.safetensors if asked), stale partial and error files removed."""
    cfg, layers, ada, fw, info = run.cfg, run.method.layers, run.method.ada, run.method.fw, run.method.info
    metric = TASKS[cfg.task][1]
    n_adapter = adapter_params(list(layers.values()), ada.rank_pattern() if ada else None)
    all_ms = run.clock.ms["step"]
    ms = all_ms[cfg.timing_skip:] or all_ms
    result.update(status="ok", metric=metric, final=result["epochs"][-1][metric],
                  best=max(e[metric] for e in result["epochs"]), dev_labels=run.dev_b.labels.tolist())
    result["budget"].update(adapter_params=n_adapter, adapter_pct=100 * n_adapter / info["n_base_params"])
    result["timing"] = {
        "train_ms_total": train_ms(run.clock.totals()), "ms_per_step_median": float(torch.tensor(ms).median()),
        "ms_per_step_mean": sum(ms) / len(ms), "examples_per_s": 1e3 * cfg.batch_size * len(ms) / sum(ms),
        "buckets_ms_total": run.clock.totals(), "steps_timed": len(ms),
        "clock": "cuda events" if run.clock.cuda else "perf_counter (CPU ops are synchronous)"}
    with torch.no_grad():  # every adapter method's ‖ΔW_m‖_F (AdaLoRA's with E): the dose-response's shrinkage
        result["delta_w_fro"] = {n: l.delta_weight().norm().item() for n, l in layers.items()}
    if fw:
        K, skip = fw.warmup_steps, cfg.timing_skip
        warm_ms, late_ms = all_ms[skip:K], all_ms[K:]
        result["timing"].update(ms_per_warmup_step=sum(warm_ms) / max(1, len(warm_ms)),
                                ms_per_penalised_step=sum(late_ms) / max(1, len(late_ms)))
        result["fw"] = fw.diagnostics(list(layers)) | {"penalty_log": run.penalty_log}
    if ada:
        result["adalora"] = {"rank_pattern": dict(zip(layers, ada.rank_pattern())),
                             "total_rank": sum(ada.rank_pattern()), "target_total_rank": ada.b_target}
    result["peak_memory_mb"] = (torch.cuda.max_memory_allocated(run.device) / 2**20 if run.device.type == "cuda"
                                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if os.path.exists(paths["final"]) and not cfg.overwrite:  # checked at the start too: another run of this
        raise FileExistsError(f"{paths['final']} was written by another run while this one trained: kept that "
                              f"one; this run's epochs are in {paths['partial']}")  # name may have finished since
    if cfg.save_adapters:
        save_adapters(run.model, paths["adapters"], {"task": cfg.task, "method": cfg.method, "rank": info["rank"],
                                                     "lora_alpha": cfg.lora_alpha, "targets": DEFAULT_TARGETS})
    write_json(paths["final"], result)
    for stale in (paths["partial"], paths["error"]):
        if os.path.exists(stale):
            os.remove(stale)
    print(f"{metric} {result['final']:.4f}; {result['timing']['ms_per_step_median']:.1f} ms/step; -> {paths['final']}")
    return result


def train_ms(buckets_ms_total: dict) -> float:
    """A run's training time: every step, plus the work outside steps that training needs (fwrank's pre-pass)."""
    return buckets_ms_total["step"] + buckets_ms_total.get("prepass", 0.0)


class Clock:
    """Named timers: CUDA events on a GPU (no sync inside the loop), perf_counter on CPU (ops are synchronous).
    cpu_time: the process's CPU time instead (bench.py --clock=cpu, one thread): on cores shared with other jobs it
    leaves out the time they held the cores."""

    def __init__(self, device: torch.device, cpu_time: bool = False):
        self.cuda = device.type == "cuda"
        self.now = time.process_time if cpu_time else time.perf_counter
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
            t0 = self.now()
            yield
            self.ms[name].append(1e3 * (self.now() - t0))

    def totals(self) -> dict:
        """{bucket: total ms}."""
        return {k: sum(v) for k, v in self.ms.items()}

    def collect(self):
        """Turn recorded events into milliseconds; one synchronize, outside the timed region."""
        if self.cuda:
            torch.cuda.synchronize()
            for name, pairs in self.pending.items():
                self.ms[name] += [s.elapsed_time(e) for s, e in pairs]
            self.pending.clear()


def missing_field(r) -> str | None:
    """The first thing a finished result lacks for the report (None: complete). The sweep's "done" and
    report.py's reading share this one check."""
    if not isinstance(r, dict):
        return "a JSON object"
    for k in REQUIRED:
        if k not in r:
            return k
    for k in CONFIG_KEYS:
        if not isinstance(r["config"], dict) or k not in r["config"]:
            return f"config.{k}"
    if not r["epochs"] or not isinstance(r["epochs"], list):
        return "epochs (none recorded)"
    if len(r["epochs"][-1].get("preds") or []) != len(r["dev_labels"]):
        return "epochs[-1].preds (one per dev example)"
    if "adapter_pct" not in r["budget"]:
        return "budget.adapter_pct"
    return None


def precision_of(r: dict) -> str:
    """A result's resolved precision, bf16 | fp32. A result from before it was recorded ran `auto` as bf16 on CUDA
    and fp32 on a CPU (the committed MiniLM tables: fp32)."""
    if r.get("precision"):
        return r["precision"]
    asked = r["config"].get("precision", "auto")
    if asked != "auto":
        return asked
    return "bf16" if str(r.get("environment", {}).get("device", "")).startswith("cuda") else "fp32"


def read_result(path: str, warn: bool = True) -> dict | None:
    """A run's result JSON (finished or failed), or None with a warning naming the file and what is wrong."""
    try:
        with open(path) as f:
            r = json.load(f)
        problem = None if isinstance(r, dict) and isinstance(r.get("config"), dict) and "status" in r else \
            "not a run result"
        if not problem and r["status"] == "ok" and missing_field(r):
            problem = f"a finished result without {missing_field(r)} (an older version's, or edited)"
    except (OSError, ValueError) as e:
        problem = f"unreadable ({type(e).__name__}: {e})"
    if problem:
        if warn:
            print(f"warning: {path}: {problem}; skipped", file=sys.stderr)
        return None
    return r
