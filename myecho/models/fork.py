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
import errno
import os
import selectors
import signal
import socket
import struct
import time

from myecho.echo import echo_fds
from myecho.runtime import Runtime
from myecho.sockets import describe

#: Each child writes (bytes, reads) once, at exit: 16 bytes, well under
#: PIPE_BUF, so reports from many children never interleave.
REPORT = struct.Struct("=QQ")
PR_SET_PDEATHSIG = 1
ACCEPT_BACKOFF = 0.1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class ForkServer:
    """The parent: an accept loop, a table of children, a report pipe."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.children: set[int] = set()
        self.selector = selectors.DefaultSelector()
        self.reports_r, self.reports_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.accepting = False
        self.paused_until = 0.0
        self.terminated = False

    # -- accepting ----------------------------------------------------------
    def set_accepting(self, wanted: bool) -> None:
        if wanted == self.accepting:
            return
        for sock in self.rt.listeners:
            if wanted:
                self.selector.register(sock, selectors.EVENT_READ, "listener")
            else:
                self.selector.unregister(sock)
        self.accepting = wanted

    def accept(self, listener: socket.socket) -> None:
        while len(self.children) < self.rt.settings.max_children:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.rt.log.warning("accept: %s; pausing %.1f s", error.strerror, ACCEPT_BACKOFF)
                    self.set_accepting(False)
                    self.paused_until = time.monotonic() + ACCEPT_BACKOFF
                return
            self.spawn(conn)

    def spawn(self, conn: socket.socket) -> None:
        try:
            pid = os.fork()
        except OSError as error:
            self.rt.log.error("fork: %s; connection closed", error.strerror)
            conn.close()
            return
        if pid == 0:
            code = 1
            try:
                code = self.child(conn)
            finally:
                os._exit(code)
        conn.close()
        self.children.add(pid)
        self.rt.stats.connection_opened()

    # -- the child ----------------------------------------------------------
    def child(self, conn: socket.socket) -> int:
        """Echo one connection; default signal actions, no systemd, no listeners."""
        _die_with_parent()
        self.rt.signals.close()
        self.rt.notifier.disable()
        # A terminal's ^C reaches the whole process group: the child waits for
        # the parent's SIGTERM at the end of the grace period instead.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if os.getppid() == 1:
            return 0  # the parent died between fork and prctl
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
        for sock in rt.listeners:
            sock.setblocking(False)
        self.selector.register(rt.signals, selectors.EVENT_READ, "signals")
        self.selector.register(self.reports_r, selectors.EVENT_READ, "reports")
        self.set_accepting(True)
        rt.ready(", ".join(describe(sock) for sock in rt.listeners))
        while not (rt.stopping and not self.children):
            timeout = rt.timeout()
            pause_left = self.paused_until - time.monotonic()
            if pause_left > 0:
                timeout = min(timeout, pause_left)
            events = self.selector.select(timeout)
            for key, _ in events:
                if key.data == "listener":
                    self.accept(key.fileobj)  # type: ignore[arg-type]
                elif key.data == "signals":
                    rt.on_signals()
                else:
                    self.read_reports()
            self.reap()
            if rt.stopping:
                self.set_accepting(False)
                rt.close_listeners()
                if rt.grace_expired() and not self.terminated:
                    self.terminate_children()
            else:
                room = len(self.children) < rt.settings.max_children
                self.set_accepting(room and time.monotonic() >= self.paused_until)
            rt.tick()
        self.read_reports()
        self.selector.close()
        for sock in rt.listeners:
            sock.close()


def serve(runtime: Runtime) -> None:
    ForkServer(runtime).serve()
