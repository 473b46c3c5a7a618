"""bbformat.serve: ranges, validators, keep-alive, injected faults, the request log and bandwidth caps.

Checked with plain http.client / socket, so a bug in the reader cannot hide a bug in the server. Timing checks
are lower bounds only.
"""

from __future__ import annotations

import email.utils
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from bbformat.serve import FaultPlan, start_server

SIZE = 1_000_003  # odd, so the slices of 64/256 KiB never line up with the end


@pytest.fixture
def data(tmp_path):
    blob = os.urandom(SIZE)
    (tmp_path / "data.bin").write_bytes(blob)
    return tmp_path, blob


@pytest.fixture
def serve(data):
    """serve(**options) -> (server, port, plan); every server is stopped at the end of the test."""
    started = []

    def start(**kw):
        plan = kw.setdefault("faults", FaultPlan())
        server, url = start_server(data[0], **kw)
        started.append(server)
        return server, server.server_address[1], plan

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def get(conn, path="/data.bin", method="GET", **headers):
    conn.request(method, path, headers=headers)
    r = conn.getresponse()
    return r, r.read()


def conn_to(port, timeout=5.0):
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def raw(port, request: bytes, timeout=5.0) -> bytes:
    """Send `request` on a fresh socket and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(1 << 16):
            out += chunk
        return out


# ---- plain serving -----------------------------------------------------------------------------------------

def test_get_head_and_validators(serve, data):
    server, port, plan = serve()
    c = conn_to(port)
    r, body = get(c)
    assert r.status == 200 and body == data[1]
    st = os.stat(data[0] / "data.bin")
    assert r.headers["ETag"] == f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
    assert r.headers["Content-Length"] == str(SIZE) and r.headers["Accept-Ranges"] == "bytes"
    assert email.utils.parsedate_to_datetime(r.headers["Last-Modified"]).timestamp() == int(st.st_mtime)
    r, body = get(c, method="HEAD")
    assert r.status == 200 and body == b"" and r.headers["Content-Length"] == str(SIZE)
    assert server.connections == 1


def test_ranges_are_byte_exact_on_one_connection(serve, data):
    server, port, plan = serve()
    blob = data[1]
    c = conn_to(port)
    cases = [("bytes=0-0", 0, 0), ("bytes=10-99", 10, 99), ("bytes=999000-", 999000, SIZE - 1),
             ("bytes=-100", SIZE - 100, SIZE - 1), ("bytes=-5000000", 0, SIZE - 1),
             ("bytes=500000-9999999", 500000, SIZE - 1), ("bytes=262143-786433", 262143, 786433)]
    for header, a, b in cases:
        r, body = get(c, Range=header)
        assert r.status == 206, header
        assert r.headers["Content-Range"] == f"bytes {a}-{b}/{SIZE}"
        assert r.headers["Content-Length"] == str(b - a + 1)
        assert body == blob[a:b + 1], header
    r, body = get(c, method="HEAD", Range="bytes=10-19")
    assert r.status == 206 and body == b"" and r.headers["Content-Length"] == "10"
    assert server.connections == 1  # keep-alive: one connection for every request
    assert plan.log.wait(len(cases) + 1)
    assert [e.sent for e in plan.log.entries(method="GET")] == [b - a + 1 for _, a, b in cases]


@pytest.mark.parametrize("header", [f"bytes={SIZE}-", "bytes=-0", "bytes=abc", "bytes=5-3", "bytes=0-1,5-6"])
def test_unsatisfiable_range_is_416_and_keeps_the_connection(serve, header):
    server, port, _ = serve()
    c = conn_to(port)
    r, body = get(c, Range=header)
    assert r.status == 416 and r.headers["Content-Range"] == f"bytes */{SIZE}"
    assert int(r.headers["Content-Length"]) == len(body)
    r, body = get(c, Range="bytes=0-3")
    assert r.status == 206 and len(body) == 4
    assert server.connections == 1


def test_404_keeps_the_connection_and_other_units_are_ignored(serve):
    server, port, _ = serve()
    c = conn_to(port)
    r, body = get(c, "/missing.bin")
    assert r.status == 404 and int(r.headers["Content-Length"]) == len(body)
    r, body = get(c, Range="items=0-3")
    assert r.status == 200 and len(body) == SIZE
    assert server.connections == 1


def test_if_match_and_if_range(serve, data):
    _, port, _ = serve()
    c = conn_to(port)
    r, _ = get(c, method="HEAD")
    etag, modified = r.headers["ETag"], r.headers["Last-Modified"]
    assert get(c, Range="bytes=0-9", **{"If-Match": etag})[0].status == 206
    assert get(c, Range="bytes=0-9", **{"If-Match": f'"nope", {etag}'})[0].status == 206
    assert get(c, Range="bytes=0-9", **{"If-Match": "*"})[0].status == 206
    r, body = get(c, Range="bytes=0-9", **{"If-Match": '"0-0"'})
    assert r.status == 412
    assert get(c, Range="bytes=0-9", **{"If-Match": "W/" + etag})[0].status == 412  # weak never matches
    assert get(c, Range="bytes=0-9", **{"If-Range": etag})[0].status == 206
    assert get(c, Range="bytes=0-9", **{"If-Range": modified})[0].status == 206
    r, body = get(c, Range="bytes=0-9", **{"If-Range": '"stale"'})
    assert r.status == 200 and body == data[1]  # a changed file: the whole new body, not a mixed range
    assert get(c, Range="bytes=0-9", **{"If-Range": "Mon, 01 Jan 2001 00:00:00 GMT"})[0].status == 200


def test_honour_range_false_behaves_like_http_server(serve, data):
    _, port, _ = serve(honour_range=False)
    r, body = get(conn_to(port), Range="bytes=0-9")
    assert r.status == 200 and body == data[1] and "Accept-Ranges" not in r.headers


# ---- faults ------------------------------------------------------------------------------------------------

def test_reset_mid_body_then_exhausted(serve, data):
    _, port, plan = serve()
    rule = plan.reset(after=3000, path="data.bin")
    c = conn_to(port)
    c.request("GET", "/data.bin", headers={"Range": "bytes=0-599999"})
    r = c.getresponse()
    assert r.status == 206
    with pytest.raises((ConnectionResetError, http.client.IncompleteRead)):
        r.read()
    r, body = get(conn_to(port), Range="bytes=0-599999")  # times=1: spent
    assert r.status == 206 and body == data[1][:600000]
    assert rule.fired == 1 and plan.log.wait(2)
    first = plan.log.entries()[0]
    assert (first.fault, first.sent, first.status) == ("reset", 3000, 206)


def test_reset_seen_by_a_raw_socket(serve):
    _, port, plan = serve()
    plan.reset(after=0)
    with pytest.raises(ConnectionResetError):
        raw(port, b"GET /data.bin HTTP/1.1\r\nHost: x\r\n\r\n")
    plan.reset(after=None)  # before the status line
    with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
        get(conn_to(port))


def test_short_body(serve, data):
    _, port, plan = serve()
    plan.short(after=5000)
    c = conn_to(port)
    c.request("GET", "/data.bin")
    r = c.getresponse()
    assert r.headers["Content-Length"] == str(SIZE)  # the full length is promised...
    with pytest.raises(http.client.IncompleteRead) as e:
        r.read()
    assert e.value.partial == data[1][:5000]  # ...and the connection closes cleanly after 5000 bytes
    assert get(conn_to(port))[1] == data[1]


def test_stall_times_out_a_short_client_timeout(serve, data):
    _, port, plan = serve()
    plan.stall(3.0, after=1000)
    c = conn_to(port, timeout=0.3)
    c.request("GET", "/data.bin")
    r = c.getresponse()
    with pytest.raises(TimeoutError):  # socket.timeout is TimeoutError
        r.read()
    plan.stall(0.2, after=100)  # a short stall, then the body carries on intact
    r, body = get(conn_to(port, timeout=5))
    assert body == data[1]
    plan.stall(0.1, after=100, close=True)
    with pytest.raises(http.client.IncompleteRead):
        get(conn_to(port))


@pytest.mark.parametrize("code", [500, 503, 429, 404, 403])
def test_status_with_retry_after(serve, code):
    server, port, plan = serve()
    rule = plan.status(code, retry_after=2, times=2)
    c = conn_to(port)
    for _ in range(2):
        r, body = get(c, Range="bytes=0-9")
        assert r.status == code and r.headers["Retry-After"] == "2" and body
        assert int(r.headers["Content-Length"]) == len(body)
    r, body = get(c, Range="bytes=0-9")
    assert r.status == 206 and len(body) == 10
    assert rule.fired == 2 and server.connections == 1  # error replies keep the connection alive


def test_nth_and_offset_matching(serve):
    _, port, plan = serve()
    rule = plan.status(500, offset=500_000, nth=2, method="GET")
    c = conn_to(port)
    assert get(c, Range="bytes=400000-500000")[0].status == 206  # 1st overlapping GET: not yet
    assert get(c, Range="bytes=0-499999")[0].status == 206  # does not overlap: not counted
    assert get(c, method="HEAD")[0].status == 200  # not a GET
    assert get(c, Range="bytes=500000-500000")[0].status == 500  # 2nd overlapping GET
    assert get(c)[0].status == 200  # spent
    assert (rule.seen, rule.fired) == (2, 1)


def test_ignore_range(serve, data):
    _, port, plan = serve()
    plan.ignore_range(path="data.bin")
    r, body = get(conn_to(port), Range="bytes=0-9")
    assert r.status == 200 and body == data[1] and "Content-Range" not in r.headers


def test_head_without_content_length_closes(serve):
    _, port, plan = serve()
    plan.no_content_length(method="HEAD")
    head = raw(port, b"HEAD /data.bin HTTP/1.1\r\nHost: x\r\n\r\n").decode("latin-1").lower()
    assert head.startswith("http/1.1 200") and "content-length" not in head and "connection: close" in head
    head = raw(port, b"HEAD /data.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").decode("latin-1")
    assert f"Content-Length: {SIZE}" in head  # spent


def test_log_counts_bytes_and_clear(serve):
    _, port, plan = serve()
    c = conn_to(port)
    for i in range(5):
        get(c, Range=f"bytes={i * 1000}-{i * 1000 + 99}")
    get(c, method="HEAD")
    get(c, "/missing")
    assert plan.log.wait(7)
    assert len(plan.log.entries(path="data.bin", method="GET")) == 5
    assert sum(e.sent for e in plan.log.entries(path="data.bin")) == 500
    assert [e.range for e in plan.log.entries(method="GET")][:2] == ["bytes=0-99", "bytes=1000-1099"]
    assert plan.log.entries(path="/missing")[0].status == 404
    plan.status(500)
    plan.clear()
    assert len(plan.log) == 0 and get(c)[0].status == 200


def test_unknown_action_is_refused():
    with pytest.raises(ValueError):
        FaultPlan().add("explode")


# ---- caps ----------------------------------------------------------------------------------------------------

def test_conn_rate_and_latency_are_lower_bounds(serve, tmp_path):
    (tmp_path / "four.bin").write_bytes(b"\0" * 4_000_000)
    _, port, _ = serve(conn_rate=20e6, latency=0.05)
    c = conn_to(port)
    t = time.perf_counter()
    r, body = get(c, "/four.bin")
    assert len(body) == 4_000_000 and time.perf_counter() - t >= 0.8 * (0.2 + 0.05)
    t = time.perf_counter()
    get(c, "/missing")
    assert time.perf_counter() - t >= 0.8 * 0.05  # error replies wait too


def test_shared_rate_across_connections(serve, tmp_path):
    (tmp_path / "four.bin").write_bytes(b"\0" * 4_000_000)
    _, port, plan = serve(rate=40e6)

    def fetch(i):
        get(conn_to(port), "/four.bin", Range=f"bytes={i * 1_000_000}-{i * 1_000_000 + 999_999}")

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(4)]
    t = time.perf_counter()
    [th.start() for th in threads]
    [th.join() for th in threads]
    assert time.perf_counter() - t >= 0.8 * 0.1  # 4 MB at 40 MB/s in all
    assert plan.log.wait(4) and sum(e.sent for e in plan.log) == 4_000_000


# ---- stopping -------------------------------------------------------------------------------------------------

def test_server_close_drops_idle_keep_alive_connections(data):
    server, url = start_server(data[0])  # the positional signature tests/conftest.py uses
    c = conn_to(server.server_address[1])
    assert get(c, Range="bytes=0-0")[0].status == 206
    server.shutdown()
    server.server_close()
    assert c.sock.recv(1) == b""  # EOF now, not after the 15 s idle timeout


def test_module_entry_point(data):
    p = subprocess.Popen([sys.executable, "-m", "bbformat.serve", str(data[0]), "--port", "0", "--rate", "1000e6",
                          "--conn-rate", "25e6", "--latency", "0.001"], stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("serving http://127.0.0.1:")
        r, body = get(conn_to(int(line.rsplit(":", 1)[1])), Range="bytes=-10")
        assert r.status == 206 and body == data[1][-10:]
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
        assert p.stdout.read() == ""  # exactly one line
    finally:
        p.kill() if p.poll() is None else None
        p.stdout.close()
