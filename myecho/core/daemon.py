"""The talk's classic daemonize, for life without systemd.

Under systemd nothing daemonizes (Type=notify); this is for an admin who
starts ``myecho serve MODEL --daemon --pidfile F`` from a shell or an init
script: fork so the shell gets its prompt back, setsid to leave the
terminal's session, fork again so the daemon can never reacquire a
terminal, and write a pidfile for ``kill $(cat F)``.

The shell must still learn whether the daemon started: the first process
waits on a pipe until the daemon says "ready" (its model is serving) or
why it could not start, and exits 0 or 1 with that one line. The pidfile
is opened without following symlinks and locked (flock) for the daemon's
whole life: a second daemon on the same pidfile fails at once, loudly.
"""

import atexit
import contextlib
import errno
import fcntl
import os
import select
import sys
import time
from pathlib import Path

#: How long the shell waits for the daemon's word before giving up.
START_TIMEOUT = 60.0


class PidfileError(RuntimeError):
    """Another instance holds the pidfile, or it cannot be written."""


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses a symlink (O_NOFOLLOW) with a one-line reason."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{path} is a symbolic link: refused") from None
        raise OSError(error.errno, f"cannot open {path}: {error.strerror}") from None


def lock_pidfile(path: Path) -> int:
    """Open and lock the pidfile; the fd holds the lock until the daemon exits."""
    try:
        fd = open_nofollow(path, os.O_RDWR | os.O_CREAT)
    except OSError as error:
        raise PidfileError(f"pidfile: {error.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = os.read(fd, 32).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise PidfileError(f"pidfile {path} is locked by running process {owner}") from None
    return fd


def write_pidfile(fd: int, path: Path) -> None:
    """Write our pid into the locked pidfile; remove it when this process exits."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    mypid = os.getpid()

    def remove() -> None:
        if os.getpid() == mypid:  # never from a forked child
            path.unlink(missing_ok=True)

    atexit.register(remove)


class StartReport:
    """The daemon's side of the pipe to the shell: one word, once."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def send(self, message: str) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # the shell's process is gone: nobody to tell
            os.write(self._fd, message.encode(errors="replace")[:4000] + b"\n")
        os.close(self._fd)
        self._fd = None

    def ready(self) -> None:
        self.send("ready")

    def failed(self, message: str) -> None:
        self.send(message)


def _wait_for_word(fd: int) -> int:
    """In the first process: print the daemon's failure, if any; the exit status."""
    data = b""
    deadline = time.monotonic() + START_TIMEOUT
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            print(f"myecho: no word from the daemon after {START_TIMEOUT:.0f} s", file=sys.stderr)
            return 1
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    word = data.decode(errors="replace").strip()
    if word == "ready":
        return 0
    print(f"myecho: {word or 'the daemon exited during start-up'}", file=sys.stderr)
    return 1


def daemonize(pidfile: Path | None) -> StartReport:
    """Detach from the terminal; returns only in the daemon (grandchild).

    The pidfile is opened and locked before the first fork, so a second
    instance is refused in the shell that started it. The first process
    stays until the daemon reports through the returned ``StartReport``,
    then exits 0 ("ready") or 1 (the reason, printed on its stderr).
    """
    lock = lock_pidfile(pidfile) if pidfile is not None else None
    reader, writer = os.pipe()
    if os.fork():
        os.close(writer)
        os._exit(_wait_for_word(reader))
    os.close(reader)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    os.umask(0o022)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    os.set_inheritable(writer, False)
    report = StartReport(writer)
    if lock is not None and pidfile is not None:
        write_pidfile(lock, pidfile)
    return report
