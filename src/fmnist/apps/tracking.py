"""``fmnist train --tensorboard [DIR]``: what a run does, as TensorBoard event files.

Per epoch: the losses, accuracies, learning rate and training images per second; at the end, the confusion
matrix and the reliability diagram of the kept model on the validation split (never the test set, which only
``fmnist evaluate`` reads), with the calibrated temperature. Needs the ``tensorboard`` extra
(``pip install -e '.[tensorboard]'``); it is imported only here, only when asked for.
"""
from __future__ import annotations

from pathlib import Path

from fmnist.core.errors import InputError
from fmnist.core.runfolder import CONFIG, read_json

INSTALL = "pip install -e '.[tensorboard]' (tensorboard, matplotlib)"


def summary_writer():
    """TensorBoard's SummaryWriter class; one clear error without the extra (checked before any training)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError(f"--tensorboard needs TensorBoard: {INSTALL}") from None
    return SummaryWriter


class TensorBoard:
    """An ``on_epoch_end`` callback of :func:`fmnist.fit.train.train` that writes scalars, and ``finish``.

    ``fmnist tune --tensorboard`` gives each trial one (a folder per trial) and adds the trial's parameters and
    outcome to TensorBoard's HParams view."""

    def __init__(self, logdir, run_dir):
        SummaryWriter = summary_writer()
        self.logdir, self.run_dir = Path(logdir), Path(run_dir)
        self._writer_class, self._writer = SummaryWriter, None  # created with the first epoch: nothing before
        self.batch_size = None
        self.last_step = 0

    @property
    def writer(self):
        if self._writer is None:
            self._writer = self._writer_class(log_dir=str(self.logdir))
        return self._writer

    def __call__(self, epoch: int, row: dict) -> bool:
        if self.batch_size is None:  # config.json holds the recipe that trains (an "auto" row's batch size)
            config = read_json(self.run_dir / CONFIG)
            self.batch_size = config.get("batch_size") or 0
            self.last_step = max(0, row.get("step", 0) - self._steps_in(row))
        w = self.writer
        for key, tag in (("train_loss", "loss/train"), ("val_loss", "loss/validation"),
                         ("train_acc", "accuracy/train"), ("val_acc", "accuracy/validation"), ("lr", "lr")):
            if row.get(key) is not None:
                w.add_scalar(tag, row[key], epoch)
        step = row.get("step")
        if step is not None and row.get("seconds"):
            images = (step - self.last_step) * self.batch_size
            if images > 0:
                w.add_scalar("images_per_second/train", images / row["seconds"], epoch)
            self.last_step = step
        w.flush()
        return False  # never asks training to stop

    def _steps_in(self, row: dict) -> int:
        """Steps of the first epoch seen (a resumed run starts past step 0): the history's steps per epoch."""
        epoch = row.get("epoch") or 1
        return row.get("step", 0) // epoch

    def finish(self, data, hparams: dict | None = None, outcome: dict | None = None) -> None:
        """The kept model's confusion matrix and reliability diagram on the validation split; with ``hparams``
        (a tune trial's parameters) and ``outcome`` (its figures), a row of the HParams view."""
        from fmnist.apps.report import calibration_bins
        from fmnist.apps.report import figures as figs
        from fmnist.core.forward import probabilities
        from fmnist.core.run import Run
        from fmnist.fit.data import split_indices
        from fmnist.fit.evaluate import classification_metrics, run_logits

        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError(f"--tensorboard draws its figures with matplotlib: {INSTALL}") from None
        run = Run.load(self.run_dir, detector=False)
        _, val_idx = split_indices(data.train_labels, run.config)
        if len(val_idx):
            images, labels = data.train_images[val_idx], data.train_labels[val_idx]
            logits = run_logits(run.backend("torch", "cpu"), run, images)
            m = classification_metrics(logits, labels, run.class_names)
            probs = probabilities(logits.numpy(), run.temperature)
            ece, bins = calibration_bins(probs, labels.numpy())
            step = run.best_epoch or 0
            self.writer.add_figure("validation/confusion_matrix", figs.confusion(m["confusion_matrix"], run.class_names),
                                   step)
            self.writer.add_figure("validation/reliability", figs.reliability(bins, ece, run.temperature), step)
            self.writer.add_scalar("validation/ece_calibrated", ece, step)
            self.writer.add_scalar("validation/accuracy_kept", float((logits.argmax(1) == labels).double().mean()),
                                   step)
        if hparams is not None:
            self.add_hparams(hparams, outcome or {})
        self.writer.close()

    def add_hparams(self, hparams: dict, outcome: dict) -> None:
        """One HParams row in this folder (run_name "."), values as TensorBoard takes them (numbers, text)."""
        plain = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
        self.writer.add_hparams(plain, {f"hparam/{k}": float(v) for k, v in outcome.items()}, run_name=".")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
