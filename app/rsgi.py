"""The web process under granian's RSGI interface: the WSGI app, called only on a whole body.

granian (a Rust HTTP server) reads every connection, its headers and its body outside Python,
so a client that trickles its request holds no worker and no thread: slow or hostile clients
cost a socket and a little memory. This adapter waits for the body on the worker's event loop
under a deadline (``WEB_READ_TIMEOUT_SECONDS``) and a size bound, then calls the ordinary WSGI
app (``app.door.FrontDoor`` in front of Flask) with the body in memory:

* a webhook POST is answered inline on the event loop (the handler's only wait is one Redis
  round trip, as in a sync worker; a thread hop would cost more than it saves);
* console pages and admin API requests are handed to the operator process beside the
  workers (``app.operator_process``) from a small thread pool of their own, so their
  rendering takes no GIL from this worker's webhooks;
* anything else (health, readiness, metrics: Flask views that may wait on Redis longer) runs
  in another small thread pool, so it never stalls the webhooks of the same worker.

The door sees a body that could not be read (deadline passed, broken chunked encoding, client
gone) as a ``wsgi.input`` whose ``read`` raises ``UnreadableBody``: the same path, reply and log
line as under any WSGI server. A declared Content-Length over the limit is not read at all.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote

from app.door import WEBHOOK_PATH, BodyTimeout, UnreadableBody
from app.operator_process import (
    OperatorClient,
    Response,
    WSGIApp,
    answer,
    is_operator_path,
)

log = logging.getLogger("rilla_bridge.web")
_EMPTY = b""


class _BrokenBody(Exception):
    """granian reported a broken request body."""


class _Unreadable(io.RawIOBase):
    """``wsgi.input`` of a body that could not be read: every read raises ``error``."""

    def __init__(self, error: UnreadableBody) -> None:
        super().__init__()
        self.error = error

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        raise self.error


class RsgiAdapter:
    """An RSGI application (``__rsgi__``) serving ``wsgi_app`` (see the module docstring)."""

    def __init__(self, wsgi_app: WSGIApp, *, max_body_bytes: int, read_timeout: float,
                 threads: int = 4, operator: OperatorClient | None = None) -> None:
        self.wsgi_app = wsgi_app
        self.operator = operator
        self.max_body_bytes = max_body_bytes
        self.read_timeout = read_timeout
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="web")
        # Console requests wait on their own threads: an operator process that is slow to
        # answer never holds up /healthz or /metrics.
        self._operator_pool = ThreadPoolExecutor(threads, thread_name_prefix="operator")

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
        self._operator_pool.shutdown(wait=True, cancel_futures=False)

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        if scope.proto != "http":   # websockets are off; nothing else is HTTP
            return
        environ = self._environ(scope)
        environ["wsgi.input"] = await self._body(protocol, environ)
        path = environ["PATH_INFO"]
        if scope.method == "POST" and WEBHOOK_PATH.fullmatch(path):
            status, headers, body = self._call(environ)
        elif is_operator_path(path):
            loop = asyncio.get_running_loop()
            status, headers, body = await loop.run_in_executor(
                self._operator_pool, self._operator, environ)
        else:
            loop = asyncio.get_running_loop()
            status, headers, body = await loop.run_in_executor(self._pool, self._call, environ)
        protocol.response_bytes(status, headers, body)

    async def _body(self, protocol: Any, environ: dict[str, Any]) -> io.RawIOBase | io.BytesIO:
        declared = environ.get("CONTENT_LENGTH")
        if declared is not None:
            # granian has checked that it is a number (else it answered 400 itself)
            if declared == "0" or int(declared) > self.max_body_bytes:
                return io.BytesIO(_EMPTY)   # over the limit: the door answers 413 unread
        elif "HTTP_TRANSFER_ENCODING" not in environ and environ["SERVER_PROTOCOL"] != "HTTP/2":
            return io.BytesIO(_EMPTY)       # HTTP/1 without either header: no body
        try:
            async with asyncio.timeout(self.read_timeout):
                if declared is not None:    # hyper stops at the declared length
                    return io.BytesIO(await protocol())
                return io.BytesIO(await self._bounded(protocol))
        except TimeoutError:
            return _Unreadable(BodyTimeout(f"body not received within {self.read_timeout:g} s"))
        except Exception as exc:   # granian's protocol error: broken chunks, client gone
            return _Unreadable(UnreadableBody(f"body could not be read ({type(exc).__name__})"))

    async def _bounded(self, protocol: Any) -> bytes:
        """A body of unknown length (chunked), read only up to one byte over the limit (the
        door then answers 413 and the connection is closed)."""
        chunks: list[bytes] = []
        total = 0
        ends = 0
        async for chunk in protocol:
            # granian (2.x) ends every body stream with one empty chunk, and hands over a
            # broken one (bad chunk size, client gone) as one more empty chunk before that;
            # so do trailers, which no webhook sender uses (such a body is refused too).
            if not chunk:
                ends += 1
                continue
            if ends:
                raise _BrokenBody
            chunks.append(chunk)
            total += len(chunk)
            if total > self.max_body_bytes:
                return b"".join(chunks)
        if ends > 1:
            raise _BrokenBody
        return b"".join(chunks)

    @staticmethod
    def _environ(scope: Any) -> dict[str, Any]:
        server, _, server_port = scope.server.rpartition(":")
        client, _, client_port = scope.client.rpartition(":")
        path: str = scope.path
        environ: dict[str, Any] = {
            "REQUEST_METHOD": scope.method,
            "SCRIPT_NAME": "",
            # WSGI carries the decoded path as latin-1 "bytes in a str" (PEP 3333)
            "PATH_INFO": unquote(path, encoding="latin-1") if "%" in path else path,
            "QUERY_STRING": scope.query_string,
            "SERVER_NAME": server,
            "SERVER_PORT": server_port,
            "SERVER_PROTOCOL": f"HTTP/{scope.http_version}",
            "REMOTE_ADDR": client,
            "REMOTE_PORT": client_port,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": scope.scheme,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            # the input ends where the body ends: werkzeug (and the door) may read to EOF
            "wsgi.input_terminated": True,
        }
        for name, value in scope.headers.items():
            if name == "content-length":
                environ["CONTENT_LENGTH"] = value
            elif name == "content-type":
                environ["CONTENT_TYPE"] = value
            else:
                key = "HTTP_" + name.upper().replace("-", "_")
                seen = environ.get(key)
                environ[key] = value if seen is None else f"{seen}, {value}"
        return environ

    def _call(self, environ: dict[str, Any]) -> Response:
        return answer(self.wsgi_app, environ)

    def _operator(self, environ: dict[str, Any]) -> Response:
        """A console or admin API request: answered by the operator process, or here when
        that cannot be reached (``app.operator_process``)."""
        body = environ["wsgi.input"]
        if self.operator is not None and isinstance(body, io.BytesIO):
            reply = self.operator.forward(environ, body.getvalue())
            if reply is not None:
                return reply
        return self._call(environ)


# How long a thread may hold the GIL while another waits for it (CPython's default: 5 ms).
# Webhooks are answered on the event loop thread while the other requests run in the pool
# (health, metrics; console pages too when the operator process cannot be reached), and each
# time the event loop wants the GIL back (after every Redis round trip) it waited up to the
# whole interval. At 0.5 ms a webhook's answer time barely moves beside them.
GIL_SWITCH_INTERVAL_SECONDS = 0.0005


def build() -> RsgiAdapter:
    """granian's factory target (``app.rsgi:build``): one app per worker process."""
    from app import create_app
    from rilla_bridge.settings import OPERATOR_SOCKET_ENV, Settings

    sys.setswitchinterval(GIL_SWITCH_INTERVAL_SECONDS)

    settings = Settings.from_env()
    socket = os.environ.get(OPERATOR_SOCKET_ENV)
    return RsgiAdapter(create_app(settings), max_body_bytes=settings.max_body_bytes,
                       read_timeout=settings.web_read_timeout_seconds,
                       operator=OperatorClient(socket) if socket else None)
