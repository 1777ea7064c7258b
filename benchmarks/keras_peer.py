"""Seed A's recipe in Keras, for a side-by-side timing (run by ``train_speed.py --peer keras`` in its own
virtual environment with tensorflow-cpu; fmnist itself never imports TensorFlow).

The model is seed A's "2 Conv + 2 FC" (1,630,474 parameters): 2 x [conv 3x3, ReLU, BatchNorm, max-pool 2x2] with 32
and 64 filters, dense 512 with ReLU and dropout 0.5, softmax; horizontal flips; Adam 1e-3; batch 32; images
scaled to [0, 1]. It trains on the split it is given (the same 50,000 / 10,000 as fmnist's) and prints one JSON
line: per epoch, the seconds since training began and the validation accuracy, and the first time it reached
``--target``.

    python keras_peer.py --data split.npz --epochs 30 --target 0.916 --stop-at-target
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build(keras):
    layers = keras.layers
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.RandomFlip("horizontal"),
        layers.Conv2D(32, 3, padding="same"), layers.ReLU(), layers.BatchNormalization(), layers.MaxPooling2D(),
        layers.Conv2D(64, 3, padding="same"), layers.ReLU(), layers.BatchNormalization(), layers.MaxPooling2D(),
        layers.Flatten(), layers.Dense(512, activation="relu"), layers.Dropout(0.5),
        layers.Dense(10, activation="softmax"),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="npz with x_train, y_train, x_val, y_val (uint8 images)")
    ap.add_argument("--epochs", type=int, default=30, help="epochs (default: 30, seed A's)")
    ap.add_argument("--target", type=float, default=0.916, help="validation accuracy to time (default: 0.916)")
    ap.add_argument("--stop-at-target", action="store_true", help="stop once the target is reached (default: off)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = ap.parse_args()

    import numpy as np
    import tensorflow as tf
    from tensorflow import keras

    keras.utils.set_random_seed(args.seed)
    d = np.load(args.data)
    x_tr, x_val = (d[k][..., None].astype("float32") / 255.0 for k in ("x_train", "x_val"))
    y_tr, y_val = d["y_train"], d["y_val"]
    model = build(keras)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    rows: list[dict] = []
    t0 = time.monotonic()

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            rows.append({"epoch": epoch + 1, "elapsed": time.monotonic() - t0, "val_acc": float(logs["val_accuracy"]),
                         "val_loss": float(logs["val_loss"])})
            if args.stop_at_target and logs["val_accuracy"] >= args.target:
                self.model.stop_training = True

    model.fit(x_tr, y_tr, batch_size=32, epochs=args.epochs, validation_data=(x_val, y_val), verbose=0,
              callbacks=[Record()])
    reached = next((r["elapsed"] for r in rows if r["val_acc"] >= args.target), None)
    print(json.dumps({"tensorflow": tf.__version__, "parameters": model.count_params(), "epochs": rows,
                      "time_to_target": reached}))


if __name__ == "__main__":
    main()
