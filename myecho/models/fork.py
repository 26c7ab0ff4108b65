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
longer on the client's clock. Should the spawner die, the
parent logs it and goes back to forking itself.
"""

import contextlib
import gc
import os
import selectors
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from myecho.accepting import LISTENER, Acceptor
from myecho.models.spawner import MESSAGE, REPORT, die_with, load_prctl, reaped, serve_connection
from myecho.runtime import Runtime
from myecho.sockets import describe

SPAWNER = Path(__file__).with_name("spawner.py")
#: Seconds without a handover before the spares are topped up (while at
#: least half are left). Longer than a first exchange here (about 0.5 ms),
#: short enough that a pool drawn on every few ms still refills.
REPLENISH_DELAY = 0.003
load_prctl()  # here, once: a child forked after accept must start echoing as soon as it can


@dataclass
class Spare:
    """A child forked ahead of need, waiting for one connection."""

    pid: int
    channel: socket.socket  # the parent's end of the spare's socketpair


class SpawnerLink:
    """The parent's side of the spawner: its process and its control socket."""

    def __init__(self, reports_w: int) -> None:
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            theirs.set_inheritable(True)
            os.set_inheritable(reports_w, True)
            try:
                argv = [str(os.getpid()), str(theirs.fileno()), str(reports_w)]
                self.pid = os.posix_spawn(
                    sys.executable, [sys.executable, "-I", "-S", str(SPAWNER), *argv], _child_environment()
                )
            finally:
                os.set_inheritable(reports_w, False)
        self.asked = 0  # spares asked for, not yet received

    def ask(self) -> None:
        self.control.send(MESSAGE.pack(b"F", 0))
        self.asked += 1

    def receive(self) -> tuple[bytes, int, socket.socket | None]:
        """One message: (kind, pid, the spare's channel for b"S"); kind b"" at EOF."""
        data, fds, _, _ = socket.recv_fds(self.control, MESSAGE.size, 1)
        if not data:
            return b"", 0, None
        kind, pid = MESSAGE.unpack(data)
        channel = socket.socket(fileno=fds[0]) if fds else None
        if kind == b"S":
            self.asked -= 1
        return kind, pid, channel

    def close(self) -> None:
        """EOF on the control socket: the spawner exits (reaped as our child)."""
        self.control.close()


def _child_environment() -> dict[str, str]:
    """Ours, minus what systemd meant for the main process alone."""
    private = ("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_STREAM")
    return {key: value for key, value in os.environ.items() if not key.startswith(private)}


class ForkServer:
    """The parent: an accept loop, a table of children, a report pipe."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.children: set[int] = set()  # forked here, by the talk's way
        self.spawned: set[int] = set()  # from the spawner: spares and busy ones
        self.spares: deque[Spare] = deque()  # ready, oldest first
        self.unused: set[int] = set()  # spares never handed a connection
        self.selector = selectors.DefaultSelector()
        self.reports_r, self.reports_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.acceptor = Acceptor(self.selector, runtime)
        self.spawner: SpawnerLink | None = None
        self.spawner_failed = False
        self.terminated = False
        self.last_handover = 0.0

    def busy(self) -> int:
        return len(self.children) + len(self.spawned) - len(self.unused)

    def room(self) -> bool:
        """Room for one more connection, and (with a spawner) a spare to take it."""
        if self.busy() >= self.rt.settings.max_children:
            return False
        return self.spawner is None or self.rt.settings.spare_children == 0 or bool(self.spares)

    def accept(self, listener: socket.socket) -> None:
        while self.room() and (conn := self.acceptor.accept(listener)) is not None:
            with conn:
                if not self.hand_over(conn):
                    self.fork(conn)

    def hand_over(self, conn: socket.socket) -> bool:
        """Give ``conn`` to a waiting spare; False if none could take it."""
        while self.spares:
            spare = self.spares.popleft()
            try:
                socket.send_fds(spare.channel, [b"c"], [conn.fileno()])
            except OSError:  # it died waiting; the spawner will report it
                continue
            finally:
                spare.channel.close()
            self.unused.discard(spare.pid)
            self.last_handover = time.monotonic()
            self.rt.stats.connection_opened()
            return True
        return False

    def fork(self, conn: socket.socket) -> None:
        """The talk's way: fork the whole parent for this connection."""
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError as error:
            self.rt.log.error("fork: %s; connection closed", error.strerror)
            return
        if pid == 0:
            code = 1
            try:
                code = self.child(conn, parent)
            finally:
                os._exit(code)
        self.children.add(pid)
        self.rt.stats.connection_opened()

    # -- the child ----------------------------------------------------------
    def child(self, conn: socket.socket, parent: int) -> int:
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
        for spare in self.spares:  # a retired spare must see EOF
            spare.channel.close()
        if self.spawner is not None:
            self.spawner.control.close()
        os.close(self.reports_r)
        return serve_connection(conn, self.reports_w)

    # -- the spawner --------------------------------------------------------
    def start_spawner(self) -> None:
        self.spawner_failed = True  # started once: one that dies is not restarted in a loop
        try:
            self.spawner = SpawnerLink(self.reports_w)
        except OSError as error:
            self.rt.log.error("cannot start the spawner (%s): forking after accept", error.strerror)
            return
        self.selector.register(self.spawner.control, selectors.EVENT_READ, "spawner")

    def from_spawner(self) -> None:
        assert self.spawner is not None
        kind, pid, channel = self.spawner.receive()
        if kind == b"S" and channel is not None:
            self.spawned.add(pid)
            self.unused.add(pid)
            self.spares.append(Spare(pid, channel))
        elif kind == b"X":
            self.spawned.discard(pid)
            if pid in self.unused:  # retired, or died waiting
                self.unused.discard(pid)
                self.spares = deque(spare for spare in self.spares if spare.pid != pid)
            else:
                self.rt.stats.open -= 1
        elif not kind:
            self.spawner_lost()

    def spawner_lost(self) -> None:
        """The spawner died: its children died with it (PDEATHSIG)."""
        if self.spawner is None:
            return
        if not self.rt.stopping:
            self.rt.log.error("the spawner died: forking after accept from now on")
        self.selector.unregister(self.spawner.control)
        self.spawner.close()
        self.spawner = None
        self.rt.stats.open -= len(self.spawned) - len(self.unused)
        for spare in self.spares:
            spare.channel.close()
        self.spares.clear()
        self.spawned.clear()
        self.unused.clear()

    def keep_spares(self) -> None:
        """Ask for spares up to ``spare_children``, within ``max_children``;
        retire the extra ones (after a reload lowered the number)."""
        settings = self.rt.settings
        wanted = 0 if self.rt.stopping else settings.spare_children
        if self.spawner is None and wanted > 0 and not self.spawner_failed:
            self.start_spawner()
        if self.spawner is None:
            return
        while len(self.spares) > wanted:
            self.spares.pop().channel.close()  # EOF: it exits
        if self.replenish_in(wanted) > 0:
            return
        room = settings.max_children - len(self.children) - len(self.spawned) - self.spawner.asked
        for _ in range(min(wanted - len(self.spares) - self.spawner.asked, room)):
            self.spawner.ask()

    def replenish_in(self, wanted: int) -> float:
        """Seconds before missing spares may be asked for: 0 when due, or
        when fewer than half of ``wanted`` are left."""
        if len(self.spares) * 2 < wanted:
            return 0.0
        return max(0.0, self.last_handover + REPLENISH_DELAY - time.monotonic())

    # -- the parent's bookkeeping ---------------------------------------------
    def reap(self) -> None:
        for pid in reaped():
            if self.spawner is not None and pid == self.spawner.pid:
                self.spawner_lost()
            elif pid in self.children:
                self.children.discard(pid)
                self.rt.stats.open -= 1

    def read_reports(self) -> None:
        try:
            data = os.read(self.reports_r, REPORT.size * 256)
        except BlockingIOError:
            return
        for offset in range(0, len(data) - len(data) % REPORT.size, REPORT.size):
            total, reads = REPORT.unpack_from(data, offset)
            self.rt.stats.bytes += total
            self.rt.stats.messages += reads

    def terminate_children(self) -> None:
        busy = [*self.children, *(self.spawned - self.unused)]
        self.rt.log.info("grace period over: terminating %d children", len(busy))
        for pid in busy:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        self.terminated = True

    # -- the loop ---------------------------------------------------------------
    def serve(self) -> None:
        rt = self.rt
        self.selector.register(rt.signals, selectors.EVENT_READ, "signals")
        self.selector.register(self.reports_r, selectors.EVENT_READ, "reports")
        # Objects that exist now are shared with every child: keep the garbage
        # collector from writing to them, which would copy their pages.
        gc.freeze()
        rt.ready(", ".join(describe(sock) for sock in rt.listeners))
        while not (rt.stopping and not self.children and not self.spawned):
            self.keep_spares()
            self.acceptor.update(self.room())
            timeout = self.acceptor.timeout(rt.timeout())
            if self.spawner is not None and len(self.spares) + self.spawner.asked < rt.settings.spare_children:
                timeout = min(timeout, self.replenish_in(rt.settings.spare_children) or timeout)  # wake to ask
            for key, _ in self.selector.select(timeout):
                if key.data == LISTENER:
                    self.accept(key.fileobj)  # type: ignore[arg-type]
                elif key.data == "signals":
                    rt.on_signals()
                elif key.data == "spawner":
                    self.from_spawner()
                else:
                    self.read_reports()
            self.reap()
            if rt.grace_expired() and not self.terminated:
                self.terminate_children()
            rt.tick()
        if self.spawner is not None:
            self.spawner.close()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.spawner.pid, 0)
        self.read_reports()
        self.selector.close()
        rt.close_listeners()


def serve(runtime: Runtime) -> None:
    ForkServer(runtime).serve()
