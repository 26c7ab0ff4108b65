"""Accepting connections, the same way in every model that accepts them.

The listening sockets sit in the model's selector only while the model has
room: at its limit (max children, max connections) they leave it, and new
connections wait in the kernel's backlog instead of being refused. Running
out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) pauses
accepting for a moment: the pending connection stays readable, so a loop
that simply tried again would spin a core and log without end.
"""

import errno
import selectors
import socket
import time

from myecho.runtime import Runtime

PAUSE = 0.1
RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: The selector data that marks a listening socket.
LISTENER = "listener"


class Acceptor:
    """Puts the runtime's listeners in and out of a selector, and accepts."""

    def __init__(self, selector: selectors.BaseSelector, runtime: Runtime) -> None:
        self.selector = selector
        self.rt = runtime
        self.listening = False
        self.paused_until = 0.0
        for sock in runtime.listeners:
            sock.setblocking(False)

    def _listen(self, wanted: bool) -> None:
        if wanted == self.listening:
            return
        for sock in self.rt.listeners:
            if wanted:
                self.selector.register(sock, selectors.EVENT_READ, LISTENER)
            else:
                self.selector.unregister(sock)
        self.listening = wanted

    def update(self, room: bool) -> None:
        """Listen while there is room and no pause; once stopping, close the listeners."""
        if self.rt.stopping:
            self._listen(False)
            self.rt.close_listeners()
        else:
            self._listen(room and time.monotonic() >= self.paused_until)

    def accept(self, listener: socket.socket) -> socket.socket | None:
        """One new connection, or None when there is none (or no resources) now."""
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return None
        except OSError as error:
            if error.errno in RESOURCE_ERRORS:
                self.rt.log.warning("accept: %s; pausing %.1f s", error.strerror, PAUSE)
                self.paused_until = time.monotonic() + PAUSE
                self._listen(False)
            return None  # ECONNABORTED and the like: the next one will do
        return sock

    def timeout(self, timeout: float) -> float:
        """Shorten the loop's timeout so that a pause ends on time."""
        left = self.paused_until - time.monotonic()
        return min(timeout, left) if left > 0 else timeout
