"""The ramp's steps and stopping rules, as rules and over real loopback."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from myecho.bench.scenarios import (
    GIB,
    STOP_REASONS,
    ModelResult,
    Observation,
    Runner,
    Settings,
    classify_failure,
    guard,
    ramp_targets,
)
from myecho.bench.servers import BY_NAME, Server


def test_targets_reach_the_limit_and_go_past_20000_in_steps() -> None:
    assert ramp_targets(20000) == [100, 200, 500, 1000, 2000, 5000, 10000, 15000, 20000]
    assert ramp_targets(30000)[-3:] == [20000, 25000, 30000]
    assert ramp_targets(1000) == [100, 200, 500, 1000]
    assert ramp_targets(150) == [100, 150]
    assert ramp_targets(50) == [50]


def test_the_most_frequent_error_names_the_reason() -> None:
    reason, detail = classify_failure({"refused": 35, "reset": 15, "eof": 1}, None, True)
    assert reason == "refused"
    assert "35 refused" in detail
    assert classify_failure({"eof": 3, "timeout": 2}, None, True)[0] == "reset"
    assert classify_failure({"no_address": 5}, None, True)[0] == "client limit"
    assert classify_failure({"fd_limit": 5}, None, True)[0] == "fd limit"


def test_a_server_at_its_fd_limit_is_an_fd_limit_not_a_timeout() -> None:
    reason, detail = classify_failure({"timeout": 10}, (19995, 20000), True)
    assert reason == "fd limit"
    assert "19995" in detail
    assert classify_failure({"timeout": 10}, (9000, 20000), True)[0] == "timeout"


def test_a_dead_server_and_silent_failures() -> None:
    assert classify_failure({"reset": 100}, None, False)[0] == "server exited"
    assert classify_failure({}, None, True)[0] == "other"


def observation(**changes: object) -> Observation:
    values: dict[str, object] = {
        "connections": 1000,
        "mem_available": 20 * GIB,
        "mem_drop_per_connection": 10 * 1024.0,
        "server_processes_per_connection": 0.0,
        "system_processes": 300,
    }
    values.update(changes)
    return Observation(**values)  # type: ignore[arg-type]


def test_guard_lets_a_cheap_step_through() -> None:
    assert guard(observation(), 2000, 2 * GIB, 32768, 10.0, 240.0) is None


def test_memory_guard_predicts_from_the_last_step() -> None:
    # 8 MiB per connection (a Python process each): 4,000 more need ~39 GiB.
    why = guard(observation(mem_drop_per_connection=8 * 1024**2), 5000, 2 * GIB, 32768, 10.0, 240.0)
    assert why is not None and why[0] == "memory guard"
    assert "GiB" in why[1]


def test_memory_guard_stops_when_memory_is_already_short() -> None:
    why = guard(observation(mem_available=1 * GIB, mem_drop_per_connection=None), 2000, 2 * GIB, 32768, 1.0, 240.0)
    assert why is not None and why[0] == "memory guard"


def test_process_guard_for_a_process_per_connection() -> None:
    why = guard(
        observation(
            connections=10000,
            server_processes_per_connection=1.0,
            system_processes=22000,
            mem_drop_per_connection=1024.0,
        ),
        20000,
        2 * GIB,
        32768,
        10.0,
        240.0,
    )
    assert why is not None and why[0] == "process guard"
    # The same step for a one-process server is fine.
    assert (
        guard(
            observation(connections=10000, system_processes=400, mem_drop_per_connection=1024.0),
            20000,
            2 * GIB,
            32768,
            10.0,
            240.0,
        )
        is None
    )


def test_time_budget() -> None:
    why = guard(observation(), 2000, 2 * GIB, 32768, 300.0, 240.0)
    assert why is not None and why[0] == "time budget"


def test_every_reason_is_in_the_schema() -> None:
    import json
    from pathlib import Path

    schema = json.loads((Path(__file__).parent.parent / "benchmarks" / "results.schema.json").read_text())
    assert list(STOP_REASONS) == schema["$defs"]["ramp"]["properties"]["stop_reason"]["enum"]


# ---- over real loopback ---------------------------------------------------


class CappedEcho:
    """An echo server that serves only its first ``cap`` connections; the
    others are accepted and never answered (a server out of workers)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self.stopping = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        import selectors

        selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ)
        served = 0
        while not self.stopping:
            for key, _ in selector.select(0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.listener:
                    conn, _ = sock.accept()
                    self.held.append(conn)
                    if served < self.cap:
                        served += 1
                        selector.register(conn, selectors.EVENT_READ)
                    continue
                data = sock.recv(65536)
                if data:
                    sock.sendall(data)
                else:
                    selector.unregister(sock)
        selector.close()

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        for conn in self.held:
            conn.close()
        self.listener.close()


@pytest.fixture
def capped() -> Iterator[CappedEcho]:
    server = CappedEcho(cap=150)
    yield server
    server.close()


def ramp(port: int, limit: int) -> ModelResult:
    settings = Settings.quick()
    settings.ramp_limit = limit
    settings.timeout = 1.0
    settings.per_holder = {"tcp": 120, "zmq": 120}  # several holder processes, even for a small ramp
    runner = Runner(settings, lambda message: None)
    model = BY_NAME["epoll"]
    server = Server(model, "127.0.0.1", port)  # not ours to measure: no process root
    result = ModelResult(model.name, model.label, model.description, model.protocol, model.reference)
    runner.ramp(model, result, server)
    return result


def test_ramp_stops_by_itself_on_timeouts_and_says_where(capped: CappedEcho) -> None:
    result = ramp(capped.port, 1000)
    assert result.ramp is not None
    assert not result.ramp.completed
    assert result.ramp.stop_reason == "timeout"
    assert result.ramp.maximum == 150  # what the server could hold, exactly
    assert [step.target for step in result.ramp.steps] == [100, 200]
    assert result.ramp.steps[-1].errors == {"timeout": 50}


def test_ramp_says_refused_when_nothing_listens() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connections are refused
        result = ramp(port, 1000)
    assert result.ramp is not None
    assert result.ramp.stop_reason == "refused"
    assert result.ramp.maximum == 0


def test_ramp_completes_against_a_server_that_holds_all() -> None:
    server = CappedEcho(cap=10**6)
    try:
        result = ramp(server.port, 300)
    finally:
        server.close()
    assert result.ramp is not None
    assert result.ramp.completed and result.ramp.stop_reason == "completed"
    assert result.ramp.maximum == 300
    assert [step.ok for step in result.ramp.steps] == [100, 200, 300]
