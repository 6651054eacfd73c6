"""QuotaGuard (``rilla_bridge.quota``) against fakeredis (Lua via lupa), on the test's clock.

Windows are CallRail's real hour and day: they roll, pauses lapse and grants go stale because
the test moves its FakeClock (``clock.advance``), never because time passes. With the clock at a
whole multiple of the buckets (10 s of the hour, 300 s of the day), every wait is exact: a grant
counts until its bucket ends plus one window plus the margin (30 s for an hour window).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import fakeredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rilla_bridge.clock import FakeClock
from rilla_bridge.quota import LANES, QuotaGuard
from rilla_bridge.scripts import Scripts
from rilla_bridge.settings import Settings

HOUR, DAY = 3600.0, 86400.0
MARGIN = 30.0               # the default: 2 % of the hour, at most 30 s
HOUR_BUCKET, DAY_BUCKET = HOUR / 360, DAY / 288


def guard(r: fakeredis.FakeRedis, clock: FakeClock, **kw: Any) -> QuotaGuard:
    opts: dict[str, Any] = {"hourly_limit": 10, "daily_limit": 100, "hour_seconds": HOUR,
                            "day_seconds": DAY}
    opts.update(kw)
    return QuotaGuard(r, Scripts(r), clock, **opts)


def fill(g: QuotaGuard, lane: str, n: int, account: str = "A") -> None:
    for i in range(n):
        g.submit(account, lane, {"lane_job": lane, "i": i})


@pytest.fixture
def no_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pauses of exactly base * 2**(n-1) (the jitter has a test of its own)."""
    monkeypatch.setattr("rilla_bridge.quota.random.uniform", lambda a, b: 1.0)


def test_the_clock_starts_on_whole_buckets(clock: FakeClock) -> None:
    assert clock.now() % HOUR_BUCKET == 0 and clock.now() % DAY_BUCKET == 0


# -- budget and lanes -------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 2), st.sampled_from(LANES), st.integers(0, 6),
                              st.integers(1, 5)), min_size=1, max_size=25))
def test_budget_and_shares_never_exceeded_across_guard_instances(
        ops: list[tuple[int, str, int, int]]) -> None:
    r = fakeredis.FakeRedis()
    clock = FakeClock()
    guards = [guard(r, clock, hourly_limit=20, daily_limit=30) for _ in range(3)]
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


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from([0.0, 1.0, 9.5, 60.0, 600.0, 1799.0, 3600.0,
                                                 3650.0, 40_000.0]),
                                st.integers(0, 4)), min_size=1, max_size=40))
def test_no_window_ever_holds_more_than_its_limit(steps: list[tuple[float, int]]) -> None:
    """Whatever the pace of takes, any hour (and any day) holds at most its limit of grants:
    rolling windows, checked on the grant times themselves."""
    r = fakeredis.FakeRedis()
    clock = FakeClock()
    g = guard(r, clock, hourly_limit=5, daily_limit=12)
    times: list[float] = []
    for advance, n in steps:
        clock.advance(advance)
        fill(g, "live", n)
        times += [job["granted_at"] for job in g.take("A", n)]
    assert times == sorted(times)
    for t in times:
        assert sum(1 for u in times if t - HOUR < u <= t) <= 5
        assert sum(1 for u in times if t - DAY < u <= t) <= 12
    r.close()


def test_take_serves_live_then_backfill_then_reconcile(fake_redis: fakeredis.FakeRedis,
                                                       clock: FakeClock) -> None:
    g = guard(fake_redis, clock, hourly_limit=100)
    fill(g, "reconcile", 3)
    fill(g, "backfill", 3)
    fill(g, "live", 3)
    lanes = [j["lane"] for j in g.take("A", 9)]
    assert lanes == ["live"] * 3 + ["backfill"] * 3 + ["reconcile"] * 3


def test_live_arriving_later_overtakes_waiting_reconcile(fake_redis: fakeredis.FakeRedis,
                                                         clock: FakeClock) -> None:
    g = guard(fake_redis, clock, hourly_limit=100)
    fill(g, "reconcile", 5)
    assert [j["lane"] for j in g.take("A", 1)] == ["reconcile"]
    clock.advance(7.25)
    g.submit("A", "live", {"call": "CAL1"})
    first = g.take("A", 1)[0]
    assert first["lane"] == "live" and first["call"] == "CAL1"
    assert first["granted_at"] == clock.now()   # the caller's clock, not Redis TIME


def test_reconcile_limited_to_its_share_of_hour_and_day(fake_redis: fakeredis.FakeRedis,
                                                        clock: FakeClock) -> None:
    g = guard(fake_redis, clock, hourly_limit=50, daily_limit=1000)
    fill(g, "reconcile", 30)
    assert len(g.take("A", 30)) == 10  # 20% of 50
    assert g.take("A", 1) == []
    # the rest of the hour is still there for live work
    fill(g, "live", 50)
    assert len(g.take("A", 100)) == 40
    other = fakeredis.FakeRedis()
    g2 = guard(other, clock, hourly_limit=1000, daily_limit=20)
    fill(g2, "reconcile", 30)
    assert len(g2.take("A", 30)) == 4  # 20% of the daily 20
    other.close()


def test_custom_share_and_full_budget_when_lanes_mixed(fake_redis: fakeredis.FakeRedis,
                                                       clock: FakeClock) -> None:
    g = guard(fake_redis, clock, hourly_limit=10, shares={"reconcile": 0.5, "backfill": 0.3})
    fill(g, "reconcile", 20)
    fill(g, "backfill", 20)
    got = Counter(j["lane"] for j in g.take("A", 20))
    assert got == {"backfill": 3, "reconcile": 5}
    fill(g, "live", 20)
    assert len(g.take("A", 20)) == 2  # only the hour's remainder
    with pytest.raises(ValueError, match="unknown lanes"):
        guard(fake_redis, clock, shares={"bulk": 0.1})


@pytest.mark.parametrize("kw", [
    {"hourly_limit": 0}, {"daily_limit": -1}, {"hour_seconds": 0}, {"day_seconds": -5.0},
    {"shares": {"backfill": 1.5}}, {"shares": {"reconcile": -0.1}},
])
def test_bad_configuration_is_refused(fake_redis: fakeredis.FakeRedis, clock: FakeClock,
                                      kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        guard(fake_redis, clock, **kw)


def test_unknown_lane_cannot_be_submitted(fake_redis: fakeredis.FakeRedis,
                                          clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="unknown lane 'bulk'"):
        guard(fake_redis, clock).submit("A", "bulk", {})
    assert guard(fake_redis, clock).take("A", 0) == []


def test_accounts_are_independent_and_waiting_set_tracks_work(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    g = guard(fake_redis, clock, hourly_limit=2)
    fill(g, "live", 3, "A")
    fill(g, "live", 1, "B")
    assert g.accounts_waiting() == ["A", "B"]
    assert len(g.take("A", 5)) == 2
    assert len(g.take("B", 5)) == 1
    assert g.accounts_waiting() == ["A"]  # B is empty, A still has one waiting
    assert g.accounts_known() == ["A", "B"]
    assert g.next_grant_in("B") is None
    assert g.status("A")["waiting"] == {"live": 1, "backfill": 0, "reconcile": 0}


def test_known_accounts_are_forgotten_a_day_after_their_last_use(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    g = guard(fake_redis, clock)
    fill(g, "live", 1, "A")
    fill(g, "live", 1, "B")
    g.take("A", 1)
    g.take("B", 1)
    clock.advance(3600)
    g.pause("B")                     # B was seen an hour later
    clock.advance(DAY + MARGIN - 3600)
    assert g.accounts_known() == ["B"]      # A's last use is a day and the margin ago
    clock.advance(3600)
    assert g.accounts_known() == []
    fill(g, "live", 1, "C")          # waiting work keeps an account known
    clock.advance(2 * DAY)
    assert g.accounts_known() == ["C"]


def test_front_submit_is_taken_first(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    g = guard(fake_redis, clock)
    g.submit("A", "live", {"n": 1})
    g.submit("A", "live", {"n": 2}, front=True)
    assert [j["n"] for j in g.take("A", 2)] == [2, 1]


# -- windows roll -----------------------------------------------------------------------------
def test_window_rolls_and_budget_returns(fake_redis: fakeredis.FakeRedis,
                                         clock: FakeClock) -> None:
    start = clock.now()
    g = guard(fake_redis, clock, hourly_limit=5, daily_limit=8)
    fill(g, "live", 20)
    assert len(g.take("A", 20)) == 5
    assert g.take("A", 1) == []
    wait = g.next_grant_in("A")
    assert wait == HOUR_BUCKET + HOUR + MARGIN == 3640.0
    clock.advance(1800)
    assert g.take("A", 1) == []  # half a window later: still spent
    assert g.next_grant_in("A") == 3640.0 - 1800
    clock.advance(3640.0 - 1800 - 0.001)
    assert g.take("A", 1) == []  # a millisecond early
    clock.advance(0.001)
    assert len(g.take("A", 20)) == 3  # the hour is back but the day has only 3 left
    assert g.status("A")["day_left"] == 0
    # the first five grants (day bucket 0) count until that bucket's end + a day + margin
    day_wait = g.next_grant_in("A")
    assert day_wait == pytest.approx(start + DAY_BUCKET + DAY + MARGIN - clock.now())
    clock.advance(day_wait)  # type: ignore[arg-type]
    # the day freed the first five; the three granted an hour in still count for the day
    assert len(g.take("A", 20)) == 5
    status = g.status("A")
    assert (status["hour_used"], status["day_used"], status["day_left"]) == (5, 8, 0)


def test_grants_free_one_by_one_in_a_rolling_window(fake_redis: fakeredis.FakeRedis,
                                                    clock: FakeClock) -> None:
    g = guard(fake_redis, clock, hourly_limit=2)
    fill(g, "live", 10)
    assert len(g.take("A", 1)) == 1
    clock.advance(100)
    assert len(g.take("A", 1)) == 1
    clock.advance(1000)
    assert g.take("A", 5) == []
    assert g.next_grant_in("A") == 3640.0 - 1100      # the first grant frees first
    clock.advance(3640.0 - 1100)
    assert len(g.take("A", 5)) == 1
    assert g.next_grant_in("A") == 100.0              # then the second, 100 s later
    clock.advance(100)
    assert len(g.take("A", 5)) == 1
    assert g.status("A")["hour_used"] == 2


def test_a_grant_from_a_clock_behind_is_freed_like_the_others(fake_redis: fakeredis.FakeRedis,
                                                              clock: FakeClock) -> None:
    """Processes read the clock, then reach Redis in any order: the first grant of a window
    may come from a clock one bucket ahead of the next. That next grant must still be walked
    off when its window ends (it was left below the walk's start, holding one unit of budget
    for as long as the account stayed busy: 38 of 40 per window in a 4-process test)."""
    behind = FakeClock(clock.now())
    ahead = FakeClock(clock.now() + HOUR_BUCKET + 0.5)
    g_behind, g_ahead = guard(fake_redis, behind, hourly_limit=2), guard(fake_redis, ahead,
                                                                         hourly_limit=2)
    fill(g_ahead, "live", 10)
    assert len(g_ahead.take("A", 1)) == 1
    assert len(g_behind.take("A", 1)) == 1
    assert g_ahead.take("A", 1) == []
    for c in (behind, ahead):
        c.advance(HOUR + MARGIN + 2 * HOUR_BUCKET + 1)
    assert len(g_ahead.take("A", 5)) == 2  # both grants freed, the late one included
    for c in (behind, ahead):
        c.advance(HOUR + MARGIN + 2 * HOUR_BUCKET + 1)
    assert len(g_behind.take("A", 5)) == 2
    assert g_behind.status("A")["hour_used"] == 2


def test_usage_keys_expire_and_queue_does_not(fake_redis: fakeredis.FakeRedis,
                                              clock: FakeClock) -> None:
    g = guard(fake_redis, clock, hour_seconds=60, day_seconds=600)
    fill(g, "live", 2)
    g.take("A", 1)
    assert 0 < fake_redis.pttl("rb:cr:{A}:uh:live") <= (60 + 1.2 + 2 * 60 / 360) * 1000
    assert 0 < fake_redis.pttl("rb:cr:{A}:ud:live") <= (600 + 1.2 + 2 * 600 / 288) * 1000
    assert fake_redis.pttl("rb:cr:{A}:q:live") == -1
    assert fake_redis.pttl("rb:cr:known") > 0


def test_a_lane_with_no_share_waits_an_hour_at_a_time(fake_redis: fakeredis.FakeRedis,
                                                      clock: FakeClock) -> None:
    g = guard(fake_redis, clock, shares={"reconcile": 0.0})
    fill(g, "reconcile", 1)
    assert g.take("A", 1) == []
    assert g.next_grant_in("A") == HOUR


def test_next_grant_in_zero_when_budget_is_free(fake_redis: fakeredis.FakeRedis,
                                                clock: FakeClock) -> None:
    g = guard(fake_redis, clock)
    assert g.next_grant_in("A") is None
    fill(g, "reconcile", 1)
    assert g.next_grant_in("A") == 0.0


# -- pauses after a 429 -----------------------------------------------------------------------
@pytest.mark.usefixtures("no_jitter")
def test_pause_blocks_every_instance_then_lapses(fake_redis: fakeredis.FakeRedis,
                                                 clock: FakeClock) -> None:
    a = guard(fake_redis, clock, pause_base_seconds=60)
    b = guard(fake_redis, clock, pause_base_seconds=60)
    fill(a, "live", 5)
    secs = a.pause("A")
    assert secs == 60.0
    assert b.take("A", 5) == [] and a.take("A", 5) == []
    assert b.next_grant_in("A") == 60.0
    assert b.status("A")["paused_until"] == clock.now() + 60
    clock.advance(45)
    assert b.take("A", 5) == []
    assert b.next_grant_in("A") == 15.0
    clock.advance(15)
    assert len(b.take("A", 5)) == 5
    assert b.status("A")["paused_until"] is None


def test_pause_has_ten_percent_jitter(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    pauses = []
    for i in range(40):
        g = guard(fake_redis, clock, pause_base_seconds=100, prefix=f"rb:t{i}")
        pauses.append(g.pause("A"))
    assert all(90.0 <= p <= 110.0 for p in pauses)
    assert len(set(pauses)) > 1


@pytest.mark.usefixtures("no_jitter")
def test_backoff_grows_is_capped_and_resets(fake_redis: fakeredis.FakeRedis,
                                            clock: FakeClock) -> None:
    g = guard(fake_redis, clock, pause_base_seconds=60, pause_max_seconds=180)
    first = g.pause("A")
    assert first == 60.0
    clock.advance(10)
    again = g.pause("A")  # another 429 from a request already in flight: same episode
    assert again == 50.0 and g.status("A")["pause_level"] == 1
    clock.advance(again)
    second = g.pause("A")
    assert second == 120.0 and g.status("A")["pause_level"] == 2
    clock.advance(second)
    third = g.pause("A")
    assert third == 180.0 and g.status("A")["pause_level"] == 3  # capped at the max
    clock.advance(third)
    assert g.pause("A") == 180.0 and g.status("A")["pause_level"] == 4
    clock.advance(180)
    g.record_success("A")
    assert g.status("A")["pause_level"] == 0
    assert g.pause("A") == 60.0


# -- a grant must be used at once -------------------------------------------------------------
def test_a_grant_is_good_within_the_margin_only(fake_redis: fakeredis.FakeRedis,
                                                clock: FakeClock) -> None:
    g = guard(fake_redis, clock)
    fill(g, "live", 2)
    (job,) = g.take("A", 1)
    assert g.still_good("A", job["granted_at"]) is None
    clock.advance(MARGIN)
    assert g.still_good("A", job["granted_at"]) is None
    clock.advance(0.5)
    assert g.still_good("A", job["granted_at"]) == "grant is 30.50s old (margin 30s)"


@pytest.mark.usefixtures("no_jitter")
def test_a_pause_after_the_grant_stops_it(fake_redis: fakeredis.FakeRedis,
                                          clock: FakeClock) -> None:
    worker, other = guard(fake_redis, clock), guard(fake_redis, clock)
    fill(worker, "live", 1)
    (job,) = worker.take("A", 1)
    other.pause("A")                    # another process just saw a 429
    assert worker.still_good("A", job["granted_at"]) == "account paused after a 429"
    clock.advance(60)                   # the pause has lapsed, but so has the grant
    assert worker.still_good("A", job["granted_at"]) == "grant is 60.00s old (margin 30s)"


def test_from_settings_uses_the_shared_settings(fake_redis: fakeredis.FakeRedis,
                                                clock: FakeClock) -> None:
    s = Settings(callrail_hourly_limit=900, callrail_daily_limit=9000,
                 callrail_hour_seconds=1800, callrail_day_seconds=43200,
                 backfill_budget_share=0.4, reconcile_budget_share=0.1,
                 callrail_pause_base_seconds=30.0)
    g = QuotaGuard.from_settings(s, fake_redis, Scripts(fake_redis), clock)
    assert (g.hourly_limit, g.daily_limit) == (900, 9000)
    assert (g.hour_seconds, g.day_seconds) == (1800.0, 43200.0)
    assert g.shares == {"live": 1.0, "backfill": 0.4, "reconcile": 0.1}
    assert g.pause_base_seconds == 30.0
    assert g.margin_seconds == 30.0 and g.clock is clock
    fill(g, "live", 1)
    assert g.take("A", 1)[0]["granted_at"] == clock.now()
