"""The resource governor: memory planning and refusal, KV choice under a budget, power modes and
the RAPL energy reader (on a fake sysfs tree)."""
from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import pytest

import edgelm
from edgelm.apps import cli
from edgelm.runtime import governor
from edgelm.runtime.errors import EdgeLMError, InsufficientMemoryError
from edgelm.runtime.governor import (MIN_WINDOW, RUNTIME_OVERHEAD_BYTES, RaplReader, UsageMeter, choose_threads,
                                     kv_candidates, parse_bytes, plan_memory)
from edgelm.runtime.kv_cache import KVSpec

MB = 10**6
# SmolLM2-135M: 30 layers, 3 KV heads of 64; bytes per token 23040 at 16 bits, 12600 at 8, 7200 at 4;
# a quantized cache adds 192 tokens of 16-bit recent copies (RECENT bytes)
SMOL = dict(n_layers=30, n_kv_heads=3, head_dim=64)
BIG = 64 * 2**30  # "available" memory that never limits
RECENT = 192 * 23040


def test_parse_bytes():
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("800MiB") == 800 * 2**20
    assert parse_bytes(" 2 gib ") == 2 * 2**30
    assert parse_bytes("4096") == 4096 and parse_bytes(10) == 10
    for bad in ("", "1.5 parsecs", "-1GB", "0", "GB"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_plan_counts_weights_kv_and_overhead():
    p = plan_memory(100 * MB, n_ctx=1000, requested=KVSpec(), available=BIG, **SMOL)
    assert p.kv == 1000 * 23040 and p.total == 100 * MB + 1000 * 23040 + RUNTIME_OVERHEAD_BYTES
    p = plan_memory(100 * MB, n_ctx=1000, requested=KVSpec(8, 8), available=BIG, kv_caches=3, **SMOL)
    kv8 = 1024 * 12600 + RECENT  # 1000 tokens rounded up to whole key groups
    assert p.kv == kv8 and p.total == 100 * MB + 3 * kv8 + RUNTIME_OVERHEAD_BYTES
    # a window holds the sinks, the window and a 128-token ring for batches, whatever n_ctx is
    # (in whole key groups of 32)
    p = plan_memory(100 * MB, n_ctx=10**6, requested=KVSpec(4, 4, window=512), available=BIG, **SMOL)
    assert p.kv == (32 + 640) * 7200 + RECENT


def test_refuses_when_available_memory_is_short():
    with pytest.raises(InsufficientMemoryError) as e:
        plan_memory(100 * MB, n_ctx=8192, requested=KVSpec(), available=300 * MB, **SMOL)
    msg = str(e.value)
    assert "available memory is 286 MiB" in msg and "weights 95 MiB" in msg and "KV cache 180 MiB" in msg
    assert e.value.needed > e.value.limit == 300 * MB


def test_budget_picks_fewer_bits_then_a_window():
    def pick(budget: int) -> KVSpec:
        return plan_memory(100 * MB, n_ctx=8192, requested=KVSpec(), budget=budget, available=BIG, **SMOL).spec

    base = 100 * MB + RUNTIME_OVERHEAD_BYTES
    assert pick(base + 8192 * 23040) == KVSpec(16, 16)
    assert pick(base + 8192 * 23040 - 1) == KVSpec(8, 8)
    assert pick(base + 8192 * 7200 + RECENT) == KVSpec(4, 4)
    assert pick(base + 8192 * 7200 + RECENT - 1) == KVSpec(8, 8, window=4096)
    small = pick(base + 1000 * 7200 + RECENT)
    assert small.bits_k == 4 and MIN_WINDOW <= small.window <= 1000 - 4 - 128
    with pytest.raises(InsufficientMemoryError, match="memory budget is"):
        pick(base + (4 + MIN_WINDOW + 128) * 7200 - 1)  # not even the smallest window fits


def test_budget_never_exceeds_the_requested_kind():
    cands = kv_candidates(KVSpec(8, 8, window=1024), n_ctx=8192, head_dim=64)
    assert cands[0] == KVSpec(8, 8, window=1024)
    assert all(c.window is not None and c.window <= 1024 and c.bits_k <= 8 for c in cands)
    assert kv_candidates(KVSpec(), 8192, head_dim=48) == [KVSpec(16, 16), KVSpec(16, 16, 4096), KVSpec(16, 16, 2048),
                                                         KVSpec(16, 16, 1024), KVSpec(16, 16, 512),
                                                         KVSpec(16, 16, 256)]  # no quantized rows at 48


def test_load_refuses_a_budget_smaller_than_the_model(default_gguf):
    with pytest.raises(InsufficientMemoryError) as e:
        edgelm.load(default_gguf, memory_budget="50MB")
    assert isinstance(e.value, EdgeLMError)
    assert "not loading" in str(e.value) and "memory budget is 48 MiB" in str(e.value)


def test_cli_refusal_is_one_line(default_gguf, capsys):
    rc = cli.main(["generate", "--model", str(default_gguf), "--memory-budget", "50MB", "hi"])
    err = capsys.readouterr().err.strip()
    assert rc == cli.EXIT_ERROR and err.startswith("edgelm: error: not loading") and "\n" not in err


def test_load_with_a_budget_chooses_a_smaller_cache(default_gguf):
    size = Path(default_gguf).stat().st_size
    budget = size + RUNTIME_OVERHEAD_BYTES + 8192 * 12600 + RECENT  # room for 8-bit over 8192 tokens, not 16
    model = edgelm.load(default_gguf, n_ctx=8192, memory_budget=budget)
    try:
        assert (model.kv.bits_k, model.kv.bits_v, model.kv.window) == (8, 8, None)
        assert "".join(model.generate("Hello", max_tokens=3, temperature=0))  # and it runs
    finally:
        model.close()


Battery = namedtuple("Battery", "percent secsleft power_plugged")


def test_power_modes(monkeypatch):
    monkeypatch.setattr(governor.psutil, "cpu_count", lambda logical=True: 8 if logical else 4)
    assert choose_threads(None, "performance").threads == 4
    assert choose_threads(None, "efficiency").threads == 2
    on_battery = choose_threads(None, "auto", battery=Battery(40, 3600, False))
    assert (on_battery.mode, on_battery.threads) == ("efficiency", 2) and "battery" in on_battery.reason
    assert choose_threads(None, "auto", battery=Battery(40, 3600, True)).threads == 4
    assert choose_threads(None, "auto", battery=None).mode == "performance"
    assert choose_threads(3, "efficiency").threads == 3  # --threads wins
    monkeypatch.setattr(governor.psutil, "sensors_battery", lambda: Battery(10, 60, False))
    assert choose_threads(None, "auto").threads == 2
    with pytest.raises(ValueError):
        choose_threads(None, "turbo")


def fake_rapl(root: Path, zones: dict[str, tuple[str, int, int]]) -> None:
    """zones: directory name -> (name, energy_uj, max_energy_range_uj)."""
    for d, (name, energy, max_range) in zones.items():
        (root / d).mkdir(parents=True)
        (root / d / "name").write_text(name + "\n")
        (root / d / "energy_uj").write_text(f"{energy}\n")
        (root / d / "max_energy_range_uj").write_text(f"{max_range}\n")


def set_energy(root: Path, zone: str, uj: int) -> None:
    (root / zone / "energy_uj").write_text(f"{uj}\n")


def test_rapl_reads_packages_and_handles_wraparound(tmp_path):
    fake_rapl(tmp_path, {"intel-rapl:0": ("package-0", 1_000_000, 262_143_328_850),
                         "intel-rapl:0:0": ("core", 5, 262_143_328_850),  # inside package-0: not added
                         "intel-rapl:1": ("package-1", 100, 1_000_000)})
    r = RaplReader(tmp_path)
    assert r.available and r.counter == "intel-rapl:0 (package-0), intel-rapl:1 (package-1)"
    assert r.joules() == 0.0
    set_energy(tmp_path, "intel-rapl:0", 3_000_000)
    set_energy(tmp_path, "intel-rapl:1", 900_100)
    assert r.joules() == pytest.approx(2.0 + 0.9)
    set_energy(tmp_path, "intel-rapl:1", 50)  # wrapped: 1_000_000 - 900_100 + 50 uJ since
    assert r.joules() == pytest.approx(2.9 + (1_000_000 - 900_100 + 50) / 1e6)


def test_rapl_not_available(tmp_path, monkeypatch):
    r = RaplReader(tmp_path / "none")
    assert not r.available and r.joules() is None and "no RAPL counter" in r.error
    fake_rapl(tmp_path, {"intel-rapl:0": ("package-0", 1, 10**9)})
    real_read = Path.read_text

    def denied(self: Path, *a, **kw):
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied")
        return real_read(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", denied)
    r = RaplReader(tmp_path)
    assert not r.available and "permission denied" in r.error
    meter = UsageMeter(rapl=r)
    meter.begin()
    meter.end(tokens=10)
    report = meter.report()
    assert report["energy"].startswith("not available (") and "permission" in report["energy"]
    assert report["tokens"] == 10 and report["cpu_s_per_token"] is not None


def test_usage_meter_joules_per_token(tmp_path):
    fake_rapl(tmp_path, {"intel-rapl:0": ("package-0", 0, 10**12)})
    meter = UsageMeter(rapl=RaplReader(tmp_path))
    meter.begin()
    set_energy(tmp_path, "intel-rapl:0", 5_000_000)
    span = meter.end(tokens=50, decode_steps=49, decode_s=0.5)
    assert span["joules"] == pytest.approx(5.0)
    energy = meter.report()["energy"]
    assert energy["joules_per_token"] == pytest.approx(0.1) and "intel-rapl:0 (package-0)" in energy["counter"]
    assert meter.report()["decode_tok_s"] == pytest.approx(98.0)
