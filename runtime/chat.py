"""A multi-turn conversation that never re-reads its history.

Each turn renders the whole conversation with the model's chat template, but only the text
added since the previous turn is tokenized and evaluated: the KV cache already holds the
earlier turns -- including the assistant's replies as the exact tokens that were sampled, which
re-tokenizing their text would not always reproduce.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from .model import Model


class ChatSession:
    """``send`` a user message, stream the reply; the history and its KV cache persist."""

    def __init__(self, model: "Model", system: str | None = None):
        self.model = model
        self.system = system
        self.messages: list[dict[str, str]] = []
        self._ids: list[int] = []       # tokens of the conversation so far (as cached)
        self._text = ""                 # the rendered text those tokens stand for
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (keeps the system prompt)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self._ids, self._text = [], ""

    def _prompt_ids(self) -> list[int]:
        """Token ids of the conversation plus the assistant prompt, reusing those already known."""
        text = self.model.template.render(self.messages, add_generation_prompt=True)
        if self._ids and text.startswith(self._text):
            new = self.model.tokenize(text[len(self._text):], add_bos=False, special=True)
            return self._ids + new
        # The template rewrote earlier turns (e.g. stripped a reply): tokenize it all; the
        # model still reuses whatever prefix of the cache matches.
        return self.model.tokenize(text, add_bos=True, special=True)

    def send(self, user_text: str, **sampling: Any) -> Iterator[str]:
        """Append a user message and stream the assistant's reply.

        Closing the generator early (Ctrl-C in the REPL) keeps the partial reply in the history.
        """
        self.messages.append({"role": "user", "content": user_text})
        try:
            ids = self._prompt_ids()
            stream = self.model.generate(ids, **sampling)
        except Exception:  # e.g. ContextOverflowError: the turn never happened
            self.messages.pop()
            raise
        pieces: list[str] = []
        try:
            for piece in stream:
                pieces.append(piece)
                yield piece
        finally:
            stream.close()
            reply = "".join(pieces)
            self.messages.append({"role": "assistant", "content": reply})
            # What the cache now holds: the prompt and the reply's tokens (minus the final sampled
            # token, which was never evaluated). Remember them for the next turn.
            history = list(self.model._history)
            if history[: len(ids)] == ids:
                self._ids = history
                base = self.model.template.render(self.messages[:-1], add_generation_prompt=True)
                self._text = base + self.model.detokenize(history[len(ids):])
            else:
                self._ids, self._text = [], ""

    def stats(self) -> dict[str, Any]:
        """The last reply's speed and the model's memory figures."""
        s = self.model.last_stats
        return {
            "prompt_tokens": s.prompt_tokens,
            "cached_tokens": s.cached_tokens,
            "generated_tokens": s.generated_tokens,
            "prefill_tok_s": s.prefill_tok_s,
            "decode_tok_s": s.decode_tok_s,
            "ttft_s": s.ttft_s,
            "cpu_s_per_token": s.cpu_s_per_token,
            **self.model.memory_stats(),
        }

