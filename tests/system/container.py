"""Boot a throwaway Debian 12 with systemd as PID 1, for pytest system tests.

Why: the package ships systemd units that only a real systemd can check, and
CI machines do not run systemd as PID 1.  ``systemd-nspawn --boot`` on an
overlay of a cached rootfs gives a freshly booted bookworm in a second or two,
cheap enough for one per test.  Each step below says why it is needed
(what fails without it, on a host whose PID 1 is not systemd).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Self

log = logging.getLogger("myecho.tests.system")

SUITE = "bookworm"
VARIANT = "important"  # what debootstrap installs: systemd, apt, iproute2; no python3
INCLUDE = ("dbus",)
CACHE_DIR = Path(os.environ.get("MYECHO_TEST_CACHE", "/var/cache/myecho-tests"))
RUN_DIR = Path(os.environ.get("MYECHO_TEST_RUNDIR", "/var/tmp/myecho-containers"))
TOOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Host command -> Debian package that provides it.
HOST_TOOLS = {
    "systemd-nspawn": "systemd-container",
    "mmdebstrap": "mmdebstrap",
    "nsenter": "util-linux",
    "mount": "mount",
    "umount": "mount",
}
# The whole environment of commands run inside (env -i): nothing leaks from the host.
CONTAINER_ENV = {"PATH": TOOL_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
BOOTED_STATES = ("running", "degraded")


class HarnessError(RuntimeError):
    """The harness itself failed (host setup, build, boot, cleanup), not the test."""


class CommandFailed(subprocess.CalledProcessError):
    """CalledProcessError whose message shows the output, so failures explain."""

    def __str__(self) -> str:
        text = super().__str__()
        for label, data in (("stdout", self.stdout), ("stderr", self.stderr)):
            if data:
                text += f"\n--- {label} ---\n{_tail(str(data))}"
        return text


def _tail(text: str, limit: int = 4000) -> str:
    """The end of a long output: the reason for a failure is usually there."""
    return text if len(text) <= limit else "[...]\n" + text[-limit:]


def _run_bounded(
    cmd: Sequence[str],
    *,
    timeout: float,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run cmd in its own process group so a timeout kills its children too."""
    with subprocess.Popen(
        list(cmd),
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env=dict(env) if env is not None else {"PATH": TOOL_PATH, "LANG": "C.UTF-8"},
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            out, err = "", ""
            with contextlib.suppress(subprocess.TimeoutExpired):
                out, err = proc.communicate(timeout=5)
            raise subprocess.TimeoutExpired(list(cmd), timeout, out, err) from None
        return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


def _checked(
    result: subprocess.CompletedProcess[str],
) -> subprocess.CompletedProcess[str]:
    """Raise CommandFailed (with the output) if result failed."""
    if result.returncode != 0:
        raise CommandFailed(result.returncode, result.args, result.stdout, result.stderr)
    return result


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# ---------------------------------------------------------------- host checks


def host_problem() -> str | None:
    """Why this host cannot boot test containers, or None (tests fail, never skip)."""
    if os.geteuid() != 0:
        return "system tests need root (overlay mounts, systemd-nspawn, nsenter)"
    if not _has_overlayfs():
        return "system tests need overlayfs: 'overlay' is not in /proc/filesystems (modprobe overlay?)"
    if not _cgroup_bases():
        return "system tests need a cgroup filesystem under /sys/fs/cgroup"
    return None


def _has_overlayfs() -> bool:
    def listed() -> bool:
        return any(
            line.split()[-1] == "overlay" for line in Path("/proc/filesystems").read_text().splitlines() if line.strip()
        )

    if listed():
        return True
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        _run_bounded(["modprobe", "overlay"], timeout=30)
    return listed()


def ensure_host_tools(cache_dir: Path = CACHE_DIR, timeout: float = 900.0) -> None:
    """apt-get install the host tools the harness runs, if missing (CI starts fresh)."""
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if not shutil.which(tool, path=TOOL_PATH)})
    if not missing:
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / "host-tools.lock", timeout):
        missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if not shutil.which(tool, path=TOOL_PATH)})
        if not missing:
            return
        log.info("installing host packages %s", " ".join(missing))
        env = {
            "PATH": TOOL_PATH,
            "LANG": "C.UTF-8",
            "DEBIAN_FRONTEND": "noninteractive",
        }
        install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
        result = _run_bounded(install, timeout=timeout, env=env)
        if result.returncode != 0:  # a fresh machine may have no package lists yet
            _run_bounded(["apt-get", "update"], timeout=timeout, env=env)
            result = _run_bounded(install, timeout=timeout, env=env)
        if result.returncode != 0:
            raise HarnessError(f"could not apt-get install host packages {missing}:\n" + _tail(result.stderr))


@contextlib.contextmanager
def _locked(path: Path, timeout: float) -> Iterator[None]:
    """An exclusive flock, so two pytest processes do not build or install at once."""
    with open(path, "a") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise HarnessError(f"waited {timeout:.0f}s for the lock {path}") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------- apt sources


def host_apt_sources(etc_apt: Path = Path("/etc/apt"), suite: str = SUITE) -> list[str]:
    """The host's own mirrors for suite, as one-line 'deb URI SUITE COMPONENTS' entries.

    Why: CI and developers reach Debian through whatever mirror their machine
    is set up with; a hard-coded host would break somewhere.
    """
    entries: list[tuple[str, str, tuple[str, ...]]] = []
    for path in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        entries += _deb822_entries(path.read_text())
    one_line = [
        etc_apt / "sources.list",
        *sorted((etc_apt / "sources.list.d").glob("*.list")),
    ]
    for path in one_line:
        if path.is_file():
            entries += _one_line_entries(path.read_text())
    wanted = (suite, f"{suite}-updates", f"{suite}-security")
    lines: list[str] = []
    for uri, entry_suite, components in entries:
        line = f"deb {uri} {entry_suite} {' '.join(components)}"
        if entry_suite in wanted and components and line not in lines:
            lines.append(line)
    if not any(line.split()[2] == suite for line in lines):
        raise HarnessError(f"no 'deb' source for {suite} in {etc_apt}/sources.list(.d)")
    return lines


def _deb822_entries(text: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """Parse deb822 .sources stanzas (Types/URIs/Suites/Components/Enabled)."""
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key = ""
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, ""
        elif line[0] in " \t" and key:
            current[key] += " " + line.strip()
        elif ":" in line:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            current[key] = value.strip()
    entries = []
    for stanza in stanzas:
        if "deb" not in stanza.get("types", "").split():
            continue
        if stanza.get("enabled", "yes").lower() == "no":
            continue
        components = tuple(stanza.get("components", "").split())
        for uri in stanza.get("uris", "").split():
            for suite in stanza.get("suites", "").split():
                entries.append((uri, suite, components))
    return entries


def _one_line_entries(text: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """Parse classic sources.list lines; [options] are dropped (host-side paths)."""
    entries = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        rest = line[4:].strip()
        if rest.startswith("["):
            rest = rest.partition("]")[2]
        fields = rest.split()
        if len(fields) >= 3:
            entries.append((fields[0], fields[1], tuple(fields[2:])))
    return entries


# -------------------------------------------------------------------- rootfs


def rootfs_recipe(suite: str = SUITE) -> dict[str, object]:
    """What the cached rootfs is built from; a change invalidates the cache."""
    return {
        "suite": suite,
        "variant": VARIANT,
        "include": list(INCLUDE),
        "sources": host_apt_sources(suite=suite),
        "skip": ["cleanup/apt/lists"],
    }


def ensure_rootfs(cache_dir: Path = CACHE_DIR, timeout: float = 1500.0) -> Path:
    """The cached bookworm rootfs, built with mmdebstrap on first use.

    Why cached: a build takes about a minute, an overlay on it is free.  A
    lock file keeps two pytest processes from building at once; the stamp is
    written only after a complete build, so an interrupted one is redone.
    The apt lists are kept so `apt-get install ./x.deb` works without update.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    rootfs = cache_dir / f"rootfs-{SUITE}"
    stamp = cache_dir / f"rootfs-{SUITE}.stamp"
    with _locked(cache_dir / f"rootfs-{SUITE}.lock", timeout):
        ensure_host_tools(cache_dir, timeout)
        recipe = rootfs_recipe()
        if rootfs.is_dir() and _read_json(stamp) == recipe:
            return rootfs
        stamp.unlink(missing_ok=True)
        building = cache_dir / f"rootfs-{SUITE}.building"
        remove_tree(building)
        sources = recipe["sources"]
        assert isinstance(sources, list)
        cmd = [
            "mmdebstrap",
            f"--variant={VARIANT}",
            f"--include={','.join(INCLUDE)}",
            "--skip=cleanup/apt/lists",
            SUITE,
            str(building),
            *sources,
        ]
        log.info("building %s: %s", rootfs, " ".join(cmd))
        started = time.monotonic()
        try:
            result = _run_bounded(cmd, timeout=timeout)
        except subprocess.TimeoutExpired:
            remove_tree(building)
            raise HarnessError(f"mmdebstrap did not finish in {timeout:.0f}s") from None
        if result.returncode != 0:
            remove_tree(building)
            raise HarnessError(f"mmdebstrap failed ({result.returncode}):\n{_tail(result.stderr)}")
        remove_tree(rootfs)
        building.rename(rootfs)
        _write_json(stamp, recipe)
        log.info("built %s in %.1fs", rootfs, time.monotonic() - started)
        return rootfs


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: object) -> None:
    """Write atomically and durably: the stamp must never claim a half-built rootfs."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.rename(path)


# --------------------------------------------------------- mounts and trees


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path, deepest first, from /proc/self/mountinfo."""
    top = os.path.realpath(path)
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = _unescape_mount(line.split()[4])
        if point == top or point.startswith(top.rstrip("/") + "/"):
            found.append(point)
    return sorted(found, key=len, reverse=True)


def _unescape_mount(field: str) -> str:
    """Undo the kernel's octal escapes (\\040 for a space) in mount tables."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def unmount_all(path: Path, timeout: float = 30.0) -> None:
    """Unmount everything at or below path; lazily if something still holds it busy."""
    deadline = time.monotonic() + timeout
    while points := mounts_under(path):
        lazy = time.monotonic() > deadline - 5
        for point in points:
            _run_bounded(["umount", *(["-l"] if lazy else []), point], timeout=30)
        if mounts_under(path) and time.monotonic() > deadline:
            raise HarnessError(f"could not unmount {mounts_under(path)}")
        if mounts_under(path):
            time.sleep(0.2)


def remove_tree(path: Path) -> None:
    """rm -rf that unmounts first and never descends into a mount (a bind of /dev)."""
    if not path.exists() and not path.is_symlink():
        return
    unmount_all(path)
    if mounts_under(path):
        raise HarnessError(f"refusing to delete {path}: still mounted")
    shutil.rmtree(path)


# ------------------------------------------------------------------- cgroups


def _cgroup_bases() -> list[Path]:
    """Where nspawn will create payload/ and supervisor/: the caller's cgroup in each
    hierarchy it uses (cgroup2, and on a hybrid host also name=systemd)."""
    root = Path("/sys/fs/cgroup")
    mine: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        mine[controllers] = path.lstrip("/")
    if (root / "cgroup.controllers").exists():
        return [root / mine.get("", "")]
    bases = []
    if (root / "unified" / "cgroup.procs").exists():
        bases.append(root / "unified" / mine.get("", ""))
    if (root / "systemd" / "cgroup.procs").exists():
        bases.append(root / "systemd" / mine.get("name=systemd", ""))
    return bases


def _cgroup_pids(group: Path) -> list[int]:
    pids = []
    for dirpath, _, files in os.walk(group):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError):
                pids += [int(p) for p in Path(dirpath, "cgroup.procs").read_text().split()]
    return pids


def kill_cgroups(groups: Sequence[Path], timeout: float = 10.0) -> None:
    """SIGKILL every process left in groups (all of them belong to one container)."""
    deadline = time.monotonic() + timeout
    while pids := [p for g in groups if g.exists() for p in _cgroup_pids(g)]:
        if time.monotonic() > deadline:
            raise HarnessError(f"processes {pids} survive SIGKILL in {list(map(str, groups))}")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def remove_cgroups(groups: Sequence[Path], timeout: float = 10.0) -> None:
    """rmdir the container's cgroup trees bottom-up (cgroupfs only allows rmdir)."""
    deadline = time.monotonic() + timeout
    for group in groups:
        while group.exists():
            try:
                for dirpath, _, _ in os.walk(group, topdown=False):
                    os.rmdir(dirpath)
            except FileNotFoundError:
                continue
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


# ----------------------------------------------------------------- processes


def _proc_status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def _descendants(pid: int) -> list[int]:
    """All descendants of pid (from /proc: nspawn forks twice before the payload)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = _proc_status(int(entry)).get("PPid")
            if ppid:
                children.setdefault(int(ppid), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _process_identity(pid: int) -> str | None:
    """pid plus its start time, or None if it is gone or a zombie: a reused
    pid or a dead owner awaiting its reaper must not count as alive."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    if fields[0] in ("Z", "X"):
        return None
    return f"{pid}:{fields[19]}"


def _ns_pids(pid: int) -> list[int]:
    return [int(p) for p in _proc_status(pid).get("NSpid", "").split()]


# ----------------------------------------------------------------- container

_live: set[Container] = set()
_live_lock = threading.Lock()
_names = itertools.count(1)


def _stop_all_at_exit() -> None:
    """Last resort if a container outlives its test: never leak mounts or processes."""
    with _live_lock:
        left = list(_live)
    for container in left:
        with contextlib.suppress(Exception):
            container.stop()


atexit.register(_stop_all_at_exit)


class Container:
    """A booted throwaway bookworm: overlay on the cached rootfs, nspawn --boot.

    Use as a context manager; stop() always unmounts and removes everything.
    """

    def __init__(
        self,
        rootfs: Path | None = None,
        *,
        name: str | None = None,
        boot_timeout: float = 60.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self.rootfs = rootfs
        self.name = name or f"myecho-{os.getpid()}-{next(_names)}-{secrets.token_hex(2)}"
        self.boot_timeout = boot_timeout
        self.stop_timeout = stop_timeout
        self.dir = RUN_DIR / self.name
        self.boot_seconds: float | None = None
        self.stop_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid1: int | None = None
        self._cgroups: list[Path] = []
        self._made_dir = False  # never delete a dir this instance did not create

    # -- lifecycle

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def merged(self) -> Path:
        """The overlay mount point: the container's / as seen from the host."""
        return self.dir / "merged"

    @property
    def pid1(self) -> int:
        """Host PID of the container's systemd."""
        if self._pid1 is None:
            raise HarnessError(f"container {self.name} is not running")
        return self._pid1

    @property
    def running(self) -> bool:
        """Booted and not stopped (nspawn alive)."""
        return self._proc is not None and self._proc.poll() is None and self._pid1 is not None

    def console_output(self) -> str:
        """What the container printed on its console (boot messages, nspawn errors)."""
        try:
            return (self.dir / "console.log").read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> Self:
        """Mount the overlay, boot, and wait until systemd says running/degraded."""
        if self._proc is not None:
            raise HarnessError(f"container {self.name} already started")
        if self.rootfs is None:
            self.rootfs = ensure_rootfs()
        else:
            ensure_host_tools()
        with _live_lock:
            _live.add(self)
        started = time.monotonic()
        try:
            self._mount()
            self._launch()
            self._wait_booted(started + self.boot_timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise
        self.boot_seconds = time.monotonic() - started
        log.info("booted %s in %.2fs", self.name, self.boot_seconds)
        return self

    def _mount(self) -> None:
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        self.dir.mkdir()
        self._made_dir = True
        for sub in ("upper", "work", "merged"):
            (self.dir / sub).mkdir()
        self._write_owner()
        assert self.rootfs is not None
        options = f"lowerdir={self.rootfs},upperdir={self.dir / 'upper'},workdir={self.dir / 'work'}"
        _checked(
            _run_bounded(
                ["mount", "-t", "overlay", "overlay", "-o", options, str(self.merged)],
                timeout=30,
            )
        )
        # mmdebstrap copied the host's /etc/hostname, and systemd would set it at
        # boot: name each container after itself instead (in its upper layer).
        if (self.merged / "etc").is_dir():
            (self.merged / "etc/hostname").write_text(self.name + "\n")
            with open(self.merged / "etc/hosts", "a") as hosts:
                hosts.write(f"127.0.1.1\t{self.name}\n")

    def _write_owner(self) -> None:
        """Record who owns this container and its cgroups, for reap_stale()."""
        owner = {
            "owner": _process_identity(os.getpid()),
            "cgroups": [str(g) for g in self._cgroups],
        }
        _write_json(self.dir / "owner.json", owner)

    def _launch(self) -> None:
        # Without a host systemd, nspawn puts payload/ and supervisor/ under the
        # caller's cgroup: give the launcher a cgroup of its own, or two containers
        # would share one.  A wrapper shell moves itself, then execs nspawn, so
        # the pytest process never moves.
        self._cgroups = [base / self.name for base in _cgroup_bases()]
        for group in self._cgroups:
            group.mkdir()
        self._write_owner()
        wrapper = (
            "for g in $MYECHO_CGROUPS; do "
            'echo $$ > "$g/cgroup.procs" || exit 125; done; '
            'unset MYECHO_CGROUPS; exec "$@"'
        )
        nspawn = [
            "systemd-nspawn",
            "--boot",
            "--register=no",  # there is no machined to register with
            "--keep-unit",  # else: "Failed to open system bus" (no host systemd)
            "--private-network",
            "--resolv-conf=copy-host",
            "--console=read-only",
            "-D",
            str(self.merged),
            "-M",
            self.name,
        ]
        env = {
            "PATH": TOOL_PATH,
            "LANG": "C.UTF-8",
            # A pure cgroup2 tree inside, like a real bookworm host.
            "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
            "MYECHO_CGROUPS": " ".join(str(g) for g in self._cgroups),
        }
        with open(self.dir / "console.log", "wb") as console:
            self._proc = subprocess.Popen(
                ["sh", "-c", wrapper, "sh", *nspawn],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=env,
                # setsid: no controlling terminal, no Ctrl-C straight to nspawn.
                start_new_session=True,
            )

    def _find_pid1(self) -> int | None:
        """The child of nspawn that is PID 1 one PID namespace down."""
        assert self._proc is not None
        depth = len(_ns_pids(self._proc.pid)) + 1
        for pid in _descendants(self._proc.pid):
            ns_pids = _ns_pids(pid)
            if len(ns_pids) == depth and ns_pids[-1] == 1:
                return pid
        return None

    def _wait_booted(self, deadline: float) -> None:
        assert self._proc is not None
        state = "not started"
        while True:
            if self._proc.poll() is not None:
                raise HarnessError(
                    f"systemd-nspawn exited with {self._proc.returncode} while booting "
                    f"{self.name}; console:\n{_tail(self.console_output())}"
                )
            if self._pid1 is None:
                self._pid1 = self._find_pid1()
            if self._pid1 is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    result = self._nsenter(["systemctl", "is-system-running"], True, 10, None, None)
                    lines = (result.stdout.strip() or result.stderr.strip()).splitlines()
                    state = lines[-1] if lines else "?"
                if state in BOOTED_STATES:
                    return
                if state == "maintenance":
                    break
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        raise HarnessError(
            f"container {self.name} did not boot within {self.boot_timeout:.0f}s "
            f"(systemctl is-system-running: {state!r}); console:\n" + _tail(self.console_output())
        )

    def stop(self) -> None:
        """Halt (SIGTERM to nspawn), SIGKILL if it hangs, unmount, remove everything."""
        started = time.monotonic()
        errors: list[str] = []
        proc, self._proc, self._pid1 = self._proc, None, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # nspawn shuts the container down cleanly
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                errors.append(f"no clean halt within {self.stop_timeout:.0f}s; killed")
                with contextlib.suppress(HarnessError):
                    kill_cgroups(self._cgroups)
                _signal_group(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        steps: list[Callable[[], None]] = [
            lambda: kill_cgroups(self._cgroups),
            lambda: remove_cgroups(self._cgroups),
            lambda: remove_tree(self.dir) if self._made_dir else None,
            # nspawn leaves this behind when /run is not a tmpfs (no host systemd).
            lambda: remove_tree(Path("/run/systemd/nspawn/propagate") / self.name),
        ]
        for step in steps:
            try:
                step()
            except (OSError, HarnessError, subprocess.SubprocessError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
        with _live_lock:
            _live.discard(self)
        if proc is not None:
            self.stop_seconds = time.monotonic() - started
            log.info("stopped %s in %.2fs", self.name, self.stop_seconds)
        if errors:
            raise HarnessError(f"stopping {self.name}: " + "; ".join(errors))

    # -- running things inside

    def _nsenter(
        self,
        cmd: str | Sequence[str],
        network: bool,
        timeout: float,
        input: str | None,
        env: Mapping[str, str] | None,
    ) -> subprocess.CompletedProcess[str]:
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        inner_env = {**CONTAINER_ENV, **(env or {})}
        full = [
            "nsenter",
            "-t",
            str(self.pid1),
            "-m",
            "-p",
            "-u",
            "-i",
            *(["-n"] if network else []),
            "-C",
            "-r",
            "-w",
            "env",
            "-i",
            *(f"{k}={v}" for k, v in inner_env.items()),
            *argv,
        ]
        result = _run_bounded(full, timeout=timeout, input=input)
        return subprocess.CompletedProcess(argv, result.returncode, result.stdout, result.stderr)

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        check: bool = True,
        timeout: float = 120.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run cmd (argv, or a string for sh -c) in all the container's namespaces.

        Including its network: 127.0.0.1 is the container's.  The command gets a
        clean environment (CONTAINER_ENV + env).  It is not part of any unit:
        anything that must outlive the call belongs in `systemd-run`.
        """
        result = self._nsenter(cmd, True, timeout, input, env)
        return _checked(result) if check else result

    def run_with_host_network(
        self,
        cmd: str | Sequence[str],
        *,
        check: bool = True,
        timeout: float = 600.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Like run(), but on the host's network, so apt can reach the mirror
        (the container itself has only lo); maintainer scripts still talk to
        the container's systemd."""
        result = self._nsenter(cmd, False, timeout, input, env)
        return _checked(result) if check else result

    def host_path(self, container_path: str) -> Path:
        """Where container_path is, seen from the host via /proc/PID1/root.

        Symlinks are resolved against the container's root: followed naively,
        an absolute one (bookworm's /var/run -> /run) would lead to the host's.
        """
        if not container_path.startswith("/"):
            raise ValueError(f"container path must be absolute: {container_path!r}")
        root = Path(f"/proc/{self.pid1}/root")
        todo = [p for p in PurePosixPath(container_path).parts if p != "/"]
        done: list[str] = []
        hops = 0
        while todo:
            part = todo.pop(0)
            if part == "..":
                if done:
                    done.pop()
                continue
            if part == ".":
                continue
            here = root.joinpath(*done, part)
            if here.is_symlink():
                hops += 1
                if hops > 40:
                    raise HarnessError(f"too many symlinks in {container_path}")
                target = os.readlink(here)
                if target.startswith("/"):
                    done = []
                todo = [p for p in PurePosixPath(target).parts if p != "/"] + todo
                continue
            done.append(part)
        return root.joinpath(*done)

    def copy_in(self, host_path: str | os.PathLike[str], container_path: str) -> str:
        """Copy a file or directory in (like cp -r: into container_path if it is a
        directory); returns the path inside."""
        src = Path(host_path)
        dest_path = container_path
        dest = self.host_path(dest_path)
        if dest.is_dir() and src.is_file():
            dest_path = str(PurePosixPath(container_path) / src.name)
            dest = dest / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dest)
        return dest_path

    def apt_get(self, *args: str, check: bool = True, timeout: float = 900.0) -> subprocess.CompletedProcess[str]:
        """apt-get -y ARGS inside, noninteractive, downloading over the host network."""
        return self.run_with_host_network(
            ["apt-get", "-y", "-o", "Dpkg::Use-Pty=0", *args],
            check=check,
            timeout=timeout,
            env={"DEBIAN_FRONTEND": "noninteractive"},
        )

    def apt_install_deb(
        self, *debs: str | os.PathLike[str], timeout: float = 900.0
    ) -> subprocess.CompletedProcess[str]:
        """Copy .debs in and `apt-get install -y ./x.deb ./y.deb` them, pulling their Depends.

        If that fails (the cached apt lists may have gone stale against the
        mirror), apt-get update and try once more.
        """
        inside = []
        for deb in debs:
            src = Path(deb)
            if not src.is_file():
                raise FileNotFoundError(src)
            inside.append(self.copy_in(src, f"/tmp/{src.name}"))
            self.host_path(inside[-1]).chmod(0o644)  # readable by apt's _apt sandbox user
        result = self.apt_get("install", *inside, check=False, timeout=timeout)
        if result.returncode != 0:
            log.info("apt-get install %s failed; retrying after apt-get update", " ".join(map(str, debs)))
            self.apt_get("update", timeout=timeout)
            result = self.apt_get("install", *inside, check=False, timeout=timeout)
        return _checked(result)

    def systemctl(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """systemctl ARGS inside (talks to the container's own systemd)."""
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def journal(self, unit: str, *args: str) -> str:
        """journalctl -u UNIT inside, as text; extra args (-o cat, ...) go along."""
        return self.run(["journalctl", "--no-pager", "-u", unit, *args]).stdout

    def is_system_running(self) -> str:
        """systemctl is-system-running: 'running', 'degraded', ..."""
        return self.run(["systemctl", "is-system-running"], check=False).stdout.strip()


def reap_stale(run_dir: Path = RUN_DIR) -> list[str]:
    """Clean up containers whose pytest died (SIGKILL, CI timeout) before stop() ran.

    Each container dir records its owner (pid and start time) and its cgroups;
    everything in those cgroups is the container's, so it can be killed safely.
    """
    reaped: list[str] = []
    if not run_dir.is_dir():
        return reaped
    for path in sorted(run_dir.iterdir()):
        owner = _read_json(path / "owner.json")
        if owner is None and time.time() - path.stat().st_mtime < 120:
            continue  # being set up right now by another process
        info = owner if isinstance(owner, dict) else {}
        identity = info.get("owner")
        if isinstance(identity, str):
            pid = int(identity.split(":")[0])
            if _process_identity(pid) == identity:
                continue  # its pytest is still running
        groups = [Path(g) for g in info.get("cgroups", []) if isinstance(g, str)]
        kill_cgroups(groups)
        remove_cgroups(groups)
        remove_tree(path)
        remove_tree(Path("/run/systemd/nspawn/propagate") / path.name)
        log.warning("reaped stale container %s", path.name)
        reaped.append(path.name)
    return reaped
