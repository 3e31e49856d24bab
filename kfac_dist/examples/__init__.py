"""Example models and data for kfac_dist: MNIST loading, the autoencoder, a small convnet."""

from kfac_dist.examples.autoencoder import build_autoencoder
from kfac_dist.examples.convnet import build_convnet
from kfac_dist.examples.data import MnistData, load_mnist

__all__ = ["MnistData", "build_autoencoder", "build_convnet", "load_mnist"]
