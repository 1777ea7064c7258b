"""Tests for fmnist.fit.sources: one's own data as IDX files, Kaggle-style CSV files or an image folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmnist.fit import data, sources
from fmnist.fit.data import DataError
from fmnist.fit.sources import read_dataset


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CACHE_DIR", tmp_path / "user-cache")


def blobs(n: int, k: int, size: int = 28, seed: int = 0):
    """``n`` images of ``k`` classes: a bright square whose place tells the class, on black."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    x = rng.integers(0, 30, (n, size, size)).astype(np.uint8)
    s = size // 3
    for i, c in enumerate(y):
        r = (c * 5) % (size - s)
        x[i, r:r + s, 1:size - 1] = 255
    return x, y.astype(np.uint8)


def write_idx_set(folder: Path, k=3, size=28, n_train=30, n_test=12, labels_offset=0, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    xtr, ytr = blobs(n_train, k, size)
    xte, yte = blobs(n_test, k, size, seed=1)
    files = names or data.FILES
    for name, a in zip(files, (xtr, ytr + labels_offset, xte, yte + labels_offset)):
        data.write_idx(folder / f"{name}.gz", a)
    return xtr, ytr, xte, yte


def write_csv(path: Path, x, y, header=True):
    with open(path, "w") as f:
        if header:
            f.write("label," + ",".join(f"pixel{i}" for i in range(1, x[0].size + 1)) + "\n")
        for img, lab in zip(x, y):
            f.write(f"{lab}," + ",".join(str(v) for v in img.reshape(-1)) + "\n")


def write_folder(root: Path, classes=("cat", "dog", "owl"), n=4, size=40):
    for split in ("train", "test"):
        for k, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            x, _ = blobs(n, len(classes), size, seed=k)
            for i in range(n):
                im = np.full((size, size), 255, np.uint8)  # dark object on white, as photos are
                im[5 + k * 3:20 + k * 3, 4:size - 4] = 20
                Image.fromarray(im).save(d / f"{i}.png")


# --- IDX --------------------------------------------------------------------------------------------------


def test_idx_any_size_and_class_count(tmp_path):
    write_idx_set(tmp_path, k=3, size=32)
    d = read_dataset(tmp_path)
    assert d.kind == "idx" and d.class_names == ("0", "1", "2") and d.image_size == (32, 32)
    assert d.train_images.shape == (30, 28, 28) and d.train_images.dtype == np.uint8  # converted to 28x28
    assert d.train_labels.tolist() == [i % 3 for i in range(30)]


def test_idx_28_is_unchanged_and_names_from_file(tmp_path):
    xtr, ytr, _, _ = write_idx_set(tmp_path / "d", k=4)
    (tmp_path / "names.txt").write_text("north\nsouth\neast\nwest\n\n")
    d = read_dataset(tmp_path / "d", class_names=tmp_path / "names.txt")
    assert np.array_equal(d.train_images, xtr) and d.class_names == ("north", "south", "east", "west")


def test_idx_other_file_names_and_labels_from_one(tmp_path):
    """EMNIST letters: labels 1..26 in files named emnist-letters-*; with K names, the i-th is the i-th label."""
    names = ["emnist-letters-train-images-idx3-ubyte", "emnist-letters-train-labels-idx1-ubyte",
             "emnist-letters-test-images-idx3-ubyte", "emnist-letters-test-labels-idx1-ubyte"]
    write_idx_set(tmp_path / "d", k=3, labels_offset=1, names=names)
    d = read_dataset(tmp_path / "d")
    assert d.class_names == ("1", "2", "3") and d.train_labels.max() == 2
    (tmp_path / "abc").write_text("a\nb\nc\n")
    assert read_dataset(tmp_path / "d", class_names=tmp_path / "abc").class_names == ("a", "b", "c")


def test_idx_mixed_sizes_refused(tmp_path):
    write_idx_set(tmp_path, k=3, size=28)
    x, _ = blobs(12, 3, 32)
    data.write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", x)
    with pytest.raises(DataError, match="mixed sizes: 28x28 .* 32x32"):
        read_dataset(tmp_path)


def test_idx_too_large_images_refused(tmp_path):
    write_idx_set(tmp_path, k=2, size=65, n_train=4, n_test=2)
    with pytest.raises(DataError, match="up to 64x64"):
        read_dataset(tmp_path)


@pytest.mark.parametrize("case, match", [
    ("one-class", "1 class"),
    ("test-extra", "test set's classes differ from training"),
    ("no-test", "has no test images"),
    ("names-range", "out of range for the 2 class names"),
])
def test_idx_label_errors(tmp_path, case, match):
    write_idx_set(tmp_path, k=3)
    ytr = data.read_idx(tmp_path / "train-labels-idx1-ubyte.gz")
    yte = data.read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz")
    names = None
    if case == "one-class":
        ytr[:], yte[:] = 0, 0
    elif case == "test-extra":
        yte[0] = 7
    elif case == "no-test":
        yte[yte == 2] = 1
    elif case == "names-range":
        (tmp_path / "names").write_text("a\nb\n")
        names = tmp_path / "names"
    data.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", ytr)
    data.write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", yte)
    with pytest.raises(DataError, match=match):
        read_dataset(tmp_path, class_names=names)


# --- CSV --------------------------------------------------------------------------------------------------


def test_csv_pair_files_and_folder(tmp_path):
    x, y = blobs(20, 4)
    write_csv(tmp_path / "my_train.csv", x, y)
    write_csv(tmp_path / "my_test.csv", x[:8], y[:8], header=False)
    d = read_dataset(tmp_path / "my_train.csv", test_path=tmp_path / "my_test.csv")
    assert d.kind == "csv" and np.array_equal(d.train_images, x) and d.train_labels.tolist() == y.tolist()
    assert len(d.test_labels) == 8 and d.class_names == ("0", "1", "2", "3")
    d2 = read_dataset(tmp_path)  # the folder holding both
    assert np.array_equal(d2.test_images, d.test_images)


def test_csv_needs_test_data(tmp_path):
    x, y = blobs(6, 2)
    write_csv(tmp_path / "train.csv", x, y)
    with pytest.raises(DataError, match="--test-data"):
        read_dataset(tmp_path / "train.csv")


@pytest.mark.parametrize("bad, match", [
    (lambda r: r[:-1], r"line 4: 784 columns, expected 785"),
    (lambda r: ["3.5"] + r[1:], r"line 4: label '3.5' is not an integer"),
    (lambda r: ["shoe"] + r[1:], r"line 4: label 'shoe' is not an integer"),
    (lambda r: r[:5] + ["300"] + r[6:], r"line 4: pixel 5 is 300, outside 0..255"),
])
def test_csv_bad_rows_named(tmp_path, bad, match):
    x, y = blobs(6, 2)
    write_csv(tmp_path / "train.csv", x, y)
    write_csv(tmp_path / "test.csv", x, y)
    lines = (tmp_path / "train.csv").read_text().splitlines()
    lines[3] = ",".join(bad(lines[3].split(",")))
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=match):
        read_dataset(tmp_path / "train.csv", test_path=tmp_path / "test.csv")


def test_csv_wrong_first_line_and_negative_labels(tmp_path):
    (tmp_path / "a.csv").write_text("label,p1,p2,p3\n1,2,3,4\n")
    with pytest.raises(DataError, match="4 columns; expected a label and a square"):
        sources.read_csv(tmp_path / "a.csv")
    x, y = blobs(6, 2)
    write_csv(tmp_path / "train.csv", x, y.astype(np.int64) - 1)
    write_csv(tmp_path / "test.csv", x, y)
    with pytest.raises(DataError, match="label -1 is negative"):
        read_dataset(tmp_path / "train.csv", test_path=tmp_path / "test.csv")
    write_csv(tmp_path / "train.csv", x, y.astype(np.int64) * 1000)
    with pytest.raises(DataError, match="label 1000 out of range"):
        read_dataset(tmp_path / "train.csv", test_path=tmp_path / "test.csv")


def test_csv_gzipped_and_chunked(tmp_path, monkeypatch):
    import gzip

    monkeypatch.setattr(sources, "_CSV_CHUNK", 3)  # several chunks, a bad line in a later one
    x, y = blobs(10, 2)
    write_csv(tmp_path / "train.csv", x, y)
    with open(tmp_path / "train.csv", "rb") as f, gzip.open(tmp_path / "t.csv.gz", "wb") as g:
        g.write(f.read())
    xs, ys = sources.read_csv(tmp_path / "t.csv.gz")
    assert np.array_equal(xs, x) and ys.tolist() == y.tolist()
    lines = (tmp_path / "train.csv").read_text().splitlines()
    lines[8] += ",0"
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 9: 786 columns"):
        sources.read_csv(tmp_path / "train.csv")


# --- image folder -----------------------------------------------------------------------------------------


def test_image_folder_names_preprocessing_and_cache(tmp_path):
    root = tmp_path / "pets"
    write_folder(root)
    d = read_dataset(root, progress=False)
    assert d.kind == "folder" and d.class_names == ("cat", "dog", "owl")
    assert d.train_images.shape == (12, 28, 28) and d.test_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    from fmnist.core.images import decode_image
    from fmnist.core.preprocess import to_dataset_format

    first = to_dataset_format(decode_image(root / "train" / "cat" / "0.png"))
    assert np.array_equal(d.train_images[0], first)  # the uploads' preprocessing, inverted to light on black
    cache = root / sources.CACHE_NAME
    assert cache.is_file()
    # A second read comes from the cache (no decoding); a changed file invalidates it.
    calls = []
    real = sources._decode_all
    sources_decode = lambda *a, **k: calls.append(1) or real(*a, **k)  # noqa: E731
    import unittest.mock as mock

    with mock.patch.object(sources, "_decode_all", sources_decode):
        again = read_dataset(root, progress=False)
        assert not calls and np.array_equal(again.train_images, d.train_images)
        p = root / "test" / "owl" / "0.png"
        os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
        read_dataset(root, progress=False)
        assert calls


def test_image_folder_cache_in_user_cache_when_not_writable(tmp_path, monkeypatch):
    root = tmp_path / "ro"
    write_folder(root, classes=("a", "b"), n=2)
    (tmp_path / "blocker").write_text("a file where the folder would be: beside the data is not writable")
    real = sources._cache_paths
    monkeypatch.setattr(sources, "_cache_paths", lambda r: [tmp_path / "blocker" / "x.npz"] + real(r)[1:])
    read_dataset(root, progress=False)
    assert list((tmp_path / "user-cache" / "folders").glob("*.npz"))


def test_image_folder_numeric_names_in_numeric_order(tmp_path):
    write_folder(tmp_path, classes=[str(i) for i in (0, 1, 2, 10)], n=1)
    assert read_dataset(tmp_path, progress=False).class_names == ("0", "1", "2", "10")


def test_image_folder_unreadable_image_named_nothing_written(tmp_path):
    write_folder(tmp_path, n=3)
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "train" / "owl" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"broken\.png: cannot read the image .*1 other image\(s\) of the 11"):
        read_dataset(tmp_path, progress=False)
    assert not (tmp_path / sources.CACHE_NAME).exists()


@pytest.mark.parametrize("case, match", [
    ("empty", "empty folder"),
    ("no-classes", "empty folder: no class folders"),
    ("empty-class", "empty folder: the class has no training images"),
    ("no-test", "class 'owl' has no test images"),
    ("extra-test", "test set's classes differ from training: 'emu'"),
    ("one-class", "1 class folder"),
])
def test_image_folder_errors(tmp_path, case, match):
    root = tmp_path / "d"
    root.mkdir()
    if case != "empty":
        write_folder(root)
    if case == "no-classes":
        for c in ("cat", "dog", "owl"):
            for split in ("train", "test"):
                for p in (root / split / c).iterdir():
                    p.unlink()
                (root / split / c).rmdir()
    elif case == "empty-class":
        for p in (root / "train" / "dog").iterdir():
            p.unlink()
    elif case == "no-test":
        for p in (root / "test" / "owl").iterdir():
            p.unlink()
    elif case == "extra-test":
        (root / "test" / "emu").mkdir()
        (root / "test" / "cat" / "0.png").rename(root / "test" / "emu" / "0.png")
    elif case == "one-class":
        import shutil

        for c in ("dog", "owl"):
            shutil.rmtree(root / "train" / c)
            shutil.rmtree(root / "test" / c)
    with pytest.raises(DataError, match=match):
        read_dataset(root, progress=False)
    assert not (root / sources.CACHE_NAME).exists()


def test_image_folder_non_utf8_and_duplicate_folder_names(tmp_path):
    write_folder(tmp_path / "a", classes=("x", "y"), n=1)
    bad = os.fsencode(tmp_path / "a" / "train") + b"/\xff\xfe"
    os.mkdir(bad)
    with pytest.raises(DataError, match="not UTF-8"):
        read_dataset(tmp_path / "a", progress=False)
    write_folder(tmp_path / "b", classes=("Cat", "cat"), n=1)
    with pytest.raises(DataError, match="duplicate class name"):
        read_dataset(tmp_path / "b", progress=False)


# --- class names ------------------------------------------------------------------------------------------


def test_class_names_file_errors(tmp_path):
    write_idx_set(tmp_path / "d", k=3)
    f = tmp_path / "names"
    f.write_bytes(b"one\ntw\xff\nthree\n")
    with pytest.raises(DataError, match="not UTF-8 text \\(line 2"):
        read_dataset(tmp_path / "d", class_names=f)
    f.write_text("one\ntwo\nOne\n")
    with pytest.raises(DataError, match="duplicate class name 'One' \\(names 1 and 3\\)"):
        read_dataset(tmp_path / "d", class_names=f)
    f.write_text("one\n\nthree\n")
    with pytest.raises(DataError, match="class name 2 is empty"):
        read_dataset(tmp_path / "d", class_names=f)


def test_classes_json_beside_the_data(tmp_path):
    write_idx_set(tmp_path, k=2)
    (tmp_path / "classes.json").write_text(json.dumps({
        "classes": [{"name": "zero", "description": "A round digit."}, "one"], "mirror_symmetric": False}))
    d = read_dataset(tmp_path)
    assert d.class_names == ("zero", "one") and d.descriptions == {"zero": "A round digit."}
    assert d.mirror_symmetric is False


def test_nothing_there(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_dataset(tmp_path / "nope")
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="empty folder"):
        read_dataset(tmp_path / "e")
    (tmp_path / "e" / "x.bin").write_bytes(b"1")
    with pytest.raises(DataError, match="neither IDX files"):
        read_dataset(tmp_path / "e")


# --- as training takes it ---------------------------------------------------------------------------------


def test_load_data_own_set_is_not_mirror_symmetric(tmp_path):
    write_idx_set(tmp_path, k=3)
    d = sources.load_data(tmp_path)
    info = sources.dataset_info(d)
    assert info["name"] == "custom" and info["class_names"] == ["0", "1", "2"] and info["mirror_symmetric"] is False
    assert d.train_labels.dtype.is_floating_point is False and tuple(d.train_images.shape) == (30, 28, 28)
    assert sources.load_data(tmp_path, mirror=True).mirror_symmetric is True


def test_official_files_are_fashion_mnist(tmp_path, monkeypatch):
    """An IDX folder whose files have the official checksums is Fashion-MNIST: its names, mirror-symmetric."""
    from fmnist import CLASS_NAMES

    write_idx_set(tmp_path, k=10)
    import gzip
    import hashlib

    shas = {n: hashlib.sha256(gzip.decompress((tmp_path / f"{n}.gz").read_bytes())).hexdigest() for n in data.FILES}
    monkeypatch.setattr(data, "FILES", shas)
    d = sources.load_data(tmp_path)
    assert d.name == "fashion-mnist" and d.class_names == CLASS_NAMES and d.mirror_symmetric is True


def test_plain_data_objects_are_fashion_mnist():
    from conftest import make_synthetic

    from fmnist import CLASS_NAMES

    info = sources.dataset_info(make_synthetic(20, 10))
    assert info["class_names"] == list(CLASS_NAMES) and info["mirror_symmetric"] is True


def test_fit_to_data_mirror_and_val_size():
    import dataclasses

    from fmnist.fit.recipes import TrainConfig

    cfg = TrainConfig(augment="flip,crop", tta=True, val_size=10_000)
    sym = dataclasses.make_dataclass("D", [("mirror_symmetric", bool)])
    same, notes = sources.fit_to_data(cfg, sym(True), 60_000)
    assert same == cfg and not notes
    out, notes = sources.fit_to_data(cfg, sym(False), 1_200)
    assert out.augment == "crop" and out.tta is False and out.val_size == 200 and len(notes) == 2
    asked = dataclasses.replace(cfg, mirror=True) if hasattr(cfg, "mirror") else None
    if asked is not None:
        assert sources.fit_to_data(asked, sym(False), 60_000)[0].augment == "flip,crop"


def test_fit_to_data_small_set_scales_the_tables_batch():
    import dataclasses

    from fmnist.fit.recipes import TrainConfig

    sym = dataclasses.make_dataclass("D", [("mirror_symmetric", bool)])(True)
    cfg = TrainConfig(batch_size=256, lr=0.2, val_size=200, augment="none", tta=False)
    out, notes = sources.fit_to_data(cfg, sym, 1_400, table_row=True)
    assert (out.batch_size, out.lr) == (32, 0.025) and "small training set" in notes[-1]
    assert sources.fit_to_data(cfg, sym, 1_400)[0].batch_size == 256  # a recipe given in full is kept
    given = dataclasses.replace(cfg, pinned="batch_size")
    assert sources.fit_to_data(given, sym, 1_400, table_row=True)[0].batch_size == 256
    assert sources.fit_to_data(cfg, sym, 60_000, table_row=True)[0].batch_size == 256
