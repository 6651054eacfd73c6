"""Sample webhooks for the local run: a signed CallRail call and a Callingly call."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import requests

from rilla_bridge.providers.callrail import signature as callrail_signature

SAMPLE_CALLRAIL: dict[str, Any] = {
    "answered": True, "call_type": "inbound", "company_id": 512734908,
    "company_name": "Demo Roofing", "company_time_zone": "America/Chicago",
    "customer_city": "Round Rock", "customer_name": "Maria Delgado",
    "customer_phone_number": "+15125550187", "customer_state": "TX", "direction": "inbound",
    "duration": "247", "first_call": False,
    "recording": "https://app.callrail.com/calls/CAL4f1c9e27b3a84d6f9e0d2c5a7b18e3f6/recording/"
                 "redirect?access_key=9c2e71f04ab35d88e6f1",
    "source": "Google My Business", "source_name": "GMB Listing",
    "start_time": "2025-03-11T09:42:17.811-05:00", "tags": ["estimate-booked"],
    "tracking_phone_number": "+15125550110", "value": "", "voicemail": False, "spam": False,
    "agent_email": "mike@acme.example", "campaign": "",
    "person_resource_id": "PER9a03d6c1e2b74f58a6c3e0b9d1f27a44",
    "resource_id": "CAL4f1c9e27b3a84d6f9e0d2c5a7b18e3f6",
    "timestamp": "2025-03-11T09:42:17.811-05:00",
}
SAMPLE_CALLINGLY: dict[str, Any] = {
    "id": 41872219, "account_id": 20417, "team_id": 33108, "team_name": "Inbound Leads",
    "status": "completed", "result": "contacted", "direction": "outbound",
    "lead": {"id": 7730452, "first_name": "Marcus", "last_name": "Bell",
             "email": "marcus.bell@example.com", "phone_number": "+16025550148",
             "source": "Facebook Lead Ads", "tags": [{"id": 1, "name": "Appointment Set"}]},
    "user": {"name": "Dana Whitfield", "email": "dana@demo-roofing.example"},
    "recording_url": "https://cdn.callingly.com/recordings/4f9a2c71e0b84d3a.mp3",
    "seconds": 263, "datetime": "2025-03-11T09:42:17-07:00",
}


def send_samples(base: str, sandbox: str, env: dict[str, str],
                 say: Callable[[str], None]) -> None:
    for _ in range(150):
        try:
            if requests.get(f"{base}/readyz", timeout=1).ok:
                break
        except requests.RequestException:
            pass
        time.sleep(0.2)
    # New call ids each run: with a Redis that keeps its data, last run's calls would be
    # duplicates (dedup window) or already delivered, and the fresh sandbox would stay empty.
    run = uuid.uuid4().hex
    callrail = dict(SAMPLE_CALLRAIL, resource_id=f"CAL{run}", recording=(
        f"https://app.callrail.com/calls/CAL{run}/recording/redirect?access_key=9c2e71f04ab35"))
    callingly = dict(SAMPLE_CALLINGLY, id=int(run[:12], 16))
    body = json.dumps(callrail).encode()
    sig = callrail_signature(env["DEMO_CALLRAIL_SIGNING_KEY"], body)
    r1 = requests.post(f"{base}/webhooks/callrail/demo?event=post_call", data=body,
                       headers={"Signature": sig, "Content-Type": "application/json"}, timeout=5)
    say(f"sample CallRail post-call -> {r1.status_code} {r1.text}")
    r2 = requests.post(f"{base}/webhooks/callingly/demo?event=call_completed&token="
                       f"{env['DEMO_CALLINGLY_TOKEN']}", json=callingly, timeout=5)
    say(f"sample Callingly call_completed -> {r2.status_code} {r2.text}")
    time.sleep(3)
    for r in (r1, r2):
        if r.ok:
            eid = r.json()["id"]
            for _ in range(20):   # history reaches SQL a moment after delivery
                out = subprocess.run([sys.executable, "-m", "ops", "events", "show", eid],
                                     env=env, capture_output=True, text=True, check=False)
                if out.returncode == 0:
                    break
                time.sleep(0.5)
            say("rilla-bridge events show " + eid + "\n" + out.stdout + out.stderr)
    appts = requests.get(f"{sandbox}/_sandbox/appointments", timeout=5).json()
    say(f"the Rilla sandbox now holds {len(appts)} appointment(s):")
    for a in appts:
        say(f"  {a.get('event_id')}  {a.get('user_email')}  {a.get('start_time')}  "
            f"{a.get('title')}  media_url={'yes' if a.get('media_url') else 'no'}")
    say("send your own: see README 'Send a test webhook' (signature = base64 HMAC-SHA1)")
