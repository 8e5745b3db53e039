"""Workarounds for Keras bugs and gaps, in one place, each with its upstream
issue or pull request, and every use of Keras's protected methods.

Verified on Keras 3.15 with TensorFlow 2.21 (setup.cfg admits only what was
verified). tests/test_keras_compat.py has one test per workaround, and a
strict-xfail canary per upstream bug or gap that starts passing, and so fails
the suite, when an upgrade closes it: then delete the workaround.

Everything else in the package uses public Keras API only.
"""

from __future__ import annotations

import functools
import re

import keras
import tensorflow as tf

VERIFIED_KERAS = "3.15"


@keras.saving.register_keras_serializable(package="lenet_tf")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization whose training step on images runs
    TensorFlow's fused kernel (FusedBatchNormV3, oneDNN's on CPU).

    No upstream issue found: Keras 3's TensorFlow backend computes batch norm
    in training from separate ops (moments, then normalise; tf.keras 2 had
    `fused=True`), which makes batch norm a large share of a small LeNet's
    training step on a CPU; the fused kernel is faster (docs/speedrun.md
    says how much). Inference, 2-D inputs and anything but the last axis
    go through Keras's own code, so exported models contain only standard
    ops. The moving statistics are updated as Keras updates them.
    """

    def call(self, inputs, training=None, mask=None):
        fusable = training and len(inputs.shape) == 4 and self.axis in (-1, 3) and mask is None
        if not fusable or self.synchronized:
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=tf.cast(inputs, tf.float32),
            scale=self.gamma if self.scale else tf.ones([channels]),
            offset=self.beta if self.center else tf.zeros([channels]),
            mean=tf.zeros([0]), variance=tf.zeros([0]),
            epsilon=self.epsilon, data_format="NHWC", is_training=True,
        )
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return tf.cast(outputs, self.compute_dtype)


def steps_per_execution_for(requested: int) -> int:
    """`requested` under the default strategy, 1 inside any tf.distribute strategy.

    keras-team/keras#19246 (open): with steps_per_execution > 1, Keras 3's
    multi-step training loop fails inside tf.distribute strategies ("You must
    feed a value for placeholder tensor ..."); one step per call is what works there.
    """
    return requested if not tf.distribute.has_strategy() else 1


def build_before_fit(model: keras.Model, strategy: tf.distribute.Strategy, batch_spec) -> None:
    """Creates the optimizer's and the metrics' variables before `fit` traces
    its training step; `batch_spec` is the training pipeline's element_spec.

    Under the default strategy Keras 3's TensorFlow trainer leaves them to
    be created while the step is traced (its `_maybe_symbolic_build` returns
    early there, "for backwards compatibility"), and a tf.function that
    creates variables on its first call is traced again
    (tensorflow/tensorflow#48851; keras-team/keras#22618 is the same cost
    after loading a model): the first epoch paid for two traces of the
    whole step, about a second of a one-epoch MNIST run on 2 CPU cores. This
    runs the protected `_symbolic_build` that Keras runs itself inside
    other strategies, on symbolic tensors of the batch's shapes.
    """
    with strategy.scope():
        model._symbolic_build(data_batch=batch_spec)


def adapt_model_for_multi_worker(model, strategy: tf.distribute.Strategy, batch_spec) -> None:
    """Makes `model.fit` work under MultiWorkerMirroredStrategy.

    keras-team/keras#20585 (open): Keras 3's TensorFlow trainer fails there in
    two places: its symbolic build averages a distributed input batch across
    workers, and its train/test steps average scalar metrics across workers
    with `reduce(MEAN, axis=0)`, which rejects scalars. So, on this model
    instance only (nothing is saved with it):
      - the model is built from the local batch's shapes (`batch_spec`, the
        training pipeline's element_spec; build_before_fit), and Keras's own
        build, which would draw and average a batch, is skipped (this
        overrides the protected `_maybe_symbolic_build`);
      - each step returns its metrics with shape [1]; the cross-worker mean
        over axis 0 is then the global mean, as Keras intends, and Keras's log
        handling turns the one-element arrays back into floats.
    Gradients are untouched: they are all-reduced by the strategy as usual.
    """

    def already_built(iterator=None, data_batch=None):
        pass

    def with_vector_metrics(step):
        def wrapped(data):
            return {name: tf.reshape(value, [1]) for name, value in step(data).items()}

        return wrapped

    build_before_fit(model, strategy, batch_spec)
    model._maybe_symbolic_build = already_built
    model.train_step = with_vector_metrics(model.train_step)
    model.test_step = with_vector_metrics(model.test_step)


@keras.saving.register_keras_serializable(package="lenet_tf")
class ConvolutionMuon(keras.optimizers.Muon):
    """keras.optimizers.Muon that also updates convolution kernels by Muon,
    each flattened to a (height * width * input channels, filters) matrix.

    Not a bug, a choice upstream: keras-team/keras#21885 (merged) narrowed
    Keras's Muon to 2-D variables, so a 4-D conv kernel gets the AdamW
    update, and in a LeNet only the dense kernels got Muon's. Muon's author
    uses it on conv filters by flattening their last three dimensions; on
    the fast preset that raised the validation accuracy (docs/speedrun.md).
    Overrides Muon's protected `_should_use_adamw`, and
    the two steps of its update that depend on the shape: the Newton-Schulz
    iteration and `lr_adjust` see the flattened matrix, and the rest of
    Keras's step (momentum, Nesterov) runs as it is.
    """

    def _should_use_adamw(self, variable):
        if len(variable.shape) == 4:
            return any(re.search(keyword, variable.path) for keyword in self.exclude_layers)
        return super()._should_use_adamw(variable)

    def zeropower_via_newtonschulz5(self, x, steps: int):
        # Keras's iteration would treat a 4-D tensor as a batch of 2-D matrices.
        return self._on_matrix(x, functools.partial(super().zeropower_via_newtonschulz5, steps=steps))

    def lr_adjust(self, x):
        # Keras scales by the first two dimensions, the kernel's height and width for a 4-D one.
        return self._on_matrix(x, super().lr_adjust)

    @staticmethod
    def _on_matrix(x, function):
        """function(x) for a 2-D x; for a conv kernel, function of its matrix of one column per filter."""
        if len(x.shape) != 4:
            return function(x)
        return keras.ops.reshape(function(keras.ops.reshape(x, (-1, x.shape[-1]))), x.shape)
