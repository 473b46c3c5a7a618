"""Words: the fixed-width bit patterns a .bbf stores (float16, bfloat16 or float32).

Everything below the model layer handles weights as numpy arrays of unsigned words (uint16 or uint32), so the
container, the codecs and the entropy stage never depend on how a float is interpreted. Conversion to and from
torch tensors happens only here.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import BBFError

# name -> (torch dtype, numpy word dtype, bits)
WORD_DTYPES: dict[str, tuple[torch.dtype, type, int]] = {
    "float16": (torch.float16, np.uint16, 16),
    "bfloat16": (torch.bfloat16, np.uint16, 16),
    "float32": (torch.float32, np.uint32, 32),
}
_SIGNED = {16: torch.int16, 32: torch.int32}


def check_dtype(name: str) -> str:
    if name not in WORD_DTYPES:
        raise BBFError(f"unknown word dtype {name!r}; expected one of {sorted(WORD_DTYPES)}")
    return name


def word_np_dtype(name: str) -> np.dtype:
    return np.dtype(WORD_DTYPES[check_dtype(name)][1])


def word_bits(name: str) -> int:
    return WORD_DTYPES[check_dtype(name)][2]


def torch_dtype(name: str) -> torch.dtype:
    return WORD_DTYPES[check_dtype(name)][0]


def dtype_name(dtype: torch.dtype) -> str:
    for name, (td, _, _) in WORD_DTYPES.items():
        if td == dtype:
            return name
    raise BBFError(f"unsupported tensor dtype {dtype}; expected float16, bfloat16 or float32")


def to_words(x, dtype: str) -> np.ndarray:
    """Round a tensor or array (any float dtype) to `dtype` and return its words, same shape.

    torch rounds float64 to float16/bfloat16 through float32 (to nearest even, twice): SPEC 11.3's conversion,
    which bitsback's decoder must reproduce bit for bit (tests/test_spec.py)."""
    td, _, bits = WORD_DTYPES[check_dtype(dtype)]
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    t = t.detach().to("cpu").to(td).contiguous()
    return t.view(_SIGNED[bits]).numpy().view(word_np_dtype(dtype))


def from_words(words: np.ndarray, dtype: str) -> torch.Tensor:
    """Words -> torch tensor of `dtype` (shares memory with `words` when possible)."""
    td, _, bits = WORD_DTYPES[check_dtype(dtype)]
    w = np.ascontiguousarray(words, dtype=word_np_dtype(dtype))
    if not w.flags.writeable:  # torch tensors must own writable memory
        w = w.copy()
    return torch.from_numpy(w.view(np.int16 if bits == 16 else np.int32)).view(td)


def words_to_f64(words: np.ndarray, dtype: str) -> np.ndarray:
    """Words -> float64 values (for numerics and error checks)."""
    return from_words(words, dtype).to(torch.float64).numpy()
