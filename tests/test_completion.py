"""Bash completion, built from the parsers (tools/cli-docs), through bash-completion itself.

Each test runs a real bash: bash-completion's loader finds the completion file by the
command's name, as it does for /usr/share/bash-completion/completions/myecho once the
package is installed, and the function ``complete -p`` names fills COMPREPLY for the words
typed so far. The answers are compared with what each command's --help lists.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from clidocs import build, every_command

BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")
#: Complete the last of the words given as arguments, as bash does on <TAB>; one candidate a line.
COMPLETE = r"""
. /usr/share/bash-completion/bash_completion
_completion_loader "$1"
spec=$(complete -p "$1") || exit 3
func=${spec##*-F }; func=${func%% *}
COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1))
COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
"$func" "$1" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BASH_COMPLETION_USER_DIR holding the generated completions, where the loader looks first."""
    assert BASH_COMPLETION.is_file(), "bash-completion is not installed (Debian: bash-completion)"
    built = build(tmp_path_factory.mktemp("cli-docs"))
    user = built / "user"
    shutil.copytree(built / "bash-completion", user / "completions")
    return user


def complete(user_dir: Path, *words: str, cwd: Path | None = None) -> list[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(user_dir), "BASH_COMPLETION_USER_DIR": str(user_dir)}
    result = subprocess.run(
        ["bash", "-c", COMPLETE, "complete", *words], capture_output=True, text=True, env=env, cwd=cwd, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line]


def test_serve_tab_completes_the_models(user_dir: Path) -> None:
    models = next(subs for argv, _, subs in every_command(["myecho"]) if argv == ["myecho", "serve"])
    assert "asyncio" in models and "broker" in models
    assert complete(user_dir, "myecho", "serve", "") == models
    assert complete(user_dir, "myecho", "serve", "s") == ["select"]


@pytest.mark.parametrize("prog", ["myecho", "myecho-bench"])
def test_every_command_completes_its_sub_commands_and_options(user_dir: Path, prog: str) -> None:
    for argv, options, subs in every_command([prog]):
        if subs:
            assert complete(user_dir, *argv, "") == subs, argv
        offered = set(complete(user_dir, *argv, "-"))
        assert offered - {"-h", "--help"} == options, argv


def test_choices_and_file_names_are_completed(user_dir: Path, tmp_path: Path) -> None:
    assert complete(user_dir, "myecho", "serve", "asyncio", "--loop", "") == ["auto", "asyncio", "uvloop"]
    assert complete(user_dir, "myecho", "serve", "fork", "--log-level", "w") == ["warning"]
    (tmp_path / "myecho.conf").write_text("")
    (tmp_path / "keys").mkdir()
    assert complete(user_dir, "myecho", "serve", "fork", "--config", "my", cwd=tmp_path) == ["myecho.conf"]
    assert complete(user_dir, "myecho", "keygen", "", cwd=tmp_path) == ["keys"]
