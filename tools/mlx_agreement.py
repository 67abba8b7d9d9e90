"""MLX backend vs numba backend on one GGUF: the figures of the README's "MLX backend" section.

    python tools/mlx_agreement.py [--model M] [--positions 2048] [--greedy-tokens 64] [--json]

* top-1 agreement and logit differences over ``--positions`` wikitext positions, evaluated in
  chunks of 512 (BOS first, as chunked perplexity does), MLX against numba's batched float32 pass;
* greedy continuations of ``--greedy-tokens`` for the 5 prompts of tests/test_mlx_backend.py,
  both evaluated as ``Model.generate`` does (prompt batch, then one token at a time): whether
  they are identical, where they first differ and each backend's logit margin there; and whether
  MLX's continuation is the one numba's float32 path chooses at every step (teacher-forced);
* for quantized weights MLX cannot hold exactly (Q6_K, Q3_K), the relative RMS error the load-time
  re-quantization adds to those tensors.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    from test_mlx_backend import PROMPTS, Pair, agreement, float32_choices, greedy, wikitext_chunks

    from edgelm.kernels import mlx_weights
    from edgelm.models.registry import resolve
    from edgelm.runtime import quants

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--positions", type=int, default=2048)
    p.add_argument("--greedy-tokens", type=int, default=64)
    p.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "wikitext-2-eval.txt"))
    p.add_argument("--json", action="store_true")

    args = p.parse_args()

    pair = Pair(resolve(args.model))
    out: dict = {"model": Path(pair.gguf.path).name, "positions": args.positions}
    t = time.perf_counter()
    top1, worst = agreement(pair, wikitext_chunks(pair, Path(args.text).read_text(encoding="utf-8"), args.positions))
    out.update(top1_agreement=top1, max_abs_logit_diff=worst, logits_s=time.perf_counter() - t)
    same = []
    for prompt in PROMPTS:
        ids = pair.tokenizer.encode(prompt, add_special=True, parse_special=True)
        a, b = greedy(pair.numba, ids, args.greedy_tokens), greedy(pair.mlx, ids, args.greedy_tokens)
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        row = {"prompt": prompt, "identical": a == b, "first_difference": first,
               "mlx_equals_numba_float32_choices": b == float32_choices(pair.numba, ids, b).tolist()}
        if first is not None:  # how close to a tie each backend was at the step where they part
            prefix = ids + a[:first]
            for name, backend in (("numba", pair.numba), ("mlx", pair.mlx)):
                cache = backend.new_cache(len(prefix) + 1)
                backend.forward(prefix[:-1], cache)
                lg = backend.forward(prefix[-1:], cache)[0]
                row[f"{name}_margin"] = float(lg[a[first]] - lg[b[first]])
        same.append(row)
    out["greedy"] = same
    requant = {}
    for name, info in pair.gguf.tensors.items():
        gtype = quants.GGMLType(info.ggml_type)
        if gtype in mlx_weights.REQUANT_BITS and len(info.shape) == 2:
            rows, cols = info.n_rows, int(info.shape[0])
            w = mlx_weights.convert_blocks(pair.gguf.tensor_bytes(name), gtype, rows, cols)
            ref = pair.gguf.tensor(name)
            err = np.array(w.dequantize()) - ref
            requant[name] = (gtype.name, float(np.sum(err ** 2)), float(np.sum(ref ** 2)))
    if requant:
        num = sum(v[1] for v in requant.values())
        den = sum(v[2] for v in requant.values())
        out["requantized"] = {"tensors": len(requant), "types": sorted({v[0] for v in requant.values()}),
                              "relative_rms_error": float(np.sqrt(num / den))}
    pair.close()
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
