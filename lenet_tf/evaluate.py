"""Evaluating and predicting with any model this package writes (Keras, SavedModel, TFLite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lenet_tf.config import TrainConfig
from lenet_tf.errors import UsageError
from lenet_tf.folders import FOLDER_DATASET, FolderDataset
from lenet_tf.images import load_image
from lenet_tf.inference import Predictor, find_model_card
from lenet_tf.registry import DatasetInfo, dataset_info
from lenet_tf.run_dir import RunDir


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts: rows are true classes, columns predicted classes."""
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    return confusion


def evaluate_predictor(predictor: Predictor, images: np.ndarray, labels: np.ndarray,
                       dataset: str | DatasetInfo) -> dict[str, Any]:
    """Accuracy, cross-entropy loss, per-class accuracy and the confusion matrix,
    named by the classes of `dataset` (a built-in's name, or a DatasetInfo)."""
    probabilities = predictor.predict(images)
    predicted = probabilities.argmax(axis=1)
    # Loss from probabilities works for every format, quantised ones included;
    # the clip keeps a confident mistake from becoming infinite.
    chosen = np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)
    info = dataset_info(dataset)
    class_names = info.class_names
    confusion = confusion_matrix(labels, predicted, len(class_names))
    per_class = {}
    for class_id, name in enumerate(class_names):
        total = confusion[class_id].sum()
        per_class[name] = float(confusion[class_id, class_id] / total) if total else None
    return {
        "model": str(predictor.path),
        "format": predictor.kind,
        "dataset": info.name,
        "examples": int(len(labels)),
        "accuracy": float((predicted == labels).mean()),
        "loss": float(-np.log(chosen).mean()),
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
        "class_names": list(class_names),
    }


def format_evaluation(result: dict[str, Any]) -> str:
    names = result["class_names"]
    lines = [
        f"{result['format']} model {result['model']} on {result['examples']} {result['dataset']} test images",
        f"accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f}",
        "per-class accuracy:",
    ]
    lines += [f"  {name:<11} {accuracy:.4f}" for name, accuracy in result["per_class_accuracy"].items()]
    width = max(len(name) for name in names)
    lines.append("confusion matrix (rows: true class, columns: predicted class):")
    lines.append(" " * (width + 2) + " ".join(f"{index:>5}" for index in range(len(names))))
    for index, row in enumerate(result["confusion_matrix"]):
        lines.append(f"{names[index]:>{width}} {index}" + " ".join(f"{count:>5}" for count in row))
    return "\n".join(lines)


def predict_files(
    predictor: Predictor, paths: list[str], dataset: str | DatasetInfo, invert: str = "auto", top: int | None = None
) -> list[dict[str, Any]]:
    """One result per file: a prediction, or {"file", "error"} for a file that failed;
    classes and framing are those of `dataset` (a built-in's name, or a DatasetInfo)."""
    dataset = dataset_info(dataset)
    names = dataset.class_names
    top = min(3, len(names)) if top is None else top
    if not 1 <= top <= len(names):
        raise UsageError(f"--top must be between 1 and {len(names)}, the model's classes (got {top})")
    results: list[dict[str, Any]] = []
    loaded: list[tuple[int, np.ndarray]] = []
    for path in paths:
        try:
            loaded.append((len(results), load_image(path, dataset, invert)))
            results.append({"file": path})
        except UsageError as error:
            results.append({"file": path, "error": str(error)})
    if loaded:
        probabilities = predictor.predict(np.stack([image for _, image in loaded]))
        for (index, _), row in zip(loaded, probabilities):
            order = np.argsort(row)[::-1][:top]
            results[index].update(
                class_id=int(order[0]),
                class_name=names[order[0]],
                probability=float(row[order[0]]),
                top=[{"class_id": int(k), "class_name": names[k], "probability": float(row[k])} for k in order],
            )
    return results


def dataset_of_model(path: str | Path) -> str | DatasetInfo | None:
    """The dataset a model was trained on, from its model card or run config,
    if known: a built-in's name, or a folder of pictures' DatasetInfo, rebuilt
    from the record that came with the model."""
    found = find_model_card(path)
    if found is not None:
        card = found[0]
        if card.get("dataset") == FOLDER_DATASET and isinstance(card.get("folder"), dict):
            return FolderDataset.from_record(card["folder"]).info  # Its class names and recipe come with the model.
        return card.get("dataset")
    run_dir = RunDir(Path(path).parent.parent)  # A checkpoint inside a run: <run>/checkpoints/last.keras.
    try:
        dataset = TrainConfig.read(run_dir.config).dataset
    except UsageError:
        return None
    if dataset == FOLDER_DATASET:
        return FolderDataset.from_run(run_dir.root).info
    return dataset
