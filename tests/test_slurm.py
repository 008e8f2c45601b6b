"""`run_all.sh --slurm` against a real single-node SLURM: munged, slurmctld and slurmd, started here
in a temp folder with a minimal slurm.conf for this host, and stopped by their PIDs. `.ci/run`
installs Debian's slurm-wlm and munge, so CI always runs it; without them (or without root, which
slurmd needs) the test is skipped, saying why. The bad-input cases use stand-in sbatch scripts and
need no SLURM."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from slurm import guard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBIN = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
SMOKE = {"TASKS": "sst2", "BUDGETS": "0.5", "METHODS": "lora fwlora", "PYTHON": sys.executable}
RUNS = [f"sst2_{m}_b0.5_s0" for m in SMOKE["METHODS"].split()]


def run_all(out, *args, env=None, **kw):
    env = os.environ | SMOKE | {"OUT": str(out)} | (env or {})
    return subprocess.run(["bash", "run_all.sh", "smoke", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_state(env) -> str:
    return subprocess.run(["sinfo", "-h", "-o", "%t"], env=os.environ | env, capture_output=True,
                          text=True).stdout.strip()


def controller_up(env) -> bool:
    ping = subprocess.run(["scontrol", "ping"], env=os.environ | env, capture_output=True,
                          text=True)
    return ping.stdout.count("UP") > 0


# What each daemon's start means, checked before the next one starts: a condition, not a sleep.
READY = {"munged": lambda d, env: lambda: (d / "munge.sock").exists(),
         "slurmctld": lambda d, env: lambda: controller_up(env),
         "slurmd": lambda d, env: lambda: node_state(env) == "idle"}


def wait_for(ready, what: str, d, deadline_s: float = 30):
    """Poll `ready()` until it holds or the deadline passes (then fail with the daemons' logs)."""
    deadline = time.time() + deadline_s
    while not ready():
        if time.time() > deadline:
            names = ("munged.log", "slurmctld.log", "slurmd.log")
            logs = "\n".join((d / f).read_text()[-800:] for f in names if (d / f).exists())
            pytest.fail(f"timed out waiting for {what}:\n{logs}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node cluster of this machine; yields the environment that points SLURM at it."""
    needed = ("munged", "slurmctld", "slurmd", "sbatch", "squeue")
    missing = [c for c in needed if not shutil.which(c, path=SBIN)]
    why = ""
    if missing:
        why = (f"SLURM is not installed (no {', '.join(missing)}): "
               "apt-get install slurm-wlm munge, as .ci/run does")
    elif os.geteuid() != 0:
        why = "slurmd must run as root to start jobs"
    if why:  # .ci/run sets REQUIRE_SLURM=1: there a missing SLURM is a failure, not a skip
        (pytest.fail if os.environ.get("REQUIRE_SLURM") else pytest.skip)(why)
    d = tmp_path_factory.mktemp("slurm")
    (d / "munge.key").write_bytes(os.urandom(1024))
    (d / "munge.key").chmod(0o400)
    # slurmd -C's first line: NodeName=<host> CPUs=... RealMemory=...
    node = subprocess.run([shutil.which("slurmd", path=SBIN), "-C"], capture_output=True, text=True,
                          check=True).stdout.splitlines()[0]
    host = node.split()[0].split("=")[1]
    (d / "slurm.conf").write_text(f"""ClusterName=fwlora-ci
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge.sock
CredType=cred/munge
StateSaveLocation={d}
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    env = {"SLURM_CONF": str(d / "slurm.conf")}
    # In the foreground (-D, --foreground), so each Popen's PID is the daemon's.
    munged = [f"--key-file={d}/munge.key", f"--socket={d}/munge.sock",
              f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log",
              f"--seed-file={d}/munge.seed", "--foreground", "--force"]
    commands = {"munged": munged, "slurmctld": ["-D", "-f", env["SLURM_CONF"]],
                "slurmd": ["-D", "-f", env["SLURM_CONF"], "-N", host]}
    daemons = []
    try:
        for name, args in commands.items():
            cmd = [shutil.which(name, path=SBIN), *args]
            log = open(d / f"{name}.out", "w")
            daemons.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                                            env=os.environ | env))
            # munged's socket, then the controller, then the node
            wait_for(READY[name](d, env), f"{name} to start", d)
        yield env
    finally:
        subprocess.run(["scancel", "--user=root"], env=os.environ | env, capture_output=True)
        for p in reversed(daemons):  # by PID: only the daemons started here
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def squeue(env, *args):
    """squeue's lines, without the header."""
    return subprocess.run(["squeue", "-h", *args], env=os.environ | env, capture_output=True,
                          text=True).stdout.splitlines()


def test_the_smoke_sweep_as_a_job_array_equals_the_local_sweep(slurm, tmp_path):
    # Meanwhile the local sweep, one run per core: one thread per run, as an array task has (1 CPU).
    cores = str(len(os.sched_getaffinity(0)))
    local_env = os.environ | SMOKE | {"OUT": str(tmp_path / "local"), "JOBS": cores}
    local = subprocess.Popen(["bash", "run_all.sh", "smoke"], cwd=ROOT, env=local_env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = tmp_path / "slurm"

    # A submission SLURM rejects: its message is shown, and no job and no job script are left.
    r = run_all(out, "--slurm", env=slurm | {"SBATCH_PARTITION": "nowhere"})
    assert r.returncode == 1 and "invalid partition" in r.stderr.lower(), r.stdout + r.stderr
    assert not (out / "slurm").exists() and not squeue(slurm)

    # Pass-through: sbatch's own SBATCH_TIMELIMIT, and SBATCH_ARGS after the profile's options.
    # Held, so that the checks below see them queued however fast the runs are; released after.
    passed = {"SLURM": "1", "SBATCH_TIMELIMIT": "20", "SBATCH_ARGS": "--comment=fwlora-ci --hold"}
    r = run_all(out, env=slurm | passed)
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = (out / "slurm" / "jobs").read_text().split()
    assert (len(jobs) == 2 and f"job array {jobs[0]}: 2 runs" in r.stdout
            and f"squeue -j {jobs[0]},{jobs[1]}" in r.stdout)
    # One task per run with the smoke profile's resources; the report job waits for the whole array.
    assert sorted(squeue(slurm, "-r", "-j", jobs[0], "-o", "%K %l %C %m %k")) == \
        [f"{i} 20:00 1 2G fwlora-ci" for i in range(2)]
    assert squeue(slurm, "-j", jobs[1], "-o", "%E") == [f"afterany:{jobs[0]}_*(unfulfilled)"]
    script = next((out / "slurm").glob("runs-*.sh")).read_text()
    assert (all(f">{out}/{n}.log 2>&1" in script for n in RUNS)
            and script.count(" train.py ") == len(RUNS))

    # While they are queued or running, a second submission or a local sweep on the folder is
    # refused, naming them.
    ids = ",".join(jobs)
    for args in (["--slurm"], []):
        r = run_all(out, *args, env=slurm)
        assert r.returncode == 1 and f"SLURM jobs {ids}" in r.stderr, r.stdout + r.stderr

    subprocess.run(["scontrol", "release", ids], env=os.environ | slurm, check=True)
    deadline = time.time() + 240
    while squeue(slurm, "-j", ids) and time.time() < deadline:
        time.sleep(1)
    assert not squeue(slurm, "-j", ids), "the array and report jobs did not finish in 240 s"
    report = next((out / "slurm").glob("*-report.out")).read_text()
    assert "2 finished runs" in report and "Failed runs" not in report, report
    table = (out / "table.md").read_text()
    assert all(f"| {m} |" in table for m in ("LoRA", "FW-LoRA")), table

    assert local.wait(timeout=240) == 0, local.stdout.read()
    for n in RUNS:  # the same train.py command gives the same metrics, epoch by epoch
        a, b = (json.load(open(tmp_path / f / f"{n}.json")) for f in ("slurm", "local"))
        assert a["epochs"] == b["epochs"]
        assert a["config"] | {"out_dir": ""} == b["config"] | {"out_dir": ""}

    # Submitting again: nothing is missing, so nothing is submitted.
    r = run_all(out, "--slurm", env=slurm)
    assert (r.returncode == 0 and "nothing to submit" in r.stdout
            and "table is complete" in r.stdout), r.stdout
    assert (out / "slurm" / "jobs").read_text().split() == jobs


def fake_slurm(tmp_path, sbatch):
    """A PATH whose sbatch is the given script; scancel records its arguments."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    (bin_ / "sbatch").write_text("#!/bin/bash\n" + sbatch)
    (bin_ / "scancel").write_text(f"#!/bin/bash\necho \"$@\" >>{tmp_path}/scancelled\n")
    for f in ("sbatch", "scancel"):
        (bin_ / f).chmod(0o755)
    return {"PATH": f"{bin_}:{os.environ['PATH']}"}


def test_slurm_bad_input(tmp_path):
    # No sbatch: a clear error before any work (the PATH holds only what run_all.sh needs that far).
    (tmp_path / "nobin").mkdir()
    os.symlink(shutil.which("dirname"), tmp_path / "nobin" / "dirname")
    bare = {"PATH": str(tmp_path / "nobin"), "PYTHON": sys.executable}
    r = subprocess.run([shutil.which("bash"), "run_all.sh", "smoke", "--slurm"], cwd=ROOT,
                       capture_output=True, text=True, env=bare)
    assert (r.returncode == 2 and "needs SLURM" in r.stderr
            and "sbatch is not on PATH" in r.stderr), r.stderr
    r = subprocess.run(["bash", "run_all.sh", "--slurm"], cwd=ROOT, capture_output=True, text=True,
                       env=os.environ | fake_slurm(tmp_path, "exit 0") | {"PYTHON": sys.executable})
    # Without a profile: refused, as auto would read this machine's GPU.
    assert r.returncode == 2 and "name the profile" in r.stderr, r.stderr

    # The array is accepted, the report job refused: the array is cancelled and nothing is left.
    sbatch = ('case "$*" in *--array*) echo "77;cluster" ;; '
              '*) echo "sbatch: error: QOSMaxSubmitJobPerUserLimit" >&2; exit 1 ;; esac\n')
    r = run_all(tmp_path / "b", "--slurm", env=fake_slurm(tmp_path, sbatch) | {"METHODS": "lora"})
    assert r.returncode == 1 and "QOSMaxSubmitJobPerUserLimit" in r.stderr, r.stdout + r.stderr
    assert (tmp_path / "scancelled").read_text().split() == ["77"]
    assert not (tmp_path / "b" / "slurm").exists()


def test_job_scripts_quote_out_and_append_to_logs(tmp_path):
    """Bad cases 3 and 11: an OUT with spaces works in the job scripts, and an array task appends to
    its run's log, so a task that train.py refuses (its run finished meanwhile) never cuts the
    finished run's log."""
    out = tmp_path / "an OUT with spaces"
    r = run_all(out, "--slurm", env=fake_slurm(tmp_path, "echo 5\n") | {"METHODS": "lora"})
    assert r.returncode == 0, r.stdout + r.stderr
    (script,) = (out / "slurm").glob("runs-*.sh")
    log = out / "sst2_lora_b0.5_s0.log"
    # appended to, and quoted (the real SLURM test runs such tasks)
    assert f">>'{log}' 2>&1" in script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def fake_squeue(tmp_path, monkeypatch, script):
    (tmp_path / "bin").mkdir(exist_ok=True)
    (tmp_path / "bin" / "squeue").write_text("#!/bin/bash\n" + script)
    (tmp_path / "bin" / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    (tmp_path / "slurm").mkdir(exist_ok=True)
    (tmp_path / "slurm" / "jobs").write_text("41\n42\n")


def test_slurm_guard_fails_closed(tmp_path, monkeypatch, capsys):
    """Bad case 11: an unreachable controller stops the sweep (SLURM_GUARD=off overrides)."""
    unreachable = 'echo "slurm_load_jobs error: Unable to contact slurm controller" >&2; exit 1'
    fake_squeue(tmp_path, monkeypatch, unreachable)
    with pytest.raises(SystemExit) as e:
        guard(str(tmp_path), {})
    assert e.value.code == 1
    assert "squeue cannot say whether they still run" in capsys.readouterr().err
    guard(str(tmp_path), {"SLURM_GUARD": "off"})  # the user's override
    fake_squeue(tmp_path, monkeypatch, 'echo 42; echo 99')
    with pytest.raises(SystemExit):
        guard(str(tmp_path), {})
    assert "SLURM jobs 42, submitted earlier" in capsys.readouterr().err
    fake_squeue(tmp_path, monkeypatch, 'echo 99')
    guard(str(tmp_path), {})  # ours have ended
