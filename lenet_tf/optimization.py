"""How a model is compiled: the loss, the learning-rate schedule and the optimizer."""

from __future__ import annotations

import math

import keras

from lenet_tf.config import TrainConfig
from lenet_tf.keras_compat import ConvolutionMuon, steps_per_execution_for
from lenet_tf.model import build_model
from lenet_tf.registry import DatasetInfo


@keras.saving.register_keras_serializable(package="lenet_tf")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy on logits against integer labels with label smoothing.

    Keras's sparse cross-entropy has no label_smoothing; this is the same loss
    as CategoricalCrossentropy(label_smoothing=s) on one-hot labels, without
    one-hot labels in the pipeline:
    (1 - s) * -log p[y] + s * mean over classes of -log p[k].
    """

    def __init__(self, label_smoothing: float = 0.0, name: str = "smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        log_probabilities = keras.ops.log_softmax(y_pred, axis=-1)
        labels = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
        true_class = -keras.ops.take_along_axis(log_probabilities, labels[:, None], axis=-1)[:, 0]
        uniform = -keras.ops.mean(log_probabilities, axis=-1)
        return (1.0 - self.label_smoothing) * true_class + self.label_smoothing * uniform

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


@keras.saving.register_keras_serializable(package="lenet_tf")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then until `total_steps`:
    constant, cosine decay to 0, or linear decay to 0 (with a warm-up, the
    triangular "one-cycle" shape)."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, decay: str = "constant"):
        if decay not in ("constant", "cosine", "linear"):
            raise ValueError(f"decay must be constant, cosine or linear (got {decay!r})")
        self.peak, self.warmup_steps, self.total_steps, self.decay = peak, warmup_steps, total_steps, decay

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warming = self.peak * step / max(self.warmup_steps, 1)
        progress = keras.ops.clip((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 0.0, 1.0)
        if self.decay == "cosine":
            after = self.peak * 0.5 * (1.0 + keras.ops.cos(math.pi * progress))
        elif self.decay == "linear":
            after = self.peak * (1.0 - progress)
        else:
            after = self.peak * keras.ops.ones_like(progress)
        return keras.ops.where(step < self.warmup_steps, warming, after)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "decay": self.decay}


def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int):
    """A constant rate, or a linear warm-up followed by the configured decay over the run."""
    if config.lr_schedule == "constant" and not config.warmup_epochs:
        return config.learning_rate
    return WarmupSchedule(
        peak=config.learning_rate,
        warmup_steps=int(config.warmup_epochs * steps_per_epoch),
        total_steps=max(1, config.epochs * steps_per_epoch),
        decay=config.lr_schedule,
    )


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """SGD, or Muon (config.optimizer), at the config's rate schedule, momentum and weight decay."""
    learning_rate = learning_rate_schedule(config, steps_per_epoch)
    if config.optimizer == "muon":
        # Muon updates the dense and conv kernels with Newton-Schulz-
        # orthogonalised Nesterov momentum, scaled to AdamW's update size (its
        # rms_rate), and everything else with AdamW at the same rate; one weight
        # decay for both. Keras's own Muon would leave the conv kernels to AdamW.
        return ConvolutionMuon(learning_rate=learning_rate, momentum=config.momentum, nesterov=config.nesterov,
                               weight_decay=config.weight_decay, adam_weight_decay=config.weight_decay,
                               ns_steps=config.muon_ns_steps)
    return keras.optimizers.SGD(learning_rate=learning_rate, momentum=config.momentum, nesterov=config.nesterov,
                                weight_decay=config.weight_decay or None)


def build_compiled_model(config: TrainConfig, steps_per_epoch: int = 1,
                         dataset: DatasetInfo | None = None) -> keras.Model:
    """The model, compiled as the book does (SGD, cross-entropy on logits,
    accuracy), plus the optional optimizer, momentum, weight decay, schedule
    and label smoothing of the other presets.

    Call inside `strategy.scope()` so the variables are mirrored. `dataset`:
    as build_model's.
    """
    model = build_model(config, dataset)
    loss = (SmoothedSparseCrossentropy(config.label_smoothing) if config.label_smoothing
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.compile(
        optimizer=make_optimizer(config, steps_per_epoch),
        loss=loss,
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution_for(config.steps_per_execution),
    )
    return model
