#!/bin/sh
# Quality table of the affine INT4/INT3 converter (README, "Converting Hugging Face checkpoints").
# usage: tools/affine_quality.sh HF_FOLDER OUTDIR [VARIANT...]
#   VARIANT = f16 | q4_k_m | q3_k_s | BITS:GROUP:RECIPE:METHOD  (e.g. 4:128:mixed:awq)
# For each variant: the real file (its size) and, for affine ones, a --fake-quant twin (the
# dequantized weights as F16) whose perplexity equals the real file's up to kernel rounding.
# The real size depends only on bits/group/recipe, so it is written once per RTN variant.
set -u
HF=$1; OUT=$2; shift 2
EDGELM=${EDGELM:-.venv/bin/edgelm}
PY=${PY:-.venv/bin/python}
EVAL=${EVAL:-../shared/data/wikitext-2-eval.txt}
mkdir -p "$OUT"
ppl() {  # ppl FILE -> prints the final perplexity
    $EDGELM perplexity --model "$1" --file "$EVAL" --ctx 512 --chunks 20 --threads "${THREADS:-2}" --json 2>/dev/null \
        | $PY -c 'import json,sys; print(round(json.load(sys.stdin)["ppl"], 3))'
}
[ -f "$OUT/f16.gguf" ] || $EDGELM convert "$HF" -o "$OUT/f16.gguf" -q
for v in "$@"; do
    case $v in
    f16) echo "f16 size=$(stat -c %s "$OUT/f16.gguf") ppl=$(ppl "$OUT/f16.gguf")" ;;
    q4_k_m|q3_k_s)
        f="$OUT/llama-$v.gguf"
        [ -f "$f" ] || $PY - "$OUT/f16.gguf" "$f" "$v" <<'PYEOF'
import ctypes, sys
import llama_cpp
src, dst, kind = sys.argv[1:]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q3_k_s": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_S}[kind]
assert llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) == 0
PYEOF
        echo "llama.cpp-$v size=$(stat -c %s "$f") ppl=$(ppl "$f")" ;;
    *)
        IFS=: read bits group recipe method <<EOV
$v
EOV
        name="int$bits-g$group-$recipe-$method"
        real="$OUT/int$bits-g$group-$recipe-rtn.gguf"
        [ -f "$real" ] || $EDGELM convert "$HF" -o "$real" -q --bits "$bits" --group-size "$group" --recipe "$recipe"
        start=$(date +%s)
        $EDGELM convert "$HF" -o "$OUT/$name.fake.gguf" --bits "$bits" --group-size "$group" \
            --recipe "$recipe" --method "$method" --fake-quant 2>"$OUT/$name.log"
        secs=$(( $(date +%s) - start ))
        echo "$name size=$(stat -c %s "$real") convert_s=$secs ppl=$(ppl "$OUT/$name.fake.gguf") $(tail -n1 "$OUT/$name.log")"
        rm -f "$OUT/$name.fake.gguf" ;;
    esac
done
