"""Folding the snapshots of one call into the best-known fields."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def is_empty(value: Any) -> bool:
    """None, blank text and empty lists carry no information (``False`` and ``0`` do)."""
    if value is None or value == []:
        return True
    return isinstance(value, str) and not value.strip()


def _order(item: Mapping[str, Any]) -> tuple[int, float, str]:
    rank = item.get("rank", 0)
    received = item.get("received_at", 0.0)
    # The canonical text of the fields breaks exact ties, so the result never depends on the
    # order in which the snapshots were read back; equal keys with equal text are the same data.
    text = json.dumps(item.get("fields", {}), sort_keys=True, default=str)
    return (int(rank), float(received), text)


def merge_snapshots(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge ``{"rank", "received_at", "fields"}`` items into one dict of fields.

    Applied in (rank, received_at) order, so a higher-ranked event (call modified over post-call
    over routing complete over pre-call), then a later one, wins; an empty value never replaces a
    known one. The result is the same for any order of ``snapshots``.
    """
    merged: dict[str, Any] = {}
    for item in sorted(snapshots, key=_order):
        fields = item.get("fields") or {}
        for key, value in fields.items():
            if not is_empty(value):
                merged[key] = value
            else:
                merged.setdefault(key, None)
    return merged
