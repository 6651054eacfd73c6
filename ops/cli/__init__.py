"""``rilla-bridge``: the operator's command line (SPEC "Operations").

One module per command group: ``tenants``, ``events``, ``dlq``, ``callrail`` (quota,
backfill) and ``processes`` (scheduler, sandboxes, the local run).
"""

from __future__ import annotations

import click


@click.group()
def main() -> None:
    """rilla-bridge: CallRail and Callingly calls into Rilla."""


from ops.cli import callrail, dlq, events, processes, tenants  # noqa: E402  (they register on main)

__all__ = ["callrail", "dlq", "events", "main", "processes", "tenants"]
