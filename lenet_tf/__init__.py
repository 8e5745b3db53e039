"""LeNet-5 on Fashion-MNIST and MNIST with Keras 3 and TensorFlow: train, watch, export, prove."""

__version__ = "0.1.0"
