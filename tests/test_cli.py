"""The ``edgelm`` command line: generate, chat REPL, perplexity, pull, bench.

Most tests drive the CLI with :class:`FakeModel` (the public ``Model`` API over a byte-level
"tokenizer" that echoes the prompt), in-process or in a subprocess (stdin pipe and pseudo-terminal,
with real SIGINTs); the ``real`` tests at the end run the default GGUF and compare with llama.cpp.
"""
from __future__ import annotations

import codecs
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import edgelm
from edgelm.apps import bench, bench_worker, cli
from edgelm.runtime.errors import ContextOverflowError
from edgelm.runtime.generate import GenerationStats

TESTS_DIR = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
# Runs the CLI in a fresh interpreter with edgelm.load replaced by FakeModel (see fake_main).
FAKE_LAUNCHER = [sys.executable, "-c",
                 f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import test_cli; "
                 f"sys.exit(test_cli.fake_main(sys.argv[1:]))"]


class FakeModel:
    """The public Model API over bytes: token = byte + 3, BOS = 1. ``generate`` echoes the prompt
    text one character (= one token) at a time, every ``delay`` seconds; ``logits`` are uniform."""

    n_vocab = 259
    bos_id = 1

    def __init__(self, path: Path, threads: int | None = None, n_ctx: int | None = None,
                 delay: float = 0.0, add_bos: bool = False):
        self.path, self.name, self.arch = Path(path), "fake", "fake"
        self.threads, self.n_ctx = threads or 1, n_ctx or 4096
        self.delay, self.add_bos = delay, add_bos
        self.last_stats = GenerationStats()
        self.calls: list[tuple[str, object, dict]] = []
        self.tokens_in_context = 0

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return ([self.bos_id] if add_bos and self.add_bos else []) + [b + 3 for b in text.encode()]

    def detokenize(self, ids) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def logits(self, ids) -> np.ndarray:
        self.calls.append(("logits", list(ids), {}))
        return np.zeros((len(ids), self.n_vocab), np.float32)

    def generate(self, prompt, max_tokens: int = 256, stop=None, **sampling) -> Iterator[str]:
        self.calls.append(("generate", prompt, {"max_tokens": max_tokens, "stop": stop, **sampling}))
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) > self.n_ctx:
            raise ContextOverflowError(len(ids), self.n_ctx)
        return self._echo("echo: " + self.detokenize(ids), max_tokens)

    def _echo(self, reply: str, max_tokens: int) -> Iterator[str]:
        self.last_stats = GenerationStats(prompt_tokens=len(reply), prefill_s=0.5, decode_s=1.0, ttft_s=0.25)
        for char in reply[:max_tokens]:
            time.sleep(self.delay)
            self.last_stats.generated_tokens += 1
            self.last_stats.decode_steps += 1
            yield char

    def chat_session(self, system: str | None = None) -> "FakeSession":
        return FakeSession(self, system)

    def memory_stats(self) -> dict:
        return {"rss_bytes": 3 * 2**20, "kv_bytes": 2**20, "weights_bytes": 2**21,
                "n_ctx": self.n_ctx, "tokens": self.tokens_in_context, "kv_tokens": self.tokens_in_context,
                "kv_evicted": 0, "kv_bits": 16, "kv_window": None, "n_sink": 4}


class FakeSession:
    """ChatSession over FakeModel: the reply echoes the user's text; partial replies are kept."""

    def __init__(self, model: FakeModel, system: str | None):
        self.model, self.system = model, system
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.model.tokens_in_context = 0

    def send(self, user_text: str, **sampling) -> Iterator[str]:
        self.messages.append({"role": "user", "content": user_text})
        pieces: list[str] = []
        try:
            for piece in self.model.generate(user_text, **sampling):
                pieces.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(pieces)})
            self.model.tokens_in_context += len(user_text) + len(pieces)


def fake_main(argv: list[str]) -> int:
    """``edgelm`` with edgelm.load returning a FakeModel (delay from $FAKE_DELAY)."""
    delay = float(os.environ.get("FAKE_DELAY", "0"))
    edgelm.load = lambda path, threads=None, n_ctx=None, **kv: FakeModel(path, threads, n_ctx, delay=delay)
    return cli.main(argv)


@pytest.fixture
def fake(tmp_path, monkeypatch) -> dict:
    """A dummy model file and, in-process, edgelm.load patched to return (and record) FakeModels."""
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF")
    made: list[FakeModel] = []

    def load(model, threads=None, n_ctx=None, add_bos=False, **kv):
        made.append(FakeModel(model, threads, n_ctx))
        made[-1].kv_options = kv
        return made[-1]

    monkeypatch.setattr(edgelm, "load", load)
    return {"path": str(path), "models": made}


# ---------------------------------------------------------------- generate and errors

def test_generate_streams_and_passes_only_given_flags(fake, capsys):
    rc = cli.main(["generate", "--model", fake["path"], "--temperature", "0", "--seed", "7",
                   "--max-tokens", "8", "--stop", "zz", "--stop", "Q", "--threads", "3", "Hi there"])
    assert rc == 0
    assert capsys.readouterr().out == "echo: Hi\n"  # 8 tokens of "echo: Hi there"
    model = fake["models"][0]
    assert model.threads == 3
    assert model.calls == [("generate", "Hi there",
                            {"max_tokens": 8, "temperature": 0.0, "seed": 7, "stop": ["zz", "Q"]})]


def test_generate_flushes_every_piece(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    proc = subprocess.Popen([*FAKE_LAUNCHER, "generate", "--model", str(model), "abcdefgh"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**ENV, "FAKE_DELAY": "0.15"})
    first = proc.stdout.read(1)  # "e" of "echo: ...": must arrive long before the 14 pieces end
    t_first = time.monotonic()
    rest, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert first + rest == b"echo: abcdefgh\n"
    assert time.monotonic() - t_first > 1.0


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "no-such-model", "hi"], "neither a GGUF file nor a known model"),
    (["perplexity", "--model", "{model}", "--file", "/nonexistent/text.txt"], "No such file"),
    (["generate", "--model", "{model}", "--ctx", "4", "a long prompt"], "context holds 4"),
    (["perplexity", "--model", "{model}", "--file", "{model}", "--ctx", "16"], "needs at least 32 tokens"),
    (["pull", "no-such-model"], "unknown model"),
    (["chat", "--model", "{model}", "--top-p", "3"], "top_p must be in [0, 1]"),
    (["generate", "--model", "{model}", "--max-tokens", "-2", "hi"], "--max-tokens must be >= 0"),
])
def test_user_errors_print_one_line_and_fail(fake, capsys, argv, message):
    assert cli.main([a.format(model=fake["path"]) for a in argv]) == cli.EXIT_ERROR
    if "--top-p" in argv or "--max-tokens" in argv:
        assert fake["models"] == []  # refused before loading the model
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edgelm: error:") and message in err[-1]
    assert not any(line.startswith("Traceback") for line in err)


def test_errors_in_a_real_process_have_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgelm.apps.cli", "generate", "--model",
                           str(tmp_path / "missing.gguf"), "hi"], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "missing.gguf" in proc.stderr


# ---------------------------------------------------------------- perplexity

def test_perplexity_of_uniform_model_is_vocab_size(fake, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("x" * 100)
    assert cli.main(["perplexity", "--model", fake["path"], "--file", str(text), "--ctx", "16",
                     "--chunks", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ppl"] == pytest.approx(FakeModel.n_vocab) and out["ppl_err"] == pytest.approx(0, abs=1e-9)
    assert (out["chunks"], out["ctx"], out["tokens_scored"]) == (3, 16, 3 * 7)
    assert set(out) == {"ppl", "ppl_err", "chunks", "ctx", "tokens_scored", "seconds"}
    model = fake["models"][0]
    assert model.n_ctx == 16
    assert [ids for kind, ids, _ in model.calls] == [[ord("x") + 3] * 16] * 3


def test_perplexity_text_output_and_bos_chunks(fake, tmp_path, capsys, monkeypatch):
    made = []
    monkeypatch.setattr(edgelm, "load", lambda m, threads=None, n_ctx=None, **kv: made.append(
        FakeModel(m, threads, n_ctx, add_bos=True)) or made[-1])
    text = tmp_path / "t.txt"
    text.write_text("abcdefgh" * 5)
    assert cli.main(["perplexity", "--model", fake["path"], "--file", str(text), "--ctx", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    # BOS + 40 bytes = 41 tokens = 5 chunks of 8, each starting with BOS like llama.cpp's.
    assert out[0] == "[1]259.0000,[2]259.0000,[3]259.0000,[4]259.0000,[5]259.0000,"
    assert out[1] == "Final estimate: PPL = 259.0000 +/- 0.00000"
    chunks = [ids for _, ids, _ in made[0].calls]
    assert len(chunks) == 5 and all(c[0] == FakeModel.bos_id for c in chunks)
    assert chunks[1][1:] == [b + 3 for b in b"abcdefgh"[0:7]]  # tokens 9..15: after BOS + 8 bytes


# ---------------------------------------------------------------- chat REPL

def _default_sigint() -> None:
    """In a child before exec: Ctrl-C back to its default action. A test run started in the
    background by a non-interactive shell (``cmd &``) inherits SIGINT *ignored*, exec keeps that,
    and Python then installs no KeyboardInterrupt handler -- the Ctrl-C tests would test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _chat(model_path: str, *args: str, delay: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([*FAKE_LAUNCHER, "chat", "--model", model_path, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "FAKE_DELAY": str(delay)}, preexec_fn=_default_sigint)


def test_chat_over_a_pipe(fake):
    proc = _chat(fake["path"], "--system", "be brief", "--max-tokens", "100")
    out, err = proc.communicate("hello\n\n/stats\n/reset\n/stats\n/bogus\nagain\n/quit\nnot read\n", timeout=30)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[0] == "echo: hello"
    assert lines[1].startswith("last reply: 11 prompt tokens, 11 generated;")
    assert lines[2] == ("memory: RSS 3.0 MiB, weights 2.0 MiB, KV cache 1.00 MiB (16-bit): "
                        "16 tokens held of 16 seen (context 4096), 0 evicted")
    assert lines[3] == "(conversation cleared)"
    assert lines[4] == "no reply yet"
    assert "0 tokens held of 0 seen (context 4096)" in lines[5]
    assert lines[6].startswith("unknown command '/bogus'")
    assert lines[7:] == ["echo: again"]  # /quit: the last line is never read


def test_chat_ends_at_end_of_input(fake):
    proc = _chat(fake["path"])
    out, err = proc.communicate("one\ntwo\n", timeout=30)
    assert (proc.returncode, out) == (0, "echo: one\necho: two\n")


class _Pipe:
    """A child's stdout read with timeouts: a blocking ``read`` waits forever if the text never
    comes, which hangs the whole test run instead of failing one test."""

    def __init__(self, stream):
        self.fd, self.text = stream.fileno(), ""
        self._decode = codecs.getincrementaldecoder("utf-8")().decode

    def until(self, text: str, timeout: float = 20.0) -> str | None:
        """Everything up to and including ``text`` (consumed), or None if it did not come in time."""
        deadline = time.monotonic() + timeout
        while text not in self.text:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if select.select([self.fd], [], [], left)[0]:
                chunk = os.read(self.fd, 4096)
                assert chunk, f"stream ended waiting for {text!r}; got {self.text!r}"
                self.text += self._decode(chunk)
        end = self.text.index(text) + len(text)
        seen, self.text = self.text[:end], self.text[end:]
        return seen


def test_chat_ctrl_c_stops_the_reply_then_leaves_at_the_prompt(fake):
    proc = _chat(fake["path"], delay=0.1)
    out = _Pipe(proc.stdout)
    proc.stdin.write("a rather long message to echo back\n")
    proc.stdin.flush()
    assert out.until("echo:") is not None
    proc.send_signal(signal.SIGINT)  # mid-reply: stops the reply only
    reply = out.until("[interrupted]\n")
    assert reply is not None and "rather long message" not in reply
    proc.stdin.write("next\n")
    proc.stdin.flush()
    assert out.until("echo: next\n") is not None
    time.sleep(0.3)  # let it get back to reading the next line
    proc.send_signal(signal.SIGINT)  # at the prompt: leaves cleanly
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "Traceback" not in err


class PtyChat:
    """A process on a new pseudo-terminal (its controlling tty), and everything it printed."""

    def __init__(self, argv: list[str], env: dict):
        self.pid, self.master = pty.fork()
        if self.pid == 0:  # child
            _default_sigint()
            os.execve(argv[0], argv, env)
        self.output, self.pos = b"", 0

    def expect(self, text: str, timeout: float = 30.0) -> str:
        """Wait for ``text`` after what earlier calls consumed; returns the output up to it."""
        deadline = time.monotonic() + timeout
        while (end := self.output.find(text.encode(), self.pos)) < 0:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {text!r}; got {self.output[self.pos:]!r}"
            if select.select([self.master], [], [], left)[0]:
                self.output += os.read(self.master, 1024)
        seen, self.pos = self.output[self.pos:end + len(text)], end + len(text)
        return seen.decode(errors="replace")

    def wait(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        os.close(self.master)
        return os.waitstatus_to_exitcode(status)


def test_chat_on_a_terminal(fake):
    """As a user sees it: prompt, streamed reply, Ctrl-C (typed as ^C) mid-reply, then Ctrl-D."""
    term = PtyChat([*FAKE_LAUNCHER, "chat", "--model", fake["path"]], {**ENV, "FAKE_DELAY": "0.1"})
    term.expect(">>> ")
    os.write(term.master, b"what a lovely long day it has been\r")
    term.expect("echo: w")
    os.write(term.master, b"\x03")  # the terminal turns ^C into SIGINT for the foreground process
    assert "day it has been" not in term.expect("[interrupted]")
    term.expect(">>> ")
    os.write(term.master, b"\x04")  # ^D: end of input
    assert term.wait() == 0


# ---------------------------------------------------------------- pull and bench

def test_pull_prints_the_cached_path(default_gguf, capsys):
    assert cli.main(["pull"]) == 0
    assert capsys.readouterr().out.strip() == str(default_gguf)


class CountingEngine:
    """bench_worker.Engine with scripted timings: run k takes 1 + k % 3 times the base."""

    name, version = "counting", "0"

    def __init__(self):
        self.runs = 0

    def tokenize(self, text: str) -> list[int]:
        return list(range(len(text.split())))

    def run(self, ids, n_new) -> bench_worker.RunTiming:
        slow = 1 + self.runs % 3
        self.runs += 1
        return bench_worker.RunTiming(prompt_tokens=len(ids), generated_tokens=n_new, ttft_s=0.01 * slow * len(ids),
                                      decode_steps=n_new - 1, decode_s=0.1 * slow * (n_new - 1), cpu_s=0.2 * n_new)


def test_bench_measure_keeps_the_best_of_repeats():
    engine = CountingEngine()
    runs = bench_worker.prompts(engine, "word " * 4000, 512, repeats=3)
    assert [len(p) for p in runs.prefill] == [512] * 3
    assert [len(p) for p in runs.decode] == [bench_worker.DECODE_PROMPT_TOKENS] * 3
    # Every run starts from a prompt no earlier run began with (no KV-cache prefix reuse).
    firsts = [p[0] for p in runs.prefill + runs.decode]
    assert len(set(firsts)) == 6 and runs.warmup[0] not in firsts
    m = bench_worker.measure(engine, runs, decode_tokens=11)
    assert engine.runs == 6
    assert m["prefill_tok_s"] == pytest.approx(100.0)  # 512 tokens at the fastest 0.01 s/token
    assert m["decode_tok_s"] == pytest.approx(10.0) and m["decode_tokens"] == 11
    assert m["ttft_s"] == pytest.approx(0.16) and m["cpu_s_per_token"] == pytest.approx(0.2)
    assert m["deep_decode_tok_s"] is None  # no --decode-depth


def test_bench_decode_after_a_long_prompt():
    engine = CountingEngine()
    runs = bench_worker.prompts(engine, "word " * 4000, 64, repeats=2, decode_depth=300)
    assert [len(p) for p in runs.deep] == [300, 300]
    firsts = [p[0] for p in runs.prefill + runs.decode + runs.deep]
    assert len(set(firsts)) == 6  # each deep prompt is text no other run began with
    m = bench_worker.measure(engine, runs, decode_tokens=11)
    # the deep runs are the 5th and 6th: 2x and 3x the base time; the faster one counts
    assert m["decode_depth"] == 300 and m["deep_decode_tok_s"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="--decode-depth 1000 plus --decode-tokens 128 must fit in --ctx 1024"):
        bench.BenchConfig(model=Path("m.gguf"), threads=1, decode_depth=1000)


def test_bench_table_and_json(fake, capsys, monkeypatch):
    canned = {
        "edgelm": {"version": "0.1", "prefill_tok_s": 100.0, "decode_tok_s": 50.0, "ttft_s": 0.2,
                   "cold_start_s": 30.0, "warm_start_s": 2.0, "peak_rss_bytes": 300 * 2**20,
                   "cpu_s_per_token": 0.04, "decode_tokens": 128},
        "llama.cpp": {"version": "0.3", "prefill_tok_s": 200.0, "decode_tok_s": 100.0, "ttft_s": 0.1,
                      "cold_start_s": 1.0, "warm_start_s": 1.0, "peak_rss_bytes": 200 * 2**20,
                      "cpu_s_per_token": 0.02, "decode_tokens": 128},
    }
    monkeypatch.setattr(bench, "bench_engine", lambda engine, config: dict(canned[engine]))
    monkeypatch.setattr(bench, "llama_cpp_available", lambda: True)
    assert cli.main(["bench", "--model", fake["path"], "--threads", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "2 threads" in table[0]
    assert table[2].split() == ["metric", "edgelm", "llama.cpp", "ours/theirs", "better"]
    assert table[3].split() == ["prefill", "tok/s", "100.0", "200.0", "0.50", "higher"]
    assert table[9].split() == ["peak", "RSS", "(MiB)", "300.0", "200.0", "1.50", "lower"]
    assert cli.main(["bench", "--model", fake["path"], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ratios"]["cold_start_s"] == pytest.approx(30.0) and report["note"] is None
    monkeypatch.setattr(bench, "llama_cpp_available", lambda: False)
    assert cli.main(["bench", "--model", fake["path"]]) == 0
    captured = capsys.readouterr()
    assert "llama-cpp-python is not installed" in captured.err
    assert "ours/theirs" not in captured.out and "edgelm" in captured.out


def test_bench_worker_runs_llama_cpp(default_gguf, eval_text, tmp_path):
    pytest.importorskip("llama_cpp")
    config = bench.BenchConfig(model=default_gguf, threads=1, ctx=256, prefill_tokens=64,
                               decode_tokens=8, decode_depth=128, repeats=1)
    result = bench.run_worker("llama.cpp", config, tmp_path)
    assert result["engine"] == "llama.cpp" and result["decode_tokens"] == 8
    assert result["decode_depth"] == 128 and result["deep_decode_tok_s"] > 0
    assert result["prefill_tok_s"] > 0 and result["decode_tok_s"] > 0
    assert 0 < result["startup_s"] < 60 and result["peak_rss_bytes"] > 50 * 2**20


def test_bench_worker_failure_names_the_exception(eval_text, tmp_path):
    pytest.importorskip("llama_cpp")
    config = bench.BenchConfig(model=tmp_path / "missing.gguf", threads=1)
    with pytest.raises(RuntimeError, match=r"^llama.cpp benchmark worker failed: ValueError: .*missing.gguf"):
        bench.run_worker("llama.cpp", config, tmp_path)
