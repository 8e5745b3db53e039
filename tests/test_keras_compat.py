"""The Keras workarounds in lenet_tf.keras_compat: one test each that they work,
and a strict-xfail canary each that starts passing, and so fails the suite,
when an upgrade of Keras fixes the upstream bug (then delete the workaround)."""

import json
import os
import subprocess
import sys

import pytest

from lenet_tf.keras_compat import steps_per_execution_for

from conftest import REPO_ROOT, free_ports

# A tiny model.fit under a strategy, in a process of its own (a strategy's
# devices and collectives must be set up before TensorFlow starts).
FIT_SCRIPT = """
import json, os, sys
import numpy as np, tensorflow as tf, keras
strategy_name, steps_per_execution, workaround = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
if strategy_name == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
else:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
images = np.random.default_rng(0).random((256, 4)).astype("float32")
labels = (images.sum(axis=1) > 2).astype("int32")
data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(32)
with strategy.scope():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                  steps_per_execution=steps_per_execution)
if workaround:
    from lenet_tf.keras_compat import adapt_model_for_multi_worker
    adapt_model_for_multi_worker(model, strategy, data.element_spec)
history = model.fit(data, epochs=1, verbose=0)
print("loss", history.history["loss"][-1])
"""


def _fit(strategy_name: str, steps_per_execution: int, workaround: bool, workers: int = 1) -> list[int]:
    """Exit codes of `workers` processes running FIT_SCRIPT together."""
    hosts = [f"127.0.0.1:{port}" for port in free_ports(workers)]
    processes = []
    for index in range(workers):
        environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="3",
                           TF_CONFIG=json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}))
        processes.append(subprocess.Popen(
            [sys.executable, "-c", FIT_SCRIPT, strategy_name, str(steps_per_execution), "1" if workaround else "0"],
            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    codes = []
    for process in processes:
        try:
            process.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        codes.append(process.returncode)
    return codes


def test_steps_per_execution_applies_only_outside_distribution_strategies():
    import tensorflow as tf

    assert steps_per_execution_for(64) == 64
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        assert steps_per_execution_for(64) == 1


@pytest.mark.xfail(strict=True, reason="keras-team/keras#19246: steps_per_execution > 1 fails under MirroredStrategy; "
                                       "when this passes, drop keras_compat.steps_per_execution_for")
def test_canary_steps_per_execution_under_mirrored_strategy():
    assert _fit("mirrored", steps_per_execution=4, workaround=False) == [0]


@pytest.mark.slow
def test_multi_worker_workaround_lets_two_workers_fit():
    assert _fit("multi_worker", steps_per_execution=1, workaround=True, workers=2) == [0, 0]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="keras-team/keras#20585: model.fit fails under MultiWorkerMirroredStrategy "
                                       "with two workers; when this passes, drop keras_compat.adapt_model_for_multi_worker")
def test_canary_plain_fit_with_two_workers():
    assert _fit("multi_worker", steps_per_execution=1, workaround=False, workers=2) == [0, 0]


def test_fused_batch_normalization_trains_like_keras_batch_normalization():
    """Same outputs, gradients and moving statistics as Keras's layer, up to float rounding
    (the moving variance: Bessel-corrected in TensorFlow's kernel, which at this batch
    size differs by far less than the tolerance)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from lenet_tf.keras_compat import FusedBatchNormalization

    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(2.0, 3.0, (64, 10, 10, 8)), tf.float32)
    weights = tf.constant(rng.normal(size=(64, 10, 10, 8)), tf.float32)  # A loss whose gradients are not ~0.
    results = []
    for layer in (keras.layers.BatchNormalization(momentum=0.9), FusedBatchNormalization(momentum=0.9)):
        layer.build(images.shape)
        layer.gamma.assign(np.linspace(0.5, 1.5, 8))
        with tf.GradientTape() as tape:
            tape.watch(images)
            outputs = layer(images, training=True)
            loss = tf.reduce_sum(outputs * weights)
        gradients = tape.gradient(loss, [images, layer.gamma, layer.beta])
        results.append([outputs, *gradients, layer.moving_mean, layer.moving_variance, layer(images, training=False)])
    for keras_value, fused_value in zip(*results):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(fused_value), keras.ops.convert_to_numpy(keras_value),
                                   rtol=2e-3, atol=2e-4)


@pytest.mark.xfail(strict=True, reason="Keras 3's BatchNormalization does not run TensorFlow's fused kernel; when "
                                       "this passes, FusedBatchNormalization can go")
def test_canary_keras_batch_normalization_runs_the_fused_kernel():
    import keras
    import tensorflow as tf

    layer = keras.layers.BatchNormalization()
    layer.build((8, 6, 6, 4))
    graph = tf.function(lambda images: layer(images, training=True)).get_concrete_function(
        tf.TensorSpec((8, 6, 6, 4), tf.float32)).graph
    assert any(operation.type.startswith("FusedBatchNorm") for operation in graph.get_operations())


def test_convolution_muon_updates_a_conv_kernel_as_muon_updates_its_flattened_matrix():
    import keras
    import numpy as np

    from lenet_tf.keras_compat import ConvolutionMuon

    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 16, 32)).astype("float32")
    gradient = rng.normal(size=kernel.shape).astype("float32")
    conv = keras.Variable(kernel, name="conv_kernel")
    matrix = keras.Variable(kernel.reshape(144, 32), name="dense_kernel")
    bias = keras.Variable(np.zeros(32, "float32"), name="bias")
    optimizer = ConvolutionMuon(learning_rate=0.01, weight_decay=0.0, adam_weight_decay=0.0)
    optimizer.build([conv, matrix, bias])
    for _ in range(2):  # The second step also goes through the momentum.
        optimizer.apply([gradient, gradient.reshape(144, 32), np.ones(32, "float32")], [conv, matrix, bias])
    # The conv kernel took Muon's step: exactly the dense kernel's, reshaped.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(conv).reshape(144, 32),
                               keras.ops.convert_to_numpy(matrix), rtol=1e-5, atol=1e-6)
    assert not np.allclose(keras.ops.convert_to_numpy(conv), kernel)
    # Muon keeps no AdamW velocity for it; 1-D variables still go to AdamW.
    assert optimizer.adam_velocities[optimizer._get_variable_index(conv)] is None
    assert optimizer.adam_velocities[optimizer._get_variable_index(bias)] is not None
    # exclude_layers still hands a matching conv kernel back to AdamW.
    assert ConvolutionMuon(exclude_layers=["conv"])._should_use_adamw(conv)


@pytest.mark.xfail(strict=True, reason="keras-team/keras#21885 made Keras's Muon update only 2-D variables; when "
                                       "it updates conv kernels itself, ConvolutionMuon can go")
def test_canary_keras_muon_updates_conv_kernels():
    import keras

    assert not keras.optimizers.Muon()._should_use_adamw(keras.Variable(keras.ops.zeros((3, 3, 16, 32))))


def _training_step_traces(build_first: bool) -> int:
    """How many times one epoch of `fit` traces the training step of a model
    compiled with Muon and a metric outside any tf.distribute scope."""
    import keras
    import numpy as np
    import tensorflow as tf

    from lenet_tf.keras_compat import ConvolutionMuon, build_before_fit

    rng = np.random.default_rng(0)
    images = rng.random((64, 6, 6, 1)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((images, rng.integers(0, 3, 64))).batch(16)
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(4, 3), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    model.compile(ConvolutionMuon(), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], steps_per_execution=2)
    if build_first:
        build_before_fit(model, tf.distribute.get_strategy(), data.element_spec)
    traces = []
    train_step = model.train_step

    def counting_train_step(batch):
        traces.append(1)  # Python runs only while TensorFlow traces.
        return train_step(batch)

    model.train_step = counting_train_step
    model.fit(data, epochs=2, verbose=0)
    return len(traces)


def test_build_before_fit_traces_the_training_step_once():
    assert _training_step_traces(build_first=True) == 1


@pytest.mark.xfail(strict=True, reason="Keras 3 creates the optimizer's and metrics' variables inside the first trace "
                                       "outside a strategy, so tf.function traces the step twice; when this passes, "
                                       "drop keras_compat.build_before_fit")
def test_canary_plain_fit_traces_the_training_step_once():
    assert _training_step_traces(build_first=False) == 1
