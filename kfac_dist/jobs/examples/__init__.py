"""Example models and data: MNIST (with an offline fallback), autoencoder, convnet, CIFAR-10."""

from kfac_dist.jobs.examples.autoencoder import build_autoencoder
from kfac_dist.jobs.examples.cifar import build_small_resnet, load_cifar10
from kfac_dist.jobs.examples.convnet import build_convnet
from kfac_dist.jobs.examples.data import MnistData, load_mnist

__all__ = [
    "MnistData",
    "build_autoencoder",
    "build_convnet",
    "build_small_resnet",
    "load_cifar10",
    "load_mnist",
]
