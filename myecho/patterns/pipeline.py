"""The pipeline: a ventilator, N workers and a sink (PUSH/PULL).

::

    ventilator --PUSH-- jobs --PULL-- workers --PUSH-- results --PULL-- sink
        \\______DEALER------------- control ---------------ROUTER______/
                 BATCH (how many jobs) ->   <- the sink's verdict

The ventilator binds the jobs endpoint (tcp://127.0.0.1:11146); the sink
binds the results endpoint (:11147) and a control endpoint (:11148);
workers connect to jobs and results, any number of them, on any host.
Messages::

    BATCH   BATCH-ID COUNT SIZE             ventilator -> sink (control)
    JOB     BATCH-ID JOB-ID PAYLOAD         ventilator -> a worker
    DONE    BATCH-ID JOB-ID WORKER PAYLOAD  a worker -> sink
    VERDICT REPORT (JSON)                   sink -> ventilator (control)

PUSH deals jobs round-robin to the workers connected at that moment, and
queues up to ``hwm`` jobs per worker, plus what the kernel's socket buffers
hold: over tcp and ipc, thousands of small jobs. So the ventilator can wait
for ``workers`` of them before it deals (its PUSH socket's monitor counts
the handshakes; inproc has none, but there every connection made before
the bind is attached at once); otherwise the first worker in swallows the
head of the batch while the others are still connecting.

The sink checks that every job came back exactly once with its payload
intact. The ventilator waits for that verdict before it closes: libzmq's
linger only empties a socket's queues into its connections, and the jobs
still in a connection's buffers are lost when it closes (the tail of a
large batch). A job that dies with its
worker is reported missing, not retried: PUSH/PULL has no
acknowledgements, which is what the broker's protocol adds.

The loops of all three use pyzmq's Cython calls (``zmqfront.calls``): a
worker forwards a job's frames zero-copy, and the worker and the sink ask
libzmq (ZMQ_EVENTS) whether a message waits before they poll, rather than
reading until ``zmq.Again`` is raised.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from myecho.core.endpoints import BIND, CONNECT, attach, detach
from myecho.core.sockets import free_port
from myecho.core.zmqfront import EVENTS, NOBLOCK, NOBLOCK_SNDMORE, POLLIN, RCVMORE, SNDMORE, calls

Context = zmq.Context[zmq.Socket[bytes]]
JOBS = "tcp://127.0.0.1:11146"
RESULTS = "tcp://127.0.0.1:11147"
CONTROL = "tcp://127.0.0.1:11148"
BATCH, JOB, DONE, VERDICT = b"BATCH", b"JOB", b"DONE", b"VERDICT"
TICK = 0.1


class Stalled(RuntimeError):
    """Nobody took what we had to send, or no verdict came, in time."""


def payload(job: int, size: int) -> bytes:
    """A job's payload: known to the sink, so it can check what came back."""
    seed = job.to_bytes(8, "big")
    return (seed * (size // 8 + 1))[:size]


def send(
    sock: zmq.Socket[bytes],
    frames: Sequence[bytes | zmq.Frame],
    stop: threading.Event,
    patience: float,
    put: Callable[..., Any] | None = None,
) -> bool:
    """Send, waiting at most ``patience`` seconds for room; False if stopped.

    ``put``: the socket's send from ``zmqfront.calls``, to spare a lookup
    per message. The first frame decides: the rest of a message always goes."""
    put = put or calls(sock).send
    deadline = 0.0
    last = len(frames) - 1
    while not stop.is_set():
        try:
            put(frames[0], NOBLOCK_SNDMORE if last else NOBLOCK)
        except zmq.Again:
            now = time.monotonic()
            if not deadline:
                deadline = now + patience
            elif now >= deadline:
                raise Stalled(f"nobody took a message for {patience:g} s") from None
            sock.poll(int(TICK * 1000), zmq.POLLOUT)
            continue
        for n in range(1, last):
            put(frames[n], SNDMORE)
        if last:
            put(frames[last], 0)
        return True
    return False


def ventilate(
    context: Context,
    count: int,
    size: int = 16,
    jobs: list[str] | None = None,
    control: list[str] | None = None,
    hwm: int = 10,
    patience: float = 30.0,
    stop: threading.Event | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    """Send one batch of ``count`` jobs once ``workers`` are in; return the sink's verdict."""
    stop = stop or threading.Event()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, hwm)
    monitor = push.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    to_sink = context.socket(zmq.DEALER)
    batch = os.urandom(8)
    sent = 0
    try:
        attach(push, jobs or [JOBS], BIND)
        attach(to_sink, control or [CONTROL], CONNECT)
        wait_for_workers(monitor, workers, patience, stop)
        send(to_sink, [BATCH, batch, count.to_bytes(8, "big"), size.to_bytes(8, "big")], stop, patience)
        started = time.monotonic()
        put = calls(push).send
        for job in range(count):
            if not send(push, [JOB, batch, job.to_bytes(8, "big"), payload(job, size)], stop, patience, put):
                break
            sent += 1
        seconds = time.monotonic() - started
        verdict = wait_for_verdict(to_sink, batch, patience, stop)
    finally:
        push.disable_monitor()
        monitor.close(linger=0)
        push.close(linger=0)
        to_sink.close(linger=0)
    return {"batch": batch.hex(), "jobs": count, "sent": sent, "seconds": round(seconds, 6), "sink": verdict}


def wait_for_workers(monitor: zmq.Socket[bytes], workers: int, patience: float, stop: threading.Event) -> None:
    deadline = time.monotonic() + patience
    while workers > 0 and not stop.is_set():
        if time.monotonic() >= deadline:
            raise Stalled(f"{workers} workers still missing after {patience:g} s")
        if monitor.poll(int(TICK * 1000)):
            monitor.recv_multipart()
            workers -= 1


def wait_for_verdict(
    sock: zmq.Socket[bytes], batch: bytes, patience: float, stop: threading.Event
) -> dict[str, Any] | None:
    """The sink's report on our batch (None if stopped first)."""
    deadline = time.monotonic() + patience
    while not stop.is_set():
        if time.monotonic() >= deadline:
            raise Stalled(f"no verdict from the sink in {patience:g} s")
        if not sock.poll(int(TICK * 1000)):
            continue
        frames = sock.recv_multipart()
        if len(frames) == 2 and frames[0] == VERDICT:
            report: dict[str, Any] = json.loads(frames[1])
            if report.get("batch") == batch.hex():
                return report
    return None


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
    own, put = calls(pull), calls(push).send
    recv, get = own.recv, own.get
    tag = name.encode()
    done = 0
    try:
        where = attach(pull, jobs or [JOBS], CONNECT)
        attach(push, results or [RESULTS], CONNECT)
        while not stop.is_set():
            if not get(EVENTS) & POLLIN and not pull.poll(int(TICK * 1000), zmq.POLLIN):
                continue
            try:
                frames: list[zmq.Frame] = [recv(NOBLOCK, copy=False)]
            except zmq.Again:
                continue
            while frames[-1].more:
                frames.append(recv(0, copy=False))
            if len(frames) != 4 or frames[0].bytes != JOB:
                continue
            if cost:
                time.sleep(cost)
            if send(push, [DONE, frames[1], frames[2], tag, frames[3]], stop, 3600, put):
                done += 1
        detach(pull, where)  # take no more; what is done still goes to the sink
    finally:
        pull.close(linger=0)
        push.close(linger=1000)
    return done


class Tally:
    """What the sink saw of one batch."""

    def __init__(self) -> None:
        self.batch: bytes | None = None
        self.count = self.size = 0
        self.seen: Counter[int] = Counter()
        self.workers: Counter[str] = Counter()
        self.early: list[list[bytes]] = []  # results that overtook their BATCH
        self.corrupt = self.stale = 0
        self.started = self.last = 0.0

    @property
    def complete(self) -> bool:
        return self.batch is not None and len(self.seen) >= self.count

    def open(self, frames: list[bytes]) -> None:
        self.batch = frames[1]
        self.count, self.size = int.from_bytes(frames[2], "big"), int.from_bytes(frames[3], "big")
        self.started = time.monotonic()
        early, self.early = self.early, []
        for done in early:
            self.add(done)

    def add(self, done: list[bytes]) -> None:
        if self.batch is None:
            self.early.append(done)
        elif done[1] != self.batch:
            self.stale += 1
        else:
            job = int.from_bytes(done[2], "big")
            if job >= self.count or done[4] != payload(job, self.size):
                self.corrupt += 1
                return
            self.seen[job] += 1
            self.workers[done[3].decode(errors="replace")] += 1
            self.last = time.monotonic()

    def report(self) -> dict[str, Any]:
        seconds = max(0.0, self.last - self.started)
        duplicates = sum(times - 1 for times in self.seen.values())
        missing = self.count - len(self.seen)
        return {
            "batch": self.batch.hex() if self.batch else None,
            "jobs": self.count,
            "done": len(self.seen),
            "missing": missing,
            "duplicates": duplicates,
            "corrupt": self.corrupt,
            "stale": self.stale,
            "workers": dict(sorted(self.workers.items())),
            "seconds": round(seconds, 6),
            "jobs_per_second": round(len(self.seen) / seconds) if seconds > 0 else None,
            "exactly_once": self.batch is not None and not missing and not duplicates and not self.corrupt,
        }


def collect(
    context: Context,
    results: list[str] | None = None,
    control: list[str] | None = None,
    timeout: float = 10.0,
    settle: float = 0.2,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
) -> dict[str, Any]:
    """The sink: gather one batch, check that every job was done exactly once,
    tell the ventilator. Ends ``settle`` seconds after the last job (long
    enough to see a duplicate), or after ``timeout`` seconds of silence."""
    stop = stop or threading.Event()
    pull = context.socket(zmq.PULL)
    router = context.socket(zmq.ROUTER)
    tally = Tally()
    ventilator = b""
    report: dict[str, Any] = {}
    try:
        attach(pull, results or [RESULTS], BIND)
        attach(router, control or [CONTROL], BIND)
        if ready is not None:
            ready.set()
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        poller.register(router, zmq.POLLIN)
        own = calls(pull)
        recv, get = own.recv, own.get
        quiet_since = time.monotonic()
        while not stop.is_set():
            if time.monotonic() - quiet_since >= (settle if tally.complete else timeout):
                break
            events = dict(poller.poll(int(TICK * 1000)))
            if router in events:
                sender, *frames = router.recv_multipart()
                if len(frames) == 4 and frames[0] == BATCH and tally.batch is None:
                    ventilator = sender
                    tally.open(frames)
                quiet_since = time.monotonic()
            if pull in events:
                for _ in range(1000):
                    if not get(EVENTS) & POLLIN:
                        break
                    frames = [recv(NOBLOCK)]
                    while get(RCVMORE):
                        frames.append(recv(0))
                    if len(frames) == 5 and frames[0] == DONE:
                        tally.add(frames)
                quiet_since = time.monotonic()
        report = tally.report()
        if ventilator:
            router.send_multipart([ventilator, VERDICT, json.dumps(report).encode()])
    finally:
        pull.close(linger=0)
        router.close(linger=1000)
    return report


def run(workers: int, count: int, size: int = 16, transport: str = "inproc", cost: float = 0.0) -> dict[str, Any]:
    """The whole pipeline in this process (threads): a demo and a quick measure."""
    context: Context = zmq.Context()
    if transport == "inproc":
        jobs, results, control = (f"inproc://myecho-{name}" for name in ("jobs", "results", "control"))
    elif transport == "ipc":
        base = f"/tmp/myecho-pipeline-{os.getpid()}"
        jobs, results, control = (f"ipc://{base}-{name}" for name in ("jobs", "results", "control"))
    else:
        jobs, results, control = _free_tcp(), _free_tcp(), _free_tcp()
    stop = threading.Event()
    report: dict[str, Any] = {}
    ready = threading.Event()
    crew: list[threading.Thread] = []
    try:
        sink = threading.Thread(target=lambda: report.update(collect(context, [results], [control], ready=ready)))
        sink.start()
        ready.wait(10)
        for _ in range(workers):
            crew.append(threading.Thread(target=work, args=(context, [jobs], [results], cost), kwargs={"stop": stop}))
            crew[-1].start()
        ventilate(context, count, size, [jobs], [control], workers=0 if transport == "inproc" else workers)
        sink.join()
    finally:
        stop.set()
        for thread in crew:
            thread.join(10)
        context.term()
    return report


def _free_tcp() -> str:
    return f"tcp://127.0.0.1:{free_port()}"
