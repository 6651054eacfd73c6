"""Our hand-written queue message equals what Celery itself puts on kombu's Redis list."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
from celery import Celery
from kombu.entity import Queue
from kombu.transport import redis as kombu_redis

from rilla_bridge.taskqueue import (
    QUEUE_CALLRAIL,
    QUEUE_EVENTS,
    TASK_CALLRAIL_JOB,
    TASK_PROCESS_EVENT,
    process_event_message,
    queued_at,
    task_message,
    uuid4_pair,
)

EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
# Headers of ours that Celery does not write: the time the copy was queued (scheduler sweep).
OUR_EXTRA_HEADERS = {"rb_at"}


@pytest.fixture
def celery_on_fakeredis(monkeypatch: pytest.MonkeyPatch
                        ) -> Iterator[tuple[Celery, fakeredis.FakeRedis]]:
    """A Celery app configured like workers.celery_app whose broker is a fakeredis."""
    server = fakeredis.FakeServer()
    fake = fakeredis.FakeRedis(server=server)
    clients: list[fakeredis.FakeRedis] = []

    def create_client(self: Any, asynchronous: bool = False) -> fakeredis.FakeRedis:
        client = fakeredis.FakeRedis(server=server)
        clients.append(client)
        return client

    monkeypatch.setattr(kombu_redis.Channel, "_create_client", create_client)
    app = Celery("rb-test", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.update(
        task_serializer="json", accept_content=["json"], task_ignore_result=True,
        result_backend=None, task_default_queue=QUEUE_EVENTS,
        task_queues=[Queue(QUEUE_EVENTS), Queue(QUEUE_CALLRAIL)],
        task_routes={TASK_CALLRAIL_JOB: {"queue": QUEUE_CALLRAIL}},
        broker_connection_retry_on_startup=False,
    )
    yield app, fake
    app.close()
    for c in clients:
        c.close()
    fake.close()


def _celery_message(app: Celery, fake: fakeredis.FakeRedis, task: str, args: list[Any],
                    queue: str) -> dict[str, Any]:
    with app.producer_or_acquire() as producer:
        app.send_task(task, args=args, producer=producer)
    raw = fake.lrange(queue, 0, -1)
    assert len(raw) == 1, f"Celery did not put one message on {queue!r}"
    fake.delete(queue)
    message: dict[str, Any] = json.loads(raw[0])
    return message


def _shape(value: Any) -> Any:
    """The structure of a JSON value: dict keys recursively, types of the leaves."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value).__name__


@pytest.mark.parametrize(("task", "args", "queue"), [
    (TASK_PROCESS_EVENT, ["ev_0190aabbccdd0011223344556677"], QUEUE_EVENTS),
    (TASK_CALLRAIL_JOB, ["job-1", {"kind": "backfill"}], QUEUE_CALLRAIL),
])
def test_message_matches_celery(celery_on_fakeredis: tuple[Celery, fakeredis.FakeRedis],
                                task: str, args: list[Any], queue: str) -> None:
    app, fake = celery_on_fakeredis
    theirs = _celery_message(app, fake, task, args, queue)
    ours = json.loads(task_message(task, args, queue))

    assert set(ours) == set(theirs)
    for key in ("content-encoding", "content-type"):
        assert ours[key] == theirs[key]

    # headers: same keys (plus our own), same value types where Celery has a value
    assert set(ours["headers"]) - OUR_EXTRA_HEADERS == set(theirs["headers"])
    for key in ("lang", "task", "retries", "timelimit", "argsrepr", "kwargsrepr", "shadow",
                "eta", "expires", "group", "group_index", "parent_id",
                "replaced_task_nesting", "stamped_headers", "stamps"):
        assert ours["headers"][key] == theirs["headers"][key], key
    assert ours["headers"]["root_id"] == ours["headers"]["id"]
    assert theirs["headers"]["root_id"] == theirs["headers"]["id"]

    # properties: the same keys and routing as kombu's Redis transport writes
    assert set(ours["properties"]) == set(theirs["properties"])
    assert _shape(ours["properties"]) == _shape(theirs["properties"])
    for key in ("delivery_mode", "delivery_info", "priority", "body_encoding"):
        assert ours["properties"][key] == theirs["properties"][key], key
    assert ours["properties"]["correlation_id"] == ours["headers"]["id"]
    assert theirs["properties"]["correlation_id"] == theirs["headers"]["id"]

    # body: base64 of JSON [[args], {}, embed], byte-for-byte what Celery encodes
    assert base64.b64decode(ours["body"]) == base64.b64decode(theirs["body"])
    assert json.loads(base64.b64decode(ours["body"])) == [args, {}, EMBED]


def test_kombu_consumer_decodes_our_message(
        celery_on_fakeredis: tuple[Celery, fakeredis.FakeRedis]) -> None:
    """kombu's own Redis consumer reads the message we LPUSH and decodes Celery's protocol 2."""
    app, fake = celery_on_fakeredis
    message = process_event_message("ev_1")
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


def test_ids_are_unique_and_rb_at_is_read_back() -> None:
    a, b = json.loads(process_event_message("e")), json.loads(process_event_message("e"))
    assert a["headers"]["id"] != b["headers"]["id"]
    assert a["properties"]["delivery_tag"] != b["properties"]["delivery_tag"]
    at = queued_at(process_event_message("e"))
    assert at is not None and at > 1_600_000_000
    assert queued_at(b"not json") is None
    assert queued_at(json.dumps({"headers": {}})) is None


def _without_unique(message: dict[str, Any]) -> dict[str, Any]:
    m: dict[str, Any] = json.loads(json.dumps(message))
    for k in ("id", "root_id", "rb_at"):
        m["headers"].pop(k)
    for k in ("correlation_id", "delivery_tag"):
        m["properties"].pop(k)
    return m


@pytest.mark.parametrize("event_id", [
    "ev_0190aabbccdd0011223344556677",      # what intake makes: the template path
    'ev_"quoted"\\and\u00e9',               # anything else: the general path, same result
])
def test_process_event_message_equals_the_general_message(event_id: str) -> None:
    fast = json.loads(process_event_message(event_id))
    general = json.loads(task_message(TASK_PROCESS_EVENT, [event_id], QUEUE_EVENTS))
    assert _without_unique(fast) == _without_unique(general)
    assert base64.b64decode(fast["body"]) == base64.b64decode(general["body"])
    assert json.loads(base64.b64decode(fast["body"])) == [[event_id], {}, EMBED]
    assert fast["headers"]["id"] == fast["headers"]["root_id"] == fast["properties"][
        "correlation_id"]
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
