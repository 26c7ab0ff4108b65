"""What every model is handed: ready sockets, one notifier, signals, figures.

A model only serves. It watches ``runtime.signals`` in its own loop, calls
``runtime.on_signals()`` when that fd is readable and ``runtime.tick()``
at least every ``runtime.timeout()`` seconds; the runtime turns those into
graceful stop, reload, watchdog pings and STATUS lines, the same way for
every model.
"""

import logging
import signal
import socket
import time
from dataclasses import dataclass

from myecho.core.settings import Settings, SettingsError
from myecho.core.signals import STOP_SIGNALS, SignalWatcher
from myecho.core.systemd import Notifier, setup_logging

STATUS_INTERVAL = 1.0


@dataclass
class Stats:
    """Live figures, for STATUS= and for the last log line."""

    open: int = 0
    served: int = 0
    messages: int = 0
    bytes: int = 0
    dropped: int = 0
    idle_closed: int = 0  # connections closed after the idle timeout
    shed: int = 0  # silent connections closed early, at the limit, for ones waiting
    detail: str = ""  # what else a model wants in STATUS (the broker: its pool)

    def connection_opened(self) -> None:
        self.open += 1
        self.served += 1

    def summary(self) -> str:
        text = f"{self.open} open, {self.served} served, {self.messages} messages, {self.bytes} bytes echoed"
        text += f", {self.dropped} dropped" if self.dropped else ""
        text += f", {self.idle_closed} closed idle" if self.idle_closed else ""
        text += f", {self.shed} shed" if self.shed else ""
        return text + (f"; {self.detail}" if self.detail else "")


class Runtime:
    """The shared layer between a model and the operating system."""

    def __init__(
        self,
        settings: Settings,
        listeners: list[socket.socket],
        notifier: Notifier | None = None,
        log: logging.Logger | None = None,
        listener_roles: list[str] | None = None,
    ) -> None:
        self.settings = settings
        self.listeners = listeners
        #: What each listener is for, when a model declares several kinds
        #: (``Listeners.roles``); empty when they are all alike.
        self.listener_roles = listener_roles or []
        self.notifier = notifier or Notifier()
        self.log = log or logging.getLogger("myecho")
        self.signals = SignalWatcher()
        self.stats = Stats()
        self.stopping = False
        self.stop_deadline = float("inf")
        now = time.monotonic()
        self._next_status = now
        self._next_watchdog = now

    # -- life cycle -------------------------------------------------------
    def ready(self, where: str) -> None:
        self.log.info("%s model serving on %s", self.settings.model, where)
        self.notifier.ready(f"serving on {where}")

    def begin_stop(self, reason: str) -> None:
        """Stop accepting; open connections get ``graceful_timeout`` seconds."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.settings.graceful_timeout
        self.log.info("%s: stopping, %s", reason, self.stats.summary())
        self.notifier.stopping(f"stopping: {self.stats.summary()}")

    def close_listeners(self) -> None:
        """Refuse new connections at once (systemd keeps its own copy, if any)."""
        for sock in self.listeners:
            sock.close()
        self.listeners = []

    def grace_expired(self) -> bool:
        return self.stopping and time.monotonic() >= self.stop_deadline

    def finish(self) -> None:
        self.log.info("stopped: %s", self.stats.summary())
        self.signals.close()

    # -- signals ------------------------------------------------------------
    def on_signals(self) -> None:
        """Act on TERM/INT (stop) and HUP (reload); a model that watches
        SIGCHLD reaps its children in its own loop."""
        for signum in self.signals.drain():
            if signum in STOP_SIGNALS:
                self.begin_stop(signal.Signals(signum).name)
            elif signum == signal.SIGHUP:
                self.reload()

    def reload(self) -> None:
        """Re-read the config file and reopen logs; connections stay open.

        All or nothing: the whole file is read and checked into new settings
        first; only then are the changed tunables copied over, in one step.
        A bad file changes nothing and says why in one line.
        """
        self.notifier.reloading()
        settings = self.settings
        try:
            setup_logging(settings.model, settings.log_level, settings.log_file)
        except OSError as error:  # the log's folder went away: keep writing to the open file
            self.log.error("reload: cannot reopen the log file: %s", error.strerror)
        try:
            new, changed, warnings = settings.reloaded()
        except SettingsError as error:
            self.log.error("reload refused, every setting kept: %s", error)
            self.notifier.ready(self.stats.summary())
            return
        for warning in warnings:
            self.log.warning("%s (ignored)", warning)
        for name in changed:
            setattr(settings, name, getattr(new, name))
        settings.from_file = new.from_file
        if "log_level" in changed:
            self.log.setLevel(settings.log_level.upper())
        self.log.info("reloaded (%s)", ", ".join(changed) if changed else "no setting changed")
        self.notifier.ready(self.stats.summary())

    # -- housekeeping -------------------------------------------------------
    def timeout(self) -> float:
        """How long the loop may block before the next tick is due."""
        deadline = min(self._next_status, self._next_watchdog, self.stop_deadline)
        return max(0.0, min(deadline - time.monotonic(), STATUS_INTERVAL))

    def tick(self) -> None:
        """Watchdog ping and STATUS line, when due. Sent from the loop
        itself, so a hung loop stops pinging and systemd restarts it."""
        now = time.monotonic()
        interval = self.notifier.watchdog_interval
        if interval is not None and now >= self._next_watchdog:
            self.notifier.watchdog()
            self._next_watchdog = now + interval
        elif interval is None:
            self._next_watchdog = float("inf")
        if now >= self._next_status:
            if self.notifier.enabled and not self.stopping:
                self.notifier.status(self.stats.summary())
            self._next_status = now + STATUS_INTERVAL
