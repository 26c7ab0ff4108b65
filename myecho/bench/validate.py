"""Is the load generator the bottleneck? Compare it with an independent client.

``myecho-bench --check-loadgen`` starts myecho-c and alternates runs of
myecho-load (closed loop) with runs of ``redis-benchmark`` (Debian's
redis-tools: a single-threaded C client on its own event loop, written by
other people) with the same number of connections (1, then 32) and a 64-byte
message. redis-benchmark speaks RESP, but an echo of a RESP request
(``*2 $4 ECHO $43 ...``) is itself a valid RESP reply (an array of two
strings), so it measures any echo server. Then the same for ZeroMQ: against
zmq-echo (the C libzmq limit, else the zmq model), myecho-load speaking ZMTP
against libzmq's own REQ sockets driven by pyzmq (``zmqload``). Alternating
the runs spreads the noise of a shared machine evenly over both. Each
client's own CPU time per round trip is shown too: on a small machine the
client shares the cores with the server, and a client that costs less
leaves the server more.
"""

from __future__ import annotations

import csv
import io
import resource
import shutil
import subprocess
from collections.abc import Callable

from myecho.bench import loadgen
from myecho.bench.servers import BY_NAME, Server, unavailable
from myecho.bench.stats import median

CLIENTS = (1, 32)
ROUNDS = 5
DURATION = 4.0
#: 4 + 10 + 5 + 43 + 2 = 64 bytes on the wire, as myecho-load sends.
RESP_ARGUMENT = "x" * 43


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def redis_benchmark(tool: str, port: int, clients: int, requests: int) -> tuple[float, float]:
    """(requests per second, client CPU seconds per request) of one redis-benchmark run."""
    before = children_cpu()
    done = subprocess.run(
        [tool, "-h", "127.0.0.1", "-p", str(port), "-c", str(clients), "-n", str(requests), "--csv",
         "ECHO", RESP_ARGUMENT],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    cpu = children_cpu() - before
    rows = list(csv.reader(io.StringIO(done.stdout)))
    for row in rows[1:]:
        if len(row) > 1:
            return float(row[1]), cpu / requests
    raise RuntimeError(f"redis-benchmark printed no result: {done.stderr.strip() or done.stdout.strip()}")


#: (round trips per second, client CPU seconds per round trip) of one run
Run = Callable[[int], tuple[float, float]]


def closed_loop(protocol: str, server: Server, duration: float) -> Run:
    """Runs of a load generator: myecho-load ("tcp", "zmtp") or pyzmq REQ sockets ("pyzmq")."""

    def run(clients: int) -> tuple[float, float]:
        out = loadgen.run(
            protocol, "rr", server.host, server.port, 60, conns=clients, duration=duration, warmup=0.3, size=64
        )
        return out["round_trips"] / (out["elapsed_ns"] / 1e9), out["cpu_s"] / max(1, out["round_trips"])

    return run


def compare(progress: Callable[[str], None], rounds: int, ours: Run, theirs: tuple[str, Run]) -> int:
    """Alternate the two clients; print both; 1 if ours is more than 10 % slower."""
    status = 0
    name, their_run = theirs
    for clients in CLIENTS:
        rates: tuple[list[float], list[float]] = ([], [])
        cpus: tuple[list[float], list[float]] = ([], [])
        for round_ in range(1, rounds + 1):
            for index, (label, run) in enumerate((("myecho-load", ours), (name, their_run))):
                progress(f"check-loadgen: {clients} clients, round {round_}/{rounds}: {label}")
                rate, cpu = run(clients)
                rates[index].append(rate)
                cpus[index].append(cpu)
        print(f"  {clients} client{'s' if clients > 1 else ''}:")
        width = max(len("myecho-load"), len(name))
        for label, client_rates, client_cpus in (("myecho-load", rates[0], cpus[0]), (name, rates[1], cpus[1])):
            runs = ", ".join(f"{r:.0f}" for r in client_rates)
            print(
                f"    {label:{width}}  {median(client_rates):8.0f} round trips/s, "
                f"{median(client_cpus) * 1e6:5.1f} µs CPU each (runs: {runs})"
            )
        ratio = median(rates[0]) / median(rates[1])
        if ratio >= 1.1:
            verdict = "faster than the independent client: not the bottleneck"
        elif ratio >= 0.9:
            verdict = "within 10 % of the independent client"
        else:
            verdict = "MORE than 10 % slower than the independent client"
            status = 1
        print(f"    ratio {ratio:.2f}: myecho-load is {verdict}")
    return status


def check_loadgen(progress: Callable[[str], None], rounds: int = ROUNDS, duration: float = DURATION) -> int:
    """Print both clients' figures, TCP then ZeroMQ; exit status 0 when
    myecho-load is within 10 % of the independent client, or faster."""
    tool = shutil.which("redis-benchmark")
    if tool is None:
        print("myecho-bench: redis-benchmark is missing (apt-get install redis-tools)")
        return 2
    status = 0
    server = Server.start(BY_NAME["c"])
    print(f"against myecho-c, 64-byte messages, {rounds} alternating rounds of ~{duration:g} s per client count:")
    try:
        ours = closed_loop("tcp", server, duration)
        last_rate: dict[int, float] = {}

        def ours_noting_rate(clients: int) -> tuple[float, float]:
            rate, cpu = ours(clients)
            last_rate[clients] = rate
            return rate, cpu

        def redis(clients: int) -> tuple[float, float]:
            # as many requests as myecho-load's run just before fills in ``duration``
            return redis_benchmark(tool, server.port, clients, max(1000, int(last_rate[clients] * duration)))

        status |= compare(progress, rounds, ours_noting_rate, ("redis-benchmark", redis))
    finally:
        server.stop()
    zmq_model = BY_NAME["zmq-c"] if unavailable(BY_NAME["zmq-c"]) is None else BY_NAME["zmq"]
    server = Server.start(zmq_model)
    print(f"against {zmq_model.label}, ZeroMQ REQ clients, 64-byte messages, the same rounds:")
    try:
        theirs = closed_loop("pyzmq", server, duration)
        status |= compare(progress, rounds, closed_loop("zmtp", server, duration), ("pyzmq REQ", theirs))
    finally:
        server.stop()
    return status
