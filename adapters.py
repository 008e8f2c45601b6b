"""A run's adapters on disk: the project's own file and peft's folder, each read back with every
check.

`--save_adapters=true` writes both (record.save_adapters, atomically, through record.write_file):
  * `<run>.safetensors`, the project's: every `lora_*` and head tensor under the model's own names;
    its header holds the run's task, method, rank, alpha and targets, sealed with a sha256 over the
    header and the tensors. load_adapters() reads it into a model that already has the run's
    adapters.
  * `<run>.peft/`, peft's: adapter_config.json and adapter_model.safetensors, which peft's
    PeftModel.from_pretrained (and, for LoRA, transformers' load_adapter) loads. Keys start with
    `base_model.model.` and carry no adapter name.
      LoRA:    <module>.lora_A.weight (r × d_in), <module>.lora_B.weight (d_out × r);
               scale alpha / r per module; rank_pattern holds fwrank's ranks; a matrix at rank 0
               is not targeted.
      AdaLoRA: <module>.lora_A (k × d_in), .lora_E (k × 1), .lora_B (d_out × k): the k kept
               triplets only, in order; rank_pattern {"<module>.lora_E": init_r booleans};
               scale alpha / init_r.
    The head (and BERT's pooler) is in modules_to_save. The run's own record (method, λ, weighting,
    F_m / I_m, budget, achieved count, git commit, the digest) sits under the config's "fwlora" key,
    which peft ignores with a warning ("Unexpected keyword arguments ['fwlora']").
    load_peft() reads such a folder, this project's or one peft saved, into a bare base model: it
    injects the adapters the config describes, once everything has been checked against the model.
Every mismatch is a ValueError naming the file and what differs, raised before the model is touched.
The project never imports peft; tests/test_peft_interop.py checks both directions against it.
"""
import hashlib
import json
import os
import re

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from adalora import AdaLoRALinear
from lora import LoRALinear, inject, is_head

PREFIX = "base_model.model."  # peft's keys: PeftModel.base_model (the tuner).model (the HF model)
RECORD = "fwlora"  # the config key of this project's record
# where lora.HEAD_PATTERN's parameters live
HEAD_MODULES = re.compile(r"classifier|score|.*\.pooler")
# peft options that change what an adapter computes, which this reader lacks: (key, peft's default).
UNSUPPORTED = (("use_dora", False), ("use_rslora", False), ("bias", "none"), ("lora_bias", False),
               ("fan_in_fan_out", False), ("layers_to_transform", None), ("exclude_modules", None),
               ("layer_replication", None), ("target_parameters", None),
               ("trainable_token_indices", None), ("use_qalora", False),
               ("alora_invocation_tokens", None))
LORA_KEYS = (".lora_A", ".lora_E", ".lora_B", ".lora_A.weight", ".lora_B.weight")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter and head tensors only: what a fine-tune adds to the pretrained model."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters()
            if "lora_" in n or is_head(n)}


def state_digest(state: dict[str, torch.Tensor], header: dict) -> str:
    """sha256 over `header` (its JSON, keys sorted) and the tensors' names and bytes in name order:
    an edited header (another task) or bytes that did not survive (zeroed, truncated) fail it."""
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for n in sorted(state):
        h.update(n.encode())
        h.update(state[n].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def same(recorded, wanted) -> bool:
    """A recorded value (a header's string, a JSON value) is the wanted one; numbers by value
    ('16.0' is 16)."""
    if isinstance(wanted, (int, float)) and not isinstance(wanted, bool):
        try:
            return float(recorded) == float(wanted)
        except (TypeError, ValueError):
            return False
    return recorded is not None and str(recorded) == str(wanted)


def check_expected(where: str, recorded: dict, expect: dict) -> None:
    """The entries `expect` names (task, model, method, rank, ...) against the recorded ones. The
    task is always needed: a head trained for one task gives another task's labels silently."""
    if "task" not in expect:
        raise ValueError(f"loading {where} needs the task the model is for "
                         "(expect={'task': ...}), or check_meta=False")
    wrong = [f"{k} {recorded.get(k, '(absent)')!r} (want {str(v)!r})" for k, v in expect.items()
             if not same(recorded.get(k), v)]
    if wrong:
        raise ValueError(f"{where} was saved for another setup: {', '.join(wrong)}: load it on the "
                         "setup it was saved for")


def read_safetensors(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header metadata, tensors); a truncated or foreign file is a one-line error."""
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own error type, for a file that is not safetensors
        raise ValueError(f"{path}: not a readable safetensors adapter file "
                         f"({str(e).splitlines()[0]})") from None


# ---- the project's file ----

def project_file(model: nn.Module, meta: dict) -> bytes:
    """The bytes of `<run>.safetensors`: adapters and head (safetensors, not pickle: loading runs no
    code), `meta` (task, method, rank, alpha, targets) in the header, sealed by state_digest."""
    state, header = adapter_state(model), {k: str(v) for k, v in meta.items()}
    return safetensors_bytes(state, metadata=header | {"sha256": state_digest(state, header)})


def load_adapters(model: nn.Module, path: str, expect: dict, check_meta: bool = True) -> dict:
    """Load a project_file() into `model`, which already has the run's adapters; returns the header.
    Always checked: the digest, and the names and shapes against the model. `expect`: the header
    entries this use needs, the task among them (check_expected); the model's own LoRA alpha is
    added. A missing or different entry is an error unless check_meta=False (the caller knows
    it fits)."""
    meta, state = read_safetensors(path)
    header = {k: v for k, v in meta.items() if k != "sha256"}
    if meta.get("sha256") != state_digest(state, header):
        raise ValueError(f"{path}: its header or tensors do not match the digest in its header "
                         "(damaged, edited, or not written by this project): "
                         "save the adapters again")
    alphas = {m.alpha for m in model.modules() if hasattr(m, "lora_A")}
    if check_meta:
        own = {"lora_alpha": alphas.pop()} if len(alphas) == 1 else {}
        check_expected(str(path), meta, own | dict(expect))
    want = adapter_state(model)
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    other = [n for n in set(want) & set(state) if want[n].shape != state[n].shape]
    if missing or extra or other:
        raise ValueError(f"{path} does not fit this model: missing {missing[:3]}, unexpected "
                         f"{extra[:3]}, other shape {other[:3]} (was it saved with another method, "
                         "rank or target set?)")
    model.load_state_dict(state, strict=False)
    return meta


# ---- peft's folder: writing ----

def head_modules(model: nn.Module) -> list[str]:
    """The head's modules as modules_to_save names them: `classifier` (or `score`),
    `bert.pooler`."""
    return [n for n, m in model.named_modules()
            if HEAD_MODULES.fullmatch(n) and any(True for _ in m.parameters())]


def sealed(config: dict) -> dict:
    """What a peft folder's digest covers besides its tensors: the config, less the digest itself
    and less base_model_name_or_path (people point that at their own copy of the base model)."""
    out = {k: v for k, v in config.items() if k != "base_model_name_or_path"}
    return out | {RECORD: {k: v for k, v in config[RECORD].items() if k != "sha256"}}


def most_common(values: list):
    return max(set(values), key=lambda v: (values.count(v), -values.index(v)))  # ties: first seen


def peft_files(model: nn.Module, layers: dict, record: dict, base_model: str | None = None,
               keep: dict | None = None, ada_config: dict | None = None) -> dict[str, bytes]:
    """`<run>.peft/` as {file name: bytes}, from the adapter layers {module: LoRALinear or
    AdaLoRALinear} and the model's head. AdaLoRA: `keep` {module: init_r booleans} (the
    allocator's last mask) and `ada_config`, peft's AdaLoRA fields (target_r, total_step, tinit,
    tfinal, ...)."""
    state = {}
    for name, l in layers.items():
        key = PREFIX + name
        A, B = l.lora_A.detach().cpu(), l.lora_B.detach().cpu()  # r × d_in, d_out × r
        if isinstance(l, AdaLoRALinear):  # the kept triplets only, in order
            k = torch.tensor(keep[name], dtype=torch.bool)
            E = l.lora_E.detach().cpu()  # r × 1
            state |= {f"{key}.lora_A": A[k], f"{key}.lora_E": E[k], f"{key}.lora_B": B[:, k]}
        else:
            state |= {f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": B}
    state |= {PREFIX + n: p.detach().cpu() for n, p in model.named_parameters() if is_head(n)}
    state = {n: t.contiguous() for n, t in state.items()}
    r = most_common([l.r for l in layers.values()])
    alpha = most_common([l.alpha for l in layers.values()])
    config = {"peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": base_model,
              "inference_mode": True, "r": r, "lora_alpha": alpha, "bias": "none",
              "lora_dropout": getattr(next(iter(layers.values())).lora_dropout, "p", 0.0),
              "target_modules": list(layers), "modules_to_save": head_modules(model),
              "rank_pattern": {n: l.r for n, l in layers.items() if l.r != r},
              "alpha_pattern": {n: l.alpha for n, l in layers.items() if l.alpha != alpha}}
    # peft's AdaLoRA: one init_r for all matrices, and no `r` (it warns on one)
    if keep is not None:
        del config["r"]
        config |= {"peft_type": "ADALORA", "init_r": r, **(ada_config or {}),
                   "rank_pattern": {f"{n}.lora_E": keep[n] for n in layers}}
    config[RECORD] = record  # sealed() reads it
    config[RECORD] = record | {"sha256": state_digest(state, sealed(config))}
    return {"adapter_config.json": json.dumps(config, indent=1).encode(),
            "adapter_model.safetensors": safetensors_bytes(state, metadata={"format": "pt"})}


# ---- peft's folder: reading ----

def saved_modules(config: dict) -> list[str]:
    """modules_to_save, with the `classifier` and `score` that peft adds for a SEQ_CLS adapter."""
    return (config.get("modules_to_save") or []) + ["classifier", "score"]


def peft_targets(model: nn.Module, config: dict) -> list[str]:
    """The modules peft adapts: target_modules as one regex on the full name, or a list of names or
    name suffixes; never a module inside a module to save (peft's rules)."""
    tm, keep_out = config.get("target_modules") or [], saved_modules(config)

    def targeted(n: str) -> bool:
        if any(re.match(rf"(^|.*\.){m}($|\..*)", n) for m in keep_out):
            return False
        if isinstance(tm, str):
            return re.fullmatch(tm, n) is not None
        return n in tm or any(n.endswith("." + t) for t in tm)
    return [n for n, _ in model.named_modules() if n and targeted(n)]


def pattern_value(pattern: dict, name: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key matching the end of the name."""
    key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", name)), None)
    return default if key is None else pattern[key]


def read_peft_config(path: str) -> dict:
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path} not found: a peft adapter folder holds adapter_config.json and "
                         "adapter_model.safetensors (--save_adapters=true writes "
                         "<run>.peft/)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable adapter config "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a peft adapter config (a JSON object)")
    return config


def check_supported(path: str, config: dict) -> None:
    """Refuse what this reader cannot reproduce: another method or task type, a peft option it
    lacks."""
    if config.get("peft_type") not in ("LORA", "ADALORA"):
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r}; this project reads LORA "
                         "and ADALORA")
    if config.get("task_type") != "SEQ_CLS":
        raise ValueError(f"{path}: task_type {config.get('task_type')!r}; this project's models "
                         "are sequence classifiers (SEQ_CLS)")
    for key, default in UNSUPPORTED:
        if config.get(key, default) not in (default, None, False, [], {}):
            raise ValueError(f"{path}: uses {key}={config[key]!r}, which this project does not "
                             "implement")
    if config["peft_type"] == "ADALORA" and not config.get("rank_pattern"):
        raise ValueError(f"{path}: an AdaLoRA config without rank_pattern (which of the init_r "
                         "triplets each matrix kept): export it after pruning, or give "
                         "rank_pattern")


def adapter_layout(path: str, model: nn.Module, config: dict) -> dict[str, dict]:
    """{module: {"r", "alpha", "keep"}} for every module the config adapts; keep: AdaLoRA's kept
    triplets (init_r booleans), None for LoRA."""
    names = peft_targets(model, config)
    if not names:
        tm = config.get("target_modules")
        shown = tm
        if not isinstance(tm, str) and len(tm or []) > 3:
            shown = tm[:3] + [f"... {len(tm) - 3} more"]
        raise ValueError(f"{path}: target_modules {shown!r} match no module of this model "
                         "(saved for another base model?)")
    not_linear = [n for n in names if not isinstance(model.get_submodule(n), nn.Linear)]
    if not_linear:
        raise ValueError(f"{path}: target_modules match {not_linear[:3]}, which are not nn.Linear "
                         "(this project adapts nn.Linear only)")
    pattern, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    alpha = config.get("lora_alpha", 8)  # peft's default
    layout = {n: {"alpha": pattern_value(alphas, n, alpha), "keep": None} for n in names}
    if config["peft_type"] == "LORA":
        for n in names:
            layout[n]["r"] = pattern_value(pattern, n, config.get("r", 8))
            if not layout[n]["r"] >= 1:
                raise ValueError(f"{path}: {n} at rank {layout[n]['r']}; a LoRA rank is at least 1")
        return layout
    r0 = config.get("init_r", 12)  # peft's default; one initial rank for every matrix
    for n in names:  # a matrix without a rank_pattern entry keeps its init_r triplets, as in peft
        layout[n] |= {"r": r0, "keep": [True] * r0}
    for key, mask in pattern.items():
        module = key.removesuffix(".lora_E")
        if module not in layout:
            raise ValueError(f"{path}: rank_pattern {key!r} names no adapted module of this model")
        if len(mask) != r0:
            raise ValueError(f"{path}: rank_pattern {key!r} has {len(mask)} entries, "
                             f"not init_r = {r0}")
        layout[module]["keep"] = [bool(b) for b in mask]
    return layout


def peft_shapes(model: nn.Module, layout: dict, config: dict) -> dict[str, tuple]:
    """{key: shape} of every tensor a folder with this layout holds (adapters, modules to save)."""
    want = {}
    for n, m in layout.items():
        d_out, d_in = model.get_submodule(n).weight.shape
        key, r, k = PREFIX + n, m["r"], sum(m["keep"] or [])
        if m["keep"] is None:
            want |= {f"{key}.lora_A.weight": (r, d_in), f"{key}.lora_B.weight": (d_out, r)}
        else:
            want |= {f"{key}.lora_A": (k, d_in), f"{key}.lora_E": (k, 1),
                     f"{key}.lora_B": (d_out, k)}
    saved = [n for n, _ in model.named_modules()
             if n and any(n.endswith(m) for m in saved_modules(config))]  # peft's rule: a suffix
    return want | {PREFIX + p: tuple(t.shape) for p, t in model.named_parameters()
                   if any(p.startswith(m + ".") for m in saved)}


def first_three(items: list) -> str:
    """The first three items, and how many more there are."""
    more = f" and {len(items) - 3} more" if len(items) > 3 else ""
    return f"{items[:3]}{more}"


def mismatches(state: dict, want: dict) -> list[str]:
    """What keeps `state` from being exactly the tensors `want` names: missing, extra, shapes."""
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    shared = sorted(set(want) & set(state))
    other = [f"{n} {tuple(state[n].shape)} (model {want[n]})" for n in shared
             if tuple(state[n].shape) != want[n]]
    found = (("missing keys", missing), ("unexpected keys", extra), ("other shapes", other))
    return [f"{what} {first_three(items)}" for what, items in found if items]



def load_peft(model: nn.Module, folder: str, expect: dict, check_meta: bool = True) -> dict:
    """Read a peft adapter folder (this project's export or peft's own) into `model`, a bare base
    model: inject the adapters its config describes, load them and the head. Returns the project's
    record ({} if none). Checked first, the model untouched on any error: the digest (an export of
    this project; without fwlora.sha256, unchecked), `expect` against the record (check_expected; a
    folder without a record loads only with check_meta=False), the config's options, the targets
    against the model, every tensor's name and shape."""
    if os.path.isfile(folder):
        raise ValueError(f"{folder} is a file, not a peft adapter folder (--save_adapters=true "
                         "writes <run>.peft/ beside <run>.safetensors, which "
                         "adapters.load_adapters reads)")
    config_path = os.path.join(folder, "adapter_config.json")
    tensors_path = os.path.join(folder, "adapter_model.safetensors")
    config = read_peft_config(config_path)
    state = read_safetensors(tensors_path)[1]
    record = config.get(RECORD) or {}
    if "sha256" in record and record["sha256"] != state_digest(state, sealed(config)):
        raise ValueError(f"{folder}: its config or tensors do not match the digest in "
                         f"{RECORD}.sha256 (damaged or edited): export it again, or delete "
                         f"{RECORD}.sha256 to load an edited folder unchecked")
    if check_meta and not record:
        raise ValueError(f"{config_path} holds no '{RECORD}' record (a peft adapter this project "
                         "did not export), so its task and base model cannot be checked: pass "
                         "check_meta=False if you know it fits")
    if check_meta:
        check_expected(config_path, record, expect)
    check_supported(config_path, config)
    layout = adapter_layout(config_path, model, config)
    want = peft_shapes(model, layout, config)
    problems = mismatches(state, want)
    if problems:
        raise ValueError(f"{tensors_path} does not fit this model: {'; '.join(problems)} "
                         "(saved for another base model, method or rank?)")
    name_of = {id(model.get_submodule(n)): n for n in layout}

    def make_layer(lin: nn.Linear) -> LoRALinear:
        m = layout[name_of[id(lin)]]
        kind = LoRALinear if m["keep"] is None else AdaLoRALinear
        return kind(lin, m["r"], m["alpha"], config.get("lora_dropout", 0.0))
    layers = inject(model, make_layer, "|".join(re.escape(n) for n in layout))
    with torch.no_grad():
        for n, l in layers.items():
            key = PREFIX + n
            if layout[n]["keep"] is None:
                l.lora_A.copy_(state[f"{key}.lora_A.weight"])
                l.lora_B.copy_(state[f"{key}.lora_B.weight"])
                continue
            k = torch.tensor(layout[n]["keep"], dtype=torch.bool, device=l.lora_E.device)
            # pruned triplets were not saved: 0 (E = 0 is enough)
            for p in (l.lora_A, l.lora_E, l.lora_B):
                p.zero_()
            l.lora_A[k] = state[f"{key}.lora_A"].to(l.lora_A)
            l.lora_E[k] = state[f"{key}.lora_E"].to(l.lora_E)
            l.lora_B[:, k] = state[f"{key}.lora_B"].to(l.lora_B)
        for key in want:
            if not key.endswith(LORA_KEYS):  # the modules to save: the head
                model.get_parameter(key.removeprefix(PREFIX)).copy_(state[key])
    return record
