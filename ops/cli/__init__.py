"""``rilla-bridge``: the operator's command line (SPEC "Operations").

One module per command group: ``tenants``, ``events``, ``dlq``, ``db`` (the history
database's schema), ``callrail`` (quota, backfill) and ``processes`` (scheduler, history,
sandboxes, the local run).
"""

from __future__ import annotations

import click


@click.group()
def main() -> None:
    """rilla-bridge: CallRail and Callingly calls into Rilla."""


from ops.cli import callrail, db, dlq, events, processes, tenants  # noqa: E402  (they register)

__all__ = ["callrail", "db", "dlq", "events", "main", "processes", "tenants"]
