"""Table layout, the talk's figures beside ours, ratios, the JSON schema, charts, progress lines."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
from support import command

from myecho.bench.cli import Progress, fmt_eta
from myecho.bench.report import Report, fmt_bytes, fmt_maximum, fmt_time, from_json, render
from myecho.bench.scenarios import (
    MemoryResult,
    ModelResult,
    MultiResult,
    RampResult,
    RampStep,
    SingleResult,
    ThroughputResult,
)
from myecho.bench.stats import Summary

SCHEMA = json.loads((Path(__file__).parent.parent / "benchmarks" / "results.schema.json").read_text())


def validate(document: object) -> None:
    jsonschema.validate(document, SCHEMA, cls=jsonschema.Draft202012Validator)


def summary(median: float) -> Summary:
    return Summary(100, median, median * 3, median / 2, median * 10)


def model(name: str, label: str, scale: float, complete: bool = True, ramp_ok: bool = True) -> ModelResult:
    result = ModelResult(name, label, f"the {name} model", "tcp", name == "c", address="127.0.0.1:1")
    result.single = SingleResult(100, {}, summary(50e-6 * scale), summary(200e-6 * scale), summary(40e-6 * scale))
    for count in (100, 1000):
        result.multi.append(
            MultiResult(
                connections=count,
                runs=3,
                complete=complete,
                opened=count if complete else count // 2,
                echoed=count if complete else count // 2 - 1,
                errors={} if complete else {"refused": count // 2},
                open_s=count * 40e-6 * scale if complete else None,
                messages_s=count * 30e-6 * scale if complete else None,
                open_runs=[count * 40e-6 * scale] * 3,
                messages_runs=[count * 30e-6 * scale] * 3,
                server_cpu_per_connection_s=100e-6 * scale,
                memory=MemoryResult(count + 1, count * 400 * 1024, count * 40 * 1024),
            )
        )
    for clients in (1, 32, 256):
        result.throughput.append(
            ThroughputResult(
                clients, 50000 / scale, 20e-6, 80e-6, 150000, {}, 13e-6 * scale, 12e-6, [50000 / scale], 7e-6 * scale
            )
        )
    result.ramp = RampResult(
        maximum=20000 if ramp_ok else 49,
        limit=20000,
        completed=ramp_ok,
        stop_reason="completed" if ramp_ok else "refused",
        stop_detail="" if ramp_ok else "35 refused",
        steps=[RampStep(100, 100, 100 if ramp_ok else 49, {} if ramp_ok else {"refused": 51}, 0.1)],
    )
    return result


def report(**options: bool) -> Report:
    results = [
        model("c", "C (myecho-c)", 1.0),
        model("inetd-xinetd-cps50", "inetd by xinetd, cps 50", 100.0, complete=False, ramp_ok=False),
        model("select", "select", 2.0),
        ModelResult("uvloop", "Python uvloop", "uvloop", "tcp", True, skipped="uvloop is not installed"),
    ]
    meta = {
        "tool_version": "0",
        "started": "2026-11-26T16:00:00+00:00",
        "seconds": 1.0,
        "command": "myecho-bench --quick",
        "mode": "local",
        "quick": True,
        "machine": {
            "kernel": "6",
            "cpu": "x",
            "cores": 2,
            "memory_bytes": 1,
            "python": "3.11",
            "fd_limit": 20000,
            "pid_max": 32768,
        },
        "load_average": {"start": [0.1, 0.2, 0.3], "end": [0.1, 0.2, 0.3]},
        "settings": {
            "trials": 40,
            "repeats": 1,
            "connections": [100, 1000],
            "clients": [1, 32, 256],
            "duration_s": 0.5,
            "warmup_s": 0.1,
            "message_bytes": 64,
            "timeout_s": 5.0,
            "multi_timeout_s": 15.0,
            "ramp_limit": 1000,
        },
    }
    return Report(results, meta, **options)


def test_units_read_like_the_talk() -> None:
    assert fmt_time(5e-6) == "5 µs"
    assert fmt_time(31e-3) == "31 ms"
    assert fmt_time(1.4e-3) == "1.4 ms"
    assert fmt_time(6.5) == "6.5 s"
    assert fmt_time(None) == "—"
    assert fmt_bytes(3 * 1024**2) == "3 MiB"


def test_maximum_reads_like_the_talk() -> None:
    assert fmt_maximum(RampResult(20000, 20000, True, "completed", "", [])) == "≥ 20000"
    assert fmt_maximum(RampResult(49, 20000, False, "refused", "", [])) == "49 (refused)"


def test_columns_line_up() -> None:
    text = render(["Model", "Connect"], [["C", "5 µs"], ["a longer name", "31 ms"]])
    lines = text.splitlines()
    assert lines[0].startswith("Model") and "Connect" in lines[0]
    assert lines[2].index("5 µs") + len("5 µs") == lines[3].index("31 ms") + len("31 ms")  # right-aligned
    markdown = render(["Model", "Connect"], [["C", "5 µs"]], markdown=True).splitlines()
    assert markdown[1] == "| ----- | ------: |"
    assert len({len(line) for line in markdown}) == 1


def test_single_table_has_the_talks_columns_in_order() -> None:
    lines = report().single_table().splitlines()
    header = lines[0]
    assert header.index("Connect") < header.index("Exchange 1") < header.index("Exchange 2")
    assert [line.split("  ")[0] for line in lines[2:]] == ["C (myecho-c)", "inetd by xinetd, cps 50", "select"]
    assert "50 µs (p99 150 µs)" in lines[2]


def test_multi_table_columns_and_failures() -> None:
    text = report().multi_table()
    header = text.splitlines()[0]
    for column in ("100 connections", "100 messages", "1000 connections", "1000 messages", "Maximum"):
        assert column in header
    assert header.index("100 connections") < header.index("100 messages") < header.index("1000 connections")
    assert "fails (50/100)" in text
    assert "49 (refused)" in text
    assert "≥ 20000" in text


def test_talk_figures_beside_ours() -> None:
    single = report(with_talk=True).single_table()
    assert "talk: Connect" in single
    multi = report(with_talk=True).multi_table()
    c_row = next(line for line in multi.splitlines() if line.startswith("C (myecho-c)"))
    assert "6.5 s" in c_row and "> 1000" in c_row
    select_row = next(line for line in multi.splitlines() if line.startswith("select"))
    assert "57.5 s" in select_row  # "mono" in the talk


def test_ratios_against_the_c_reference() -> None:
    single = report(with_ratios=True).single_table()
    select_row = next(line for line in single.splitlines() if line.startswith("select"))
    assert "×2" in select_row
    c_row = next(line for line in single.splitlines() if line.startswith("C (myecho-c)"))
    assert "×1" in c_row


def test_skipped_models_are_said_not_shown() -> None:
    text = report().text()
    assert "Python uvloop" not in text.split("Notes")[0]
    assert "uvloop: not measured: uvloop is not installed" in text


def test_the_beyond_the_talk_tables() -> None:
    text = report().text()
    assert "32 clients: round trips (p50 / p99)" in text
    assert "server CPU / echo (32 clients)" in text
    assert "50.0k/s (20 µs / 80 µs)" in text
    assert "main process's own" in text  # the broker alone, beside its tree with the workers
    cost = text.split("main process's own")[1].splitlines()
    assert any("13 µs" in line and "7 µs" in line for line in cost), cost


def test_markdown_output() -> None:
    text = report().text(markdown=True)
    assert text.startswith("### Single connection")
    assert any(line.startswith("| C (myecho-c) ") for line in text.splitlines())


def test_json_validates_against_the_schema() -> None:
    document = report().as_json()
    validate(document)
    assert document["schema"] == "myecho-bench/1"
    assert [m["name"] for m in document["models"]] == ["c", "inetd-xinetd-cps50", "select", "uvloop"]
    assert document["models"][0]["single"]["exchange1"]["median"] == pytest.approx(200e-6)
    assert document["models"][0]["throughput"][1]["main_cpu_per_echo_s"] == pytest.approx(7e-6)


def test_the_schema_takes_the_interpreter_behind_the_unit_or_why_not() -> None:
    document = report().as_json()
    behind = {"command": "python3 -I -S -c pass", "unit": "u.socket", "runs": 3, "median_s": 0.07, "p99_s": 0.09}
    for figure in (behind, {"skipped": "not root"}):
        validate({**document, "interpreter_start_unit": figure})
    for broken in ({**behind, "runs": 0}, {"skipped": ""}, {**behind, "skipped": "both"}):
        with pytest.raises(jsonschema.ValidationError):
            validate({**document, "interpreter_start_unit": broken})


def test_the_schema_catches_a_broken_document() -> None:
    document = report().as_json()
    del document["models"][0]["single"]["connect"]
    with pytest.raises(jsonschema.ValidationError):
        validate(document)
    document = report().as_json()
    document["models"][0]["ramp"]["stop_reason"] = "gave up"
    with pytest.raises(jsonschema.ValidationError):
        validate(document)


def test_charts_when_matplotlib_is_there(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    written = report().write_charts(tmp_path)
    assert sorted(p.name for p in written) == ["cost.png", "multi.png", "single.png", "throughput.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


RESULTS = Path(__file__).parent.parent / "benchmarks" / "results" / "results.json"


def test_a_saved_run_reads_back_to_the_same_tables() -> None:
    original = report(with_talk=True, with_ratios=True)
    document = json.loads(json.dumps(original.as_json()))
    again = from_json(document, with_talk=True, with_ratios=True)
    assert again.text() == original.text()
    assert again.as_json() == original.as_json()
    with pytest.raises(ValueError, match="not a myecho-bench/1 document"):
        from_json({"schema": "other"})


def test_the_committed_results_read_back() -> None:
    document = json.loads(RESULTS.read_text())
    validate(document)
    saved = from_json(document)
    assert saved.as_json() == document
    assert "≥ 20000" in saved.multi_table()


def test_markdown_has_the_pipeline_table() -> None:
    """--markdown writes every table the terminal shows, the pipeline's included."""
    saved = from_json(json.loads(RESULTS.read_text()))
    terminal, markdown = saved.text(), saved.text(markdown=True)
    assert "ZeroMQ pipeline" in terminal
    lines = markdown.split("### ZeroMQ pipeline")[1].splitlines()
    assert lines[1].startswith("| Workers ")
    rows = [line for line in lines if line.startswith("| ") and line[2:3].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2", "4"]
    assert all(row.rstrip(" |").endswith("yes") for row in rows)


def axis_words(ax: object) -> list[str]:
    from matplotlib.axes import Axes

    assert isinstance(ax, Axes)
    return [label.get_text() for label in ax.get_yticklabels() if label.get_visible() and label.get_text()]


def test_charts_say_what_a_reader_needs(tmp_path: Path) -> None:
    """p99 whiskers, decade ticks in words, "≥" hatched, "fails" said, machine and date in the title."""
    pytest.importorskip("matplotlib")
    from matplotlib.collections import LineCollection

    from myecho.bench import charts

    drawn = dict(charts.figures(report()))
    assert sorted(drawn) == ["cost", "multi", "single", "throughput"]
    for figure in drawn.values():
        figure.canvas.draw()
        assert "2 cores, x, Linux 6; 2026-11-26 16:00 UTC" in figure.get_suptitle()
    (single,) = drawn["single"].axes
    words = axis_words(single)
    assert "100 µs" in words and "1 ms" in words
    assert not any("^" in word or "×" in word for word in words)
    # exchange 1 of C: median 200 µs, p99 600 µs: the whisker reaches the p99
    whiskers = [c for c in single.collections if isinstance(c, LineCollection)]
    tops = [segment[:, 1].max() for c in whiskers for segment in c.get_segments()]
    assert any(top == pytest.approx(600e-6) for top in tops)
    times, maxima = drawn["multi"].axes
    texts = [text.get_text() for text in maxima.texts]
    assert texts.count("≥ 20,000") == 2 and "49 (refused)" in texts
    assert sum(1 for patch in maxima.patches if patch.get_hatch()) == 2  # the two lower bounds, only
    assert "10k" in axis_words(maxima)
    assert "fails" in [text.get_text() for text in times.texts]
    rates, _ = drawn["throughput"].axes
    assert [text.get_text() for text in rates.get_legend().get_texts()] == ["1 client", "32 clients", "256 clients"]
    for figure in drawn.values():
        figure.clear()


def test_charts_from_a_saved_run(tmp_path: Path) -> None:
    """myecho-bench --from-json renders a saved run's tables and charts without measuring."""
    pytest.importorskip("matplotlib")
    result = subprocess.run(
        [command("myecho-bench"), "--from-json", str(RESULTS), "--charts", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Single connection" in result.stdout and "C (myecho-c)" in result.stdout
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["cost.png", "multi.png", "pipeline.png", "single.png", "throughput.png"]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    result = subprocess.run(
        [command("myecho-bench"), "--from-json", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "is not a myecho-bench --json file" in result.stderr


def test_progress_on_a_terminal_says_the_time_left(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(enabled=True)
    progress.tty = True
    progress.model(1, 3)
    progress("first")
    assert "left" not in capsys.readouterr().err  # nothing to go on yet
    assert progress.first_model is not None
    progress.first_model -= 60  # the first model took a minute: two more to go
    progress.model(2, 3)
    progress("second")
    assert "~2 min left] [2/3] second" in capsys.readouterr().err
    assert (fmt_eta(30), fmt_eta(150), fmt_eta(3900)) == ("30 s", "2 min", "1 h 05")


def test_no_chart_for_what_was_not_measured() -> None:
    """--scenarios single: one chart, not three of "not measured" bars."""
    pytest.importorskip("matplotlib")
    from myecho.bench import charts

    only_single = model("select", "select", 1.0)
    only_single.multi, only_single.throughput, only_single.ramp = [], [], None
    drawn = charts.figures(Report([only_single], report().meta))
    assert [name for name, _ in drawn] == ["single"]
