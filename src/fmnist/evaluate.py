"""Test-set evaluation: accuracy, loss, per-class precision/recall/F1, confusion matrix, most-confused pairs."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fmnist import runtime


@torch.inference_mode()
def batched_logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1000, tta: bool = False,
                   device: torch.device | None = None, precision: str = "fp32") -> torch.Tensor:
    """Logits for a normalised (N, 1, 28, 28) tensor, in batches; ``tta`` averages with the mirrored image."""
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device, non_blocking=True)
        with runtime.autocast(device, precision):
            logits = model(xb).float()
            if tta:
                logits = 0.5 * (logits + model(xb.flip(3)).float())
        out.append(logits.cpu())
    return torch.cat(out) if out else torch.empty(0, 10)


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
                 threads: int | None = None, device: str = "auto") -> dict:
    """Evaluate a run folder's model on the official test set and write RUN/metrics.json."""
    from fmnist.checkpoint import load_model, write_json
    from fmnist.data import load_fashion_mnist
    from fmnist.preprocess import preprocess

    dev = runtime.setup(threads, device)
    model, meta = load_model(run_dir, map_location=dev)
    data = data or load_fashion_mnist()
    images, labels = data.test_images, data.test_labels
    if limit:
        images, labels = images[:limit], labels[:limit]
    tta = meta.get("tta", False) if tta is None else tta
    x = preprocess(images, meta["preprocessing"])
    logits = batched_logits(model, x, tta=tta, device=dev)
    m = classification_metrics(logits, labels, meta["class_names"])
    if tta:
        # Report both ways: with and without mirrored test-time augmentation.
        m["accuracy_no_tta"] = float((batched_logits(model, x, device=dev).argmax(1) == labels).double().mean())
    m["tta"] = tta
    m["model"] = meta["model"]
    if write:
        write_json(Path(run_dir) / "metrics.json", m)
    return m

