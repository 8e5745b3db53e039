"""Workarounds for Keras bugs, in one place, each with its upstream issue.

Verified on Keras 3.15 with TensorFlow 2.21 (setup.cfg admits only what was
verified). tests/test_keras_compat.py has one test per workaround, and a
strict-xfail canary per upstream bug that starts passing, and so fails the
suite, when an upgrade fixes it: then delete the workaround.

Everything else in the package uses public Keras API only.
"""

from __future__ import annotations

import tensorflow as tf

VERIFIED_KERAS = "3.15"


def steps_per_execution_for(requested: int) -> int:
    """`requested` under the default strategy, 1 inside any tf.distribute strategy.

    keras-team/keras#19246 (open): with steps_per_execution > 1, Keras 3's
    multi-step training loop fails inside tf.distribute strategies ("You must
    feed a value for placeholder tensor ..."); one step per call is what works there.
    """
    return requested if not tf.distribute.has_strategy() else 1


def adapt_model_for_multi_worker(model, strategy: tf.distribute.Strategy, sample_batch) -> None:
    """Makes `model.fit` work under MultiWorkerMirroredStrategy.

    keras-team/keras#20585 (open): Keras 3's TensorFlow trainer fails there in
    two places: its symbolic build averages a distributed input batch across
    workers, and its train/test steps average scalar metrics across workers
    with `reduce(MEAN, axis=0)`, which rejects scalars. So, on this model
    instance only (nothing is saved with it):
      - the symbolic build uses a local batch of the same shape (this
        overrides the private `_maybe_symbolic_build`, calling `_symbolic_build`);
      - each step returns its metrics with shape [1]; the cross-worker mean
        over axis 0 is then the global mean, as Keras intends, and Keras's log
        handling turns the one-element arrays back into floats.
    Gradients are untouched: they are all-reduced by the strategy as usual.
    """

    def symbolic_build(iterator=None, data_batch=None):
        with strategy.scope():
            model._symbolic_build(data_batch=sample_batch)

    def with_vector_metrics(step):
        def wrapped(data):
            return {name: tf.reshape(value, [1]) for name, value in step(data).items()}

        return wrapped

    model._maybe_symbolic_build = symbolic_build
    model.train_step = with_vector_metrics(model.train_step)
    model.test_step = with_vector_metrics(model.test_step)
