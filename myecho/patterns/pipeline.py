"""The pipeline: a ventilator, N workers and a sink (PUSH/PULL).

::

    ventilator --PUSH-- jobs --PULL-- worker --PUSH-- results --PULL-- sink
        \\________________________ BATCH (job count) ______________________/

The ventilator binds the jobs endpoint (tcp://127.0.0.1:11146) and tells
the sink, which binds the results endpoint (tcp://127.0.0.1:11147), how
many jobs its batch holds; workers connect to both, any number, any host.
Messages::

    BATCH  BATCH-ID  COUNT  SIZE                 ventilator -> sink
    JOB    BATCH-ID  JOB-ID PAYLOAD              ventilator -> worker
    DONE   BATCH-ID  JOB-ID WORKER PAYLOAD       worker -> sink

PUSH deals jobs round-robin to the workers connected at that moment, and
queues up to ``hwm`` jobs per worker: a small high-water mark keeps a
worker that connects late from starving (the first one cannot swallow the
whole batch). The sink checks that every job of the batch came back
exactly once with its payload intact, and says so (``exactly_once``); a
job that dies with its worker is reported missing, not retried: PUSH/PULL
has no acknowledgements, which is what the broker's protocol adds.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from typing import Any

import zmq

from myecho.patterns.endpoints import BIND, CONNECT, attach, detach

Context = zmq.Context[zmq.Socket[bytes]]
JOBS = "tcp://127.0.0.1:11146"
RESULTS = "tcp://127.0.0.1:11147"
BATCH, JOB, DONE = b"BATCH", b"JOB", b"DONE"
TICK = 0.1


class Stalled(RuntimeError):
    """Nobody took what we had to send for too long."""


def payload(job: int, size: int) -> bytes:
    """A job's payload: known to the sink, so it can check what came back."""
    seed = job.to_bytes(8, "big")
    return (seed * (size // 8 + 1))[:size]


def send(sock: zmq.Socket[bytes], frames: list[bytes], stop: threading.Event, patience: float) -> bool:
    """Send, waiting at most ``patience`` seconds for room; False if stopped."""
    deadline = time.monotonic() + patience
    while not stop.is_set():
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.Again:
            if time.monotonic() >= deadline:
                raise Stalled(f"nobody took a message for {patience:g} s") from None
            sock.poll(int(TICK * 1000), zmq.POLLOUT)
    return False


def ventilate(
    context: Context,
    count: int,
    size: int = 16,
    jobs: list[str] | None = None,
    results: list[str] | None = None,
    hwm: int = 10,
    patience: float = 30.0,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Send one batch of ``count`` jobs; tell the sink first."""
    stop = stop or threading.Event()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, hwm)
    to_sink = context.socket(zmq.PUSH)
    batch = os.urandom(8)
    try:
        attach(push, jobs or [JOBS], BIND)
        attach(to_sink, results or [RESULTS], CONNECT)
        send(to_sink, [BATCH, batch, count.to_bytes(8, "big"), size.to_bytes(8, "big")], stop, patience)
        started = time.monotonic()
        sent = 0
        for job in range(count):
            if not send(push, [JOB, batch, job.to_bytes(8, "big"), payload(job, size)], stop, patience):
                break
            sent += 1
        seconds = time.monotonic() - started
    finally:
        push.close(linger=int(patience * 1000))  # what is queued still goes out
        to_sink.close(linger=int(patience * 1000))
    return {"batch": batch.hex(), "jobs": count, "sent": sent, "seconds": round(seconds, 6)}


_names = iter(range(1 << 62))


def work(
    context: Context,
    jobs: list[str] | None = None,
    results: list[str] | None = None,
    cost: float = 0.0,
    hwm: int = 10,
    stop: threading.Event | None = None,
    name: str = "",
) -> int:
    """A pipeline worker: take jobs, (pretend to) work, push results; until stopped."""
    stop = stop or threading.Event()
    name = name or f"{socket.gethostname()}/{os.getpid()}/{next(_names)}"
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, hwm)
    push = context.socket(zmq.PUSH)
    done = 0
    try:
        where = attach(pull, jobs or [JOBS], CONNECT)
        attach(push, results or [RESULTS], CONNECT)
        while not stop.is_set():
            if not pull.poll(int(TICK * 1000), zmq.POLLIN):
                continue
            frames = pull.recv_multipart()
            if len(frames) != 4 or frames[0] != JOB:
                continue
            if cost:
                time.sleep(cost)
            if send(push, [DONE, frames[1], frames[2], name.encode(), frames[3]], stop, 3600):
                done += 1
        detach(pull, where)  # take no more; what is done still goes to the sink
    finally:
        pull.close(linger=0)
        push.close(linger=1000)
    return done


def collect(
    context: Context,
    results: list[str] | None = None,
    timeout: float = 10.0,
    settle: float = 0.2,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
) -> dict[str, Any]:
    """The sink: gather one batch and check that every job was done exactly once.

    Ends ``settle`` seconds after the last job came back (long enough to
    see a duplicate), or after ``timeout`` seconds without any message.
    """
    stop = stop or threading.Event()
    pull = context.socket(zmq.PULL)
    batch: bytes | None = None
    count = size = 0
    seen: Counter[int] = Counter()
    workers: Counter[str] = Counter()
    early: list[list[bytes]] = []
    corrupt = stale = 0
    started = last = None
    try:
        attach(pull, results or [RESULTS], BIND)
        if ready is not None:
            ready.set()
        quiet_since = time.monotonic()
        while not stop.is_set():
            limit = settle if batch is not None and len(seen) >= count else timeout
            if time.monotonic() - quiet_since >= limit:
                break
            if not pull.poll(int(TICK * 1000), zmq.POLLIN):
                continue
            frames = pull.recv_multipart()
            quiet_since = time.monotonic()
            if frames[0] == BATCH and len(frames) == 4 and batch is None:
                batch, count, size = frames[1], int.from_bytes(frames[2], "big"), int.from_bytes(frames[3], "big")
                started = quiet_since
                pending, early = early, []
            elif frames[0] == DONE and len(frames) == 5:
                pending = [frames]
            else:
                continue
            for done in pending:
                if batch is None:
                    early.append(done)  # a result overtook its batch's announcement
                    continue
                if done[1] != batch:
                    stale += 1
                    continue
                job = int.from_bytes(done[2], "big")
                if job >= count or done[4] != payload(job, size):
                    corrupt += 1
                    continue
                seen[job] += 1
                workers[done[3].decode(errors="replace")] += 1
                last = time.monotonic()
    finally:
        pull.close(linger=0)
    seconds = (last - started) if started is not None and last is not None else 0.0
    duplicates = sum(times - 1 for times in seen.values())
    missing = count - len(seen)
    return {
        "batch": batch.hex() if batch else None,
        "jobs": count,
        "done": len(seen),
        "missing": missing,
        "duplicates": duplicates,
        "corrupt": corrupt,
        "stale": stale,
        "workers": dict(sorted(workers.items())),
        "seconds": round(seconds, 6),
        "jobs_per_second": round(len(seen) / seconds) if seconds > 0 else None,
        "exactly_once": batch is not None and missing == 0 and duplicates == 0 and corrupt == 0,
    }


def run(workers: int, count: int, size: int = 16, transport: str = "inproc", cost: float = 0.0) -> dict[str, Any]:
    """The whole pipeline in this process (threads): a demo and a quick measure."""
    context: Context = zmq.Context()
    if transport == "inproc":
        jobs, results = "inproc://myecho-jobs", "inproc://myecho-results"
    elif transport == "ipc":
        base = f"/tmp/myecho-pipeline-{os.getpid()}"
        jobs, results = f"ipc://{base}-jobs", f"ipc://{base}-results"
    else:
        jobs, results = _free_tcp(), _free_tcp()
    stop = threading.Event()
    report: dict[str, Any] = {}
    ready = threading.Event()
    crew: list[threading.Thread] = []
    try:
        sink = threading.Thread(target=lambda: report.update(collect(context, [results], ready=ready)))
        sink.start()
        ready.wait(10)
        for _ in range(workers):
            crew.append(threading.Thread(target=work, args=(context, [jobs], [results], cost), kwargs={"stop": stop}))
            crew[-1].start()
        ventilate(context, count, size, [jobs], [results])
        sink.join()
    finally:
        stop.set()
        for thread in crew:
            thread.join(10)
        context.term()
    return report


def _free_tcp() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"
