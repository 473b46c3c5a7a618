"""Issue 11: every malformed file, config or disk condition ends in one clear BBFError, bounded memory, no litter.

One regression test per reproducer of the issue (items 1, 2, 4, 5 and 6), each with the exact error class and a
message naming the field, section, path or URL; the CLI's one-line errors and exit codes; peak memory while the
allocation bombs are refused. (Network faults, item 3, are covered by test_stream.py.)
"""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import zstandard

import bbformat
from bbformat import fuzz
from bbformat.cli import inspect as inspect_cli
from bbformat.cli import main as bbf_main
from bbformat.container.layout import FOOTER, RECORD
from bbformat.io import store
from bbformat.models.gguf_check import check_gguf
from bbformat.models.slicegpt_io import DESC_KEY, load_slicegpt, save_slicegpt
from bbformat.models.synthetic import random_slicegpt, tiny_desc

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bases() -> dict[str, fuzz.Base]:
    return {name: fuzz.Base.from_bytes(name, data) for name, data in fuzz.base_files().items()}


@pytest.fixture(scope="module")
def raw(bases) -> fuzz.Base:
    return bases["raw-opt-f16"]


def mutate(base: fuzz.Base, tmp_path: Path, mutation: fuzz.Mutation | None = None, name: str = "bad.bbf") -> Path:
    p = tmp_path / name
    p.write_bytes(base.data if mutation is None else fuzz.apply(mutation, base))
    return p


def header(path, value, op="set"):
    return fuzz.Mutation("header", tuple(path), op, value)


def cli(argv, capsys, prog=bbf_main.main):
    """Run a command in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = prog([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code, err, want_code, pattern):
    assert code == want_code, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert pattern in err, err


# ---- 1. header and index values that pass the CRC but make no sense ------------------------------------------
@pytest.mark.parametrize("path, value, pattern", [
    (("model", "num_kv_heads"), 0, "num_kv_heads = 0 is outside 1.."),
    (("model", "vocab_size"), None, "vocab_size must be an integer, got None"),
    (("model", "vocab_size"), "x", "vocab_size must be an integer, got 'x'"),
    (("model", "head_dim"), None, "head_dim must be an integer"),
    (("model", "head_dim"), 1.5, "head_dim must be an integer, got 1.5"),
    (("model", "intermediate_size"), [64], "intermediate_size must be an integer"),
    (("model", "max_position_embeddings"), None, "max_position_embeddings must be an integer"),
    (("model", "rope_theta"), b"\0", "rope_theta must be a finite positive number"),
    (("model", "rope_theta"), float("nan"), "rope_theta must be a finite positive number"),
    (("model", "activation"), "evil", "activation 'evil' (str) is not one of"),
    (("model", "family"), "gpt2", "family 'gpt2' (str) is not one of"),
    (("model", "attn_input_dims"), "x", "attn_input_dims must be a list"),
    (("model", "extra"), {"k": b"\0"}, "extra.k holds b'\\x00'"),
    (("model",), [], "'model' is a list, expected a map"),
    (("aux",), "x", "'aux' is a str, expected a array"),
    (("aux",), None, "'aux' is a NoneType"),
    (("aux", 0), {"name": 5}, "aux[0].name must be a string"),
    (("aux", 1, "name"), "note", "aux name 'note' appears twice"),
    (("metadata",), {"k": 5}, "metadata entry 'k'"),
    (("dtype",), "int8", "dtype 'int8' is not one of"),
    (("codec", "params"), {"x": 1}, "codec.params: codec 'raw': unknown parameter(s) ['x']; it takes no parameters"),
    (("codec", "params"), [], "codec.params is list"),
    (("tensors", 0, "dtype"), "float32", "dtype float32 does not match"),
    (("tensors",), [], "the tensor table lists 0 tensors, the model description implies"),
    (("format_version",), "1", "format_version '1' is not 'major.minor'"),
    (("format_version",), 1.0, "format_version '1.0'"),
])
def test_header_values_are_format_errors_naming_the_field(raw, tmp_path, capsys, path, value, pattern):
    bad = mutate(raw, tmp_path, header(path, value))
    with pytest.raises(bbformat.FormatError) as e:
        bbformat.load(str(bad))
    assert pattern in str(e.value) and str(e.value).startswith("header")
    # bbf-inspect and bbf decode run the same schema: the same one line, exit 2
    for argv, prog in (([bad], inspect_cli.main), (["decode", bad, "-o", tmp_path / "x.pt"], bbf_main.main)):
        code, _, err = cli(argv, capsys, prog)
        assert_one_line(code, err, 2, pattern)
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x.json").exists()


def test_num_layers_zero_with_empty_widths(raw, tmp_path):
    h = raw.header
    bad = mutate(raw, tmp_path, fuzz.Mutation("header", ("model",), "set", {
        **h["model"], "num_layers": 0, "attn_input_dims": [], "attn_output_dims": [], "mlp_input_dims": [],
        "mlp_output_dims": []}))
    with pytest.raises(bbformat.FormatError, match=r"^header: model: num_layers = 0 is outside 1\.\.8192"):
        bbformat.load(str(bad))


@pytest.mark.parametrize("codec", ["exact", "bitsback"])
def test_codec_id_that_does_not_match_the_sections(raw, tmp_path, codec):
    """A raw file relabelled: the first section whose length the other codec does not write is named (it used to
    be a ValueError "cannot reshape")."""
    with bbformat.open(str(mutate(raw, tmp_path))) as f:
        raw_specs = f.codec.section_specs(f.model, f.dtype)
        other = bbformat.codecs.get_codec(codec).section_specs(f.model, f.dtype)
    (i, group, spec), = [(i, g, b) for i, (g, a, b) in enumerate(
        (g, a, b) for g in f.model.groups() for a, b in zip(raw_specs[g], other[g])) if a != b][:1]
    bad = mutate(raw, tmp_path, header(("codec",), {"id": codec, "params": {}}))
    with pytest.raises(bbformat.FormatError) as e:
        bbformat.load(str(bad))
    assert str(e.value).startswith(f"section {i} (") and f"codec {codec!r} needs {spec.min_raw}" in str(e.value)
    assert f"for the {spec.kind} section of {group}" in str(e.value)


@pytest.mark.parametrize("field, value, pattern", [
    ("compression", 3, r"section 0: unknown compression id 3 \(this reader knows 0\.\.2\)"),
    ("kind", 9, r"section 0: unknown section kind 9"),
    ("word_size", 3, r"section 0: bad word size 3"),
    ("word_size", 4, r"section 0 \(embeddings\): word size 4, codec 'raw' writes 2"),
    ("block", 5, r"section 0 \(embeddings\): a initial section \(block 5\) where codec 'raw' writes the initial"),
    ("aux_id", 1, r"section 0 \(embeddings\): aux id 1 on a initial section"),
    ("offset", 100, r"section 0: offset 100 is not a multiple of 64"),
    ("corrections", 7, r"section 0 \(embeddings\): 7 correction records"),
])
def test_index_values_are_format_errors_naming_the_section(raw, tmp_path, capsys, field, value, pattern):
    bad = mutate(raw, tmp_path, fuzz.Mutation("index", (0, field), "set", value))
    with pytest.raises(bbformat.FormatError, match=pattern):
        bbformat.load(str(bad))
    code, out, err = cli([bad], capsys, inspect_cli.main)  # bbf-inspect gave IndexError on compression 2
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and "all ok" not in out


# ---- 2. allocation bombs --------------------------------------------------------------------------------------
def zstd_zeros(total: int) -> bytes:
    """An entropy-stage byte payload (method 1, word size 1) that decodes to `total` zero bytes: 64 MiB chunks,
    each one zstd frame of a few KB."""
    c = 1 << 26
    frame = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(bytes(c))
    head = bytearray([3, 0, 26])

    def varint(v):
        while v >= 0x80:
            head.append(v & 0x7F | 0x80)
            v >>= 7
        head.append(v)

    varint(total)
    n = -(-total // c)
    for i in range(n):
        size = min(c, total - i * c)
        assert size == c
        varint(len(frame) << 1 | 1)
    return bytes(head) + frame * n


def correction_bomb(raw: fuzz.Base, path: Path, total: int = 3 << 30) -> Path:
    """The raw-codec file whose CRC-valid correction section (layer 0's) declares `total` bytes of zstd zeros."""
    i = next(k for k, r in enumerate(raw.records) if r[0] == 2)  # kind 2: correction
    sections, records = list(raw.sections), [list(r) for r in raw.records]
    sections[i] = zstd_zeros(total)
    records[i][1], records[i][7] = 1, total  # compression zstd-planes, raw length 3 GiB
    path.write_bytes(fuzz.assemble(raw.data[:16], sections, records, raw.header_bytes, fix={i}))
    return path


def aux_bomb(raw: fuzz.Base, path: Path, total: int = 3 << 30) -> Path:
    i = next(k for k, r in enumerate(raw.records) if r[0] == 4)
    sections, records = list(raw.sections), [list(r) for r in raw.records]
    sections[i] = zstd_zeros(total)
    records[i][1], records[i][7] = 1, total
    path.write_bytes(fuzz.assemble(raw.data[:16], sections, records, raw.header_bytes, fix={i}))
    return path


def raw_len_bomb(raw: fuzz.Base, path: Path) -> Path:
    """A record with raw_len = 2**40 (the index CRC recomputed)."""
    path.write_bytes(fuzz.apply(fuzz.Mutation("index", (1, "raw_len"), "set", 1 << 40), raw))
    return path


def header_bomb(raw: fuzz.Base, path: Path, n: int = 8 << 20) -> Path:
    """A CRC-valid header of n empty msgpack maps: 8 MB of bytes that would build ~700 MB of Python objects."""
    hb = b"\xdd" + struct.pack(">I", n) + b"\x80" * n
    path.write_bytes(fuzz._with_header(raw, hb))
    return path


def test_correction_bomb_is_refused_before_decompression(raw, tmp_path, capsys):
    bomb = correction_bomb(raw, tmp_path / "bomb.bbf")
    assert bomb.stat().st_size < 400_000
    with pytest.raises(bbformat.FormatError, match=r"section 2 \(corrections of block 0\): raw length 3221225472 "
                                                   r"bytes; codec 'raw' needs 0 for the correction section of layer.0"):
        bbformat.load(str(bomb))  # the message proves it: refused on the record, before any decompression
    code, out, err = cli([bomb], capsys, inspect_cli.main)  # it said "all ok"
    assert_one_line(code, err, 2, "section 2 (corrections of block 0): raw length 3221225472")
    assert "all ok" not in out


def test_raw_len_2_40_is_refused_before_allocation(raw, tmp_path):
    with pytest.raises(bbformat.FormatError, match=r"section 1 \(block 0\): raw length 1099511627776 bytes; codec "
                                                   r"'raw' needs 14680 for the block section of layer.0"):
        bbformat.load(str(raw_len_bomb(raw, tmp_path / "b.bbf")))


def test_aux_and_header_bombs_are_refused(raw, tmp_path):
    with pytest.raises(bbformat.FormatError, match=r"section 6 \(aux 0\): raw length 3221225472 bytes, over the "
                                                   r"limit of 1073741824 for an aux section"):
        bbformat.open(str(aux_bomb(raw, tmp_path / "a.bbf")))
    with pytest.raises(bbformat.FormatError, match=r"header holds more than 262144 maps and arrays"):
        bbformat.open(str(header_bomb(raw, tmp_path / "h.bbf")))


def test_bitsback_correction_section_is_bounded_by_its_targets(bases, tmp_path):
    base = bases["bitsback-llama-f16"]
    i = next(k for k, r in enumerate(base.records) if r[0] == 2)
    with bbformat.open(str(mutate(base, tmp_path))) as f:
        spec = f.codec.section_specs(f.model, f.dtype)["layer.0"][1]
    assert spec.kind == "correction" and 0 < spec.min_raw <= base.records[i][7] <= spec.max_raw
    sections, records = list(base.sections), [list(r) for r in base.records]
    sections[i], records[i][1], records[i][7] = zstd_zeros(1 << 26), 1, 1 << 26
    bad = tmp_path / "c.bbf"
    bad.write_bytes(fuzz.assemble(base.data[:16], sections, records, base.header_bytes, fix={i}))
    with pytest.raises(bbformat.FormatError, match=rf"section {i} \(corrections of block 0\): raw length 67108864 "
                                                   rf"bytes; codec 'bitsback' needs {spec.min_raw}..{spec.max_raw}"):
        bbformat.load(str(bad))


PEAK_RSS = textwrap.dedent("""
    import json, resource, sys
    def hwm():  # peak resident set size so far, bytes
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024
    import bbformat
    from bbformat.cli import inspect
    for name in bbformat.__all__:  # `import bbformat` is lazy: import the API (torch, numpy, codecs) before `base`
        getattr(bbformat, name)
    base, errors = hwm(), []
    for path in sys.argv[1:]:
        try:
            bbformat.load(path)
            errors.append(None)
        except bbformat.FormatError as e:
            errors.append(type(e).__name__)
        errors.append(inspect.main([path, "--json"]))
    print(json.dumps({"base": base, "peak": hwm(), "outcomes": errors}))
""")


def test_peak_rss_while_refusing_the_bombs(raw, tmp_path):
    """Acceptance: peak RSS while rejecting the bomb files <= 100 MB above `import bbformat` with its public API
    imported (before the fix: 6.4 GB for the correction bomb, a 1 TiB request for raw_len 2**40)."""
    bombs = [correction_bomb(raw, tmp_path / "c.bbf"), raw_len_bomb(raw, tmp_path / "r.bbf"),
             aux_bomb(raw, tmp_path / "a.bbf"), header_bomb(raw, tmp_path / "h.bbf")]
    p = subprocess.run([sys.executable, "-c", PEAK_RSS, *map(str, bombs)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.splitlines()[-1])
    assert r["outcomes"] == ["FormatError", 2] * len(bombs)
    assert r["peak"] - r["base"] <= 100e6, f"peak RSS {(r['peak'] - r['base']) / 1e6:.0f} MB above import"


# ---- 4. the writer: no litter, no traceback, the target untouched ---------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    desc = tiny_desc("llama", num_layers=2, hidden_size=32, vocab_size=64, widths=(24, 16, 28))
    tensors = random_slicegpt(desc, seed=2, dtype=torch.float16)
    pt, js = save_slicegpt(desc, tensors, d / "tiny_0.25.pt")
    bbformat.save(tensors, str(d / "tiny.bbf"), model=desc, codec="raw", compression="none")
    return desc, tensors, pt, d / "tiny.bbf"


def litter(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".tmp" in p.name)


class FullDisk:
    """A file object that takes `room` bytes and then fails like a full disk: on the write that crosses it, or (with
    at_close) only when the data is flushed by close()."""

    def __init__(self, f, room: int, at_close: bool):
        self.f, self.room, self.at_close, self.n = f, room, at_close, 0

    def write(self, data):
        self.n += len(data)
        if self.n > self.room and not self.at_close:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def close(self):
        self.f.close()
        if self.at_close and self.n > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture()
def full_disk(monkeypatch):
    """full_disk(room, at_close): AtomicSink's local files fail like a full disk after `room` bytes."""
    real = open

    def install(room: int, at_close: bool = False):
        def fake(file, mode="r", *a, **k):
            f = real(file, mode, *a, **k)
            return FullDisk(f, room, at_close) if isinstance(file, int) and "w" in mode else f

        monkeypatch.setattr(store.builtins, "open", fake)

    return install


def stages(path: Path) -> dict[str, int]:
    """Byte positions inside each part of a written .bbf: the preamble, a section, the header, index, footer."""
    data = path.read_bytes()
    hoff, hlen, ioff = FOOTER.unpack_from(data, len(data) - FOOTER.size)[:3]
    first = RECORD.unpack_from(data, ioff)
    return {"preamble": 4, "section": first[5] + first[6] // 2, "header": hoff + hlen // 2, "index": ioff + 10,
            "footer": len(data) - 20}


@pytest.mark.parametrize("stage", ["preamble", "section", "header", "index", "footer", "close"])
def test_disk_full_at_every_stage_leaves_nothing(checkpoint, tmp_path, full_disk, stage):
    desc, tensors, _, ref = checkpoint
    target = tmp_path / "m.bbf"
    target.write_bytes(b"the old file")
    at = stages(ref)
    full_disk(at.get(stage, 0), at_close=stage == "close")  # close: every write succeeds, the final flush fails
    with pytest.raises(bbformat.WriteError, match=rf"cannot write .*m\.bbf: No space left on device"):
        bbformat.save(tensors, str(target), model=desc, codec="raw", compression="none")
    assert litter(tmp_path) == [] and target.read_bytes() == b"the old file"


def test_disk_full_in_bbf_encode_and_decode_is_one_line(checkpoint, tmp_path, full_disk, capsys):
    desc, tensors, pt, ref = checkpoint
    full_disk(100)
    (tmp_path / "x.pt").write_bytes(b"old")
    # (safetensors writes its file by path, past the simulated disk: there the JSON next to it is what fails)
    for argv, name in ((["encode", pt, "-o", tmp_path / "m.bbf", "-q"], "m.bbf"),
                       (["decode", ref, "-o", tmp_path / "x.pt", "-q"], "x.pt"),
                       (["decode", ref, "-o", tmp_path / "y.safetensors", "-q"], "y.json")):
        code, _, err = cli(argv, capsys)
        assert_one_line(code, err, 3, f"{name}: No space left on device")
    assert litter(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]
    assert (tmp_path / "x.pt").read_bytes() == b"old"


@pytest.fixture()
def tmpfs(tmp_path):
    """A real 24 KB filesystem (tmpfs), where it can be mounted (root on Linux); skipped elsewhere."""
    d = tmp_path / "small"
    d.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0 or \
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield d
    subprocess.run(["umount", str(d)], check=True)


def test_real_full_disk(checkpoint, tmpfs, capsys):
    """The same on a real full filesystem: ENOSPC from the kernel, wherever it hits."""
    desc, tensors, pt, ref = checkpoint
    (tmpfs / "m.bbf").write_bytes(b"old")
    code, _, err = cli(["encode", pt, "-o", tmpfs / "m.bbf", "--codec", "raw", "-q"], capsys)
    assert_one_line(code, err, 3, "m.bbf: No space left on device")
    code, _, err = cli(["decode", ref, "-o", tmpfs / "x.pt", "-q"], capsys)
    assert_one_line(code, err, 3, "x.pt: No space left on device")
    assert sorted(p.name for p in tmpfs.iterdir()) == ["m.bbf"] and (tmpfs / "m.bbf").read_bytes() == b"old"


def test_bad_targets_are_one_line_with_nothing_left(checkpoint, tmp_path, capsys):
    desc, tensors, pt, ref = checkpoint
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_bytes(b"a file")
    (tmp_path / "ro.bbf").write_bytes(b"read-only")
    (tmp_path / "ro.bbf").chmod(0o444)
    cases = [(["encode", pt, "-o", tmp_path / "dir", "-q"], "dir: it is a directory"),
             (["encode", pt, "-o", tmp_path / "file" / "m.bbf", "-q"], "file is not a directory"),
             (["encode", pt, "-o", tmp_path / "ro.bbf", "-q"], "ro.bbf: it exists and is read-only"),
             (["decode", ref, "-o", tmp_path / "file" / "x.pt", "-q"], "file is not a directory"),
             (["decode", ref, "-o", tmp_path / "dir" / "sub" / "x.pt", "-q"], None)]  # missing dirs are created
    for argv, pattern in cases:
        code, _, err = cli(argv, capsys)
        if pattern is None:
            assert code == 0, err
        else:
            assert_one_line(code, err, 3, pattern)
    assert (tmp_path / "ro.bbf").read_bytes() == b"read-only" and (tmp_path / "file").read_bytes() == b"a file"
    assert {"x.json", "x.pt"} <= {p.name for p in (tmp_path / "dir" / "sub").iterdir()}
    assert litter(tmp_path) == litter(tmp_path / "dir") == litter(tmp_path / "dir" / "sub") == []


def test_a_failed_write_removes_the_directories_it_created(checkpoint, tmp_path, full_disk):
    desc, tensors, _, _ = checkpoint
    full_disk(100)
    with pytest.raises(bbformat.WriteError):
        bbformat.save(tensors, str(tmp_path / "a" / "b" / "m.bbf"), model=desc)
    assert list(tmp_path.iterdir()) == []


def test_incomplete_file_in_a_with_block_leaves_nothing(checkpoint, tmp_path):
    desc, tensors, _, _ = checkpoint
    with pytest.raises(bbformat.BBFError, match="file incomplete"):
        with bbformat.BBFWriter(str(tmp_path / "m.bbf"), desc) as w:
            w.write_group("embed", {n: tensors[n] for n in desc.embed_names()})
    assert list(tmp_path.iterdir()) == []


DEAD_WRITER = textwrap.dedent("""
    import os, signal, sys, torch, bbformat
    from bbformat.models.synthetic import random_slicegpt, tiny_desc
    desc = tiny_desc("llama", num_layers=2, hidden_size=32, vocab_size=64, widths=(24, 16, 28))
    t = random_slicegpt(desc, seed=2, dtype=torch.float16)
    w = bbformat.BBFWriter(sys.argv[1], desc)
    w.write_group("embed", {n: t[n] for n in desc.embed_names()})
    w._sink.f.flush()
    print(w._sink.tmp, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.readline()  # "alive": hold the temporary (and its lock) until told to go
""")


def test_the_next_write_removes_a_killed_writers_temporary(checkpoint, tmp_path):
    desc, tensors, _, _ = checkpoint
    target = tmp_path / "m.bbf"
    alive = subprocess.Popen([sys.executable, "-c", DEAD_WRITER, str(target), "alive"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        live_tmp = Path(alive.stdout.readline().strip())
        dead = subprocess.run([sys.executable, "-c", DEAD_WRITER, str(target), "kill"], capture_output=True,
                              text=True)
        assert dead.returncode == -signal.SIGKILL
        tmp = Path(dead.stdout.strip())
        assert tmp.parent == tmp_path and tmp.name.startswith(".m.bbf.tmp-") and tmp.stat().st_size > 64
        assert live_tmp.exists(), "the second writer removed the first one's temporary while it was writing"
        old = time.time() - 60
        for p in (tmp, live_tmp):
            os.utime(p, (old, old))  # both unchanged for a minute: only the lock tells them apart
        bbformat.save(tensors, str(target), model=desc)
        assert not tmp.exists(), "the dead writer's temporary is still there"
        assert live_tmp.exists(), "a live writer's temporary was removed"
        assert litter(tmp_path) == [live_tmp.name]
        assert bbformat.load(str(target)).keys() == tensors.keys()
    finally:
        alive.communicate("go\n", timeout=60)


def test_a_fresh_unlocked_temporary_is_kept(tmp_path):
    """A writer between creating its temporary and locking it: too young to be stale."""
    fresh = tmp_path / ".m.bbf.tmp-0123456789ab"
    fresh.write_bytes(b"x")
    assert store.remove_stale_temps(str(tmp_path), "m.bbf") == []
    os.utime(fresh, (time.time() - 10, time.time() - 10))
    (tmp_path / ".m.bbf.tmp-notours").write_bytes(b"x")  # not the pattern: never touched
    (tmp_path / ".n.bbf.tmp-0123456789ab").write_bytes(b"x")  # another target's
    assert store.remove_stale_temps(str(tmp_path), "m.bbf") == [str(fresh)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.bbf.tmp-notours", ".n.bbf.tmp-0123456789ab"]


# ---- 5. importers ---------------------------------------------------------------------------------------------
def hostile_json(base: dict, case: str):
    cfg = json.loads(json.dumps(base))
    desc = cfg[DESC_KEY]
    if case == "string width":
        cfg["attention_input_dimensions"]["0"] = "24"
    elif case == "hidden_size x":
        cfg["hidden_size"] = "x"
    elif case == "top-level list":
        cfg = [cfg]
    elif case == "num_kv_heads 0":
        desc["num_kv_heads"] = 0
    elif case == "num_layers 0":
        desc.update(num_layers=0, attn_input_dims=[], attn_output_dims=[], mlp_input_dims=[], mlp_output_dims=[])
    elif case == "bbformat_model list":
        cfg[DESC_KEY] = [desc]
    elif case == "hidden_size 1e15":
        cfg["hidden_size"] = 1e15
        desc["hidden_size"] = 1e15
    elif case == "rope_theta x":
        desc["rope_theta"] = "x"
    elif case == "activation evil":
        desc["activation"] = "evil"
    elif case == "not json":
        return "{"
    return json.dumps(cfg)


@pytest.mark.parametrize("case, pattern", [
    ("string width", "attention_input_dimensions[0] must be an integer in 1..32, got '24' (str)"),
    ("hidden_size x", "hidden_size must be an integer in 1..1048576, got 'x' (str)"),
    ("top-level list", "must be a JSON object, got a list"),
    ("num_kv_heads 0", "bbformat_model: num_kv_heads = 0 is outside 1..4"),
    ("num_layers 0", "bbformat_model: num_layers = 0 is outside 1..8192"),
    ("bbformat_model list", "bbformat_model: the model description must be a map, got [{"),
    ("hidden_size 1e15", "hidden_size must be an integer in 1..1048576, got '1000000000000000.0' (float)"),
    ("rope_theta x", "bbformat_model: rope_theta must be a finite positive number, got 'x' (str)"),
    ("activation evil", "bbformat_model: activation 'evil' (str) is not one of ('silu', 'relu', 'gelu')"),
    ("not json", "cannot read slicing config"),
])
def test_hostile_slicing_configs(checkpoint, tmp_path, capsys, case, pattern):
    desc, tensors, pt, _ = checkpoint
    # the .json bbformat writes is pure SliceGPT; the description key of older files is still read, and checked
    base = {**json.loads(pt.with_suffix(".json").read_text()), DESC_KEY: desc.to_dict()}
    ck = tmp_path / "m_0.25.pt"
    ck.write_bytes(b"not even a checkpoint")  # the JSON is checked before the checkpoint is read
    ck.with_suffix(".json").write_text(hostile_json(base, case))
    with pytest.raises(bbformat.ModelError) as e:
        load_slicegpt(ck)
    assert pattern in str(e.value) and str(ck.with_suffix(".json")) in str(e.value)
    code, _, err = cli(["encode", ck, "-o", tmp_path / "m.bbf", "-q"], capsys)
    assert_one_line(code, err, 2, pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_0.25.json", "m_0.25.pt"]


def test_hostile_model_description_beside_the_checkpoint(checkpoint, tmp_path, capsys):
    """bbformat's own `<stem>.bbformat.json` goes through the same ModelDesc checks."""
    from bbformat.models.slicegpt_io import description_path

    desc, tensors, pt, _ = checkpoint
    ck = tmp_path / "m_0.25.pt"
    ck.write_bytes(b"not even a checkpoint")
    ck.with_suffix(".json").write_text(pt.with_suffix(".json").read_text())
    bad = {**desc.to_dict(), "num_kv_heads": 0}
    description_path(ck).write_text(json.dumps({"format": "bbformat.model/1", "model": bad}))
    with pytest.raises(bbformat.ModelError, match=r"m_0\.25\.bbformat\.json: num_kv_heads = 0 is outside 1\.\.4"):
        load_slicegpt(ck)


def test_pickle_refusal_does_not_advise_weights_only_false(checkpoint, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    ck = tmp_path / "evil_0.25.pt"
    torch.save({"w": Evil()}, ck)
    ck.with_suffix(".json").write_text(checkpoint[2].with_suffix(".json").read_text())
    with pytest.raises(bbformat.ModelError) as e:
        load_slicegpt(ck)
    msg = str(e.value)
    assert "not a plain state dict of tensors" in msg and "system" in msg and str(ck) in msg
    assert "weights_only" not in msg and "\n" not in msg


def gguf(kv: list[tuple[str, int, bytes]] = (), tensors: list = (), version: int = 3, counts=None) -> bytes:
    def s(b):
        return struct.pack("<Q", len(b)) + b

    out = b"GGUF" + struct.pack("<I", version)
    out += struct.pack("<QQ", *(counts or (len(tensors), len(kv))))
    for key, vtype, value in kv:
        out += s(key.encode()) + struct.pack("<I", vtype) + value
    for name, dims, ttype, off in tensors:
        out += s(name.encode()) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", ttype, off)
    return out


ARCH_ONLY = gguf([("general.architecture", 8, struct.pack("<Q", 5) + b"llama")])


@pytest.mark.parametrize("data, pattern", [
    (ARCH_ONLY, "GGUF file has no llama.block_count: it does not describe a model"),
    (ARCH_ONLY[:30], "it declares 1 metadata entries and 0 tensors, more than its 6 bytes can hold"),
    (gguf(counts=(0, 2**63)) + bytes(64), "it declares 9223372036854775808 metadata entries"),
    (gguf([("k" * 4, 4, b"")], counts=(0, 1))[:24] + struct.pack("<Q", 2**62) + bytes(32),
     "metadata key 0 is 4611686018427387904 bytes long, over the limit of 65536"),
    (gguf([("general.architecture", 8, struct.pack("<Q", 2**60) + b"llama")]),
     "'general.architecture' needs 1152921504606846976 bytes"),
    (gguf([("general.architecture", 9, struct.pack("<IQ", 8, 2**40))]),
     "the 1099511627776 elements of 'general.architecture' needs"),
    (gguf(version=1), "version 1 (this reader knows (2, 3))"),
    (b"GGML" + bytes(40), "not a GGUF file (bad magic b'GGML')"),
    (gguf([("general.architecture", 8, struct.pack("<Q", 4) + b"gpt2")]), "GGUF architecture 'gpt2' is not supported"),
])
def test_hostile_gguf_files(tmp_path, data, pattern):
    p = tmp_path / "m.gguf"
    p.write_bytes(data)
    with pytest.raises(bbformat.ModelError) as e:
        check_gguf(p)
    assert pattern in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_gguf_with_keys_but_no_tensors_is_refused(tmp_path):
    u32 = lambda v: struct.pack("<I", v)  # noqa: E731
    kv = [("general.architecture", 8, struct.pack("<Q", 5) + b"llama"), ("llama.block_count", 4, u32(32)),
          ("llama.embedding_length", 4, u32(4096)), ("llama.feed_forward_length", 4, u32(11008)),
          ("llama.attention.head_count", 4, u32(32))]
    p = tmp_path / "m.gguf"
    p.write_bytes(gguf(kv))
    with pytest.raises(bbformat.ModelError, match="GGUF file has no tensor 'token_embd.weight', which its llama.* keys "
                                                  "imply \\(32 blocks, width 4096\\)"):
        check_gguf(p)
    p.write_bytes(gguf(kv, [("token_embd.weight", (4096, 32000), 1, 0)]))
    with pytest.raises(bbformat.ModelError, match="tensor 'token_embd.weight' \\(4096x32000, type 1\\) at offset 0 "
                                                  "does not lie inside"):
        check_gguf(p)


def test_the_real_gguf_passes():
    real = ROOT / "cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not real.exists():
        pytest.skip("no SmolLM2 GGUF in cache/")
    meta = check_gguf(real)
    assert meta["llama.block_count"] == 30 and len(meta["tensors"]) == 272


def test_bbf_slice_and_eval_refuse_the_69_byte_gguf(tmp_path, capsys):
    p = tmp_path / "m.gguf"
    p.write_bytes(ARCH_ONLY)
    assert len(ARCH_ONLY) == 69
    (tmp_path / "t.txt").write_text("hello " * 100)
    for argv in (["slice", p, "--sparsity", "0.2", "--calib", tmp_path / "t.txt", "-o", tmp_path / "o.bbf"],
                 ["eval", p, "--text", tmp_path / "t.txt"]):
        code, _, err = cli(argv, capsys)
        assert_one_line(code, err, 2, "GGUF file has no llama.block_count")
    assert not (tmp_path / "o.bbf").exists()


# ---- 6. dtype swap --------------------------------------------------------------------------------------------
def test_interpretation_swaps_that_change_a_size_are_refused(bases, tmp_path):
    base = bases["exact-opt-f32"]
    bad = mutate(base, tmp_path, fuzz.Mutation("dtype-swap", None, "set", "float16"))
    with pytest.raises(bbformat.FormatError, match=r"section 0 \(embeddings\): word size 4, codec 'exact' writes 2"):
        bbformat.load(str(bad))


def test_float16_bfloat16_swap_is_the_documented_limit(tmp_path):
    """SPEC 7.1: a consistent rewrite of the header with its CRC recomputed is not detected (no checksum without a
    key can detect a deliberate edit). Sections stored as they are read bit for bit under the other dtype; entropy
    coded ones decode to other words (the stage's exponent layout depends on the dtype), also without an error,
    unless they record their dtype's geometry: method 2's mantissa bits, method 1's split float16 exponents."""
    desc = tiny_desc("llama", num_layers=1, hidden_size=32, vocab_size=64, widths=(24, 16, 28))
    tensors = random_slicegpt(desc, seed=4, dtype=torch.float16)
    refused = {"small": "mantissa bits", "auto": "split exponents need float16"}
    for compression in ("none", "auto", "small"):
        path = tmp_path / f"{compression}.bbf"
        bbformat.save(tensors, str(path), model=desc, compression=compression)
        base = fuzz.Base.from_bytes(compression, path.read_bytes())
        swapped = str(mutate(base, tmp_path, fuzz.Mutation("dtype-swap", None, "set", "bfloat16")))
        if compression in refused:
            with pytest.raises(bbformat.FormatError, match=refused[compression]):
                bbformat.load(swapped)
            continue
        got = bbformat.load(swapped)
        same = [torch.equal(got[n].view(torch.int16), t.view(torch.int16)) for n, t in tensors.items()]
        assert all(got[n].dtype == torch.bfloat16 for n in tensors)
        assert all(same)
    # the other way, bfloat16 -> float16: method 1's bfloat16 layout decodes to other words without an error
    tensors = random_slicegpt(desc, seed=4, dtype=torch.bfloat16)
    path = tmp_path / "bf16.bbf"
    bbformat.save(tensors, str(path), model=desc, dtype="bfloat16")
    swapped = str(mutate(fuzz.Base.from_bytes("bf16", path.read_bytes()), tmp_path,
                         fuzz.Mutation("dtype-swap", None, "set", "float16")))
    got = bbformat.load(swapped)
    assert all(got[n].dtype == torch.float16 for n in tensors)
    assert not all(torch.equal(got[n].view(torch.int16), t.view(torch.int16)) for n, t in tensors.items())
    spec = (ROOT / "SPEC.md").read_text()
    assert "### 7.1" in spec and "dtype swap" in spec


# ---- the CLI: one line, documented exit codes, BBF_DEBUG ------------------------------------------------------
def test_exit_codes_are_documented_in_help(capsys):
    for prog in (bbf_main.main, inspect_cli.main):
        with pytest.raises(SystemExit):
            prog(["--help"])
        out = capsys.readouterr().out
        assert "exit status:" in out and "BBF_DEBUG=1" in out
        for code in ("0 ", "1 ", "2 ", "3 ", "4 ", "130 "):
            assert f"\n  {code}" in out


def test_network_failure_is_one_line_naming_the_url(capsys):
    code, _, err = cli(["http://127.0.0.1:9/m.bbf", "--retries", "0"], capsys, inspect_cli.main)
    assert_one_line(code, err, 3, "http://127.0.0.1:9/m.bbf")


def test_internal_errors_are_one_line_and_bbf_debug_shows_the_traceback(raw, tmp_path, monkeypatch):
    bad = mutate(raw, tmp_path, header(("model", "num_kv_heads"), 0))
    p = subprocess.run([sys.executable, "-m", "bbformat", "inspect", str(bad)], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "num_kv_heads" in p.stderr
    p = subprocess.run([sys.executable, "-m", "bbformat", "inspect", str(bad)], capture_output=True, text=True,
                       env={**os.environ, "BBF_DEBUG": "1"})
    assert p.returncode != 0 and "Traceback" in p.stderr and "FormatError" in p.stderr
    from bbformat.cli.common import describe

    assert describe(ZeroDivisionError("x"))[0] == 4 and "internal error" in describe(ZeroDivisionError("x"))[1]
