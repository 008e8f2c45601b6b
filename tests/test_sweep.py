"""sweep.py (through run_all.sh where processes matter, in-process elsewhere): resume, interrupts
(Ctrl-C, SIGTERM, kill -9), failures and exit status, the lock, GPU slots, every refusal of bad
input, and a resume that reuses only results of exactly the run it would make."""
import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import record
import local
import sweep
from record import METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = {"PROFILE": "smoke", "MODEL": "tiny-bert", "DEF_SEEDS": "0", "DEF_BUDGETS": "0.5",
         "DEF_TIMED": "", "SST2_ARGS": "--max_train=128 --max_eval=64 --epochs=2 --lr=2e-3",
         "TASKS": "sst2", "METHODS": "lora"}
LONG = "--epochs=20"  # a few seconds a run: long enough to be stopped while it runs


def start(out, *overrides, methods="lora fwlora", env=None):
    """`bash run_all.sh smoke` in its own session, so its whole process group can be checked."""
    env = os.environ | {"TASKS": "sst2", "BUDGETS": "0.5", "METHODS": methods, "OUT": str(out),
                        "PYTHON": sys.executable} | (env or {})
    return subprocess.Popen(["bash", "run_all.sh", "smoke", *overrides], cwd=ROOT, env=env,
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_until(cond, p=None, timeout=120, what=""):
    deadline = time.time() + timeout
    while not cond() and (p is None or p.poll() is None) and time.time() < deadline:
        time.sleep(0.05)
    assert cond(), (what, p.communicate()[0] if p else "")


def group_alive(pgid: int) -> bool:
    """Whether a live process (not a zombie left for init to reap) remains in the process group."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            # the fields after the command's name: state, ppid, pgrp, ...
            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[2]) == pgid and stat[0] != "Z":
            return True
    return False


def run_pid(log) -> int | None:
    """The process writing to this run's log (its stdout), found through /proc."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/fd/1") == str(log):
                return int(pid)
        except OSError:
            pass
    return None


def error_of(out, method: str) -> str:
    """The error that the smoke profile's run of `method` recorded in its .error.json."""
    return json.load(open(out / f"sst2_{method}_b0.5_s0.error.json"))["error"]


def test_sigterm_stops_parallel_runs_and_resume_finishes_without_redoing(tmp_path):
    methods = ("lora", "fwlora", "adalora")
    p = start(tmp_path, LONG, methods=" ".join(methods), env={"JOBS": "2"})
    wait_until((tmp_path / "sst2_lora_b0.5_s0.json").exists, p)
    log = lambda m: tmp_path / f"sst2_{m}_b0.5_s0.log"
    res = lambda m: tmp_path / f"sst2_{m}_b0.5_s0.json"
    training = lambda m: log(m).exists() and "device: cpu" in log(m).read_text()  # past its start
    # every other run training (or done), so the stop comes mid-run
    wait_until(lambda: all(training(m) or res(m).exists() for m in methods[1:]), p)
    os.kill(p.pid, signal.SIGTERM)  # the sweep alone: it must stop its runs too
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 130 and "interrupted" in out, out
    assert "leaked" not in out, out  # bad case 9 (issue 31): no library warning
    # no run outlives the sweep
    wait_until(lambda: not group_alive(p.pid), timeout=30, what="orphaned runs")
    done = {m: res(m).stat().st_mtime_ns for m in methods if res(m).exists()}
    # no half-written file
    assert "adalora" not in done and not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    log = (tmp_path / "sst2_lora_b0.5_s0.log").read_text()
    # plain text, as it happened
    assert "accuracy" in log and "\x1b[" not in log and "LOAD REPORT" not in log
    stopped = [m for m in methods if m not in done]
    # every run not finished was training when the stop came, and says so
    assert "adalora" in stopped
    for m in stopped:
        assert error_of(tmp_path, m).startswith("KeyboardInterrupt")

    p = start(tmp_path, LONG, "--overwrite=true", methods=" ".join(methods), env={"JOBS": "2"})
    out = p.communicate(timeout=180)[0]
    assert p.returncode == 0, out
    skip = "(done); --overwrite=true does not redo a finished run"
    assert all(f"skip sst2_{m}_b0.5_s0 {skip}" in out for m in done)
    assert out.count(" started") == 3 - len(done)
    # progress: k of N, time left
    assert f"[{3 - len(done)}/{3 - len(done)}]" in out and "min left" in out
    assert all(res(m).stat().st_mtime_ns == t for m, t in done.items())  # not redone
    table = (tmp_path / "table.md").read_text()
    assert ("| LoRA |" in table and "| FW-LoRA |" in table and "| AdaLoRA |" in table
            and "SST-2 acc 0.5%" in table)
    # the interrupted run's .error.json went with its success
    assert "no finished result" not in table

    import torch
    from record import parse_args
    from train import Config, train  # forked workers give the in-process results, bit for bit
    spec = (f"--model=tiny-bert --max_train=128 --max_eval=64 {LONG} --lr=2e-3 --task=sst2 "
            f"--budget=0.5 --out_dir={tmp_path / 'serial'} --method=fwlora")
    threads = torch.get_num_threads()
    torch.set_num_threads(local.slots({"JOBS": "2"}, on_gpu=False)[0].threads)  # a slot's threads
    try:
        serial = train(parse_args(spec.split(), Config))
    finally:
        torch.set_num_threads(threads)
    assert json.load(open(tmp_path / "sst2_fwlora_b0.5_s0.json"))["epochs"] == serial["epochs"]


def test_ctrl_c_stops_a_sweep_started_in_the_background(tmp_path):
    """`bash run_all.sh &` inherits an ignored SIGINT; the sweep sets its own handler, so Ctrl-C
    still stops it."""
    env = os.environ | {"TASKS": "sst2", "METHODS": "lora", "OUT": str(tmp_path),
                        "PYTHON": sys.executable}
    background = 'trap "" INT; exec bash run_all.sh smoke --epochs=30'
    p = subprocess.Popen(["bash", "-c", background], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_until((tmp_path / "sst2_lora_b0.5_s0.log").exists, p)
    os.kill(p.pid, signal.SIGINT)
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 130 and "interrupted" in out, out
    wait_until(lambda: not group_alive(p.pid), timeout=30, what="orphaned runs")


def test_kill_9_of_a_run_or_of_the_sweep_loses_nothing_and_leaves_no_orphan(tmp_path):
    p = start(tmp_path, LONG, methods="lora fwlora", env={"JOBS": "1"})
    log = tmp_path / "sst2_lora_b0.5_s0.log"
    wait_until(lambda: run_pid(log) is not None, p)
    os.kill(run_pid(log), signal.SIGKILL)  # the run dies without a word; the sweep says it for it
    out = p.communicate(timeout=120)[0]
    # failures exit non-zero
    assert p.returncode == 1 and "sst2_lora_b0.5_s0 FAILED (exit -9)" in out, out
    assert error_of(tmp_path, "lora") == "killed by signal 9"
    assert "no finished result" in out
    assert "sst2_lora_b0.5_s0.error.json" in (tmp_path / "table.md").read_text()

    before = log.read_text().count("device: cpu")  # the killed attempt may have died before it
    # far longer than the second it takes to stop it
    p = start(tmp_path, "--epochs=1000", methods="lora")
    wait_until(lambda: log.read_text().count("device: cpu") == before + 1, p)  # the second trains
    os.kill(p.pid, signal.SIGKILL)  # the sweep itself: its run must not run on alone
    p.communicate(timeout=30)
    wait_until(lambda: not group_alive(p.pid), timeout=30, what="orphaned runs")
    assert error_of(tmp_path, "lora").startswith("KeyboardInterrupt")
    held = sweep.lock(str(tmp_path))  # the kernel dropped the dead sweep's lock
    held.close()


def test_failed_runs_are_recorded_and_the_sweep_goes_on(tmp_path):
    tmp_path = tmp_path / "an OUT with spaces"  # bad case 3: quoted everywhere
    p = start(tmp_path, "--lr=1e30", "--max_grad_norm=0")  # every run's loss becomes NaN
    out = p.communicate(timeout=180)[0]
    # the first failure did not stop the sweep
    assert p.returncode == 1 and out.count("FAILED") == 2, out
    for m in ("lora", "fwlora"):
        assert json.load(open(tmp_path / f"sst2_{m}_b0.5_s0.error.json"))["status"] == "error"
        assert not (tmp_path / f"sst2_{m}_b0.5_s0.json").exists()
    assert "no finished runs" in out and "sst2_lora_b0.5_s0.error.json" in out


def settings(tmp_path, *argv, **env):
    return sweep.settings(list(argv), SMOKE | {"OUT": str(tmp_path)} | env)


@pytest.mark.parametrize("env, argv, message", [
    (dict(TASKS="mnli"), [], "TASKS: unknown 'mnli'"),
    (dict(METHODS="lora bogus"), [], "METHODS: unknown 'bogus'"),
    (dict(TIMED="lora,bogus"), [], "TIMED: unknown 'bogus'"),  # before the sweep, not after it
    (dict(BUDGETS="0.5 0.50"), [], "are the same run sst2_lora_b0.5_s0"),
    (dict(SEEDS="1 01"), [], "are the same run sst2_lora_b0.5_s1"),
    ({}, ["--out_dir=Y"], "use OUT=... instead"),
    ({}, ["--seed=3"], "use SEEDS=... instead"),
    ({}, ["--nope=1"], "bad argument '--nope=1'"),
    ({}, ["--lr=fast"], "--lr takes a float"),
    ({}, ["--lr=-1"], "--lr"),
    (dict(BUDGETS="0"), [], "--budget=0.0 is out of range"),
    ({}, ["--device=cuda"], "--device=cuda, but this torch"),  # in seconds, before any work
])
def test_bad_sweep_input_is_refused_before_any_work(tmp_path, capsys, env, argv, message):
    """Bad case 2 (BUDGETS="0.1 0.10": one run twice) and the unclear TIMED, --out_dir cases."""
    with pytest.raises(SystemExit) as e:
        settings(tmp_path, *argv, **env)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # nothing written


@pytest.mark.parametrize("key, value", [("JOBS", "0"), ("JOBS", "-1"), ("JOBS", "abc"),
                                        ("RUNS_PER_GPU", "0"), ("RUNS_PER_GPU", "two")])
def test_slot_counts_must_be_positive_integers(capsys, key, value):
    """Bad case 1: JOBS=0, -1, abc die with a message, not bash internals."""
    with pytest.raises(SystemExit) as e:
        local.slots({key: value}, on_gpu=key == "RUNS_PER_GPU")
    message = f"{key} must be a positive whole number, got {value!r}"
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_gpu_slots_map_through_the_inherited_device_list():
    got = local.slots({"CUDA_VISIBLE_DEVICES": "2,3", "RUNS_PER_GPU": "2"}, on_gpu=True)
    assert [s.gpu for s in got] == ["2", "2", "3", "3"]  # the scheduler's GPUs, not 0 and 1
    assert [s.gpu for s in local.slots({"CUDA_VISIBLE_DEVICES": "7"}, on_gpu=True)] == ["7"]
    with pytest.raises(SystemExit):
        local.slots({"CUDA_VISIBLE_DEVICES": ""}, on_gpu=True)  # handed no GPU at all
    cpu = local.slots({"JOBS": "2"}, on_gpu=False)
    assert len(cpu) == 2 and all(s.gpu is None and s.threads >= 1 for s in cpu)


def test_read_only_out_is_named_as_such(tmp_path, monkeypatch, capsys):
    """Bad case 4: a read-only OUT is named as such, not as another sweep's lock."""
    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    monkeypatch.setattr(record, "open", read_only, raising=False)
    with pytest.raises(SystemExit):
        settings(tmp_path / "ro")
    assert "is read-only or not writable here (Read-only file system)" in capsys.readouterr().err


SPEC_OUT = ("--model=tiny-bert --max_train=128 --max_eval=64 --epochs=2 --lr=2e-3 --task=sst2 "
            "--method=lora")


def finished(out, **changes):
    """The smoke profile's LoRA run as a complete finished result (train.py's), plus `changes`."""
    from data import provenance
    from record import parse_args
    from train import Config
    argv = f"{SPEC_OUT} --budget=0.5 --seed=0 --out_dir={out}".split()
    cfg = dataclasses.asdict(parse_args(argv, Config))
    r = {"config": cfg | changes, "status": "ok", "metric": "accuracy", "final": 0.5, "best": 0.5,
         "epochs": [{"preds": [0, 1]}], "dev_labels": [0, 1], "budget": {"adapter_pct": 0.5},
         "environment": {"device": "cpu"}, "data": provenance("sst2"),
         "precision": sweep.resolve_precision("auto", "cpu")[0]}
    (out / "sst2_lora_b0.5_s0.json").write_text(json.dumps(r))
    return r


def test_plan_reuses_only_the_same_run_and_moves_corrupt_results_aside(tmp_path, capsys):
    assert [x[:2] for x in sweep.plan(settings(tmp_path))] == [("todo", "sst2_lora_b0.5_s0")]
    finished(tmp_path, log_every=7, out_dir="elsewhere")  # fields that cannot change a result
    assert [x[:2] for x in sweep.plan(settings(tmp_path))] == [("done", "sst2_lora_b0.5_s0")]
    assert [x[1] for x in sweep.plan(settings(tmp_path, METHODS="all"))] == \
        [f"sst2_{m}_b0.5_s0" for m in METHODS]  # all: every method, LoRA first
    assert [x[:2] for x in sweep.plan(settings(tmp_path, BUDGETS="0.50", SEEDS="00"))] == \
        [("done", "sst2_lora_b0.5_s0")]  # one name formula: it resumes
    finished(tmp_path, lr=1e-3, max_grad_norm=0.0)
    with pytest.raises(SystemExit):
        sweep.plan(settings(tmp_path))
    assert "lr 0.001 -> 0.002, max_grad_norm 0.0 -> 1.0" in capsys.readouterr().err
    r = finished(tmp_path)
    r["environment"]["device"] = "cuda:0"
    (tmp_path / "sst2_lora_b0.5_s0.json").write_text(json.dumps(r))
    with pytest.raises(SystemExit):
        sweep.plan(settings(tmp_path))  # made on a GPU: not this run on a CPU
    assert "device cuda -> cpu" in capsys.readouterr().err
    no_epochs = {k: v for k, v in finished(tmp_path).items() if k != "epochs"}
    # truncated; a finished result without epochs
    for broken in ('{"config": {"task"', json.dumps(no_epochs)):
        (tmp_path / "sst2_lora_b0.5_s0.json").write_text(broken)
        assert [x[:2] for x in sweep.plan(settings(tmp_path))] == [("todo", "sst2_lora_b0.5_s0")]
        assert (tmp_path / "sst2_lora_b0.5_s0.corrupt").exists()
        assert not (tmp_path / "sst2_lora_b0.5_s0.json").exists()
    s = settings(tmp_path / "new", "--glue_dir=/nonexistent")
    with pytest.raises(SystemExit):
        sweep.preflight(s, sweep.plan(s))  # data checked once, up front
    assert "--glue_dir" in capsys.readouterr().err


def test_resume_refuses_a_result_made_on_other_data(tmp_path, capsys):
    """Bad case 1 (issue 31): a result made on a truncated dev.tsv was kept ("skip ... (done)") once
    the file was restored. The resume compares the digests the result recorded with the files'."""
    r = finished(tmp_path)
    assert [x[0] for x in sweep.plan(settings(tmp_path))] == ["done"]  # the same files: resumed
    r["data"]["sha256"]["SST-2/dev.tsv"] = "0123456789ab" + "0" * 52  # made on another dev.tsv
    (tmp_path / "sst2_lora_b0.5_s0.json").write_text(json.dumps(r))
    with pytest.raises(SystemExit):
        sweep.plan(settings(tmp_path))
    assert "data SST-2/dev.tsv 0123456789ab -> f7271f7a919e" in capsys.readouterr().err
    del r["data"]  # an older version's result: which data it saw is unknown
    (tmp_path / "sst2_lora_b0.5_s0.json").write_text(json.dumps(r))
    with pytest.raises(SystemExit):
        sweep.plan(settings(tmp_path))
    assert "data SST-2/train.tsv (not recorded) -> c75796b01672" in capsys.readouterr().err


def test_resume_keeps_a_result_from_other_code_and_says_so(tmp_path, capsys):
    """A finished result whose recorded code digest is not this checkout's is skipped as done, with
    a warning (the report flags it too); one from this code resumes silently."""
    from record import code_digest
    r = finished(tmp_path)
    r["environment"]["code_sha256"] = code_digest()
    (tmp_path / "sst2_lora_b0.5_s0.json").write_text(json.dumps(r))
    assert [x[0] for x in sweep.plan(settings(tmp_path))] == ["done"]
    assert "other code" not in capsys.readouterr().err
    r["environment"]["code_sha256"] = "0123456789ab"
    (tmp_path / "sst2_lora_b0.5_s0.json").write_text(json.dumps(r))
    assert [x[0] for x in sweep.plan(settings(tmp_path))] == ["done"]
    assert "1 finished runs in" in capsys.readouterr().err


def test_a_giant_field_stops_the_preflight_with_exit_2(tmp_path, capsys):
    """Bad case 7 (issue 31): a sentence over 131,072 characters ended the preflight in
    `_csv.Error`, exit 1."""
    mine = tmp_path / "mine" / "SST-2"
    os.makedirs(mine)
    (mine / "train.tsv").write_text("sentence\tlabel\n" + "word " * 30_000 + "\t0\n")
    (mine / "dev.tsv").write_text("sentence\tlabel\na fine film\t1\n")
    s = settings(tmp_path / "out", f"--glue_dir={tmp_path / 'mine'}")
    with pytest.raises(SystemExit) as e:
        sweep.preflight(s, sweep.plan(s))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "train.tsv line 2: field larger than field limit" in err


def test_resume_refuses_to_mix_precisions_and_reads_old_results_as_fp32_on_a_cpu(
        tmp_path, monkeypatch, capsys):
    """auto is bf16 on a CPU with AMX/AVX512-BF16 now; a result without a recorded precision (the
    committed MiniLM tables) ran auto as fp32 on a CPU. The resolved precisions are compared, not
    the flags."""
    bf16_cpu = lambda p, d: (p if p != "auto" else "bf16", "a bf16 CPU")
    monkeypatch.setattr(sweep, "resolve_precision", bf16_cpu)
    r = finished(tmp_path)
    # as written before precision was recorded: config precision auto, made on a CPU
    del r["precision"]
    (tmp_path / "sst2_lora_b0.5_s0.json").write_text(json.dumps(r))
    with pytest.raises(SystemExit):
        sweep.plan(settings(tmp_path))
    assert "precision fp32 -> bf16 (--precision=fp32 continues it)" in capsys.readouterr().err
    plan = sweep.plan(settings(tmp_path, "--precision=fp32"))
    assert [x[:2] for x in plan] == [("done", "sst2_lora_b0.5_s0")]
    (tmp_path / "sst2_lora_b0.5_s0.json").write_text(json.dumps(r | {"precision": "bf16"}))
    assert [x[:2] for x in sweep.plan(settings(tmp_path))] == [("done", "sst2_lora_b0.5_s0")]
    with pytest.raises(SystemExit):
        sweep.plan(settings(tmp_path, "--precision=fp32"))
    assert "precision bf16 -> fp32" in capsys.readouterr().err


def test_budgets_on_one_rank_are_refused(tmp_path, capsys):
    s = settings(tmp_path, BUDGETS="0.45 0.5")  # 5.07 and 5.64 units of rank: both rank 6
    with pytest.raises(SystemExit):
        sweep.preflight(s, sweep.plan(s))
    err = capsys.readouterr().err
    assert "budgets 0.45% and 0.5% give the same rank on tiny-bert" in err


def test_one_sweep_per_folder(tmp_path, capsys):
    held = sweep.lock(str(tmp_path))
    with pytest.raises(SystemExit) as e:
        sweep.lock(str(tmp_path))
    assert e.value.code == 1 and f"another sweep (pid {os.getpid()})" in capsys.readouterr().err
    held.close()
    sweep.lock(str(tmp_path)).close()  # free again


def test_timing_rotates_the_method_order(tmp_path):
    s = settings(tmp_path, TASKS="sst2 cola", TIMED="lora,fwlora,adalora")
    (task1, args1), (task2, args2) = sweep.timing(s)
    assert (task1, args1[1], task2, args2[1]) == ("sst2", "--methods=lora,fwlora,adalora",
                                                  "cola", "--methods=fwlora,adalora,lora")


def test_lambda_and_lr_axes_and_a_methods_own_values(tmp_path, capsys):
    """LAMBDAS sweeps the penalised methods only (names carry λ), LRS every method (tuning names
    carry the lr), <TASK>_<METHOD>_ARGS gives one method its own lr, in its runs and in the
    side-by-side timing."""
    s = settings(tmp_path, METHODS="lora fwlora", LAMBDAS="1e-3 1e-2")
    assert [n for n, _ in s.runs] == ["sst2_lora_b0.5_s0", "sst2_fwlora_b0.5_s0_lam0.001",
                                      "sst2_fwlora_b0.5_s0_lam0.01"]
    s = settings(tmp_path, "--heldout=32", METHODS="lora", LRS="1e-3 5e-3")
    assert [n for n, _ in s.runs] == ["sst2_lora_b0.5_s0_heldout32_lr0.001",
                                      "sst2_lora_b0.5_s0_heldout32_lr0.005"]
    s = settings(tmp_path, METHODS="lora adalora", TIMED="lora,adalora",
                 SST2_ADALORA_ARGS="--lr=5e-3")
    runs = dict(s.runs)
    assert "--lr=5e-3" in runs["sst2_adalora_b0.5_s0"] and "--lr=2e-3" in runs["sst2_lora_b0.5_s0"]
    assert sweep.timing(s)[0][1][1] == "--methods=lora,adalora:lr=5e-3"
    # the user's flag wins
    s = settings(tmp_path, "--lr=1e-3", METHODS="adalora", SST2_ADALORA_ARGS="--lr=5e-3")
    assert "--lr=5e-3" not in dict(s.runs)["sst2_adalora_b0.5_s0"]
    with pytest.raises(SystemExit):
        settings(tmp_path, "--lr=1e-3", LRS="1e-3 5e-3")
    assert "LRS and --lr are both given" in capsys.readouterr().err


# Issue 31: results you can trust, third round.
# SW = OUT=X TASKS=sst2 METHODS=lora TIMED= bash run_all.sh smoke

def test_the_timing_step_resumes_by_what_it_timed(tmp_path, capsys):
    """Bad case 3 (issue 31): a timing file is reused only if it times every method of TIMED with
    the same configs; one of other methods, other configs or a damaged one is moved aside and timed
    again."""
    import bench
    s = settings(tmp_path, TIMED="lora")
    (task, args), = sweep.timing(s)
    assert bench.main(args) == 0  # the real timing step: bench.py runs, as the sweep's worker runs
    assert sweep.timing(s) == []
    assert "skip side-by-side timing of sst2 (done)" in capsys.readouterr().out
    timed = tmp_path / "bench_runs_sst2_lora_b0.5_s0.json"
    stale = tmp_path / "bench_runs_sst2_lora_b0.5_s0.stale"
    assert [f for f in os.listdir(tmp_path) if f.startswith("bench_runs_sst2_")] == [timed.name]
    for env, argv in (({"TIMED": "lora,fwlora"}, []), ({"TIMED": "lora"}, ["--max_train=64"])):
        again = sweep.timing(settings(tmp_path, *argv, **env))
        assert [t for t, _ in again] == ["sst2"]
        assert "moved aside (.stale)" in capsys.readouterr().out
        assert stale.exists() and not timed.exists()
        os.replace(stale, timed)
    timed.write_text('{"configs": {"lora"')  # damaged: redone, not a JSONDecodeError
    assert [t for t, _ in sweep.timing(s)] == ["sst2"]


@pytest.mark.parametrize("env, message", [
    (dict(TIMED="fwlora"), "TIMED=fwlora: the timing gives each method as a ratio to LoRA's"),
    (dict(SST2_LORA_ARGS="--task=cola"), "SST2_LORA_ARGS: --task=cola: the sweep sets this itself; "
                                         "use TASKS="),
    (dict(SST2_ARGS="--max_train=128 --seed=1"), "SST2_ARGS: --seed=1: the sweep sets this itself; "
                                                 "use SEEDS="),
    (dict(LRS="1e-3 2e-3"), "--lr=1e-3 and --lr=2e-3 are the same run sst2_lora_b0.5_s0: list each "
                            "value once; a run's name carries its lr in tuning runs only"),
    (dict(METHODS="lora lora"), "--method=lora --budget=0.5 --seed=0 is listed twice"),
])
def test_more_bad_sweep_input_is_refused_before_any_work(tmp_path, capsys, env, message):
    """Bad case 7 (issue 31): TIMED without lora is refused up front, not a KeyError in the report;
    and the unclear cases: a sweep-owned field in <TASK>_ARGS or <TASK>_<METHOD>_ARGS, and a clash
    message that names the values that clash."""
    with pytest.raises(SystemExit) as e:
        settings(tmp_path, **env)
    assert e.value.code == 2 and message in capsys.readouterr().err


def full_disk(monkeypatch, module):
    """Writes through `module`'s open() fail as on a full disk, once the file is created."""
    real = open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def opener(path, mode="r", **kw):
        return Full(real(path, mode, **kw)) if "w" in mode else real(path, mode, **kw)
    monkeypatch.setattr(module, "open", opener, raising=False)


def test_a_full_disk_is_found_before_any_work_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """Bad case 7 (issue 31): OUT on a full disk. The write check writes a real megabyte (an empty
    file fits on a full disk), so the sweep stops at once (exit 2); no empty .lock.pid is left."""
    sweep.lock(str(tmp_path)).close()  # the lock file exists already; the pid file goes
    os.remove(tmp_path / ".lock.pid")
    full_disk(monkeypatch, record)
    with pytest.raises(SystemExit) as e:
        settings(tmp_path)
    assert e.value.code == 2 and "(No space left on device): choose another OUT" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        sweep.lock(str(tmp_path))  # its pid file cannot be written either
    assert e.value.code == 1 and "could not write" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == [".lock"]  # no pid file, probe or temp file left


def test_help_prints_the_profiles_the_variables_and_the_fields():
    """Bad case 8 (issue 31): `bash run_all.sh --help` exits 0 with the profiles, the sweep's
    variables (one a line) and train.py's fields, not "error: 0"."""
    r = subprocess.run(["bash", "run_all.sh", "--help"], cwd=ROOT, capture_output=True, text=True,
                       env=os.environ | {"PYTHON": sys.executable})
    assert r.returncode == 0 and "error" not in r.stderr, r.stderr
    lines = r.stdout.splitlines()
    for profile in ("cpu", "dose", "tune", "smoke", "paper"):
        assert any(l.startswith(f"  bash run_all.sh {profile}") for l in lines), profile
    for var in ("TASKS", "BUDGETS", "SEEDS", "METHODS", "LAMBDAS", "LRS", "OUT", "JOBS", "TIMED"):
        assert any(l.startswith(f"  {var}=") for l in lines), var
    assert any(l.startswith("  --lr=0.0002") for l in lines)


def test_runs_keep_tqdm_off_multiprocessing_locks(monkeypatch):
    """Bad case 9 (issue 31): tqdm's default lock is a multiprocessing RLock, under the forkserver a
    named semaphore that the resource tracker reports as leaked when a stop cuts a run's exit
    short. A run's progress bar takes no such semaphore."""
    import multiprocessing.synchronize
    import tqdm

    def no_semaphores(*a, **k):
        raise AssertionError("a multiprocessing semaphore was created")
    monkeypatch.setattr(multiprocessing.synchronize.SemLock, "__init__", no_semaphores)
    monkeypatch.delattr(tqdm.tqdm, "_lock", raising=False)
    local.quiet_locks()  # as the worker does before the run
    with open(os.devnull, "w") as devnull:
        assert list(tqdm.tqdm(range(3), disable=False, file=devnull)) == [0, 1, 2]
    monkeypatch.delattr(tqdm.tqdm, "_lock", raising=False)  # the next user builds its own again


def test_the_time_left_weighs_runs_by_their_steps():
    """Bad case 10 (issue 31): steps = epochs × ⌈train size / batch⌉; the time left is the
    finished runs' seconds per step times the steps to go, over the slots. By hand: 10 s for 100
    steps is 0.1 s a step; two waiting runs of 300 steps and one running for 5 s (50 of its 200
    steps) leave 750 steps: 37.5 s on 2 slots."""
    from types import SimpleNamespace as C
    steps = lambda n, **kw: sweep.run_steps(C(**(dict(epochs=2, batch_size=32, heldout=0) | kw)), n)
    assert steps(67349, max_train=128) == 8  # the smoke profile's SST-2 run
    assert steps(8551, max_train=0) == 2 * 268  # CoLA, full: 267.2 batches
    assert steps(67349, max_train=6000, epochs=1, heldout=1000) == 188  # held out, then capped
    assert steps(8551, max_train=0, epochs=1, heldout=1000) == 236  # 7,551 / 32
    assert local.left_s([(10.0, 100)], [300, 300], [(5.0, 200)], 2) == pytest.approx(37.5)
    assert local.left_s([(10.0, 100)], [], [(30.0, 200)], 1) == 0.0  # overdue: never negative


def test_lock_and_log_paths_that_are_folders_are_refused(tmp_path, capsys):
    """Unclear cases (issue 31): OUT/.lock a folder, a run's log path a folder: a one-line error
    before any work, not a traceback."""
    (tmp_path / ".lock").mkdir()
    with pytest.raises(SystemExit) as e:
        sweep.lock(str(tmp_path))
    err = capsys.readouterr().err
    assert e.value.code == 2 and ".lock cannot be the sweep's lock file (Is a directory)" in err
    (tmp_path / ".lock").rmdir()
    (tmp_path / "sst2_lora_b0.5_s0.log").mkdir()
    with pytest.raises(SystemExit) as e:
        sweep.plan(settings(tmp_path))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "sst2_lora_b0.5_s0.log is a folder, where the run sst2_lora" in err


def test_more_jobs_than_cores_are_warned_about(capsys):
    """Unclear case (issue 31): JOBS=99 on 2 cores runs (a run waiting on I/O may want it), with a
    warning."""
    ncpu = len(os.sched_getaffinity(0))
    assert len(local.slots({"JOBS": str(ncpu + 1)}, on_gpu=False)) == ncpu + 1
    assert f"warning: JOBS={ncpu + 1} on {ncpu} cores" in capsys.readouterr().err
    local.slots({"JOBS": str(ncpu)}, on_gpu=False)
    assert capsys.readouterr().err == ""


def test_a_dead_process_server_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """Unclear case (issue 31): a kill -9 of the forkserver made the next start an EOFError
    traceback; now a one-line error, exit 1, and the finished runs stay."""
    class Dead:
        sentinel = None

        def start(self):
            raise EOFError("unexpected EOF")

    class Context:
        def set_forkserver_preload(self, modules):
            pass

        def Process(self, **kw):
            return Dead()
    monkeypatch.setattr(local.multiprocessing, "get_context", lambda kind: Context())
    monkeypatch.setattr(local.multiprocessing.forkserver, "ensure_running", lambda: None)
    s = settings(tmp_path)
    with pytest.raises(SystemExit) as e:
        local.run_local(s.out, sweep.plan(s), [local.Slot(1)], {"sst2_lora_b0.5_s0": 8}, [])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "(multiprocessing's forkserver) has gone (EOFError" in err
    assert "finished runs are kept" in err and err.count("\n") == 1


def kept_handlers(f):
    """f() with the process's SIGINT, SIGTERM and SIGHUP handlers restored after it."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return f()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_stop_during_the_report_exits_130(tmp_path, monkeypatch, capsys):
    """Unclear case (issue 31): SIGINT while the report is written was swallowed by the runs' stop
    handler (exit 0); now the report step stops and the sweep exits 130."""
    import report

    def interrupted(out):
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.time() + 10
        while time.time() < deadline:  # the handler raises as soon as the signal is delivered
            time.sleep(0.01)
        raise AssertionError("SIGINT did not stop the report")
    monkeypatch.setattr(report, "main", interrupted)
    assert kept_handlers(lambda: sweep.report_step(str(tmp_path))) == 130
    assert "interrupted in the report: every run is kept" in capsys.readouterr().out


def test_a_finished_sweep_parses_redo_flags_and_starts_no_process(tmp_path, monkeypatch, capsys):
    """Unclear case (issue 31): --save_adapters=1 on a finished sweep gets the explanation `=true`
    gets; a sweep with nothing to do starts no process server."""
    finished(tmp_path)
    monkeypatch.setattr(local.multiprocessing.forkserver, "ensure_running", lambda: pytest.fail())
    code = kept_handlers(lambda: sweep.main(["--save_adapters=1"], SMOKE | {"OUT": str(tmp_path)}))
    out = capsys.readouterr().out
    assert code == 0 and "skip sst2_lora_b0.5_s0 (done); --save_adapters=1 does not redo" in out


def test_out_is_relative_to_the_callers_folder(tmp_path):
    """Unclear case (issue 31): run_all.sh moves to the repository; a relative OUT is taken from
    where the user stands, before that."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "OUT=$OUT"\n')
    fake.chmod(0o755)
    r = subprocess.run(["bash", os.path.join(ROOT, "run_all.sh"), "smoke"], cwd=tmp_path, text=True,
                       capture_output=True, env=os.environ | {"OUT": "mine", "PYTHON": str(fake)})
    assert r.stdout.strip() == f"OUT={tmp_path / 'mine'}", r.stderr


def test_a_closed_pipe_ends_the_sweep_quietly(tmp_path):
    """Unclear case (issue 31): `bash run_all.sh smoke | head -1` ended in a BrokenPipeError
    traceback."""
    finished(tmp_path)  # done: the sweep only prints (skip lines, then the table)
    env = os.environ | SMOKE | {"OUT": str(tmp_path), "PYTHON": sys.executable}
    r = subprocess.run(["bash", "-c", "bash run_all.sh smoke | head -1"], cwd=ROOT, text=True,
                       capture_output=True, env=env, timeout=120)
    assert r.stdout.startswith("budgets on tiny-bert") and "Error" not in r.stderr, r.stderr


def test_a_report_that_crashes_after_the_runs_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    """The base model's first sweep ended in a figure's traceback (MPNet's matrix names): the runs
    were done, the exit and message said otherwise. Now: one line, the runs kept, exit 1."""
    import report

    def broken(out):
        raise ValueError("mpnet.encoder.layer.0.attention.attn.q: not an adapted matrix")
    monkeypatch.setattr(report, "main", broken)
    assert kept_handlers(lambda: sweep.report_step(str(tmp_path))) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the report failed (ValueError: mpnet" in err[0]
    assert "every run is kept" in err[0]
