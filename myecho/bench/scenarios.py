"""The measurements, and the ramp's stopping rules.

Every scenario runs against a fresh server (``servers.Server.start``) so
its figures do not depend on the scenario before. Durations are seconds.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from myecho.bench import loadgen, procs
from myecho.bench.harness import ServerError
from myecho.bench.servers import Model, Server
from myecho.bench.stats import Summary, median

NS = 1e9
GIB = 1024**3


@dataclass
class Settings:
    """How long and how hard to measure; ``quick()`` is the smoke run."""

    trials: int = 300
    #: Seconds between single-connection trials: each starts on an idle
    #: server, as a lone client's does. Back to back, a server that forks
    #: spends each gap's CPU on the previous connection's exit and the next
    #: fork, and the trial measures that queue (its own column).
    single_gap: float = 0.005
    repeats: int = 3
    connections: tuple[int, ...] = (100, 1000)
    clients: tuple[int, ...] = (1, 32, 256)
    duration: float = 3.0
    warmup: float = 0.3
    message_size: int = 64
    timeout: float = 10.0
    multi_timeout: float = 60.0  # the talk's slowest figure was 60.5 s: a model that slow still gets a number
    ramp_limit: int = 20000
    ramp_budget: float = 240.0
    per_holder: dict[str, int] = field(default_factory=lambda: {"tcp": 9000, "zmq": 4000})
    #: The zmq models' load generator (``loadgen.ZMQ_CLIENTS``).
    zmq_client: str = "zmtp"

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            trials=40,
            repeats=1,
            duration=0.5,
            warmup=0.1,
            timeout=5.0,
            multi_timeout=15.0,
            ramp_limit=1000,
            ramp_budget=20.0,
        )


@dataclass
class SingleResult:
    """Single connection: connect, exchange 1, exchange 2 over many trials."""

    trials: int
    errors: dict[str, int]
    connect: Summary | None
    exchange1: Summary | None
    exchange2: Summary | None
    exchange1_back_to_back: Summary | None = None  # the same trials with no gap between them


@dataclass
class MemoryResult:
    processes: int
    rss_bytes: int
    pss_bytes: int


@dataclass
class MultiResult:
    """N connections opened at once, then one message on each."""

    connections: int
    runs: int
    complete: bool
    opened: int
    echoed: int
    errors: dict[str, int]
    open_s: float | None
    messages_s: float | None
    open_runs: list[float]
    messages_runs: list[float]
    server_cpu_per_connection_s: float | None
    memory: MemoryResult | None


@dataclass
class ThroughputResult:
    """Closed-loop round trips with ``clients`` concurrent connections."""

    clients: int
    round_trips_per_s: float | None
    p50_s: float | None
    p99_s: float | None
    round_trips: int
    errors: dict[str, int]
    server_cpu_per_echo_s: float | None
    client_cpu_per_echo_s: float | None
    runs: list[float]
    #: The main process's own share of server_cpu_per_echo_s (the broker's, without its workers).
    main_cpu_per_echo_s: float | None = None


@dataclass
class RampStep:
    target: int
    open: int
    ok: int
    errors: dict[str, int]
    seconds: float


@dataclass
class RampResult:
    """The most connections held with every echo correct, and why it stopped."""

    maximum: int
    limit: int
    completed: bool
    stop_reason: str
    stop_detail: str
    steps: list[RampStep]


@dataclass
class ModelResult:
    name: str
    label: str
    description: str
    protocol: str
    reference: bool
    address: str | None = None
    skipped: str | None = None
    single: SingleResult | None = None
    multi: list[MultiResult] = field(default_factory=list)
    throughput: list[ThroughputResult] = field(default_factory=list)
    ramp: RampResult | None = None
    failures: list[str] = field(default_factory=list)

    def multi_for(self, connections: int) -> MultiResult | None:
        return next((m for m in self.multi if m.connections == connections), None)

    def throughput_for(self, clients: int) -> ThroughputResult | None:
        return next((t for t in self.throughput if t.clients == clients), None)


def merge(counters: list[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for counter in counters:
        total.update(counter)
    return dict(total)


# ---- the ramp's stopping rules -------------------------------------------

#: error kinds of the load generators -> the ramp's stop reasons
ERROR_REASON = {
    "refused": "refused",
    "reset": "reset",
    "eof": "reset",
    "timeout": "timeout",
    "mismatch": "mismatch",
    "fd_limit": "fd limit",
    "no_address": "client limit",
    "other": "other",
}
STOP_REASONS = (
    "completed",
    "refused",
    "reset",
    "timeout",
    "mismatch",
    "fd limit",
    "memory guard",
    "process guard",
    "time budget",
    "client limit",
    "server exited",
    "other",
)


def ramp_targets(limit: int) -> list[int]:
    """The ramp's steps: coarse at first, every 5,000 past 10,000, ending at ``limit``."""
    base = [100, 200, 500, 1000, 2000, 5000, 10000]
    base += list(range(15000, limit, 5000))
    steps = [n for n in base if n < limit]
    return [*steps, limit]


def classify_failure(
    errors: dict[str, int], fd_pressure: tuple[int, int] | None, server_alive: bool, processes: int | None = None
) -> tuple[str, str]:
    """Why a ramp step failed: (reason, detail).

    The most frequent error kind names the reason; a server that died says
    "server exited"; a server whose process sits at its file-descriptor
    limit turns timeouts, resets and refusals into "fd limit" (those are
    how an fd-starved server looks from outside).
    """
    if not server_alive:
        return "server exited", "the server process is gone"
    kinds = Counter({ERROR_REASON.get(kind, "other"): count for kind, count in errors.items() if count})
    detail = ", ".join(f"{count} {kind}" for kind, count in sorted(errors.items()) if count)
    if not kinds:
        return "other", "fewer echoes than connections, no error reported"
    reason = kinds.most_common(1)[0][0]
    if fd_pressure is not None and reason in ("timeout", "reset", "refused"):
        fds, limit = fd_pressure
        if fds >= 0.99 * limit:
            return "fd limit", f"server holds {fds} descriptors of its limit {limit}; {detail}"
    if processes:
        detail += f"; the server runs {processes} process{'es' if processes > 1 else ''}"
    if fd_pressure is not None:
        detail += f"; its fullest holds {fd_pressure[0]} of {fd_pressure[1]} descriptors"
    return reason, detail


@dataclass
class Observation:
    """What the ramp knows before its next step."""

    connections: int
    mem_available: int
    mem_drop_per_connection: float | None
    server_processes_per_connection: float
    system_processes: int


def guard(
    now: Observation, target: int, reserve: int, pid_max: int, elapsed: float, budget: float
) -> tuple[str, str] | None:
    """A reason not to take the step to ``target`` connections, or None.

    - memory guard: the memory the step would take (the last step's drop in
      MemAvailable per connection, with 25 % margin) would leave less than
      ``reserve`` available; or less than that is available already;
    - process guard: a process-per-connection server would push the
      machine's process count within 2,000 of pid_max;
    - time budget: the ramp of one model already took its share of time.
    """
    new = target - now.connections
    if now.mem_available < reserve:
        return "memory guard", f"{now.mem_available / GIB:.1f} GiB available, under the {reserve / GIB:.1f} GiB reserve"
    if now.mem_drop_per_connection is not None:
        need = now.mem_drop_per_connection * new * 1.25
        if now.mem_available - need < reserve:
            return (
                "memory guard",
                f"{target} connections would need about {need / GIB:.1f} GiB more "
                f"({now.mem_drop_per_connection / 1024:.0f} KiB each); {now.mem_available / GIB:.1f} GiB available, "
                f"{reserve / GIB:.1f} GiB kept in reserve",
            )
    projected = now.system_processes + now.server_processes_per_connection * new
    if projected > pid_max - 2000:
        return (
            "process guard",
            f"{target} connections would mean about {projected:.0f} processes on the machine (pid_max {pid_max})",
        )
    if elapsed > budget:
        return "time budget", f"the ramp took {elapsed:.0f} s, more than its {budget:.0f} s"
    return None


# ---- running the scenarios -----------------------------------------------


def _note_cpus(notes: list[tuple[float | None, float | None]], server: Server) -> None:
    """The whole tree's CPU and its main process's, at the start of a measure."""
    notes.append((server.cpu(), server.main_cpu()))


class Sample:
    """The server's CPU and memory around one burst, read while its connections are open."""

    def __init__(self, server: Server, count: int) -> None:
        self.server = server
        self.count = count
        self.cpu_before = server.cpu()
        self.cpu_per_connection: float | None = None
        self.memory: MemoryResult | None = None

    def take(self, out: dict[str, Any]) -> None:
        cpu_after = self.server.cpu()
        if out["opened"] == self.count and out["echoed"] == self.count and None not in (self.cpu_before, cpu_after):
            assert self.cpu_before is not None and cpu_after is not None
            if cpu_after >= self.cpu_before:  # lower: a process left the accounting (see throughput)
                self.cpu_per_connection = (cpu_after - self.cpu_before) / self.count
        found = self.server.memory()
        if found is not None:
            self.memory = MemoryResult(found.processes, found.rss_bytes, found.pss_bytes)


Progress = Callable[[str], None]


class Runner:
    """Measures one model after another; ``servers`` gives a server per scenario."""

    def __init__(self, settings: Settings, progress: Progress) -> None:
        self.settings = settings
        self.progress = progress

    def fresh(self, model: Model, target: tuple[str, int] | None) -> Server:
        if target is not None:
            return Server.attach(model, *target)
        return Server.start(model)

    def measure(self, model: Model, target: tuple[str, int] | None, only: set[str] | None = None) -> ModelResult:
        """Every scenario of ``model``, each against a fresh server (or the target)."""
        result = ModelResult(model.name, model.label, model.description, model.protocol, model.reference)
        steps: list[tuple[str, Callable[[Server], None]]] = []
        for scenario in model.scenarios:
            if only is not None and scenario not in only:
                continue
            if scenario == "multi":  # one server per size: 1,000 must not start where 100 left off
                steps += [
                    (f"multi {n}", functools.partial(self.multi, model, result, n)) for n in self.settings.connections
                ]
            else:
                steps.append((scenario, functools.partial(getattr(self, scenario), model, result)))
        for name, step in steps:
            server: Server | None = None
            try:
                server = self.fresh(model, target)
                result.address = f"{server.host}:{server.port}"
                step(server)
            except (ServerError, loadgen.LoadError, OSError) as error:
                result.failures.append(f"{name}: {error}")
                self.progress(f"{model.name}: {name} failed: {error}")
            finally:
                if server is not None:
                    server.stop()
        return result

    def client(self, model: Model) -> str:
        """The load generator that measures ``model``."""
        return loadgen.client_for(model.protocol, self.settings.zmq_client)

    def load_options(self) -> dict[str, object]:
        return {"size": self.settings.message_size, "timeout": self.settings.timeout}

    def single(self, model: Model, result: ModelResult, server: Server) -> None:
        trials, gap = self.settings.trials, self.settings.single_gap
        self.progress(f"{model.name}: single connection, {trials} trials, {gap * 1000:g} ms apart")
        out = loadgen.run(
            self.client(model),
            "single",
            server.host,
            server.port,
            trials * (5 + gap) + 60,
            trials=trials,
            gap=gap,
            **self.load_options(),
        )
        self.progress(f"{model.name}: single connection, {trials} trials, back to back")
        back_to_back = loadgen.run(
            self.client(model),
            "single",
            server.host,
            server.port,
            trials * 5 + 60,
            trials=trials,
            **self.load_options(),
        )
        result.single = SingleResult(
            int(out["trials"]),
            dict(out["errors"]),
            Summary.of([t / NS for t in out["connect"]]),
            Summary.of([t / NS for t in out["exchange1"]]),
            Summary.of([t / NS for t in out["exchange2"]]),
            Summary.of([t / NS for t in back_to_back["exchange1"]]),
        )

    def multi(self, model: Model, result: ModelResult, count: int, server: Server) -> None:
        base = len(server.pids())
        repeats = model.multi_repeats or self.settings.repeats
        runs: list[dict[str, Any]] = []
        samples: list[Sample] = []
        for run in range(repeats):
            self.progress(f"{model.name}: {count} connections at once, run {run + 1}/{repeats}")
            server.settle(base)
            sample = Sample(server, count)
            runs.append(
                loadgen.burst(
                    self.client(model),
                    server.host,
                    server.port,
                    count,
                    3 * self.settings.multi_timeout + 30,
                    sample.take,
                    **{**self.load_options(), "timeout": self.settings.multi_timeout},
                )
            )
            samples.append(sample)
            if not server.alive():
                break
        complete = [r for r in runs if r["opened"] == count and r["echoed"] == count]
        cpu = [x.cpu_per_connection for x in samples if x.cpu_per_connection is not None]
        memory = next((x.memory for x in reversed(samples) if x.memory is not None), None)
        result.multi.append(
            MultiResult(
                connections=count,
                runs=len(runs),
                complete=len(complete) == len(runs),
                opened=min(int(r["opened"]) for r in runs),
                echoed=min(int(r["echoed"]) for r in runs),
                errors=merge([r["errors"] for r in runs]),
                open_s=median([r["open_ns"] / NS for r in complete]) if complete else None,
                messages_s=median([r["messages_ns"] / NS for r in complete]) if complete else None,
                open_runs=[r["open_ns"] / NS for r in runs],
                messages_runs=[r["messages_ns"] / NS for r in runs],
                server_cpu_per_connection_s=median(cpu) if cpu else None,
                memory=memory,
            )
        )

    def throughput(self, model: Model, result: ModelResult, server: Server) -> None:
        s = self.settings
        for clients in s.clients:
            outs: list[dict[str, Any]] = []
            server_cpu: list[float] = []
            main_cpu: list[float] = []
            for run in range(s.repeats):
                who = f"{clients} client{'s' if clients > 1 else ''}"
                self.progress(f"{model.name}: round trips, {who}, run {run + 1}/{s.repeats}")
                window: list[tuple[float | None, float | None]] = []
                out = loadgen.round_trips(
                    self.client(model),
                    server.host,
                    server.port,
                    s.duration + s.warmup + 3 * s.timeout + 30,
                    functools.partial(_note_cpus, window, server),
                    conns=clients,
                    duration=s.duration,
                    warmup=s.warmup,
                    **self.load_options(),
                )
                after, main_after = server.cpu(), server.main_cpu()
                outs.append(out)
                before, main_before = window[0] if window else (None, None)
                # A tree's CPU never goes down; when it reads lower at the end, a process
                # of it left the accounting (reaped outside the tree): that run says nothing.
                if before is not None and after is not None and out["round_trips"] and after >= before:
                    server_cpu.append((after - before) / out["round_trips"])
                if None not in (main_before, main_after) and out["round_trips"]:
                    assert main_before is not None and main_after is not None
                    if main_after >= main_before:
                        main_cpu.append((main_after - main_before) / out["round_trips"])
            good = [o for o in outs if o["round_trips"] and o["elapsed_ns"]]
            result.throughput.append(
                ThroughputResult(
                    clients=clients,
                    round_trips_per_s=median([o["round_trips"] / (o["elapsed_ns"] / NS) for o in good])
                    if good
                    else None,
                    p50_s=median([o["p50_ns"] / NS for o in good]) if good else None,
                    p99_s=median([o["p99_ns"] / NS for o in good]) if good else None,
                    round_trips=sum(int(o["round_trips"]) for o in outs),
                    errors=merge([o["errors"] for o in outs]),
                    server_cpu_per_echo_s=median(server_cpu) if server_cpu else None,
                    client_cpu_per_echo_s=median([o["cpu_s"] / o["round_trips"] for o in good]) if good else None,
                    runs=[o["round_trips"] / (o["elapsed_ns"] / NS) for o in good],
                    main_cpu_per_echo_s=median(main_cpu) if main_cpu else None,
                )
            )

    def ramp(self, model: Model, result: ModelResult, server: Server) -> None:
        s = self.settings
        reserve = max(2 * GIB, procs.mem_total() // 10)
        pid_max = procs.pid_max()
        capacity = s.per_holder.get(model.protocol, 4000)
        holders: list[loadgen.Holder] = []
        steps: list[RampStep] = []
        maximum, connections = 0, 0
        base_processes = len(server.pids())
        start = time.monotonic()
        obs = Observation(0, procs.mem_available(), None, 0.0, procs.system_processes())
        stop: tuple[str, str] = ("completed", f"held {s.ramp_limit} connections, the ramp's limit")
        try:
            for target in ramp_targets(s.ramp_limit):
                why = guard(obs, target, reserve, pid_max, time.monotonic() - start, s.ramp_budget)
                if why is not None:
                    stop = why
                    break
                self.progress(f"{model.name}: ramp, {target} connections (holding {connections})")
                step_start = time.monotonic()
                plan = self.spread(holders, target - connections, capacity, model, server)
                for holder, count in plan:
                    holder.send(f"open {count}")
                errors = [holder.result()["errors"] for holder, _ in plan]
                for holder in holders:
                    holder.send("echo")
                echoed = [holder.result() for holder in holders]
                errors += [e["errors"] for e in echoed]
                ok = sum(int(e["ok"]) for e in echoed)
                live = sum(holder.live for holder in holders)
                merged = merge(errors)
                steps.append(RampStep(target, live, ok, merged, time.monotonic() - step_start))
                maximum = max(maximum, ok)
                mem_now = procs.mem_available()
                pids = server.pids()
                if ok < target or any(merged.values()):
                    stop = classify_failure(merged, procs.fd_pressure(pids), server.alive(), len(pids) or None)
                    break
                new = target - connections
                drop = max(0.0, (obs.mem_available - mem_now) / new) if new > 0 else None
                connections = target
                obs = Observation(
                    connections,
                    mem_now,
                    drop,
                    max(0.0, (len(pids) - base_processes) / connections),
                    procs.system_processes(),
                )
        finally:
            self.progress(f"{model.name}: ramp stopped ({stop[0]}), closing connections")
            for holder in holders:
                holder.close()
        result.ramp = RampResult(maximum, s.ramp_limit, stop[0] == "completed", stop[0], stop[1], steps)

    def spread(
        self, holders: list[loadgen.Holder], new: int, capacity: int, model: Model, server: Server
    ) -> list[tuple[loadgen.Holder, int]]:
        """Share ``new`` connections among holders, starting more when full.

        Each holder gets source addresses of its own (127.0.0.2-5, 6-9, ...):
        one address gives about 28,000 ports towards one destination, and one
        process holds at most its file-descriptor limit (20,000 here).
        """
        plan = []
        for holder in holders:
            take = min(new, capacity - holder.live)
            if take > 0:
                plan.append((holder, take))
                new -= take
        while new > 0:
            first = 2 + 4 * len(holders)
            local = server.host.startswith("127.")
            sources = [f"127.0.0.{first + k}" for k in range(4)] if local else []
            holder = loadgen.Holder(self.client(model), server.host, server.port, sources, **self.load_options())
            holders.append(holder)
            take = min(new, capacity)
            plan.append((holder, take))
            new -= take
        return plan
