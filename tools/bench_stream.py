"""Stream from S3/HTTP at the speed of the wire: bbformat's remote loads against the raw transfer and safetensors.

Input: SmolLM2-135M sliced at 25% by SliceGPT in its PCA orientation (as a SliceGPT checkpoint holds it), written
once as .bbf (codec exact, float16, ~228 MB) and as a float16 safetensors file (~281 MB), both cached under
cache/bench_stream/.

HTTP regimes, each a fresh `python -m bbformat.serve DIR --port 0 ...` process (its own CPU, not the client's GIL):
  a  object store: 25 MB/s per connection, 1000 MB/s total, 20 ms latency
  b  200 MB/s total, 20 ms latency
  c  uncapped, 20 ms latency
  d  50 MB/s total, 0 ms latency
  s3 a moto S3 server (its own process, 127.0.0.1, eu-west-1, uncapped), both files uploaded
(MB = 10^6 bytes everywhere.)

Contenders, each run in a fresh subprocess per round that has already imported torch, bbformat and the HTTP/S3
client libraries: only the operation is timed, from a cold start (no connection open, nothing fetched).
- bbf load:        bbformat.load(url) -> dict of tensors (time to all tensors)
- bbf load_model:  bbformat.load_model(url)
- bbf stream:      `with bbformat.open(url) as f: for g, t in f.stream(): ...`, keeping nothing; time to the
                   first group and to the last; the reader's `stats` when it has them
- wire:            the same .bbf bytes as 16 parallel 8 MiB ranged GETs (aiohttp, one ClientSession, a semaphore
                   of 16) into one preallocated buffer; the size is known beforehand, so no HEAD: "the wire time"
- safetensors:     the safetensors file downloaded the same way + safetensors.torch.load(bytes) (which takes
                   bytes, not the bytearray: the one copy that joining the ranged parts would cost too)
- probes:          one 256 KiB suffix GET and one 8 MiB ranged GET, each on a fresh connection (for the
                   time-to-first-group goal)
S3: bbf load (s3fs through storage_options), wire and safetensors as 16 parallel 8 MiB ranged gets through
s3fs's async API, and Run:ai Model Streamer reading the safetensors file into a dict of tensors (benchmark only:
`pip install runai-model-streamer runai-model-streamer-s3`; path-style addressing through
RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING=0, endpoint and keys through its S3Credentials; n/a with the reason when
it is not installed or fails).

Goals (the summary marks each met / NOT MET): bbf load <= 1.15 x the wire time of its own bytes in (a) and (b);
bbf load faster than the safetensors path in every regime; time to first group <= 2 x (one 256 KiB suffix GET +
one 8 MiB GET, both probed in the same regime); stream peak RSS <= (readahead + 1) x the largest group (decoded)
+ 16 x 8 MiB + 64 MB.

Each contender's best time over --repeat rounds; every round runs every contender once, odd rounds in reverse
order. Peak RSS: /proc/self/status VmRSS sampled every 5 ms by a thread during the operation, peak minus the value
just before it (the largest over the rounds). "bytes moved" is the file's size (what the operation must fetch)
except where the reader reports its own counter (stream). Prints one markdown table per regime and a summary of
the goals, writes every measurement as JSON (--json).

    .venv/bin/python tools/bench_stream.py [--regimes a b c d s3] [--repeat 3] [--json out.json]

The moto process is patched (in that process only) so that a ranged GET costs its range: stock moto re-reads the
whole object for every ranged GET, which would bill a many-request reader ~50 ms per request for nothing real S3
does. --moto-stock turns the patch off.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
import zlib
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
OUT = ROOT / "cache" / "bench_stream"
BBF_NAME = "smollm2-135m-pca_0.25.exact.float16.bbf"
ST_NAME = "smollm2-135m-pca_0.25.float16.safetensors"
MB = 1e6
CHUNK = 8 << 20
PARALLEL = 16
SUFFIX = 256 << 10
READAHEAD = 2  # bbformat's stream() default
BUCKET, REGION = "bbf-bench", "eu-west-1"
S3_KEY = {"key": "testing", "secret": "testing"}

REGIMES = {
    "a": {"title": "(a) object store: 25 MB/s per connection, 1000 MB/s total, 20 ms latency",
          "rate": 1000e6, "conn_rate": 25e6, "latency": 0.020},
    "b": {"title": "(b) 200 MB/s total, 20 ms latency", "rate": 200e6, "conn_rate": None, "latency": 0.020},
    "c": {"title": "(c) uncapped, 20 ms latency", "rate": None, "conn_rate": None, "latency": 0.020},
    "d": {"title": "(d) 50 MB/s total, 0 ms latency", "rate": 50e6, "conn_rate": None, "latency": 0.0},
    "s3": {"title": "S3: moto on 127.0.0.1 (uncapped, no added latency)"},
}
HTTP_CONTENDERS = ["probe_suffix", "probe_chunk", "bbf_load", "bbf_load_model", "bbf_stream", "wire", "safetensors"]
S3_CONTENDERS = ["bbf_load", "wire", "safetensors", "runai"]
LABELS = {
    "probe_suffix": "probe: one 256 KiB suffix GET",
    "probe_chunk": "probe: one 8 MiB ranged GET",
    "bbf_load": "bbf load",
    "bbf_load_model": "bbf load_model",
    "bbf_stream": "bbf stream",
    "wire": "wire: .bbf bytes, 16 × 8 MiB GETs",
    "safetensors": "safetensors: 16 × 8 MiB GETs + load",
    "runai": "Run:ai Model Streamer (safetensors)",
}
PROBES = ("probe_suffix", "probe_chunk")


# ==== worker side: one operation, timed, in a fresh process =============================================
class RSSSampler:
    """Peak VmRSS of this process while an operation runs, sampled every 5 ms by a thread."""

    def __init__(self, period: float = 0.005):
        self.period, self.f = period, open("/proc/self/status", "rb")
        self.peak = self.baseline = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def now(self) -> int:
        self.f.seek(0)
        data = self.f.read()
        i = data.index(b"VmRSS:")
        return int(data[i + 6: data.index(b"kB", i)]) * 1024

    def _run(self):
        while not self._stop.wait(self.period):
            v = self.now()
            if v > self.peak:
                self.peak = v

    def start(self) -> int:
        self.baseline = self.peak = self.now()
        self._thread.start()
        return self.baseline

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())
        return self.peak


async def _fetch_ranges(get_range, buf: bytearray, chunk: int = CHUNK, parallel: int = PARALLEL) -> None:
    """All of `buf` (preallocated, the file's size) as ceil(size / chunk) ranged reads, `parallel` at a time.
    get_range(start, end, view) -> awaitable writing bytes [start, end) into `view` (a memoryview of the buffer).

    Returns nothing, on purpose: a coroutine whose result is the buffer gets repr()'d by asyncio's teardown, and
    the repr of 228 MB of bytes takes seconds."""
    size = len(buf)
    mv = memoryview(buf)
    sem = asyncio.Semaphore(parallel)

    async def one(start):
        end = min(start + chunk, size)
        async with sem:
            await get_range(start, end, mv[start:end])

    await asyncio.gather(*(one(s) for s in range(0, size, chunk)))


async def _http_ranges(url: str, buf: bytearray) -> None:
    import aiohttp

    conn = aiohttp.TCPConnector(limit=PARALLEL)
    async with aiohttp.ClientSession(connector=conn, auto_decompress=False) as session:
        async def get(start, end, view):
            async with session.get(url, headers={"Range": f"bytes={start}-{end - 1}"}) as r:
                if r.status != 206:
                    raise RuntimeError(f"GET {url} bytes={start}-{end - 1}: HTTP {r.status}")
                pos = 0
                async for data in r.content.iter_chunked(1 << 20):
                    view[pos: pos + len(data)] = data
                    pos += len(data)
                if pos != end - start:
                    raise RuntimeError(f"GET {url} bytes={start}-{end - 1}: {pos} bytes")

        await _fetch_ranges(get, buf)


async def _http_probe(url: str, rng: str) -> int:
    import aiohttp

    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.get(url, headers={"Range": rng}) as r:
            if r.status != 206:
                raise RuntimeError(f"GET {url} {rng}: HTTP {r.status}")
            return len(await r.read())


def _s3fs(spec, asynchronous=False):
    import s3fs

    return s3fs.S3FileSystem(asynchronous=asynchronous, skip_instance_cache=True, **spec["storage_options"])


async def _s3_ranges(spec, path: str, buf: bytearray) -> None:
    fs = _s3fs(spec, asynchronous=True)
    session = await fs.set_session()
    try:
        async def get(start, end, view):
            data = await fs._cat_file(path, start=start, end=end)
            if len(data) != end - start:
                raise RuntimeError(f"s3://{path} {start}..{end}: {len(data)} bytes")
            view[:] = data

        await _fetch_ranges(get, buf)
    finally:
        await session.close()


def _st_load(buf: bytearray):
    """safetensors.torch.load takes bytes, not a bytearray: one copy, as any assembly of the ranged parts into
    bytes (b"".join(parts)) would cost."""
    from safetensors.torch import load as st_load

    return st_load(bytes(buf))


def op(name: str, spec: dict, t0: float) -> dict:
    """Run one contender's operation; returns extras (first_s, bytes, stats) and keeps the result alive in 'keep'."""
    import bbformat

    url, size, opts = spec.get("url"), spec.get("size"), spec.get("storage_options")
    if name == "probe_suffix":
        return {"bytes": asyncio.run(_http_probe(url, f"bytes=-{SUFFIX}"))}
    if name == "probe_chunk":
        return {"bytes": asyncio.run(_http_probe(url, f"bytes=0-{CHUNK - 1}"))}
    if name == "bbf_load":
        return {"keep": bbformat.load(url, storage_options=opts) if opts else bbformat.load(url)}
    if name == "bbf_load_model":
        return {"keep": bbformat.load_model(url, storage_options=opts) if opts else bbformat.load_model(url)}
    if name == "bbf_stream":
        first, n = None, 0
        with (bbformat.open(url, storage_options=opts) if opts else bbformat.open(url)) as f:
            for _g, tensors in f.stream():
                if first is None:
                    first = time.perf_counter() - t0
                n += 1
                del tensors
            last = time.perf_counter() - t0
            stats = f.stats
            nbytes = stats["bytes"]
        return {"first_s": first, "last_s": last, "groups": n, "stats": stats, "bytes": nbytes}
    if name in ("wire", "safetensors"):
        buf = bytearray(size)  # preallocated (untouched pages cost nothing until written)
        asyncio.run(_s3_ranges(spec, spec["path"], buf) if spec["kind"] == "s3" else _http_ranges(url, buf))
        if name == "wire":
            return {"keep": buf}
        t1 = time.perf_counter()
        out = _st_load(buf)
        del buf
        return {"keep": out, "download_s": t1 - t0, "parse_s": time.perf_counter() - t1}
    if name == "runai":
        from runai_model_streamer import SafetensorsStreamer
        from runai_model_streamer.s3_utils.s3_utils import S3Credentials

        ck = opts["client_kwargs"]
        cred = S3Credentials(access_key_id=opts["key"], secret_access_key=opts["secret"],
                             region_name=ck["region_name"], endpoint=ck["endpoint_url"])
        out = {}
        with SafetensorsStreamer() as st:
            st.stream_file(url, s3_credentials=cred)
            for tname, t in st.get_tensors():
                out[tname] = t
        return {"keep": out}
    raise ValueError(f"unknown contender {name!r}")


def check(name: str, spec: dict, kept) -> None:
    """After the clock stopped: the operation produced the whole model (or the exact bytes)."""
    if name in ("bbf_load", "safetensors", "runai"):
        import torch

        n = spec["n_tensors"]
        if len(kept) != n:
            raise RuntimeError(f"got {len(kept)} tensors, the file has {n}")
        if name != "bbf_load" and any(t.dtype != torch.float16 for t in kept.values()):
            raise RuntimeError(f"got tensors of {sorted({str(t.dtype) for t in kept.values()})}, not float16")
    elif name == "wire":
        if zlib.crc32(kept) != spec["crc32"]:
            raise RuntimeError("the fetched bytes differ from the file's")


def worker(name: str, spec: dict) -> None:
    try:
        import torch  # noqa: F401  the baseline every contender starts from
        import bbformat
        for api in bbformat.__all__:  # `import bbformat` is lazy: import its API here, not in the timed region
            getattr(bbformat, api)
        import aiohttp  # noqa: F401
        import fsspec.implementations.http  # noqa: F401  (fsspec imports its backends lazily, in the timed region)
        import safetensors.torch  # noqa: F401
        if spec["kind"] == "s3":
            import s3fs  # noqa: F401
            if name == "runai":
                import runai_model_streamer  # noqa: F401
        gc.collect()
        sampler = RSSSampler()
        base = sampler.start()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        extra = op(name, spec, t0)
        dt = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        peak = sampler.stop()
        kept = extra.pop("keep", None)
        check(name, spec, kept)
        del kept
        res = {"ok": True, "time_s": dt, "peak_rss_above_baseline": peak - base, "baseline_rss": base,
               "maxrss_minus_baseline": ru1.ru_maxrss * 1024 - base,
               "cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime), **extra}
    except BaseException as e:  # report, never hang the orchestrator
        res = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()[-2000:]}
    sys.stdout.write("RESULT " + json.dumps(res) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (runai / aiohttp threads)


# ==== servers ==============================================================================================
def _read_line(proc, timeout: float) -> str | None:
    out = []
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else None


class Server:
    """A child process that prints `serving <url>` and serves until SIGTERM."""

    def __init__(self, cmd: list[str], env=None, timeout: float = 60):
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     cwd=str(ROOT))
        line = _read_line(self.proc, timeout)
        if not line or not line.startswith("serving "):
            err = ""
            self.stop()
            try:
                err = self.proc.stderr.read()[-1500:]
            except Exception:
                pass
            raise RuntimeError(f"{' '.join(cmd[1:])} did not print 'serving <url>' (got {line!r}); stderr: {err}")
        self.url = line.split(None, 1)[1].strip().rstrip("/")
        # keep draining its pipes so a chatty server never blocks on a full pipe
        for s in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=lambda s=s: [None for _ in s], daemon=True).start()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def http_server(regime: dict) -> Server:
    cmd = [sys.executable, "-m", "bbformat.serve", str(OUT), "--port", "0"]
    if regime["rate"]:
        cmd += ["--rate", str(int(regime["rate"]))]
    if regime["conn_rate"]:
        cmd += ["--conn-rate", str(int(regime["conn_rate"]))]
    cmd += ["--latency", str(regime["latency"])]
    return Server(cmd)


def moto_main(stock: bool) -> None:
    """The S3 stand-in's process: a ThreadedMotoServer on 127.0.0.1:0; prints `serving <endpoint>`."""
    from moto.server import ThreadedMotoServer

    if not stock:
        _patch_moto_ranges()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    print(f"serving http://{host}:{port}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    done.wait()
    server.stop()


def _patch_moto_ranges() -> None:
    """Stock moto answers a ranged GET by copying the whole object out of its spooled buffer and slicing it: keep
    one immutable copy per key version instead, so the slice is the only per-request copy (as on real S3)."""
    from moto.s3.models import FakeKey

    prop, lock = FakeKey.value, threading.Lock()

    def get(self):
        cached = self.__dict__.get("_bench_value")
        if cached is None:
            with lock:  # one copy, not one per concurrent first request
                cached = self.__dict__.get("_bench_value")
                if cached is None:
                    cached = self.__dict__["_bench_value"] = prop.fget(self)
        return cached

    def set_(self, v):
        self.__dict__.pop("_bench_value", None)
        prop.fset(self, v)

    FakeKey.value = property(get, set_)


def s3_setup(endpoint: str) -> dict:
    import boto3

    c = boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=S3_KEY["key"],
                     aws_secret_access_key=S3_KEY["secret"])
    c.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    for name in (BBF_NAME, ST_NAME):
        c.upload_file(str(OUT / name), BUCKET, name)
        c.get_object(Bucket=BUCKET, Key=name, Range="bytes=0-0")["Body"].read()  # moto builds its copy now
    return {**S3_KEY, "client_kwargs": {"endpoint_url": endpoint, "region_name": REGION}}


# ==== orchestrator =========================================================================================
def worker_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({"AWS_ACCESS_KEY_ID": S3_KEY["key"], "AWS_SECRET_ACCESS_KEY": S3_KEY["secret"],
                "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": REGION, "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1"})
    env.update(extra or {})
    return env


def run_worker(name: str, spec: dict, timeout: float, env: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", name, "--_spec", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"ok": False, "error": f"worker exited {p.returncode} without a result: {p.stderr.strip()[-800:]}"}


def interleaved_runs(names: list[str], specs: dict, repeat: int, timeout: float, env: dict, log) -> dict:
    """name -> list of run results; each round runs every contender once (odd rounds in reverse order)."""
    runs = {n: [] for n in names}
    for r in range(repeat):
        for n in (names if r % 2 == 0 else names[::-1]):
            res = run_worker(n, specs[n], timeout, env)
            runs[n].append(res)
            msg = f"{res['time_s']:.3f} s, +{res['peak_rss_above_baseline'] / MB:.0f} MB RSS" if res["ok"] \
                else f"FAILED: {res['error'][:300]}"
            if res.get("first_s") is not None:
                msg += f", first group {res['first_s']:.3f} s"
            log(f"  round {r + 1}/{repeat} {LABELS[n]}: {msg}")
    return runs


def summarize(runs: dict, nominal: dict) -> list[dict]:
    rows = []
    for n, rs in runs.items():
        ok = [r for r in rs if r["ok"]]
        row = {"key": n, "contender": LABELS[n], "runs": rs}
        if not ok:
            row["note"] = "n/a: " + (rs[0]["error"] if rs else "not run")
            rows.append(row)
            continue
        best = min(ok, key=lambda r: r["time_s"])
        nbytes = best.get("bytes") or nominal.get(n)
        firsts = [r["first_s"] for r in ok if r.get("first_s") is not None]
        row.update({"bytes": nbytes, "MB": nbytes / MB if nbytes else None, "best_s": best["time_s"],
                    "MBps": nbytes / best["time_s"] / MB if nbytes else None,
                    "first_s": min(firsts) if firsts else None,
                    "peak_rss_MB": max(r["peak_rss_above_baseline"] for r in ok) / MB,
                    "cpu_s": best.get("cpu_s"), "stats": best.get("stats"),
                    "note": "" if len(ok) == len(rs) else f"{len(rs) - len(ok)} of {len(rs)} runs failed: "
                                                          f"{next(r['error'] for r in rs if not r['ok'])[:200]}"})
        rows.append(row)
    by = {r["key"]: r for r in rows}
    wire, st = by.get("wire", {}).get("best_s"), by.get("safetensors", {}).get("best_s")
    for r in rows:
        if r.get("best_s") and r["key"] not in PROBES:
            r["x_wire"] = r["best_s"] / wire if wire else None
            r["x_safetensors"] = r["best_s"] / st if st else None
    return rows


COLUMNS = [("contender", "contender", ""), ("MB", "bytes moved MB", ".1f"), ("best_s", "best time s", ".3f"),
           ("MBps", "MB/s", ".0f"), ("first_s", "time to first group s", ".3f"),
           ("peak_rss_MB", "peak RSS MB above baseline", ".0f"), ("x_wire", "× wire time (bbf bytes)", ".2f"),
           ("x_safetensors", "× safetensors", ".2f"), ("note", "note", "")]


def largest_group_bytes(path: Path) -> tuple[int, str]:
    import bbformat

    itemsize = {"float16": 2, "bfloat16": 2, "float32": 4}
    with bbformat.open(str(path)) as f:
        sizes = {g: 0 for g in f.model.groups()}
        for e in f.tensors.values():
            sizes[e["group"]] += math.prod(e["shape"]) * itemsize.get(e.get("dtype", "float16"), 2)
    g = max(sizes, key=sizes.get)
    return sizes[g], g


def prepare(log) -> dict:
    """Write (once) the .bbf and safetensors files; returns their sizes and the tensor count."""
    import torch
    from safetensors.torch import save_file

    import bbformat
    from common import sliced_smollm2

    bbf, st = OUT / BBF_NAME, OUT / ST_NAME
    if not bbf.exists() or not st.exists():
        desc, tensors, _ = sliced_smollm2(0.25, log=log, canonical=False)
        OUT.mkdir(parents=True, exist_ok=True)
        t16 = {k: v.to(torch.float16).contiguous() for k, v in tensors.items()}
        if not st.exists():
            save_file(t16, str(st))
        if not bbf.exists():
            t0 = time.perf_counter()
            bbformat.save(t16, str(bbf), model=desc, codec="exact", dtype="float16")
            log(f"wrote {bbf.name} in {time.perf_counter() - t0:.0f} s")
        del tensors, t16
    from safetensors import safe_open

    with safe_open(str(st), "pt") as f:
        n_tensors = len(list(f.keys()))
    crc = {}
    for p in (bbf, st):  # into the page cache, so that the first round does not pay for the disk
        c = 0
        with open(p, "rb") as fh:
            while block := fh.read(64 << 20):
                c = zlib.crc32(block, c)
        crc[p] = c
    lg, lg_name = largest_group_bytes(bbf)
    return {"bbf_bytes": bbf.stat().st_size, "st_bytes": st.stat().st_size, "n_tensors": n_tensors,
            "bbf_crc32": crc[bbf], "largest_group_bytes": lg, "largest_group": lg_name}


def bench_http(key: str, files: dict, args, env, log) -> dict:
    regime = REGIMES[key]
    with http_server(regime) as srv:
        log(f"{regime['title']}: {srv.url}")
        base = {"kind": "http", "n_tensors": files["n_tensors"], "crc32": files["bbf_crc32"]}
        bbf_url, st_url = f"{srv.url}/{BBF_NAME}", f"{srv.url}/{ST_NAME}"
        specs = {n: {**base, "url": bbf_url, "size": files["bbf_bytes"]} for n in HTTP_CONTENDERS}
        specs["safetensors"] = {**base, "url": st_url, "size": files["st_bytes"]}
        runs = interleaved_runs(HTTP_CONTENDERS, specs, args.repeat, args.timeout, env, log)
    nominal = {"probe_suffix": SUFFIX, "probe_chunk": CHUNK, "safetensors": files["st_bytes"],
               **{n: files["bbf_bytes"] for n in ("bbf_load", "bbf_load_model", "bbf_stream", "wire")}}
    return {"regime": key, **regime, "server": srv.cmd[1:], "rows": summarize(runs, nominal)}


def bench_s3(files: dict, args, env, log) -> dict:
    regime = REGIMES["s3"]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_moto"] + (["--moto-stock"] if args.moto_stock else [])
    with Server(cmd, env=env) as srv:
        t0 = time.perf_counter()
        opts = s3_setup(srv.url)
        log(f"{regime['title']}: {srv.url}, both files uploaded in {time.perf_counter() - t0:.1f} s")
        base = {"kind": "s3", "storage_options": opts, "n_tensors": files["n_tensors"], "crc32": files["bbf_crc32"]}
        specs = {
            "bbf_load": {**base, "url": f"s3://{BUCKET}/{BBF_NAME}"},
            "wire": {**base, "path": f"{BUCKET}/{BBF_NAME}", "size": files["bbf_bytes"]},
            "safetensors": {**base, "path": f"{BUCKET}/{ST_NAME}", "size": files["st_bytes"]},
            "runai": {**base, "url": f"s3://{BUCKET}/{ST_NAME}"},
        }
        renv = worker_env({"AWS_ENDPOINT_URL": srv.url, "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
                           "RUNAI_STREAMER_LOG_LEVEL": "WARNING", "AWS_REGION": REGION})
        names = list(S3_CONTENDERS)
        try:
            import runai_model_streamer  # noqa: F401
        except ImportError as e:
            names.remove("runai")
            runai_na = f"not installed ({e}; pip install runai-model-streamer runai-model-streamer-s3)"
        else:
            runai_na = None
        runs = interleaved_runs(names, specs, args.repeat, args.timeout, renv, log)
    if runai_na:
        runs["runai"] = [{"ok": False, "error": runai_na}]
    nominal = {"bbf_load": files["bbf_bytes"], "wire": files["bbf_bytes"], "safetensors": files["st_bytes"],
               "runai": files["st_bytes"]}
    return {"regime": "s3", **regime, "moto_range_patch": not args.moto_stock, "rows": summarize(runs, nominal)}


def goals(results: list[dict], files: dict) -> list[dict]:
    out = []
    rss_cap = (READAHEAD + 1) * files["largest_group_bytes"] + PARALLEL * CHUNK + 64 * MB

    def add(goal, regime, met, detail):
        out.append({"goal": goal, "regime": regime, "met": met, "detail": detail})

    for res in results:
        k = res["regime"]
        by = {r["key"]: r for r in res["rows"]}
        load, wire, st = (by.get(n, {}).get("best_s") for n in ("bbf_load", "wire", "safetensors"))
        if k in ("a", "b"):
            if load and wire:
                add("bbf load ≤ 1.15 × wire time of its bytes", k, load <= 1.15 * wire,
                    f"{load:.3f} s vs 1.15 × {wire:.3f} = {1.15 * wire:.3f} s ({load / wire:.2f}×)")
            else:
                add("bbf load ≤ 1.15 × wire time of its bytes", k, None, "not measured")
        if load and st:
            add("bbf load < safetensors path", k, load < st, f"{load:.3f} s vs {st:.3f} s ({load / st:.2f}×)")
        else:
            add("bbf load < safetensors path", k, None, "not measured")
        if "bbf_stream" in by:
            first = by["bbf_stream"].get("first_s")
            suf, chunk = by.get("probe_suffix", {}).get("best_s"), by.get("probe_chunk", {}).get("best_s")
            if first and suf and chunk:
                cap = 2 * (suf + chunk)
                add("time to first group ≤ 2 × (one suffix read + one chunk)", k, first <= cap,
                    f"{first:.3f} s vs 2 × ({suf:.3f} + {chunk:.3f}) = {cap:.3f} s")
            else:
                add("time to first group ≤ 2 × (one suffix read + one chunk)", k, None, "not measured")
            peak = by["bbf_stream"].get("peak_rss_MB")
            if peak is not None:
                add("stream peak RSS ≤ (readahead+1) × largest group + 16 × 8 MiB + 64 MB", k, peak * MB <= rss_cap,
                    f"{peak:.0f} MB vs {READAHEAD + 1} × {files['largest_group_bytes'] / MB:.1f} + "
                    f"{PARALLEL * CHUNK / MB:.1f} + 64 = {rss_cap / MB:.0f} MB")
            else:
                add("stream peak RSS ≤ (readahead+1) × largest group + 16 × 8 MiB + 64 MB", k, None, "not measured")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300, help="seconds allowed to one contender's run")
    p.add_argument("--json", default=None)
    p.add_argument("--moto-stock", action="store_true", help="do not patch moto's ranged GETs (see above)")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_spec", help=argparse.SUPPRESS)
    p.add_argument("--_moto", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        return worker(args._worker, json.loads(args._spec))
    if args._moto:
        return moto_main(args.moto_stock)

    sys.path.insert(0, str(TOOLS))
    from common import markdown_table, write_json

    def log(m):
        print(m, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} "
          f"({os.cpu_count()} cores)", flush=True)
    files = prepare(log)
    print(f"\n.bbf (exact, float16): {files['bbf_bytes'] / MB:.1f} MB; safetensors (float16): "
          f"{files['st_bytes'] / MB:.1f} MB; largest group {files['largest_group']}: "
          f"{files['largest_group_bytes'] / MB:.1f} MB decoded", flush=True)
    env = worker_env()
    results = []
    for key in args.regimes:
        try:
            res = bench_s3(files, args, env, log) if key == "s3" else bench_http(key, files, args, env, log)
        except Exception as e:
            res = {"regime": key, **REGIMES[key], "error": f"{type(e).__name__}: {e}", "rows": []}
            print(f"\n### {REGIMES[key]['title']}\n\nn/a: {res['error']}", flush=True)
            results.append(res)
            continue
        results.append(res)
        print(f"\n### {res['title']}\n", flush=True)
        print(markdown_table(res["rows"], COLUMNS), flush=True)
        for r in res["rows"]:
            if r.get("stats") is not None:
                print(f"\n{r['contender']} reader stats: {json.dumps(r['stats'])[:1500]}", flush=True)
    g = goals(results, files)
    print("\n### Goals\n")
    for x in g:
        mark = "n/a" if x["met"] is None else ("met" if x["met"] else "NOT MET")
        print(f"- [{mark}] ({x['regime']}) {x['goal']}: {x['detail']}")
    load_end = os.getloadavg()
    elapsed = time.perf_counter() - t_start
    print(f"\nload average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}; "
          f"benchmark took {elapsed:.0f} s", flush=True)
    write_json(args.json, {"files": files, "repeat": args.repeat, "chunk": CHUNK, "parallel": PARALLEL,
                           "suffix": SUFFIX, "readahead": READAHEAD, "load_average_start": load_start,
                           "load_average_end": load_end, "elapsed_s": elapsed, "regimes": results, "goals": g})


if __name__ == "__main__":
    main()
