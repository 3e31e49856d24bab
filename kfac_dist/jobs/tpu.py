"""Connect to a Cloud TPU, for the TPU command (`python -m kfac_dist.jobs.train_tpu`).

    python -m kfac_dist.jobs.train_tpu --tpu local --example autoencoder --steps 500  # TPU VM
    python -m kfac_dist.jobs.train_tpu --tpu my-node --zone us-central1-b --project my-project ...

The command is kfac_dist/jobs/train.py's with `--strategy tpu`: `connect` finds
the TPU, and train_run.py builds and compiles the model inside
`TPUStrategy.scope()` (with `steps_per_execution`, default
`train_flags.TPU_STEPS_PER_EXECUTION`) and trains it. Where no TPU can be reached, `connect`
raises `TpuUnavailableError` within `timeout_s` with one line naming the flags
to check, and the command exits with status 1 instead of hanging.

A TPU VM (`--tpu local`, the default) needs nothing besides TensorFlow with
TPU support. A TPU node (a named TPU, reached over the network) is looked up
through the Cloud TPU API: that needs `cloud-tpu-client` (`pip install
'kfac-dist[tpu]'`), which also waits for the node to be healthy and matches
its runtime to this TensorFlow. Not run on TPU hardware: only the failure
paths are tested here.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

import tensorflow as tf

from kfac_dist.jobs.train_flags import TPU_LOCAL, TPU_TIMEOUT_S

HEALTH_POLL_INTERVAL_S = 10.0
_T = TypeVar("_T")
_FLAGS_TO_CHECK = (
    "Check --tpu ('local' on a TPU VM, a TPU node's name, or grpc://host:port), "
    "--zone and --project, that this machine can reach the TPU, and --tpu-timeout."
)


class TpuUnavailableError(RuntimeError):
    """No TPU could be reached; the message says why and which flags to check."""


def connect(
    tpu: str = TPU_LOCAL,
    *,
    zone: str | None = None,
    project: str | None = None,
    timeout_s: float = TPU_TIMEOUT_S,
) -> tf.distribute.TPUStrategy:
    """Resolves the TPU, connects to it, initializes it and returns its strategy.

    Finding the TPU (Cloud TPU API, GCE metadata, the node's workers) runs
    under `timeout_s`; connecting and initializing follow only once the TPU
    was found (on a TPU VM they fail at once when there is no TPU).

    Raises:
        TpuUnavailableError: no TPU found or reached.
    """
    where = describe(tpu, zone, project)
    try:
        resolver = call_with_timeout(lambda: resolve(tpu, zone, project, timeout_s), timeout_s)
    except TimeoutError:
        raise TpuUnavailableError(
            f"no TPU found at {where} within {timeout_s:g} s. {_FLAGS_TO_CHECK}"
        ) from None
    # Resolution goes through TensorFlow, cloud-tpu-client, the Google API client
    # and oauth2client, each with errors of its own: any of them means no TPU.
    except Exception as error:  # noqa: BLE001
        raise TpuUnavailableError(
            f"no TPU found at {where}: {_reason(error)}. {_FLAGS_TO_CHECK}"
        ) from error
    try:
        # On the main thread: connecting may enter the TPU host's device scope.
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    except (tf.errors.OpError, RuntimeError, ValueError) as error:
        # On a machine without TPU, initializing `local` raises NotFoundError
        # with no message.
        raise TpuUnavailableError(
            f"could not initialize a TPU at {where}: {_reason(error, 'no TPU devices')}. "
            f"On a TPU VM, install TensorFlow with TPU support. {_FLAGS_TO_CHECK}"
        ) from error


def resolve(
    tpu: str, zone: str | None, project: str | None, timeout_s: float
) -> tf.distribute.cluster_resolver.TPUClusterResolver:
    """The TPU's resolver, once the TPU is known to answer.

    For a TPU node, cloud-tpu-client (when installed) first waits for the node
    to be healthy and matches its runtime to this TensorFlow; then the
    resolver looks the node up and its workers must accept a connection.
    """
    if is_tpu_node(tpu):
        client_module = cloud_tpu_client()
        if client_module is None:
            print(
                "cloud-tpu-client is not installed: not waiting for the TPU node to be "
                "healthy nor matching its runtime version; looking a node up by name "
                "needs it (pip install 'kfac-dist[tpu]').",
                file=sys.stderr,
                flush=True,
            )
        else:
            client = client_module.Client(tpu=tpu, zone=zone, project=project)
            client.wait_for_healthy(
                timeout_s=timeout_s, interval=min(HEALTH_POLL_INTERVAL_S, timeout_s)
            )
            client.configure_tpu_version(tf.__version__, restart_type="ifNeeded")
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu=tpu, zone=zone, project=project
    )
    if tpu != TPU_LOCAL:
        cluster_spec = resolver.cluster_spec()
        for address in cluster_spec.job_tasks(resolver.get_job_name()):
            check_reachable(address, timeout_s)
    return resolver


def is_tpu_node(tpu: str) -> bool:
    """Whether `tpu` names a TPU node (looked up through the Cloud TPU API)."""
    return tpu != TPU_LOCAL and not tpu.startswith("grpc://")


def cloud_tpu_client() -> ModuleType | None:
    """`cloud_tpu_client`, or None if it is not installed (it is optional: a TPU VM
    does not need it)."""
    try:
        import cloud_tpu_client
    except ImportError:
        return None
    return cloud_tpu_client


def check_reachable(address: str, timeout_s: float) -> None:
    """Raises `OSError` unless `host:port` accepts a TCP connection within `timeout_s`."""
    host, _, port = address.removeprefix("grpc://").rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s):
        pass


def call_with_timeout(function: Callable[[], _T], timeout_s: float) -> _T:
    """`function()`, or `TimeoutError` after `timeout_s` seconds.

    The call runs in a daemon thread: the network calls of resolution cannot
    be cancelled, so one that hangs is left behind, and the process does not
    wait for it at exit (a ThreadPoolExecutor would).
    """
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = function()
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            outcome["error"] = error

    thread = threading.Thread(target=run, name="tpu-resolve", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def describe(tpu: str, zone: str | None, project: str | None) -> str:
    """The TPU as the flags name it, for messages."""
    parts = [f"--tpu {tpu}"]
    if is_tpu_node(tpu):
        parts.append(f"--zone {zone}" if zone else "--zone (this VM's)")
        parts.append(f"--project {project}" if project else "--project (this VM's)")
    return " ".join(parts)


def _reason(error: BaseException, silent: str = "no detail given") -> str:
    """The error's type and first sentence (`silent` if it has none), for one-line messages."""
    text = str(error).strip()
    sentence = text.splitlines()[0].split(". ")[0] if text else silent
    return f"{type(error).__name__}: {sentence}"[:200]
