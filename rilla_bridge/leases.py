"""Named leases in Redis: who runs a periodic job this tick, when a tenant last reconciled.

A lease is free when absent or lapsed by the caller's clock (``lua/lease.lua``), so several
scheduler copies run each job once and tests move time with a FakeClock.
"""

from __future__ import annotations

from rilla_bridge.clock import Clock, ms
from rilla_bridge.scripts import Scripts


def take(scripts: Scripts, clock: Clock, key: str, owner: str, seconds: float) -> bool:
    """Take the lease ``key`` for ``seconds`` unless another holder's is still running."""
    return bool(scripts.lease(keys=[key], args=[owner, ms(clock.now()), max(1, ms(seconds))]))


def release(scripts: Scripts, key: str, owner: str) -> bool:
    """Give the lease ``key`` up now if ``owner`` holds it (a stopping scheduler copy), so
    another copy takes it at its next tick rather than when it lapses."""
    return bool(scripts.release(keys=[key], args=[owner]))
