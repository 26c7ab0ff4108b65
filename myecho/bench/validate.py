"""Is the load generator the bottleneck? Compare it with an independent client.

``myecho-bench --check-loadgen`` starts myecho-c and alternates runs of
myecho-load (closed loop) with runs of ``redis-benchmark`` (Debian's
redis-tools: a single-threaded C client on its own event loop, written by
other people) with the same number of connections (1, then 32) and a 64-byte
message. redis-benchmark speaks RESP, but an echo of a RESP request
(``*2 $4 ECHO $43 ...``) is itself a valid RESP reply (an array of two
strings), so it measures any echo server. Alternating the runs spreads the
noise of a shared machine evenly over both. Each client's own CPU time per
round trip is shown too: on a small machine the client shares the cores
with the server, and a client that costs less leaves the server more.
"""

from __future__ import annotations

import csv
import io
import resource
import shutil
import subprocess
from collections.abc import Callable

from myecho.bench import loadgen
from myecho.bench.servers import BY_NAME, Server
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


def check_loadgen(progress: Callable[[str], None], rounds: int = ROUNDS, duration: float = DURATION) -> int:
    """Print both clients' figures; exit status 0 when myecho-load is within 10 % or faster."""
    tool = shutil.which("redis-benchmark")
    if tool is None:
        print("myecho-bench: redis-benchmark is missing (apt-get install redis-tools)")
        return 2
    server = Server.start(BY_NAME["c"])
    status = 0
    print(f"against myecho-c, 64-byte messages, {rounds} alternating rounds of ~{duration:g} s per client count:")
    try:
        for clients in CLIENTS:
            ours: list[float] = []
            ours_cpu: list[float] = []
            theirs: list[float] = []
            theirs_cpu: list[float] = []
            for round_ in range(1, rounds + 1):
                progress(f"check-loadgen: {clients} clients, round {round_}/{rounds}: myecho-load")
                out = loadgen.run(
                    "tcp", "rr", server.host, server.port, 60, conns=clients, duration=duration, warmup=0.3, size=64
                )
                rate = out["round_trips"] / (out["elapsed_ns"] / 1e9)
                ours.append(rate)
                ours_cpu.append(out["cpu_s"] / max(1, out["round_trips"]))
                progress(f"check-loadgen: {clients} clients, round {round_}/{rounds}: redis-benchmark")
                rps, cpu = redis_benchmark(tool, server.port, clients, max(1000, int(rate * duration)))
                theirs.append(rps)
                theirs_cpu.append(cpu)
            ratio = median(ours) / median(theirs)
            print(f"  {clients} client{'s' if clients > 1 else ''}:")
            for name, rates, cpus, unit in (
                ("myecho-load    ", ours, ours_cpu, "round trips/s"),
                ("redis-benchmark", theirs, theirs_cpu, "requests/s   "),
            ):
                runs = ", ".join(f"{r:.0f}" for r in rates)
                print(f"    {name}  {median(rates):8.0f} {unit}, {median(cpus) * 1e6:4.1f} µs CPU each (runs: {runs})")
            if ratio >= 1.1:
                verdict = "faster than the independent client: not the bottleneck"
            elif ratio >= 0.9:
                verdict = "within 10 % of the independent client"
            else:
                verdict = "MORE than 10 % slower than the independent client"
                status = 1
            print(f"    ratio {ratio:.2f}: myecho-load is {verdict}")
    finally:
        server.stop()
    return status
