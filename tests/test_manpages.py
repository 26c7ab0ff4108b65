"""The man pages built from the parsers (tools/cli-docs) document every command and option.

The pages are what the Debian package installs: argparse-manpage's rendering of each parser
plus the hand-written sections of man/. They are rendered here with man(1), as a reader sees
them, and compared with what each command's --help lists, command by command.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from clidocs import REPO, build, every_command

from myecho.core.settings import DEFAULT_PORTS, file_names

#: An option's entry in a rendered page: the tag of a .TP paragraph, at the page's indent.
ENTRY = re.compile(r"^ {7}(-{1,2}[a-z][-a-z]*)", re.M)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("cli-docs"))


def render(page: Path) -> str:
    """The page as man(1) prints it, on lines wide enough that no option is hyphenated."""
    env = {**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "1000"}
    text = subprocess.run(["man", "-l", str(page)], capture_output=True, check=True, text=True, env=env).stdout
    return text.replace("\u2010", "-").replace("\u2212", "-")


def sections(text: str) -> dict[str, str]:
    """Section heading (a line at the left margin) -> the section's text."""
    found: dict[str, str] = {}
    heading = ""
    for line in text.splitlines():
        if line and not line[0].isspace():
            heading = line
            found[heading] = ""
        elif heading:
            found[heading] += line + "\n"
    return found


@pytest.mark.parametrize("prog", ["myecho", "myecho-bench"])
def test_the_page_documents_every_command_and_option_of_help(built: Path, prog: str) -> None:
    page = sections(render(built / "man" / f"{prog}.1"))
    commands = every_command([prog])
    if prog == "myecho":
        assert len(commands) >= 20  # serve and its 7 models, pipeline and its 4 roles, pubsub...
    for argv, options, subs in commands:
        heading = "OPTIONS" if len(argv) == 1 else f"OPTIONS '{' '.join(argv)}'"
        assert heading in page, f"no section for {' '.join(argv)}: {list(page)}"
        documented = set(ENTRY.findall(page[heading]))
        assert options <= documented, f"{' '.join(argv)}: {sorted(options - documented)} not in the page"
        for sub in subs:
            assert f"       {' '.join(argv)} {sub}\n" in page[heading], f"{' '.join(argv)} {sub} not listed"


def test_the_page_names_every_setting_and_unit(built: Path) -> None:
    page = sections(render(built / "man" / "myecho.1"))
    settings = {f"MYECHO_{name.upper()}" for name in file_names()} | {
        f"MYECHO_{model.upper()}_PORT" for model in DEFAULT_PORTS
    }
    named = set(re.findall(r"MYECHO_[A-Z_]+", page["SETTINGS"]))
    assert settings <= named, sorted(settings - named)
    assert not named - settings, f"documented but unknown to check-config: {sorted(named - settings)}"
    units = {path.name for path in (REPO / "systemd").iterdir() if path.is_file()}
    assert units == {
        "myecho@.service",
        "myecho@.socket",
        "myecho-inetd.socket",
        "myecho-inetd@.service",
        "myecho-worker@.service",
        "myecho.target",
    }
    for unit in units:  # a template may be named by an instance: myecho@MODEL.service
        name, _, suffix = unit.partition("@")
        pattern = re.escape(unit) if not suffix else rf"{re.escape(name)}@\w*{re.escape(suffix)}"
        assert re.search(pattern, page["SYSTEMD"]), unit
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "FILES", "EXIT STATUS", "EXAMPLES", "SEE ALSO"):
        assert section in page


@pytest.mark.parametrize("prog", ["myecho", "myecho-bench"])
def test_man_renders_the_page_without_a_warning(built: Path, prog: str) -> None:
    """As lintian checks a page (its groff-message and bad-whatis-entry tags)."""
    env = {"PATH": os.environ["PATH"], "LC_ALL": "C.UTF-8", "MANROFFSEQ": "", "MANWIDTH": "120"}
    page = built / "man" / f"{prog}.1"
    result = subprocess.run(
        ["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(page)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    whatis = subprocess.run(["lexgrog", str(page)], capture_output=True, text=True, env=env)
    assert whatis.returncode == 0 and f'"{prog} - ' in whatis.stdout, whatis.stdout
