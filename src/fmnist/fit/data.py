"""Finding, downloading, checking and loading the Fashion-MNIST IDX files.

Everything here fails loudly with :class:`DataError`: a half-read or silently wrong data set would poison
every number the package reports, so each file is parsed strictly and (by default) checked against the
SHA-256 of its decompressed content, which is the same whether it came gzipped from the mirror, from the
Debian package, or was gunzipped by the user.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import struct
import sys
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fmnist.core.errors import FmnistError, InputError
from fmnist.core.preprocess import preprocess_array
from fmnist.core.progress import Bar, interactive

if TYPE_CHECKING:
    import torch

FILES = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "fmnist"
MIRROR = os.environ.get("FMNIST_MIRROR", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")

# Which official file fills which field of FashionMNIST.
_ROLES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_MAGIC = {0x00000801: 1, 0x00000803: 3}  # uint8 labels (1-D) and uint8 images (3-D): all this data set uses
_HOW_TO_GET = (
    "To get good data: install the Debian package (sudo apt-get install dataset-fashion-mnist), "
    "or point --data-dir / FMNIST_DATA at a folder holding the four files (NAME or NAME.gz), "
    f"or let fmnist download them into {CACHE_DIR} (needs network; mirror set by FMNIST_MIRROR)."
)


class DataError(FmnistError):
    """Data missing, unreadable or wrong; the message names the file and how to get good data."""


def _fail(what: str) -> DataError:
    return DataError(f"{what}\n{_HOW_TO_GET}")


#: Largest IDX payload read (ten times the official training images, 47 MB): a header asking for more is
#: refused before anything is allocated or decompressed.
MAX_IDX_BYTES = 512 * 2**20
_DEFLATE_MAX_RATIO = 1032  # deflate cannot expand data more than this: bounds what a .gz file can hold
_CHUNK = 1 << 20


def _read(path, expected_sha256: str | None = None) -> tuple[np.ndarray, str]:
    """Parse one IDX file; return (array, sha256 of the decompressed bytes).

    The file is streamed: the header is read (and checked) first, and no more bytes are decompressed than it
    announces plus one, so a small ``.gz`` that would expand to gigabytes costs nothing.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # Decide by content, not by name: users gunzip files or save them under the other name.
            zipped = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            size = os.fstat(f.fileno()).st_size
            if zipped:
                with gzip.GzipFile(fileobj=f, mode="rb") as stream:
                    return _parse(path, stream, size, zipped, expected_sha256)
            return _parse(path, f, size, zipped, expected_sha256)
    except FileNotFoundError:
        raise _fail(f"{path}: file not found.") from None
    except (OSError, EOFError, zlib.error) as exc:  # unreadable, or a truncated/corrupt gzip stream
        raise _fail(f"{path}: cannot read or decompress ({exc}).") from None


def _read_up_to(stream, n: int) -> bytes:
    """Up to ``n`` bytes: fewer only at the end of the stream."""
    parts, got = [], 0
    while got < n and (part := stream.read(n - got)):
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _parse(path: Path, stream, size: int, zipped: bool, expected_sha256: str | None) -> tuple[np.ndarray, str]:
    sha = hashlib.sha256()
    head = _read_up_to(stream, 4)
    sha.update(head)
    if len(head) < 4:
        raise _fail(f"{path}: too short for an IDX header ({len(head)} bytes).")
    (magic,) = struct.unpack(">I", head)
    if magic not in _MAGIC:
        raise _fail(f"{path}: not a uint8 IDX label/image file (magic 0x{magic:08x}, "
                    "expected 0x00000801 or 0x00000803).")
    ndim = _MAGIC[magic]
    header = 4 + 4 * ndim
    rest = _read_up_to(stream, header - 4)
    sha.update(rest)
    if len(rest) < header - 4:
        raise _fail(f"{path}: truncated header ({4 + len(rest)} bytes, need {header}).")
    dims = struct.unpack(f">{ndim}I", rest)
    if ndim == 3 and (dims[1] == 0 or dims[2] == 0):
        raise _fail(f"{path}: bad image dimensions {dims}.")
    payload = int(np.prod(dims, dtype=np.int64))
    want = header + payload
    # What the file can hold at most: its size, or what deflate can expand it to.
    room = size * _DEFLATE_MAX_RATIO if zipped else size
    if payload > MAX_IDX_BYTES or want > room:
        why = (f"more than the {MAX_IDX_BYTES:,} bytes this loader accepts" if payload > MAX_IDX_BYTES else
               f"more than a {size:,}-byte {'gzip ' if zipped else ''}file can hold")
        raise _fail(f"{path}: wrong length, header says {dims} -> {want:,} bytes, {why}.")
    out = np.empty(payload, dtype=np.uint8)  # writable, as torch.from_numpy wants
    view, got = memoryview(out), 0
    while got < payload and (n := stream.readinto(view[got:got + _CHUNK])):
        got += n
    sha.update(view[:got])
    extra = stream.read(1)
    if got < payload or extra:
        # Both shorter (truncated) and longer (wrong dims or appended junk) mean we cannot trust it.
        has = f"{header + got:,} bytes" if not extra else "more"
        raise _fail(f"{path}: wrong length, header says {dims} -> {want} bytes, file has {has}.")
    digest = sha.hexdigest()
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise _fail(f"{path}: checksum mismatch, expected sha256 {expected_sha256}, got {digest} "
                    "(file is corrupt, truncated or a different data set).")
    return out.reshape(dims), digest


def read_idx(path, expected_sha256: str | None = None) -> np.ndarray:
    """Read a uint8 IDX file (gzipped or raw) strictly; :class:`DataError` on any problem."""
    return _read(path, expected_sha256)[0]


def write_idx(path, array) -> None:
    """Write a 1-D (labels) or 3-D (images) uint8 IDX file, gzipped if ``path`` ends in ``.gz``."""
    a = array.numpy() if hasattr(array, "numpy") and not isinstance(array, np.ndarray) else np.asarray(array)
    if a.ndim not in (1, 3):
        raise InputError(f"IDX arrays here are 1-D labels or 3-D images, got shape {a.shape}")
    if a.dtype != np.uint8:
        if a.size and (not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() > 255):
            raise InputError(f"values must be integers in 0..255 to write uint8 IDX (dtype {a.dtype})")
        a = a.astype(np.uint8)
    data = struct.pack(f">I{a.ndim}I", 0x800 + a.ndim, *a.shape) + np.ascontiguousarray(a).tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)  # mtime=0: same array -> same bytes
    path.write_bytes(data)


def _file_in(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):  # raw first: no decompression needed
        if candidate.is_file():
            return candidate
    return None


def find_data_dir(data_dir=None, download: bool = True, files: dict | None = None) -> Path:
    """Return the folder to load from: ``data_dir``, else $FMNIST_DATA, else SYSTEM_DIR, else CACHE_DIR."""
    names = list(files or FILES)
    origin = "data_dir / --data-dir" if data_dir is not None else "FMNIST_DATA"
    named = data_dir if data_dir is not None else (os.environ.get("FMNIST_DATA") or None)
    if named is not None:
        # The user chose this folder: falling through to another one would hide their mistake.
        folder = Path(named).expanduser()
        if not folder.is_dir():
            raise _fail(f"Data folder {folder} (from {origin}) does not exist.")
        missing = [n for n in names if _file_in(folder, n) is None]
        if missing:
            raise _fail(f"Data folder {folder} (from {origin}) lacks {', '.join(missing)} (or .gz).")
        return folder
    for folder in (SYSTEM_DIR, CACHE_DIR):
        if all(_file_in(folder, n) for n in names):
            return folder
    if not download:
        raise _fail(f"Fashion-MNIST not found in {SYSTEM_DIR} or {CACHE_DIR}, and downloading is off.")
    globals()["download"](CACHE_DIR, names=names, files=files)  # the parameter shadows the function
    return CACHE_DIR


def download(dest_dir, mirror: str | None = None, names=None, progress=None,
             files: dict | None = None) -> None:
    """Fetch ``NAME.gz`` for every missing file into ``dest_dir``, verified and atomically renamed.

    ``progress``: None = a tqdm bar per file on a terminal, else one line on stderr; False = silent;
    or a callable ``(name, bytes_done, bytes_total_or_None)``.
    """
    files = files or FILES
    mirror = (mirror or MIRROR).rstrip("/") + "/"
    dest = Path(dest_dir).expanduser()
    todo = [n for n in (names or files) if _file_in(dest, n) is None]
    if not todo:
        return
    unknown = [n for n in todo if n not in files]
    if unknown:
        raise InputError(f"no checksum known for {unknown}; refusing to download unverifiable files")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _fail(f"Cannot create download folder {dest} ({exc}).") from None
    bar = progress is None and interactive()
    if progress is None and not bar:
        print(f"fmnist: downloading {len(todo)} Fashion-MNIST file(s) from {mirror} into {dest}",
              file=sys.stderr)
    report = progress if callable(progress) else None
    for name in todo:
        url = f"{mirror}{name}.gz"
        # Temp file in the destination folder so os.replace is an atomic same-filesystem rename: a crash or a
        # bad download never leaves a file that a later run would mistake for good data.
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    with urllib.request.urlopen(url, timeout=60) as resp:
                        total = int(resp.headers.get("Content-Length") or 0) or None
                        done = 0
                        with Bar(total, f"{name}.gz", unit="B", enabled=True if bar else False) as shown:
                            while chunk := resp.read(1 << 18):
                                out.write(chunk)
                                done += len(chunk)
                                shown.update(len(chunk))
                                if report:
                                    report(name, done, total)
                except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError is an OSError
                    raise _fail(f"Download of {name} from {url} failed: {exc}.") from None
            try:
                _read(tmp, files[name])
            except DataError as exc:
                raise DataError(f"Downloaded {url} is not good data: {exc}") from None
            os.replace(tmp, dest / f"{name}.gz")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


@dataclass
class FashionMNIST:  # PyTorch tensors: training works on them (reading IDX files for `predict` needs no PyTorch)
    train_images: torch.Tensor  # uint8 (60000, 28, 28)
    train_labels: torch.Tensor  # int64 (60000,)
    test_images: torch.Tensor  # uint8 (10000, 28, 28)
    test_labels: torch.Tensor  # int64 (10000,)
    source: str  # directory used
    checksums: dict  # name -> sha256 of the decompressed content


def load_fashion_mnist(data_dir=None, download: bool = True, verify: bool = True, files: dict = FILES
                       ) -> FashionMNIST:
    """Find (and if needed download) the data, check it, and return it as in-memory uint8/int64 tensors."""
    folder = find_data_dir(data_dir, download=download, files=files)
    arrays, checksums = {}, {}
    for role, name in _ROLES.items():
        path = _file_in(folder, name)
        arrays[role], checksums[name] = _read(path, files[name] if verify else None)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        img_path = _file_in(folder, _ROLES[f"{split}_images"])
        lab_path = _file_in(folder, _ROLES[f"{split}_labels"])
        # These matter even without checksums (verify=False or user-supplied sets): a swapped or mismatched
        # file would otherwise surface as a shape error deep inside training.
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise _fail(f"{img_path}: expected images of shape (N, 28, 28), got {images.shape}.")
        if labels.ndim != 1 or len(labels) != len(images):
            raise _fail(f"{lab_path}: {labels.shape} labels for {len(images)} images in {img_path}.")
        if labels.size and labels.max() > 9:
            raise _fail(f"{lab_path}: label {labels.max()} outside the 10 classes 0..9.")
    import torch

    return FashionMNIST(
        train_images=torch.from_numpy(arrays["train_images"]),
        train_labels=torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        test_images=torch.from_numpy(arrays["test_images"]),
        test_labels=torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        source=str(folder),
        checksums=checksums,
    )


def stratified_split(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (train_idx, val_idx), each class in proportion, deterministic for ``seed``."""
    import torch

    labels = torch.as_tensor(labels).reshape(-1)
    n = len(labels)
    if not 0 <= val_size < n:
        raise InputError(f"val_size must be in [0, {n}) for {n} examples, got {val_size}")
    classes, counts = torch.unique(labels, return_counts=True)
    # Largest-remainder rounding: each class gets floor(share) or floor(share)+1, summing to exactly val_size.
    share = counts.double() * val_size / n
    take = share.floor().long()
    leftover = val_size - int(take.sum())
    order = sorted(range(len(classes)), key=lambda i: (-(share[i] - take[i]).item(), i))
    for i in order[:leftover]:
        take[i] += 1
    gen = torch.Generator().manual_seed(seed)  # own generator: independent of (and not disturbing) global RNG
    train, val = [], []
    for c, k in zip(classes, take):
        idx = (labels == c).nonzero().reshape(-1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def split_indices(labels: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """The (train_idx, val_idx) of a run, from its training config (a TrainConfig or the dict of config.json).

    The one place the split is computed: training, the trust fit and `fmnist calibrate` all call it, so they
    always agree on which images are validation.
    """
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    train_idx, val_idx = stratified_split(labels, int(get("val_size", 10_000)), int(get("seed", 0)))
    if get("subset", 0):
        train_idx = train_idx[: int(get("subset"))]
    return train_idx, val_idx


def preprocess(x, spec: dict | None = None) -> torch.Tensor:
    """:func:`~fmnist.core.preprocess.preprocess_array` as a PyTorch tensor (shared memory, no copy), for training
    and evaluation."""
    import torch

    return torch.from_numpy(preprocess_array(x, spec))
