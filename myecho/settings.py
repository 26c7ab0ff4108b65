"""Settings: defaults, then the admin's file, then the command line.

The file has the shape of /etc/default/myecho (``MYECHO_NAME=value`` lines,
also read by systemd as an EnvironmentFile). SIGHUP reads it again, so the
tunables below change without a restart; the listening address does not
(the sockets are already open, perhaps held by systemd).
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

#: The contract's ports (DESIGN.md); the talk used 11138, 11141 and 11142.
DEFAULT_PORTS = {
    "inetd": 11138,
    "fork": 11139,
    "select": 11140,
    "zmq": 11141,
    "c": 11142,
    "broker": 11144,
}
BROKER_BACKEND_PORT = 11145


class SettingsError(ValueError):
    """A setting with a value that cannot be used; the message names it."""


@dataclass
class Settings:
    """What a model may be told; every field can be set in the config file."""

    model: str = "select"
    host: str = "127.0.0.1"
    port: int = 0
    backlog: int = 4096
    graceful_timeout: float = 5.0
    max_children: int = 1000
    spare_children: int = 4
    max_connections: int = 19000
    buffer_limit: int = 65536
    log_level: str = "info"
    log_file: Path | None = None
    config: Path | None = None
    listen: list[str] = field(default_factory=list)
    # The broker's endpoints (empty: tcp://HOST:PORT and tcp://HOST:11145)
    # and the one a worker connects to (empty: tcp://127.0.0.1:11145).
    broker_frontend: list[str] = field(default_factory=list)
    broker_backend: list[str] = field(default_factory=list)
    worker_connect: str = ""
    heartbeat: float = 1.0
    liveness: int = 3
    # The broker's deadlines and byte limits, and a worker's window (MEW2).
    request_timeout: float = 15.0
    hold_timeout: float = 5.0
    max_message: int = 64 * 1024 * 1024
    client_bytes: int = 256 * 1024 * 1024
    broker_bytes: int = 1024 * 1024 * 1024
    window: int = 32
    # Names given on the command line: a reload from the file must not undo them.
    explicit: frozenset[str] = frozenset()

    RELOADABLE = ("graceful_timeout", "max_children", "spare_children", "max_connections", "buffer_limit", "log_level")

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port {self.port} is not in 0-65535")
        for name in ("backlog", "max_children", "max_connections", "buffer_limit"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name.replace('_', '-')} must be at least 1")
        if not 0.01 <= self.heartbeat <= 3600:
            raise SettingsError("heartbeat must be between 0.01 and 3600 seconds")
        if self.liveness < 1:
            raise SettingsError("liveness must be at least 1")
        for name in ("request_timeout", "hold_timeout"):
            if not 0.01 <= getattr(self, name) <= 86400:  # also refuses nan and inf
                raise SettingsError(f"{name.replace('_', '-')} must be between 0.01 and 86400 seconds")
        for name in ("max_message", "client_bytes", "broker_bytes"):
            if not 1 <= getattr(self, name) <= 1 << 40:
                raise SettingsError(f"{name.replace('_', '-')} must be between 1 and 2^40 bytes")
        if not self.max_message <= self.client_bytes <= self.broker_bytes:
            raise SettingsError("the byte limits must be max-message <= client-bytes <= broker-bytes")
        if not 1 <= self.window <= 1024:
            raise SettingsError("window must be between 1 and 1024")
        from myecho.patterns.endpoints import EndpointError, split

        for spec in [*self.broker_frontend, *self.broker_backend, *filter(None, [self.worker_connect])]:
            try:
                split(spec, "")
            except EndpointError as error:
                raise SettingsError(str(error)) from None
        if self.spare_children < 0:
            raise SettingsError("spare-children must not be negative")
        if self.graceful_timeout < 0:
            raise SettingsError("graceful-timeout must not be negative")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise SettingsError(f"log level {self.log_level!r} is not debug, info, warning or error")

    def apply_file(self, path: Path, names: tuple[str, ...] | None = None) -> list[str]:
        """Apply ``MYECHO_*`` lines from ``path``; return the names changed."""
        try:
            text = path.read_text()
        except OSError as error:
            raise SettingsError(f"cannot read {path}: {error.strerror}") from error
        changed = []
        model_port = f"MYECHO_{self.model.upper()}_PORT"
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, value = (part.strip() for part in line.split("=", 1))
            value = value.strip("\"'")
            if key == model_port:
                key = "MYECHO_PORT"
            if not key.startswith("MYECHO_") or (key.endswith("_PORT") and key != "MYECHO_PORT"):
                continue  # another model's port
            name = key[len("MYECHO_") :].lower()
            if name in self.explicit or (names is not None and name not in names):
                continue
            if name not in _FIELD_TYPES or name in ("model", "explicit", "config", "listen"):
                continue
            try:
                new = _FIELD_TYPES[name](value)
            except ValueError as error:
                raise SettingsError(f"{path}:{number}: bad value for {key}: {value!r}") from error
            if getattr(self, name) != new:
                setattr(self, name, new)
                changed.append(name)
        self.check()
        return changed


def _path_or_none(value: str) -> Path | None:
    return Path(value) if value else None


_CONVERTERS: dict[object, Callable[[str], object]] = {int: int, float: float, str: str, list[str]: str.split}
_FIELD_TYPES = {f.name: _CONVERTERS.get(f.type, _path_or_none) for f in dataclasses.fields(Settings)}
