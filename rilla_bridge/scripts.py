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
from typing import Any

import redis
from redis.commands.core import Script

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
        self.intake = self._load(client, "intake")
        self.replay = self._load(client, "replay")
        self.snapshot_acquire = self._load(client, "snapshot_acquire")
        self.wait = self._load(client, "wait")
        self.release = self._load(client, "release")
        self.requeue = self._load(client, "requeue")
        self.lease = self._load(client, "lease")
        self.quota = self._load(client, "quota")

    @staticmethod
    def _load(client: redis.Redis, name: str) -> Script:
        return client.register_script(source(name))


def run(script: Script, keys: list[str], args: list[Any], client: Any = None) -> Any:
    """Call ``script`` (on ``client``, e.g. a pipeline, when given)."""
    return script(keys=keys, args=args, client=client)
