"""The package under an attacker's burst and an admin's mistakes, in a booted
Debian 12 with systemd as PID 1.

One container, the package installed once; the tests take turns on it in
file order and the last ones remove and purge it.  Each failure reproduced
here was seen on the package before these fixes: a burst of a few hundred
connections turned myecho-inetd.socket off for good; a typo in
/etc/default/myecho made restarts loop and `systemctl reload` return 0;
purge left myecho-worker@N links; xinetd went on serving 11138 after a
remove; a socket edit did nothing until the socket unit restarted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .container import Container
from .packaging import PORTS
from .test_package import PROBE, debs, main_pid, probe, round_trip, show, state, wait_until

__all__ = ["debs"]  # the packages fixture, shared with test_package.py

DEFAULT = "/etc/default/myecho"


@pytest.fixture(scope="module")
def box(rootfs: Path, debs: list[Path]) -> Iterator[Container]:
    with Container(rootfs) as booted:
        booted.apt_install_deb(*debs)
        booted.copy_in(Path(__file__).with_name("probe.py"), PROBE)
        yield booted


@pytest.fixture
def clean(box: Container) -> Iterator[Container]:
    """Every myecho unit stopped and the shipped settings file, before and after."""

    def reset() -> None:
        box.systemctl("stop", "myecho.target", "myecho-inetd.socket", check=False)  # gone after the purge
        box.systemctl("reset-failed", check=False)
        box.run(f"[ -f /root/default.saved ] && mv /root/default.saved {DEFAULT}; rm -rf /run/myecho; true")

    reset()
    box.run(f"cp {DEFAULT} /root/default.saved")
    yield box
    reset()


def test_inetd_socket_survives_a_burst_of_1000(clean: Container) -> None:
    """1,000 clients at the same moment: the socket stays active and serves
    the next client.  Those beyond MaxConnections=256 are closed by systemd."""
    clean.systemctl("start", "myecho-inetd.socket")
    started = time.monotonic()
    outcome = probe(clean, "--timeout", 30, "burst", PORTS["inetd"], "--count", 1000, timeout=300)
    print(f"burst of 1000 on myecho-inetd.socket in {time.monotonic() - started:.1f}s:", outcome)
    assert outcome["echoed"] > 0
    assert state(clean, "myecho-inetd.socket") == "active"
    journal = clean.journal("myecho-inetd.socket", "-o", "cat")
    assert "Trigger limit hit" not in journal, journal
    round_trip(clean, "inetd")  # and still serving
    again = probe(clean, "--timeout", 30, "burst", PORTS["inetd"], "--count", 1000, timeout=300)
    print("a second burst:", again)
    assert state(clean, "myecho-inetd.socket") == "active"
    round_trip(clean, "inetd")


def bad_settings(box: Container) -> None:
    """A typo in a name (line N) and a bad value (line N+1), as an admin's edit."""
    box.run(f"printf 'MYECHO_MAX_CHILDRN=10\\nMYECHO_MAX_CHILDREN=lots\\n' >> {DEFAULT}")


def test_a_typo_never_takes_a_running_service_down(clean: Container) -> None:
    unit, socket_unit = "myecho@fork.service", "myecho@fork.socket"
    clean.systemctl("start", unit)
    pid = main_pid(clean, unit)
    round_trip(clean, "fork")
    lines = len(clean.run(["cat", DEFAULT]).stdout.splitlines())
    bad_settings(clean)
    # check-config names both lines, exit 78.
    check = clean.run(["myecho", "check-config"], check=False)
    assert check.returncode == 78, check
    assert check.stderr.splitlines() == [
        f"{DEFAULT}:{lines + 1}: unknown setting MYECHO_MAX_CHILDRN",
        f"{DEFAULT}:{lines + 2}: bad value for MYECHO_MAX_CHILDREN: max-children 'lots' is not a whole number",
    ], check.stderr
    # reload: refused (non-zero), the model never signalled, nothing changed.
    reload = clean.systemctl("reload", unit, check=False)
    assert reload.returncode != 0, reload
    assert state(clean, unit) == "active" and main_pid(clean, unit) == pid
    journal = clean.journal(unit, "-o", "cat")
    assert f"{DEFAULT}:{lines + 2}: bad value for MYECHO_MAX_CHILDREN" in journal, journal
    assert "reloaded" not in journal
    round_trip(clean, "fork")
    # restart: the model comes back on the last clean settings, not looping.
    clean.systemctl("restart", unit)
    wait_until("the restarted model", lambda: state(clean, unit) == "active" and main_pid(clean, unit) != pid)
    assert state(clean, socket_unit) == "active"
    assert ":11139 " in clean.run(["ss", "-Htln"]).stdout
    round_trip(clean, "fork")
    assert show(clean, unit, "NRestarts") == "0"
    assert "last good copy" in clean.journal(unit, "-o", "cat")


def test_a_bad_first_start_is_not_retried(clean: Container) -> None:
    """No clean copy yet: the model exits 78 once and systemd leaves it there."""
    unit = "myecho@select.service"
    bad_settings(clean)
    assert clean.systemctl("start", unit, check=False).returncode != 0
    time.sleep(2)  # Restart=on-failure would have tried again by now (RestartSec=100ms)
    assert state(clean, unit) == "failed"
    assert show(clean, unit, "ExecMainStatus") == "78"
    assert show(clean, unit, "NRestarts") == "0"
    journal = clean.journal(unit, "-o", "cat")
    assert "unknown setting MYECHO_MAX_CHILDRN" in journal and "Traceback" not in journal
    # Fixed file, next start works.
    clean.run(f"cp /root/default.saved {DEFAULT}")
    clean.systemctl("reset-failed", unit)
    clean.systemctl("start", unit)
    round_trip(clean, "select")


def test_a_good_reload_still_applies(clean: Container) -> None:
    unit = "myecho@select.service"
    clean.systemctl("start", unit)
    pid = main_pid(clean, unit)
    clean.run(f"echo MYECHO_BUFFER_LIMIT=4096 >> {DEFAULT}")
    clean.systemctl("reload", unit)
    wait_until("the reload", lambda: "reloaded (buffer_limit)" in clean.journal(unit, "-o", "cat"))
    assert main_pid(clean, unit) == pid
    assert "MYECHO_BUFFER_LIMIT=4096" in clean.run(["cat", "/run/myecho/select.conf"]).stdout
    # The README's command shows the model's own entry, with its field.
    entry = clean.run(
        ["journalctl", "--no-pager", "-u", unit, "-o", "verbose", "MYECHO_MODEL=select", "-n", "1"]
    ).stdout
    assert "MYECHO_MODEL=select" in entry and "MESSAGE=reloaded (buffer_limit)" in entry, entry


def test_edit_the_socket_then_restart_it(clean: Container) -> None:
    """The README's way to move a model: `systemctl edit myecho@select.socket`
    (run here with an editor that writes the drop-in), then restart the socket."""
    unit, socket_unit = "myecho@select.service", "myecho@select.socket"
    drop_in = "/etc/systemd/system/myecho@select.socket.d"
    clean.run("printf '[Socket]\\nListenStream=\\nListenStream=127.0.0.1:12140\\n' > /root/listen.conf")
    clean.systemctl("start", unit)
    try:
        # systemctl edit wants a terminal: script(1) gives it one.
        editor = f"SYSTEMD_EDITOR='cp /root/listen.conf' systemctl edit {socket_unit}"
        edit = clean.run(["script", "-qec", editor, "/dev/null"], check=False)
        assert edit.returncode == 0, edit
        pid = main_pid(clean, unit)
        listening = clean.run(["ss", "-Htln"]).stdout  # the edit alone changes nothing yet
        assert ":11140 " in listening and ":12140 " not in listening, listening
        round_trip(clean, "select")
        clean.systemctl("restart", socket_unit)  # the socket, and with it the service
        listening = clean.run(["ss", "-Htln"]).stdout
        assert ":12140 " in listening and ":11140 " not in listening, listening
        probe(clean, "tcp", 12140)
        assert state(clean, unit) == "active" and main_pid(clean, unit) != pid
    finally:
        clean.run(f"rm -rf {drop_in}")
        clean.systemctl("daemon-reload")


def listens_on(box: Container, port: int) -> bool:
    return f":{port} " in box.run(["ss", "-Htln"]).stdout


def test_remove_and_purge_leave_nothing_serving_and_no_link(clean: Container) -> None:
    """xinetd enabled for myecho, a worker and a socket enabled; remove: 11138
    is not served any more (xinetd stays for other services); purge: no link."""
    clean.apt_get("install", "--no-install-recommends", "xinetd")
    clean.run(r"sed -i 's/^\(\s*disable\s*=\s*\)yes/\1no/' /etc/xinetd.d/myecho")
    clean.systemctl("restart", "xinetd")
    wait_until("xinetd on 11138", lambda: listens_on(clean, PORTS["inetd-xinetd"]), timeout=15)
    probe(clean, "tcp", PORTS["inetd-xinetd"])
    clean.systemctl("enable", "myecho-worker@1.service", "myecho@fork.socket")
    links = clean.run("find /etc/systemd/system -name '*myecho*'").stdout.split()
    assert any("multi-user.target.wants/myecho-worker@1.service" in link for link in links), links
    clean.apt_get("remove", "myecho")
    wait_until("xinetd to drop 11138", lambda: not listens_on(clean, PORTS["inetd-xinetd"]), timeout=15)
    assert state(clean, "xinetd") == "active"
    refused = clean.run(
        ["python3", "-c", "import socket; socket.create_connection(('127.0.0.1', 11138), 3)"], check=False
    )
    assert "ConnectionRefusedError" in refused.stderr, refused
    assert "Server /usr/libexec/myecho/myecho-inetd is not executable" in clean.journal("xinetd", "-o", "cat")
    clean.apt_get("purge", "myecho")
    clean.systemctl("daemon-reload")
    left = clean.run("find /etc/systemd/system /run/myecho /etc/xinetd.d -name '*myecho*' 2>/dev/null; true").stdout
    assert not left.strip(), left
    dangling = clean.run("find /etc/systemd/system -xtype l").stdout
    assert not dangling.strip(), dangling
