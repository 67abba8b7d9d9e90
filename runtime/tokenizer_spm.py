"""SentencePiece-style segmentation (``tokenizer.ggml.model == "llama"``), identical to llama.cpp's.

llama.cpp does not run SentencePiece itself: it escapes spaces to U+2581, starts from single code
points and repeatedly merges the adjacent pair whose concatenation is the highest-scoring
vocabulary entry (leftmost on ties). A final symbol that is not a vocabulary entry falls back to
``<0xNN>`` byte tokens. Reproducing that algorithm (rather than driving the sentencepiece library,
which normalizes text and treats control/unused pieces differently) is what guarantees the same ids.
"""
from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

SPACE_ESCAPE = "\u2581"


class MissingByteToken(ValueError):
    """Text needs a byte-fallback token that the vocabulary does not have."""


class SPMSegmenter:
    """Encodes raw text fragments to ids and renders NORMAL tokens back to bytes."""

    def __init__(
        self,
        token_to_id: Mapping[str, int],
        scores: Sequence[float],
        add_space_prefix: bool,
    ):
        self._token_to_id = token_to_id
        self._scores = scores
        self._add_space_prefix = add_space_prefix
        self._byte_ids: dict[int, int] = {}

    def encode_fragments(self, fragments: Sequence[str | int]) -> list[int]:
        """Token ids for a partitioned text: strings are segmented, ints are special tokens."""
        out: list[int] = []
        # llama.cpp adds the dummy-prefix space to the first text fragment and to every fragment
        # that follows a special token, mirroring SentencePiece encoding each piece separately.
        after_special = True
        for fragment in fragments:
            if isinstance(fragment, int):
                out.append(fragment)
                after_special = True
                continue
            text = " " + fragment if self._add_space_prefix and after_special else fragment
            self._segment(text.replace(" ", SPACE_ESCAPE), out)
            after_special = False
        return out

    def _segment(self, text: str, out: list[int]) -> None:
        n = len(text)
        if n == 0:
            return
        vocab = self._token_to_id
        scores = self._scores
        # Symbols are contiguous runs of code points: start offset, length (0 once merged away)
        # and a doubly linked list over the survivors.
        length = [1] * n
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list[tuple[float, int, int, int]] = []

        def try_pair(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            size = length[left] + length[right]
            tid = vocab.get(text[left : left + size])
            if tid is not None:
                # heapq is a min-heap: negate the score; equal scores pop the leftmost pair.
                heapq.heappush(heap, (-scores[tid], left, right, size))

        for i in range(1, n):
            try_pair(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            # Stale entry: one side was merged away, or the right symbol grew since the push.
            if length[left] == 0 or length[right] == 0 or length[left] + length[right] != size:
                continue
            length[left] = size
            length[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            try_pair(prev[left], left)
            try_pair(left, nxt[left])

        i = 0
        while i != -1:
            piece = text[i : i + length[i]]
            tid = vocab.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                # Only unmerged single code points can miss the vocabulary (every merge result
                # is an entry), so the byte fallback covers exactly one character's UTF-8.
                out.extend(self._byte_token(b) for b in piece.encode("utf-8"))
            i = nxt[i]

    def _byte_token(self, byte: int) -> int:
        tid = self._byte_ids.get(byte)
        if tid is None:
            tid = self._token_to_id.get(f"<0x{byte:02X}>")
            if tid is None and byte < 0x80:
                tid = self._token_to_id.get(chr(byte))  # llama.cpp's second chance
            if tid is None:
                raise MissingByteToken(
                    f"the vocabulary has no byte-fallback token <0x{byte:02X}> for unknown text"
                )
            self._byte_ids[byte] = tid
        return tid

    @staticmethod
    def normal_piece(text: str) -> bytes:
        """Bytes of a NORMAL token: U+2581 stands for a space."""
        return text.replace(SPACE_ESCAPE, " ").encode("utf-8")
