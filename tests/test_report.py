"""report.py's statistics on synthetic result files with known differences: the paired intervals
exclude 0 where the difference is large and include it where there is none; degenerate runs are
counted; the verdict and tables are written from the numbers."""
import json
import os
import zlib

import pytest
import torch

from record import metrics
from report import main
from stats import MARGIN, T95, T975, decide, paired_bootstrap, t_interval, tost

N = 900  # dev examples


def fake_run(method, seed, p_correct, labels, task="sst2", budget=0.2, one_class=False):
    key = f"{method} {seed} {p_correct} {task}".encode()
    g = torch.Generator().manual_seed(zlib.crc32(key))  # not hash(): salted
    right = torch.rand(len(labels), generator=g) < p_correct
    preds = torch.where(right, labels, 1 - labels)
    if one_class:
        preds = torch.zeros(len(labels), dtype=torch.long)
    m = metrics(preds, labels)
    metric = "accuracy" if task == "sst2" else "mcc"
    config = {"task": task, "method": method, "budget": budget, "seed": seed, "model": "minilm",
              "max_train": 100, "lr": 2e-3, "fw_lambda": 1e-4}
    return {"config": config, "status": "ok", "metric": metric, "final": m[metric],
            "best": m[metric], "dev_labels": labels.tolist(),
            "epochs": [{"preds": preds.tolist(), **m}], "budget": {"adapter_pct": 0.18},
            "environment": {"device": "cpu", "device_name": "x", "threads": 1}}


def timing_file(folder, buckets: dict, labels, name="bench_runs_sst2_lora-fwlora_b0.2_s0.json",
                **changes):
    """A side-by-side timing file (bench.py runs) of the fake runs' configs: {method: buckets}."""
    configs = {m: fake_run(m, 0, 0.8, labels)["config"] | changes.get(m, {}) for m in buckets}
    runs = {m: {"buckets_ms_total": b} for m, b in buckets.items()}
    (folder / name).write_text(json.dumps({"configs": configs, "environment": {"device": "cpu"},
                                           "runs": runs}))


def test_paired_intervals_separate_real_differences_from_none():
    labels = torch.randint(0, 2, (N,), generator=torch.Generator().manual_seed(0))
    for task in ("sst2", "cola"):
        good = [fake_run("lora", s, 0.90, labels, task) for s in range(3)]
        bad = [fake_run("fwlora", s, 0.75, labels, task) for s in range(3)]
        same = [fake_run("l2lora", s, 0.90, labels, task) for s in range(3)]
        d, lo, hi = paired_bootstrap(good, bad)
        assert 0 < lo < d < hi and d > 0.1  # a large difference: the interval excludes 0
        d, lo, hi = paired_bootstrap(good, same)
        assert lo < 0 < hi and abs(d) < 0.03  # no difference: the interval includes 0
        d2, lo2, hi2 = paired_bootstrap(same, good)
        assert abs(d + d2) < 1e-12 and abs(lo + hi2) < 0.02  # antisymmetric up to resampling


def test_report_tables_verdict_and_degenerate_runs(tmp_path):
    labels = torch.randint(0, 2, (N,), generator=torch.Generator().manual_seed(1))
    runs = [fake_run("lora", s, 0.80, labels) for s in range(3)] + \
           [fake_run("fwlora", s, 0.95, labels) for s in range(3)] + \
           [fake_run("l2lora", s, 0.95, labels) for s in range(3)] + \
           [fake_run("fwshuffle", s, 0.5, labels, one_class=s == 0) for s in range(3)]
    for r in runs:
        c = r["config"]
        (tmp_path / f"sst2_{c['method']}_b0.2_s{c['seed']}.json").write_text(json.dumps(r))
    timing_file(tmp_path, {"lora": {"step": 1000.0}, "fwlora": {"step": 1004.0},
                           "fwrank": {"step": 900.0, "prepass": 120.0}}, labels)
    text = main(str(tmp_path))
    assert "| shuffled FW (control) |" in text and "**1 degenerate**" in text
    fw_vs_lora = next(l for l in text.splitlines() if l.startswith("| FW-LoRA − LoRA |"))
    assert fw_vs_lora.count("**") == 2  # excludes 0
    fw_vs_l2 = next(l for l in text.splitlines() if l.startswith("| FW-LoRA − uniform L2 |"))
    assert "**" not in fw_vs_l2  # includes 0
    assert "- Does FW-LoRA beat LoRA? higher in 1 of 1 cells" in text
    assert ("- Does FW-LoRA beat the uniform-L2 control (same penalty, equal weights)? "
            "inconclusive in 1 of 1 cells") in text
    assert "| FW-LoRA − uniform L2 | inconclusive: -0.7, 90% [-1.7, +0.3] |" in text
    assert "FW-LoRA 1.004" in text and "Fisher ranks 1.020" in text  # the pre-pass is training time
    assert "3 seeds of `minilm`" in text
    # no fwmax runs here
    assert "Does FW-LoRA beat the sharper, max-normalised weighting? not run" in text
    # head, AdaLoRA, fwmax, fwrank: every question asks a pair the table has
    assert text.count("not run") == 4
    assert (tmp_path / "table.md").read_text().strip() == text.strip()


def test_a_failed_write_names_the_path_and_keeps_the_earlier_file(tmp_path, monkeypatch):
    """A full disk: the temp file goes, the error names the file, the earlier table stays whole."""
    import errno
    import os
    import pytest
    from record import write_file
    table = tmp_path / "table.md"
    write_file(str(table), lambda f: f.write("the earlier table\n"))

    def full(f):
        f.write("half a tab")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(OSError, match=f"could not write {table}: No space left on device"):
        write_file(str(table), full)
    assert table.read_text() == "the earlier table\n" and os.listdir(tmp_path) == ["table.md"]
    assert oct(table.stat().st_mode & 0o777) == "0o644"


def test_foreign_old_and_edited_results_are_skipped_by_name_and_configs_are_never_pooled(
        tmp_path, capsys):
    """Bad cases 7-10: a foreign JSON, an older version's result (no preds) and an edited one (no
    epochs) are each skipped with a warning naming the file and what it lacks; runs of one method
    and cell that differ in anything but the seed are refused, naming the fields."""
    import pytest
    labels = torch.randint(0, 2, (N,), generator=torch.Generator().manual_seed(2))
    for r in [fake_run(m, s, 0.8, labels) for m in ("lora", "fwlora") for s in range(2)]:
        c = r["config"]
        (tmp_path / f"sst2_{c['method']}_b0.2_s{c['seed']}.json").write_text(json.dumps(r))
    old, edited = fake_run("fwlora", 2, 0.8, labels), fake_run("lora", 2, 0.8, labels)
    del old["epochs"][0]["preds"], edited["epochs"]
    (tmp_path / "sst2_fwlora_b0.2_s2.json").write_text(json.dumps(old))
    (tmp_path / "sst2_lora_b0.2_s2.json").write_text(json.dumps(edited))
    (tmp_path / "sst2_l2lora_b0.2_s0.json").write_text('{"config": {"task": "sst2"}, "status": "ok"}')
    text = main(str(tmp_path))
    err = capsys.readouterr().err
    assert "sst2_l2lora_b0.2_s0.json: a finished result without metric" in err
    assert "sst2_fwlora_b0.2_s2.json: a finished result without epochs[-1].preds" in err
    assert "sst2_lora_b0.2_s2.json: a finished result without epochs" in err
    assert "2 seeds of `minilm`" in text  # the complete runs only
    other = fake_run("lora", 3, 0.8, labels)
    other["config"] |= {"lr": 1e-4, "max_train": 512}
    (tmp_path / "sst2_lora_b0.2_s3.json").write_text(json.dumps(other))
    pooled = (r"cannot be pooled:\n  sst2_lora_b0.2_s3 vs sst2_lora_b0.2_s0: lr 0.002 / "
              r"0.0001, max_train 100 / 512")
    with pytest.raises(SystemExit, match=pooled):
        main(str(tmp_path))


def test_paired_t_interval_by_hand_and_its_quantiles():
    """Five per-seed differences: mean 0.02, sd 0.0158114, t(0.975, 4) = 2.776: ±0.019630 by hand."""
    d, lo, hi, n, pos = t_interval([0.01, 0.03, 0.00, 0.04, 0.02])
    assert (n, pos) == (5, 4) and abs(d - 0.02) < 1e-12
    half = 2.776 * 0.015811388300841896 / 5 ** 0.5
    assert abs(lo - (0.02 - half)) < 1e-9 and abs(hi - (0.02 + half)) < 1e-9


def test_t_quantiles_match_scipy():
    t = pytest.importorskip("scipy.stats").t
    assert len(T975) == 30
    assert all(abs(q - t.ppf(0.975, df)) < 5e-4 for df, q in enumerate(T975, start=1))
    assert len(T95) == 30
    assert all(abs(q - t.ppf(0.95, df)) < 5e-4 for df, q in enumerate(T95, start=1))


def test_equivalence_test_and_verdict_by_hand():
    """Hand-worked TOST cases, n = 5, t(0.95, 4) = 2.132, t(0.975, 4) = 2.776."""
    # mean 0.001, sd sqrt(13e-6) = 0.0036056, se 0.0016125: 90% half 0.0034378 -> [-0.00244,
    # +0.00444], inside ±0.01; 95% half 0.0044763 -> [-0.00348, +0.00548] holds 0.
    d = [0.002, -0.004, 0.006, 0.000, 0.001]
    lo, hi, inside = tost(d, 0.01)
    assert inside and abs(lo + 0.0024378) < 1e-6 and abs(hi - 0.0044378) < 1e-6
    assert decide(d, 0.01) == "equivalent within the margin"
    # ×4: mean 0.004, 90% half 0.013751 -> [-0.00975, +0.01775] leaves the margin; 95% holds 0.
    wide = [4 * x for x in d]
    assert not tost(wide, 0.01)[2] and decide(wide, 0.01) == "inconclusive"
    # mean 0.005, sd 0.00070711, se 0.00031623: 95% [+0.00412, +0.00588] excludes 0 and
    # 90% [+0.00433, +0.00567] is inside ±0.01: resolved, yet smaller than the margin.
    small = [0.004, 0.005, 0.006, 0.005, 0.005]
    assert decide(small, 0.01) == "higher, within the margin"
    # mean -0.03, se 0.0015811: 95% [-0.0344, -0.0256]; 90% [-0.0334, -0.0266] is outside ±0.02.
    assert decide([-0.03, -0.025, -0.035, -0.03, -0.03], 0.02) == "lower"
    assert decide([0.5], 0.01) == "inconclusive" and not tost([0.5], 0.01)[2]  # one seed: no test
    assert MARGIN == {"sst2": 0.010, "cola": 0.020}  # fixed before the runs (stats.py says why)


def test_dose_response_and_tuning_tables(tmp_path):
    labels = torch.randint(0, 2, (N,), generator=torch.Generator().manual_seed(3))
    runs = []
    for s in range(3):
        lora = fake_run("lora", s, 0.85, labels)
        lora["delta_w_fro"] = {"m0": 3.0, "m1": 4.0}  # ‖ΔW‖ = 5
        runs.append(lora)
        for lam, shrink in ((1e-4, 1.0), (1e-2, 0.5)):
            for m in ("fwlora", "l2lora", "fwmax"):
                r = fake_run(m, s, 0.85 - (0.2 if m == "fwmax" and lam == 1e-2 else 0), labels)
                r["config"]["fw_lambda"] = lam
                r["delta_w_fro"] = {"m0": 3.0 * shrink, "m1": 4.0 * shrink}
                r["budget"]["n_matrices"] = 36
                r["fw"] = {"weight_min": 0.95, "weight_max": 0.99, "importance_max": 0.05}
                runs.append(r)
    for r in runs:
        c = r["config"]
        lam = "" if c["fw_lambda"] == 1e-4 or c["method"] == "lora" else f"_lam{c['fw_lambda']:g}"
        (tmp_path / f"sst2_{c['method']}_b0.2_s{c['seed']}{lam}.json").write_text(json.dumps(r))
    text = main(str(tmp_path))
    main_table = text.split("## Dose-response")[0]
    fw_row = next(l for l in main_table.splitlines() if l.startswith("| FW-LoRA |"))
    assert "(3)" in fw_row and "(6)" not in fw_row  # the main table pools the λ = 1e-4 runs only
    line = next(l for l in text.splitlines() if l.startswith("| 0.01 |"))
    assert "0.50 / 0.50 / 0.50" in line  # ‖ΔW‖ halved against LoRA's, each method
    assert line.count("**") == 2  # fwmax − L2 excludes 0 at λ = 1e-2; FW − L2 does not
    assert "0.0222 ≤ 0.0500" in line  # max |w − (1 − 1/36)| against max I_m
    assert (tmp_path / "dose.png").stat().st_size > 0
    held = tmp_path / "tune"
    held.mkdir()
    for m, lr, p in (("lora", 5e-4, 0.8), ("lora", 1e-3, 0.9), ("lora", 2e-3, 0.9),
                     ("lora", 5e-3, 0.9), ("lora", 1e-2, 0.5),
                     ("adalora", 1e-3, 0.7), ("adalora", 5e-3, 0.95)):
        r = fake_run(m, 0, p, labels)
        r["config"] |= {"lr": lr, "heldout": 500}
        r["final"] = p  # exact ties, as 895 of 1,000 held-out examples at three lrs gave
        (held / f"sst2_{m}_b0.2_s0_heldout500_lr{lr:g}.json").write_text(json.dumps(r))
    text = main(str(held))
    # the lr each method gets: a tie goes to the middle of the tied lrs; an edge is flagged
    assert "| 0.002 (tied: 0.001, 0.002, 0.005) |" in text
    assert "| 0.005; **at the grid's edge** |" in text


# Issue 31: results you can trust, third round.

def write_runs(folder, runs):
    for r in runs:
        c = r["config"]
        lam = "" if c["fw_lambda"] == 1e-4 or c["method"] == "lora" else f"_lam{c['fw_lambda']:g}"
        name = f"{c['task']}_{c['method']}_b{c['budget']:g}_s{c['seed']}{lam}.json"
        (folder / name).write_text(json.dumps(r))


def two_methods(seed: int, methods=("lora", "fwlora")) -> tuple:
    labels = torch.randint(0, 2, (N,), generator=torch.Generator().manual_seed(seed))
    return labels, [fake_run(m, s, 0.8, labels) for m in methods for s in range(2)]


@pytest.mark.parametrize("change, fields", [
    (dict(model="tiny-bert"), "model 'tiny-bert' / 'minilm'"),  # FW-LoRA's file is read first
    (dict(precision="bf16"), "precision 'bf16' / 'fp32'"),  # asked for; auto on a CPU is fp32
    (dict(environment_precision="bf16"), "precision 'bf16' / 'fp32'"),  # recorded as it ran
    (dict(max_eval=32), "dev set '32 examples"),  # FW-LoRA on 32 dev examples, LoRA on 900
    (dict(max_train=512, epochs=2), "epochs 2 / None, max_train 512 / 100"),
    (dict(data_files={"SST-2/dev.tsv": "0123456789ab" + "0" * 52}), "data files"),  # other GLUE files
])
def test_methods_compare_only_on_the_same_model_precision_and_data(tmp_path, change, fields):
    """Bad case 2 (issue 31): LoRA on one model, precision, dev set or training size against
    FW-LoRA on another is refused, naming the fields (it printed "+12.5", or a bootstrap of
    [+0.0, +0.0], or ended in a RuntimeError in paired_bootstrap). The lr and a method's own knobs
    may differ."""
    labels, runs = two_methods(4, ("lora",))
    for s in range(2):
        r = fake_run("fwlora", s, 0.8, labels[:32] if "max_eval" in change else labels)
        config_change = {k: v for k, v in change.items()
                         if k not in ("environment_precision", "data_files")}
        r["config"] |= config_change
        if "data_files" in change:
            r["data"] = {"source": "shipped", "sha256": change["data_files"]}
        # the resolved one, as train.py records it
        r["precision"] = change.get("environment_precision")
        runs.append(r)
    write_runs(tmp_path, runs)
    with pytest.raises(SystemExit, match="methods compare only on the same model, data") as e:
        main(str(tmp_path))
    assert fields in e.value.code and "\n" not in e.value.code  # one line, naming the fields
    for s in range(2):  # its own lr and knobs: compared
        runs[2 + s] = fake_run("fwlora", s, 0.8, labels)
        runs[2 + s]["config"] |= {"lr": 1e-3, "fw_warmup_steps": 7}
    write_runs(tmp_path, runs)
    assert "| FW-LoRA − LoRA |" in main(str(tmp_path))


def test_seeds_made_on_different_devices_are_not_pooled(tmp_path):
    """Unclear case (issue 31): report.py pooled seeds made on a CPU and a GPU; the sweep's resume
    refuses the same."""
    _, runs = two_methods(5, ("lora",))
    runs[1]["environment"]["device"] = "cuda:0"
    write_runs(tmp_path, runs)
    pooled = (r"cannot be pooled:\n  sst2_lora_b0.2_s1 vs sst2_lora_b0.2_s0: "
              r"device 'cpu' / 'cuda', precision 'fp32' / 'bf16'")
    with pytest.raises(SystemExit, match=pooled):
        main(str(tmp_path))


def test_timing_files_that_cannot_stand_beside_the_table_are_skipped_by_name(tmp_path, capsys):
    """Bad cases 3 and 7 (issue 31): a damaged timing file (a JSONDecodeError naming no file, in
    every later report), one without LoRA (KeyError 'lora'), one timed at another configuration
    than the table's runs, and one whose methods differ in more than their own knobs: each is
    skipped with a warning that names it, and the table is written."""
    labels, runs = two_methods(6)
    write_runs(tmp_path, runs)
    (tmp_path / "bench_runs_sst2_a.json").write_text('{"configs": {"lora"')
    one, two = {"lora": {"step": 1.0}}, {"lora": {"step": 1.0}, "fwlora": {"step": 1.0}}
    timing_file(tmp_path, {"fwlora": {"step": 1.0}}, labels, "bench_runs_sst2_b.json")
    timing_file(tmp_path, one, labels, "bench_runs_sst2_c.json", lora={"max_train": 64})
    timing_file(tmp_path, two, labels, "bench_runs_sst2_d.json", fwlora={"max_train": 64})
    text = main(str(tmp_path))
    err = capsys.readouterr().err
    assert f"{tmp_path}/bench_runs_sst2_a.json: unreadable (JSONDecodeError" in err
    assert f"{tmp_path}/bench_runs_sst2_b.json: no LoRA run, which every time is a ratio to" in err
    assert (f"{tmp_path}/bench_runs_sst2_c.json: its lora run is not the table's "
            "sst2_lora_b0.2_s0: it differs in max_train") in err
    assert f"{tmp_path}/bench_runs_sst2_d.json: its fwlora and lora runs differ in max_train" in err
    assert "Training time as a ratio" not in text and (tmp_path / "table.md").exists()


def test_a_folder_of_other_lambdas_only(tmp_path):
    """Bad case 7 (issue 31): runs at λ ≠ 1e-4 only ended in an IndexError at runs[0]. One λ: a
    one-line error saying what each table needs; two λ: the dose-response alone, saying why."""
    _, runs = two_methods(7, ("fwlora",))
    for r in runs:
        r["config"]["fw_lambda"] = 1e-3
        r["delta_w_fro"], r["budget"]["n_matrices"] = {"m0": 1.0}, 36
        r["fw"] = {"weight_min": 0.95, "weight_max": 0.99, "importance_max": 0.05}
    write_runs(tmp_path, runs)
    with pytest.raises(SystemExit, match="holds runs at one λ ≠ 0.0001 only: the main table needs"):
        main(str(tmp_path))
    for r in [json.loads(json.dumps(r)) for r in runs]:
        r["config"]["fw_lambda"] = 1e-2
        runs.append(r)
    write_runs(tmp_path, runs)
    text = main(str(tmp_path))
    assert "No run at λ = 0.0001 (the hypothesis's), so no main table" in text
    assert "| 0.01 |" in text


def test_report_in_an_ascii_locale(tmp_path):
    """Bad case 7 (issue 31): `LC_ALL=C PYTHONUTF8=0 PYTHONCOERCECLOCALE=0 python report.py OUT`
    ended in a UnicodeEncodeError in write_file with a 0-byte temp file left: files are UTF-8
    whatever the locale, and printing escapes what the terminal cannot show."""
    import subprocess
    import sys
    write_runs(tmp_path, two_methods(8)[1])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONIO"))}
    env |= {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    r = subprocess.run([sys.executable, "report.py", str(tmp_path)], cwd=root, capture_output=True,
                       env=env)
    assert r.returncode == 0, r.stderr.decode()
    assert "mean ± std" in (tmp_path / "table.md").read_text(encoding="utf-8")
    assert b"mean \\xb1 std" in r.stdout  # escaped on an ASCII stdout, not a traceback
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_a_result_copied_under_another_name_counts_once(tmp_path, capsys):
    """Unclear case (issue 31): a copy of a result under another name was counted twice in
    "finished runs"."""
    write_runs(tmp_path, two_methods(9, ("lora",))[1])
    (tmp_path / "backup.json").write_text((tmp_path / "sst2_lora_b0.2_s0.json").read_text())
    assert "2 finished runs" in main(str(tmp_path))
    assert f"{tmp_path}/backup.json holds the run sst2_lora_b0.2_s0, not the one its name says" in \
        capsys.readouterr().err


def test_a_folder_that_cannot_be_written_still_shows_the_table(tmp_path, monkeypatch, capsys):
    """Unclear case (issue 31): a read-only folder stopped the report before it printed the table.
    Now the table is printed, then the one-line error, exit 1."""
    import errno
    write_runs(tmp_path, two_methods(10, ("lora",))[1])

    def read_only(*a):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(SystemExit) as e:
        main(str(tmp_path))
    assert "Read-only file system: the table above is not saved" in e.value.code
    assert "| LoRA |" in capsys.readouterr().out and not (tmp_path / "table.md").exists()


def test_report_help_is_the_usage(monkeypatch, capsys):
    """Unclear case (issue 31): `python report.py --help` said "--help is not a folder"."""
    import runpy
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for argv, code in ((["--help"], 0), ([], 2)):
        monkeypatch.setattr("sys.argv", ["report.py", *argv])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(root, "report.py"), run_name="__main__")
        assert e.value.code == code and "python report.py results/cpu" in capsys.readouterr().out


def test_matrix_grid_and_spearman_by_hand():
    """Issue 28: an unknown module name is an error (it was silently the FFN-out row); one
    Spearman, ties given their average rank: x = [1, 2, 2, 3] ranks [0, 1.5, 1.5, 3] against
    [0, 1, 2, 3]: cov 4.5, variances 4.5 and 5, ρ = 4.5 / √22.5."""
    from figures import matrix_grid
    from stats import spearman
    grid, n = matrix_grid({"bert.encoder.layer.1.attention.self.value": 2.0,
                           "bert.encoder.layer.0.attention.output.dense": 3.0,
                           "bert.encoder.layer.0.output.dense": 5.0})
    assert n == 2 and (grid[2][1], grid[3][0], grid[5][0]) == (2.0, 3.0, 5.0)
    assert grid[4][0] != grid[4][0]  # NaN: no FFN-in value given
    with pytest.raises(ValueError, match="pooler.dense: not an adapted matrix"):
        matrix_grid({"bert.pooler.dense": 1.0})
    mpnet = {f"mpnet.encoder.layer.0.{m}": float(i) for i, m in enumerate(
        ("attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o",
         "intermediate.dense", "output.dense"))}  # MPNet's names: each its own row
    assert matrix_grid(mpnet) == ([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0]], 1)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / 22.5 ** 0.5)
    assert spearman(torch.tensor([3.0, 1.0, 2.0]), [30, 10, 20]) == pytest.approx(1.0)  # tensors too


def test_budget_axis_beside_the_hypothesis_and_the_code_line(capsys):
    """The budget axis by hand: LoRA's per-seed change from 0.1% to 0.5% is [1, 2, 1, 1, 1] points:
    mean 1.2, sd 0.44721, se 0.2; 95% ±0.5552 -> [+0.6, +1.8], 90% ±0.4264 -> [+0.8, +1.6]."""
    from record import code_digest
    from report import by_cell, code_line
    from verdict import beside_hypothesis, budget_axis
    labels = torch.randint(0, 2, (N,), generator=torch.Generator().manual_seed(5))
    runs = []
    for budget, rank, finals in ((0.1, 1, [0.80, 0.81, 0.82, 0.80, 0.81]),
                                 (0.2, 2, [0.80] * 5), (0.5, 4, [0.81, 0.83, 0.83, 0.81, 0.82])):
        for s, f in enumerate(finals):
            for m in ("lora", "head"):
                r = fake_run(m, s, 0.8, labels, budget=budget)
                r["final"], r["budget"]["rank"] = f if m == "lora" else 0.7, rank
                runs.append(r)
    text = budget_axis(by_cell(runs))
    assert "accuracy (sst2) 0.5% − 0.1% (rank 4 − rank 1)" in text
    assert "| LoRA | **+1.2 [+0.6, +1.8]** (5/5 > 0) (higher: +1.2, 90% [+0.8, +1.6]) |" in text
    assert "| head" not in text  # one run at every budget: nothing to pair
    side = beside_hypothesis(by_cell(runs), {"sst2": {"lora": 1.0}}, "mpnet")
    assert "| LoRA | 93.1 | 80.0 | 55.0 | - | 1.00 | 1.000 / - |" in side
    assert "| AdaLoRA | 94.3 | - | 57.8 | - | 1.12 | - / - |" in side
    assert "Code: **30 of 30 runs from other code" in code_line(runs)  # none records a digest
    assert "30 of 30 runs come from other code" in capsys.readouterr().err
    for r in runs:
        r["environment"] |= {"code_sha256": code_digest(), "git_commit": "abcdef0123"}
    assert code_line(runs).startswith("Code: every run from the code in this checkout (digest")


def test_code_digest_changes_with_any_file_that_makes_a_run(tmp_path):
    import shutil
    from record import RUN_CODE, code_digest
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in RUN_CODE:
        shutil.copy(os.path.join(root, name + ".py"), tmp_path)
    assert code_digest(str(tmp_path)) == code_digest()
    for name in ("fisher", "train"):
        with open(tmp_path / f"{name}.py", "a") as f:
            f.write("\n")
        assert code_digest(str(tmp_path)) != code_digest()
