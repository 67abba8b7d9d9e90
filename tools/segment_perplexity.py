"""Chunked perplexity (ctx 512, llama.cpp's method) of each 10,000-token segment of a text: the
reference the streaming segments of `edgelm perplexity --streaming` are compared with.

    python tools/segment_perplexity.py ../shared/data/wikitext-2-eval.txt [THREADS] [SEGMENTS]
"""
import json
import sys

import edgelm
from edgelm.runtime.perplexity import perplexity

path = sys.argv[1]
threads = int(sys.argv[2]) if len(sys.argv) > 2 else 1
n_segments = int(sys.argv[3]) if len(sys.argv) > 3 else 10
model = edgelm.load("smollm2-135m-instruct", threads=threads)
tokens = model.tokenize(open(path, encoding="utf-8").read(), add_bos=True)[:10000 * n_segments]
prefix = model.tokenize("", add_bos=True)
bos = prefix[0] if prefix else None
for start in range(0, len(tokens), 10000):
    result = perplexity(model.logits, tokens[start:start + 10000], 512, None, bos)
    print(json.dumps({"start": start, "ppl": result.ppl}), flush=True)
