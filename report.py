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

from record import IGNORED, METHODS, NAMES, read_result, run_name, score, train_ms, write_file

MATRICES = ("query", "key", "value", "attn.out", "ffn.in", "ffn.out")


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
        key = (c["task"], c["budget"], c["method"])
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
    runs, failed = load(folder)
    if not runs:
        sys.exit(f"no finished runs in {folder}" + (f" (failed: {', '.join(failed)})" if failed else ""))
    check_pooling(runs)
    c, env = runs[0]["config"], runs[0]["environment"]
    table, comp = tables(runs, folder)
    text = (f"# Results: {folder}\n\nModel `{c['model']}`, {len(runs)} finished runs, device {env.get('device', '?')} "
            f"({env.get('device_name', '?')}, {env.get('threads', '?')} threads per run), data: {data_source(runs)}."
            f"\n\n{table}\n\n"
            + verdict(comp, runs, bench_ratios(folder)))
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
