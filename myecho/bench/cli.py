"""The ``myecho-bench`` command: parse arguments, run, print, write files."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from myecho import __version__
from myecho.argparser import Parser
from myecho.bench import loadgen, procs, startup
from myecho.bench.report import Report, from_json
from myecho.bench.scenarios import ModelResult, Runner, Settings
from myecho.bench.servers import BY_NAME, INSTALLED_PORTS, MODELS, inetd_command, unavailable

COLUMNS = """\
columns (every duration is measured by the client, on this machine's loopback):
 single connection - a fresh connection per trial, --trials trials, one at a time,
                   --single-gap seconds apart (each starts on an idle server):
  Connect          socket() + connect() until the TCP handshake is done (for zmq: until
                   the server's ZMTP greeting and READY are in). On loopback the kernel answers the
                   SYN, so this is the same for every model unless the backlog is full.
  Exchange 1       the first message (64 bytes) sent, until its echo is back and checked:
                   includes accept(), and fork or program start for fork/inetd models.
  Exchange 2       the second message on the same connection: the steady-state round trip.
                   Each is the median over the trials, with the 99th percentile beside it.
  Exch. 1, back to back  exchange 1 again, with the trials run back to back: a server whose
                   per-connection work (fork, exit) outlasts the client's cycle shows it here.
 multiple connections - N connections opened at once (non-blocking connects), then:
  N connections    time until all N are connected (SYNs dropped by a full listen backlog
                   are retried by the kernel after 1 s, 3 s, ...: that is what makes it slow).
  N messages       then one message on each of them, until every echo is back and checked.
                   Median over --repeats runs; each phase may take --multi-timeout seconds.
                   "fails (k/N)" when a run lost some (the notes say how: refused, timeout...).
  Maximum          the most concurrent connections whose echoes all came back correct, from
                   a ramp (100, 200, 500, 1000, 2000, 5000, 10000, then every 5000 up to
                   --ramp-limit) that holds every connection open and echoes on all of them at
                   each step. "≥ N": the ramp reached its limit. Otherwise it says why it
                   stopped: refused, reset, timeout (no echo within --timeout), mismatch, fd
                   limit (the server at its file-descriptor limit), memory guard (the next step
                   would leave under max(2 GiB, 10 %) of memory), process guard (a process per
                   connection would come within 2000 of pid_max), time budget, client limit.
 beyond the talk:
  round trips      closed loop: each of 1, 32, 256 clients sends a message, waits for its echo,
                   sends the next, for --duration seconds after a warm-up; round trips per
                   second, and the latency of one round trip (p50 / p99).
  server CPU/echo  user+system CPU of all the server's processes (children included: live
                   ones from /proc/PID/stat, exited ones through their parent's cutime/cstime)
                   during the 32-client run, divided by its round trips. The fair figure when
                   the load generator shares the machine's cores.
  server CPU/conn  the same during the 1000-connection run, per connection (accept, fork,
                   program start, first echo).
  memory           RSS summed over all the server's processes with 1000 connections open
                   (shared pages counted once per process: overstates fork models), PSS sum
                   (shared pages divided fairly), and the number of processes.
  client CPU/echo  the load generator's own CPU per round trip: small means it is not the
                   bottleneck.
 --ratios adds ×R: the figure divided by the C reference's (myecho-c) in the same run.
models (--models):
""" + "\n".join(f"  {m.name:<19}{m.description}" for m in MODELS)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="myecho-bench",
        description="Measure myecho's daemon models side by side and print the talk's two benchmark tables "
        "(single connection; multiple connections), and what an echo costs each model.",
        epilog=COLUMNS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"myecho-bench {__version__}")
    parser.add_argument("--models", metavar="LIST", help="comma-separated models to measure (default: all available)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--target",
        action="append",
        metavar="MODEL=HOST:PORT",
        help="measure an already running service instead of starting one (repeatable)",
    )
    mode.add_argument(
        "--installed",
        action="store_true",
        help="measure the packaged units on their ports ("
        + ", ".join(f"{m} {p}" for m, p in INSTALLED_PORTS.items())
        + "); as root under systemd it also times python3 -I -S -c pass behind a copy of myecho-inetd.socket's "
        "units, added under /run/systemd/system for the time it takes",
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (fewer trials, ramp to 1000): ~1-2 min")
    parser.add_argument("--talk", action="store_true", help="show the talk's Atom N270 figures beside ours")
    parser.add_argument("--ratios", action="store_true", help="show each figure's ratio to the C reference")
    parser.add_argument(
        "--json", type=Path, metavar="FILE", help="write the results as JSON (benchmarks/results.schema.json)"
    )
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="write the tables as Markdown")
    parser.add_argument("--charts", type=Path, metavar="DIR", help="write one PNG chart per table (needs matplotlib)")
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="measure nothing: print the tables (and write --markdown, --charts) of a run saved with --json",
    )
    parser.add_argument("--scenarios", metavar="LIST", help="only these of: single,multi,throughput,ramp,pipeline")
    parser.add_argument("--trials", type=int, metavar="N", help="single-connection trials (default 300; quick 40)")
    parser.add_argument(
        "--single-gap",
        type=float,
        metavar="S",
        help="seconds between single-connection trials, so each starts on an idle server (default 0.005); "
        "the same trials run once more back to back, for their own column",
    )
    parser.add_argument("--repeats", type=int, metavar="N", help="runs of each multiple/round-trip test (default 3)")
    parser.add_argument("--duration", type=float, metavar="S", help="seconds of each round-trip run (default 3)")
    parser.add_argument("--ramp-limit", type=int, metavar="N", help="the ramp's last step (default 20000; quick 1000)")
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="per connect or echo phase of the ramp and round trips (default 10; quick 5)",
    )
    parser.add_argument(
        "--multi-timeout",
        type=float,
        metavar="S",
        help="per phase of the 100/1000-connection tests (default 60; quick 15)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    parser.add_argument(
        "--zmq-client",
        choices=loadgen.ZMQ_CLIENTS,
        default="zmtp",
        help="the zmq models' load generator: myecho-load speaking ZMTP (default), or pyzmq REQ sockets "
        "(costs as much CPU as the server: a cross-check, not a measure)",
    )
    parser.add_argument(
        "--check-loadgen",
        action="store_true",
        help="compare myecho-load's round trips/s with independent clients and exit: redis-benchmark "
        "(redis-tools) against myecho-c, then libzmq's REQ sockets (pyzmq) against the C libzmq echo",
    )
    return parser


def fmt_eta(seconds: float) -> str:
    """Time left, as precise as an estimate deserves: 40 s, 3 min, 1 h 05."""
    if seconds < 60:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f}"


class Progress:
    """One line on stderr per step; rewritten in place on a terminal, with
    the time left (from the models measured so far) beside the elapsed."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self.prefix = ""
        self.busiest = 0.0
        self.first_model: float | None = None
        self.eta_at: float | None = None  # the monotonic time the last model should end

    def model(self, index: int, total: int) -> None:
        """Model ``index`` of ``total`` starts: the ones done say how long the rest will take."""
        now = time.monotonic()
        self.prefix = f"[{index}/{total}] "
        if self.first_model is None:
            self.first_model = now
        if index > 1:
            self.eta_at = now + (now - self.first_model) / (index - 1) * (total - index + 1)

    def __call__(self, message: str) -> None:
        self.busiest = max(self.busiest, procs.loadavg()[0])  # how shared the machine was, step by step
        if not self.enabled:
            return
        now = time.monotonic()
        left = f", ~{fmt_eta(self.eta_at - now)} left" if self.tty and self.eta_at is not None else ""
        line = f"[{now - self.start:6.1f} s{left}] {self.prefix}{message}"
        if self.tty:
            try:
                columns = os.get_terminal_size(2).columns or 80  # 0: a terminal that never said its size
            except OSError:  # stderr is a terminal no more (or never was, in tests)
                columns = 80
            sys.stderr.write("\r\033[K" + line[: columns - 1])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def settings_from(options: argparse.Namespace) -> Settings:
    settings = Settings.quick() if options.quick else Settings()
    for name in ("trials", "single_gap", "repeats", "duration", "ramp_limit", "timeout", "multi_timeout"):
        value = getattr(options, name)
        if value is not None:
            if value <= 0:
                raise SystemExit(f"myecho-bench: --{name.replace('_', '-')} must be positive")
            setattr(settings, name, value)
    settings.zmq_client = options.zmq_client
    return settings


def parse_targets(options: argparse.Namespace) -> dict[str, tuple[str, int]]:
    if options.installed:
        return {name: ("127.0.0.1", port) for name, port in INSTALLED_PORTS.items()}
    targets = {}
    for item in options.target or []:
        name, _, address = item.partition("=")
        host, _, port = address.rpartition(":")
        if name not in BY_NAME or not host or not port.isdigit():
            raise SystemExit(f"myecho-bench: bad --target {item!r}: MODEL=HOST:PORT with MODEL in {', '.join(BY_NAME)}")
        targets[name] = (host, int(port))
    return targets


def listening(host: str, port: int) -> str | None:
    """None if something accepts connections on host:port, else why not (for a skipped row)."""
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as error:
        return f"nothing answers on {host}:{port} ({error.strerror or error}): is the service running?"
    return None


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": os.cpu_count() or 0,
        "memory_bytes": procs.mem_total(),
        "python": platform.python_version(),
        "fd_limit": procs.fd_limit(os.getpid()),
        "pid_max": procs.pid_max(),
    }


#: Workers behind the ZeroMQ pipeline's ventilator, as the talk's pipeline slide.
PIPELINE_WORKERS = (1, 2, 4)
#: What the JSON keeps of the sink's verdict (benchmarks/results.schema.json).
PIPELINE_FIELDS = (
    "workers",
    "transport",
    "jobs",
    "done",
    "missing",
    "duplicates",
    "seconds",
    "jobs_per_second",
    "exactly_once",
)


def run_pipeline(settings: Settings, progress: Progress) -> list[dict[str, Any]]:
    """The pipeline's jobs per second with 1, 2 and 4 workers (ipc), each job checked done exactly once."""
    from myecho.bench.measure import pipeline_rate

    jobs = 5_000 if settings.ramp_limit <= 1_000 else 20_000
    runs = []
    for workers in PIPELINE_WORKERS:
        progress.prefix = "[pipeline] "
        progress(f"ventilator -> {workers} worker(s) -> sink, {jobs} jobs")
        verdict = pipeline_rate(workers, jobs, "ipc")
        runs.append({key: verdict[key] for key in PIPELINE_FIELDS})
    return runs


def time_behind_unit(python: str, runs: int, progress: Progress) -> dict[str, Any]:
    """The bare interpreter behind a copy of the installed socket unit, or why it was not timed."""
    why = startup.unit_floor_unavailable()
    if why is None:
        progress.prefix = ""
        command = " ".join(startup.reference_argv(python))
        progress(f"reference: {command} behind a copy of myecho-inetd.socket, {runs} connections")
        try:
            return startup.unit_floor(python, runs)
        except (OSError, ValueError, subprocess.TimeoutExpired) as error:
            why = str(error)
    print(f"myecho-bench: the interpreter behind the socket unit was not timed: {why}", file=sys.stderr)
    return {"skipped": why}


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    if options.check_loadgen:
        from myecho.bench.validate import check_loadgen

        return check_loadgen(Progress(not options.no_progress))
    if options.from_json:
        return render_saved(options)
    settings = settings_from(options)
    targets = parse_targets(options)
    names = [n.strip() for n in options.models.split(",")] if options.models else None
    if names:
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            raise SystemExit(f"myecho-bench: unknown model(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    chosen = [m for m in MODELS if (names is None or m.name in names) and (not targets or m.name in targets)]
    only = {s.strip() for s in options.scenarios.split(",")} if options.scenarios else None
    progress = Progress(not options.no_progress)
    load_start = procs.loadavg()
    started = datetime.datetime.now(datetime.UTC)
    runner = Runner(settings, progress)
    results: list[ModelResult] = []
    # The inetd rows' floor, timed in this run: half before the models, half after.
    python = (startup.installed_interpreter() if targets else None) or inetd_command()[0]
    starts: list[float] = []
    if any(model.inetd for model in chosen):
        progress.prefix = ""
        progress(f"reference: {' '.join(startup.reference_argv(python))}, {settings.trials // 2} starts")
        starts += startup.time_starts(python, settings.trials // 2)
    for index, model in enumerate(chosen, 1):
        progress.model(index, len(chosen))
        why = listening(*targets[model.name]) if model.name in targets else unavailable(model)
        if why is not None:
            results.append(
                ModelResult(model.name, model.label, model.description, model.protocol, model.reference, skipped=why)
            )
            continue
        results.append(runner.measure(model, targets.get(model.name), only))
    progress.eta_at = None
    if starts:
        progress.prefix = ""
        progress(f"reference: {' '.join(startup.reference_argv(python))}, {settings.trials - len(starts)} starts")
        starts += startup.time_starts(python, settings.trials - len(starts))
    behind_unit = None
    if options.installed and any(r.name == "inetd-systemd" and r.single is not None for r in results):
        behind_unit = time_behind_unit(python, settings.trials, progress)
    pipeline = [] if targets or (only is not None and "pipeline" not in only) else run_pipeline(settings, progress)
    progress.done()
    meta: dict[str, Any] = {
        "tool_version": __version__,
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - progress.start, 1),
        "command": "myecho-bench " + shlex.join(list(argv if argv is not None else sys.argv[1:])),
        "mode": "installed" if options.installed else "target" if targets else "local",
        "quick": bool(options.quick),
        "machine": machine(),
        "load_average": {
            "start": list(load_start),
            "end": list(procs.loadavg()),
            "max_1min": max(progress.busiest, load_start[0]),
        },
        "settings": {
            "trials": settings.trials,
            "repeats": settings.repeats,
            "connections": list(settings.connections),
            "clients": list(settings.clients),
            "duration_s": settings.duration,
            "warmup_s": settings.warmup,
            "message_bytes": settings.message_size,
            "timeout_s": settings.timeout,
            "multi_timeout_s": settings.multi_timeout,
            "ramp_limit": settings.ramp_limit,
            "single_gap_s": settings.single_gap,
            "zmq_client": settings.zmq_client,
        },
    }
    if pipeline:
        meta["pipeline"] = pipeline
    if starts:
        meta["interpreter_start"] = startup.interpreter_start(python, starts)
    if options.installed and any(model.inetd == "systemd" for model in chosen):
        unit = startup.socket_unit_settings()
        if unit is not None:
            meta["inetd_socket_unit"] = unit
    if behind_unit is not None:
        meta["interpreter_start_unit"] = behind_unit
    report = Report(results, meta, with_talk=options.talk, with_ratios=options.ratios)
    sys.stdout.write(report.text())
    sys.stdout.write(
        f"\n{meta['machine']['cores']} cores, {meta['machine']['cpu']}; load average {load_start[0]:.2f} at the "
        f"start, {procs.loadavg()[0]:.2f} at the end, {meta['load_average']['max_1min']:.2f} at most; "
        f"{meta['seconds']} s\n"
    )
    if options.json:
        report.write_json(options.json)
    write_files(report, options)
    return 0


def write_files(report: Report, options: argparse.Namespace) -> None:
    """--markdown and --charts."""
    if options.markdown:
        options.markdown.write_text(report.text(markdown=True))
    if options.charts:
        try:
            for path in report.write_charts(options.charts):
                print(f"chart: {path}", file=sys.stderr)
        except ImportError:
            print(
                "myecho-bench: no charts: matplotlib is not installed (pip install 'myecho[charts]')", file=sys.stderr
            )


def render_saved(options: argparse.Namespace) -> int:
    """--from-json: a saved run's tables, Markdown and charts, measured again never."""
    try:
        document = json.loads(options.from_json.read_text())
        report = from_json(document, with_talk=options.talk, with_ratios=options.ratios)
    except OSError as error:
        raise SystemExit(f"myecho-bench: cannot read {options.from_json}: {error.strerror}") from None
    except (ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"myecho-bench: {options.from_json} is not a myecho-bench --json file: {error}") from None
    sys.stdout.write(report.text())
    write_files(report, options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
