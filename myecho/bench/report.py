"""Tables (terminal and Markdown), JSON and PNG charts of a run.

The two tables follow the talk's slides: same rows (models), same columns,
in the same order; a third and fourth table hold what the talk did not
measure. ``--talk`` puts the talk's Atom N270 figures beside ours, and
``--ratios`` each figure's ratio to the C reference measured in the run.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from myecho.bench import talk
from myecho.bench.scenarios import ModelResult, MultiResult, RampResult
from myecho.bench.stats import Summary, ratio

SCHEMA_ID = "myecho-bench/1"
REFERENCE = "c"
MISSING = "—"


def fmt_time(seconds: float | None) -> str:
    """A duration the way the talk writes them: 51 µs, 1.4 ms, 6.5 s."""
    if seconds is None:
        return MISSING
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def fmt_rate(per_second: float | None) -> str:
    if per_second is None:
        return MISSING
    return f"{per_second / 1000:.1f}k/s" if per_second >= 1000 else f"{per_second:.0f}/s"


def fmt_bytes(count: int | None) -> str:
    if count is None:
        return MISSING
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count} B"


def fmt_ratio(value: float | None, reference: float | None) -> str:
    r = ratio(value, reference)
    if r is None:
        return ""
    return f" ×{r:.2g}" if r < 10 else f" ×{r:.0f}"


def fmt_maximum(ramp: RampResult | None) -> str:
    """The talk writes "> 1000" or "< 120"; we write what was held, and why it stopped."""
    if ramp is None:
        return MISSING
    if ramp.completed:
        return f"≥ {ramp.maximum}"
    return f"{ramp.maximum} ({ramp.stop_reason})"


PIPELINE_TITLE = "ZeroMQ pipeline: ventilator -> N workers -> sink (PUSH/PULL over ipc), every job checked done once"


def render(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """A table with columns padded to their widest cell (first column left, others right)."""
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        padded = [cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(cells)]
        return ("| " + " | ".join(padded) + " |") if markdown else "  ".join(padded).rstrip()

    if markdown:
        rule = "| " + " | ".join(("-" * (w - 1) + ":") if i else "-" * w for i, w in enumerate(widths)) + " |"
    else:
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


class Report:
    """Turns a run's results into tables, JSON and charts."""

    def __init__(
        self, results: list[ModelResult], meta: dict[str, Any], with_talk: bool = False, with_ratios: bool = False
    ) -> None:
        self.results = results
        self.meta = meta
        self.with_talk = with_talk
        self.with_ratios = with_ratios
        self.reference = next((r for r in results if r.name == REFERENCE and not r.skipped), None)

    def rows_of(self) -> list[ModelResult]:
        return [r for r in self.results if not r.skipped]

    def _timed(self, value: float | None, pick: Callable[[ModelResult], float | None]) -> str:
        text = fmt_time(value)
        if self.with_ratios and self.reference is not None and value is not None:
            text += fmt_ratio(value, pick(self.reference))
        return text

    # ---- table 1: single connection -------------------------------------
    def single_table(self, markdown: bool = False) -> str:
        headers = ["Model", "Connect", "Exchange 1", "Exchange 2", "Exch. 1, back to back"]
        if self.with_talk:
            headers += ["talk: Connect", "Exch. 1", "Exch. 2"]
        rows = []
        for result in self.rows_of():
            single = result.single
            row = [result.label]
            for name in ("connect", "exchange1", "exchange2", "exchange1_back_to_back"):
                summary: Summary | None = getattr(single, name) if single else None

                def pick(r: ModelResult, name: str = name) -> float | None:
                    found: Summary | None = getattr(r.single, name) if r.single else None
                    return found.median if found else None

                cell = self._timed(summary.median if summary else None, pick)
                if summary is not None:
                    cell += f" (p99 {fmt_time(summary.p99)})"
                row.append(cell)
            if self.with_talk:
                row += list(talk.single_row(result.name) or ("", "", ""))
            rows.append(row)
        return render(headers, rows, markdown)

    def inetd_reference(self, markdown: bool = False) -> list[str]:
        """The inetd rows' exchange 1 against the bare interpreter's start in the same run, and, with
        ``--installed``, the socket unit's settings they went through."""
        lines = []
        start = self.meta.get("interpreter_start")
        if start is not None:
            code = "`" if markdown else ""
            line = (
                f"Reference: {code}{start['command']}{code} starts in {fmt_time(start['median_s'])} "
                f"(p99 {fmt_time(start['p99_s'])}, {start['runs']} starts in this run)"
            )
            for result in self.rows_of():
                exchange1 = result.single.exchange1 if result.single else None
                if result.name.startswith("inetd") and exchange1 is not None:
                    line += f"; {result.label}: exchange 1 = {exchange1.median / start['median_s']:.2f}×"
            lines.append(line)
        unit = self.meta.get("inetd_socket_unit")
        if unit is not None:
            settings = ", ".join(f"{name}={value}" for name, value in unit.items())
            lines.append(f"inetd by systemd: through myecho-inetd.socket as installed ({settings})")
        elif any(r.name == "inetd-systemd" for r in self.rows_of()):
            lines.append(
                "inetd by systemd: systemd-socket-activate --inetd (Accept=yes, no MaxConnections or trigger "
                "limit); --installed measures myecho-inetd.socket with its own settings"
            )
        behind = self.meta.get("interpreter_start_unit")
        if behind is not None:
            lines.append(self.unit_reference(behind, code="`" if markdown else ""))
        return ["", *lines] if lines else []

    def unit_reference(self, behind: dict[str, Any], code: str) -> str:
        """The bare interpreter behind a copy of the socket unit, and the inetd-systemd row against it."""
        if "skipped" in behind:
            return f"Reference behind the socket unit: not timed ({behind['skipped']})"
        line = (
            f"Reference behind the socket unit: {code}{behind['command']}{code} as the service of "
            f"{behind['unit']} (myecho-inetd.socket's units as installed, ExecStart and port changed): "
            f"{fmt_time(behind['median_s'])} from connection to EOF (p99 {fmt_time(behind['p99_s'])}, "
            f"{behind['runs']} connections)"
        )
        for result in self.rows_of():
            exchange1 = result.single.exchange1 if result.single else None
            if result.name == "inetd-systemd" and exchange1 is not None:
                line += f"; {result.label}: exchange 1 = {exchange1.median / behind['median_s']:.2f}×"
        return line

    # ---- table 2: multiple connections ------------------------------------
    def multi_cell(self, multi: MultiResult | None, field: str) -> str:
        if multi is None:
            return MISSING
        if not multi.complete:
            done = multi.opened if field == "open_s" else multi.echoed
            return f"fails ({done}/{multi.connections})"
        count = multi.connections

        def pick(r: ModelResult) -> float | None:
            found = r.multi_for(count)
            return getattr(found, field) if found and found.complete else None

        value: float | None = getattr(multi, field)
        return self._timed(value, pick)

    def multi_table(self, markdown: bool = False) -> str:
        counts = sorted({m.connections for r in self.results for m in r.multi}) or [100, 1000]
        headers = ["Model"]
        for count in counts:
            headers += [f"{count} connections", f"{count} messages"]
        headers.append("Maximum")
        if self.with_talk:
            headers += ["talk: 100 conn.", "100 msgs", "1000 conn.", "1000 msgs", "Maximum"]
        rows = []
        for result in self.rows_of():
            row = [result.label]
            for count in counts:
                multi = result.multi_for(count)
                row += [self.multi_cell(multi, "open_s"), self.multi_cell(multi, "messages_s")]
            row.append(fmt_maximum(result.ramp))
            if self.with_talk:
                row += list(talk.multi_row(result.name) or ("", "", "", "", ""))
            rows.append(row)
        return render(headers, rows, markdown)

    # ---- beyond the talk ----------------------------------------------------
    def throughput_table(self, markdown: bool = False) -> str:
        clients = sorted({t.clients for r in self.results for t in r.throughput}) or [1, 32, 256]
        headers = ["Model", *(f"{n} client{'s' if n > 1 else ''}: round trips (p50 / p99)" for n in clients)]
        rows = []
        for result in self.rows_of():
            row = [result.label]
            for n in clients:
                t = result.throughput_for(n)
                if t is None or t.round_trips_per_s is None:
                    row.append(MISSING)
                    continue
                cell = fmt_rate(t.round_trips_per_s)
                if self.with_ratios and self.reference is not None:
                    ref = self.reference.throughput_for(n)
                    cell += fmt_ratio(t.round_trips_per_s, ref.round_trips_per_s if ref else None)
                row.append(f"{cell} ({fmt_time(t.p50_s)} / {fmt_time(t.p99_s)})")
            rows.append(row)
        return render(headers, rows, markdown)

    def cost_table(self, markdown: bool = False) -> str:
        clients = 32
        big = max((m.connections for r in self.results for m in r.multi), default=1000)
        headers = [
            "Model",
            f"server CPU / echo ({clients} clients)",
            "main process's own",
            f"server CPU / connection ({big})",
            f"memory, {big} open (RSS sum)",
            "(PSS sum)",
            "processes",
            "client CPU / echo",
        ]
        rows = []
        for result in self.rows_of():
            t = result.throughput_for(clients)
            m = result.multi_for(big)
            cpu = t.server_cpu_per_echo_s if t else None

            def pick(r: ModelResult) -> float | None:
                found = r.throughput_for(clients)
                return found.server_cpu_per_echo_s if found else None

            def pick_main(r: ModelResult) -> float | None:
                found = r.throughput_for(clients)
                return found.main_cpu_per_echo_s if found else None

            memory = m.memory if m else None
            rows.append(
                [
                    result.label,
                    self._timed(cpu, pick),
                    self._timed(t.main_cpu_per_echo_s if t else None, pick_main),
                    fmt_time(m.server_cpu_per_connection_s if m else None),
                    fmt_bytes(memory.rss_bytes if memory else None),
                    fmt_bytes(memory.pss_bytes if memory else None),
                    str(memory.processes) if memory else MISSING,
                    fmt_time(t.client_cpu_per_echo_s if t else None),
                ]
            )
        return render(headers, rows, markdown)

    def notes(self) -> list[str]:
        lines = []
        for result in self.results:
            if result.skipped:
                lines.append(f"{result.name}: not measured: {result.skipped}")
            for failure in result.failures:
                lines.append(f"{result.name}: {failure}")
            for multi in result.multi:
                if not multi.complete:
                    errors = ", ".join(f"{n} {kind}" for kind, n in sorted(multi.errors.items()))
                    lines.append(
                        f"{result.name}: {multi.connections} connections fail: {multi.opened} opened, "
                        f"{multi.echoed} echoed (worst of {multi.runs} runs); errors: {errors or 'none'}"
                    )
            if result.ramp is not None and not result.ramp.completed:
                lines.append(
                    f"{result.name}: ramp stopped at {result.ramp.maximum}: {result.ramp.stop_reason} "
                    f"({result.ramp.stop_detail})"
                )
        return lines

    def text(self, markdown: bool = False) -> str:
        """All tables, as the terminal shows them (or as Markdown)."""
        title = "### " if markdown else ""
        parts = [
            f"{title}Single connection (median, p99 beside)",
            self.single_table(markdown),
            *self.inetd_reference(markdown),
            "",
            f"{title}Multiple connections (opened at once; median of runs)",
            self.multi_table(markdown),
            "",
            f"{title}Beyond the talk: round trips per second (latency p50 / p99)",
            self.throughput_table(markdown),
            "",
            f"{title}Beyond the talk: what an echo costs the server",
            self.cost_table(markdown),
        ]
        if self.meta.get("pipeline"):
            parts += ["", f"{title}{PIPELINE_TITLE}", self.pipeline_table(markdown)]
        notes = self.notes()
        if notes:
            parts += ["", f"{title}Notes", *((f"- {n}" if markdown else f"  {n}") for n in notes)]
        return "\n".join(parts) + "\n"

    def pipeline_table(self, markdown: bool = False) -> str:
        """The pipeline's jobs per second by worker count, and whether every job came back once."""
        rows = []
        for run in self.meta.get("pipeline", []):
            verdict = "yes" if run["exactly_once"] else f"NO ({run['missing']} missing, {run['duplicates']} twice)"
            rows.append([str(run["workers"]), f"{run['jobs']:,}", f"{run['jobs_per_second']:,}", verdict])
        return render(["Workers", "Jobs", "Jobs/s", "Exactly once"], rows, markdown)

    # ---- JSON ---------------------------------------------------------------
    def as_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA_ID, **self.meta, "models": [dataclasses.asdict(r) for r in self.results]}

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_json(), indent=2, ensure_ascii=False) + "\n")

    # ---- charts -------------------------------------------------------------
    def chart_subtitle(self) -> str:
        """The machine and the date of the run, under every chart's title."""
        machine = self.meta.get("machine", {})
        started = str(self.meta.get("started", ""))
        cpu = machine.get("cpu", "unknown CPU")
        parts = [
            f"{machine.get('cores', '?')} cores, {cpu}, Linux {machine.get('kernel', '?')}",
            f"{started[:16].replace('T', ' ')} UTC" if started else "date unknown",
        ]
        load = self.meta.get("load_average", {}).get("max_1min")
        if load is not None:
            parts.append(f"load average up to {load:.1f}")
        if self.meta.get("quick"):
            parts.append("quick run")
        return "; ".join(parts)

    def write_charts(self, directory: Path) -> list[Path]:
        """One PNG per table (needs matplotlib: ``pip install 'myecho[charts]'``)."""
        from myecho.bench import charts

        return charts.write(self, directory)


# ---- reading a run back -------------------------------------------------------
def _load(kind: Any, value: Any) -> Any:
    """``value`` (parsed JSON) as an instance of the type ``kind``: dataclasses,
    their lists and optionals, recursively; anything else as it is."""
    if value is None:
        return None
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        hints = typing.get_type_hints(kind)
        known = {f.name for f in dataclasses.fields(kind)}
        return kind(**{name: _load(hints[name], item) for name, item in value.items() if name in known})
    origin = typing.get_origin(kind)
    if origin is list:
        (item_kind,) = typing.get_args(kind)
        return [_load(item_kind, item) for item in value]
    if origin in (types.UnionType, typing.Union):
        for option in typing.get_args(kind):
            if option is not type(None) and (dataclasses.is_dataclass(option) or typing.get_origin(option) is list):
                return _load(option, value)
    return value


def from_json(document: dict[str, Any], with_talk: bool = False, with_ratios: bool = False) -> Report:
    """The report of a run saved with ``--json`` (its tables and charts, without measuring again)."""
    if document.get("schema") != SCHEMA_ID:
        raise ValueError(f"not a {SCHEMA_ID} document (schema: {document.get('schema')!r})")
    results = [_load(ModelResult, model) for model in document["models"]]
    meta = {key: value for key, value in document.items() if key not in ("schema", "models")}
    return Report(results, meta, with_talk=with_talk, with_ratios=with_ratios)
