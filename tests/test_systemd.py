"""The shared systemd layer: socket activation, sd_notify, journald, reload."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from support import ServeFactory, command, exchange, roundtrip, wait_listening

from myecho.bench.harness import NotifySocket, free_port


def activate(
    argv: list[str], port: int, notify: NotifySocket | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Run argv as systemd would for an Accept=no socket unit."""
    tool = shutil.which("systemd-socket-activate")
    assert tool, "systemd-socket-activate is missing: apt-get install systemd"
    # Like systemd, the tool passes on only the environment it is told to.
    setenv = [f"--setenv=NOTIFY_SOCKET={notify.path}"] if notify is not None else []
    setenv += [f"--setenv={name}={value}" for name, value in (env or {}).items()]
    setenv += [f"--setenv={name}" for name in os.environ if name.startswith("COVERAGE_")]
    return subprocess.Popen([tool, f"--listen=127.0.0.1:{port}", *setenv, *argv], stderr=subprocess.PIPE)


@pytest.mark.parametrize("model", ["fork", "select", "asyncio", "zmq", "c"])
def test_socket_activation_hands_over_the_listening_socket(model: str) -> None:
    port = free_port()
    # A port we do not listen on: the model must use systemd's socket, not bind.
    decoy = free_port()
    argv = (
        [command("myecho-c"), str(decoy)] if model == "c" else [command("myecho"), "serve", model, "--port", str(decoy)]
    )
    notify = NotifySocket()
    proc = activate(argv, port, notify)
    try:
        wait_listening(port, 10, proc)
        if model == "zmq":
            ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
            client = ctx.socket(zmq.REQ)
            client.setsockopt(zmq.RCVTIMEO, 10_000)
            client.connect(f"tcp://127.0.0.1:{port}")
            client.send(b"activated")
            assert client.recv() == b"activated"
            ctx.destroy(linger=0)
        else:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                assert exchange(sock, b"activated\x00") == b"activated\x00"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", decoy), timeout=1).close()
        if model != "c":
            ready = notify.wait_for("READY", "1")
            assert str(port) in ready["STATUS"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        notify.close()


def hide_systemd_libraries(folder: Path) -> str:
    """A PYTHONPATH on which python-systemd and sdnotify fail to import."""
    for name in ("systemd", "sdnotify"):
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    return str(folder)


@pytest.mark.parametrize(("model", "address"), [("select", "abstract"), ("asyncio", "path")])
def test_without_systemd_libraries_the_standard_library_does_it(tmp_path: Path, model: str, address: str) -> None:
    """A pip install with neither python-systemd nor sdnotify under a Type=notify socket unit: the
    server takes systemd's socket (LISTEN_FDS) and says READY=1 (to a path or an abstract socket)."""
    port, decoy = free_port(), free_port()
    if address == "abstract":
        notify_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"myecho-test-notify-{os.getpid()}-{port}"
        notify_socket.bind("\0" + name)
        env = {"NOTIFY_SOCKET": "@" + name}
    else:
        notify_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_socket.bind(str(tmp_path / "notify"))
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify")}
    env["PYTHONPATH"] = hide_systemd_libraries(tmp_path)
    proc = activate([command("myecho"), "serve", model, "--port", str(decoy)], port, env=env)
    try:
        wait_listening(port, 10, proc)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert exchange(sock, b"no library\x00") == b"no library\x00"
        notify_socket.settimeout(10)
        messages = []
        while not any("READY=1" in message for message in messages):
            messages.append(notify_socket.recv(4096).decode())
        assert f"STATUS=serving on 127.0.0.1:{port}" in messages[-1]
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", decoy), timeout=1).close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        notify_socket.close()
    assert proc.stderr is not None and b"Traceback" not in proc.stderr.read()


@pytest.mark.parametrize("model", ["select", "asyncio"])
def test_notify_ready_status_stopping(serve: ServeFactory, model: str) -> None:
    server = serve(model)
    assert server.notify is not None
    ready = server.notify.wait_for("READY", "1")
    assert ready["MAINPID"] == str(server.proc.pid)
    assert ready["STATUS"] == f"serving on 127.0.0.1:{server.port}" + (" (uvloop)" if model == "asyncio" else "")
    with server.connect() as sock:
        assert roundtrip(sock, b"abc") == b"abc"
        deadline = time.monotonic() + 5
        status: dict[str, str] = {}
        while status.get("STATUS") != "1 open, 1 served, 1 messages, 3 bytes echoed" and time.monotonic() < deadline:
            status = server.notify.receive(2) or {}
        assert status["STATUS"] == "1 open, 1 served, 1 messages, 3 bytes echoed"
    assert server.stop() == 0
    stopping = server.notify.wait_for("STOPPING", "1")
    assert stopping["STATUS"].startswith("stopping:")


@pytest.mark.parametrize("model", ["fork", "asyncio"])
def test_watchdog_pings_at_half_the_interval(serve: ServeFactory, model: str) -> None:
    server = serve(model, env={"WATCHDOG_USEC": "400000"})
    assert server.notify is not None
    times = []
    deadline = time.monotonic() + 3
    while len(times) < 5 and time.monotonic() < deadline:
        message = server.notify.receive(1)
        if message and message.get("WATCHDOG") == "1":
            times.append(time.monotonic())
    assert len(times) == 5
    gaps = sorted(later - earlier for earlier, later in itertools.pairwise(times))
    assert 0.15 < gaps[len(gaps) // 2] < 0.3, gaps  # the median: a loaded machine delays some


def test_watchdog_for_another_pid_is_ignored(serve: ServeFactory) -> None:
    server = serve("select", env={"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    assert server.notify is not None
    for _ in range(3):
        message = server.notify.receive(0.5)
        assert not message or "WATCHDOG" not in message


def test_sighup_reloads_settings_without_dropping_connections(serve: ServeFactory, tmp_path: Path) -> None:
    config = tmp_path / "myecho"
    config.write_text("MYECHO_MAX_CHILDREN=10\n")
    server = serve("fork", "--config", str(config))
    assert server.notify is not None
    sock = server.connect()
    assert roundtrip(sock, b"before") == b"before"
    config.write_text("# an admin's edit\nMYECHO_MAX_CHILDREN=2\nMYECHO_LOG_LEVEL=debug\nMYECHO_FORK_PORT=1\n")
    server.signal(signal.SIGHUP)
    server.notify.wait_for("RELOADING", "1")
    deadline = time.monotonic() + 5
    while "reloaded" not in server.stderr and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "reloaded (max_children, log_level)" in server.stderr
    assert roundtrip(sock, b"after") == b"after"
    second = server.connect()
    assert roundtrip(second, b"2") == b"2"
    third = server.connect()
    third.sendall(b"3")
    third.settimeout(0.5)
    with pytest.raises(TimeoutError):  # max_children is now 2
        third.recv(1)
    for each in (sock, second, third):
        each.close()
    assert server.stop() == 0


@pytest.mark.parametrize("model", ["select", "asyncio"])
def test_bad_config_on_reload_keeps_the_old_settings(serve: ServeFactory, tmp_path: Path, model: str) -> None:
    config = tmp_path / "myecho"
    config.write_text("MYECHO_BUFFER_LIMIT=4096\n")
    server = serve(model, "--config", str(config))
    config.write_text("MYECHO_BUFFER_LIMIT=lots\n")
    server.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "reload refused" not in server.stderr and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "bad value for MYECHO_BUFFER_LIMIT" in server.stderr
    with server.connect() as sock:
        assert roundtrip(sock, b"fine") == b"fine"


def test_journald_is_used_when_stderr_is_the_journal() -> None:
    code = (
        "import os, sys; from myecho.core import systemd as s;"
        "st = os.fstat(2); os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}';"
        "log = s.setup_logging('select'); print(type(log.handlers[0]).__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=10, text=True)
    assert result.stdout.strip() == "JournalHandler", result.stderr
    result = subprocess.run(
        [sys.executable, "-c", code.replace("st.st_ino", "st.st_ino + 1")], capture_output=True, timeout=10, text=True
    )
    assert result.stdout.strip() == "StreamHandler"


def test_sdnotify_is_the_fallback_without_python_systemd(tmp_path: Path) -> None:
    notify = NotifySocket()
    blocker = tmp_path / "systemd"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    code = "from myecho.core.systemd import Notifier; n = Notifier(); n.ready('via sdnotify')"
    env = dict(os.environ, NOTIFY_SOCKET=notify.path, PYTHONPATH=str(tmp_path))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=10)
    assert notify.wait_for("READY", "1", timeout=5)["STATUS"] == "via sdnotify"
    notify.close()


@pytest.mark.parametrize("model", ["select", "asyncio"])
def test_second_sigint_is_still_graceful(serve: ServeFactory, model: str) -> None:
    server = serve(model, "--graceful-timeout", "30")
    sock = server.connect()
    assert roundtrip(sock, b"accepted") == b"accepted"  # not still in the backlog, which a stop closes
    server.signal(signal.SIGINT)
    assert server.notify is not None
    server.notify.wait_for("STOPPING", "1")
    assert server.proc.poll() is None
    server.signal(signal.SIGINT)  # still graceful: a second ^C does not drop the client
    time.sleep(0.3)
    assert roundtrip(sock, b"x") == b"x"
    sock.close()
    assert server.proc.wait(10) == 0


def test_a_server_keeps_serving_past_ten_status_lines(serve: ServeFactory) -> None:
    """The test harness reads the notify socket as systemd does once the server is ready: a
    unix datagram socket holds ten messages, and a server saying STATUS= every second to a
    reader that stopped would block in sendmsg on the eleventh and serve nobody."""
    server = serve("select")
    time.sleep(12)  # eleven or more STATUS= lines sent after READY
    with server.connect(timeout=5) as sock:
        assert roundtrip(sock, b"still here\n") == b"still here\n"
    assert server.notify is not None and sum("STATUS" in m for m in server.notify.messages) >= 11
