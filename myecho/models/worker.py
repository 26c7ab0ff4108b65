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
import time
from collections.abc import Callable
from typing import Any

import zmq

from myecho.core import curve
from myecho.core.endpoints import BIND, CONNECT, attach, split
from myecho.core.runtime import Runtime
from myecho.core.settings import BROKER_BACKEND_PORT
from myecho.core.sockets import Listeners
from myecho.core.zmqfront import EVENTS, NOBLOCK, NOBLOCK_SNDMORE, POLLIN, SNDMORE, calls
from myecho.models import mew
from myecho.models.zmq import BATCH, DRAIN_IDLE

#: None: it connects to the broker (libzmq binds an @URL itself).
LISTENERS = Listeners(systemd=False, bind=False)
PREFORK = False

Context = zmq.Context[zmq.Socket[bytes]]
DEFAULT_CONNECT = f"tcp://127.0.0.1:{BROKER_BACKEND_PORT}"
_sockets = itertools.count()


class EchoWorker:
    """One worker, driven by its Runtime: settings, signals, stop, STATUS.

    What it uses of the Runtime is ``settings``, ``log``, ``stats``,
    ``signals``, ``on_signals``, ``ready``, ``timeout``, ``tick``,
    ``stopping`` and ``stop_deadline``; a worker in a thread (signals
    belong to the main thread) is driven by an object with those."""

    def __init__(self, runtime: Runtime, context: Context | None = None) -> None:
        settings = runtime.settings
        self.action, self.url = split(settings.worker_connect or DEFAULT_CONNECT, CONNECT)
        self.timing = mew.Timing(settings.heartbeat, settings.liveness)
        self.window = settings.window
        self.max_message = settings.max_message
        self.hello = str(self.window).encode()
        self.context = context or zmq.Context.instance()
        self.rt = runtime
        self.log = runtime.log
        self.stats = runtime.stats
        self.sock: zmq.Socket[bytes] | None = None
        # The socket's recv, send and get (zmqfront.calls), bound in open().
        self.recv: Callable[..., Any] = self.say
        self.send: Callable[..., Any] = self.say
        self.get: Callable[..., Any] = self.say
        self.poller = zmq.Poller()
        self.poller.register(runtime.signals.fileno(), zmq.POLLIN)
        self.heard = time.monotonic()
        self.identity = ""

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
        own = calls(sock)
        self.recv, self.send, self.get = own.recv, own.send, own.get
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
        """Echo what the broker sent, each frame sent on as it is read; True if it said anything.

        Called when a poll said a message waits; after it, libzmq is asked
        once (ZMQ_EVENTS) whether another does, and a longer drain ends on
        ``zmq.Again``: one exception per drain costs less than a query per
        message (each makes libzmq read its command mailbox)."""
        assert self.sock is not None
        recv, send, get = self.recv, self.send, self.get
        count = messages = nbytes = 0
        while count < BATCH:
            if count == 1 and not get(EVENTS) & POLLIN:
                break
            try:
                first = recv(NOBLOCK, copy=False)
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
            messages += 1
            while more:
                frame = recv(0, copy=False)
                more = frame.more
                nbytes += len(frame)
                send(frame, SNDMORE if more else 0, copy=False)
        if count:
            self.heard = time.monotonic()
            self.stats.messages += messages
            self.stats.bytes += nbytes
        return count > 0

    def wait(self, seconds: float) -> dict[object, int]:
        """Poll for up to ``seconds``, acting on signals."""
        events = dict(self.poller.poll(int(max(0.0, seconds) * 1000)))
        if self.rt.signals.fileno() in events:
            self.rt.on_signals()
        return events

    def pause(self, seconds: float) -> None:
        """Sleep between two attempts, still answering signals."""
        deadline = time.monotonic() + seconds
        while not self.rt.stopping and (left := deadline - time.monotonic()) > 0:
            self.wait(min(left, self.rt.timeout()))
            self.rt.tick()

    def serve(self) -> None:
        rt = self.rt
        where = self.open()
        how = "bound, waiting for the broker" if self.action == BIND else "the broker"
        rt.ready(f"{where.lstrip(CONNECT)} ({how}), as {self.identity}")
        attempt = 0
        next_beat = time.monotonic() + self.timing.interval
        while not rt.stopping:
            now = time.monotonic()
            deadline = min(next_beat, self.heard + self.timing.patience)
            events = self.wait(min(deadline - now, rt.timeout()))
            if self.sock in events and self.work():
                attempt = 0
            now = time.monotonic()
            if now >= self.heard + self.timing.patience and not rt.stopping and not self.last_chance():
                self.restart(attempt)
                attempt += 1
                next_beat = time.monotonic() + self.timing.interval
            if now >= next_beat:
                self.say(mew.HEARTBEAT + b" " + self.hello)
                next_beat = now + self.timing.interval
                self.stats.detail = f"broker last heard {now - self.heard:.1f} s ago"
            rt.tick()
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
        if not self.rt.stopping:
            self.open()

    def leave(self) -> None:
        """BYE, answer what already came, close."""
        if self.sock is None:
            return
        self.say(mew.BYE)
        deadline = self.rt.stop_deadline
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(min(left, DRAIN_IDLE) * 1000), zmq.POLLIN):
                break
            self.work()
        self.close(max(0.0, min(1.0, deadline - time.monotonic())))


def serve(runtime: Runtime) -> None:
    EchoWorker(runtime).serve()
