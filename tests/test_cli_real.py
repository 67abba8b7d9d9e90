"""The CLI on the real default model, in-process: generate against llama.cpp's greedy text, the
chat REPL's interrupted turn, perplexity against llama.cpp's logits, streaming perplexity JSON.
(tests/test_cli.py covers the same commands on a fake model, fast.)"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

import edgelm
from edgelm.apps import chat, cli
from edgelm.runtime.perplexity import perplexity

# ---------------------------------------------------------------- the real default model
# In-process, sharing one loaded model (loading it again in a subprocess would cost a start-up
# per test); the real-signal paths are covered above with the fake.

@pytest.fixture(scope="module")
def real_model(default_gguf):
    return edgelm.load(default_gguf, n_ctx=1024)


@pytest.fixture
def use_real_model(real_model, monkeypatch):
    monkeypatch.setattr(edgelm, "load", lambda model, threads=None, n_ctx=None, **kv: real_model)
    return real_model


def test_real_generate_matches_llama_cpp_greedy(default_gguf, use_real_model, capsys):
    llama_cpp = pytest.importorskip("llama_cpp")
    prompt = "The capital of France is"
    assert cli.main(["generate", "--model", str(default_gguf), "--temperature", "0", "--max-tokens", "4", prompt]) == 0
    llm = llama_cpp.Llama(str(default_gguf), n_ctx=64, verbose=False)
    theirs = llm.create_completion(prompt, max_tokens=4, temperature=0.0, top_k=1)["choices"][0]["text"]
    # Only 4 tokens: later the two engines' quantized arithmetic can flip a near-tie (0.02 logit apart).
    assert capsys.readouterr().out == theirs + "\n" == " Paris.\n\n\n"


class WatchedInput(io.StringIO):
    """Chat input that notes when ``line`` has been read."""

    def __init__(self, text: str, line: str):
        super().__init__(text)
        self.line, self.seen = line, False

    def readline(self, *args) -> str:
        line = super().readline(*args)
        self.seen = self.seen or line == self.line
        return line


class SigintMidReply(io.StringIO):
    """Chat output that sends this process a real SIGINT ``after`` seconds into the first reply
    streamed once ``watched`` has read its line (so it lands inside the model's decode loop)."""

    def __init__(self, watched: WatchedInput, after: float):
        super().__init__()
        self.watched, self.timer = watched, threading.Timer(after, os.kill, (os.getpid(), signal.SIGINT))

    def write(self, text: str) -> int:
        if self.watched.seen and not self.timer.is_alive() and not self.timer.finished.is_set():
            self.timer.start()
        return super().write(text)


def test_real_chat_ctrl_c_keeps_the_conversation(use_real_model):
    story = "Write a long story about a dragon.\n"
    stdin = WatchedInput("What is the capital of France? Answer in one word.\n" + story +
                         "/stats\nThanks.\n/stats\n", story)
    out = SigintMidReply(stdin, after=0.3)
    # Python's own Ctrl-C handler, even if this run inherited SIGINT ignored (started with `&` by
    # a non-interactive shell), where Python installs none.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert chat.run_chat(use_real_model, sampling={"temperature": 0.0, "max_tokens": 200},
                             stdin=stdin, stdout=out) == 0
    finally:
        out.timer.cancel()  # never let a late SIGINT hit another test
        signal.signal(signal.SIGINT, previous)
    lines = out.getvalue().splitlines()
    assert "Paris" in lines[0]
    interrupted = [i for i, line in enumerate(lines) if line.endswith(" [interrupted]")]
    assert len(interrupted) == 1
    before, after = (_tokens_in_context(line) for line in lines if line.startswith("memory:"))
    assert 40 < before < 200  # the question, its answer and the partial story
    assert after > before + 5  # the next turn builds on the interrupted one


def _tokens_in_context(stats: str) -> int:
    return int(re.findall(r"(\d+) tokens held of \d+ seen", stats)[-1])


def test_real_perplexity_agrees_with_llama_cpp_logits(default_gguf, eval_text, use_real_model, capsys):
    llama_cpp = pytest.importorskip("llama_cpp")
    eval_file = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-eval.txt"
    assert cli.main(["perplexity", "--model", str(default_gguf), "--file", str(eval_file), "--ctx", "128",
                     "--chunks", "4", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    # One thread: llama.cpp's spinning thread pool slows down ~5x when the cores are shared.
    llm = llama_cpp.Llama(str(default_gguf), n_ctx=128, n_batch=128, n_threads=1, n_threads_batch=1,
                          logits_all=True, verbose=False)

    def logits_fn(ids):
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)

    theirs = perplexity(logits_fn, llm.tokenize(eval_text[:20000].encode(), add_bos=True), 128, 4)
    assert ours["tokens_scored"] == theirs.tokens_scored == 4 * 63
    # Same method and tokens; only the two engines' quantized arithmetic differs.
    assert ours["ppl"] == pytest.approx(theirs.ppl, rel=0.02)


def test_real_streaming_perplexity_json(default_gguf, tmp_path, capsys):
    """``perplexity --streaming`` through an 8-bit rolling cache: the issue's JSON fields, the text
    repeated up to --max-tokens, memory flat once the window is full."""
    text = tmp_path / "short.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    assert cli.main(["perplexity", "--model", str(default_gguf), "--file", str(text), "--streaming",
                     "--max-tokens", "2600", "--segment", "1000", "--kv-window", "60", "--kv-bits", "8",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ring = 192  # window + 128 batch slots, in whole key groups of 32
    assert out["tokens"] == 2600 and out["evicted"] == 2600 - 1 - 4 - ring  # fed, minus sinks and ring
    assert [s["start"] for s in out["segments"]] == [0, 1000, 2000]
    assert len(out["rss_mb"]) == len(out["tok_s"]) == 3 and out["kv"]["bits_k"] == 8
    assert out["ppl"] < 5  # a repeated sentence is easy once seen
    assert abs(out["rss_mb"][-1] - out["rss_mb_after_2000"]) < 20


def test_streaming_perplexity_needs_a_window_past_the_context(default_gguf, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("word " * 400, encoding="utf-8")
    assert cli.main(["perplexity", "--model", str(default_gguf), "--file", str(text), "--streaming",
                     "--max-tokens", "9000"]) == cli.EXIT_ERROR
    assert "9000" in capsys.readouterr().err
