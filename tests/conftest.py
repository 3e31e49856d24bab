"""Test-session set-up: split the CPU into logical devices for multi-replica tests.

TensorFlow fixes its device list the first time it touches the devices, so the
split must happen here, before any test module builds a tensor.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from tests import multiworker  # noqa: E402

NUM_LOGICAL_CPUS = 4

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS
)


@pytest.fixture
def float64():
    """Keras in float64 (floatx and the dtype policy) for one test, then back."""
    previous = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(previous[0])
    keras.config.set_dtype_policy(previous[1])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Lets `tests.multiworker` check that a test starting workers carries its marker."""
    multiworker.current_test[:] = [item]
    try:
        return (yield)
    finally:
        multiworker.current_test.clear()
