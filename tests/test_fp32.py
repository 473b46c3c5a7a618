"""Words on a narrower grid (SPEC 12.5): float16 values in float32 words, and what `bbf encode` does with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bbformat
from bbformat.cli import main as bbf_main
from bbformat.errors import BBFError
from bbformat.grid import round_to_grid, survey, zero_mantissa_bits
from bbformat.models.slicegpt_io import load_slicegpt, save_slicegpt
from bbformat.models.synthetic import random_slicegpt, tiny_desc
from bbformat.words import to_words


def test_zero_mantissa_bits():
    w = to_words(torch.tensor([1.5, -0.75, 0.0]), "float32")
    assert zero_mantissa_bits(w, "float32") == 22
    assert zero_mantissa_bits(to_words(torch.randn(100).half().float(), "float32"), "float32") == 13
    assert zero_mantissa_bits(to_words(torch.ones(3), "float32"), "float32") == 23  # no mantissa bit at all
    assert zero_mantissa_bits(np.zeros(0, np.uint32), "float32") == 23


def test_survey_finds_the_narrowest_exact_dtype():
    x = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert survey([x.half().float()], "float32") == ("float16", 13)
    assert survey([x.bfloat16().float()], "float32") == ("bfloat16", 16)  # fits float16 too, with 3 empty bits
    assert survey([x.float()], "float32") == (None, 0)
    assert survey([x.half().float(), x.float()[:1] + 1e-4], "float32")[0] is None  # one word off the grid
    assert survey([torch.tensor([3 * 2.0 ** 16])], "float32")[0] == "bfloat16"  # beyond float16's range
    assert survey([torch.tensor([3 * 2.0 ** 16, 1 + 2.0 ** -9])], "float32")[0] is None  # neither fits both
    assert survey([x.half()], "float16") == (None, 0)  # nothing narrower than a 16-bit dtype


@pytest.mark.parametrize("dtype,bits", [("float32", 13), ("float16", 3), ("bfloat16", 2)])
def test_round_to_grid_is_round_to_nearest_even(dtype, bits):
    x = torch.randn(5000, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 3, 5000, dtype=torch.float64)
    w = to_words(x, dtype)
    r = round_to_grid(w, dtype, bits)
    assert zero_mantissa_bits(r, dtype) >= bits
    assert (r.astype(np.int64) - w.astype(np.int64)).__abs__().max() <= 1 << (bits - 1)  # nearest (sign kept)
    if dtype == "float32":  # a 13-bit cut of float32 is float16's grid: same as rounding through float16
        small = to_words(x[(x.abs() > 2.0 ** -14) & (x.abs() < 60000)].float(), dtype)  # float16 normals
        want = to_words(torch.from_numpy(small.view(np.float32).copy()).half().float(), dtype)
        assert np.array_equal(round_to_grid(small, dtype, 13), want)


def test_round_to_grid_refuses_overflow():
    with pytest.raises(BBFError, match="overflows"):
        round_to_grid(to_words(torch.tensor([65519.0]), "float16"), "float16", 3)


@pytest.fixture(scope="module")
def fp16_origin():
    """A tiny model whose float32 words are float16 values (an fp16 checkpoint saved as float32)."""
    desc = tiny_desc(num_layers=2)
    return desc, {k: v.half().float() for k, v in random_slicegpt(desc, seed=3).items()}


def test_exact_rounds_to_the_input_grid_and_stays_below_raw(fp16_origin, tmp_path):
    desc, t = fp16_origin
    sizes = {}
    for codec in ("raw", "exact"):
        path = tmp_path / f"{codec}.bbf"
        bbformat.save(t, str(path), model=desc, codec=codec, dtype="float32")
        sizes[codec] = path.stat().st_size
        got = bbformat.load(str(path))
        words = np.concatenate([to_words(v, "float32").reshape(-1) for v in got.values()])
        assert zero_mantissa_bits(words, "float32") == 13  # the canonical form kept the input's zero bits
    assert sizes["exact"] < sizes["raw"]


def test_exact_on_a_float32_grid_is_unchanged(tmp_path):
    desc = tiny_desc(num_layers=2)
    t = random_slicegpt(desc, seed=4)
    bbformat.save(t, str(tmp_path / "e.bbf"), model=desc, codec="exact", dtype="float32")
    with bbformat.BBFReader(str(tmp_path / "e.bbf")) as f:
        assert not any("grid_zero_bits" in g for g in f.header["stats"]["groups"].values())


def _encode(tmp_path, desc, tensors, capsys, *extra):
    ckpt, _ = save_slicegpt(desc, tensors, tmp_path / "m_0.25.safetensors")
    out = tmp_path / ("o" + "".join(extra).replace("-", "") + ".bbf")
    capsys.readouterr()
    assert bbf_main.main(["encode", str(ckpt), "-o", str(out), "--no-tokenizer", "-q", *extra]) == 0
    return out, capsys.readouterr().err


def test_encode_stores_float16_values_as_float16_and_says_so(fp16_origin, tmp_path, capsys):
    desc, t = fp16_origin
    out, err = _encode(tmp_path, desc, t, capsys, "--dtype", "float32", "--codec", "raw")
    assert "storing float16 words, not float32" in err
    with bbformat.BBFReader(str(out)) as f:
        assert f.dtype == "float16" and f.header["metadata"]["requested_dtype"] == "float32"
    got = bbformat.load(str(out))
    assert all(torch.equal(got[k].float(), t[k]) for k in t)  # the same values, bit for bit
    ckpt = tmp_path / "m_0.25.safetensors"
    assert bbf_main.main(["verify", str(out), "--against", str(ckpt), "-q"]) == 0  # against the float32 original
    back = tmp_path / "back_0.25.safetensors"
    assert bbf_main.main(["decode", str(out), "-o", str(back), "-q"]) == 0  # decode widens back to float32
    _, dec = load_slicegpt(back)
    assert all(dec[k].dtype == torch.float32 and torch.equal(dec[k], t[k]) for k in t)

    kept, err = _encode(tmp_path, desc, t, capsys, "--dtype", "float32", "--codec", "raw", "--keep-dtype")
    assert "low 13 mantissa bits of every float32 word are zero" in err
    with bbformat.BBFReader(str(kept)) as f:
        assert f.dtype == "float32"
    assert out.stat().st_size < kept.stat().st_size


def test_encode_warns_when_bitsback_fills_the_empty_bits(fp16_origin, tmp_path, capsys):
    desc, t = fp16_origin
    _, err = _encode(tmp_path, desc, t, capsys, "--dtype", "float32", "--codec", "bitsback", "--keep-dtype")
    assert "warning: bitsback's rotations fill them" in err


def test_encode_of_float32_weights_says_nothing(tmp_path, capsys):
    desc = tiny_desc(num_layers=2)
    out, err = _encode(tmp_path, desc, random_slicegpt(desc, seed=5), capsys, "--codec", "raw")
    assert "note:" not in err
    with bbformat.BBFReader(str(out)) as f:
        assert f.dtype == "float32" and "requested_dtype" not in f.header.get("metadata", {})
