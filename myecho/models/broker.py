"""The broker model: load-balanced echo, REQ clients in front, workers behind.

Two ROUTER sockets. The frontend speaks to clients exactly as the zmq model
does (REQ, or DEALER with any frames, multipart frame for frame, replies
to one client in the order of its requests); the backend speaks MEW1 to
``myecho serve worker`` processes on any host (see
``myecho.patterns.heartbeat`` for the frames and the heartbeats).

Routing is least recently used: free workers wait in a queue, the one free
for the longest gets the next request, and a worker gets a new request
only after it answered the last one. The frontend is polled only while a
worker is free and no retried request waits, so clients are never read
when nobody can serve them: their requests stay in libzmq's queues (and
REQ clients simply wait), the broker holds at most one request per worker.

Retries are the broker's, not the client's. A REQ client must see the
broker exactly like ``myecho serve zmq``: no timeout to tune, no resend
(the lazy pirate's REQ_RELAXED dance), no duplicate to filter. And the
broker knows exactly which request a dead worker held: it keeps each
request until its reply is forwarded, so when heartbeats (or the closed
connection) say a worker is gone, its request goes to the next free
worker. Exactly once, towards the client: every request has an ID; the
first reply for an outstanding ID is forwarded and the ID retired, so a
hung worker that wakes up and answers a request meanwhile answered by
another is dropped (``late`` in STATUS). IDs start with a random nonce per
broker run: a reply queued for a previous run cannot pass for a new one.
What this does not cover: the broker's own death loses the requests it
holds, as the zmq model's death does; those clients time out.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections import OrderedDict, deque

import zmq
from zmq.utils.monitor import recv_monitor_message

from myecho import curve
from myecho.models.zmq import BATCH, DRAIN_IDLE, HIGH_WATER, MAX_MESSAGE
from myecho.models.zmq import bind as bind_listeners
from myecho.patterns import heartbeat as mew
from myecho.patterns.endpoints import BIND, attach, detach
from myecho.runtime import Runtime
from myecho.settings import BROKER_BACKEND_PORT
from myecho.sockets import format_address

Context = zmq.Context[zmq.Socket[bytes]]
GONE_MEMORY = 1024
PROBES = (0.005, 0.02, 0.1)  # seconds after a disconnection


class Request:
    __slots__ = ("client", "done", "frames", "id", "reply", "tries", "worker")

    def __init__(self, request_id: bytes, client: bytes, frames: list[bytes]) -> None:
        self.id = request_id
        self.client = client
        self.frames = frames
        self.worker: bytes | None = None
        self.reply: list[bytes] | None = None
        self.tries = 0
        self.done = False  # answered or given up: any later reply is late


class Worker:
    __slots__ = ("expiry", "id", "request")

    def __init__(self, worker_id: bytes, expiry: float) -> None:
        self.id = worker_id
        self.expiry = expiry
        self.request: Request | None = None


def name(worker_id: bytes) -> str:
    """A worker's identity for the log: ours are host/pid/n, others get hex."""
    text = worker_id.decode(errors="replace")
    return text if text.isprintable() else worker_id.hex()


def default_endpoints(runtime: Runtime) -> tuple[list[str], list[str]]:
    """Settings, else ``tcp://HOST:PORT`` (11144) and ``tcp://HOST:11145``."""
    s = runtime.settings
    host = format_address(s.host, 0).rsplit(":", 1)[0]
    frontend = s.broker_frontend or ([] if _roles(runtime, "frontend") else [f"tcp://{host}:{s.port}"])
    backend = s.broker_backend or ([] if _roles(runtime, "backend") else [f"tcp://{host}:{BROKER_BACKEND_PORT}"])
    return frontend, backend


def _roles(runtime: Runtime, role: str) -> list[int]:
    return [n for n, sock_role in enumerate(runtime.listener_roles) if sock_role == role]


class Broker:
    def __init__(self, runtime: Runtime, context: Context | None = None) -> None:
        self.rt = runtime
        settings = runtime.settings
        self.timing = mew.Timing(settings.heartbeat, settings.liveness)
        self.context = context or zmq.Context.instance()
        self.frontend = self.context.socket(zmq.ROUTER)
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.frontend.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        self.frontend.setsockopt(zmq.SNDHWM, HIGH_WATER)
        self.frontend.setsockopt(zmq.RCVHWM, HIGH_WATER)
        self.frontend.setsockopt(zmq.BACKLOG, settings.backlog)
        self.backend = self.context.socket(zmq.ROUTER)
        curve.secure_backend(self.backend, runtime)
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.backend.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.backend.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE + mew.ENVELOPE)
        self.front_monitor = self.frontend.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.back_monitor = self.backend.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.nonce = os.urandom(8)
        self.counter = itertools.count()
        self.workers: dict[bytes, Worker] = {}
        self.gone: OrderedDict[bytes, None] = OrderedDict()  # connections seen closing
        self.idle: OrderedDict[bytes, None] = OrderedDict()  # least recently used first
        self.retries: deque[Request] = deque()
        self.pending: dict[bytes, deque[Request]] = {}  # per client, in arrival order
        self.unanswered: dict[bytes, Request] = {}
        self.retried = self.late = self.given_up = 0
        self.last_drop_log = 0.0
        self.next_heartbeat = 0.0
        self.probes: list[float] = []  # when to heartbeat again after a disconnection

    # -- the pool -------------------------------------------------------------
    def join(self, worker_id: bytes) -> Worker:
        worker = Worker(worker_id, time.monotonic() + self.timing.patience)
        self.workers[worker_id] = worker
        self.idle[worker_id] = None
        self.rt.log.info("worker %s joined (%d in the pool)", name(worker_id), len(self.workers))
        return worker

    def leave(self, worker_id: bytes, why: str) -> None:
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return
        self.idle.pop(worker_id, None)
        request = worker.request
        held = ""
        if request is not None and not request.done:
            held = "; its request goes to another worker"
            self.retry(request)
        self.rt.log.info("worker %s left: %s (%d in the pool)%s", name(worker_id), why, len(self.workers), held)

    def retry(self, request: Request) -> None:
        request.worker = None
        if request.done:
            return
        request.tries += 1
        if request.tries >= mew.MAX_TRIES:
            self.given_up += 1
            self.rt.stats.dropped += 1
            self.rt.log.warning("request given up: %d workers died holding it", request.tries)
            self.forget(request)
            return
        self.retried += 1
        self.retries.append(request)

    def forget(self, request: Request) -> None:
        """Retire a request that will not be answered."""
        request.done = True
        del self.unanswered[request.id]
        queue = self.pending.get(request.client)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(request)
            self.flush(request.client, queue)

    # -- requests -------------------------------------------------------------
    def dispatch(self, request: Request) -> bool:
        """Give a request to the least recently used worker; False if none is free."""
        while self.idle:
            worker_id, _ = self.idle.popitem(last=False)
            try:
                self.backend.send_multipart(
                    [worker_id, mew.PROTOCOL, mew.REQUEST, request.id, *request.frames], zmq.NOBLOCK
                )
            except zmq.ZMQError as error:  # gone (EHOSTUNREACH) or closing (EAGAIN)
                self.lost(worker_id, error)
                continue
            self.workers[worker_id].request = request
            request.worker = worker_id
            return True
        return False

    def take_requests(self) -> None:
        """Read clients, at most one request per free worker."""
        while self.retries and self.idle:
            if not self.dispatch(self.retries[0]):
                break
            self.retries.popleft()
        for _ in range(BATCH):
            if self.retries or not self.idle:
                return
            try:
                client, *frames = self.frontend.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            request = Request(self.nonce + next(self.counter).to_bytes(8, "big"), client, frames)
            self.pending.setdefault(client, deque()).append(request)
            self.unanswered[request.id] = request
            if not self.dispatch(request):
                self.retries.appendleft(request)

    def deliver(self, request: Request, frames: list[bytes]) -> None:
        request.reply = frames
        request.done = True
        del self.unanswered[request.id]
        stats = self.rt.stats
        stats.messages += 1
        stats.bytes += sum(len(frame) for frame in frames)
        self.flush(request.client, self.pending[request.client])

    def flush(self, client: bytes, queue: deque[Request]) -> None:
        """Send a client its replies in the order of its requests."""
        while queue and queue[0].reply is not None:
            reply = queue.popleft().reply
            assert reply is not None
            try:
                self.frontend.send_multipart([client, *reply], zmq.NOBLOCK)
            except zmq.Again:
                self.dropped()
            except zmq.ZMQError as error:
                if error.errno != zmq.EHOSTUNREACH:  # the client left before its answer
                    raise
        if not queue:
            del self.pending[client]

    def dropped(self) -> None:
        self.rt.stats.dropped += 1
        now = time.monotonic()
        if now - self.last_drop_log >= 10:
            self.rt.log.warning("reply dropped: a client that does not read; its replies reached the high-water mark")
            self.last_drop_log = now

    # -- workers --------------------------------------------------------------
    def from_workers(self) -> None:
        for _ in range(BATCH):
            try:
                worker_id, *frames = self.backend.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            message = mew.parse(frames)
            if message is None:
                self.rt.log.debug("not MEW1 from %s: ignored", name(worker_id))
                continue
            command, rest = message
            worker = self.workers.get(worker_id)
            if command == mew.BYE:
                self.leave(worker_id, "it said goodbye")
                continue
            if worker is None and worker_id in self.gone:  # its last words: a reply is welcome
                if command == mew.REPLY and rest:
                    self.on_reply(Worker(worker_id, 0.0), rest[0], rest[1:])
                continue
            if worker is None:
                worker = self.join(worker_id)
            elif command == mew.READY and worker.request is not None:
                self.retry(worker.request)  # it started afresh: what it held is lost
                worker.request = None
                self.idle[worker_id] = None
            worker.expiry = time.monotonic() + self.timing.patience
            if command == mew.REPLY and rest:
                self.on_reply(worker, rest[0], rest[1:])

    def on_reply(self, worker: Worker, request_id: bytes, frames: list[bytes]) -> None:
        if worker.request is not None and worker.request.id == request_id:
            worker.request = None
            self.idle[worker.id] = None
        request = self.unanswered.get(request_id)
        if request is None:  # answered already (or from a previous broker run)
            self.late += 1
            return
        if request in self.retries:  # a worker we gave up on woke up first: take its answer
            self.retries.remove(request)
        self.deliver(request, frames)

    def heartbeat(self) -> None:
        """HB to every worker; a send that fails finds the dead at once.

        EHOSTUNREACH: the connection is gone. EAGAIN: it is closing (libzmq
        holds a dying pipe until its last messages are read), or the worker
        left a thousand messages unread, which a live one never does."""
        for worker_id in list(self.workers):
            try:
                self.backend.send_multipart([worker_id, mew.PROTOCOL, mew.HEARTBEAT], zmq.NOBLOCK)
            except zmq.ZMQError as error:
                self.lost(worker_id, error)

    def lost(self, worker_id: bytes, error: zmq.ZMQError) -> None:
        """A worker whose connection is gone: it will not come back under this identity."""
        self.leave(worker_id, f"its connection is gone ({error.strerror})")
        self.gone[worker_id] = None
        if len(self.gone) > GONE_MEMORY:
            self.gone.popitem(last=False)

    def expire(self, now: float) -> None:
        for worker in list(self.workers.values()):
            if worker.expiry <= now:
                self.leave(worker.id, f"silent for {self.timing.patience:g} s")

    def on_monitors(self) -> None:
        lost = False
        while True:
            try:
                event = recv_monitor_message(self.back_monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            lost = lost or event["event"] == zmq.EVENT_DISCONNECTED
        if lost:  # libzmq drops the pipe a few hops after the event: look now, then again
            now = time.monotonic()
            self.probes = [now + delay for delay in PROBES]
            self.heartbeat()
        while True:
            try:
                event = recv_monitor_message(self.front_monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.rt.stats.connection_opened()
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.rt.stats.open -= 1

    # -- the loop -------------------------------------------------------------
    def attach(self) -> tuple[list[str], list[str]]:
        rt = self.rt
        frontend, backend = default_endpoints(rt)
        front = [rt.listeners[n] for n in _roles(rt, "frontend")]
        back = [rt.listeners[n] for n in _roles(rt, "backend")]
        front_where = bind_listeners(self.frontend, front, []) + attach(self.frontend, frontend, BIND)
        back_where = bind_listeners(self.backend, back, []) + attach(self.backend, backend, BIND)
        rt.listeners = []
        return front_where, back_where

    def status(self) -> None:
        busy = len(self.workers) - len(self.idle)
        count = len(self.workers)
        detail = f"{count} worker{'' if count == 1 else 's'} ({busy} busy), {self.retried} retried"
        if self.late:
            detail += f", {self.late} late replies dropped"
        self.rt.stats.detail = detail

    def serve(self) -> None:
        rt = self.rt
        front_where, back_where = self.attach()
        poller = zmq.Poller()
        poller.register(self.backend, zmq.POLLIN)
        poller.register(self.back_monitor, zmq.POLLIN)
        poller.register(self.front_monitor, zmq.POLLIN)
        poller.register(rt.signals.fileno(), zmq.POLLIN)
        reading = False
        rt.ready(f"clients on {', '.join(front_where)}, workers on {', '.join(back_where)}")
        quiet_since = None
        while True:
            want = bool(self.idle) and not self.retries
            if want != reading:
                poller.register(self.frontend, zmq.POLLIN if want else 0)
                reading = want
            now = time.monotonic()
            wait = min(rt.timeout(), max(0.0, min([self.next_heartbeat, *self.probes]) - now))
            if rt.stopping:
                wait = min(wait, DRAIN_IDLE)
            events = dict(poller.poll(int(wait * 1000)))
            if self.backend in events:
                self.from_workers()
            if self.frontend in events or self.retries:
                self.take_requests()
            if self.back_monitor in events or self.front_monitor in events:
                self.on_monitors()
            if rt.signals.fileno() in events:
                rt.on_signals()
                if rt.stopping:
                    detach(self.frontend, front_where)  # no new clients; answer what is in flight
            now = time.monotonic()
            if self.probes and now >= self.probes[0]:
                self.probes.pop(0)
                self.heartbeat()
            if now >= self.next_heartbeat:
                self.expire(now)
                self.heartbeat()
                self.next_heartbeat = now + self.timing.interval
            self.status()
            rt.tick()
            if rt.stopping:
                if self.frontend in events or self.unanswered:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = now
                if rt.grace_expired() or (quiet_since is not None and now - quiet_since >= DRAIN_IDLE):
                    break
        self.close()

    def close(self) -> None:
        linger = max(0.0, self.rt.stop_deadline - time.monotonic())
        for sock in (self.frontend, self.backend):
            sock.disable_monitor()
        self.front_monitor.close(linger=0)
        self.back_monitor.close(linger=0)
        self.backend.close(linger=0)
        self.frontend.close(linger=int(min(linger, 1.0) * 1000))


def serve(runtime: Runtime) -> None:
    Broker(runtime).serve()
