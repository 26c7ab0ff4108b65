"""The man pages and bash completion as the package installs them, in a booted Debian 12.

bash-completion is used for real: its loader finds /usr/share/bash-completion/completions/myecho
by the command's name, and the function ``complete -p`` names answers for the words typed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from .container import Container
from .packaging import package_debs

#: Complete the last of the words given as arguments, as bash does on <TAB>; one candidate a line.
COMPLETE = r"""
. /usr/share/bash-completion/bash_completion
_completion_loader "$1"
spec=$(complete -p "$1") || exit 3
echo "spec: $spec"
func=${spec##*-F }; func=${func%% *}
COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1))
COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
"$func" "$1" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""


@pytest.fixture(scope="module")
def installed(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """A booted container with the packages ($MYECHO_DEB, else built now), bash-completion and man-db."""
    debs = package_debs(tmp_path_factory)
    with Container(rootfs) as booted:
        booted.apt_install_deb(*debs)
        booted.apt_get("install", "--no-install-recommends", "bash-completion", "man-db")
        yield booted


def complete(box: Container, *words: str) -> tuple[str, list[str]]:
    """What bash-completion loaded for words[0] (its complete -p line), and the candidates."""
    result = box.run(["bash", "-c", COMPLETE, "complete", *words], env={"HOME": "/root"})
    spec, *candidates = result.stdout.splitlines()
    return spec, [line for line in candidates if line]


def listed(box: Container, *argv: str) -> list[str]:
    """The sub-commands that ``argv --help`` lists (argparse: four spaces in, under the positional)."""
    text = box.run([*argv, "--help"]).stdout
    return re.findall(r"^    ([a-z][-a-z]*)(?: |$)", text, re.M)


def test_serve_tab_completes_the_models(installed: Container) -> None:
    spec, models = complete(installed, "myecho", "serve", "")
    assert spec == "spec: complete -F _myecho myecho"
    assert models == listed(installed, "myecho", "serve")
    assert {"inetd", "fork", "select", "asyncio", "zmq", "broker", "worker"} <= set(models)
    assert complete(installed, "myecho", "")[1] == listed(installed, "myecho")
    options = complete(installed, "myecho", "serve", "broker", "--curve-")[1]
    assert options == ["--curve-secret", "--curve-allow"]
    assert "--check-loadgen" in complete(installed, "myecho-bench", "--")[1]


def test_man_myecho_is_the_generated_page(installed: Container) -> None:
    """man finds the installed page; it renders without a warning and has a section per command."""
    env = {"LC_ALL": "C.UTF-8", "MANWIDTH": "1000"}
    assert installed.run(["man", "-w", "myecho"]).stdout.strip() == "/usr/share/man/man1/myecho.1.gz"
    checked = installed.run(["man", "--warnings", "myecho"], env=env)
    assert checked.stderr == "", checked.stderr
    page = checked.stdout.replace("\u2010", "-").replace("\u2212", "-")
    for command in listed(installed, "myecho"):
        assert f"OPTIONS 'myecho {command}'" in page, command
    for model in listed(installed, "myecho", "serve"):
        assert f"OPTIONS 'myecho serve {model}'" in page, model
    assert "myecho-worker@N.service" in page and "MYECHO_CURVE_ALLOW" in page
    bench = installed.run(["man", "--warnings", "myecho-bench"], env=env)
    assert bench.stderr == "" and "--check-loadgen" in bench.stdout.replace("\u2010", "-").replace("\u2212", "-")
