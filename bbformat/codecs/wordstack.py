"""A message as a stack of fixed-width words (craystack-style push/pop, but fixed-length and strict).

Bits-back coding needs a message it can both read from (pop) and write to (push). Here every symbol is one
fixed-width word (uint16 for float16/bfloat16 files, uint32 for float32), so a numerical error in one word
never shifts the rest of the stream. `push(words)` appends an array in order; `pop(n)` removes the last n
words and returns them in the order they were pushed, so `push(a); pop(len(a))` gives back `a`.
Popping more words than the stack holds raises: a reader never invents bits.
"""

from __future__ import annotations

import numpy as np

from ..errors import FormatError


class StackUnderflowError(FormatError):
    """A pop asked for more words than the message holds (a short or inconsistent section)."""


class WordStack:
    def __init__(self, dtype, words: np.ndarray | None = None):
        self.dtype = np.dtype(dtype)
        self._buf = np.zeros(1024, self.dtype)
        self._n = 0
        if words is not None:
            self.push(words)

    def __len__(self) -> int:
        return self._n

    def push(self, words: np.ndarray) -> None:
        w = np.asarray(words)
        if w.dtype != self.dtype:
            raise TypeError(f"pushing {w.dtype} words onto a {self.dtype} stack")
        w = w.reshape(-1)
        need = self._n + w.size
        if need > self._buf.size:  # amortised doubling
            grown = np.zeros(max(need, 2 * self._buf.size), self.dtype)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n: need] = w
        self._n = need

    def pop(self, n: int) -> np.ndarray:
        if n < 0:
            raise ValueError(f"cannot pop {n} words")
        if n > self._n:
            raise StackUnderflowError(f"message underflow: popping {n} words from a stack of {self._n}")
        self._n -= n
        return self._buf[self._n: self._n + n].copy()

    def words(self) -> np.ndarray:
        """The whole message, bottom (first pushed) to top."""
        return self._buf[: self._n].copy()
