"""The fork model (and the C reference): reaping, limits, daemonize."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ServeFactory
from support import children_of, command, exchange, free_port, roundtrip, wait_listening, wait_until, zombies_of


@pytest.mark.parametrize("model", ["fork", "c"])
def test_no_zombies_after_hundreds_of_connections(serve: ServeFactory, model: str) -> None:
    server = serve(model)
    for number in range(300):
        with server.connect() as sock:
            assert exchange(sock, b"%d" % number) == b"%d" % number
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (zombies_of(server.proc.pid) or children_of(server.proc.pid)):
        time.sleep(0.05)
    assert zombies_of(server.proc.pid) == []
    assert children_of(server.proc.pid) == []


def test_max_children_queues_instead_of_forking(serve: ServeFactory) -> None:
    server = serve("fork", "--max-children", "3")
    held = [server.connect() for _ in range(3)]
    for sock in held:
        assert roundtrip(sock, b"held") == b"held"
    waiting = server.connect()  # accepted by the kernel, not yet by the parent
    waiting.sendall(b"queued")
    waiting.settimeout(0.5)
    with pytest.raises(TimeoutError):
        waiting.recv(10)
    assert len(children_of(server.proc.pid)) == 3
    held.pop().close()
    waiting.settimeout(10)
    assert waiting.recv(10) == b"queued"
    for sock in [*held, waiting]:
        sock.close()


def test_children_die_with_the_parent(serve: ServeFactory) -> None:
    server = serve("fork")
    sock = server.connect()
    assert roundtrip(sock, b"a") == b"a"
    (child,) = children_of(server.proc.pid)
    server.proc.kill()
    server.proc.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists():
        state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            break
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text()
    sock.close()


def test_children_only_report_figures_not_to_systemd(serve: ServeFactory) -> None:
    server = serve("fork")
    for _ in range(5):
        with server.connect() as sock:
            assert exchange(sock, b"12345") == b"12345"
    assert server.notify is not None
    status = server.notify.wait_for("STATUS", None)
    deadline = time.monotonic() + 5
    while "5 served, 5 messages, 25 bytes" not in status.get("STATUS", "") and time.monotonic() < deadline:
        status = server.notify.receive(2) or {}
    assert "0 open, 5 served, 5 messages, 25 bytes echoed" in status["STATUS"]
    assert server.stop() == 0
    senders = {m.get("MAINPID") for m in server.notify.messages if "MAINPID" in m}
    assert senders == {str(server.proc.pid)}


def test_daemon_mode_detaches_and_writes_a_pidfile(tmp_path: Path) -> None:
    port = free_port()
    pidfile = tmp_path / "myecho.pid"
    log = tmp_path / "myecho.log"
    argv = [command("myecho"), "serve", "fork", "--port", str(port), "--daemon", "--pidfile", str(pidfile),
            "--log-file", str(log)]
    try:
        result = subprocess.run(argv, timeout=10)
        assert result.returncode == 0  # the shell gets its prompt back
        wait_listening(port)  # bound before detaching; the pidfile and log come after
        wait_until(lambda: log.exists() and "serving on" in log.read_text(), what="the daemon's log line")
        pid = int(pidfile.read_text())
        # A session of its own, and not its leader: it can never get a terminal back.
        assert os.getsid(pid) not in (os.getsid(0), pid)
        assert Path(f"/proc/{pid}/cwd").resolve() == Path("/")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            assert exchange(sock, b"daemon") == b"daemon"
    finally:  # the daemon is nobody's child: find it by its command line, whatever failed
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if str(pidfile).encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGTERM)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + 10
    while pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidfile.exists()
    assert "stopped" in log.read_text()


def test_second_daemon_refuses_a_live_pidfile(tmp_path: Path) -> None:
    pidfile = tmp_path / "myecho.pid"
    pidfile.write_text(f"{os.getpid()}\n")
    result = subprocess.run([command("myecho"), "serve", "fork", "--port", str(free_port()), "--daemon",
                             "--pidfile", str(pidfile)], capture_output=True, timeout=10)
    assert result.returncode == 1
    assert result.stderr.decode().strip().endswith(f"names running process {os.getpid()}")
    assert pidfile.read_text() == f"{os.getpid()}\n"
