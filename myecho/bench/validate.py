"""Is the load generator the bottleneck? Compare it with an independent client.

``myecho-bench --check-loadgen`` starts myecho-c and alternates runs of
myecho-load (32 clients, closed loop) with runs of ``redis-benchmark``
(Debian's redis-tools: a single-threaded C client on its own event loop,
written by other people) with the same 32 connections and a 64-byte
message. redis-benchmark speaks RESP, but an echo of a RESP request
(``*2 $4 ECHO $43 ...``) is itself a valid RESP reply (an array of two
strings), so it measures any echo server. Alternating the runs spreads the
noise of a shared machine evenly over both.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from collections.abc import Callable

from myecho.bench import loadgen
from myecho.bench.servers import BY_NAME, Server
from myecho.bench.stats import median

CLIENTS = 32
ROUNDS = 5
DURATION = 4.0
#: 4 + 10 + 5 + 43 + 2 = 64 bytes on the wire, as myecho-load sends.
RESP_ARGUMENT = "x" * 43


def redis_benchmark(tool: str, port: int, requests: int) -> float:
    """Requests per second that redis-benchmark reports for the echo command."""
    done = subprocess.run(
        [
            tool,
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-c",
            str(CLIENTS),
            "-n",
            str(requests),
            "--csv",
            "ECHO",
            RESP_ARGUMENT,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    rows = list(csv.reader(io.StringIO(done.stdout)))
    for row in rows[1:]:
        if len(row) > 1:
            return float(row[1])
    raise RuntimeError(f"redis-benchmark printed no result: {done.stderr.strip() or done.stdout.strip()}")


def check_loadgen(progress: Callable[[str], None], rounds: int = ROUNDS, duration: float = DURATION) -> int:
    tool = shutil.which("redis-benchmark")
    if tool is None:
        print("myecho-bench: redis-benchmark is missing (apt-get install redis-tools)")
        return 2
    server = Server.start(BY_NAME["c"])
    ours: list[float] = []
    theirs: list[float] = []
    try:
        for round_ in range(1, rounds + 1):
            progress(f"check-loadgen: round {round_}/{rounds}: myecho-load")
            out = loadgen.run(
                "tcp", "rr", server.host, server.port, 60, conns=CLIENTS, duration=duration, warmup=0.3, size=64
            )
            rate = out["round_trips"] / (out["elapsed_ns"] / 1e9)
            ours.append(rate)
            progress(f"check-loadgen: round {round_}/{rounds}: redis-benchmark")
            theirs.append(redis_benchmark(tool, server.port, max(1000, int(rate * duration))))
    finally:
        server.stop()
    ratio = median(ours) / median(theirs)
    print(f"against myecho-c, {CLIENTS} clients, 64-byte messages, {rounds} alternating rounds of ~{duration:g} s:")
    print(f"  myecho-load      {median(ours):9.0f} round trips/s (runs: {', '.join(f'{r:.0f}' for r in ours)})")
    print(f"  redis-benchmark  {median(theirs):9.0f} requests/s    (runs: {', '.join(f'{r:.0f}' for r in theirs)})")
    verdict = "within 10 %" if ratio >= 0.9 else "MORE than 10 % slower"
    print(f"  ratio {ratio:.3f}: myecho-load is {verdict} of the independent client")
    return 0 if ratio >= 0.9 else 1
