"""Tests for fmnist.fit.data: strict IDX parsing, locating/downloading data, loading and the stratified split."""
from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from fmnist.fit import data
from fmnist.fit.data import DataError

TRAIN_IMG, TRAIN_LAB = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMG, TEST_LAB = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Keep every test away from the real system dir, the user's cache, $FMNIST_DATA and the network."""
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(data, "MIRROR", "http://127.0.0.1:9/")  # discard port: any stray fetch fails fast
    monkeypatch.delenv("FMNIST_DATA", raising=False)


def make_set(folder: Path, gz: bool = True, n_train: int = 30, n_test: int = 10, seed: int = 0):
    """Write a small synthetic Fashion-MNIST-shaped set; return (arrays by name, name -> sha256 map)."""
    rng = np.random.default_rng(seed)
    arrays = {
        TRAIN_IMG: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        TRAIN_LAB: (np.arange(n_train) % 10).astype(np.uint8),
        TEST_IMG: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        TEST_LAB: (np.arange(n_test) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    shas = {}
    for name, a in arrays.items():
        path = folder / (name + ".gz" if gz else name)
        data.write_idx(path, a)
        raw = path.read_bytes()
        shas[name] = hashlib.sha256(gzip.decompress(raw) if gz else raw).hexdigest()
    return arrays, shas


def idx_bytes(magic: int, dims, payload: bytes) -> bytes:
    return struct.pack(f">I{len(dims)}I", magic, *dims) + payload


# --- IDX reader / writer ----------------------------------------------------------------------------------


def test_read_idx_hand_built_header(tmp_path):
    """Reader checked against bytes built by hand, not by write_idx, so a shared bug cannot hide."""
    raw = idx_bytes(0x803, (2, 3, 4), bytes(range(24)))
    (tmp_path / "img").write_bytes(raw)
    a = data.read_idx(tmp_path / "img")
    assert a.dtype == np.uint8 and a.shape == (2, 3, 4)
    assert np.array_equal(a, np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    assert a.flags.writeable  # torch.from_numpy on a read-only array warns and is unsafe
    (tmp_path / "lab").write_bytes(idx_bytes(0x801, (5,), bytes([9, 0, 3, 3, 7])))
    assert data.read_idx(tmp_path / "lab").tolist() == [9, 0, 3, 3, 7]
    # And write_idx produces exactly the bytes of the format.
    data.write_idx(tmp_path / "again", np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    assert (tmp_path / "again").read_bytes() == raw


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_roundtrip_raw_and_gz(tmp_path, name):
    images = np.random.default_rng(1).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    data.write_idx(tmp_path / name, torch.from_numpy(images))  # tensors accepted too
    assert ((tmp_path / name).read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    back = data.read_idx(tmp_path / name)
    assert back.dtype == np.uint8 and np.array_equal(back, images)
    data.write_idx(tmp_path / ("l" + name), np.array([0, 5, 9]))  # int64 labels in range are fine
    assert data.read_idx(tmp_path / ("l" + name)).tolist() == [0, 5, 9]


def test_write_idx_rejects_what_it_cannot_represent(tmp_path):
    with pytest.raises(ValueError):
        data.write_idx(tmp_path / "a", np.array([0, 256]))
    with pytest.raises(ValueError):
        data.write_idx(tmp_path / "b", np.zeros((2, 2), dtype=np.uint8))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


GOOD = idx_bytes(0x803, (2, 28, 28), bytes(2 * 28 * 28))


@pytest.mark.parametrize(
    "raw, why",
    [
        (GOOD[:-1], "wrong length"),  # truncated payload
        (GOOD[:10], "truncated header"),
        (GOOD[:2], "too short"),
        (GOOD + b"\0", "wrong length"),  # trailing junk
        (idx_bytes(0x803, (3, 28, 28), bytes(2 * 28 * 28)), "wrong length"),  # dims disagree with data
        (idx_bytes(0x803, (2, 0, 28), b""), "dimensions"),
        (idx_bytes(0x804, (2, 28, 28, 1), bytes(2 * 28 * 28)), "magic"),  # 4-D
        (idx_bytes(0x0D03, (2, 28, 28), bytes(4 * 2 * 28 * 28)), "magic"),  # float32 images
        (b"<html>404 Not Found</html>", "magic"),  # what a broken mirror might serve
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_rejects_bad_files(tmp_path, raw, why, gz):
    path = tmp_path / ("bad.gz" if gz else "bad")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DataError, match=why) as err:
        data.read_idx(path)
    assert str(path) in str(err.value) and "apt-get install dataset-fashion-mnist" in str(err.value)


def test_read_idx_truncated_gzip_and_missing(tmp_path):
    noisy = idx_bytes(0x803, (4, 28, 28), np.random.default_rng(0).integers(0, 256, 4 * 784, np.uint8).tobytes())
    full = gzip.compress(noisy)  # incompressible: the cut falls inside the images
    (tmp_path / "cut.gz").write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match="decompress") as err:
        data.read_idx(tmp_path / "cut.gz")
    assert "cut.gz" in str(err.value)
    with pytest.raises(DataError, match="not found"):
        data.read_idx(tmp_path / "nope")


def _gzip_of_zeros(header: bytes, zeros: int) -> bytes:
    """A gzip file of ``header`` followed by ``zeros`` zero bytes, made in pieces (never held whole)."""
    import zlib

    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip container
    parts = [comp.compress(header)]
    block = bytes(1 << 20)
    for _ in range(zeros >> 20):
        parts.append(comp.compress(block))
    parts.append(comp.compress(bytes(zeros & ((1 << 20) - 1))))
    return b"".join(parts) + comp.flush()


def test_gzip_bomb_is_refused_without_expanding_it(tmp_path):
    """A small .gz whose header announces two images but that expands to 200 MB: refused after reading the
    two images and one more byte, not after decompressing it all."""
    import tracemalloc

    path = tmp_path / "bomb.gz"
    path.write_bytes(_gzip_of_zeros(struct.pack(">I3I", 0x803, 2, 28, 28), 200 << 20))
    assert path.stat().st_size < 300_000
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="wrong length") as err:
            data.read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(err.value)
    assert peak < 8_000_000, f"{peak / 1e6:.0f} MB"


@pytest.mark.parametrize("dims", [(10**7, 28, 28), (100_000, 28, 28)], ids=["over-the-limit", "over-the-file"])
def test_header_asking_for_more_than_possible_is_refused_before_reading(tmp_path, dims):
    """A header announcing 7.8 GB (more than any IDX file this loader takes) or 78 MB (more than the small gzip
    file can hold): refused from the header alone, nothing allocated or decompressed."""
    import tracemalloc

    path = tmp_path / "liar.gz"
    path.write_bytes(gzip.compress(struct.pack(">I3I", 0x803, *dims) + bytes(1000)))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="wrong length") as err:
            data.read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(err.value) and peak < 1_000_000
    raw = tmp_path / "liar"
    raw.write_bytes(struct.pack(">I3I", 0x803, *dims) + bytes(1000))  # uncompressed: the file size says it
    with pytest.raises(DataError, match="wrong length"):
        data.read_idx(raw)


def test_streamed_read_keeps_the_checksum_of_the_content(tmp_path):
    images = np.random.default_rng(3).integers(0, 256, (2000, 28, 28), dtype=np.uint8)  # > one read chunk
    data.write_idx(tmp_path / "x.gz", images)
    raw = gzip.decompress((tmp_path / "x.gz").read_bytes())
    back = data.read_idx(tmp_path / "x.gz", expected_sha256=hashlib.sha256(raw).hexdigest())
    assert np.array_equal(back, images) and back.flags.writeable


def test_read_idx_checksum(tmp_path):
    path = tmp_path / "lab.gz"
    data.write_idx(path, np.array([1, 2, 3], dtype=np.uint8))
    good = hashlib.sha256(idx_bytes(0x801, (3,), bytes([1, 2, 3]))).hexdigest()  # of the decompressed bytes
    assert data.read_idx(path, expected_sha256=good).tolist() == [1, 2, 3]
    with pytest.raises(DataError, match="checksum mismatch") as err:
        data.read_idx(path, expected_sha256="0" * 64)
    assert str(path) in str(err.value) and good in str(err.value) and "0" * 64 in str(err.value)


# --- finding the data -------------------------------------------------------------------------------------


def test_find_data_dir_order(tmp_path, monkeypatch):
    explicit, env, system = tmp_path / "explicit", tmp_path / "env", tmp_path / "system"
    make_set(explicit), make_set(env, gz=False), make_set(system)
    monkeypatch.setenv("FMNIST_DATA", str(env))
    assert data.find_data_dir(explicit, download=False) == explicit
    assert data.find_data_dir(download=False) == env  # raw (gunzipped) files count as present
    monkeypatch.delenv("FMNIST_DATA")
    assert data.find_data_dir(download=False) == system
    make_set(tmp_path / "cache")
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "gone")
    assert data.find_data_dir(download=False) == tmp_path / "cache"


def test_named_dir_lacking_files_is_an_error_not_a_fallthrough(tmp_path, monkeypatch):
    make_set(tmp_path / "system")  # a good fallback exists, yet must not be used
    partial = tmp_path / "partial"
    make_set(partial)
    (partial / f"{TEST_LAB}.gz").unlink()
    with pytest.raises(DataError, match=TEST_LAB) as err:
        data.find_data_dir(partial)
    assert "--data-dir" in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        data.find_data_dir(tmp_path / "missing")
    monkeypatch.setenv("FMNIST_DATA", str(partial))
    with pytest.raises(DataError, match="FMNIST_DATA"):
        data.find_data_dir()


def test_nothing_found_without_download(tmp_path):
    with pytest.raises(DataError, match="downloading is off"):
        data.find_data_dir(download=False)
    assert not (tmp_path / "cache").exists()


# --- loading ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_load_small_set(tmp_path, gz):
    arrays, shas = make_set(tmp_path / "d", gz=gz)
    ds = data.load_fashion_mnist(tmp_path / "d", download=False, files=shas)
    assert ds.train_images.dtype == torch.uint8 and ds.train_images.shape == (30, 28, 28)
    assert ds.test_images.dtype == torch.uint8 and ds.test_images.shape == (10, 28, 28)
    assert ds.train_labels.dtype == torch.int64 and ds.test_labels.dtype == torch.int64
    assert np.array_equal(ds.train_images.numpy(), arrays[TRAIN_IMG])
    assert ds.test_labels.tolist() == arrays[TEST_LAB].tolist()
    assert ds.source == str(tmp_path / "d") and ds.checksums == shas


def test_load_checksum_mismatch_names_file(tmp_path):
    _, shas = make_set(tmp_path / "d")
    wrong = dict(shas, **{TRAIN_LAB: "f" * 64})
    with pytest.raises(DataError, match="checksum mismatch") as err:
        data.load_fashion_mnist(tmp_path / "d", files=wrong)
    assert TRAIN_LAB in str(err.value) and shas[TRAIN_LAB] in str(err.value)
    # verify=False still loads, and reports the real checksums.
    ds = data.load_fashion_mnist(tmp_path / "d", verify=False, files=wrong)
    assert ds.checksums[TRAIN_LAB] == shas[TRAIN_LAB]


def test_load_rejects_inconsistent_sets(tmp_path):
    _, shas = make_set(tmp_path / "d")
    data.write_idx(tmp_path / "d" / f"{TEST_LAB}.gz", np.zeros(9, dtype=np.uint8))  # 9 labels, 10 images
    with pytest.raises(DataError, match=TEST_LAB):
        data.load_fashion_mnist(tmp_path / "d", verify=False, files=shas)
    data.write_idx(tmp_path / "d" / f"{TEST_LAB}.gz", np.full(10, 10, dtype=np.uint8))  # class 10
    with pytest.raises(DataError, match="outside the 10 classes"):
        data.load_fashion_mnist(tmp_path / "d", verify=False, files=shas)
    data.write_idx(tmp_path / "d" / f"{TEST_IMG}.gz", np.zeros((10, 32, 32), dtype=np.uint8))
    with pytest.raises(DataError, match=r"\(N, 28, 28\)"):
        data.load_fashion_mnist(tmp_path / "d", verify=False, files=shas)


# --- downloading (against a local HTTP server) ------------------------------------------------------------


@pytest.fixture
def mirror(tmp_path):
    """A local HTTP server over tmp_path/'served'; yields (url, folder, list of request paths)."""
    root = tmp_path / "served"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    handler = functools.partial(Handler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", root, requests
    server.shutdown()
    server.server_close()


def test_download_on_first_use_then_cached(tmp_path, monkeypatch, mirror):
    url, served, requests = mirror
    arrays, shas = make_set(served)
    monkeypatch.setattr(data, "MIRROR", url)
    ds = data.load_fashion_mnist(files=shas)  # no system dir, empty cache -> download
    cache = tmp_path / "cache"
    assert ds.source == str(cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{n}.gz" for n in shas)  # no temp leftovers
    assert np.array_equal(ds.train_images.numpy(), arrays[TRAIN_IMG])
    assert sorted(requests) == sorted(f"/{n}.gz" for n in shas)
    data.load_fashion_mnist(files=shas)
    assert len(requests) == 4  # second load used the cache
    with pytest.raises(DataError):
        data.load_fashion_mnist(download=False, files=dict(shas, **{TEST_IMG: "0" * 64}))


def test_download_fetches_only_missing_and_reports_progress(tmp_path, mirror):
    url, served, requests = mirror
    _, shas = make_set(served)
    dest = tmp_path / "dest"
    make_set(dest, gz=False)  # same content, raw
    (dest / TEST_IMG).unlink()
    seen = []
    data.download(dest, mirror=url, progress=lambda *a: seen.append(a), files=shas)
    assert requests == [f"/{TEST_IMG}.gz"]
    size = (served / f"{TEST_IMG}.gz").stat().st_size
    assert seen and seen[-1] == (TEST_IMG, size, size)
    assert data.read_idx(dest / f"{TEST_IMG}.gz", expected_sha256=shas[TEST_IMG]).shape == (10, 28, 28)


@pytest.mark.parametrize("corruption", ["other data", "truncated", "missing"])
def test_bad_download_leaves_nothing_behind(tmp_path, mirror, corruption):
    url, served, _ = mirror
    _, shas = make_set(served)
    target = served / f"{TRAIN_IMG}.gz"
    if corruption == "other data":  # a valid IDX file, just not the expected one
        data.write_idx(target, np.ones((30, 28, 28), dtype=np.uint8))
    elif corruption == "truncated":
        target.write_bytes(target.read_bytes()[:-100])
    else:
        target.unlink()  # server answers 404
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as err:
        data.download(dest, mirror=url, names=[TRAIN_IMG], progress=False, files=shas)
    assert f"{url}{TRAIN_IMG}.gz" in str(err.value) and "apt-get install" in str(err.value)
    assert list(dest.iterdir()) == []  # no partial or temp file a later run could mistake for data


def test_unreachable_mirror_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"127\.0\.0\.1:9/train-images") as err:
        data.find_data_dir()  # autouse fixture points MIRROR at a closed port
    assert "FMNIST_DATA" in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []


# --- stratified split -------------------------------------------------------------------------------------


def test_split_deterministic_per_seed_and_disjoint():
    labels = torch.arange(1000) % 10
    state = torch.get_rng_state()
    tr1, va1 = data.stratified_split(labels, 100, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG neither used nor disturbed
    tr2, va2 = data.stratified_split(labels, 100, seed=0)
    _, va3 = data.stratified_split(labels, 100, seed=1)
    assert torch.equal(tr1, tr2) and torch.equal(va1, va2)
    assert not torch.equal(va1, va3)
    assert tr1.dtype == va1.dtype == torch.int64 and len(va1) == 100 and len(tr1) == 900
    assert torch.equal(torch.cat([tr1, va1]).sort().values, torch.arange(1000))  # disjoint and covering


@pytest.mark.parametrize("val_size", [1, 7, 17, 50, 99])
def test_split_is_stratified(val_size):
    counts = [50, 30, 15, 5]  # imbalanced, so proportions (not just equal shares) are tested
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])[torch.randperm(100)]
    train, val = data.stratified_split(labels, val_size, seed=3)
    assert len(val) == val_size and len(set(val.tolist()) | set(train.tolist())) == 100
    got = torch.bincount(labels[val], minlength=4)
    for k, c in enumerate(counts):
        assert abs(got[k].item() - val_size * c / 100) <= 1


def test_split_edge_cases():
    labels = torch.arange(20) % 2
    train, val = data.stratified_split(labels, 0, seed=0)
    assert len(val) == 0 and val.dtype == torch.int64 and sorted(train.tolist()) == list(range(20))
    for bad in (20, 21, -1):
        with pytest.raises(ValueError):
            data.stratified_split(labels, bad, seed=0)


# --- the real files ---------------------------------------------------------------------------------------

REAL = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.realdata
@pytest.mark.skipif(not all((REAL / f"{n}.gz").is_file() or (REAL / n).is_file() for n in data.FILES),
                    reason="official files not installed (apt-get install dataset-fashion-mnist)")
def test_real_data():
    ds = data.load_fashion_mnist(REAL, download=False)  # verify=True: checks the published SHA-256s
    assert ds.train_images.shape == (60000, 28, 28) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (10000, 28, 28) and ds.test_images.dtype == torch.uint8
    assert ds.train_labels.dtype == torch.int64 and ds.test_labels.dtype == torch.int64
    assert torch.bincount(ds.train_labels).tolist() == [6000] * 10
    assert torch.bincount(ds.test_labels).tolist() == [1000] * 10
    assert ds.checksums == data.FILES and ds.source == str(REAL)
    # The known pixel mean (~0.286) shows the images are not garbled.
    assert 0.27 < ds.train_images.float().mean().item() / 255 < 0.30
