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

The ROUTER itself, its endpoints, the connection count and the pause at
the file-descriptor limit are ``myecho.core.zmqfront.Front``, shared with the
broker. The loop reads and sends frames with pyzmq's Cython calls
(``zmqfront.calls``), zero-copy. After the first message of a wake-up it
asks libzmq once whether another waits (ZMQ_EVENTS); a longer drain ends
on ``zmq.Again``: one exception per drain costs less than a query per
message (each makes libzmq read its command mailbox), and a lone message
costs no exception. Counters are summed once per drain.
"""

import contextlib
import ctypes
import logging
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

import zmq

from myecho.core.accepting import connection_ended, peer_name
from myecho.core.runtime import Runtime
from myecho.core.sockets import Listeners
from myecho.core.zmqfront import EVENTS, NOBLOCK, NOBLOCK_SNDMORE, POLLIN, SNDMORE, SRCFD, Front, calls

#: systemd's sockets, or one bound on HOST:PORT; --listen endpoints libzmq binds itself.
LISTENERS = Listeners(endpoints="listen")
PREFORK = False

MAX_MESSAGE = 64 * 1024 * 1024
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
_TCP_INFO_SIZE = 128
_BYTES_ACKED = struct.Struct("=Q")
_BYTES_ACKED_OFFSET = 120  # struct tcp_info: tcpi_bytes_acked (Linux 4.1)
M_MMAP_THRESHOLD = -3


def return_freed_memory() -> None:
    """Have glibc serve large blocks (messages) by mmap, always: freed, they go
    back to the system, instead of raising its threshold and keeping them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 256 * 1024)


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


class ZmqServer:
    def __init__(self, runtime: Runtime, context: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        self.rt = runtime
        self.context = context or zmq.Context.instance(io_threads=IO_THREADS)
        self.front = Front(
            self.context,
            runtime.log,
            runtime.stats,
            max_frame=MAX_MESSAGE,
            backlog=runtime.settings.backlog,
            receive_high_water=RECEIVE_HIGH_WATER,
        )
        self.router = self.front.router
        self.calls = calls(self.router)
        self.peers: dict[bytes, Peer] = {}
        self.by_fd: dict[int, list[bytes]] = {}  # routing ids seen on each connection
        self.unread = 0  # all peers' unread replies, as last estimated
        self.refreshed = 0.0
        self.opened: dict[int, tuple[float, str]] = {}  # fd: when, who (for the debug line)
        return_freed_memory()

    def peer(self, identity: bytes, fd: int) -> Peer | None:
        """The peer behind a routing id on connection ``fd`` (a new one if the id came back on another)."""
        peer = self.peers.get(identity)
        if peer is not None and peer.fd == fd:
            return peer
        if peer is not None:  # its old connection's replies are libzmq's to drop now
            self.unread -= peer.pushed - peer.acked
            del self.peers[identity]
        if fd < 0:
            return None  # inproc: no descriptor, nothing of ours to bound beyond the HWM
        acked = bytes_acked(fd)
        peer = Peer(fd, acked is not None, base=acked or 0)
        self.peers[identity] = peer
        self.by_fd.setdefault(fd, []).append(identity)
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

    # -- the hot loop -------------------------------------------------------------
    def echo_pending(self) -> bool:
        """Answer up to BATCH waiting messages, frame for frame; True if there were any.

        Frames stay libzmq's (``copy=False``) from the read to the send. A
        message over ``MAX_MESSAGE`` (all frames) is read to its end and
        dropped, its frames freed as they come."""
        recv, send, get = self.calls.recv, self.calls.send, self.calls.get
        peers = self.peers
        debug = self.rt.log.isEnabledFor(logging.DEBUG)  # each peer's figures serve only its debug line
        count = messages = nbytes = 0
        while count < BATCH:
            # The poll promised the first message; after it, one ZMQ_EVENTS
            # query says whether a second waits (a query makes libzmq read its
            # command mailbox: ~1.6 us, too dear to ask before every message);
            # from the second on, the drain ends on zmq.Again (~3 us once).
            if count == 1 and not get(EVENTS) & POLLIN:
                break
            try:
                head = recv(NOBLOCK, copy=False)
            except zmq.Again:
                break
            count += 1
            frames: list[zmq.Frame] = []
            size = wire = 0
            more = head.more
            while more:
                frame = recv(0, copy=False)
                more = frame.more
                length = len(frame)
                size += length
                if size <= MAX_MESSAGE:
                    frames.append(frame)
                    wire += length + (2 if length < 256 else 9)  # ZMTP 3 frame headers
                elif frames:
                    frames = []  # past the bound: let the rest go by as it comes
            if size > MAX_MESSAGE:
                self.front.dropped(f"a message of {size} bytes, over {MAX_MESSAGE} (all frames)")
                continue
            if not frames:
                continue
            # The connection's descriptor, from a data frame: libzmq 4.3.4
            # (Debian 12's) gives none with the routing id ROUTER prepends.
            try:
                fd = frames[0].get(SRCFD)
            except zmq.ZMQError:
                fd = -1
            identity = head.bytes
            peer = peers.get(identity)
            if peer is None or peer.fd != fd:
                peer = self.peer(identity, fd)
            messages += 1
            nbytes += size
            if peer is not None:
                if debug:
                    peer.nbytes += size
                    peer.messages += 1
                if peer.tcp and (peer.pushed - peer.acked + wire > CLIENT_UNREAD or self.unread + wire > TOTAL_UNREAD):
                    why = self.room_for(peer, wire)
                    if why:
                        self.front.dropped(f"a client that does not read; {why}")
                        continue
            try:
                send(head, NOBLOCK_SNDMORE, copy=False)
            except zmq.Again:
                self.front.dropped("a client that does not read; its replies reached the high-water mark")
                continue
            except zmq.ZMQError as error:
                if error.errno != zmq.EHOSTUNREACH:  # the client left before its answer
                    raise
                continue
            last = frames.pop()
            for frame in frames:
                send(frame, SNDMORE, copy=False)
            send(last, 0, copy=False)
            if peer is not None and peer.tcp:
                peer.pushed += wire
                self.unread += wire
        stats = self.rt.stats
        stats.messages += messages
        stats.bytes += nbytes
        return count > 0

    # -- connections ------------------------------------------------------------
    def on_monitor(self) -> None:
        """Connections come and go (``Front`` counts them): forget the peers that left."""
        debug = self.rt.log.isEnabledFor(logging.DEBUG)
        for kind, value in self.front.events():
            if kind == zmq.EVENT_ACCEPTED and debug:  # its name at its first message
                self.opened.setdefault(value, (time.monotonic(), ""))
            elif kind == zmq.EVENT_DISCONNECTED:
                self.disconnected(value)

    def disconnected(self, fd: int) -> None:
        nbytes = messages = 0
        for identity in self.by_fd.pop(fd, ()):
            peer = self.peers.get(identity)
            if peer is None or peer.fd != fd:
                continue  # the id came back on another connection meanwhile
            del self.peers[identity]
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
        where = self.front.bind(rt.listeners, rt.settings.listen)
        rt.listeners = []  # the endpoints own them now
        router, monitor, signals = self.router, self.front.monitor, rt.signals.fileno()
        items: list[tuple[Any, int]] = [(router, POLLIN), (monitor, POLLIN), (signals, POLLIN)]
        poll, echo, monotonic = zmq.zmq_poll, self.echo_pending, time.monotonic
        rt.ready(", ".join(where))
        due = 0.0  # the housekeeping's next turn: STATUS, watchdog, the accept pause
        while not rt.stopping:
            now = monotonic()
            if now >= due:
                rt.tick()
                due = now + min(rt.timeout(), self.front.tick())
            for sock, _ in poll(items, int((due - now) * 1000) + 1):
                if sock is router:
                    echo()
                elif sock is monitor:
                    self.on_monitor()
                    due = 0.0  # the pause may have begun or ended
                else:
                    rt.on_signals()
        self.drain()

    def drain(self) -> None:
        """Stop taking connections, answer what is in flight, then close."""
        self.front.stop_accepting()
        while not self.rt.grace_expired():
            if not self.router.poll(int(DRAIN_IDLE * 1000), zmq.POLLIN):
                break
            self.echo_pending()
        self.front.close(max(0.0, self.rt.stop_deadline - time.monotonic()))


def serve(runtime: Runtime) -> None:
    ZmqServer(runtime).serve()
