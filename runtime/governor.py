"""The resource governor: keep edgelm within a device's memory, CPU and energy limits.

* Memory: before a model is loaded, :func:`plan_memory` estimates what it will hold -- the
  memory-mapped weights (their file size: every page is touched by a forward pass), the KV cache
  for the context (``kv_cache.cache_footprint``) and a fixed runtime
  overhead -- and compares it with ``psutil.virtual_memory().available``. Too much raises
  :class:`~edgelm.runtime.errors.InsufficientMemoryError` with the numbers, instead of letting
  the OS kill the process halfway through a reply. Given a budget (``--memory-budget 1.5GB``) it
  picks the largest KV cache kind that fits: 16, 8 then 4 bits over the whole context, then a
  StreamingLLM window halving down to :data:`MIN_WINDOW` tokens; it refuses if none fits.
* Threads: physical cores by default; ``--power efficiency`` uses half of them, ``auto`` does so
  on battery when psutil can tell (``sensors_battery``).
* Energy: Linux RAPL counters (``/sys/class/powercap/intel-rapl:N/energy_uj``), read with
  wraparound handled, reported as joules per token naming the counter; "not available" where there
  is none or it is unreadable (since 2020 kernels make it root-only) -- never an invented figure.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .errors import InsufficientMemoryError
from .kv_cache import KVSpec, cache_footprint

# Measured: RSS of a process after `edgelm.load()` of SmolLM2-135M (warm numba cache) minus its
# weights file is 195 MiB -- the interpreter, NumPy, numba/LLVM and the compiled kernels, the
# tokenizer and the activation buffers. Rounded up: the check must not pass a load that then fails.
RUNTIME_OVERHEAD_BYTES = 200 * 2**20
MIN_WINDOW = 256          # smallest StreamingLLM window the budget search offers
STREAM_MAX_BATCH = 128    # extra ring slots of a streaming cache (SlotKVCache's max_batch)
POWER_MODES = ("auto", "performance", "efficiency")
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """``"1.5GB"`` -> 1500000000. SI units (KB, MB, GB) are powers of 1000, KiB/MiB/GiB of 1024."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
        if not m or m.group(2) not in _UNITS:
            raise ValueError(f"cannot read {text!r} as a size; write e.g. 1.5GB, 800MB or 2GiB")
        value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return value


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


# ---- memory ----

def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, n_ctx: int, spec: KVSpec) -> int:
    """Bytes a full KV cache of kind ``spec`` commits (the cache's own accounting)."""
    per_token, tokens, fixed = cache_footprint(n_layers, n_kv_heads, head_dim, n_ctx, spec, STREAM_MAX_BATCH)
    return per_token * tokens + fixed


@dataclass(frozen=True)
class MemoryPlan:
    """What a load will hold, in bytes, and the KV cache kind chosen."""

    weights: int
    kv: int
    overhead: int
    spec: KVSpec
    kv_caches: int = 1

    @property
    def total(self) -> int:
        return self.weights + self.kv * self.kv_caches + self.overhead

    def describe(self) -> str:
        caches = f" x {self.kv_caches} caches" if self.kv_caches > 1 else ""
        window = f", window {self.spec.window}" if self.spec.window else ""
        return (f"{fmt_bytes(self.total)} = weights {fmt_bytes(self.weights)} + KV cache "
                f"{fmt_bytes(self.kv)}{caches} ({self.spec.bits_k}/{self.spec.bits_v}-bit{window}) "
                f"+ runtime {fmt_bytes(self.overhead)}")


def kv_candidates(requested: KVSpec, n_ctx: int, head_dim: int) -> list[KVSpec]:
    """KV cache kinds from the largest to the smallest, none larger than ``requested``: fewer bits
    over the whole context first (quality degrades little), then shorter windows."""
    bits = [b for b in (16, 8, 4) if b <= min(requested.bits_k, requested.bits_v) and (b == 16 or head_dim % 32 == 0)]
    out = []
    if requested.window is None:
        out += [KVSpec(b, b, None, requested.n_sink, requested.residual) for b in bits]
    if requested.window is not None:
        out.append(requested)
    # A window as long as the context saves nothing: start at half of it (or of the one asked for).
    window = min(requested.window or n_ctx, n_ctx) // 2
    while window >= MIN_WINDOW:
        out += [KVSpec(b, b, window, requested.n_sink, requested.residual) for b in bits[1:] or bits]
        window //= 2
    return list(dict.fromkeys(out))


def plan_memory(weights_bytes: int, n_layers: int, n_kv_heads: int, head_dim: int, n_ctx: int,
                requested: KVSpec, budget: int | str | None = None, kv_caches: int = 1,
                available: int | None = None) -> MemoryPlan:
    """Check that a load fits in memory; with ``budget``, choose the KV cache kind that fits it.

    Without a budget the ``requested`` kind must fit in available memory. With one, the first of
    :func:`kv_candidates` whose total fits both the budget and available memory is chosen.
    Raises :class:`InsufficientMemoryError` with the numbers otherwise.
    """
    available = psutil.virtual_memory().available if available is None else available
    limit = available if budget is None else min(parse_bytes(budget), available)

    def plan(spec: KVSpec) -> MemoryPlan:
        kv = kv_cache_bytes(n_layers, n_kv_heads, head_dim, n_ctx, spec)
        return MemoryPlan(weights_bytes, kv, RUNTIME_OVERHEAD_BYTES, spec, kv_caches)

    candidates = [requested] if budget is None else kv_candidates(requested, n_ctx, head_dim)
    for spec in candidates:
        p = plan(spec)
        if p.total <= limit:
            return p
    smallest = plan(candidates[-1])
    what = (f"available memory is {fmt_bytes(available)}" if budget is None else
            f"the memory budget is {fmt_bytes(parse_bytes(budget))} ({fmt_bytes(available)} available)")
    hint = ("" if budget is not None else
            "; pass --memory-budget to let edgelm pick a smaller KV cache, or use --kv-bits/--kv-window/--ctx")
    raise InsufficientMemoryError(
        f"not loading: it needs {smallest.describe()}, but {what}{hint}",
        needed=smallest.total, limit=limit)


# ---- threads ----

@dataclass(frozen=True)
class PowerChoice:
    mode: str       # the mode in effect: "performance" or "efficiency"
    threads: int
    reason: str


def choose_threads(threads: int | None = None, power: str = "auto", battery: Any = ...) -> PowerChoice:
    """Threads for compute: ``threads`` if given, else physical cores (``performance``) or half of
    them (``efficiency``); ``auto`` is efficiency on battery power, where psutil can tell."""
    if power not in POWER_MODES:
        raise ValueError(f"--power must be one of {', '.join(POWER_MODES)}, got {power!r}")
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    mode, reason = power, "requested"
    if power == "auto":
        if battery is ...:
            try:
                battery = psutil.sensors_battery()
            except (AttributeError, NotImplementedError, OSError):
                battery = None
        if battery is None:
            mode, reason = "performance", "auto: no battery information"
        elif battery.power_plugged:
            mode, reason = "performance", "auto: on mains power"
        else:
            mode, reason = "efficiency", f"auto: on battery ({battery.percent:.0f}%)"
    if threads:
        return PowerChoice(mode, threads, reason + ", threads set explicitly")
    return PowerChoice(mode, cores if mode == "performance" else max(1, cores // 2), reason)


# ---- energy ----

@dataclass
class _Zone:
    path: Path
    name: str
    max_range: int
    last: int
    total: int = 0  # microjoules accumulated since the reader started


class RaplReader:
    """Package energy from Linux RAPL counters, summed over packages, wraparound handled.

    ``energy_uj`` counts up to ``max_energy_range_uj`` and wraps to 0; a reading lower than the
    last one means one wrap (the counter is read far more often than it can wrap twice: ~60 s at
    full power on small parts). The counter covers the whole package -- every process on it.
    """

    def __init__(self, root: str | Path = "/sys/class/powercap"):
        self.zones: list[_Zone] = []
        self.error: str | None = None
        root = Path(root)
        # Top-level zones only (intel-rapl:0, intel-rapl:1): sub-zones (intel-rapl:0:0, cores) are
        # contained in their package, summing them would count twice.
        paths = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
        if not paths:
            self.error = f"no RAPL counter under {root}"
        for p in paths:
            try:
                name = (p / "name").read_text().strip() if (p / "name").exists() else p.name
                self.zones.append(_Zone(p, name, int((p / "max_energy_range_uj").read_text()),
                                        int((p / "energy_uj").read_text())))
            except PermissionError:
                self.error = f"{p / 'energy_uj'} is not readable (permission denied; root only on this kernel)"
                self.zones = []
                break
            except (OSError, ValueError) as exc:
                self.error = f"{p}: {exc}"
                self.zones = []
                break

    @property
    def available(self) -> bool:
        return bool(self.zones)

    @property
    def counter(self) -> str:
        """Which counters are used, e.g. ``intel-rapl:0 (package-0)``."""
        return ", ".join(f"{z.path.name} ({z.name})" for z in self.zones)

    def joules(self) -> float | None:
        """Energy since the reader was made, in joules; None if not available."""
        if not self.zones:
            return None
        for z in self.zones:
            try:
                now = int((z.path / "energy_uj").read_text())
            except (OSError, ValueError) as exc:
                self.error, self.zones = f"{z.path}: {exc}", []
                return None
            delta = now - z.last
            if delta < 0:  # wrapped around
                delta += z.max_range
            z.total += delta
            z.last = now
        return sum(z.total for z in self.zones) / 1e6


@dataclass
class UsageMeter:
    """Running totals for reports: tokens, wall/CPU seconds and energy while generating."""

    rapl: RaplReader = field(default_factory=RaplReader)
    tokens: int = 0
    decode_steps: int = 0
    decode_s: float = 0.0
    cpu_s: float = 0.0
    joules: float = 0.0
    _start: tuple[float, float | None] | None = None

    def begin(self) -> None:
        self._start = (time.process_time(), self.rapl.joules())

    def end(self, tokens: int, decode_steps: int = 0, decode_s: float = 0.0) -> dict[str, Any]:
        """Close a measured span that generated ``tokens``; returns that span's figures."""
        cpu0, j0 = self._start or (time.process_time(), None)
        cpu = time.process_time() - cpu0
        j1 = self.rapl.joules()
        joules = j1 - j0 if j0 is not None and j1 is not None else None
        self.tokens += tokens
        self.decode_steps += decode_steps
        self.decode_s += decode_s
        self.cpu_s += cpu
        if joules is not None:
            self.joules += joules
        self._start = None
        return {"cpu_s": cpu, "joules": joules}

    def report(self) -> dict[str, Any]:
        """tokens/s, CPU-seconds per token and energy per token over everything measured."""
        return {
            "tokens": self.tokens,
            "decode_tok_s": self.decode_steps / self.decode_s if self.decode_s > 0 else None,
            "cpu_s_per_token": self.cpu_s / self.tokens if self.tokens else None,
            "energy": energy_report(self.rapl, self.joules if self.rapl.available else None, self.tokens),
        }


def energy_report(rapl: RaplReader, joules: float | None, tokens: int) -> dict[str, Any] | str:
    """``{"joules", "joules_per_token", "counter"}`` or ``"not available (why)"``."""
    if joules is None or not rapl.available:
        return f"not available ({rapl.error or 'no counter'})"
    return {"joules": joules, "joules_per_token": joules / tokens if tokens else None,
            "counter": f"RAPL {rapl.counter} (whole package)"}


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss
