"""Signals are only noted in the handler; the event loop acts on them.

``signal.set_wakeup_fd`` makes the C-level handler write each signal number
into a socket that the loop watches beside its connections (the self-pipe
trick), so a loop blocked in epoll or zmq_poll wakes at once and no real
work ever runs inside a handler.
"""

import signal
import socket
from types import FrameType

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
#: What every model acts on; a model that forks adds SIGCHLD (``watch``),
#: so that the others are never woken for a child they do not have.
WATCHED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _note(signum: int, frame: FrameType | None) -> None:
    """Nothing to do here: the wakeup socket already carries the number."""


class SignalWatcher:
    """A readable fd that yields the signals received since the last drain."""

    def __init__(self, signals: tuple[signal.Signals, ...] = WATCHED) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._signals: list[signal.Signals] = []
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self.watch(*signals)

    def watch(self, *signals: signal.Signals) -> None:
        """Note these signals too (the fork model and the prefork supervisor: SIGCHLD)."""
        for signum in signals:
            if signum not in self._signals:
                signal.signal(signum, _note)
                self._signals.append(signum)

    def fileno(self) -> int:
        return self._reader.fileno()

    def rearm(self) -> None:
        """Take the wakeup fd back: uvloop points it at its own socket while
        its loop runs, and our fd would then never hear of a signal."""
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)

    def drain(self) -> list[int]:
        """The signals noted so far, each once, in arrival order."""
        seen: list[int] = []
        while True:
            try:
                data = self._reader.recv(4096)
            except (BlockingIOError, InterruptedError):
                return seen
            if not data:
                return seen
            for signum in data:
                if signum not in seen:
                    seen.append(signum)

    def close(self) -> None:
        """Give the signals back their default actions (also in a forked child)."""
        signal.set_wakeup_fd(self._previous_fd if self._previous_fd >= 0 else -1)
        for signum in self._signals:
            signal.signal(signum, signal.SIG_DFL)
        self._reader.close()
        self._writer.close()
