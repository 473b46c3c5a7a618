"""Word grids: the float grid a checkpoint's values actually live on (SPEC 12.5).

A float32 checkpoint made from float16 or bfloat16 weights holds words whose low 13 or 16 mantissa bits are zero.
Kept as float32 those bits cost space: the entropy stage codes them as byte planes of zeros, and a symmetry
codec's rotations fill them with rounding noise (SmolLM2 25 %: `exact` 79.8 % of the float32 array layout, `raw`
45.6 %). Two remedies:
* `survey` finds that every value converts exactly to float16 (or bfloat16): `bbf encode` stores that dtype.
* `zero_mantissa_bits` + `round_to_grid`: words kept in their dtype; `exact` rounds its canonical words to the
  grid of its input (the same zero low bits), so its file stays below `raw`'s.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from .errors import BBFError
from .words import to_words, torch_dtype, word_bits

MANTISSA_BITS = {"float16": 10, "bfloat16": 7, "float32": 23}
# Narrower dtypes a file dtype's values may all fit, fewest mantissa bits first: bfloat16 values of moderate size
# also fit float16, which would keep 3 empty mantissa bits per word.
NARROWER = {"float32": ("bfloat16", "float16")}


def zero_mantissa_bits(words: np.ndarray, dtype: str) -> int:
    """How many low mantissa bits are zero in every word (all of them for an empty or all-zero-mantissa array)."""
    m = MANTISSA_BITS[dtype]
    acc = int(np.bitwise_or.reduce(words.reshape(-1))) & ((1 << m) - 1) if words.size else 0
    return m if acc == 0 else (acc & -acc).bit_length() - 1


def round_to_grid(words: np.ndarray, dtype: str, bits: int) -> np.ndarray:
    """Round each word's magnitude to nearest (ties to even) at mantissa bit `bits`: low `bits` bits become zero.

    On the word's magnitude bits (exponent and mantissa as one integer, monotone in |x|) a carry out of the
    mantissa steps correctly into the next binade. BBFError if a value rounds up to infinity."""
    if bits <= 0:
        return words
    m, nbits = MANTISSA_BITS[dtype], word_bits(dtype)
    if bits > m:
        raise BBFError(f"cannot round {dtype} words at bit {bits}: they have {m} mantissa bits")
    wt = words.dtype.type
    sign = words & wt(1 << (nbits - 1))
    mag = words ^ sign
    lsb = (mag >> wt(bits)) & wt(1)
    mag = ((mag + wt((1 << (bits - 1)) - 1) + lsb) >> wt(bits)) << wt(bits)  # no wrap: mag < 2^(nbits-1)
    inf = ((1 << (nbits - 1 - m)) - 1) << m
    if (mag >= wt(inf)).any():
        raise BBFError(f"a {dtype} value overflows when rounded to {m - bits} mantissa bits")
    return mag | sign


def _fits(x: torch.Tensor, narrow: str, dtype: str, words: np.ndarray) -> bool:
    if x.dtype == torch_dtype(narrow):
        return True
    return np.array_equal(words, to_words(x.to(torch_dtype(narrow)), dtype))


def survey(tensors: Iterable[torch.Tensor], dtype: str) -> tuple[str | None, int]:
    """One pass over a model's tensors, as `dtype` words: (the first dtype of NARROWER[dtype] that holds every
    value exactly, else None; how many low mantissa bits are zero in every word). A value beyond the narrow range
    never fits, nor a NaN whose payload would change."""
    fits, bits = list(NARROWER.get(dtype, ())), MANTISSA_BITS[dtype]
    for x in tensors:
        words = to_words(x, dtype)
        bits = min(bits, zero_mantissa_bits(words, dtype))
        fits = [n for n in fits if _fits(x, n, dtype, words)]
    return (fits[0] if fits else None), bits
