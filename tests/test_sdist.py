"""The sdist is the release tarball: it holds what a packager needs, and the
wheel built from it is the wheel built from the tree.

Both are built from a copy of the files git knows rather than from the work
tree, whose build/ may hold modules that moved away since (setuptools ships
whatever build/lib holds), without build isolation: the test extras bring
build, setuptools and wheel.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Files of the tree the sdist leaves out on purpose: CI's entry point and git's own.
NOT_SHIPPED = {".ci/run"}
#: What a packager looks for first (the test below also wants every other file).
PACKAGER_NEEDS = [
    "README.md",
    "LICENSE",
    "pyproject.toml",
    "setup.cfg",
    "setup.py",
    "MANIFEST.in",
    "Makefile",
    "tox.ini",
    "bin/myecho",
    "tests/conftest.py",
    "tests/support.py",
    "tests/system/conftest.py",
    "benchmarks/results.schema.json",
    "debian/control",
    "debian/rules",
    "debian/changelog",
    "debian/copyright",
    "systemd/myecho@.service",
    "systemd/myecho@.socket",
    "xinetd/myecho",
    "curve/broker.conf",
]


def git_files() -> list[str]:
    """The files git knows in this checkout (tracked, or new and not ignored)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tree's file list is unknown")
    listing = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout
    return sorted(name for name in listing.decode().split("\0") if name and (ROOT / name).is_file())


def build(source: Path, kind: str, out: Path) -> Path:
    """``python -m build --KIND`` of ``source`` into ``out``: the one file it made."""
    out.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "build", f"--{kind}", "--no-isolation", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (made,) = out.iterdir()
    return made


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tree's copy, its sdist, the sdist unpacked, and a wheel of each."""
    base = tmp_path_factory.mktemp("sdist")
    tree = base / "tree"
    for name in git_files():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    sdist = build(tree, "sdist", base / "sdist")
    (base / "unpacked").mkdir()
    subprocess.run(["tar", "-xzf", str(sdist), "-C", str(base / "unpacked")], check=True)
    (unpacked,) = (base / "unpacked").iterdir()
    return {
        "tree": tree,
        "sdist": sdist,
        "tree_wheel": build(tree, "wheel", base / "tree-wheel"),
        "sdist_wheel": build(unpacked, "wheel", base / "sdist-wheel"),
    }


def sdist_files(sdist: Path) -> set[str]:
    with tarfile.open(sdist) as archive:
        return {member.name.split("/", 1)[1] for member in archive.getmembers() if member.isfile()}


def test_the_sdist_holds_what_packagers_need(built: dict[str, Path]) -> None:
    shipped = sdist_files(built["sdist"])
    assert [name for name in PACKAGER_NEEDS if name not in shipped] == []
    tree = {name for name in git_files() if name not in NOT_SHIPPED and Path(name).name != ".gitignore"}
    assert sorted(tree - shipped) == []
    assert any(name.endswith(".c") for name in shipped)  # the C programs build from it
    made_here = {name for name in shipped - tree if not name.startswith("myecho.egg-info/")}
    assert made_here == {"PKG-INFO"}  # and nothing of a local build or run came along


def test_the_sdist_builds_the_wheel_the_tree_builds(built: dict[str, Path]) -> None:
    assert built["sdist_wheel"].name == built["tree_wheel"].name
    with zipfile.ZipFile(built["tree_wheel"]) as tree, zipfile.ZipFile(built["sdist_wheel"]) as sdist:
        assert sorted(sdist.namelist()) == sorted(tree.namelist())


def test_the_wheel_tag_says_what_is_in_it(built: dict[str, Path]) -> None:
    """Compiled programs, no extension module: any Python 3, this platform only."""
    with zipfile.ZipFile(built["tree_wheel"]) as wheel:
        names = wheel.namelist()
        (info,) = [name for name in names if name.endswith(".dist-info/WHEEL")]
        fields = dict(line.split(": ", 1) for line in wheel.read(info).decode().splitlines() if ": " in line)
    assert [name for name in names if name.endswith((".so", ".pyd"))] == []
    assert "myecho/_bin/myecho-c" in names or any(name.endswith("/myecho-c") for name in names)
    tag = fields["Tag"]
    assert tag.startswith("py3-none-") and tag != "py3-none-any", tag
    assert fields["Root-Is-Purelib"] == "false"
    assert built["tree_wheel"].name.endswith(f"-{tag}.whl")
