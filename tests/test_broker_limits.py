"""The broker's frontend at the fd limit: accepting pauses, nothing spins."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import socket
import time
from pathlib import Path

import zmq
from support import NotifySocket, Server, command, cpu_seconds, free_port, req, wait_until

Context = zmq.Context[zmq.Socket[bytes]]


def _limit_fds_to_128() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))


def _flood(broker: Server, port: int, front: int, context: Context) -> None:
    """150 idle TCP connections to ``port`` (more than 128 descriptors could
    hold; never a byte sent): the broker stops accepting below the limit and
    does not spin (before, libzmq's I/O thread retried its failed accept()
    at once, for ever, a whole core); it serves a client on ``front`` again
    once they have gone."""
    raw: list[socket.socket] = []
    try:
        for number in range(150):
            if number % 8 == 0:
                time.sleep(0.02)  # in waves the backlog of 16 takes
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", port))
            raw.append(sock)
        with contextlib.suppress(AssertionError):  # checked below, after the CPU
            wait_until(lambda: "accepting paused" in broker.stderr, timeout=8, what="accepting paused")
        time.sleep(0.5)
        cpu_before = cpu_seconds(broker.proc.pid)
        time.sleep(2)
        spent = cpu_seconds(broker.proc.pid) - cpu_before
        assert spent < 0.3, f"the broker spun for {spent:.2f} s of CPU at the fd limit"
        assert broker.proc.poll() is None
        assert "accepting paused" in broker.stderr
    finally:
        for sock in raw:
            sock.close()
    client = req(context, f"tcp://127.0.0.1:{front}")  # accepting again once they left
    client.send(b"back")
    assert client.recv() == b"back"


def test_at_the_fd_limit_the_broker_pauses_accepting_without_spinning(tmp_path: Path) -> None:
    """Its frontend, on the socket it binds for --port."""
    port = free_port()
    backend = f"ipc://{tmp_path / 'backend'}"
    broker = Server(
        [command("myecho"), "serve", "broker", "--port", str(port), "--backend", backend, "--backlog", "16"],
        port,
        preexec_fn=_limit_fds_to_128,
    )
    worker = Server([command("myecho"), "serve", "worker", "--connect", backend], 0)
    context: Context = zmq.Context()
    try:
        assert broker.notify is not None
        broker.notify.follow()
        broker.wait_ready()
        worker.wait_ready()
        _flood(broker, port, port, context)
        assert broker.stop() == 0
    finally:
        context.destroy(linger=0)
        broker.kill()
        worker.kill()


def test_at_the_fd_limit_the_backend_pauses_too() -> None:
    """Its backend, on a socket from systemd: anyone who reaches that port
    holds a descriptor until CURVE (or the greeting's timeout) closes it."""
    front, back = free_port(), free_port()
    notify = NotifySocket()
    tool = shutil.which("systemd-socket-activate")
    assert tool, "systemd-socket-activate is missing: apt-get install systemd"
    setenv = [f"--setenv=NOTIFY_SOCKET={notify.path}"] + [
        f"--setenv={name}" for name in os.environ if name.startswith("COVERAGE_")
    ]
    argv = [
        tool,
        f"--listen=127.0.0.1:{front}",
        f"--listen=127.0.0.1:{back}",
        "--fdname=frontend:backend",
        *setenv,
        command("myecho"),
        "serve",
        "broker",
        "--backlog",
        "16",
    ]
    broker = Server(argv, front, notify=False, preexec_fn=_limit_fds_to_128)
    worker = Server([command("myecho"), "serve", "worker", "--connect", f"tcp://127.0.0.1:{back}"], 0)
    context: Context = zmq.Context()
    try:
        notify.follow()
        notify.wait_for("READY", "1")
        worker.wait_ready()
        _flood(broker, back, front, context)
        assert broker.stop() == 0
    finally:
        context.destroy(linger=0)
        broker.kill()
        worker.kill()
        notify.close()
