"""Self-test of the system-test harness: boot, run inside, isolate, stop clean."""

from __future__ import annotations

import concurrent.futures
import subprocess
from pathlib import Path

import pytest

from .container import Container, HarnessError, mounts_under

pytestmark = pytest.mark.system


def test_boot_run_and_stop_leaves_nothing(rootfs: Path) -> None:
    box = Container(rootfs)
    with box:
        assert box.is_system_running() in ("running", "degraded")
        assert box.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
        links = box.run(["ip", "-o", "link"]).stdout.splitlines()
        assert len(links) == 1 and ": lo:" in links[0], links
        box.run(["systemd-run", "--unit=probe", "-p", "Type=simple", "sleep", "30"])
        assert box.systemctl("is-active", "probe.service").stdout.strip() == "active"
        merged = box.merged
        cgroups = list(box._cgroups)
        assert mounts_under(merged)
    assert box.boot_seconds is not None and box.stop_seconds is not None
    mounted = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    assert not [m for m in mounted if m.startswith(str(box.dir))]
    assert not box.dir.exists()
    assert cgroups and not any(group.exists() for group in cgroups)


def test_helpers(container: Container, tmp_path: Path) -> None:
    src = tmp_path / "hello.txt"
    src.write_text("hello from the host\n")
    # /var/run -> /run is an absolute symlink: it must land in the container's /run.
    assert container.copy_in(src, "/var/run/") == "/var/run/hello.txt"
    assert container.run("cat /run/hello.txt").stdout == "hello from the host\n"
    assert not Path("/run/hello.txt").exists()
    container.run(["systemd-run", "--unit=talker", "sh", "-c", "echo marker-42"])
    container.run("for i in $(seq 50); do journalctl -u talker | grep -q marker-42 && exit 0; sleep 0.1; done; exit 1")
    assert "marker-42" in container.journal("talker", "-o", "cat")
    failed = container.run(["false"], check=False)
    assert failed.returncode == 1
    with pytest.raises(Exception, match="returned non-zero"):
        container.run(["sh", "-c", "echo oops >&2; exit 3"])
    assert container.run(["echo", "$HOME"]).stdout == "$HOME\n"
    assert container.run("echo $HOME $DEBIAN_FRONTEND").stdout == "/root\n"


def _probe_deb(where: Path) -> Path:
    """A tiny .deb whose Depends must be downloaded and whose postinst starts a unit."""
    root = where / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        "Package: myecho-harness-probe\nVersion: 1\nArchitecture: all\n"
        "Maintainer: myecho tests <tests@invalid>\nDepends: hello\n"
        "Description: probe for the system-test harness\n"
    )
    postinst = root / "DEBIAN/postinst"
    postinst.write_text("#!/bin/sh\nset -e\nsystemctl daemon-reload\nsystemctl start myecho-harness-probe.service\n")
    postinst.chmod(0o755)
    unit_dir = root / "lib/systemd/system"
    unit_dir.mkdir(parents=True)
    (unit_dir / "myecho-harness-probe.service").write_text(
        "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/usr/bin/hello\n"
    )
    deb = where / "myecho-harness-probe_1_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)],
        check=True,
        capture_output=True,
    )
    return deb


def test_apt_install_deb_pulls_depends_and_talks_to_systemd(container: Container, tmp_path: Path) -> None:
    container.apt_install_deb(_probe_deb(tmp_path))
    assert container.run(["hello"]).stdout == "Hello, world!\n"
    unit = "myecho-harness-probe.service"
    assert container.systemctl("is-active", unit).stdout.strip() == "active"
    assert "Hello, world!" in container.journal(unit, "-o", "cat")
    container.apt_get("purge", "myecho-harness-probe")
    assert container.run(["dpkg", "-s", "myecho-harness-probe"], check=False).returncode
    links = container.run(["ip", "-o", "link"]).stdout.splitlines()
    assert len(links) == 1, links


def test_two_containers_in_parallel(rootfs: Path) -> None:
    boxes = [Container(rootfs), Container(rootfs)]
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda box: box.start(), boxes))
        names = [box.run(["hostname"]).stdout.strip() for box in boxes]
        assert names == [box.name for box in boxes]
        boxes[0].run("touch /etc/only-in-first")
        assert boxes[1].run("test -e /etc/only-in-first", check=False).returncode == 1
        assert not (rootfs / "etc/only-in-first").exists()
        pid1s = {box.pid1 for box in boxes}
        assert len(pid1s) == 2
    finally:
        for box in boxes:
            box.stop()


def test_boot_failure_is_reported_with_console(tmp_path: Path) -> None:
    not_an_os = tmp_path / "empty-rootfs"
    not_an_os.mkdir()
    box = Container(not_an_os, boot_timeout=20)
    with pytest.raises(HarnessError, match="exited") as raised:
        box.start()
    assert "console:" in str(raised.value)
    assert not box.dir.exists()
