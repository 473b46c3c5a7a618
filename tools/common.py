"""Shared by the tools/ scripts: the real SmolLM2-135M, sliced once per sparsity and cached, and table output."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "cache"
GGUF = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = CACHE / "hamlet_gut.txt"
EVAL_TOKENS = 20480  # evaluation: the first 20,480 tokens of Hamlet; calibration: the tokens after them
CALIB_SAMPLES, CALIB_LEN = 32, 512


def ensure_assets() -> None:
    if not GGUF.exists() or not TEXT.exists():
        subprocess.run([str(ROOT / "tools" / "fetch_assets.sh")], check=True, stdout=subprocess.DEVNULL)


def hamlet_ids(tokenizer) -> torch.Tensor:
    from bbformat.evaluate import tokenize_text

    return tokenize_text(tokenizer, TEXT)


def sliced_smollm2(sparsity: float, log=print, canonical: bool = True):
    """(desc, float32 tensors, tokenizer) of SmolLM2-135M sliced at `sparsity`, cached under cache/sliced/.

    `canonical=False` keeps SliceGPT's own PCA orientation (what a SliceGPT checkpoint holds)."""
    from bbformat.models.hf import load_hf
    from bbformat.models.slicegpt_io import load_slicegpt, save_slicegpt
    from bbformat.models.slicer import slice_model

    ensure_assets()
    form = "" if canonical else "-pca"
    path = CACHE / "sliced" / f"smollm2-135m{form}_{sparsity:.2f}.safetensors"
    model, tokenizer, _ = load_hf(GGUF)
    if path.exists():
        desc, tensors = load_slicegpt(path)
        return desc, tensors, tokenizer
    ids = hamlet_ids(tokenizer)
    n = CALIB_SAMPLES * CALIB_LEN
    calib = ids[EVAL_TOKENS: EVAL_TOKENS + n].reshape(CALIB_SAMPLES, CALIB_LEN)
    t0 = time.perf_counter()
    desc, tensors = slice_model(model, calib, sparsity, dtype=torch.float32, progress=False, canonical=canonical)
    log(f"sliced SmolLM2-135M at {sparsity:.0%} in {time.perf_counter() - t0:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_slicegpt(desc, tensors, path)
    return desc, tensors, tokenizer


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, title, format spec)."""
    head = "| " + " | ".join(t for _, t, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("—" if v is None else (format(v, fmt) if fmt else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str | None, data) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=1))
