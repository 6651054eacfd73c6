"""A worker's restart: the platform sends SIGTERM, then SIGKILL 30 s later (Heroku).

On SIGTERM Celery's warm shutdown stops taking messages at once and waits for the tasks it
runs; the heartbeat keeps their leases while they finish (most take one Rilla request).
Celery would wait for ever, so ``arm`` starts a deadline: ``WORKER_SHUTDOWN_GRACE_SECONDS``
(20) after SIGTERM, every delivery still running is handed back to the head of its tenant's
lane (``Lifecycle.hand_back``: another worker takes it at once, not after its lease lapses),
the messages of this worker's unfinished tasks go back to their queue (a CallRail job runs
again; a delivery's copy finds its event dispatched anew and does nothing), and the process
exits 0, before the SIGKILL. A message taken but not started yet goes back with them.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("rilla_bridge.worker")
REASON = "its worker stopped (restart or deploy) before it finished"

consumer: Any = None      # Celery's consumer of this process (set when the worker is ready)
_armed = False


def at_deadline(hand_back_all: Callable[[str], int], restore: Callable[[], None],
                exit_: Callable[[int], Any]) -> int:
    """What the deadline does: hand back what still runs, put the unacked messages back,
    exit 0. Returns how many deliveries were handed back (``exit_`` may return, in tests)."""
    handed = 0
    try:
        handed = hand_back_all(REASON)
    except Exception as exc:   # Redis away: the leases lapse and the sweep recovers them
        log.warning("could not hand deliveries back", extra={"error": repr(exc)})
    try:
        restore()
    except Exception as exc:   # kombu restores them after the visibility timeout instead
        log.warning("could not restore unacked messages", extra={"error": repr(exc)})
    log.warning("worker shutdown deadline: exiting with work handed back",
                extra={"handed_back": handed})
    _flush_sentry()   # os._exit skips Sentry's own flush at exit: its last events would go
    sys.stderr.flush()
    exit_(0)
    return handed


def _flush_sentry(timeout: float = 2.0) -> None:
    try:
        import sentry_sdk

        sentry_sdk.flush(timeout=timeout)
    except Exception:   # noqa: S110 - never let reporting stand between us and the exit
        pass


def _restore_unacked() -> None:
    task_consumer = getattr(consumer, "task_consumer", None)
    channel = getattr(task_consumer, "channel", None)
    if channel is not None:
        channel.qos.restore_unacked_once()


def arm(grace: float | None = None, exit_: Callable[[int], Any] = os._exit) -> None:
    """Start the deadline (once per process): called when Celery's shutdown begins."""
    global _armed
    if _armed:
        return
    from workers import pipeline
    from workers.runtime import runtime

    rt = runtime()
    wait = rt.settings.worker_shutdown_grace_seconds if grace is None else grace

    def run() -> None:
        at_deadline(lambda reason: pipeline.hand_back_all(rt, reason), _restore_unacked,
                    exit_)

    _armed = True
    later(wait, run)


def later(seconds: float, run: Callable[[], None]) -> None:
    """Run ``run`` in ``seconds`` without blocking the caller: Celery sends its shutdown
    signal from a signal handler, which gevent runs in its hub, where no call may block
    (starting a thread waits for it to start)."""
    from gevent import monkey

    if monkey.is_module_patched("threading"):
        import gevent

        gevent.spawn_later(seconds, run)
    else:
        timer = threading.Timer(seconds, run)
        timer.daemon = True
        timer.start()
