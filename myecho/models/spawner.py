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

What a child costs: the pages written after its fork, its own and those
this process writes before the next fork (the child keeps the old copy).
In CPython every object a call touches has its reference count written,
so both paths are kept short and made of builtins: the SIGUSR2 handler
and libc's prctl are set up once here, the spare's path uses the
channel's socket object for the connection it is handed (no socket object
of its own, no warm-up), and the echo loop allocates only what it reads.
"""

import _socket
import gc
import mmap
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable

if __name__ == "__main__":
    # Run as a file under ``-I -S``: site-packages is not on sys.path, so
    # put the directory that holds the myecho package there ourselves.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from myecho.core.processes import die_with, load_prctl, reaped

#: A connection's figures, in its slot: last activity (CLOCK_MONOTONIC, the
#: same clock in every process), bytes echoed, reads.
SLOT = struct.Struct("=dQQ")
SLOT_SIZE = 32
#: Slots in the shared file; slot 0 is scratch (for a connection that found none free).
#: Only the pages of slots in use take memory.
SLOT_COUNT = 65536
#: The parent hands a spare its connection with the slot's number.
HANDOVER = struct.Struct("=I")
#: Parent <-> spawner: a kind (b"F", b"S", b"X"), a pid, an exit code (b"X").
MESSAGE = struct.Struct("=cii")
CHUNK = 65536
#: Room for the one descriptor a handover carries.
CMSG_SPACE = socket.CMSG_SPACE(HANDOVER.size)


def open_slots(fd: int) -> mmap.mmap:
    """Map the shared slots file (MAP_SHARED: inherited by every fork)."""
    return mmap.mmap(fd, SLOT_COUNT * SLOT_SIZE)


def new_slots() -> tuple[int, mmap.mmap]:
    """The slots file (a memfd: no path, no disk) and its mapping."""
    fd = os.memfd_create("myecho-slots", os.MFD_CLOEXEC)
    os.ftruncate(fd, SLOT_COUNT * SLOT_SIZE)
    return fd, open_slots(fd)


def serve_connection(conn: socket.socket, slots: mmap.mmap | None, slot: int) -> int:
    """Echo one connection until EOF, its figures kept in ``slot``; the exit code."""
    try:
        code = echo(conn.fileno(), slots, slot * SLOT_SIZE)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        return 1
    return code


def echo(
    fd: int,
    slots: mmap.mmap | None,
    offset: int,
    read: Callable[[int, int], bytes] = os.read,
    write: Callable[[int, bytes], int] = os.write,
    clock: Callable[[], float] = time.monotonic,
    pack: Callable[..., None] = SLOT.pack_into,
) -> int:
    """Echo ``fd`` until EOF; 0, or 1 on an error. The figures go to the slot
    at ``offset`` after each echo, so the parent sees the bytes live and when
    the connection was last active; a write that takes only part counts as
    activity too (a slow reader is not an idle one).

    A child's memory is the pages it writes after the fork, and a call
    writes the reference count of every object it touches: the loop calls
    only the builtins bound as its defaults and allocates nothing but the
    data it reads."""
    total = reads = 0
    try:
        while data := read(fd, CHUNK):
            total += len(data)
            reads += 1
            sent = write(fd, data)
            while sent < len(data):
                if slots is not None:
                    pack(slots, offset, clock(), total - len(data) + sent, reads)
                sent += write(fd, data[sent:])
            if slots is not None:
                pack(slots, offset, clock(), total, reads)
    except OSError:
        return 1
    return 0


def orphaned_by(server: int) -> Callable[[int, object], None]:
    """A spare's SIGUSR2 handler, its parent-death signal: exit unless the
    server has adopted us (the spawner died, the server lives)."""

    def handler(signum: int, frame: object) -> None:
        if os.getppid() != server:
            os._exit(0)

    return handler


def spare(channel: _socket.socket, slots: mmap.mmap | None, spawner: int) -> int:
    """A spare's life, in the child just forked: one connection (and its
    slot) from the parent, or EOF (retired); the exit code.

    Everything it needs was made before the fork (the SIGUSR2 handler, the
    channel, libc's prctl): what runs here writes as few pages as it can."""
    if not die_with(spawner, signal.SIGUSR2):
        return 0
    try:
        data, ancillary, _, _ = channel.recvmsg(HANDOVER.size, CMSG_SPACE)
    except OSError:
        return 1
    if not ancillary:
        return 0
    # The connection takes the channel's place: the channel's socket object
    # then serves for the shutdown, and the child makes none of its own.
    fd = channel.fileno()
    os.dup2(int.from_bytes(ancillary[0][2][: HANDOVER.size], sys.byteorder), fd)
    (slot,) = HANDOVER.unpack(data) if len(data) == HANDOVER.size else (0,)
    code = echo(fd, slots, slot * SLOT_SIZE)
    try:
        channel.shutdown(socket.SHUT_WR)
    except OSError:
        return 1
    return code


class Spawner:
    """Forks spares on request, reaps them, tells the parent."""

    def __init__(self, control: socket.socket, slots_fd: int | None, server: int) -> None:
        self.control = control
        self.control_fd = control.fileno()
        self.pid = os.getpid()
        self.slots = open_slots(slots_fd) if slots_fd is not None else None
        # Imported here: run as a file, this module finds the package only
        # once ``__main__`` has put it on sys.path.
        from myecho.core.signals import SignalWatcher

        self.signals = SignalWatcher((signal.SIGCHLD,))
        # Inherited by every spare, so that none has to install it.
        signal.signal(signal.SIGUSR2, orphaned_by(server))
        load_prctl()
        self.failing = False  # a spare could not be forked (said once)

    def fork_spare(self) -> None:
        """One spare, and the parent's end of its channel to the parent.

        Every page this process writes between two forks stays with the
        child forked before, as a copy of its own: this path makes its
        sockets with ``_socket`` and sends them with ``sendmsg``, without
        the Python-level wrappers of ``socket``."""
        try:
            ours, theirs = _socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as error:
            return self.cannot(error)
        try:
            pid = os.fork()
        except OSError as error:  # pids.max, memory: the parent forks after accept meanwhile
            ours.close()
            theirs.close()
            return self.cannot(error)
        self.failing = False
        if pid == 0:
            code = 1
            try:
                ours.close()
                os.close(self.control_fd)
                code = spare(theirs, self.slots, self.pid)
            finally:
                os._exit(code)
        theirs.close()
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, ours.fileno().to_bytes(4, sys.byteorder))]
        try:
            self.control.sendmsg([MESSAGE.pack(b"S", pid, 0)], rights)
        finally:
            ours.close()

    def cannot(self, error: OSError) -> None:
        """No spare this time: one line to the journal until a fork works again."""
        if not self.failing:
            print(f"myecho spawner: cannot fork a spare: {error.strerror}", file=sys.stderr, flush=True)
        self.failing = True

    def reap(self) -> None:
        for pid, code in reaped():
            self.control.send(MESSAGE.pack(b"X", pid, code))

    def run(self) -> int:
        poller = select.poll()
        poller.register(self.control, select.POLLIN)
        poller.register(self.signals, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self.signals.fileno():
                    self.signals.drain()
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
    sys.exit(main(sys.argv[1:]))
