"""The statistics the report stands on, as pure functions of result dicts and lists (tests give
them hand-worked values): the paired t-interval over seeds (the table's intervals and its verdict),
the paired bootstrap over seeds × dev examples (the secondary interval), Spearman's rank
correlation, and a run's whole-adapter ‖ΔW‖.
"""
import statistics

import torch

from record import score

# Student's t, 97.5% quantile, df = 1 … 30 (standard tables; a test checks them against scipy).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042)


def t_interval(d: list[float]) -> tuple[float, float, float, int, int]:
    """(mean, low, high, n, how many > 0) of per-seed values d: the 95% t-interval, df = n - 1
    (beyond 30: the df = 30 quantile, slightly wide). Paired when d are per-seed differences."""
    n, m = len(d), statistics.mean(d)
    half = T975[min(n - 1, 30) - 1] * statistics.stdev(d) / n ** 0.5 if n > 1 else float("nan")
    return m, m - half, m + half, n, sum(x > 0 for x in d)


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
