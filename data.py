"""GLUE SST-2 and CoLA (Wang et al. 2019): train and dev, tokenised once, batched with dynamic padding.

Two sources, same result:
  * a local folder in the official GLUE layout (`--glue_dir` or $GLUE_DIR): SST-2/{train,dev}.tsv with a
    `sentence\tlabel` header; CoLA/{train,dev}.tsv with no header and 4 columns
    (source, label, original mark, sentence). Read with quoting off: sentences contain quotes.
  * no folder: `datasets.load_dataset("nyu-mll/glue", task)` from the hub (needs internet).
Dev is the evaluation split, as in the LoRA and AdaLoRA papers (GLUE test labels are hidden).
"""
import csv
import os

import torch

TASKS = {  # task -> (GLUE folder, metric reported in the table)
    "sst2": ("SST-2", "accuracy"),
    "cola": ("CoLA", "mcc"),
}


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")


def read_glue_tsv(path: str, task: str) -> tuple[list[str], list[int]]:
    """(sentences, labels) from one GLUE TSV file; a clear error for a missing or malformed file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: point --glue_dir (or GLUE_DIR) at a folder in the GLUE "
                                f"layout, e.g. ../shared/data/glue, or leave it empty to download from the hub")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task == "sst2":  # header `sentence\tlabel`
        if not rows or rows[0][:2] != ["sentence", "label"]:
            raise ValueError(f"{path}: expected a 'sentence<TAB>label' header (GLUE SST-2 layout)")
        rows, s_col, l_col, width = rows[1:], 0, 1, 2
    else:  # CoLA: no header; source, label, original mark, sentence
        s_col, l_col, width = 3, 1, 4
    sents, labels = [], []
    for i, row in enumerate(rows, start=2 if task == "sst2" else 1):
        if len(row) != width or row[l_col] not in ("0", "1"):
            raise ValueError(f"{path} line {i}: expected {width} tab-separated columns with a 0/1 label, "
                             f"got {row[:4]!r}; is this the GLUE {TASKS[task][0]} file?")
        sents.append(row[s_col])
        labels.append(int(row[l_col]))
    if not sents:
        raise ValueError(f"{path} has no examples")
    return sents, labels


def load_glue(task: str, glue_dir: str | None) -> dict[str, tuple[list[str], list[int]]]:
    """{'train': (sentences, labels), 'dev': (...)} from a local GLUE folder or, if None, the hub."""
    check_task(task)
    if glue_dir:
        folder = os.path.join(glue_dir, TASKS[task][0])
        return {split: read_glue_tsv(os.path.join(folder, f"{split}.tsv"), task) for split in ("train", "dev")}
    import datasets
    try:
        ds = datasets.load_dataset("nyu-mll/glue", task)
    except Exception as e:  # offline, or the hub moved: say what to do instead
        raise RuntimeError(f"could not load GLUE {task} from the hub ({type(e).__name__}: {e}). Offline? "
                           "Pass --glue_dir=PATH (or set GLUE_DIR) to a local GLUE folder") from e
    return {ours: (list(ds[theirs]["sentence"]), list(ds[theirs]["label"]))
            for ours, theirs in (("train", "train"), ("dev", "validation"))}


class Batches:
    """Tokenised once; each batch padded to its own longest sequence; seeded order per epoch."""

    def __init__(self, sents, labels, tokenizer, max_length: int, batch_size: int, pad_id: int):
        enc = tokenizer(list(sents), truncation=True, max_length=max_length)
        self.ids = [torch.tensor(x) for x in enc["input_ids"]]
        self.labels = torch.tensor(labels)
        self.batch_size, self.pad_id = batch_size, pad_id

    def __len__(self):
        return (len(self.ids) + self.batch_size - 1) // self.batch_size

    def epoch(self, seed: int | None = None):
        """Yield batches; shuffled with torch.Generator(seed) if seed is given, in file order if None."""
        n = len(self.ids)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if seed is not None \
            else torch.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i:i + self.batch_size].tolist()
            seqs = [self.ids[j] for j in idx]
            ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=self.pad_id)
            lengths = torch.tensor([len(s) for s in seqs])
            mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()  # B × L
            yield {"input_ids": ids, "attention_mask": mask, "labels": self.labels[idx]}


def make_batches(task, glue_dir, tokenizer, max_length, batch_size, max_train=0, max_eval=0, seed=0):
    """(train Batches, dev Batches). max_train > 0 keeps a seeded random subset of the training set."""
    data = load_glue(task, glue_dir)
    sents, labels = data["train"]
    if 0 < max_train < len(sents):
        keep = torch.randperm(len(sents), generator=torch.Generator().manual_seed(seed))[:max_train].tolist()
        sents, labels = [sents[i] for i in keep], [labels[i] for i in keep]
    dev_s, dev_l = data["dev"]
    if 0 < max_eval < len(dev_s):  # for tests only: the reported numbers use the whole dev set
        dev_s, dev_l = dev_s[:max_eval], dev_l[:max_eval]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return (Batches(sents, labels, tokenizer, max_length, batch_size, pad),
            Batches(dev_s, dev_l, tokenizer, max_length, batch_size, pad))
