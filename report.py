"""The results: one JSON per run (its name, its paths, atomic writes, the summary train.py records), the
sweep's plan (which runs a folder already holds), and the comparison table (markdown) and figure (PNG).

    python report.py results/cpu        # writes results/cpu/table.md and results/cpu/figure.png, prints the table
    ... | python report.py plan OUT     # run_all.sh: one line of train.py arguments per run in, a plan out

Cells are the final epoch's dev metric (accuracy for SST-2, Matthews correlation for CoLA) as
mean ± std over seeds with n; no epoch is picked on dev. Time is the training-step time (CUDA events or
perf_counter, evaluation excluded) as a ratio to LoRA's run with the same task, budget and seed.
"""
import dataclasses
import glob
import inspect
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from data import TASKS
from lora import DEFAULT_TARGETS, adapter_params, save_adapters

NAMES = {"lora": "LoRA", "adalora": "AdaLoRA", "fwlora": "FW-LoRA", "l2lora": "uniform L2 (control)",
         "fwshuffle": "shuffled FW (control)", "fwmax": "max-normalised FW (control)", "fwrank": "Fisher ranks (control)"}
METHODS = tuple(NAMES)  # the one list of methods: train.py, run_all.sh and the tables take it from here
# Config fields that cannot change a result: a finished run is reused whatever they were.
IGNORED = ("out_dir", "log_every", "timing_skip", "save_adapters", "overwrite")
MATRICES = ("query", "key", "value", "attn.out", "ffn.in", "ffn.out")


# A run's arguments: --field=value ------------------------------------------------------------------------

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


# Writing: one JSON per run ------------------------------------------------------------------------------

def run_name(cfg) -> str:
    """The one run-name formula (train.py's files, run_all.sh's resume, bench.py's output)."""
    return f"{cfg.task}_{cfg.method}_b{cfg.budget:g}_s{cfg.seed}"


def metrics(preds: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy and Matthews correlation (0 when a class is never predicted, as scikit-learn gives)."""
    p, y = preds.long(), labels.long()
    tp, tn = int(((p == 1) & (y == 1)).sum()), int(((p == 0) & (y == 0)).sum())
    fp, fn = int(((p == 1) & (y == 0)).sum()), int(((p == 0) & (y == 1)).sum())
    den = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    return {"accuracy": (tp + tn) / len(y), "mcc": (tp * tn - fp * fn) / den if den else 0.0}


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


def matmul_peak(device, dtype, n: int = 2048) -> float:
    """GFLOP/s of an n × n matmul here, the median of 10 after a warm-up: the limit a step is compared with."""
    a, clock = torch.randn(n, n, device=device, dtype=dtype), Clock(device)
    for _ in range(11):
        with clock("mm"):
            a @ a
    clock.collect()
    return 2 * n ** 3 / sorted(clock.ms["mm"][1:])[5] / 1e6


# Reading: the sweep's plan, the tables and the figure ------------------------------------------------------

def read_result(path: str) -> dict | None:
    """A run's result JSON, or None with a warning that names the file (truncated, not JSON, not a result)."""
    try:
        r = json.load(open(path))
        if isinstance(r, dict) and isinstance(r.get("config"), dict) and "status" in r:
            return r
        problem = "not a run result"
    except (OSError, ValueError) as e:
        problem = f"unreadable ({type(e).__name__}: {e})"
    print(f"warning: {path}: {problem}; skipped", file=sys.stderr)
    return None


def load(folder: str) -> tuple[list[dict], list[str]]:
    """(finished runs, names of failed runs): an .error.json counts only where no finished run has that name."""
    results = {p: read_result(p) for p in sorted(glob.glob(os.path.join(folder, "*.json")))
               if not p.endswith(".partial.json") and not os.path.basename(p).startswith("bench_runs_")}
    runs = [r for r in results.values() if r and r["status"] == "ok"]
    done = {run_name(SimpleNamespace(**r["config"])) for r in runs}
    failed = sorted(os.path.basename(p) for p, r in results.items()
                    if r and r["status"] == "error" and os.path.basename(p).removesuffix(".error.json") not in done)
    return runs, failed


def preflight(lines: list[str]) -> None:
    """Load every model and data set the runs to do need, once, before the first run (SystemExit if one fails).
    A random model (data.RANDOM_MODELS) is built from a config, with nothing to fetch: it is not loaded here."""
    from data import RANDOM_MODELS, load_glue, load_model
    from train import Config
    cfgs = [parse_args(line.split(), Config) for line in lines]
    try:
        for model in sorted({c.model for c in cfgs} - set(RANDOM_MODELS)):  # those cannot fail to download
            load_model(model)
        for task, glue_dir in sorted({(c.task, c.glue_dir) for c in cfgs}):
            load_glue(task, glue_dir)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}\nNothing was run.")


def plan(folder: str, lines: list[str]) -> list[str]:
    """One line per run of train.py arguments (--method=all: one line per method) -> 'done NAME' where the
    folder holds a finished result of exactly that configuration, else 'todo NAME ARGS'. A corrupt result is
    moved aside to NAME.corrupt and redone; a result made with another configuration, or a model or data set
    that cannot be loaded, stops the sweep before any work (SystemExit)."""
    from train import Config, check_config  # here, not at the top: train.py imports this module
    out, clash = [], []
    lines = [line.replace("--method=all", f"--method={m}") for line in lines
             for m in (METHODS if "--method=all" in line.split() else [None])]  # 'all': every method, in order
    for line in lines:
        cfg = parse_args(line.split(), Config)
        check_config(cfg)
        name = run_name(cfg)
        path = os.path.join(folder, name + ".json")
        r = read_result(path) if os.path.exists(path) else None
        if os.path.exists(path) and (r is None or r["status"] != "ok"):
            os.replace(path, os.path.join(folder, name + ".corrupt"))
            print(f"warning: {path} is not a finished result: moved to {name}.corrupt, the run is redone",
                  file=sys.stderr)
        elif r:
            diff = [f"{k} {r['config'].get(k, '(absent)')!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
                    if k not in IGNORED and r["config"].get(k, "(absent)") != v]
            if diff:
                clash.append(f"  {name}.json: " + ", ".join(diff))
            else:
                out.append(f"done {name}")
            continue
        out.append(f"todo {name} {line}")
    if clash:
        sys.exit(f"error: {folder} holds results made with another configuration (field: there -> now):\n"
                 + "\n".join(clash[:8]) + (f"\n  ... and {len(clash) - 8} more" if len(clash) > 8 else "")
                 + f"\nNothing was run. Use another folder (OUT=...) for this configuration, or move those "
                   f"results out of {folder} to redo them.")
    preflight([line.split(" ", 2)[2] for line in out if line.startswith("todo")])
    return out


def cell_name(task: str, budget: float) -> str:
    return f"{'SST-2 acc' if task == 'sst2' else 'CoLA MCC'} {budget:g}%"


def by_cell(runs: list[dict]) -> dict:
    """{(task, budget): {method: {seed: run}}}, cells in a fixed order (SST-2 first, budgets ascending)."""
    cells = defaultdict(lambda: defaultdict(dict))
    for r in runs:
        c = r["config"]
        cells[(c["task"], c["budget"])][c["method"]][c["seed"]] = r
    return dict(sorted(cells.items(), key=lambda kv: (kv[0][0] != "sst2", kv[0][1])))


def paired_bootstrap(a: list[dict], b: list[dict], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Difference of the mean final-epoch metric, a - b, and its 95% interval: a paired bootstrap over seeds
    and dev examples (Dror et al. 2018). a[i] and b[i] share seed i (same data order and init); each draw
    resamples the seeds and the dev examples, the same ones for both methods."""
    metric = a[0]["metric"]
    labels = torch.tensor(a[0]["dev_labels"])
    P = {k: torch.tensor([r["epochs"][-1]["preds"] for r in runs]) for k, runs in (("a", a), ("b", b))}  # seeds × N
    g = torch.Generator().manual_seed(seed)
    S, N = P["a"].shape
    seeds, ex = torch.randint(0, S, (n_boot, S), generator=g), torch.randint(0, N, (n_boot, N), generator=g)
    y = labels[ex][:, None, :]  # boot × 1 × N

    def score(p):  # boot × S' × N predictions -> boot: the mean over the drawn seeds of accuracy or MCC
        tp, tn = ((p == 1) & (y == 1)).sum(-1).double(), ((p == 0) & (y == 0)).sum(-1).double()
        fp, fn = ((p == 1) & (y == 0)).sum(-1).double(), ((p == 0) & (y == 1)).sum(-1).double()
        if metric == "accuracy":
            return ((tp + tn) / N).mean(-1)
        den = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)).sqrt()
        return torch.where(den > 0, (tp * tn - fp * fn) / den.clamp_min(1e-12), 0.0).mean(-1)
    draw = lambda p: torch.gather(p[seeds], 2, ex[:, None, :].expand(-1, S, -1))  # boot × S × N, resampled
    diffs = score(draw(P["a"])) - score(draw(P["b"]))
    point = statistics.mean(r["final"] for r in a) - statistics.mean(r["final"] for r in b)
    return point, diffs.quantile(0.025).item(), diffs.quantile(0.975).item()


COMPARISONS = [(m, "lora") for m in METHODS if m != "lora"] + [("fwlora", m) for m in METHODS
                                                              if m not in ("lora", "fwlora")]


def comparisons(cells: dict) -> dict:
    """{(a, b): {cell: (difference, low, high, n seeds)}} for every method against LoRA and FW-LoRA against
    AdaLoRA and each control, over the seeds both have."""
    out = defaultdict(dict)
    for cell, methods in cells.items():
        for a, b in COMPARISONS:
            seeds = sorted(set(methods.get(a, {})) & set(methods.get(b, {})))
            if seeds:
                out[(a, b)][cell] = (*paired_bootstrap([methods[a][s] for s in seeds],
                                                       [methods[b][s] for s in seeds]), len(seeds))
    return out


def degenerate(r: dict) -> bool:
    """A run whose final predictions are one class (CoLA's MCC 0 hides it)."""
    return len(set(r["epochs"][-1]["preds"])) < 2


def bench_ratios(folder: str) -> dict:
    """{task: {method: training time ratio to LoRA}} from the side-by-side runs (bench.py runs) in the folder,
    computed from their recorded buckets (train_ms: fwrank's pre-pass counts)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "bench_runs_*.json"))):
        b = json.load(open(path))
        base = train_ms(b["runs"]["lora"]["buckets_ms_total"])
        out[next(iter(b["configs"].values()))["task"]] = {m: train_ms(row["buckets_ms_total"]) / base
                                                          for m, row in b["runs"].items()}
    return out


def fmt_diff(d: float, lo: float, hi: float, n: int) -> str:
    bold = "**" if lo > 0 or hi < 0 else ""
    return f"{bold}{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{bold}"


def tables(runs: list[dict], folder: str) -> tuple[str, dict]:
    cells, rows = by_cell(runs), [m for m in METHODS if any(m in c for c in by_cell(runs).values())]
    head = "| method | " + " | ".join(cell_name(*c) for c in cells) + " |\n" + "|---" * (len(cells) + 1) + "|"
    out = ["Dev metric ×100 at the final epoch (the headline; no epoch is picked on dev): mean ± std (n seeds), "
           "the best epoch's mean after it, and the runs that predict a single class (degenerate):", "", head]
    for m in rows:
        vals = []
        for c in cells.values():
            rs = list(c.get(m, {}).values())
            if not rs:
                vals.append("-")
                continue
            fin, best = [100 * r["final"] for r in rs], [100 * r["best"] for r in rs]
            sd = f" ± {statistics.stdev(fin):.1f}" if len(fin) > 1 else ""
            deg = sum(map(degenerate, rs))
            vals.append(f"{statistics.mean(fin):.1f}{sd} ({len(fin)}); best {statistics.mean(best):.1f}"
                        + (f"; **{deg} degenerate**" if deg else ""))
        out.append(f"| {NAMES[m]} | " + " | ".join(vals) + " |")
    comp = comparisons(cells)
    out += ["", "Paired differences ×100 (a − b), mean over seeds, with a 95% interval from a paired bootstrap over "
            "seeds × dev examples (2,000 draws); **bold**: the interval excludes 0:", "",
            head.replace("| method |", "| a − b |")]
    for (a, b), per_cell in comp.items():
        vals = [fmt_diff(*per_cell[c]) if c in per_cell else "-" for c in cells]
        out.append(f"| {NAMES[a].split(' (')[0]} − {NAMES[b].split(' (')[0]} | " + " | ".join(vals) + " |")
    out += ["", "Achieved adapter parameters, % of the base model (nominal budget in the column):", "", head]
    for m in rows:
        out.append(f"| {NAMES[m]} | " + " | ".join(f"{statistics.mean(r['budget']['adapter_pct'] for r in c[m].values()):.3f}%"
                                                if c.get(m) else "-" for c in cells.values()) + " |")
    spread = [f"| {NAMES[m]} | " + " | ".join(
        f"{min(r['fw']['weight_min'] for r in c[m].values()):.3f}–{max(r['fw']['weight_max'] for r in c[m].values()):.3f}"
        if c.get(m) else "-" for c in cells.values()) + " |" for m in rows if any(
        "fw" in r for c in cells.values() for r in c.get(m, {}).values())]
    if spread:
        out += ["", "Penalty weights w_m (min–max over matrices and seeds; every variant has mean 1 − 1/M):", "", head,
                *spread]
    ratios = bench_ratios(folder)
    if ratios:
        out += ["", "Training time as a ratio to LoRA, whole runs trained side by side in one process "
                "(bench.py runs; the sweep's own per-run times share the CPU and are not used):", "",
                "| method | " + " | ".join(ratios) + " |", "|---" * (len(ratios) + 1) + "|"]
        for m in [m for m in METHODS if any(m in t for t in ratios.values())]:
            out.append(f"| {NAMES[m]} | " + " | ".join(f"{t[m]:.3f}×" if m in t else "-" for t in ratios.values()) + " |")
    return "\n".join(out), comp


def verdict(comp: dict, runs: list[dict], ratios: dict) -> str:
    """The questions the table exists for, each answered from its paired intervals, cell by cell."""
    def answer(a, b):
        per = comp.get((a, b), {})
        if not per:
            return "not run"
        parts = [f"{cell_name(*c)}: {fmt_diff(*t).strip('*')} "
                 f"({'higher' if t[1] > 0 else 'lower' if t[2] < 0 else 'no difference resolved'})"
                 for c, t in per.items()]
        wins, losses = sum(lo > 0 for _, lo, _, _ in per.values()), sum(hi < 0 for _, _, hi, _ in per.values())
        return (f"higher in {wins}, lower in {losses}, unresolved in {len(per) - wins - losses} of {len(per)} "
                f"cells. " + "; ".join(parts))
    n, c = len({r["config"]["seed"] for r in runs}), runs[0]["config"]
    lines = ["Verdict (written by report.py from the intervals above):", "",
             f"- Does FW-LoRA beat LoRA? {answer('fwlora', 'lora')}",
             f"- Does FW-LoRA match AdaLoRA? {answer('fwlora', 'adalora')}",
             f"- Does FW-LoRA beat the uniform-L2 control (same penalty, equal weights)? {answer('fwlora', 'l2lora')}",
             f"- Does FW-LoRA beat the shuffled control (same weights, random matrices)? {answer('fwlora', 'fwshuffle')}",
             f"- Does FW-LoRA beat the sharper, max-normalised weighting? {answer('fwlora', 'fwmax')}",
             f"- Do Fisher-allocated ranks (fwrank) beat LoRA? {answer('fwrank', 'lora')}"]
    if ratios:
        lines.append("- Time, side by side (× LoRA): " + "; ".join(
            f"{task}: " + ", ".join(f"{NAMES[m].split(' (')[0]} {v:.3f}" for m, v in t.items() if m != "lora")
            for task, t in ratios.items()))
    capped = ", ".join(f"{t} capped at {k:,}" for t, k in sorted({(r["config"]["task"], r["config"].get("max_train", 0))
                                                                   for r in runs}) if k)
    lines += ["", f"What this can and cannot show: {n} seeds of `{c['model']}` "
              f"({'training sets: ' + capped if capped else 'full training sets'}) on GLUE dev. An interval "
              "that includes 0 means the difference is not resolved at this n, not that the methods are equal; "
              "an interval that excludes 0 is evidence for this model, data size and schedule only, not for "
              "roberta-base at the paper setting."]
    return "\n".join(lines)


def matrix_grid(names_values: dict) -> tuple[list[list[float]], int]:
    """{module name: value} -> 6 × n_layers grid (rows: q, k, v, attn out, FFN in, FFN out)."""
    grid = defaultdict(dict)
    for name, v in names_values.items():
        layer = int(name.split(".layer.")[1].split(".")[0])
        kind = (0 if name.endswith("query") else 1 if name.endswith("key") else 2 if name.endswith("value") else
                3 if "attention.output" in name else 4 if "intermediate" in name else 5)
        grid[kind][layer] = v
    n = 1 + max(l for row in grid.values() for l in row)
    return [[grid[k].get(l, float("nan")) for l in range(n)] for k in range(6)], n


def figure(runs: list[dict], path: str) -> bool:
    """Per task, at the budget nearest 0.2%, lowest seed: AdaLoRA's final ranks, FW-LoRA's I_m and weights, and
    fwrank's allocated ranks, per layer and matrix."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pick, seed0 = {}, min(r["config"]["seed"] for r in runs)
    for r in runs:
        c = r["config"]
        if c["method"] in ("adalora", "fwlora", "fwrank") and c["seed"] == seed0:
            key = (c["task"], c["method"])
            if key not in pick or abs(c["budget"] - 0.2) < abs(pick[key]["config"]["budget"] - 0.2):
                pick[key] = r
    tasks = sorted({t for t, _ in pick if (t, "adalora") in pick and (t, "fwlora") in pick})
    if not tasks:
        return False
    fig, axes = plt.subplots(len(tasks), 4, figsize=(17, 3.2 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        ada, fw, rank = pick[(task, "adalora")], pick[(task, "fwlora")], pick.get((task, "fwrank"))
        per, ranks = fw["fw"]["per_matrix"], ada["adalora"]["rank_pattern"]
        rho = spearman([ranks[k] for k in per], [per[k]["importance"] for k in per])
        panels = [(ranks, f"AdaLoRA final rank ({ada['config']['budget']:g}%)", "viridis"),
                  ({k: v["importance"] for k, v in per.items()}, f"FW-LoRA I_m (Spearman ρ with AdaLoRA {rho:.2f})",
                   "magma"), ({k: v["weight"] for k, v in per.items()}, "FW-LoRA penalty weight w_m", "cividis"),
                  (rank["budget"]["fwrank_ranks"] if rank else {}, "fwrank: ranks ∝ pre-pass I_m", "viridis")]
        for ax, (vals, title, cmap) in zip(row, panels):
            if not vals:
                ax.set_axis_off()
                continue
            grid, n = matrix_grid(vals)
            im = ax.imshow(grid, cmap=cmap, aspect="auto")
            ax.set_yticks(range(6), MATRICES)
            ax.set_xticks(range(n), [str(i) for i in range(n)])
            ax.set_xlabel("layer")
            ax.set_title(f"{task.upper()}: {title}", fontsize=9)
            fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def spearman(x: list[float], y: list[float]) -> float:
    def rank(v):  # average ranks for ties
        s = sorted(v)
        return [s.index(a) + (s.count(a) - 1) / 2 for a in v]
    rx, ry = rank(x), rank(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / den if den else float("nan")


def main(folder: str) -> str:
    runs, failed = load(folder)
    if not runs:
        sys.exit(f"no finished runs in {folder}" + (f" (failed: {', '.join(failed)})" if failed else ""))
    c, env = runs[0]["config"], runs[0]["environment"]
    table, comp = tables(runs, folder)
    text = (f"# Results: {folder}\n\nModel `{c['model']}`, {len(runs)} finished runs, device {env['device']} "
            f"({env['device_name']}, {env['threads']} threads per run).\n\n{table}\n\n"
            + verdict(comp, runs, bench_ratios(folder)))
    if failed:
        text += "\n\nFailed runs (see their .error.json and .log): " + ", ".join(failed)
    if figure(runs, os.path.join(folder, "figure.png")):
        text += "\n\n![AdaLoRA ranks, FW-LoRA importance and weights, fwrank ranks](figure.png)"
    with open(os.path.join(folder, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    if sys.argv[1:2] == ["plan"]:
        try:
            print("\n".join(plan(sys.argv[2], [l for l in sys.stdin.read().splitlines() if l.strip()])))
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "results/cpu")
