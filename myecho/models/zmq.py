"""The zmq model: the talk's REQ/REP echo, on a ROUTER socket.

The talk's server is a REP socket, which answers one request at a time in
a fixed order. A ROUTER socket speaks the same wire protocol to REQ clients
(each request arrives as [peer identity, empty delimiter, frames...] and
the reply goes back with the same envelope), but lets one loop serve every
client as its requests come, DEALER clients included, multipart messages
frame for frame. libzmq survives non-ZeroMQ peers itself: a bad greeting
only closes that connection. ``MAX_MESSAGE`` bounds what one message may
cost; a peer that sends more is disconnected by libzmq.

What one client may cost is bounded in bytes, not only in messages:
- a message is at most ``MAX_MESSAGE`` bytes, all frames summed (libzmq's
  MAXMSGSIZE bounds each frame alone): frames are read one by one and a
  message that grows past the bound is dropped as it comes, never echoed;
- a client's replies that it has not read (in libzmq's queue and in our
  kernel send buffer) are at most ``CLIENT_UNREAD`` bytes plus one message:
  over TCP, what its side has acknowledged is read from the kernel
  (TCP_INFO's bytes_acked on the connection libzmq names, ZMQ_SRCFD), so
  a reader's replies flow and a non-reader's are dropped, counted
  (``dropped`` in STATUS) and logged; over ipc:// the high-water mark
  (messages) is the bound;
- all clients' unread replies together are at most ``TOTAL_UNREAD``; and
  freed messages go back to the system (glibc's mmap threshold fixed), so
  memory falls again when a client leaves.

At the file-descriptor limit libzmq's accept fails and its I/O thread
would retry at once, for ever: ``AcceptPause`` unbinds the ROUTER's
endpoints for a moment (our copy of a listening socket keeps its backlog),
and stops accepting below the fd limit in the first place.
"""

import contextlib
import ctypes
import logging
import os
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from myecho.core.accepting import connection_ended, peer_name
from myecho.core.runtime import Runtime
from myecho.core.sockets import Listeners, raise_fd_limit, zmq_endpoint

#: systemd's sockets, or one bound on HOST:PORT; --listen endpoints libzmq binds itself.
LISTENERS = Listeners(endpoints="listen")
PREFORK = False

MAX_MESSAGE = 64 * 1024 * 1024
HIGH_WATER = 1000
#: Requests queued per client before libzmq stops reading its connection
#: (TCP then holds the rest back): few, since each may be a large message.
RECEIVE_HIGH_WATER = 32
BATCH = 256
DRAIN_IDLE = 0.2
#: libzmq's I/O threads accept connections and run their ZMTP handshakes:
#: two set a burst of new clients up sooner than libzmq's default of one,
#: while this loop stays single-threaded.
IO_THREADS = 2
#: Unread replies one client may leave with us (plus one message), and all together.
CLIENT_UNREAD = 16 * 1024 * 1024
TOTAL_UNREAD = 256 * 1024 * 1024
#: How long accepting pauses after libzmq failed to accept (EMFILE, ENFILE...).
ACCEPT_PAUSE = 0.1
#: Descriptors kept free below the fd limit: libzmq's own, logs, a reload.
FD_MARGIN = 64
_TCP_INFO_SIZE = 128
_BYTES_ACKED = struct.Struct("=Q")
_BYTES_ACKED_OFFSET = 120  # struct tcp_info: tcpi_bytes_acked (Linux 4.1)
M_MMAP_THRESHOLD = -3


def return_freed_memory() -> None:
    """Have glibc serve large blocks (messages) by mmap, always: freed, they go
    back to the system, instead of raising its threshold and keeping them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 256 * 1024)


def bind(router: zmq.Socket[bytes], listeners: list[socket.socket], urls: list[str]) -> list[str]:
    """Bind to the sockets we were handed (ZMQ_USE_FD) and to other endpoints."""
    where = []
    for sock in listeners:
        endpoint = zmq_endpoint(sock)
        router.setsockopt(zmq.USE_FD, sock.detach())  # libzmq owns the fd now
        router.bind(endpoint)
        where.append(router.getsockopt_string(zmq.LAST_ENDPOINT))
    router.setsockopt(zmq.USE_FD, -1)
    for url in urls:
        router.bind(url)
        where.append(router.getsockopt_string(zmq.LAST_ENDPOINT))
    return where


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
    ``close`` at a graceful stop, ``finish`` once the ROUTER is closed.
    The broker's frontend needs the same: ``bind_endpoints`` for its
    listeners, this on its monitor."""

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

    def event(self, event: Mapping[str, Any]) -> None:
        kind = event["event"]
        if kind == zmq.EVENT_ACCEPTED:
            self.open += 1
            if self.open >= self.limit:
                self.pause(f"{self.open} connections, the limit below the fd limit")
        elif kind == zmq.EVENT_DISCONNECTED:
            self.open = max(0, self.open - 1)
        elif kind == zmq.EVENT_ACCEPT_FAILED:
            self.paused_until = time.monotonic() + ACCEPT_PAUSE
            self.pause(f"accept: {os.strerror(event['value'])}")
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


@dataclass
class Peer:
    """One client, by its routing id: its connection and what it owes us."""

    fd: int
    tcp: bool
    base: int = 0  # bytes its TCP had acknowledged when we first saw it
    pushed: int = 0  # reply bytes (with ZMTP framing) handed to libzmq
    acked: int = 0  # of those, acknowledged by its TCP when last asked
    nbytes: int = 0
    messages: int = 0


def bytes_acked(fd: int) -> int | None:
    """TCP_INFO's bytes_acked for a descriptor libzmq owns (read through a copy); None if not TCP."""
    try:
        with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as sock:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except OSError:
        return None
    if len(info) < _BYTES_ACKED_OFFSET + 8:
        return None
    return int(_BYTES_ACKED.unpack_from(info, _BYTES_ACKED_OFFSET)[0])


def framed(frames: list[bytes]) -> int:
    """Bytes on the wire for these frames (ZMTP 3: 2 or 9 bytes of header each)."""
    return sum(len(frame) + (2 if len(frame) < 256 else 9) for frame in frames)


class ZmqServer:
    def __init__(self, runtime: Runtime, context: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        self.rt = runtime
        self.context = context or zmq.Context.instance(io_threads=IO_THREADS)
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        self.router.setsockopt(zmq.SNDHWM, HIGH_WATER)
        self.router.setsockopt(zmq.RCVHWM, RECEIVE_HIGH_WATER)
        self.router.setsockopt(zmq.BACKLOG, runtime.settings.backlog)
        self.monitor = self.router.get_monitor_socket(AcceptPause.MONITOR_EVENTS)
        self.last_drop_log = 0.0
        self.peers: dict[bytes, Peer] = {}
        self.unread = 0  # all peers' unread replies, as last estimated
        self.refreshed = 0.0
        self.opened: dict[int, tuple[float, str]] = {}  # fd: when, who (for the debug line)
        self.accepting: AcceptPause | None = None
        return_freed_memory()

    # -- receiving ------------------------------------------------------------
    def receive(self) -> tuple[Peer | None, list[bytes]] | None:
        """One whole message: (its peer, its frames, the routing id first);
        frames [] if it was too big (dropped). None when nothing waits."""
        router = self.router
        try:
            head = router.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        identity = head.bytes
        try:
            fd = int(head.get(zmq.SRCFD))
        except (zmq.ZMQError, TypeError, ValueError):
            fd = -1
        peer = self.peer(identity, fd)
        frames = [identity]
        size = 0
        while router.getsockopt(zmq.RCVMORE):
            frame = router.recv()
            size += len(frame)
            if size <= MAX_MESSAGE:
                frames.append(frame)
            elif len(frames) > 1:
                frames = [identity]  # past the bound: let the rest go by as it comes
        if size > MAX_MESSAGE:
            self.dropped(f"a message of {size} bytes, over {MAX_MESSAGE} (all frames)")
            return peer, []
        return peer, frames

    def peer(self, identity: bytes, fd: int) -> Peer | None:
        peer = self.peers.get(identity)
        if peer is not None and peer.fd == fd:
            return peer
        if fd < 0:
            return None  # inproc: no descriptor, nothing of ours to bound beyond the HWM
        acked = bytes_acked(fd)
        peer = Peer(fd, acked is not None, base=acked or 0)
        self.peers[identity] = peer
        if self.rt.log.isEnabledFor(logging.DEBUG):  # the connection is surely open while its message is here
            opened = self.opened.get(fd, (time.monotonic(), ""))[0]  # its ACCEPTED event may still be queued
            self.opened[fd] = (opened, self.peer_of(fd))
        return peer

    # -- bounding unread replies ----------------------------------------------
    def refresh(self, peer: Peer) -> None:
        """Ask the kernel what the peer's TCP has acknowledged since we last did."""
        acked = bytes_acked(peer.fd)
        if acked is None:
            return
        acked = min(acked - peer.base, peer.pushed)
        self.unread -= acked - peer.acked
        peer.acked = acked

    def room_for(self, peer: Peer | None, size: int) -> str:
        """ "" if a reply of ``size`` bytes may be queued for ``peer``, else why not."""
        if peer is None or not peer.tcp:
            return ""
        if peer.pushed > peer.acked and peer.pushed - peer.acked + size > CLIENT_UNREAD:
            self.refresh(peer)
            if peer.pushed > peer.acked and peer.pushed - peer.acked + size > CLIENT_UNREAD:
                return f"its unread replies reached {CLIENT_UNREAD >> 20} MiB"
        if self.unread + size > TOTAL_UNREAD:
            now = time.monotonic()
            if now - self.refreshed > 0.01:
                self.refreshed = now
                for other in self.peers.values():
                    if other.tcp and other.pushed > other.acked:
                        self.refresh(other)
            if self.unread + size > TOTAL_UNREAD:
                return f"all clients' unread replies reached {TOTAL_UNREAD >> 20} MiB"
        return ""

    def echo_pending(self) -> bool:
        """Answer up to BATCH waiting messages; True if there were any."""
        router, stats = self.router, self.rt.stats
        for count in range(BATCH):
            message = self.receive()
            if message is None:
                return count > 0
            peer, frames = message
            if not frames:
                continue
            size = sum(len(frame) for frame in frames[1:])
            stats.messages += 1
            stats.bytes += size
            if peer is not None:
                peer.nbytes += size
                peer.messages += 1
            wire = framed(frames[1:]) if peer is not None and peer.tcp else 0
            why = self.room_for(peer, wire)
            if why:
                self.dropped(why)
                continue
            try:
                router.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                self.dropped("its replies reached the high-water mark")
                continue
            except zmq.ZMQError as error:
                if error.errno != zmq.EHOSTUNREACH:  # the client left before its answer
                    raise
                continue
            if wire:
                assert peer is not None
                peer.pushed += wire
                self.unread += wire
        return True

    def dropped(self, why: str) -> None:
        self.rt.stats.dropped += 1
        now = time.monotonic()
        if now - self.last_drop_log >= 10:
            self.rt.log.warning("reply dropped: a client that does not read; %s", why)
            self.last_drop_log = now

    # -- connections ------------------------------------------------------------
    def on_monitor(self) -> None:
        """Count connections from libzmq's monitor events (pyzmq parses them),
        pause accepting at the fd limit, forget the peers that left."""
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if self.accepting is not None:
                self.accepting.event(event)
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.rt.stats.connection_opened()
                if self.rt.log.isEnabledFor(logging.DEBUG):  # its name at its first message
                    self.opened.setdefault(event["value"], (time.monotonic(), ""))
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.rt.stats.open -= 1
                self.disconnected(event["value"])

    def disconnected(self, fd: int) -> None:
        gone = [identity for identity, peer in self.peers.items() if peer.fd == fd]
        nbytes = messages = 0
        for identity in gone:
            peer = self.peers.pop(identity)
            self.unread -= peer.pushed - peer.acked  # libzmq drops its queue with the connection
            nbytes += peer.nbytes
            messages += peer.messages
        opened, who = self.opened.pop(fd, (0.0, ""))
        if opened and self.rt.log.isEnabledFor(logging.DEBUG):
            line = connection_ended(who, time.monotonic() - opened, nbytes, messages, "disconnected")
            self.rt.log.debug("%s", line)

    @staticmethod
    def peer_of(fd: int) -> str:
        try:
            with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as sock:
                return peer_name(sock.getpeername())
        except OSError:
            return ""

    # -- the loop -----------------------------------------------------------------
    def serve(self) -> None:
        rt = self.rt
        endpoints = bind_endpoints(self.router, rt.listeners, rt.settings.listen)
        rt.listeners = []  # the endpoints own them now
        self.accepting = AcceptPause(endpoints, rt.log, connection_limit(rt.settings.backlog))
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        poller.register(rt.signals.fileno(), zmq.POLLIN)
        rt.ready(", ".join(endpoint.bound for endpoint in endpoints))
        resume_in = float("inf")
        while not rt.stopping:
            events = dict(poller.poll(int(min(rt.timeout(), resume_in) * 1000)))
            if self.router in events:
                self.echo_pending()
            if self.monitor in events:
                self.on_monitor()
            if rt.signals.fileno() in events:
                rt.on_signals()
            resume_in = self.accepting.tick()
            rt.tick()
        self.drain()

    def drain(self) -> None:
        """Stop taking connections, answer what is in flight, then close."""
        if self.accepting is not None:
            self.accepting.close(self.router)
        while not self.rt.grace_expired():
            if not self.router.poll(int(DRAIN_IDLE * 1000), zmq.POLLIN):
                break
            self.echo_pending()
        linger = max(0.0, self.rt.stop_deadline - time.monotonic())
        self.router.disable_monitor()
        self.monitor.close(linger=0)
        self.router.close(linger=int(linger * 1000))
        if self.accepting is not None:
            self.accepting.finish()


def serve(runtime: Runtime) -> None:
    ZmqServer(runtime).serve()
