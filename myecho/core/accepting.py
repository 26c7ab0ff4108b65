"""Accepting connections, the same way in every model that accepts them.

The listening sockets sit in the model's selector only while the model has
room: at its limit (max children, max connections) they leave it, and new
connections wait in the kernel's backlog instead of being refused. Running
out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) pauses
accepting for a moment: the pending connection stays readable, so a loop
that simply tried again would spin a core and log without end.
"""

import errno
import logging
import select
import selectors
import socket
import struct
import time
from typing import Any, Protocol

from myecho.core.runtime import Runtime
from myecho.core.sockets import format_address

PAUSE = 0.1
RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: The selector data that marks a listening socket.
LISTENER = "listener"
#: Under pressure, a connection silent for less than this is never shed: a
#: client in the middle of an exchange (send, read the echo, send again) is
#: not silent that long, an idle-connection flood always is.
SHED_FLOOR = 0.05
#: How long connections wait behind a full model before its idle ones are shed.
SHED_PATIENCE = 1.0
#: How often a model at its limit looks for connections waiting behind it.
PRESSURE_POLL = 0.05
#: struct tcp_info: after 8 one-byte fields, u32 rto, ato, snd_mss, rcv_mss,
#: unacked; on a listening socket Linux puts its accept queue's length in
#: tcpi_unacked.
_TCPI_UNACKED = struct.Struct("=I")
_TCPI_UNACKED_OFFSET = 24


class Registry(Protocol):
    """Where listeners are watched: a selector, or an event loop's readers behind the same two calls."""

    def register(self, fileobj: socket.socket, events: int, data: Any = None) -> object: ...

    def unregister(self, fileobj: socket.socket) -> object: ...


class Acceptor:
    """Puts the runtime's listeners in and out of a selector, and accepts."""

    def __init__(self, selector: Registry, runtime: Runtime) -> None:
        self.selector = selector
        self.rt = runtime
        self.listening = False
        self.paused_until = 0.0
        #: The peer of the last connection accepted, when debug logging wants it.
        self.last_peer = ""
        for sock in runtime.listeners:
            sock.setblocking(False)

    def _listen(self, wanted: bool) -> None:
        if wanted == self.listening:
            return
        for sock in self.rt.listeners:
            if wanted:
                self.selector.register(sock, selectors.EVENT_READ, LISTENER)
            else:
                self.selector.unregister(sock)
        self.listening = wanted

    def update(self, room: bool) -> None:
        """Listen while there is room and no pause; once stopping, close the listeners."""
        if self.rt.stopping:
            self._listen(False)
            self.rt.close_listeners()
        else:
            self._listen(room and time.monotonic() >= self.paused_until)

    def accept(self, listener: socket.socket) -> socket.socket | None:
        """One new connection, or None when there is none (or no resources) now."""
        try:
            sock, address = listener.accept()
        except BlockingIOError:
            return None
        except OSError as error:
            if error.errno in RESOURCE_ERRORS:
                self.rt.log.warning("accept: %s; pausing %.1f s", error.strerror, PAUSE)
                self.paused_until = time.monotonic() + PAUSE
                self._listen(False)
            return None  # ECONNABORTED and the like: the next one will do
        if self.rt.log.isEnabledFor(logging.DEBUG):  # a cached lookup: cheap when debug is off
            self.last_peer = peer_name(address)
        return sock

    def timeout(self, timeout: float) -> float:
        """Shorten the loop's timeout so that a pause ends on time."""
        left = self.paused_until - time.monotonic()
        return min(timeout, left) if left > 0 else timeout


def waiting(listeners: list[socket.socket]) -> int:
    """How many connections wait in the listeners' accept queues (at least 1
    for a readable listener whose queue length Linux does not tell)."""
    total = 0
    for sock in listeners:
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_UNACKED_OFFSET + 4)
            total += _TCPI_UNACKED.unpack_from(info, _TCPI_UNACKED_OFFSET)[0]
        except (OSError, AttributeError, struct.error):  # a unix socket, or not Linux
            readable, _, _ = select.select([sock], [], [], 0)
            total += bool(readable)
    return total


class Pressure:
    """Connections waiting behind a model at its limit, and since when.

    A connection may stay silent ``idle_timeout``; once connections have
    waited SHED_PATIENCE behind a full model, only SHED_FLOOR: the model
    then sheds its idlest connections, so an idle flood drains at ``limit /
    SHED_FLOOR`` connections a second, while a newcomer facing a few
    telnet users only waits a moment for a slot of its own."""

    def __init__(self) -> None:
        self.since = 0.0

    def silence_allowed(self, idle_timeout: float, queued: int, now: float) -> float:
        """Seconds of silence allowed while ``queued`` connections wait; 0 turns both off."""
        if not queued:
            self.since = 0.0
        else:
            self.since = self.since or now
        if idle_timeout <= 0:
            return float("inf")
        if not queued or now - self.since < SHED_PATIENCE:
            return idle_timeout
        return min(idle_timeout, SHED_FLOOR)


def idle_reason(idle_timeout: float) -> str:
    """Why a connection silent for the whole idle timeout was closed."""
    return f"idle for {idle_timeout:g} s"


def shed_reason(silent: float, queued: int) -> str:
    """Why a connection was shed, under pressure, before its idle timeout."""
    return f"shed: silent {silent:.3f} s, the longest, while {queued} waited"


def peer_name(address: object) -> str:
    """HOST:PORT ([HOST]:PORT for IPv6) from an accept() address."""
    if isinstance(address, tuple) and len(address) >= 2:
        return format_address(str(address[0]), address[1])
    return str(address) or "unix socket"


def connection_ended(peer: str, seconds: float, nbytes: int, messages: int, why: str) -> str:
    """The debug line for one connection, the same in every model."""
    return f"connection {peer or '?'} ended after {seconds:.3f} s, {nbytes} bytes in {messages} messages: {why}"
