"""The fork model's spawner: a small process that forks children ahead of need.

Forking costs in proportion to the memory of the process that forks (its
page tables are copied), plus the copy-on-write faults the child then
takes. The fork model's parent holds the whole
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
answers with the spare and the parent's end of its socketpair; ``X pid
code`` says that a spare has exited (and been reaped here) with that exit
code. EOF from the parent means stop: idle spares get EOF from the parent
too, busy ones are the parent's to SIGTERM.

Each connection's figures live in a *slot* of a memory file shared with
the parent (``SLOT``: last activity, bytes, reads), written after every
echo: the parent reads them for a live STATUS, to close idle connections
and, at the limit, to shed the idlest one. The parent names the slot when
it hands the connection over.

Who dies with whom: this process dies with the parent (PR_SET_PDEATHSIG).
A spare is told of this process's death too, but by SIGUSR2, and only
exits if it is not the parent's (a subreaper) now: a ``kill -9`` of the
spawner leaves the connections being served alone, and the parent's death
still takes every one of them (their parent-death signal fires again).
"""

import gc
import mmap
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator

#: A connection's figures, in its slot: last activity (CLOCK_MONOTONIC, the
#: same clock in every process), bytes echoed, reads.
SLOT = struct.Struct("=dQQ")
SLOT_SIZE = 32
#: Slots in the shared file; slot 0 is scratch (the warm-up writes there).
#: Only the pages of slots in use take memory.
SLOT_COUNT = 65536
#: The parent hands a spare its connection with the slot's number.
HANDOVER = struct.Struct("=I")
#: Parent <-> spawner: a kind (b"F", b"S", b"X"), a pid, an exit code (b"X").
MESSAGE = struct.Struct("=cii")
PR_SET_PDEATHSIG = 1
CHUNK = 65536


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


def prctl(option: int, value: int) -> None:
    """libc's prctl(option, value) (a no-op where there is none)."""
    load_prctl()
    _prctl[0](option, value, 0, 0, 0)


def die_with(parent: int, signum: int = signal.SIGTERM) -> bool:
    """Have the kernel send ``signum`` when our parent dies; False if
    ``parent`` (our parent at fork) has already died."""
    load_prctl()
    _prctl[0](PR_SET_PDEATHSIG, signum, 0, 0, 0)
    return os.getppid() == parent


def open_slots(fd: int) -> mmap.mmap:
    """Map the shared slots file (MAP_SHARED: inherited by every fork)."""
    return mmap.mmap(fd, SLOT_COUNT * SLOT_SIZE)


def new_slots() -> tuple[int, mmap.mmap]:
    """The slots file (a memfd: no path, no disk) and its mapping."""
    fd = os.memfd_create("myecho-slots", os.MFD_CLOEXEC)
    os.ftruncate(fd, SLOT_COUNT * SLOT_SIZE)
    return fd, open_slots(fd)


def reaped() -> Iterator[tuple[int, int]]:
    """Every child that has exited (pid, exit code; -N: killed by signal N),
    without blocking: none is left a zombie."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, os.waitstatus_to_exitcode(status)


def serve_connection(conn: socket.socket, slots: mmap.mmap | None, slot: int) -> int:
    """Echo one connection until EOF, its figures kept in ``slot``; the exit code.

    The slot is written after each echo, so the parent sees the bytes live
    and when the connection was last active; a write that takes only part
    counts as activity too (a slow reader is not an idle one)."""
    fd = conn.fileno()
    offset = slot * SLOT_SIZE
    pack, clock = SLOT.pack_into, time.monotonic
    total = reads = 0
    try:
        while data := os.read(fd, CHUNK):
            total += len(data)
            reads += 1
            view = memoryview(data)
            while view := view[os.write(fd, view) :]:
                if slots is not None:
                    pack(slots, offset, clock(), total - len(view), reads)
            if slots is not None:
                pack(slots, offset, clock(), total, reads)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        return 1
    return 0


def warm_up() -> None:
    """Echo one byte over a socketpair: a fresh child's first run through the
    echo path takes copy-on-write faults (refcounts on shared pages): take
    them while waiting, not on the first client's clock."""
    ours, theirs = socket.socketpair()
    with ours:
        ours.sendall(b"w")
        ours.shutdown(socket.SHUT_WR)
        serve_connection(theirs, _slots[0] if _slots else None, 0)
        theirs.close()
        ours.recv(1)


_slots: list[mmap.mmap] = []  # this process's mapping of the slots file


def wait_and_serve(channel: socket.socket) -> int:
    """A spare's life: one connection (and its slot) from the parent, or EOF (retired)."""
    warm_up()
    try:
        data, fds, _, _ = socket.recv_fds(channel, HANDOVER.size, 1)
    except OSError:
        return 1
    channel.close()
    if not fds:
        return 0
    (slot,) = HANDOVER.unpack(data) if len(data) == HANDOVER.size else (0,)
    return serve_connection(socket.socket(fileno=fds[0]), _slots[0] if _slots else None, slot)


def orphaned_by(server: int) -> Callable[[int, object], None]:
    """A spare's SIGUSR2 handler, its parent-death signal: exit unless the
    server has adopted us (the spawner died, the server lives)."""

    def handler(signum: int, frame: object) -> None:
        if os.getppid() != server:
            os._exit(0)

    return handler


class Spawner:
    """Forks spares on request, reaps them, tells the parent."""

    def __init__(self, control: socket.socket, slots_fd: int | None, server: int) -> None:
        self.control = control
        self.server = server
        if slots_fd is not None and not _slots:
            _slots.append(open_slots(slots_fd))
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
                signal.signal(signal.SIGUSR2, orphaned_by(self.server))
                code = wait_and_serve(theirs) if die_with(me, signal.SIGUSR2) else 0
            finally:
                os._exit(code)
        theirs.close()
        with ours:
            socket.send_fds(self.control, [MESSAGE.pack(b"S", pid, 0)], [ours.fileno()])

    def reap(self) -> None:
        for pid, code in reaped():
            self.control.send(MESSAGE.pack(b"X", pid, code))

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
    """``spawner.py PARENT_PID CONTROL_FD SLOTS_FD`` (started by the fork model)."""
    parent, control_fd, slots_fd = (int(arg) for arg in argv)
    # Nothing else of the parent's: above all not its listening sockets.
    keep = sorted((control_fd, slots_fd))
    os.closerange(3, keep[0])
    os.closerange(keep[0] + 1, keep[1])
    os.closerange(keep[1] + 1, os.sysconf("SC_OPEN_MAX"))
    # ^C in a terminal reaches the whole group: the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if not die_with(parent):
        return 0
    # A collection in a spare would write to every object it scans and copy
    # the pages they sit on; spares and this loop make no garbage cycles.
    gc.disable()
    gc.freeze()

    try:
        return Spawner(socket.socket(fileno=control_fd), slots_fd, parent).run()
    except (BrokenPipeError, ConnectionResetError):
        return 0  # the parent went away mid-message


if __name__ == "__main__":
    # Run as a file under ``-I -S``: site-packages is not on sys.path, so
    # put the directory that holds the myecho package there ourselves.
    from os.path import abspath, dirname

    sys.path.insert(0, dirname(dirname(dirname(abspath(__file__)))))
    sys.exit(main(sys.argv[1:]))
