"""The asyncio model's own settings: the loop it runs on (its idle timeout: test_idle.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import ServeFactory, roundtrip, server_argv

from myecho.bench.harness import free_port
from myecho.core.settings import EXIT_BAD_CONFIG


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_loop_is_the_one_asked_for(serve: ServeFactory, loop: str) -> None:
    server = serve("asyncio", "--loop", loop)
    assert server.notify is not None
    assert server.notify.wait_for("READY", "1")["STATUS"].endswith(f"({loop})")
    with server.connect() as sock:
        assert roundtrip(sock, b"on " + loop.encode()) == b"on " + loop.encode()


def test_unknown_loop_in_the_settings_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "myecho"
    config.write_text("MYECHO_LOOP=libev\n")
    result = subprocess.run(
        server_argv("asyncio", free_port(), "--config", str(config)), capture_output=True, text=True, timeout=10
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == EXIT_BAD_CONFIG and len(lines) == 1, result.stderr
    assert "loop 'libev' is not auto, asyncio or uvloop" in lines[0]


def test_uvloop_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto falls back to asyncio's loop; asking for uvloop is a settings error,
    for the asyncio model only (the file is shared by every model)."""
    from myecho.core.settings import Settings, SettingsError
    from myecho.models.aio import new_loop

    monkeypatch.setitem(sys.modules, "uvloop", None)  # what an import finds when it is not installed
    with pytest.raises(SettingsError, match="uvloop is not installed"):
        Settings(model="asyncio", loop="uvloop").check()
    Settings(model="select", loop="uvloop").check()
    loop, name = new_loop("auto")
    loop.close()
    assert name == "asyncio"
