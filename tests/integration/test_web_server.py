"""The web process's server (``rilla-bridge web``: granian, ``app.rsgi``) against slow,
broken and hostile clients, and its shutdown, on loopback.

The first test is issue 14's critical finding: under gunicorn's sync workers a few
connections that trickle a request took every worker, and no webhook was answered. It fails
there: ``RB_TEST_WEB_SERVER=gunicorn pytest tests/integration/test_web_server.py`` runs these
tests against the same app under gunicorn sync workers (the setup before issue 14).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import psutil
import pytest
import requests

from rilla_bridge.providers.callrail import signature as callrail_signature
from tests.support import RedisServer, until
from tests.system import ADMIN_HEADERS, System

pytestmark = pytest.mark.integration

SERVER = os.environ.get("RB_TEST_WEB_SERVER", "granian")
ACME_KEY = "acme-signing-key-0001"
ACME_TOKEN = "acme-callingly-token-01"
BODY_MARK = "RAW-BODY-CUSTOMER-Kaylah-Mills"


def start(redis: RedisServer, workers: int = 2, **env: str) -> System:
    system = System(redis.url, env_extra=dict(env))
    try:
        system.start_web(workers=workers, server=SERVER)
    except BaseException:
        system.stop()
        raise
    return system


@pytest.fixture
def web(own_redis: RedisServer) -> Iterator[System]:
    system = start(own_redis)
    yield system
    system.stop()


def _signed_post(system: System, i: int, timeout: float = 2.0) -> tuple[int | str, float]:
    raw = json.dumps({"resource_id": f"CAL-normal-{i}"}).encode()
    started = time.perf_counter()
    try:
        resp = requests.post(f"{system.web}/webhooks/callrail/acme", data=raw,
                             headers={"Signature": callrail_signature(ACME_KEY, raw),
                                      "Connection": "close"}, timeout=timeout)
    except requests.RequestException as exc:
        return type(exc).__name__, time.perf_counter() - started
    return resp.status_code, time.perf_counter() - started


def _open(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(data)
    return sock


def _reply(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout``)."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while data := sock.recv(65536):
            chunks.append(data)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


def _status(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1.1 "), reply[:200]
    return int(reply.split(b" ", 2)[1])


HEAD_ONLY = b"POST /webhooks/callrail/acme HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a"
BODY_STARTED = (b"POST /webhooks/callrail/acme HTTP/1.1\r\nHost: 127.0.0.1\r\nSignature: x\r\n"
                b"Content-Length: 100000\r\n\r\n{\"a\": \"")


# -- slow clients ----------------------------------------------------------------------------
def test_webhooks_get_202_quickly_while_many_connections_trickle(web: System) -> None:
    """150 connections that stopped in their headers and 150 that stopped in their bodies;
    a normal client's signed webhooks are still all answered 202, quickly."""
    with ExitStack() as stack:
        for head in (HEAD_ONLY, BODY_STARTED):
            for _ in range(150):
                stack.callback(_open(web.web_port, head).close)
        time.sleep(0.5)   # every one of them has reached the server
        results = [_signed_post(web, i) for i in range(30)]
    codes = [code for code, _ in results]
    assert codes == [202] * 30, codes
    seconds = sorted(s for _, s in results)
    assert seconds[-1] < 1.0 and seconds[15] < 0.1, seconds


# -- broken bodies ---------------------------------------------------------------------------
def test_broken_chunked_body_and_hang_up_are_answered_and_never_logged(web: System) -> None:
    """Issue 14 (medium): these got a 500, an ERROR traceback and the raw bytes in the log."""
    head = (b"POST /webhooks/callrail/acme HTTP/1.1\r\nHost: 127.0.0.1\r\nSignature: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = f'{{"customer_name": "{BODY_MARK}"'.encode()
    bad_size = head + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\nzz" + BODY_MARK.encode()
    sock = _open(web.web_port, bad_size + b"\r\n\r\n")
    reply = _reply(sock)
    sock.close()
    assert _status(reply) == 400, reply
    assert BODY_MARK.encode() not in reply
    # a client that hangs up mid-body, with a length and chunked
    for start in (head + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n",
                  b"POST /webhooks/callrail/acme HTTP/1.1\r\nHost: 127.0.0.1\r\nSignature: x"
                  b"\r\nContent-Length: 5000\r\n\r\n" + chunk):
        sock = _open(web.web_port, start)
        time.sleep(0.3)
        sock.close()
    time.sleep(0.5)
    assert _signed_post(web, 1)[0] == 202    # the server is fine
    text = web.log("web")
    assert BODY_MARK not in text
    assert "Traceback" not in text
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert not [x for x in lines if x["level"] in ("error", "critical")], lines
    assert [x["status"] for x in lines if x.get("msg") == "request"
            and x.get("method") == "POST"].count(400) == 3


def test_slow_headers_and_slow_bodies_are_cut_off_at_the_deadline(own_redis: RedisServer
                                                                  ) -> None:
    system = start(own_redis, WEB_READ_TIMEOUT_SECONDS="1")
    try:
        started = time.monotonic()
        body = _open(system.web_port, BODY_STARTED)
        head = _open(system.web_port, HEAD_ONLY)
        reply = _reply(body, timeout=5)
        assert _status(reply) == 408, reply
        assert b"connection: close" in reply.lower()
        assert _reply(head, timeout=5) == b""   # granian closes it: headers took too long
        assert time.monotonic() - started < 4
        body.close()
        head.close()
    finally:
        system.stop()


# -- the server's own log lines ----------------------------------------------------------------
def test_server_log_lines_are_json_and_never_show_a_token(web: System) -> None:
    """Issue 14 (low): gunicorn logged a request line with a NUL byte, Callingly token and
    all, as plain text. Every line of the web process is JSON, with URL secrets masked."""
    for request_line in (
            b"POST /webhooks/callingly/acme?token=" + ACME_TOKEN.encode() + b"\x00 HTTP/1.1",
            b"GET /healthz?token=" + ACME_TOKEN.encode() + b" HTTP/1.1\x00",
            b"POST /webhooks/callingly/acme?token=" + ACME_TOKEN.encode() + b" HTTP/9.9"):
        sock = _open(web.web_port, request_line + b"\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        assert _status(_reply(sock)) in (400, 404, 505)
        sock.close()
    resp = requests.post(f"{web.web}/webhooks/callingly/acme?token={ACME_TOKEN}",
                         data=b'{"id": 1}', timeout=5)
    assert resp.status_code == 202
    web.stop()
    text = web.log("web")
    assert ACME_TOKEN not in text
    lines = text.splitlines()
    assert len(lines) > 3
    for line in lines:
        assert isinstance(json.loads(line), dict), line


# -- shutdown ----------------------------------------------------------------------------------
def test_sigterm_finishes_requests_in_flight_refuses_new_ones_and_exits(
        own_redis: RedisServer) -> None:
    """Heroku sends SIGTERM to every process of the dyno, and SIGKILL 30 s later."""
    system = start(own_redis, WEB_READ_TIMEOUT_SECONDS="4")
    try:
        raw = json.dumps({"resource_id": "CAL-in-flight"}).encode()
        in_flight = _open(system.web_port, (
            b"POST /webhooks/callrail/acme HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Signature: " + callrail_signature(ACME_KEY, raw).encode() +
            b"\r\nContent-Length: " + str(len(raw)).encode() + b"\r\n\r\n") + raw[:10])
        hostile = _open(system.web_port, HEAD_ONLY)
        time.sleep(0.5)
        proc = system.procs["web"]
        os.killpg(proc.pid, signal.SIGTERM)
        sent = time.monotonic()
        time.sleep(0.5)
        with pytest.raises(OSError):   # refused, or reset without an answer
            late = socket.create_connection(("127.0.0.1", system.web_port), timeout=2)
            late.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            if not _reply(late, timeout=3):
                raise ConnectionResetError("closed without an answer")
        in_flight.sendall(raw[10:])
        reply = _reply(in_flight)
        assert _status(reply) == 202, reply
        proc.wait(timeout=25)
        assert time.monotonic() - sent < 20
        hostile.close()
        in_flight.close()
    finally:
        system.stop()


# -- the operator process ----------------------------------------------------------------------
def _operator_processes(system: System) -> list[psutil.Process]:
    main = psutil.Process(system.procs["web"].pid)
    return [p for p in main.children() if "app.operator_process" in p.cmdline()]


def _listening(system: System, times: int = 1) -> psutil.Process:
    """The operator process, once it listens (the ``times``-th start's log line)."""
    until(lambda: system.log("web").count("operator process listening") >= times, 20,
          "the operator process listening")
    [operator] = _operator_processes(system)
    return operator


def _admin_get(system: System, timeout: float = 10.0) -> requests.Response:
    return requests.get(f"{system.web}/admin/api/tenants", headers=ADMIN_HEADERS,
                        timeout=timeout)


@pytest.fixture
def web_db(own_redis: RedisServer) -> Iterator[System]:
    system = System(own_redis.url)
    system.upgrade_db()
    try:
        system.start_web(workers=2)
    except BaseException:
        system.stop()
        raise
    yield system
    system.stop()


@pytest.mark.skipif(SERVER != "granian", reason="the operator process is rilla-bridge web's")
def test_console_requests_are_answered_by_the_operator_process_not_the_workers(
        web_db: System) -> None:
    """With the operator process stopped (SIGSTOP) an admin API request waits for it, while
    webhooks are answered at once: the workers hand console requests over and never render
    them themselves while it is there."""
    operator = _listening(web_db)
    assert _admin_get(web_db).status_code == 200
    operator.suspend()
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(_admin_get, web_db, 30.0)
            time.sleep(1.0)
            assert not waiting.done()
            for i in range(20):
                code, seconds = _signed_post(web_db, i)
                assert code == 202 and seconds < 1.0, (code, seconds)
            operator.resume()
            assert waiting.result(timeout=20).status_code == 200
    finally:
        operator.resume()


@pytest.mark.skipif(SERVER != "granian", reason="the operator process is rilla-bridge web's")
def test_a_crashed_operator_process_is_restarted_and_the_console_answers_meanwhile(
        web_db: System) -> None:
    operator = _listening(web_db)
    operator.kill()
    operator.wait(10)
    # until the new one listens, the workers answer themselves: never an error
    replies = [_admin_get(web_db).status_code for _ in range(5)]
    assert replies == [200] * 5
    again = _listening(web_db, times=2)
    assert again.pid != operator.pid
    assert "the operator process exited" in web_db.log("web")
    assert _admin_get(web_db).status_code == 200


@pytest.mark.skipif(SERVER != "granian", reason="the operator process is rilla-bridge web's")
def test_the_operator_process_stops_with_the_web_process(web_db: System) -> None:
    """SIGTERM to the dyno: it exits with the rest and is not started again. The web process
    and its workers killed outright: it notices and stops by itself."""
    operator = _listening(web_db)
    os.killpg(web_db.procs["web"].pid, signal.SIGTERM)
    web_db.procs["web"].wait(timeout=25)
    operator.wait(10)   # psutil.TimeoutExpired if it is still there
    assert "exited (" not in web_db.log("web")

    web_db.start_web(workers=2)
    main = psutil.Process(web_db.procs["web"].pid)
    operator = _listening(web_db, times=2)
    for p in [main, *(c for c in main.children() if c.pid != operator.pid)]:
        p.kill()   # not the group: the operator process is in it
    operator.wait(10)
