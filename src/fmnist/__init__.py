"""fmnist: train, evaluate, explain and serve Fashion-MNIST classifiers."""

__version__ = "0.1.0"

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def load(run, *, backend: str = "auto", threshold: float | None = None, ood_threshold: float | None = None,
         top_k: int = 3):
    """Load a trained run folder and return its :class:`fmnist.core.predict.Predictor`.

    ``backend``: ``auto`` (ONNX Runtime on ``RUN/model.onnx`` where the run was exported and onnxruntime is
    installed, else PyTorch), ``torch``, ``onnx`` or ``onnx-int8``. ``threshold``: the confidence under which
    answers are hedged, from 0 to 1 (None: the run's own, 0.60 unless set). ``ood_threshold``: the OOD score
    above which images are refused, a finite number on the detector's scale (None: the run's own).
    ``top_k``: classes listed per result, from 1 to the run's number of classes. A value out of range is an
    :class:`~fmnist.core.errors.InputError`, never clamped.

    ``load(run).predict(x)`` answers one image with one dict and several with a list; docs/python-api.md
    gives the contract (what counts as one image, as several, and what is refused).
    """
    from fmnist.core.predict import Predictor

    return Predictor.from_run(run, backend=backend, confidence_threshold=threshold, ood_threshold=ood_threshold,
                              top_k=top_k)


__all__ = ["CLASS_NAMES", "load", "__version__"]
