"""What the commands' --help lists, and the man pages and completions built from the parsers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from support import command

REPO = Path(__file__).resolve().parent.parent


def build(out: Path) -> Path:
    """Run tools/cli-docs (as the package build does) into ``out``."""
    subprocess.run([sys.executable, str(REPO / "tools" / "cli-docs"), str(out)], check=True, timeout=120)
    return out


def help_of(argv: list[str]) -> tuple[set[str], list[str]]:
    """The options (but --help) and the sub-commands that ``argv --help`` lists."""
    text = subprocess.run([command(argv[0]), *argv[1:], "--help"], capture_output=True, check=True, text=True).stdout
    options = set(re.findall(r"^  (-{1,2}[a-z][-a-z]*)", text, re.M)) - {"-h", "--help"}
    options |= set(re.findall(r"^  -[a-z]\w*, (--[a-z][-a-z]*)", text, re.M)) - {"--help"}
    commands = re.findall(r"^    ([a-z][-a-z]*)(?: |$)", text, re.M)
    return options, commands


def every_command(argv: list[str]) -> list[tuple[list[str], set[str], list[str]]]:
    """argv and each of its sub-commands, recursively, with their options and sub-commands."""
    options, commands = help_of(argv)
    found = [(argv, options, commands)]
    for name in commands:
        found += every_command([*argv, name])
    return found
