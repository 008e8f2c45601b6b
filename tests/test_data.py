"""GLUE loading: the shipped copy's checksums and counts, clear errors for bad files, batching, the
toy task."""
import hashlib
import os
import re
import shutil

import pytest
import torch

import data
from data import GLUE_DIR, Batches, check_task, load_glue, provenance, read_glue_tsv, synthetic


def readme_sha256() -> dict:
    """The digests glue/README.md lists, read from its `- SST-2/train.tsv `<hex>`` lines."""
    text = open(os.path.join(GLUE_DIR, "README.md")).read()
    return dict(re.findall(r"^- (\S+\.tsv) `([0-9a-f]{64})`$", text, re.M))


def test_the_codes_digests_are_the_readmes():
    """Bad case 1 (issue 31): the run-time check (data.SHA256) and glue/README.md list one set."""
    assert len(readme_sha256()) == 4 and data.SHA256 == readme_sha256()


@pytest.mark.slow
def test_shipped_glue_checksums_counts_and_labels():
    for name, want in readme_sha256().items():
        raw = open(os.path.join(GLUE_DIR, name), "rb").read()
        assert hashlib.sha256(raw).hexdigest() == want, name
    sst2, cola = load_glue("sst2"), load_glue("cola")  # the default: the copy in the repo
    counts = {(t, s): (len(d[s][0]), sum(d[s][1])) for t, d in (("sst2", sst2), ("cola", cola))
              for s in ("train", "dev")}
    assert counts == {("sst2", "train"): (67_349, 37_569), ("sst2", "dev"): (872, 444),
                      ("cola", "train"): (8_551, 6_023), ("cola", "dev"): (1_043, 721)}
    assert all(isinstance(s, str) and s for s in sst2["train"][0][:100] + cola["dev"][0][:100])
    assert any('"' in s or "'" in s for s in cola["train"][0])  # quotes survive (QUOTE_NONE)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="--glue_dir"):
        load_glue("sst2", str(tmp_path))
    os.makedirs(tmp_path / "CoLA")
    (tmp_path / "CoLA" / "dev.tsv").write_text("gj04\t1\t\tgood sentence .\n")
    good = "gj04\t1\t\tgood sentence .\n"
    (tmp_path / "CoLA" / "train.tsv").write_text(good + "broken line without tabs\n")
    with pytest.raises(ValueError, match="line 2: expected 4 tab-separated columns"):
        load_glue("cola", str(tmp_path))
    # Bad case 12: a bad byte on line 1001 is named on line 1001
    # (not by its offset in the decoder's chunk)
    lines = b"gj04\t1\t\tgood sentence .\n" * 1000 + b"gj04\t0\t*\tbad \xff .\n"
    (tmp_path / "CoLA" / "train.tsv").write_bytes(lines)
    with pytest.raises(ValueError, match=r"train.tsv line 1001: not UTF-8"):
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
    b = Batches.tokenize(sents, [0, 1, 0, 1, 0], CharTokenizer(), max_length=5, batch_size=2,
                         pad_id=0)
    assert len(b) == 3
    batches = list(b.batches(seed=None))  # evaluation order: by length (a, e, cc, bbbb, ddddd)
    # 7 characters truncated to 5
    assert [x["input_ids"].shape for x in batches] == [(2, 1), (2, 4), (1, 5)]
    assert batches[1]["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert [x["labels"].tolist() for x in batches] == [[0, 0], [0, 1], [1]]

    def order(seed):
        labels = torch.cat([x["labels"] for x in b.batches(seed)]).tolist()
        return labels + [x["input_ids"].sum().item() for x in b.batches(seed)]
    assert order(3) == order(3) and order(3) != order(4)


def test_synthetic_task_is_seeded_and_its_label_is_the_first_tokens_parity():
    train, dev = synthetic(100, 20, batch_size=8, seq_len=10, vocab=50, seed=1)
    assert (len(train.ids), len(dev.ids), len(train)) == (100, 20, 13)
    assert all(5 <= len(x) <= 10 and 3 <= int(x[0]) <= 10 and int(x.max()) < 50 for x in train.ids)
    assert train.labels.tolist() == [int(x[0]) % 2 for x in train.ids]
    again, _ = synthetic(100, 20, batch_size=8, seq_len=10, vocab=50, seed=1)
    other, _ = synthetic(100, 20, batch_size=8, seq_len=10, vocab=50, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(train.ids, again.ids))
    assert not all(len(a) == len(b) and torch.equal(a, b) for a, b in zip(train.ids, other.ids))


def test_length_grouped_batches_cover_every_example_once_and_cut_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 64, (1000,), generator=g).tolist()  # ~SST-2's spread
    b = Batches([[5] * k for k in lengths], [0] * 1000, batch_size=32, pad_id=0)
    padded = lambda order: sum(len(i) * int(b.lengths[i].max()) for i in order) / sum(lengths)
    for seed in (0, 1):
        grouped = b.order(seed)
        assert sorted(torch.cat(grouped).tolist()) == list(range(1000))  # each example exactly once
        assert [len(i) for i in grouped].count(32) == 31  # one partial batch
        assert padded(grouped) < 1.15 < 1.6 < padded(b.order(seed, group_by_length=False))
    key = lambda order: [i.tolist() for i in order]
    # seeded; epochs differ
    assert key(b.order(3)) == key(b.order(3)) and key(b.order(3)) != key(b.order(4))
    # evaluation: by length
    assert key(b.order(None)) == key(b.order(None)) and padded(b.order(None)) < 1.05


def test_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, matthews_corrcoef
    from record import metrics
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        y, p = torch.randint(0, 2, (200,), generator=g), torch.randint(0, 2, (200,), generator=g)
        m = metrics(p, y)
        assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
        assert m["mcc"] == pytest.approx(matthews_corrcoef(y, p))
    ones = torch.ones(10)  # one class
    assert metrics(ones, y[:10])["mcc"] == 0.0 == matthews_corrcoef(y[:10], ones)


def test_heldout_slice_is_fixed_disjoint_from_training_and_replaces_dev(monkeypatch):
    """Tuning evaluates on a fixed slice of train that no run of any seed trains on; dev is never
    read."""
    import data
    train = ([f"t{i}" for i in range(4000)], [i % 2 for i in range(4000)])
    splits = {"train": train, "dev": (["d"], [0])}
    monkeypatch.setattr(data, "load_glue", lambda task, glue_dir: splits)

    # a stand-in tokenizer: a sentence's characters, so sentences can be recovered from ids
    class Chars:
        pad_token_id = 0

        def __call__(self, sents, truncation, max_length):
            return {"input_ids": [[ord(c) for c in s] for s in sents]}
    text = lambda b: {"".join(map(chr, x.tolist())) for x in b.ids}
    held = {}
    for seed in (0, 1):
        tr, ev = data.make_batches("sst2", "", Chars(), 64, 32, max_train=3000, seed=seed,
                                   heldout=500)
        held[seed], trained = text(ev), text(tr)
        assert len(held[seed]) == 500 and len(trained) == 3000 and not held[seed] & trained
    # one fixed slice of train; dev ("d") unread
    assert held[0] == held[1] and held[0] <= set(train[0])
    with pytest.raises(ValueError, match="--heldout=4000 leaves no training data"):
        data.make_batches("sst2", "", Chars(), 64, 32, heldout=4000)


def test_a_changed_shipped_file_is_refused_and_ones_own_folder_recorded(tmp_path, monkeypatch):
    """Bad case 1 (issue 31): a shipped file truncated or with a label flipped in place was used
    silently. Here a copy of the shipped SST-2 stands in for it (data.GLUE_DIR): refused, naming the
    file and how to restore it; the same bytes in a folder of one's own are read and recorded."""
    shipped = tmp_path / "glue"
    shutil.copytree(os.path.join(GLUE_DIR, "SST-2"), shipped / "SST-2")
    monkeypatch.setattr(data, "GLUE_DIR", str(shipped))
    dev = shipped / "SST-2" / "dev.tsv"
    good = dev.read_bytes()
    flipped = good.replace(b"\t1\n", b"\t0\n", 1)  # one label flipped, the size unchanged
    dev.write_bytes(flipped)
    restore = "`git checkout -- glue/SST-2/dev.tsv`"
    with pytest.raises(ValueError, match=f"dev.tsv is not the shipped file .*{restore}"):
        load_glue("sst2")
    mine = tmp_path / "mine"
    shutil.copytree(shipped / "SST-2", mine / "SST-2")
    assert sum(load_glue("sst2", str(mine))["dev"][1]) == 443  # as it is: 444 positives less one
    sst2 = {k: v for k, v in readme_sha256().items() if k.startswith("SST-2")}
    digests = {"SST-2/train.tsv": sst2["SST-2/train.tsv"],  # an unchanged copy
               "SST-2/dev.tsv": hashlib.sha256(flipped).hexdigest()}
    assert provenance("sst2", str(mine)) == {"source": str(mine), "sha256": digests}
    dev.write_bytes(b"".join(good.splitlines(keepends=True)[:301]))  # `head -n 301` over the file
    with pytest.raises(ValueError, match=restore):
        load_glue("sst2", str(shipped))  # however the path names the shipped copy
    dev.write_bytes(good)  # restored
    assert len(load_glue("sst2")["dev"][0]) == 872
    assert provenance("sst2") == {"source": "shipped", "sha256": sst2}


def test_a_bom_a_nul_byte_and_a_giant_field_are_named(tmp_path):
    """Bad case 7 (issue 31): a sentence over 131,072 characters (`_csv.Error`, no file named); and
    the unclear cases: a UTF-8 BOM in train.tsv not named, a NUL byte accepted. Each is refused,
    naming the file (and line)."""
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\na fine film\t1\n" + "word " * 30_000 + "\t0\n")
    with pytest.raises(ValueError, match=r"train.tsv line 3: field larger than field limit"):
        read_glue_tsv(str(path), "sst2")
    path.write_text("\ufeffsentence\tlabel\na fine film\t1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="train.tsv starts with a UTF-8 byte-order mark"):
        read_glue_tsv(str(path), "sst2")
    path.write_text("gj04\t1\t\tgood .\ngj04\t1\t\tgo\0od .\n")
    with pytest.raises(ValueError, match="train.tsv line 2: a NUL byte"):
        read_glue_tsv(str(path), "cola")
