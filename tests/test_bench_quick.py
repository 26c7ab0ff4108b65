"""End to end: ``myecho-bench --quick`` as a user runs it, on a few models."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jsonschema
from support import ServeFactory, command

SCHEMA = json.loads((Path(__file__).parent.parent / "benchmarks" / "results.schema.json").read_text())


def test_quick_run_prints_both_tables_and_valid_json(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [
            command("myecho-bench"),
            "--quick",
            "--models",
            "c,select,zmq",
            "--talk",
            "--ratios",
            "--ramp-limit",
            "500",
            "--json",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "Single connection" in text and "Multiple connections" in text
    for column in ("Connect", "Exchange 1", "Exchange 2", "100 connections", "1000 messages", "Maximum"):
        assert column in text
    for label in ("C (myecho-c)", "select", "zmq"):
        assert label in text
    assert "talk: Connect" in text
    document = json.loads(out.read_text())
    jsonschema.validate(document, SCHEMA, cls=jsonschema.Draft202012Validator)
    by_name = {m["name"]: m for m in document["models"]}
    assert set(by_name) == {"c", "select", "zmq"}
    for result in by_name.values():
        assert result["failures"] == []
        assert result["single"]["trials"] > 0
        assert all(m["complete"] for m in result["multi"])
        assert result["ramp"]["completed"] and result["ramp"]["maximum"] == 500
        rr32 = next(t for t in result["throughput"] if t["clients"] == 32)
        assert rr32["round_trips_per_s"] > 0 and rr32["server_cpu_per_echo_s"] > 0
    assert "ZeroMQ pipeline" in text
    assert [run["workers"] for run in document["pipeline"]] == [1, 2, 4]
    assert all(run["exactly_once"] and run["jobs_per_second"] > 0 for run in document["pipeline"])


def test_help_defines_every_column() -> None:
    done = subprocess.run([command("myecho-bench"), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    for column in (
        "Connect",
        "Exchange 1",
        "Exchange 2",
        "N connections",
        "N messages",
        "Maximum",
        "round trips",
        "server CPU/echo",
        "memory",
        "--quick",
        "--target",
        "--installed",
        "--json",
    ):
        assert column in done.stdout


def test_bad_target_is_one_line() -> None:
    done = subprocess.run(
        [command("myecho-bench"), "--target", "nosuch=1.2.3.4:5"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode != 0
    assert "bad --target" in done.stderr and "Traceback" not in done.stderr


def test_target_mode_measures_a_running_service(serve: ServeFactory, tmp_path: Path) -> None:
    server = serve("select")
    out = tmp_path / "results.json"
    done = subprocess.run(
        [
            command("myecho-bench"),
            "--target",
            f"select=127.0.0.1:{server.port}",
            "--scenarios",
            "single,multi",
            "--trials",
            "5",
            "--repeats",
            "1",
            "--json",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(out.read_text())
    jsonschema.validate(document, SCHEMA, cls=jsonschema.Draft202012Validator)
    assert document["mode"] == "target"
    (result,) = document["models"]
    assert result["name"] == "select" and result["address"] == f"127.0.0.1:{server.port}"
    assert result["single"]["trials"] == 5
    # Its process was found from the listening socket: CPU and memory are measured.
    big = next(m for m in result["multi"] if m["connections"] == 1000)
    assert big["complete"] and big["memory"]["processes"] == 1
    assert server.proc.poll() is None  # the tool never stops a service it did not start


def test_installed_mode_says_which_services_are_not_running(tmp_path: Path) -> None:
    """Whatever this machine runs on the contract's ports, every row is measured or says why not."""
    out = tmp_path / "results.json"
    done = subprocess.run(
        [
            command("myecho-bench"),
            "--installed",
            "--models",
            "fork",
            "--scenarios",
            "single",
            "--trials",
            "3",
            "--json",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(out.read_text())["models"]
    assert result["single"] is not None or "nothing answers on 127.0.0.1:11139" in result["skipped"]
