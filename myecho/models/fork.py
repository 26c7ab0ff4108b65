"""The fork model: the parent accepts, one child process per connection.

The talk's "multi" daemon, with what it left out: children are reaped as
soon as SIGCHLD is noted (never a zombie); ``max_children`` makes the
parent stop accepting, so new connections wait in the kernel's backlog
instead of forking without bound; on SIGTERM the parent stops accepting,
gives the children the grace period, then terminates them, and exits only
once none is left. A child dies with its parent (PR_SET_PDEATHSIG), never
speaks to systemd, and reports its figures to the parent through a pipe.
"""

import contextlib
import ctypes
import gc
import os
import selectors
import signal
import socket
import struct
from collections.abc import Callable

from myecho.accepting import LISTENER, Acceptor
from myecho.echo import echo_fds
from myecho.runtime import Runtime
from myecho.sockets import describe

#: Each child writes (bytes, reads) once, at exit: 16 bytes, well under
#: PIPE_BUF, so reports from many children never interleave.
REPORT = struct.Struct("=QQ")
PR_SET_PDEATHSIG = 1


_prctl: Callable[..., int] | None
try:  # loaded once here: a child must start echoing as soon as it can
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not glibc/Linux: children rely on the parent's SIGTERM
    _prctl = None


def _die_with(parent: int) -> bool:
    """Have the kernel SIGTERM us when the parent dies; False if it already has."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return os.getppid() == parent


class ForkServer:
    """The parent: an accept loop, a table of children, a report pipe."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.children: set[int] = set()
        self.selector = selectors.DefaultSelector()
        self.reports_r, self.reports_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.acceptor = Acceptor(self.selector, runtime)
        self.terminated = False

    def room(self) -> bool:
        return len(self.children) < self.rt.settings.max_children

    def accept(self, listener: socket.socket) -> None:
        while self.room() and (conn := self.acceptor.accept(listener)) is not None:
            self.spawn(conn)

    def spawn(self, conn: socket.socket) -> None:
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError as error:
            self.rt.log.error("fork: %s; connection closed", error.strerror)
            conn.close()
            return
        if pid == 0:
            code = 1
            try:
                code = self.child(conn, parent)
            finally:
                os._exit(code)
        conn.close()
        self.children.add(pid)
        self.rt.stats.connection_opened()

    # -- the child ----------------------------------------------------------
    def child(self, conn: socket.socket, parent: int) -> int:
        """Echo one connection; default signal actions, no systemd, no listeners."""
        if not _die_with(parent):
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
        os.close(self.reports_r)
        code = 0
        total = reads = 0
        try:
            total, reads = echo_fds(conn.fileno(), conn.fileno())
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            code = 1
        os.write(self.reports_w, REPORT.pack(total, reads))
        return code

    # -- the parent's bookkeeping ---------------------------------------------
    def reap(self) -> None:
        while self.children:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
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
        self.rt.log.info("grace period over: terminating %d children", len(self.children))
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        self.terminated = True

    # -- the loop ---------------------------------------------------------------
    def serve(self) -> None:
        rt = self.rt
        self.selector.register(rt.signals, selectors.EVENT_READ, "signals")
        self.selector.register(self.reports_r, selectors.EVENT_READ, "reports")
        self.acceptor.update(room=True)
        # Objects that exist now are shared with every child: keep the garbage
        # collector from writing to them, which would copy their pages.
        gc.freeze()
        rt.ready(", ".join(describe(sock) for sock in rt.listeners))
        while not (rt.stopping and not self.children):
            for key, _ in self.selector.select(self.acceptor.timeout(rt.timeout())):
                if key.data == LISTENER:
                    self.accept(key.fileobj)  # type: ignore[arg-type]
                elif key.data == "signals":
                    rt.on_signals()
                else:
                    self.read_reports()
            self.reap()
            self.acceptor.update(self.room())
            if rt.grace_expired() and not self.terminated:
                self.terminate_children()
            rt.tick()
        self.read_reports()
        self.selector.close()
        rt.close_listeners()


def serve(runtime: Runtime) -> None:
    ForkServer(runtime).serve()
