"""The pure transform layer: call snapshots -> merged fields -> one Rilla action.

Nothing here does I/O. Each provider (``rilla_bridge.providers``) reads a raw body into a
``Snapshot`` with the lenient fields of ``fields``; the worker merges all snapshots of a call
with ``merge.merge_snapshots`` and asks ``build.build_action`` what to do with the result,
which ``appointment.validate_appointment`` checks against Rilla's contract before it is sent.
"""
