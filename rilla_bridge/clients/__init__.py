"""Clients of the outside APIs we call: Rilla's Custom CRM API and CallRail's API v3.

Each client makes exactly one HTTP request per call and sorts its answer, in one place, into
what the caller should do (ok, retry, rate limited, permanent). Their local stand-ins live in
the top-level ``sandbox`` package, which production code never imports.
"""
