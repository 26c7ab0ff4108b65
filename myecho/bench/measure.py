"""Figures for myecho-bench: the broker with N workers next to the zmq model,
the pipeline's jobs per second, and what a worker crash costs.

Each function starts real processes (``python -m myecho.cli ...``) on free
loopback ports, measures, stops them and returns a JSON-ready dict. The
clients are processes too (``python -m myecho.bench.measure client``):
closed loop, one request in flight each, as a REQ client, but on a DEALER
socket, so that a duplicate or stray reply is seen and counted where REQ
would silently drop it. ``python -m myecho.bench.measure report``
prints every figure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import zmq

from myecho import __version__
from myecho.argparser import Parser
from myecho.bench.harness import ServerError, ServerProcess, free_port

PYTHON = [sys.executable, "-m", "myecho.cli"]
START_DELAY = 1.5  # clients start together, once every interpreter is up


def client(
    url: str, seconds: float, size: int = 16, timeout: float = 5.0, start_at: float = 0.0, mark: float = 0.0
) -> dict[str, Any]:
    """Closed-loop requests for ``seconds``; every reply checked and counted.

    ``mark`` (a ``time.time()``): report the latency of the request that was
    in flight at that instant (``at_mark_ms``), when something was done to
    the server (a worker killed)."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    if start_at:
        time.sleep(max(0.0, start_at - time.time()))
    tag = b"%d/" % os.getpid()
    answered: set[bytes] = set()
    latencies: list[float] = []
    slowest: list[tuple[float, float]] = []  # (latency, when it was sent)
    lost = duplicates = strays = 0
    at_mark = None
    begin = time.monotonic()
    seq = 0
    while (sent := time.monotonic()) - begin < seconds:
        body = (tag + b"%d/" % seq).ljust(size, b".")
        sock.send_multipart([b"", body])
        while True:
            if not sock.poll(int(timeout * 1000)):
                lost += 1
                break
            frames = sock.recv_multipart()
            if frames == [b"", body]:
                latency = time.monotonic() - sent
                if mark and at_mark is None and time.time() - latency <= mark <= time.time():
                    at_mark = latency
                latencies.append(latency)
                slowest = sorted([*slowest, (latency, sent - begin)], reverse=True)[:10]
                answered.add(body)
                break
            if len(frames) == 2 and frames[1] in answered:
                duplicates += 1
            else:
                strays += 1
        seq += 1
    elapsed = time.monotonic() - begin
    while sock.poll(300):  # anything else that comes now is one too many
        frames = sock.recv_multipart()
        duplicates += len(frames) == 2 and frames[1] in answered
        strays += not (len(frames) == 2 and frames[1] in answered)
    context.destroy(linger=0)
    latencies.sort()
    return {
        "sent": seq,
        "answered": len(latencies),
        "lost": lost,
        "duplicates": duplicates,
        "strays": strays,
        "seconds": round(elapsed, 3),
        "p50_ms": _ms(latencies, 0.5),
        "p99_ms": _ms(latencies, 0.99),
        "max_ms": _ms(latencies, 1.0),
        "at_mark_ms": None if at_mark is None else round(at_mark * 1000, 2),
        "slowest": [[round(at, 3), round(latency * 1000, 2)] for latency, at in slowest],
    }


def _ms(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return round(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] * 1000, 3)


class Service(ServerProcess):
    """A ``myecho`` process that says READY and STATUS over NOTIFY_SOCKET."""

    def __init__(self, *args: str, prefix: Sequence[str] = ()) -> None:
        super().__init__([*prefix, *PYTHON, *args, "--log-level", "warning"])

    def wait(self, needle: str, timeout: float = 15.0) -> str:
        """READY=1, or the first STATUS= line from now on containing ``needle``."""
        assert self.notify is not None
        try:
            if needle == "READY=1":
                self.notify.wait_for("READY", "1", timeout, self.proc)
                return needle
            return self.notify.wait_status(needle, timeout, self.proc)
        except ServerError as error:
            raise RuntimeError(f"{self.proc.args!r}: {error}") from None

    def stop(self, grace: float = 15.0) -> int | None:
        code = super().stop(grace)
        self.close()
        return code


def start_clients(
    url: str, clients: int, seconds: float, size: int = 16, mark: float | None = None
) -> tuple[list[subprocess.Popen[bytes]], float]:
    """Client processes that start together; return them and the start time.

    ``mark``: seconds after the start at which the caller will act."""
    start_at = time.time() + START_DELAY
    argv = [sys.executable, "-m", "myecho.bench.measure", "client", url, "--seconds", str(seconds)]
    argv += ["--size", str(size), "--start-at", repr(start_at)]
    if mark is not None:
        argv += ["--mark", repr(start_at + mark)]
    return [subprocess.Popen(argv, stdout=subprocess.PIPE) for _ in range(clients)], start_at


def gather(procs: list[subprocess.Popen[bytes]], seconds: float) -> dict[str, Any]:
    """Wait for the clients and sum up what they saw."""
    reports = [json.loads(proc.communicate(timeout=seconds + 60)[0]) for proc in procs]
    total = sum(r["answered"] for r in reports)
    elapsed = max(r["seconds"] for r in reports)
    return {
        "requests_per_second": round(total / elapsed) if elapsed else None,
        "answered": total,
        "sent": sum(r["sent"] for r in reports),
        "lost": sum(r["lost"] for r in reports),
        "duplicates": sum(r["duplicates"] for r in reports),
        "strays": sum(r["strays"] for r in reports),
        "p50_ms": statistics.median(r["p50_ms"] for r in reports if r["p50_ms"] is not None),
        "p99_ms": max(r["p99_ms"] or 0 for r in reports),
        "max_ms": max(r["max_ms"] or 0 for r in reports),
        "clients": reports,
    }


class Pool:
    """A broker and its workers on free loopback ports."""

    def __init__(self, workers: int, heartbeat: float = 1.0, liveness: int = 3) -> None:
        front, back = free_port(), free_port()
        self.url, self.backend = f"tcp://127.0.0.1:{front}", f"tcp://127.0.0.1:{back}"
        self.beats = ["--heartbeat", str(heartbeat), "--liveness", str(liveness)]
        self.broker = Service("serve", "broker", "--frontend", self.url, "--backend", self.backend, *self.beats)
        self.workers: list[Service] = []
        try:
            self.broker.wait("READY=1")
            for _ in range(workers):
                self.add_worker()
            self.wait_for(workers)
        except BaseException:
            self.stop()
            raise

    def add_worker(self) -> Service:
        worker = Service("serve", "worker", "--connect", self.backend, *self.beats)
        self.workers.append(worker)
        return worker

    def wait_for(self, workers: int) -> None:
        self.broker.wait(f"; {workers} worker{'' if workers == 1 else 's'} (")

    def stop(self) -> None:
        for service in [*self.workers, self.broker]:
            service.stop()


def broker_throughput(workers: int, clients: int = 4, seconds: float = 2.0) -> dict[str, Any]:
    """Requests per second through ``myecho serve broker`` with ``workers`` workers."""
    pool = Pool(workers)
    try:
        procs, _ = start_clients(pool.url, clients, seconds)
        result = gather(procs, seconds)
    finally:
        pool.stop()
    return {"model": "broker", "workers": workers, "clients": clients, **result}


def zmq_throughput(clients: int = 4, seconds: float = 2.0) -> dict[str, Any]:
    """The same clients against the plain zmq model, for comparison."""
    port = free_port()
    server = Service("serve", "zmq", "--port", str(port))
    try:
        server.wait("READY=1")
        procs, _ = start_clients(f"tcp://127.0.0.1:{port}", clients, seconds)
        result = gather(procs, seconds)
    finally:
        server.stop()
    return {"model": "zmq", "workers": None, "clients": clients, **result}


def crash_cost(
    mode: str = "kill", workers: int = 2, clients: int = 4, seconds: float = 3.0, heartbeat: float = 1.0
) -> dict[str, Any]:
    """Latency added to the requests a worker held when it crashed (``kill``:
    SIGKILL, its connection closes) or hung (``hang``: SIGSTOP)."""
    pool = Pool(workers, heartbeat)
    try:
        procs, start_at = start_clients(pool.url, clients, seconds, mark=seconds / 2)
        time.sleep(max(0.0, start_at + seconds / 2 - time.time()))
        victim = pool.workers[0]
        victim.signal(signal.SIGKILL if mode == "kill" else signal.SIGSTOP)
        result = gather(procs, seconds)
    finally:
        pool.stop()
    in_flight = sorted((r["at_mark_ms"] for r in result.pop("clients") if r["at_mark_ms"] is not None), reverse=True)
    return {
        "mode": mode,
        "heartbeat_s": heartbeat,
        "in_flight_ms": in_flight,  # the slowest was held by the victim
        "added_ms": round(in_flight[0] - result["p50_ms"], 1) if in_flight else None,
        **result,
    }


def pipeline_rate(workers: int = 2, jobs: int = 20000, transport: str = "ipc") -> dict[str, Any]:
    """Jobs per second through ventilator, ``workers`` worker processes and sink."""
    if transport == "ipc":
        base = tempfile.mkdtemp(prefix="myecho-pipeline-")
        jobs_url, results, control = (f"ipc://{base}/{name}" for name in ("jobs", "results", "control"))
    else:
        jobs_url, results, control = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
    sink = subprocess.Popen(
        [*PYTHON, "pipeline", "sink", "--results", results, "--control", control], stdout=subprocess.DEVNULL
    )
    crew = [
        subprocess.Popen(
            [*PYTHON, "pipeline", "worker", "--jobs", jobs_url, "--results", results], stdout=subprocess.DEVNULL
        )
        for _ in range(workers)
    ]
    try:
        argv = [*PYTHON, "pipeline", "ventilator", "--jobs", jobs_url, "--control", control]
        argv += ["--count", str(jobs), "--workers", str(workers)]
        out = subprocess.run(argv, capture_output=True, timeout=120).stdout
        verdict = json.loads(out)["sink"]
    finally:
        for proc in [*crew, sink]:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            proc.wait(15)
    verdict["per_worker"] = verdict.pop("workers")
    return {"workers": workers, "transport": transport, **verdict}


def report(seconds: float = 2.0, clients: int = 4) -> dict[str, Any]:
    """Every figure at once: the broker beside the zmq model, a worker crash, the pipeline."""
    return {
        "throughput": [zmq_throughput(clients, seconds)] + [broker_throughput(n, clients, seconds) for n in (1, 2, 4)],
        "crash": [crash_cost("kill"), crash_cost("hang")],
        "pipeline": [pipeline_rate(n) for n in (1, 2, 4)],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(prog="python -m myecho.bench.measure", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    one = commands.add_parser("client", help="one closed-loop client; prints its JSON report")
    one.add_argument("url")
    one.add_argument("--seconds", type=float, default=2.0)
    one.add_argument("--size", type=int, default=16)
    one.add_argument("--timeout", type=float, default=5.0)
    one.add_argument("--start-at", type=float, default=0.0, help="time.time() at which to begin")
    one.add_argument("--mark", type=float, default=0.0, help="time.time() of an event: report what was in flight")
    every = commands.add_parser("report", help="every figure, as a table and in JSON")
    every.add_argument("--seconds", type=float, default=2.0)
    every.add_argument("--clients", type=int, default=4)
    every.add_argument("--json", metavar="FILE")
    options = parser.parse_args(argv)
    if options.command == "client":
        result = client(options.url, options.seconds, options.size, options.timeout, options.start_at, options.mark)
        print(json.dumps(result), flush=True)
        return 0
    figures = report(options.seconds, options.clients)
    for row in figures["throughput"]:
        name = "zmq model" if row["model"] == "zmq" else f"broker, {row['workers']} worker(s)"
        rate, p50, p99 = row["requests_per_second"], row["p50_ms"], row["p99_ms"]
        print(f"{name:22} {rate:>7} req/s  p50 {p50:.3f} ms  p99 {p99:.3f} ms")
    for row in figures["crash"]:
        print(
            f"worker {row['mode']:5} (heartbeat {row['heartbeat_s']} s): the request it held +{row['added_ms']} ms; "
            f"in flight {row['in_flight_ms']} ms; lost {row['lost']}, duplicates {row['duplicates']}"
        )
    for row in figures["pipeline"]:
        print(
            f"pipeline, {row['workers']} worker(s), {row['transport']}: {row['jobs_per_second']} jobs/s, "
            f"exactly once: {row['exactly_once']}"
        )
    if options.json:
        with open(options.json, "w") as out:
            json.dump(figures, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
