"""report.py's statistics on synthetic result files with known differences: the paired intervals exclude 0
where the difference is large and include it where there is none; degenerate runs are counted; the verdict
and tables are written from the numbers."""
import json
import zlib

import torch

from record import metrics
from report import T975, main, paired_bootstrap, t_interval

N = 900  # dev examples


def fake_run(method, seed, p_correct, labels, task="sst2", budget=0.2, one_class=False):
    g = torch.Generator().manual_seed(zlib.crc32(f"{method} {seed} {p_correct} {task}".encode()))  # not hash(): salted
    right = torch.rand(N, generator=g) < p_correct
    preds = torch.zeros(N, dtype=torch.long) if one_class else torch.where(right, labels, 1 - labels)
    m = metrics(preds, labels)
    metric = "accuracy" if task == "sst2" else "mcc"
    return {"config": {"task": task, "method": method, "budget": budget, "seed": seed, "model": "minilm",
                       "max_train": 100, "lr": 2e-3, "fw_lambda": 1e-4}, "status": "ok", "metric": metric, "final": m[metric], "best": m[metric],
            "dev_labels": labels.tolist(), "epochs": [{"preds": preds.tolist(), **m}],
            "budget": {"adapter_pct": 0.18}, "environment": {"device": "cpu", "device_name": "x", "threads": 1}}


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
    (tmp_path / "bench_runs_sst2_lora-fwlora_b0.2_s0.json").write_text(json.dumps(
        {"configs": {"lora": {"task": "sst2"}}, "runs": {"lora": {"buckets_ms_total": {"step": 1000.0}},
                                                          "fwlora": {"buckets_ms_total": {"step": 1004.0}},
                                                          "fwrank": {"buckets_ms_total": {"step": 900.0, "prepass": 120.0}}}}))
    text = main(str(tmp_path))
    assert "| shuffled FW (control) |" in text and "**1 degenerate**" in text
    fw_vs_lora = next(l for l in text.splitlines() if l.startswith("| FW-LoRA − LoRA |"))
    assert fw_vs_lora.count("**") == 2  # excludes 0
    fw_vs_l2 = next(l for l in text.splitlines() if l.startswith("| FW-LoRA − uniform L2 |"))
    assert "**" not in fw_vs_l2  # includes 0
    assert "Does FW-LoRA beat LoRA? higher in 1, lower in 0, unresolved in 0 of 1 cells" in text
    assert "Does FW-LoRA beat the uniform-L2 control (same penalty, equal weights)? higher in 0, lower in 0, " \
           "unresolved in 1" in text
    assert "FW-LoRA 1.004" in text and "Fisher ranks 1.020" in text  # the pre-pass is training time
    assert "3 seeds of `minilm`" in text
    assert "Does FW-LoRA beat the sharper, max-normalised weighting? not run" in text  # no fwmax runs here
    assert text.count("not run") == 4  # head, AdaLoRA, fwmax, fwrank: every question asks a pair the table has
    assert (tmp_path / "table.md").read_text().strip() == text.strip()


def test_a_failed_write_names_the_path_and_keeps_the_earlier_file(tmp_path, monkeypatch):
    """A full disk: the temp file goes, the error names the target, and the earlier table survives whole."""
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


def test_foreign_old_and_edited_results_are_skipped_by_name_and_configs_are_never_pooled(tmp_path, capsys):
    """Bad cases 7-10: a foreign JSON, an older version's result (no preds) and an edited one (no epochs) are
    each skipped with a warning naming the file and what it lacks; runs of one method and cell that differ in
    anything but the seed are refused, naming the fields."""
    import pytest
    labels = torch.randint(0, 2, (N,), generator=torch.Generator().manual_seed(2))
    for r in [fake_run(m, s, 0.8, labels) for m in ("lora", "fwlora") for s in range(2)]:
        (tmp_path / f"sst2_{r['config']['method']}_b0.2_s{r['config']['seed']}.json").write_text(json.dumps(r))
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
    with pytest.raises(SystemExit, match=r"cannot be pooled:\n  sst2_lora_b0.2_s3 vs sst2_lora_b0.2_s0: lr 0.002 / "
                                         r"0.0001, max_train 100 / 512"):
        main(str(tmp_path))


def test_paired_t_interval_by_hand_and_its_quantiles():
    """Five per-seed differences: mean 0.02, sd 0.0158114, t(0.975, 4) = 2.776: ±0.019630 by hand."""
    d, lo, hi, n, pos = t_interval([0.01, 0.03, 0.00, 0.04, 0.02])
    assert (n, pos) == (5, 4) and abs(d - 0.02) < 1e-12
    half = 2.776 * 0.015811388300841896 / 5 ** 0.5
    assert abs(lo - (0.02 - half)) < 1e-9 and abs(hi - (0.02 + half)) < 1e-9
    try:
        from scipy.stats import t
    except ImportError:
        return
    assert all(abs(q - t.ppf(0.975, df)) < 5e-4 for df, q in enumerate(T975, start=1))


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
    for m, lr, p in (("lora", 1e-3, 0.8), ("lora", 2e-3, 0.9), ("adalora", 1e-3, 0.7), ("adalora", 5e-3, 0.95)):
        r = fake_run(m, 0, p, labels)
        r["config"] |= {"lr": lr, "heldout": 500}
        (held / f"sst2_{m}_b0.2_s0_heldout500_lr{lr:g}.json").write_text(json.dumps(r))
    text = main(str(held))
    assert "| LoRA | " in text and "| 0.002 |" in text and "| 0.005 |" in text  # the lr each method gets
