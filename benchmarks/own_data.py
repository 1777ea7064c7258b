"""Lay out real data sets other than the default one in the layouts `fmnist train --data` reads, from what a package
installed here ships (nothing is downloaded).

    python benchmarks/own_data.py digits DIR        # scikit-learn's 1,797 handwritten digits (8x8) as an IDX folder
    python benchmarks/own_data.py digits-folder DIR # the same as train/CLASS/*.png and test/CLASS/*.png
    python benchmarks/own_data.py fashion-csv DIR   # the official Fashion-MNIST IDX files as Kaggle-style CSV files

then, for example: fmnist train --data DIR --out runs/digits (docs/your-data.md has the figures).
The digits have no official test split: a stratified 80/20 split with seed 0 is written (1,438 / 359 images).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # ships the UCI optical digits inside the wheel

    d = load_digits()
    x = np.clip(np.rint(d.images * 255.0 / 16.0), 0, 255).astype(np.uint8)  # 0..16 -> 0..255, light on black
    y = d.target.astype(np.uint8)
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: round(len(idx) * 0.2)]] = True
    return x[~test], y[~test], x[test], y[test]


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("digits", "digits-folder", "fashion-csv"):
        print(__doc__, file=sys.stderr)
        return 2
    what, out = argv[0], Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    from fmnist.fit.data import FILES, read_idx, write_idx

    if what == "digits":
        for name, a in zip(FILES, digits()):
            write_idx(out / f"{name}.gz", a)
    elif what == "digits-folder":
        from PIL import Image

        xtr, ytr, xte, yte = digits()
        for split, x, y in (("train", xtr, ytr), ("test", xte, yte)):
            for i, (img, c) in enumerate(zip(x, y)):
                (out / split / str(c)).mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(out / split / str(c) / f"{i:05d}.png")
    else:
        from fmnist.fit.data import find_data_dir

        src = find_data_dir(download=False)
        for split, images, labels in (("train", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                                      ("test", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")):
            x = read_idx(next(src.glob(images + "*")), FILES[images])
            y = read_idx(next(src.glob(labels + "*")), FILES[labels])
            with open(out / f"fashion-mnist_{split}.csv", "w") as f:
                f.write("label," + ",".join(f"pixel{i}" for i in range(1, 785)) + "\n")
                np.savetxt(f, np.concatenate([y[:, None].astype(np.int64), x.reshape(len(x), -1)], 1), fmt="%d",
                           delimiter=",")
    print(f"wrote {what} into {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
