"""Reading a data set of one's own: a folder of IDX files, Kaggle-style CSV files, or a folder of images.

Every route returns one :class:`ImageSet`: uint8 images already in the model's format (28x28, light object on
black), labels 0..K-1, and the class names. Images that are not 28x28 (IDX or CSV images up to 64x64, image
files of any size) go through :func:`fmnist.core.preprocess.to_dataset_format`, the function that prepares
uploads, so that a model sees its training images and the server's uploads prepared alike.

Every problem is one :class:`~fmnist.fit.data.DataError` naming the file (and the line or image), raised
before anything is written: the image folder's array cache is written only once the whole set has been read.
NumPy and Pillow only.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import os
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmnist.fit.data import CACHE_DIR, DataError, FashionMNIST, read_idx

MAX_SIDE = 64  # largest image side accepted from IDX and CSV files
MIN_CLASSES, MAX_CLASSES = 2, 1000
MAX_NAME_LENGTH = 200
CLASSES_JSON = "classes.json"  # beside the data: class names, descriptions, whether mirror images are alike
CACHE_NAME = ".fmnist-arrays.npz"  # the image folder's arrays, beside the data
_CACHE_FORMAT = 1
_CSV_CHUNK = 4096  # rows parsed at once: the text of a chunk is the only text held
_SIZE = 28


@dataclass
class ImageSet:
    """A data set in the model's format, as NumPy arrays."""

    train_images: np.ndarray  # uint8 (N, 28, 28)
    train_labels: np.ndarray  # int64 (N,), 0..K-1
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    source: str  # what was read
    kind: str  # "idx", "csv" or "folder"
    mirror_symmetric: bool | None = None  # known from classes.json; None: not known
    descriptions: dict = field(default_factory=dict)  # class name -> sentence, from classes.json
    image_size: tuple[int, int] = (_SIZE, _SIZE)  # the size the images had in the files
    checksums: dict = field(default_factory=dict)


@dataclass
class Dataset(FashionMNIST):
    """A data set as training takes it (PyTorch tensors), with what it is: class names, whether its classes look
    the same mirrored, descriptions of the classes, and its name ("fashion-mnist" for the official set)."""

    class_names: tuple[str, ...] = ()
    mirror_symmetric: bool = False
    descriptions: dict = field(default_factory=dict)
    name: str = "custom"
    kind: str = "idx"
    image_size: tuple[int, int] = (28, 28)


# --- class names ---------------------------------------------------------------------------------------------


def _check_names(names: list[str], where: str) -> tuple[str, ...]:
    seen: dict[str, int] = {}
    for i, name in enumerate(names, 1):
        if not name:
            raise DataError(f"{where}: class name {i} is empty.")
        if len(name) > MAX_NAME_LENGTH:
            raise DataError(f"{where}: class name {i} is longer than {MAX_NAME_LENGTH} characters.")
        if any(unicodedata.category(c) == "Cc" for c in name):
            raise DataError(f"{where}: class name {i} ({name!r}) holds a control character.")
        key = unicodedata.normalize("NFC", name).casefold()
        if key in seen:
            raise DataError(f"{where}: duplicate class name {name!r} (names {seen[key]} and {i}); each class needs "
                            "its own name.")
        seen[key] = i
    return tuple(names)


def read_class_names(path) -> tuple[str, ...]:
    """Class names from a text file, one a line (UTF-8; surrounding spaces and a last empty line ignored)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the class names ({exc.strerror or exc}).") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: class names are not UTF-8 text (line {line}, byte {exc.start}).") from None
    lines = [s.strip() for s in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise DataError(f"{path}: no class names in the file.")
    return _check_names(lines, str(path))


def read_classes_json(path) -> dict:
    """``classes.json``: ``{"classes": [NAME or {"name": NAME, "description": TEXT}, ...],
    "mirror_symmetric": BOOL}``, each key optional; or a plain list of names. Returns ``{"names", "descriptions",
    "mirror_symmetric"}`` (None where not given)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text.") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as JSON ({exc}).") from None
    if isinstance(obj, list):
        obj = {"classes": obj}
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected an object with 'classes' (a list) and 'mirror_symmetric'.")
    names, descriptions = None, {}
    if "classes" in obj:
        items = obj["classes"]
        if not isinstance(items, list):
            raise DataError(f"{path}: 'classes' must be a list.")
        names = []
        for i, it in enumerate(items, 1):
            if isinstance(it, dict) and isinstance(it.get("name"), str):
                names.append(it["name"].strip())
                if isinstance(it.get("description"), str) and it["description"].strip():
                    descriptions[it["name"].strip()] = it["description"].strip()
            elif isinstance(it, str):
                names.append(it.strip())
            else:
                raise DataError(f"{path}: class {i} is neither a name nor {{\"name\": ..., \"description\": ...}}.")
        names = _check_names(names, str(path))
    sym = obj.get("mirror_symmetric")
    if sym is not None and not isinstance(sym, bool):
        raise DataError(f"{path}: 'mirror_symmetric' must be true or false.")
    return {"names": names, "descriptions": descriptions, "mirror_symmetric": sym}


# --- labels --------------------------------------------------------------------------------------------------


def _label_classes(train_labels: np.ndarray, test_labels: np.ndarray, names, where: str, test_where: str):
    """(train labels 0..K-1, test labels 0..K-1, names). Without names the classes are the distinct training
    labels in increasing order, named by their values; with K names, labels are 0..K-1, or, when the training
    set holds exactly K distinct labels, the i-th name is the i-th smallest label (EMNIST letters: 1..26)."""
    if train_labels.size == 0:
        raise DataError(f"{where}: no training images.")
    if test_labels.size == 0:
        raise DataError(f"{test_where}: no test images.")
    for labels, w in ((train_labels, where), (test_labels, test_where)):
        if labels.min() < 0:
            raise DataError(f"{w}: label {int(labels.min())} is negative; labels are class numbers 0, 1, ...")
    values = np.unique(train_labels)
    if names is None:
        if values.max() >= MAX_CLASSES:
            raise DataError(f"{where}: label {int(values.max())} out of range (at most {MAX_CLASSES} classes, "
                            f"labels 0..{MAX_CLASSES - 1}).")
        names = tuple(str(int(v)) for v in values)
    else:
        k = len(names)
        if values.max() < k:  # labels 0..K-1
            missing = sorted(set(range(k)) - set(values.tolist()))
            if missing:
                raise DataError(f"{where}: class {missing[0]} ({names[missing[0]]!r}) has no training images "
                                f"({len(missing)} such class(es)).")
            values = np.arange(k)
        elif len(values) != k:
            raise DataError(f"{where}: label {int(values.max())} out of range for the {k} class names "
                            f"(labels 0..{k - 1}).")
    if not MIN_CLASSES <= len(values) <= MAX_CLASSES:
        raise DataError(f"{where}: {len(values)} class(es); a classifier needs {MIN_CLASSES} to {MAX_CLASSES}.")
    test_values = np.unique(test_labels)
    extra = np.setdiff1d(test_values, values)
    if extra.size:
        raise DataError(f"{test_where}: the test set's classes differ from training: label {int(extra[0])} "
                        f"is not among the training labels ({len(extra)} such label(s)).")
    absent = np.setdiff1d(values, test_values)
    if absent.size:
        i = int(np.searchsorted(values, absent[0]))
        raise DataError(f"{test_where}: class {names[i]!r} (label {int(absent[0])}) has no test images; the "
                        f"test set must hold every class ({absent.size} missing).")
    return (np.searchsorted(values, train_labels).astype(np.int64),
            np.searchsorted(values, test_labels).astype(np.int64), tuple(names))


# --- converting images to the model's size -------------------------------------------------------------------


def _progress(total: int, desc: str, progress):
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else bool(progress)
    return tqdm(total=total, desc=desc, unit="img", disable=not show, leave=False)


def to_model_size(images: np.ndarray, progress=None, desc: str = "converting") -> np.ndarray:
    """uint8 (N, H, W) images in the model's 28x28 format: as they are when 28x28, else each through
    :func:`to_dataset_format`."""
    if images.shape[1:] == (_SIZE, _SIZE):
        return images
    from fmnist.core.preprocess import to_dataset_format

    out = np.empty((len(images), _SIZE, _SIZE), np.uint8)
    with _progress(len(images), desc, progress) as bar:
        for i, im in enumerate(images):
            out[i] = to_dataset_format(im)
            bar.update(1)
    return out


def _check_side(h: int, w: int, where: str) -> None:
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise DataError(f"{where}: images of {h}x{w} pixels; this reader takes images up to {MAX_SIDE}x{MAX_SIDE} "
                        "(larger ones: an image folder).")


# --- IDX folder ----------------------------------------------------------------------------------------------

_IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


def find_idx_files(folder: Path) -> dict | None:
    """The four IDX files of a folder by role: the official names (or .gz), else the one file whose name holds
    train/test (or t10k) and images/labels (or idx3/idx1), as EMNIST's and KMNIST's copies are named; None when
    the folder holds no IDX file at all."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and "idx" in p.name.lower()]
    if not files:
        return None
    found = {}
    for role, official in _IDX_NAMES.items():
        exact = [p for p in files if p.name in (official, official + ".gz")]
        if exact:
            found[role] = exact[0]
            continue
        split, what = role.split("_")
        hits = [p for p in files
                if (("train" in p.name.lower()) == (split == "train"))
                and (split == "train" or any(s in p.name.lower() for s in ("test", "t10k")))
                and (("idx3" in p.name.lower() or "image" in p.name.lower()) if what == "images"
                     else ("idx1" in p.name.lower() or "label" in p.name.lower()))]
        if len(hits) != 1:
            raise DataError(f"{folder}: cannot tell which file holds the {split} {what}: "
                            + (f"{len(hits)} candidates ({', '.join(p.name for p in hits)})" if hits else "none")
                            + f"; name it {official} (or .gz).")
        found[role] = hits[0]
    return found


def read_idx_folder(folder, names=None, progress=None, verify: dict | None = None) -> ImageSet:
    """A folder of four IDX files: images of any size up to 64x64, 2 to 1,000 classes."""
    folder = Path(folder)
    files = find_idx_files(folder)
    if files is None:
        raise DataError(f"{folder}: no IDX files in the folder.")
    arrays = {}
    for role, path in files.items():
        official = _IDX_NAMES[role]
        arrays[role] = read_idx(path, (verify or {}).get(official))
    for split in ("train", "test"):
        im, lab = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if im.ndim != 3:
            raise DataError(f"{files[f'{split}_images']}: not an image file (shape {im.shape}).")
        if lab.ndim != 1 or len(lab) != len(im):
            raise DataError(f"{files[f'{split}_labels']}: {lab.shape} labels for {len(im)} images in "
                            f"{files[f'{split}_images'].name}.")
        _check_side(im.shape[1], im.shape[2], str(files[f"{split}_images"]))
    tr, te = arrays["train_images"], arrays["test_images"]
    if tr.shape[1:] != te.shape[1:]:
        raise DataError(f"{folder}: images of mixed sizes: {tr.shape[1]}x{tr.shape[2]} in "
                        f"{files['train_images'].name}, {te.shape[1]}x{te.shape[2]} in {files['test_images'].name}.")
    ytr, yte, names = _label_classes(arrays["train_labels"].astype(np.int64), arrays["test_labels"].astype(np.int64),
                                     names, str(files["train_labels"]), str(files["test_labels"]))
    return ImageSet(to_model_size(tr, progress, "train images"), ytr, to_model_size(te, progress, "test images"),
                    yte, names, str(folder), "idx", image_size=tuple(tr.shape[1:]))


# --- CSV -----------------------------------------------------------------------------------------------------


def _open_text(path: Path):
    with open(path, "rb") as f:
        zipped = f.read(2) == b"\x1f\x8b"
    raw = gzip.open(path, "rb") if zipped else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


def _diagnose(chunk: list[tuple[int, str]], cols: int, path: Path) -> DataError:
    """The first bad line of a chunk that failed to parse, in words."""
    for n, line in chunk:
        fields = line.rstrip("\r\n").split(",")
        if len(fields) != cols:
            return DataError(f"{path}, line {n}: {len(fields)} columns, expected {cols} (a label, then "
                             f"{cols - 1} pixels, as on the first line).")
        try:
            int(fields[0])
        except ValueError:
            return DataError(f"{path}, line {n}: label {fields[0].strip()!r} is not an integer.")
        for j, v in enumerate(fields[1:], 1):
            try:
                x = int(v)
            except ValueError:
                return DataError(f"{path}, line {n}: pixel {j} ({v.strip()!r}) is not an integer 0..255.")
            if not 0 <= x <= 255:
                return DataError(f"{path}, line {n}: pixel {j} is {x}, outside 0..255.")
    return DataError(f"{path}, lines {chunk[0][0]}..{chunk[-1][0]}: cannot parse them.")


def read_csv(path) -> tuple[np.ndarray, np.ndarray]:
    """A CSV in Kaggle's layout (``label,pixel1,...,pixelN``, one image a row, an optional header line;
    gzipped or not) as (uint8 (N, S, S) images, int64 labels). Streamed in chunks of rows: the text of one
    chunk is all of the text held at once."""
    path = Path(path)
    images, labels = [], []
    try:
        with _open_text(path) as f:
            first = f.readline()
            if not first.strip():
                raise DataError(f"{path}: the file is empty.")
            header = not first.split(",", 1)[0].strip().lstrip("-").isdigit()
            cols = first.count(",") + 1
            side = int(round((cols - 1) ** 0.5))
            if cols < 5 or side * side != cols - 1:
                raise DataError(f"{path}, line 1: {cols} columns; expected a label and a square image's pixels "
                                "(785 for 28x28: label,pixel1,...,pixel784).")
            _check_side(side, side, str(path))
            pending = [] if header else [(1, first)]
            numbered = enumerate(f, 2)
            while True:
                chunk = pending + list(itertools.islice(numbered, _CSV_CHUNK - len(pending)))
                pending = []
                if not chunk:
                    break
                chunk = [(n, ln) for n, ln in chunk if ln.strip()]  # blank lines (the last one) carry nothing
                if not chunk:
                    continue
                try:
                    a = np.loadtxt([ln for _, ln in chunk], delimiter=",", dtype=np.int64, ndmin=2)
                    ok = a.shape[1] == cols and a[:, 1:].min() >= 0 and a[:, 1:].max() <= 255
                except ValueError:
                    ok = False
                if not ok:
                    raise _diagnose(chunk, cols, path)
                labels.append(a[:, 0].copy())
                images.append(a[:, 1:].astype(np.uint8).reshape(-1, side, side))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason}).") from None
    except FileNotFoundError:
        raise DataError(f"{path}: file not found.") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read it ({exc}).") from None
    if not images:
        raise DataError(f"{path}: a header and no rows.")
    return np.concatenate(images), np.concatenate(labels)


def read_csv_pair(train_csv, test_csv, names=None, progress=None) -> ImageSet:
    xtr, ytr = read_csv(train_csv)
    xte, yte = read_csv(test_csv)
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(f"{test_csv}: images of {xte.shape[1]}x{xte.shape[2]}, but {xtr.shape[1]}x{xtr.shape[2]} in "
                        f"{train_csv}.")
    ytr, yte, names = _label_classes(ytr, yte, names, str(train_csv), str(test_csv))
    return ImageSet(to_model_size(xtr, progress, "train images"), ytr, to_model_size(xte, progress, "test images"),
                    yte, names, f"{train_csv},{test_csv}", "csv", image_size=tuple(xtr.shape[1:]))


def find_csv_pair(folder: Path) -> tuple[Path, Path] | None:
    """The training and test CSV files of a folder (names holding 'train' and 'test'), or None."""
    csvs = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name.lower().endswith((".csv", ".csv.gz"))]
    if not csvs:
        return None
    train = [p for p in csvs if "train" in p.name.lower()]
    test = [p for p in csvs if "test" in p.name.lower() and "train" not in p.name.lower()]
    if len(train) != 1 or len(test) != 1:
        raise DataError(f"{folder}: {len(csvs)} CSV file(s), but not one whose name holds 'train' and one 'test' "
                        "(name them so, or give --data TRAIN.csv --test-data TEST.csv).")
    return train[0], test[0]


# --- image folder --------------------------------------------------------------------------------------------


def _natural(names: list[str]) -> list[str]:
    if all(n.isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _class_dirs(split_dir: Path) -> dict[str, list[Path]]:
    out = {}
    for d in split_dir.iterdir():
        if not d.is_dir() or d.name.startswith("."):
            continue
        try:
            d.name.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{split_dir}: the name of folder {d.name.encode('utf-8', 'surrogateescape')!r} is not "
                            "UTF-8; class names come from folder names.") from None
        out[d.name] = sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
    return out


def _manifest(splits: dict) -> tuple[str, int]:
    """A digest of every image's path, size and modification time, and the number of images."""
    h, n = hashlib.sha256(f"fmnist-arrays {_CACHE_FORMAT}".encode()), 0
    for split, classes in splits.items():
        for name, files in classes.items():
            for p in files:
                st = p.stat()
                h.update(f"{split}/{name}/{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
                n += 1
    from fmnist import __version__

    h.update(__version__.encode())
    return h.hexdigest(), n


def _cache_paths(root: Path) -> list[Path]:
    key = hashlib.sha256(str(root.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return [root / CACHE_NAME, CACHE_DIR / "folders" / f"{key}.npz"]


def _load_cache(root: Path, digest: str):
    for path in _cache_paths(root):
        if not path.is_file():
            continue
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["digest"]) != digest:
                    continue
                return {k: z[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}
        except Exception:  # noqa: BLE001 - a damaged cache is read again from the images
            continue
    return None


def _save_cache(root: Path, digest: str, arrays: dict) -> Path | None:
    for path in _cache_paths(root):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.savez(f, digest=np.array(digest), **arrays)
            os.replace(tmp, path)
            return path
        except OSError:
            try:
                tmp.unlink()
            except (OSError, UnboundLocalError):
                pass
    return None


def _decode_all(files: list[tuple[Path, int]], root: Path, progress, desc: str) -> np.ndarray:
    from fmnist.core.images import ImageError, decode_image
    from fmnist.core.preprocess import to_dataset_format

    out = np.empty((len(files), _SIZE, _SIZE), np.uint8)
    bad: list[tuple[Path, str]] = []
    with _progress(len(files), desc, progress) as bar:
        for i, (p, _) in enumerate(files):
            try:
                out[i] = to_dataset_format(decode_image(p))
            except (ImageError, OSError, ValueError) as exc:
                bad.append((p, str(exc)))
            bar.update(1)
    if bad:
        p, why = bad[0]
        more = f"; {len(bad) - 1} other image(s) of the {len(files):,} cannot be read either" if len(bad) > 1 else (
            f"; the other {len(files) - 1:,} image(s) read fine")
        raise DataError(f"{p}: cannot read the image ({why}){more}. Remove or replace it; nothing was written.")
    return out


def read_image_folder(root, names=None, progress=None, cache: bool = True) -> ImageSet:
    """``root/train/CLASS/*`` and ``root/test/CLASS/*``: any image format the server decodes, any size, each
    image through :func:`to_dataset_format`. Class names are the folder names (numbers in numeric order,
    others alphabetically), unless ``names`` gives them in that order. The arrays are cached beside the data
    (or in the user cache when the folder is not writable), keyed by every file's size and modification time."""
    root = Path(root)
    splits = {}
    for split in ("train", "test"):
        d = root / split
        if not d.is_dir():
            raise DataError(f"{root}: no {split}/ folder (an image folder holds train/CLASS/* and test/CLASS/*).")
        classes = _class_dirs(d)
        if not classes:
            raise DataError(f"{d}: empty folder: no class folders (train/CLASS/* and test/CLASS/*).")
        splits[split] = classes
    order = _natural(list(splits["train"]))
    empty = [c for c in order if not splits["train"][c]]
    if empty:
        raise DataError(f"{root / 'train' / empty[0]}: empty folder: the class has no training images.")
    extra = sorted(set(splits["test"]) - set(order))
    if extra:
        raise DataError(f"{root / 'test'}: the test set's classes differ from training: {extra[0]!r} is not a "
                        f"class of train/ ({len(extra)} such folder(s)).")
    no_test = [c for c in order if not splits["test"].get(c)]
    if no_test:
        raise DataError(f"{root / 'test'}: class {no_test[0]!r} has no test images ({len(no_test)} class(es) "
                        "without any).")
    folder_names = _check_names(order, str(root / "train"))
    if names is not None and len(names) != len(order):
        raise DataError(f"{root}: {len(names)} class names given for the {len(order)} class folders.")
    if not MIN_CLASSES <= len(order) <= MAX_CLASSES:
        raise DataError(f"{root / 'train'}: {len(order)} class folder(s); a classifier needs {MIN_CLASSES} to "
                        f"{MAX_CLASSES}.")
    splits = {s: {c: splits[s][c] for c in order} for s in splits}
    digest, _ = _manifest(splits)
    arrays = _load_cache(root, digest) if cache else None
    if arrays is None:
        arrays = {}
        for split, classes in splits.items():
            files = [(p, k) for k, c in enumerate(order) for p in classes[c]]
            arrays[f"{split}_images"] = _decode_all(files, root, progress, f"{split} images")
            arrays[f"{split}_labels"] = np.array([k for _, k in files], np.int64)
        if cache:
            _save_cache(root, digest, arrays)
    return ImageSet(arrays["train_images"], arrays["train_labels"].astype(np.int64), arrays["test_images"],
                    arrays["test_labels"].astype(np.int64), tuple(names) if names else folder_names, str(root),
                    "folder", image_size=(_SIZE, _SIZE))


# --- one entry point -----------------------------------------------------------------------------------------


def read_dataset(path, test_path=None, class_names=None, progress=None, cache: bool = True) -> ImageSet:
    """Read ``path`` by what it is: a CSV file (with ``test_path``), or a folder holding the four IDX files,
    train/ and test/ image folders, or a training and a test CSV. ``class_names``: a names file, or a list.
    A ``classes.json`` beside the data gives names (when ``class_names`` does not), descriptions and whether
    the classes look the same mirrored."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder.")
    names = read_class_names(class_names) if isinstance(class_names, (str, os.PathLike)) else (
        _check_names(list(class_names), "class names") if class_names is not None else None)
    folder = path if path.is_dir() else path.parent
    extra = read_classes_json(folder / CLASSES_JSON) if (folder / CLASSES_JSON).is_file() else {
        "names": None, "descriptions": {}, "mirror_symmetric": None}
    names = names if names is not None else extra["names"]
    if path.is_file():
        if test_path is None:
            raise DataError(f"{path}: a CSV file is the training set; give the test set too (--test-data TEST.csv).")
        out = read_csv_pair(path, Path(test_path).expanduser(), names, progress)
    elif test_path is not None:
        raise DataError(f"{path}: --test-data goes with a training CSV file, not a folder.")
    elif (path / "train").is_dir() or (path / "test").is_dir():
        out = read_image_folder(path, names, progress, cache)
    elif find_idx_files(path) is not None:
        out = read_idx_folder(path, names, progress)
    elif (pair := find_csv_pair(path)) is not None:
        out = read_csv_pair(*pair, names, progress)
    else:
        entries = [p for p in path.iterdir() if not p.name.startswith(".")]
        raise DataError(f"{path}: " + ("empty folder" if not entries else "neither IDX files, train/ and test/ "
                                       "image folders, nor a training and a test CSV")
                        + "; see docs/your-data.md for the layouts fmnist reads.")
    out.mirror_symmetric = extra["mirror_symmetric"]
    out.descriptions = {k: v for k, v in extra["descriptions"].items() if k in out.class_names}
    return out


# --- as training takes it ------------------------------------------------------------------------------------

FASHION_MNIST = "fashion-mnist"


def _is_official(folder: Path) -> bool:
    """True when ``folder``'s four IDX files are the official Fashion-MNIST ones (by SHA-256 of their content)."""
    from fmnist.fit.data import FILES, _file_in, _read

    paths = [_file_in(folder, name) for name in FILES]
    if not all(paths):
        return False
    try:
        return all(_read(p)[1] == FILES[name] for p, name in zip(paths, FILES))
    except DataError:
        return False


def load_data(data=None, test_data=None, class_names=None, data_dir=None, verify: bool = True, mirror=None,
              progress=None):
    """The data set a command works on, as training takes it (a :class:`~fmnist.fit.data.FashionMNIST` whose
    ``class_names``, ``mirror_symmetric``, ``descriptions`` and ``name`` say what it is).

    ``data`` None: the official Fashion-MNIST (``data_dir`` or the usual search, checked by SHA-256 unless not
    ``verify``). Else :func:`read_dataset` of ``data`` (and ``test_data``, ``class_names``). ``mirror``: True or
    False overrides whether the classes look the same mirrored (known for Fashion-MNIST, or from classes.json).
    """
    import torch

    from fmnist import CLASS_NAMES
    from fmnist.fit.data import load_fashion_mnist

    if data is None:
        if test_data is not None:
            raise DataError("--test-data goes with --data TRAIN.csv.")
        d = load_fashion_mnist(data_dir, verify=verify)
        names = CLASS_NAMES
        if class_names is not None:
            names = read_class_names(class_names) if isinstance(class_names, (str, os.PathLike)) else tuple(class_names)
            if len(names) != len(CLASS_NAMES):
                raise DataError(f"{class_names}: {len(names)} class names for the {len(CLASS_NAMES)} classes of "
                                "Fashion-MNIST.")
        return Dataset(d.train_images, d.train_labels, d.test_images, d.test_labels, d.source, d.checksums,
                       class_names=tuple(names), mirror_symmetric=True if mirror is None else bool(mirror),
                       name=FASHION_MNIST, kind="idx")
    s = read_dataset(data, test_data, class_names, progress=progress)
    official = s.kind == "idx" and _is_official(Path(s.source))
    names = s.class_names
    if official and class_names is None and not (Path(s.source) / CLASSES_JSON).is_file():
        names = CLASS_NAMES
    symmetric = s.mirror_symmetric if mirror is None else bool(mirror)
    if symmetric is None:
        symmetric = official
    return Dataset(torch.from_numpy(s.train_images), torch.from_numpy(s.train_labels),
                   torch.from_numpy(s.test_images), torch.from_numpy(s.test_labels), s.source, s.checksums,
                   class_names=tuple(names), mirror_symmetric=bool(symmetric), descriptions=s.descriptions,
                   name=FASHION_MNIST if official else "custom", kind=s.kind, image_size=s.image_size)


def dataset_info(data) -> dict:
    """What a run records of its data set: the ``dataset`` section of model.json. A data object without these
    attributes (tests build plain ones) is Fashion-MNIST."""
    from fmnist import CLASS_NAMES

    return {"name": getattr(data, "name", FASHION_MNIST),
            "class_names": list(getattr(data, "class_names", CLASS_NAMES)),
            "mirror_symmetric": bool(getattr(data, "mirror_symmetric", True)),
            "descriptions": dict(getattr(data, "descriptions", {}) or {}),
            "kind": getattr(data, "kind", "idx"),
            "image_size": list(getattr(data, "image_size", (_SIZE, _SIZE)))}


#: An epoch of the epoch table's recipes holds at least this many steps: on a small data set a table row (sized for
#: 50,000 training images) gets a smaller batch and, in proportion, a smaller learning rate.
MIN_STEPS_PER_EPOCH = 30


def fit_to_data(cfg, data, n_train: int, table_row: bool = False):
    """``cfg`` fitted to the data set: without mirrored augmentation and test-time views unless the data set is
    known mirror-symmetric or ``cfg.mirror`` is True (False: never), and a validation split that leaves most of a
    small training set to train on. ``table_row``: the recipe is the epoch table's (model auto), whose batch size
    and learning rate (unless given, ``cfg.pinned``) are scaled down for a small training set. Returns (config,
    notes)."""
    import dataclasses

    notes = []
    mirror = getattr(cfg, "mirror", None)
    allowed = bool(getattr(data, "mirror_symmetric", True)) if mirror is None else bool(mirror)
    ops = [o for o in str(cfg.augment).split(",") if o and o != "none"]
    if not allowed and ("flip" in ops or cfg.tta):
        kept = ",".join(o for o in ops if o != "flip") or "none"
        cfg = dataclasses.replace(cfg, augment=kept, tta=False)
        notes.append(f"no mirrored images (the data set is not known to look the same mirrored; --mirror to allow "
                     f"them): augment {kept}, no mirrored test-time views")
    if cfg.val_size and cfg.val_size * 2 >= n_train:
        val = n_train // 6
        notes.append(f"validation split {val:,} of the {n_train:,} training images (asked for {cfg.val_size:,})")
        cfg = dataclasses.replace(cfg, val_size=val)
    pinned = set(filter(None, str(getattr(cfg, "pinned", "")).split(",")))
    train_images = cfg.subset or n_train - cfg.val_size
    if table_row and "batch_size" not in pinned and train_images // cfg.batch_size < MIN_STEPS_PER_EPOCH:
        batch = cfg.batch_size
        while batch > 16 and train_images // batch < MIN_STEPS_PER_EPOCH:
            batch //= 2
        lr = cfg.lr if "lr" in pinned else cfg.lr * batch / cfg.batch_size
        notes.append(f"small training set: batch {batch}, lr {lr:g} (the table's row: batch {cfg.batch_size}, "
                     f"lr {cfg.lr:g})")
        cfg = dataclasses.replace(cfg, batch_size=batch, lr=lr)
    return cfg, notes


def data_from_args(args, run_dir=None):
    """The data set of a command's flags (``--data``, ``--test-data``, ``--class-names``, ``--data-dir``,
    ``--no-verify``); without ``--data``, a run's own data set (its config.json) where ``run_dir`` names a run
    trained on one, else the official Fashion-MNIST."""
    data, test_data, names = (getattr(args, k, None) for k in ("data", "test_data", "class_names"))
    if data is None and run_dir is not None:
        from fmnist.core.runfolder import CONFIG

        cfg_path = Path(run_dir) / CONFIG
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text())
            except (OSError, ValueError):
                cfg = {}
            if isinstance(cfg, dict) and cfg.get("data"):
                data, test_data = cfg["data"], cfg.get("test_data")
                names = names or cfg.get("class_names")
    return load_data(data, test_data, names, getattr(args, "data_dir", None),
                     verify=not getattr(args, "no_verify", False))


def check_run_classes(run_names, data) -> None:
    """Refuse to score a run on a data set of other classes."""
    names = list(getattr(data, "class_names", ())) or None
    if names is not None and len(names) != len(run_names):
        raise DataError(f"{getattr(data, 'source', 'the data')}: {len(names)} classes, but the run knows "
                        f"{len(run_names)} ({', '.join(run_names[:5])}{', ...' if len(run_names) > 5 else ''}); "
                        "give the run's data set with --data.")
