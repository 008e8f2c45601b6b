"""The report: it only reads results. The comparison table (markdown), the paired statistics, the verdict and
the figure (PNG), from a folder of run JSONs (record.py's).

    python report.py results/cpu        # writes results/cpu/table.md and figure.png, prints the table

Cells are the final epoch's dev metric (accuracy for SST-2, Matthews correlation for CoLA) as
mean ± std over seeds with n; no epoch is picked on dev. Time is the training-step time (CUDA events or
perf_counter, evaluation excluded) as a ratio to LoRA's, from whole runs trained side by side (bench.py runs).
Runs of one method in one cell must share their configuration (but the seed): otherwise the report stops and
names the differing fields rather than pool them.
"""
import glob
import json
import os
import statistics
import sys
from collections import defaultdict
from types import SimpleNamespace

import torch

from data import TASKS
from fisher import LAMBDA, WEIGHTING
from record import IGNORED, METHODS, NAMES, read_result, run_name, score, train_ms, write_file

MATRICES = ("query", "key", "value", "attn.out", "ffn.in", "ffn.out")
TASK_METRIC = {t: m for t, (_, m) in TASKS.items()}


def load(folder: str) -> tuple[list[dict], list[str]]:
    """(finished runs, names of runs with no finished result): an .error.json counts only where no finished run
    has that name, and only under a name the sweep makes (a typo's rejected run is not the table's)."""
    if not os.path.isdir(folder):
        sys.exit(f"error: {folder} is not a folder: give the sweep's OUT folder (e.g. results/cpu)")
    results = {p: read_result(p) for p in sorted(glob.glob(os.path.join(folder, "*.json")))
               if not p.endswith(".partial.json") and not os.path.basename(p).startswith("bench_runs_")}
    runs = [r for r in results.values() if r and r["status"] == "ok"]
    done = {run_name(SimpleNamespace(**r["config"])) for r in runs}
    failed = sorted(os.path.basename(p) for p, r in results.items() if r and r["status"] == "error"
                    and os.path.basename(p).removesuffix(".error.json") not in done
                    and r["config"].get("method") in METHODS)
    return runs, failed


def check_pooling(runs: list[dict]) -> None:
    """Runs of one method in one cell are pooled over seeds only: any other config difference stops the report."""
    first, clash = {}, []
    for r in runs:
        c = r["config"]
        key = run_name(SimpleNamespace(**(c | {"seed": "*"})))  # the cell and method, and λ or lr where named
        ref = first.setdefault(key, c)
        diff = sorted(k for k in set(c) | set(ref) if k not in IGNORED + ("seed",) and c.get(k) != ref.get(k))
        if diff:
            clash.append(f"  {run_name(SimpleNamespace(**c))} vs {run_name(SimpleNamespace(**ref))}: "
                         + ", ".join(f"{k} {ref.get(k)!r} / {c.get(k)!r}" for k in diff[:6]))
    if clash:
        sys.exit("error: runs of one method and cell differ in more than the seed, so they cannot be pooled:\n"
                 + "\n".join(clash[:8]) + "\nKeep each configuration in its own folder (OUT=...).")


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

    draw = lambda p: torch.gather(p[seeds], 2, ex[:, None, :].expand(-1, S, -1))  # boot × S × N, resampled
    diffs = score(draw(P["a"]), y, metric).mean(-1) - score(draw(P["b"]), y, metric).mean(-1)
    point = statistics.mean(r["final"] for r in a) - statistics.mean(r["final"] for r in b)
    return point, diffs.quantile(0.025).item(), diffs.quantile(0.975).item()


# Student's t, 97.5% quantile, df = 1 … 30 (standard tables; tests check it against scipy where installed).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_interval(d: list[float]) -> tuple[float, float, float, int, int]:
    """(mean, low, high, n, how many > 0) of per-seed values d: the 95% t-interval, df = n - 1 (beyond 30: the
    df = 30 quantile, slightly wide). A paired interval when d are per-seed differences a_s - b_s."""
    n, m = len(d), statistics.mean(d)
    half = T975[min(n - 1, 30) - 1] * statistics.stdev(d) / n ** 0.5 if n > 1 else float("nan")
    return m, m - half, m + half, n, sum(x > 0 for x in d)


COMPARISONS = [("lora", "head")] + [(m, "lora") for m in METHODS if m not in ("lora", "head")] + \
    [("fwlora", m) for m in METHODS if m not in ("lora", "fwlora", "head")]


def comparisons(cells: dict) -> dict:
    """{(a, b): {cell: {"t": paired t over seeds, "boot": paired bootstrap}}} for the pairs in COMPARISONS (the
    adapters' gain over the head, every method against LoRA, FW-LoRA against AdaLoRA and each control), over the
    seeds both have."""
    out = defaultdict(dict)
    for cell, methods in cells.items():
        for a, b in COMPARISONS:
            seeds = sorted(set(methods.get(a, {})) & set(methods.get(b, {})))
            if seeds:
                ra, rb = [methods[a][s] for s in seeds], [methods[b][s] for s in seeds]
                out[(a, b)][cell] = {"t": t_interval([x["final"] - y["final"] for x, y in zip(ra, rb)]),
                                     "boot": paired_bootstrap(ra, rb)}
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
        out[next(iter(b["configs"].values()))["task"]] = {m.split(":")[0]: train_ms(row["buckets_ms_total"]) / base
                                                          for m, row in b["runs"].items()}  # "adalora:lr=…": its own
    return out


def excludes_zero(lo: float, hi: float) -> bool:
    return lo > 0 or hi < 0


def fmt_diff(d: float, lo: float, hi: float, n: int | None = None, pos: int | None = None) -> str:
    """×100, bold when the interval excludes 0; with n: how many seeds' differences are positive."""
    bold = "**" if excludes_zero(lo, hi) else ""
    return f"{bold}{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{bold}" + (f" ({pos}/{n} > 0)" if n else "")


def pair_name(a: str, b: str) -> str:
    short = lambda m: NAMES[m].split(" (")[0]
    return "adapters' gain: LoRA − head" if (a, b) == ("lora", "head") else f"{short(a)} − {short(b)}"


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
    lr = lambda c, m: "/".join(sorted({f"{r['config']['lr']:g}" for r in c.get(m, {}).values()})) or "-"
    out += ["", f"Learning rates ({' / '.join(cell_name(*c) for c in cells)}): " + ", ".join(
        f"{NAMES[m].split(' (')[0]} {' / '.join(lr(c, m) for c in cells.values())}" for m in rows) + "."]
    comp = comparisons(cells)
    out += ["", "Paired differences ×100 (a − b): the mean over seeds of the per-seed difference, its 95% paired "
            "t-interval over seeds (df = n − 1), and how many seeds' differences are positive; **bold**: the "
            "interval excludes 0:", "", head.replace("| method |", "| a − b |")]
    for (a, b), per_cell in comp.items():
        out.append(f"| {pair_name(a, b)} | " + " | ".join(fmt_diff(*per_cell[c]["t"]) if c in per_cell else "-"
                                                         for c in cells) + " |")
    out += ["", "Secondary: the same differences with a 95% paired bootstrap interval over seeds × dev examples "
            "(2,000 draws). With few seeds it is too narrow: each seed resample is likely, so it covers about "
            "[min, max] of the per-seed differences. The verdict uses the t-intervals.", "",
            head.replace("| method |", "| a − b |")]
    for (a, b), per_cell in comp.items():
        out.append(f"| {pair_name(a, b)} | " + " | ".join(fmt_diff(*per_cell[c]["boot"]) if c in per_cell else "-"
                                                         for c in cells) + " |")
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
        per = {c: v["t"] for c, v in comp.get((a, b), {}).items()}
        if not per:
            return "not run"
        parts = [f"{cell_name(*c)}: {fmt_diff(*t).replace('**', '')} "
                 f"({'higher' if t[1] > 0 else 'lower' if t[2] < 0 else 'no difference resolved'})"
                 for c, t in per.items()]
        wins, losses = sum(t[1] > 0 for t in per.values()), sum(t[2] < 0 for t in per.values())
        return (f"higher in {wins}, lower in {losses}, unresolved in {len(per) - wins - losses} of {len(per)} "
                f"cells. " + "; ".join(parts))
    n, c = len({r["config"]["seed"] for r in runs}), runs[0]["config"]
    lines = ["Verdict (written by report.py from the paired t-intervals above):", "",
             f"- Do the adapters beat the head alone (the floor)? {answer('lora', 'head')}",
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


DOSE = ("fwlora", "l2lora", "fwmax")  # the dose-response's methods: the hypothesis, its uniform and sharper controls


def dose_cells(runs: list[dict]) -> dict:
    """{(task, budget): {λ: {method: {seed: run}}}} of the DOSE methods, and LoRA's runs under λ = 0 (no penalty),
    where more than one λ was run."""
    cells = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for r in runs:
        c = r["config"]
        if c["method"] in DOSE + ("lora",) and "delta_w_fro" in r:
            cells[(c["task"], c["budget"])][0.0 if c["method"] == "lora" else c["fw_lambda"]][c["method"]][c["seed"]] = r
    return {k: dict(sorted(v.items())) for k, v in sorted(cells.items(), key=lambda kv: (kv[0][0] != "sst2", kv[0][1]))
            if len([lam for lam in v if lam > 0]) > 1}


def delta_w_norm(r: dict) -> float:
    """‖ΔW‖_F of the whole adapter: √(Σ_m ‖ΔW_m‖_F²)."""
    return sum(v * v for v in r["delta_w_fro"].values()) ** 0.5


def dose_response(cells: dict) -> str:
    """Per cell and λ: each DOSE method's metric, its ‖ΔW‖ against LoRA's of the same seed, the paired FW − L2 and
    fwmax − L2 t-intervals, and FW-LoRA's measured weight spread beside its bound max_m |w_m − w̄| <= max_m I_m
    (w_m = 1 − I_m and w̄ = 1 − 1/M, so |w_m − w̄| = |I_m − 1/M| <= max I_m)."""
    out = ["## Dose-response in λ", "", "Dev metric ×100 (mean ± std, n seeds); ‖ΔW‖ as a fraction of LoRA's on the "
           "same seed (mean; 1 = no shrinkage); paired differences ×100 with 95% t-intervals over seeds "
           "(**bold**: excludes 0); FW-LoRA's largest |w_m − w̄| over seeds against its bound, the largest I_m."]
    for (task, budget), by_lam in cells.items():
        lora = by_lam.get(0.0, {}).get("lora", {})
        out += ["", f"**{cell_name(task, budget)}**" + (f" (LoRA: {100 * statistics.mean(r['final'] for r in lora.values()):.1f}, "
                                                        f"n = {len(lora)})" if lora else ""), "",
                "| λ | " + " | ".join(NAMES[m].split(" (")[0] for m in DOSE) + " | FW − L2 | fwmax − L2 | ‖ΔW‖ ÷ LoRA's "
                "(FW / L2 / fwmax) | max\\|w − w̄\\| ≤ max I_m |", "|---" * 8 + "|"]
        for lam, ms in ((lam, ms) for lam, ms in by_lam.items() if lam > 0):
            def metric(m):
                f = [100 * r["final"] for r in ms.get(m, {}).values()]
                return f"{statistics.mean(f):.1f} ± {statistics.stdev(f):.1f} ({len(f)})" if len(f) > 1 else \
                    (f"{f[0]:.1f} (1)" if f else "-")

            def paired(a, b):
                seeds = sorted(set(ms.get(a, {})) & set(ms.get(b, {})))
                return fmt_diff(*t_interval([ms[a][s]["final"] - ms[b][s]["final"] for s in seeds])) \
                    if len(seeds) > 1 else "-"

            def shrink(m):
                seeds = sorted(set(ms.get(m, {})) & set(lora))
                return f"{statistics.mean(delta_w_norm(ms[m][s]) / delta_w_norm(lora[s]) for s in seeds):.2f}" \
                    if seeds else "-"
            fw = list(ms.get("fwlora", {}).values())
            spread = (f"{max(max(r['fw']['weight_max'] - (1 - 1 / r['budget']['n_matrices']), (1 - 1 / r['budget']['n_matrices']) - r['fw']['weight_min']) for r in fw):.4f} ≤ "
                      f"{max(r['fw']['importance_max'] for r in fw):.4f}") if fw else "-"
            out.append(f"| {lam:g} | " + " | ".join(metric(m) for m in DOSE) + f" | {paired('fwlora', 'l2lora')} | "
                       f"{paired('fwmax', 'l2lora')} | {' / '.join(shrink(m) for m in DOSE)} | {spread} |")
    return "\n".join(out)


def dose_figure(cells: dict, path: str) -> None:
    """Per cell: the metric and ‖ΔW‖ ÷ LoRA's against λ for the DOSE methods, with 95% t-intervals over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(cells), 2, figsize=(11, 3.4 * len(cells)), squeeze=False)
    for row, ((task, budget), by_lam) in zip(axes, cells.items()):
        lora = by_lam.get(0.0, {}).get("lora", {})
        for ax, (what, value) in zip(row, (("dev metric ×100", lambda r, s: 100 * r["final"]),
                                           ("‖ΔW‖ ÷ LoRA's (same seed)", lambda r, s: delta_w_norm(r) / delta_w_norm(lora[s])))):
            for k, m in enumerate(DOSE):
                pts = [(lam, t_interval([value(r, s) for s, r in ms[m].items() if s in lora or "‖" not in what]))
                       for lam, ms in by_lam.items() if lam > 0 and len(ms.get(m, {})) > 1]
                if pts:
                    x = [lam * (1 + 0.08 * (k - 1)) for lam, _ in pts]  # side by side, not on top of each other
                    ax.errorbar(x, [t[0] for _, t in pts], yerr=[[t[0] - t[1] for _, t in pts], [t[2] - t[0] for _, t in pts]],
                                marker="o", capsize=3, label=NAMES[m].split(" (")[0])
            if what.startswith("dev") and lora:
                ax.axhline(100 * statistics.mean(r["final"] for r in lora.values()), color="grey", ls="--", label="LoRA")
            ax.set_xscale("log")
            ax.set_xlabel("λ")
            ax.set_title(f"{cell_name(task, budget)}: {what}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    write_file(path, lambda f: fig.savefig(f, dpi=110, format="png"), "wb")
    plt.close(fig)


def tuning(runs: list[dict]) -> str:
    """The held-out-train tuning: per task, each method's held-out metric at each lr, and the lr it gets."""
    grid = defaultdict(lambda: defaultdict(dict))
    for r in runs:
        c = r["config"]
        grid[c["task"]][c["method"]][c["lr"]] = r
    out = [f"## Learning-rate tuning on {runs[0]['config']['heldout']:,} held-out training examples (dev unread)"]
    for task, methods in sorted(grid.items(), key=lambda kv: kv[0] != "sst2"):
        lrs = sorted({lr for m in methods.values() for lr in m})
        out += ["", f"**{task}** ({TASK_METRIC[task]} ×100 on the held-out slice, seed "
                    f"{'/'.join(sorted({str(r['config']['seed']) for m in methods.values() for r in m.values()}))}):",
                "", "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |", "|---" * (len(lrs) + 2) + "|"]
        for m, by_lr in methods.items():
            best = max(by_lr, key=lambda lr: by_lr[lr]["final"])
            out.append(f"| {NAMES[m]} | " + " | ".join(
                (f"**{100 * by_lr[lr]['final']:.1f}**" if lr == best else f"{100 * by_lr[lr]['final']:.1f}")
                if lr in by_lr else "-" for lr in lrs) + f" | {best:g} |")
    return "\n".join(out)


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
    write_file(path, lambda f: fig.savefig(f, dpi=110, format="png"), "wb")
    plt.close(fig)
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
    all_runs, failed = load(folder)
    if not all_runs:
        sys.exit(f"no finished runs in {folder}" + (f" (failed: {', '.join(failed)})" if failed else ""))
    check_pooling(all_runs)
    held = [r for r in all_runs if r["config"].get("heldout", 0)]
    if held and len(held) < len(all_runs):
        sys.exit(f"error: {folder} mixes tuning runs (held-out train) with dev runs: keep them in separate folders")
    # The main table: every method at the hypothesis's λ; the other λ feed the dose-response only.
    runs = [r for r in all_runs if r["config"]["method"] not in WEIGHTING or r["config"].get("fw_lambda", LAMBDA) == LAMBDA]
    c, env = runs[0]["config"], runs[0]["environment"]
    head = (f"# Results: {folder}\n\nModel `{c['model']}`, {len(all_runs)} finished runs, device "
            f"{env.get('device', '?')} ({env.get('device_name', '?')}, {env.get('threads', '?')} threads per run), "
            f"data: {data_source(all_runs)}.")
    if held:
        text = head + "\n\n" + tuning(held)
        write_file(os.path.join(folder, "table.md"), lambda f: f.write(text + "\n"))
        print(text)
        return text
    table, comp = tables(runs, folder)
    text = head + f"\n\n{table}\n\n" + verdict(comp, runs, bench_ratios(folder))
    dose = dose_cells(all_runs)
    if dose:
        text += "\n\n" + dose_response(dose)
        dose_figure(dose, os.path.join(folder, "dose.png"))
        text += "\n\n![metric and ‖ΔW‖ against λ](dose.png)"
    if failed:
        text += "\n\nRuns with no finished result (see their .error.json and .log): " + ", ".join(failed)
    if figure(runs, os.path.join(folder, "figure.png")):
        text += "\n\n![AdaLoRA ranks, FW-LoRA importance and weights, fwrank ranks](figure.png)"
    write_file(os.path.join(folder, "table.md"), lambda f: f.write(text + "\n"))  # an earlier table survives a failure
    print(text)
    return text


def data_source(runs: list[dict]) -> str:
    """The one data source of the table: the shipped GLUE copy, the hub, or a folder (mixing is refused)."""
    dirs = {r["config"].get("glue_dir", "") for r in runs}
    if len(dirs) > 1:
        sys.exit(f"error: the runs read different data sources ({', '.join(sorted(map(repr, dirs)))}): "
                 "a table comes from one source")
    d = dirs.pop()
    return "the GLUE copy shipped in glue/" if d == "" else "GLUE from the hub (nyu-mll/glue)" if d == "hub" else d


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python report.py FOLDER   (the sweep's OUT, e.g. results/cpu)")
    try:
        main(sys.argv[1])
    except OSError as e:
        sys.exit(f"error: {e}")
