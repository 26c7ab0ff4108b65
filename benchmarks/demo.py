"""Start every model on its contract port, show each answering, stop them.

The README's main job calls this until ``myecho-bench --quick`` replaces it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
MODELS = {
    "fork": ([str(BIN / "myecho"), "serve", "fork"], 11139),
    "select": ([str(BIN / "myecho"), "serve", "select"], 11140),
    "zmq": ([str(BIN / "myecho"), "serve", "zmq"], 11141),
    "c": ([str(BIN / "myecho-c")], 11142),
    "inetd": ([shutil.which("systemd-socket-activate") or "systemd-socket-activate", "--inetd", "-a",
               "--listen=127.0.0.1:11143", str(BIN / "myecho"), "serve", "inetd"], 11143),
}


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"demo: nothing answers on port {port}")


def main() -> int:
    procs = []
    try:
        for name, (argv, port) in MODELS.items():
            procs.append(subprocess.Popen(argv, stderr=subprocess.DEVNULL))
            wait_port(port)
        for name, (_, port) in MODELS.items():
            flag = ["--zmq"] if name == "zmq" else []
            out = subprocess.run([str(BIN / "myecho"), "client", *flag, f"127.0.0.1:{port}"],
                                 input=f"Hello from the {name} model\n".encode(), capture_output=True, timeout=10)
            print(f"{name:7} port {port}: {out.stdout.decode().strip() or out.stderr.decode().strip()}")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(10)
    return 0


if __name__ == "__main__":
    os.environ.pop("NOTIFY_SOCKET", None)
    sys.exit(main())
