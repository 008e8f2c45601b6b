"""The verdict: what the table exists to answer (QUESTIONS), each answered per cell from the
paired t-interval and the equivalence test (stats.decide), the budget axis, and the hypothesis's
expected numbers beside the measured ones; with the small formatting rules report.py shares.
"""
import statistics
from collections import Counter, defaultdict

from data import TASKS
from record import METHODS, NAMES, SHORT
from stats import MARGIN, decide, t_interval, tost


def cell_name(task: str, budget: float) -> str:
    return f"{'SST-2 acc' if task == 'sst2' else 'CoLA MCC'} {budget:g}%"


def cell_key(cell: tuple) -> tuple:
    """The one order of cells (task, budget) and tasks (task,): SST-2 first, budgets ascending."""
    return (cell[0] != "sst2", *cell[1:])


def md_table(cols: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines: the header, its rule, then a line per row."""
    line = lambda cells: "| " + " | ".join(cells) + " |"
    return [line(cols), "|---" * len(cols) + "|", *map(line, rows)]


def fmt_diff(d: float, lo: float, hi: float, n: int | None = None, pos: int | None = None) -> str:
    """×100, bold where the interval excludes 0; with n: how many seeds' differences are > 0."""
    bold = "**" if lo > 0 or hi < 0 else ""
    seeds = f" ({pos}/{n} > 0)" if n else ""
    return f"{bold}{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{bold}{seeds}"


QUESTIONS = [  # (question, a, b): what the table exists for, each answered from a − b
    ("Do the adapters beat the head alone (the floor)?", "lora", "head"),
    ("Does FW-LoRA beat LoRA?", "fwlora", "lora"),
    ("Does FW-LoRA match AdaLoRA?", "fwlora", "adalora"),
    ("Does FW-LoRA beat the uniform-L2 control (same penalty, equal weights)?", "fwlora", "l2lora"),
    ("Does FW-LoRA beat the shuffled control (same weights, random matrices)?", "fwlora",
     "fwshuffle"),
    ("Does FW-LoRA beat the sharper, max-normalised weighting?", "fwlora", "fwmax"),
    ("Do Fisher-allocated ranks (fwrank) beat LoRA?", "fwrank", "lora")]


def judged(d: list[float], task: str) -> str:
    """A paired difference's verdict, its mean and 90% interval ×100 (the equivalence test's)."""
    lo, hi, _ = tost(d, MARGIN[task])
    if len(d) < 2:
        return f"inconclusive: {100 * d[0]:+.1f}, one seed"
    return f"{decide(d, MARGIN[task])}: {100 * statistics.mean(d):+.1f}, 90% [{100 * lo:+.1f}, " \
        f"{100 * hi:+.1f}]"


def verdict(comp: dict, runs: list[dict], ratios: dict) -> str:
    """The QUESTIONS, each answered cell by cell from its paired t-interval and equivalence test."""
    cells = sorted({c for per in comp.values() for c in per}, key=cell_key)
    rows, counts = [], []
    for question, a, b in QUESTIONS:
        per = comp.get((a, b), {})
        words = Counter(decide(v["d"], MARGIN[c[0]]).split(",")[0] for c, v in per.items())
        counts.append(f"- {question} " + (", ".join(f"{w} in {k}" for w, k in words.items()) +
                                          f" of {len(per)} cells" if per else "not run"))
        if per:
            rows.append([f"{SHORT[a]} − {SHORT[b]}",
                         *(judged(per[c]["d"], c[0]) if c in per else "-" for c in cells)])
    points = {"sst2": "accuracy points on SST-2", "cola": "MCC points on CoLA"}
    margins = " and ".join(f"±{100 * MARGIN[t]:.1f} {points[t]}"
                           for t in sorted({c[0] for c in cells}, key=lambda t: cell_key((t,))))
    lines = ["Verdict (written by report.py): **higher** or **lower** where the 95% paired "
             "t-interval above excludes 0; else **equivalent within the margin** where the "
             "equivalence test passes (two one-sided paired t-tests at 5%: the 90% interval lies "
             f"inside the margin, {margins}, fixed in stats.MARGIN before the runs); else "
             "**inconclusive**. Per cell, the verdict, the mean difference ×100 and its 90% "
             "interval:", "", *md_table(["a − b", *(cell_name(*c) for c in cells)], rows), "",
             *counts]
    if ratios:
        others = lambda t: ", ".join(f"{SHORT[m]} {v:.3f}" for m, v in t.items() if m != "lora")
        times = [f"{task}: {others(t) or 'LoRA alone was timed'}" for task, t in ratios.items()]
        lines.append("- Time, side by side (× LoRA): " + "; ".join(times))
    n, c = len({r["config"]["seed"] for r in runs}), runs[0]["config"]
    caps = sorted({(r["config"]["task"], r["config"].get("max_train", 0)) for r in runs})
    capped = ", ".join(f"{t} capped at {k:,}" for t, k in caps if k)
    sets = f"training sets: {capped}" if capped else "full training sets"
    lines += ["", f"What this can and cannot show: {n} seeds of `{c['model']}` ({sets}) on GLUE "
              "dev. Inconclusive means neither a difference nor a match is resolved at this n; "
              "equivalent means any difference is smaller than the margin; either is evidence "
              "for this model, data size and schedule only, not for roberta-base at the paper "
              "setting."]
    return "\n".join(lines)


def budget_axis(cells: dict) -> str:
    """Per task, each adapted method's paired change from the smallest budget to the largest."""
    tasks = defaultdict(dict)
    for (task, budget), methods in cells.items():
        tasks[task][budget] = methods
    rows, cols = defaultdict(dict), []
    for task, by_budget in tasks.items():
        lo, hi = min(by_budget), max(by_budget)
        if lo == hi:
            continue
        rank = lambda b: next(iter(by_budget[b].get("lora", {}).values()), {}).get("budget", {})
        cols.append(task)
        for m in METHODS:
            a, b = by_budget[hi].get(m, {}), by_budget[lo].get(m, {})
            seeds = sorted(set(a) & set(b))
            if m != "head" and len(seeds) > 1:
                d = [a[s]["final"] - b[s]["final"] for s in seeds]
                rows[m][task] = f"{fmt_diff(*t_interval(d))} ({judged(d, task)})"
        ranks = f"rank {rank(hi).get('rank', '?')} − rank {rank(lo).get('rank', '?')}"
        cols[-1] = f"{TASKS[task][1]} ({task}) {hi:g}% − {lo:g}% ({ranks})"
    if not rows:
        return ""
    table = [[NAMES[m], *(per.get(t, "-") for t in tasks if min(tasks[t]) != max(tasks[t]))]
             for m, per in rows.items()]
    return "\n".join(["## The budget axis", "", "Each method's metric at the largest budget minus "
                      "at the smallest, paired by seed, ×100 with its 95% t-interval, then the "
                      "verdict as above (the head is the same run at every budget):", "",
                      *md_table(["method", *cols], table)])


# The hypothesis's table at 0.2% (roberta-base, full data, 3 epochs, GPU): SST-2 accuracy and CoLA MCC
# ×100, and training time as a ratio to LoRA's. Expectations, not measurements: shown beside ours.
HYPOTHESIS = {"lora": (93.1, 55.0, 1.00), "adalora": (94.3, 57.8, 1.12), "fwlora": (94.1, 57.5, 1.01)}


def beside_hypothesis(cells: dict, ratios: dict, model: str) -> str:
    """The hypothesis's expected 0.2% numbers beside the measured ones, labelled as what each is."""
    got = {task: methods for (task, budget), methods in cells.items() if budget == 0.2}
    if not got:
        return ""
    mean = lambda rs: f"{100 * statistics.mean(r['final'] for r in rs):.1f}" if rs else "-"
    time = lambda m: " / ".join(f"{ratios[t][m]:.3f}" if m in ratios.get(t, {}) else "-"
                                for t in ("sst2", "cola"))
    rows = [[NAMES[m], f"{e[0]:.1f}", mean(list(got.get("sst2", {}).get(m, {}).values())),
             f"{e[1]:.1f}", mean(list(got.get("cola", {}).get(m, {}).values())), f"{e[2]:.2f}",
             time(m)] for m, e in HYPOTHESIS.items()]
    cols = ["method", "SST-2: expected", "measured", "CoLA: expected", "measured",
            "time: expected", "measured (SST-2 / CoLA)"]
    return "\n".join(["## Beside the hypothesis (0.2%)", "", "Expected: the hypothesis's numbers "
                      f"for roberta-base (full data, 3 epochs, a GPU). Measured: this table's "
                      f"`{model}` means over seeds, at this data size and schedule, and the "
                      "side-by-side time ratios. Different models and settings: read the gaps "
                      "between methods, not the levels.", "", *md_table(cols, rows)])
