"""The .bbf container: round trips over every transport, streaming order, random access, atomicity, bad input."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys

import msgpack
import pytest
import torch

import bbformat
from bbformat.container import layout
from bbformat.container.layout import FOOTER, RECORD, crc32
from bbformat.models.synthetic import random_slicegpt, tiny_desc


@pytest.fixture(scope="module")
def model():
    desc = tiny_desc("llama")
    return desc, random_slicegpt(desc, seed=1, dtype=torch.float16)


@pytest.fixture(scope="module")
def bbf_file(model, tmp_path_factory):
    desc, tensors = model
    path = tmp_path_factory.mktemp("c") / "m.bbf"
    bbformat.save(tensors, str(path), model=desc, codec="raw", aux={"note.txt": b"hello"})
    return path


@pytest.fixture(scope="module")
def big_bbf_file(model, tmp_path_factory):
    """Larger than the reader's first suffix read, so opening it cannot see the preamble."""
    desc, tensors = model
    path = tmp_path_factory.mktemp("c") / "big.bbf"
    bbformat.save({k: v.float() for k, v in tensors.items()}, str(path), model=desc, compression="none")
    assert path.stat().st_size > layout.SUFFIX_GUESS
    return path


def assert_same(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("compression", ["none", "auto"])
def test_round_trip_local(model, tmp_path, dtype, compression):
    desc, tensors = model
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    path = tmp_path / "m.bbf"
    bbformat.save(tensors, str(path), model=desc, compression=compression)
    assert_same(bbformat.load(str(path)), tensors)
    assert not [p for p in tmp_path.iterdir() if p.name != "m.bbf"], "temporary files left behind"


def test_file_and_memory_urls(model, bbf_file):
    desc, tensors = model
    assert_same(bbformat.load("file://" + str(bbf_file)), tensors)
    bbformat.save(tensors, "memory://x/m.bbf", model=desc)
    assert_same(bbformat.load("memory://x/m.bbf"), tensors)


def test_stream_order_smallest_first_then_largest_first(model, bbf_file):
    desc, tensors = model
    with bbformat.open(str(bbf_file)) as f:
        size = {g: sum(r.raw_len for r in f._by_group[g].values()) for g in desc.groups()}
        seen = [g for g, _ in f.stream(readahead=2)]
        assert sorted(seen) == sorted(desc.groups())
        assert size[seen[0]] == min(size.values())
        assert [size[g] for g in seen[1:]] == sorted((size[g] for g in seen[1:]), reverse=True)


def test_stream_any_subset_in_any_order_fetches_only_those_groups(model, bbf_file):
    desc, tensors = model
    want = ["layer.1", "embed"]
    with bbformat.open(str(bbf_file)) as f:
        before = f.stats["bytes"]
        got = list(f.stream(groups=want))
        assert [g for g, _ in got] == want
        assert f.stats["bytes"] - before == sum(f.group_stored_bytes(g) for g in want)
        for g, ts in got:
            assert sorted(ts) == sorted(t.name for t in desc.group_tensors(g))
            for name, t in ts.items():
                assert torch.equal(t, tensors[name])
        with pytest.raises(KeyError, match="no group 'layer.99'"):
            next(f.stream(groups=["layer.99"]))


@pytest.mark.parametrize("readahead", [0, 1, 2])
def test_stream_decodes_at_most_readahead_groups_beyond_the_callers(model, bbf_file, readahead):
    """Memory bound of stream(): while the caller holds a group, at most `readahead` more are decoded or decoding."""
    import threading
    import time

    desc, tensors = model
    with bbformat.open(str(bbf_file)) as f:
        started, lock, decode = [], threading.Lock(), f._decode_group

        def counting(group, *a, **k):
            with lock:
                started.append(group)
            return decode(group, *a, **k)

        f._decode_group = counting
        it = f.stream(readahead=readahead)
        seen = []
        for g, ts in it:
            seen.append(g)
            time.sleep(0.05)  # room for the pipeline to run as far ahead as it may
            with lock:
                assert len(started) <= min(len(desc.groups()), len(seen) + readahead), (seen, started)
            assert sorted(ts) == sorted(t.name for t in desc.group_tensors(g))
        assert sorted(seen) == sorted(desc.groups()) and len(started) == len(seen)


def test_random_access_fetches_only_its_sections(model, bbf_file):
    desc, tensors = model
    with bbformat.open(str(bbf_file)) as f:
        opened = f.store.bytes_read
        name = desc.layer_names(1)["o"]
        assert torch.equal(f.get_tensor(name), tensors[name])
        fetched = f.store.bytes_read - opened
        block = [r for r in f.sections if r.block == 1]
        assert fetched == sum(r.stored_len for r in block)
        assert f.aux("note.txt") == b"hello"


def test_one_suffix_read_on_open(bbf_file):
    with bbformat.open(str(bbf_file)) as f:
        assert f.store.requests == 1


def test_header_metadata_and_table(model, bbf_file):
    desc, _ = model
    with bbformat.open(str(bbf_file)) as f:
        assert f.model == desc
        assert f.header["format_version"] == "1.0"
        assert len(f.keys()) == len(desc.tensors())
        assert f.header["tensors"][0]["name"] == desc.tensors()[0].name


def test_writer_is_atomic(model, tmp_path):
    desc, tensors = model
    path = tmp_path / "m.bbf"
    with pytest.raises(RuntimeError):
        with bbformat.BBFWriter(str(path), desc) as w:
            w.write_group("embed", {n: tensors[n] for n in desc.embed_names()})
            raise RuntimeError("killed mid-way")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_wrong_order_and_shapes(model, tmp_path):
    desc, tensors = model
    w = bbformat.BBFWriter(str(tmp_path / "m.bbf"), desc)
    with pytest.raises(bbformat.BBFError, match="expected 'embed'"):
        w.write_group("layer.0", {})
    bad = {n: tensors[n] for n in desc.embed_names()}
    bad[desc.embed_names()[0]] = bad[desc.embed_names()[0]][:, :3]
    with pytest.raises(bbformat.ModelError, match="embed_tokens"):
        w.write_group("embed", bad)
    with pytest.raises(bbformat.BBFError, match="incomplete"):
        w.close()
    w.abort()
    assert list(tmp_path.iterdir()) == []


# ---- bad input -------------------------------------------------------------------------------------------

def _rewrite(src, dst, header_fn=None, footer_fn=None):
    """Copy a .bbf, optionally changing its header dict or footer fields, with valid checksums."""
    data = bytearray(open(src, "rb").read())
    f = list(FOOTER.unpack_from(data, len(data) - FOOTER.size))
    hoff, hlen, ioff = f[0], f[1], f[2]
    header = msgpack.unpackb(bytes(data[hoff:hoff + hlen]), raw=False)
    index = bytes(data[ioff:len(data) - FOOTER.size])
    if header_fn:
        header_fn(header)
    hb = msgpack.packb(header, use_bin_type=True)
    body = bytes(data[:hoff])
    f[0], f[1], f[2], f[4], f[5] = len(body), len(hb), len(body) + len(hb), crc32(index), crc32(hb)
    if footer_fn:
        footer_fn(f)
    open(dst, "wb").write(body + hb + index + FOOTER.pack(*f))


def test_rewrite_helper_is_faithful(bbf_file, tmp_path, model):
    _rewrite(bbf_file, tmp_path / "same.bbf")
    assert_same(bbformat.load(str(tmp_path / "same.bbf")), model[1])


@pytest.mark.parametrize("case, exc, pattern", [
    ("truncated", bbformat.TruncatedError, "truncated"),
    ("magic", bbformat.FormatError, "end magic"),
    ("big_header", bbformat.FormatError, "header is .* over the limit"),
    ("index_outside", bbformat.FormatError, "outside"),
    ("version", bbformat.VersionError, "version 2"),
    ("header_version", bbformat.VersionError, "version 7.0"),
    ("codec", bbformat.UnknownCodecError, "unknown codec 'zebra'"),
    ("header_crc", bbformat.ChecksumError, "header"),
    ("table", bbformat.FormatError, "shape"),
])
def test_bad_files_raise_named_errors(bbf_file, tmp_path, case, exc, pattern):
    bad = tmp_path / "bad.bbf"
    data = bytearray(open(bbf_file, "rb").read())
    if case == "truncated":
        bad.write_bytes(data[: len(data) - 10])
    elif case == "magic":  # the end magic; the start magic is checked when the first bytes are read
        data[-8:] = b"NOTABBF!"
        bad.write_bytes(data)
    elif case == "big_header":
        _rewrite(bbf_file, bad, footer_fn=lambda f: f.__setitem__(1, layout.MAX_HEADER + 1))
    elif case == "index_outside":
        # first record's offset beyond the data area
        _rewrite(bbf_file, bad)
        d = bytearray(bad.read_bytes())
        ioff = FOOTER.unpack_from(d, len(d) - FOOTER.size)[2]
        rec = list(RECORD.unpack_from(d, ioff))
        rec[5] = len(d) * 2
        RECORD.pack_into(d, ioff, *rec)
        f = list(FOOTER.unpack_from(d, len(d) - FOOTER.size))
        f[4] = crc32(bytes(d[ioff:len(d) - FOOTER.size]))
        FOOTER.pack_into(d, len(d) - FOOTER.size, *f)
        bad.write_bytes(d)
    elif case == "version":
        _rewrite(bbf_file, bad, footer_fn=lambda f: f.__setitem__(6, 2))
    elif case == "header_version":
        _rewrite(bbf_file, bad, header_fn=lambda h: h.__setitem__("format_version", "7.0"))
    elif case == "codec":
        _rewrite(bbf_file, bad, header_fn=lambda h: h["codec"].__setitem__("id", "zebra"))
    elif case == "header_crc":
        _rewrite(bbf_file, bad)
        d = bytearray(bad.read_bytes())
        hoff = FOOTER.unpack_from(d, len(d) - FOOTER.size)[0]
        d[hoff + 5] ^= 0x10
        bad.write_bytes(d)
    elif case == "table":
        _rewrite(bbf_file, bad, header_fn=lambda h: h["tensors"][0].__setitem__("shape", [1, 2]))
    with pytest.raises(exc, match=pattern):
        bbformat.load(str(bad))


def test_start_magic_checked(big_bbf_file, tmp_path):
    data = bytearray(open(big_bbf_file, "rb").read())
    data[1] ^= 0xFF
    (tmp_path / "m.bbf").write_bytes(data)
    with bbformat.open(str(tmp_path / "m.bbf")) as f:  # the suffix read does not reach it in a big file
        with pytest.raises(bbformat.FormatError, match="bad magic"):
            f.verify_checksums()
    small = tiny_desc("llama", num_layers=1, vocab_size=40)
    bbformat.save(random_slicegpt(small, dtype=torch.float16), str(tmp_path / "s.bbf"), model=small)
    data = bytearray((tmp_path / "s.bbf").read_bytes())
    assert len(data) <= layout.SUFFIX_GUESS  # the whole file arrives with the first read: checked on open
    data[1] ^= 0xFF
    (tmp_path / "s.bbf").write_bytes(data)
    with pytest.raises(bbformat.FormatError, match="bad magic"):
        bbformat.open(str(tmp_path / "s.bbf"))


def test_unknown_header_keys_are_ignored(bbf_file, tmp_path, model):
    _rewrite(bbf_file, tmp_path / "x.bbf", header_fn=lambda h: h.update(future_key={"a": 1}))
    assert_same(bbformat.load(str(tmp_path / "x.bbf")), model[1])


def test_flipped_bit_in_each_section_names_that_section(bbf_file, tmp_path, model):
    desc, tensors = model
    with bbformat.open(str(bbf_file)) as f:
        records = [r for r in f.sections if r.stored_len]
    for rec in records:
        data = bytearray(open(bbf_file, "rb").read())
        data[rec.offset + rec.stored_len // 2] ^= 0x04
        bad = tmp_path / "flip.bbf"
        bad.write_bytes(data)
        with bbformat.open(str(bad)) as f:
            for group in desc.groups():
                hit = rec.kind != "aux" and (group == {"initial": "embed", "head": "head"}.get(rec.kind)
                                             or group == f"layer.{rec.block}")
                if hit:
                    with pytest.raises(bbformat.ChecksumError, match=f"section {rec.index} "):
                        f.group(group)
                else:
                    assert_same(f.group(group), {t.name: tensors[t.name] for t in desc.group_tensors(group)})


def test_cli_prints_one_line_without_traceback(bbf_file, tmp_path):
    bad = tmp_path / "bad.bbf"
    bad.write_bytes(open(bbf_file, "rb").read()[:-3])
    p = subprocess.run([sys.executable, "-m", "bbformat.cli.inspect", str(bad)], capture_output=True, text=True)
    assert p.returncode != 0
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
    assert "truncated" in p.stderr


def test_inspect_json(bbf_file):
    import json

    p = subprocess.run([sys.executable, "-m", "bbformat.cli.inspect", str(bbf_file), "--json"],
                       capture_output=True, text=True, check=True)
    s = json.loads(p.stdout)
    plain = sum(t.numel for t in tiny_desc("llama").tensors()) * 2
    assert s["totals"]["plain_bytes"] == plain
    assert s["totals"]["checksums_ok"] is True
    assert len(s["sections"]) == 2 + 2 * 3 + 1  # initial, block+correction per layer, head, aux


# ---- remote ----------------------------------------------------------------------------------------------

def test_http_with_range(bbf_file, served_dir, http_url, model):
    shutil.copy(bbf_file, served_dir / "m.bbf")
    with bbformat.open(f"{http_url}/m.bbf") as f:
        assert f.store.requests == 1
        assert_same(f.load_all(), model[1])


def test_http_without_range_is_refused(big_bbf_file, served_dir, http_norange_url):
    shutil.copy(big_bbf_file, served_dir / "big.bbf")
    with pytest.raises(bbformat.RangeNotSupportedError, match="ignored an HTTP Range request"):
        bbformat.open(f"{http_norange_url}/big.bbf")


def test_s3_round_trip(model, s3):
    desc, tensors = model
    prefix, opts = s3
    url = f"{prefix}/models/m.bbf"
    bbformat.save(tensors, url, model=desc, storage_options=opts)
    with bbformat.open(url, storage_options=opts) as f:
        assert_same(f.load_all(), tensors)


def test_footer_struct_sizes():
    assert (layout.PREAMBLE.size, FOOTER.size, RECORD.size) == (16, 56, 48)
    assert struct.calcsize("<Q") == 8


@pytest.mark.parametrize("codec", ["raw", "exact"])
def test_loads_reads_a_file_held_in_memory(model, tmp_path, codec):
    """bbformat.loads(bytes) gives the tensors bbformat.load(path) gives, and they do not alias the buffer."""
    desc, tensors = model
    path = tmp_path / "m.bbf"
    bbformat.save(tensors, str(path), model=desc, codec=codec, dtype="bfloat16")
    data = bytearray(path.read_bytes())
    got, want = bbformat.loads(data), bbformat.load(str(path))
    assert list(got) == list(want) == [t.name for t in desc.tensors()]
    for name in want:
        assert torch.equal(got[name].view(torch.int16), want[name].view(torch.int16)), name
    data[:] = bytes(len(data))  # overwrite the buffer: the decoded tensors must not change
    for name in want:
        assert torch.equal(got[name].view(torch.int16), want[name].view(torch.int16)), name
    with pytest.raises(bbformat.BBFError):
        bbformat.loads(bytes(data[:100]))
