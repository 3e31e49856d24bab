"""Leaving a multi-worker cluster together, so that a job that succeeded ends without errors.

MultiWorkerMirroredStrategy's coordination service lives in the leader
(worker 0), and every worker's agent sends it heartbeats. Python's exit never
shuts an agent down, so a worker still running when the leader has exited
(tearing its interpreter down, writing its results) logs
"BaseCollectiveExecutor::StartAbort UNAVAILABLE: Failed to send RPC to
coordination service", and a leader left behind by a worker logs that the
tasks have crashed. Here each worker configures the service before its
strategy exists, as the strategy would, plus a shutdown barrier; at the end it
shuts its agent down, which waits at that barrier for every other worker, so
the leader disconnects last, and ends the process. TensorFlow 2.21 has no
public call for either.
"""

from __future__ import annotations

import logging
import os
import sys

from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
from tensorflow.python import pywrap_tfe
from tensorflow.python.distribute import multi_worker_util
from tensorflow.python.distribute.cluster_resolver import ClusterResolver
from tensorflow.python.eager import context

# Long enough for the slowest worker to finish its last writes (the chief saves
# the model); only reached by a job whose workers all succeeded.
SHUTDOWN_BARRIER_TIMEOUT_S = 300
_COORDINATED_JOBS = ("chief", "worker")  # those MultiWorkerMirroredStrategy coordinates


def configure_shutdown_barrier(
    resolver: ClusterResolver, timeout_s: float = SHUTDOWN_BARRIER_TIMEOUT_S
) -> bool:
    """Configures the coordination service with a shutdown barrier; call it before
    `MultiWorkerMirroredStrategy(cluster_resolver=resolver)`, which then keeps it.

    Returns False (and changes nothing) for a single process, a task that is
    not coordinated, or a service configured already.
    """
    cluster_spec = multi_worker_util.normalize_cluster_spec(resolver.cluster_spec())
    jobs = [job for job in _COORDINATED_JOBS if job in cluster_spec.jobs]
    ctx = context.context()
    if not jobs or resolver.task_type not in jobs or ctx.coordination_service is not None:
        return False
    ctx.configure_coordination_service(
        service_type="standalone",
        service_leader=multi_worker_util.coordination_leader(cluster_spec),
        coordinated_jobs=[
            coordination_config_pb2.CoordinatedJob(name=job, num_tasks=cluster_spec.num_tasks(job))
            for job in jobs
        ],
        shutdown_barrier_timeout_in_ms=int(timeout_s * 1000),
    )
    return True


def leave_cluster(exit_code: int) -> None:
    """Ends this worker's process with `exit_code` once every worker has come here.

    The coordination agent shuts down through the barrier; the interpreter is
    then left at once (after flushing), since tearing down Python objects that
    still hold the deleted eager context crashes. Returns (doing nothing) only
    where no coordination service runs.
    """
    ctx = context.context()
    if ctx.coordination_service is None or ctx._context_handle is None:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Deleting the eager context shuts its agent down (through the barrier).
    pywrap_tfe.TFE_DeleteContext(ctx._context_handle)
    os._exit(exit_code)
