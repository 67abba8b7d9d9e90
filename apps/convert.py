"""``edgelm convert FOLDER -o model.gguf``: the command-line face of :mod:`edgelm.converters`."""
from __future__ import annotations

import argparse
import sys

from pathlib import Path

from ..converters.errors import ConversionError
from ..converters.recipe import AFFINE_RECIPES, DEFAULT_AFFINE_RECIPE, LLAMA_CPP_PRESETS, OUTTYPES

# Default calibration text, relative to the repository (the shared data folder next to it).
DEFAULT_CALIB = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-calib.txt"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer)")
    p.add_argument("-o", "--outfile", required=True, help="GGUF file to write")
    p.add_argument("--outtype", choices=sorted(OUTTYPES), default="f16",
                   help="type of the 2-D weights (default: %(default)s); norms stay F32")
    p.add_argument("--llama-cpp", nargs="?", const="q4_k_m", choices=LLAMA_CPP_PRESETS, metavar="PRESET",
                   help="only standard ggml types, as llama.cpp's preset q4_k_m (the default) or q3_k_m "
                        "picks them (K-quants; Q4_0/Q5_0/Q5_1/Q8_0 where rows are not multiples of 256)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    g = p.add_argument_group("affine INT4/INT3 (MLX's mx.quantize layout in the GGUF)")
    g.add_argument("--bits", type=int, choices=(4, 3), help="affine group quantization at this many bits")
    g.add_argument("--group-size", type=int, choices=(32, 64, 128), help="weights per scale/bias (default: 64)")
    g.add_argument("--recipe", choices=sorted(AFFINE_RECIPES),
                   help="which tensors get more bits (default: %s): " % DEFAULT_AFFINE_RECIPE
                   + "; ".join(f"{k}: {v}" for k, v in AFFINE_RECIPES.items()))
    g.add_argument("--method", choices=("rtn", "awq", "gptq"),
                   help="rtn: round to nearest with a clip search (default); awq: activation-aware scaling; "
                        "gptq: Hessian-based error compensation (both calibrate on --calib)")
    g.add_argument("--calib", metavar="FILE", help=f"calibration text for awq/gptq (default: {DEFAULT_CALIB})")
    g.add_argument("--calib-tokens", type=int, metavar="N",
                   help="calibration tokens (default: gptq 49152, awq 2048; at most what --calib holds)")
    g.add_argument("--fake-quant", action="store_true",
                   help="store the dequantized weights as F16 (quality measurements on any runtime)")


def cmd_convert(args: argparse.Namespace) -> int:
    from ..converters.convert import AffineOptions, convert

    if args.llama_cpp and args.outtype != "f16":
        raise ConversionError("--llama-cpp chooses the types itself; do not combine it with --outtype")
    affine = None
    if args.bits is None:
        given = [f"--{n.replace('_', '-')}" for n in ("group_size", "recipe", "method", "calib", "calib_tokens")
                 if getattr(args, n) is not None] + (["--fake-quant"] if args.fake_quant else [])
        if given:
            raise ConversionError(f"{', '.join(given)}: only valid with --bits 4|3")
    else:
        if args.llama_cpp or args.outtype != "f16":
            raise ConversionError("--bits chooses the types itself; do not combine it with --outtype or --llama-cpp")
        method = args.method or "rtn"
        if (args.calib is not None or args.calib_tokens is not None) and method == "rtn":
            raise ConversionError("--calib and --calib-tokens are used by --method awq or gptq, not rtn")
        if args.calib_tokens is not None and args.calib_tokens < 64:
            raise ConversionError(f"--calib-tokens {args.calib_tokens}: calibration needs at least 64 tokens")
        affine = AffineOptions(args.bits, args.group_size or 64, args.recipe or DEFAULT_AFFINE_RECIPE, method,
                               Path(args.calib) if args.calib else DEFAULT_CALIB, args.fake_quant,
                               calib_tokens=args.calib_tokens)
    bar = None

    def on_start(total: int) -> None:
        nonlocal bar
        if not args.quiet and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc="converting", file=sys.stderr)

    def progress(name: str, nbytes: int) -> None:
        if bar is not None:
            bar.set_postfix_str(name, refresh=False)
            bar.update(nbytes)

    try:
        result = convert(args.folder, args.outfile, outtype=args.outtype, llama_cpp=args.llama_cpp,
                         progress=progress, on_start=on_start, affine=affine)
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        kinds: dict[str, int] = {}
        for t in result.types.values():
            kinds[t] = kinds.get(t, 0) + 1
        summary = ", ".join(f"{n} {t}" for t, n in sorted(kinds.items()))
        print(f"edgelm: wrote {result.path} ({result.nbytes / 1e6:.1f} MB, {result.n_tensors} tensors: "
              f"{summary}) in {result.seconds:.1f} s"
              + (f" (calibration {result.calib_seconds:.1f} s)" if result.calib_seconds else ""), file=sys.stderr)
    return 0
