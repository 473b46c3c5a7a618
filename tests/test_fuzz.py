"""Fuzzing the reader (SPEC section 7): every mutant of a valid file is refused with a BBFError or read with exactly
the original data. The engine is bbformat/fuzz.py; tools/fuzz.py runs it with a larger budget.

Two parts: the structured sweep (every field of the preamble, the footer, every index record and every header
value set to extreme values, every section boundary truncated, shifted and damaged) and hypothesis-drawn mutations
of every kind. Budget: under a minute on 2 cores.
"""

from __future__ import annotations

import collections

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bbformat import fuzz
from bbformat.container import schema


@pytest.fixture(scope="module")
def bases() -> dict[str, fuzz.Base]:
    return {name: fuzz.Base.from_bytes(name, data) for name, data in fuzz.base_files().items()}


def check(results: list[tuple[fuzz.Mutation, fuzz.Result]]) -> collections.Counter:
    counts = collections.Counter(r.outcome for _, r in results)
    failures = [(str(m), r.outcome, r.detail[:500]) for m, r in results if r.outcome.startswith("FAIL")]
    assert not failures, f"{len(failures)} failures, e.g.\n" + "\n".join(map(str, failures[:5]))
    return counts


def test_the_engine_rebuilds_the_base_files_exactly(bases):
    for base in bases.values():
        assert fuzz.assemble(base.data[:16], base.sections, base.records, base.header_bytes) == base.data
        assert fuzz.run(fuzz.Mutation("header", (), "set", base.header), base).outcome == "identical"


@pytest.mark.parametrize("name", ["raw-opt-f16", "exact-llama-bf16", "bitsback-llama-f16", "exact-opt-f32",
                                  "tied-llama-f16"])
def test_structured_sweep(bases, name):
    """Every field, every header value, every boundary: refused with a BBFError or read identically."""
    base = bases[name]
    mutations = fuzz.sweep(base)
    counts = check([(m, fuzz.run(m, base)) for m in mutations])
    assert sum(counts.values()) == len(mutations) > 3000
    # the sweep reaches every layer of checks, and many mutants are harmless (reserved fields, metadata, ...)
    for outcome in ("FormatError", "ChecksumError", "TruncatedError", "VersionError", "UnknownCodecError",
                    "identical"):
        assert counts[outcome] > 0, (outcome, counts)


@st.composite
def mutations(draw, base: fuzz.Base) -> fuzz.Mutation:
    kind = draw(st.sampled_from(fuzz.KINDS))
    n = len(base.data)
    if kind == "bytes":
        op = draw(st.sampled_from(("flip", "overwrite", "insert", "delete", "truncate", "append")))
        pos = draw(st.sampled_from(base.boundaries) | st.integers(0, n))
        if op == "delete":
            return fuzz.Mutation(kind, pos, op, draw(st.integers(1, n)))
        return fuzz.Mutation(kind, pos, op, draw(st.binary(min_size=1, max_size=64)))
    if kind in ("preamble", "footer", "index"):
        table = {"preamble": fuzz.PREAMBLE_FIELDS, "footer": fuzz.FOOTER_FIELDS, "index": fuzz.RECORD_FIELDS}[kind]
        name, off, size, signed = draw(st.sampled_from(table))
        rec = draw(st.integers(0, len(base.records) - 1)) if kind == "index" else 0
        value = draw(st.integers(0, (1 << 8 * size) - 1) | st.sampled_from(fuzz.field_values(size, signed, 0)))
        return fuzz.Mutation(kind, (rec, name), "set", value, fix_crc=draw(st.booleans()))
    if kind == "header":
        path = draw(st.sampled_from(base.paths))
        op = draw(st.sampled_from(("set", "set", "set", "delete", "insert"))) if path else "set"
        leaf = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8) | \
            st.binary(max_size=8) | st.sampled_from(fuzz.HOSTILE)
        value = draw(leaf | st.lists(leaf, max_size=3) | st.dictionaries(st.text(max_size=4), leaf, max_size=2))
        return fuzz.Mutation(kind, path, op, value)
    if kind == "header-bytes":
        return fuzz.Mutation(kind, draw(st.integers(0, len(base.header_bytes))),
                             draw(st.sampled_from(("flip", "truncate", "insert"))), draw(st.integers(0, 255)))
    if kind == "section":
        i = draw(st.integers(0, len(base.sections) - 1))
        op = draw(st.sampled_from(("flip", "overwrite", "truncate", "insert", "zeros")))
        return fuzz.Mutation(kind, i, op, (draw(st.integers(0, 1 << 20)), draw(st.binary(min_size=1, max_size=32))))
    if kind == "swap":
        i, j = draw(st.lists(st.integers(0, len(base.sections) - 1), min_size=2, max_size=2, unique=True))
        return fuzz.Mutation(kind, (i, j), "swap")
    return fuzz.Mutation(kind, None, "set", draw(st.sampled_from(("float16", "bfloat16", "float32", "int8"))))


@settings(max_examples=1500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_hypothesis_mutations(bases, data):
    base = bases[data.draw(st.sampled_from(sorted(bases)))]
    m = data.draw(mutations(base))
    r = fuzz.run(m, base)
    assert not r.outcome.startswith("FAIL"), f"{m}: {r.outcome} {r.detail[:800]}"


def test_the_oracle_can_fail(bases, monkeypatch):
    """The fuzzer is not vacuous: with a check removed from the schema it reports the crash, and with the section
    CRC ignored it reports the silent corruption."""
    base = bases["raw-opt-f16"]
    monkeypatch.setattr(schema, "_aux", lambda aux: aux)
    r = fuzz.run(fuzz.Mutation("header", ("aux", 0), "set", "x"), base)
    assert r.outcome == "FAIL-TypeError" and "Traceback" in r.detail
    monkeypatch.undo()
    from bbformat.container import reader

    real, (off, slen, crc) = reader.crc32, (base.records[0][5], base.records[0][6], base.records[0][8])
    monkeypatch.setattr(reader, "crc32", lambda b: crc if len(b) == slen else real(b))  # section 0 always "matches"
    outcomes = {fuzz.run(fuzz.Mutation("bytes", off + slen - k, "flip", b"\x01"), base).outcome for k in (1, 5, 9)}
    assert "FAIL-silent" in outcomes, outcomes
