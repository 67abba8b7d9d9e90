"""Bounded load test of a running ``edgelm serve``: N concurrent clients for T seconds.

    python tools/loadtest.py --url http://127.0.0.1:8080 --clients 4 --duration 300 --json load.json

Each client loops until the time is up: half of the clients hold multi-turn conversations (each
turn resends the history, so the prompt cache is exercised), the other half send one-off
prompts; every other request is streamed. A 503 (queue full) is the expected answer to overload:
the client waits a little and goes on. Anything else is an error. At the end it prints a table
and a JSON document: requests, statuses, p50/p95 latency (and time to first streamed token),
completion tokens per second, the server's RSS from /health at the start, every 10 s and at the
end (it must not grow), and whether the run passed (no status other than 200 and 503).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

TOPICS = ("the sea", "a lighthouse", "bread", "winter", "a robot", "the moon", "trains", "bees", "chess", "rain")


@dataclass
class Results:
    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)   # of 200 responses, seconds
    ttfts: list[float] = field(default_factory=list)       # streamed: first content chunk
    completion_tokens: int = 0
    cached_tokens: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def one_request(client: httpx.Client, url: str, body: dict, stream: bool, res: Results, timeout: float) -> dict | None:
    """Send one chat request; record status/latency; return the assistant message on success."""
    t0 = time.perf_counter()
    try:
        if not stream:
            r = client.post(url, json=body, timeout=timeout)
            status = r.status_code
            data = r.json() if status == 200 else None
            text = data["choices"][0]["message"]["content"] if data else None
            usage = data["usage"] if data else None
            ttft = None
        else:
            text, usage, ttft = "", None, None
            with client.stream("POST", url, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                               timeout=timeout) as r:
                status = r.status_code
                if status == 200:
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            status = 500
                            break
                        if chunk.get("usage") and chunk.get("choices") == []:
                            usage = chunk["usage"]
                        for c in chunk.get("choices", []):
                            piece = c.get("delta", {}).get("content")
                            if piece:
                                ttft = ttft if ttft is not None else time.perf_counter() - t0
                                text += piece
                else:
                    r.read()
    except httpx.HTTPError as exc:
        with res.lock:
            res.statuses[type(exc).__name__] += 1
            res.errors.append(f"{type(exc).__name__}: {exc}")
        return None
    dt = time.perf_counter() - t0
    with res.lock:
        res.statuses[status] += 1
        if status == 200:
            res.latencies.append(dt)
            if ttft is not None:
                res.ttfts.append(ttft)
            if usage:
                res.completion_tokens += usage["completion_tokens"]
                res.cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        elif status != 503:
            res.errors.append(f"HTTP {status}")
    return {"role": "assistant", "content": text} if status == 200 and text is not None else None


def client_loop(i: int, base: str, headers: dict, deadline: float, max_tokens: int, res: Results, timeout: float) -> None:
    rng = random.Random(i)
    conversational = i % 2 == 0
    history: list[dict] = []
    n = 0
    with httpx.Client(headers=headers) as client:
        while time.time() < deadline:
            topic = rng.choice(TOPICS)
            if conversational:
                if len(history) >= 8:  # start over after four turns
                    history = []
                history.append({"role": "user", "content": f"Tell me one more thing about {topic}."})
                messages = history
            else:
                messages = [{"role": "user", "content": f"Write a sentence about {topic} ({rng.random():.6f})."}]
            body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.7, "seed": rng.randrange(2**31)}
            reply = one_request(client, base + "/v1/chat/completions", body, stream=n % 2 == 1, res=res, timeout=timeout)
            n += 1
            if reply is None:
                if conversational:
                    history.pop()
                time.sleep(0.2 + rng.random() * 0.3)  # back off after a 503 (or an error)
            elif conversational:
                history.append(reply)


def health(base: str, headers: dict) -> dict:
    return httpx.get(base + "/health", headers=headers, timeout=10).json()


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def run(base: str, clients: int, duration: float, max_tokens: int, api_key: str | None, timeout: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    res = Results()
    h0 = health(base, headers)
    start = time.time()
    deadline = start + duration
    threads = [threading.Thread(target=client_loop, args=(i, base, headers, deadline, max_tokens, res, timeout),
                                daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    rss_samples = [(0.0, h0["memory"]["rss_bytes"])]
    while any(t.is_alive() for t in threads):
        time.sleep(1.0)
        now = time.time()
        if now - start - rss_samples[-1][0] >= 10:
            rss_samples.append((round(now - start, 1), health(base, headers)["memory"]["rss_bytes"]))
        if now > deadline + timeout + 5:  # a stuck request: report rather than hang
            res.errors.append("clients still running after the deadline")
            break
    wall = time.time() - start
    h1 = health(base, headers)
    rss_samples.append((round(wall, 1), h1["memory"]["rss_bytes"]))
    statuses = {str(k): v for k, v in sorted(res.statuses.items(), key=lambda kv: str(kv[0]))}
    bad = {k: v for k, v in statuses.items() if k not in ("200", "503")}
    return {
        "clients": clients, "duration_s": duration, "wall_s": wall, "max_tokens": max_tokens,
        "requests": sum(res.statuses.values()), "ok": res.statuses.get(200, 0), "statuses": statuses,
        "latency_p50_s": pct(res.latencies, 50), "latency_p95_s": pct(res.latencies, 95),
        "ttft_p50_s": pct(res.ttfts, 50), "ttft_p95_s": pct(res.ttfts, 95),
        "completion_tokens": res.completion_tokens, "tokens_per_s": res.completion_tokens / wall,
        "cached_prompt_tokens": res.cached_tokens,
        "rss_start_bytes": h0["memory"]["rss_bytes"], "rss_end_bytes": h1["memory"]["rss_bytes"],
        "rss_max_bytes": max(r for _, r in rss_samples), "rss_samples": rss_samples,
        "server_requests": h1["requests"], "server_throughput": h1["throughput"],
        "errors": res.errors[:20], "passed": not bad and not res.errors,
    }


def table(r: dict[str, Any]) -> str:
    mib = 2**20

    def s(x: float | None, f: str = "{:.3f}") -> str:
        return "-" if x is None else f.format(x)

    rows = [("clients x duration", f"{r['clients']} x {r['duration_s']:.0f} s (wall {r['wall_s']:.1f} s)"),
            ("requests", f"{r['requests']} ({r['ok']} ok)"),
            ("statuses", ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())),
            ("latency p50 / p95 (s)", f"{s(r['latency_p50_s'])} / {s(r['latency_p95_s'])}"),
            ("first token p50 / p95 (s)", f"{s(r['ttft_p50_s'])} / {s(r['ttft_p95_s'])}"),
            ("completion tokens/s", f"{r['tokens_per_s']:.1f} ({r['completion_tokens']} tokens)"),
            ("cached prompt tokens", str(r["cached_prompt_tokens"])),
            ("server RSS start / end / max (MiB)",
             f"{r['rss_start_bytes'] / mib:.1f} / {r['rss_end_bytes'] / mib:.1f} / {r['rss_max_bytes'] / mib:.1f}"),
            ("passed (only 200 and 503)", str(r["passed"]))]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL (default: %(default)s)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--duration", type=float, default=60.0, help="seconds (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the JSON document here")
    args = p.parse_args(argv)
    report = run(args.url.rstrip("/"), args.clients, args.duration, args.max_tokens, args.api_key, args.timeout)
    print(table(report))
    doc = json.dumps(report, indent=2)
    print(doc)
    if args.json:
        with open(args.json, "w") as f:
            f.write(doc + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
