"""A 2-worker job killed mid-training resumes from its last checkpoint, exactly."""

from pathlib import Path

import numpy as np
import pytest

from tests.multiworker import assert_all_succeeded, run_workers
from tests.paths import WORKERS

WORKER = WORKERS / "resume_worker.py"
STEPS, EVERY, KILL_AT = 12, 4, 6


def _weights(out: Path, index: int) -> list[np.ndarray]:
    data = np.load(out / f"worker-{index}.npz")
    return [data[f"arr_{i}"] for i in range(4)], int(data["start"])


@pytest.mark.multiprocess
def test_worker_killed_with_sigkill_resumes_on_the_uninterrupted_trajectory(tmp_path):
    reference_out, resumed_out = tmp_path / "reference", tmp_path / "resumed"
    reference_out.mkdir()
    resumed_out.mkdir()
    common = ["--steps", str(STEPS), "--every", str(EVERY)]
    reference = run_workers(
        WORKER,
        2,
        ["--out", str(reference_out), "--checkpoint-dir", str(tmp_path / "ckpt-ref"), *common],
        timeout=240,
    )
    assert_all_succeeded(reference)

    checkpoints = tmp_path / "ckpt"
    killed = run_workers(
        WORKER,
        2,
        [
            "--out",
            str(resumed_out),
            "--checkpoint-dir",
            str(checkpoints),
            *common,
            "--kill-at",
            str(KILL_AT),
        ],
        timeout=240,
    )
    assert killed[1].exit_code != 0  # worker 1 died by SIGKILL
    assert not (resumed_out / "worker-0.npz").exists()

    local = tmp_path / "local"  # each worker's own temporary storage
    local.mkdir()
    resumed = run_workers(
        WORKER,
        2,
        ["--out", str(resumed_out), "--checkpoint-dir", str(checkpoints), *common],
        timeout=240,
        env={"TMPDIR": str(local)},
    )
    assert_all_succeeded(resumed)
    # Only the chief writes to the shared directory; the other worker's
    # (required) write went to local temporary storage, removed since.
    chief_path = Path(str(np.load(resumed_out / "worker-0.npz")["write_path"]))
    other_path = Path(str(np.load(resumed_out / "worker-1.npz")["write_path"]))
    assert chief_path.parent == checkpoints
    assert local in other_path.parents and checkpoints not in other_path.parents
    assert list(local.iterdir()) == []
    assert all(p.name == "checkpoint" or p.name.startswith("ckpt-") for p in checkpoints.iterdir())
    for index in range(2):
        want, _ = _weights(reference_out, index)
        got, start = _weights(resumed_out, index)
        assert start == EVERY  # resumed from the last checkpoint before the kill
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _kfac_model(seed, steps_per_execution: int = 1, process_draw: int = 0):
    import keras

    import kfac_dist as kfac

    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6, activation="tanh"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    np.random.seed(process_draw)  # what Kfac(seed=None) draws from
    optimizer = kfac.Kfac(
        learning_rate=0.2,
        damping=0.05,
        model=model,
        loss="sparse_categorical_crossentropy",
        invert_every=3,
        seed=seed,
    )
    model.compile(
        optimizer=optimizer,
        loss="sparse_categorical_crossentropy",
        steps_per_execution=steps_per_execution,
    )
    return model


def _batches(skip: int = 0):
    import tensorflow as tf

    rng = np.random.default_rng(1)
    x = rng.normal(size=(8 * 16, 5)).astype("float32")
    y = rng.integers(0, 3, size=8 * 16)
    return tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(16).skip(skip)


def test_checkpoints_land_on_the_first_execution_boundary_after_each_multiple(tmp_path, capsys):
    from kfac_dist.checkpointing import StepCheckpoint

    model = _kfac_model(seed=3, steps_per_execution=3)
    checkpoint = StepCheckpoint(model, tmp_path, every_steps=4, max_to_keep=10)
    model.fit(_batches(), steps_per_epoch=12, epochs=1, callbacks=[checkpoint], verbose=0)
    import tensorflow as tf

    saved = tf.train.get_checkpoint_state(str(tmp_path)).all_model_checkpoint_paths
    assert [int(path.rsplit("-", 1)[1]) for path in saved] == [6, 9, 12]
    printed = capsys.readouterr().out
    assert "StepCheckpoint: saved step 6 (due at step 4" in printed
    assert "saved step 12 (due at step 12" in printed


def test_resume_with_seed_none_samples_the_same_fishers(tmp_path):
    from kfac_dist.checkpointing import StepCheckpoint

    uninterrupted = _kfac_model(seed=None)
    uninterrupted.fit(_batches(), steps_per_epoch=10, epochs=1, verbose=0)

    first = _kfac_model(seed=None)  # the same job, started again ...
    first.fit(
        _batches(),
        steps_per_epoch=5,
        epochs=1,
        callbacks=[StepCheckpoint(first, tmp_path, every_steps=5)],
        verbose=0,
    )
    # ... and resumed by a process that draws another seed.
    resumed = _kfac_model(seed=None, process_draw=1)
    assert int(resumed.optimizer.seed.numpy()) != int(first.optimizer.seed.numpy())
    start = StepCheckpoint(resumed, tmp_path, every_steps=5).restore()
    assert start == 5
    assert int(resumed.optimizer.seed.numpy()) == int(first.optimizer.seed.numpy())
    resumed.fit(_batches(start), steps_per_epoch=5, epochs=1, verbose=0)
    for got, want in zip(resumed.get_weights(), uninterrupted.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
