"""The report's figures (matplotlib, returned for report.py to write): AdaLoRA's final ranks beside
FW-LoRA's importance and penalty weights and fwrank's ranks, per layer and matrix (figure.png), and
the dose-response: the metric and ‖ΔW‖ against λ (dose.png). They only read results.
"""
import statistics
from collections import defaultdict

from record import SHORT, write_file
from stats import delta_w_norm, spearman, t_interval

MATRICES = ("query", "key", "value", "attn.out", "ffn.in", "ffn.out")  # the grid's rows
# in module names, per row: BERT / RoBERTa's, then MPNet's (attention.attn.{q,k,v,o})
PARTS = (("query", "attn.q"), ("key", "attn.k"), ("value", "attn.v"), ("attention.output", "attn.o"),
         ("intermediate",), ("output",))


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def save_png(fig, path: str) -> None:
    """The figure written atomically (record.write_file), then closed."""
    try:
        write_file(path, lambda f: fig.savefig(f, dpi=110, format="png"), "wb")
    finally:
        pyplot().close(fig)


def matrix_grid(names_values: dict) -> tuple[list[list[float]], int]:
    """{module name: value} -> 6 × n_layers grid (rows: MATRICES); a name of no adapted matrix of a
    layer is an error."""
    grid = defaultdict(dict)
    for name, v in names_values.items():
        hits = [row for row, parts in enumerate(PARTS) for part in parts
                if name.endswith(part) or f".{part}." in name]
        if not hits or ".layer." not in name:
            raise ValueError(f"{name}: not an adapted matrix of a layer ({', '.join(MATRICES)})")
        grid[hits[0]][int(name.split(".layer.")[1].split(".")[0])] = v
    n = 1 + max(l for row in grid.values() for l in row)
    return [[grid[k].get(l, float("nan")) for l in range(n)] for k in range(6)], n


def pick_runs(runs: list[dict]) -> dict:
    """{(task, method): run} for AdaLoRA, FW-LoRA and fwrank: lowest seed, budget nearest 0.2%."""
    pick, seed0 = {}, min(r["config"]["seed"] for r in runs)
    for r in runs:
        c = r["config"]
        if c["method"] in ("adalora", "fwlora", "fwrank") and c["seed"] == seed0:
            key = (c["task"], c["method"])
            if key not in pick or abs(c["budget"] - 0.2) < abs(pick[key]["config"]["budget"] - 0.2):
                pick[key] = r
    return pick


def rank_figure(runs: list[dict]):
    """Per task (pick_runs): AdaLoRA's final ranks, FW-LoRA's I_m and weights, and fwrank's
    allocated ranks, per layer and matrix. None without an AdaLoRA and a FW-LoRA run of one task."""
    pick = pick_runs(runs)
    tasks = sorted({t for t, _ in pick if (t, "adalora") in pick and (t, "fwlora") in pick})
    if not tasks:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(tasks), 4, figsize=(17, 3.2 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        ada, fw, rank = pick[(task, "adalora")], pick[(task, "fwlora")], pick.get((task, "fwrank"))
        per, ranks = fw["fw"]["per_matrix"], ada["adalora"]["rank_pattern"]
        rho = spearman([ranks[k] for k in per], [per[k]["importance"] for k in per])
        panels = [(ranks, f"AdaLoRA final rank ({ada['config']['budget']:g}%)", "viridis"),
                  ({k: v["importance"] for k, v in per.items()},
                   f"FW-LoRA I_m (Spearman ρ with AdaLoRA {rho:.2f})", "magma"),
                  ({k: v["weight"] for k, v in per.items()}, "FW-LoRA penalty weight w_m", "cividis"),
                  (rank["budget"]["fwrank_ranks"] if rank else {}, "fwrank: ranks ∝ pre-pass I_m",
                   "viridis")]
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
    return fig


def dose_figure(cells: dict, methods: tuple):
    """Per cell {title: {λ: {method: {seed: run}}}} (LoRA's runs under λ = 0): each of `methods`'
    metric and ‖ΔW‖ ÷ LoRA's (same seed) against λ, with 95% t-intervals over seeds."""
    plt = pyplot()
    fig, axes = plt.subplots(len(cells), 2, figsize=(11, 3.4 * len(cells)), squeeze=False)
    for row, (cell, by_lam) in zip(axes, cells.items()):
        lora = by_lam.get(0.0, {}).get("lora", {})
        shrink = lambda r, s: delta_w_norm(r) / delta_w_norm(lora[s])
        # (title, a run's value given its seed, whether the value needs LoRA's run of that seed)
        panels = (("dev metric ×100", lambda r, s: 100 * r["final"], False),
                  ("‖ΔW‖ ÷ LoRA's (same seed)", shrink, True))
        for ax, (what, value, per_lora_seed) in zip(row, panels):
            for k, m in enumerate(methods):
                pts = []
                for lam, ms in by_lam.items():
                    if lam <= 0 or len(ms.get(m, {})) < 2:  # LoRA's λ = 0; one seed: no interval
                        continue
                    vals = [value(r, s) for s, r in ms[m].items() if s in lora or not per_lora_seed]
                    if vals:  # none where LoRA has no run of these seeds (no ratio to draw)
                        pts.append((lam, t_interval(vals)))
                if pts:
                    x = [lam * (1 + 0.08 * (k - 1)) for lam, _ in pts]  # side by side, not on top
                    err = [[t[0] - t[1] for _, t in pts], [t[2] - t[0] for _, t in pts]]
                    ax.errorbar(x, [t[0] for _, t in pts], yerr=err, marker="o", capsize=3,
                                label=SHORT[m])
            if not per_lora_seed and lora:
                mean = 100 * statistics.mean(r["final"] for r in lora.values())
                ax.axhline(mean, color="grey", ls="--", label="LoRA")
            ax.set_xscale("log")
            ax.set_xlabel("λ")
            ax.set_title(f"{cell}: {what}", fontsize=9)
            if ax.get_legend_handles_labels()[0]:  # a panel with nothing drawn has no legend
                ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
