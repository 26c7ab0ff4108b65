"""The source units and the xinetd file, checked on the host (no container).

systemd 252's systemd-analyze works without systemd as PID 1: --offline
scoring and verify read the unit files themselves.  The same scores are
checked again on the installed units in a booted system (test_package.py).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from .packaging import (
    BROKER_PORTS,
    MAX_EXPOSURE,
    MAX_WORKER_EXPOSURE,
    MODELS,
    PORTS,
    REPO,
    SERVICES,
    SYSTEMD_DIR,
    WORKER,
    offline_exposure,
    unit_root,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unit_root(tmp_path_factory.mktemp("units"))


@pytest.mark.parametrize("unit", SERVICES)
def test_source_unit_exposure(root: Path, unit: str) -> None:
    score = offline_exposure(root, unit)
    print(f"{unit}: exposure {score} (offline, source)")
    assert score < MAX_EXPOSURE


def test_source_worker_exposure(root: Path) -> None:
    """A worker has the network (it connects out to the broker), not much else."""
    score = offline_exposure(root, WORKER)
    print(f"{WORKER}: exposure {score} (offline, source)")
    assert score <= MAX_WORKER_EXPOSURE


def _verify(tmp_path: Path, names: list[str]) -> str:
    """systemd-analyze verify on instances of the source units (symlinks named
    like the instance, so systemd reads the template and its drop-ins)."""
    work = tmp_path / "verify"
    work.mkdir()
    for path in SYSTEMD_DIR.iterdir():
        (work / path.name).symlink_to(path)
    for name in names:
        template = re.sub(r"@[^.]+\.", "@.", name)
        if not (work / name).exists():
            (work / name).symlink_to(SYSTEMD_DIR / template)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(work / n) for n in names)],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout + result.stderr


def test_source_units_verify(tmp_path: Path) -> None:
    """No unknown key, no bad setting: only the commands the package installs
    are missing on this host."""
    names = [
        *(f"myecho@{m}.service" for m in MODELS),
        *(f"myecho@{m}.socket" for m in MODELS),
        "myecho@broker.service",
        "myecho@broker.socket",
        "myecho-worker@1.service",
        "myecho-inetd.socket",
        "myecho-inetd@0.service",
        "myecho.target",
    ]
    output = _verify(tmp_path, names)
    complaints = [
        line
        for line in output.splitlines()
        if line.strip() and not re.search(r"Command /usr/bin/myecho(-c)? is not executable", line)
    ]
    assert not complaints, output


def test_socket_instance_needs_its_drop_in(tmp_path: Path) -> None:
    """A model without a listen.conf is refused, on purpose (systemd: "bad unit file setting")."""
    assert "bad unit file setting" in _verify(tmp_path, ["myecho@nosuch.socket"])


def test_socket_drop_ins_listen_on_loopback_ports() -> None:
    for model in MODELS:
        text = (SYSTEMD_DIR / f"myecho@{model}.socket.d" / "listen.conf").read_text()
        assert f"ListenStream=127.0.0.1:{PORTS[model]}\n" in text
    assert "ListenStream=127.0.0.1:11143\n" in (SYSTEMD_DIR / "myecho-inetd.socket").read_text()


def test_broker_socket_lists_frontend_then_backend() -> None:
    """One socket unit, so one FileDescriptorName=: the broker goes by position
    (the first is the frontend), and it must not be told other endpoints."""
    text = (SYSTEMD_DIR / "myecho@broker.socket.d" / "listen.conf").read_text()
    listens = re.findall(r"^ListenStream=(.*)$", text, re.MULTILINE)
    assert listens == [f"127.0.0.1:{port}" for port in BROKER_PORTS], listens
    assert not re.search(r"^FileDescriptorName=", text, re.MULTILINE)
    service = (SYSTEMD_DIR / "myecho@broker.service.d" / "zmq.conf").read_text()
    assert "SystemCallFilter=sched_setscheduler\n" in service
    assert not re.search(r"^[^#]*MYECHO_BROKER_(FRONTEND|BACKEND)", service, re.MULTILINE)


def test_worker_unit() -> None:
    text = (SYSTEMD_DIR / "myecho-worker@.service").read_text()
    settings = [line for line in text.splitlines() if line and not line.startswith("#")]
    for expected in (
        "Type=notify",
        "NotifyAccess=main",
        "EnvironmentFile=-/etc/default/myecho",
        "ExecStart=/usr/bin/myecho serve worker --config /run/myecho/worker-%i.conf",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=10s",
        "Restart=on-failure",
        "KillMode=mixed",
        "PartOf=myecho.target",
        "After=myecho.target",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=sched_setscheduler",
    ):
        assert expected in settings, expected
    # It connects out, so it keeps a network, but reaches this host only by default.
    assert not any(line.startswith("PrivateNetwork=") for line in settings)
    assert settings.index("IPAddressDeny=any") < settings.index("IPAddressAllow=localhost")
    default = (REPO / "debian" / "myecho.default").read_text()
    for name in ("MYECHO_WORKER_CONNECT=tcp://127.0.0.1:11145", "MYECHO_HEARTBEAT=", "MYECHO_LIVENESS="):
        assert f"\n#{name}" in default, name


def test_package_ships_every_unit_file() -> None:
    """systemd/ is the source of truth: debian/myecho.install must list all of it."""
    listed = {
        line.split()[0]
        for line in (REPO / "debian" / "myecho.install").read_text().splitlines()
        if line.startswith("systemd/")
    }
    shipped = {str(path.relative_to(REPO)) for path in SYSTEMD_DIR.iterdir()}
    assert listed == shipped


def _xinetd_settings() -> dict[str, str]:
    text = (REPO / "xinetd" / "myecho").read_text()
    body = text[text.index("{") + 1 : text.index("}")]
    settings = {}
    for line in body.splitlines():
        if "=" in line:
            key, _, value = line.partition("=")
            settings[key.strip()] = " ".join(value.split())
    return settings


def test_xinetd_file() -> None:
    settings = _xinetd_settings()
    assert settings["port"] == str(PORTS["inetd-xinetd"])
    assert settings["disable"] == "yes"
    assert settings["user"] == "nobody"
    assert settings["bind"] == "127.0.0.1"
    # The package's own program, not /usr/bin/python3: it goes with the package,
    # and xinetd then drops the service (see debian/myecho.postrm).
    assert settings["server"] == "/usr/libexec/myecho/myecho-inetd"
    assert "server_args" not in settings
    assert "xinetd/myecho-inetd usr/libexec/myecho/" in (REPO / "debian" / "myecho.install").read_text()
    rate, _seconds_off = (int(n) for n in settings["cps"].split())
    assert rate > 50, "xinetd's default (50 a second) would turn the service off in a burst"
    assert int(settings["instances"]) > 50


def _settings(unit: str) -> list[str]:
    text = (SYSTEMD_DIR / unit).read_text()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize(("unit", "copy"), [("myecho@.service", "%i"), ("myecho-worker@.service", "worker-%i")])
def test_settings_are_checked_before_start_and_reload(unit: str, copy: str) -> None:
    """check-config as root before start (its failure alone does not fail the
    start: the model then reads the last clean copy) and before the HUP of a
    reload (its failure fails the reload); bad settings are never retried."""
    bad_config = 78  # myecho.core.settings.EXIT_BAD_CONFIG (this env does not install myecho; test_cli checks it)
    check = f"/usr/bin/myecho check-config --save /run/myecho/{copy}.conf"
    settings = _settings(unit)
    assert f"ExecStartPre=-+{check} --or-last /etc/default/myecho" in settings
    reloads = [line for line in settings if line.startswith("ExecReload=")]
    assert reloads == [f"ExecReload=+{check} /etc/default/myecho", "ExecReload=/bin/kill -HUP $MAINPID"]
    starts = [line for line in settings if line.startswith("ExecStart=")]
    assert len(starts) == 1 and starts[0].endswith(f"--config /run/myecho/{copy}.conf")
    assert f"RestartPreventExitStatus={bad_config}" in settings


def test_sockets_set_their_trigger_limits_on_purpose() -> None:
    inetd = _settings("myecho-inetd.socket")
    assert "Accept=yes" in inetd and "TriggerLimitIntervalSec=0" in inetd
    assert "MaxConnections=256" in inetd
    comment = (SYSTEMD_DIR / "myecho-inetd.socket").read_text()
    assert "does NOT" in comment and "closes it" in comment  # the real behaviour above MaxConnections=
    template = _settings("myecho@.socket")
    assert "TriggerLimitIntervalSec=2s" in template and "TriggerLimitBurst=20" in template


def test_purge_removes_every_kind_of_link() -> None:
    postrm = (REPO / "debian" / "myecho.postrm").read_text()
    for pattern in ("myecho@*", "myecho-worker@*", "myecho-inetd.socket", "myecho-inetd@*", "myecho.target"):
        assert f"-name '{pattern}'" in postrm, pattern
