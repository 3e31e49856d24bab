"""The TPU command (kfac_dist/jobs/tpu.py): flags, the Cloud TPU client, failing fast without a TPU.

No TPU is reachable here: these tests cover what happens before and instead
of training on one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types

import pytest

from kfac_dist.jobs import tpu, train
from tests.multiworker import ROOT, WORKER_ENV

# "Fails fast": well before any timeout given, with room for a loaded 2-core
# machine (no tight timing margins).
FAST_S = 60.0


def test_tpu_parser_defaults_to_the_tpu_strategy_and_takes_only_it(capsys):
    parser = train.build_parser(strategies=("tpu",))
    args = train.parse_args(["--tpu", "my-node", "--zone", "us-central1-b"], parser)
    assert (args.strategy, args.tpu, args.zone) == ("tpu", "my-node", "us-central1-b")
    with pytest.raises(SystemExit):
        train.parse_args(["--strategy", "default"], parser)
    assert "invalid choice: 'default'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, node", [("local", False), ("grpc://10.0.0.2:8470", False), ("my-node", True)]
)
def test_only_named_tpus_are_tpu_nodes(name, node):
    assert tpu.is_tpu_node(name) is node


def test_a_hanging_resolution_times_out_with_the_flags_to_check(monkeypatch):
    monkeypatch.setattr(tpu, "resolve", lambda *args: time.sleep(60))
    start = time.monotonic()
    with pytest.raises(tpu.TpuUnavailableError) as error:
        tpu.connect("my-node", zone="us-central1-a", project="p", timeout_s=0.5)
    assert time.monotonic() - start < FAST_S
    message = str(error.value)
    assert "no TPU found at --tpu my-node --zone us-central1-a --project p within 0.5 s" in message
    for flag in ("--tpu", "--zone", "--project", "--tpu-timeout"):
        assert flag in message


def test_call_with_timeout_hands_back_the_value_or_the_error():
    assert tpu.call_with_timeout(lambda: 3, 1.0) == 3
    with pytest.raises(ZeroDivisionError):
        tpu.call_with_timeout(lambda: 1 / 0, 1.0)


class FakeClient:
    """cloud_tpu_client.Client that records calls; its node cannot be looked up."""

    calls: list = []

    def __init__(self, **kwargs):
        self.calls.append(("Client", kwargs))

    def wait_for_healthy(self, **kwargs):
        self.calls.append(("wait_for_healthy", kwargs))

    def configure_tpu_version(self, version, restart_type):
        self.calls.append(("configure_tpu_version", version, restart_type))


def test_a_tpu_node_waits_for_health_and_matches_the_runtime_before_lookup(monkeypatch):
    FakeClient.calls = []
    fake = types.SimpleNamespace(Client=FakeClient)
    monkeypatch.setattr(tpu, "cloud_tpu_client", lambda: fake)
    lookup_error = RuntimeError("Could not lookup TPU metadata from name 'my-node'")

    def failing_resolver(**kwargs):
        raise lookup_error

    monkeypatch.setattr(tpu.tf.distribute.cluster_resolver, "TPUClusterResolver", failing_resolver)
    with pytest.raises(tpu.TpuUnavailableError) as error:
        tpu.connect("my-node", zone="z", project="p", timeout_s=20)
    assert error.value.__cause__ is lookup_error
    assert FakeClient.calls == [
        ("Client", {"tpu": "my-node", "zone": "z", "project": "p"}),
        ("wait_for_healthy", {"timeout_s": 20, "interval": tpu.HEALTH_POLL_INTERVAL_S}),
        ("configure_tpu_version", tpu.tf.__version__, "ifNeeded"),
    ]
    assert "RuntimeError: Could not lookup TPU metadata" in str(error.value)


def test_without_the_client_a_tpu_node_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cloud_tpu_client", None)  # import fails
    assert tpu.cloud_tpu_client() is None
    with pytest.raises(tpu.TpuUnavailableError):
        tpu.connect("nonexistent-tpu", zone="us-central1-a", project="p", timeout_s=5)
    assert "pip install 'kfac-dist[tpu]'" in capsys.readouterr().err


def test_local_fails_fast_on_a_machine_without_tpu():
    start = time.monotonic()
    with pytest.raises(tpu.TpuUnavailableError) as error:
        tpu.connect("local", timeout_s=10 * FAST_S)
    assert time.monotonic() - start < FAST_S
    message = str(error.value)
    assert message.startswith("could not initialize a TPU at --tpu local: NotFoundError")
    assert "install TensorFlow with TPU support" in message


def test_the_command_without_a_reachable_tpu_exits_1_with_one_clear_line():
    env = {**os.environ, **WORKER_ENV, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "scripts" / "train_tpu.py")]
    flags = ["--tpu", "nonexistent-tpu", "--zone", "us-central1-a", "--steps", "1"]
    start = time.monotonic()
    done = subprocess.run([*command, *flags], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert done.returncode == train.EXIT_FAILURE, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if "kfac_dist.jobs.train_tpu:" in line]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(
        "python -m kfac_dist.jobs.train_tpu: no TPU found at --tpu nonexistent-tpu "
        "--zone us-central1-a"
    )
    for flag in ("--tpu", "--zone", "--project", "--tpu-timeout"):
        assert flag in lines[0]
    # Importing TensorFlow takes most of it; resolving fails at once.
    assert elapsed < 60, elapsed
