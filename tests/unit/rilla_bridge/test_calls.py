"""A call's state in Redis (``rilla_bridge/calls.py``): snapshots and their version, the lock,
handing the state to history (``forget``) with the Bloom filter of forgotten calls, the reload
(``RELOAD`` then ``restore``) and ``maybe_in_history``. fakeredis and a ``FakeClock``."""

from __future__ import annotations

import json
from typing import Any

import fakeredis
import pytest

from rilla_bridge import keys
from rilla_bridge.calls import (
    BLOOM_HASHES,
    BUSY,
    LOCKED,
    RELOAD,
    STATE_SAFETY_TTL,
    STORED,
    CallState,
    decode_call_state,
)
from rilla_bridge.clock import FakeClock
from rilla_bridge.scripts import Scripts
from rilla_bridge.settings import Settings

T, SRC, CALL = "acme", "callrail", "CAL1"
LEASE_MS = 8000
RETENTION_DAYS = 30
GENERATION = RETENTION_DAYS * 86400


@pytest.fixture
def calls(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> CallState:
    settings = Settings(seen_calls_capacity=1000, history_retention_days=RETENTION_DAYS)
    return CallState(fake_redis, Scripts(fake_redis), clock, settings)


def snapshot(rank: int = 2, **fields: Any) -> dict[str, Any]:
    return {"rank": rank, "received_at": 1.0, "fields": fields}


def store(calls: CallState, event_id: str, *, token: str = "tok",  # noqa: S107
          want_lock: bool = True, call_id: str = CALL, check_history: bool = True,
          **fields: Any) -> tuple[int, dict[str, Any] | None]:
    return calls.snapshot_and_acquire(T, SRC, call_id, event_id, snapshot(**fields),
                                      token=token, lease_ms=LEASE_MS, want_lock=want_lock,
                                      check_history=check_history)


def version(calls: CallState, call_id: str = CALL) -> int:
    v = calls.redis.hget(keys.call(T, SRC, call_id), "v")
    assert v is not None
    return int(v)


def forget(calls: CallState, written: int, call_id: str = CALL) -> bool:
    """The history process: history holds the call at version ``written``."""
    return calls.forget([(T, SRC, call_id, written)]) == 1


def release(calls: CallState, call_id: str = CALL) -> None:
    calls.redis.delete(keys.call_lock(T, SRC, call_id))


# -- snapshots, version, lock ----------------------------------------------------------------

def test_the_lock_comes_with_the_whole_state(calls: CallState) -> None:
    got, state = store(calls, "ev_1", customer_name="Jo")
    assert got == LOCKED and state is not None
    assert state == {"snapshots": [snapshot(customer_name="Jo")], "resolved": {},
                     "delivered": None}
    lock = calls.redis.hgetall(keys.call_lock(T, SRC, CALL))
    assert lock == {b"token": b"tok", b"until": str(1_767_225_600_000 + LEASE_MS).encode()}
    assert 0 < calls.redis.pttl(keys.call_lock(T, SRC, CALL)) <= LEASE_MS + 60_000
    assert 0 < calls.redis.ttl(keys.call(T, SRC, CALL)) <= STATE_SAFETY_TTL


def test_every_change_bumps_the_version(calls: CallState) -> None:
    store(calls, "ev_1")
    assert version(calls) == 1
    store(calls, "ev_2", want_lock=False)                 # a pre-call: stored, no lock
    assert version(calls) == 2
    calls.set_resolved(T, SRC, CALL, "https://api.example/rec.json", "https://media/1")
    assert version(calls) == 3
    release(calls)
    got, state = store(calls, "ev_3")
    assert got == LOCKED and version(calls) == 4
    assert state is not None and state["resolved"] == {
        "https://api.example/rec.json": "https://media/1"}
    assert len(state["snapshots"]) == 3


def test_a_held_lock_makes_the_call_busy_until_its_lease_lapses(calls: CallState,
                                                                clock: FakeClock) -> None:
    assert store(calls, "ev_1", token="first")[0] == LOCKED
    got, state = store(calls, "ev_2", token="second")
    assert (got, state) == (BUSY, None)
    # The busy event's snapshot is kept all the same: the holder's next read has it.
    assert version(calls) == 2
    assert b"s:ev_2" in calls.redis.hkeys(keys.call(T, SRC, CALL))
    clock.advance(LEASE_MS / 1000 - 0.001)
    assert store(calls, "ev_3", token="second")[0] == BUSY
    clock.advance(0.002)                                  # the holder died: lapsed by the clock
    assert store(calls, "ev_4", token="second")[0] == LOCKED
    assert calls.redis.hget(keys.call_lock(T, SRC, CALL), "token") == b"second"


def test_stored_without_a_lock(calls: CallState) -> None:
    assert store(calls, "ev_1", token="holder")[0] == LOCKED
    assert store(calls, "ev_2", want_lock=False) == (STORED, None)
    assert calls.redis.hget(keys.call_lock(T, SRC, CALL), "token") == b"holder"


def test_decode_call_state() -> None:
    raw = {b"s:ev_1": json.dumps(snapshot(a=1)).encode(), b"r:https://x/rec.json": b"https://m",
           b"delivered": b"fp", b"v": b"7"}
    assert decode_call_state(raw) == {"snapshots": [snapshot(a=1)],
                                      "resolved": {"https://x/rec.json": "https://m"},
                                      "delivered": "fp"}


# -- handed to history, forgotten, reloaded ----------------------------------------------------

def test_forget_only_the_version_history_wrote_and_only_unlocked(calls: CallState,
                                                                 clock: FakeClock) -> None:
    store(calls, "ev_1")                                  # v1, locked
    assert forget(calls, 1) is False         # a delivery holds the call
    release(calls)
    store(calls, "ev_2", want_lock=False)                 # v2
    assert forget(calls, 1) is False         # history has v1: moved on since
    assert calls.in_redis(T, SRC, CALL) and not calls.maybe_in_history(T, SRC, CALL)
    assert forget(calls, 2) is True
    assert not calls.in_redis(T, SRC, CALL)
    assert calls.maybe_in_history(T, SRC, CALL)
    gen = int(clock.now() // GENERATION)
    assert 0 < calls.redis.ttl(keys.seen(gen)) <= 2 * GENERATION + 86400


def test_a_lapsed_lock_does_not_keep_a_call_from_being_forgotten(calls: CallState,
                                                                 clock: FakeClock) -> None:
    store(calls, "ev_1")
    clock.advance(LEASE_MS / 1000)
    assert forget(calls, 1) is True


def test_a_forgotten_call_is_reloaded_before_anything_is_stored(calls: CallState) -> None:
    store(calls, "ev_1", customer_name="Jo", tags="a")
    release(calls)
    raw: Any = calls.redis.hgetall(keys.call(T, SRC, CALL))
    history = {k.decode(): v.decode() for k, v in raw.items()}
    assert forget(calls, 1)
    assert store(calls, "ev_2", customer_name="") == (RELOAD, None)
    assert not calls.in_redis(T, SRC, CALL)               # nothing stored yet
    assert store(calls, "ev_2", want_lock=False) == (RELOAD, None)
    # The state history holds goes back first, then the event's own snapshot on top of it.
    assert calls.restore(T, SRC, CALL, history) is True
    got, state = store(calls, "ev_2", customer_name="", check_history=False)
    assert got == LOCKED and state is not None
    assert [s["fields"] for s in state["snapshots"]] == [{"customer_name": "Jo", "tags": "a"},
                                                         {"customer_name": ""}]
    assert version(calls) == 2                            # history's v1, then this event
    # Another event of the call now finds it in Redis: no reload.
    release(calls)
    assert store(calls, "ev_3")[0] == LOCKED


def test_restore_never_overwrites_a_state_recreated_meanwhile(calls: CallState) -> None:
    store(calls, "ev_1", want_lock=False)
    assert calls.restore(T, SRC, CALL, {"s:ev_old": "{}", "v": "9"}) is False
    assert version(calls) == 1
    assert b"s:ev_old" not in calls.redis.hkeys(keys.call(T, SRC, CALL))


def test_restore_of_nothing_starts_the_call_afresh(calls: CallState) -> None:
    """A false positive of the filter: history has no such call."""
    assert calls.restore(T, SRC, "CALnew", None) is True
    assert calls.redis.hgetall(keys.call(T, SRC, "CALnew")) == {b"v": b"0"}
    assert 0 < calls.redis.ttl(keys.call(T, SRC, "CALnew")) <= STATE_SAFETY_TTL
    got, _ = store(calls, "ev_1", call_id="CALnew", check_history=False)
    assert got == LOCKED and version(calls, "CALnew") == 1


def test_the_filter_remembers_a_call_for_one_generation_and_the_next(
        calls: CallState, clock: FakeClock) -> None:
    store(calls, "ev_1", want_lock=False)
    assert forget(calls, 1)
    others = [f"CAL{n}x" for n in range(50)]
    assert not any(calls.maybe_in_history(T, SRC, c) for c in others)
    assert not calls.maybe_in_history("beta", SRC, CALL)      # per tenant
    assert not calls.maybe_in_history(T, "callingly", CALL)   # and source
    clock.advance(GENERATION)                             # the next filter; this one still read
    assert calls.maybe_in_history(T, SRC, CALL)
    assert store(calls, "ev_2")[0] == RELOAD
    clock.advance(GENERATION)                             # past history's retention: a new call
    assert not calls.maybe_in_history(T, SRC, CALL)
    assert store(calls, "ev_3")[0] == LOCKED


def test_bits_are_a_fixed_set_of_positions_per_call(calls: CallState) -> None:
    bits = calls.bits(T, SRC, CALL)
    assert len(bits) == BLOOM_HASHES and bits == calls.bits(T, SRC, CALL)
    assert all(0 <= b < calls.bits_total for b in bits)
    assert calls.bits_total == 9600                       # 1000 calls x 9.6 bits
    assert bits != calls.bits(T, SRC, "CAL2")
    small = CallState(calls.redis, calls.scripts, calls.clock, Settings(seen_calls_capacity=1))
    assert small.bits_total == 1024                       # never a tiny filter


def test_forget_takes_a_batch_in_one_round_trip(calls: CallState) -> None:
    for n in range(3):
        store(calls, f"ev_{n}", call_id=f"CAL{n}", want_lock=False)
    store(calls, "ev_9", call_id="CAL2", want_lock=False)          # CAL2 moved on to v2
    written = [(T, SRC, f"CAL{n}", 1) for n in range(3)] + [(T, SRC, "CALnone", 1)]
    assert calls.forget(written) == 2
    assert [calls.in_redis(T, SRC, f"CAL{n}") for n in range(3)] == [False, False, True]
    assert calls.forget([]) == 0


def test_in_redis(calls: CallState) -> None:
    assert not calls.in_redis(T, SRC, CALL)
    store(calls, "ev_1", want_lock=False)
    assert calls.in_redis(T, SRC, CALL)
