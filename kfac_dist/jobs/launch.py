"""Start a multi-worker TensorFlow job: one process per worker, each with its TF_CONFIG.

`MultiWorkerMirroredStrategy` finds its peers through the `TF_CONFIG`
environment variable. Locally (`--num-workers N`) this module picks free ports,
starts N copies of a command, prefixes every output line with its worker index,
and stops the whole job when one worker fails, when one makes no progress for
`--stall-timeout` seconds (no output and no heartbeat; a frozen worker, or one
left waiting in a collective for a peer that is gone), or on Ctrl-C. For a list
of hosts it prints (or, with `--ssh`, runs) each host's command.

Progress is any output line, or a touch of the file named by the worker's
`KFAC_DIST_HEARTBEAT` environment variable (`kfac_dist.heartbeat.heartbeat()` does it; Keras
training can call it once per batch with `kfac_dist.multi_worker.Heartbeat`).

    python -m kfac_dist.jobs.launch --num-workers 2 -- python train.py --epochs 3
    python -m kfac_dist.jobs.launch --hosts h1,h2 --port 2222 -- python train.py

This module uses the standard library only: it never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import TextIO

from kfac_dist.heartbeat import HEARTBEAT_ENV

DEFAULT_PORT = 2222
GRACE_PERIOD_S = 5.0
STALL_TIMEOUT_S = 900.0
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_COMMAND_NOT_FOUND = 127
EXIT_STALLED = 124  # as timeout(1) exits
_POLL_INTERVAL_S = 0.05
_READER_JOIN_TIMEOUT_S = 5.0


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports free on `host` now; all sockets stay open until the last is picked,
    so the ports are distinct."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tf_config(cluster: Sequence[str], index: int) -> str:
    """The TF_CONFIG of worker `index` in a cluster of `host:port` workers."""
    if not 0 <= index < len(cluster):
        raise ValueError(f"index must be in [0, {len(cluster)}), got {index}")
    config = {
        "cluster": {"worker": list(cluster)},
        "task": {"type": "worker", "index": index},
    }
    return json.dumps(config, separators=(",", ":"))


def worker_env(
    cluster: Sequence[str], index: int, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """`base` (default: this process' environment) plus the worker's TF_CONFIG.

    Python workers are made unbuffered so that their output streams live
    through the launcher's pipe instead of arriving in blocks.
    """
    env = dict(os.environ if base is None else base)
    env["TF_CONFIG"] = tf_config(cluster, index)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class StalledError(RuntimeError):
    """A worker made no progress (no output, no heartbeat) for too long."""

    def __init__(
        self,
        index: int,
        seconds: float,
        *,
        stopped: bool = False,
        silent: Sequence[int] = (),
        finished: Sequence[int] = (),
    ) -> None:
        self.index = index
        why = (
            "its process is stopped (SIGSTOP, a debugger)"
            if stopped
            else "it is frozen, or waiting for a peer that will never come"
        )
        notes = "".join(
            f"; worker(s) {', '.join(map(str, workers))} {what}"
            for workers, what in (
                (silent, "silent as long (waiting for it?)"),
                (finished, "had already finished (exit 0)"),
            )
            if workers
        )
        super().__init__(
            f"worker {index} made no progress (no output, no heartbeat) for "
            f"{seconds:.0f} s: {why}{notes}. Stopping every worker (raise "
            "--stall-timeout if it was only slow)."
        )


def _is_stopped(pid: int) -> bool:
    """Whether `pid` is stopped by a signal (Linux /proc; False where unknown)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def exit_code(returncode: int) -> int:
    """A Popen return code as a shell exit status (killed by signal s: 128 + s)."""
    return 128 - returncode if returncode < 0 else returncode


class WorkerGroup:
    """Worker processes started together and stopped together.

    Each worker leads its own process group, so stopping a worker also stops
    whatever it started. Leaving the `with` block stops every worker still
    running (SIGTERM, then SIGKILL after `grace_period`), whatever the reason
    for leaving: a failure, a stall, a timeout, Ctrl-C.

    With `stall_timeout`, a running worker that neither prints a line nor
    touches its heartbeat file (`$KFAC_DIST_HEARTBEAT`, set here) for that
    many seconds makes `wait` raise `StalledError` naming it.
    """

    def __init__(
        self,
        commands: Sequence[Sequence[str]],
        envs: Sequence[Mapping[str, str]],
        on_line: Callable[[int, str], None],
        grace_period: float = GRACE_PERIOD_S,
        stall_timeout: float | None = None,
    ) -> None:
        if len(commands) != len(envs):
            raise ValueError("need one environment per command")
        if stall_timeout is not None and stall_timeout <= 0:
            raise ValueError(f"stall_timeout must be > 0 seconds or None, got {stall_timeout}")
        self.grace_period = grace_period
        self.stall_timeout = stall_timeout
        self.processes: list[subprocess.Popen[bytes]] = []
        self._readers: list[threading.Thread] = []
        self._heartbeat_dir = tempfile.mkdtemp(prefix="kfac-launch-")
        self._heartbeats = [
            os.path.join(self._heartbeat_dir, f"worker-{i}") for i in range(len(commands))
        ]
        self._last_output = [time.monotonic()] * len(commands)

        def record(index: int, line: str) -> None:
            self._last_output[index] = time.monotonic()
            on_line(index, line)

        try:
            for index, (command, env) in enumerate(zip(commands, envs, strict=True)):
                process = subprocess.Popen(
                    list(command),
                    env={**env, HEARTBEAT_ENV: self._heartbeats[index]},
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                self.processes.append(process)
                reader = threading.Thread(
                    target=_forward_lines,
                    args=(process, index, record),
                    daemon=True,
                )
                reader.start()
                self._readers.append(reader)
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def returncodes(self) -> list[int | None]:
        return [process.poll() for process in self.processes]

    def wait(self, timeout: float | None = None) -> int:
        """Waits until every worker succeeded (returns 0) or one failed (returns
        its exit code at once); raises `TimeoutError` after `timeout` seconds,
        `StalledError` when a worker stalls (see the class)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            codes = self.returncodes
            failed = [code for code in codes if code not in (None, 0)]
            if failed:
                return exit_code(failed[0])
            if all(code == 0 for code in codes):
                return 0
            self._check_progress(codes)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"workers still running after {timeout} s")
            time.sleep(_POLL_INTERVAL_S)

    def last_progress(self, index: int) -> float:
        """When worker `index` last printed or beat (time.monotonic() clock)."""
        try:
            # The heartbeat file's age, moved onto the monotonic clock.
            beat = time.monotonic() - (time.time() - os.stat(self._heartbeats[index]).st_mtime)
        except FileNotFoundError:
            beat = float("-inf")
        return max(self._last_output[index], beat)

    def _check_progress(self, codes: Sequence[int | None]) -> None:
        if self.stall_timeout is None:
            return
        now = time.monotonic()
        idle = {
            index: now - self.last_progress(index)
            for index, code in enumerate(codes)
            if code is None
        }
        stalled = [index for index, seconds in idle.items() if seconds > self.stall_timeout]
        if not stalled:
            return
        # Every peer of a frozen worker goes silent too: name the frozen one.
        stopped = [index for index in stalled if _is_stopped(self.processes[index].pid)]
        culprit = stopped[0] if stopped else max(stalled, key=idle.__getitem__)
        raise StalledError(
            culprit,
            idle[culprit],
            stopped=bool(stopped),
            silent=[index for index in stalled if index != culprit],
            finished=[index for index, code in enumerate(codes) if code == 0],
        )

    def stop(self) -> None:
        """Stops every worker and its descendants; Ctrl-C cannot cut this short."""
        blocked = {signal.SIGINT, signal.SIGTERM}
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            self._signal_groups(signal.SIGTERM)
            # A frozen (SIGSTOPped) worker acts on SIGTERM only once continued.
            self._signal_groups(signal.SIGCONT)
            deadline = time.monotonic() + self.grace_period
            while any(code is None for code in self.returncodes) and time.monotonic() < deadline:
                time.sleep(_POLL_INTERVAL_S)
            # Also reaches descendants of workers that exited on their own.
            self._signal_groups(signal.SIGKILL)
            for process in self.processes:
                process.wait()
            for reader in self._readers:
                reader.join(_READER_JOIN_TIMEOUT_S)
            shutil.rmtree(self._heartbeat_dir, ignore_errors=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)

    def _signal_groups(self, signum: int) -> None:
        for process in self.processes:
            try:
                os.killpg(process.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass  # The group is gone already.


def _forward_lines(
    process: subprocess.Popen[bytes], index: int, on_line: Callable[[int, str], None]
) -> None:
    # A buffered pipe (Popen's default bufsize): read1 returns what is there, at once.
    stream = process.stdout
    assert isinstance(stream, io.BufferedReader)
    pending = b""
    with stream:
        # Segments end at "\n" or at "\r": Keras redraws its progress bar with
        # "\r", and forwarding each redraw at once keeps the bars live.
        while chunk := stream.read1(4096):
            pending += chunk
            while (cut := _segment_end(pending)) >= 0:
                segment, end, pending = pending[:cut], pending[cut : cut + 1], pending[cut + 1 :]
                if end == b"\r" and pending.startswith(b"\n"):  # "\r\n" of a remote tty
                    end, pending = b"\n", pending[1:]
                on_line(index, (segment + end).decode(errors="replace"))
    if pending:
        on_line(index, pending.decode(errors="replace") + "\n")


def _segment_end(data: bytes) -> int:
    ends = [i for i in (data.find(b"\n"), data.find(b"\r")) if i >= 0]
    return min(ends) if ends else -1


def prefixed_printer(stream: TextIO | None = None) -> Callable[[int, str], None]:
    """An `on_line` that writes `[worker i] line` to `stream`, one segment at a time.

    Keras draws its progress bar as backspaces, "\r", then the bar: a bare
    "\r" or backspaces would get a prefix of their own, and a log would read
    "[worker 0] [worker 0] 1/100". So the backspaces are dropped (the "\r"
    returns to the line's start anyway) and a segment with nothing to show is
    skipped. On a terminal a redraw keeps its "\r", so the next one overwrites
    it; elsewhere (a file, a pipe) it ends its line, one line per redraw.
    """
    lock = threading.Lock()

    def print_line(index: int, line: str) -> None:
        text = line.replace("\b", "")
        redraw = text.endswith("\r")
        body = text.rstrip("\r\n")
        if redraw and not body.strip():
            return  # a bare "\r": nothing to show
        with lock:
            out = sys.stdout if stream is None else stream
            end = "\r" if redraw and _is_terminal(out) else "\n"
            out.write(f"[worker {index}] {body}{end}")
            out.flush()

    return print_line


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _supervise(group: WorkerGroup) -> int:
    """The group's exit code; a stall is reported on stderr and ends as 124."""
    try:
        return group.wait()
    except StalledError as error:
        print(f"launch: {error}", file=sys.stderr, flush=True)
        return EXIT_STALLED


def run_local(
    command: Sequence[str],
    num_workers: int,
    on_line: Callable[[int, str], None] | None = None,
    grace_period: float = GRACE_PERIOD_S,
    host: str = "127.0.0.1",
    stall_timeout: float | None = STALL_TIMEOUT_S,
) -> int:
    """Runs `num_workers` copies of `command` on this machine as one cluster.

    Returns 0 when every worker succeeded, else the first failure's exit code
    (130 on Ctrl-C, 124 when a worker made no progress for `stall_timeout`
    seconds, None: never); the other workers are stopped before returning.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    cluster = [f"{host}:{port}" for port in free_ports(num_workers, host)]
    envs = [worker_env(cluster, index) for index in range(num_workers)]
    try:
        with WorkerGroup(
            [command] * num_workers,
            envs,
            on_line or prefixed_printer(),
            grace_period,
            stall_timeout,
        ) as group:
            return _supervise(group)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def host_commands(
    hosts: Sequence[str],
    command: Sequence[str],
    port: int = DEFAULT_PORT,
    workdir: str | None = None,
) -> list[str]:
    """The shell command to run on each host (`host` or `host:port`), TF_CONFIG
    included; with `workdir`, it first changes to that directory."""
    cluster = [host if ":" in host else f"{host}:{port}" for host in hosts]
    prefix = f"cd {shlex.quote(workdir)} && " if workdir else ""
    return [
        f"{prefix}TF_CONFIG={shlex.quote(tf_config(cluster, index))} " + shlex.join(command)
        for index in range(len(hosts))
    ]


def ssh_commands(hosts: Sequence[str], remote_commands: Sequence[str]) -> list[list[str]]:
    """`ssh` invocations that run each remote command on its host.

    `-tt` gives the remote command a terminal, so that it gets SIGHUP and ends
    when the launcher stops its ssh client.
    """
    return [
        ["ssh", "-tt", "-o", "BatchMode=yes", host.split(":")[0], remote]
        for host, remote in zip(hosts, remote_commands, strict=True)
    ]


def run_ssh(
    hosts: Sequence[str],
    command: Sequence[str],
    port: int = DEFAULT_PORT,
    workdir: str | None = None,
    on_line: Callable[[int, str], None] | None = None,
    grace_period: float = GRACE_PERIOD_S,
    stall_timeout: float | None = STALL_TIMEOUT_S,
) -> int:
    """Runs `command` on every host over ssh, supervised like `run_local`.

    Remote workers' heartbeat files are not seen here: only their output
    counts as progress.
    """
    remote = host_commands(hosts, command, port, workdir)
    try:
        with WorkerGroup(
            ssh_commands(hosts, remote),
            [dict(os.environ)] * len(hosts),
            on_line or prefixed_printer(),
            grace_period,
            stall_timeout,
        ) as group:
            return _supervise(group)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kfac_dist.jobs.launch",
        description="Run a command as a multi-worker TensorFlow job.",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--num-workers", type=int, help="start this many workers on this machine")
    where.add_argument(
        "--hosts",
        help="comma-separated worker hosts (host or host:port), one worker each; "
        "prints each host's command unless --ssh is given",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port for hosts without one")
    parser.add_argument("--ssh", action="store_true", help="run the hosts' commands over ssh")
    parser.add_argument(
        "--workdir",
        default=os.getcwd(),
        help="directory on the hosts to run in (default: this one)",
    )
    parser.add_argument(
        "--grace-period",
        type=float,
        default=GRACE_PERIOD_S,
        help="seconds between SIGTERM and SIGKILL when stopping workers",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=STALL_TIMEOUT_S,
        help="stop the job when a worker prints nothing and beats no heartbeat for "
        "this many seconds (default: %(default)s; 0: never)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- command ...")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    if args.ssh and not args.hosts:
        parser.error("--ssh needs --hosts")
    if args.num_workers is not None and args.num_workers < 1:
        parser.error("--num-workers must be >= 1")
    if args.stall_timeout < 0:
        parser.error("--stall-timeout must be >= 0 seconds (0: never)")
    stall_timeout = args.stall_timeout or None
    # A scheduler's SIGTERM stops the job like Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if args.num_workers is not None:
            return run_local(
                command,
                args.num_workers,
                grace_period=args.grace_period,
                stall_timeout=stall_timeout,
            )
        hosts = [host for host in args.hosts.split(",") if host]
        if args.ssh:
            return run_ssh(
                hosts,
                command,
                args.port,
                args.workdir,
                grace_period=args.grace_period,
                stall_timeout=stall_timeout,
            )
        for host, line in zip(
            hosts, host_commands(hosts, command, args.port, args.workdir), strict=True
        ):
            print(f"# {host}\n{line}")
        return 0
    except FileNotFoundError as error:
        print(f"launch: {error}", file=sys.stderr)
        return EXIT_COMMAND_NOT_FOUND
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
