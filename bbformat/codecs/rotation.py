"""The paper's rotation algorithms (He, Flamich, Hernandez-Lobato), on words, in float64.

* Algorithm 1, `canonical_rotation`: the rotation that makes a carrier's Gram matrix M M^T diagonal.
* Algorithm 2, `recover_rotation`: the rotation Q back from a rotated carrier M' = Q^T M_c and D sign bits.
* Algorithm 3, `rotation_from_words`: D(D+1)/2 words -> symmetric X -> (Q, lambda) by eigendecomposition.
* Algorithm 4, `words_from_rotation`: (Q, lambda) -> X = Q diag(lambda) Q^T -> the same D(D+1)/2 words.

A carrier M has its symmetry along axis 0 (shape D x m, the symmetry acts as M <- R^T M). All numerics are
float64 with numpy.linalg.eigh (LAPACK dsyevd). Every function here is total: whatever words it is given (NaN
patterns, all zeros, all ones), it returns finite numbers and never fails.

Word <-> matrix entry map (the paper's: the popped words are read as floats of the file's word dtype):
    x = the word's value as a float16 / bfloat16 / float32 number; NaN and Inf patterns count as 0
    w = x clamped to the dtype's largest finite value, rounded to float32 and then to the word dtype (to nearest,
        ties to even, both times, as torch's float64 -> float16/bfloat16 conversion does; SPEC 11.3 specifies it
        bit for bit: a correctly rounded float64 -> word conversion gives other words on rare ties)
Both directions are total and finite. (A map that spreads words uniformly over (-1, 1) is total too, but needs
30-100x more corrections: weight words cluster in two narrow bands of the word range, so X's entries are large
compared with their spacing, and the decoder's small rotation error [A, X] moves them by hundreds of word steps.)
Order of the D(D+1)/2 words of X: first the diagonal X[0,0], X[1,1], ..., X[D-1,D-1], then the strict upper
triangle row by row: X[0,1], X[0,2], ..., X[0,D-1], X[1,2], ..., X[D-2,D-1].
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - then eigenvectors may depend on the BLAS thread count (SPEC 11.9)
    threadpool_limits = None

from ..words import to_words, torch_dtype, words_to_f64

EIG_BITS = 32  # eigenvalues travel as float32 bit patterns


def n_rotation_words(D: int) -> int:
    return D * (D + 1) // 2


def n_eig_words(D: int, bits: int) -> int:
    return D * EIG_BITS // bits


def n_sign_words(D: int, bits: int) -> int:
    return -(-D // bits)


def _uint(bits: int) -> np.dtype:
    return np.dtype("<u2") if bits == 16 else np.dtype("<u4")


def serial_blas():
    """Pin BLAS/LAPACK to one thread: OpenBLAS's dsyevd returns (slightly) different eigenvectors for different
    thread counts, and the decoder must reproduce the encoder's simulation; small eigh calls are also much faster
    single-threaded on busy cores."""
    return threadpool_limits(1, user_api="blas") if threadpool_limits else contextlib.nullcontext()


# ---- the word <-> entry map --------------------------------------------------------------------------------
def entries_from_words(words: np.ndarray, dtype: str) -> np.ndarray:
    return finite(words_to_f64(words, dtype))


def words_from_entries(x: np.ndarray, dtype: str) -> np.ndarray:
    """SPEC 11.3's entry -> word map, bit for bit: NaN/Inf -> 0, clamp, round to float32, round to the word dtype.
    (The explicit float32 step is what torch's float64 -> float16/bfloat16 conversion does anyway.)"""
    big = torch.finfo(torch_dtype(dtype)).max
    return to_words(np.clip(finite(x), -big, big).astype(np.float32), dtype)


def _triu(D: int) -> tuple[np.ndarray, np.ndarray]:
    """Row/column of the D(D+1)/2 entries in word order: diagonal, then strict upper triangle row-major."""
    r, c = np.triu_indices(D, 1)
    d = np.arange(D)
    return np.concatenate([d, r]), np.concatenate([d, c])


# ---- Algorithms 3 and 4 ---------------------------------------------------------------------------------
def rotation_from_words(words: np.ndarray, D: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 3: D(D+1)/2 words -> (Q, lambda). Q's columns are X's eigenvectors, lambda ascending."""
    if words.size != n_rotation_words(D):
        raise ValueError(f"a {D}x{D} rotation needs {n_rotation_words(D)} words, got {words.size}")
    r, c = _triu(D)
    X = np.zeros((D, D))
    X[r, c] = entries_from_words(words, dtype)
    X[c, r] = X[r, c]
    lam, Q = np.linalg.eigh(X)
    return Q, lam


def words_from_rotation(Q: np.ndarray, lam: np.ndarray, dtype: str) -> np.ndarray:
    """Algorithm 4: X = Q diag(lambda) Q^T -> its diagonal and upper triangle as words (Algorithm 3's order)."""
    X = (Q * lam) @ Q.T
    r, c = _triu(Q.shape[0])
    return words_from_entries(X[r, c], dtype)


# ---- side information: eigenvalues and signs ------------------------------------------------------------
def eig_to_words(lam: np.ndarray, bits: int) -> np.ndarray:
    """D eigenvalues -> float32 little-endian bit patterns, as 2 uint16 words each (low half first) or 1 uint32."""
    return np.ascontiguousarray(lam, dtype="<f4").view(_uint(bits)).copy()


def eig_from_words(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `eig_to_words`; NaN/Inf patterns (only in a corrupt message) count as 0."""
    lam = np.ascontiguousarray(words, dtype=_uint(bits)).view("<f4").astype(np.float64)
    return np.where(np.isfinite(lam), lam, 0.0)


def signs_to_words(signs: np.ndarray, bits: int) -> np.ndarray:
    """D signs (+-1) -> bits (1 means -1); bit r goes to word r // b at bit r % b (LSB first), padding 0."""
    D = signs.size
    neg = np.zeros(n_sign_words(D, bits) * bits, np.uint64)
    neg[:D] = signs < 0
    weights = np.uint64(1) << np.arange(bits, dtype=np.uint64)
    return (neg.reshape(-1, bits) * weights).sum(axis=1).astype(_uint(bits))


def signs_from_words(words: np.ndarray, D: int, bits: int) -> np.ndarray:
    w = words.astype(np.uint64)[:, None]
    neg = (w >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)
    return np.where(neg.reshape(-1)[:D] == 1, -1.0, 1.0)


# ---- Algorithms 1 and 2 ---------------------------------------------------------------------------------
def finite(M: np.ndarray) -> np.ndarray:
    """Non-finite entries (only in a corrupt message) count as 0."""
    return np.where(np.isfinite(M), M, 0.0)


def gram_eigvecs(M: np.ndarray) -> np.ndarray:
    """Eigenvectors of G = M M^T as ROWS, ordered by descending eigenvalue (signs as LAPACK returns them)."""
    M = finite(M)  # |entries| < 2^128, so G cannot overflow float64
    _, vec = np.linalg.eigh(M @ M.T)
    return np.ascontiguousarray(vec[:, ::-1].T)


def canonical_rotation(M: np.ndarray) -> np.ndarray:
    """Algorithm 1 for one carrier: U with M M^T = U diag(desc) U^T; each column's largest-|entry| positive.

    Applied as M <- U^T M, the carrier's rows become its principal directions in descending order."""
    U = gram_eigvecs(M).T
    big = U[np.abs(U).argmax(axis=0), np.arange(U.shape[1])]
    return U * np.where(big < 0, -1.0, 1.0)


def row_signs(Q: np.ndarray) -> np.ndarray:
    """sign(sum of each row), with sign(0) = +1."""
    return np.where(Q.sum(axis=1) < 0, -1.0, 1.0)


def recover_rotation(M_rot: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """Algorithm 2: from M' = Q^T M_c (M_c canonical) and the signs s, Q' ~ Q; then M_c ~ Q' M'."""
    E = gram_eigvecs(M_rot)
    return E * (row_signs(E) * signs)[:, None]


def choose_signs(Q: np.ndarray, M_rot: np.ndarray) -> tuple[np.ndarray, int]:
    """The paper's s_r = sign(sum(Q_r)), flipped where the decoder's row r (`recover_rotation` on exactly
    M_rot) would still come out as -Q_r (row sums near 0). Returns (signs, number of flips)."""
    s = row_signs(Q)
    flip = np.einsum("ij,ij->i", recover_rotation(M_rot, s), Q) < 0
    return np.where(flip, -s, s), int(flip.sum())
