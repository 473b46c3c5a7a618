"""The remote I/O engine against a real loopback server that injects faults, and against moto S3.

Each case either succeeds with tensors identical to the local file's, after the retries the server's log shows, or
fails with the documented BBFError; request counts come from the server's own log, not from the client.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch

import bbformat
from bbformat.io.fetch import FetchOptions, coalesce, split
from bbformat.models.synthetic import random_slicegpt, tiny_desc
from bbformat.serve import FaultPlan, start_server

CHUNK = 16 << 10
FAST = dict(chunk_size=CHUNK, concurrency=4, backoff=0.01, backoff_max=0.05, read_timeout=1.0, retries=4)


@pytest.fixture(scope="module")
def model():
    desc = tiny_desc("llama", num_layers=6, hidden_size=128, vocab_size=1000, widths=(96, 80, 112, 96, 88, 104))
    return desc, random_slicegpt(desc, seed=3, dtype=torch.float16)


@pytest.fixture(scope="module")
def served(model, tmp_path_factory):
    """(directory, base URL, fault plan) of a loopback server holding m.bbf (exact codec, ~1 MB)."""
    desc, tensors = model
    d = tmp_path_factory.mktemp("stream")
    bbformat.save(tensors, str(d / "m.bbf"), model=desc, codec="exact", aux={"note.txt": b"hi"})
    plan = FaultPlan()
    server, url = start_server(d, faults=plan)
    yield d, url, plan
    server.shutdown()
    server.server_close()


@pytest.fixture()
def plan(served):
    """The server's fault plan, empty, after the previous test's last requests (a cancelled load's chunks may still
    be in flight) have been logged."""
    p = served[2]
    p.clear()
    yield p
    quiet_since, n = time.monotonic(), len(p.log)
    while time.monotonic() - quiet_since < 0.3:
        time.sleep(0.05)
        if len(p.log) != n:
            quiet_since, n = time.monotonic(), len(p.log)
    p.clear()


@pytest.fixture(scope="module")
def local(served):
    return bbformat.load(str(served[0] / "m.bbf"))


def assert_same(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_split_and_coalesce():
    o = FetchOptions(chunk_size=8 << 20, min_chunk_size=1 << 20, concurrency=16)
    for start, end in [(0, 1), (0, 10), (5, (1 << 20) + 5), (0, 3 << 20), (7, (48 << 20) + 7), (0, 300 << 20)]:
        parts = split(start, end, o)
        assert parts[0][0] == start and parts[-1][1] == end
        assert all(a < b == c for (a, b), (c, _) in zip(parts, parts[1:] + [(end, None)]))
        assert max(b - a for a, b in parts) <= o.chunk_size
        want = max(math.ceil((end - start) / o.chunk_size), min(16, (end - start) >> 20), 1)
        assert len(parts) == want
    assert split(5, 5, o) == []  # an empty section costs no request
    assert len(split(0, 48 << 20, o)) == 16  # a 48 MiB group goes out over all 16 connections
    d = FetchOptions()  # min_chunk_size 4 MiB, except for what the caller waits for now
    assert len(split(0, 16 << 20, d)) == 4 and len(split(0, 16 << 20, d, urgent=True)) == 16
    assert coalesce([(10, 20), (0, 10), (30, 40), (15, 25)]) == [(0, 25, [1, 0, 3]), (30, 40, [2])]


def expected_chunk_requests(f: bbformat.BBFReader, chunk: int) -> int:
    """What the engine must send for a whole load: per group, its touching sections coalesced, then chunked."""
    n = 0
    for g in f.model.groups():
        ranges = [(r.offset, r.offset + r.stored_len) for r in f._by_group[g].values()]
        if all(a >= f.store._tail_start for a, _ in ranges):
            continue  # inside the suffix read on open: no request
        opts = FetchOptions.coerce(FAST)
        n += sum(len(split(a, b, opts)) for a, b, _ in coalesce(ranges))
    return n


def settle(done, timeout: float = 5.0) -> None:
    """Wait for the server's log to catch up: it records a response after its last byte has left."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.02)


def gets(plan) -> list:
    return plan.log.entries(path="m.bbf", method="GET")


def test_open_is_one_request_and_load_is_chunked(served, plan, local):
    _, url, _ = served
    with bbformat.open(f"{url}/m.bbf", fetch=FAST) as f:
        plan.log.wait(1)
        assert f.store.requests == 1 and len(gets(plan)) == 1
        assert gets(plan)[0].range.startswith("bytes=-")  # a suffix read pins the object: no HEAD
        want = 1 + expected_chunk_requests(f, CHUNK)
        assert want > 20  # the file really is split into many chunks
        assert_same(f.load_all(), local)
        plan.log.wait(want)
        assert len(gets(plan)) == want == f.stats["requests"]
        assert f.stats["retries"] == 0
        assert sum(s.sent for s in gets(plan)) == f.stats["bytes"]
        assert all(s.status == 206 for s in gets(plan))


@pytest.mark.parametrize("fault", ["reset", "short", "stall", "500", "503", "429"])
def test_transient_faults_are_retried_and_resume(served, plan, local, fault):
    d, url, _ = served
    size = (d / "m.bbf").stat().st_size
    target = size // 3  # a byte inside some section, well past the suffix read
    after = 5000  # body bytes sent before the fault strikes
    if fault == "reset":
        plan.reset(after=after, offset=target, method="GET")
    elif fault == "short":
        plan.short(after=after, offset=target, method="GET")
    elif fault == "stall":
        plan.stall(3.0, after=after, offset=target, method="GET")  # 3 s > read_timeout (1 s)
    else:
        plan.status(int(fault), retry_after=0.2 if fault != "500" else None, offset=target, method="GET", times=2)
    t0 = time.perf_counter()
    with bbformat.open(f"{url}/m.bbf", fetch=FAST) as f:
        assert_same(f.load_all(), local)
        stats = f.stats
    elapsed = time.perf_counter() - t0
    # every attempt is one request the server logs, a stalled one only when its stall ends
    settle(lambda: len(gets(plan)) >= stats["requests"])
    faulted = [s for s in gets(plan) if s.fault]
    assert faulted and stats["retries"] == len(faulted)
    first = faulted[0]
    a, b = (int(x) for x in first.range.split("=")[1].split("-"))
    retried = [s for s in gets(plan) if not s.fault and s.range.endswith(f"-{b}")]
    if fault in ("reset", "short", "stall"):  # the retry asks only for what had not arrived
        assert any(s.range == f"bytes={a + after}-{b}" for s in retried), [s.range for s in retried]
    else:
        assert any(s.range == first.range for s in retried)
    if fault in ("503", "429"):
        assert elapsed >= 0.4  # two Retry-After: 0.2 were honoured


def test_persistent_503_gives_up_with_a_transport_error(served, plan):
    d, url, _ = served
    target = (d / "m.bbf").stat().st_size // 2
    plan.status(503, offset=target, method="GET", times=None)
    with bbformat.open(f"{url}/m.bbf", fetch=FAST) as f:
        with pytest.raises(bbformat.TransportError, match=r"m\.bbf: reading bytes \d+-\d+ failed after 5 "
                                                          r"attempt\(s\): HTTP 503"):
            f.load_all()
    want = FAST["retries"] + 1
    settle(lambda: len([s for s in gets(plan) if s.fault]) >= want)
    assert len([s for s in gets(plan) if s.fault]) == want


@pytest.mark.parametrize("code, pattern", [(404, "no such file"), (403, "HTTP 403.*access denied"),
                                           (401, "HTTP 401.*authentication")])
def test_permanent_failures_are_not_retried(served, plan, code, pattern):
    _, url, _ = served
    plan.status(code, method="GET", times=None)
    with pytest.raises(bbformat.BBFError, match=pattern):
        bbformat.open(f"{url}/m.bbf", fetch=FAST)
    plan.log.wait(1)
    time.sleep(0.1)  # nothing else arrives
    assert len(gets(plan)) == 1


def test_missing_file_is_one_request(served, plan):
    _, url, _ = served
    with pytest.raises(bbformat.BBFError, match="no such file"):
        bbformat.open(f"{url}/nothing.bbf", fetch=FAST)
    plan.log.wait(1)
    time.sleep(0.1)
    assert len(plan.log.entries(path="nothing.bbf")) == 1


def test_ignored_range_mid_load_is_refused(served, plan):
    d, url, _ = served
    with bbformat.open(f"{url}/m.bbf", fetch=FAST) as f:
        plan.ignore_range(method="GET", offset=(d / "m.bbf").stat().st_size // 2)
        with pytest.raises(bbformat.RangeNotSupportedError, match="ignored an HTTP Range request"):
            f.load_all()


def test_head_without_content_length_is_not_needed(served, plan, local):
    _, url, _ = served
    plan.no_content_length(method="HEAD", times=None)
    assert_same(bbformat.load(f"{url}/m.bbf", fetch=FAST), local)
    assert not plan.log.entries(method="HEAD")


def test_replaced_object_is_reported_not_mixed(served, plan, model, tmp_path):
    d, url, _ = served
    desc, tensors = model
    other = {k: v + 1 for k, v in tensors.items()}
    shutil.copy(d / "m.bbf", d / "r.bbf")
    try:
        with bbformat.open(f"{url}/r.bbf", fetch=FAST) as f:
            bbformat.save(other, str(tmp_path / "r.bbf"), model=desc, codec="exact", aux={"note.txt": b"hi"})
            time.sleep(0.01)  # a different mtime, so a different ETag
            os.replace(tmp_path / "r.bbf", d / "r.bbf")
            with pytest.raises(bbformat.ObjectChangedError, match="changed while reading"):
                f.load_all()
    finally:
        (d / "r.bbf").unlink()


def test_stream_holds_a_bounded_window(served, plan):
    """Paused after the first group, the reader has fetched at most readahead+1 groups plus the byte budget."""
    _, url, _ = served
    opts = dict(FAST, concurrency=2)  # budget: 2 x 16 KiB
    with bbformat.open(f"{url}/m.bbf", fetch=opts) as f:
        order = f.stream_order()
        it = f.stream(readahead=1)
        first, _ = next(it)
        assert first == order[0]
        time.sleep(0.5)  # let the background threads run as far ahead as they may
        fetched = f.stats["bytes"]
        limit = sum(f.group_stored_bytes(g) for g in order[:3]) + 2 * CHUNK + (256 << 10)
        assert fetched <= limit < sum(f.group_stored_bytes(g) for g in order)
        it.close()  # stopping early cancels what is pending and returns


def test_load_model_on_meta_and_cpu_with_progress(served, plan, capsys):
    _, url, _ = served
    m = bbformat.load_model(f"{url}/m.bbf", device="meta", progress=True, fetch=FAST)
    assert all(p.device.type == "meta" for p in m.parameters()) and not m.missing()
    cpu = bbformat.load_model(f"{url}/m.bbf", device="cpu", fetch=FAST)
    assert all(p.device.type == "cpu" for p in cpu.parameters())
    assert "B/s" in capsys.readouterr().err  # the bar counts bytes


def test_fetch_options_are_checked():
    with pytest.raises(bbformat.BBFError, match="unknown fetch option"):
        bbformat.FetchOptions.coerce({"chunk": 1})
    with pytest.raises(bbformat.BBFError, match=">= 1"):
        bbformat.FetchOptions.coerce({"concurrency": 0})


def test_inspect_stats(served, plan):
    _, url, _ = served
    out = subprocess.run([sys.executable, "-m", "bbformat.cli.inspect", f"{url}/m.bbf", "--stats"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    time.sleep(0.2)  # the server logs a response just after its last byte
    line = next(l for l in out.stdout.splitlines() if l.startswith("io:"))
    assert f"{len(gets(plan))} requests" in line and "0 retries" in line


def test_s3_chunked_and_pinned(model, s3, local):
    import s3fs

    desc, tensors = model
    prefix, opts = s3
    url = f"{prefix}/stream/m.bbf"
    bbformat.save(tensors, url, model=desc, codec="exact", storage_options=opts, aux={"note.txt": b"hi"})
    with bbformat.open(url, storage_options=opts, fetch=FAST) as f:
        assert_same(f.load_all(), local)
        assert f.stats["requests"] == 1 + expected_chunk_requests(f, CHUNK)
    with bbformat.open(url, storage_options=opts, fetch=FAST) as f:
        fs = s3fs.S3FileSystem(**opts)
        fs.pipe(url, b"replaced")  # a new object under the same key
        with pytest.raises(bbformat.ObjectChangedError, match="changed while reading"):
            f.load_all()


def test_concurrent_readers_share_nothing(served, plan, local):
    _, url, _ = served
    out, errors = [], []

    def run():
        try:
            out.append(bbformat.load(f"{url}/m.bbf", fetch=FAST))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(out) == 3
    for o in out:
        assert_same(o, local)


def test_connection_failures_on_open_are_distinct_and_not_retried(served, plan):
    import socket

    _, url, _ = served
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cases = [(f"http://127.0.0.1:{port}/m.bbf", f"connection to 127.0.0.1:{port} refused"),
             (f"{url}/missing.bbf", "no such file"),
             (url.replace("http://", "https://") + "/m.bbf", "TLS failed.*plain http"),
             ("http://no-such-host.invalid/m.bbf", "cannot resolve host 'no-such-host.invalid'")]
    for target, pattern in cases:
        with pytest.raises(bbformat.TransportError if "no such" not in pattern else bbformat.BBFError,
                           match=pattern) as e:
            bbformat.open(target, fetch=FAST)
        assert "attempt" not in str(e.value), target  # a wrong URL is not retried
