"""The shared layer's error paths, in process: what a live server rarely shows."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import ServeFactory, command

from myecho import reference
from myecho.core import sockets
from myecho.core.systemd import Notifier


def test_describe_a_closed_socket() -> None:
    sock = socket.socket()
    sock.close()
    assert sockets.describe(sock) == "fd -1"
    with socket.socket(socket.AF_UNIX) as unix:
        unix.bind(b"\0myecho-test-describe")
        assert "myecho-test-describe" in sockets.describe(unix)


def test_each_model_gets_the_listeners_it_declares(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without systemd: a TCP model binds HOST:PORT; zmq with --listen, the broker and the worker bind nothing."""
    from myecho.core.settings import Settings
    from myecho.models import broker, select, worker, zmq

    monkeypatch.delenv("LISTEN_FDS", raising=False)
    settings = Settings(model="select", host="127.0.0.1", port=0)
    bound, roles = select.LISTENERS.acquire(settings)
    try:
        assert len(bound) == 1 and roles == []
        assert bound[0].getsockname()[0] == "127.0.0.1"
        assert bound[0].getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    finally:
        bound[0].close()
    bound, _ = zmq.LISTENERS.acquire(Settings(model="zmq", host="127.0.0.1", port=0))
    assert len(bound) == 1
    bound[0].close()
    assert zmq.LISTENERS.acquire(Settings(model="zmq", listen=["tcp://127.0.0.1:0"])) == ([], [])
    assert broker.LISTENERS.acquire(Settings(model="broker")) == ([], [])
    assert worker.LISTENERS.acquire(Settings(model="worker")) == ([], [])


def test_fd_limit_is_raised_to_the_hard_limit() -> None:
    code = (
        "import resource; from myecho.core.sockets import raise_fd_limit;"
        "s, h = resource.getrlimit(resource.RLIMIT_NOFILE);"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, h)); print(raise_fd_limit() == h)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=10)
    assert result.stdout.strip() == "True", result.stderr


def test_listen_fds_meant_for_another_process_are_not_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stdlib sd_listen_fds: fds only when LISTEN_PID is us; the variables are gone either way."""
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_PID", "1")
    assert sockets._listen_fds() == []
    assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    assert sockets._listen_fds() == [3, 4]
    monkeypatch.setenv("LISTEN_FDS", "two")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    assert sockets._listen_fds() == []


def test_a_notify_socket_that_is_not_a_unix_socket_only_warns(tmp_path: Path) -> None:
    for name in ("systemd", "sdnotify"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    code = "from myecho.core.systemd import Notifier; n = Notifier(); n.ready('x'); print(n.enabled)"
    env = dict(os.environ, PYTHONPATH=str(tmp_path), NOTIFY_SOCKET="vsock:2:9")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=10)
    assert result.stdout.strip() == "False"
    assert "NOTIFY_SOCKET=vsock:2:9: not a unix socket" in result.stderr


def test_bad_watchdog_value_disables_the_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert Notifier().watchdog_interval is None
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    assert Notifier().watchdog_interval == 1.5


def test_a_failing_notify_socket_does_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    notifier = Notifier()

    def refuse(message: str) -> None:
        raise OSError(24, "Too many open files")

    notifier._send = refuse
    notifier.status("still running")  # logged, not raised


def test_missing_c_binary_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(reference, "places", lambda name: [tmp_path / name])
    assert reference.main_c() == 127
    assert "cannot run" in capsys.readouterr().err


def test_c_programs_are_found_in_a_fixed_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The package's own _bin/ (pip), the installed copy's, then Debian's places; the first that exists."""
    assert reference.places("myecho-c")[-1] == Path("/usr/bin/myecho-c")
    assert reference.places("zmq-echo")[-1] == Path("/usr/libexec/myecho/zmq-echo")
    monkeypatch.setattr(reference, "BIN_DIR", tmp_path / "_bin")
    first, installed, *_ = reference.places("myecho-load")
    assert first == tmp_path / "_bin" / "myecho-load"
    assert reference.program("myecho-load") == installed and installed.is_file()  # the test env's install
    first.parent.mkdir()
    first.write_bytes(b"")
    assert reference.program("myecho-load") == first


def test_inetd_write_error_exits_non_zero_and_silent() -> None:
    read_only = os.open(os.devnull, os.O_RDONLY)  # writing to it fails with EBADF
    try:
        result = subprocess.run(
            [command("myecho"), "serve", "inetd"], input=b"x", stdout=read_only, stderr=subprocess.PIPE, timeout=10
        )
    finally:
        os.close(read_only)
    assert result.returncode == 1
    assert result.stderr == b""


def _caught(pid: int) -> int:
    """The mask of signals ``pid`` has a handler for (SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigCgt line")


@pytest.mark.parametrize(("model", "forks"), [("select", False), ("zmq", False), ("fork", True)])
def test_only_a_model_that_forks_watches_sigchld(serve: ServeFactory, model: str, forks: bool) -> None:
    """A child's exit wakes only a loop that has children to reap."""
    server = serve(model)
    caught = _caught(server.proc.pid)
    assert caught & (1 << (signal.SIGTERM - 1)) and caught & (1 << (signal.SIGHUP - 1))
    assert bool(caught & (1 << (signal.SIGCHLD - 1))) == forks


def test_a_notify_socket_that_fails_is_logged_once_until_it_works(caplog: pytest.LogCaptureFixture) -> None:
    """A gone NOTIFY_SOCKET must not put a warning in the journal at every STATUS."""
    notifier = Notifier()
    replies: list[OSError | None] = [ConnectionRefusedError(111, "Connection refused")] * 5 + [None, OSError(2, "gone")]
    sent: list[str] = []

    def send(message: str) -> None:
        reply = replies.pop(0)
        if reply is not None:
            raise reply
        sent.append(message)

    notifier._send = send
    with caplog.at_level(logging.INFO, logger="myecho"):
        for _ in range(7):
            notifier.status("serving")
    messages = [record.getMessage() for record in caplog.records]
    assert [m.split(":")[0] for m in messages] == ["sd_notify failed", "sd_notify works again", "sd_notify failed"]
    assert sent == ["STATUS=serving"]
