"""A worker's heartbeat: the file the launcher watches to tell a slow worker from a stalled one.

The library beats it after every batch (`multi_worker.Heartbeat`); the
launcher (`kfac_dist.jobs.launch`) sets the variable and reads the file's age.
Here so that the library never imports the jobs.
"""

from __future__ import annotations

import os

HEARTBEAT_ENV = "KFAC_DIST_HEARTBEAT"


def heartbeat() -> None:
    """Tells the launcher this worker makes progress (a no-op outside a launched job)."""
    path = os.environ.get(HEARTBEAT_ENV)
    if path:
        with open(path, "a"):
            os.utime(path)
