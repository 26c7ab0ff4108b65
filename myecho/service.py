"""Put a model to work: settings, sockets, logging, then ``serve``.

The order matters: sockets are bound before ``--daemon`` detaches, so a
port already in use is reported to the shell that asked (one line, exit 1),
not to a log nobody reads.
"""

import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Any

from myecho import prefork
from myecho.daemon import PidfileError, daemonize
from myecho.models import MODELS, WORKER_MODELS
from myecho.patterns.endpoints import EndpointError
from myecho.runtime import Runtime
from myecho.settings import DEFAULT_PORTS, Settings, SettingsError
from myecho.sockets import ListenError, broker_roles, from_systemd, from_systemd_named, listening_sockets
from myecho.systemd import Notifier, setup_logging


def make_settings(options: dict[str, Any]) -> Settings:
    """Defaults, then the config file, then what the command line says."""
    model = options["model"]
    known = {f.name for f in dataclasses.fields(Settings)}
    given = {name: value for name, value in options.items() if value is not None and name in known}
    given.pop("model", None)
    if not given.get("listen"):
        given.pop("listen", None)
    settings = Settings(model=model, port=DEFAULT_PORTS.get(model, 0), explicit=frozenset(given))
    if options.get("config") is not None:
        settings.apply_file(options["config"])
    for name, value in given.items():
        setattr(settings, name, value)
    settings.check()
    return settings


def _fail(message: str, code: int) -> int:
    print(f"myecho: {message}", file=sys.stderr)
    return code


def run_service(options: dict[str, Any]) -> int:
    try:
        settings = make_settings(options)
    except SettingsError as error:
        return _fail(str(error), 2)
    model = importlib.import_module(f"myecho.models.{MODELS[settings.model]}")
    roles: list[str] = []
    try:
        if settings.model == "zmq" and settings.listen:
            listeners = from_systemd()  # other endpoints are bound by libzmq itself
        elif settings.model == "broker":
            named = from_systemd_named()
            listeners = [sock for _, sock in named]
            roles = broker_roles([name for name, _ in named])
        elif settings.model == "worker":
            listeners = []  # it connects; libzmq binds if asked to (@URL)
        else:
            listeners = listening_sockets(settings.host, settings.port, settings.backlog)
    except ListenError as error:
        return _fail(str(error), 1)
    if options.get("daemon"):
        pidfile: Path | None = options.get("pidfile")
        try:
            daemonize(pidfile)
        except PidfileError as error:
            return _fail(str(error), 1)
    log = setup_logging(settings.model, settings.log_level, settings.log_file)
    runtime = Runtime(settings, listeners, Notifier(), log)
    runtime.listener_roles = roles
    started = False
    try:
        if settings.workers != 1 and settings.model in WORKER_MODELS:
            prefork.serve(runtime, model.serve)
        else:
            model.serve(runtime)
        started = True
    except EndpointError as error:  # an endpoint it could not bind: nothing ran, one line says why
        runtime.signals.close()
        return _fail(str(error), 1)
    except prefork.WorkersFailed as error:  # the workers' own lines say why
        started = True
        runtime.log.error("%s", error)
        return _fail(str(error), 1)
    except KeyboardInterrupt:  # a second ^C while stopping: stop now
        started = True
        return 130
    finally:
        if started:
            runtime.finish()
    return 0
