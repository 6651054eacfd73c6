"""Every Lua script we run, loaded from ``lua/*.lua`` and registered on a client in one place.

A script file may pull in a shared piece of ``lua/lib/`` with a line ``--#include lib/NAME``.
Rules every script keeps (reviewed here, in one folder): every key it touches comes in through
``KEYS`` (none is built inside a script), and "now" comes in through ``ARGV`` from the caller's
clock (``rilla_bridge.clock``), never from Redis ``TIME``.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import redis

LUA_DIR = Path(__file__).with_name("lua")
_INCLUDE = re.compile(r"^--#include (lib/[a-z_]+)$", re.MULTILINE)


@cache
def source(name: str) -> str:
    """The text of ``lua/NAME.lua`` with its includes expanded."""
    text = (LUA_DIR / f"{name}.lua").read_text(encoding="utf-8")
    return _INCLUDE.sub(lambda m: source(m.group(1)).rstrip("\n"), text)


class Scripts:
    """The scripts, registered on ``client`` (each runs by EVALSHA, loading itself once)."""

    def __init__(self, client: redis.Redis) -> None:
        load = client.register_script
        # an event's life (rilla_bridge/lifecycle.py)
        self.intake = load(source("intake"))
        self.limit = load(source("limit"))
        self.claim = load(source("claim"))
        self.settle = load(source("settle"))
        self.requeue = load(source("requeue"))
        self.replay = load(source("replay"))
        self.renew = load(source("renew"))
        self.handback = load(source("handback"))
        # fair dispatch between tenants (rilla_bridge/lanes.py)
        self.dispatch = load(source("dispatch"))
        self.due = load(source("due"))
        self.recover = load(source("recover"))
        # a call's state (rilla_bridge/calls.py)
        self.snapshot_acquire = load(source("snapshot_acquire"))
        self.restore = load(source("restore"))
        self.forget = load(source("forget"))
        # leases and the CallRail quota
        self.lease = load(source("lease"))
        self.release = load(source("release"))
        self.quota = load(source("quota"))
