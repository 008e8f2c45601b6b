"""run_all.sh on the smoke profile: a finished sweep, resume without redoing runs, clean Ctrl-C, the report."""
import os
import signal
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sweep(out, methods="lora fwlora", overrides=(), **popen):
    env = os.environ | {"TASKS": "sst2", "BUDGETS": "0.5", "METHODS": methods, "OUT": str(out)}
    return subprocess.Popen(["bash", "run_all.sh", "smoke", *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_interrupt_then_resume_finishes_without_redoing(tmp_path, glue_dir):
    p = sweep(tmp_path, start_new_session=True)
    first = tmp_path / "sst2_lora_b0.5_s0.json"
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert first.exists(), p.communicate()[0]
    time.sleep(3)  # the second run is starting or training
    os.killpg(p.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 130, out
    assert "interrupted" in out
    assert not (tmp_path / "sst2_fwlora_b0.5_s0.json").exists()  # never a half-written result
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    stamp = first.stat().st_mtime_ns

    p = sweep(tmp_path)
    out = p.communicate(timeout=180)[0]
    assert p.returncode == 0, out
    assert "skip sst2_lora_b0.5_s0 (done)" in out and out.count("=== ") == 1
    assert first.stat().st_mtime_ns == stamp  # not redone
    assert (tmp_path / "sst2_fwlora_b0.5_s0.json").exists()
    table = (tmp_path / "table.md").read_text()
    assert "| LoRA |" in table and "| FW-LoRA |" in table and "SST-2 acc 0.5%" in table


def test_failed_runs_are_recorded_and_the_sweep_goes_on(tmp_path, glue_dir):
    p = sweep(tmp_path, overrides=["--lr=1e30"])  # every run's loss becomes NaN
    out = p.communicate(timeout=180)[0]
    assert out.count("FAILED") == 2, out  # the first failure did not stop the sweep
    for m in ("lora", "fwlora"):
        assert (tmp_path / f"sst2_{m}_b0.5_s0.error.json").exists()
        assert not (tmp_path / f"sst2_{m}_b0.5_s0.json").exists()
    assert "no finished runs" in out


def test_report_compares_fwlora_with_its_ablation_cell_by_cell():
    from report import ablation

    def run(method, final, norms):
        return {"config": {"method": method, "task": "sst2", "budget": 0.2, "seed": 0}, "final": final,
                "fw": {"per_matrix": {k: {"delta_w_fro": v} for k, v in zip("ab", norms)},
                       "weight_min": 0.9, "weight_max": 0.99}}
    text = ablation([run("fwlora", 0.8, [1.0, 2.0]), run("l2lora", 0.79, [1.0, 2.2]), run("lora", 0.7, [])])
    assert "| sst2 0.2% s0 | 80.00 | 79.00 | 0.900-0.9900 | 4.55% / 9.09% |" in text  # |2 - 2.2| / 2.2
    assert ablation([run("fwlora", 0.8, [1.0])]) == ""  # no ablation run: no table
