"""The operator process: console pages and admin API requests answered beside the web
workers, not in them.

A console page is tens of milliseconds of Python (its queries, Jinja, the secrets filter).
Answered in a web worker, it holds the GIL the worker's webhooks need: each webhook waits for
it again after every Redis round trip, and intake's p99 grew 1.7 times while one operator read
one page a second (``bench/console.py``). So ``rilla-bridge web`` starts one more process on
the dyno beside granian's workers (``ops.web.OperatorProcess``). It builds the same app
(``create_app``: the same sign-in, CSRF, throttling and headers) and answers the console and
admin API requests the workers hand it over a Unix socket; the worker's thread waits for the
answer without the GIL, and webhooks no longer wait on pages.

* The socket is in a directory only the dyno's user can open (0700): only the dyno's own
  processes can reach it, and they could read ``ADMIN_TOKEN`` from the environment anyway.
  The request still goes through all of the console's own checks.
* When the operator process is not there (starting, or restarting after a crash), the worker
  answers the request itself, as it did before: nothing was handed over, nothing runs twice.
* A request handed over is never run again: if its answer does not come within
  ``ANSWER_SECONDS`` (every query has a statement timeout well under it) the worker answers
  504, and if the process died meanwhile, 502.
* The web process restarts it when it crashes; it stops on SIGTERM after the requests it has
  (each bounded as above), and on its own when the web process is gone.

    python -m app.operator_process SOCKET_PATH PARENT_PIPE_FD
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

log = logging.getLogger("rilla_bridge.web")
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
Response = tuple[int, list[tuple[str, str]], bytes]

# The paths the workers hand over: the console's pages and the admin API.
OPERATOR_PATHS = ("/console", "/admin/")
# How long a worker waits for an answer: longer than any query's statement timeout and a
# page's rendering; an export of many dead letters fits.
ANSWER_SECONDS = 120.0
# How long the operator process waits for a connected worker to send its request.
REQUEST_SECONDS = 10.0
# Requests the operator process works on at once (the console's own limit, OPERATOR_SLOTS
# in app.admin, queues the rest); more connections wait in the listen backlog.
THREADS = 8
# The operator process's CPU priority (nice) under the web workers': on a dyno whose cores
# are busy, the kernel runs webhooks first and a page waits a little.
NICE = 10
_BODY = "rb.body"


def json_reply(status: int, message: str) -> Response:
    body = json.dumps({"error": message}).encode()
    return status, [("Content-Type", "application/json"), ("Cache-Control", "no-store")], body


def is_operator_path(path: str) -> bool:
    return path.startswith(OPERATOR_PATHS)


INTERNAL: Response = (500, [("Content-Type", "application/json")],
                      b'{"error": "internal error"}')


def answer(app: WSGIApp, environ: dict[str, Any]) -> Response:
    """``call_wsgi``, and a 500 for an error the app let through (the door and Flask catch
    their own errors: this is a bug, logged)."""
    try:
        return call_wsgi(app, environ)
    except Exception:
        log.exception("unhandled error")
        return INTERNAL


def call_wsgi(app: WSGIApp, environ: dict[str, Any]) -> Response:
    """The WSGI app's status, headers and joined body (it never streams here)."""
    answer: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], None]:
        answer[:] = [status, headers]
        return _no_write

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return int(answer[0][:3]), answer[1], body


def _no_write(data: bytes) -> None:
    raise RuntimeError("the write() callable of start_response is not supported")


def portable(environ: dict[str, Any], body: bytes) -> dict[str, Any]:
    """The request as it crosses the socket: the CGI variables and WSGI flags, and the
    body (the input and error streams are the receiving process's own)."""
    out: dict[str, Any] = {k: v for k, v in environ.items()
           if isinstance(v, str | bool | int | tuple) and k not in ("wsgi.input", "wsgi.errors")}
    out[_BODY] = body
    return out


class OperatorClient:
    """A web worker's side: hands one request to the operator process and waits for its
    answer (a thread of the worker's pool, blocked on the socket, not holding the GIL)."""

    def __init__(self, address: str, answer_seconds: float = ANSWER_SECONDS) -> None:
        self.address = address
        self.answer_seconds = answer_seconds

    def forward(self, environ: dict[str, Any], body: bytes) -> Response | None:
        """The operator process's answer; None when it cannot be reached (nothing was sent:
        the caller answers the request itself)."""
        try:
            conn = Client(self.address, family="AF_UNIX")
        except OSError:   # not listening yet, restarting, or gone: no socket or refused
            return None
        with conn:
            try:
                conn.send(portable(environ, body))
                if not conn.poll(self.answer_seconds):
                    log.error("the operator process did not answer %s within %g s",
                              environ.get("PATH_INFO"), self.answer_seconds)
                    return json_reply(504, "the console did not answer in time")
                status, headers, reply = conn.recv()
                return int(status), list(headers), bytes(reply)
            except (EOFError, OSError):
                log.error("the operator process failed while answering %s",
                          environ.get("PATH_INFO"))
                return json_reply(502, "the console failed while answering; try again")


class OperatorServer:
    """The operator process's side: answers each request handed over with the app."""

    def __init__(self, app: WSGIApp, address: str, threads: int = THREADS,
                 request_seconds: float = REQUEST_SECONDS) -> None:
        self.app = app
        self.request_seconds = request_seconds
        # One operator process at a time (the web process starts the next when one exited):
        # a socket file still there is a killed one's.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)
        self.listener = Listener(address, family="AF_UNIX", backlog=128)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="operator")
        self._stopping = threading.Event()

    @property
    def address(self) -> str:
        return str(self.listener.address)

    def serve(self) -> None:
        """Accept and answer until ``stop``; then finish the requests under way."""
        try:
            while True:
                try:
                    conn = self.listener.accept()
                except OSError:
                    if self._stopping.is_set():
                        break
                    log.exception("the operator process could not accept a request")
                    self._stopping.wait(0.1)   # out of file descriptors, say: not a busy loop
                    continue
                if self._stopping.is_set():
                    conn.close()
                    break
                self._pool.submit(self._answer, conn)
        finally:
            with contextlib.suppress(OSError):   # removes the socket file
                self.listener.close()
            self._pool.shutdown(wait=True)

    def stop(self) -> None:
        """Stop accepting (from any thread, or a signal handler): the flag, then one
        connection of its own to wake the ``accept`` under way."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            Client(self.address, family="AF_UNIX").close()

    def _answer(self, conn: Connection) -> None:
        with conn:
            try:
                if not conn.poll(self.request_seconds):
                    return
                environ = conn.recv()
            except (EOFError, OSError):
                return
            environ["wsgi.input"] = io.BytesIO(environ.pop(_BODY, b""))
            environ["wsgi.errors"] = sys.stderr
            reply = answer(self.app, environ)
            with contextlib.suppress(OSError):   # the worker gave up (504), or went away
                conn.send(reply)


def _watch_parent(fd: int) -> None:
    """The web process holds the other end of this pipe: EOF means it is gone."""
    while os.read(fd, 1):
        pass
    log.warning("the web process is gone: the operator process stops")
    os.kill(os.getpid(), signal.SIGTERM)   # handled on the main thread, which is in accept()


def own_scheduling_group(nice: int = NICE) -> None:
    """Where the kernel groups CPU time by session (``sched_autogroup``: desktop and VM
    kernels, not containers with a cgroup of their own), a nice value only ranks processes
    within their session, and this one shares the web workers': every millisecond it ran came
    out of their group's share. In a session of its own whose group is niced as well, its
    pages take CPU the rest of the machine leaves. Elsewhere this changes nothing. (The
    console bench's browser uses it too, at ``nice`` 19.)"""
    try:
        os.setsid()
    except OSError:
        return
    with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as f:
        f.write(str(nice))


def main(argv: list[str]) -> None:
    address, parent_fd = argv[0], int(argv[1])
    from app import create_app
    from app.rsgi import GIL_SWITCH_INTERVAL_SECONDS

    os.nice(NICE)
    own_scheduling_group()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_SECONDS)
    server = OperatorServer(create_app(), address)
    signal.signal(signal.SIGTERM, lambda signum, frame: server.stop())
    signal.signal(signal.SIGINT, lambda signum, frame: server.stop())
    threading.Thread(target=_watch_parent, args=(parent_fd,), daemon=True,
                     name="parent-watch").start()
    log.info("operator process listening", extra={"pid": os.getpid()})
    server.serve()


if __name__ == "__main__":
    main(sys.argv[1:])
