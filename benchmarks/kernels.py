"""Where one classic training step's time goes, kernel by kernel."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

from benchmarks.common import plain_keras_model


def _classic_training_step(batch_size: int):
    """One training step of the plain-Keras classic model as a tf.function, on random data."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = plain_keras_model()  # Compiled: its own loss and optimizer drive the step.
    images = tf.random.uniform([batch_size, 28, 28, 1])
    labels = tf.random.uniform([batch_size], 0, 10, tf.int32)

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            loss = model.loss(labels, model(images, training=True))
        model.optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    return step, (images, labels)


def bench_kernels(batch_size: int, repeats: int, calls: int = 40) -> dict[str, Any]:
    """Where one training step of the classic model goes: its heavy kernels, each
    timed alone at the step's shapes (the ops TensorFlow runs for it, oneDNN's on
    CPU), beside the whole step and a large matrix product.

    The convolution kernels set a floor that no framework-side change goes
    under: with everything else in the step free, training could be at most
    `step / convolutions` times faster than plain Keras.
    """
    import tensorflow as tf

    def uniform(*shape):
        return tf.random.uniform(shape)

    batch = batch_size
    conv1_flops = 2 * batch * 28 * 28 * 6 * 25
    conv2_flops = 2 * batch * 10 * 10 * 16 * 150
    dense_flops = 2 * batch * (400 * 120 + 120 * 84 + 84 * 10)
    unit = [1, 1, 1, 1]

    def sigmoid_pool_forward(pre_activation):
        return tf.nn.avg_pool2d(tf.sigmoid(pre_activation), 2, 2, "VALID")

    def sigmoid_pool_backward(activation, pooled_gradient):
        return tf.raw_ops.SigmoidGrad(y=activation, dy=tf.raw_ops.AvgPoolGrad(
            orig_input_shape=tf.shape(activation), grad=pooled_gradient,
            ksize=[1, 2, 2, 1], strides=[1, 2, 2, 1], padding="VALID"))

    kernels: dict[str, tuple[Callable, tuple, int, bool]] = {
        # name: (function, arguments, floating-point operations, is a convolution)
        "conv1 forward (+bias)": (lambda x, w, b: tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "SAME"), b),
                                  (uniform(batch, 28, 28, 1), uniform(5, 5, 1, 6), uniform(6)), conv1_flops, True),
        "conv1 filter gradient": (lambda x, dy: tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=[5, 5, 1, 6], out_backprop=dy, strides=unit, padding="SAME"),
            (uniform(batch, 28, 28, 1), uniform(batch, 28, 28, 6)), conv1_flops, True),
        "conv2 forward (+bias)": (lambda x, w, b: tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "VALID"), b),
                                  (uniform(batch, 14, 14, 6), uniform(5, 5, 6, 16), uniform(16)), conv2_flops, True),
        "conv2 input gradient": (lambda dy, w: tf.raw_ops.Conv2DBackpropInput(
            input_sizes=[batch, 14, 14, 6], filter=w, out_backprop=dy, strides=unit, padding="VALID"),
            (uniform(batch, 10, 10, 16), uniform(5, 5, 6, 16)), conv2_flops, True),
        "conv2 filter gradient": (lambda x, dy: tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=[5, 5, 6, 16], out_backprop=dy, strides=unit, padding="VALID"),
            (uniform(batch, 14, 14, 6), uniform(batch, 10, 10, 16)), conv2_flops, True),
        "block 1 sigmoid + pool, forward": (sigmoid_pool_forward, (uniform(batch, 28, 28, 6),), 0, False),
        "block 1 sigmoid + pool, backward": (sigmoid_pool_backward,
                                             (uniform(batch, 28, 28, 6), uniform(batch, 14, 14, 6)), 0, False),
        "block 2 sigmoid + pool, forward": (sigmoid_pool_forward, (uniform(batch, 10, 10, 16),), 0, False),
        "block 2 sigmoid + pool, backward": (sigmoid_pool_backward,
                                             (uniform(batch, 10, 10, 16), uniform(batch, 5, 5, 16)), 0, False),
        "dense layers, forward + both gradients": (_dense_forward_backward, (
            uniform(batch, 400), uniform(400, 120), uniform(120, 84), uniform(84, 10)), 3 * dense_flops, False),
    }
    step, step_arguments = _classic_training_step(batch_size)
    square = uniform(1024, 1024)
    timed = {name: (tf.function(function), arguments) for name, (function, arguments, _, _) in kernels.items()}
    timed["whole training step"] = (step, step_arguments)
    timed["1024x1024 matmul"] = (tf.function(tf.matmul), (square, square))
    samples: dict[str, list[float]] = {name: [] for name in timed}
    for round_index in range(1 + repeats):  # Rounds interleave the kernels; round 0 warms up.
        for name, (function, arguments) in timed.items():
            start = time.perf_counter()
            for _ in range(calls):
                result = function(*arguments)
            tf.nest.flatten(result)[0].numpy()  # Waits for the last call.
            if round_index:
                samples[name].append((time.perf_counter() - start) / calls * 1e6)
    step_us = statistics.median(samples["whole training step"])
    peak_gflops = 2 * 1024**3 / statistics.median(samples["1024x1024 matmul"]) / 1e3
    rows = {}
    for name, (_, _, flops, _) in kernels.items():
        microseconds = statistics.median(samples[name])
        rows[name] = {"us": microseconds, "gflop_per_s": flops / microseconds / 1e3 if flops else None,
                      "share_of_step": microseconds / step_us}
    convolution_us = sum(rows[name]["us"] for name, entry in kernels.items() if entry[3])
    step_flops = 2 * conv1_flops + 3 * conv2_flops + 3 * dense_flops
    return {
        "batch_size": batch_size, "kernels": rows, "step_us": step_us,
        "step_images_per_s": batch_size / step_us * 1e6, "step_gflop_per_s": step_flops / step_us / 1e3,
        "convolutions_us": convolution_us, "ceiling_with_these_convolutions": step_us / convolution_us,
        "matmul_gflop_per_s": peak_gflops,
        "arithmetic_floor_us": step_flops / peak_gflops / 1e3,
    }


def _dense_forward_backward(features, kernel1, kernel2, kernel3):
    """The three dense layers' matrix products: forward, input and weight gradients."""
    import tensorflow as tf

    outputs = []
    hidden = features
    for kernel in (kernel1, kernel2, kernel3):
        following = tf.matmul(hidden, kernel)
        outputs.append(tf.matmul(following, kernel, transpose_b=True))  # Input gradient's shape.
        outputs.append(tf.matmul(hidden, following, transpose_a=True))  # Weight gradient's shape.
        hidden = following
    return outputs


def kernels_markdown(block: dict[str, Any]) -> list[str]:
    lines = [f"One classic training step at batch {block['batch_size']}, each heavy kernel timed alone "
             "at the step's shapes (median µs per call):", "",
             "| kernel | µs | GFLOP/s | share of the whole step |", "| --- | --- | --- | --- |"]
    for name, row in block["kernels"].items():
        rate = f"{row['gflop_per_s']:.0f}" if row["gflop_per_s"] else "–"
        lines.append(f"| {name} | {row['us']:,.0f} | {rate} | {row['share_of_step'] * 100:.0f} % |")
    lines += ["", f"Whole step {block['step_us']:,.0f} µs ({block['step_images_per_s']:,.0f} images/s, "
              f"{block['step_gflop_per_s']:.0f} GFLOP/s). The five convolution kernels alone take "
              f"{block['convolutions_us']:,.0f} µs, so with everything else free a step could be at most "
              f"{block['ceiling_with_these_convolutions']:.2f}x faster. A 1024x1024 matmul runs at "
              f"{block['matmul_gflop_per_s']:.0f} GFLOP/s; at that rate the step's arithmetic would take "
              f"{block['arithmetic_floor_us']:,.0f} µs.", ""]
    return lines
