"""The sweep: which runs to make and where they run. `bash run_all.sh PROFILE` sets the profile, then runs this.

The profile (MODEL, DEF_SEEDS, DEF_BUDGETS, SST2_ARGS, COLA_ARGS, DEF_TIMED, SLURM_RUN, SLURM_END) and the user's
narrowing (TASKS, BUDGETS, SEEDS, METHODS, TIMED, OUT, JOBS, RUNS_PER_GPU) come from the environment; train.py
`--field=value` overrides and `--slurm` from the arguments. Before any work: every value and run config checked,
the models and data loaded once, distinct ranks for the budgets, and a resume that reuses only results of exactly
the run it would make. Then the runs go to local slots, or to SLURM as one job array and a report job.

Local runs are processes forked from one server that imported torch, transformers and train.py once
(multiprocessing's forkserver): no import time per run, and a crash in one run loses nothing of another. Each
writes OUT/<run>.log; the console gets a line as a run starts and as it ends. Runs die with the sweep
(PR_SET_PDEATHSIG), kill -9 included. One sweep per OUT (fcntl.flock).
"""
import ctypes
import dataclasses
import fcntl
import importlib
import itertools
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import torch

from data import RANDOM_MODELS, TASKS, load_glue, load_model
from lora import count_base_params, rank_for_budget, target_names
from fisher import WEIGHTING
from record import IGNORED, METHODS, parse_args, precision_of, read_result, run_name, write_json
from train import Config, check_config, resolve_precision

SWEEP_SETS = {"task": "TASKS", "method": "METHODS", "budget": "BUDGETS", "seed": "SEEDS", "out_dir": "OUT"}


def fail(msg: str, code: int = 2):
    """Refuse, before any work, saying what to do."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def axis(env: dict, key: str, default: str = "") -> list[str]:
    """A sweep axis: the user's KEY, else the profile's DEF_KEY, else `default`; [""] means "not swept"."""
    return (env.get(key) or env.get("DEF_" + key) or default).split() or [""]


def positive(env: dict, key: str, default: int) -> int:
    v = env.get(key) or str(default)
    return int(v) if v.isdigit() and int(v) > 0 else fail(f"{key} must be a positive whole number, got {v!r}")


@dataclasses.dataclass
class Sweep:
    profile: str
    out: str
    runs: list       # [(run name, train.py arguments)], in the order they run: LoRA first in each group
    timed: list      # methods timed side by side at the end
    task_args: dict  # task -> the arguments its runs share (profile, then the user's overrides)
    slurm: bool
    method_args: dict = dataclasses.field(default_factory=dict)  # (task, method) -> its own values (tuned lr)


def settings(argv: list[str], env: dict) -> Sweep:
    """The sweep from the environment and arguments, every value checked (exit 2 on bad input)."""
    slurm, overrides = env.get("SLURM") == "1" or "--slurm" in argv, [a for a in argv if a != "--slurm"]
    if slurm and not shutil.which("sbatch"):
        fail("--slurm needs SLURM, and sbatch is not on PATH: run this on the cluster's login node (or load its "
             "slurm module), or drop --slurm to run here")
    if slurm and env.get("PROFILE") == "auto":
        fail("with --slurm, name the profile first (bash run_all.sh paper --slurm): this machine's GPU says "
             "nothing about the compute nodes'")
    for a in overrides:
        if a.removeprefix("--").split("=")[0] in SWEEP_SETS:
            fail(f"{a}: the sweep sets this itself; use {SWEEP_SETS[a.removeprefix('--').split('=')[0]]}=... instead")
    try:
        parse_args(overrides, Config)  # each is a Config field with a value of its type
    except SystemExit as e:
        fail(str(e))
    tasks, methods = (env.get("TASKS") or "sst2 cola").split(), (env.get("METHODS") or env.get("DEF_METHODS") or
                                                                 "all").split()
    methods = list(METHODS) if methods == ["all"] else methods
    timed = env.get("TIMED", env.get("DEF_TIMED", "")).replace(",", " ").split()
    for what, names, known in (("TASKS", tasks, TASKS), ("METHODS", methods, METHODS), ("TIMED", timed, METHODS)):
        bad = [n for n in names if n not in known]
        if bad or not names and what != "TIMED":
            fail(f"{what}: unknown {', '.join(map(repr, bad)) or 'empty list'}; choose from {', '.join(known)}")
    out = env.get("OUT") or env.get("DEF_OUT") or os.path.join("results", env.get("PROFILE", "cpu"))
    try:
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, f".write-check{os.getpid()}"), "w").close()
        os.remove(os.path.join(out, f".write-check{os.getpid()}"))
    except OSError as e:
        fail(f"OUT={out} is read-only or not writable here ({e.strerror}): choose another OUT")
    given, task_args, runs, method_args = {a.split("=")[0] for a in overrides}, {}, {}, {}
    for key, flag in (("LRS", "--lr"), ("LAMBDAS", "--fw_lambda")):
        if env.get(key) and flag in given:
            fail(f"{key} and {flag} are both given: use one of them")
    for task in tasks:
        profile = f"--model={env.get('MODEL', 'minilm')} {env.get(task.upper() + '_ARGS', '')}".split()
        task_args[task] = [a for a in profile if a.split("=")[0] not in given] + overrides + [f"--task={task}"]
        for budget, seed, lr, m in itertools.product(axis(env, "BUDGETS", "0.2"), axis(env, "SEEDS", "0"),
                                                     axis(env, "LRS"), methods):
            for lam in axis(env, "LAMBDAS") if m in WEIGHTING else [""]:  # λ: the penalised methods' axis
                # A method's own (tuned) values; the user's overrides and the swept axes win over them.
                own = method_args[(task, m)] = [a for a in env.get(f"{task.upper()}_{m.upper()}_ARGS", "").split()
                                                if a.split("=")[0] not in given]
                swept = {k for k, v in (("--lr", lr), ("--fw_lambda", lam)) if v}
                own = [a for a in own if a.split("=")[0] not in swept]
                drop = swept | {a.split("=")[0] for a in own}
                args = [a for a in task_args[task] if a.split("=")[0] not in drop] + own \
                    + [f"--lr={lr}"] * bool(lr) + [f"--fw_lambda={lam}"] * bool(lam) \
                    + [f"--out_dir={out}", f"--method={m}", f"--budget={budget}", f"--seed={seed}"]
                try:
                    cfg = parse_args(args, Config)
                    check_config(cfg)
                except (SystemExit, ValueError, FileNotFoundError) as e:
                    fail(f"{' '.join(args)}: {e}")
                if run_name(cfg) in runs:  # e.g. BUDGETS="0.1 0.10": one run, written twice at once
                    fail(f"{' '.join(runs[run_name(cfg)][-2:])} and {' '.join(args[-2:])} are the same run "
                         f"{run_name(cfg)}: list each value once")
                runs[run_name(cfg)] = args
    return Sweep(env.get("PROFILE", ""), out, list(runs.items()), timed, task_args, slurm, method_args)


def plan(s: Sweep) -> list[tuple[str, str, list]]:
    """[(state, name, args)]: 'done' where OUT holds a finished result of exactly this config (made on this kind
    of device), else 'todo'. A corrupt or incomplete result is moved to NAME.corrupt and redone; one made with
    another config stops the sweep before any work."""
    out, clash, kind = [], [], "cuda" if torch.cuda.is_available() else "cpu"
    for name, args in s.runs:
        cfg, path = parse_args(args, Config), os.path.join(s.out, name + ".json")
        r = read_result(path) if os.path.exists(path) else None
        if os.path.exists(path) and (r is None or r["status"] != "ok"):
            os.replace(path, os.path.join(s.out, name + ".corrupt"))
            print(f"warning: {path} is not a finished result: moved to {name}.corrupt, the run is redone",
                  file=sys.stderr)
        elif r:
            diff = [f"{k} {r['config'].get(k, '(absent)')!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
                    if k not in IGNORED + ("precision",) and r["config"].get(k, "(absent)") != v]
            made_on = str(r["environment"].get("device", "unknown")).split(":")[0]
            now = kind if cfg.device == "auto" else cfg.device
            if made_on != now:
                diff.append(f"device {made_on} -> {now}")
            made_in, now_in = precision_of(r), resolve_precision(cfg.precision, now)[0]  # resolved, not as asked
            if made_in != now_in:
                diff.append(f"precision {made_in} -> {now_in} (--precision={made_in} continues it)")
            if diff:
                clash.append(f"  {name}.json: " + ", ".join(diff))
        out.append(("done" if r else "todo", name, args))
    if clash:
        fail(f"{s.out} holds results made with another configuration (field: there -> now):\n" + "\n".join(clash[:8])
             + (f"\n  ... and {len(clash) - 8} more" if len(clash) > 8 else "") + "\nNothing was run. Use another "
             f"folder (OUT=...) for this configuration, or move those results out of {s.out} to redo them.")
    return out


def preflight(s: Sweep, todo: list) -> None:
    """Every model and data set the runs to do need, loaded once; budgets that land on one rank refused."""
    cfgs = [parse_args(a, Config) for _, _, a in todo] or [parse_args(a, Config) for _, a in s.runs]
    try:
        for model in sorted({c.model for c in cfgs}):
            with torch.device("meta" if model in RANDOM_MODELS else "cpu"):  # a random model: its shapes only
                m = load_model(model)[0]
            shapes, ranks = [tuple(m.get_submodule(n).weight.shape) for n in target_names(m)], {}
            for b in sorted({c.budget for c in cfgs}):
                ranks.setdefault(rank_for_budget(b, count_base_params(m), shapes), []).append(b)
            print(f"budgets on {model}: " + ", ".join(f"{b:g}% -> rank {r}" for r, bs in ranks.items() for b in bs))
            for bs in (bs for bs in ranks.values() if len(bs) > 1):
                fail(f"budgets {' and '.join(f'{b:g}%' for b in bs)} give the same rank on {model}, so their runs "
                     "would repeat each other: keep one of them in BUDGETS")
        for task, glue_dir in sorted({(c.task, c.glue_dir) for c in cfgs}):
            load_glue(task, glue_dir)
    except (OSError, ValueError, RuntimeError) as e:
        fail(f"{e}\nNothing was run.")


def lock(out: str):
    """One sweep per folder: the kernel's lock, dropped when the sweep dies (kill -9 too). Keep the file open."""
    f, pid_file = open(os.path.join(out, ".lock"), "a"), os.path.join(out, ".lock.pid")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = open(pid_file).read().strip() if os.path.exists(pid_file) else "?"
        fail(f"another sweep (pid {pid}) is running on {out}; wait for it, stop it, or use another OUT", 1)
    with open(pid_file, "w") as p:
        p.write(f"{os.getpid()}\n")
    return f


def slurm_guard(out: str, env: dict) -> None:
    """Jobs of an earlier --slurm submission still queued or running own OUT's missing runs. If squeue cannot
    answer, refuse (fail closed) unless SLURM_GUARD=off."""
    path = os.path.join(out, "slurm", "jobs")
    jobs = open(path).read().split() if os.path.exists(path) else []
    if not jobs or env.get("SLURM_GUARD") == "off" or not shutil.which("squeue"):  # no SLURM here: nothing to ask
        return
    r = subprocess.run(["squeue", "-h", "--me", "-o", "%F"], capture_output=True, text=True)
    if r.returncode:
        fail(f"{path} lists SLURM jobs {','.join(jobs)}, and squeue cannot say whether they still run "
             f"({r.stderr.strip() or r.returncode}): try again when it answers, or set SLURM_GUARD=off if you know "
             "they have ended", 1)
    busy = [j for j in jobs if j in r.stdout.split()]
    if busy:
        fail(f"SLURM jobs {','.join(busy)}, submitted earlier for {out}, are still queued or running: wait for them "
             f"(squeue -j {','.join(busy)}) or cancel them (scancel {' '.join(busy)}), then run this again", 1)


def timing(s: Sweep) -> list[tuple[str, list]]:
    """Side-by-side timing still to do: per task, whole runs of the first budget and seed in one process (bench.py
    runs). The method order rotates from task to task, so no method always goes first."""
    todo = []
    for i, task in enumerate(s.task_args if s.timed else ()):
        if any(f.startswith(f"bench_runs_{task}_") and f.endswith(".json") for f in os.listdir(s.out)):
            print(f"skip side-by-side timing of {task} (done)")
            continue
        order = s.timed[i % len(s.timed):] + s.timed[:i % len(s.timed)]
        order = [m + "".join(f":{a[2:]}" for a in s.method_args.get((task, m), [])) for m in order]  # adalora:lr=…
        todo.append((task, ["runs", f"--methods={','.join(order)}", *s.task_args[task], f"--out_dir={s.out}",
                            *s.runs[0][1][-2:]]))
    return todo


@dataclasses.dataclass
class Slot:
    threads: int
    gpu: str | None = None


def slots(env: dict, on_gpu: bool) -> list[Slot]:
    """CPU: JOBS runs at once (default one per core), the cores shared out as threads. GPU: RUNS_PER_GPU runs on
    each GPU the scheduler handed out (the inherited CUDA_VISIBLE_DEVICES), else on each visible GPU."""
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    jobs, per = positive(env, "JOBS", ncpu), positive(env, "RUNS_PER_GPU", 1)
    if not on_gpu:
        return [Slot(max(1, ncpu // jobs)) for _ in range(jobs)]
    listed = env.get("CUDA_VISIBLE_DEVICES")
    gpus = [g for g in listed.split(",") if g.strip()] if listed is not None else \
        [str(i) for i in range(torch.cuda.device_count())]
    return [Slot(max(1, ncpu // (len(gpus) * per)), g) for g in gpus for _ in range(per)] or \
        fail("the runs ask for CUDA (--device=cuda), but no GPU is visible here", 1)


def worker(entry: str, argv: list, log: str, slot: Slot) -> None:
    """One run, forked from the import server: it dies with the sweep, writes its own log, uses its slot's threads
    and GPU, and exits with train.py's (or bench.py's) exit code."""
    # The server ends when no one holds its "alive" pipe: the sweep, and (unless they close it) its runs. Closed
    # here, the server ends with the sweep, and PR_SET_PDEATHSIG sends this run SIGTERM then, kill -9 included.
    os.close(multiprocessing.forkserver._forkserver._forkserver_alive_fd)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    if slot.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot.gpu  # before CUDA starts in this process
    os.environ["OMP_NUM_THREADS"] = str(slot.threads)
    torch.set_num_threads(slot.threads)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # append: a finished run's log is never cut
    os.dup2(fd, 1), os.dup2(fd, 2)
    sys.stdout.reconfigure(line_buffering=True)
    for sig in (signal.SIGINT, signal.SIGTERM):  # the server ignores Ctrl-C; a run stops on both, saying so
        signal.signal(sig, signal.default_int_handler)
    sys.exit(importlib.import_module(entry).main(argv))


STOP = []  # set by Ctrl-C, SIGTERM or SIGHUP; acted on between process starts, never in the middle of one


def stop(*_):
    STOP.append(1)


def run_local(s: Sweep, todo: list, jobs: list[Slot]) -> list[str]:
    """The runs to do on the slots, then the timing; returns what failed. Stopped: every run records its
    .error.json (SIGTERM), and the sweep exits 130."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["train", "bench", "transformers.models.bert.modeling_bert",
                                "transformers.models.roberta.modeling_roberta",
                                "transformers.models.mpnet.modeling_mpnet"])
    free, running, failed, took, t_start, k = list(jobs), {}, [], [], time.time(), 0

    def start(entry, args, name, slot, k):
        p = ctx.Process(target=worker, args=(entry, args, os.path.join(s.out, name + ".log"), slot))
        p.start()
        running[p.sentinel] = (p, slot, name, k, time.time(), args)

    def reap():  # wakes at least twice a second to see a stop
        for sentinel in multiprocessing.connection.wait(list(running), timeout=0.5):
            p, slot, name, k, t0, args = running.pop(sentinel)
            p.join()
            free.append(slot)
            if k == 0:  # the timing step
                failed.extend([f"{name} (see {s.out}/{name}.log)"] * bool(p.exitcode))
                continue
            took.append(time.time() - t0)
            left = (len(todo) - k + len(running)) * sum(took) / len(took) / len(jobs) / 60
            r = read_result(os.path.join(s.out, name + ".json"), warn=False) if p.exitcode == 0 else None
            if r:
                print(f"[{k}/{len(todo)}] {name}: {r['metric']} {r['final']:.4f}, {took[-1]:.1f} s; "
                      f"about {left:.0f} min left")
                continue
            if STOP or p.exitcode == 130:  # Ctrl-C reaches the runs too: stopped, not failed
                print(f"[{k}/{len(todo)}] {name} stopped")
                continue
            failed.append(name)
            err = os.path.join(s.out, name + ".error.json")
            if p.exitcode < 0 and not os.path.exists(err):  # killed: the run could not say so itself
                write_json(err, {"config": dict(a[2:].split("=", 1) for a in args), "status": "error",
                                 "error": f"killed by signal {-p.exitcode}", "epochs": []})
            print(f"[{k}/{len(todo)}] {name} FAILED (exit {p.exitcode}): see {s.out}/{name}.log")

    while (k < len(todo) or running) and not STOP:
        if free and k < len(todo):
            k, slot = k + 1, free.pop(0)
            start("train", todo[k - 1][2], todo[k - 1][1], slot, k)
            print(f"[{k}/{len(todo)}] {todo[k - 1][1]} started" + f" on GPU {slot.gpu}" * (slot.gpu is not None))
        else:
            reap()
    if not STOP:
        print(f"sweep finished in {(time.time() - t_start) / 60:.0f} min ({len(jobs)} at a time)")
    for task, args in timing(s) if not STOP else ():  # alone on the machine: one process, every thread
        print(f"side-by-side timing of {task}: {args[1].split('=', 1)[1]}")
        start("bench", args, f"bench_runs_{task}", Slot(sum(j.threads for j in jobs), jobs[0].gpu), 0)
        while running and not STOP:
            reap()
    if STOP:
        for p, *_ in running.values():
            p.terminate()  # SIGTERM: each run records its .error.json and stops
        for p, *_ in running.values():
            p.join(30)
        print("\ninterrupted: finished runs are kept; run the same command again to resume")
        sys.exit(130)
    return failed


def submit_slurm(s: Sweep, todo: list, timing_todo: list, env: dict) -> int:
    """The runs to do as one SLURM job array (task i: the i-th run's train.py command, as the local sweep's), then
    one job after it for the timing and the report. Job scripts are written to OUT/slurm/ for reading."""
    if not todo and not timing_todo:
        print(f"nothing to submit: every run of this sweep has its result in {s.out}, so the table is complete "
              f"({sys.executable} report.py {s.out} prints it)")
        return 0
    d, stamp, py, env = os.path.join(s.out, "slurm"), time.strftime("%Y%m%d-%H%M%S"), shlex.quote(sys.executable), env
    os.makedirs(d, exist_ok=True)
    head = "#!/bin/bash\nexport OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} PYTHONUNBUFFERED=1\n"
    log = lambda name: shlex.quote(os.path.join(s.out, name + ".log"))  # appended to: never cuts a finished run's
    scripts = {"runs": head + "case $SLURM_ARRAY_TASK_ID in\n" + "".join(
        f"  {i}) exec {py} train.py {shlex.join(a)} >>{log(n)} 2>&1 ;;\n" for i, (_, n, a) in enumerate(todo)) + "esac\n",
        "end": head + "".join(f"{py} bench.py {shlex.join(a)} >>{log('bench_runs_' + t)} 2>&1\n" for t, a in timing_todo)
        + f"exec {py} report.py {shlex.quote(s.out)}\n"}
    paths = {k: os.path.join(d, f"{k}-{stamp}.sh") for k in scripts}
    for k, text in scripts.items():
        with open(paths[k], "w") as f:
            f.write(text)

    def sbatch(path, *opts):
        r = subprocess.run(["sbatch", "--parsable", f"--chdir={os.getcwd()}", *opts,
                            *shlex.split(env.get("SBATCH_ARGS", "")), path], capture_output=True, text=True)
        if r.returncode:
            print(f"error: SLURM refused the submission of {path}:\n  " + r.stderr.strip().replace("\n", "\n  "),
                  file=sys.stderr)
            subprocess.run(["scancel", array]) if array else None
            for p in paths.values():
                os.remove(p)
            os.rmdir(d) if not os.listdir(d) else None
            sys.exit(1)
        return r.stdout.strip().split(";")[0]  # --parsable: id[;cluster]
    array = None
    if todo:
        array = sbatch(paths["runs"], f"--job-name=fwlora-{s.profile}", f"--array=0-{len(todo) - 1}",
                       f"--output={d}/%A_%a.out", *shlex.split(env.get("SLURM_RUN", "")))
    end = sbatch(paths["end"], f"--job-name=fwlora-{s.profile}-report", f"--output={d}/%j-report.out",
                 *[f"--dependency=afterany:{array}"] * bool(array),
                 *shlex.split(env.get("SLURM_END", "") if timing_todo else "--mem=2G"))
    with open(os.path.join(d, "jobs"), "a") as f:
        f.write("".join(f"{j}\n" for j in (array, end) if j))
    ids = ",".join(j for j in (array, end) if j)
    if array:
        print(f"submitted job array {array}: {len(todo)} runs, one per task ({paths['runs']})")
    print(f"submitted job {end}: {'side-by-side timing, then ' * bool(timing_todo)}the report"
          + ", after the array ends" * bool(array))
    print(f"watch: squeue -j {ids}   logs: {s.out}/<run>.log   table: {s.out}/table.md, written by job {end}")
    print(f"stop:  scancel {ids.replace(',', ' ')}; the same command submits again what is missing")
    return 0


def main(argv: list[str], env: dict | None = None) -> int:
    env = dict(os.environ if env is None else env)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # set here, so a sweep started with & stops too
        signal.signal(sig, stop)
    s = settings(argv, env)
    held = lock(s.out)  # noqa: F841  (held until the sweep exits)
    slurm_guard(s.out, env)
    steps = plan(s)
    todo = [x for x in steps if x[0] == "todo"]
    preflight(s, todo)
    redo = " and ".join(a for a in argv if a in ("--overwrite=true", "--save_adapters=true"))
    for _, name, _ in (x for x in steps if x[0] == "done"):
        print(f"skip {name} (done)" + f"; {redo} does not redo a finished run: move its result out of OUT" * bool(redo))
    if s.slurm:
        return submit_slurm(s, todo, timing(s), env)
    failed = run_local(s, todo, slots(env, any(parse_args(a, Config).device == "cuda" for _, _, a in todo)))
    if failed:
        print(f"failed ({len(failed)}): {', '.join(failed)}")
    import report
    try:
        report.main(s.out)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
