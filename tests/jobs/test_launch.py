"""Tests of the multi-worker launcher with real workers (no TensorFlow in them)."""

import io
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kfac_dist.jobs import launch
from tests.paths import ROOT as ROOT_PATH
from tests.paths import WORKERS

ROOT = ROOT_PATH
TASK_WORKER = WORKERS / "task_worker.py"


def _is_alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie nobody reaped (PID 1 in a container) counts
    as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _assert_all_gone(pids: list[int], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while any(_is_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if _is_alive(pid)]


def _pids(lines: list[str]) -> list[int]:
    """Worker and grandchild pids reported by task_worker.py."""
    return [int(pid) for pid in re.findall(r"(?:pid|child) (\d+)", "".join(lines))]


def _run(
    num_workers: int, *worker_args: str, stall_timeout: float | None = None
) -> tuple[int, list[str], float]:
    output = io.StringIO()
    start = time.monotonic()
    code = launch.run_local(
        [sys.executable, str(TASK_WORKER), *worker_args],
        num_workers,
        on_line=launch.prefixed_printer(output),
        grace_period=2.0,
        stall_timeout=stall_timeout,
    )
    return code, output.getvalue().splitlines(keepends=True), time.monotonic() - start


def test_free_ports_are_distinct():
    ports = launch.free_ports(8)
    assert len(set(ports)) == 8


def test_tf_config_names_cluster_and_task():
    config = json.loads(launch.tf_config(["a:1", "b:2"], 1))
    assert config == {
        "cluster": {"worker": ["a:1", "b:2"]},
        "task": {"type": "worker", "index": 1},
    }
    with pytest.raises(ValueError, match="index"):
        launch.tf_config(["a:1"], 1)


def test_exit_code_of_killed_process_is_128_plus_signal():
    assert launch.exit_code(-signal.SIGKILL) == 137
    assert launch.exit_code(3) == 3


@pytest.mark.multiprocess
def test_workers_get_their_task_index_and_prefixed_output():
    code, lines, _ = _run(2)
    assert code == 0
    for index in range(2):
        assert any(line.startswith(f"[worker {index}] task {index} of 2 pid ") for line in lines)
    assert all(re.match(r"\[worker [01]\] ", line) for line in lines)


@pytest.mark.multiprocess
def test_workers_share_one_cluster_of_free_local_ports():
    lines: list[str] = []
    code = launch.run_local(
        [sys.executable, "-c", "import os; print(os.environ['TF_CONFIG'])"],
        2,
        on_line=lambda index, line: lines.append(line),
    )
    assert code == 0
    configs = sorted((json.loads(line) for line in lines), key=str)
    assert [c["task"]["index"] for c in configs] == [0, 1]
    cluster = configs[0]["cluster"]["worker"]
    assert configs[1]["cluster"]["worker"] == cluster
    assert len(set(cluster)) == 2
    assert all(address.startswith("127.0.0.1:") for address in cluster)


@pytest.mark.multiprocess
def test_failing_worker_stops_the_job_with_its_exit_code(tmp_path):
    code, lines, elapsed = _run(
        2,
        "--fail-task=1",
        "--exit-code=3",
        "--sleep=60",
        "--spawn-child",
        f"--ready-dir={tmp_path}",
    )
    assert code == 3
    assert elapsed < 15
    assert any(line == "[worker 1] failing\n" for line in lines)
    pids = _pids(lines)
    assert len(pids) == 4  # two workers, one grandchild each
    _assert_all_gone(pids)


@pytest.mark.multiprocess
def test_interrupt_stops_every_worker_and_grandchild():
    launcher = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "launch_local.py")]
        + ["--num-workers=2", "--grace-period=2", "--"]
        + [sys.executable, str(TASK_WORKER), "--spawn-child", "--sleep=60"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    output: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [output.put(line) for line in launcher.stdout], daemon=True
    ).start()
    try:
        lines: list[str] = []
        # Bounds only for a broken launcher: nothing here races the clock.
        while sum(line.endswith("] ready\n") for line in lines) < 2:
            lines.append(output.get(timeout=300))
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=300) == launch.EXIT_INTERRUPTED
        pids = _pids(lines)
        assert len(pids) == 4
        _assert_all_gone(pids)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()


def test_missing_command_exits_127(capsys):
    assert launch.main(["--num-workers=2", "--", "no-such-command-kfac"]) == 127
    assert "no-such-command-kfac" in capsys.readouterr().err


def test_hosts_prints_each_host_command_with_its_tf_config(capsys):
    argv = ["--hosts=h1,h2:2300", "--port=2222", "--workdir=/srv/job"]
    assert launch.main([*argv, "--", "python", "train.py", "--flag", "a b"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "# h1" and printed[2] == "# h2:2300"
    for index, line in enumerate(printed[1::2]):
        words = shlex.split(line)
        assert words[:3] == ["cd", "/srv/job", "&&"]
        name, value = words[3].split("=", 1)
        assert name == "TF_CONFIG"
        assert json.loads(value) == {
            "cluster": {"worker": ["h1:2222", "h2:2300"]},
            "task": {"type": "worker", "index": index},
        }
        assert words[4:] == ["python", "train.py", "--flag", "a b"]


def test_ssh_runs_each_host_command_on_its_host():
    remote = launch.host_commands(["h1", "h2:2300"], ["python", "t.py"])
    commands = launch.ssh_commands(["h1", "h2:2300"], remote)
    assert [command[-2:] for command in commands] == [
        ["h1", remote[0]],
        ["h2", remote[1]],
    ]
    assert all(command[0] == "ssh" for command in commands)


@pytest.mark.multiprocess
def test_progress_bar_redraws_are_forwarded_as_they_come():
    # Keras redraws its bar with "\r": each redraw is its own segment, so the
    # launcher shows it live instead of when the line (or the run) ends.
    script = (
        "import sys, time\n"
        "for i in range(3):\n"
        "    sys.stdout.write(f'{i}/3\\r'); sys.stdout.flush(); time.sleep(0.2)\n"
        "print('done')\n"
    )
    seen: list[tuple[float, str]] = []
    start = time.monotonic()
    code = launch.run_local(
        [sys.executable, "-c", script],
        1,
        on_line=lambda index, line: seen.append((time.monotonic() - start, line)),
    )
    assert code == 0
    assert [line for _, line in seen] == ["0/3\r", "1/3\r", "2/3\r", "done\n"]
    assert seen[0][0] < seen[-1][0] - 0.3  # the first redraw arrived before the end


STALL_S = 3.0


@pytest.mark.multiprocess
def test_frozen_worker_stops_the_job_naming_it(tmp_path, capsys):
    code, lines, elapsed = _run(
        2, "--freeze-task=1", "--sleep=600", "--spawn-child", stall_timeout=STALL_S
    )
    assert code == launch.EXIT_STALLED
    error = capsys.readouterr().err
    assert "worker 1 made no progress (no output, no heartbeat) for" in error
    assert "its process is stopped" in error
    assert "--stall-timeout" in error
    assert STALL_S <= elapsed < 300  # not a timing margin: a bound for a broken launcher
    pids = _pids(lines)
    assert len(pids) == 4  # the frozen worker is killed too, with its grandchild
    _assert_all_gone(pids)


@pytest.mark.multiprocess
def test_worker_stuck_after_its_peer_exited_0_stops_the_job(capsys):
    code, lines, elapsed = _run(2, "--hang-task=0", "--sleep=600", stall_timeout=STALL_S)
    assert code == launch.EXIT_STALLED
    error = capsys.readouterr().err
    assert "worker 0 made no progress" in error
    assert "worker(s) 1 had already finished (exit 0)" in error
    assert STALL_S <= elapsed < 300
    _assert_all_gone(_pids(lines))


@pytest.mark.multiprocess
def test_heartbeat_counts_as_progress_for_a_silent_worker():
    # Silent for 3 stall timeouts, but beating: the job is not stopped.
    # The heartbeat is light: importing it loads neither TensorFlow nor Keras.
    script = (
        "import time\n"
        "from kfac_dist.heartbeat import heartbeat\n"
        "for _ in range(30):\n"
        "    heartbeat(); time.sleep(0.2)\n"
    )
    code = launch.run_local(
        [sys.executable, "-c", script],
        1,
        on_line=lambda index, line: None,
        stall_timeout=2.0,
    )
    assert code == 0


def test_stall_timeout_flag_must_not_be_negative():
    with pytest.raises(SystemExit):
        launch.main(["--num-workers=1", "--stall-timeout=-1", "--", "true"])


def test_progress_bar_lines_carry_one_prefix_each_in_a_log():
    # Keras' bar: backspaces over the last draw, "\r", the new draw; the
    # first draw starts with a bare "\r".
    output = io.StringIO()
    print_line = launch.prefixed_printer(output)
    for segment in ["\r", "1/3 ━\b\b\b\b\b\r", "2/3 ━━\b\b\b\b\b\b\r", "3/3 ━━━\n", "\n"]:
        print_line(0, segment)
    assert output.getvalue() == (
        "[worker 0] 1/3 ━\n[worker 0] 2/3 ━━\n[worker 0] 3/3 ━━━\n[worker 0] \n"
    )
