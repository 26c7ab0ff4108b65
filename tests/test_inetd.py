"""The inetd model: a pipe, systemd's Accept=yes (systemd-socket-activate
--inetd), and a real xinetd with a private configuration."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import command, exchange, odd_chunks, random_bytes, roundtrip, wait_listening

from myecho.bench.harness import free_port

REPO = Path(__file__).parent.parent


def test_pipe_echoes_every_byte() -> None:
    payload = random_bytes(3 * 1024 * 1024) + b"\x00tail without newline"
    result = subprocess.run([command("myecho"), "serve", "inetd"], input=payload, capture_output=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout == payload
    assert result.stderr == b""


def test_printf_x_prints_x() -> None:
    result = subprocess.run(
        f"printf 'x' | {command('myecho')} serve inetd", shell=True, capture_output=True, timeout=10
    )
    assert result.stdout == b"x"


def test_reader_gone_is_not_a_crash() -> None:
    proc = subprocess.Popen(
        [command("myecho"), "serve", "inetd"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdin is not None
    proc.stdout.close()
    try:
        proc.stdin.write(b"nobody reads this\n" * 10000)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    assert proc.wait(10) == 0
    assert proc.stderr is not None and b"Traceback" not in proc.stderr.read()


def test_cli_main_keeps_the_inetd_path() -> None:
    """myecho.cli's main(), for callers other than the myecho script (python3 -m myecho.cli)."""
    import sys

    payload = random_bytes(100 * 1024) + b"\x00"
    result = subprocess.run(
        [sys.executable, "-m", "myecho.cli", "serve", "inetd"], input=payload, capture_output=True, timeout=10
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, payload, b"")


def test_help_does_not_take_the_fast_path() -> None:
    result = subprocess.run([command("myecho"), "serve", "inetd", "--help"], capture_output=True, timeout=10)
    assert result.returncode == 0 and b"stdin" in result.stdout


@pytest.fixture
def socket_activated_inetd() -> Iterator[int]:
    """systemd's Accept=yes, as systemd-socket-activate --inetd -a does it."""
    tool = shutil.which("systemd-socket-activate")
    assert tool, "systemd-socket-activate is missing: apt-get install systemd"
    port = free_port()
    coverage = [f"--setenv={name}" for name in os.environ if name.startswith("COVERAGE_")]
    proc = subprocess.Popen(
        [tool, "--inetd", "-a", f"--listen=127.0.0.1:{port}", *coverage, command("myecho"), "serve", "inetd"],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, 10, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_socket_activation_accept_yes(socket_activated_inetd: int) -> None:
    payload = random_bytes(1024 * 1024)
    with socket.create_connection(("127.0.0.1", socket_activated_inetd), timeout=30) as sock:
        assert exchange(sock, payload, odd_chunks(payload)) == payload


def test_socket_activation_accept_yes_concurrent(socket_activated_inetd: int) -> None:
    failures: list[str] = []

    def client(number: int) -> None:
        payload = b"connection %d\n" % number
        try:
            with socket.create_connection(("127.0.0.1", socket_activated_inetd), timeout=30) as sock:
                if exchange(sock, payload) != payload:
                    failures.append(str(number))
        except OSError as error:
            failures.append(f"{number}: {error}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures


XINETD_SERVICE = """\
service myecho
{{
    type        = UNLISTED
    id          = myecho-test
    socket_type = stream
    protocol    = tcp
    wait        = no
    user        = {user}
    bind        = 127.0.0.1
    port        = {port}
    server      = {server}
    server_args = serve inetd
    cps         = 500 1
    instances   = 100
}}
"""


@pytest.fixture
def xinetd_port() -> Iterator[int]:
    """A real xinetd in the foreground with a private configuration."""
    xinetd = shutil.which("xinetd") or "/usr/sbin/xinetd"
    assert os.path.exists(xinetd), "xinetd is missing: apt-get install xinetd"
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="myecho-xinetd-"))
    config = workdir / "xinetd.conf"
    # The shipped file says user = nobody (checked by the system suite with the
    # installed package); tox's environment is private to its owner.
    user = pwd.getpwuid(os.getuid()).pw_name
    config.write_text(XINETD_SERVICE.format(port=port, server=command("myecho"), user=user))
    log = workdir / "xinetd.log"
    proc = subprocess.Popen(
        [xinetd, "-dontfork", "-f", str(config), "-filelog", str(log), "-pidfile", str(workdir / "pid")],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, 10, proc)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def test_xinetd_runs_the_inetd_model(xinetd_port: int) -> None:
    payload = random_bytes(256 * 1024) + b"\x00\r\n"
    with socket.create_connection(("127.0.0.1", xinetd_port), timeout=30) as sock:
        assert exchange(sock, payload, odd_chunks(payload)) == payload


def test_xinetd_interactive_lines(xinetd_port: int) -> None:
    with socket.create_connection(("127.0.0.1", xinetd_port), timeout=30) as sock:
        assert roundtrip(sock, b"Hello\n") == b"Hello\n"
        assert roundtrip(sock, b"Test 1\n") == b"Test 1\n"
        assert roundtrip(sock, b"Test 2\n") == b"Test 2\n"


def test_lean_start_runs_the_file_without_site() -> None:
    """What the shipped xinetd file and inetd unit run: python3 -I -S inetd.py."""
    import myecho.models.inetd

    installed = Path(myecho.models.inetd.__file__)
    payload = b"lean\x00start" * 1000
    result = subprocess.run(
        ["/usr/bin/python3", "-I", "-S", str(installed)], input=payload, capture_output=True, timeout=10
    )
    assert result.stdout == payload, result.stderr


def _imports(argv: list[str]) -> set[str]:
    """The modules a start of ``argv`` (stdin b"x") imports, by -X importtime (pass it where -I ignores the
    environment)."""
    # Without coverage's start-up hook, which imports half the stdlib itself.
    env = {name: value for name, value in os.environ.items() if not name.startswith("COVERAGE_")}
    env["PYTHONPROFILEIMPORTTIME"] = "1"
    result = subprocess.run(argv, input=b"x", capture_output=True, timeout=10, env=env)
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.decode().splitlines() if "|" in line}
    assert "encodings" in imported, result.stderr  # the profile was written: the list is complete
    return imported


def _interpreter(script: str) -> str:
    """The interpreter on a script's #! line."""
    with open(script, "rb") as file:
        return file.readline()[2:].decode().split()[0]


def test_lean_start_imports_nothing_beyond_the_bare_interpreter() -> None:
    """python3 -I -S inetd.py: every import is paid at every connection, so none beyond the interpreter's own."""
    import myecho.models.inetd

    bare = _imports(["/usr/bin/python3", "-X", "importtime", "-I", "-S", "-c", "pass"])
    assert _imports(["/usr/bin/python3", "-X", "importtime", "-I", "-S", myecho.models.inetd.__file__]) - bare == set()


def test_console_command_imports_only_the_inetd_model() -> None:
    """myecho serve inetd: what its interpreter imports anyway, plus the inetd model and its packages."""
    myecho = command("myecho")
    baseline = _imports([_interpreter(myecho), "-c", "pass"])
    extra = _imports([myecho, "serve", "inetd"]) - baseline
    assert extra == {"myecho", "myecho.models", "myecho.models.inetd"}, extra


@pytest.mark.parametrize("lean", [True, False], ids=["python3 -I -S inetd.py", "myecho serve inetd"])
def test_half_close_over_a_socket(lean: bool) -> None:
    """A socket as stdin and stdout, as xinetd and systemd hand it: odd chunks of binary data in, a
    half-close, then every byte back, EOF, and exit status 0."""
    import myecho.models.inetd

    argv = (
        ["/usr/bin/python3", "-I", "-S", myecho.models.inetd.__file__]
        if lean
        else [command("myecho"), "serve", "inetd"]
    )
    ours, theirs = socket.socketpair()
    payload = random_bytes(2 * 1024 * 1024 + 7) + bytes(range(256))
    with ours:
        proc = subprocess.Popen(argv, stdin=theirs, stdout=theirs, stderr=subprocess.PIPE)
        theirs.close()
        assert exchange(ours, payload, odd_chunks(payload)) == payload
        assert proc.wait(10) == 0
        assert proc.stderr is not None and proc.stderr.read() == b""


def test_echo_in_process() -> None:
    """echo() itself, from one socket to another: every byte, and status 0 at EOF."""
    from myecho.models.inetd import echo

    payload = random_bytes(3 * 1024 * 1024)
    client, server_in = socket.socketpair()
    server_out, reader = socket.socketpair()
    received = bytearray()

    def send() -> None:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)

    def receive() -> None:
        while data := reader.recv(65536):
            received.extend(data)

    threads = [threading.Thread(target=send), threading.Thread(target=receive)]
    for thread in threads:
        thread.start()
    try:
        assert echo(server_in.fileno(), server_out.fileno()) == 0
        server_out.shutdown(socket.SHUT_WR)
        for thread in threads:
            thread.join(10)
    finally:
        for sock in (client, server_in, server_out, reader):
            sock.close()
    assert bytes(received) == payload


def test_echo_statuses_when_things_break() -> None:
    """The client gone without reading is status 0 (not an error); any other failure is 1."""
    from myecho.models.inetd import echo

    client, server = socket.socketpair()
    with client, server:
        client.sendall(b"data for nobody")
        client.shutdown(socket.SHUT_WR)
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            assert echo(server.fileno(), write_end) == 0  # EPIPE
        finally:
            os.close(write_end)
    read_end, write_end = os.pipe()
    os.close(write_end)
    os.close(read_end)
    assert echo(read_end, 1) == 1  # EBADF


def test_bench_times_the_interpreter_start_beside_the_inetd_rows(tmp_path: Path) -> None:
    """myecho-bench times python3 -I -S -c pass in the same run and states the inetd rows against it."""
    import jsonschema

    out = tmp_path / "results.json"
    done = subprocess.run(
        [
            command("myecho-bench"),
            "--quick",
            "--models",
            "inetd-xinetd",
            "--scenarios",
            "single",
            "--trials",
            "10",
            "--json",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(out.read_text())
    schema = json.loads((Path(__file__).parent.parent / "benchmarks" / "results.schema.json").read_text())
    jsonschema.validate(document, schema, cls=jsonschema.Draft202012Validator)
    start = document["interpreter_start"]
    assert start["command"].endswith(" -I -S -c pass") and start["runs"] == 10
    assert 0 < start["median_s"] <= start["p99_s"] < 5
    exchange1 = document["models"][0]["single"]["exchange1"]["median"]
    line = next(line for line in done.stdout.splitlines() if line.startswith("Reference: "))
    assert f"inetd by xinetd: exchange 1 = {exchange1 / start['median_s']:.2f}×" in line


def test_bench_without_inetd_rows_times_no_interpreter(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [
            command("myecho-bench"),
            "--quick",
            "--models",
            "c",
            "--scenarios",
            "single",
            "--trials",
            "5",
            "--json",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "interpreter_start" not in json.loads(out.read_text())
    assert "Reference: " not in done.stdout


def _inetd_systemd_report(meta: dict[str, object]) -> str:
    from myecho.bench.report import Report
    from myecho.bench.scenarios import ModelResult, SingleResult
    from myecho.bench.stats import Summary

    row = ModelResult("inetd-systemd", "inetd by systemd", "inetd", "tcp", False)
    row.single = SingleResult(10, {}, Summary.of([1e-4]), Summary.of([9e-3]), Summary.of([5e-5]))
    return "\n".join(Report([row], meta).inetd_reference())


def test_report_says_which_socket_unit_the_systemd_row_went_through() -> None:
    start = {"command": "/usr/bin/python3 -I -S -c pass", "runs": 10, "median_s": 0.01, "p99_s": 0.012}
    installed = _inetd_systemd_report(
        {
            "interpreter_start": start,
            "inetd_socket_unit": {"Accept": "yes", "MaxConnections": "256", "TriggerLimitBurst": "2000"},
        }
    )
    assert "inetd by systemd: exchange 1 = 0.90×" in installed
    assert "myecho-inetd.socket as installed (Accept=yes, MaxConnections=256, TriggerLimitBurst=2000)" in installed
    assert "systemd-socket-activate" not in installed
    local = _inetd_systemd_report({"interpreter_start": start})
    assert "systemd-socket-activate --inetd (Accept=yes, no MaxConnections or trigger limit)" in local


def test_report_sets_the_systemd_row_against_the_interpreter_behind_the_same_unit() -> None:
    """--installed also times the bare interpreter behind a copy of the socket unit: the row's own share."""
    start = {"command": "/usr/bin/python3 -I -S -c pass", "runs": 10, "median_s": 0.01, "p99_s": 0.012}
    behind = {
        "command": "/usr/bin/python3 -I -S -c pass",
        "unit": "myecho-bench-floor.socket",
        "runs": 10,
        "median_s": 0.0075,
        "p99_s": 0.02,
    }
    unit = {"Accept": "yes", "MaxConnections": "256"}
    text = _inetd_systemd_report(
        {"interpreter_start": start, "inetd_socket_unit": unit, "interpreter_start_unit": behind}
    )
    assert "myecho-inetd.socket as installed (Accept=yes, MaxConnections=256)" in text
    assert "systemd-socket-activate" not in text  # it went through the unit, and the report says only that
    said = next(line for line in text.splitlines() if line.startswith("Reference behind the socket unit"))
    assert "as the service of myecho-bench-floor.socket" in said and "7.5 ms" in said
    assert said.endswith("; inetd by systemd: exchange 1 = 1.20×")
    skipped = _inetd_systemd_report({"interpreter_start": start, "interpreter_start_unit": {"skipped": "not root"}})
    assert "Reference behind the socket unit: not timed (not root)" in skipped


def test_floor_units_change_only_the_command_and_the_port() -> None:
    """The copy keeps every installed setting (drop-ins too: ``systemctl cat`` shows them); it empties
    ExecStart= and ListenStream= before setting its own, as a drop-in would."""
    from myecho.bench.startup import floor_units

    socket_text = (REPO / "systemd" / "myecho-inetd.socket").read_text()
    service_text = (REPO / "systemd" / "myecho-inetd@.service").read_text()
    socket_unit, service_unit = floor_units(socket_text, service_text, "/usr/bin/python3", 40123)
    assert socket_unit.startswith(socket_text) and service_unit.startswith(service_text)
    assert socket_unit[len(socket_text) :].split() == ["[Socket]", "ListenStream=", "ListenStream=127.0.0.1:40123"]
    added = service_unit[len(service_text) :].splitlines()
    assert added[-3:] == ["[Service]", "ExecStart=", "ExecStart=/usr/bin/python3 -I -S -c pass"]
    assert "DynamicUser=yes" in service_unit and "Accept=yes" in socket_unit


def test_the_unit_floor_says_why_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from myecho.bench import startup

    monkeypatch.setattr(startup.shutil, "which", lambda name: None)
    assert startup.unit_floor_unavailable() == "systemd is not running"


def test_the_unit_floor_leaves_nothing_behind_when_systemd_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket unit that will not start (here a systemctl that refuses "start") is an error that
    names the command, and the runtime units written for it are removed again; a unit that is not
    installed ("cat" fails) is an error before anything is written."""
    from myecho.bench import startup

    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "systemctl"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        'case "$1" in\n'
        '  cat) [ -e "$FAKE_NO_UNIT" ] && { echo "No files found for $2." >&2; exit 1; }; echo "[Unit]" ;;\n'
        '  start) echo "Job for $2 failed." >&2; exit 1 ;;\n'
        "esac\n"
    )
    fake.chmod(0o755)
    units = tmp_path / "run"
    units.mkdir()
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setattr(startup, "RUNTIME_UNITS", units)
    with pytest.raises(OSError, match=r"systemctl start myecho-bench-floor\.socket: Job for .* failed"):
        startup.unit_floor("/usr/bin/python3", 3)
    assert list(units.iterdir()) == []
    said = calls.read_text().splitlines()
    assert said[-2] == "stop myecho-bench-floor.socket system-myecho\\x2dbench\\x2dfloor.slice"
    assert said[-1] == "daemon-reload"
    monkeypatch.setenv("FAKE_NO_UNIT", str(calls))
    calls.write_text("")
    with pytest.raises(OSError, match=r"systemctl cat myecho-inetd\.socket: No files found"):
        startup.unit_floor("/usr/bin/python3", 3)
    assert calls.read_text().split() == ["cat", "myecho-inetd.socket"] and list(units.iterdir()) == []


def test_a_sigterm_while_the_floor_runs_still_removes_its_units(tmp_path: Path) -> None:
    """SIGTERM at the worst moment (right after systemd started the floor's socket) ends the
    bench with 143, and its runtime units are stopped and removed first."""
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "systemctl"
    fake.parent.mkdir()
    fake.write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\n'
        'case "$1" in\n  cat) echo "[Unit]" ;;\n  start) kill -TERM "$PPID"; sleep 0.5 ;;\nesac\n'
    )
    fake.chmod(0o755)
    units = tmp_path / "run"
    units.mkdir()
    code = "import sys; from pathlib import Path; from myecho.bench import startup\n"
    code += "startup.RUNTIME_UNITS = Path(sys.argv[1]); startup.unit_floor('/usr/bin/python3', 3)"
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-c", code, str(units)], env=env, capture_output=True, timeout=30)
    assert done.returncode == 143, done.stderr
    assert list(units.iterdir()) == []
    assert calls.read_text().splitlines()[-2:] == [
        "stop myecho-bench-floor.socket system-myecho\\x2dbench\\x2dfloor.slice",
        "daemon-reload",
    ]
