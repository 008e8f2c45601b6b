"""The report: it only reads results. The comparison table (markdown), the paired statistics
(stats.py), the verdict and the figures (figures.py), from a folder of run JSONs (record.py's).

    python report.py results/cpu   # prints the table, then writes table.md and figure.png there

Cells are the final epoch's dev metric (SST-2 accuracy, CoLA Matthews correlation) as mean ± std
over seeds with n; no epoch is picked on dev. Time is the training-step time (CUDA events or
perf_counter, evaluation excluded) as a ratio to LoRA's, from whole runs trained side by side
(bench.py runs). Seeds pool, and methods compare, only between runs alike in all else.
"""
import glob
import json
import os
import statistics
import sys
from collections import Counter, defaultdict
from types import SimpleNamespace

from data import TASKS
from figures import dose_figure, rank_figure, save_png
from fisher import LAMBDA, WEIGHTING
from record import (METHODS, NAMES, SHORT, TIMING_PREFIX, code_digest, differ, method_owns,
                    plain_output, read_result, resolved, run_name, timing_file, train_ms, write_file)
from stats import delta_w_norm, paired_bootstrap, t_interval
from verdict import (beside_hypothesis, budget_axis, cell_key, cell_name, fmt_diff, md_table,
                     verdict)


def name_of(r: dict) -> str:
    return run_name(SimpleNamespace(**r["config"]))


def load(folder: str) -> tuple[list[dict], list[str]]:
    """(finished runs, names of runs with no finished result): an .error.json counts where no
    finished run has its name, of a method the sweep makes (a typo's rejected run is not the
    table's). A result counts once, under its own name: a copy under another name is skipped."""
    if not os.path.isdir(folder):
        sys.exit(f"error: {folder} is not a folder: give the sweep's OUT folder (e.g. results/cpu)")
    paths = sorted(glob.glob(os.path.join(glob.escape(folder), "*.json")))
    results = {p: read_result(p) for p in paths if not p.endswith(".partial.json")
               and not os.path.basename(p).startswith(TIMING_PREFIX)}
    runs = []
    for p, r in ((p, r) for p, r in results.items() if r and r["status"] == "ok"):
        if os.path.basename(p) == name_of(r) + ".json":
            runs.append(r)
        else:
            print(f"warning: {p} holds the run {name_of(r)}, not the one its name says; skipped "
                  f"(rename it {name_of(r)}.json if it is the only copy)", file=sys.stderr)
    done = {name_of(r) for r in runs}
    failed = sorted(os.path.basename(p) for p, r in results.items() if r and r["status"] == "error"
                    and os.path.basename(p).removesuffix(".error.json") not in done
                    and r["config"].get("method") in METHODS)
    return runs, failed


def check_comparable(runs: list[dict]) -> None:
    """Seeds pool (one method, one cell) only across runs that differ in the seed alone; methods
    compare (one cell) only across runs that also differ in what a method owns (lr, knobs). Other
    differences (model, precision, device, data, dev set, schedule) stop it, naming the fields."""
    pools, cells, clash, across = {}, {}, [], []
    show = lambda a, b, fields: ", ".join(f"{k} {a.get(k)!r} / {b.get(k)!r}" for k in fields[:6])
    for r in runs:
        c = resolved(r)
        pool = run_name(SimpleNamespace(**(r["config"] | {"seed": "*"})))  # method, cell, λ or lr
        ref_name, ref = pools.setdefault(pool, (name_of(r), c))
        diff = differ(ref, c, lambda k: k == "seed")
        if diff:
            clash.append(f"  {name_of(r)} vs {ref_name}: {show(ref, c, diff)}")
        ref_name, ref = cells.setdefault((c["task"], c["budget"]), (name_of(r), c))
        diff = differ(ref, c, lambda k: k == "seed" or method_owns(k))
        if diff and not across:
            across.append(f"{ref_name} and {name_of(r)} differ in {show(ref, c, diff)}")
    if clash:
        sys.exit("error: runs of one method and cell differ in more than the seed, so they cannot "
                 "be pooled:\n" + "\n".join(clash[:8]) + "\nKeep each configuration in its own "
                 "folder (OUT=...).")
    if across:
        sys.exit(f"error: {across[0]}: methods compare only on the same model, data, dev set, "
                 "precision and schedule (each with its own lr and knobs); keep each "
                 "configuration in its own folder (OUT=...)")


def by_cell(runs: list[dict]) -> dict:
    """{(task, budget): {method: {seed: run}}}, cells in cell_key order."""
    cells = defaultdict(lambda: defaultdict(dict))
    for r in runs:
        c = r["config"]
        cells[(c["task"], c["budget"])][c["method"]][c["seed"]] = r
    return dict(sorted(cells.items(), key=lambda kv: cell_key(kv[0])))


COMPARISONS = [("lora", "head")] + [(m, "lora") for m in METHODS if m not in ("lora", "head")] + \
    [("fwlora", m) for m in METHODS if m not in ("lora", "fwlora", "head")]


def comparisons(cells: dict) -> dict:
    """{(a, b): {cell: {"t": paired t over seeds, "boot": paired bootstrap}}}, over shared seeds."""
    out = defaultdict(dict)
    for cell, methods in cells.items():
        for a, b in COMPARISONS:
            seeds = sorted(set(methods.get(a, {})) & set(methods.get(b, {})))
            if seeds:
                ra, rb = [methods[a][s] for s in seeds], [methods[b][s] for s in seeds]
                d = [x["final"] - y["final"] for x, y in zip(ra, rb)]
                out[(a, b)][cell] = {"t": t_interval(d), "boot": paired_bootstrap(ra, rb), "d": d}
    return out


def bench_ratios(folder: str, runs: list[dict]) -> dict:
    """{task: {method: training time ratio to LoRA}} from the folder's side-by-side runs (bench.py
    runs), by their buckets (train_ms: fwrank's pre-pass counts). A damaged file, or one that cannot
    stand beside the table (timing_problem), is skipped, with a warning."""
    out, table = {}, {name_of(r): r for r in runs}
    for path in sorted(glob.glob(timing_file(glob.escape(folder), "*"))):
        try:
            with open(path, encoding="utf-8") as f:
                b = json.load(f)
            problem = timing_problem(b, table)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            problem = f"unreadable ({type(e).__name__}: {e})"
        if problem:
            print(f"warning: {path}: {problem}; skipped (a sweep here times it again)",
                  file=sys.stderr)
            continue
        # a run's key is its method, then any fields of its own: "adalora:lr=…"
        ms = {m.split(":")[0]: train_ms(row["buckets_ms_total"]) for m, row in b["runs"].items()}
        out[b["configs"]["lora"]["task"]] = {m: t / ms["lora"] for m, t in ms.items()}
    return out


def timing_problem(b: dict, table: dict) -> str | None:
    """Why a timing file cannot stand beside the table (None: it can): no LoRA to divide by, methods
    that differ in more than what a method owns, or a run unlike the table's of its name."""
    if "lora" not in b["runs"] or "lora" not in b["configs"]:
        return "no LoRA run, which every time is a ratio to"
    lora = resolved({"config": b["configs"]["lora"], "environment": b["environment"]})
    for m, c in b["configs"].items():
        c = resolved({"config": c, "environment": b["environment"]})
        name = run_name(SimpleNamespace(**c))
        mine = resolved(table[name]) if name in table else c  # a method the table lacks: as itself
        for diff, what in ((differ(lora, c, method_owns), f"its {m} and lora runs differ in"),
                           (differ(mine, c, lambda k: k == "dev set"),
                            f"its {m} run is not the table's {name}: it differs in")):
            if diff:
                return f"{what} {', '.join(diff)}"
    return None


def pair_name(a: str, b: str) -> str:
    floor = (a, b) == ("lora", "head")
    return "adapters' gain: LoRA − head" if floor else f"{SHORT[a]} − {SHORT[b]}"


def main_cell(rs: list[dict]) -> str:
    """One method in one cell: mean ± std (n) of the final metric ×100, the best epoch's mean, and
    the degenerate runs (final predictions of one class: CoLA's MCC 0 hides them)."""
    fin, best = [100 * r["final"] for r in rs], [100 * r["best"] for r in rs]
    sd = f" ± {statistics.stdev(fin):.1f}" if len(fin) > 1 else ""
    deg = sum(len(set(r["epochs"][-1]["preds"])) < 2 for r in rs)
    return f"{statistics.mean(fin):.1f}{sd} ({len(fin)}); best {statistics.mean(best):.1f}" + \
        (f"; **{deg} degenerate**" if deg else "")


INTRO = {"t": "Paired differences ×100 (a − b): the mean over seeds of the per-seed "
              "difference, its 95% paired t-interval over seeds (df = n − 1), and how many "
              "seeds' differences are positive; **bold**: the interval excludes 0:",
         "boot": "Secondary: the same differences with a 95% paired bootstrap interval over seeds "
                 "× dev examples (2,000 draws). With few seeds it is too narrow: each seed "
                 "resample is likely, so it covers about [min, max] of the per-seed differences. "
                 "The verdict uses the t-intervals."}


def tables(runs: list[dict], ratios: dict) -> tuple[str, dict]:
    cells = by_cell(runs)
    rows = [m for m in METHODS if any(m in c for c in cells.values())]
    cols = [cell_name(*c) for c in cells]

    def per_method(f, methods=rows):  # a row per method: f(its runs) in each cell, "-" where none
        return [[NAMES[m], *(f(list(c[m].values())) if c.get(m) else "-" for c in cells.values())]
                for m in methods]
    out = ["Dev metric ×100 at the final epoch (the headline; no epoch is picked on dev): mean ± "
           "std (n seeds), the best epoch's mean after it, and the runs that predict a single "
           "class (degenerate):", "", *md_table(["method", *cols], per_method(main_cell))]
    lr = lambda c, m: "/".join(sorted({f"{r['config']['lr']:g}" for r in c.get(m, {}).values()}))
    lrs = [f"{SHORT[m]} {' / '.join(lr(c, m) or '-' for c in cells.values())}" for m in rows]
    out += ["", f"Learning rates ({' / '.join(cols)}): {', '.join(lrs)}."]
    comp = comparisons(cells)
    for kind, intro in INTRO.items():
        diffs = [[pair_name(a, b), *(fmt_diff(*per[c][kind]) if c in per else "-" for c in cells)]
                 for (a, b), per in comp.items()]
        out += ["", intro, "", *md_table(["a − b", *cols], diffs)]
    pct = lambda rs: f"{statistics.mean(r['budget']['adapter_pct'] for r in rs):.3f}%"
    out += ["", "Achieved adapter parameters, % of the base model (nominal budget in the column):",
            "", *md_table(["method", *cols], per_method(pct))]
    fw = [m for m in rows if any("fw" in r for c in cells.values() for r in c.get(m, {}).values())]
    spread = lambda rs: f"{min(r['fw']['weight_min'] for r in rs):.3f}–" \
                        f"{max(r['fw']['weight_max'] for r in rs):.3f}"
    if fw:
        out += ["", "Penalty weights w_m (min–max over matrices and seeds; every variant has "
                "mean 1 − 1/M):", "", *md_table(["method", *cols], per_method(spread, fw))]
    if ratios:
        timed = [m for m in METHODS if any(m in t for t in ratios.values())]
        ratio = lambda t, m: f"{t[m]:.3f}×" if m in t else "-"
        times = [[NAMES[m], *(ratio(t, m) for t in ratios.values())] for m in timed]
        out += ["", "Training time as a ratio to LoRA, whole runs trained side by side in one "
                "process (bench.py runs; the sweep's own per-run times share the CPU and are not "
                "used):", "", *md_table(["method", *ratios], times)]
    return "\n".join(out), comp


DOSE = ("fwlora", "l2lora", "fwmax")  # the hypothesis, its uniform and its sharper controls


def dose_cells(runs: list[dict]) -> dict:
    """{(task, budget): {λ: {method: {seed: run}}}} of the DOSE methods, and LoRA's runs under
    λ = 0 (no penalty), where more than one λ was run."""
    cells = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for r in runs:
        c = r["config"]
        if c["method"] in DOSE + ("lora",) and "delta_w_fro" in r:
            lam = 0.0 if c["method"] == "lora" else c["fw_lambda"]
            cells[(c["task"], c["budget"])][lam][c["method"]][c["seed"]] = r
    ordered = sorted(cells.items(), key=lambda kv: cell_key(kv[0]))
    return {k: dict(sorted(v.items())) for k, v in ordered if sum(lam > 0 for lam in v) > 1}


def spread_bound(fw: list[dict]) -> str:
    """Largest |w_m − w̄| over seeds and its bound: |w_m − w̄| = |I_m − 1/M| <= max I_m."""
    if not fw:
        return "-"
    gap = lambda r, bar: max(r["fw"]["weight_max"] - bar, bar - r["fw"]["weight_min"])
    worst = max(gap(r, 1 - 1 / r["budget"]["n_matrices"]) for r in fw)
    return f"{worst:.4f} ≤ {max(r['fw']['importance_max'] for r in fw):.4f}"


def dose_row(lam: float, ms: dict, lora: dict) -> list[str]:
    """One λ of a dose cell: each DOSE method's metric, the paired FW − L2 and fwmax − L2
    t-intervals, each one's ‖ΔW‖ ÷ LoRA's on the same seed, FW-LoRA's spread and bound."""
    def metric(m):
        f = [100 * r["final"] for r in ms.get(m, {}).values()]
        sd = f" ± {statistics.stdev(f):.1f}" if len(f) > 1 else ""
        return f"{statistics.mean(f):.1f}{sd} ({len(f)})" if f else "-"

    def paired(a, b):
        seeds = sorted(set(ms.get(a, {})) & set(ms.get(b, {})))
        d = [ms[a][s]["final"] - ms[b][s]["final"] for s in seeds]
        return fmt_diff(*t_interval(d)) if len(seeds) > 1 else "-"

    def shrink(m):
        seeds = sorted(set(ms.get(m, {})) & set(lora))
        ratios = [delta_w_norm(ms[m][s]) / delta_w_norm(lora[s]) for s in seeds]
        return f"{statistics.mean(ratios):.2f}" if seeds else "-"
    return [f"{lam:g}", *map(metric, DOSE), paired("fwlora", "l2lora"), paired("fwmax", "l2lora"),
            " / ".join(map(shrink, DOSE)), spread_bound(list(ms.get("fwlora", {}).values()))]


def dose_response(cells: dict) -> str:
    """Per cell, a dose_row per λ."""
    out = ["## Dose-response in λ", "", "Dev metric ×100 (mean ± std, n seeds); ‖ΔW‖ as a "
           "fraction of LoRA's on the same seed (mean; 1 = no shrinkage); paired differences "
           "×100 with 95% t-intervals over seeds (**bold**: excludes 0); FW-LoRA's largest "
           "|w_m − w̄| over seeds against its bound, the largest I_m."]
    cols = ["λ", *(SHORT[m] for m in DOSE), "FW − L2", "fwmax − L2",
            "‖ΔW‖ ÷ LoRA's (FW / L2 / fwmax)", "max\\|w − w̄\\| ≤ max I_m"]
    for (task, budget), by_lam in cells.items():
        lora = by_lam.get(0.0, {}).get("lora", {})
        mean = lambda: 100 * statistics.mean(r["final"] for r in lora.values())
        baseline = f" (LoRA: {mean():.1f}, n = {len(lora)})" if lora else ""
        rows = [dose_row(lam, ms, lora) for lam, ms in by_lam.items() if lam > 0]
        out += ["", f"**{cell_name(task, budget)}**{baseline}", "", *md_table(cols, rows)]
    return "\n".join(out)


def tuning(runs: list[dict]) -> str:
    """The held-out-train tuning: per task, each method's held-out metric by lr, the lr it gets."""
    grid = defaultdict(lambda: defaultdict(dict))
    for r in runs:
        c = r["config"]
        grid[c["task"]][c["method"]][c["lr"]] = r
    out = [f"## Learning-rate tuning on {runs[0]['config']['heldout']:,} held-out training "
           "examples (dev unread)"]
    for task, methods in sorted(grid.items(), key=lambda kv: cell_key((kv[0],))):
        task_runs = [r for by_lr in methods.values() for r in by_lr.values()]
        lrs = sorted({r["config"]["lr"] for r in task_runs})
        seeds = "/".join(sorted({str(r["config"]["seed"]) for r in task_runs}))
        rows = []
        for m, by_lr in methods.items():
            top = max(r["final"] for r in by_lr.values())
            tied = sorted(lr for lr, r in by_lr.items() if r["final"] == top)
            best = tied[len(tied) // 2]  # a tie: the middle of the tied lrs, the most interior
            value = {lr: f"{100 * r['final']:.1f}" for lr, r in by_lr.items()}
            value[best] = f"**{value[best]}**"
            tie = f" (tied: {', '.join(f'{lr:g}' for lr in tied)})" if len(tied) > 1 else ""
            edge = "" if min(by_lr) < best < max(by_lr) else "; **at the grid's edge**"
            rows.append([NAMES[m], *(value.get(lr, "-") for lr in lrs), f"{best:g}{tie}{edge}"])
        title = f"**{task}** ({TASKS[task][1]} ×100 on the held-out slice, seed {seeds}):"
        out += ["", title, "", *md_table(["method", *(f"lr {lr:g}" for lr in lrs), "chosen"], rows)]
    return "\n".join(out)


def main(folder: str) -> str:
    """The folder's report: printed, then written (table.md, figures; a failed write exits 1)."""
    all_runs, failed = load(folder)
    listed = ", ".join(failed)
    if not all_runs:
        sys.exit(f"no finished runs in {folder}" + (f" (failed: {listed})" if failed else ""))
    check_comparable(all_runs)
    held = [r for r in all_runs if r["config"].get("heldout", 0)]
    if held and len(held) < len(all_runs):
        sys.exit(f"error: {folder} mixes tuning runs (held-out train) with dev runs: keep them in "
                 "separate folders")
    # The main table: every method at the hypothesis's λ; the other λ feed the dose-response only.
    at_lambda = lambda c: c["method"] not in WEIGHTING or c.get("fw_lambda", LAMBDA) == LAMBDA
    runs = [r for r in all_runs if at_lambda(r["config"])]
    dose = {} if held else dose_cells(all_runs)
    if not runs and not dose:
        sys.exit(f"error: {folder} holds runs at one λ ≠ {LAMBDA:g} only: the main table needs "
                 f"runs at the hypothesis's λ = {LAMBDA:g}, the dose-response two λ or more "
                 "(run_all.sh dose)")
    c, env = (runs or all_runs)[0]["config"], (runs or all_runs)[0]["environment"]
    text = (f"# Results: {folder}\n\nModel `{c['model']}`, {len(all_runs)} finished runs, device "
            f"{env.get('device', '?')} ({env.get('device_name', '?')}, "
            f"{env.get('threads', '?')} threads per run), data: {data_source(all_runs)}.\n"
            f"{code_line(all_runs)}\n\n")
    pngs = {}
    if held:
        text += tuning(held)
    elif runs:
        ratios = bench_ratios(folder, runs)
        table, comp = tables(runs, ratios)
        text += f"{table}\n\n" + verdict(comp, runs, ratios)
        for extra in (budget_axis(by_cell(runs)), beside_hypothesis(by_cell(runs), ratios,
                                                                     c["model"])):
            text += f"\n\n{extra}" if extra else ""
        pngs["figure.png"] = rank_figure(runs)
    else:
        text += (f"No run at λ = {LAMBDA:g} (the hypothesis's), so no main table: the "
                 "dose-response alone.")
    if dose:
        text += "\n\n" + dose_response(dose) + "\n\n![metric and ‖ΔW‖ against λ](dose.png)"
        pngs["dose.png"] = dose_figure({cell_name(*k): v for k, v in dose.items()}, DOSE)
    if failed:
        text += f"\n\nRuns with no finished result (see their .error.json and .log): {listed}"
    if pngs.get("figure.png"):
        text += "\n\n![AdaLoRA ranks, FW-LoRA importance and weights, fwrank ranks](figure.png)"
    print(text)
    try:  # after the print: a folder that cannot be written to still shows the table
        for name, fig in ((n, f) for n, f in pngs.items() if f):
            save_png(fig, os.path.join(folder, name))
        write_file(os.path.join(folder, "table.md"), lambda f: f.write(text + "\n"))  # atomic
    except OSError as e:
        sys.exit(f"error: {e}: the table above is not saved")
    return text


def code_line(runs: list[dict]) -> str:
    """Whether every run comes from the code in this checkout (record.RUN_CODE's digest)."""
    here, digests = code_digest(), Counter(r["environment"].get("code_sha256") for r in runs)
    commits = ", ".join(sorted({(r["environment"].get("git_commit") or "?")[:7] for r in runs}))
    if digests == Counter({here: len(runs)}):
        return f"Code: every run from the code in this checkout (digest {here}; commits {commits})."
    other = len(runs) - digests[here]
    print(f"warning: {other} of {len(runs)} runs come from other code than this checkout's",
          file=sys.stderr)
    seen = ", ".join(f"{d or 'not recorded'} × {k}" for d, k in digests.items())
    return f"Code: **{other} of {len(runs)} runs from other code than this checkout's** " \
        f"(digests {seen}; commits {commits})."


def data_source(runs: list[dict]) -> str:
    """The runs' one data source: the shipped GLUE copy, the hub or a folder (a mix is refused)."""
    dirs = {r["config"].get("glue_dir", "") for r in runs}
    if len(dirs) > 1:
        sys.exit("error: the runs read different data sources "
                 f"({', '.join(sorted(map(repr, dirs)))}): a table comes from one source")
    d = dirs.pop()
    names = {"": "the GLUE copy shipped in glue/", "hub": "GLUE from the hub (nyu-mll/glue)"}
    return names.get(d, d)


if __name__ == "__main__":
    plain_output()  # λ, ± in an ASCII locale: escaped
    try:
        if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):  # the usage
            print(__doc__)
            sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
        main(sys.argv[1])
    except BrokenPipeError:  # `| head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
