"""Turn a folder of run results into the comparison table (markdown) and the rank/importance figure (PNG).

    python report.py results/cpu        # writes results/cpu/table.md and results/cpu/figure.png, prints the table

Cells are the final epoch's dev metric (accuracy for SST-2, Matthews correlation for CoLA) as
mean ± std over seeds with n; no epoch is picked on dev. Time is the training-step time (CUDA events or
perf_counter, evaluation excluded) as a ratio to LoRA's run with the same task, budget and seed.
"""
import glob
import json
import os
import statistics
import sys
from collections import defaultdict

METHODS = ("lora", "adalora", "fwlora", "l2lora")
NAMES = {"lora": "LoRA", "adalora": "AdaLoRA", "fwlora": "FW-LoRA", "l2lora": "uniform L2 (ablation)"}
MATRICES = ("query", "key", "value", "attn.out", "ffn.in", "ffn.out")


def load(folder: str) -> list[dict]:
    runs = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        if path.endswith((".partial.json", ".error.json")) or os.path.basename(path).startswith("bench"):
            continue
        r = json.load(open(path))
        if r.get("status") == "ok":
            runs.append(r)
    return runs


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
    runs = load(folder)
    if not runs:
        sys.exit(f"no finished runs in {folder}")
    c = runs[0]["config"]
    env = runs[0]["environment"]
    text = (f"# Results: {folder}\n\nModel `{c['model']}`, {len(runs)} finished runs, device {env['device']} "
            f"({env['device_name']}, {env['threads']} threads).\n\n" + tables(runs) + ablation(runs))
    failed = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.error.json")))
    if failed:
        text += "\n\nFailed runs (see their .error.json and .log): " + ", ".join(failed)
    if figure(runs, os.path.join(folder, "figure.png")):
        text += "\n\n![AdaLoRA ranks vs FW-LoRA importance](figure.png)"
    with open(os.path.join(folder, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/cpu")
