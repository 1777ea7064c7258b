"""Test-set evaluation: accuracy, loss, per-class precision/recall/F1, confusion matrix, most-confused pairs."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fmnist.core.runfolder import METRICS
from fmnist.fit import runtime


def run_logits(backend, run, images, tta: bool | None = None) -> torch.Tensor:
    """Logits of uint8 (N, 28, 28) images through the one forward pass, with the run's preprocessing and TTA."""
    from fmnist.core.forward import forward
    from fmnist.fit.data import preprocess

    _, logits = forward(backend, preprocess(images, run.spec), tta=run.tta if tta is None else tta)
    logits = torch.from_numpy(logits)
    bad = int((~torch.isfinite(logits)).any(1).sum())
    if bad:  # NaN logits would count as some class: a figure like 10 % accuracy, with no word of why
        from fmnist.core.run import WEIGHTS
        from fmnist.fit.checkpoint import CheckpointError

        raise CheckpointError(f"{run.path / WEIGHTS}: the model gives non-finite outputs (NaN or infinity) for "
                              f"{bad} of {len(logits)} images: its weights are damaged or its training diverged")
    return logits


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    idx = y_true.long() * num_classes + y_pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names) -> dict:
    """Everything `fmnist evaluate` reports, as plain JSON-able data."""
    k = len(class_names)
    labels = labels.long()
    pred = logits.argmax(1)
    cm = confusion_matrix(labels, pred, k)
    tp = cm.diag().double()
    precision = tp / cm.sum(0).double().clamp(min=1)
    recall = tp / cm.sum(1).double().clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    per_class = [
        {"class": class_names[i], "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
         "support": int(cm[i].sum())}
        for i in range(k)
    ]
    off = cm.clone()
    off.fill_diagonal_(0)
    pairs = []
    for i in range(k):
        for j in range(i + 1, k):
            pairs.append((int(off[i, j] + off[j, i]), i, j))
    pairs.sort(reverse=True)
    confused = [
        {"a": class_names[i], "b": class_names[j], "total": n, "a_as_b": int(off[i, j]), "b_as_a": int(off[j, i])}
        for n, i, j in pairs[:5]
    ]
    return {
        "n": int(len(labels)),
        "accuracy": float((pred == labels).double().mean()),
        "loss": float(F.cross_entropy(logits.float(), labels)),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "most_confused": confused,
    }


def format_report(m: dict, title: str = "test set") -> str:
    lines = [
        f"{title}: {m['n']} images",
        f"accuracy {100 * m['accuracy']:.2f} %   loss {m['loss']:.4f}   macro precision {100 * m['macro_precision']:.2f} %"
        f"   macro recall {100 * m['macro_recall']:.2f} %   macro F1 {100 * m['macro_f1']:.2f} %",
        "",
        f"{'class':<14}{'precision':>10}{'recall':>10}{'F1':>10}{'support':>9}",
    ]
    for c in m["per_class"]:
        lines.append(f"{c['class']:<14}{100 * c['precision']:>9.2f}%{100 * c['recall']:>9.2f}%{100 * c['f1']:>9.2f}%"
                     f"{c['support']:>9}")
    lines += ["", "most confused pairs (errors both ways):"]
    for p in m["most_confused"]:
        lines.append(f"  {p['a']} <-> {p['b']}: {p['total']}  ({p['a']} as {p['b']}: {p['a_as_b']}, "
                     f"{p['b']} as {p['a']}: {p['b_as_a']})")
    lines += ["", "confusion matrix (rows: true, columns: predicted):"]
    short = [n.split("/")[0][:7] for n in (c["class"] for c in m["per_class"])]
    lines.append(" " * 9 + "".join(f"{s:>8}" for s in short))
    for s, row in zip(short, m["confusion_matrix"]):
        lines.append(f"{s:<9}" + "".join(f"{v:>8}" for v in row))
    return "\n".join(lines)


def evaluate_run(run_dir, data=None, tta: bool | None = None, limit: int | None = None, write: bool = True,
                 threads: int | None = None, device: str = "auto", backend: str = "auto") -> dict:
    """Evaluate a run folder's model on the official test set and write RUN/metrics.json.

    ``backend``: torch, onnx or auto (:meth:`fmnist.core.run.Run.backend`); the metrics record which one ran."""
    from fmnist.core.run import Run
    from fmnist.core.runfolder import write_json
    from fmnist.fit.sources import check_run_classes, data_from_args

    dev = runtime.setup(threads, device)
    run = Run.load(run_dir, detector=False)
    backend = run.backend(backend, dev, threads=threads or runtime.physical_cores())
    data = data or data_from_args(None, run_dir)
    check_run_classes(run.class_names, data)
    images, labels = data.test_images, data.test_labels
    if limit:
        images, labels = images[:limit], labels[:limit]
    tta = run.tta if tta is None else tta
    logits = run_logits(backend, run, images, tta)
    m = classification_metrics(logits, labels, run.class_names)
    if tta:
        # Report both ways: with and without mirrored test-time augmentation.
        m["accuracy_no_tta"] = float((run_logits(backend, run, images, False).argmax(1) == labels).double().mean())
    m["tta"] = tta
    m["model"] = run.model_name
    m["backend"] = backend.name
    if write:
        write_json(Path(run_dir) / METRICS, m)
    return m
