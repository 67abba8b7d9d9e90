"""The chat REPL behind ``edgelm chat``: streamed replies over one KV-cache-reusing chat session.

Commands: ``/reset`` forgets the conversation, ``/stats`` prints the last reply's speed and the
memory in use, ``/quit`` (or end of input) leaves. Ctrl-C during a reply stops that reply (the
partial reply stays in the history, as ``ChatSession.send`` documents) and returns to the prompt;
Ctrl-C at the prompt leaves cleanly.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Generator, TextIO

from ..runtime.errors import ContextOverflowError
from ..runtime.governor import UsageMeter, energy_report

if TYPE_CHECKING:
    from ..runtime.chat import ChatSession
    from ..runtime.generate import GenerationStats
    from ..runtime.model import Model

PROMPT = ">>> "
HELP = "commands: /reset (forget the conversation), /stats (speed and memory), /quit (or Ctrl-D)"
MIB = 1024 * 1024


def format_generation_stats(stats: "GenerationStats") -> str:
    """One line of a ``GenerationStats``: token counts, prefill/decode speed, time to first token."""
    return (f"{stats.prompt_tokens} prompt tokens, {stats.generated_tokens} generated; "
            f"prefill {stats.prefill_tok_s:.1f} tok/s, decode {stats.decode_tok_s:.1f} tok/s, "
            f"first token after {stats.ttft_s:.3f} s, {stats.cpu_s_per_token:.4f} CPU-s/token"
            + format_spec_stats(stats))


def format_spec_stats(stats: "GenerationStats") -> str:
    """"; speculative: ..." when drafts were verified in the last reply, else ""."""
    sp = stats.spec
    if not sp.rounds:
        return ""
    return (f"; speculative: {sp.accepted}/{sp.drafted} drafts accepted ({sp.acceptance_rate:.0%}), "
            f"{sp.mean_accepted:.2f} per round, {sp.self_rounds} self + {sp.lookup_rounds} lookup rounds")


def format_energy(report: dict | str) -> str:
    """One line of ``governor.energy_report``: joules per token and the counter, or why not."""
    if isinstance(report, str):
        return f"energy: {report}"
    per = report["joules_per_token"]
    return f"energy: {report['joules']:.2f} J, {'-' if per is None else f'{per:.4f}'} J/token ({report['counter']})"


def format_memory_stats(mem: dict) -> str:
    """One line of ``Model.memory_stats()``."""
    window = mem.get("kv_window")
    room = f"window {window} + {mem['n_sink']} sinks" if window else f"context {mem['n_ctx']}"
    return (f"RSS {mem['rss_bytes'] / MIB:.1f} MiB, weights {mem['weights_bytes'] / MIB:.1f} MiB, "
            f"KV cache {mem['kv_bytes'] / MIB:.2f} MiB ({mem['kv_bits']}-bit): {mem['kv_tokens']} tokens held "
            f"of {mem['tokens']} seen ({room}), {mem['kv_evicted']} evicted")


def run_chat(model: "Model", system: str | None = None, sampling: dict[str, Any] | None = None,
             stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Run the REPL on ``model`` until /quit, end of input or Ctrl-C at the prompt; returns 0."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    sampling = sampling or {}
    interactive = stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input(); only on a terminal)
        print(f"edgelm chat with {model.name}. {HELP}", file=stdout)
    session = model.chat_session(system)
    replied = False  # until the first reply, model.last_stats is not this conversation's
    meter = UsageMeter()  # energy of each reply, where the machine has a counter
    last_energy: dict | str = "not measured"
    while True:
        try:
            line = _read_line(stdin, interactive)
        except KeyboardInterrupt:
            stdout.write("\n")
            return 0
        if line is None:  # end of input
            if interactive:
                stdout.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if text == "/quit":
                return 0
            if text == "/reset":
                session.reset()
                replied = False
                print("(conversation cleared)", file=stdout)
            elif text == "/stats":
                print(_stats_text(model, replied, last_energy), file=stdout)
            else:
                print(f"unknown command {text.split()[0]!r}; {HELP}", file=stdout)
            continue
        meter.begin()
        replied = _stream_reply(session, text, sampling, stdout) or replied
        tokens = model.last_stats.generated_tokens
        last_energy = energy_report(meter.rapl, meter.end(tokens)["joules"], tokens)


def _read_line(stdin: TextIO, interactive: bool) -> str | None:
    """The next input line, or None at end of input."""
    if interactive:
        try:
            return input(PROMPT)  # readline editing; the prompt goes to the terminal
        except EOFError:
            return None
    line = stdin.readline()
    return line if line else None


def _stream_reply(session: "ChatSession", text: str, sampling: dict[str, Any], stdout: TextIO) -> bool:
    """Send ``text`` and print the streamed reply; returns False if it did not fit the context."""
    pieces: Generator[str, None, None] | None = None
    try:
        pieces = session.send(text, **sampling)
        for piece in pieces:
            stdout.write(piece)
            stdout.flush()
    except KeyboardInterrupt:
        stdout.write(" [interrupted]")
    except ContextOverflowError as exc:
        print(f"edgelm: {exc} (use /reset to start over)", file=sys.stderr)
        return False
    finally:
        # Closing the generator is what tells the session to keep the partial reply.
        if pieces is not None:
            pieces.close()
    stdout.write("\n")
    stdout.flush()
    return True


def _stats_text(model: "Model", replied: bool, energy: dict | str = "not measured") -> str:
    memory = "memory: " + format_memory_stats(model.memory_stats())
    if not replied:
        return "no reply yet\n" + memory
    return "last reply: " + format_generation_stats(model.last_stats) + "; " + format_energy(energy) + "\n" + memory
