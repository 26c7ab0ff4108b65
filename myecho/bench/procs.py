"""CPU time and memory of a server and all its processes, read from /proc.

A fork-per-connection server's children come and go, so a plain
"CPU of the pid" misses most of the work. The kernel adds a child's CPU
time (and that of the children it reaped) to its parent's cutime/cstime
when the parent reaps it. Summing utime+stime+cutime+cstime over every
live process of the tree therefore counts each process of the tree's
history exactly once: the live ones by their own times, the reaped ones
through whoever reaped them. It needs no cgroup, so it works for servers
we start and for any local service whose listening socket we can find.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Direct children of every thread of ``pid`` (a thread may fork too)."""
    found: list[int] = []
    try:
        tasks = os.listdir(PROC / str(pid) / "task")
    except OSError:
        return found
    for task in tasks:
        with contextlib.suppress(OSError):
            found.extend(int(child) for child in (PROC / str(pid) / "task" / task / "children").read_text().split())
    return found


def tree(root: int) -> list[int]:
    """``root`` and all its descendants that exist now (zombies included)."""
    pids, todo, seen = [], [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen or not (PROC / str(pid)).exists():
            continue
        seen.add(pid)
        pids.append(pid)
        todo.extend(children(pid))
    return pids


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after it.
    return text.rsplit(")", 1)[1].split()


def state(pid: int) -> str | None:
    """The state letter of ``pid`` (R, S, Z for a zombie...), None if it is gone."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime+cutime+cstime summed over ``pids`` (see the module docstring)."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # fields[0] is the state (stat field 3): utime is field 14, so index 11.
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / CLOCK_TICKS


def own_cpu_seconds(pid: int) -> float | None:
    """utime+stime of one process alone, none of its children's (running or reaped)."""
    fields = _stat_fields(pid)
    return None if fields is None else sum(int(value) for value in fields[11:13]) / CLOCK_TICKS


@dataclass(frozen=True)
class Memory:
    """Memory of a process tree: RSS counts shared pages in every process
    that maps them (it overstates fork servers); PSS divides them fairly."""

    processes: int
    rss_bytes: int
    pss_bytes: int


def _kib_field(path: Path, name: str) -> int:
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1]) * 1024
    return 0


def memory(pids: list[int]) -> Memory:
    """RSS and PSS sums over ``pids`` (zombies count as 0)."""
    rss = pss = 0
    for pid in pids:
        rss += _kib_field(PROC / str(pid) / "status", "VmRSS:")
        pss += _kib_field(PROC / str(pid) / "smaps_rollup", "Pss:")
    return Memory(len(pids), rss, pss)


def open_fds(pid: int) -> int:
    """How many file descriptors ``pid`` holds (0 if it is gone)."""
    try:
        return len(os.listdir(PROC / str(pid) / "fd"))
    except OSError:
        return 0


def fd_limit(pid: int) -> int | None:
    """The soft RLIMIT_NOFILE of ``pid``, None if unknown or unlimited."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in (PROC / str(pid) / "limits").read_text().splitlines():
            if line.startswith("Max open files"):
                value = line.split()[3]
                return None if value == "unlimited" else int(value)
    return None


def fd_pressure(pids: list[int]) -> tuple[int, int] | None:
    """(fds, limit) of the process of ``pids`` closest to its fd limit, if any has one."""
    worst: tuple[int, int] | None = None
    for pid in pids:
        limit = fd_limit(pid)
        if limit:
            fds = open_fds(pid)
            if worst is None or fds / limit > worst[0] / worst[1]:
                worst = (fds, limit)
    return worst


def mem_available() -> int:
    """MemAvailable of the machine, in bytes."""
    return _kib_field(PROC / "meminfo", "MemAvailable:")


def mem_total() -> int:
    return _kib_field(PROC / "meminfo", "MemTotal:")


def system_processes() -> int:
    """Processes on the machine now (all users): what pid_max bounds."""
    return sum(1 for name in os.listdir(PROC) if name.isdigit())


def pid_max() -> int:
    try:
        return int((PROC / "sys" / "kernel" / "pid_max").read_text())
    except (OSError, ValueError):
        return 32768


def loadavg() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages: how busy the shared machine was."""
    one, five, fifteen = os.getloadavg()
    return one, five, fifteen


def _tcp_listeners(port: int) -> set[str]:
    """Socket inodes listening on ``port`` (IPv4 and IPv6)."""
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in (PROC / "net" / table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(inode)
    return inodes


def listener_owner(port: int) -> int | None:
    """The oldest process holding the socket that listens on ``port``.

    For a service we did not start (``--target``, ``--installed``) this is
    the root of the tree to measure. PID 1 (systemd holding an Accept=yes
    socket) is no server: then None.
    """
    inodes = _tcp_listeners(port)
    if not inodes:
        return None
    owners = []
    for name in os.listdir(PROC):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(PROC / name / "fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(PROC / name / "fd" / fd)
                    if target.startswith("socket:[") and target[8:-1] in inodes:
                        owners.append(int(name))
                        break
    owners = [pid for pid in owners if pid != 1]
    return min(owners) if owners else None
