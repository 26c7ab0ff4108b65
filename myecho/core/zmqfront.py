"""The ZeroMQ ROUTER that clients connect to, shared by the zmq model and the broker.

Both serve clients on a ROUTER socket and need the same things around it,
written here once: the socket's options, binding to listening sockets of
ours (systemd's, through ZMQ_USE_FD) or to URLs, counting connections from
libzmq's monitor events, pausing accepting below the file-descriptor limit
(``AcceptPause``) and a rate-limited log of dropped replies.

At the file-descriptor limit libzmq's accept fails and its I/O thread
would retry at once, for ever: ``AcceptPause`` closes the door of our
listening sockets for a moment (a socket filter: clients retry their SYN,
as with a full backlog) and stops accepting below the fd limit in the first
place.

The hot loops use ``calls()``: the socket's recv, send and get as pyzmq's
Cython layer defines them, without the Python methods above it; should a
pyzmq lay itself out otherwise, the public methods (checked once, at import).
"""

import contextlib
import ctypes
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from myecho.core.runtime import Stats
from myecho.core.sockets import raise_fd_limit, zmq_endpoint

HIGH_WATER = 1000
#: How long accepting pauses after libzmq failed to accept (EMFILE, ENFILE...).
ACCEPT_PAUSE = 0.1
#: Descriptors kept free below the fd limit: libzmq's own, logs, a reload.
FD_MARGIN = 64
LOG_EVERY = 10.0
NOBLOCK, SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)  # plain ints: an IntFlag's | costs a microsecond
NOBLOCK_SNDMORE = NOBLOCK | SNDMORE
POLLIN, EVENTS, RCVMORE, SRCFD = int(zmq.POLLIN), int(zmq.EVENTS), int(zmq.RCVMORE), int(zmq.SRCFD)
ACCEPTED, DISCONNECTED = int(zmq.EVENT_ACCEPTED), int(zmq.EVENT_DISCONNECTED)
_EVENT = struct.Struct("=HI")  # a monitor event's first frame: event (16 bits), value (32 bits)


def _drop_all_filter() -> tuple[bytes, ctypes.Array[ctypes.c_char]]:
    """A classic BPF program of one instruction, ``ret #0``: drop every packet."""
    program = ctypes.create_string_buffer(struct.pack("=HBBI", 0x06, 0, 0, 0), 8)  # BPF_RET | BPF_K, 0
    return struct.pack("@HP", 1, ctypes.addressof(program)), program


SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27


@dataclass
class Endpoint:
    """Where a ROUTER accepts: a listening socket of ours (ZMQ_USE_FD), or a URL."""

    url: str
    sock: socket.socket | None = None
    bound: str = ""  # LAST_ENDPOINT
    closed: bool = False  # to new connections

    def bind(self, router: zmq.Socket[bytes]) -> None:
        if self.sock is not None:
            # The filter lives on the socket, which systemd shares: one left by
            # a process killed while paused must not keep everyone out.
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
            router.setsockopt(zmq.USE_FD, os.dup(self.sock.fileno()))  # libzmq closes its copy
        try:
            router.bind(self.url)
        finally:
            if self.sock is not None:
                router.setsockopt(zmq.USE_FD, -1)
        self.bound = router.getsockopt_string(zmq.LAST_ENDPOINT)

    def close_door(self, closed: bool) -> bool:
        """Let no new connection in (or let them in again), keeping the ones
        made: a socket filter that drops every packet on our listening socket
        (SYNs and handshakes' last ACKs), so clients retry their SYN as when
        a backlog is full. Unbinding instead would end every connection
        accepted on the endpoint (libzmq's sessions belong to its listener).
        False where this cannot be done (a URL libzmq bound itself)."""
        if self.sock is None:
            return False
        if closed != self.closed:
            try:
                if closed:
                    fprog, program = _drop_all_filter()
                    self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
                    del program  # the kernel copied it
                else:
                    self.sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
            except OSError:
                return False
            self.closed = closed
        return True

    def reject_waiting(self, reserve: "Reserve") -> int:
        """Accept and close what waits in the backlog (at EMFILE, with a
        reserved descriptor): what libzmq cannot accept, it retries at once."""
        if self.sock is None:
            return 0
        rejected = 0
        self.sock.setblocking(False)
        for _ in range(4096):
            reserve.release()
            try:
                conn, _ = self.sock.accept()
            except OSError:  # empty (EAGAIN), or libzmq took the descriptor first
                break
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            conn.close()
            rejected += 1
        reserve.take()
        return rejected


class Reserve:
    """One descriptor kept aside, to free when the process is out of them."""

    def __init__(self) -> None:
        self.fd = -1
        self.take()

    def take(self) -> None:
        if self.fd < 0:
            with contextlib.suppress(OSError):
                self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def bind_endpoints(router: zmq.Socket[bytes], listeners: list[socket.socket], urls: list[str]) -> list[Endpoint]:
    """Bind to the sockets we were handed (kept: see ``Endpoint.close_door``) and to other endpoints."""
    endpoints = [Endpoint(zmq_endpoint(sock), sock) for sock in listeners] + [Endpoint(url) for url in urls]
    for endpoint in endpoints:
        endpoint.bind(router)
    return endpoints


def connection_limit(backlog: int) -> int:
    """Connections a ROUTER may hold: the fd limit (raised to the hard one)
    minus what may still come from the backlogs once the door is closed,
    minus a margin for everything else."""
    soft = raise_fd_limit()
    with contextlib.suppress(OSError, ValueError):
        backlog = min(backlog, int(Path("/proc/sys/net/core/somaxconn").read_text()))
    return max(16, soft - backlog - FD_MARGIN)


class AcceptPause:
    """Accepting on a ROUTER, paused below the fd limit instead of spinning.

    libzmq accepts in its I/O thread, without a limit, and when accept()
    fails (EMFILE...) it reports EVENT_ACCEPT_FAILED and tries again at
    once, for ever, using a core. Feed this the ROUTER's monitor events
    (``MONITOR_EVENTS``) with ``event`` and call ``tick`` from the loop (it
    returns how long until it wants to be called again): at ``limit`` open
    connections it closes the endpoints' door (``Endpoint.close_door``) and
    opens it again when there is room; after a failed accept it also
    rejects what waits in the backlogs, so libzmq has nothing left to retry.
    ``close`` at a graceful stop, ``finish`` once the ROUTER is closed."""

    MONITOR_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPT_FAILED

    def __init__(self, endpoints: list[Endpoint], log: logging.Logger, limit: int) -> None:
        self.endpoints = endpoints
        self.log = log
        self.limit = limit
        self.open = 0
        self.paused_until = 0.0  # after a failed accept
        self.paused = False
        self.last_log = 0.0
        self.reserve = Reserve()

    def event(self, kind: int, value: int) -> None:
        """One monitor event: its kind (``zmq.EVENT_*``) and value (an fd, or an errno)."""
        if kind == zmq.EVENT_ACCEPTED:
            self.open += 1
            if self.open >= self.limit:
                self.pause(f"{self.open} connections, the limit below the fd limit")
        elif kind == zmq.EVENT_DISCONNECTED:
            self.open = max(0, self.open - 1)
        elif kind == zmq.EVENT_ACCEPT_FAILED:
            self.paused_until = time.monotonic() + ACCEPT_PAUSE
            self.pause(f"accept: {os.strerror(value)}")
            rejected = sum(endpoint.reject_waiting(self.reserve) for endpoint in self.endpoints)
            if rejected:
                self.log.warning("out of descriptors: %d waiting connections refused", rejected)

    def pause(self, why: str) -> None:
        if self.paused:
            return
        self.paused = True
        closed = [endpoint.close_door(True) for endpoint in self.endpoints]
        now = time.monotonic()
        if now - self.last_log >= 10:
            self.last_log = now
            self.log.warning("%s: accepting paused%s", why, "" if all(closed) else " (not on --listen endpoints)")

    def tick(self) -> float:
        """Open the door again when the pause is over and there is room; seconds until the next check."""
        if not self.paused:
            return float("inf")
        left = self.paused_until - time.monotonic()
        if left > 0:
            return left
        if self.open >= self.limit * 0.9:  # some room first: no flapping at the limit
            return ACCEPT_PAUSE
        for endpoint in self.endpoints:
            endpoint.close_door(False)
        self.paused = False
        self.log.info("accepting again (%d connections)", self.open)
        return float("inf")

    def close(self, router: zmq.Socket[bytes]) -> None:
        """No new connection from now on; the ones made stay (a graceful
        stop), except on URL endpoints, which can only be unbound."""
        for endpoint in self.endpoints:
            if not endpoint.close_door(True) and endpoint.bound:
                with contextlib.suppress(zmq.ZMQError):
                    router.unbind(endpoint.bound)
        self.paused = True
        self.reserve.release()

    def finish(self) -> None:
        """Once the ROUTER is closed: lift the filters and close our listening
        sockets (systemd's copies then queue new connections for the next start)."""
        for endpoint in self.endpoints:
            if endpoint.sock is not None:
                endpoint.close_door(False)
                endpoint.sock.close()


def _cython_socket() -> type | None:
    """pyzmq's Cython socket class, if ``zmq.Socket`` is built on it with the calls we use."""
    base = getattr(getattr(zmq, "backend", None), "Socket", None)
    if not isinstance(base, type) or not issubclass(zmq.Socket, base):
        return None
    if not all(hasattr(getattr(base, call, None), "__get__") for call in ("recv", "send", "get")):
        return None
    return base


#: Checked once: None means the public methods serve (slower, same results).
CYTHON_SOCKET = _cython_socket()


@dataclass(frozen=True)
class Calls:
    """One socket's recv, send and get (getsockopt), bound, as cheap as this pyzmq offers."""

    recv: Callable[..., Any]
    send: Callable[..., Any]
    get: Callable[[int], Any]


def calls(sock: zmq.Socket[bytes], base: type | None = CYTHON_SOCKET) -> Calls:
    """The Cython layer's own calls for ``sock`` (pyzmq's Python ``send``
    wrapper costs a third more per frame), or the public methods."""
    if base is None or not isinstance(sock, base):
        return Calls(sock.recv, sock.send, sock.getsockopt)
    return Calls(base.recv.__get__(sock), base.send.__get__(sock), base.get.__get__(sock))  # type: ignore[attr-defined]


class Front:
    """A ROUTER that peers connect to: its options, endpoints, connection count and drop log.

    ``bind`` it, poll ``router`` and ``monitor``; on a monitor event call
    ``events`` (it counts connections into ``stats`` and feeds the accept
    pause); call ``tick`` from the loop (seconds until it wants the next);
    ``stop_accepting`` at a graceful stop, ``close`` at the end."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        log: logging.Logger,
        stats: Stats | None,
        *,
        max_frame: int,
        backlog: int,
        send_high_water: int | None = HIGH_WATER,
        receive_high_water: int | None = None,
        secure: Callable[[zmq.Socket[bytes]], None] | None = None,
    ) -> None:
        self.log = log
        self.stats = stats  # None: connections not counted (the broker's workers)
        self.backlog = backlog
        self.router = router = context.socket(zmq.ROUTER)
        if secure is not None:
            secure(router)
        # No ROUTER_HANDOVER: a second connection with a routing id in use is refused by libzmq.
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.MAXMSGSIZE, max_frame)
        if send_high_water is not None:
            router.setsockopt(zmq.SNDHWM, send_high_water)
        if receive_high_water is not None:
            router.setsockopt(zmq.RCVHWM, receive_high_water)
        router.setsockopt(zmq.BACKLOG, backlog)
        self.monitor = router.get_monitor_socket(AcceptPause.MONITOR_EVENTS)
        self.monitor_calls = calls(self.monitor)
        self.accepting = AcceptPause([], log, connection_limit(backlog))
        self.last_drop_log = -LOG_EVERY

    def bind(self, listeners: list[socket.socket], urls: list[str]) -> list[str]:
        """Listen on our sockets (kept: see ``Endpoint.close_door``) and on URLs; where, as libzmq says."""
        if any(listener.family == socket.AF_INET6 for listener in listeners):
            self.router.setsockopt(zmq.IPV6, 1)
        endpoints = bind_endpoints(self.router, listeners, urls)
        self.accepting.endpoints.extend(endpoints)
        return [endpoint.bound for endpoint in endpoints]

    def events(self) -> list[tuple[int, int]]:
        """The monitor's events so far, as (event, value), once counted and fed to the accept pause.

        Read and decoded here (two frames: the event and its value packed,
        then the endpoint), a burst of a thousand new connections being a
        thousand events: pyzmq's ``recv_monitor_message`` builds two enum
        members and a dict for each."""
        seen: list[tuple[int, int]] = []
        stats, recv, get, unpack = self.stats, self.monitor_calls.recv, self.monitor_calls.get, _EVENT.unpack
        while get(EVENTS) & POLLIN:
            head = recv(NOBLOCK)
            while get(RCVMORE):
                recv(NOBLOCK)  # the endpoint
            if len(head) != _EVENT.size:
                continue
            kind, value = unpack(head)
            self.accepting.event(kind, value)
            if stats is not None:
                if kind == ACCEPTED:
                    stats.connection_opened()
                elif kind == DISCONNECTED:
                    stats.open -= 1
            seen.append((kind, value))
        return seen

    def dropped(self, why: str) -> None:
        """A reply not sent (a client that does not read, a message over the bound):
        counted, logged at most every ten seconds."""
        if self.stats is not None:
            self.stats.dropped += 1
        now = time.monotonic()
        if now - self.last_drop_log >= LOG_EVERY:
            self.last_drop_log = now
            self.log.warning("reply dropped: %s", why)

    def tick(self) -> float:
        return self.accepting.tick()

    def stop_accepting(self) -> None:
        """No new connection; the ones made stay, with what is in flight."""
        self.accepting.close(self.router)

    def close(self, linger: float) -> None:
        """Close the ROUTER (letting replies go for ``linger`` seconds) and our listening sockets."""
        self.router.disable_monitor()
        self.monitor.close(linger=0)
        self.router.close(linger=int(linger * 1000))
        self.accepting.finish()
