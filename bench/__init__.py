"""bench: an ablation benchmark harness for convolutional networks (MNIST, WARWICK glands)."""

__version__ = "0.1.0"
