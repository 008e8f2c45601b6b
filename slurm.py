"""The sweep on a SLURM cluster: its runs as one job array, then one job for timing and report.

    bash run_all.sh paper --slurm      # or SLURM=1; sweep.py plans the runs, this file submits them

It imports nothing of the project: sweep.py hands it each run's name and train.py arguments.
Job scripts are written to OUT/slurm/ (for reading) and the submitted job ids to OUT/slurm/jobs,
which `guard` reads, so that a second submission, or a local sweep, never races jobs still queued
or running for the same folder.
"""
import os
import shlex
import shutil
import subprocess
import sys
import time


def refuse(msg: str, code: int) -> None:
    """Stop before any work, saying what to do (exit 2: bad input, 1: a failure), like sweep.py."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def guard(out: str, env: dict) -> None:
    """Jobs of an earlier --slurm submission, still queued or running, own OUT's missing runs.
    If squeue cannot answer, refuse (fail closed) unless SLURM_GUARD=off."""
    path = os.path.join(out, "slurm", "jobs")
    jobs = open(path).read().split() if os.path.exists(path) else []
    if not jobs or env.get("SLURM_GUARD") == "off" or not shutil.which("squeue"):
        return  # nothing submitted, the user's override, or no SLURM here to ask
    r = subprocess.run(["squeue", "-h", "--me", "-o", "%F"], capture_output=True, text=True)
    if r.returncode:
        why = r.stderr.strip() or r.returncode
        refuse(f"{path} lists SLURM jobs {','.join(jobs)}, and squeue cannot say whether they "
               f"still run ({why}): try again when it answers, or set SLURM_GUARD=off if you know "
               "they have ended", 1)
    busy = [j for j in jobs if j in r.stdout.split()]
    if busy:
        refuse(f"SLURM jobs {','.join(busy)}, submitted earlier for {out}, are still queued or "
               f"running: wait for them (squeue -j {','.join(busy)}) or cancel them "
               f"(scancel {' '.join(busy)}), then run this again", 1)


def job_scripts(out: str, runs: list, timing: list) -> dict[str, str]:
    """{"runs": the array's script (task i runs the i-th train.py command), "end": the timing, then
    the report}. Every command appends to its run's log, so that a task which train.py refuses never
    cuts a finished run's log."""
    py = shlex.quote(sys.executable)
    head = "#!/bin/bash\nexport OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} PYTHONUNBUFFERED=1\n"

    def log(name):
        return shlex.quote(os.path.join(out, name + ".log"))
    cases = [f"  {i}) exec {py} train.py {shlex.join(a)} >>{log(n)} 2>&1 ;;\n"
             for i, (n, a) in enumerate(runs)]
    benches = [f"{py} bench.py {shlex.join(a)} >>{shlex.quote(path)} 2>&1\n" for path, a in timing]
    return {"runs": head + "case $SLURM_ARRAY_TASK_ID in\n" + "".join(cases) + "esac\n",
            "end": head + "".join(benches) + f"exec {py} report.py {shlex.quote(out)}\n"}


def submit(out: str, profile: str, runs: list, timing: list, env: dict) -> int:
    """runs: [(name, train.py args)] still to do; timing: [(log path, bench.py args)]. Submits the
    array, then the end job after it; a refusal by SLURM cancels what was submitted and leaves no
    script behind (exit 1)."""
    if not runs and not timing:
        print(f"nothing to submit: every run of this sweep has its result in {out}, so the table "
              f"is complete ({sys.executable} report.py {out} prints it)")
        return 0
    d, stamp = os.path.join(out, "slurm"), time.strftime("%Y%m%d-%H%M%S")
    os.makedirs(d, exist_ok=True)
    paths = {}
    for kind, text in job_scripts(out, runs, timing).items():
        paths[kind] = os.path.join(d, f"{kind}-{stamp}.sh")
        with open(paths[kind], "w") as f:
            f.write(text)
    array = None

    def sbatch(path, *opts):
        extra = shlex.split(env.get("SBATCH_ARGS", ""))
        r = subprocess.run(["sbatch", "--parsable", f"--chdir={os.getcwd()}", *opts, *extra, path],
                           capture_output=True, text=True)
        if r.returncode:
            why = r.stderr.strip().replace("\n", "\n  ")
            print(f"error: SLURM refused the submission of {path}:\n  {why}", file=sys.stderr)
            if array:
                subprocess.run(["scancel", array])
            for p in paths.values():
                os.remove(p)
            if not os.listdir(d):
                os.rmdir(d)
            sys.exit(1)
        return r.stdout.strip().split(";")[0]  # --parsable: id[;cluster]
    if runs:
        array = sbatch(paths["runs"], f"--job-name=fwlora-{profile}", f"--array=0-{len(runs) - 1}",
                       f"--output={d}/%A_%a.out", *shlex.split(env.get("SLURM_RUN", "")))
    after = [f"--dependency=afterany:{array}"] if array else []
    end_opts = env.get("SLURM_END", "") if timing else "--mem=2G"
    end = sbatch(paths["end"], f"--job-name=fwlora-{profile}-report", f"--output={d}/%j-report.out",
                 *after, *shlex.split(end_opts))
    ids = [j for j in (array, end) if j]
    with open(os.path.join(d, "jobs"), "a") as f:
        f.write("".join(f"{j}\n" for j in ids))
    if array:
        print(f"submitted job array {array}: {len(runs)} runs, one per task ({paths['runs']})")
    print(f"submitted job {end}: {'side-by-side timing, then ' if timing else ''}the report"
          + (", after the array ends" if array else ""))
    print(f"watch: squeue -j {','.join(ids)}   logs: {out}/<run>.log   "
          f"table: {out}/table.md, written by job {end}")
    print(f"stop:  scancel {' '.join(ids)}; the same command submits again what is missing")
    return 0
