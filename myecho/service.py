"""Put a model to work: settings, sockets, logging, then ``serve``.

The order matters: sockets are bound before ``--daemon`` detaches, so a
port already in use is reported to the shell that asked (one line, exit 1),
not to a log nobody reads.
"""

import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Any, Protocol, cast

from myecho.core import prefork
from myecho.core.daemon import PidfileError, StartReport, daemonize
from myecho.core.endpoints import EndpointError
from myecho.core.runtime import Runtime
from myecho.core.settings import EXIT_BAD_CONFIG, Settings, SettingsError, load
from myecho.core.sockets import ListenError, Listeners
from myecho.core.systemd import Notifier, setup_logging
from myecho.models import MODELS


class Model(Protocol):
    """What a model module declares; service.py asks nothing else of it."""

    #: The listening sockets it is handed.
    LISTENERS: Listeners
    #: It can run as N processes on one listening socket (``--workers``).
    PREFORK: bool

    def serve(self, runtime: Runtime) -> None: ...


def make_settings(options: dict[str, Any]) -> Settings:
    """Defaults, then the config file, then what the command line says."""
    return load_settings(options)[0]


def load_settings(options: dict[str, Any]) -> tuple[Settings, list[str]]:
    """``make_settings`` and the warnings about the file (unknown names)."""
    model = options["model"]
    known = {f.name for f in dataclasses.fields(Settings)}
    given = {name: value for name, value in options.items() if value is not None and name in known}
    given.pop("model", None)
    if not given.get("listen"):
        given.pop("listen", None)
    return load(model, options.get("config"), given)


def _fail(message: str, code: int) -> int:
    print(f"myecho: {message}", file=sys.stderr)
    return code


def run_service(options: dict[str, Any]) -> int:
    try:
        settings, warnings = load_settings(options)
    except SettingsError as error:
        return _fail(str(error), EXIT_BAD_CONFIG)
    model = cast(Model, importlib.import_module(f"myecho.models.{MODELS[settings.model]}"))
    try:
        listeners, roles = model.LISTENERS.acquire(settings)
    except ListenError as error:
        return _fail(str(error), 1)
    except OSError as error:  # e.g. no socket from systemd and no network to bind in (PrivateNetwork=)
        return _fail(f"cannot listen on {settings.host}:{settings.port}: {error.strerror}", 1)
    try:  # before detaching: a log file that cannot be opened is said to the shell
        log = setup_logging(settings.model, settings.log_level, settings.log_file)
    except OSError as error:
        return _fail(f"log file: {error.strerror}", 1)
    for warning in warnings:
        log.warning("%s (ignored)", warning)
    report: StartReport | None = None
    if options.get("daemon"):
        pidfile: Path | None = options.get("pidfile")
        try:
            report = daemonize(pidfile)
        except PidfileError as error:
            return _fail(str(error), 1)
    notifier = Notifier()
    serving = []  # [True] once the model said READY

    def on_ready() -> None:
        serving.append(True)
        if report is not None:
            report.ready()

    notifier.on_ready = on_ready
    runtime = Runtime(settings, listeners, notifier, log, roles)
    started = False
    try:
        if settings.workers != 1 and model.PREFORK:
            prefork.serve(runtime, model.serve)
        else:
            model.serve(runtime)
        started = True
    except EndpointError as error:  # an endpoint it could not bind: nothing ran, one line says why
        runtime.signals.close()
        if report is not None:
            report.failed(str(error))
        return _fail(str(error), 1)
    except prefork.WorkersFailed as error:  # the workers' own lines say why
        started = True
        runtime.log.error("%s", error)
        if report is not None:
            report.failed(str(error))
        return _fail(str(error), 1)
    except KeyboardInterrupt:  # a second ^C while stopping: stop now
        started = True
        return 130
    except Exception as error:  # before READY: a start-up failure, said in one line
        if serving:
            started = True
            raise
        runtime.signals.close()
        message = f"cannot start the {settings.model} model: {error}"
        if report is not None:
            report.failed(message)
        return _fail(message, 1)
    finally:
        if started:
            runtime.finish()
        if report is not None:
            report.failed("the daemon stopped during start-up")  # a no-op once it said "ready"
    return 0
