"""The broker model: load-balanced echo, REQ clients in front, workers behind.

Two ROUTER sockets. The frontend speaks to clients exactly as the zmq model
does (REQ, or DEALER with any frames, multipart frame for frame, replies
to one client in the order of its requests); the backend speaks MEW2 to
``myecho serve worker`` processes on any host (``myecho.models.mew``
specifies the frames, the credit-based flow and the error reply).

Throughput comes from the window: each worker holds up to its window of
requests at once (32 by default), so neither side waits for the other; the
broker reads both sockets in batches per wake-up with pyzmq's low-level
calls, and forwards a client's frames to the worker without copying them.

Retries are the broker's, not the client's: a REQ client sees the broker
exactly like ``myecho serve zmq``. The broker keeps each request until its
reply comes, so when a worker dies, hangs past the hold timeout or leaves,
what it held goes to another worker. Exactly once, towards the client: the
first valid reply, from the worker that holds the request, is forwarded and
the request retired; any other is dropped (``late``). A request that cannot
be served gets the error reply, never silence: within the request timeout,
or at once when it is too big or its client holds too much.

Memory is bounded in bytes: one message (all its frames together), what the
broker holds for one client (its requests and the replies waiting for an
earlier one), and in total; a request's frames are freed when its reply
comes, the reply's when it is forwarded. A limit reached costs only the
request that reached it (its error reply), is counted in STATUS and logged
at most every ten seconds. What this does not cover: the broker's own death
loses what it holds, as the zmq model's death does.

At the file-descriptor limit neither socket spins: both listen on sockets
of ours (systemd's, else host:port and host:11145) and pause accepting as
the zmq model's does: both are ``myecho.core.zmqfront.Front``, as the zmq
model's ROUTER is; endpoints given as URLs are libzmq's.
"""

from __future__ import annotations

import os
import time
from collections import Counter, OrderedDict, deque
from typing import Any

import zmq

from myecho.core import curve
from myecho.core.endpoints import BIND, EndpointError, attach
from myecho.core.runtime import Runtime
from myecho.core.settings import BROKER_BACKEND_PORT
from myecho.core.sockets import ListenError, Listeners, bind_tcp, format_address
from myecho.core.zmqfront import HIGH_WATER, LOG_EVERY, NOBLOCK, NOBLOCK_SNDMORE, POLLIN, SNDMORE, Front, calls
from myecho.models import mew
from myecho.models.zmq import BATCH, DRAIN_IDLE

#: systemd's sockets by role; the endpoints of the settings libzmq binds itself.
LISTENERS = Listeners(bind=False, roles=("frontend", "backend"))
PREFORK = False

Context = zmq.Context[zmq.Socket[bytes]]
Frames = list[zmq.Frame]
GONE_MEMORY = 1024
PROBES = (0.005, 0.02, 0.1)  # seconds after a disconnection
TICK = 0.05  # how often deadlines are looked at while requests are held
STATUS_EVERY = 0.25  # seconds between two refreshes of the pool's line in STATUS
OVERHEAD = 256  # bytes counted per request besides its frames: the bookkeeping
LAST_WORDS = 0.2  # seconds the frontend lingers at least when the broker closes
HEADER_SIZE = len(mew.REPLY) + mew.ID_SIZE


class Request:
    __slots__ = ("client", "deadline", "done", "frames", "holder", "id", "reply", "size", "tries")

    def __init__(self, request_id: bytes, client: bytes, frames: Frames, size: int, deadline: float) -> None:
        self.id = request_id
        self.client = client
        self.frames: Frames | None = frames
        self.size = size  # bytes counted against the client and the total
        self.deadline = deadline
        self.holder: bytes | None = None  # the worker it was last sent to: only its reply counts
        self.reply: Frames | None = None
        self.tries = 0
        self.done = False  # answered or given up: any later reply is late


class Worker:
    __slots__ = ("heard", "held", "id", "leaving", "window")

    def __init__(self, worker_id: bytes, window: int, now: float) -> None:
        self.id = worker_id
        self.window = window
        self.heard = now
        self.held: dict[bytes, tuple[Request, float]] = {}  # by request ID, in the order sent: (request, sent at)
        self.leaving = False


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
        self.request_timeout = settings.request_timeout
        self.hold_timeout = settings.hold_timeout
        self.max_message = settings.max_message
        self.client_bytes = settings.client_bytes
        self.broker_bytes = settings.broker_bytes
        self.context = context or zmq.Context.instance()
        self.front = Front(
            self.context,
            runtime.log,
            runtime.stats,
            max_frame=self.max_message,  # per frame: libzmq's part of the bound
            backlog=settings.backlog,
            receive_high_water=HIGH_WATER,
        )
        # The backend's connections are not clients: not counted; anyone may connect before CURVE says no.
        self.back = Front(
            self.context,
            runtime.log,
            None,
            max_frame=self.max_message + mew.ENVELOPE,
            backlog=settings.backlog,
            send_high_water=None,
            secure=lambda sock: curve.secure_backend(sock, runtime),
        )
        self.frontend, self.backend = self.front.router, self.back.router
        self.front_calls, self.back_calls = calls(self.frontend), calls(self.backend)
        self.send_frontend, self.send_backend = self.front_calls.send, self.back_calls.send
        self.workers: dict[bytes, Worker] = {}
        # Workers with credit left, by how many requests they hold; least recently used first.
        self.levels: list[OrderedDict[bytes, Worker]] = [OrderedDict()]
        self.gone: OrderedDict[bytes, None] = OrderedDict()  # connections closed, or identities refused
        self.waiting: deque[Request] = deque()  # read, not yet sent to a worker (retries first)
        self.pending: dict[bytes, deque[Request]] = {}  # per client, in arrival order, until forwarded
        self.unanswered: dict[bytes, Request] = {}
        self.held_by_client: dict[bytes, int] = {}
        self.ids, self.ids_at = b"", 0  # unused random bytes for request IDs
        self.held_total = 0
        self.counts: Counter[str] = Counter()
        self.last_log: dict[str, float] = {}
        self.next_heartbeat = 0.0
        self.next_tick = 0.0
        self.next_status = 0.0
        self.probes: list[float] = []  # when to heartbeat again after a disconnection
        self.closing = False

    # -- logging and counting -------------------------------------------------
    def warn(self, kind: str, message: str, *args: object) -> None:
        """Count ``kind``; log at most every ten seconds per kind."""
        self.counts[kind] += 1
        now = time.monotonic()
        if now - self.last_log.get(kind, -LOG_EVERY) >= LOG_EVERY:
            self.last_log[kind] = now
            self.rt.log.warning(message, *args)

    # -- the pool -------------------------------------------------------------
    def join(self, worker_id: bytes, window: int, now: float) -> Worker:
        worker = Worker(worker_id, window, now)
        self.workers[worker_id] = worker
        self.levels[0][worker_id] = worker
        self.rt.log.info("worker %s joined, window %d (%d in the pool)", name(worker_id), window, len(self.workers))
        return worker

    def ban(self, worker_id: bytes) -> None:
        """Never take this identity (back) into the pool; its replies to what it held still count."""
        self.gone[worker_id] = None
        if len(self.gone) > GONE_MEMORY:
            self.gone.popitem(last=False)

    def leave(self, worker_id: bytes, why: str, refuse: bool = False) -> None:
        """Drop a worker; what it held goes to other workers. ``refuse``: never take it back."""
        if refuse:
            self.ban(worker_id)
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return
        if len(worker.held) < len(self.levels):
            self.levels[len(worker.held)].pop(worker_id, None)
        held = [request for request, _ in worker.held.values()]
        worker.held.clear()
        for request in reversed(held):
            self.retry(request)
        note = f"; the {len(held)} request{'' if len(held) == 1 else 's'} it held: to other workers" if held else ""
        self.rt.log.info("worker %s left: %s (%d in the pool)%s", name(worker_id), why, len(self.workers), note)

    def retry(self, request: Request) -> None:
        if request.done:
            return
        request.tries += 1
        if request.tries >= mew.MAX_TRIES:
            self.fail(request, b"tries", f"{request.tries} workers failed to answer it")
            return
        self.counts["retried"] += 1
        self.waiting.appendleft(request)

    def credit(self, worker: Worker, count: int) -> None:
        """File a worker under the number of requests it holds (if it may take more)."""
        if count < worker.window and not worker.leaving:
            while len(self.levels) <= count:
                self.levels.append(OrderedDict())
            self.levels[count][worker.id] = worker

    # -- requests -------------------------------------------------------------
    def dispatch(self, now: float) -> None:
        """Send waiting requests to the least loaded workers while any has credit."""
        waiting, levels, send = self.waiting, self.levels, self.send_backend
        while waiting:
            request = waiting[0]
            if request.done:
                waiting.popleft()
                continue
            for level in levels:
                if level:
                    worker_id, worker = level.popitem(last=False)
                    break
            else:
                return
            frames = request.frames
            assert frames is not None
            try:
                send(worker_id, NOBLOCK_SNDMORE)
            except zmq.ZMQError as error:  # gone (EHOSTUNREACH) or closing (EAGAIN)
                self.lost(worker_id, error)
                continue
            send(mew.REQUEST + request.id, SNDMORE)
            for frame in frames[:-1]:
                send(frame, SNDMORE, copy=False)
            send(frames[-1], copy=False)
            waiting.popleft()
            held = worker.held
            held[request.id] = (request, now)
            request.holder = worker_id
            self.credit(worker, len(held))

    def take_requests(self, now: float) -> None:
        """Read up to BATCH client messages (the whole of each, even one over the limit)."""
        recv = self.front_calls.recv
        deadline = now + self.request_timeout
        limit, client_bytes = self.max_message, self.client_bytes
        held_by_client, pending, unanswered, waiting = self.held_by_client, self.pending, self.unanswered, self.waiting
        ids, at = self.ids, self.ids_at
        for _ in range(BATCH):
            try:
                client = recv(NOBLOCK)
            except zmq.Again:
                break
            frames: Frames = []
            size = OVERHEAD
            more = True
            while more:
                frame = recv(0, copy=False)
                more = frame.more
                size += len(frame)
                if size <= limit or not frames:
                    frames.append(frame)  # past the limit: freed at once, only the envelope kept
            if size - OVERHEAD > limit:
                self.refuse(client, frames, b"too-big", f"the message is over {limit} bytes (all frames)")
                continue
            if self.closing:
                self.refuse(client, frames, b"stopping", "the broker is stopping")
                continue
            client_held = held_by_client.get(client, 0) + size
            if client_held > client_bytes:
                self.refuse(
                    client, frames, b"busy", f"this client's requests and replies are over {client_bytes} bytes"
                )
                continue
            if self.held_total + size > self.broker_bytes:
                self.refuse(client, frames, b"busy", f"the broker holds {self.broker_bytes} bytes")
                continue
            held_by_client[client] = client_held
            self.held_total += size
            if at >= len(ids):  # random IDs drawn 256 at a time: one system call, not one per request
                ids, at = os.urandom(mew.ID_SIZE * 256), 0
            request_id = ids[at : at + mew.ID_SIZE]
            at += mew.ID_SIZE
            request = Request(request_id, client, frames, size, deadline)
            queue = pending.get(client)
            if queue is None:
                pending[client] = queue = deque()
            queue.append(request)
            unanswered[request_id] = request
            waiting.append(request)
        self.ids, self.ids_at = ids, at

    def refuse(self, client: bytes, frames: Frames, reason: bytes, why: str) -> None:
        """The error reply to a request not taken, in order behind the client's earlier ones.

        Waiting error replies count against the limits too: a client that
        goes on sending while one of its requests is held loses the errors
        that do not fit (dropped, counted), never the broker's memory."""
        self.warn(reason.decode(), "request refused (%s): %s", reason.decode(), why)
        self.rt.stats.dropped += 1
        held = self.held_by_client.get(client, 0) + OVERHEAD
        queue = self.pending.get(client)
        if queue is not None and (held > self.client_bytes or self.held_total + OVERHEAD > self.broker_bytes):
            return
        request = Request(b"", client, [], OVERHEAD, 0.0)
        request.done = True
        request.reply = [zmq.Frame(frame) for frame in mew.error_reply([f.bytes for f in frames], reason, why)]
        self.held_by_client[client] = held
        self.held_total += OVERHEAD
        if queue is None:
            self.pending[client] = queue = deque()
        queue.append(request)
        self.flush(client, queue)

    def fail(self, request: Request, reason: bytes, why: str) -> None:
        """Give a request up: its client gets the error reply."""
        self.warn(reason.decode(), "request given up (%s): %s", reason.decode(), why)
        self.rt.stats.dropped += 1
        frames = request.frames or []
        reply = mew.error_reply([f.bytes for f in frames], reason, why)
        request.done = True
        request.frames = None
        self.unanswered.pop(request.id, None)
        self.settle(request, [zmq.Frame(frame) for frame in reply], 0)

    def settle(self, request: Request, reply: Frames, size: int) -> None:
        """A request's answer is known: swap its bytes for the reply's, send what is in order."""
        change = size - request.size
        request.size = size
        request.reply = reply
        self.held_total += change
        client = request.client
        self.held_by_client[client] += change
        queue = self.pending[client]
        if queue[0] is request:
            self.flush(client, queue)

    def flush(self, client: bytes, queue: deque[Request]) -> None:
        """Send a client its replies in the order of its requests, freeing each."""
        send = self.send_frontend
        while queue and (reply := queue[0].reply) is not None:
            request = queue.popleft()
            request.reply = None
            if request.size:
                self.held_total -= request.size
                self.held_by_client[client] -= request.size
            try:
                send(client, NOBLOCK_SNDMORE)
            except zmq.Again:
                self.front.dropped("a client that does not read; its replies reached the high-water mark")
                continue
            except zmq.ZMQError as error:
                if error.errno != zmq.EHOSTUNREACH:  # the client left before its answer
                    raise
                continue
            for frame in reply[:-1]:
                send(frame, SNDMORE, copy=False)
            send(reply[-1], copy=False)
        if not queue:
            del self.pending[client]
            if not self.held_by_client.get(client):
                self.held_by_client.pop(client, None)

    # -- workers --------------------------------------------------------------
    def from_workers(self, now: float) -> None:
        recv = self.back_calls.recv
        workers = self.workers
        for _ in range(BATCH):
            try:
                worker_id = recv(NOBLOCK)
            except zmq.Again:
                return
            first = recv(0, copy=False)
            header = first.bytes
            frames: Frames = []
            size = 0
            more = first.more
            while more:
                frame = recv(0, copy=False)
                more = frame.more
                size += len(frame)
                frames.append(frame)
            worker = workers.get(worker_id)
            if header[:9] == mew.REPLY:  # from a worker out of the pool too: the holder is what counts
                if worker is not None:
                    worker.heard = now
                self.on_reply(worker, worker_id, header[9:], frames, size)
            elif worker is not None:
                worker.heard = now
                if header.startswith(mew.READY):
                    if worker.held:
                        self.leave(worker_id, "it said READY while holding requests", refuse=True)
                        self.counts["refused"] += 1
                elif header == mew.BYE:
                    self.goodbye(worker)
            elif worker_id in self.gone:
                continue
            elif header.startswith((mew.READY, mew.HEARTBEAT)):
                window = mew.window_of(header)
                if window is None:
                    self.warn("refused", "worker %s refused: bad window in %r", name(worker_id), header[:40])
                else:
                    self.join(worker_id, window, now)
            elif header == mew.OLD_PROTOCOL:
                self.ban(worker_id)
                self.warn(
                    "refused",
                    "worker %s refused: it speaks MEW1 (an older myecho); upgrade it to speak MEW2",
                    name(worker_id),
                )
            else:
                self.rt.log.debug("not MEW2 from %s: ignored", name(worker_id))

    def on_reply(self, worker: Worker | None, worker_id: bytes, request_id: bytes, frames: Frames, size: int) -> None:
        """Forward a reply if it comes from the worker that holds the request."""
        request = self.unanswered.get(request_id)
        if request is None or request.holder != worker_id or not frames:
            self.counts["late"] += 1  # answered already, given up, another's, or never ours
            return
        if size > self.max_message:
            self.warn("too-big", "worker %s sent a reply over %d bytes", name(worker_id), self.max_message)
            self.leave(worker_id, "it sent a reply over the message limit", refuse=True)
            return
        if worker is not None and worker.held.pop(request_id, None) is not None:
            count = len(worker.held)
            levels = self.levels
            if count + 1 < len(levels):
                levels[count + 1].pop(worker_id, None)
            if count < worker.window and not worker.leaving:
                levels[count][worker_id] = worker  # it was filed one level up, or full: that level exists
            elif worker.leaving and not count:
                self.leave(worker_id, "it said goodbye")
        elif request in self.waiting:  # a worker given up on answered first: take its answer
            self.waiting.remove(request)
        del self.unanswered[request_id]
        request.done = True
        request.frames = None  # the request's bytes are freed now
        stats = self.rt.stats
        stats.messages += 1
        stats.bytes += size
        client = request.client
        queue = self.pending[client]
        if len(queue) == 1:  # the usual case (a REQ client): straight out, nothing kept
            change = -request.size
            self.held_total += change
            self.held_by_client[client] += change
            request.size = 0
            request.reply = frames
            self.flush(client, queue)
        else:
            self.settle(request, frames, size + OVERHEAD)

    def goodbye(self, worker: Worker) -> None:
        """BYE: send it nothing more; what it holds it answers (or loses by the hold timeout)."""
        worker.leaving = True
        count = len(worker.held)
        if count < len(self.levels):
            self.levels[count].pop(worker.id, None)
        if not count:
            self.leave(worker.id, "it said goodbye")

    def heartbeat(self) -> None:
        """HB to every worker; a send that fails finds the dead at once.

        EHOSTUNREACH: the connection is gone. EAGAIN: it is closing (libzmq
        holds a dying pipe until its last messages are read), or the worker
        left a thousand messages unread, which a live one never does."""
        for worker_id in list(self.workers):
            try:
                self.backend.send_multipart([worker_id, mew.HEARTBEAT], NOBLOCK)
            except zmq.ZMQError as error:
                self.lost(worker_id, error)

    def lost(self, worker_id: bytes, error: zmq.ZMQError) -> None:
        """A worker whose connection is gone: it will not come back under this identity."""
        self.leave(worker_id, f"its connection is gone ({error.strerror})", refuse=True)

    def deadlines(self, now: float) -> None:
        """Silent workers and workers past the hold timeout leave; late requests fail."""
        patience, hold = self.timing.patience, self.hold_timeout
        for worker in list(self.workers.values()):
            if worker.heard + patience <= now:
                self.leave(worker.id, f"silent for {patience:g} s")
            elif worker.held and next(iter(worker.held.values()))[1] + hold <= now:
                self.counts["hung"] += 1
                self.leave(worker.id, f"it held a request for over {hold:g} s", refuse=True)
        for queue in list(self.pending.values()):
            while queue and not queue[0].done and queue[0].deadline <= now:
                request = queue[0]
                if request.holder is not None and request.holder in self.workers:
                    worker = self.workers[request.holder]
                    if worker.held.pop(request.id, None) is not None:
                        count = len(worker.held)
                        if count + 1 < len(self.levels):
                            self.levels[count + 1].pop(worker.id, None)
                        self.credit(worker, count)
                self.fail(request, b"timeout", f"not answered within {self.request_timeout:g} s")

    def on_monitors(self) -> None:
        """Connections come and go (the fronts count clients and pause accepting); a worker's gone: look."""
        if any(kind == zmq.EVENT_DISCONNECTED for kind, _ in self.back.events()):
            # libzmq drops the pipe a few hops after the event: look now, then again
            now = time.monotonic()
            self.probes = [now + delay for delay in PROBES]
            self.heartbeat()
        self.front.events()

    # -- the loop -------------------------------------------------------------
    def attach(self) -> tuple[list[str], list[str]]:
        """Bind (or connect) both sockets. Their listening sockets are ours
        (systemd's, else one on host:port and host:11145, as the zmq model's),
        so that accepting can pause at the fd limit; URLs given are libzmq's own."""
        rt = self.rt
        settings = rt.settings
        frontend, backend = default_endpoints(rt)
        front = [rt.listeners[n] for n in _roles(rt, "frontend")]
        back = [rt.listeners[n] for n in _roles(rt, "backend")]
        try:
            if not front and not settings.broker_frontend:
                front, frontend = [bind_tcp(settings.host, settings.port, settings.backlog)], []
            if not back and not settings.broker_backend:
                back, backend = [bind_tcp(settings.host, BROKER_BACKEND_PORT, settings.backlog)], []
        except ListenError as error:
            raise EndpointError(str(error)) from None
        front_where = self.front.bind(front, []) + attach(self.frontend, frontend, BIND)
        back_where = self.back.bind(back, []) + attach(self.backend, backend, BIND)
        rt.listeners = []
        return front_where, back_where

    def status(self) -> None:
        count = len(self.workers)
        busy = sum(1 for worker in self.workers.values() if worker.held)
        detail = (
            f"{count} worker{'' if count == 1 else 's'} ({busy} busy), {len(self.unanswered)} in the broker "
            f"({self.held_total} bytes), {self.counts['retried']} retried"
        )
        for kind, label in (
            ("late", "late replies dropped"),
            ("hung", "workers over the hold timeout"),
            ("timeout", "timed out"),
            ("tries", "given up after tries"),
            ("too-big", "too big"),
            ("busy", "over a byte limit"),
            ("refused", "workers refused"),
        ):
            if self.counts[kind]:
                detail += f", {self.counts[kind]} {label}"
        self.rt.stats.detail = detail

    def housekeeping(self, now: float) -> float:
        """The timers: probes, deadlines, heartbeats, STATUS, accept pauses; when they want us next."""
        rt = self.rt
        resume_in = self.back.tick()
        if not self.closing:
            resume_in = min(resume_in, self.front.tick())
        if self.probes and now >= self.probes[0]:
            self.probes.pop(0)
            self.heartbeat()
        if now >= self.next_tick:
            self.deadlines(now)
            self.next_tick = now + TICK
            if self.waiting:
                self.dispatch(now)
        if now >= self.next_heartbeat:
            self.heartbeat()
            self.next_heartbeat = now + self.timing.interval
        if now >= self.next_status:
            self.status()
            self.next_status = now + STATUS_EVERY
        rt.tick()
        wake = min(self.next_heartbeat, self.next_status, now + rt.timeout(), now + resume_in)
        if self.probes:
            wake = min(wake, self.probes[0])
        if self.unanswered:
            wake = min(wake, self.next_tick)
        return wake

    def serve(self) -> None:
        """One zmq_poll per wake-up: both sockets read in batches, then what waits dispatched;
        the timers only when their turn comes."""
        rt = self.rt
        front_where, back_where = self.attach()
        frontend, backend, signals = self.frontend, self.backend, rt.signals.fileno()
        items: list[tuple[Any, int]] = [
            (backend, POLLIN),
            (frontend, POLLIN),
            (self.back.monitor, POLLIN),
            (self.front.monitor, POLLIN),
            (signals, POLLIN),
        ]
        poll, monotonic = zmq.zmq_poll, time.monotonic
        rt.ready(f"clients on {', '.join(front_where)}, workers on {', '.join(back_where)}")
        quiet_since = None
        due = 0.0
        while True:
            now = monotonic()
            if now >= due:
                due = self.housekeeping(now)
            wait = due - now
            if rt.stopping:
                wait = min(wait, DRAIN_IDLE)
            heard = False  # from clients
            for sock, _ in poll(items, int(wait * 1000) + 1):
                if sock is backend:
                    self.from_workers(monotonic())
                elif sock is frontend:
                    self.take_requests(monotonic())
                    heard = True
                elif sock is self.back.monitor or sock is self.front.monitor:
                    self.on_monitors()
                    due = 0.0  # probes, or an accept pause begun or ended
                else:  # the signals
                    rt.on_signals()
                    # Stopping: the clients keep their connections (an unbind would close them, and the
                    # replies in flight with them); new requests get the error reply, the others their answers.
                    if rt.stopping and not self.closing:
                        self.front.stop_accepting()  # no new connection: the door closed, not unbound
                    self.closing = rt.stopping
                    due = 0.0
            if self.waiting:
                self.dispatch(monotonic())
            if self.unanswered and self.next_tick < due:
                due = self.next_tick
            if rt.stopping:
                now = monotonic()
                if heard or self.unanswered:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = now
                if rt.grace_expired() or (quiet_since is not None and now - quiet_since >= DRAIN_IDLE):
                    break
        self.give_up_all()
        self.close()

    def give_up_all(self) -> None:
        """Stopping with requests unanswered (the grace period is over): their clients hear why."""
        for queue in list(self.pending.values()):
            for request in list(queue):
                if not request.done:
                    self.fail(request, b"stopping", "the broker is stopping")

    def close(self) -> None:
        linger = max(0.0, self.rt.stop_deadline - time.monotonic())
        self.back.close(0.0)
        # At least a moment for the last replies (the error replies of give_up_all), at most a second.
        self.front.close(min(max(linger, LAST_WORDS), 1.0))


def serve(runtime: Runtime) -> None:
    Broker(runtime).serve()
