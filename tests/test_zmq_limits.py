"""The zmq model's bounds in bytes, and its accepting at the fd limit."""

from __future__ import annotations

import contextlib
import errno
import re
import socket
import threading
import time

import zmq
from support import (
    ServeFactory,
    Server,
    assert_pauses_at_the_fd_limit,
    command,
    limit_fds_to_128,
    req,
    rss_kib,
    wait_status,
    wait_until,
)

from myecho.bench.harness import free_port

Context = zmq.Context[zmq.Socket[bytes]]
MIB = 1024 * 1024


def dealer(context: Context, port: int) -> zmq.Socket[bytes]:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


def test_a_message_over_the_bound_in_all_frames_is_dropped(serve: ServeFactory) -> None:
    """Five frames of 16 MiB (80 MiB) pass libzmq's per-frame MAXMSGSIZE (64 MiB): the sum does not."""
    server = serve("zmq")
    context: Context = zmq.Context()
    try:
        client = dealer(context, server.port)
        client.send_multipart([b"", *[b"x" * (16 * MIB)] * 5])
        client.send_multipart([b"", b"after", b"y" * MIB])
        assert client.recv_multipart() == [b"", b"after", b"y" * MIB]  # the big one never came back
        assert "dropped" in wait_status(server, "1 dropped")
        assert "reply dropped: a message of 83886080 bytes, over 67108864 (all frames)" in server.stderr
    finally:
        context.destroy(linger=0)


def test_a_client_that_sends_2_gib_and_never_reads(serve: ServeFactory) -> None:
    """The model's memory stays under its baseline + 128 MiB while one DEALER
    sends 2 GiB of 1 MiB requests and reads nothing: the unread replies held
    for it are bounded at 16 MiB plus one message, its queued requests at 32
    messages; memory falls back once it has gone, and another client is
    answered all along. (Before: 1.55 GiB held, 564 MiB kept after.)"""
    server = serve("zmq")
    pid = server.proc.pid
    baseline = rss_kib(pid)
    context: Context = zmq.Context()
    peak = [baseline]
    sampling = True

    def sample() -> None:
        while sampling:
            peak[0] = max(peak[0], rss_kib(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        flooder = dealer(context, server.port)
        flooder.setsockopt(zmq.RCVHWM, 1)
        flooder.setsockopt(zmq.RCVBUF, 65536)
        flooder.setsockopt(zmq.SNDTIMEO, 30_000)
        payload = b"z" * MIB
        for _ in range(2048):
            flooder.send_multipart([b"", payload], copy=False)
        other = req(context, f"tcp://127.0.0.1:{server.port}")
        other.send(b"me too")
        assert other.recv() == b"me too"
        wait_status(server, "2049 messages", timeout=60)
        during = peak[0]
        flooder.close(linger=0)
        wait_until(lambda: rss_kib(pid) < baseline + 64 * 1024, timeout=10, what="memory given back")
    finally:
        sampling = False
        sampler.join(2)
        context.destroy(linger=0)
    grown = (during - baseline) / 1024
    assert grown < 128, f"the model grew by {grown:.0f} MiB"
    assert "unread replies reached 16 MiB" in server.stderr


def test_at_the_fd_limit_accepting_pauses_without_spinning() -> None:
    port = free_port()
    limited = Server(
        [command("myecho"), "serve", "zmq", "--port", str(port), "--backlog", "16"], port, preexec_fn=limit_fds_to_128
    )
    context: Context = zmq.Context()
    try:
        limited.wait_ready()
        assert_pauses_at_the_fd_limit(limited, port)
        client = req(context, f"tcp://127.0.0.1:{port}")  # accepting again once they left
        client.send(b"back")
        assert client.recv() == b"back"
        assert limited.stop() == 0
    finally:
        context.destroy(linger=0)
        limited.kill()


def test_debug_logs_one_line_per_connection(serve: ServeFactory) -> None:
    server = serve("zmq", "--log-level", "debug")
    context: Context = zmq.Context()
    try:
        client = req(context, f"tcp://127.0.0.1:{server.port}")
        client.send(b"hello")
        assert client.recv() == b"hello"
        client.close(linger=0)
        pattern = r"connection 127\.0\.0\.1:[0-9]+ ended after [0-9.]+ s, 5 bytes in 1 messages: disconnected"
        deadline = time.monotonic() + 10
        while not re.search(pattern, server.stderr) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert re.search(pattern, server.stderr), server.stderr
    finally:
        context.destroy(linger=0)


def test_a_closed_door_keeps_new_connections_waiting_not_refused() -> None:
    """The pause: a filter on the listening socket drops SYNs (the client
    retries, as with a full backlog); lifted, the same connect completes."""
    from myecho.core.zmqfront import Endpoint

    listener = socket.create_server(("127.0.0.1", 0))
    endpoint = Endpoint("tcp://unused", listener)
    client = socket.socket()
    try:
        assert endpoint.close_door(True)
        client.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            client.connect(listener.getsockname())
        time.sleep(0.3)
        assert client.connect_ex(listener.getsockname()) in (errno.EALREADY, errno.EINPROGRESS)  # not refused
        assert endpoint.close_door(False)
        wait_until(
            lambda: client.connect_ex(listener.getsockname()) in (0, errno.EISCONN),
            timeout=5,
            what="connected once the door is open (the SYN retried after 1 s)",
        )
        conn, _ = listener.accept()
        conn.close()
    finally:
        client.close()
        listener.close()
