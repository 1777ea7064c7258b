"""The report's figures, drawn with matplotlib's object API (no pyplot: no global state, no GUI backend).

Each function returns a :class:`matplotlib.figure.Figure`; :func:`save` writes it as a PNG with the Agg
renderer. Sizes and fonts are chosen to read at 100 % zoom on a laptop screen (figures about 1000-1300 px wide).
"""
from __future__ import annotations

import numpy as np

TRAIN_COLOR, VAL_COLOR = "#1f77b4", "#d62728"
GOOD, BAD = "#1a7f37", "#c62828"


def short(name: str) -> str:
    """'T-shirt/top' -> 'T-shirt', 'Ankle boot' stays: short enough for axis ticks and image titles."""
    return name.split("/")[0]


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    fig.set_facecolor("white")
    return fig


def save(fig, path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100, facecolor="white")


def overfit_start(val_loss: list[float]) -> int | None:
    """Index where over-fitting begins: the validation-loss minimum, if the loss ends clearly above it.

    'Clearly' is 2 % above the minimum, so the noise of a flat tail does not get painted as over-fitting.
    """
    v = np.asarray(val_loss, dtype=float)
    if len(v) < 3 or not np.isfinite(v).any():
        return None
    i = int(np.nanargmin(v))
    return i if i < len(v) - 1 and v[-1] > 1.02 * v[i] else None


def learning_curves(history: list[dict], best_epoch: int | None, select: str = "val_acc"):
    """Loss and accuracy, train vs validation, the kept epoch marked and the over-fitting region shaded."""
    epochs = [int(r["epoch"]) for r in history]
    fig = _figure(12, 4.6)
    axes = fig.subplots(1, 2)
    start = overfit_start([r["val_loss"] for r in history])
    for ax, key, title in ((axes[0], "loss", "Loss"), (axes[1], "acc", "Accuracy (%)")):
        scale = 100.0 if key == "acc" else 1.0
        train = [scale * r[f"train_{key}"] for r in history]
        val = [scale * r[f"val_{key}"] for r in history]
        ax.plot(epochs, train, "o-", color=TRAIN_COLOR, label="train", ms=4)
        ax.plot(epochs, val, "s-", color=VAL_COLOR, label="validation", ms=4)
        if start is not None:
            ax.axvspan(epochs[start], epochs[-1] + 0.5, color="#f4a261", alpha=0.18,
                       label="validation loss rising (over-fitting)")
        if best_epoch:
            ax.axvline(best_epoch, color="#333333", ls="--", lw=1.2, label=f"kept epoch {best_epoch} ({select})")
        ax.set_title(title, fontsize=13)
        ax.set_xlabel("epoch", fontsize=11)
        ax.grid(alpha=0.3)
        if len(epochs) <= 30:
            ax.set_xticks(epochs if len(epochs) <= 15 else epochs[::2])
    axes[0].legend(fontsize=10, loc="upper right")
    fig.suptitle("Learning curves: train figures average each epoch's (augmented) batches; validation is measured "
                 "after the epoch", fontsize=11.5)
    return fig


def confusion(cm: list[list[int]], class_names: list[str]):
    """Counts and row-normalised (recall per true class) heatmaps side by side."""
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    labels = [short(c) for c in class_names]
    fig = _figure(14, 6.6)
    axes = fig.subplots(1, 2)
    for ax, data, title, fmt in ((axes[0], cm, "Counts", "{:.0f}"),
                                 (axes[1], norm, "Row-normalised (each true class sums to 1)", "{:.2f}")):
        # Off-diagonal cells carry the story; a log-ish colour scale would hide the diagonal, so use
        # sqrt scaling to lift small error counts out of the background.
        shown = np.sqrt(data / max(data.max(), 1e-12))
        ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(labels)):
            for j in range(len(labels)):
                if data[i, j] == 0:
                    continue
                text = "<.01" if fmt == "{:.2f}" and data[i, j] < 0.005 else fmt.format(data[i, j])
                ax.text(j, i, text, ha="center", va="center", fontsize=8.5,
                        color="white" if shown[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=10)
        ax.set_yticks(range(len(labels)), labels, fontsize=10)
        ax.set_xlabel("predicted", fontsize=11)
        ax.set_ylabel("true", fontsize=11)
        ax.set_title(title, fontsize=13)
    return fig


def per_class(per_class_rows: list[dict]):
    """Precision, recall and F1 per class as grouped horizontal bars (weakest classes stand out)."""
    names = [short(r["class"]) for r in per_class_rows]
    y = np.arange(len(names))
    fig = _figure(10, 5.2)
    ax = fig.subplots()
    for k, (key, color) in enumerate((("precision", "#4c72b0"), ("recall", "#dd8452"), ("f1", "#55a868"))):
        vals = [100 * r[key] for r in per_class_rows]
        ax.barh(y + (k - 1) * 0.27, vals, height=0.27, color=color, label=key if key != "f1" else "F1")
    lo = min(100 * min(r[k] for k in ("precision", "recall", "f1")) for r in per_class_rows)
    ax.set_xlim(max(0, lo - 5), 100)
    ax.set_yticks(y, names, fontsize=10)
    ax.invert_yaxis()
    ax.set_xlabel("%", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(fontsize=10, loc="outside lower center", ncol=3)
    ax.set_title("Per-class precision, recall and F1 (test set)", fontsize=13)
    return fig


PX = 5  # screen pixels per image pixel in the galleries: 28 px thumbnails drawn 140 px wide, crisp


def _mosaic(images, titles: list[str], colors: list[str], cols: int, title_lines: int = 2,
            row_labels: list[str] | None = None, label_width: int = 0, group: int = 0, suptitle: str = ""):
    """Thumbnails tiled into ONE image on one axes, titles as text above each.

    One axes instead of one per thumbnail: a 24-image grid renders in a tenth of the time, and the pixel
    grid is exact (each image pixel is PX screen pixels), so small garments stay sharp.
    """
    gap, head = 4, 4 * title_lines + 2
    cw, ch = 28 + gap, 28 + head + gap
    rows = max(1, -(-len(images) // cols) if row_labels is None else len(row_labels))
    width, height = label_width + cols * cw, rows * ch
    top = 0.55  # inches for the figure title
    fig = _figure(width * PX / 100, height * PX / 100 + top)
    fig.set_layout_engine(None)
    ax = fig.add_axes((0, 0, 1, 1 - top / fig.get_figheight()))
    canvas = np.full((height, width), 255, dtype=np.uint8)
    for r in range(group, rows, group) if group else ():
        canvas[r * ch - 1, :] = 170  # a thin grey rule between groups of rows (the two directions of a pair)
    for k, img in enumerate(images):
        if img is None:
            continue
        r, c = divmod(k, cols)
        y, x = r * ch + head, label_width + c * cw + gap // 2
        canvas[y:y + 28, x:x + 28] = img
        ax.text(x + 13.5, y - 1.5, titles[k], ha="center", va="bottom", fontsize=9, color=colors[k],
                linespacing=1.15)
    for r, label in enumerate(row_labels or []):
        ax.text(label_width - 3, r * ch + head + 14, label, ha="right", va="center", fontsize=10.5,
                fontweight="bold" if r % 2 == 0 else "normal")
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=255, interpolation="nearest", extent=(-0.5, width - 0.5,
                                                                                      height - 0.5, -0.5))
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.axis("off")
    fig.suptitle(suptitle, fontsize=11.5, y=1 - 0.06 / fig.get_figheight())
    return fig


def confused_pairs(images, labels, preds, probs, pairs: list[dict], class_names: list[str], per_row: int = 8):
    """For each confused pair (a, b): a row of a-mistaken-for-b and a row of b-mistaken-for-a, most confident first."""
    index = {c: i for i, c in enumerate(class_names)}
    tiles, titles, row_labels = [], [], []
    for p in pairs:
        for t, q in ((index[p["a"]], index[p["b"]]), (index[p["b"]], index[p["a"]])):
            wrong = np.flatnonzero((labels == t) & (preds == q))
            idx = list(wrong[np.argsort(-probs[wrong, q])][:per_row])
            tiles += [images[i] for i in idx] + [None] * (per_row - len(idx))
            titles += [f"{probs[i, q]:.2f}" for i in idx] + [""] * (per_row - len(idx))
            row_labels.append(f"{short(class_names[t])}\nseen as {short(class_names[q])}\n{len(wrong)} times")
    return _mosaic(tiles, titles, [BAD] * len(tiles), per_row, title_lines=1, row_labels=row_labels,
                   label_width=44, group=2, suptitle="Most-confused pairs: test images of one class that the model called "
                   "the other,\nmost confident mistakes first (score = probability given to the wrong class)"
                   if pairs else "No confused pairs: no misclassifications")


def misclassified(images, labels, probs, class_names: list[str], count: int = 24, cols: int = 8):
    """The worst mistakes: highest loss (lowest probability of the true class), with true/predicted/score."""
    preds = probs.argmax(1)
    wrong = np.flatnonzero(preds != labels)
    true_p = probs[np.arange(len(labels)), labels]
    worst = wrong[np.argsort(true_p[wrong])][:count]
    titles = [f"true {short(class_names[labels[i]])}\npred {short(class_names[preds[i]])} {probs[i, preds[i]]:.2f}"
              for i in worst]
    return _mosaic([images[i] for i in worst], titles, [BAD] * len(worst), cols,
                   suptitle=f"The {len(worst)} worst misclassifications (highest loss) of {len(wrong)} errors"
                   if len(wrong) else "No misclassifications")


def uncertain(images, labels, probs, idx, candidates: list[list[int]], class_names: list[str], threshold: float,
              count: int = 24, cols: int = 8, seed: int = 0):
    """Test images answered "uncertain", a random ``count`` of them: each with its true label and its
    candidates and their scores, green when the true label is among the candidates, red when not."""
    pick = np.sort(np.random.default_rng(seed).choice(len(idx), size=min(count, len(idx)), replace=False))
    titles, colors = [], []
    for k in pick:
        i, ids = idx[k], candidates[k]
        titles.append(f"true {short(class_names[labels[i]])}\n"
                      + "\n".join(f"{short(class_names[c])} {probs[i, c]:.2f}" for c in ids))
        colors.append(GOOD if labels[i] in ids else BAD)
    lines = 1 + max(len(candidates[k]) for k in pick)
    return _mosaic([images[idx[k]] for k in pick], titles, colors, cols, title_lines=lines,
                   suptitle=f"{len(pick)} of the {len(idx)} test images with an uncertain answer (best score under "
                   f"{threshold:.2f}), at random: true label, then the candidates and their scores\n"
                   "(green: the true label is among the candidates; red: it is not)")


def samples(images, labels, probs, class_names: list[str], idx, cols: int = 8):
    """Sample predictions: predicted label and score, green when right, red when wrong."""
    preds = probs.argmax(1)
    titles, colors = [], []
    for i in idx:
        ok = preds[i] == labels[i]
        titles.append(f"{short(class_names[preds[i]])} {probs[i, preds[i]]:.2f}"
                      + ("" if ok else f"\n(true {short(class_names[labels[i]])})"))
        colors.append(GOOD if ok else BAD)
    return _mosaic([images[i] for i in idx], titles, colors, cols,
                   suptitle="Random test images: prediction and score (green right, red wrong)")


def reliability(conf_bins: list[dict], ece: float, temperature: float):
    """Reliability diagram: accuracy against confidence per bin, with the count of images per bin below."""
    fig = _figure(7.5, 7)
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    width = 1.0 / len(conf_bins)
    used = [b for b in conf_bins if b["count"]]  # empty bins have no accuracy to draw
    centers = [(b["lo"] + b["hi"]) / 2 for b in used]
    acc = [b["accuracy"] for b in used]
    conf = [b["confidence"] for b in used]
    top.bar(centers, acc, width=width * 0.95, color="#4c72b0", alpha=0.85, label="accuracy")
    # The gap spans accuracy..confidence, above the bar (over-confident) or inside it (under-confident):
    # hatched outline only, so it stays visible over the blue either way.
    top.bar(centers, [abs(c - a) for c, a in zip(conf, acc)], bottom=[min(c, a) for c, a in zip(conf, acc)],
            width=width * 0.95, facecolor="none", edgecolor="#c62828", hatch="///", lw=1,
            label="gap to mean confidence")
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy", fontsize=11)
    top.legend(fontsize=10, loc="upper left")
    top.grid(alpha=0.3)
    top.set_title(f"Reliability (test set, {len(conf_bins)} bins): ECE {100 * ece:.2f} %, temperature {temperature:.3g}",
                  fontsize=12)
    bottom.bar(centers, [b["count"] for b in used], width=width * 0.95, color="#888888")
    bottom.set_yscale("log")
    bottom.set_xlabel("confidence (top-class probability)", fontsize=11)
    bottom.set_ylabel("images", fontsize=11)
    bottom.set_xlim(0, 1)
    return fig
