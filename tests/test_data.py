"""GLUE loading: the shared files' counts and labels, clear errors for bad folders, batching."""
import os
import shutil

import pytest
import torch

from data import Batches, check_task, load_glue, read_glue_tsv


def test_shared_glue_counts_and_labels(glue_dir):
    sst2, cola = load_glue("sst2", glue_dir), load_glue("cola", glue_dir)
    counts = {(t, s): (len(d[s][0]), sum(d[s][1])) for t, d in (("sst2", sst2), ("cola", cola))
              for s in ("train", "dev")}
    # (rows, positives) from shared/data/README.md
    assert counts == {("sst2", "train"): (67_349, 37_569), ("sst2", "dev"): (872, 444),
                      ("cola", "train"): (8_551, 6_023), ("cola", "dev"): (1_043, 721)}
    assert all(isinstance(s, str) and s for s in sst2["train"][0][:100] + cola["dev"][0][:100])
    assert any('"' in s or "'" in s for s in cola["train"][0])  # quotes survive (QUOTE_NONE)


def test_missing_and_malformed_files(tmp_path, glue_dir):
    with pytest.raises(FileNotFoundError, match="--glue_dir"):
        load_glue("sst2", str(tmp_path))
    os.makedirs(tmp_path / "CoLA")
    shutil.copy(os.path.join(glue_dir, "CoLA", "dev.tsv"), tmp_path / "CoLA" / "dev.tsv")
    (tmp_path / "CoLA" / "train.tsv").write_text("gj04\t1\t\tgood sentence .\nbroken line without tabs\n")
    with pytest.raises(ValueError, match="line 2: expected 4 tab-separated columns"):
        load_glue("cola", str(tmp_path))
    (tmp_path / "bad.tsv").write_text("text\tlabel\nhello\t1\n")
    with pytest.raises(ValueError, match="header"):
        read_glue_tsv(str(tmp_path / "bad.tsv"), "sst2")
    with pytest.raises(ValueError, match="unknown task 'mnli'"):
        check_task("mnli")


class CharTokenizer:  # a stand-in tokenizer: one id per character
    def __call__(self, sents, truncation, max_length):
        return {"input_ids": [[ord(c) % 50 + 2 for c in s][:max_length] for s in sents]}


def test_batches_pad_to_longest_and_seeded_order():
    sents = ["a", "bbbb", "cc", "ddddddd", "e"]
    b = Batches(sents, [0, 1, 0, 1, 0], CharTokenizer(), max_length=5, batch_size=2, pad_id=0)
    assert len(b) == 3
    batches = list(b.epoch(seed=None))
    assert batches[0]["input_ids"].shape == (2, 4) and batches[1]["input_ids"].shape == (2, 5)  # truncated to 5
    assert batches[0]["attention_mask"].tolist() == [[1, 0, 0, 0], [1, 1, 1, 1]]
    assert batches[2]["labels"].tolist() == [0]
    order = lambda seed: torch.cat([x["labels"] for x in b.epoch(seed)]).tolist() + \
        [x["input_ids"].sum().item() for x in b.epoch(seed)]
    assert order(3) == order(3) and order(3) != order(4)
