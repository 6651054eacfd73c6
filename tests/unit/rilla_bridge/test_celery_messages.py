"""Our hand-written queue messages (``rilla_bridge.celery_messages``) equal what Celery itself
puts on kombu's Redis list, field for field: Celery publishes through the production app
configuration (``workers.celery_app.make_celery``) onto a fakeredis broker, and every header and
property is compared except the ones that are random per message."""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
from celery import Celery
from kombu.transport import redis as kombu_redis

from rilla_bridge.celery_messages import (
    QUEUE_CALLRAIL,
    QUEUE_EVENTS,
    TASK_CALLRAIL_JOB,
    TASK_PROCESS_EVENT,
    process_event_message,
    queued_at,
    task_message,
    uuid4_pair,
)
from rilla_bridge.clock import FakeClock
from rilla_bridge.settings import Settings
from workers import tasks
from workers.celery_app import make_celery

EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
# The sending process's node name: Celery's anonymous one is "gen" + ours.
ORIGIN = f"{os.getpid()}@{socket.gethostname()}"
EVENT_ID = "ev_0190aabbccdd0011223344556677"
JOB = {"kind": "recording", "account": "227799611", "call": "CAL1", "event_id": EVENT_ID}
LIST_JOB = {"type": "list", "tenant": "acme-roofing", "run": "run_0190aabbccdd", "tries": 2,
            "start_date": "2026-01-01", "end_date": "2026-01-02", "lane": "backfill",
            "page_url": "https://api.callrail.com/v3/a/227799611/calls.json?after=CAL8d2e41b0"
                        "&fields=agent_email,company_id,tags&per_page=250"
                        "&relative_pagination=true", "granted_at": 1767225600.125}
# Arguments whose ``argsrepr`` differs: ours is repr(args), Celery's is its saferepr (at most
# 1024 characters, backslashes and newlines not escaped). A display-only header (logs,
# monitoring); no id or job we make has such characters or that length.
ODD_ARGS = [
    pytest.param(['ev_"quoted"\\and\u00e9'], id="backslash"),
    pytest.param(["line\nbreak"], id="newline"),
    pytest.param([{"note": "x" * 1100}], id="over-1024"),
]


@pytest.fixture
def celery_on_fakeredis(monkeypatch: pytest.MonkeyPatch
                        ) -> Iterator[tuple[Celery, fakeredis.FakeRedis]]:
    """The production Celery app (``make_celery``) whose broker is a fakeredis."""
    server = fakeredis.FakeServer()
    fake = fakeredis.FakeRedis(server=server)
    clients: list[fakeredis.FakeRedis] = []

    def create_client(self: Any, asynchronous: bool = False) -> fakeredis.FakeRedis:
        client = fakeredis.FakeRedis(server=server)
        clients.append(client)
        return client

    monkeypatch.setattr(kombu_redis.Channel, "_create_client", create_client)
    app = make_celery(Settings(redis_url="redis://127.0.0.1:1/0"))
    app.conf.broker_connection_retry_on_startup = False
    yield app, fake
    app.close()
    for c in clients:
        c.close()
    fake.close()


def _published(fake: fakeredis.FakeRedis, queue: str) -> dict[str, Any]:
    raw = fake.lrange(queue, 0, -1)
    assert len(raw) == 1, f"Celery did not put one message on {queue!r}"
    fake.delete(queue)
    message: dict[str, Any] = json.loads(raw[0])
    return message


def _celery_message(app: Celery, fake: fakeredis.FakeRedis, task: str, args: list[Any],
                    queue: str) -> dict[str, Any]:
    """What Celery publishes for ``task(*args)``, results ignored (as ours say)."""
    with app.producer_or_acquire() as producer:
        app.send_task(task, args=args, producer=producer, ignore_result=True)
    return _published(fake, queue)


def _take_random(message: dict[str, Any]) -> None:
    """Remove (after checking) what is random per message: the task id (also the root id and
    the correlation id) and kombu's delivery tag, each a fresh version 4 UUID."""
    headers, props = message["headers"], message["properties"]
    task_id = headers.pop("id")
    assert uuid.UUID(task_id).version == 4 and str(uuid.UUID(task_id)) == task_id
    assert headers.pop("root_id") == task_id          # no parent: its own root
    assert props.pop("correlation_id") == task_id
    tag = props.pop("delivery_tag")
    assert uuid.UUID(tag).version == 4 and tag != task_id


def _compare(app: Celery, ours: dict[str, Any], theirs: dict[str, Any], now: float) -> None:
    # Who sent it (not what): Celery's anonymous node name and its per-app reply queue for
    # RPC results, which we never use (no result backend).
    assert ours["headers"].pop("origin") == ORIGIN
    assert theirs["headers"].pop("origin") == "gen" + ORIGIN
    assert ours["properties"].pop("reply_to") == ""
    assert theirs["properties"].pop("reply_to") == app.thread_oid
    # Ours alone: when this copy was queued (the scheduler's sweeper reads it).
    assert ours["headers"].pop("rb_at") == round(now, 3)
    _take_random(ours)
    _take_random(theirs)
    # Everything else, every header and property, the body byte for byte.
    assert ours["headers"] == theirs["headers"]
    assert ours["properties"] == theirs["properties"]
    assert ours == theirs


@pytest.mark.parametrize(("task", "args", "queue"), [
    (TASK_PROCESS_EVENT, [EVENT_ID], QUEUE_EVENTS),
    (TASK_PROCESS_EVENT, ['ev_"quoted"\u00e9'], QUEUE_EVENTS),
    (TASK_CALLRAIL_JOB, [JOB], QUEUE_CALLRAIL),
    (TASK_CALLRAIL_JOB, [LIST_JOB], QUEUE_CALLRAIL),
])
def test_task_message_is_what_celery_publishes(
        celery_on_fakeredis: tuple[Celery, fakeredis.FakeRedis], clock: FakeClock, task: str,
        args: list[Any], queue: str) -> None:
    app, fake = celery_on_fakeredis
    theirs = _celery_message(app, fake, task, args, queue)
    ours = json.loads(task_message(task, args, queue, clock.now()))
    assert json.loads(base64.b64decode(ours["body"])) == [args, {}, EMBED]
    _compare(app, ours, theirs, clock.now())


@pytest.mark.parametrize("event_id", [EVENT_ID, 'ev_"quoted"\u00e9', "x" * 201])
def test_process_event_message_is_what_celery_publishes(
        celery_on_fakeredis: tuple[Celery, fakeredis.FakeRedis], clock: FakeClock,
        event_id: str) -> None:
    """The template intake fills in (and its slow path for odd ids) against Celery."""
    app, fake = celery_on_fakeredis
    clock.advance(0.1234)
    theirs = _celery_message(app, fake, TASK_PROCESS_EVENT, [event_id], QUEUE_EVENTS)
    ours = json.loads(process_event_message(event_id, clock.now()))
    assert json.loads(base64.b64decode(ours["body"])) == [[event_id], {}, EMBED]
    _compare(app, ours, theirs, clock.now())


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="argsrepr is repr(args); Celery's is saferepr(args, 1024)")
@pytest.mark.parametrize("args", ODD_ARGS)
def test_argsrepr_of_odd_arguments_differs_from_celery(
        celery_on_fakeredis: tuple[Celery, fakeredis.FakeRedis], clock: FakeClock,
        args: list[Any]) -> None:
    """Everything else is Celery's; only ``argsrepr`` differs (strict: passes once fixed)."""
    app, fake = celery_on_fakeredis
    theirs = _celery_message(app, fake, TASK_CALLRAIL_JOB, args, QUEUE_CALLRAIL)
    ours = json.loads(task_message(TASK_CALLRAIL_JOB, args, QUEUE_CALLRAIL, clock.now()))
    ours_repr, theirs_repr = ours["headers"].pop("argsrepr"), theirs["headers"].pop("argsrepr")
    _compare(app, ours, theirs, clock.now())
    assert ours_repr == repr(args)
    assert ours_repr == theirs_repr


@pytest.mark.parametrize(("task", "args", "queue"), [
    (tasks.process_event, [EVENT_ID], QUEUE_EVENTS),
    (tasks.callrail_job, [JOB], QUEUE_CALLRAIL),
])
def test_the_registered_tasks_publish_the_same_with_their_time_limit_filled_in(
        celery_on_fakeredis: tuple[Celery, fakeredis.FakeRedis], clock: FakeClock, task: Any,
        args: list[Any], queue: str) -> None:
    """``apply_async`` on the worker's own tasks: the same message, except that Celery writes
    the task's configured time limit where ours leave it empty, which a worker reads as "the
    task's own limit" (``timeout=time_limit or task.time_limit``): the same limit. Any other
    option a task gains (a soft limit, an expiry, a priority, another queue) fails here."""
    app, fake = celery_on_fakeredis
    with app.producer_or_acquire() as producer:
        task.apply_async(args=args, producer=producer)
    theirs = _published(fake, queue)
    ours = json.loads(task_message(task.name, args, queue, clock.now()))
    assert theirs["headers"]["timelimit"] == [task.time_limit, None]
    assert task.soft_time_limit is None
    assert ours["headers"]["timelimit"] == [None, None]
    theirs["headers"]["timelimit"] = [None, None]
    _compare(task.app, ours, theirs, clock.now())


def test_kombu_consumer_decodes_our_message(
        celery_on_fakeredis: tuple[Celery, fakeredis.FakeRedis], clock: FakeClock) -> None:
    """kombu's own Redis consumer reads the message we LPUSH and decodes Celery's protocol 2."""
    app, fake = celery_on_fakeredis
    message = process_event_message("ev_1", clock.now())
    fake.lpush(QUEUE_EVENTS, message)
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        got = channel.basic_get(QUEUE_EVENTS, no_ack=True)  # kombu's own _get: RPOP + decode
        assert got is not None
        assert got.headers["task"] == TASK_PROCESS_EVENT
        assert got.headers["id"] == json.loads(message)["headers"]["id"]
        assert got.content_type == "application/json"
        assert got.decode() == [["ev_1"], {}, EMBED]
        assert got.delivery_info["routing_key"] == QUEUE_EVENTS
        assert fake.llen(QUEUE_EVENTS) == 0


def test_ids_are_unique_and_rb_at_is_read_back(clock: FakeClock) -> None:
    now = clock.now()
    a, b = (json.loads(process_event_message("e", now)) for _ in range(2))
    assert a["headers"]["id"] != b["headers"]["id"]
    assert a["properties"]["delivery_tag"] != b["properties"]["delivery_tag"]
    assert queued_at(process_event_message("e", now)) == round(now, 3)
    clock.advance(12.3456)
    assert queued_at(process_event_message("e", clock.now())) == round(now + 12.3456, 3)
    assert queued_at(task_message(TASK_CALLRAIL_JOB, [JOB], QUEUE_CALLRAIL, 5.0)) == 5.0
    assert queued_at(b"not json") is None
    assert queued_at(json.dumps({"headers": {}})) is None
    assert queued_at(json.dumps({"headers": {"rb_at": "5"}})) is None
    assert queued_at(json.dumps([1])) is None


def _without_unique(message: dict[str, Any]) -> dict[str, Any]:
    m: dict[str, Any] = json.loads(json.dumps(message))
    for k in ("id", "root_id"):
        m["headers"].pop(k)
    for k in ("correlation_id", "delivery_tag"):
        m["properties"].pop(k)
    return m


@pytest.mark.parametrize("event_id", [
    EVENT_ID,                               # what intake makes: the template path
    'ev_"quoted"\\and\u00e9',               # anything else: the general path, same result
])
def test_process_event_message_equals_the_general_message(clock: FakeClock,
                                                          event_id: str) -> None:
    clock.advance(0.0005)    # rb_at is rounded to milliseconds on both paths
    fast = json.loads(process_event_message(event_id, clock.now()))
    general = json.loads(task_message(TASK_PROCESS_EVENT, [event_id], QUEUE_EVENTS, clock.now()))
    assert _without_unique(fast) == _without_unique(general)
    assert base64.b64decode(fast["body"]) == base64.b64decode(general["body"])
    assert json.loads(base64.b64decode(fast["body"])) == [[event_id], {}, EMBED]
    assert fast["headers"]["id"] == fast["headers"]["root_id"] == fast["properties"][
        "correlation_id"]
    assert fast["headers"]["rb_at"] == round(clock.now(), 3)
    assert isinstance(fast["headers"]["rb_at"], float)


def test_uuid4_pair_is_two_distinct_random_version_4_uuids() -> None:
    seen: set[str] = set()
    variants: set[str] = set()
    for _ in range(2000):
        pair = uuid4_pair()
        for text in pair:
            parsed = uuid.UUID(text)
            assert str(parsed) == text   # canonical form: lower-case hex, 8-4-4-4-12
            assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
            variants.add(text[19])
        seen.update(pair)
    assert len(seen) == 4000
    assert variants == set("89ab")   # the variant nibble takes all four values
