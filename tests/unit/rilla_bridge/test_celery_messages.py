"""Our hand-written queue messages (``rilla_bridge.celery_messages``) equal what Celery itself
puts on kombu's Redis list: Celery publishes through the production app configuration
(``workers.celery_app.make_celery``) onto a fakeredis broker, and every header and property is
compared except the ones that are random per message. ``task_message`` (the CallRail jobs)
is Celery's message field for field; the ``process_event`` message the dispatch script writes
differs on purpose only in its body's encoding (plain JSON, ``body_encoding`` utf-8, so a Lua
script can write it) and in its task id (the event id and the dispatch time, also the delivery
tag); decoded, its body is Celery's."""

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
    PROCESS_EVENT_TEMPLATE,
    QUEUE_CALLRAIL,
    QUEUE_EVENTS,
    TASK_CALLRAIL_JOB,
    TASK_PROCESS_EVENT,
    message_args,
    process_event_message,
    process_event_template,
    task_message,
)
from rilla_bridge.clock import FakeClock, ms
from rilla_bridge.lifecycle import make_lifecycle
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import parse_tenants
from tests.fakes import TENANTS
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


TASK_ID = f"{EVENT_ID}.1767225600123"     # what the dispatch script makes: id.now_ms


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


def _take_ours(message: dict[str, Any], task_id: str) -> None:
    """Our process_event message's task id: the given one, also its root, correlation id and
    delivery tag (unique per dispatch: the event id and the dispatch time in ms)."""
    headers, props = message["headers"], message["properties"]
    assert headers.pop("id") == headers.pop("root_id") == task_id
    assert props.pop("correlation_id") == props.pop("delivery_tag") == task_id


def _compare(app: Celery, ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    # Who sent it (not what): Celery's anonymous node name and its per-app reply queue for
    # RPC results, which we never use (no result backend).
    assert ours["headers"].pop("origin") == ORIGIN
    assert theirs["headers"].pop("origin") == "gen" + ORIGIN
    assert ours["properties"].pop("reply_to") == ""
    assert theirs["properties"].pop("reply_to") == app.thread_oid
    # Everything else, every header and property, the body byte for byte.
    assert ours["headers"] == theirs["headers"]
    assert ours["properties"] == theirs["properties"]
    assert ours == theirs


def _decoded_body(message: dict[str, Any]) -> Any:
    """The body as kombu decodes it, by its ``body_encoding`` (which is then removed)."""
    encoding = message["properties"].pop("body_encoding")
    body = message.pop("body")
    if encoding == "base64":
        return json.loads(base64.b64decode(body))
    assert encoding == "utf-8"
    return json.loads(body)


@pytest.mark.parametrize(("task", "args", "queue"), [
    (TASK_CALLRAIL_JOB, [JOB], QUEUE_CALLRAIL),
    (TASK_CALLRAIL_JOB, [LIST_JOB], QUEUE_CALLRAIL),
    (TASK_PROCESS_EVENT, [EVENT_ID, "acme"], QUEUE_EVENTS),
])
def test_task_message_is_what_celery_publishes(
        celery_on_fakeredis: tuple[Celery, fakeredis.FakeRedis], task: str,
        args: list[Any], queue: str) -> None:
    app, fake = celery_on_fakeredis
    theirs = _celery_message(app, fake, task, args, queue)
    ours = json.loads(task_message(task, args, queue))
    assert json.loads(base64.b64decode(ours["body"])) == [args, {}, EMBED]
    _take_random(ours)
    _take_random(theirs)
    _compare(app, ours, theirs)


@pytest.mark.parametrize(("event_id", "tenant"), [
    (EVENT_ID, "acme"), ("ev_x", "acme-roofing-2"), ("e" * 200, "t:a.b_c-d")])
def test_process_event_message_is_what_celery_publishes_but_its_body_encoding(
        celery_on_fakeredis: tuple[Celery, fakeredis.FakeRedis], event_id: str,
        tenant: str) -> None:
    app, fake = celery_on_fakeredis
    theirs = _celery_message(app, fake, TASK_PROCESS_EVENT, [event_id, tenant], QUEUE_EVENTS)
    text = process_event_message(event_id, tenant, TASK_ID)
    ours = json.loads(text)
    # The body: plain JSON text (kombu passes it through), the same document as Celery's.
    assert ours["properties"]["body_encoding"] == "utf-8"
    assert theirs["properties"]["body_encoding"] == "base64"
    assert _decoded_body(ours) == _decoded_body(theirs) == [[event_id, tenant], {}, EMBED]
    _take_ours(ours, TASK_ID)
    _take_random(theirs)
    _compare(app, ours, theirs)


def test_the_template_is_the_message_cut_where_its_values_go() -> None:
    parts = process_event_template()
    assert parts == PROCESS_EVENT_TEMPLATE
    assert len(parts) % 2 == 1
    names = parts[1::2]
    assert set(names) == {"id", "tenant", "tid"}
    # The task id appears four times (id, root id, correlation id, delivery tag); the event id
    # in the body and in argsrepr; so does the tenant.
    assert (names.count("tid"), names.count("id"), names.count("tenant")) == (4, 2, 2)
    values = {"id": EVENT_ID, "tenant": "acme", "tid": TASK_ID}
    joined = "".join(p if i % 2 == 0 else values[p] for i, p in enumerate(parts))
    assert joined == process_event_message(EVENT_ID, "acme", TASK_ID)


def test_the_dispatch_script_writes_the_same_message(fake_redis: fakeredis.FakeRedis,
                                                     clock: FakeClock) -> None:
    lc = make_lifecycle(fake_redis, clock, Settings(), parse_tenants(TENANTS, env={}))
    clock.advance(0.123)
    eid = lc.receive(source="callrail", tenant="beta", kind="post_call", body=b"{}",
                     call_id=None).event_id
    queue: Any = fake_redis.lrange(QUEUE_EVENTS, 0, -1)
    (written,) = queue
    assert written.decode() == process_event_message(eid, "beta", f"{eid}.{ms(clock.now())}")


@pytest.mark.parametrize("bad", ['ev_"quoted"', "ev x", "", "e" * 201, "ev\n", "é"])
def test_process_event_message_takes_plain_tokens_only(bad: str) -> None:
    for args in ((bad, "acme", TASK_ID), (EVENT_ID, bad, TASK_ID), (EVENT_ID, "acme", bad)):
        with pytest.raises(ValueError, match="plain tokens"):
            process_event_message(*args)


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="argsrepr is repr(args); Celery's is saferepr(args, 1024)")
@pytest.mark.parametrize("args", ODD_ARGS)
def test_argsrepr_of_odd_arguments_differs_from_celery(
        celery_on_fakeredis: tuple[Celery, fakeredis.FakeRedis], args: list[Any]) -> None:
    """Everything else is Celery's; only ``argsrepr`` differs (strict: passes once fixed)."""
    app, fake = celery_on_fakeredis
    theirs = _celery_message(app, fake, TASK_CALLRAIL_JOB, args, QUEUE_CALLRAIL)
    ours = json.loads(task_message(TASK_CALLRAIL_JOB, args, QUEUE_CALLRAIL))
    ours_repr, theirs_repr = ours["headers"].pop("argsrepr"), theirs["headers"].pop("argsrepr")
    _take_random(ours)
    _take_random(theirs)
    _compare(app, ours, theirs)
    assert ours_repr == repr(args)
    assert ours_repr == theirs_repr


def test_the_registered_tasks_publish_the_same_with_their_time_limit_filled_in(
        celery_on_fakeredis: tuple[Celery, fakeredis.FakeRedis]) -> None:
    """``apply_async`` on the worker's own tasks: the same messages, except that Celery writes
    the task's configured time limit where ours leave it empty, which a worker reads as "the
    task's own limit" (``timeout=time_limit or task.time_limit``): the same limit. Any other
    option a task gains (a soft limit, an expiry, a priority, another queue) fails here."""
    app, fake = celery_on_fakeredis
    for task, args, queue in ((tasks.process_event, [EVENT_ID, "acme"], QUEUE_EVENTS),
                              (tasks.callrail_job, [JOB], QUEUE_CALLRAIL)):
        with app.producer_or_acquire() as producer:
            task.apply_async(args=args, producer=producer)
        theirs = _published(fake, queue)
        if task is tasks.process_event:
            ours = json.loads(process_event_message(EVENT_ID, "acme", TASK_ID))
            assert _decoded_body(ours) == _decoded_body(theirs)
            _take_ours(ours, TASK_ID)
        else:
            ours = json.loads(task_message(task.name, args, queue))
            _take_random(ours)
        _take_random(theirs)
        assert theirs["headers"]["timelimit"] == [task.time_limit, None]
        assert task.soft_time_limit is None
        assert ours["headers"]["timelimit"] == [None, None]
        theirs["headers"]["timelimit"] = [None, None]
        _compare(task.app, ours, theirs)


def test_kombu_consumer_decodes_our_message(
        celery_on_fakeredis: tuple[Celery, fakeredis.FakeRedis]) -> None:
    """kombu's own Redis consumer reads the message we LPUSH and decodes Celery's protocol 2."""
    app, fake = celery_on_fakeredis
    message = process_event_message("ev_1", "acme", "ev_1.1767225600000")
    fake.lpush(QUEUE_EVENTS, message)
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        got = channel.basic_get(QUEUE_EVENTS, no_ack=True)  # kombu's own _get: RPOP + decode
        assert got is not None
        assert got.headers["task"] == TASK_PROCESS_EVENT
        assert got.headers["id"] == "ev_1.1767225600000"
        assert got.content_type == "application/json"
        assert got.decode() == [["ev_1", "acme"], {}, EMBED]
        assert got.delivery_info["routing_key"] == QUEUE_EVENTS
        assert fake.llen(QUEUE_EVENTS) == 0


def test_message_args_reads_both_body_encodings() -> None:
    assert message_args(process_event_message("ev_1", "acme", "t.1")) == ["ev_1", "acme"]
    assert message_args(process_event_message("ev_1", "acme", "t.1").encode()) == [
        "ev_1", "acme"]
    assert message_args(task_message(TASK_CALLRAIL_JOB, [JOB], QUEUE_CALLRAIL)) == [JOB]
    for junk in (b"not json", "{}", json.dumps({"body": "x", "properties": {}}),
                 json.dumps({"body": "e30=", "properties": {"body_encoding": "base64"}}),
                 json.dumps([1]), json.dumps({"body": "[]", "properties": {}})):
        assert message_args(junk) is None, junk


def test_task_message_ids_are_unique_per_message() -> None:
    a, b = (json.loads(task_message(TASK_CALLRAIL_JOB, [JOB], QUEUE_CALLRAIL))
            for _ in range(2))
    assert a["headers"]["id"] != b["headers"]["id"]
    assert a["properties"]["delivery_tag"] != b["properties"]["delivery_tag"]
