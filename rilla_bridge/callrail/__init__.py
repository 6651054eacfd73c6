"""CallRail API access behind a cluster-wide quota: client, quota guard and a test sandbox."""

from rilla_bridge.callrail.client import CallRailClient, CallRailResult, parse_recording_api_url
from rilla_bridge.callrail.quota import LANES, QuotaGuard

__all__ = ["LANES", "CallRailClient", "CallRailResult", "QuotaGuard", "parse_recording_api_url"]
