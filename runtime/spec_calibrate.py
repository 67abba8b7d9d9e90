"""Finding which layers the self-speculative drafter skips, once per model file.

The drafter is the model with a set S of layers skipped. A good S keeps the drafter agreeing
with the full model while making a draft step cheap; what counts is tokens per second, so the
search maximizes the predicted speedup

    speedup(S, k) = E[tokens per round] / (k * c(S) + v(k + 1)),
    E[tokens per round] = (1 - a^(k+1)) / (1 - a)

with a = a(S) the drafter's agreement with the full model's greedy choice, k the draft length,
c(S) a draft step's time and v(n) an n-token verification pass's time, both in units of a
plain decoding step (measured on this machine).

a(S) is measured on the model's *own* text -- what a drafter has to predict -- not on the
calibration text: short snippets of ``wikitext-2-calib.txt`` are continued greedily by the full
model, then one batched pass with S skipped scores the continuation (a teacher-forced proxy:
the drafter sees its own keys for earlier tokens, slightly pessimistic against the real rounds).
The search is greedy (as Draft & Verify's and SWIFT's searches begin): rank layers by the
agreement when each alone is skipped, then grow S along that ranking and keep the best prefix.

The result is a small JSON file cached per model file under ``$EDGELM_HOME/speculative`` (the
key hashes the file's size, head and tail), so the search runs once per model.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .backend import Backend
from .paths import edgelm_home
from .speculative import MAX_DRAFT

CALIBRATION_VERSION = 2  # 2: verification costs of the int8 batched kernels (tok2 remainder, lazy head)
PAYS = 1.05  # predicted speedup below which auto mode does not draft with skipped layers


@dataclass(frozen=True)
class Calibration:
    """The chosen skip set and what the search measured and predicted for it."""

    skip: tuple[int, ...]
    agreement: float        # a(S): drafter's greedy token == the full model's
    draft_cost: float       # c(S): a draft step over a plain step
    draft_len: int          # k that maximizes the predicted speedup
    speedup: float          # predicted tokens per second over plain decoding
    verify_cost: tuple[float, ...]  # v(n) for n = 1 .. MAX_DRAFT + 1 (v(1) = 1)
    layers: int
    seconds: float          # how long the search took
    version: int = CALIBRATION_VERSION

    @property
    def pays(self) -> bool:
        return self.speedup >= PAYS and len(self.skip) > 0


def model_key(path: Path) -> str:
    """A cheap identity of a model file: sha256 of its size, first and last MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:24]


def calibration_path(model_path: Path) -> Path:
    return edgelm_home() / "speculative" / f"{model_path.stem}-{model_key(model_path)}.json"


# Calibrations shipped with edgelm for the registry's models (same file names as the cache's).
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "models" / "calibrations"


def load_calibration(model_path: Path) -> Calibration | None:
    """The calibration of this model file -- cached under ``$EDGELM_HOME``, else shipped in
    ``models/calibrations`` -- or None (missing, unreadable or outdated)."""
    p = calibration_path(model_path)
    for candidate in (p, BUNDLED_DIR / p.name):
        try:
            data = json.loads(candidate.read_text())
            cal = Calibration(**{**data, "skip": tuple(data["skip"]), "verify_cost": tuple(data["verify_cost"])})
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if cal.version == CALIBRATION_VERSION:
            return cal
    return None


def save_calibration(model_path: Path, cal: Calibration) -> Path:
    """Write atomically (temp file + rename): an interrupted write leaves nothing half-made."""
    p = calibration_path(model_path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(cal), f, indent=1)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def expected_tokens(a: float, k: int) -> float:
    """Tokens a round yields on average when each draft is accepted with probability a."""
    if a >= 1.0:
        return k + 1.0
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def best_draft_len(a: float, c: float, v: Sequence[float]) -> tuple[int, float]:
    """(k, predicted speedup) maximizing expected_tokens / (k c + v(k + 1))."""
    best = (0, 1.0)
    for k in range(1, MAX_DRAFT + 1):
        s = expected_tokens(a, k) / (k * c + v[k])
        if s > best[1]:
            best = (k, s)
    return best


def _median_time(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def measure_costs(backend: Backend, reps: int = 7) -> tuple[float, tuple[float, ...]]:
    """(head share, verify costs): a step with every layer skipped, and n-token passes for
    n = 1 .. MAX_DRAFT + 1, each over a plain step's time."""
    n_layers = backend.args.n_layers
    cache = backend.new_cache(64)
    backend.forward(list(range(1, 17)), cache)

    def step(tokens: list[int], skip: frozenset[int] = frozenset()) -> None:
        backend.forward(tokens, cache, logits_from=0, skip_layers=skip)
        cache.trim(len(tokens))

    step([5])  # warm
    plain = _median_time(lambda: step([5]), reps)
    # A step that skips every layer cannot cost more than a plain one; timing noise can say so
    # when the head dominates (tiny models), and a draft would then seem dearer than the model.
    head = min(1.0, _median_time(lambda: step([5], frozenset(range(n_layers))), reps) / plain)
    verify = tuple([1.0] + [_median_time(lambda n=n: step(list(range(5, 5 + n))), reps) / plain
                            for n in range(2, MAX_DRAFT + 2)])
    return head, verify


def calibrate(backend: Backend, tokenize: Callable[[str], list[int]], text: str, snippets: int = 2,
              prompt_len: int = 48, gen_len: int = 48, progress: bool = True) -> Calibration:
    """Search the skip set for ``backend``'s model on ``text`` (see the module docstring)."""
    t_start = time.perf_counter()
    n_layers = backend.args.n_layers
    ids = tokenize(text)
    if len(ids) < snippets * prompt_len * 4:
        raise ValueError(f"calibration text too short: {len(ids)} tokens")
    # The model's own greedy continuations of a few snippets.
    seqs = []
    stride = len(ids) // snippets
    for s in range(snippets):
        seq = list(ids[s * stride: s * stride + prompt_len])
        cache = backend.new_cache(prompt_len + gen_len + 1)
        logits = backend.forward(seq, cache)[0]
        for _ in range(gen_len):
            seq.append(int(np.argmax(logits)))
            logits = backend.forward([seq[-1]], cache)[0]
        seqs.append(seq)
    reference = [_greedy(backend, seq, prompt_len, frozenset()) for seq in seqs]

    def agreement(skip: frozenset[int]) -> float:
        hits = sum(int((_greedy(backend, seq, prompt_len, skip) == ref).sum()) for seq, ref in zip(seqs, reference))
        return hits / sum(len(r) for r in reference)

    head, verify = measure_costs(backend)

    def cost(n_skipped: int) -> float:
        return head + (1.0 - head) * (n_layers - n_skipped) / n_layers

    bar = _progress(n_layers + n_layers // 2, progress)
    single = {}
    for layer in range(n_layers):
        single[layer] = agreement(frozenset([layer]))
        bar.update()
    order = sorted(range(n_layers), key=lambda l: (-single[l], l))
    best = Calibration((), 1.0, 1.0, 0, 1.0, verify, n_layers, 0.0)
    for size in range(1, n_layers // 2 + 1):
        skip = frozenset(order[:size])
        a = agreement(skip) if size > 1 else single[order[0]]
        k, s = best_draft_len(a, cost(size), verify)
        if s > best.speedup or not best.skip:
            best = Calibration(tuple(sorted(skip)), round(a, 4), round(cost(size), 4), k, round(s, 4), verify,
                               n_layers, 0.0)
        bar.update()
    bar.close()
    return Calibration(**{**asdict(best), "seconds": round(time.perf_counter() - t_start, 1)})


def _greedy(backend: Backend, seq: list[int], prompt_len: int, skip: frozenset[int]) -> np.ndarray:
    """Argmax at each continuation position of ``seq`` (batched, fresh cache, layers skipped)."""
    cache = backend.new_cache(len(seq))
    logits = backend.forward(seq[:-1], cache, logits_from=prompt_len - 1, skip_layers=skip)
    return logits.argmax(axis=1)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="edgelm: calibrating the self-speculative drafter", disable=not enabled,
                file=sys.stderr, leave=False)


def calibration_text() -> str:
    """The calibration text: ``$EDGELM_CALIB_TEXT``, else ``../shared/data/wikitext-2-calib.txt``
    beside the repository, else a short built-in paragraph."""
    env = os.environ.get("EDGELM_CALIB_TEXT")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-calib.txt")
    for p in candidates:
        if p.is_file():
            return p.read_text(encoding="utf-8", errors="replace")[:60000]
    return _BUILTIN_TEXT * 8


_BUILTIN_TEXT = (
    "The river rises in the hills to the north of the town and flows south through farmland before "
    "it reaches the sea. In the nineteenth century a railway was built along its valley, and the town "
    "grew quickly as mills and warehouses were opened near the station. Most of these buildings were "
    "converted into homes and offices in the late twentieth century, when the last mill closed. "
    "Today the town is known for its market, its old stone bridge and a festival held every summer. "
)
