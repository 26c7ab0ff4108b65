"""The fork model's children, as its parent sees them: the spare pool.

A child of the fork model is in one of four states, and the parent needs
each set for a different question:

- *forked*: forked by the parent itself, after accept (``--spare-children
  0``, or while the spawner is late or gone);
- *spare*: forked ahead by the spawner, waiting on its channel for one
  connection, oldest first;
- *retiring*: a spare sent EOF (fewer spares wanted, or it died waiting),
  not yet reported gone;
- *serving*: a former spare, handed a connection.

``Children`` keeps them, with the spares asked of the spawner and not yet
received (``asked``), so that the parent can say how many children count
against ``max_children``, whether the spawner is late, and what an exit
means (a connection ended, or only a spare gone). ``Spawner`` is the
parent's end of the spawner process (``spawner.py``).
"""

import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from myecho.models.spawner import MESSAGE

SPAWNER = Path(__file__).with_name("spawner.py")
#: What a child serving one connection costs in memory (PSS: its own pages,
#: plus its share of those it shares), rounded up from what one measures
#: over 1,000 open connections (about 410 kB on CPython 3.11).
CHILD_MEMORY = 512 * 1024
#: Descriptors the parent keeps for itself (listeners, the spawner, the
#: journal, the slots) besides one per child and one per lobby connection.
PARENT_FDS = 64
#: A spare asked of the spawner and not received after this long: the
#: spawner is stopped or stuck, and the parent forks connections itself.
SPAWNER_DEADLINE = 0.5


class Children:
    """The children by state, and the spares asked for."""

    def __init__(self) -> None:
        self.forked: set[int] = set()
        self.spares: dict[int, socket.socket] = {}  # pid -> the parent's end of its channel; oldest first
        self.retiring: set[int] = set()
        self.serving: set[int] = set()
        self.asked = 0  # spares asked of the spawner, not yet received
        self.waited_since = 0.0  # when the oldest of those was asked for
        self.late = False  # the spawner is overdue, and the log said so

    def __len__(self) -> int:
        """Every child alive, in whatever state."""
        return len(self.forked) + len(self.spares) + len(self.retiring) + len(self.serving)

    def __contains__(self, pid: object) -> bool:
        return pid in self.forked or pid in self.serving or pid in self.spares or pid in self.retiring

    def asking(self, count: int) -> None:
        """``count`` more spares asked of the spawner."""
        if not self.asked:
            self.waited_since = time.monotonic()
        self.asked += count

    def overdue(self) -> bool:
        """Asked for spares and got none for SPAWNER_DEADLINE: stopped or stuck."""
        return self.asked > 0 and time.monotonic() - self.waited_since > SPAWNER_DEADLINE

    def add_spare(self, pid: int, channel: socket.socket) -> bool:
        """A spare from the spawner; True if the spawner had been late."""
        self.spares[pid] = channel
        self.asked = max(0, self.asked - 1)
        self.waited_since = time.monotonic()
        late, self.late = self.late, False
        return late

    def take(self) -> Iterator[tuple[int, socket.socket]]:
        """The spares, oldest first, each already counted as serving: the
        caller hands its connection to the first that takes it and calls
        ``failed`` for those that did not (they died waiting)."""
        while self.spares:
            pid = next(iter(self.spares))
            channel = self.spares.pop(pid)
            self.serving.add(pid)
            yield pid, channel

    def failed(self, pid: int) -> None:
        """A spare that could not take its connection: gone, or going."""
        self.serving.discard(pid)
        self.retiring.add(pid)

    def retire(self, wanted: int) -> None:
        """EOF to the newest spares beyond ``wanted``: they exit."""
        while len(self.spares) > wanted:
            pid, channel = self.spares.popitem()
            channel.close()
            self.retiring.add(pid)

    def exited(self, pid: int) -> bool:
        """A child is gone: True if it served a connection (forked here or
        handed one), False if it was a spare."""
        if pid in self.spares:  # died waiting
            self.spares.pop(pid).close()
            return False
        self.retiring.discard(pid)
        if pid in self.serving:
            self.serving.discard(pid)
            return True
        if pid in self.forked:
            self.forked.discard(pid)
            return True
        return False

    def spawner_lost(self) -> None:
        """The spawner died: its spares exit (EOF on their channels, here),
        the ones serving go on, adopted by the parent (a subreaper)."""
        self.close_channels()
        self.spares.clear()
        self.retiring.clear()
        self.asked = 0
        self.late = False

    def close_channels(self) -> None:
        """Close the parent's end of every spare's channel (also in a forked child)."""
        for channel in self.spares.values():
            channel.close()


class Spawner:
    """The parent's side of the spawner: its process and its control socket."""

    def __init__(self, slots_fd: int) -> None:
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            theirs.set_inheritable(True)
            os.set_inheritable(slots_fd, True)
            try:
                argv = [str(os.getpid()), str(theirs.fileno()), str(slots_fd)]
                self.pid = os.posix_spawn(
                    sys.executable, [sys.executable, "-I", "-S", str(SPAWNER), *argv], _child_environment()
                )
            except OSError:
                self.control.close()
                raise
            finally:
                os.set_inheritable(slots_fd, False)

    def ask(self, count: int) -> None:
        """``count`` more spares."""
        for _ in range(count):
            self.control.send(MESSAGE.pack(b"F", 0, 0))

    def receive(self) -> tuple[bytes, int, int, socket.socket | None]:
        """One message: (kind, pid, exit code, the spare's channel for b"S"); kind b"" at EOF."""
        try:
            data, fds, _, _ = socket.recv_fds(self.control, MESSAGE.size, 1)
        except ConnectionResetError:  # it died with our requests unread
            return b"", 0, 0, None
        if not data:
            return b"", 0, 0, None
        kind, pid, code = MESSAGE.unpack(data)
        return kind, pid, code, socket.socket(fileno=fds[0]) if fds else None

    def close(self) -> None:
        """EOF on the control socket: the spawner exits (reaped as our child)."""
        self.control.close()


def _child_environment() -> dict[str, str]:
    """Ours, minus what systemd meant for the main process alone."""
    private = ("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_STREAM")
    return {key: value for key, value in os.environ.items() if not key.startswith(private)}


def fitting(spares: int, lobby: int, fd_limit: int) -> tuple[int, str]:
    """The most children this machine holds, and what bounds it: half of
    MemAvailable at CHILD_MEMORY each, the fd limit (the parent keeps one
    descriptor per child and per lobby or spare connection), the kernel's
    pid_max and the service's cgroup ``pids.max`` (systemd's TasksMax), each
    less what the parent and the spawner need."""
    bounds = [(max(1, fd_limit - PARENT_FDS - lobby - spares), f"the fd limit, {fd_limit}")]
    available = _meminfo("MemAvailable")
    if available:
        bounds.append((max(1, available // 2 // CHILD_MEMORY), f"half of MemAvailable, {available >> 20} MiB"))
    pid_max = _number(Path("/proc/sys/kernel/pid_max"))
    if pid_max:
        bounds.append((max(1, pid_max - 2000 - spares), f"pid_max, {pid_max}"))
    tasks = _number(_cgroup() / "pids.max")
    if tasks:
        bounds.append((max(1, tasks - 16 - spares), f"the cgroup's pids.max, {tasks}"))
    return min(bounds)


def _meminfo(field: str) -> int:
    """A /proc/meminfo field in bytes; 0 if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _number(path: Path) -> int:
    """A file holding one number; 0 if it is missing or says "max"."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def _cgroup() -> Path:
    """This process's cgroup v2 directory (the root if unknown)."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return Path("/sys/fs/cgroup") / line[3:].lstrip("/")
    except OSError:
        pass
    return Path("/sys/fs/cgroup")
