"""Everything myecho says to systemd, in one place: sd_notify and journald.

Readiness, status, watchdog and stopping go through python-systemd's
``systemd.daemon.notify`` (Debian's python3-systemd), or through the pure
Python ``sdnotify`` where the C binding is not installed, or, with neither,
through the few lines of sd_notify(3) below, so that a ``Type=notify`` unit
never waits for a READY=1 that cannot come. Outside systemd (no
NOTIFY_SOCKET) every call is a no-op, so models never need to ask.
"""

import io
import logging
import logging.handlers
import os
import socket
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
            return _datagram_notifier(os.environ["NOTIFY_SOCKET"])
        return sdnotify.SystemdNotifier().notify  # type: ignore[no-any-return]
    return daemon.notify  # type: ignore[no-any-return]


def _datagram_notifier(path: str) -> Callable[[str], object] | None:
    """sd_notify(3) with the standard library: one datagram per message to the
    unix socket $NOTIFY_SOCKET names ("@...": in the abstract namespace)."""
    if path.startswith("@"):
        path = "\0" + path[1:]
    elif not path.startswith("/"):
        logging.getLogger("myecho").warning("NOTIFY_SOCKET=%s: not a unix socket, not notifying systemd", path)
        return None

    def send(message: str) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), path)

    return send


class Notifier:
    """The one voice that tells systemd how the service is doing."""

    _failing = False  # a failed send was logged; logged again only after one that worked

    def __init__(self) -> None:
        self._send = _notify_backend()
        self.watchdog_interval = self._watchdog_interval()
        #: Called once, at the first READY (``--daemon``: tell the shell).
        self.on_ready: Callable[[], None] | None = None

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
        """Best effort: a full fd table (EMFILE) must not take the service down,
        and a notify socket that is gone is logged once, not at every STATUS."""
        if self._send is None:
            return
        try:
            self._send(message)
        except OSError as error:
            if not self._failing:
                logging.getLogger("myecho").warning(
                    "sd_notify failed: %s (said once, until it works again)", error.strerror
                )
            self._failing = True
        else:
            if self._failing:
                logging.getLogger("myecho").info("sd_notify works again")
            self._failing = False

    def ready(self, status: str) -> None:
        self._say(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")
        hook, self.on_ready = self.on_ready, None
        if hook is not None:
            hook()

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


class _LogFile(logging.handlers.WatchedFileHandler):
    """A log file opened without following a symlink (O_NOFOLLOW), also when
    reopened after logrotate moved it: as root, a symlink planted in place
    of the log would otherwise let anyone append to any file."""

    def reopenIfNeeded(self) -> None:
        """Reopen when logrotate moved the file; when the new one cannot be
        opened (its folder gone), go on writing to the open one instead of
        raising out of every log call (which the standard handler does)."""
        if self.stream is None:
            return
        try:
            now = os.stat(self.baseFilename)
        except OSError:
            pass
        else:
            if (now.st_dev, now.st_ino) == (self.dev, self.ino):
                return
        try:
            stream = self._open()
        except OSError:
            return
        self.stream.close()
        self.stream = stream
        self._statstream()

    def _open(self) -> io.TextIOWrapper:
        from myecho.core.daemon import open_nofollow

        fd = open_nofollow(Path(self.baseFilename), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        stream = open(fd, "a", encoding=self.encoding or "utf-8", errors=self.errors)  # noqa: SIM115
        assert isinstance(stream, io.TextIOWrapper)
        return stream


def setup_logging(model: str, level: str = "info", log_file: Path | None = None) -> logging.Logger:
    """Log to journald under systemd, to a file when asked, else to stderr.

    Calling it again (on SIGHUP) replaces the handler, which reopens a log
    file that logrotate moved away. The new handler is made first: when the
    file cannot be opened, ``OSError`` (one line) and the old one stays.
    """
    logger = logging.getLogger("myecho")
    new: logging.Handler
    journal = _journal_handler_class() if under_journald() else None
    if log_file is not None:
        new = _LogFile(log_file)
        new.setFormatter(logging.Formatter(f"%(asctime)s myecho[{model}/%(process)d]: %(message)s"))
    elif journal is not None:
        new = journal(SYSLOG_IDENTIFIER="myecho")
    else:
        new = logging.StreamHandler(sys.stderr)
        new.setFormatter(logging.Formatter(f"myecho[{model}/%(process)d]: %(message)s"))
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
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
