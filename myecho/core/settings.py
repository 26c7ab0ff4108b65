"""Settings: defaults, then the admin's file, then the command line.

The file has the shape of /etc/default/myecho (``MYECHO_NAME=value`` lines,
also read by systemd as an EnvironmentFile); each field of ``Settings`` is
the line ``MYECHO_<FIELD>``. SIGHUP reads it again, so the tunables in
``RELOADABLE`` change without a restart; the listening address does not
(the sockets are already open, perhaps held by systemd).

Reading is all-or-nothing: the whole file is parsed and checked into a new
``Settings`` before anything is used, so a bad line never leaves a daemon
half-configured. Every value goes through one table of types and ranges
(``LIMITS``, ``CHOICES``), the same for the file and the command line, and
no number may be nan or infinite.
"""

import dataclasses
import importlib.util
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

#: Each model's port, fixed for admins and outside checks; the talk used 11138, 11141 and 11142.
DEFAULT_PORTS = {
    "inetd": 11138,
    "fork": 11139,
    "select": 11140,
    "zmq": 11141,
    "c": 11142,
    "broker": 11144,
    "asyncio": 11150,
}
BROKER_BACKEND_PORT = 11145
#: The asyncio model's event loops; "auto" is uvloop when installed.
LOOPS = ("auto", "asyncio", "uvloop")

#: sysexits.h EX_CONFIG: a settings file or value that cannot be used. The
#: units tell systemd not to restart on it (RestartPreventExitStatus=).
EXIT_BAD_CONFIG = 78


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
    max_children: int = 0  # the fork model: 0 = as many as fit the machine
    spare_children: int = 4
    max_connections: int = 19000
    buffer_limit: int = 65536
    idle_timeout: float = 300.0
    workers: int = 1
    loop: str = "auto"
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
    # CURVE on the broker's backend (myecho.core.curve): this side's secret
    # certificate, the folder of the workers' public ones (broker), the
    # broker's public one (worker); insecure=1 lets a broker bind its backend
    # beyond loopback without CURVE.
    curve_secret: Path | None = None
    curve_allow: Path | None = None
    curve_server: Path | None = None
    insecure: int = 0
    # The broker's deadlines and byte limits, and a worker's window (MEW2).
    request_timeout: float = 15.0
    hold_timeout: float = 5.0
    max_message: int = 64 * 1024 * 1024
    client_bytes: int = 256 * 1024 * 1024
    broker_bytes: int = 1024 * 1024 * 1024
    window: int = 32
    # Names given on the command line: a reload from the file must not undo them.
    explicit: frozenset[str] = frozenset()
    # What the file said when it was last read (field name -> value): a
    # reload compares against it, so only what the admin changed changes.
    from_file: dict[str, object] = field(default_factory=dict, repr=False, compare=False)

    RELOADABLE = (
        "graceful_timeout",
        "max_children",
        "spare_children",
        "max_connections",
        "buffer_limit",
        "log_level",
        "idle_timeout",
    )

    def check(self) -> None:
        """Every field against the table, then what involves several fields."""
        for item in dataclasses.fields(self):
            check_value(item.name, getattr(self, item.name))
        if not self.max_message <= self.client_bytes <= self.broker_bytes:
            raise SettingsError("the byte limits must be max-message <= client-bytes <= broker-bytes")
        from myecho.core.endpoints import EndpointError, split

        for spec in [*self.broker_frontend, *self.broker_backend, *filter(None, [self.worker_connect])]:
            try:
                split(spec, "")
            except EndpointError as error:
                raise SettingsError(str(error)) from None
        if self.model == "asyncio" and self.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise SettingsError("loop uvloop is not installed (apt install python3-uvloop, or pip install uvloop)")

    def reloaded(self) -> tuple["Settings", list[str], list[str]]:
        """Read the file again, whole, into a new ``Settings`` and check it.

        Returns the new settings, the reloadable names whose value the file
        changed (nothing is applied here: the caller copies them over in one
        step) and the warnings. Raises ``SettingsError`` when the file is
        bad; the current settings are then untouched.
        """
        given = {name: getattr(self, name) for name in self.explicit}
        new, warnings = load(self.model, self.config, given)
        defaults = Settings()
        changed = [
            name
            for name in self.RELOADABLE
            if name not in self.explicit
            and self.from_file.get(name, getattr(defaults, name)) != new.from_file.get(name, getattr(defaults, name))
        ]
        return new, changed, warnings


#: Ranges of the numeric fields (inclusive). A numeric field not listed here
#: must lie in ``DEFAULT_LIMITS``; nan and infinities are always refused.
LIMITS: dict[str, tuple[float, float]] = {
    "port": (0, 65535),
    "backlog": (1, 1 << 20),
    "graceful_timeout": (0, 86400),
    "max_children": (0, 1_000_000),
    "spare_children": (0, 10_000),
    "max_connections": (1, 10_000_000),
    "buffer_limit": (1, 1 << 30),
    "heartbeat": (0.01, 3600),
    "liveness": (1, 1000),
    "idle_timeout": (0, 86400),
    "workers": (0, 1024),
    "insecure": (0, 1),
    "request_timeout": (0.01, 86400),
    "hold_timeout": (0.01, 86400),
    "max_message": (1, 1 << 40),
    "client_bytes": (1, 1 << 40),
    "broker_bytes": (1, 1 << 40),
    "window": (1, 1024),
}
DEFAULT_LIMITS = (0.0, float(2**53))  # not negative, exact as a float; list a real range in LIMITS
CHOICES: dict[str, tuple[str, ...]] = {"log_level": ("debug", "info", "warning", "error"), "loop": LOOPS}
#: Fields that are never read from the file (the command line or systemd gives them).
NOT_IN_FILE = frozenset({"model", "explicit", "config", "listen", "from_file"})


def check_value(name: str, value: object) -> None:
    """Refuse a value outside its field's range or choices (the message names the field)."""
    option = name.replace("_", "-")
    if isinstance(value, bool):
        return
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str) and not _is_utf8(text):
            raise SettingsError(f"{option} {text!r} is not UTF-8 text")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise SettingsError(f"{option} must be a finite number, not {value}")
        low, high = LIMITS.get(name, DEFAULT_LIMITS)
        if not low <= value <= high:
            raise SettingsError(f"{option} {value} is not in {_number(low)}-{_number(high)}")
    elif name in CHOICES and (not isinstance(value, str) or value.lower() not in CHOICES[name]):
        raise SettingsError(f"{option} {value!r} is not {_either(CHOICES[name])}")


def _is_utf8(text: str) -> bool:
    """False for the surrogates Python puts in place of bytes that are not
    UTF-8 (a command line argument, an environment variable)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


def _either(choices: tuple[str, ...]) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off", ""):
        return False
    raise ValueError(text)


def _path_or_none(text: str) -> Path | None:
    return Path(text) if text else None


_CONVERTERS: dict[object, Callable[[str], object]] = {
    int: int,
    float: float,
    bool: _boolean,
    str: str,
    list[str]: str.split,
}
_WANTED: dict[object, str] = {int: "a whole number", float: "a number", bool: "yes or no"}
FIELD_TYPES: dict[str, object] = {f.name: f.type for f in dataclasses.fields(Settings)}


def convert(name: str, text: str) -> object:
    """A field's value from text (file or command line), checked; ``SettingsError`` if unusable."""
    kind = FIELD_TYPES[name]
    try:
        value = _CONVERTERS.get(kind, _path_or_none)(text)
    except ValueError:
        wanted = _WANTED.get(kind, "a value")
        raise SettingsError(f"{name.replace('_', '-')} {text!r} is not {wanted}") from None
    if name in CHOICES and isinstance(value, str):
        value = value.lower()
    check_value(name, value)
    return value


def option_type(name: str) -> Callable[[str], object]:
    """An argparse ``type=`` for the option of field ``name``: the file's rules on the command line."""
    import argparse

    def parse(text: str) -> object:
        try:
            return convert(name, text)
        except SettingsError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = name.replace("_", "-")  # argparse names it in "invalid X value"
    return parse


# ----------------------------------------------------------------- the file

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass
class FileReading:
    """One settings file, parsed and checked line by line."""

    path: Path
    #: field name -> (line number, value), for the model it was read for
    values: dict[str, tuple[int, object]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    #: MYECHO_ names no model knows (typos): "FILE:LINE: ..." each
    unknown: list[str] = field(default_factory=list)

    def where(self, line: int) -> str:
        return f"{self.path}:{line}"

    def raise_errors(self) -> None:
        """One ``SettingsError`` naming the first problem (and how many more)."""
        if self.errors:
            more = len(self.errors) - 1
            suffix = f" (and {more} more: myecho check-config {self.path})" if more else ""
            raise SettingsError(self.errors[0] + suffix)


def file_names() -> set[str]:
    """The field names a file may set (``MYECHO_`` + upper case)."""
    return {f.name for f in dataclasses.fields(Settings)} - NOT_IN_FILE


def read_file(path: Path, model: str | None) -> FileReading:
    """Parse ``path`` for ``model`` (None: for every model, as check-config does).

    Every line is looked at: bytes that are not UTF-8, lines that are not
    ``NAME=value``, values of the wrong type or out of range are errors;
    ``MYECHO_`` names that no model knows are listed in ``unknown``; other
    names (the file is also systemd's EnvironmentFile) are left alone.
    Each model's own port, ``MYECHO_<MODEL>_PORT``, wins over ``MYECHO_PORT``.
    """
    reading = FileReading(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        reading.errors.append(f"{path}: cannot read: {error.strerror}")
        return reading
    names = file_names()
    model_ports = {f"{name.upper()}_PORT" for name in DEFAULT_PORTS}
    own_port = None
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as error:
            reading.errors.append(f"{reading.where(number)}: byte {raw[error.start]:#04x} is not UTF-8 text")
            continue
        if not line or line.startswith("#"):
            continue
        key, equals, value = (part.strip() for part in line.partition("="))
        if not equals or not _NAME.match(key):
            reading.errors.append(f"{reading.where(number)}: not a NAME=value line: {line[:60]!r}")
            continue
        if not key.startswith("MYECHO_"):
            continue  # someone else's variable: the file is also an EnvironmentFile
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        name = key[len("MYECHO_") :].lower()
        is_port = name.upper() in model_ports
        if not is_port and name not in names:
            reading.unknown.append(f"{reading.where(number)}: unknown setting {key}")
            continue
        try:
            converted = convert("port" if is_port else name, value)
        except SettingsError as error:
            reading.errors.append(f"{reading.where(number)}: bad value for {key}: {error}")
            continue
        if is_port:
            if model is None or name != f"{model}_port":
                continue  # another model's port: checked, not used
            own_port = (number, converted)
        else:
            reading.values[name] = (number, converted)
    if own_port is not None:
        reading.values["port"] = own_port
    return reading


def load(model: str, config: Path | None, given: dict[str, object]) -> tuple[Settings, list[str]]:
    """Defaults, then the file, then the command line (``given``), checked as a whole.

    Returns the settings and the warnings (unknown names); raises
    ``SettingsError`` with one line when anything is wrong.
    """
    settings = Settings(model=model, port=DEFAULT_PORTS.get(model, 0), explicit=frozenset(given), config=config)
    warnings: list[str] = []
    if config is not None:
        reading = read_file(config, model)
        reading.raise_errors()
        warnings = reading.unknown
        for name, (_, value) in reading.values.items():
            settings.from_file[name] = value
            setattr(settings, name, value)
    for name, value in given.items():
        setattr(settings, name, value)
    settings.check()
    return settings, warnings


def check_file(path: Path) -> list[str]:
    """Every problem of a settings file, as every model would read it: "FILE:LINE: ..." each."""
    reading = read_file(path, None)
    problems = reading.errors + reading.unknown
    if reading.errors:
        return sorted(problems, key=_line_of)
    for model in (*DEFAULT_PORTS, "worker"):
        try:
            load(model, path, {})
        except SettingsError as error:
            message = f"{path}: {error}"
            if message not in problems:
                problems.append(message)
    return sorted(problems, key=_line_of)


def _line_of(problem: str) -> int:
    match = re.search(r":(\d+): ", problem)
    return int(match.group(1)) if match else 0
