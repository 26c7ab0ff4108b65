"""Everything myecho says to systemd, in one place: sd_notify and journald.

Readiness, status, watchdog and stopping go through python-systemd's
``systemd.daemon.notify`` (Debian's python3-systemd), or through the pure
Python ``sdnotify`` where the C binding is not installed. Outside systemd
(no NOTIFY_SOCKET) every call is a no-op, so models never need to ask.
"""

import logging
import logging.handlers
import os
import sys
from collections.abc import Callable
from pathlib import Path


def _notify_backend() -> Callable[[str], object] | None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    try:
        from systemd import daemon
    except ImportError:
        try:
            import sdnotify
        except ImportError:
            logging.getLogger("myecho").warning(
                "NOTIFY_SOCKET is set but neither python3-systemd nor sdnotify is installed"
            )
            return None
        return sdnotify.SystemdNotifier().notify  # type: ignore[no-any-return]
    return daemon.notify  # type: ignore[no-any-return]


class Notifier:
    """The one voice that tells systemd how the service is doing."""

    def __init__(self) -> None:
        self._send = _notify_backend()
        self.watchdog_interval = self._watchdog_interval()

    @staticmethod
    def _watchdog_interval() -> float | None:
        """Half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2_000_000
        except ValueError:
            return None

    @property
    def enabled(self) -> bool:
        return self._send is not None

    def _say(self, message: str) -> None:
        """Best effort: a full fd table (EMFILE) must not take the service down."""
        if self._send is None:
            return
        try:
            self._send(message)
        except OSError as error:
            logging.getLogger("myecho").warning("sd_notify failed: %s", error.strerror)

    def ready(self, status: str) -> None:
        self._say(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self._say(f"STATUS={status}")

    def watchdog(self) -> None:
        self._say("WATCHDOG=1")

    def reloading(self) -> None:
        self._say("RELOADING=1")

    def stopping(self, status: str) -> None:
        self._say(f"STOPPING=1\nSTATUS={status}")

    def disable(self) -> None:
        """In a forked child: only the main process speaks to systemd."""
        self._send = None
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(name, None)


def under_journald() -> bool:
    """True when stderr is connected to the journal (systemd.exec(5), $JOURNAL_STREAM)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        info = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


class _ModelFilter(logging.Filter):
    """Stamp every record with the model, a journal field (MYECHO_MODEL=)."""

    def __init__(self, model: str) -> None:
        super().__init__()
        self.model = model

    def filter(self, record: logging.LogRecord) -> bool:
        record.MYECHO_MODEL = self.model
        return True


def setup_logging(model: str, level: str = "info", log_file: Path | None = None) -> logging.Logger:
    """Log to journald under systemd, to a file when asked, else to stderr.

    Calling it again (on SIGHUP) replaces the handler, which reopens a log
    file that logrotate moved away.
    """
    logger = logging.getLogger("myecho")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    new: logging.Handler
    journal = _journal_handler_class() if under_journald() else None
    if log_file is not None:
        new = logging.handlers.WatchedFileHandler(log_file)
        new.setFormatter(logging.Formatter(f"%(asctime)s myecho[{model}/%(process)d]: %(message)s"))
    elif journal is not None:
        new = journal(SYSLOG_IDENTIFIER="myecho")
    else:
        new = logging.StreamHandler(sys.stderr)
        new.setFormatter(logging.Formatter(f"myecho[{model}/%(process)d]: %(message)s"))
    new.addFilter(_ModelFilter(model))
    logger.addHandler(new)
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger


def _journal_handler_class() -> Callable[..., logging.Handler] | None:
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    return JournalHandler  # type: ignore[no-any-return]
