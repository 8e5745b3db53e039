"""The peer of a folder run: the TensorFlow tutorial "Image classification"
(tensorflow.org/tutorials/images/classification) as its script trains a
folder of pictures, at the pictures' own size in colour.

    python -m benchmarks.tutorial_cnn TRAIN_FOLDER TEST_FOLDER [--epochs 15]

keras.utils.image_dataset_from_directory (batch 32, seed 123), cached,
shuffled and prefetched; Rescaling(1/255), three Conv2D(3x3, ReLU) +
MaxPooling2D blocks of 16, 32 and 64 filters, Dense(128, ReLU), one logit
a class; Adam, sparse categorical cross-entropy from logits, 15 epochs.
Trains on TRAIN_FOLDER, prints the accuracy on TEST_FOLDER as
`test_accuracy=...`. benchmarks.folder_defaults times it as a whole script,
TensorFlow's import included, as a user waits for it."""

from __future__ import annotations

import argparse
from pathlib import Path


def picture_size(folder: Path) -> tuple[int, int]:
    """The first picture's height and width: the tutorial's image_size, set to the pictures' own."""
    from PIL import Image

    first = next(path for path in sorted(folder.rglob("*")) if path.is_file())
    with Image.open(first) as picture:
        return picture.height, picture.width


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train_folder", type=Path)
    parser.add_argument("test_folder", type=Path)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf

    size = picture_size(args.train_folder)
    train = keras.utils.image_dataset_from_directory(args.train_folder, seed=123, image_size=size, batch_size=32)
    test = keras.utils.image_dataset_from_directory(args.test_folder, shuffle=False, image_size=size, batch_size=32)
    classes = len(train.class_names)
    train = train.cache().shuffle(1000).prefetch(tf.data.AUTOTUNE)
    test = test.cache().prefetch(tf.data.AUTOTUNE)
    model = keras.Sequential([
        keras.Input(shape=(*size, 3)),
        keras.layers.Rescaling(1.0 / 255),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(classes),
    ])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(train, epochs=args.epochs, verbose=2)
    _, accuracy = model.evaluate(test, verbose=0)
    print(f"test_accuracy={accuracy:.4f} parameters={model.count_params()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
