"""The command line: --help everywhere, one-line errors, settings precedence."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import command

from myecho import __version__
from myecho.core.settings import SettingsError
from myecho.service import make_settings

COMMANDS = [
    ["myecho"],
    ["myecho", "serve"],
    ["myecho", "serve", "inetd"],
    ["myecho", "serve", "fork"],
    ["myecho", "serve", "select"],
    ["myecho", "serve", "asyncio"],
    ["myecho", "serve", "zmq"],
    ["myecho", "client"],
    ["myecho-c"],
    ["myecho", "serve", "broker"],
    ["myecho", "serve", "worker"],
    ["myecho", "pipeline"],
    ["myecho", "pipeline", "ventilator"],
    ["myecho", "pipeline", "worker"],
    ["myecho", "pipeline", "sink"],
    ["myecho", "pipeline", "run"],
    ["myecho", "pubsub"],
    ["myecho", "pubsub", "publisher"],
    ["myecho", "pubsub", "subscriber"],
    ["myecho", "check-config"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_every_command_has_help(argv: list[str]) -> None:
    result = subprocess.run([command(argv[0]), *argv[1:], "--help"], capture_output=True, timeout=10, text=True)
    assert result.returncode == 0
    assert "usage" in result.stdout.lower()


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "nosuchmodel"],
        ["serve", "fork", "--port", "notanumber"],
        ["serve", "fork", "--port", "70000"],
        ["serve", "select", "--max-connections", "0"],
        ["serve", "select", "--workers", "-1"],
        ["serve", "asyncio", "--loop", "libev"],
        ["serve", "asyncio", "--idle-timeout", "-1"],
        ["serve", "asyncio", "--buffer-limit", "0"],
        ["serve", "fork", "--spare-children", "-1"],
        ["serve", "fork", "--config", "/nonexistent/myecho"],
        ["serve", "select", "--host", "no.such.host.invalid"],
        ["client", "no-port-here"],
        ["frobnicate"],
        ["serve", "broker", "--frontend", "localhost:11144"],
        ["serve", "broker", "--backend", "tcp://192.0.2.1:11145"],
        ["serve", "worker", "--connect", "nowhere"],
        ["serve", "worker", "--heartbeat", "0"],
        ["serve", "broker", "--liveness", "0"],
        ["pipeline", "sink", "--results", "tcp://192.0.2.1:1"],
        ["pubsub"],
    ],
    ids=" ".join,
)
def test_bad_arguments_are_one_line_errors(argv: list[str]) -> None:
    result = subprocess.run([command("myecho"), *argv], capture_output=True, timeout=20, text=True)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("myecho"), lines
    assert "Traceback" not in result.stderr


def test_c_reference_bad_port_is_one_line() -> None:
    result = subprocess.run([command("myecho-c"), "notaport"], capture_output=True, timeout=10, text=True)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1


def test_c_reference_version_and_help() -> None:
    """myecho-c answers --version with the package's version and --help with its usage, exit 0."""
    import myecho

    result = subprocess.run([command("myecho-c"), "--version"], capture_output=True, timeout=10, text=True)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"myecho-c {myecho.__version__}\n", "")
    result = subprocess.run([command("myecho-c"), "--help"], capture_output=True, timeout=10, text=True)
    assert result.returncode == 0 and result.stdout.startswith("usage: myecho-c ") and "--version" in result.stdout


#: Every Python command an admin or a developer runs, as argv before its options.
PROGRAMS = {
    "myecho": [command("myecho")],
    "myecho-bench": [command("myecho-bench")],
    "python -m myecho.bench.measure": [sys.executable, "-m", "myecho.bench.measure"],
}


@pytest.mark.parametrize("prog", PROGRAMS)
def test_every_command_has_version(prog: str) -> None:
    result = subprocess.run([*PROGRAMS[prog], "--version"], capture_output=True, timeout=20, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{prog} {__version__}\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["myecho", "check-config", "--bogus"],
        ["myecho", "serve", "fork", "--bogus"],
        ["myecho", "pipeline", "run", "--bogus"],
        ["myecho-bench", "--bogus"],
        ["myecho-bench", "--trials", "many"],
        ["python -m myecho.bench.measure", "report", "--bogus"],
    ],
    ids=" ".join,
)
def test_an_unknown_option_is_one_line(argv: list[str]) -> None:
    """One line that names the command and the problem, no usage dump, argparse's status 2."""
    result = subprocess.run([*PROGRAMS[argv[0]], *argv[1:]], capture_output=True, timeout=20, text=True)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(argv[0]) and lines[0].endswith(" (see --help)"), lines
    assert ("unrecognized arguments: --bogus" if argv[-1] == "--bogus" else "'many'") in lines[0]
    assert "usage:" not in result.stderr


def test_bad_values_name_the_line(tmp_path: Path) -> None:
    config = tmp_path / "default"
    config.write_text("\nMYECHO_BACKLOG=many\n")
    with pytest.raises(SettingsError, match=r"default:2: bad value for MYECHO_BACKLOG"):
        make_settings({"model": "select", "config": config})
    config.write_text("MYECHO_LOG_LEVEL=loud\n")
    with pytest.raises(SettingsError, match="log-level 'loud' is not debug"):
        make_settings({"model": "select", "config": config})


def test_broker_and_worker_settings_from_the_file(tmp_path: Path) -> None:
    config = tmp_path / "default"
    config.write_text(
        "MYECHO_BROKER_FRONTEND=tcp://0.0.0.0:11144 ipc:///run/myecho/clients\n"
        "MYECHO_BROKER_BACKEND=tcp://0.0.0.0:11145\nMYECHO_WORKER_CONNECT=tcp://broker.example:11145\n"
        "MYECHO_HEARTBEAT=0.5\nMYECHO_LIVENESS=4\nMYECHO_BROKER_PORT=12000\n"
    )
    broker = make_settings({"model": "broker", "config": config, "broker_backend": ["ipc:///tmp/b"]})
    assert broker.broker_frontend == ["tcp://0.0.0.0:11144", "ipc:///run/myecho/clients"]
    assert broker.broker_backend == ["ipc:///tmp/b"]  # the command line wins
    assert (broker.heartbeat, broker.liveness, broker.port) == (0.5, 4, 12000)
    worker = make_settings({"model": "worker", "config": config})
    assert worker.worker_connect == "tcp://broker.example:11145"
    assert make_settings({"model": "broker"}).port == 11144


def test_which_of_systemds_sockets_is_the_brokers_backend() -> None:
    from myecho.core.sockets import match_roles
    from myecho.models.broker import LISTENERS

    def roles(names: list[str]) -> list[str]:
        return match_roles(names, LISTENERS.roles)

    assert roles(["backend", "frontend"]) == ["backend", "frontend"]
    assert roles(["backend"]) == ["backend"]
    assert roles(["myecho@broker.socket", "myecho@broker.socket"]) == ["frontend", "backend"]
    assert roles(["frontend", "frontend"]) == ["frontend", "backend"]  # one name for the whole unit
    assert roles(["a", "b", "c"]) == ["frontend", "backend", "frontend"]


def test_the_bad_config_status_is_one_number() -> None:
    from myecho import cli
    from myecho.core import settings

    assert cli.EXIT_BAD_CONFIG == settings.EXIT_BAD_CONFIG == 78  # sysexits.h EX_CONFIG, in the units too
