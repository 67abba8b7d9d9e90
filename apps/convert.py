"""``edgelm convert FOLDER -o model.gguf``: the command-line face of :mod:`edgelm.converters`."""
from __future__ import annotations

import argparse
import sys

from ..converters.errors import ConversionError
from ..converters.recipe import OUTTYPES

# Flags of the INT4/INT3 affine format (issue 3, second half). They are parsed so that scripts
# written for the full interface fail with a clear message instead of "unrecognized argument".
_NOT_YET = ("bits", "group_size", "recipe", "method", "calib")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer)")
    p.add_argument("-o", "--outfile", required=True, help="GGUF file to write")
    p.add_argument("--outtype", choices=sorted(OUTTYPES), default="f16",
                   help="type of the 2-D weights (default: %(default)s); norms stay F32")
    p.add_argument("--llama-cpp", action="store_true",
                   help="llama.cpp's Q4_K_M types only (Q4_K/Q6_K, Q5_0/Q8_0 where rows are not multiples of 256)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    g = p.add_argument_group("affine INT4/INT3 (not implemented yet)")
    g.add_argument("--bits", type=int, choices=(4, 3))
    g.add_argument("--group-size", type=int, choices=(32, 64, 128))
    g.add_argument("--recipe")
    g.add_argument("--method", choices=("rtn", "awq", "gptq"))
    g.add_argument("--calib", metavar="FILE")


def cmd_convert(args: argparse.Namespace) -> int:
    from ..converters.convert import convert

    given = [f"--{name.replace('_', '-')}" for name in _NOT_YET if getattr(args, name) is not None]
    if given:
        raise ConversionError(f"{', '.join(given)}: the affine INT4/INT3 format is not implemented yet; "
                              f"use --outtype or --llama-cpp")
    if args.llama_cpp and args.outtype != "f16":
        raise ConversionError("--llama-cpp chooses the types itself; do not combine it with --outtype")
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
                         progress=progress, on_start=on_start)
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        kinds: dict[str, int] = {}
        for t in result.types.values():
            kinds[t] = kinds.get(t, 0) + 1
        summary = ", ".join(f"{n} {t}" for t, n in sorted(kinds.items()))
        print(f"edgelm: wrote {result.path} ({result.nbytes / 1e6:.1f} MB, {result.n_tensors} tensors: "
              f"{summary}) in {result.seconds:.1f} s", file=sys.stderr)
    return 0
