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
import json
import os
import platform
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

NAMES = {"lora": "LoRA", "adalora": "AdaLoRA", "fwlora": "FW-LoRA", "l2lora": "uniform L2 (ablation)"}
METHODS = tuple(NAMES)  # the one list of methods: train.py, run_all.sh and the tables take it from here
# Config fields that cannot change a result: a finished run is reused whatever they were.
IGNORED = ("out_dir", "log_every", "timing_skip", "save_adapters", "overwrite")
MATRICES = ("query", "key", "value", "attn.out", "ffn.in", "ffn.out")


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
                  best=max(e[metric] for e in result["epochs"]))
    result["budget"].update(adapter_params=n_adapter, adapter_pct=100 * n_adapter / info["n_base_params"])
    result["timing"] = {
        "train_ms_total": sum(all_ms), "ms_per_step_median": float(torch.tensor(ms).median()),
        "ms_per_step_mean": sum(ms) / len(ms), "examples_per_s": 1e3 * cfg.batch_size * len(ms) / sum(ms),
        "buckets_ms_total": {k: sum(v) for k, v in run.clock.ms.items()}, "steps_timed": len(ms),
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
               if not p.endswith(".partial.json")}
    runs = [r for r in results.values() if r and r["status"] == "ok"]
    done = {run_name(SimpleNamespace(**r["config"])) for r in runs}
    failed = sorted(os.path.basename(p) for p, r in results.items()
                    if r and r["status"] == "error" and os.path.basename(p).removesuffix(".error.json") not in done)
    return runs, failed


def preflight(lines: list[str]) -> None:
    """Load every model and data set the runs to do need, once, before the first run (SystemExit if one fails)."""
    from data import load_glue, load_model
    from train import parse_args
    cfgs = [parse_args(line.split()) for line in lines]
    try:
        for model in sorted({c.model for c in cfgs}):
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
    from train import check_config, parse_args  # here, not at the top: train.py imports this module
    out, clash = [], []
    lines = [line.replace("--method=all", f"--method={m}") for line in lines
             for m in (METHODS if "--method=all" in line.split() else [None])]  # 'all': every method, in order
    for line in lines:
        cfg = parse_args(line.split())
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


def mean_std(xs: list[float], scale: float = 1.0) -> str:
    m = statistics.mean(xs) * scale
    return f"{m:.1f} ± {statistics.stdev(xs) * scale:.1f} ({len(xs)})" if len(xs) > 1 else f"{m:.1f} (1)"


def tables(runs: list[dict]) -> str:
    cell = defaultdict(list)   # (method, task, budget) -> [metric]
    pct = defaultdict(list)    # -> [achieved adapter %]
    ms = {}                    # (method, task, budget, seed) -> training ms
    for r in runs:
        c = r["config"]
        key = (c["method"], c["task"], c["budget"])
        cell[key].append(r["final"])
        pct[key].append(r["budget"]["adapter_pct"])
        ms[key + (c["seed"],)] = r["timing"]["train_ms_total"]
    cols = sorted({(t, b) for _, t, b in cell}, key=lambda x: (x[0] != "sst2", x[1]))
    head = "| method | " + " | ".join(f"{'SST-2 acc' if t == 'sst2' else 'CoLA MCC'} {b:g}%" for t, b in cols) + " |"
    sep = "|---" * (len(cols) + 1) + "|"
    out = ["Dev metric ×100, final epoch, mean ± std (n seeds):", "", head, sep]
    present = [m for m in METHODS if any(k[0] == m for k in cell)]
    for m in present:
        out.append(f"| {NAMES[m]} | " + " | ".join(mean_std(cell[(m, t, b)], 100) if cell[(m, t, b)] else "-"
                                                for t, b in cols) + " |")
    out += ["", "Achieved adapter parameters, % of the base model (nominal budget in the column):", "", head, sep]
    for m in present:
        out.append(f"| {NAMES[m]} | " + " | ".join(f"{statistics.mean(pct[(m, t, b)]):.3f}%" if pct[(m, t, b)]
                                                else "-" for t, b in cols) + " |")
    out += ["", "Training time (steps only) as a ratio to LoRA with the same task, budget and seed:", "", head, sep]
    for m in present:
        row = []
        for t, b in cols:
            ratios = [v / ms[("lora", t, b, s)] for (mm, tt, bb, s), v in ms.items()
                      if (mm, tt, bb) == (m, t, b) and ("lora", t, b, s) in ms]
            row.append(f"{statistics.mean(ratios):.3f}×" if ratios else "-")
        out.append(f"| {NAMES[m]} | " + " | ".join(row) + " |")
    return "\n".join(out)


def ablation(runs: list[dict]) -> str:
    """FW-LoRA against the uniform-L2 ablation, cell by cell: does the Fisher weighting change anything?"""
    by = {(r["config"]["method"], r["config"]["task"], r["config"]["budget"], r["config"]["seed"]): r for r in runs}
    rows = []
    for (m, t, b, s), fw in sorted(by.items(), key=lambda kv: (kv[0][1] != "sst2", kv[0][2], kv[0][3])):
        l2 = by.get(("l2lora", t, b, s))
        if m != "fwlora" or not l2:
            continue
        pf, pl = fw["fw"]["per_matrix"], l2["fw"]["per_matrix"]
        rel = [abs(pf[k]["delta_w_fro"] - pl[k]["delta_w_fro"]) / pl[k]["delta_w_fro"] for k in pf]
        rows.append(f"| {t} {b:g}% s{s} | {100 * fw['final']:.2f} | {100 * l2['final']:.2f} | "
                    f"{fw['fw']['weight_min']:.3f}-{fw['fw']['weight_max']:.4f} | "
                    f"{100 * statistics.median(rel):.2f}% / {100 * max(rel):.2f}% |")
    if not rows:
        return ""
    return "\n".join(["", "", "FW-LoRA vs the uniform-L2 ablation (same λ, same code; only the weights differ):", "",
                      "| run | FW-LoRA ×100 | uniform L2 ×100 | FW weights 1 − I_m "
                      "| final ‖ΔW_m‖_F differ, median / max |",
                      "|---|---|---|---|---|", *rows])


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
    """Per task, at the budget nearest 0.2%, seed 0: AdaLoRA's final ranks beside FW-LoRA's I_m and weight."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pick, seed0 = {}, min(r["config"]["seed"] for r in runs)
    for r in runs:
        c = r["config"]
        if c["method"] in ("adalora", "fwlora") and c["seed"] == seed0:
            key = (c["task"], c["method"])
            if key not in pick or abs(c["budget"] - 0.2) < abs(pick[key]["config"]["budget"] - 0.2):
                pick[key] = r
    tasks = sorted({t for t, _ in pick if (t, "adalora") in pick and (t, "fwlora") in pick})
    if not tasks:
        return False
    fig, axes = plt.subplots(len(tasks), 3, figsize=(13, 3.2 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        ada, fw = pick[(task, "adalora")], pick[(task, "fwlora")]
        per, ranks = fw["fw"]["per_matrix"], ada["adalora"]["rank_pattern"]
        rho = spearman([ranks[k] for k in per], [per[k]["importance"] for k in per])
        panels = [(ranks, f"AdaLoRA final rank (budget {ada['config']['budget']:g}%)", "viridis"),
                  ({k: v["importance"] for k, v in per.items()},
                   f"FW-LoRA importance I_m (Spearman ρ with AdaLoRA rank {rho:.2f})", "magma"),
                  ({k: v["weight"] for k, v in per.items()}, "FW-LoRA penalty weight 1 - I_m", "cividis")]
        for ax, (vals, title, cmap) in zip(row, panels):
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
    c = runs[0]["config"]
    env = runs[0]["environment"]
    text = (f"# Results: {folder}\n\nModel `{c['model']}`, {len(runs)} finished runs, device {env['device']} "
            f"({env['device_name']}, {env['threads']} threads).\n\n" + tables(runs) + ablation(runs))
    if failed:
        text += "\n\nFailed runs (see their .error.json and .log): " + ", ".join(failed)
    if figure(runs, os.path.join(folder, "figure.png")):
        text += "\n\n![AdaLoRA ranks vs FW-LoRA importance](figure.png)"
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
