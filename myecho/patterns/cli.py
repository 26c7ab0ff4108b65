"""``myecho pipeline ...`` and ``myecho pubsub ...``: arguments, then a pattern runs.

Each command prints one JSON object on stdout (its report) and exits 0,
or 1 when the pattern failed: a sink that did not see every job exactly
once, a publisher whose subscribers did not come, an endpoint that cannot
be bound or connected.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from typing import Any

from myecho.patterns import pipeline, pubsub


def add_pattern_commands(commands: Any, parser_class: type[argparse.ArgumentParser], rule: str) -> None:
    """The ``pipeline`` and ``pubsub`` sub-commands of ``myecho``."""
    jobs_help = f"the jobs endpoint (default: {pipeline.JOBS}; the ventilator binds it); {rule}"
    results_help = f"the results endpoint (default: {pipeline.RESULTS}; the sink binds it); {rule}"
    control_help = f"the sink's control endpoint (default: {pipeline.CONTROL}; the sink binds it); {rule}"
    pipe = commands.add_parser(
        "pipeline",
        help="the pipeline pattern: ventilator, workers, sink (PUSH/PULL)",
        description="A ventilator deals a batch of jobs to any number of workers (PUSH/PULL); the sink "
        "collects the results and checks that every job was done exactly once. Start the sink and the "
        "workers, then the ventilator; or try 'myecho pipeline run'.",
    )
    roles = pipe.add_subparsers(dest="role", required=True, metavar="ROLE", parser_class=parser_class)
    vent = roles.add_parser(
        "ventilator",
        help="send one batch of jobs, wait for the sink's verdict",
        description="Send one batch of jobs, wait for the sink's verdict; exit 0 iff exactly once.",
    )
    vent.add_argument("--count", type=int, default=10000, metavar="N", help="jobs in the batch (default: 10000)")
    vent.add_argument("--size", type=int, default=16, metavar="BYTES", help="payload of each job (default: 16)")
    vent.add_argument("--jobs", action="append", metavar="URL", help=jobs_help)
    vent.add_argument("--control", action="append", metavar="URL", help=control_help)
    vent.add_argument("--hwm", type=int, default=10, metavar="N", help="jobs queued per worker (default: 10)")
    vent.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="wait until N workers are connected, so that all get a fair share (tcp, ipc; default: 0)",
    )
    vent.add_argument(
        "--timeout",
        type=float,
        default=30,
        metavar="SECONDS",
        help="give up when no worker takes a job, or no verdict comes, for this long (default: 30)",
    )
    work = roles.add_parser(
        "worker", help="do jobs until SIGTERM", description="Take jobs, push results, until SIGTERM/SIGINT."
    )
    work.add_argument("--jobs", action="append", metavar="URL", help=jobs_help)
    work.add_argument("--results", action="append", metavar="URL", help=results_help)
    work.add_argument("--cost", type=float, default=0, metavar="MS", help="pretend each job takes MS milliseconds")
    work.add_argument("--hwm", type=int, default=10, metavar="N", help="jobs queued here (default: 10)")
    sink = roles.add_parser(
        "sink", help="collect one batch and check it", description="Collect one batch; exit 0 iff exactly once."
    )
    sink.add_argument("--results", action="append", metavar="URL", help=results_help)
    sink.add_argument("--control", action="append", metavar="URL", help=control_help)
    sink.add_argument(
        "--timeout", type=float, default=10, metavar="SECONDS", help="give up after this much silence (default: 10)"
    )
    sink.add_argument(
        "--settle", type=float, default=0.2, metavar="SECONDS", help="wait for duplicates after the last job"
    )
    demo = roles.add_parser(
        "run",
        help="the whole pipeline in one process",
        description="Sink, workers and ventilator as threads of one process: a demo and a quick measure.",
    )
    demo.add_argument("--workers", type=int, default=2, metavar="N", help="default: 2")
    demo.add_argument("--count", type=int, default=10000, metavar="N", help="jobs (default: 10000)")
    demo.add_argument("--size", type=int, default=16, metavar="BYTES", help="payload of each job (default: 16)")
    demo.add_argument("--transport", choices=("inproc", "ipc", "tcp"), default="inproc", help="default: inproc")
    demo.add_argument("--cost", type=float, default=0, metavar="MS", help="pretend each job takes MS milliseconds")

    stream_help = f"the stream (default: {pubsub.STREAM}; the publisher binds it); {rule}"
    ps = commands.add_parser(
        "pubsub",
        help="the PUB/SUB pattern: a publisher, subscribers with topic filters",
        description="A publisher sends messages over topics; subscribers take the topics they name. The "
        "publisher starts when --subscribers have joined (no slow joiner); a subscriber that cannot keep up "
        "loses messages past its high-water mark, counted and reported by that subscriber.",
    )
    roles = ps.add_subparsers(dest="role", required=True, metavar="ROLE", parser_class=parser_class)
    pub = roles.add_parser("publisher", help="publish, then exit", description="Publish COUNT messages, then END.")
    pub.add_argument("--stream", action="append", metavar="URL", help=stream_help)
    pub.add_argument("--count", type=int, default=10000, metavar="N", help="messages (default: 10000)")
    pub.add_argument(
        "--topic", action="append", metavar="TOPIC", help="a topic, used in turn (repeatable; default: news)"
    )
    pub.add_argument(
        "--subscribers", type=int, default=0, metavar="N", help="wait until N subscribers are in (default: 0)"
    )
    pub.add_argument("--wait", type=float, default=30, metavar="SECONDS", help="how long to wait for them")
    pub.add_argument("--size", type=int, default=16, metavar="BYTES", help="payload (default: 16)")
    pub.add_argument("--rate", type=float, default=0, metavar="PER_SECOND", help="default: as fast as possible")
    pub.add_argument(
        "--hwm", type=int, default=1000, metavar="N", help="messages queued per subscriber, then dropped (1000)"
    )
    pub.add_argument(
        "--linger",
        type=float,
        default=5,
        metavar="SECONDS",
        help="repeat END until every subscriber left, at most this long (default: 5)",
    )
    sub = roles.add_parser(
        "subscriber", help="receive until the publisher's END", description="Receive, count, report drops."
    )
    sub.add_argument("--stream", action="append", metavar="URL", help=stream_help)
    sub.add_argument(
        "--topic", action="append", metavar="PREFIX", help="a topic prefix to take (repeatable; default: all)"
    )
    sub.add_argument("--delay", type=float, default=0, metavar="MS", help="be slow: MS milliseconds per message")
    sub.add_argument("--hwm", type=int, default=1000, metavar="N", help="messages queued here (default: 1000)")
    sub.add_argument(
        "--timeout", type=float, default=10, metavar="SECONDS", help="stop after this much silence (default: 10)"
    )


def run_pattern(options: dict[str, Any]) -> int:
    logging.basicConfig(format="myecho %(levelname)s: %(message)s", level=logging.INFO, stream=sys.stderr)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    import zmq

    from myecho.core.endpoints import EndpointError

    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    command, role, o = options["command"], options["role"], argparse.Namespace(**options)
    ok = True
    try:
        if command == "pipeline" and role == "ventilator":
            report = pipeline.ventilate(context, o.count, o.size, o.jobs, o.control, o.hwm, o.timeout, stop, o.workers)
            ok = bool(report["sink"] and report["sink"]["exactly_once"])
        elif command == "pipeline" and role == "worker":
            done = pipeline.work(context, o.jobs, o.results, o.cost / 1000, o.hwm, stop)
            report = {"done": done}
        elif command == "pipeline" and role == "sink":
            report = pipeline.collect(context, o.results, o.control, o.timeout, o.settle, stop)
            ok = report["exactly_once"]
        elif command == "pipeline":
            report = pipeline.run(o.workers, o.count, o.size, o.transport, o.cost / 1000)
            ok = report["exactly_once"]
        elif role == "publisher":
            topics = o.topic or ["news"]
            report = pubsub.publish(
                context, o.count, topics, o.subscribers, o.stream, o.size, o.rate, o.hwm, o.wait, stop, o.linger
            )
        else:
            report = pubsub.subscribe(context, o.topic or [], o.stream, o.delay / 1000, o.hwm, o.timeout, stop)
    except (EndpointError, pipeline.Stalled, pubsub.NoSubscribers) as error:
        print(f"myecho {command} {role}: {error}", file=sys.stderr)
        return 1
    finally:
        context.term()
    print(json.dumps(report), flush=True)
    return 0 if ok else 1
