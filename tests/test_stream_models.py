"""RFC 862 over TCP, byte for byte, for every byte-stream model and the C reference."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
import time

import pytest
from support import (
    STREAM_MODELS,
    ServeFactory,
    descendants_of,
    exchange,
    odd_chunks,
    random_bytes,
    refused,
    roundtrip,
    server_argv,
    stall_report,
    wait_until,
)

from myecho.bench.harness import free_port

pytestmark = pytest.mark.parametrize("model", STREAM_MODELS)


def test_binary_bytes_come_back_exactly(serve: ServeFactory, model: str) -> None:
    server = serve(model)
    payload = bytes(range(256)) * 4 + b"\x00\xff\xfe no newline at all \xc3\x28"
    with server.connect() as sock:
        assert exchange(sock, payload) == payload


def test_ten_mib_in_odd_chunks(serve: ServeFactory, model: str) -> None:
    server = serve(model)
    payload = random_bytes(10 * 1024 * 1024)
    with server.connect(timeout=60) as sock:
        assert exchange(sock, payload, odd_chunks(payload)) == payload


def test_half_close_gets_everything_then_eof(serve: ServeFactory, model: str) -> None:
    server = serve(model)
    with server.connect() as sock:
        sock.sendall(b"first\nsecond without newline")
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while data := sock.recv(4096):
            received += data
        assert received == b"first\nsecond without newline"


def test_silent_client_does_not_delay_others(serve: ServeFactory, model: str) -> None:
    server = serve(model)
    silent = [server.connect() for _ in range(5)]
    half_sent = server.connect()
    half_sent.sendall(b"partial line with no end")
    try:
        started = time.monotonic()
        for _ in range(20):
            with server.connect(timeout=5) as sock:
                assert roundtrip(sock, b"ping\n") == b"ping\n"
        assert time.monotonic() - started < 5
        assert roundtrip(half_sent, b"") == b""
        assert half_sent.recv(100) == b"partial line with no end"
    finally:
        for sock in [*silent, half_sent]:
            sock.close()


def test_thousand_concurrent_clients(serve: ServeFactory, model: str) -> None:
    server = serve(model, *(["--max-children", "1100"] if model.startswith("fork") else []))
    # Under coverage every forked child starts and saves a collector of its own:
    # 1,000 forks after accept take 20-30 s on 2 cores (3 s without coverage).
    clients = [server.connect(timeout=90) for _ in range(1000)]
    try:
        for number, sock in enumerate(clients):
            sock.sendall(b"client %d\n" % number)
        for number, sock in enumerate(clients):
            expected = b"client %d\n" % number
            assert roundtrip(sock, b"") == b""
            got = b""
            while len(got) < len(expected):
                try:
                    data = sock.recv(64)
                except TimeoutError:
                    children = len(descendants_of(server.proc.pid))
                    raise AssertionError(
                        f"client {number}: no echo within its socket timeout; the server has {children} "
                        f"processes below it; {stall_report(server.proc.pid, server.port)}; "
                        f"its stderr ends: {server.stderr[-1500:]!r}"
                    ) from None
                assert data, f"client {number}: EOF after {got!r}"
                got += data
            assert got == expected
    finally:
        for sock in clients:
            sock.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_lets_open_connections_finish(serve: ServeFactory, model: str, signum: int) -> None:
    extra = [] if model == "c" else ["--graceful-timeout", "10"]
    server = serve(model, *extra, env={"MYECHO_GRACEFUL_TIMEOUT": "10"} if model == "c" else None)
    sock = server.connect()
    assert roundtrip(sock, b"before\n") == b"before\n"
    server.signal(signum)
    wait_until(lambda: refused(server.port), what="new connections refused after the stop signal")
    assert server.proc.poll() is None, "exited while a connection was open"
    assert roundtrip(sock, b"during the grace period\n") == b"during the grace period\n"
    sock.close()
    assert server.proc.wait(10) == 0


def test_grace_period_ends_with_connections_closed(serve: ServeFactory, model: str) -> None:
    env = {"MYECHO_GRACEFUL_TIMEOUT": "0.5"} if model == "c" else None
    server = serve(model, *([] if model == "c" else ["--graceful-timeout", "0.5"]), env=env)
    sock = server.connect()
    assert roundtrip(sock, b"x") == b"x"
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0
    assert time.monotonic() - started < 5
    sock.settimeout(5)
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(10) == b""
    sock.close()


def test_port_in_use_is_a_one_line_error(model: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(server_argv(model, port), capture_output=True, timeout=10)
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "in use" in lines[0] and "Traceback" not in lines[0]


def test_many_short_connections_in_parallel(serve: ServeFactory, model: str) -> None:
    server = serve(model)
    failures: list[str] = []

    def worker(number: int) -> None:
        for turn in range(25):
            payload = b"%d-%d" % (number, turn)
            try:
                with server.connect() as sock:
                    if exchange(sock, payload) != payload:
                        failures.append(payload.decode())
            except OSError as error:
                failures.append(f"{payload.decode()}: {error}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures


def test_ipv6_loopback(model: str, serve: ServeFactory) -> None:
    if not socket.has_ipv6:
        pytest.fail("this machine has no IPv6: the test needs ::1")
    port = free_port()
    server = serve(model, "--host", "::1", port=port)
    with socket.create_connection(("::1", port), timeout=5) as sock:
        assert exchange(sock, b"over ipv6") == b"over ipv6"
    server.stop()
