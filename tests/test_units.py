"""The shared layer's error paths, in process: what a live server rarely shows."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import command

from myecho import reference, sockets
from myecho.systemd import Notifier


def test_describe_a_closed_socket() -> None:
    sock = socket.socket()
    sock.close()
    assert sockets.describe(sock) == "fd -1"
    with socket.socket(socket.AF_UNIX) as unix:
        unix.bind(b"\0myecho-test-describe")
        assert "myecho-test-describe" in sockets.describe(unix)


def test_fd_limit_is_raised_to_the_hard_limit() -> None:
    code = ("import resource; from myecho.sockets import raise_fd_limit;"
            "s, h = resource.getrlimit(resource.RLIMIT_NOFILE);"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (64, h)); print(raise_fd_limit() == h)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=10)
    assert result.stdout.strip() == "True", result.stderr


def test_socket_activation_without_python_systemd_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "systemd"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), LISTEN_FDS="1", LISTEN_PID="1")
    result = subprocess.run([command("myecho"), "serve", "select"], env=env, capture_output=True, text=True,
                            timeout=10)
    assert result.returncode == 1
    assert result.stderr.strip() == "myecho: LISTEN_FDS is set but python3-systemd is not installed"


def test_no_notifier_at_all_only_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("systemd", "sdnotify"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    code = "from myecho.systemd import Notifier; n = Notifier(); n.ready('x'); print(n.enabled)"
    env = dict(os.environ, PYTHONPATH=str(tmp_path), NOTIFY_SOCKET="/nonexistent")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=10)
    assert result.stdout.strip() == "False"
    assert "neither python3-systemd nor sdnotify" in result.stderr


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


def test_missing_c_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
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
        result = subprocess.run([command("myecho"), "serve", "inetd"], input=b"x", stdout=read_only,
                                stderr=subprocess.PIPE, timeout=10)
    finally:
        os.close(read_only)
    assert result.returncode == 1
    assert result.stderr == b""
