"""The sweep's runs on this machine: processes forked from one server that imported torch,
transformers and train.py once (multiprocessing's forkserver), each on a slot (its threads, its
GPU), writing OUT/<run>.log; a line as each run starts and ends, with the time left weighed by the
runs' steps; Ctrl-C, SIGTERM and SIGHUP stop every run in order (each records its .error.json).
sweep.py decides which runs; this file runs them. It imports nothing above record.py.
"""
import ctypes
import dataclasses
import importlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import signal
import sys
import threading
import time

import torch
import tqdm

from record import read_result, timing_file, write_json


def fail(msg: str, code: int = 2):
    """Refuse, before any work, saying what to do."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def positive(env: dict, key: str, default: int) -> int:
    v = env.get(key) or str(default)
    if not (v.isdigit() and int(v) > 0):
        fail(f"{key} must be a positive whole number, got {v!r}")
    return int(v)


def left_s(done: list, waiting: list[int], running: list, n_slots: int) -> float:
    """Seconds left: the finished runs' seconds per step (done: [(s, steps)]) times the steps to
    go (the waiting runs', and each running run's less what its time so far covers; running: [(s,
    steps)]), shared over the slots."""
    per_step = sum(t for t, _ in done) / sum(n for _, n in done)
    ahead = sum(waiting) + sum(max(0.0, n - t / per_step) for t, n in running)
    return per_step * ahead / n_slots


@dataclasses.dataclass
class Slot:
    threads: int
    gpu: str | None = None


def slots(env: dict, on_gpu: bool) -> list[Slot]:
    """CPU: JOBS runs at once (default one per core), the cores shared out as threads. GPU:
    RUNS_PER_GPU runs on each GPU the scheduler handed out (the inherited CUDA_VISIBLE_DEVICES),
    else on each visible GPU."""
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
    """One run, forked from the import server: it dies with the sweep, writes its own log, uses its
    slot's threads and GPU, and exits with train.py's (or bench.py's) exit code."""
    # The server ends when no one holds its "alive" pipe: the sweep, and (unless they close it) its
    # runs. Closed here, the server ends with the sweep, and PR_SET_PDEATHSIG sends this run SIGTERM
    # then, kill -9 included.
    os.close(multiprocessing.forkserver._forkserver._forkserver_alive_fd)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    if slot.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot.gpu  # before CUDA starts in this process
    os.environ["OMP_NUM_THREADS"] = str(slot.threads)
    torch.set_num_threads(slot.threads)
    quiet_locks()
    # append: a finished run's log is never cut
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout.reconfigure(line_buffering=True)
    # the server ignores Ctrl-C; a run stops on both, saying so
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    sys.exit(importlib.import_module(entry).main(argv))


def quiet_locks() -> None:
    """tqdm's default lock is a multiprocessing RLock: in a run forked from the forkserver, a named
    semaphore that the resource tracker reports as leaked ("resource_tracker: There appear to be 1
    leaked semaphore objects") when a stop cuts the run's exit short. A run writes its own log
    alone: a thread lock is all it needs."""
    tqdm.tqdm.set_lock(threading.RLock())


# Set by Ctrl-C, SIGTERM or SIGHUP; acted on between process starts, never in the middle of one.
STOP = []


def stop(*_):
    STOP.append(1)


def run_local(out: str, todo: list, jobs: list[Slot], steps: dict, timing: list) -> list[str]:
    """The runs to do ([(state, name, train.py args)]) on the slots, then the timing ([(task,
    bench.py args)]); returns what failed. Stopped: every run records its .error.json (SIGTERM),
    and the sweep exits 130. `steps`, {name: optimiser steps}, weigh the time left."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["train", "bench", "transformers.models.bert.modeling_bert",
                                "transformers.models.roberta.modeling_roberta",
                                "transformers.models.mpnet.modeling_mpnet"])
    free, running, failed, took, t_start, k = list(jobs), {}, [], [], time.time(), 0

    def start(entry, args, name, slot, k, log=None):
        log = log or os.path.join(out, name + ".log")
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
                if p.exitcode:
                    failed.append(f"{name} (see {out}/{name}.log)")
                continue
            result = os.path.join(out, name + ".json")
            r = read_result(result, warn=False) if p.exitcode == 0 else None
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
            err = os.path.join(out, name + ".error.json")
            if p.exitcode < 0 and not os.path.exists(err):  # killed: the run could not say so
                config = dict(a[2:].split("=", 1) for a in args)
                write_json(err, {"config": config, "status": "error",
                                 "error": f"killed by signal {-p.exitcode}", "epochs": []})
            print(f"[{k}/{len(todo)}] {name} FAILED (exit {p.exitcode}): see {out}/{name}.log")

    while (k < len(todo) or running) and not STOP:
        if free and k < len(todo):
            k, slot = k + 1, free.pop(0)
            start("train", todo[k - 1][2], todo[k - 1][1], slot, k)
            where = f" on GPU {slot.gpu}" if slot.gpu is not None else ""
            print(f"[{k}/{len(todo)}] {todo[k - 1][1]} started{where}")
        else:
            reap()
    if not STOP:
        print(f"sweep finished in {(time.time() - t_start) / 60:.0f} min ({len(jobs)} at a time)")
    for task, args in timing if not STOP else ():  # alone on the machine: one process, every thread
        print(f"side-by-side timing of {task}: {args[1].split('=', 1)[1]}")
        log = timing_file(out, task, ".log")
        alone = Slot(sum(j.threads for j in jobs), jobs[0].gpu)
        start("bench", args, os.path.basename(log).removesuffix(".log"), alone, 0, log)
        while running and not STOP:
            reap()
    if STOP:
        halt()
        print("\ninterrupted: finished runs are kept; run the same command again to resume")
        sys.exit(130)
    return failed
