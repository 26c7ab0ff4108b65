"""The fork model: the parent accepts, one child process per connection.

The talk's "multi" daemon, with what it left out: children are reaped as
soon as SIGCHLD is noted (never a zombie); ``max_children`` makes the
parent stop accepting, so new connections wait in the kernel's backlog
instead of forking without bound; on SIGTERM the parent stops accepting,
gives the children the grace period, then terminates them, and exits only
once none is left. A child dies with its parent (PR_SET_PDEATHSIG), never
speaks to systemd, and reports its figures to the parent through a pipe.

Where the children come from: with ``spare_children = 0`` the parent forks
after each accept, exactly as the talk does, and pays a fork of its whole
interpreter (about 20 MB) between the client's connect and its first
echo. By default a small spawner process (``spawner.py``) forks children
*ahead* of need, beside the parent: the parent hands each accepted
connection to a waiting spare (SCM_RIGHTS) and asks for a replacement
once the parent has been quiet for ``REPLENISH_DELAY`` (at once when
fewer than half the spares are left): a replacement forked right away
would take its copy-on-write faults while the connection it replaces is
in its first exchanges, and on two cores delay them. Apache's prefork
tops up its spares the same way, when idle (once a second). Still one
process per connection, still a parent that accepts; the fork is just no
longer on the client's clock. A spawner that does not answer within
``SPAWNER_DEADLINE`` (stopped, stuck) is worked around: the parent forks
itself until spares come again. A spawner that dies leaves the
connections it served to the parent (a child subreaper), which goes back
to forking itself. Which child is which (forked here, spare, retiring,
serving) is kept in ``children.py``.

Idle connections: the parent keeps its own copy of every connection it
hands over, and each child records its last activity and its figures in
a slot of a shared memory file (see ``spawner.py``). A connection silent
for ``idle_timeout`` is shut down by the parent (the child then sees EOF
and exits); at ``max_children`` with connections waiting in the backlog,
the silent connections are shut down, idlest first, so that an idle flood
cannot keep a new client out. The same slots give STATUS its live bytes.
"""

import contextlib
import gc
import logging
import os
import selectors
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass

from myecho.core.accepting import (
    LISTENER,
    SHED_FLOOR,
    Acceptor,
    Pressure,
    connection_ended,
    idle_reason,
    shed_reason,
)
from myecho.core.processes import die_with, load_prctl, prctl, reaped
from myecho.core.runtime import Runtime
from myecho.core.sockets import Listeners, describe, raise_fd_limit
from myecho.models.children import SPAWNER_DEADLINE, Children, Spawner, fitting
from myecho.models.spawner import (
    HANDOVER,
    SLOT,
    SLOT_COUNT,
    SLOT_SIZE,
    new_slots,
    serve_connection,
)

LISTENERS = Listeners()  # systemd's sockets, or one bound on HOST:PORT
PREFORK = False

#: Seconds without a handover before the spares are topped up (while at
#: least half are left). Longer than a first exchange (under a millisecond),
#: short enough that a pool drawn on every few ms still refills.
REPLENISH_DELAY = 0.003
#: How often the parent reads the children's slots (idle timeout, STATUS)
#: when nothing is due sooner.
SCAN_INTERVAL = 0.25
PR_SET_CHILD_SUBREAPER = 36
#: At ``max_children``, connections taken from the backlog wait in the
#: parent for their first byte, at most this many: a silent one never gets
#: a process, and when the lobby is full the one silent the longest leaves.
LOBBY = 128
#: Spares allowed for when working out how many children fit (a reload may
#: raise ``spare_children``).
SPARES_COUNTED = 64
#: Connections taken from the backlog per wake-up of the loop.
ACCEPT_BATCH = 64
load_prctl()  # here, once: a child forked after accept must start echoing as soon as it can


@dataclass
class Waiting:
    """A connection accepted while every child was busy: in the lobby until it speaks."""

    sock: socket.socket
    since: float
    peer: str


@dataclass
class Busy:
    """A child serving a connection, as the parent sees it."""

    sock: socket.socket  # the parent's copy: shut down to end the connection
    slot: int
    opened: float
    peer: str
    why: str = ""  # set when the parent ended it


class ForkServer:
    """The parent: an accept loop, a table of children, the shared slots."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.children = Children()
        self.busy: dict[int, Busy] = {}  # every child serving a connection
        self.lobby: dict[int, Waiting] = {}  # silent so far, oldest first (by fd)
        self.ready: deque[Waiting] = deque()  # spoke: the next to get a child
        self.selector = selectors.DefaultSelector()
        self.slots_fd, self.slots = new_slots()
        self.free_slots = deque(range(1, SLOT_COUNT))  # 0: scratch, for a connection that finds none free
        self.done_bytes = self.done_messages = 0  # of connections that ended
        self.acceptor = Acceptor(self.selector, runtime)
        self.spawner: Spawner | None = None
        self.spawner_failed = False
        self.terminated = False
        self.last_handover = 0.0
        self.next_scan = 0.0
        self.pressure = Pressure()
        self.queued = 0  # connections waiting behind us at the limit, at the last scan
        self.fitting = 1  # max_children 0: as many as fit, computed in serve()

    def room(self) -> bool:
        """Room for one more connection, and (with a spawner) a spare to take it,
        or a spawner so late that the parent forks itself."""
        if len(self.busy) >= self.max_children():
            return False
        if self.spawner is None or self.rt.settings.spare_children == 0 or self.children.spares:
            return True
        if self.children.overdue():
            if not self.children.late:
                self.children.late = True
                self.rt.log.warning(
                    "the spawner has not answered for %.1f s: forking after accept until it does", SPAWNER_DEADLINE
                )
            return True
        return False

    def max_children(self) -> int:
        """The setting, or when it is 0 (the default) what fits the machine."""
        return self.rt.settings.max_children or self.fitting

    def full(self) -> bool:
        return len(self.busy) >= self.max_children()

    def accept(self, listener: socket.socket) -> None:
        """A bounded batch: to a child while there is room, else to the lobby."""
        for _ in range(ACCEPT_BATCH):
            if self.room() and not self.ready:
                if (conn := self.acceptor.accept(listener)) is None:
                    return
                self.start(conn, time.monotonic(), self.acceptor.last_peer)
            elif self.lobby_open():
                if (conn := self.acceptor.accept(listener)) is None:
                    return
                self.enter_lobby(Waiting(conn, time.monotonic(), self.acceptor.last_peer))
            else:
                return

    def lobby_open(self) -> bool:
        """At the limit, with idle connections to be closed at all (idle_timeout > 0)."""
        settings = self.rt.settings
        return self.full() and len(self.ready) < LOBBY and not self.rt.stopping and settings.idle_timeout > 0

    def enter_lobby(self, waiting: Waiting) -> None:
        """Ready at once if it has spoken (or closed); else wait for its first
        byte, making room by closing the lobby's longest-silent one."""
        sock = waiting.sock
        sock.setblocking(False)
        try:
            sock.recv(1, socket.MSG_PEEK)  # b"" (EOF) counts: its child will see it
            self.ready.append(waiting)
            return
        except BlockingIOError:
            pass
        except OSError:
            sock.close()
            return
        if self.lobby and len(self.lobby) + len(self.ready) >= LOBBY:
            oldest = next(iter(self.lobby.values()))
            self.leave_lobby(oldest)
            self.rt.stats.shed += 1
            self.lobby_closed(oldest, "shed from the lobby: silent since it was accepted, every child busy")
        self.lobby[sock.fileno()] = waiting
        self.selector.register(sock, selectors.EVENT_READ, waiting)

    def leave_lobby(self, waiting: Waiting) -> None:
        self.selector.unregister(waiting.sock)
        del self.lobby[waiting.sock.fileno()]

    def lobby_closed(self, waiting: Waiting, why: str) -> None:
        waiting.sock.close()
        if self.rt.log.isEnabledFor(logging.DEBUG):
            self.rt.log.debug("%s", connection_ended(waiting.peer, time.monotonic() - waiting.since, 0, 0, why))

    def spoke(self, waiting: Waiting) -> None:
        self.leave_lobby(waiting)
        self.ready.append(waiting)

    def admit(self) -> None:
        """Children for the connections that spoke in the lobby, first come first."""
        while self.ready and self.room():
            waiting = self.ready.popleft()
            waiting.sock.setblocking(True)
            self.start(waiting.sock, waiting.since, waiting.peer)

    def start(self, conn: socket.socket, opened: float, peer: str) -> None:
        """A child for ``conn``: a spare, or one forked here."""
        slot = self.free_slots.popleft() if self.free_slots else 0
        SLOT.pack_into(self.slots, slot * SLOT_SIZE, time.monotonic(), 0, 0)
        pid = self.hand_over(conn, slot) or self.fork(conn, slot)
        if pid:
            self.busy[pid] = Busy(conn, slot, opened, peer)
            self.rt.stats.connection_opened()
        else:
            conn.close()
            self.release(slot)

    def release(self, slot: int) -> None:
        if slot:
            self.free_slots.append(slot)

    def hand_over(self, conn: socket.socket, slot: int) -> int:
        """Give ``conn`` to a waiting spare: its pid, or 0 if none could take it."""
        for pid, channel in self.children.take():
            try:
                socket.send_fds(channel, [HANDOVER.pack(slot)], [conn.fileno()])
            except OSError:  # it died waiting; the spawner will report it
                self.children.failed(pid)
                continue
            finally:
                channel.close()
            self.last_handover = time.monotonic()
            return pid
        return 0

    def fork(self, conn: socket.socket, slot: int) -> int:
        """The talk's way: fork the whole parent for this connection; its pid, 0 if none."""
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError as error:
            self.rt.log.error("fork: %s; connection closed", error.strerror)
            return 0
        if pid == 0:
            code = 1
            try:
                code = self.child(conn, slot, parent)
            finally:
                os._exit(code)
        self.children.forked.add(pid)
        return pid

    # -- the child ----------------------------------------------------------
    def child(self, conn: socket.socket, slot: int, parent: int) -> int:
        """Echo one connection; default signal actions, no systemd, no listeners."""
        if not die_with(parent):
            return 0  # the parent died between fork and prctl
        self.rt.signals.close()
        self.rt.notifier.disable()
        # A terminal's ^C reaches the whole process group: the child waits for
        # the parent's SIGTERM at the end of the grace period instead.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.selector.close()
        for sock in self.rt.listeners:
            sock.close()
        self.children.close_channels()  # a retired spare must see EOF
        others = [busy.sock for busy in self.busy.values()] + [w.sock for w in [*self.lobby.values(), *self.ready]]
        for other in others:  # theirs must end with them, not stay open here
            other.close()
        if self.spawner is not None:
            self.spawner.control.close()
        os.close(self.slots_fd)
        return serve_connection(conn, self.slots, slot)

    # -- the spawner --------------------------------------------------------
    def start_spawner(self) -> None:
        self.spawner_failed = True  # started once: one that dies is not restarted in a loop
        try:
            self.spawner = Spawner(self.slots_fd)
        except OSError as error:
            self.rt.log.error("cannot start the spawner (%s): forking after accept", error.strerror)
            return
        self.selector.register(self.spawner.control, selectors.EVENT_READ, "spawner")

    def from_spawner(self) -> None:
        assert self.spawner is not None
        kind, pid, code, channel = self.spawner.receive()
        if kind == b"S" and channel is not None:
            if self.children.add_spare(pid, channel):
                self.rt.log.info("the spawner answers again")
        elif kind == b"X":
            self.exited(pid, code)
        elif not kind:
            self.spawner_lost()

    def spawner_lost(self) -> None:
        """The spawner died: its idle spares exit (EOF on their channels),
        its busy children go on, now ours (we are their subreaper)."""
        if self.spawner is None:
            return
        if not self.rt.stopping:
            self.rt.log.error("the spawner died: forking after accept from now on")
        self.selector.unregister(self.spawner.control)
        self.spawner.close()
        self.spawner = None
        self.children.spawner_lost()

    def keep_spares(self) -> None:
        """Ask for spares up to ``spare_children``, within ``max_children``;
        retire the extra ones (after a reload lowered the number)."""
        settings = self.rt.settings
        wanted = 0 if self.rt.stopping else settings.spare_children
        ending = sum(1 for busy in self.busy.values() if busy.why) if self.queued else 0
        if wanted and self.queued:  # connections being shed: a spare ready for each that waits
            wanted += min(self.queued, ending)
        if self.spawner is None and wanted > 0 and not self.spawner_failed:
            self.start_spawner()
        if self.spawner is None:
            return
        children = self.children
        children.retire(wanted)
        if self.replenish_in(wanted) > 0:
            return
        room = self.max_children() + ending - len(children) - children.asked
        count = min(wanted - len(children.spares) - children.asked, room)
        if count > 0:
            children.asking(count)
            self.spawner.ask(count)

    def replenish_in(self, wanted: int) -> float:
        """Seconds before missing spares may be asked for: 0 when due, or
        when fewer than half of ``wanted`` are left."""
        if len(self.children.spares) * 2 < wanted:
            return 0.0
        return max(0.0, self.last_handover + REPLENISH_DELAY - time.monotonic())

    # -- the parent's bookkeeping ---------------------------------------------
    def reap(self) -> None:
        for pid, code in reaped():
            if self.spawner is not None and pid == self.spawner.pid:
                self.spawner_lost()
            elif pid in self.children:  # or adopted from a dead spawner
                self.exited(pid, code)

    def exited(self, pid: int, code: int) -> None:
        """A child is gone: its final figures from its slot, its debug line."""
        if not self.children.exited(pid):  # a spare retired, or died waiting
            return
        busy = self.busy.pop(pid, None)
        if busy is None:
            return
        busy.sock.close()
        _, nbytes, reads = SLOT.unpack_from(self.slots, busy.slot * SLOT_SIZE) if busy.slot else (0, 0, 0)
        self.release(busy.slot)
        self.done_bytes += nbytes
        self.done_messages += reads
        self.rt.stats.open -= 1
        if self.rt.log.isEnabledFor(logging.DEBUG):
            why = busy.why or ("client closed" if code == 0 else f"error (exit code {code})")
            self.rt.log.debug("%s", connection_ended(busy.peer, time.monotonic() - busy.opened, nbytes, reads, why))

    def end(self, busy: Busy, why: str) -> None:
        """End a connection from here: its child reads EOF (or fails to write) and exits."""
        busy.why = why
        with contextlib.suppress(OSError):
            busy.sock.shutdown(socket.SHUT_RDWR)

    def scan(self) -> float:
        """Read the slots: live figures for STATUS, idle connections closed,
        and at the limit with connections waiting, the idlest shed.
        Returns the seconds until the next scan is due."""
        now = time.monotonic()
        settings = self.rt.settings
        live_bytes = live_messages = 0
        silent: list[tuple[float, Busy]] = []
        ending = 0
        for busy in self.busy.values():
            if not busy.slot:  # none was free: neither figures nor idle time
                continue
            activity, nbytes, reads = SLOT.unpack_from(self.slots, busy.slot * SLOT_SIZE)
            live_bytes += nbytes
            live_messages += reads
            if busy.why:
                ending += 1
            else:
                silent.append((now - activity, busy))
        self.rt.stats.bytes = self.done_bytes + live_bytes
        self.rt.stats.messages = self.done_messages + live_messages
        for waiting in list(self.lobby.values()):  # oldest first
            if self.rt.stopping or (0 < settings.idle_timeout <= now - waiting.since):
                self.leave_lobby(waiting)
                self.rt.stats.idle_closed += 1
                self.lobby_closed(waiting, "stopping" if self.rt.stopping else idle_reason(settings.idle_timeout))
            else:
                break
        full = self.full() and not self.rt.stopping
        self.queued = len(self.ready) if full else 0
        allowed = self.pressure.silence_allowed(settings.idle_timeout, self.queued, now)
        queued = max(0, self.queued - ending)  # those already ending make room too
        if settings.idle_timeout <= 0 or not silent:
            return SCAN_INTERVAL
        silent.sort(key=lambda pair: pair[0], reverse=True)  # idlest first
        for seconds, busy in silent:
            if seconds >= settings.idle_timeout:
                self.rt.stats.idle_closed += 1
                self.end(busy, idle_reason(settings.idle_timeout))
            elif queued > 0 and seconds >= allowed:
                self.rt.stats.shed += 1
                self.end(busy, shed_reason(seconds, queued))
                queued -= 1
            else:
                break
        due = min((settings.idle_timeout - seconds for seconds, busy in silent if not busy.why), default=SCAN_INTERVAL)
        if self.lobby:
            due = min(due, next(iter(self.lobby.values())).since + settings.idle_timeout - now)
        if self.queued:  # look again soon: connections wait for a child
            due = min(due, SHED_FLOOR / 2)
        return max(0.005, min(due, SCAN_INTERVAL))

    def terminate_children(self) -> None:
        busy = [*self.busy]
        self.rt.log.info("grace period over: terminating %d children", len(busy))
        for pid in busy:
            self.busy[pid].why = "grace period over"
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        self.terminated = True

    # -- the loop ---------------------------------------------------------------
    def serve(self) -> None:
        rt = self.rt
        fd_limit = raise_fd_limit()  # the parent keeps a copy of every connection
        self.fitting, bound = fitting(max(rt.settings.spare_children, SPARES_COUNTED), LOBBY, fd_limit)
        if not rt.settings.max_children:
            rt.log.info("max-children: %d, as many as fit (%s)", self.fitting, bound)
        rt.signals.watch(signal.SIGCHLD)  # wakes the loop to reap a child
        prctl(PR_SET_CHILD_SUBREAPER, 1)  # a dead spawner's busy children become ours
        self.selector.register(rt.signals, selectors.EVENT_READ, "signals")
        # Objects that exist now are shared with every child: keep the garbage
        # collector from writing to them, which would copy their pages.
        gc.freeze()
        rt.ready(", ".join(describe(sock) for sock in rt.listeners))
        while not (rt.stopping and not self.children):
            self.keep_spares()
            self.admit()
            self.acceptor.update((self.room() and not self.ready) or self.lobby_open())
            timeout = self.acceptor.timeout(rt.timeout())
            timeout = min(timeout, max(0.0, self.next_scan - time.monotonic()))
            spares, asked = len(self.children.spares), self.children.asked
            if self.spawner is not None and spares + asked < rt.settings.spare_children:
                timeout = min(timeout, self.replenish_in(rt.settings.spare_children) or timeout)  # wake to ask
            if self.spawner is not None and asked and not spares:  # wake when it is late
                timeout = min(
                    timeout, max(0.0, self.children.waited_since + SPAWNER_DEADLINE - time.monotonic()) + 0.001
                )
            for key, _ in self.selector.select(timeout):
                if key.data == LISTENER:
                    self.accept(key.fileobj)  # type: ignore[arg-type]
                elif key.data == "signals":
                    rt.on_signals()
                elif key.data == "spawner":
                    self.from_spawner()
                elif isinstance(key.data, Waiting):
                    self.spoke(key.data)
            self.reap()
            if time.monotonic() >= self.next_scan:
                self.next_scan = time.monotonic() + self.scan()
            if rt.grace_expired() and not self.terminated:
                self.terminate_children()
            rt.tick()
        if self.spawner is not None:
            self.spawner.close()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.spawner.pid, 0)
        self.scan()
        for waiting in [*self.lobby.values(), *self.ready]:
            waiting.sock.close()
        self.selector.close()
        rt.close_listeners()


def serve(runtime: Runtime) -> None:
    ForkServer(runtime).serve()
