"""Idle clients: the idle timeout, and shedding the idlest connection when a
model is at its limit and more connections wait (an idle-connection flood)."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from support import ServeFactory, Server, roundtrip, wait_status, wait_until

#: An idle-connection flood: sockets held open, never a byte sent.
FLOOD = 2000


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """True if the server ends this connection (EOF or reset) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@contextlib.contextmanager
def idle_flood(port: int, count: int = FLOOD) -> Iterator[list[socket.socket]]:
    """``count`` connections that never send: they fill the model, then its backlog."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", port))
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


class ActiveClient(threading.Thread):
    """A client in a steady exchange: a message every few ms, its echo checked."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.sock = server.connect()
        self.running = True
        self.exchanges = 0
        self.failure = ""

    def run(self) -> None:
        try:
            while self.running:
                message = b"still here %d" % self.exchanges
                if roundtrip(self.sock, message) != message:
                    self.failure = f"closed after {self.exchanges} exchanges"
                    return
                self.exchanges += 1
                time.sleep(0.005)
        except OSError as error:
            self.failure = f"{error} after {self.exchanges} exchanges"

    def stop(self) -> str:
        self.running = False
        self.join(10)
        self.sock.close()
        return self.failure


MODELS = {
    "select": ("--max-connections", "100"),
    "fork": ("--max-children", "10"),
    "asyncio": ("--max-connections", "100"),
    "asyncio-asyncio": ("--max-connections", "100"),
}
#: The models with an idle timeout ("asyncio-asyncio": on asyncio's own loop).
IDLE_MODELS = ("select", "fork", "fork-classic", "asyncio", "asyncio-asyncio")


@pytest.mark.parametrize("model", IDLE_MODELS)
def test_a_silent_connection_is_closed_after_the_idle_timeout(serve: ServeFactory, model: str) -> None:
    server = serve(model, "--idle-timeout", "0.5")
    silent = server.connect()
    talking = server.connect()
    started = time.monotonic()
    for _ in range(8):  # 1.6 s of a message every 0.2 s: never silent 0.5 s
        assert roundtrip(talking, b"tick") == b"tick"
        time.sleep(0.2)
    assert closed_by_server(silent, within=3)
    assert time.monotonic() - started < 4
    assert roundtrip(talking, b"tock") == b"tock"
    # Closed by us now: silent while the next STATUS= comes (up to a second), it would be closed idle too.
    talking.close()
    silent.close()
    assert "1 closed idle" in wait_status(server, "closed idle")


@pytest.mark.parametrize("model", ["select", "asyncio"])
def test_idle_timeout_zero_means_never(serve: ServeFactory, model: str) -> None:
    server = serve(model, "--idle-timeout", "0")
    silent = server.connect()
    assert not closed_by_server(silent, within=1.5)
    assert roundtrip(silent, b"awake") == b"awake"
    silent.close()


@pytest.mark.parametrize("model", MODELS)
def test_a_new_client_is_served_through_an_idle_flood(serve: ServeFactory, model: str) -> None:
    """2,000 silent sockets against a full model: the new client gets its echo
    well within the idle timeout, and the client in an exchange is never shed."""
    idle_timeout = 20.0
    server = serve(model, *MODELS[model], "--idle-timeout", str(idle_timeout))
    active = ActiveClient(server)
    active.start()
    with idle_flood(server.port):
        time.sleep(0.5)  # the model is full, the rest wait in its backlog
        started = time.monotonic()
        with server.connect(timeout=idle_timeout) as newcomer:
            newcomer.sendall(b"let me in")
            newcomer.settimeout(idle_timeout)
            assert newcomer.recv(100) == b"let me in"
        waited = time.monotonic() - started
    assert waited < idle_timeout, f"served after {waited:.1f} s"
    assert re.search(r"\b[1-9][0-9]* shed\b", wait_status(server, " shed"))
    assert active.stop() == "", "the active client was shed"
    assert active.exchanges > 10


@pytest.mark.parametrize("model", IDLE_MODELS)
def test_debug_logs_one_line_per_connection(serve: ServeFactory, model: str) -> None:
    server = serve(model, "--log-level", "debug", "--idle-timeout", "0.3")
    with server.connect() as sock:
        assert roundtrip(sock, b"hello") == b"hello"
        port = sock.getsockname()[1]
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b""
    silent = server.connect()
    assert closed_by_server(silent, within=3)
    silent.close()
    pattern = rf"connection 127\.0\.0\.1:{port} ended after [0-9.]+ s, 5 bytes in 1 messages: client closed"
    wait_until(lambda: re.search(pattern, server.stderr), what="the debug line")
    wait_until(
        lambda: re.search(r"ended after [0-9.]+ s, 0 bytes in 0 messages: idle for 0.3 s", server.stderr),
        what="the idle timeout's debug line",
    )


@pytest.mark.parametrize("model", ["select", "fork", "asyncio"])
def test_no_connection_line_without_debug(serve: ServeFactory, model: str) -> None:
    server = serve(model)
    with server.connect() as sock:
        assert roundtrip(sock, b"hello") == b"hello"
    assert server.stop() == 0
    assert "ended after" not in server.stderr
