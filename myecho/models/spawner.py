"""The fork model's spawner: a small process that forks children ahead of need.

Forking costs in proportion to the memory of the process that forks (about
25 µs per MB on the machines this was measured on, plus the copy-on-write
faults the child then takes). The fork model's parent holds the whole
shared layer, about 20 MB, so a fork there costs ten times what the C
reference's does, and in the talk's shape that cost sits between a
client's connect and its first echo. This process is started afresh
(``python3 -I -S`` on this file, like the inetd path), imports almost
nothing, and forks *spares*: each waits on a socketpair of its own for the
parent to hand it one accepted connection (SCM_RIGHTS), echoes it, reports
its figures and exits. The parent keeps accepting; the forks happen here,
beside it, on another core.

It speaks to the parent over one SOCK_SEQPACKET socket (``MESSAGE``):
``F`` from the parent asks for one more spare; ``S pid`` with a descriptor
answers with the spare and the parent's end of its socketpair; ``X pid``
says that a spare has exited (and been reaped here). EOF from the parent
means stop: idle spares get EOF from the parent too, busy ones are the
parent's to SIGTERM. Every process here dies with its parent
(PR_SET_PDEATHSIG), so none outlives the fork model's parent.
"""

import gc
import os
import select
import signal
import socket
import struct
import sys
from collections.abc import Callable, Iterator

#: Each child writes (bytes, reads) once, at exit: 16 bytes, well under
#: PIPE_BUF, so reports from many children never interleave.
REPORT = struct.Struct("=QQ")
#: Parent <-> spawner: a kind (b"F", b"S", b"X") and a pid.
MESSAGE = struct.Struct("=ci")
PR_SET_PDEATHSIG = 1


_prctl: list[Callable[..., int]] = []  # libc's


def load_prctl() -> None:
    """Load libc's prctl once, in the process that forks: loading it in each
    child (ctypes, dlopen) would cost that child milliseconds."""
    if not _prctl:
        try:
            import ctypes

            _prctl.append(ctypes.CDLL(None, use_errno=True).prctl)
        except (ImportError, OSError, AttributeError):  # not glibc/Linux: the parent's SIGTERM must do
            _prctl.append(lambda *args: 0)


def die_with(parent: int) -> bool:
    """Have the kernel SIGTERM us when ``parent`` dies; False if it already has."""
    load_prctl()
    _prctl[0](PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return os.getppid() == parent


def reaped() -> Iterator[int]:
    """Every child that has exited, without blocking: none is left a zombie."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid


def serve_connection(conn: socket.socket, reports: int | None) -> int:
    """Echo one connection until EOF, write its figures to ``reports``; the exit code."""
    from myecho.echo import echo_fds

    code = total = reads = 0
    try:
        total, reads = echo_fds(conn.fileno(), conn.fileno())
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        code = 1
    figures = REPORT.pack(total, reads)  # packed for the warm-up too: its pages are the point
    if reports is not None:
        os.write(reports, figures)
    return code


def warm_up() -> None:
    """Echo one byte over a socketpair: a fresh child's first run through the
    echo path takes copy-on-write faults (refcounts on shared pages), about
    100 µs here; take them while waiting, not on the first client's clock."""
    ours, theirs = socket.socketpair()
    with ours:
        ours.sendall(b"w")
        ours.shutdown(socket.SHUT_WR)
        serve_connection(theirs, None)
        theirs.close()
        ours.recv(1)


def wait_and_serve(channel: socket.socket, reports: int) -> int:
    """A spare's life: one connection from the parent, or EOF (retired)."""
    warm_up()
    try:
        _, fds, _, _ = socket.recv_fds(channel, 1, 1)
    except OSError:
        return 1
    channel.close()
    if not fds:
        return 0
    return serve_connection(socket.socket(fileno=fds[0]), reports)


class Spawner:
    """Forks spares on request, reaps them, tells the parent."""

    def __init__(self, control: socket.socket, reports: int) -> None:
        self.control = control
        self.reports = reports
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def fork_spare(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        me = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ours.close()
                self.control.close()
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.close(self.wakeup_r)
                os.close(self.wakeup_w)
                code = wait_and_serve(theirs, self.reports) if die_with(me) else 0
            finally:
                os._exit(code)
        theirs.close()
        with ours:
            socket.send_fds(self.control, [MESSAGE.pack(b"S", pid)], [ours.fileno()])

    def reap(self) -> None:
        for pid in reaped():
            self.control.send(MESSAGE.pack(b"X", pid))

    def run(self) -> int:
        poller = select.poll()
        poller.register(self.control, select.POLLIN)
        poller.register(self.wakeup_r, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self.wakeup_r:
                    try:
                        while os.read(self.wakeup_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                    self.reap()
                    continue
                request = self.control.recv(MESSAGE.size)
                if not request:
                    return 0  # the parent is done with us
                self.fork_spare()


def main(argv: list[str]) -> int:
    """``spawner.py PARENT_PID CONTROL_FD REPORTS_FD`` (started by the fork model)."""
    parent, control_fd, reports_fd = (int(arg) for arg in argv)
    # Nothing else of the parent's: above all not its listening sockets.
    keep = sorted((control_fd, reports_fd))
    os.closerange(3, keep[0])
    os.closerange(keep[0] + 1, keep[1])
    os.closerange(keep[1] + 1, os.sysconf("SC_OPEN_MAX"))
    # ^C in a terminal reaches the whole group: the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if not die_with(parent):
        return 0
    import myecho.echo  # noqa: F401  (once here, not in every spare)

    # A collection in a spare would write to every object it scans and copy
    # the pages they sit on; spares and this loop make no garbage cycles.
    gc.disable()
    gc.freeze()

    try:
        return Spawner(socket.socket(fileno=control_fd), reports_fd).run()
    except (BrokenPipeError, ConnectionResetError):
        return 0  # the parent went away mid-message


if __name__ == "__main__":
    # Run as a file under ``-I -S``: site-packages is not on sys.path, so
    # put the directory that holds the myecho package there ourselves.
    from os.path import abspath, dirname

    sys.path.insert(0, dirname(dirname(dirname(abspath(__file__)))))
    sys.exit(main(sys.argv[1:]))
