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


def load(run_dir, **kwargs):
    """Load a trained run folder and return a :class:`fmnist.core.predict.Predictor`."""
    from fmnist.core.predict import Predictor

    return Predictor.from_run(run_dir, **kwargs)


__all__ = ["CLASS_NAMES", "load", "__version__"]
