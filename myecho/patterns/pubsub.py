"""PUB/SUB: a publisher, subscribers with topic filters, a synchronised start.

Messages are ``[TOPIC, SEQUENCE, PAYLOAD]``, the sequence numbered per topic
from 0; subscribers filter by topic prefix (libzmq filters at the
publisher, so unwanted topics never cross the network).

The slow joiner. A subscriber that connects after the first messages went
out never sees them, and with tcp "after" can mean milliseconds after the
publisher started. The publisher therefore waits for ``subscribers`` of
them, and knows when they are really there from the subscriptions
themselves: it is an XPUB socket, which receives every new subscription.
Each subscriber, once connected, subscribes to its topics, to the control
topic ``\\xffmyecho/end``, and last to a topic unique to it,
``\\xffmyecho/hello/ID``. Subscriptions travel in order on one connection
(and a reconnection replays them in byte order, where ``\\xff`` is last),
so when a hello arrives the topics before it are in place: no sleep, no
second socket, no race.

Slow subscribers. The publisher never waits for anyone: each subscriber
has a queue of ``hwm`` messages at the publisher (plus its own ``hwm`` and
the kernel's buffers); when it is full, libzmq drops that subscriber's
messages, and only that subscriber's. Drops are counted where they can
be seen: at the subscriber, from gaps in each topic's sequence numbers,
logged as they happen and reported at the end, when the publisher's END
message (``\\xffmyecho/end``, with every topic's count) also reveals the
messages lost at the tail. END is repeated every 0.1 s until every
subscriber has left (a subscriber leaves on END; the XPUB socket sees its
hello withdrawn), for at most ``linger`` seconds (5): a slow subscriber
that drains its queue within that time still gets it. One that misses
every END stops after ``timeout`` seconds of silence and says so
(``end_seen``: false).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from collections import Counter
from typing import Any

import zmq

from myecho.core.endpoints import BIND, CONNECT, attach

Context = zmq.Context[zmq.Socket[bytes]]
STREAM = "tcp://127.0.0.1:11149"
CONTROL = b"\xffmyecho/"
END = CONTROL + b"end"
HELLO = CONTROL + b"hello/"
END_EVERY, END_AT_LEAST = 0.1, 3
TICK = 0.1
log = logging.getLogger("myecho")


class NoSubscribers(RuntimeError):
    """Fewer subscribers than asked for came in time."""


def publish(
    context: Context,
    count: int,
    topics: list[str],
    subscribers: int = 0,
    stream: list[str] | None = None,
    size: int = 16,
    rate: float = 0.0,
    hwm: int = 1000,
    wait: float = 30.0,
    stop: threading.Event | None = None,
    linger: float = 5.0,
) -> dict[str, Any]:
    """Publish ``count`` messages over ``topics`` in turn, once ``subscribers`` are in."""
    stop = stop or threading.Event()
    pub = context.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, hwm)
    published: Counter[str] = Counter()
    try:
        attach(pub, stream or [STREAM], BIND)
        hellos: set[bytes] = set()
        gather(pub, hellos, subscribers, wait, stop)
        present = len(hellos)
        started = time.monotonic()
        body = b"." * size
        names = [topic.encode() for topic in topics]
        for n in range(count):
            if stop.is_set():
                break
            topic = names[n % len(names)]
            seq = published[topics[n % len(names)]]
            pub.send_multipart([topic, seq.to_bytes(8, "big"), body])  # never blocks: PUB drops
            published[topics[n % len(names)]] += 1
            if rate:
                time.sleep(max(0.0, started + (n + 1) / rate - time.monotonic()))
        seconds = time.monotonic() - started
        totals = json.dumps(dict(published)).encode()
        deadline = time.monotonic() + linger
        for n in itertools.count():  # END until every subscriber left (or linger ends)
            pub.send_multipart([END, totals])
            time.sleep(END_EVERY)
            gather(pub, hellos, 0, 0, stop)
            if stop.is_set() or time.monotonic() >= deadline or (n >= END_AT_LEAST and not hellos):
                break
    finally:
        pub.close(linger=0)
    total = sum(published.values())
    return {
        "published": dict(published),
        "subscribers": present,
        "seconds": round(seconds, 6),
        "messages_per_second": round(total / seconds) if seconds > 0 else None,
    }


def gather(pub: zmq.Socket[bytes], hellos: set[bytes], wanted: int, wait: float, stop: threading.Event) -> None:
    """Read subscriptions until ``wanted`` subscribers said hello (or ``wait`` ends).

    ``hellos`` holds the subscribers present: a subscriber that leaves
    drops its subscriptions, its hello with them."""
    deadline = time.monotonic() + wait
    while not stop.is_set():
        try:
            event = pub.recv(zmq.NOBLOCK)
        except zmq.Again:
            if len(hellos) >= wanted:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoSubscribers(f"{len(hellos)} of {wanted} subscribers came in {wait:g} s") from None
            pub.poll(int(min(left, TICK) * 1000), zmq.POLLIN)
            continue
        if event[1:].startswith(HELLO):
            (hellos.add if event[0] == 1 else hellos.discard)(event[1:])


def subscribe(
    context: Context,
    topics: list[str],
    stream: list[str] | None = None,
    delay: float = 0.0,
    hwm: int = 1000,
    timeout: float = 10.0,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Receive until the publisher's END (or ``timeout`` s of silence); count gaps."""
    stop = stop or threading.Event()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, hwm)
    received: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    expect: dict[bytes, int] = {}
    unwanted = 0
    end: dict[str, int] | None = None
    wanted = [topic.encode() for topic in topics] or [b""]
    started = time.monotonic()
    said = 0.0
    try:
        attach(sub, stream or [STREAM], CONNECT)
        for topic in wanted:
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        sub.setsockopt(zmq.SUBSCRIBE, END)
        sub.setsockopt(zmq.SUBSCRIBE, HELLO + os.urandom(8).hex().encode())  # last: "my topics are in"
        quiet_since = time.monotonic()
        while not stop.is_set() and time.monotonic() - quiet_since < timeout:
            if not sub.poll(int(TICK * 1000), zmq.POLLIN):
                continue
            frames = sub.recv_multipart()
            quiet_since = time.monotonic()
            topic = frames[0]
            if topic == END:
                end = json.loads(frames[1])
                break
            if not any(topic.startswith(prefix) for prefix in wanted) or len(frames) != 3:
                unwanted += 1
                continue
            name = topic.decode(errors="replace")
            seq = int.from_bytes(frames[1], "big")
            gap = seq - expect.get(topic, 0)
            if gap > 0:
                dropped[name] += gap
                if quiet_since - said >= 1.0:  # once a second at most
                    log.warning("%d messages dropped so far: this subscriber is too slow", sum(dropped.values()))
                    said = quiet_since
            expect[topic] = seq + 1
            received[name] += 1
            if delay:
                time.sleep(delay)
    finally:
        sub.close(linger=0)
    if end is not None:  # the publisher's totals also count what was lost at the tail
        for name, total in end.items():
            if any(name.encode().startswith(prefix) for prefix in wanted):
                dropped[name] = total - received[name]
    if sum(dropped.values()):
        log.warning(
            "%d of %d messages dropped: this subscriber was too slow for the stream",
            sum(dropped.values()),
            sum(dropped.values()) + sum(received.values()),
        )
    return {
        "topics": topics,
        "received": dict(sorted(received.items())),
        "dropped": dict(sorted((k, v) for k, v in dropped.items() if v)),
        "dropped_total": sum(dropped.values()),
        "unwanted": unwanted,
        "end_seen": end is not None,
        "seconds": round(time.monotonic() - started, 6),
    }
