"""The broker's frontend at the fd limit: accepting pauses, nothing spins."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import zmq
from support import Server, assert_pauses_at_the_fd_limit, command, limit_fds_to_128, req

from myecho.bench.harness import NotifySocket, free_port

Context = zmq.Context[zmq.Socket[bytes]]


def _flood(broker: Server, port: int, front: int, context: Context) -> None:
    """The broker stops accepting on ``port`` below its fd limit without
    spinning, then serves a client on ``front`` again once the idle
    connections have gone."""
    assert_pauses_at_the_fd_limit(broker, port)
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
        preexec_fn=limit_fds_to_128,
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
    broker = Server(argv, front, notify=False, preexec_fn=limit_fds_to_128)
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
