"""c/Makefile, the one recipe for the C programs that pip's build and
debian/rules both run: the caller's flags win, hardening flags fill in for
those not given, and `make install` puts each program where Debian expects it."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import myecho

C_DIR = Path(__file__).resolve().parent.parent / "c"
FLAGS = ("CC", "CFLAGS", "CPPFLAGS", "LDFLAGS")
HARDENING = ("-fstack-protector-strong", "-D_FORTIFY_SOURCE=2", "-pie", "-Wl,-z,relro,-z,now")


def _make(*args: str, **flags: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if name not in FLAGS and not name.startswith("MAKE")}
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(C_DIR), *args],
        env={**env, **flags},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def _compile_lines(output: str) -> list[list[str]]:
    return [shlex.split(line) for line in output.splitlines() if " -std=gnu11 " in line]


def test_hardening_flags_when_none_are_given(tmp_path: Path) -> None:
    lines = _compile_lines(_make("-n", f"O={tmp_path}").stdout)
    assert len(lines) == 4, lines  # myecho-c, myecho-load, epoll-echo, zmq-echo
    for words in lines:
        assert set(HARDENING) <= set(words), words


def test_the_callers_flags_replace_the_defaults(tmp_path: Path) -> None:
    given = {"CC": "gcc", "CFLAGS": "-O1 -DGIVEN_C", "CPPFLAGS": "-DGIVEN_CPP", "LDFLAGS": "-Wl,--as-needed"}
    lines = _compile_lines(_make("-n", f"O={tmp_path}", **given).stdout)
    assert len(lines) == 4, lines
    for words in lines:
        assert words[0] == "gcc"
        assert {"-O1", "-DGIVEN_C", "-DGIVEN_CPP", "-Wl,--as-needed"} <= set(words), words
        assert not set(HARDENING) & set(words), words


def test_install_puts_myecho_c_in_bin_and_the_rest_in_libexec(tmp_path: Path) -> None:
    _make("install", f"O={tmp_path / 'build'}", f"DESTDIR={tmp_path / 'root'}", "prefix=/usr")
    root = tmp_path / "root"
    installed = sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())
    assert installed == [
        "usr/bin/myecho-c",
        *(f"usr/libexec/myecho/{name}" for name in ("epoll-echo", "myecho-load", "zmq-echo")),
    ]
    for name in installed:
        assert (root / name).read_bytes()[:4] == b"\x7fELF", name
    version = subprocess.run([root / "usr/bin/myecho-c", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout == f"myecho-c {myecho.__version__}\n"
