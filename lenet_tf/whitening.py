"""The whitened first conv layer's kernels, from the training images' patches,
in NumPy; lenet_tf.model.whiten_first_conv sets them.
"""

from __future__ import annotations

import numpy as np

from lenet_tf.registry import PIXEL_SCALE

# Images whose patches estimate the whitening: 1,000 give hundreds of
# thousands of 5x5 patches, plenty for a 25x25 covariance.
WHITENING_SAMPLE = 1000
# Added to each variance before dividing by its square root, on pixels scaled
# to [0, 1]: it keeps the faint components (Fashion-MNIST's 16th of 25 has
# variance 0.01) from being amplified into noise.
WHITENING_EPSILON = 1e-2


def whitening_weights(images: np.ndarray, kernel_size: int, filters: int, use_bias: bool,
                      crop: int = 0) -> list[np.ndarray]:
    """Kernels (and biases) for a first conv layer that whitens its input patches.

    Each filter projects a kernel_size x kernel_size patch, centred on the
    patches' mean, onto one principal component of the patches, divided by
    the square root of that component's variance: the outputs are
    uncorrelated and of about unit variance, which lets the next layers
    train at a high rate from the first step (the whitened first layer of
    the CIFAR-10 speedruns). Filters beyond the kernel_size**2 components
    repeat the leading ones negated, so that a ReLU after them passes both
    signs. Without a bias (batch norm follows the layer) the centring is
    left to the batch norm. The patches are those of the images less `crop`
    pixels from each side: what the model's first conv sees.
    """
    mean, covariance = patch_statistics(images, kernel_size, crop)
    variances, components = np.linalg.eigh(covariance)
    order = np.argsort(variances)[::-1]  # eigh returns them in ascending order.
    whitening = components[:, order] / np.sqrt(np.maximum(variances[order], 0.0) + WHITENING_EPSILON)
    while whitening.shape[1] < filters:
        whitening = np.concatenate([whitening, -whitening], axis=1)
    whitening = whitening[:, :filters]
    weights = [whitening.reshape(kernel_size, kernel_size, 1, filters).astype("float32")]
    if use_bias:
        weights.append((-mean @ whitening).astype("float32"))
    return weights


def patch_statistics(images: np.ndarray, kernel_size: int, crop: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The mean (float64, kernel_size**2) and covariance (float64, square) of
    the kernel_size x kernel_size patches of WHITENING_SAMPLE of `images`
    (uint8, N x 28 x 28 x 1) less `crop` pixels from each side, pixels
    scaled to [0, 1].
    """
    every = max(1, len(images) // WHITENING_SAMPLE)
    pixels = np.asarray(images[::every][:WHITENING_SAMPLE], dtype=np.float32)[..., 0] * PIXEL_SCALE
    pixels = pixels[:, crop:pixels.shape[1] - crop, crop:pixels.shape[2] - crop]
    patches = np.lib.stride_tricks.sliding_window_view(pixels, (kernel_size, kernel_size), axis=(1, 2))
    patches = patches.reshape(-1, kernel_size * kernel_size)
    mean = patches.mean(axis=0, dtype=np.float64)
    centred = patches - mean.astype(np.float32)
    covariance = (centred.T @ centred).astype(np.float64) / max(len(centred) - 1, 1)
    return mean, covariance
