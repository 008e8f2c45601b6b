"""The statistics the report stands on, as pure functions of result dicts and lists (tests give
them hand-worked values): the paired t-interval over seeds (the table's intervals and its verdict),
the equivalence test (TOST) and the four-way verdict it feeds, the paired bootstrap over seeds × dev
examples (the secondary interval), Spearman's rank
correlation, and a run's whole-adapter ‖ΔW‖.
"""
import statistics

import torch

from record import score

# Student's t, 97.5% quantile, df = 1 … 30 (standard tables; a test checks them against scipy).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042)
# Student's t, 95% quantile, df = 1 … 30: each one-sided test of the equivalence test at 5%.
T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771,
       1.761, 1.753, 1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706,
       1.703, 1.701, 1.699, 1.697)

# The equivalence margins, per task, on the metric's 0-1 scale, fixed before the runs: ±1.0 accuracy
# point on SST-2, ±2.0 MCC points on CoLA. They are the size of the gaps the hypothesis claims
# (FW-LoRA over LoRA: +1.0 on SST-2, +2.5 on CoLA), so "equivalent" rules out a gap as large as the
# claimed effect; they also bound the hypothesis's own FW-LoRA vs AdaLoRA gap (-0.2 / -0.3).
MARGIN = {"sst2": 0.010, "cola": 0.020}


def t_interval(d: list[float]) -> tuple[float, float, float, int, int]:
    """(mean, low, high, n, how many > 0) of per-seed values d: the 95% t-interval, df = n - 1
    (beyond 30: the df = 30 quantile, slightly wide). Paired when d are per-seed differences."""
    n, m = len(d), statistics.mean(d)
    half = T975[min(n - 1, 30) - 1] * statistics.stdev(d) / n ** 0.5 if n > 1 else float("nan")
    return m, m - half, m + half, n, sum(x > 0 for x in d)


def tost(d: list[float], margin: float) -> tuple[float, float, bool]:
    """Two one-sided paired t-tests over seeds (Schuirmann 1987) that the mean of d lies inside
    (-margin, +margin), each at 5%: both reject exactly when the 90% t-interval lies inside the
    margin. Returns that interval (low, high) and whether d is equivalent to 0 within the margin."""
    n, m = len(d), statistics.mean(d)
    if n < 2:
        return float("nan"), float("nan"), False
    half = T95[min(n - 1, 30) - 1] * statistics.stdev(d) / n ** 0.5
    return m - half, m + half, -margin < m - half and m + half < margin


def decide(d: list[float], margin: float) -> str:
    """The verdict on per-seed differences d: higher or lower where the 95% paired t-interval
    excludes 0, else equivalent where the equivalence test passes within the margin, else
    inconclusive (a difference can be resolved and still be inside the margin: said so)."""
    _, lo, hi, _, _ = t_interval(d)
    inside = tost(d, margin)[2]
    if lo > 0 or hi < 0:
        return ("higher" if lo > 0 else "lower") + (", within the margin" if inside else "")
    return "equivalent within the margin" if inside else "inconclusive"


def paired_bootstrap(a: list[dict], b: list[dict], n_boot: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Difference of the mean final-epoch metric, a - b, and its 95% interval: a paired bootstrap
    over seeds and dev examples (Dror et al. 2018). a[i] and b[i] share seed i (same data order and
    init); each draw resamples the seeds and the dev examples, the same ones for both methods."""
    metric = a[0]["metric"]
    labels = torch.tensor(a[0]["dev_labels"])
    P = {k: torch.tensor([r["epochs"][-1]["preds"] for r in runs])  # seeds × N
         for k, runs in (("a", a), ("b", b))}
    g = torch.Generator().manual_seed(seed)
    S, N = P["a"].shape
    seeds = torch.randint(0, S, (n_boot, S), generator=g)
    ex = torch.randint(0, N, (n_boot, N), generator=g)
    y = labels[ex][:, None, :]  # boot × 1 × N

    draw = lambda p: torch.gather(p[seeds], 2, ex[:, None, :].expand(-1, S, -1))  # boot × S × N
    diffs = score(draw(P["a"]), y, metric).mean(-1) - score(draw(P["b"]), y, metric).mean(-1)
    point = statistics.mean(r["final"] for r in a) - statistics.mean(r["final"] for r in b)
    return point, diffs.quantile(0.025).item(), diffs.quantile(0.975).item()


def spearman(x, y) -> float:
    """Rank correlation of two sequences (lists, 1-d tensors): Pearson's r of the ranks, tied values
    given their average rank."""
    def rank(v):
        v = [float(a) for a in v]
        s = sorted(v)
        return [s.index(a) + (s.count(a) - 1) / 2 for a in v]
    rx, ry = rank(x), rank(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / den if den else float("nan")


def delta_w_norm(r: dict) -> float:
    """‖ΔW‖_F of a run's whole adapter: √(Σ_m ‖ΔW_m‖_F²)."""
    return sum(v * v for v in r["delta_w_fro"].values()) ** 0.5
