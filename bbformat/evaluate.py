"""Perplexity of a causal LM on a token stream, with fixed-size windows.

With stride == ctx the windows do not overlap (SliceGPT's evaluation): each window predicts its own tokens 2..ctx
from the tokens before them inside the window. With stride < ctx every window only scores the tokens the previous
window did not, using up to ctx - 1 tokens of context (the Hugging Face sliding-window recipe).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import BBFError


def tokenize_text(tokenizer, path, max_tokens: int | None = None) -> torch.Tensor:
    """The token ids (1-D LongTensor) of a UTF-8 text file, tokenised in one piece with the tokenizer's own
    special-token convention (a BOS first if it adds one)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BBFError(f"cannot read text file {path}: {e}") from None
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    return ids[:max_tokens] if max_tokens is not None else ids


def _windows(n: int, ctx: int, stride: int):
    """(begin, end, first scored position) of each window; together they score positions 1..n-1 once."""
    scored_to, begin = 1, 0
    while scored_to < n:
        end = min(begin + ctx, n)
        yield begin, end, max(begin + 1, scored_to)
        scored_to = end
        begin += stride


@torch.inference_mode()
def perplexity(model_or_logits_fn, token_ids: torch.Tensor, ctx: int = 512, stride: int = 512,
               max_tokens: int | None = None, progress: bool = True) -> float:
    """exp(mean NLL) over every predicted token of `token_ids`.

    `model_or_logits_fn(ids[1, T])` returns logits [1, T, V] or an object with `.logits` (a Hugging Face model).
    """
    if not 0 < stride <= ctx:
        raise BBFError(f"need 0 < stride <= ctx, got stride {stride}, ctx {ctx}")
    ids = torch.as_tensor(token_ids).long().reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise BBFError("need at least two tokens to measure perplexity")
    wins = list(_windows(ids.numel(), ctx, stride))
    nll, count = 0.0, 0
    for begin, end, first in tqdm(wins, desc="perplexity", unit="window", disable=not progress):
        out = model_or_logits_fn(ids[None, begin:end])
        logits = getattr(out, "logits", out)[0, first - begin - 1: end - begin - 1].float()
        nll += F.cross_entropy(logits, ids[first:end], reduction="sum").item()
        count += end - first
    return math.exp(nll / count)
