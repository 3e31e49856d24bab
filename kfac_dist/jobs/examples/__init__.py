"""Example models and data: MNIST (with an offline fallback), autoencoder, convnet, CIFAR-10.

One module per example (`autoencoder`, `convnet`, `cifar`, `data`): import
the one you need; the data loaders import without Keras.
"""
