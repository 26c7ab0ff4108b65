"""The talk's classic daemonize, for life without systemd.

Under systemd nothing daemonizes (Type=notify); this is for an admin who
starts ``myecho serve MODEL --daemon --pidfile F`` from a shell or an init
script: fork so the shell gets its prompt back, setsid to leave the
terminal's session, fork again so the daemon can never reacquire a
terminal, and write a pidfile for ``kill $(cat F)``.
"""

import atexit
import os
from pathlib import Path


class PidfileError(RuntimeError):
    """Another instance holds the pidfile, or it cannot be written."""


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_pidfile(path: Path) -> None:
    """Refuse to start when a live process already owns the pidfile."""
    try:
        old = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return
    except OSError as error:
        raise PidfileError(f"cannot read pidfile {path}: {error.strerror}") from error
    if old != os.getpid() and _running(old):
        raise PidfileError(f"pidfile {path} names running process {old}")


def write_pidfile(path: Path) -> None:
    """Write our pid; remove the file when this process exits."""
    check_pidfile(path)
    try:
        path.write_text(f"{os.getpid()}\n")
    except OSError as error:
        raise PidfileError(f"cannot write pidfile {path}: {error.strerror}") from error
    mypid = os.getpid()

    def remove() -> None:
        if os.getpid() == mypid:  # never from a forked child
            path.unlink(missing_ok=True)

    atexit.register(remove)


def daemonize(pidfile: Path | None) -> None:
    """Detach from the terminal; returns only in the daemon (grandchild).

    The pidfile is checked before the first fork, so a second instance is
    refused in the shell that started it, with a reason and exit status 1.
    """
    if pidfile is not None:
        check_pidfile(pidfile)
    if os.fork():
        os._exit(0)
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
    if pidfile is not None:
        write_pidfile(pidfile)
