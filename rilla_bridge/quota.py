"""Cluster-wide CallRail API quota guard, kept in Redis.

CallRail allows each account 1,000 requests an hour and 10,000 a day, shared by every
integration and every one of our processes, and answers 429 on every endpoint once over
(no Retry-After). Celery's ``rate_limit`` is per worker, so the budget lives here instead:
work that needs a CallRail request is *submitted* to a durable per-account, per-lane list, and
a worker *takes* jobs only when the budget allows. Each take is one Lua script
(``lua/quota.lua``), so the check and the spend are atomic across processes; "now" comes from
the caller's clock (``rilla_bridge.clock``), and the margin covers the processes' disagreement.

Windows are rolling (a grant counts for one window after it was made, plus a margin), which is
conservative whether CallRail counts clock hours or rolling hours. Grants are counted in
buckets of 1/360 of the hour and 1/288 of the day, and a grant counts until its bucket's *end*
plus the window plus ``margin_seconds``: never released earlier than an exact rolling window
would, at the cost of at most one bucket of budget. The margin absorbs the delay between a
grant and the moment the request reaches CallRail (that delay varies, so without it two grants
exactly one window apart could land inside one CallRail window).

Lanes, in priority order, are ``live`` (a call waiting to be delivered), ``backfill`` and
``reconcile``. Within one take, higher lanes are served first; a lane may use at most
``share * limit`` of each window (defaults 1.0, 0.5, 0.2).

Key layout (``P`` = prefix, default ``rb:cr``; ``{A}`` = account id as a Redis hash tag):

=============================  ======  ==================================================
key                            type    content, lifetime
=============================  ======  ==================================================
``P:{A}:q:<lane>``             list    waiting jobs (JSON); no TTL (durable work), Redis
                                       deletes it when empty
``P:{A}:uh:<lane>``            hash    hourly grants per bucket (+ ``lo``, ``n``); TTL one
                                       hour + margin + 2 buckets, refreshed per grant
``P:{A}:ud:<lane>``            hash    daily grants, same shape; TTL one day + margin
``P:{A}:paused_until``         string  epoch seconds; expires (PX) when the pause ends
``P:{A}:pause_level``          string  consecutive 429 episodes; TTL pause max + one day,
                                       deleted by ``record_success``
``P:waiting``                  set     accounts with waiting jobs; members removed by take
``P:known``                    zset    account -> last grant/submit/pause time; pruned
                                       after one day, key TTL one day
=============================  ======  ==================================================

The script touches ``P:waiting`` and ``P:known`` besides the account's own keys, so it needs a
single Redis (not Redis Cluster); the account keys already carry a hash tag for the day that
changes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from typing import Any

import redis

from rilla_bridge import keys
from rilla_bridge.clock import Clock
from rilla_bridge.scripts import Scripts
from rilla_bridge.settings import Settings

LANES: tuple[str, ...] = ("live", "backfill", "reconcile")
DEFAULT_SHARES: Mapping[str, float] = {"live": 1.0, "backfill": 0.5, "reconcile": 0.2}
HOUR_BUCKETS = 360  # finer buckets waste less budget; the hash stays small either way
DAY_BUCKETS = 288


class QuotaGuard:
    """Per-account hourly and daily CallRail budget shared by every process using ``redis``."""

    def __init__(
        self,
        redis: redis.Redis,
        scripts: Scripts,
        clock: Clock,
        *,
        hourly_limit: int,
        daily_limit: int,
        hour_seconds: float = 3600,
        day_seconds: float = 86400,
        shares: Mapping[str, float] | None = None,
        pause_base_seconds: float = 60.0,
        pause_max_seconds: float = 3600.0,
        prefix: str = keys.QUOTA_PREFIX,
        margin_seconds: float | None = None,
    ) -> None:
        """Configure the guard; ``margin_seconds`` defaults to 2% of the hour, at most 30 s."""
        if hourly_limit <= 0 or daily_limit <= 0 or hour_seconds <= 0 or day_seconds <= 0:
            raise ValueError("limits and window lengths must be positive")
        merged = dict(DEFAULT_SHARES)
        merged.update(shares or {})
        unknown = set(merged) - set(LANES)
        if unknown:
            raise ValueError(f"unknown lanes in shares: {sorted(unknown)}")
        if any(not 0 <= s <= 1 for s in merged.values()):
            raise ValueError("shares must be between 0 and 1")
        self.redis = redis
        self.hourly_limit = hourly_limit
        self.daily_limit = daily_limit
        self.hour_seconds = float(hour_seconds)
        self.day_seconds = float(day_seconds)
        self.shares = {lane: merged[lane] for lane in LANES}
        self.pause_base_seconds = pause_base_seconds
        self.pause_max_seconds = pause_max_seconds
        self.prefix = prefix
        self.margin_seconds = (
            min(30.0, 0.02 * self.hour_seconds) if margin_seconds is None else margin_seconds
        )
        self._script = scripts.quota
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: Settings, client: redis.Redis, scripts: Scripts,
                      clock: Clock) -> QuotaGuard:
        """The guard every process builds from the same settings (limits, windows, shares)."""
        return cls(
            client, scripts, clock, hourly_limit=settings.callrail_hourly_limit,
            daily_limit=settings.callrail_daily_limit,
            hour_seconds=settings.callrail_hour_seconds,
            day_seconds=settings.callrail_day_seconds,
            shares={"live": 1.0, "backfill": settings.backfill_budget_share,
                    "reconcile": settings.reconcile_budget_share},
            pause_base_seconds=settings.callrail_pause_base_seconds)

    # -- keys ------------------------------------------------------------------
    def _k(self, account: str, suffix: str) -> str:
        return f"{self.prefix}:{{{account}}}:{suffix}"

    def _keys(self, account: str) -> list[str]:
        keys = [
            self._k(account, "paused_until"),
            self._k(account, "pause_level"),
            f"{self.prefix}:waiting",
            f"{self.prefix}:known",
        ]
        for lane in LANES:
            keys += [self._k(account, f"q:{lane}"), self._k(account, f"uh:{lane}"),
                     self._k(account, f"ud:{lane}")]
        return keys

    def _run(self, op: str, account: str, *extra: Any) -> Any:
        args: list[Any] = [
            op, account, len(LANES), self.hourly_limit, self.daily_limit,
            repr(self.hour_seconds), repr(self.day_seconds), repr(self.margin_seconds),
            repr(self.hour_seconds / HOUR_BUCKETS), repr(self.day_seconds / DAY_BUCKETS),
            repr(self.clock.now()), *(repr(self.shares[lane]) for lane in LANES), *extra,
        ]
        return self._script(keys=self._keys(account), args=args)

    # -- public API ------------------------------------------------------------
    def submit(self, account: str, lane: str, job: Mapping[str, Any], *,
               front: bool = False) -> None:
        """Queue ``job`` (JSON-serialisable) for ``account``; ``front`` puts it first in line."""
        if lane not in LANES:
            raise ValueError(f"unknown lane {lane!r}")
        body = json.dumps(dict(job), separators=(",", ":"))
        now = self.clock.now()
        pipe = self.redis.pipeline(transaction=True)
        key = self._k(account, f"q:{lane}")
        if front:
            pipe.lpush(key, body)
        else:
            pipe.rpush(key, body)
        pipe.sadd(f"{self.prefix}:waiting", account)
        pipe.zadd(f"{self.prefix}:known", {account: now})
        pipe.expire(f"{self.prefix}:known", int(self.day_seconds + self.margin_seconds) + 1)
        pipe.execute()

    def take(self, account: str, max_jobs: int = 1) -> list[dict[str, Any]]:
        """Pop up to ``max_jobs`` jobs the budget allows now, highest lane first.

        Each returned job has ``lane`` and ``granted_at`` (the guard's clock) added; every job
        returned has already been counted against the budget, so the caller makes its request
        now.
        """
        if max_jobs <= 0:
            return []
        out = self._run("take", account, max_jobs)
        granted_at = float(_s(out[0]))
        jobs: list[dict[str, Any]] = []
        for i in range(1, len(out), 2):
            job = json.loads(_s(out[i + 1]))
            job["lane"] = LANES[int(_s(out[i])) - 1]
            job["granted_at"] = granted_at
            jobs.append(job)
        return jobs

    def next_grant_in(self, account: str) -> float | None:
        """Seconds until a waiting job of ``account`` could be granted; None if nothing waits."""
        out = self._run("next", account)
        return None if out is None else float(_s(out))

    def accounts_waiting(self) -> list[str]:
        """Accounts with jobs waiting in any lane."""
        return sorted(_s(m) for m in self.redis.smembers(f"{self.prefix}:waiting"))

    def pause(self, account: str) -> float:
        """After a 429: pause ``account`` for every process; returns the pause in seconds.

        The pause is ``base * 2**(n-1)`` (n = consecutive 429 episodes) with +-10% jitter,
        capped at ``pause_max_seconds``. A 429 while already paused returns the time left.
        """
        jitter = random.uniform(0.9, 1.1)
        out = self._run("pause", account, repr(self.pause_base_seconds),
                        repr(self.pause_max_seconds), repr(jitter))
        return float(_s(out[0]))

    def still_good(self, account: str, granted_at: float) -> str | None:
        """Just before spending a grant: None if the request may go now, else why not.

        A grant is only safe when used at once: the guard frees it one window + margin after
        ``granted_at``, so a request made later than the margin (a backed-up queue, workers
        restarting) could share a CallRail window with grants made after it was freed. A pause
        set after the grant (another process saw a 429) also stops it.
        """
        paused = self.redis.get(self._k(account, "paused_until"))
        now = self.clock.now()
        if paused is not None and float(_s(paused)) > now:
            return "account paused after a 429"
        if now - granted_at > self.margin_seconds:
            return f"grant is {now - granted_at:.2f}s old (margin {self.margin_seconds:g}s)"
        return None

    def record_success(self, account: str) -> None:
        """A CallRail request succeeded: the next 429 starts again from the base pause."""
        self.redis.delete(self._k(account, "pause_level"))

    def status(self, account: str) -> dict[str, Any]:
        """Budget used and left this hour and day (total and per lane), pause and waiting work."""
        out = self._run("status", account)
        paused = _s(out[1])
        lanes: dict[str, dict[str, int]] = {}
        for idx, lane in enumerate(LANES):
            hour, day, waiting = (int(x) for x in out[3 + 3 * idx: 6 + 3 * idx])
            lanes[lane] = {"hour_used": hour, "day_used": day, "waiting": waiting}
        hour_used = sum(v["hour_used"] for v in lanes.values())
        day_used = sum(v["day_used"] for v in lanes.values())
        hour_left = max(0, self.hourly_limit - hour_used)
        day_left = max(0, self.daily_limit - day_used)
        for lane, v in lanes.items():
            share = self.shares[lane]
            v["hour_left"] = min(hour_left, max(0, _cap(share, self.hourly_limit) - v["hour_used"]))
            v["day_left"] = min(day_left, max(0, _cap(share, self.daily_limit) - v["day_used"]))
        return {
            "account": account,
            "now": float(_s(out[0])),
            "hourly_limit": self.hourly_limit,
            "daily_limit": self.daily_limit,
            "hour_used": hour_used,
            "hour_left": hour_left,
            "day_used": day_used,
            "day_left": day_left,
            "paused_until": float(paused) if paused else None,
            "pause_level": int(out[2]),
            "waiting": {lane: lanes[lane]["waiting"] for lane in LANES},
            "lanes": lanes,
        }

    def accounts_known(self) -> list[str]:
        """Accounts with usage in the last day or waiting work (for ``rilla-bridge quota``)."""
        key = f"{self.prefix}:known"
        now = self.clock.now()
        self.redis.zremrangebyscore(key, "-inf", now - self.day_seconds - self.margin_seconds)
        known = {_s(m) for m in self.redis.zrange(key, 0, -1)}
        return sorted(known | set(self.accounts_waiting()))


def _cap(share: float, limit: int) -> int:
    """Largest lane usage allowed: the script grants while usage < share * limit."""
    raw = share * limit
    return int(raw) if raw == int(raw) else int(raw) + 1


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
