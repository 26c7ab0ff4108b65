"""``--workers N``: N event loops on one listening socket, one process each.

A supervisor (what nginx calls the master, gunicorn the arbiter) holds the
listening sockets, systemd's or bound before forking, and forks N workers;
each runs the chosen model (select or asyncio) unchanged on inherited
copies of those sockets, and the kernel hands each new connection to
whichever worker accepts it first. The supervisor serves no client:
- it alone talks to systemd: READY once every worker is up, STATUS summed
  over the workers (each reports its figures every second over a
  socketpair, in place of its own sd_notify), WATCHDOG only while every
  worker is alive and reporting;
- signals are noted and acted on in its loop, as in the models: TERM/INT
  stop accepting and are passed on to every worker, which lets its open
  connections finish (``graceful_timeout``); HUP re-reads the settings
  here and is passed on, so each worker reloads too;
- a worker that dies is reaped and replaced; one silent for
  ``SILENT_LIMIT`` seconds (a hung loop) is killed and replaced; workers
  die with the supervisor (PR_SET_PDEATHSIG), so none outlives it.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from myecho.core.processes import die_with, reaped
from myecho.core.runtime import Runtime, Stats
from myecho.core.signals import STOP_SIGNALS, SignalWatcher
from myecho.core.sockets import describe
from myecho.core.systemd import Notifier

#: A worker that has not reported for this long is hung: killed and replaced.
SILENT_LIMIT = 5.0
#: This many workers in a row dying before they are ready: the supervisor gives up.
BOOT_FAILURES = 5
#: After the grace period, how long workers get to exit before SIGKILL.
KILL_MARGIN = 2.0


class WorkersFailed(RuntimeError):
    """Workers keep dying as they start; the message says so."""


def worker_count(wanted: int) -> int:
    """``--workers``: 0 means one per core this process may run on."""
    if wanted > 0:
        return wanted
    try:
        return len(os.sched_getaffinity(0))
    except OSError:  # a seccomp filter may refuse it
        return os.cpu_count() or 1


class WorkerNotifier(Notifier):
    """A worker's voice: READY and its figures go to the supervisor, not to systemd."""

    def __init__(self, channel: socket.socket, stats: Stats) -> None:
        self.channel = channel
        self.stats = stats
        self._send = self._to_supervisor
        self.watchdog_interval = None

    def _to_supervisor(self, message: str) -> None:
        self.channel.send(message.encode())

    def ready(self, status: str) -> None:
        self._say("READY")

    def status(self, status: str) -> None:
        """Every second, from the worker's loop: its figures, and a sign of life."""
        s = self.stats
        self._say(f"STATS {s.open} {s.served} {s.messages} {s.bytes} {s.dropped}")

    def reloading(self) -> None:
        """The supervisor has said it to systemd already."""

    def stopping(self, status: str) -> None:
        """Likewise."""


@dataclass
class Worker:
    pid: int
    channel: socket.socket  # the supervisor's end
    started: float
    heard: float
    ready: bool = False
    closed: bool = False  # its end of the channel said EOF
    figures: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 0])  # open served messages bytes dropped


class Supervisor:
    def __init__(self, runtime: Runtime, serve: Callable[[Runtime], None], count: int) -> None:
        self.rt = runtime
        self.serve_model = serve
        self.count = count
        self.workers: dict[int, Worker] = {}
        self.selector = selectors.DefaultSelector()
        self.announced = False
        self.failures = 0  # workers in a row that died before they were ready
        self.gone = [0, 0, 0, 0, 0]  # figures of the workers that have exited (open stays 0)

    # -- workers -------------------------------------------------------------------
    def spawn(self) -> bool:
        """Fork one more worker; False if the system would not (tried again soon)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()
        # Signals wait until the child has its own watcher (the parent's wakeup
        # socket would otherwise carry the child's signals to the parent).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        try:
            pid = os.fork()
        except OSError as error:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            ours.close()
            theirs.close()
            self.rt.log.error("cannot fork a worker: %s", error.strerror)
            return False
        if pid == 0:
            code = 1
            try:
                ours.close()
                code = self.worker(theirs, parent, blocked)
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        theirs.close()
        ours.setblocking(False)
        now = time.monotonic()
        self.workers[pid] = Worker(pid, ours, now, now)
        self.selector.register(ours, selectors.EVENT_READ, pid)
        return True

    def worker(self, channel: socket.socket, parent: int, blocked: set[int | signal.Signals]) -> int:
        """In the child: the model, served as if alone, but reporting here."""
        rt = self.rt
        for other in self.workers.values():
            other.channel.close()
        self.selector.close()
        rt.signals.close()
        rt.signals = SignalWatcher()
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if not die_with(parent):
            return 0  # the supervisor died between fork and prctl
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(name, None)
        channel.setblocking(False)
        rt.notifier = WorkerNotifier(channel, rt.stats)
        try:
            self.serve_model(rt)
        except Exception as error:  # one line in the log; the supervisor replaces us
            rt.log.error("worker failed: %s", error)
            return 1
        finally:
            rt.finish()
        return 0

    def on_message(self, worker: Worker) -> None:
        while True:
            try:
                data = worker.channel.recv(256)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:  # it exited: SIGCHLD will tell
                self.selector.unregister(worker.channel)
                worker.closed = True
                break
            worker.heard = time.monotonic()
            kind, _, rest = data.decode().partition(" ")
            if kind == "READY":
                worker.ready = True
                self.failures = 0
            elif kind == "STATS":
                worker.figures = [int(part) for part in rest.split()]
        self.update_stats()

    def update_stats(self) -> None:
        live = [w.figures for w in self.workers.values()]
        totals = [sum(column) for column in zip(self.gone, *live, strict=True)]
        stats = self.rt.stats
        stats.open, stats.served, stats.messages, stats.bytes, stats.dropped = totals
        each = ", ".join(f"pid {w.pid}: {w.figures[0]} open" for w in self.workers.values())
        stats.detail = f"{len(self.workers)} workers ({each})"

    def reap(self) -> None:
        for pid, _ in reaped():
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            if not worker.closed:
                self.selector.unregister(worker.channel)
            worker.channel.close()
            self.gone = [g + f for g, f in zip(self.gone, worker.figures, strict=True)]
            self.gone[0] = 0
            self.update_stats()
            if self.rt.stopping:
                continue
            self.rt.log.warning("worker %d exited; starting another", pid)
            if not worker.ready:
                self.failures += 1

    def check_silent(self) -> None:
        now = time.monotonic()
        for worker in self.workers.values():
            if now - worker.heard > SILENT_LIMIT:
                self.rt.log.warning("worker %d silent for %.0f s: killing it", worker.pid, now - worker.heard)
                worker.heard = now  # once: SIGCHLD follows
                os.kill(worker.pid, signal.SIGKILL)

    def tell_workers(self, signum: int) -> None:
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    # -- the loop ------------------------------------------------------------------
    def on_signals(self) -> None:
        rt = self.rt
        for signum in rt.signals.drain():
            if signum in STOP_SIGNALS:
                rt.begin_stop(signal.Signals(signum).name)
                rt.close_listeners()  # the workers close theirs at once too
                self.tell_workers(signal.SIGTERM)
            elif signum == signal.SIGHUP:
                rt.reload()
                self.tell_workers(signal.SIGHUP)
            elif signum == signal.SIGCHLD:
                self.reap()

    def run(self) -> None:
        rt = self.rt
        where = ", ".join(describe(sock) for sock in rt.listeners)
        rt.signals.watch(signal.SIGCHLD)  # wakes the loop to reap a worker
        self.selector.register(rt.signals, selectors.EVENT_READ, None)
        while not (rt.stopping and not self.workers):
            if not rt.stopping:
                if self.failures >= BOOT_FAILURES:
                    raise WorkersFailed(f"{self.failures} workers in a row died before they were ready")
                while len(self.workers) < self.count and self.spawn():
                    pass
            ticking = self.announced and not rt.stopping
            for key, _ in self.selector.select(rt.timeout() if ticking else 0.1):
                if key.data is None:
                    self.on_signals()
                else:
                    worker = self.workers.get(key.data)
                    if worker is not None:
                        self.on_message(worker)
            self.reap()  # SIGCHLD may have come while the signals were blocked around a fork
            if not self.announced and len(self.workers) == self.count and all(w.ready for w in self.workers.values()):
                self.announced = True
                rt.ready(f"{where}, {self.count} workers")
            if rt.stopping:
                if time.monotonic() > rt.stop_deadline + KILL_MARGIN:
                    self.tell_workers(signal.SIGKILL)
            else:
                self.check_silent()
                if self.announced and len(self.workers) == self.count:
                    rt.tick()  # WATCHDOG and STATUS only while every worker is alive and reporting
        self.selector.close()


def serve(runtime: Runtime, serve_model: Callable[[Runtime], None]) -> None:
    """Run ``serve_model`` in ``runtime.settings.workers`` processes until stopped."""
    Supervisor(runtime, serve_model, worker_count(runtime.settings.workers)).run()
