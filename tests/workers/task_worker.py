"""Launcher test worker: reports its TF_CONFIG task and pid, then fails or sleeps.

Standard library only (and the pure-Python heartbeat), so that launcher tests
start workers in milliseconds.
With --spawn-child it starts a grandchild (`sleep`) to check that stopping a
worker also stops what it started. With --ready-dir every worker marks itself
ready there, and the failing worker waits for all marks before failing, so
the test knows every pid before the job is stopped. --freeze-task freezes
that worker with SIGSTOP once ready; --hang-task makes it wait silently
(--sleep seconds) while the others exit 0 at once.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kfac_dist.heartbeat import heartbeat


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spawn-child", action="store_true")
    parser.add_argument("--ready-dir", type=Path)
    parser.add_argument("--fail-task", type=int)
    parser.add_argument("--exit-code", type=int, default=1)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--freeze-task", type=int)
    parser.add_argument("--hang-task", type=int)
    args = parser.parse_args()

    config = json.loads(os.environ["TF_CONFIG"])
    index = config["task"]["index"]
    num_workers = len(config["cluster"]["worker"])
    print(f"task {index} of {num_workers} pid {os.getpid()}")
    if args.spawn_child:
        child = subprocess.Popen(["sleep", "300"])
        print(f"child {child.pid}")
    print("ready", flush=True)
    if args.ready_dir is not None:
        (args.ready_dir / f"ready-{index}").touch()

    if index == args.freeze_task:
        os.kill(os.getpid(), signal.SIGSTOP)
    if args.hang_task is not None:
        if index == args.hang_task:
            time.sleep(args.sleep)
        return 0
    if index == args.fail_task:
        if args.ready_dir is not None:
            deadline = time.monotonic() + 30
            while len(list(args.ready_dir.glob("ready-*"))) < num_workers:
                if time.monotonic() > deadline:
                    return 99
                time.sleep(0.01)
        print("failing", file=sys.stderr)
        return args.exit_code
    # A healthy worker beats while it waits: only the frozen or hanging one stalls,
    # whatever the load on the machine.
    deadline = time.monotonic() + args.sleep
    while time.monotonic() < deadline:
        heartbeat()
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
