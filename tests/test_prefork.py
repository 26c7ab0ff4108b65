"""--workers N: N event-loop processes on one listening socket, under a supervisor."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
from support import ServeFactory, Server, children_of, refused, roundtrip, wait_status, wait_until

pytestmark = pytest.mark.parametrize("model", ["select", "asyncio"])
EACH = re.compile(r"pid (\d+): (\d+) open")


def workers_of(server: Server, count: int = 2) -> list[int]:
    """The supervisor's children once there are ``count`` of them."""
    return sorted(
        wait_until(
            lambda: (pids := children_of(server.proc.pid)) and len(pids) == count and pids, what=f"{count} workers"
        )
    )


def open_by_worker(server: Server, total: int) -> dict[int, int]:
    """Open connections per worker pid, from the first STATUS that counts ``total`` open."""
    status = wait_status(server, f"{total} open,")
    return {int(pid): int(count) for pid, count in EACH.findall(status)}


def test_connections_spread_over_the_workers_and_status_sums(serve: ServeFactory, model: str) -> None:
    server = serve(model, "--workers", "2")
    workers = workers_of(server)
    clients: list[socket.socket] = []
    try:
        by_worker: dict[int, int] = {}
        while len(clients) < 200 and sum(1 for n in by_worker.values() if n) < 2:
            for _ in range(10):
                sock = server.connect()
                assert roundtrip(sock, b"12345") == b"12345"
                clients.append(sock)
            by_worker = open_by_worker(server, len(clients))
        assert sorted(by_worker) == workers
        assert all(by_worker.values()), f"every connection went to one worker: {by_worker}"
        total = len(clients)
        status = wait_status(server, f"{total} open,")
        assert status.startswith(f"{total} open, {total} served, {total} messages, {5 * total} bytes echoed; 2 workers")
    finally:
        for sock in clients:
            sock.close()


def test_a_killed_worker_is_replaced_and_serving_goes_on(serve: ServeFactory, model: str) -> None:
    server = serve(model, "--workers", "2")
    first, second = workers_of(server)
    os.kill(first, signal.SIGKILL)
    wait_until(
        lambda: first not in children_of(server.proc.pid) and len(children_of(server.proc.pid)) == 2,
        what="a new worker in place of the killed one",
    )
    assert second in children_of(server.proc.pid)
    assert "exited; starting another" in wait_until(lambda: "exited" in server.stderr and server.stderr)
    for number in range(20):
        with server.connect() as sock:
            assert roundtrip(sock, b"%d" % number) == b"%d" % number
    assert server.proc.poll() is None


def test_sigterm_stops_every_worker_gracefully(serve: ServeFactory, model: str) -> None:
    server = serve(model, "--workers", "2", "--graceful-timeout", "10")
    workers = workers_of(server)
    sock = server.connect()
    assert roundtrip(sock, b"before") == b"before"
    server.signal(signal.SIGTERM)
    wait_until(lambda: refused(server.port), what="new connections refused after SIGTERM")
    assert server.proc.poll() is None, "the supervisor left while a connection was open"
    assert roundtrip(sock, b"during the grace period") == b"during the grace period"
    sock.close()
    assert server.proc.wait(10) == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived the supervisor"
    assert server.notify is not None
    assert server.notify.wait_for("STOPPING", "1")["STATUS"].startswith("stopping:")


def test_sighup_reaches_every_worker(serve: ServeFactory, model: str, tmp_path: Path) -> None:
    config = tmp_path / "myecho"
    config.write_text("MYECHO_BUFFER_LIMIT=65536\n")
    server = serve(model, "--workers", "2", "--config", str(config))
    workers = workers_of(server)
    config.write_text("MYECHO_BUFFER_LIMIT=4096\n")
    server.signal(signal.SIGHUP)

    def reloaded() -> set[int]:
        return {int(pid) for pid in re.findall(r"/(\d+)\]: reloaded \(buffer_limit\)", server.stderr)}

    wait_until(lambda: reloaded() >= {server.proc.pid, *workers}, what="every process reloaded")
    assert server.notify is not None
    server.notify.wait_for("RELOADING", "1")
    with server.connect() as sock:
        assert roundtrip(sock, b"after") == b"after"


def test_workers_die_with_the_supervisor(serve: ServeFactory, model: str) -> None:
    server = serve(model, "--workers", "2")
    workers = workers_of(server)
    server.proc.kill()
    server.proc.wait()
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), what="workers gone")


def test_a_hung_worker_is_killed_and_replaced(serve: ServeFactory, model: str) -> None:
    server = serve(model, "--workers", "2")
    first, _ = workers_of(server)
    os.kill(first, signal.SIGSTOP)
    started = time.monotonic()
    wait_until(
        lambda: first not in children_of(server.proc.pid) and len(children_of(server.proc.pid)) == 2,
        timeout=15,
        what="the hung worker replaced",
    )
    assert time.monotonic() - started > 4  # not before it had been silent for a while
    assert "silent" in server.stderr


def test_zero_workers_is_one_per_core(serve: ServeFactory, model: str) -> None:
    server = serve(model, "--workers", "0")
    cores = len(os.sched_getaffinity(0))
    assert len(workers_of(server, cores)) == cores
    assert server.notify is not None
    assert server.notify.wait_for("READY", "1")["STATUS"].endswith(f", {cores} workers")


def test_only_the_supervisor_talks_to_systemd(serve: ServeFactory, model: str) -> None:
    server = serve(model, "--workers", "2", env={"WATCHDOG_USEC": "400000"})
    assert server.notify is not None
    ready = server.notify.wait_for("READY", "1")
    assert ready["MAINPID"] == str(server.proc.pid)
    pings = 0
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        message = server.notify.receive(0.5)
        pings += bool(message and message.get("WATCHDOG") == "1")
    assert pings >= 3
    assert sum(1 for message in server.notify.messages if "READY" in message) == 1, server.notify.messages
