"""run_all.sh on the smoke profile: resume, interrupts (Ctrl-C and SIGTERM), failures, the lock, and a resume
that reuses only results of exactly the run it would make; report.py's reading of a folder."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sweep(out, *overrides, methods="lora fwlora", env=None, **popen):
    env = os.environ | {"TASKS": "sst2", "BUDGETS": "0.5", "METHODS": methods, "OUT": str(out),
                        "PYTHON": sys.executable} | (env or {})
    return subprocess.Popen(["bash", "run_all.sh", "smoke", *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def wait_for(path, p, timeout=120):
    deadline = time.time() + timeout
    while not path.exists() and p.poll() is None and time.time() < deadline:  # stops as soon as the sweep exits
        time.sleep(0.1)
    assert path.exists(), p.communicate()[0]


def test_sigterm_stops_parallel_runs_and_resume_finishes_without_redoing(tmp_path):
    methods = ("lora", "fwlora", "adalora")
    p = sweep(tmp_path, methods=" ".join(methods), env={"JOBS": "2"})
    wait_for(tmp_path / "sst2_lora_b0.5_s0.json", p)
    os.kill(p.pid, signal.SIGTERM)  # the sweep alone: it must stop its runs too
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 130 and "interrupted" in out, out
    time.sleep(0.5)
    ps = subprocess.run(["pgrep", "-f", f"out_dir={tmp_path}"], capture_output=True, text=True).stdout
    assert not ps, f"orphaned train.py: {ps}"
    done = {m: (tmp_path / f"sst2_{m}_b0.5_s0.json").stat().st_mtime_ns for m in methods
            if (tmp_path / f"sst2_{m}_b0.5_s0.json").exists()}
    assert "adalora" not in done and not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # no half-written file
    log = (tmp_path / "sst2_lora_b0.5_s0.log").read_text()
    assert "accuracy" in log and "\x1b[" not in log and "LOAD REPORT" not in log  # plain text, as it happened
    stopped = [m for m in methods if (tmp_path / f"sst2_{m}_b0.5_s0.log").exists() and m not in done]
    assert all("device: cpu" in (tmp_path / f"sst2_{m}_b0.5_s0.log").read_text()
               for m in stopped)  # a stopped run's log was written as it went (unbuffered)

    p = sweep(tmp_path, methods=" ".join(methods), env={"JOBS": "2"})
    out = p.communicate(timeout=180)[0]
    assert p.returncode == 0, out
    assert all(f"skip sst2_{m}_b0.5_s0 (done)" in out for m in done) and out.count("=== ") == 3 - len(done)
    assert all((tmp_path / f"sst2_{m}_b0.5_s0.json").stat().st_mtime_ns == t for m, t in done.items())  # not redone
    table = (tmp_path / "table.md").read_text()
    assert "| LoRA |" in table and "| FW-LoRA |" in table and "| AdaLoRA |" in table and "SST-2 acc 0.5%" in table
    assert "Failed runs" not in table  # the interrupted run's .error.json went with its success

    from train import Config, parse_args, train  # parallel workers give the serial, in-process results
    spec = (f"--model=tiny-bert --max_train=128 --max_eval=64 --epochs=2 --lr=2e-3 --task=sst2 --budget=0.5 "
            f"--out_dir={tmp_path / 'serial'} --method=fwlora")
    serial = train(parse_args(spec.split(), Config))
    assert json.load(open(tmp_path / "sst2_fwlora_b0.5_s0.json"))["epochs"] == serial["epochs"]


def test_ctrl_c_stops_a_sweep_started_in_the_background(tmp_path):
    """`bash run_all.sh &` inherits an ignored SIGINT; the sweep restores it, so Ctrl-C (or kill -INT) stops it."""
    p = sweep(tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    wait_for(tmp_path / ".lock.pid", p)
    os.kill(p.pid, signal.SIGINT)
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 130 and "interrupted" in out, out


def test_failed_runs_are_recorded_and_the_sweep_goes_on(tmp_path):
    p = sweep(tmp_path, "--lr=1e30", "--max_grad_norm=0")  # every run's loss becomes NaN
    out = p.communicate(timeout=180)[0]
    assert out.count("FAILED") == 2, out  # the first failure did not stop the sweep
    for m in ("lora", "fwlora"):
        assert json.load(open(tmp_path / f"sst2_{m}_b0.5_s0.error.json"))["status"] == "error"
        assert not (tmp_path / f"sst2_{m}_b0.5_s0.json").exists()
    assert "no finished runs" in out and "sst2_lora_b0.5_s0.error.json" in out


SPEC = "--model=tiny-bert --task=sst2 --method=lora --budget=0.5 --seed=0 --lr=2e-3 --out_dir={}"


def finished(tmp_path, **changes):
    """A finished result of SPEC's run, as train.py would write it, with `changes` to its config."""
    from train import Config, parse_args
    cfg = dataclasses.asdict(parse_args(SPEC.format(tmp_path).split(), Config)) | changes
    (tmp_path / "sst2_lora_b0.5_s0.json").write_text(json.dumps({"config": cfg, "status": "ok"}))


def test_plan_reuses_only_the_same_run_and_moves_corrupt_results_aside(tmp_path):
    from report import plan
    spec = SPEC.format(tmp_path)
    assert plan(str(tmp_path), [spec]) == [f"todo sst2_lora_b0.5_s0 {spec}"]
    finished(tmp_path, log_every=7, out_dir="elsewhere")  # fields that cannot change a result
    assert plan(str(tmp_path), [spec]) == ["done sst2_lora_b0.5_s0"]
    from report import METHODS
    assert [l.split()[1] for l in plan(str(tmp_path), [spec.replace("lora", "all", 1)])] == \
        [f"sst2_{m}_b0.5_s0" for m in METHODS]  # --method=all: every method, LoRA first
    finished(tmp_path, lr=1e-3, max_grad_norm=0.0)
    with pytest.raises(SystemExit, match=r"(?s)lr 0.001 -> 0.002, max_grad_norm 0.0 -> 1.0.*Nothing was run"):
        plan(str(tmp_path), [spec])
    (tmp_path / "sst2_lora_b0.5_s0.json").write_text('{"config": {"task"')  # truncated
    assert plan(str(tmp_path), [spec]) == [f"todo sst2_lora_b0.5_s0 {spec}"]
    assert (tmp_path / "sst2_lora_b0.5_s0.corrupt").exists() and not (tmp_path / "sst2_lora_b0.5_s0.json").exists()
    finished(tmp_path)
    padded = spec.replace("--budget=0.5", "--budget=0.50").replace("--seed=0", "--seed=00")  # BUDGETS="0.50"
    assert plan(str(tmp_path), [padded]) == ["done sst2_lora_b0.5_s0"]  # one name formula: it resumes
    with pytest.raises(SystemExit, match="(?s)--glue_dir.*Nothing was run"):  # data checked once, up front
        plan(str(tmp_path / "new"), [spec + " --glue_dir=/nonexistent"])


def test_a_result_from_another_config_stops_the_sweep_before_any_work(tmp_path):
    finished(tmp_path, lr=1e-3)
    p = sweep(tmp_path, methods="lora")
    out = p.communicate(timeout=60)[0]
    assert p.returncode != 0 and "lr 0.001 -> 0.002" in out and "===" not in out, out


def test_one_sweep_per_folder(tmp_path):
    import fcntl
    with open(tmp_path / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running sweep holds it
        (tmp_path / ".lock.pid").write_text("4242\n")
        p = sweep(tmp_path, methods="lora")
        out = p.communicate(timeout=30)[0]
    assert p.returncode == 1 and "another sweep (pid 4242)" in out and "===" not in out, out


def test_report_skips_foreign_files_and_lists_a_run_once(tmp_path, capsys):
    from report import load
    ok = {"config": {"task": "sst2", "method": "lora", "budget": 0.2, "seed": 0}, "status": "ok"}
    (tmp_path / "sst2_lora_b0.2_s0.json").write_text(json.dumps(ok))
    (tmp_path / "sst2_lora_b0.2_s0.error.json").write_text(json.dumps(ok | {"status": "error"}))  # stale
    (tmp_path / "sst2_fwlora_b0.2_s0.error.json").write_text(json.dumps(ok | {"status": "error"}))
    (tmp_path / "truncated.json").write_text('{"config": {"ta')
    (tmp_path / "bench.json").write_text("[1, 2]")
    runs, failed = load(str(tmp_path))
    assert len(runs) == 1 and failed == ["sst2_fwlora_b0.2_s0.error.json"]
    err = capsys.readouterr().err
    assert "truncated.json: unreadable" in err and "bench.json: not a run result" in err
