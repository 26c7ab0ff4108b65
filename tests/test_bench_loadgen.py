"""The load generators check every echo: wrong bytes, early EOF and silence
are errors of their own kind, never counted as answers."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest
import zmq

from myecho.bench import loadgen
from myecho.bench.servers import BY_NAME, Server


class Faulty:
    """A loopback server whose every connection runs ``handle``."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        self.handle = handle
        threading.Thread(target=self.run, daemon=True).start()

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        with conn:
            self.handle(conn)

    def close(self) -> None:
        self.listener.close()


def corrupting(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data[:-1] + b"?")


def closing(conn: socket.socket) -> None:
    conn.recv(65536)


@pytest.fixture
def faulty(request: pytest.FixtureRequest) -> Iterator[Faulty]:
    server = Faulty(request.param)
    yield server
    server.close()


@pytest.mark.parametrize("faulty", [corrupting], indirect=True)
@pytest.mark.parametrize("protocol_mode", ["single", "burst"])
def test_a_wrong_echo_is_a_mismatch(faulty: Faulty, protocol_mode: str) -> None:
    if protocol_mode == "single":
        out = loadgen.run("tcp", "single", "127.0.0.1", faulty.port, 30, trials=3, timeout=2)
        assert out["trials"] == 0
    else:
        out = loadgen.burst("tcp", "127.0.0.1", faulty.port, 20, 30, lambda result: None, timeout=2)
        assert out["opened"] == 20 and out["echoed"] == 0
    assert out["errors"]["mismatch"] >= 3


@pytest.mark.parametrize("faulty", [closing], indirect=True)
def test_a_server_that_closes_is_an_eof(faulty: Faulty) -> None:
    out = loadgen.run("tcp", "single", "127.0.0.1", faulty.port, 30, trials=3, timeout=2)
    assert out["trials"] == 0
    assert set(out["errors"]) <= {"eof", "reset"}


def test_round_trips_against_the_limit_server() -> None:
    server = Server.start(BY_NAME["epoll"])
    try:
        starts: list[float] = []
        out = loadgen.round_trips(
            "tcp", server.host, server.port, 30, lambda: starts.append(1.0), conns=8, duration=0.3, warmup=0.05
        )
    finally:
        server.stop()
    assert starts == [1.0]
    assert out["errors"] == {} and out["live"] == 8
    assert out["round_trips"] > 100
    assert 0 < out["p50_ns"] <= out["p99_ns"] <= out["max_ns"]


@pytest.fixture(params=["zmtp", "pyzmq"])
def zmq_client(request: pytest.FixtureRequest) -> str:
    """Each zmq test with both clients: myecho-load's ZMTP, and pyzmq's REQ."""
    return str(request.param)


@pytest.mark.parametrize("model", ["zmq", "zmq-c", "pyzmq"])
def test_zmq_client_against_the_zmq_model(zmq_client: str, model: str) -> None:
    """Both clients against the zmq model, its C limit (zmq-echo) and its pyzmq floor."""
    server = Server.start(BY_NAME[model])
    try:
        single = loadgen.run(zmq_client, "single", server.host, server.port, 60, trials=3, timeout=5)
        burst = loadgen.burst(zmq_client, server.host, server.port, 50, 60, lambda result: None, timeout=5)
        big = loadgen.run(zmq_client, "single", server.host, server.port, 60, trials=2, timeout=5, size=65536)
    finally:
        server.stop()
    assert single["trials"] == 3 and single["errors"] == {}
    assert burst["opened"] == 50 and burst["echoed"] == 50
    assert big["trials"] == 2 and big["errors"] == {}  # 65,536 bytes: a long ZMTP frame


def test_zmq_round_trips_and_the_ramps_hold_mode(zmq_client: str) -> None:
    server = Server.start(BY_NAME["zmq"])
    holder = None
    try:
        starts: list[float] = []
        rr = loadgen.round_trips(
            zmq_client, server.host, server.port, 30, lambda: starts.append(1.0), conns=8, duration=0.3, warmup=0.05
        )
        holder = loadgen.Holder(zmq_client, server.host, server.port, [], timeout=5)
        holder.send("open 20")
        opened = holder.result()
        holder.send("echo")
        echoed = holder.result()
        holder.send("what")
        unknown = holder.result()
    finally:
        if holder is not None:
            holder.close()
        server.stop()
    assert starts == [1.0] and rr["errors"] == {} and rr["live"] == 8 and rr["round_trips"] > 50
    assert 0 < rr["p50_ns"] <= rr["p99_ns"] <= rr["max_ns"]
    assert opened["new"] == 20 and opened["live"] == 20
    assert echoed["ok"] == 20 and echoed["errors"] == {}
    assert unknown["cmd"] == "?"


def test_zmtp_client_speaks_to_a_plain_rep_socket() -> None:
    """Not only to our server: a REP socket of pyzmq's, which enforces REQ/REP."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    rep = context.socket(zmq.REP)
    port = rep.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if rep.poll(50):
                rep.send(rep.recv())

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        out = loadgen.run("zmtp", "single", "127.0.0.1", port, 60, trials=5, timeout=5)
    finally:
        stop.set()
        thread.join()
        rep.close(linger=0)
        context.term()
    assert out["trials"] == 5 and out["errors"] == {}


def babbling(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n" + b" " * 100)


@pytest.mark.parametrize("faulty", [babbling], indirect=True)
def test_zmtp_client_does_not_count_a_server_that_is_not_zeromq(faulty: Faulty) -> None:
    out = loadgen.run("zmtp", "single", "127.0.0.1", faulty.port, 60, trials=2, timeout=2)
    assert out["trials"] == 0
    assert out["errors"] == {"other": 2}  # a bad greeting: neither connected nor a mismatch


def test_zmq_client_says_refused_when_nothing_listens(zmq_client: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        out = loadgen.run(zmq_client, "single", "127.0.0.1", probe.getsockname()[1], 60, trials=2, timeout=1)
    assert out["trials"] == 0
    assert set(out["errors"]) <= {"refused", "timeout"}


def test_zmq_client_against_the_broker_and_its_workers(zmq_client: str) -> None:
    server = Server.start(BY_NAME["broker"])
    try:
        single = loadgen.run(zmq_client, "single", server.host, server.port, 60, trials=3, timeout=10)
        memory = server.memory()
    finally:
        server.stop()
    assert single["trials"] == 3 and single["errors"] == {}
    assert memory is not None and memory.processes == 3  # the broker and its two workers, one tree
