"""QuotaGuard behaviour against fakeredis (Lua via lupa)."""

from __future__ import annotations

import time
from collections import Counter

import fakeredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rilla_bridge.callrail.quota import LANES, QuotaGuard


def guard(r: fakeredis.FakeRedis, **kw: object) -> QuotaGuard:
    opts: dict[str, object] = {"hourly_limit": 10, "daily_limit": 100, "hour_seconds": 3600,
                               "day_seconds": 86400}
    opts.update(kw)
    return QuotaGuard(r, **opts)  # type: ignore[arg-type]


def fill(g: QuotaGuard, lane: str, n: int, account: str = "A") -> None:
    for i in range(n):
        g.submit(account, lane, {"lane_job": lane, "i": i})


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 2), st.sampled_from(LANES), st.integers(0, 6),
                              st.integers(1, 5)), min_size=1, max_size=25))
def test_budget_and_shares_never_exceeded_across_guard_instances(
        ops: list[tuple[int, str, int, int]]) -> None:
    r = fakeredis.FakeRedis()
    guards = [guard(r, hourly_limit=20, daily_limit=30) for _ in range(3)]
    granted: Counter[str] = Counter()
    for who, lane, submit_n, take_n in ops:
        fill(guards[who], lane, submit_n)
        for job in guards[(who + 1) % 3].take("A", take_n):
            granted[job["lane"]] += 1
    assert sum(granted.values()) <= 20
    assert granted["backfill"] <= 10
    assert granted["reconcile"] <= 4
    st_ = guards[0].status("A")
    assert st_["hour_used"] == sum(granted.values())
    assert st_["lanes"]["reconcile"]["hour_used"] == granted["reconcile"]
    r.close()


def test_take_serves_live_then_backfill_then_reconcile(fake_redis: fakeredis.FakeRedis) -> None:
    g = guard(fake_redis, hourly_limit=100)
    fill(g, "reconcile", 3)
    fill(g, "backfill", 3)
    fill(g, "live", 3)
    lanes = [j["lane"] for j in g.take("A", 9)]
    assert lanes == ["live"] * 3 + ["backfill"] * 3 + ["reconcile"] * 3


def test_live_arriving_later_overtakes_waiting_reconcile(fake_redis: fakeredis.FakeRedis) -> None:
    g = guard(fake_redis, hourly_limit=100)
    fill(g, "reconcile", 5)
    assert [j["lane"] for j in g.take("A", 1)] == ["reconcile"]
    g.submit("A", "live", {"call": "CAL1"})
    first = g.take("A", 1)[0]
    assert first["lane"] == "live" and first["call"] == "CAL1"
    assert isinstance(first["granted_at"], float) and first["granted_at"] > 1e9


def test_reconcile_limited_to_its_share_of_hour_and_day(fake_redis: fakeredis.FakeRedis) -> None:
    g = guard(fake_redis, hourly_limit=50, daily_limit=1000)
    fill(g, "reconcile", 30)
    assert len(g.take("A", 30)) == 10  # 20% of 50
    assert g.take("A", 1) == []
    # the rest of the hour is still there for live work
    fill(g, "live", 50)
    assert len(g.take("A", 100)) == 40
    g2 = guard(fakeredis.FakeRedis(), hourly_limit=1000, daily_limit=20)
    fill(g2, "reconcile", 30)
    assert len(g2.take("A", 30)) == 4  # 20% of the daily 20
    g2.redis.close()


def test_custom_share_and_full_budget_when_lanes_mixed(fake_redis: fakeredis.FakeRedis) -> None:
    g = guard(fake_redis, hourly_limit=10, shares={"reconcile": 0.5, "backfill": 0.3})
    fill(g, "reconcile", 20)
    fill(g, "backfill", 20)
    got = Counter(j["lane"] for j in g.take("A", 20))
    assert got == {"backfill": 3, "reconcile": 5}
    fill(g, "live", 20)
    assert len(g.take("A", 20)) == 2  # only the hour's remainder
    with pytest.raises(ValueError, match="unknown lanes"):
        guard(fake_redis, shares={"bulk": 0.1})


def test_accounts_are_independent_and_waiting_set_tracks_work(
        fake_redis: fakeredis.FakeRedis) -> None:
    g = guard(fake_redis, hourly_limit=2)
    fill(g, "live", 3, "A")
    fill(g, "live", 1, "B")
    assert g.accounts_waiting() == ["A", "B"]
    assert len(g.take("A", 5)) == 2
    assert len(g.take("B", 5)) == 1
    assert g.accounts_waiting() == ["A"]  # B is empty, A still has one waiting
    assert g.accounts_known() == ["A", "B"]
    assert g.next_grant_in("B") is None
    assert g.status("A")["waiting"] == {"live": 1, "backfill": 0, "reconcile": 0}


def test_front_submit_is_taken_first(fake_redis: fakeredis.FakeRedis) -> None:
    g = guard(fake_redis)
    g.submit("A", "live", {"n": 1})
    g.submit("A", "live", {"n": 2}, front=True)
    assert [j["n"] for j in g.take("A", 2)] == [2, 1]


def test_window_rolls_and_budget_returns(fake_redis: fakeredis.FakeRedis) -> None:
    g = guard(fake_redis, hourly_limit=5, daily_limit=8, hour_seconds=1, day_seconds=3,
              margin_seconds=0.05)
    fill(g, "live", 20)
    assert len(g.take("A", 20)) == 5
    assert g.take("A", 1) == []
    wait = g.next_grant_in("A")
    assert wait is not None and 0.9 < wait <= 1.1
    time.sleep(0.5)
    assert g.take("A", 1) == []  # half a window later: still spent
    time.sleep(wait - 0.5 + 0.05)
    assert len(g.take("A", 20)) == 3  # the hour is back but the day has only 3 left
    assert g.status("A")["day_left"] == 0
    day_wait = g.next_grant_in("A")
    assert day_wait is not None and 1.5 < day_wait <= 3.1


def test_usage_keys_expire_and_queue_does_not(fake_redis: fakeredis.FakeRedis) -> None:
    g = guard(fake_redis, hour_seconds=60, day_seconds=600)
    fill(g, "live", 2)
    g.take("A", 1)
    assert 0 < fake_redis.pttl("rb:cr:{A}:uh:live") <= (60 + 1.2 + 2 * 60 / 360) * 1000
    assert 0 < fake_redis.pttl("rb:cr:{A}:ud:live") <= (600 + 1.2 + 2 * 600 / 288) * 1000
    assert fake_redis.pttl("rb:cr:{A}:q:live") == -1
    assert fake_redis.pttl("rb:cr:known") > 0


def test_pause_blocks_every_instance_then_expires(fake_redis: fakeredis.FakeRedis) -> None:
    a = guard(fake_redis, pause_base_seconds=0.4)
    b = guard(fake_redis, pause_base_seconds=0.4)
    fill(a, "live", 5)
    secs = a.pause("A")
    assert 0.35 <= secs <= 0.45
    assert b.take("A", 5) == [] and a.take("A", 5) == []
    wait = b.next_grant_in("A")
    assert wait is not None and 0.2 < wait <= 0.45
    assert b.status("A")["paused_until"] is not None
    time.sleep(secs + 0.05)
    assert len(b.take("A", 5)) == 5
    assert b.status("A")["paused_until"] is None


def test_backoff_grows_is_capped_and_resets(fake_redis: fakeredis.FakeRedis) -> None:
    g = guard(fake_redis, pause_base_seconds=0.1, pause_max_seconds=0.3)
    first = g.pause("A")
    again = g.pause("A")  # another 429 from a request already in flight: same episode
    assert again <= first and g.status("A")["pause_level"] == 1
    time.sleep(first + 0.02)
    second = g.pause("A")
    assert 0.18 <= second <= 0.22 and g.status("A")["pause_level"] == 2
    time.sleep(second + 0.02)
    third = g.pause("A")
    assert third <= 0.3 and g.status("A")["pause_level"] == 3  # capped at the max
    time.sleep(third + 0.02)
    g.record_success("A")
    assert g.status("A")["pause_level"] == 0
    assert 0.09 <= g.pause("A") <= 0.11


def test_next_grant_in_zero_when_budget_is_free(fake_redis: fakeredis.FakeRedis) -> None:
    g = guard(fake_redis)
    assert g.next_grant_in("A") is None
    fill(g, "reconcile", 1)
    assert g.next_grant_in("A") == 0.0
