"""Greedy text from llama.cpp (llama-cpp-python) next to edgelm's, for the agreement tests."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def llama_cpp_greedy(ref, ids: list[int], eog_ids: frozenset[int], max_tokens: int) -> list[int]:
    """Tokens llama.cpp picks greedily after ``ids`` (a ``Llama`` made with ``logits_all=True``)."""
    ref.reset()
    ref.eval(ids)
    out: list[int] = []
    for _ in range(max_tokens):
        tok = int(np.argmax(ref.scores[ref.n_tokens - 1]))
        if tok in eog_ids:
            break
        out.append(tok)
        ref.eval([tok])
    return out


def common_prefix(a: str, b: str) -> int:
    """Characters ``a`` and ``b`` share from the start."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def greedy_agreement(ours, ref, prompts: Sequence[str], max_tokens: int) -> tuple[int, list[int]]:
    """(continuations identical, characters in common per prompt) of edgelm's and llama.cpp's
    greedy continuations of ``prompts``; both engines must tokenize each prompt alike."""
    same, prefixes = 0, []
    for prompt in prompts:
        ids = ours.tokenize(prompt, special=True)
        assert ids == ref.tokenize(prompt.encode(), add_bos=True, special=True)
        expected = ours.detokenize(llama_cpp_greedy(ref, ids, ours.tokenizer.eog_ids, max_tokens))
        got = "".join(ours.generate(ids, max_tokens=max_tokens, temperature=0.0))
        same += got == expected
        prefixes.append(common_prefix(got, expected))
    return same, prefixes
