"""The worker model: one echo worker for a broker, on any host.

A DEALER socket connects to the broker's backend (``--connect URL``, or
``MYECHO_WORKER_CONNECT`` in the config file; ``@URL`` binds instead and
lets the broker connect) and speaks MEW2 (``myecho.models.mew``):
READY with its window (``--window``: how many requests the broker may send
it before the first is answered), then each request's frames echoed frame
for frame as they are read, without copying them, heartbeats both ways.
When the broker falls silent for ``liveness`` heartbeats the worker starts
afresh: new socket, new identity, READY; so a restarted broker, or
one that came back on another host behind the same name, finds its workers
again without anyone restarting them.

On SIGTERM the worker says BYE (the broker sends it nothing more), answers
what already reached it, and exits.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from myecho.core import curve
from myecho.core.endpoints import BIND, CONNECT, attach, split
from myecho.core.runtime import Runtime, Stats
from myecho.core.settings import BROKER_BACKEND_PORT
from myecho.core.sockets import Listeners
from myecho.models import mew
from myecho.models.broker import NOBLOCK_SNDMORE, SNDMORE, raw_send
from myecho.models.zmq import BATCH, DRAIN_IDLE, MAX_MESSAGE

#: None: it connects to the broker (libzmq binds an @URL itself).
LISTENERS = Listeners(systemd=False, bind=False)
PREFORK = False

Context = zmq.Context[zmq.Socket[bytes]]
DEFAULT_CONNECT = f"tcp://127.0.0.1:{BROKER_BACKEND_PORT}"
_sockets = itertools.count()


class EchoWorker:
    """One worker. Runs under a Runtime (``myecho serve worker``), or in a
    thread of a test with a ``threading.Event`` to stop it."""

    def __init__(
        self,
        endpoint: str,
        timing: mew.Timing,
        context: Context | None = None,
        runtime: Runtime | None = None,
        stop: threading.Event | None = None,
        window: int = 32,
        max_message: int = MAX_MESSAGE,
    ) -> None:
        self.action, self.url = split(endpoint, CONNECT)
        self.timing = timing
        self.window = window
        self.max_message = max_message
        self.hello = str(window).encode()
        self.context = context or zmq.Context.instance()
        self.rt = runtime
        self.stop = stop
        self.log = runtime.log if runtime is not None else logging.getLogger("myecho")
        self.stats = runtime.stats if runtime is not None else Stats()
        self.sock: zmq.Socket[bytes] | None = None
        self.recv: Callable[..., Any] = self.say  # the socket's recv and send (raw_send), bound in open()
        self.send: Callable[..., Any] = self.say
        self.poller = zmq.Poller()
        if runtime is not None:
            self.poller.register(runtime.signals.fileno(), zmq.POLLIN)
        self.heard = time.monotonic()
        self.identity = ""

    @property
    def stopping(self) -> bool:
        if self.rt is not None:
            return self.rt.stopping
        return self.stop is not None and self.stop.is_set()

    def open(self) -> str:
        """A fresh DEALER, attached, having said READY."""
        self.identity = f"{socket.gethostname()}/{os.getpid()}/{next(_sockets)}"
        sock = self.context.socket(zmq.DEALER)
        curve.secure_worker(sock, self.rt)
        sock.setsockopt(zmq.ROUTING_ID, self.identity.encode())
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message + mew.ENVELOPE)
        sock.setsockopt(zmq.LINGER, 0)
        where = attach(sock, [self.action + self.url], CONNECT)
        self.sock = sock
        self.recv, self.send = sock.recv, raw_send(sock)
        self.poller.register(sock, zmq.POLLIN)
        self.say(mew.READY + self.hello)
        self.heard = time.monotonic()
        return where[0]

    def close(self, linger: float = 0.0) -> None:
        if self.sock is not None:
            self.poller.unregister(self.sock)
            self.sock.close(linger=int(linger * 1000))
            self.sock = None

    def say(self, header: bytes) -> None:
        """Send, never block: what cannot go now is lost and retried by the broker."""
        assert self.sock is not None
        with contextlib.suppress(zmq.Again):  # bound, no broker yet: the next HB registers us
            self.sock.send(header, zmq.NOBLOCK)

    def work(self) -> bool:
        """Echo what the broker sent, each frame sent on as it is read; True if it said anything."""
        assert self.sock is not None
        recv, send = self.recv, self.send
        stats = self.stats
        count = 0
        while count < BATCH:
            try:
                first = recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            count += 1
            more = first.more
            header = first.bytes
            if not more or header[:9] != mew.REQUEST:
                while more:  # HB (or noise): being heard is all it does
                    more = recv(0, copy=False).more
                continue
            try:
                send(mew.REPLY + header[9:], NOBLOCK_SNDMORE)
            except zmq.Again:  # the broker does not read: it retries what we drop
                while more:
                    more = recv(0, copy=False).more
                continue
            stats.messages += 1
            while more:
                frame = recv(0, copy=False)
                more = frame.more
                stats.bytes += len(frame)
                send(frame, SNDMORE if more else 0, copy=False)
        if count:
            self.heard = time.monotonic()
        return count > 0

    def wait(self, seconds: float) -> dict[object, int]:
        """Poll for up to ``seconds``, acting on signals and the stop event."""
        if self.stop is not None:
            seconds = min(seconds, 0.1)
        events = dict(self.poller.poll(int(max(0.0, seconds) * 1000)))
        if self.rt is not None and self.rt.signals.fileno() in events:
            self.rt.on_signals()
        return events

    def pause(self, seconds: float) -> None:
        """Sleep between two attempts, still answering signals."""
        deadline = time.monotonic() + seconds
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            self.wait(left)
            if self.rt is not None:
                self.rt.tick()

    def serve(self) -> None:
        where = self.open()
        how = "bound, waiting for the broker" if self.action == BIND else "the broker"
        where = f"{where.lstrip(CONNECT)} ({how}), as {self.identity}"
        if self.rt is not None:
            self.rt.ready(where)
        else:
            self.log.info("worker serving on %s", where)
        attempt = 0
        next_beat = time.monotonic() + self.timing.interval
        while not self.stopping:
            now = time.monotonic()
            deadline = min(next_beat, self.heard + self.timing.patience)
            limit = self.rt.timeout() if self.rt is not None else 1.0
            events = self.wait(min(deadline - now, limit))
            if self.sock in events and self.work():
                attempt = 0
            now = time.monotonic()
            if now >= self.heard + self.timing.patience and not self.stopping and not self.last_chance():
                self.restart(attempt)
                attempt += 1
                next_beat = time.monotonic() + self.timing.interval
            if now >= next_beat:
                self.say(mew.HEARTBEAT + b" " + self.hello)
                next_beat = now + self.timing.interval
                self.stats.detail = f"broker last heard {now - self.heard:.1f} s ago"
            if self.rt is not None:
                self.rt.tick()
        self.leave()

    def last_chance(self) -> bool:
        """One more interval of listening before the broker counts as gone.

        The silence may be ours: a worker stopped (SIGSTOP, a suspended VM)
        wakes up with every deadline past, before libzmq's I/O thread has
        read what the broker sent meanwhile. Then it answers what it holds,
        late (the broker drops that answer if another worker gave it)."""
        assert self.sock is not None
        return bool(self.sock.poll(int(self.timing.interval * 1000), zmq.POLLIN) and self.work())

    def restart(self, attempt: int) -> None:
        """The broker is silent: start afresh (a bound worker just waits)."""
        silence = time.monotonic() - self.heard
        level = logging.WARNING if attempt == 0 else logging.DEBUG
        self.log.log(level, "broker silent for %.1f s: reconnecting (attempt %d)", silence, attempt + 1)
        if self.action == BIND:
            self.heard = time.monotonic()
            return
        self.close()
        self.pause(self.timing.backoff(attempt))
        if not self.stopping:
            self.open()

    def leave(self) -> None:
        """BYE, answer what already came, close."""
        if self.sock is None:
            return
        self.say(mew.BYE)
        deadline = self.rt.stop_deadline if self.rt is not None else time.monotonic() + 1.0
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(min(left, DRAIN_IDLE) * 1000), zmq.POLLIN):
                break
            self.work()
        linger = 1.0 if self.rt is None else max(0.0, min(1.0, self.rt.stop_deadline - time.monotonic()))
        self.close(linger)


def serve(runtime: Runtime) -> None:
    settings = runtime.settings
    timing = mew.Timing(settings.heartbeat, settings.liveness)
    EchoWorker(
        settings.worker_connect or DEFAULT_CONNECT,
        timing,
        runtime=runtime,
        window=settings.window,
        max_message=settings.max_message,
    ).serve()
