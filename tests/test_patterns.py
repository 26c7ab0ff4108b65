"""The pipeline (PUSH/PULL) and PUB/SUB, in one process (inproc, threads) and as commands."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
from support import command

from myecho.bench import measure
from myecho.bench.harness import free_port
from myecho.core.endpoints import EndpointError, attach, split
from myecho.patterns import pipeline, pubsub

Context = zmq.Context[zmq.Socket[bytes]]


class Thread(threading.Thread):
    """A thread that keeps what its function returned."""

    def __init__(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.call = (target, args, kwargs)
        self.result: Any = None

    def run(self) -> None:
        target, args, kwargs = self.call
        self.result = target(*args, **kwargs)

    def outcome(self, timeout: float = 30) -> Any:
        self.join(timeout)
        assert not self.is_alive(), f"{self.call[0].__name__} still running after {timeout} s"
        return self.result


def test_endpoint_specs(context: Context) -> None:
    assert split("tcp://h:1", "@") == ("@", "tcp://h:1")
    assert split(">ipc:///x", "@") == (">", "ipc:///x")
    assert split("@inproc://x", ">") == ("@", "inproc://x")
    with pytest.raises(EndpointError, match="not a ZeroMQ URL"):
        split("localhost:11144", "@")
    sock = context.socket(zmq.PULL)
    assert attach(sock, ["tcp://127.0.0.1:*"], "@")[0].startswith("tcp://127.0.0.1:")
    assert attach(sock, ["tcp://[::1]:*"], "@")[0].startswith("tcp://[::1]:")
    with pytest.raises(EndpointError, match="cannot bind"):
        attach(sock, ["tcp://192.0.2.1:1"], "@")  # not an address of this host
    sock.close()


@pytest.mark.parametrize("transport", ["inproc", "ipc", "tcp"])
def test_pipeline_every_job_exactly_once(transport: str) -> None:
    report = pipeline.run(workers=3, count=3000, transport=transport)
    assert report["exactly_once"], report
    assert report["done"] == 3000
    assert len(report["workers"]) == 3 and min(report["workers"].values()) > 0, report["workers"]


def test_pipeline_reversed_workers_bind(tmp_path: Path, context: Context) -> None:
    """Each worker binds its jobs and results endpoints; ventilator and sink connect to them."""
    stop = threading.Event()
    urls = {name: f"ipc://{tmp_path}/{name}" for name in ("jobs1", "jobs2", "results1", "results2", "control")}
    crew = [
        Thread(pipeline.work, context, ["@" + urls[f"jobs{n}"]], ["@" + urls[f"results{n}"]], stop=stop) for n in (1, 2)
    ]
    for worker in crew:
        worker.start()
    sink = Thread(pipeline.collect, context, [">" + urls["results1"], ">" + urls["results2"]], [urls["control"]])
    sink.start()
    sent = pipeline.ventilate(context, 2000, 32, [">" + urls["jobs1"], ">" + urls["jobs2"]], [urls["control"]])
    report = sink.outcome()
    stop.set()
    assert sorted(worker.outcome() for worker in crew) == sorted(report["workers"].values())
    assert report["exactly_once"] and sent["sink"] == report


def test_the_sink_sees_duplicates_missing_and_corrupt_jobs(context: Context) -> None:
    """A faulty worker: job 0 twice, job 1 never, job 2 with a wrong payload."""
    ready = threading.Event()
    sink = Thread(
        pipeline.collect, context, ["inproc://results"], ["inproc://control"], timeout=0.5, settle=0.1, ready=ready
    )
    sink.start()
    ready.wait(5)
    faulty = context.socket(zmq.PUSH)
    faulty.connect("inproc://results")
    batch = b"12345678"
    done = [[pipeline.DONE, batch, (job).to_bytes(8, "big"), b"faulty", pipeline.payload(job, 8)] for job in (0, 0, 3)]
    done.append([pipeline.DONE, batch, (2).to_bytes(8, "big"), b"faulty", b"garbage!"])
    done.append([pipeline.DONE, b"oldbatch", (3).to_bytes(8, "big"), b"faulty", pipeline.payload(3, 8)])
    faulty.send_multipart(done[0])  # before the batch is announced: kept for later
    ventilator = context.socket(zmq.DEALER)
    ventilator.connect("inproc://control")
    ventilator.send_multipart([pipeline.BATCH, batch, (4).to_bytes(8, "big"), (8).to_bytes(8, "big")])
    for message in done[1:]:
        faulty.send_multipart(message)
    report = sink.outcome()
    assert (report["done"], report["missing"], report["duplicates"]) == (2, 2, 1)
    assert (report["corrupt"], report["stale"], report["exactly_once"]) == (1, 1, False)
    assert ventilator.poll(2000)
    verdict = ventilator.recv_multipart()
    assert verdict[0] == pipeline.VERDICT and json.loads(verdict[1]) == report
    faulty.close()
    ventilator.close()


def test_pipeline_as_processes() -> None:
    """Sink, two worker processes and the ventilator: the commands, over tcp."""
    report = measure.pipeline_rate(workers=2, jobs=4000, transport="tcp")
    assert report["exactly_once"] and report["done"] == 4000, report
    assert report["workers"] == len(report["per_worker"]) == 2


def test_pipeline_commands_fail_in_one_line() -> None:
    jobs = f"tcp://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [command("myecho"), "pipeline", "ventilator", "--jobs", jobs, "--workers", "1", "--timeout", "0.3"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "myecho pipeline ventilator: 1 workers still missing after 0.3 s"
    result = subprocess.run(
        [command("myecho"), "pubsub", "publisher", "--stream", "nowhere"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1 and "not a ZeroMQ URL" in result.stderr


def test_pubsub_filters_topics_and_loses_nothing_at_the_start(context: Context) -> None:
    """Two subscribers join; the publisher starts only then: both see message 0 of every topic."""
    url = f"tcp://127.0.0.1:{free_port()}"
    news = Thread(pubsub.subscribe, context, ["news"], [url], hwm=100_000)
    everything = Thread(pubsub.subscribe, context, [], [url], hwm=100_000)
    news.start()
    everything.start()
    published = pubsub.publish(context, 3000, ["news", "weather", "sport"], subscribers=2, stream=[url], hwm=100_000)
    assert published["subscribers"] == 2
    assert published["published"] == {"news": 1000, "weather": 1000, "sport": 1000}
    only_news, all_of_it = news.outcome(), everything.outcome()
    assert only_news["received"] == {"news": 1000} and only_news["unwanted"] == 0
    assert all_of_it["received"] == published["published"]
    assert only_news["dropped_total"] == all_of_it["dropped_total"] == 0  # the first messages too
    assert only_news["end_seen"] and all_of_it["end_seen"]


def test_pubsub_reversed_subscriber_binds(context: Context) -> None:
    sub = Thread(pubsub.subscribe, context, ["a"], ["@inproc://sub"])
    sub.start()
    published = pubsub.publish(context, 100, ["a", "b"], subscribers=1, stream=[">inproc://sub"])
    assert sub.outcome()["received"] == {"a": 50}
    assert published["subscribers"] == 1


def test_a_publisher_without_its_subscribers_gives_up(context: Context) -> None:
    with pytest.raises(pubsub.NoSubscribers, match=r"0 of 1 subscribers came in 0\.2 s"):
        pubsub.publish(context, 10, ["a"], subscribers=1, stream=["inproc://nobody"], wait=0.2)


def test_a_slow_subscriber_loses_its_own_messages_and_counts_them(tmp_path: Path) -> None:
    """The commands: a fast and a slow subscriber; only the slow one loses, and it says how many."""
    url = f"ipc://{tmp_path}/stream"
    myecho = command("myecho")
    subscribers = [
        subprocess.Popen(
            [myecho, "pubsub", "subscriber", "--stream", url, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for extra in ([], ["--delay", "2", "--hwm", "50"])  # the slow one: 500 messages/s at most
    ]
    publisher = subprocess.run(
        [
            myecho,
            "pubsub",
            "publisher",
            "--stream",
            "@" + url,
            "--subscribers",
            "2",
            "--count",
            "3000",
            "--rate",
            "3000",
            "--size",
            "2000",
            "--topic",
            "a",
            "--topic",
            "b",
        ],
        capture_output=True,
        timeout=60,
    )
    assert publisher.returncode == 0, publisher.stderr.decode()
    published = json.loads(publisher.stdout)
    assert published["seconds"] < 3  # the slow subscriber never slowed the publisher down
    (fast_out, _), (slow_out, slow_err) = (proc.communicate(timeout=60) for proc in subscribers)
    fast, slow = json.loads(fast_out), json.loads(slow_out)
    assert fast["received"] == {"a": 1500, "b": 1500} and fast["dropped_total"] == 0
    assert slow["end_seen"]
    assert slow["dropped_total"] > 0
    for topic in ("a", "b"):  # every message is either received or counted as dropped
        assert slow["received"][topic] + slow["dropped"][topic] == 1500
    assert b"messages dropped: this subscriber was too slow for the stream" in slow_err
