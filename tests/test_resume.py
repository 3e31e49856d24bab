"""A 2-worker job killed mid-training resumes from its last checkpoint, exactly."""

from pathlib import Path

import numpy as np

from tests.multiworker import assert_all_succeeded, run_workers

WORKER = Path(__file__).parent / "workers" / "resume_worker.py"
STEPS, EVERY, KILL_AT = 12, 4, 6


def _weights(out: Path, index: int) -> list[np.ndarray]:
    data = np.load(out / f"worker-{index}.npz")
    return [data[f"arr_{i}"] for i in range(4)], int(data["start"])


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

    resumed = run_workers(
        WORKER,
        2,
        ["--out", str(resumed_out), "--checkpoint-dir", str(checkpoints), *common],
        timeout=240,
    )
    assert_all_succeeded(resumed)
    for index in range(2):
        want, _ = _weights(reference_out, index)
        got, start = _weights(resumed_out, index)
        assert start == EVERY  # resumed from the last checkpoint before the kill
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
