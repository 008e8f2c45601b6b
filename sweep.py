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
import glob
import importlib
import itertools
import json
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import shutil
import signal
import sys
import threading
import time

import torch
import tqdm

import slurm
from data import RANDOM_MODELS, TASKS, load_glue, load_model, provenance
from lora import count_base_params, rank_for_budget, target_names
from fisher import WEIGHTING
from record import (IGNORED, METHODS, check_writable, differ, parse_args, precision_of, read_result,
                    resolved, run_name, timing_file, write_file, write_json)
from train import Config, check_config, resolve_precision

SWEEP_SETS = {"task": "TASKS", "method": "METHODS", "budget": "BUDGETS", "seed": "SEEDS", "out_dir": "OUT"}


def fail(msg: str, code: int = 2):
    """Refuse, before any work, saying what to do."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def axis(env: dict, key: str, default: str = "") -> list[str]:
    """A sweep axis: the user's KEY, else the profile's DEF_KEY, else `default`; [""] means "not swept"."""
    return (env.get(key) or env.get("DEF_" + key) or default).split() or [""]


def not_swept(what: str, args: list[str]) -> list[str]:
    """train.py arguments from `what` (the command line, <TASK>_ARGS, <TASK>_<METHOD>_ARGS), refused
    if they set a field the sweep sets (SST2_LORA_ARGS="--task=cola" would move a run's task)."""
    for a in args:
        field = a.removeprefix("--").split("=")[0]
        if field in SWEEP_SETS:
            fail(f"{what}: {a}: the sweep sets this itself; use {SWEEP_SETS[field]}=... instead")
    return args


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
    on_slurm = env.get("SLURM") == "1" or "--slurm" in argv
    overrides = [a for a in argv if a != "--slurm"]
    if on_slurm and not shutil.which("sbatch"):
        fail("--slurm needs SLURM, and sbatch is not on PATH: run this on the cluster's login node (or load its "
             "slurm module), or drop --slurm to run here")
    if on_slurm and env.get("PROFILE") == "auto":
        fail("with --slurm, name the profile first (bash run_all.sh paper --slurm): this machine's GPU says "
             "nothing about the compute nodes'")
    not_swept("the command line", overrides)
    try:
        parse_args(overrides, Config)  # each is a Config field with a value of its type
    except SystemExit as e:
        if e.code:  # --help printed the fields: exit 0
            fail(str(e))
        raise
    tasks, methods = (env.get("TASKS") or "sst2 cola").split(), (env.get("METHODS") or env.get("DEF_METHODS") or
                                                                 "all").split()
    methods = list(METHODS) if methods == ["all"] else methods
    timed = env.get("TIMED", env.get("DEF_TIMED", "")).replace(",", " ").split()
    for what, names, known in (("TASKS", tasks, TASKS), ("METHODS", methods, METHODS), ("TIMED", timed, METHODS)):
        bad = [n for n in names if n not in known]
        if bad or not names and what != "TIMED":
            fail(f"{what}: unknown {', '.join(map(repr, bad)) or 'empty list'}; choose from {', '.join(known)}")
    if timed and "lora" not in timed:
        fail(f"TIMED={','.join(timed)}: the timing gives each method as a ratio to LoRA's, so it "
             f"needs lora: TIMED=lora,{','.join(timed)} (or TIMED= for none)")
    out = env.get("OUT") or env.get("DEF_OUT") or os.path.join("results", env.get("PROFILE", "cpu"))
    try:
        check_writable(out)  # 1 MiB written: a full disk fails here, not after the first run
    except OSError as e:
        fail(f"OUT={out} is read-only or not writable here ({e.strerror}): choose another OUT, or "
             "free space there")
    given, task_args, runs, method_args = {a.split("=")[0] for a in overrides}, {}, {}, {}
    for key, flag in (("LRS", "--lr"), ("LAMBDAS", "--fw_lambda")):
        if env.get(key) and flag in given:
            fail(f"{key} and {flag} are both given: use one of them")
    for task in tasks:
        key = f"{task.upper()}_ARGS"
        model = f"--model={env.get('MODEL', 'minilm')}"
        profile = [model] + not_swept(key, env.get(key, "").split())
        task_args[task] = [a for a in profile if a.split("=")[0] not in given] + overrides + [f"--task={task}"]
        for budget, seed, lr, m in itertools.product(axis(env, "BUDGETS", "0.2"), axis(env, "SEEDS", "0"),
                                                     axis(env, "LRS"), methods):
            for lam in axis(env, "LAMBDAS") if m in WEIGHTING else [""]:  # λ: the penalised methods' axis
                # A method's own (tuned) values; the user's overrides and the swept axes win over them.
                key = f"{task.upper()}_{m.upper()}_ARGS"
                own = method_args[(task, m)] = [a for a in not_swept(key, env.get(key, "").split())
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
                    fail(same_run(runs[run_name(cfg)], args, run_name(cfg)))
                runs[run_name(cfg)] = args
    return Sweep(env.get("PROFILE", ""), out, list(runs.items()), timed, task_args, on_slurm,
                 method_args)


def same_run(first: list[str], then: list[str], name: str) -> str:
    """What makes two argument lists one run: the values that differ, or one value listed twice."""
    a, b = [x for x in first if x not in then], [x for x in then if x not in first]
    if not (a or b):
        return f"{' '.join(then[-3:])} is listed twice: list each value once (METHODS, SEEDS, ...)"
    lr = any(x.startswith("--lr=") for x in a)
    hint = "; a run's name carries its lr in tuning runs only (--heldout=N)" if lr else ""
    return f"{' '.join(a)} and {' '.join(b)} are the same run {name}: list each value once{hint}"


def plan(s: Sweep) -> list[tuple[str, str, list]]:
    """[(state, name, args)]: 'done' where OUT holds a finished result of exactly this config (made on this kind
    of device, from the same data files), else 'todo'. A corrupt or incomplete result is moved to
    NAME.corrupt and redone; one made with another config stops the sweep before any work."""
    out, clash, kind = [], [], "cuda" if torch.cuda.is_available() else "cpu"
    for name, args in s.runs:
        cfg, path = parse_args(args, Config), os.path.join(s.out, name + ".json")
        for ext in (".json", ".log", ".partial.json", ".error.json"):
            f = os.path.join(s.out, name + ext)
            if os.path.isdir(f):
                fail(f"{f} is a folder, where the run {name} writes a file: move it out of {s.out}")
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
            seen = (r.get("data") or {}).get("sha256", {})  # the files it read, by digest
            for f, digest in provenance(cfg.task, cfg.glue_dir)["sha256"].items():
                if seen.get(f) != digest:  # the data was edited, or fixed since: another run
                    there = seen[f][:12] if f in seen else "(not recorded)"
                    diff.append(f"data {f} {there} -> {digest[:12]}")
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


def preflight(s: Sweep, todo: list) -> dict:
    """Every model and data set the runs to do need, loaded once; budgets that land on one rank
    refused. Returns {(task, glue_dir): training examples}."""
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
        pairs = sorted({(c.task, c.glue_dir) for c in cfgs})
        sizes = {(task, d): len(load_glue(task, d)["train"][1]) for task, d in pairs}
    except (OSError, ValueError, RuntimeError) as e:
        fail(f"{e}\nNothing was run.")
    return sizes


def run_steps(cfg, n_train: int) -> int:
    """A run's optimiser steps: epochs × batches of what it trains on (data.make_batches: the
    held-out slice leaves first, then max_train caps the rest)."""
    n = n_train - cfg.heldout
    return cfg.epochs * math.ceil((min(n, cfg.max_train) if cfg.max_train else n) / cfg.batch_size)


def left_s(done: list, waiting: list[int], running: list, n_slots: int) -> float:
    """Seconds left: the finished runs' seconds per step (done: [(s, steps)]) times the steps to
    go (the waiting runs', and each running run's less what its time so far covers; running: [(s,
    steps)]), shared over the slots."""
    per_step = sum(t for t, _ in done) / sum(n for _, n in done)
    ahead = sum(waiting) + sum(max(0.0, n - t / per_step) for t, n in running)
    return per_step * ahead / n_slots


def lock(out: str):
    """One sweep per folder: the kernel's lock, dropped when the sweep dies (kill -9 too). Keep the file open."""
    path, pid_file = os.path.join(out, ".lock"), os.path.join(out, ".lock.pid")
    try:
        f = open(path, "a")
    except OSError as e:
        fail(f"{path} cannot be the sweep's lock file ({e.strerror}): move it out of {out}")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = open(pid_file).read().strip() if os.path.isfile(pid_file) else "?"
        fail(f"another sweep (pid {pid}) is running on {out}; wait for it, stop it, or use another OUT", 1)
    try:
        write_file(pid_file, lambda p: p.write(f"{os.getpid()}\n"))  # atomic: never left empty
    except OSError as e:
        fail(f"{e}: free space on {out} or choose another OUT", 1)
    return f


def timing(s: Sweep) -> list[tuple[str, list]]:
    """Side-by-side timing still to do: per task, whole runs of the first budget and seed in one
    process (bench.py runs). The method order rotates from task to task, so no method always goes
    first. A timing file in OUT is reused only if it times every method of TIMED with exactly these
    configs (timed_same); any other is moved aside."""
    todo, kind = [], "cuda" if torch.cuda.is_available() else "cpu"
    for i, task in enumerate(s.task_args if s.timed else ()):
        order = s.timed[i % len(s.timed):] + s.timed[:i % len(s.timed)]
        args = [*s.task_args[task], f"--out_dir={s.out}", *s.runs[0][1][-2:]]
        want = {}  # what bench.py makes of "adalora:lr=…": the shared arguments, then its own
        for m in order:
            own = s.method_args.get((task, m), [])
            shared = [a for a in args if a.split("=")[0] not in {b.split("=")[0] for b in own}]
            cfg = parse_args(shared + own + [f"--method={m}"], Config)
            want[m + "".join(f":{a[2:]}" for a in own)] = dataclasses.asdict(cfg)
        files = sorted(glob.glob(timing_file(glob.escape(s.out), f"{task}_*")))
        keep = [f for f in files if timed_same(f, want, kind)][:1]
        for f in (f for f in files if f not in keep):
            os.replace(f, f.removesuffix(".json") + ".stale")
            print(f"{f}: not a timing of {','.join(want)} with this sweep's configs: moved aside "
                  "(.stale)")
        if keep:
            print(f"skip side-by-side timing of {task} (done)")
            continue
        todo.append((task, ["runs", f"--methods={','.join(want)}", *args]))
    return todo


def timed_same(path: str, want: dict, kind: str) -> bool:
    """Whether a timing file holds every method of `want` ({label: config}) with that config (the
    fields that can change a result, the resolved device and precision); False if it is damaged."""
    try:
        with open(path, encoding="utf-8") as f:
            b = json.load(f)
        then = lambda c: resolved({"config": c, "environment": b["environment"]})
        here = lambda c: kind if c["device"] == "auto" else c["device"]
        now = lambda c: resolved({"config": c, "environment": {"device": here(c)}})
        return all(not differ(then(b["configs"][m]), now(c)) for m, c in want.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


@dataclasses.dataclass
class Slot:
    threads: int
    gpu: str | None = None


def slots(env: dict, on_gpu: bool) -> list[Slot]:
    """CPU: JOBS runs at once (default one per core), the cores shared out as threads. GPU: RUNS_PER_GPU runs on
    each GPU the scheduler handed out (the inherited CUDA_VISIBLE_DEVICES), else on each visible GPU."""
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    jobs, per = positive(env, "JOBS", ncpu), positive(env, "RUNS_PER_GPU", 1)
    if not on_gpu and jobs > ncpu:  # allowed (a run waiting on I/O), but the runs then share cores
        print(f"warning: JOBS={jobs} on {ncpu} cores: the runs share cores, so each is slower than "
              "alone", file=sys.stderr)
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
    quiet_locks()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # append: a finished run's log is never cut
    os.dup2(fd, 1), os.dup2(fd, 2)
    sys.stdout.reconfigure(line_buffering=True)
    for sig in (signal.SIGINT, signal.SIGTERM):  # the server ignores Ctrl-C; a run stops on both, saying so
        signal.signal(sig, signal.default_int_handler)
    sys.exit(importlib.import_module(entry).main(argv))


def quiet_locks() -> None:
    """tqdm's default lock is a multiprocessing RLock: in a run forked from the forkserver, a named
    semaphore that the resource tracker reports as leaked ("resource_tracker: There appear to be 1
    leaked semaphore objects") when a stop cuts the run's exit short. A run writes its own log
    alone: a thread lock is all it needs."""
    tqdm.tqdm.set_lock(threading.RLock())


STOP = []  # set by Ctrl-C, SIGTERM or SIGHUP; acted on between process starts, never in the middle of one


def stop(*_):
    STOP.append(1)


def run_local(s: Sweep, todo: list, jobs: list[Slot], steps: dict) -> list[str]:
    """The runs to do on the slots, then the timing; returns what failed. Stopped: every run records its
    .error.json (SIGTERM), and the sweep exits 130. `steps`, {name: optimiser steps}, weigh the
    time left."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["train", "bench", "transformers.models.bert.modeling_bert",
                                "transformers.models.roberta.modeling_roberta"])
    free, running, failed, took, t_start, k = list(jobs), {}, [], [], time.time(), 0

    def start(entry, args, name, slot, k, log=None):
        log = log or os.path.join(s.out, name + ".log")
        p = ctx.Process(target=worker, args=(entry, args, log, slot))
        # The server (started at the first run, or again if it died) imports torch for seconds:
        # started with Ctrl-C and SIGHUP ignored (kept through exec), a stop reaches the sweep,
        # which stops in order, and not the half-started server (an EOFError here).
        handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT,
                                                                         signal.SIGHUP)}
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        try:
            p.start()
        except (EOFError, OSError) as e:  # the server died (kill -9): nothing more can start
            halt()
            fail(f"the sweep's process server (multiprocessing's forkserver) has gone "
                 f"({type(e).__name__}: {e}): finished runs are kept; run the same command again "
                 "to resume", 1)
        running[p.sentinel] = (p, slot, name, k, time.time(), args)

    def halt():
        for p, *_ in running.values():
            p.terminate()  # SIGTERM: each run records its .error.json and stops
        for p, *_ in running.values():
            p.join(30)
            if p.is_alive():  # it did not stop in 30 s: no run outlives the sweep
                p.kill()

    def reap():  # wakes at least twice a second to see a stop
        for sentinel in multiprocessing.connection.wait(list(running), timeout=0.5):
            p, slot, name, k, t0, args = running.pop(sentinel)
            p.join()
            free.append(slot)
            if k == 0:  # the timing step
                failed.extend([f"{name} (see {s.out}/{name}.log)"] * bool(p.exitcode))
                continue
            r = read_result(os.path.join(s.out, name + ".json"), warn=False) if p.exitcode == 0 else None
            if r:
                took.append((time.time() - t0, steps[name]))
                now = [(time.time() - t, steps[n]) for _, _, n, _, t, _ in running.values()]
                left = left_s(took, [steps[n] for _, n, _ in todo[k:]], now, len(jobs)) / 60
                print(f"[{k}/{len(todo)}] {name}: {r['metric']} {r['final']:.4f}, "
                      f"{took[-1][0]:.1f} s; about {left:.0f} min left")
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
        log = timing_file(s.out, task, ".log")
        alone = Slot(sum(j.threads for j in jobs), jobs[0].gpu)
        start("bench", args, os.path.basename(log).removesuffix(".log"), alone, 0, log)
        while running and not STOP:
            reap()
    if STOP:
        halt()
        print("\ninterrupted: finished runs are kept; run the same command again to resume")
        sys.exit(130)
    return failed


def main(argv: list[str], env: dict | None = None) -> int:
    env = dict(os.environ if env is None else env)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # set here, so a sweep started with & stops too
        signal.signal(sig, stop)
    s = settings(argv, env)
    held = lock(s.out)  # noqa: F841  (held until the sweep exits)
    slurm.guard(s.out, env)
    planned = plan(s)
    todo = [x for x in planned if x[0] == "todo"]
    sizes = preflight(s, todo)
    flags = [a for a in argv if a.split("=")[0] in ("--overwrite", "--save_adapters")]  # =1 too
    redo = " and ".join(a for a in flags if getattr(parse_args([a], Config), a[2:].split("=")[0]))
    for _, name, _ in (x for x in planned if x[0] == "done"):
        print(f"skip {name} (done)" + f"; {redo} does not redo a finished run: move its result out of OUT" * bool(redo))
    if s.slurm:
        return slurm.submit(s.out, s.profile, [(n, a) for _, n, a in todo], timing(s), env)
    cfgs = {name: parse_args(a, Config) for _, name, a in todo}
    steps = {name: run_steps(c, sizes[(c.task, c.glue_dir)]) for name, c in cfgs.items()}
    failed = run_local(s, todo, slots(env, any(c.device == "cuda" for c in cfgs.values())), steps)
    if failed:
        print(f"failed ({len(failed)}): {', '.join(failed)}")
    return report_step(s.out) or (1 if failed else 0)


def report_step(out: str) -> int:
    """The table from what OUT holds. A stop now (Ctrl-C, SIGTERM, SIGHUP) ends the sweep with 130,
    as during the runs."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    import report
    try:
        if STOP:  # a stop between the last run and here
            raise KeyboardInterrupt
        report.main(out)
    except SystemExit as e:  # the report's one-line error (it has printed the table if it could)
        if isinstance(e.code, str):
            print(e, file=sys.stderr)
        return 1 if e.code else 0
    except KeyboardInterrupt:
        print(f"\ninterrupted in the report: every run is kept; `python report.py {out}` writes "
              "the table")
        return 130
    return 0


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True, errors="backslashreplace")  # now, in any locale
    try:
        sys.exit(main(sys.argv[1:]))
    except BrokenPipeError:  # `| head`: the reader has gone; stop quietly, as a SIGPIPE would
        for stream in (sys.stdout, sys.stderr):
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        sys.exit(141)
