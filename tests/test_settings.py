"""Settings read all or nothing, checked by one table; check-config; reload by SIGHUP.

The reload tests run real servers and send them real signals: a bad file
must never kill a running daemon nor change any of its settings.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from support import ServeFactory, Server, command, roundtrip, wait_until

from myecho.core.settings import (
    EXIT_BAD_CONFIG,
    LIMITS,
    Settings,
    SettingsError,
    check_file,
    check_value,
    convert,
    load,
    read_file,
)
from myecho.service import make_settings


def write(tmp_path: Path, text: str | bytes) -> Path:
    config = tmp_path / "default"
    if isinstance(text, bytes):
        config.write_bytes(text)
    else:
        config.write_text(text)
    return config


# ------------------------------------------------------------ the table


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Settings) if f.type in (int, float)])
def test_every_numeric_field_refuses_nan_infinity_and_out_of_range(name: str) -> None:
    """Generic: a field added later is covered without a line of its own."""
    for bad in ("nan", "inf", "-inf", "-1", "1e300"):
        with pytest.raises(SettingsError, match=name.replace("_", "-")):
            convert(name, bad)


def test_the_defaults_pass_their_own_table() -> None:
    Settings().check()
    for name, (low, high) in LIMITS.items():
        check_value(name, low)
        check_value(name, high)


def test_types_and_choices() -> None:
    assert convert("graceful_timeout", "2.5") == 2.5
    assert convert("log_level", "DEBUG") == "debug"
    with pytest.raises(SettingsError, match="not a whole number"):
        convert("max_children", "1.5")
    with pytest.raises(SettingsError, match="not debug, info, warning or error"):
        convert("log_level", "verbose")


# ------------------------------------------------------------- the file


def test_a_bad_line_applies_nothing(tmp_path: Path) -> None:
    """A valid line before a bad one must not stay applied."""
    config = write(tmp_path, "MYECHO_MAX_CONNECTIONS=5\nMYECHO_BUFFER_LIMIT=lots\n")
    with pytest.raises(SettingsError, match=r"default:2: bad value for MYECHO_BUFFER_LIMIT"):
        load("select", config, {})
    settings, _ = load("select", write(tmp_path, "MYECHO_MAX_CONNECTIONS=100\n"), {})
    write(tmp_path, "MYECHO_MAX_CONNECTIONS=5\nMYECHO_BUFFER_LIMIT=lots\n")
    with pytest.raises(SettingsError):
        settings.reloaded()
    assert settings.max_connections == 100


def test_non_utf8_bytes_name_the_line(tmp_path: Path) -> None:
    config = write(tmp_path, b"MYECHO_MAX_CHILDREN=10\nMYECHO_HOST=caf\xe9\n")
    reading = read_file(config, "fork")
    assert reading.errors == [f"{config}:2: byte 0xe9 is not UTF-8 text"]


def test_unknown_names_warn_and_other_models_settings_are_fine(tmp_path: Path) -> None:
    config = write(tmp_path, "MYECHO_MAX_CHILDRN=7\nMYECHO_FORK_PORT=12000\nMYECHO_BUFFER_LIMIT=10\nPATH=/x\n")
    settings, warnings = load("select", config, {})
    assert warnings == [f"{config}:1: unknown setting MYECHO_MAX_CHILDRN"]
    assert settings.port == 11140 and settings.buffer_limit == 10


def test_the_models_own_port_wins_over_myecho_port(tmp_path: Path) -> None:
    config = write(tmp_path, "MYECHO_SELECT_PORT=12000\nMYECHO_PORT=13000\n")
    assert load("select", config, {})[0].port == 12000
    assert load("fork", config, {})[0].port == 13000


def test_settings_precedence(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        'MYECHO_HOST="::1"\nMYECHO_SELECT_PORT=12000\nMYECHO_FORK_PORT=13000\n'
        "MYECHO_GRACEFUL_TIMEOUT=2.5\nMYECHO_BUFFER_LIMIT=1000\nNOT_OURS=1\n# comment\n\n",
    )
    options = {"model": "select", "config": config, "buffer_limit": 4096, "host": None, "port": None}
    settings = make_settings(options)
    assert (settings.host, settings.port) == ("::1", 12000)  # the file, and this model's port only
    assert settings.graceful_timeout == 2.5
    assert settings.buffer_limit == 4096  # the command line wins
    assert make_settings({"model": "fork"}).port == 11139  # the contract's default


def test_reload_only_touches_reloadable_settings_the_file_changed(tmp_path: Path) -> None:
    config = write(tmp_path, "MYECHO_BUFFER_LIMIT=100\n")
    settings, _ = load("select", config, {"max_children": 3})
    settings.max_connections = 50  # as the select model caps it to the fd limit
    write(tmp_path, "MYECHO_PORT=1\nMYECHO_MAX_CHILDREN=7\nMYECHO_BUFFER_LIMIT=200\n")
    new, changed, _ = settings.reloaded()
    assert changed == ["buffer_limit"]  # not the port, not max_children (command line), not max_connections
    assert new.buffer_limit == 200


def test_check_config_lists_every_problem_by_line(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        b"# comment\nMYECHO_MAX_CHILDREN=7\nMYECHO_MAX_CHILDRN=7\nMYECHO_GRACEFUL_TIMEOUT=nan\n"
        b"MYECHO_SPARE_CHILDREN=-1\nMYECHO_LOG_LEVEL=verbose\nMYECHO_FORK_PORT=70000\ngarbage\n"
        b"NOT_OURS=1\nMYECHO_HOST=caf\xe9\n",
    )
    result = subprocess.run([command("myecho"), "check-config", str(config)], capture_output=True, timeout=20)
    assert result.returncode == EXIT_BAD_CONFIG
    lines = result.stderr.decode().splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [f"{config}:{n}" for n in (3, 4, 5, 6, 7, 8, 10)], lines
    assert "unknown setting MYECHO_MAX_CHILDRN" in lines[0]
    assert "Traceback" not in result.stderr.decode()


def test_check_config_of_a_clean_file_and_of_the_shipped_default(tmp_path: Path) -> None:
    config = write(tmp_path, "MYECHO_MAX_CHILDREN=7\nMYECHO_WORKER_CONNECT=tcp://127.0.0.1:11145\n")
    result = subprocess.run([command("myecho"), "check-config", str(config)], capture_output=True, timeout=20)
    assert (result.returncode, result.stderr) == (0, b"")
    shipped = Path(__file__).parent.parent / "debian" / "myecho.default"
    assert check_file(shipped) == []
    missing = subprocess.run(
        [command("myecho"), "check-config", str(tmp_path / "nothing")], capture_output=True, timeout=20, text=True
    )
    assert missing.returncode == EXIT_BAD_CONFIG and len(missing.stderr.splitlines()) == 1


def test_check_config_save_and_or_last(tmp_path: Path) -> None:
    """What the units run: a clean file is copied; a bad one is refused, or
    with --or-last the last clean copy stays and the start goes on."""
    config, copy = write(tmp_path, "MYECHO_MAX_CHILDREN=7\n"), tmp_path / "run" / "fork.conf"
    argv = [command("myecho"), "check-config", "--save", str(copy)]
    assert subprocess.run([*argv, str(config)], timeout=20, umask=0o077).returncode == 0  # the units' UMask=
    assert copy.read_text() == "MYECHO_MAX_CHILDREN=7\n"
    # Written as root, read by the model's dynamic user: readable whatever the umask.
    assert (copy.parent.stat().st_mode & 0o777, copy.stat().st_mode & 0o777) == (0o755, 0o644)
    write(tmp_path, "MYECHO_MAX_CHILDREN=seven\n")
    assert subprocess.run([*argv, str(config)], capture_output=True, timeout=20).returncode == EXIT_BAD_CONFIG
    kept = subprocess.run([*argv, "--or-last", str(config)], capture_output=True, timeout=20, text=True)
    assert kept.returncode == 0 and "last good copy" in kept.stdout
    assert copy.read_text() == "MYECHO_MAX_CHILDREN=7\n"
    copy.unlink()
    first = subprocess.run([*argv, "--or-last", str(config)], capture_output=True, timeout=20)
    assert first.returncode == EXIT_BAD_CONFIG and not copy.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "fork", "--graceful-timeout", "nan"],
        ["serve", "select", "--graceful-timeout", "inf"],
        ["serve", "worker", "--heartbeat", "nan"],
        ["serve", "select", "--buffer-limit", "-5"],
        ["serve", "fork", "--max-children", "1e3"],
        ["serve", "select", "--host", "caf\udce9"],  # the byte 0xe9 on the command line
        ["serve", "worker", "--connect", "tcp://caf\udce9:1"],
    ],
    ids=" ".join,
)
def test_command_line_refuses_what_the_file_refuses(argv: list[str]) -> None:
    arguments = [os.fsencode(arg) for arg in argv]  # surrogates back to the raw bytes
    result = subprocess.run([command("myecho"), *arguments], capture_output=True, timeout=20, text=True)
    assert result.returncode in (2, EXIT_BAD_CONFIG)
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


def test_serve_with_a_bad_file_exits_78_in_one_line(tmp_path: Path) -> None:
    config = write(tmp_path, "MYECHO_SPARE_CHILDREN=-1\nMYECHO_LOG_LEVEL=loud\n")
    result = subprocess.run(
        [command("myecho"), "serve", "fork", "--port", "0", "--config", str(config)],
        capture_output=True,
        timeout=20,
        text=True,
    )
    assert result.returncode == EXIT_BAD_CONFIG
    assert result.stderr.splitlines() == [
        f"myecho: {config}:1: bad value for MYECHO_SPARE_CHILDREN: spare-children -1 is not in 0-10000 "
        f"(and 1 more: myecho check-config {config})"
    ]


# ------------------------------------------------- reload by real SIGHUP


def reload_and_wait(server: Server, needle: str) -> None:
    before = server.stderr.count(needle)
    server.signal(signal.SIGHUP)
    wait_until(lambda: server.stderr.count(needle) > before, timeout=10, what=f"{needle!r} in the log")


def open_connections(server: Server, count: int) -> list[socket.socket]:
    socks = [server.connect() for _ in range(count)]
    for number, sock in enumerate(socks):
        assert roundtrip(sock, b"%d" % number) == b"%d" % number
    return socks


def test_reload_with_a_bad_line_changes_nothing(serve: ServeFactory, tmp_path: Path) -> None:
    """A valid MYECHO_MAX_CONNECTIONS before a bad line stays unapplied: three
    clients are still served where 2 would have been the new limit."""
    config = write(tmp_path, "MYECHO_MAX_CONNECTIONS=100\n")
    server = serve("select", "--config", str(config))
    write(tmp_path, "MYECHO_MAX_CONNECTIONS=2\nMYECHO_BUFFER_LIMIT=lots\n")
    reload_and_wait(server, "reload refused")
    assert "every setting kept" in server.stderr and "MYECHO_BUFFER_LIMIT" in server.stderr
    refused = [line for line in server.stderr_lines if "reload refused" in line]
    assert len(refused) == 1
    socks = open_connections(server, 3)
    for sock in socks:
        sock.close()
    assert server.proc.poll() is None


@pytest.mark.parametrize(
    ("model", "text"),
    [
        ("select", b"MYECHO_MAX_CONNECTIONS=50\nMYECHO_HOST=caf\xe9\n"),
        ("select", b"MYECHO_LOG_LEVEL=verbose\n"),
        ("fork", b"MYECHO_SPARE_CHILDREN=-1\n"),
        ("fork", b"MYECHO_GRACEFUL_TIMEOUT=nan\n"),
    ],
    ids=["non-utf8", "log-level", "spare-children", "nan"],
)
def test_a_bad_file_never_kills_a_running_daemon(serve: ServeFactory, tmp_path: Path, model: str, text: bytes) -> None:
    config = write(tmp_path, "MYECHO_GRACEFUL_TIMEOUT=1\n")
    server = serve(model, "--config", str(config))
    held = server.connect()
    assert roundtrip(held, b"before") == b"before"
    write(tmp_path, text)
    reload_and_wait(server, "reload refused")
    reload_and_wait(server, "reload refused")  # and again: the HUP after a bad one too
    assert "Traceback" not in server.stderr
    assert roundtrip(held, b"after") == b"after"
    held.close()
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 5  # the old, finite grace period still applies


def test_reload_warns_about_unknown_names_and_applies_the_rest(serve: ServeFactory, tmp_path: Path) -> None:
    config = write(tmp_path, "MYECHO_MAX_CONNECTIONS=100\n")
    server = serve("select", "--config", str(config))
    write(tmp_path, "MYECHO_MAX_CONNECTIONS=100\nMYECHO_MAX_CONECTIONS=3\nMYECHO_BUFFER_LIMIT=1000\n")
    reload_and_wait(server, "reloaded (")
    assert "unknown setting MYECHO_MAX_CONECTIONS (ignored)" in server.stderr
    assert "reloaded (buffer_limit)" in server.stderr
