"""Adaptive K-FAC on 2 real worker processes equals one process on the global batch."""

import sys

import keras
import numpy as np
import pytest

from tests.multiworker import assert_all_succeeded, run_workers
from tests.paths import WORKERS

pytestmark = pytest.mark.multiprocess

WORKER = WORKERS / "adaptive_worker.py"
sys.path.insert(0, str(WORKER.parent))
import adaptive_worker as worker  # noqa: E402


def test_two_workers_give_the_rho_damping_coefficients_and_weights_of_one_process(tmp_path):
    results = run_workers(WORKER, 2, ["--out", str(tmp_path)], timeout=300)
    assert_all_succeeded(results)
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        reference = worker.train(worker.build())
    finally:
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy("float32")
    assert len(reference["rho"]) == worker.STEPS
    for index in range(2):
        arrays = dict(np.load(tmp_path / f"worker-{index}.npz"))
        for key, want in reference.items():
            np.testing.assert_allclose(arrays[key], want, rtol=1e-8, atol=1e-12, err_msg=key)
