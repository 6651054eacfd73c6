"""Secrets and raw bodies never reach Sentry or the logs (``rilla_bridge.observability``)."""

from __future__ import annotations

import http.client
import json
import logging
import sys
from typing import Any

import pytest
import sentry_sdk

from rilla_bridge import observability
from rilla_bridge.observability import (
    FILTERED,
    JsonFormatter,
    init_sentry,
    redact_text,
    register_secrets,
    scrub,
    setup_logging,
)
from rilla_bridge.providers.callrail import signature as callrail_signature
from tests.fakes import CapturingTransport

SIGNING_KEY = "obs-signing-key-5f4dcc3b5aa7"
TOKEN = "obs-callingly-token-9a8b7c"
RILLA_KEY = "obs-rilla-key-31415926"
DSN = "https://public@127.0.0.1:9/1"
RAW_BODY_MARK = "RAW-BODY-CUSTOMER-Kaylah-Mills"


def _dump(event: dict[str, Any]) -> str:
    return json.dumps(event, default=str)


def _assert_clean(events: list[dict[str, Any]], *extra: str) -> str:
    assert events, "Sentry captured nothing"
    text = "\n".join(_dump(e) for e in events)
    for secret in (SIGNING_KEY, TOKEN, RILLA_KEY, RAW_BODY_MARK, *extra):
        assert secret not in text, secret
    return text


def test_init_sentry_is_off_without_dsn() -> None:
    assert init_sentry("", environment="test", component="web") is False


def test_captured_exception_has_no_secret(sentry_transport: CapturingTransport) -> None:
    register_secrets([SIGNING_KEY, TOKEN, RILLA_KEY])
    transport = sentry_transport
    assert init_sentry(DSN, environment="test", component="web", transport=transport) is True
    signature = callrail_signature(SIGNING_KEY, b"{}")

    def fail(signing_key: str, body: bytes) -> None:
        token = TOKEN  # noqa: F841 - a local that must not be reported
        headers = {"Signature": signature}  # noqa: F841
        raise RuntimeError(f"could not verify with {signing_key} and token {TOKEN}")

    with sentry_sdk.new_scope() as scope:
        scope.add_event_processor(lambda event, hint: {**event, "request": {
            "url": f"http://x/webhooks/callingly/obs?token={TOKEN}",
            "method": "POST",
            "query_string": f"token={TOKEN}",
            "headers": {"Signature": signature, "Content-Type": "application/json"},
            "data": json.dumps({"customer": RAW_BODY_MARK}),
            "cookies": {"session": TOKEN},
        }})
        scope.set_extra("body", RAW_BODY_MARK)
        scope.set_context("webhook", {"body": RAW_BODY_MARK.encode(), "api_key": RILLA_KEY,
                                      "note": f"key is {SIGNING_KEY}"})
        logging.getLogger("test.breadcrumb").warning("using %s", RILLA_KEY)
        try:
            fail(SIGNING_KEY, RAW_BODY_MARK.encode())
        except RuntimeError:
            sentry_sdk.capture_exception()
        sentry_sdk.capture_message(f"plain message with {TOKEN}")
    sentry_sdk.flush()
    text = _assert_clean(transport.events, signature)
    assert "could not verify" in text  # the event is there, only the secrets are gone
    assert FILTERED in text
    request = transport.events[0]["request"]
    assert "data" not in request and "query_string" not in request
    assert "?" not in request["url"]
    assert request["headers"]["Signature"] == FILTERED


def test_scrub_sensitive_keys_and_known_secrets() -> None:
    register_secrets([SIGNING_KEY])
    out = scrub({"headers": {"Signature": "abc", "X-Api-Key": "k", "Accept": "x"},
                 "nested": [{"token": "t"}, f"text {SIGNING_KEY} here"],
                 "url": "https://api/x?access_key=abcdef&b=1"})
    assert out["headers"] == {"Signature": FILTERED, "X-Api-Key": FILTERED, "Accept": "x"}
    assert out["nested"][0] == {"token": FILTERED}
    assert SIGNING_KEY not in out["nested"][1] and "here" in out["nested"][1]
    assert "abcdef" not in out["url"] and "b=1" in out["url"]


def _format(msg: str, *args: Any, exc: bool = False, **extra: Any) -> str:
    exc_info = None
    if exc:
        try:
            raise RuntimeError(f"boom {SIGNING_KEY}")
        except RuntimeError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("rb.test", logging.WARNING, __file__, 1, msg, args, exc_info)
    for k, v in extra.items():
        setattr(record, k, v)
    return JsonFormatter().format(record)


def test_json_formatter_redacts_secrets_and_access_keys() -> None:
    register_secrets([SIGNING_KEY, TOKEN])
    line = _format("key %s token %s url %s", SIGNING_KEY, TOKEN,
                   "https://app.callrail.com/calls/1/recording?access_key=aaaabbbbccccdddd&x=1",
                   exc=True, detail={"k": SIGNING_KEY}, url="u?access_key=zzzz9999")
    data = json.loads(line)
    assert "\n" not in line
    for secret in (SIGNING_KEY, TOKEN, "aaaabbbbccccdddd", "zzzz9999"):
        assert secret not in line
    assert data["level"] == "warning" and data["logger"] == "rb.test"
    assert "access_key=" + FILTERED in data["msg"] and "x=1" in data["msg"]
    assert "boom" in data["exc"]
    assert data["url"].startswith("u?access_key=")


def test_redact_text_prefers_longest_secret() -> None:
    register_secrets(["abcdef-secret", "abcdef-secret-longer"])
    assert redact_text("x abcdef-secret-longer y") == f"x {FILTERED} y"


@pytest.mark.parametrize("text", [
    "u?ACCESS_KEY=zzzz9999", "u?Access_Key=zzzz9999",
    "u?acce\u017f\u017f_key=zzzz9999",   # long s: the regex's IGNORECASE matches it
    "u?access_\u212aey=zzzz9999",        # Kelvin sign, likewise
])
def test_redact_text_access_key_any_case(text: str) -> None:
    """The cheap pre-check before the access_key regex must not miss what the regex would."""
    out = redact_text(text)
    assert "zzzz9999" not in out and out.endswith(FILTERED)


def test_setup_logging_adds_one_json_handler_once(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers",
                        [h for h in root.handlers if not getattr(h, "_rilla_bridge", False)])
    monkeypatch.setattr(root, "level", root.level)
    setup_logging("WARNING")
    setup_logging("DEBUG")      # a second call (another create_app) adds nothing
    ours = [h for h in root.handlers if getattr(h, "_rilla_bridge", False)]
    assert len(ours) == 1 and isinstance(ours[0].formatter, JsonFormatter)
    assert root.level == logging.WARNING


@pytest.fixture
def no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registered secrets are process-wide: this test's own, gone after it."""
    monkeypatch.setattr(observability, "_known_secrets", [])


def test_every_registered_secret_is_masked_whatever_its_length(no_secrets: None) -> None:
    register_secrets(["x9", "tok12", "", SIGNING_KEY])
    assert observability._known_secrets == [SIGNING_KEY, "tok12", "x9"]    # longest first
    assert redact_text(f"t=tok12 k={SIGNING_KEY} c=x9.") == (
        f"t={FILTERED} k={FILTERED} c={FILTERED}.")
    register_secrets(["x9"])                                    # registered once
    assert observability._known_secrets.count("x9") == 1
    line = json.loads(_format("token %s", "tok12"))
    assert line["msg"] == f"token {FILTERED}"


def test_text_as_long_as_the_shortest_secret_is_still_searched(no_secrets: None) -> None:
    """Text shorter than every secret skips the search for them, never one that fits."""
    register_secrets(["long-secret-0123", "sk-42"])
    assert redact_text("sk-42") == FILTERED
    assert redact_text("sk-4") == "sk-4"
    assert redact_text("a sk-42") == f"a {FILTERED}"
    assert redact_text("?token=abc") == f"?token={FILTERED}"   # shorter than the long one


@pytest.mark.parametrize(("text", "kept"), [
    ("media https://cdn.callingly.com/recordings/4f9a2c71e0b84d3a.mp3 end",
     f"media https://cdn.callingly.com/{FILTERED} end"),
    ('{"recording_url": "https://cdn.callingly.com/r/abc.mp3?sig=1"}',
     f'{{"recording_url": "https://cdn.callingly.com/{FILTERED}"}}'),
    ('"https:\\/\\/cdn.callingly.com\\/r\\/abc.mp3"',             # as JSON escapes it
     f'"https:\\/\\/cdn.callingly.com/{FILTERED}"'),
    ("HTTP://CDN.Callingly.COM/Recordings/ABC.mp3", f"HTTP://CDN.Callingly.COM/{FILTERED}"),
    ("no link to callingly.com here", "no link to callingly.com here"),
    ("https://app.callrail.com/calls/1/recording", "https://app.callrail.com/calls/1/recording"),
])
def test_callingly_recording_links_are_masked_after_the_host(no_secrets: None, text: str,
                                                             kept: str) -> None:
    assert redact_text(text) == kept
    assert "4f9a2c71e0b84d3a" not in redact_text(text) and "abc.mp3" not in redact_text(text)


def test_a_dead_letters_callingly_link_is_masked_in_logs(no_secrets: None) -> None:
    line = _format("dead letter", payload={
        "media_url": "https://cdn.callingly.com/recordings/4f9a2c71e0b84d3a.mp3"})
    assert "4f9a2c71e0b84d3a" not in line and "cdn.callingly.com" in line


def test_no_tracing_headers_go_to_third_parties(sentry_transport: CapturingTransport) -> None:
    """Requests to Rilla and CallRail carry no sentry-trace or baggage header (they hold the
    DSN's public key and our release)."""
    assert init_sentry(DSN, environment="test", component="worker", transport=sentry_transport)
    assert sentry_sdk.get_client().options["trace_propagation_targets"] == []
    for host in ("api.apirilla.com", "api.callrail.com"):
        conn = http.client.HTTPSConnection(host)
        conn.putrequest("POST", "/custom/appointment")    # headers are buffered, nothing sent
        sent = b"\n".join(conn._buffer).lower()  # type: ignore[attr-defined]
        assert b"sentry-trace" not in sent and b"baggage" not in sent
        assert f"host: {host}".encode() in sent
        conn.close()


@pytest.mark.parametrize("text", [
    "POST /webhooks/callingly/acme?token=zzzz9999 HTTP/1.1",
    "Invalid request line: '/webhooks/callingly/acme?event=x&TOKEN=zzzz9999\\x00 HTTP/1.1'",
    "u?to\u212aen=zzzz9999",             # Kelvin sign: casefolds to k, as the regex matches
])
def test_redact_text_masks_url_tokens_whatever_a_server_quotes(text: str) -> None:
    """A Callingly token sits in the webhook URL; a server's own error line may quote the
    request line before any tenant secret is registered (issue 14)."""
    out = redact_text(text)
    assert "zzzz9999" not in out and out.count("=" + FILTERED) == 1


def test_raw_bytes_in_a_log_line_are_masked_whatever_the_field_is_called() -> None:
    body = json.dumps({"note": RAW_BODY_MARK}).encode()
    record = logging.LogRecord("rilla_bridge.worker", logging.ERROR, __file__, 1, "broke",
                               None, None)
    record.raw = body            # type: ignore[attr-defined]
    record.chunk = bytearray(body)   # type: ignore[attr-defined]
    record.size = len(body)      # type: ignore[attr-defined]
    line = json.loads(JsonFormatter().format(record))
    assert line["raw"] == FILTERED and line["chunk"] == FILTERED
    assert line["size"] == len(body)   # other fields are kept


def test_raw_bytes_logged_as_extra_do_not_reach_sentry(
        sentry_transport: CapturingTransport) -> None:
    """Sentry turns bytes into text before ``before_send``; the log record still tells which
    ``extra=`` fields held bytes (found by tests/integration/test_sentry_processes.py)."""
    assert init_sentry(DSN, environment="test", component="worker", transport=sentry_transport)
    body = json.dumps({"note": RAW_BODY_MARK}).encode()
    logging.getLogger("rilla_bridge.worker").error(
        "delivery broke", extra={"raw": body, "event_id": "ev_1", "text": "kept"})
    sentry_sdk.flush()
    text = _assert_clean(sentry_transport.events)
    extra = sentry_transport.events[0]["extra"]
    assert extra["raw"] == FILTERED and extra["event_id"] == "ev_1" and extra["text"] == "kept"
    assert "delivery broke" in text
