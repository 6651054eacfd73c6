"""The operator process's socket (``app.operator_process``): a web worker hands a console or
admin API request over and gets the app's answer; when nothing listens it answers itself;
a request handed over is never answered twice. Server and client on a real Unix socket in
threads; the processes themselves are in ``tests/integration/test_web_server.py``."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

import pytest

from app.operator_process import OperatorClient, OperatorServer, portable
from app.rsgi import RsgiAdapter
from tests.unit.app.test_rsgi import Headers, Protocol, Scope


def echo(name: str) -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
    """A WSGI app that answers what it was asked, and who answered."""
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/console/boom":
            raise RuntimeError("a bug")
        seen = {"by": name, "method": environ["REQUEST_METHOD"], "path": environ["PATH_INFO"],
                "query": environ["QUERY_STRING"], "client": environ["REMOTE_ADDR"],
                "cookie": environ.get("HTTP_COOKIE"), "body": environ["wsgi.input"].read().decode(),
                "errors": environ["wsgi.errors"] is not None}
        start_response("201 Created", [("Content-Type", "application/json"), ("X-By", name)])
        return [json.dumps(seen).encode()]
    return app


@pytest.fixture
def address(tmp_path: Path) -> str:
    return str(tmp_path / "socket")


@contextlib.contextmanager
def serving(app: Any, address: str, **options: Any) -> Iterator[OperatorServer]:
    """An operator server answering with ``app`` on a thread, stopped at the end."""
    srv = OperatorServer(app, address, **options)
    thread = threading.Thread(target=srv.serve)
    thread.start()
    try:
        yield srv
    finally:
        srv.stop()
        thread.join(10)
        assert not thread.is_alive()


@pytest.fixture
def server(address: str) -> Iterator[OperatorServer]:
    with serving(echo("operator"), address, request_seconds=2.0) as srv:
        yield srv


def run(adapter: RsgiAdapter, scope: Scope, protocol: Protocol) -> tuple[int, dict[str, str],
                                                                         dict[str, Any]]:
    asyncio.run(adapter.__rsgi__(scope, protocol))
    assert protocol.response is not None
    status, headers, body = protocol.response
    return status, dict(headers), json.loads(body)


def test_console_and_admin_api_requests_are_answered_by_the_operator_process(
        server: OperatorServer) -> None:
    adapter = RsgiAdapter(echo("worker"), max_body_bytes=1000, read_timeout=1,
                          operator=OperatorClient(server.address))
    scope = Scope(path="/console/events", method="POST", query_string="phone=%2B1555",
                  client="10.1.2.3:4444",
                  headers=Headers([("Cookie", "rb_console=abc"), ("Content-Length", "9")]))
    status, headers, seen = run(adapter, scope, Protocol([b"csrf=tok1"]))
    assert (status, headers["X-By"]) == (201, "operator")
    assert seen == {"by": "operator", "method": "POST", "path": "/console/events",
                    "query": "phone=%2B1555", "client": "10.1.2.3", "cookie": "rb_console=abc",
                    "body": "csrf=tok1", "errors": True}
    _, _, seen = run(adapter, Scope(path="/admin/api/events", method="GET"), Protocol())
    assert seen["by"] == "operator"
    # webhooks and the process's own views stay in the worker
    for path, method in (("/healthz", "GET"), ("/metrics", "GET"),
                         ("/webhooks/callrail/acme", "POST")):
        _, _, seen = run(adapter, Scope(path=path, method=method), Protocol())
        assert seen["by"] == "worker", path


def test_with_nothing_listening_the_worker_answers_itself(address: str) -> None:
    adapter = RsgiAdapter(echo("worker"), max_body_bytes=1000, read_timeout=1,
                          operator=OperatorClient(address))
    _, _, seen = run(adapter, Scope(path="/console/", method="GET"), Protocol())
    assert seen["by"] == "worker"


def test_a_stale_socket_file_is_replaced(address: str) -> None:
    Path(address).write_bytes(b"")   # a killed process's socket stays behind
    with serving(echo("operator"), address):
        reply = OperatorClient(address).forward(
            {"REQUEST_METHOD": "GET", "PATH_INFO": "/console/", "QUERY_STRING": "",
             "REMOTE_ADDR": "127.0.0.1"}, b"")
        assert reply is not None and reply[0] == 201
    assert not Path(address).exists()


def test_an_answer_that_does_not_come_in_time_is_504_and_not_run_again(address: str) -> None:
    """A request handed over may be running (a replay, a delete): it is never run here too."""
    release = threading.Event()
    calls: list[str] = []

    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        calls.append("operator")
        release.wait(10)
        start_response("200 OK", [])
        return [b"{}"]

    with serving(slow, address):
        try:
            adapter = RsgiAdapter(echo("worker"), max_body_bytes=1000, read_timeout=1,
                                  operator=OperatorClient(address, answer_seconds=0.2))
            status, headers, body = run(adapter, Scope(path="/admin/api/dead-letters/replay",
                                                       method="POST"), Protocol())
            assert status == 504 and body == {"error": "the console did not answer in time"}
            assert headers["Content-Type"] == "application/json"
            assert calls == ["operator"]
        finally:
            release.set()


def test_a_process_that_dies_while_answering_is_502(address: str) -> None:
    listener = Listener(address, family="AF_UNIX")

    def die() -> None:   # takes the request, then goes away without an answer
        with listener.accept() as conn:
            conn.recv()

    thread = threading.Thread(target=die)
    thread.start()
    try:
        adapter = RsgiAdapter(echo("worker"), max_body_bytes=1000, read_timeout=1,
                              operator=OperatorClient(address))
        status, _, body = run(adapter, Scope(path="/console/", method="GET"), Protocol())
        assert status == 502 and "try again" in body["error"]
    finally:
        thread.join(10)
        listener.close()


def test_an_unhandled_error_in_the_operator_process_is_500(server: OperatorServer) -> None:
    adapter = RsgiAdapter(echo("worker"), max_body_bytes=1000, read_timeout=1,
                          operator=OperatorClient(server.address))
    status, _, body = run(adapter, Scope(path="/console/boom", method="GET"), Protocol())
    assert (status, body) == (500, {"error": "internal error"})


def test_a_connection_that_sends_nothing_does_not_hold_the_others(address: str) -> None:
    with serving(echo("operator"), address, threads=1, request_seconds=0.2):
        silent = Client(address, family="AF_UNIX")   # the only thread waits on it, then drops it
        reply = OperatorClient(address, answer_seconds=5).forward(
            {"REQUEST_METHOD": "GET", "PATH_INFO": "/console/", "QUERY_STRING": "",
             "REMOTE_ADDR": "127.0.0.1"}, b"")
        assert reply is not None and reply[0] == 201
        with pytest.raises(EOFError):
            silent.recv()
        silent.close()


def test_only_plain_values_and_the_body_cross_the_socket() -> None:
    environ = {"REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO(b"x"), "wsgi.errors": object(),
               "wsgi.version": (1, 0), "wsgi.multithread": True, "SERVER_PORT": "80",
               "werkzeug.request": object()}
    assert portable(environ, b"body") == {"REQUEST_METHOD": "GET", "wsgi.version": (1, 0),
                                          "wsgi.multithread": True, "SERVER_PORT": "80",
                                          "rb.body": b"body"}


def test_console_requests_waiting_on_the_operator_process_never_hold_up_health(
        address: str) -> None:
    release = threading.Event()

    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        release.wait(10)
        start_response("200 OK", [])
        return [b'{"by": "operator"}']

    adapter = RsgiAdapter(echo("worker"), max_body_bytes=1000, read_timeout=1, threads=2,
                          operator=OperatorClient(address))

    async def scenario() -> dict[str, Any]:
        pages = [Protocol() for _ in range(4)]   # more than the pool's threads
        waiting = [asyncio.ensure_future(adapter.__rsgi__(Scope(path="/console/", method="GET"),
                                                          p)) for p in pages]
        health = Protocol()
        await asyncio.wait_for(adapter.__rsgi__(Scope(path="/healthz", method="GET"), health),
                               timeout=5)
        assert all(p.response is None for p in pages)   # still waiting
        release.set()
        await asyncio.gather(*waiting)
        assert all(p.response is not None and p.response[0] == 200 for p in pages)
        assert health.response is not None
        return dict(json.loads(health.response[2]))

    with serving(slow, address):
        try:
            assert asyncio.run(scenario())["by"] == "worker"
        finally:
            release.set()


def test_the_operator_process_sits_in_a_scheduling_group_of_its_own() -> None:
    """Its own session (so kernels that group CPU time by session do not charge its pages to
    the web workers' group), and that group niced where the kernel has one."""
    code = ("import os; from app.operator_process import NICE, own_scheduling_group as own; "
            "own(); print(os.getsid(0) == os.getpid(), NICE); "
            "p = '/proc/self/autogroup'; "
            "print(open(p).read().strip() if os.path.exists(p) else 'none')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.splitlines()
    leader, nice = out[0].split()
    assert leader == "True"
    if out[1] != "none":
        assert out[1].endswith(f"nice {nice}")
