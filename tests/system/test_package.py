"""The Debian package in a booted Debian 12 with systemd as PID 1.

One container gets the package installed once (an apt install costs about
20-30 s, a boot 1 s) and the tests below take turns on it, in file order:
first what only reads or starts and stops units, then the upgrade, and
last the purge.  Each test leaves the units as it found them (stopped), or
says what it changes.  The clients run inside the container (probe.py):
it has only its own loopback.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .container import Container
from .packaging import (
    BROKER_PORTS,
    MAX_EXPOSURE,
    MAX_WORKER_EXPOSURE,
    MODELS,
    PORTS,
    PYTHON_MODELS,
    REPO,
    SERVICES,
    SYSTEMD_DIR,
    WORKER,
    build_debs,
    deb_field,
    exposure,
    package_debs,
)

PROBE = "/root/probe.py"
UNIT_DIR = "/lib/systemd/system"


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def debs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The packages under test, myecho then myecho-bench: $MYECHO_DEB (made by `make deb`), else built now."""
    return package_debs(tmp_path_factory)


@pytest.fixture(scope="session")
def newer_debs(debs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The same source with a higher version, to upgrade to."""
    version = deb_field(debs[0], "Version") + "+upgrade1"
    return build_debs(tmp_path_factory.mktemp("newer-deb"), version)


@pytest.fixture(scope="module")
def box(rootfs: Path, debs: list[Path]) -> Iterator[Container]:
    """One booted container with both packages installed, for the whole module."""
    with Container(rootfs) as booted:
        # Every Debian server has ca-certificates (python3 recommends it); this
        # minimal rootfs has not, and its trigger would talk on stderr.
        booted.apt_get("install", "--no-install-recommends", "ca-certificates")
        started = time.monotonic()
        result = booted.apt_install_deb(*debs)
        booted.install_seconds = time.monotonic() - started  # type: ignore[attr-defined]
        booted.install_log = result.stdout  # type: ignore[attr-defined]
        booted.install_errors = result.stderr  # type: ignore[attr-defined]
        print(f"boot {booted.boot_seconds:.1f}s, apt install {booted.install_seconds:.1f}s")  # type: ignore[attr-defined]
        booted.copy_in(Path(__file__).with_name("probe.py"), PROBE)
        yield booted


# ------------------------------------------------------------------- helpers


def probe(box: Container, *args: object, timeout: float = 120) -> dict[str, Any]:
    """Run probe.py inside; its JSON result, which must say ok."""
    result = box.run(["python3", PROBE, *map(str, args)], check=False, timeout=timeout)
    try:
        outcome: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise AssertionError(f"probe {args} failed:\n{result.stdout}\n{result.stderr}") from None
    assert outcome["ok"], f"probe {args}: {outcome}\n{result.stderr}"
    return outcome


def round_trip(box: Container, model: str) -> None:
    if model == "zmq":
        probe(box, "zmq", PORTS["zmq"])
    else:
        probe(box, "tcp", PORTS[model])


def wait_until(what: str, check: Callable[[], bool], timeout: float = 30, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def state(box: Container, unit: str) -> str:
    return box.systemctl("is-active", unit, check=False).stdout.strip()


def main_pid(box: Container, unit: str) -> int:
    return int(box.systemctl("show", "-P", "MainPID", unit).stdout.strip())


def show(box: Container, unit: str, prop: str) -> str:
    return box.systemctl("show", "-P", prop, unit).stdout.strip()


def stop_all(box: Container) -> None:
    box.systemctl("stop", "myecho.target", "myecho-inetd.socket")
    box.systemctl("reset-failed", check=False)


@pytest.fixture
def clean(box: Container) -> Iterator[Container]:
    """The shared container, every myecho unit stopped before and after."""
    stop_all(box)
    yield box
    stop_all(box)


class Background(threading.Thread):
    """A probe running while the test does something else."""

    def __init__(self, box: Container, *args: object) -> None:
        super().__init__(daemon=True)
        self.box, self.args = box, args
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = probe(self.box, *self.args)
        except BaseException as error:  # reported by outcome()
            self.error = error

    def outcome(self) -> dict[str, Any]:
        self.join(120)
        if self.error is not None:
            raise self.error
        assert self.result is not None, "the background probe did not finish"
        return self.result


# ------------------------------------------------ the package and its files


def _unpack(deb: Path, where: Path) -> Path:
    import subprocess

    subprocess.run(["dpkg-deb", "-x", str(deb), str(where)], check=True)
    subprocess.run(["dpkg-deb", "-e", str(deb), str(where / "DEBIAN")], check=True)
    return where


def _files(root: Path) -> set[str]:
    """The files (not folders) of an unpacked package, as installed paths."""
    return {
        "/" + str(path.relative_to(root))
        for path in root.rglob("*")
        if "DEBIAN" not in path.parts and not path.is_dir()
    }


def test_deb_ships_the_source_units(debs: list[Path], tmp_path: Path) -> None:
    """The units in the .deb are systemd/ byte for byte; /etc files are conffiles."""
    service = _unpack(debs[0], tmp_path / "myecho")
    for source in SYSTEMD_DIR.rglob("*"):
        if source.is_file():
            shipped = service / "lib/systemd/system" / source.relative_to(SYSTEMD_DIR)
            assert shipped.read_bytes() == source.read_bytes(), shipped
    assert (service / "etc/xinetd.d/myecho").read_bytes() == (REPO / "xinetd/myecho").read_bytes()
    assert (service / "DEBIAN/conffiles").read_text().split() == ["/etc/default/myecho", "/etc/xinetd.d/myecho"]
    for page in ("myecho.1.gz", "myecho-c.1.gz"):
        assert (service / "usr/share/man/man1" / page).is_file()
    depends = deb_field(debs[0], "Depends")
    for package in ("python3-systemd", "python3-zmq", "python3"):
        assert re.search(rf"(^|, ){package}[ ,:]", depends + ","), depends


def test_packages_split_service_and_bench(debs: list[Path], tmp_path: Path) -> None:
    """myecho: the service and /usr/bin/myecho-c, an ELF; myecho-bench: the
    benchmark's modules, its command, and the C helpers in /usr/libexec/myecho."""
    service, bench = (_unpack(deb, tmp_path / deb.name) for deb in debs)
    service_files, bench_files = _files(service), _files(bench)
    assert not service_files & bench_files
    assert (service / "usr/bin/myecho-c").read_bytes()[:4] == b"\x7fELF"
    helpers = {f"/usr/libexec/myecho/{name}" for name in ("myecho-load", "epoll-echo", "zmq-echo")}
    assert helpers <= bench_files
    for helper in helpers:
        assert (bench / helper[1:]).read_bytes()[:4] == b"\x7fELF", helper
    assert "/usr/bin/myecho-bench" in bench_files and "/usr/bin/myecho-bench" not in service_files
    packages = "/usr/lib/python3/dist-packages/myecho"
    assert f"{packages}/bench/cli.py" in bench_files
    assert not {path for path in service_files if path.startswith(f"{packages}/bench")}
    assert all(path.startswith(f"{packages}/bench/") for path in bench_files if path.startswith("/usr/lib/python3/"))
    assert not any("/_bin" in path for path in service_files | bench_files)  # pip's place, not Debian's
    assert "(= " + deb_field(debs[0], "Version") + ")" in deb_field(debs[1], "Depends")
    assert "sdnotify" not in deb_field(debs[0], "Recommends")
    assert set(deb_field(debs[1], "Suggests").split(", ")) == {"python3-matplotlib", "redis-tools", "xinetd"}
    description = deb_field(debs[0], "Description")
    for word in ("inetd", "fork", "select", "asyncio", "zmq", "broker", "worker", "pipeline", "pubsub", "c:"):
        assert word in description, word
    assert "myecho-bench" in description


def test_install_pulls_debian_packages_and_starts_nothing(box: Container) -> None:
    log: str = box.install_log  # type: ignore[attr-defined]
    errors: str = box.install_errors  # type: ignore[attr-defined]
    # Nothing on stderr (not even "... is a disabled or a static unit, not
    # starting it").
    assert not errors, errors
    # "Get:N URI SUITE/COMPONENT ARCH PACKAGE ..." per download; the .deb itself is a local file.
    downloads = re.findall(r"^Get:\d+ (\S+) \S+ \S+ (\S+) ", log, re.MULTILINE)
    downloads = [(uri, package) for uri, package in downloads if not uri.startswith("/")]
    assert downloads, log
    sources = box.run("cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null; true").stdout
    mirrors = {line.split()[1] for line in sources.splitlines() if line.startswith("deb ")}
    assert mirrors and all("debian" in mirror for mirror in mirrors), sources
    assert {uri for uri, _ in downloads} <= mirrors, downloads
    fetched = {package for _, package in downloads}
    assert {"python3-zmq", "python3-systemd"} <= fetched
    # Python modules from Debian's packages, nothing from pip.
    where = box.run(["python3", "-c", "import zmq, systemd.daemon; print(zmq.__file__, systemd.daemon.__file__)"])
    assert where.stdout.count("/usr/lib/python3/dist-packages/") == 2, where.stdout
    assert not box.run("ls /usr/local/lib/python3*/dist-packages 2>/dev/null", check=False).stdout.strip()
    assert box.run(["myecho", "--version"]).stdout.strip() == "myecho " + deb_version(box)
    # /usr/bin/myecho-c is the C program itself, not a script that starts one.
    assert box.run("head -c 4 /usr/bin/myecho-c | od -An -c").stdout.split() == ["177", "E", "L", "F"]
    assert box.run(["myecho-c", "--version"]).stdout.strip() == "myecho-c " + deb_version(box)
    # Nothing enabled, nothing running, nothing listening.
    assert not box.systemctl("list-units", "--plain", "--no-legend", "myecho*").stdout.strip()
    assert not box.run("ls /etc/systemd/system/*/ | grep myecho", check=False).stdout.strip()
    listening = box.run(["ss", "-Htln"]).stdout.strip()
    assert not listening, listening


def deb_version(box: Container) -> str:
    return box.run(["dpkg-query", "-W", "-f", "${Version}", "myecho"]).stdout.strip()


def test_the_service_runs_without_the_bench(rootfs: Path, debs: list[Path]) -> None:
    """myecho alone, without its Recommends: the models serve, the C server too,
    and nothing of the benchmark is there or needed."""
    with Container(rootfs) as alone:
        inside = alone.copy_in(debs[0], f"/tmp/{debs[0].name}")
        alone.host_path(inside).chmod(0o644)  # readable by apt's _apt sandbox user
        result = alone.apt_get("install", "--no-install-recommends", inside)
        assert not result.stderr, result.stderr
        alone.copy_in(Path(__file__).with_name("probe.py"), PROBE)
        for model in ("select", "c"):
            alone.systemctl("start", f"myecho@{model}.service")
            round_trip(alone, model)
        status = alone.run(["dpkg-query", "-W", "-f", "${Status}", "myecho-bench"], check=False).stdout
        assert "installed" not in status.split(), status
        assert alone.run(["sh", "-c", "command -v myecho-bench"], check=False).returncode != 0
        assert alone.run(["python3", "-c", "import myecho.bench"], check=False).returncode != 0
        assert alone.run("ls /usr/libexec/myecho").stdout.split() == ["myecho-inetd"]


def test_installed_units_verify(box: Container) -> None:
    """systemd-analyze verify on every instance (named links to the installed
    templates: systemd reads the template and the instance's drop-ins)."""
    links = {f"myecho@{m}.{kind}": f"myecho@.{kind}" for m in MODELS for kind in ("service", "socket")}
    links["myecho-inetd@0.service"] = "myecho-inetd@.service"
    links |= {"myecho@broker.service": "myecho@.service", "myecho@broker.socket": "myecho@.socket"}
    links[WORKER] = "myecho-worker@.service"
    box.run(
        "mkdir -p /root/verify && cd /root/verify && "
        + " && ".join(f"ln -sf {UNIT_DIR}/{t} {n}" for n, t in links.items())
    )
    names = [f"/root/verify/{name}" for name in links] + [
        f"{UNIT_DIR}/myecho-inetd.socket",
        f"{UNIT_DIR}/myecho.target",
    ]
    result = box.run(["systemd-analyze", "verify", "--man=no", *names], check=False)
    box.run(["rm", "-r", "/root/verify"])
    assert not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
    refused = box.systemctl("start", "myecho@nosuch.socket", check=False)
    assert refused.returncode != 0 and "bad unit file setting" in refused.stderr, refused.stderr


def test_installed_unit_exposure(box: Container) -> None:
    """systemd-analyze security, online, in the booted system."""
    result = box.run(["systemd-analyze", "security", "--no-pager", *SERVICES, WORKER], env={"SYSTEMD_COLORS": "0"})
    scores = exposure(result.stdout)
    print("installed exposure:", scores)
    assert set(scores) == {*SERVICES, WORKER}, result.stdout
    assert scores.pop(WORKER) <= MAX_WORKER_EXPOSURE
    assert all(score < MAX_EXPOSURE for score in scores.values()), scores


# ----------------------------------------------------------------- services


@pytest.mark.parametrize("model", MODELS)
def test_start_model_and_echo(clean: Container, model: str) -> None:
    """`systemctl start myecho@MODEL` (its socket comes along) answers."""
    unit = f"myecho@{model}.service"
    clean.systemctl("start", unit)
    assert state(clean, f"myecho@{model}.socket") == "active"
    round_trip(clean, model)
    round_trip(clean, model)
    assert state(clean, unit) == "active"  # after real traffic, not just after start
    assert show(clean, unit, "NRestarts") == "0"
    # A sandboxed process: a dynamic user, no network of its own.
    pid = main_pid(clean, unit)
    uid = int(clean.run(["ps", "-o", "uid=", "-p", str(pid)]).stdout)
    assert 61184 <= uid <= 65519, uid  # systemd's range for dynamic users
    links = clean.run(["nsenter", "-t", str(pid), "-n", "ip", "-o", "link"]).stdout.splitlines()
    assert len(links) == 1 and ": lo:" in links[0], links
    assert main_pid(clean, unit) == pid


def test_broker_and_workers_echo(clean: Container) -> None:
    """myecho@broker takes both ports from its socket unit (clients first),
    two myecho-worker@N connect to it, a REQ client gets its echo."""
    broker, workers = "myecho@broker.service", ["myecho-worker@1.service", "myecho-worker@2.service"]
    started = time.monotonic()
    clean.systemctl("start", broker, *workers)
    assert state(clean, "myecho@broker.socket") == "active"
    wait_until("both workers at the broker", lambda: "2 workers" in show(clean, broker, "StatusText"), timeout=15)
    print(f"broker and 2 workers ready in {time.monotonic() - started:.1f}s")
    outcome = probe(clean, "zmq", BROKER_PORTS[0], "--count", 20)
    assert outcome["replies"] == 20
    for unit in (broker, *workers):  # after real traffic, not just after start
        assert state(clean, unit) == "active", unit
        assert show(clean, unit, "NRestarts") == "0", unit
    status = clean.systemctl("status", broker, check=False).stdout
    assert re.search(r'Status: ".*2 workers', status), status
    listening = clean.run(["ss", "-Htln"]).stdout
    assert all(f"127.0.0.1:{port} " in listening for port in BROKER_PORTS), listening
    # The broker has no network of its own; a worker has the container's.
    pid = main_pid(clean, broker)
    links = clean.run(["nsenter", "-t", str(pid), "-n", "ip", "-o", "link"]).stdout.splitlines()
    assert len(links) == 1 and ": lo:" in links[0], links
    clean.systemctl("stop", *workers, broker, "myecho@broker.socket")
    running = clean.systemctl(
        "list-units", "--plain", "--no-legend", "--state=active,deactivating", "myecho@broker*", "myecho-worker@*"
    )
    assert not running.stdout.strip(), running.stdout


def test_status_figures_and_journal(clean: Container) -> None:
    unit = "myecho@select.service"
    clean.systemctl("start", unit)
    for _ in range(3):
        round_trip(clean, "select")
    expected = re.compile(r"\d+ open, 3 served, \d+ messages, \d+ bytes echoed")
    wait_until("the STATUS line", lambda: bool(expected.search(show(clean, unit, "StatusText"))), timeout=5)
    status = clean.systemctl("status", unit, check=False).stdout
    assert re.search(r'Status: "0 open, 3 served, \d+ messages, 300\d{3} bytes echoed"', status), status
    journal = clean.journal(unit, "-o", "cat")
    assert "select model serving on 127.0.0.1:11140" in journal, journal
    by_field = clean.run(["journalctl", "--no-pager", "-o", "cat", "MYECHO_MODEL=select"]).stdout
    assert "serving on" in by_field


def test_asyncio_runs_on_uvloop_from_the_recommends(clean: Container) -> None:
    """python3-uvloop comes with the package (Recommends), and --loop auto picks it."""
    unit = "myecho@asyncio.service"
    clean.systemctl("start", unit)
    round_trip(clean, "asyncio")
    assert "asyncio model serving on 127.0.0.1:11150 (uvloop)" in clean.journal(unit, "-o", "cat")


def test_select_workers_under_systemd(clean: Container) -> None:
    """MYECHO_WORKERS=2: a supervisor and two workers on systemd's socket, one
    STATUS for all, reload and stop through the supervisor."""
    unit = "myecho@select.service"
    clean.run("cp /etc/default/myecho /root/default.saved && echo MYECHO_WORKERS=2 >> /etc/default/myecho")
    try:
        clean.systemctl("start", unit)
        pid = main_pid(clean, unit)
        workers = clean.run(["ps", "-o", "pid=", "--ppid", str(pid)]).stdout.split()
        assert len(workers) == 2, workers
        for _ in range(4):
            round_trip(clean, "select")
        wait_until("a summed STATUS", lambda: "4 served" in show(clean, unit, "StatusText"), timeout=5)
        assert "2 workers (pid " in show(clean, unit, "StatusText")
        before = clean.journal(unit, "-o", "cat").count("reloaded (")
        clean.systemctl("reload", unit)
        wait_until(
            "the supervisor and both workers reloaded",
            lambda: clean.journal(unit, "-o", "cat").count("reloaded (") == before + 3,
        )
        round_trip(clean, "select")
        clean.systemctl("stop", unit)
        assert show(clean, unit, "Result") == "success"
        assert show(clean, unit, "NRestarts") == "0"
    finally:
        clean.run("mv /root/default.saved /etc/default/myecho")


def test_reload_rereads_the_config(clean: Container) -> None:
    unit = "myecho@fork.service"
    clean.systemctl("start", unit)
    pid = main_pid(clean, unit)
    clean.run("cp /etc/default/myecho /root/default.saved && echo MYECHO_MAX_CHILDREN=7 >> /etc/default/myecho")
    try:
        clean.systemctl("reload", unit)
        wait_until("the reload log line", lambda: "reloaded (max_children)" in clean.journal(unit, "-o", "cat"))
    finally:
        clean.run("mv /root/default.saved /etc/default/myecho")
    assert main_pid(clean, unit) == pid and state(clean, unit) == "active"
    round_trip(clean, "fork")


def test_fork_spares_run_inside_the_sandbox(clean: Container) -> None:
    """The fork model's spawner starts under the hardened unit, keeps its four
    spares in the service's cgroup, and a spare (not a fork) serves the echo."""
    unit = "myecho@fork.service"
    clean.systemctl("start", unit)
    pid = main_pid(clean, unit)

    def children(ppid: str) -> list[str]:
        return clean.run(["ps", "-o", "pid=,args=", "--ppid", ppid], check=False).stdout.splitlines()

    wait_until("the spawner", lambda: any("spawner.py" in line for line in children(str(pid))))
    (spawner,) = [line.split()[0] for line in children(str(pid)) if "spawner.py" in line]
    wait_until("four spares", lambda: len(children(spawner)) == 4)
    for process in [spawner, *(line.split()[0] for line in children(spawner))]:  # in the unit's cgroup
        assert unit in clean.run(["cat", f"/proc/{process}/cgroup"]).stdout
    round_trip(clean, "fork")
    wait_until("a spare replaced", lambda: len(children(spawner)) == 4)
    journal = clean.journal(unit, "-o", "cat")
    assert "spawner" not in journal, journal  # neither "cannot start" nor "died"


@pytest.mark.parametrize("model", MODELS)
def test_socket_starts_service_on_first_connection(clean: Container, model: str) -> None:
    socket_unit, service = f"myecho@{model}.socket", f"myecho@{model}.service"
    clean.systemctl("start", socket_unit)
    assert state(clean, service) == "inactive"
    round_trip(clean, model)
    assert state(clean, service) == "active"


def test_inetd_socket_serves_50_concurrent_connections(clean: Container) -> None:
    clean.systemctl("start", "myecho-inetd.socket")
    outcome = probe(clean, "concurrent", PORTS["inetd"], "--count", 50)
    assert outcome["echoed"] == 50
    journal = clean.run(["journalctl", "--no-pager", "-o", "cat", "-u", "myecho-inetd@*"]).stdout
    assert journal.count("Deactivated successfully") >= 50
    # CollectMode: no connection unit is left behind.
    wait_until(
        "the connection units to go",
        lambda: not clean.systemctl("list-units", "--all", "--plain", "--no-legend", "myecho-inetd@*").stdout.strip(),
        timeout=10,
    )


def test_restart_under_a_stream_of_connections_refuses_none(clean: Container) -> None:
    unit = "myecho@select.service"
    clean.systemctl("start", unit)
    pid = main_pid(clean, unit)
    stream = Background(clean, "stream", PORTS["select"], "--seconds", 4, "--clients", 4)
    stream.start()
    time.sleep(1.5)
    clean.systemctl("restart", unit)
    outcome = stream.outcome()
    print("restart under a stream:", {k: outcome[k] for k in ("echoed", "refused", "failed")})
    assert outcome["refused"] == 0 and outcome["failed"] == 0
    assert main_pid(clean, unit) != pid


def test_sigkill_makes_systemd_restart_it(clean: Container) -> None:
    unit = "myecho@fork.service"
    clean.systemctl("start", unit)
    pid = main_pid(clean, unit)
    clean.run(["kill", "-KILL", str(pid)])
    wait_until(
        "a restart after SIGKILL",
        lambda: state(clean, unit) == "active" and main_pid(clean, unit) not in (0, pid),
    )
    assert show(clean, unit, "NRestarts") == "1"
    round_trip(clean, "fork")


@pytest.mark.parametrize("model", PYTHON_MODELS)
def test_watchdog_restarts_a_hung_service(clean: Container, model: str) -> None:
    """SIGSTOP: the loop stops pinging, systemd kills and restarts it (WatchdogSec
    shortened to 2 s by a runtime drop-in, removed afterwards)."""
    unit = f"myecho@{model}.service"
    drop_in = f"/run/systemd/system/{unit}.d"
    clean.run(f"mkdir -p {drop_in} && printf '[Service]\\nWatchdogSec=2s\\n' > {drop_in}/watchdog.conf")
    clean.systemctl("daemon-reload")
    try:
        clean.systemctl("start", unit)
        pid = main_pid(clean, unit)
        clean.run(["kill", "-STOP", str(pid)])
        started = time.monotonic()
        wait_until(
            "the watchdog restart",
            lambda: state(clean, unit) == "active" and main_pid(clean, unit) not in (0, pid),
            timeout=20,
        )
        print(f"{model}: hung service replaced after {time.monotonic() - started:.1f}s")
        assert "Failed with result 'watchdog'" in clean.journal(unit, "-o", "cat")
        round_trip(clean, model)
    finally:
        clean.run(f"rm -rf {drop_in}")
        clean.systemctl("daemon-reload")


def test_a_notify_unit_starts_without_python_systemd(clean: Container) -> None:
    """What a pip install under the shipped units meets: neither python3-systemd nor sdnotify can be
    imported (shadowed on PYTHONPATH by a runtime drop-in, removed afterwards). The standard library
    takes systemd's socket and says READY=1: the start neither fails nor waits for a timeout."""
    unit = "myecho@select.service"
    drop_in = f"/run/systemd/system/{unit}.d"
    hide = "/usr/local/lib/myecho-test-hide"
    clean.run(
        f"mkdir -p {drop_in} {hide}/systemd {hide}/sdnotify && "
        f"for p in systemd sdnotify; do echo 'raise ImportError(\"hidden by the test\")' > {hide}/$p/__init__.py; "
        "done && "
        f"printf '[Service]\\nEnvironment=PYTHONPATH={hide}\\nTimeoutStartSec=20s\\n' > {drop_in}/hide.conf"
    )
    clean.systemctl("daemon-reload")
    try:
        hidden = clean.run(f"PYTHONPATH={hide} python3 -c 'import systemd.daemon'", check=False)
        assert hidden.returncode != 0 and "hidden by the test" in hidden.stderr
        clean.systemctl("start", "myecho@select.socket")
        round_trip(clean, "select")  # the first connection starts the service, which takes the socket
        assert state(clean, unit) == "active"
        pid = main_pid(clean, unit)
        assert f"PYTHONPATH={hide}" in clean.run(["cat", f"/proc/{pid}/environ"]).stdout.split("\0")
        assert "systemd/_daemon" not in clean.run(["cat", f"/proc/{pid}/maps"]).stdout  # python-systemd's C part
        status = show(clean, unit, "StatusText")
        assert status.startswith("serving on") or " open, " in status, status  # sd_notify got through
    finally:
        clean.run(f"rm -rf {drop_in} {hide}")
        clean.systemctl("daemon-reload")


def test_stopping_the_target_stops_every_unit(clean: Container) -> None:
    for model in MODELS:
        clean.systemctl("start", f"myecho@{model}.service")
    clean.systemctl("start", "myecho-inetd.socket")
    held = Background(clean, "hold", PORTS["fork"], "--seconds", 1.5)  # open during the stop
    held.start()
    time.sleep(0.5)
    started = time.monotonic()
    clean.systemctl("stop", "myecho.target")
    print(f"stop myecho.target with a connection open: {time.monotonic() - started:.1f}s")
    assert held.outcome()["ok"]  # the grace period let it finish
    # Synchronous: everything ordered After=myecho.target has stopped by now.
    running = clean.systemctl("list-units", "--plain", "--no-legend", "--state=active,deactivating", "myecho*")
    assert not running.stdout.strip(), running.stdout
    assert "myecho" not in clean.run(["ps", "-eo", "args"]).stdout


def test_autopkgtest_smoke(clean: Container) -> None:
    """debian/tests/smoke, as autopkgtest would run it."""
    script = clean.copy_in(REPO / "debian/tests/smoke", "/root/smoke")
    result = clean.run([script], check=False, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok:") == 7, result.stdout


def test_autopkgtest_bench(clean: Container) -> None:
    """debian/tests/bench: myecho-bench --installed --quick prints both tables from the installed units."""
    script = clean.copy_in(REPO / "debian/tests/bench", "/root/bench")
    result = clean.run([script], check=False, timeout=420)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Single connection" in result.stdout and "Multiple connections" in result.stdout
    assert "ok: myecho-bench --installed --quick measured" in result.stdout


def test_xinetd_serves_the_inetd_model(clean: Container) -> None:
    """Debian's xinetd with the shipped file, once enabled (disable = no)."""
    clean.apt_get("install", "--no-install-recommends", "xinetd")
    try:
        clean.run(r"sed -i 's/^\(\s*disable\s*=\s*\)yes/\1no/' /etc/xinetd.d/myecho")
        clean.systemctl("restart", "xinetd")
        wait_until("xinetd to listen on 11138", lambda: ":11138 " in clean.run(["ss", "-Htln"]).stdout, timeout=15)
        probe(clean, "tcp", PORTS["inetd-xinetd"])
        # Above xinetd's default rate (50 a second), which would turn it off.
        outcome = probe(clean, "concurrent", PORTS["inetd-xinetd"], "--count", 60)
        assert outcome["echoed"] == 60
    finally:
        clean.systemctl("stop", "xinetd", check=False)
        clean.run("sed -i 's/^\\(\\s*disable\\s*=\\s*\\)no/\\1yes/' /etc/xinetd.d/myecho")


# ----------------------------------------------- upgrade, then purge (last)


def test_upgrade_keeps_running_services_running(clean: Container, newer_debs: list[Path]) -> None:
    """A newer build over a running system: the running models go on (restarted
    on the new code, with no connection refused); a stopped one stays stopped."""
    before = {}
    for model in ("fork", "select", "zmq"):
        unit = f"myecho@{model}.service"
        clean.systemctl("start", unit)
        before[model] = main_pid(clean, unit)
    clean.systemctl("start", "myecho@c.socket")  # listening, service not started
    stop_file = "/root/stop-stream"
    stream = Background(
        clean, "stream", PORTS["select"], "--seconds", 100, "--stop-file", stop_file, "--clients", 2, "--pause", 0.02
    )
    stream.start()
    started = time.monotonic()
    clean.apt_install_deb(*newer_debs)
    print(f"upgrade: apt install {time.monotonic() - started:.1f}s")
    assert deb_version(clean) == deb_field(newer_debs[0], "Version")
    for model, pid in before.items():
        unit = f"myecho@{model}.service"
        wait_until(
            f"{unit} to run again",
            lambda u=unit, p=pid: state(clean, u) == "active" and main_pid(clean, u) not in (0, p),
        )
        round_trip(clean, model)
    assert state(clean, "myecho@c.service") == "inactive"
    assert state(clean, "myecho@c.socket") == "active"
    clean.run(["touch", stop_file])
    outcome = stream.outcome()
    print("upgrade under a stream:", {k: outcome[k] for k in ("echoed", "refused", "failed")})
    assert outcome["refused"] == 0 and outcome["failed"] == 0


def test_purge_leaves_nothing_behind(box: Container) -> None:
    """Running, enabled, then purged: no file, unit, user, process or state left."""
    box.systemctl("enable", "--now", "myecho@fork.socket", "myecho-inetd.socket")
    box.systemctl("enable", "myecho@select.service")
    box.systemctl("start", "myecho@select.service", "myecho@zmq.service")
    round_trip(box, "fork")
    assert box.run("ls /etc/systemd/system/sockets.target.wants/ | grep -c myecho").stdout.strip() == "2"
    files = box.run(["dpkg", "-L", "myecho", "myecho-bench"]).stdout.split()
    started = time.monotonic()
    box.apt_get("purge", "myecho", "myecho-bench")
    print(f"apt purge {time.monotonic() - started:.1f}s")
    box.systemctl("daemon-reload")
    left = [path for path in files if path.count("/") > 1 and "myecho" in path]
    present = box.run(["sh", "-c", 'for f; do [ -e "$f" ] && echo "$f"; done; true', "sh", *left]).stdout.split()
    assert not present
    box.run("rm -f /tmp/myecho_*.deb /tmp/myecho-bench_*.deb")  # the harness's copies of the packages
    found = box.run(
        "find / /run /tmp -xdev \\( -path /proc -o -path /sys \\) -prune -o -name '*myecho*' -print 2>/dev/null; true"
    ).stdout.split()
    assert not found, found
    assert not box.systemctl("list-units", "--all", "--plain", "--no-legend", "myecho*").stdout.strip()
    assert not box.systemctl("list-unit-files", "--plain", "--no-legend", "myecho*", check=False).stdout.strip()
    assert "myecho" not in box.run(["getent", "passwd"]).stdout
    assert "myecho" not in box.run(["ps", "-eo", "user,args"]).stdout
    assert not box.run("ls -A /var/lib/private 2>/dev/null; true").stdout.strip()
    assert not box.run(["ss", "-Htln"]).stdout.strip()
