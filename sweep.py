"""The sweep: which runs to make. `bash run_all.sh PROFILE` sets the profile, then runs this.

The profile (MODEL, DEF_SEEDS, DEF_BUDGETS, SST2_ARGS, COLA_ARGS, DEF_TIMED, SLURM_RUN, SLURM_END)
and the user's narrowing (TASKS, BUDGETS, SEEDS, METHODS, TIMED, OUT, JOBS, RUNS_PER_GPU) come from
the environment; train.py `--field=value` overrides and `--slurm` from the arguments. Before any
work: every value and run config checked, the models and data loaded once, distinct ranks for the
budgets, and a resume that reuses only results of exactly the run it would make. Then the runs go
to local slots (local.py: forked workers, signals, progress) or to SLURM as one job array and a
report job (slurm.py). One sweep per OUT (fcntl.flock).
"""
import dataclasses
import fcntl
import glob
import itertools
import json
import math
import os
import shutil
import signal
import sys

import torch

import slurm
from bench import method_config
from local import STOP, fail, run_local, slots, stop
from data import RANDOM_MODELS, TASKS, load_glue, load_model, provenance
from lora import count_base_params, rank_for_budget, target_names
from fisher import WEIGHTING
from record import (IGNORED, METHODS, check_writable, code_digest, differ, parse_args, plain_output,
                    precision_of, read_result, resolved, run_name, timing_file, write_file)
from config import Config, check_config, resolve_precision

SWEEP_SETS = {"task": "TASKS", "method": "METHODS", "budget": "BUDGETS", "seed": "SEEDS",
              "out_dir": "OUT"}


def axis(env: dict, key: str, default: str = "") -> list[str]:
    """A sweep axis: the user's KEY, else the profile's DEF_KEY, else `default`; [""]: not swept."""
    return (env.get(key) or env.get("DEF_" + key) or default).split() or [""]


def not_swept(what: str, args: list[str]) -> list[str]:
    """train.py arguments from `what` (the command line, <TASK>_ARGS, <TASK>_<METHOD>_ARGS), refused
    if they set a field the sweep sets (SST2_LORA_ARGS="--task=cola" would move a run's task)."""
    for a in args:
        field = a.removeprefix("--").split("=")[0]
        if field in SWEEP_SETS:
            fail(f"{what}: {a}: the sweep sets this itself; use {SWEEP_SETS[field]}=... instead")
    return args


@dataclasses.dataclass
class Sweep:
    profile: str
    out: str
    runs: list       # [(run name, train.py arguments)] in the order they run, LoRA first in a group
    timed: list      # methods timed side by side at the end
    task_args: dict  # task -> the arguments its runs share (profile, then the user's overrides)
    slurm: bool
    # (task, method) -> its own values (a tuned lr)
    method_args: dict = dataclasses.field(default_factory=dict)


def settings(argv: list[str], env: dict) -> Sweep:
    """The sweep from the environment and arguments, every value checked (exit 2 on bad input)."""
    on_slurm = env.get("SLURM") == "1" or "--slurm" in argv
    overrides = [a for a in argv if a != "--slurm"]
    if on_slurm and not shutil.which("sbatch"):
        fail("--slurm needs SLURM, and sbatch is not on PATH: run this on the cluster's login node "
             "(or load its slurm module), or drop --slurm to run here")
    if on_slurm and env.get("PROFILE") == "auto":
        fail("with --slurm, name the profile first (bash run_all.sh paper --slurm): this machine's "
             "GPU says nothing about the compute nodes'")
    not_swept("the command line", overrides)
    try:
        parse_args(overrides, Config)  # each is a Config field with a value of its type
    except SystemExit as e:
        if e.code:  # --help printed the fields: exit 0
            fail(str(e))
        raise
    tasks = (env.get("TASKS") or "sst2 cola").split()
    methods = (env.get("METHODS") or env.get("DEF_METHODS") or "all").split()
    methods = list(METHODS) if methods == ["all"] else methods
    timed = env.get("TIMED", env.get("DEF_TIMED", "")).replace(",", " ").split()
    lists = (("TASKS", tasks, TASKS), ("METHODS", methods, METHODS), ("TIMED", timed, METHODS))
    for what, names, known in lists:
        bad = [n for n in names if n not in known]
        if bad or not names and what != "TIMED":
            fail(f"{what}: unknown {', '.join(map(repr, bad)) or 'empty list'}; "
                 f"choose from {', '.join(known)}")
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
        kept = [a for a in profile if a.split("=")[0] not in given]
        task_args[task] = kept + overrides + [f"--task={task}"]
        grid = itertools.product(axis(env, "BUDGETS", "0.2"), axis(env, "SEEDS", "0"),
                                 axis(env, "LRS"), methods)
        for budget, seed, lr, m in grid:
            for lam in axis(env, "LAMBDAS") if m in WEIGHTING else [""]:  # penalised methods only
                # A method's own (tuned) values: the user's overrides and the swept axes beat them.
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
    """[(state, name, args)]: 'done' where OUT holds a finished result of exactly this config (made
    on this kind of device, from the same data files), else 'todo'. A corrupt or incomplete result
    is moved to NAME.corrupt and redone; one of another config stops the sweep before any work."""
    out, clash, kind = [], [], "cuda" if torch.cuda.is_available() else "cpu"
    other_code, here = [], code_digest()
    for name, args in s.runs:
        cfg, path = parse_args(args, Config), os.path.join(s.out, name + ".json")
        for ext in (".json", ".log", ".partial.json", ".error.json"):
            f = os.path.join(s.out, name + ext)
            if os.path.isdir(f):
                fail(f"{f} is a folder, where the run {name} writes a file: move it out of {s.out}")
        r = read_result(path) if os.path.exists(path) else None
        if os.path.exists(path) and (r is None or r["status"] != "ok"):
            os.replace(path, os.path.join(s.out, name + ".corrupt"))
            print(f"warning: {path} is not a finished result: moved to {name}.corrupt, the run is "
                  "redone", file=sys.stderr)
        elif r:
            was = lambda k: r["config"].get(k, "(absent)")
            diff = [f"{k} {was(k)!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
                    if k not in IGNORED + ("precision",) and was(k) != v]
            made_on = str(r["environment"].get("device", "unknown")).split(":")[0]
            now = kind if cfg.device == "auto" else cfg.device
            if made_on != now:
                diff.append(f"device {made_on} -> {now}")
            seen = (r.get("data") or {}).get("sha256", {})  # the files it read, by digest
            for f, digest in provenance(cfg.task, cfg.glue_dir)["sha256"].items():
                if seen.get(f) != digest:  # the data was edited, or fixed since: another run
                    there = seen[f][:12] if f in seen else "(not recorded)"
                    diff.append(f"data {f} {there} -> {digest[:12]}")
            made_in = precision_of(r)  # resolved, not as asked
            now_in = resolve_precision(cfg.precision, now)[0]
            if made_in != now_in:
                diff.append(f"precision {made_in} -> {now_in} (--precision={made_in} continues it)")
            if diff:
                clash.append(f"  {name}.json: " + ", ".join(diff))
            other_code += [name] * (r["environment"].get("code_sha256") != here)
        out.append(("done" if r else "todo", name, args))
    if other_code and not clash:  # kept (an edited comment is no reason to lose a day), but said
        print(f"warning: {len(other_code)} finished runs in {s.out} (e.g. {other_code[0]}) come from "
              "other code than this checkout's (record.RUN_CODE): kept and skipped; the report says "
              "so. Move them out of OUT to redo them.", file=sys.stderr)
    if clash:
        more = f"\n  ... and {len(clash) - 8} more" if len(clash) > 8 else ""
        fail(f"{s.out} holds results made with another configuration (field: there -> now):\n"
             + "\n".join(clash[:8]) + more + "\nNothing was run. Use another folder (OUT=...) for "
             f"this configuration, or move those results out of {s.out} to redo them.")
    return out


def preflight(s: Sweep, todo: list) -> dict:
    """Every model and data set the runs to do need, loaded once; budgets that land on one rank
    refused. Returns {(task, glue_dir): training examples}."""
    cfgs = [parse_args(a, Config) for _, _, a in todo] or [parse_args(a, Config) for _, a in s.runs]
    try:
        for model in sorted({c.model for c in cfgs}):
            # a random model: its shapes only
            with torch.device("meta" if model in RANDOM_MODELS else "cpu"):
                m = load_model(model)[0]
            shapes, ranks = [tuple(m.get_submodule(n).weight.shape) for n in target_names(m)], {}
            for b in sorted({c.budget for c in cfgs}):
                ranks.setdefault(rank_for_budget(b, count_base_params(m), shapes), []).append(b)
            listed = ", ".join(f"{b:g}% -> rank {r}" for r, bs in ranks.items() for b in bs)
            print(f"budgets on {model}: {listed}")
            for bs in (bs for bs in ranks.values() if len(bs) > 1):
                shared = " and ".join(f"{b:g}%" for b in bs)
                fail(f"budgets {shared} give the same rank on {model}, so their runs would repeat "
                     "each other: keep one of them in BUDGETS")
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


def lock(out: str):
    """One sweep per folder: the kernel's lock, dropped when the sweep dies (kill -9 too). Keep
    the file open."""
    path, pid_file = os.path.join(out, ".lock"), os.path.join(out, ".lock.pid")
    try:
        f = open(path, "a")
    except OSError as e:
        fail(f"{path} cannot be the sweep's lock file ({e.strerror}): move it out of {out}")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = open(pid_file).read().strip() if os.path.isfile(pid_file) else "?"
        fail(f"another sweep (pid {pid}) is running on {out}; wait for it, stop it, or use another "
             "OUT", 1)
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
        shared, want = parse_args(args, Config), {}
        for m in order:  # "adalora:lr=…": a method's own values, read as bench.py reads them
            spec = m + "".join(f":{a[2:]}" for a in s.method_args.get((task, m), []))
            want[spec] = dataclasses.asdict(method_config(shared, spec))
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


def main(argv: list[str], env: dict | None = None) -> int:
    env = dict(os.environ if env is None else env)
    # set here, so a sweep started with & stops too
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    s = settings(argv, env)
    held = lock(s.out)  # noqa: F841  (held until the sweep exits)
    slurm.guard(s.out, env)
    planned = plan(s)
    todo = [x for x in planned if x[0] == "todo"]
    sizes = preflight(s, todo)
    flags = [a for a in argv if a.split("=")[0] in ("--overwrite", "--save_adapters")]  # =1 too
    redo = " and ".join(a for a in flags if getattr(parse_args([a], Config), a[2:].split("=")[0]))
    why = f"; {redo} does not redo a finished run: move its result out of OUT" if redo else ""
    for _, name, _ in (x for x in planned if x[0] == "done"):
        print(f"skip {name} (done){why}")
    if s.slurm:
        logs = [(timing_file(s.out, task, ".log"), args) for task, args in timing(s)]
        return slurm.submit(s.out, s.profile, [(n, a) for _, n, a in todo], logs, env)
    cfgs = {name: parse_args(a, Config) for _, name, a in todo}
    steps = {name: run_steps(c, sizes[(c.task, c.glue_dir)]) for name, c in cfgs.items()}
    jobs = slots(env, any(c.device == "cuda" for c in cfgs.values()))
    failed = run_local(s.out, todo, jobs, steps, timing(s))
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
    except Exception as e:  # a report bug must not read as a failed sweep: the runs are done
        print(f"error: the report failed ({type(e).__name__}: {e}); every run is kept: "
              f"`python report.py {out}` shows where", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    plain_output()  # in any locale
    sys.stdout.reconfigure(line_buffering=True)
    try:
        sys.exit(main(sys.argv[1:]))
    except BrokenPipeError:  # `| head`: the reader has gone; stop quietly, as a SIGPIPE would
        for stream in (sys.stdout, sys.stderr):
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        sys.exit(141)
