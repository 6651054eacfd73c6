"""A worker process's heartbeat: it renews the leases of everything the process holds.

A claimed event's slot and its call's lock are held under a short lease
(``DELIVERY_LEASE_SECONDS``) that this heartbeat renews every third of it, in one script call
for everything the process holds. When the process dies (SIGKILL, a lost machine) the
renewals stop, the leases lapse within a lease, and the scheduler's sweep puts the events back
in their lanes (``Lanes.sweep``); while the process lives nobody else runs its events.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import redis

from rilla_bridge import keys
from rilla_bridge.clock import Clock, ms
from rilla_bridge.lifecycle import NONE_KEY
from rilla_bridge.scripts import Scripts

log = logging.getLogger("rilla_bridge.worker")


@dataclass
class _Held:
    tenant: str
    run: str                  # the run's claim token (one per run of an event)
    lock_key: str = NONE_KEY
    lock_token: str = ""


class Heartbeat:
    """What this process holds, and the renewal of its leases."""

    def __init__(self, client: redis.Redis, scripts: Scripts, clock: Clock,
                 lease_seconds: float) -> None:
        self.redis = client
        self.scripts = scripts
        self.clock = clock
        self.lease_seconds = lease_seconds
        self.token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- what the pipeline tells it ---------------------------------------------------------
    def run_token(self) -> str:
        """A claim token for one run of an event: this process, and which run (two copies of
        a message in one process must not both think they hold the event)."""
        return f"{self.token}/{secrets.token_hex(4)}"

    def hold(self, event_id: str, tenant: str, run: str) -> None:
        with self._lock:
            self._held[event_id] = _Held(tenant, run)

    def hold_lock(self, event_id: str, lock_key: str, token: str) -> None:
        with self._lock:
            held = self._held.get(event_id)
            if held is not None:
                held.lock_key, held.lock_token = lock_key, token

    def release(self, event_id: str) -> None:
        with self._lock:
            self._held.pop(event_id, None)

    def hand_back_all(self, hand_back: Callable[[str, str, str, str, str], bool]) -> int:
        """Give back everything this process still holds (it is stopping): ``hand_back(event
        id, tenant, run, lock key, lock token)`` for each (``Lifecycle.hand_back``); returns
        how many were handed back. Nothing is renewed for them after this."""
        with self._lock:
            held, self._held = list(self._held.items()), {}
        n = 0
        for event_id, h in held:
            try:
                n += bool(hand_back(event_id, h.tenant, h.run, h.lock_key, h.lock_token))
            except Exception as exc:   # its lease lapses instead: the sweep recovers it
                log.warning("could not hand an event back", extra={"event": event_id,
                                                                   "error": repr(exc)})
        return n

    def take(self, event_id: str) -> _Held | None:
        """Stop holding ``event_id`` and return what was held (None: nothing)."""
        with self._lock:
            return self._held.pop(event_id, None)

    def holding(self) -> int:
        with self._lock:
            return len(self._held)

    # -- renewing ---------------------------------------------------------------------------
    def beat(self) -> int:
        """Renew every lease held now (one script call); returns how many events."""
        with self._lock:
            held = list(self._held.items())
        if not held:
            return 0
        script_keys: list[str] = []
        args: list[str | int] = [ms(self.clock.now()), ms(self.lease_seconds)]
        for event_id, h in held:
            script_keys += [keys.event(event_id), keys.inflight(h.tenant), h.lock_key]
            args += [event_id, h.run, h.lock_token]
        return int(self.scripts.renew(keys=script_keys, args=args))

    def start(self) -> None:
        """Beat every third of a lease in the background (a greenlet under gevent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="rb-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def _run(self) -> None:
        interval = self.lease_seconds / 3
        failing = False
        while not self._stopping.wait(interval):
            try:
                self.beat()
                if failing:
                    log.warning("heartbeat renewing leases again")
                failing = False
            except Exception as exc:   # the thread must outlive any error, or leases lapse
                if not failing:   # once per outage: the leases lapse if it lasts
                    log.warning("heartbeat could not renew leases", extra={"error": repr(exc)})
                failing = True
