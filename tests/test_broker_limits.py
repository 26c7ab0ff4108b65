"""The broker's frontend at the fd limit: accepting pauses, nothing spins."""

from __future__ import annotations

import contextlib
import resource
import socket
import time
from pathlib import Path

import zmq
from support import Server, command, cpu_seconds, free_port, req, wait_until

Context = zmq.Context[zmq.Socket[bytes]]


def _limit_fds_to_128() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))


def test_at_the_fd_limit_the_broker_pauses_accepting_without_spinning(tmp_path: Path) -> None:
    """150 idle TCP connections to a broker allowed 128 descriptors: it stops
    accepting below the limit (before, libzmq's I/O thread retried its failed
    accept() at once, for ever, a whole core), then serves a client again
    once they have gone."""
    port = free_port()
    backend = f"ipc://{tmp_path / 'backend'}"
    broker = Server(
        [command("myecho"), "serve", "broker", "--port", str(port), "--backend", backend, "--backlog", "16"],
        port,
        preexec_fn=_limit_fds_to_128,
    )
    worker = Server([command("myecho"), "serve", "worker", "--connect", backend], 0)
    raw: list[socket.socket] = []
    context: Context = zmq.Context()
    try:
        assert broker.notify is not None
        broker.notify.follow()
        broker.wait_ready()
        worker.wait_ready()
        for number in range(150):  # more than 128 descriptors could hold; never a byte sent
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
        for sock in raw:
            sock.close()
        client = req(context, f"tcp://127.0.0.1:{port}")  # accepting again once they left
        client.send(b"back")
        assert client.recv() == b"back"
        assert broker.stop() == 0
    finally:
        for sock in raw:
            sock.close()
        context.destroy(linger=0)
        broker.kill()
        worker.kill()
