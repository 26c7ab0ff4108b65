"""The ZeroMQ load generator: REQ clients, the talk's client, in pyzmq.

``python -m myecho.bench.zmqload MODE [options] HOST PORT`` takes the same
modes, options and JSON lines as the C ``myecho-load`` (single, burst, rr,
hold), so the scenarios drive both alike. A REQ socket connects in the
background; "connected" here means libzmq reported the ZMTP handshake done
(``EVENT_HANDSHAKE_SUCCEEDED`` on a socket monitor), which is when a
request can really flow. libzmq reconnects silently, so a refused connect
is read from the monitor too (``EVENT_CONNECT_RETRIED`` before any
handshake). Every reply is checked byte for byte.
"""

from __future__ import annotations

import argparse
import errno
import json
import resource
import sys
import time
from collections import Counter
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from myecho.core.sockets import raise_fd_limit

HANDSHAKE = getattr(zmq, "EVENT_HANDSHAKE_SUCCEEDED", zmq.EVENT_CONNECTED)
FAILED = zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CLOSED | zmq.EVENT_DISCONNECTED
NS = 1_000_000_000


def pattern(ident: int, round_: int, size: int) -> bytes:
    """The same bytes as myecho-load's pattern(): every message differs."""
    body = bytes(ord("a") + (ident * 7 + round_ * 3 + k) % 26 for k in range(size - 1))
    return body + b"\n"


class Client:
    """One REQ socket and what it waits for."""

    __slots__ = ("expect", "ident", "monitor", "round", "sock", "t0")

    def __init__(self, sock: zmq.Socket[bytes], ident: int) -> None:
        self.sock = sock
        self.ident = ident
        self.round = 0
        self.expect = b""
        self.t0 = 0
        self.monitor: zmq.Socket[bytes] | None = None


class Load:
    def __init__(self, host: str, port: int, size: int, timeout: float, sources: list[str]) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.ctx.set(zmq.MAX_SOCKETS, 60000)
        self.host, self.port, self.size, self.timeout = host, port, size, timeout
        self.sources = sources
        self.clients: list[Client] = []
        self.errors: Counter[str] = Counter()
        self.next_id = 0

    def url(self, number: int) -> str:
        target = f"{self.host}:{self.port}"
        if self.sources:
            return f"tcp://{self.sources[number % len(self.sources)]}:0;{target}"
        return f"tcp://{target}"

    def new_socket(self) -> Client:
        sock = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        client = Client(sock, self.next_id)
        self.next_id += 1
        client.monitor = sock.get_monitor_socket(HANDSHAKE | FAILED)
        return client

    def drop(self, client: Client, why: str) -> None:
        self.errors[why] += 1
        self.close_monitor(client)
        client.sock.close(linger=0)
        if client in self.clients:
            self.clients.remove(client)

    @staticmethod
    def close_monitor(client: Client) -> None:
        if client.monitor is not None:
            client.sock.disable_monitor()
            client.monitor.close(linger=0)
            client.monitor = None

    def open_many(self, count: int) -> tuple[int, int]:
        """Connect ``count`` more REQ sockets; (how many shook hands, ns)."""
        t0 = time.perf_counter_ns()
        deadline = t0 + int(self.timeout * NS)
        pending: dict[zmq.Socket[bytes], Client] = {}
        for _ in range(count):
            try:
                client = self.new_socket()
            except zmq.ZMQError as error:
                self.errors["fd_limit" if error.errno in (errno.EMFILE, errno.ENFILE) else "other"] += 1
                continue
            client.sock.connect(self.url(client.ident))
            assert client.monitor is not None
            pending[client.monitor] = client
        poller = zmq.Poller()
        for monitor in pending:
            poller.register(monitor, zmq.POLLIN)
        ok = 0
        while pending and (left := deadline - time.perf_counter_ns()) > 0:
            for monitor, _ in poller.poll(left // 1_000_000 + 1):
                client = pending[monitor]
                event = recv_monitor_message(monitor)["event"]
                if event == HANDSHAKE:
                    ok += 1
                elif event & FAILED:
                    self.errors["reset" if event == zmq.EVENT_DISCONNECTED else "refused"] += 1
                else:
                    continue
                poller.unregister(monitor)
                del pending[monitor]
                if event == HANDSHAKE:
                    self.close_monitor(client)
                    self.clients.append(client)
                else:
                    client.monitor = None
                    client.sock.disable_monitor()
                    monitor.close(linger=0)
                    client.sock.close(linger=0)
        for monitor, client in pending.items():
            self.errors["timeout"] += 1
            client.sock.disable_monitor()
            monitor.close(linger=0)
            client.sock.close(linger=0)
        return ok, time.perf_counter_ns() - t0

    def send(self, client: Client) -> None:
        client.round += 1
        client.expect = pattern(client.ident, client.round, self.size)
        client.t0 = time.perf_counter_ns()
        client.sock.send(client.expect)

    def receive(self, client: Client) -> bool:
        reply = client.sock.recv()
        if reply != client.expect:
            self.drop(client, "mismatch")
            return False
        return True

    def echo_all(self) -> tuple[int, int]:
        """One request on every socket; (correct replies, ns)."""
        t0 = time.perf_counter_ns()
        deadline = t0 + int(self.timeout * NS)
        poller = zmq.Poller()
        waiting = {}
        for client in self.clients:
            self.send(client)
            poller.register(client.sock, zmq.POLLIN)
            waiting[client.sock] = client
        ok = 0
        while waiting and (left := deadline - time.perf_counter_ns()) > 0:
            for sock, _ in poller.poll(left // 1_000_000 + 1):
                client = waiting.pop(sock)
                poller.unregister(sock)
                ok += self.receive(client)
        for client in list(waiting.values()):
            self.drop(client, "timeout")
        return ok, time.perf_counter_ns() - t0

    def close(self) -> None:
        for client in self.clients:
            client.sock.close(linger=0)
        self.clients.clear()


def emit(fields: dict[str, Any], errors: Counter[str]) -> None:
    print(json.dumps({**fields, "errors": dict(errors)}), flush=True)


def single(load: Load, trials: int, gap: float = 0.0) -> None:
    times: dict[str, list[int]] = {"connect": [], "exchange1": [], "exchange2": []}
    failed_in_a_row = 0
    for _ in range(trials):
        if failed_in_a_row >= 10:
            break
        before = sum(load.errors.values())
        ok, connect_ns = load.open_many(1)
        if not ok:
            failed_in_a_row += 1
            continue
        client = load.clients[0]
        exchanges = []
        for _round in (1, 2):
            load.send(client)
            if not client.sock.poll(int(load.timeout * 1000), zmq.POLLIN):
                load.drop(client, "timeout")
                break
            if not load.receive(client):
                break
            exchanges.append(time.perf_counter_ns() - client.t0)
        load.close()
        time.sleep(gap)
        if len(exchanges) == 2 and sum(load.errors.values()) == before:
            failed_in_a_row = 0
            times["connect"].append(connect_ns)
            times["exchange1"].append(exchanges[0])
            times["exchange2"].append(exchanges[1])
        else:
            failed_in_a_row += 1
    emit({"mode": "single", "trials": len(times["connect"]), **times}, load.errors)


def burst(load: Load, count: int) -> None:
    opened, open_ns = load.open_many(count)
    echoed, messages_ns = load.echo_all() if opened else (0, 0)
    emit(
        {
            "mode": "burst",
            "conns": count,
            "opened": opened,
            "open_ns": open_ns,
            "echoed": echoed,
            "messages_ns": messages_ns,
        },
        load.errors,
    )
    sys.stdin.readline()  # hold the connections until told
    load.close()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def round_trips(load: Load, count: int, duration: float, warmup: float) -> None:
    load.open_many(count)
    load.echo_all()  # as myecho-load: measure the steady state, not the start-up
    start = time.perf_counter_ns() + int(warmup * NS)
    stop = start + int(duration * NS)
    poller = zmq.Poller()
    by_socket = {}
    for client in load.clients:
        load.send(client)
        poller.register(client.sock, zmq.POLLIN)
        by_socket[client.sock] = client
    latencies: list[int] = []
    total = 0
    cpu0: float | None = None
    while by_socket and (left := stop - time.perf_counter_ns()) > 0:
        if cpu0 is None and time.perf_counter_ns() >= start:
            print(json.dumps({"event": "start"}), flush=True)
            cpu0 = cpu_seconds()
        events = poller.poll((left if cpu0 is not None else start - time.perf_counter_ns()) // 1_000_000 + 1)
        now = time.perf_counter_ns()
        for sock, _ in events:
            client = by_socket[sock]
            if not load.receive(client):
                poller.unregister(sock)
                del by_socket[sock]
                continue
            total += 1
            if client.t0 >= start and now <= stop:
                latencies.append(now - client.t0)
            load.send(client)
    latencies.sort()

    def pct(fraction: float) -> int:
        return latencies[round(fraction * (len(latencies) - 1))] if latencies else 0

    emit(
        {
            "mode": "rr",
            "conns": count,
            "live": len(by_socket),
            "round_trips": len(latencies),
            "total_round_trips": total,
            "elapsed_ns": max(0, min(time.perf_counter_ns(), stop) - start),
            "p50_ns": pct(0.5),
            "p90_ns": pct(0.9),
            "p99_ns": pct(0.99),
            "max_ns": latencies[-1] if latencies else 0,
            "cpu_s": cpu_seconds() - cpu0 if cpu0 is not None else 0.0,
        },
        load.errors,
    )
    load.close()


def hold(load: Load) -> None:
    for line in sys.stdin:
        load.errors.clear()
        words = line.split()
        if words[:1] == ["open"] and len(words) == 2:
            ok, ns = load.open_many(int(words[1]))
            emit({"cmd": "open", "new": ok, "live": len(load.clients), "ns": ns}, load.errors)
        elif words[:1] == ["echo"]:
            ok, ns = load.echo_all()
            emit({"cmd": "echo", "ok": ok, "live": len(load.clients), "ns": ns}, load.errors)
        elif words[:1] == ["quit"]:
            break
        else:
            emit({"cmd": "?"}, load.errors)
    load.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m myecho.bench.zmqload", description=__doc__)
    parser.add_argument("mode", choices=("single", "burst", "rr", "hold"))
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--trials", "--conns", dest="count", type=int, default=100)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--gap", type=float, default=0.0)
    parser.add_argument("--src", default="")
    options = parser.parse_args(argv)
    raise_fd_limit()
    load = Load(options.host, options.port, options.size, options.timeout, [s for s in options.src.split(",") if s])
    try:
        if options.mode == "single":
            single(load, options.count, options.gap)
        elif options.mode == "burst":
            burst(load, options.count)
        elif options.mode == "rr":
            round_trips(load, options.count, options.duration, options.warmup)
        else:
            hold(load)
    finally:
        load.close()
        load.ctx.term()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
