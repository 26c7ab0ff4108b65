"""``--daemon``, life without systemd: the shell learns whether the daemon
started, pidfile and log never follow a symlink, one daemon per pidfile.

Real processes: each test starts ``myecho serve ... --daemon`` as a shell
would and stops what it started by the pid in its pidfile.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import command, refused, roundtrip, wait_until

from myecho.bench.harness import free_port


def daemon(*args: str) -> subprocess.CompletedProcess[str]:
    """``myecho serve ARGS --daemon`` as from a shell: its exit status and stderr."""
    return subprocess.run([command("myecho"), "serve", *args, "--daemon"], capture_output=True, timeout=30, text=True)


@pytest.fixture
def pidfiles() -> Iterator[list[Path]]:
    """Pidfiles of daemons a test started: each one is stopped afterwards."""
    started: list[Path] = []
    yield started
    for path in started:
        try:
            pid = int(path.read_text())
        except (OSError, ValueError):
            continue
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda p=path: not p.exists(), timeout=10, what="the daemon to exit")


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("myecho: "), result.stderr
    return lines[0]


def test_a_daemon_starts_serves_and_removes_its_pidfile(tmp_path: Path, pidfiles: list[Path]) -> None:
    pidfile, log, port = tmp_path / "pid", tmp_path / "log", free_port()
    pidfiles.append(pidfile)
    result = daemon("select", "--port", str(port), "--pidfile", str(pidfile), "--log-file", str(log))
    assert (result.returncode, result.stderr) == (0, "")
    # Exit 0 only once the model serves: connecting right away works.
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert roundtrip(sock, b"daemon") == b"daemon"
    pid = int(pidfile.read_text())
    assert f"select/{pid}]: select model serving" in log.read_text()
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pidfile.exists(), timeout=10, what="the pidfile to go")
    assert refused(port)


@pytest.mark.parametrize("which", ["--pidfile", "--log-file"])
def test_a_missing_folder_is_reported_to_the_shell(tmp_path: Path, which: str) -> None:
    port = free_port()
    line = one_line(daemon("fork", "--port", str(port), which, str(tmp_path / "missing" / "file")))
    assert "No such file or directory" in line
    assert refused(port)


@pytest.mark.parametrize("which", ["--pidfile", "--log-file"])
def test_a_symlink_is_refused_and_its_target_untouched(tmp_path: Path, which: str) -> None:
    target, link, port = tmp_path / "precious", tmp_path / "link", free_port()
    target.write_text("keep me\n")
    link.symlink_to(target)
    line = one_line(daemon("select", "--port", str(port), which, str(link)))
    assert "is a symbolic link: refused" in line
    assert target.read_text() == "keep me\n"
    assert refused(port)


def test_two_daemons_on_one_pidfile(tmp_path: Path, pidfiles: list[Path]) -> None:
    """The first runs; the second fails loudly and leaves the first alone."""
    pidfile = tmp_path / "pid"
    pidfiles.append(pidfile)
    first_port, second_port = free_port(), free_port()
    assert daemon("select", "--port", str(first_port), "--pidfile", str(pidfile)).returncode == 0
    pid = int(pidfile.read_text())
    line = one_line(daemon("select", "--port", str(second_port), "--pidfile", str(pidfile)))
    assert line == f"myecho: pidfile {pidfile} is locked by running process {pid}"
    assert refused(second_port)
    assert int(pidfile.read_text()) == pid
    os.kill(pid, 0)  # still there


def test_a_stale_pidfile_is_taken_over(tmp_path: Path, pidfiles: list[Path]) -> None:
    pidfile = tmp_path / "pid"
    pidfile.write_text("999999\n")  # no lock held: a daemon that was killed
    pidfiles.append(pidfile)
    assert daemon("select", "--port", str(free_port()), "--pidfile", str(pidfile)).returncode == 0
    assert int(pidfile.read_text()) != 999999


def test_a_failure_after_detaching_reaches_the_shell(tmp_path: Path) -> None:
    """The zmq model binds its --listen endpoint only once detached: the
    detached daemon's failure comes back through the pipe, exit 1."""
    pidfile = tmp_path / "pid"
    endpoint = f"ipc://{tmp_path}/missing/echo.sock"
    line = one_line(daemon("zmq", "--listen", endpoint, "--pidfile", str(pidfile)))
    assert "cannot start the zmq model: No such file or directory" in line and "echo.sock" in line
    wait_until(lambda: not pidfile.exists(), timeout=5, what="the pidfile to go")


def test_a_log_file_that_cannot_be_reopened_does_not_kill_the_daemon(tmp_path: Path, pidfiles: list[Path]) -> None:
    """SIGHUP reopens --log-file; with its folder gone the daemon serves on
    and logs on to the file it has open."""
    import shutil
    import socket

    logs, pidfile, port = tmp_path / "logs", tmp_path / "pid", free_port()
    logs.mkdir()
    pidfiles.append(pidfile)
    assert (
        daemon("select", "--port", str(port), "--pidfile", str(pidfile), "--log-file", str(logs / "log")).returncode
        == 0
    )
    pid = int(pidfile.read_text())
    shutil.rmtree(logs)
    os.kill(pid, signal.SIGHUP)
    time.sleep(0.5)  # the loop acts on the signal at once; before the fix it died here
    for _ in range(3):  # and every later log line (one per connection at debug) is written somewhere
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            assert roundtrip(sock, b"still here") == b"still here"
    os.kill(pid, signal.SIGHUP)
    time.sleep(0.5)
    os.kill(pid, 0)
