"""The RSGI adapter (``app.rsgi``): granian's scope and protocol in, the WSGI app called on a
whole body, its reply out. With fake scope and protocol objects shaped like granian's."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest

from app import create_app
from app.rsgi import RsgiAdapter
from rilla_bridge.clock import FakeClock
from rilla_bridge.providers.callrail import signature as callrail_signature
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import parse_tenants

KEY = "rsgi-signing-key-00001"
TENANTS = f"""
[tenants.acme]
rilla_api_key = "rsgi-rilla-key-000001"
[tenants.acme.callrail]
signing_key = "{KEY}"
"""


class Headers:
    """Like granian's RSGIHeaders: lower-case names, ``items()`` with repeats."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = [(k.lower(), v) for k, v in items]

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)


@dataclass
class Scope:
    path: str = "/webhooks/callrail/acme"
    method: str = "POST"
    query_string: str = ""
    headers: Headers = field(default_factory=lambda: Headers([]))
    proto: str = "http"
    http_version: str = "1.1"
    server: str = "127.0.0.1:8000"
    client: str = "127.0.0.1:50123"
    scheme: str = "http"


class ProtocolError(RuntimeError):
    """Like granian's RSGIProtocolError (a broken chunked body, a client gone)."""


class Protocol:
    """Like granian's RSGIHTTPProtocol: the body whole (``await protocol()``) or in chunks
    (``async for``); ``stall`` never delivers it, ``fail`` raises as a broken stream does."""

    def __init__(self, chunks: Iterable[bytes] = (), *, stall: bool = False,
                 fail: bool = False) -> None:
        self.chunks = list(chunks)
        self.stall, self.fail = stall, fail
        self.awaited = 0
        self.taken = 0
        self.response: tuple[int, list[tuple[str, str]], bytes] | None = None

    async def _wait(self) -> None:
        self.awaited += 1
        if self.stall:
            await asyncio.Event().wait()
        if self.fail:
            raise ProtocolError("Transport stream error")

    async def __call__(self) -> bytes:
        await self._wait()
        self.taken = sum(map(len, self.chunks))
        return b"".join(self.chunks)

    async def _iter(self) -> AsyncIterator[bytes]:
        self.awaited += 1
        if self.stall:
            await asyncio.Event().wait()
        if self.fail:   # granian: a broken stream is one more empty chunk before the end
            yield b"{"
            yield b""
            yield b""
            return
        for chunk in self.chunks:
            self.taken += len(chunk)
            yield chunk
        yield b""        # granian ends every stream with an empty chunk

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iter()

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.response = (status, headers, body)


@pytest.fixture
def adapter(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> RsgiAdapter:
    app = create_app(settings=Settings(max_body_bytes=1000),
                     tenants=parse_tenants(TENANTS, env={}), redis_client=fake_redis,
                     clock=clock)
    return RsgiAdapter(app, max_body_bytes=1000, read_timeout=0.2)


def serve(adapter: RsgiAdapter, scope: Scope, protocol: Protocol
          ) -> tuple[int, dict[str, str], bytes]:
    asyncio.run(adapter.__rsgi__(scope, protocol))
    assert protocol.response is not None
    status, headers, body = protocol.response
    return status, {k.lower(): v for k, v in headers}, body


def webhook(raw: bytes, *, length: bool = True, signature: str | None = None) -> Scope:
    headers = [("Signature", signature or callrail_signature(KEY, raw)),
               ("Content-Type", "application/json")]
    headers.append(("Content-Length", str(len(raw))) if length
                   else ("Transfer-Encoding", "chunked"))
    return Scope(headers=Headers(headers))


def test_a_webhook_with_a_length_is_stored_and_answered(adapter: RsgiAdapter) -> None:
    raw = json.dumps({"resource_id": "CAL1"}).encode()
    status, headers, body = serve(adapter, webhook(raw), Protocol([raw]))
    assert status == 202
    assert json.loads(body)["status"] == "queued"
    assert headers["content-type"] == "application/json"


def test_a_chunked_webhook_is_read_in_chunks(adapter: RsgiAdapter) -> None:
    raw = json.dumps({"resource_id": "CAL2", "pad": "p" * 300}).encode()
    chunks = [raw[i:i + 100] for i in range(0, len(raw), 100)]
    status, _, _ = serve(adapter, webhook(raw, length=False), Protocol(chunks))
    assert status == 202


def test_a_declared_length_over_the_limit_is_413_without_reading(adapter: RsgiAdapter) -> None:
    protocol = Protocol([b"x" * 5000])
    scope = Scope(headers=Headers([("Content-Length", "52428800"), ("Signature", "x")]))
    status, headers, body = serve(adapter, scope, protocol)
    assert status == 413 and protocol.awaited == 0
    assert headers["connection"] == "close"
    assert json.loads(body)["error"]


def test_a_chunked_body_over_the_limit_is_read_only_to_limit_plus_one_chunk(
        adapter: RsgiAdapter) -> None:
    protocol = Protocol([b"x" * 600] * 10)
    status, headers, _ = serve(adapter, webhook(b"", length=False, signature="x"), protocol)
    assert status == 413 and headers["connection"] == "close"
    assert protocol.taken == 1200   # stopped at the first chunk over the 1000-byte limit


@pytest.mark.parametrize("length", [True, False])
def test_a_body_that_does_not_arrive_in_time_is_408(adapter: RsgiAdapter, length: bool) -> None:
    raw = b'{"resource_id": "CAL3"}'
    status, headers, body = serve(adapter, webhook(raw, length=length), Protocol(stall=True))
    assert status == 408 and headers["connection"] == "close"
    assert "0.2 s" in json.loads(body)["error"]


@pytest.mark.parametrize("length", [True, False])
def test_a_broken_body_is_400_and_closes(adapter: RsgiAdapter, length: bool,
                                         caplog: pytest.LogCaptureFixture) -> None:
    raw = b'{"resource_id": "CAL4"}'
    status, headers, body = serve(adapter, webhook(raw, length=length), Protocol(fail=True))
    assert status == 400 and headers["connection"] == "close"
    assert ("ProtocolError" if length else "BrokenBody") in json.loads(body)["error"]
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]


def test_without_length_or_chunks_there_is_no_body_to_wait_for(adapter: RsgiAdapter) -> None:
    protocol = Protocol(stall=True)
    status, _, _ = serve(adapter, Scope(headers=Headers([("Signature", "x")])), protocol)
    assert status == 401 and protocol.awaited == 0   # an empty body: the signature fails


def test_other_paths_run_in_the_pool_with_a_wsgi_environ(fake_redis: fakeredis.FakeRedis
                                                         ) -> None:
    seen: dict[str, Any] = {}

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.update(environ, thread=threading.current_thread().name,
                    body=environ["wsgi.input"].read())
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"o", b"k"]

    adapter = RsgiAdapter(wsgi_app, max_body_bytes=100, read_timeout=1)
    scope = Scope(path="/caf%C3%A9/x", method="GET", query_string="a=1&token=t",
                  headers=Headers([("Host", "example"), ("X-Dup", "1"), ("X-Dup", "2"),
                                   ("Content-Length", "2")]))
    status, _, body = serve(adapter, scope, Protocol([b"hi"]))
    assert (status, body) == (200, b"ok")
    assert seen["thread"].startswith("web")
    assert seen["PATH_INFO"] == "/caf\u00c3\u00a9/x"    # latin-1 "bytes in a str" (PEP 3333)
    assert seen["QUERY_STRING"] == "a=1&token=t"
    assert (seen["HTTP_HOST"], seen["HTTP_X_DUP"], seen["CONTENT_LENGTH"]) == ("example",
                                                                              "1, 2", "2")
    assert seen["body"] == b"hi"
    assert (seen["REMOTE_ADDR"], seen["SERVER_PORT"]) == ("127.0.0.1", "8000")
    assert seen["SERVER_PROTOCOL"] == "HTTP/1.1" and seen["wsgi.url_scheme"] == "http"


def test_webhooks_run_inline_on_the_event_loop(fake_redis: fakeredis.FakeRedis) -> None:
    threads: list[str] = []

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        threads.append(threading.current_thread().name)
        start_response("202 Accepted", [])
        return [b""]

    adapter = RsgiAdapter(wsgi_app, max_body_bytes=100, read_timeout=1)
    serve(adapter, webhook(b"{}"), Protocol([b"{}"]))
    assert threads == [threading.current_thread().name]


def test_an_error_escaping_the_app_is_a_json_500(caplog: pytest.LogCaptureFixture) -> None:
    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise RuntimeError("bug")

    adapter = RsgiAdapter(wsgi_app, max_body_bytes=100, read_timeout=1)
    status, _, body = serve(adapter, webhook(b"{}"), Protocol([b"{}"]))
    assert status == 500 and json.loads(body) == {"error": "internal error"}
    assert any(r.levelname == "ERROR" for r in caplog.records)


def test_the_unreadable_input_raises_on_every_read() -> None:
    from app.door import BodyTimeout
    from app.rsgi import _Unreadable

    stream = _Unreadable(BodyTimeout("late"))
    for read in (stream.read, lambda: stream.read(10)):
        with pytest.raises(BodyTimeout):
            read()
    assert isinstance(stream, io.RawIOBase)
