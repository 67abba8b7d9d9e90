"""The affine INT4/INT3 converter: packing, quantizers, calibration methods, the written file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgelm.apps.cli import main
from edgelm.converters.affine_pack import dequantize, dequantize_q, pack, unpack
from edgelm.converters.convert import AffineOptions, convert
from edgelm.converters.quantize_affine import fit_groups, quantize_gptq, quantize_rtn

CALIB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-calib.txt"


# -- packing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_pack_is_mlx_bit_exact(bits, group_size):
    mx = pytest.importorskip("mlx.core")
    w = np.random.default_rng(bits * group_size).standard_normal((7, 384)).astype(np.float32)
    wq, s, b = mx.quantize(mx.array(w), group_size=group_size, bits=bits)
    words = np.array(wq).view(np.uint32)
    q = unpack(words, bits, 384)
    assert np.array_equal(pack(q, bits), words)
    ours = dequantize(words, np.array(s), np.array(b), bits, group_size)
    theirs = np.array(mx.dequantize(wq, s, b, group_size=group_size, bits=bits))
    assert np.array_equal(ours, theirs)
    # and our quantizer's output goes through mlx's dequantizer unchanged
    q2, s2, b2 = quantize_rtn(w, bits, group_size)
    mine = np.array(mx.dequantize(mx.array(pack(q2, bits)), mx.array(s2.astype(np.float32)), mx.array(b2.astype(np.float32)),
                                  group_size=group_size, bits=bits))
    assert np.allclose(mine, dequantize_q(q2, s2, b2, group_size), rtol=0, atol=1e-6)


# -- RTN -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("dist", ["normal", "student", "uniform"])
def test_rtn_clip_search_never_worse_than_min_max(bits, dist):
    rng = np.random.default_rng(1)
    shape = (64, 8, 64)
    x = {"normal": rng.standard_normal(shape), "student": rng.standard_t(3, shape),
         "uniform": rng.uniform(-1, 3, shape)}[dist].astype(np.float32)
    errs = []
    for search in (False, True):
        q, s, b = fit_groups(x, bits, search)
        assert q.min() >= 0 and q.max() <= 2 ** bits - 1
        assert np.array_equal(s, s.astype(np.float16).astype(np.float32))  # f16-exact, as stored
        errs.append(np.square(q * s + b - x).sum(axis=-1))
    assert np.all(errs[1] <= errs[0])
    assert errs[1].sum() < 0.97 * errs[0].sum()  # and clearly better overall


# -- calibration methods on a tiny random checkpoint ------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt(smollm2_hf, tmp_path_factory):
    """A tiny Llama whose norms have a few large channels: the outlier activations of real LLMs."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    from hf_factory import make_tiny

    dest = make_tiny(tmp_path_factory.mktemp("aff") / "llama", "llama", smollm2_hf, vocab_size=49152,
                     hidden_size=128, intermediate_size=256, num_hidden_layers=2)
    path = dest / "model.safetensors"
    tensors = load_file(str(path))
    for name, t in tensors.items():
        if name.endswith("layernorm.weight"):
            t[:6] *= 8.0
    save_file(tensors, str(path), metadata={"format": "pt"})
    return dest


def _weights(folder: Path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors as float32 (numpy cannot read bf16)."""
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(str(folder / "model.safetensors")).items()}


def _output_error(delta: np.ndarray, hessian: np.ndarray) -> float:
    """sum over calibration inputs x of |delta x|^2 = trace(delta H delta^T)."""
    return float(np.einsum("ij,jk,ik->", delta, hessian, delta))


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_and_awq_beat_rtn_on_calibration_inputs(tiny_ckpt, bits):
    from edgelm.converters.calibrate import calibrate

    orig = _weights(tiny_ckpt)
    group = 32
    gptq = calibrate(tiny_ckpt, CALIB, "gptq", lambda name: bits, group, n_tokens=512)
    awq = calibrate(tiny_ckpt, CALIB, "awq", lambda name: bits, group, n_tokens=512)
    p = "model.layers.0."
    for name, norm in (("mlp.gate_proj", "post_attention_layernorm"), ("self_attn.q_proj", "input_layernorm")):
        w = orig[p + name + ".weight"].astype(np.float32)
        h = gptq.hessians[p + name + ".weight"]
        q, s, b = quantize_rtn(w, bits, group)
        e_rtn = _output_error(dequantize_q(q, s, b, group) - w, h)
        q, s, b = quantize_gptq(w, h, bits, group)
        e_gptq = _output_error(dequantize_q(q, s, b, group) - w, h)
        # AWQ: the stored weight is W diag(s); the model divides the input by s in the norm.
        scale = orig[p + norm + ".weight"] / awq.weights[p + norm + ".weight"]
        ws = awq.weights[p + name + ".weight"]
        assert np.allclose(ws / scale, w, rtol=1e-4, atol=1e-6)  # same function before quantization
        q, s, b = quantize_rtn(ws, bits, group)
        e_awq = _output_error(dequantize_q(q, s, b, group) / scale - w, h)
        assert e_gptq < 0.9 * e_rtn, (name, e_gptq, e_rtn)
        assert e_awq < e_rtn, (name, e_awq, e_rtn)


# -- the written file ------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group_size,method", [(4, 64, "rtn"), (3, 32, "gptq")])
def test_converter_writes_the_affine_format(tiny_ckpt, tmp_path, bits, group_size, method):
    from gguf import GGMLQuantizationType, GGUFReader

    opts = AffineOptions(bits, group_size, "mixed", method, CALIB)
    real = convert(tiny_ckpt, tmp_path / "real.gguf", affine=opts)
    fake = convert(tiny_ckpt, tmp_path / "fake.gguf",
                   affine=AffineOptions(bits, group_size, "mixed", method, CALIB, fake_quant=True))
    r, f = GGUFReader(str(real.path)), GGUFReader(str(fake.path))
    field = lambda rd, key: rd.fields[key].contents()  # noqa: E731
    assert field(r, "edgelm.quantization.method") == method
    assert field(r, "edgelm.quantization.recipe") == "mixed"
    assert field(r, "edgelm.quantization.bits") == bits
    assert field(r, "edgelm.quantization.group_size") == group_size
    names, tbits = field(r, "edgelm.quantization.tensor_names"), field(r, "edgelm.quantization.tensor_bits")
    assert len(names) == len(tbits) > 0 and set(tbits) <= {3, 4}
    rt = {t.name: t for t in r.tensors}
    ft = {t.name: t for t in f.tensors}
    assert rt["token_embd.weight"].tensor_type == GGMLQuantizationType.Q8_0
    for name, nb in zip(names, tbits):
        base = name.removesuffix(".weight")
        words, scales, biases = rt[name], rt[base + ".scales"], rt[base + ".biases"]
        rows, cols = ft[name].data.shape
        assert words.tensor_type == GGMLQuantizationType.I32
        assert list(words.shape) == [cols * nb // 32, rows]  # ggml order
        assert scales.tensor_type == biases.tensor_type == GGMLQuantizationType.F16
        assert list(scales.shape) == list(biases.shape) == [cols // group_size, rows]
        w = dequantize(np.asarray(words.data).view(np.uint32).reshape(rows, -1), np.asarray(scales.data),
                       np.asarray(biases.data), nb, group_size)
        assert np.array_equal(w.astype(np.float16), np.asarray(ft[name].data)), name
    if method == "rtn":  # and it is exactly the quantizer's output for an unpermuted tensor
        src = _weights(tiny_ckpt)["model.layers.1.mlp.gate_proj.weight"]
        q, s, b = quantize_rtn(src, bits, group_size)
        words = np.asarray(rt["blk.1.ffn_gate.weight"].data).view(np.uint32).reshape(q.shape[0], -1)
        assert np.array_equal(words, pack(q, bits))
        assert np.array_equal(np.asarray(rt["blk.1.ffn_gate.scales"].data), s)


def test_bad_group_size_is_one_clear_error_and_leaves_nothing(tmp_path, capsys):
    from test_convert_errors import make_folder

    folder = make_folder(tmp_path)  # hidden_size 64: rows of 64 weights
    out = tmp_path / "out.gguf"
    assert main(["convert", str(folder), "-o", str(out), "--bits", "4", "--group-size", "128"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgelm: error: ") and "group-size 128" in err[0], err
    assert [p.name for p in tmp_path.iterdir() if ".gguf" in p.name] == []


def test_affine_flags_need_bits(tmp_path, capsys):
    assert main(["convert", str(tmp_path), "-o", str(tmp_path / "o.gguf"), "--group-size", "64"]) == 1
    assert "only valid with --bits" in capsys.readouterr().err
