"""The select model's cures for the talk's list of mono-process weaknesses,
held by the asyncio model too (on uvloop, and on asyncio's own loop)."""

from __future__ import annotations

import resource
import socket
import time

import pytest
from support import ServeFactory, Server, cpu_seconds, random_bytes, roundtrip, rss_kib, server_argv

from myecho.bench.harness import free_port

#: What a client that never reads may cost the server: the buffer limit
#: (64 KiB) plus one read (64 KiB) plus allocator slack. The kernel's socket
#: buffers are not the server's memory.
NEVER_READING_BOUND_KIB = 4 * 1024
#: The single-loop models that share these guarantees.
LOOP_MODELS = ("select", "asyncio", "asyncio-asyncio")
loop_models = pytest.mark.parametrize("model", LOOP_MODELS)


@loop_models
def test_never_reading_client_gets_backpressure(serve: ServeFactory, model: str) -> None:
    server = serve(model)
    before = rss_kib(server.proc.pid)
    flooder = server.connect()
    flooder.setblocking(False)
    payload = random_bytes(64 * 1024 * 1024)
    sent = 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and sent < len(payload):
        try:
            sent += flooder.send(payload[sent : sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
    assert sent < len(payload), "the server should have stopped reading long before 64 MiB"
    grown = rss_kib(server.proc.pid) - before
    assert grown < NEVER_READING_BOUND_KIB, f"server grew {grown} KiB for one client that never reads"
    with server.connect(timeout=5) as other:  # everyone else is still served
        assert roundtrip(other, b"still here\n") == b"still here\n"
    flooder.setblocking(True)
    flooder.settimeout(30)
    flooder.shutdown(socket.SHUT_WR)
    received = bytearray()
    while data := flooder.recv(1 << 16):
        received += data
    assert bytes(received) == payload[:sent]  # nothing lost while it paused
    flooder.close()


def _limit_fds_to_64() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


@loop_models
def test_running_out_of_fds_neither_crashes_nor_spins(model: str) -> None:
    port = free_port()
    limited = Server(server_argv(model, port, "--max-connections", "1000"), port, preexec_fn=_limit_fds_to_64)
    try:
        limited.wait_ready()
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(100)]
        time.sleep(0.5)
        cpu_before = cpu_seconds(limited.proc.pid)
        time.sleep(2)
        spent = cpu_seconds(limited.proc.pid) - cpu_before
        assert spent < 0.5, f"the server spun for {spent:.2f} s of CPU while out of fds"
        assert limited.proc.poll() is None, limited.stderr
        assert "Too many open files" in limited.stderr
        for sock in clients[:60]:
            sock.close()
        for sock in clients[60:]:  # those waited in the backlog and are served now
            assert roundtrip(sock, b"late") == b"late"
            sock.close()
        assert limited.stop() == 0
    finally:
        limited.kill()


@loop_models
def test_max_connections_queues_the_rest(serve: ServeFactory, model: str) -> None:
    server = serve(model, "--max-connections", "2")
    first, second = server.connect(), server.connect()
    assert roundtrip(first, b"1") == b"1" and roundtrip(second, b"2") == b"2"
    third = server.connect()  # the kernel's backlog holds it
    third.sendall(b"3")
    third.settimeout(0.5)
    with pytest.raises(TimeoutError):
        third.recv(1)
    first.close()
    third.settimeout(10)
    assert third.recv(1) == b"3"
    second.close()
    third.close()


@pytest.mark.heavy
def test_ten_thousand_concurrent_connections(serve: ServeFactory) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 10_200:
        pytest.fail(f"the test needs 10,200 open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = serve("select", "--log-level", "warning")
    clients: list[socket.socket] = []
    try:
        for _ in range(10_000):
            clients.append(socket.create_connection(("127.0.0.1", server.port), timeout=30))
        for number, sock in enumerate(clients):
            sock.sendall(b"%05d" % number)
        for number, sock in enumerate(clients):
            got = b""
            while len(got) < 5:
                got += sock.recv(5 - len(got))
            assert got == b"%05d" % number
        assert server.notify is not None
        status = server.notify.wait_for("STATUS")
        deadline = time.monotonic() + 5
        while not status.get("STATUS", "").startswith("10000 open") and time.monotonic() < deadline:
            status = server.notify.receive(2) or {}
        assert status["STATUS"].startswith("10000 open")
    finally:
        for sock in clients:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
