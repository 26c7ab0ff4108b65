"""Fixtures for system tests: a booted bookworm with systemd as PID 1 per test.

Why fail instead of skip on an unfit host: the project rule is that no test
is skipped silently in CI; deselect explicitly with `-m "not system"`.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from .container import Container, ensure_rootfs, host_problem, reap_stale

HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "system: boots a Debian 12 container with systemd (needs root and overlayfs)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/system is a system test, marked or not."""
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.system)


@pytest.fixture(scope="session")
def rootfs() -> Path:
    """The cached bookworm rootfs (built once, about a minute, on a fresh machine)."""
    problem = host_problem()
    if problem:
        pytest.fail(problem, pytrace=False)
    reap_stale()  # leftovers of a pytest that was killed before its cleanup
    return ensure_rootfs()


@pytest.fixture
def container(rootfs: Path) -> Iterator[Container]:
    """A freshly booted container, stopped and removed after the test."""
    with Container(rootfs) as booted:
        yield booted


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """On failure, attach the container's failed units and journal to the report:
    the container is gone by the time anyone reads it."""
    outcome = yield
    report = outcome.get_result()
    booted = next(
        (v for v in getattr(item, "funcargs", {}).values() if isinstance(v, Container)),
        None,
    )
    if report.when != "call" or not report.failed or booted is None:
        return
    if not booted.running:
        report.sections.append(("container console", booted.console_output()[-20000:]))
        return
    for title, cmd in (
        ("container failed units", ["systemctl", "--no-pager", "--failed"]),
        (
            "container journal (last 300 lines)",
            ["journalctl", "--no-pager", "-n", "300"],
        ),
    ):
        try:
            text = booted.run(cmd, check=False, timeout=30).stdout
        except Exception as exc:  # a report must never break the run
            text = f"could not collect: {exc}"
        report.sections.append((title, text))
