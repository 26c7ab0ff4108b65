"""Processes that die with their parent, and children reaped without blocking.

Shared by every loop that forks (the fork model, its spawner, the prefork
supervisor). Only the standard library: the fork model's spawner imports
this before it forks, and each child shares it untouched.
"""

import os
import signal
from collections.abc import Callable, Iterator

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


def prctl(option: int, value: int) -> None:
    """libc's prctl(option, value) (a no-op where there is none)."""
    load_prctl()
    _prctl[0](option, value, 0, 0, 0)


def die_with(parent: int, signum: int = signal.SIGTERM) -> bool:
    """Have the kernel send ``signum`` when our parent dies; False if
    ``parent`` (our parent at fork) has already died."""
    prctl(PR_SET_PDEATHSIG, signum)
    return os.getppid() == parent


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
