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
    gptq = calibrate(tiny_ckpt, CALIB, "gptq", lambda name: (bits, group), n_tokens=512)
    awq = calibrate(tiny_ckpt, CALIB, "awq", lambda name: (bits, group), n_tokens=512)
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


def test_layer_by_layer_calibration_equals_the_whole_model(tiny_ckpt):
    """The calibration runs one float32 decoder layer at a time (for memory); every projection's
    Hessian must be bit for bit what hooks on transformers' whole float32 model accumulate."""
    import torch
    import transformers

    from edgelm.converters import calibrate as cal_mod

    cal = cal_mod.calibrate(tiny_ckpt, CALIB, "gptq", lambda name: (4, 32), n_tokens=1200)
    seqs = cal_mod._tokens(tiny_ckpt, CALIB, 1200)
    assert len({len(s) for s in seqs}) == 2  # full sequences and a shorter last one
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    want: dict[str, torch.Tensor] = {}

    def hook_for(key):
        def hook(_mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
            want[key] = want.get(key, 0) + x.T @ x
        return hook

    for i, layer in enumerate(model.model.layers):
        for site in cal_mod._SITES:
            layer.get_submodule(site).register_forward_pre_hook(hook_for(cal_mod._PRE.format(i) + site))
    with torch.no_grad():
        for ids in seqs:
            model(torch.tensor([ids]), use_cache=False)
    assert len(cal.hessians) == 7 * len(model.model.layers)
    for i in range(len(model.model.layers)):
        for site, names in cal_mod._SHARES.items():
            for name in names:
                got = cal.hessians[cal_mod._PRE.format(i) + name + ".weight"]
                assert np.array_equal(got, want[cal_mod._PRE.format(i) + site].numpy()), (i, name)


def test_spill_store_keeps_arrays_on_disk_until_asked():
    import gc

    from edgelm.converters.calibrate import SpillStore

    store = SpillStore("test")
    a = np.arange(12.0).reshape(3, 4)
    store.put_shared(["x", "y"], a)
    store.put("z", a[:, :2].T)  # non-contiguous input
    assert set(store) == {"x", "y", "z"} and len(store) == 3
    assert np.array_equal(store["y"], a) and np.array_equal(store["z"], a[:, :2].T)
    assert store.get("missing") is None
    folder = store._dir
    assert len(list(folder.iterdir())) == 2  # the shared array is written once
    del store
    gc.collect()
    assert not folder.exists()


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_held_out_text(tiny_ckpt, tmp_path, bits):
    """What GPTQ is for: a lower output error on text it was *not* fitted to. Fitted on too few
    tokens for its input width, GPTQ overfits and loses to RTN here (it did on SmolLM2's
    ffn_down with 2,048 tokens); the calibration is sized by tokens per input channel."""
    from edgelm.converters.calibrate import calibrate

    text = CALIB.read_text(encoding="utf-8")
    fit_file, held_file = tmp_path / "fit.txt", tmp_path / "held.txt"
    fit_file.write_text(text[: len(text) // 2], encoding="utf-8")
    held_file.write_text(text[len(text) // 2:], encoding="utf-8")
    orig = _weights(tiny_ckpt)
    group = 32
    quant = lambda name: (bits, group)  # noqa: E731
    fit = calibrate(tiny_ckpt, fit_file, "gptq", quant, n_tokens=4096)  # 16 x the widest input (256)
    held = calibrate(tiny_ckpt, held_file, "gptq", quant, n_tokens=2048)
    for layer in (0, 1):
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            key = f"model.layers.{layer}.{name}.weight"
            w = orig[key].astype(np.float32)
            q, s, b = quantize_rtn(w, bits, group)
            e_rtn = _output_error(dequantize_q(q, s, b, group) - w, held.hessians[key])
            q, s, b = quantize_gptq(w, fit.hessians[key], bits, group)
            e_gptq = _output_error(dequantize_q(q, s, b, group) - w, held.hessians[key])
            assert e_gptq < e_rtn, (key, e_gptq, e_rtn)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_with_uncorrelated_inputs_is_rtn(act_order):
    """With a diagonal Hessian no column's error can be compensated by another, so GPTQ must
    reduce to round-to-nearest with RTN's own group parameters -- in whatever order act-order
    visits the columns (each column keeps its contiguous group's scale and bias)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    h = np.diag(rng.uniform(0.1, 10.0, 256))  # distinct energies: act-order permutes every column
    q, s, b = quantize_gptq(w, h, 3, 32, act_order=act_order, refit=False)
    q_rtn, s_rtn, b_rtn = quantize_rtn(w, 3, 32)
    assert np.array_equal(s, s_rtn) and np.array_equal(b, b_rtn)
    assert np.array_equal(q, q_rtn)


def test_refit_lowers_the_output_error_for_fixed_levels(tiny_ckpt):
    from edgelm.converters.quantize_affine import refit_groups

    w = _weights(tiny_ckpt)["model.layers.1.mlp.down_proj.weight"].astype(np.float32)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4096, w.shape[1])) * np.exp(rng.normal(0, 1, w.shape[1]))  # uneven channels
    h = x.T @ x
    q, s, b = quantize_rtn(w, 3, 32)
    s2, b2 = refit_groups(w, q, s, b, h, 32)
    before = _output_error(dequantize_q(q, s, b, 32) - w, h)
    after = _output_error(dequantize_q(q, s2, b2, 32) - w, h)
    assert after < 0.9 * before, (after, before)
    assert s2.dtype == np.float16 and b2.dtype == np.float16


def test_mixed_s_recipe_notches_by_sensitivity():
    from edgelm.converters.recipe import Affine, GGMLType, TensorSite, affine_type

    def kind(name: str, layer: int, shape: tuple[int, int], bits: int, group: int):
        return affine_type(TensorSite(f"blk.{layer}.{name}.weight", shape, layer, 30, True), bits, group, "mixed-s")

    for layer in range(30):
        assert kind("attn_v", layer, (192, 576), 4, 64) is GGMLType.Q8_0        # 576-wide rows: no Q6_K
        assert kind("ffn_down", layer, (576, 1536), 4, 64) is GGMLType.Q6_K
        assert kind("attn_output", layer, (576, 576), 4, 64) == Affine(4, 64)
        assert kind("attn_q", layer, (576, 576), 4, 64) == Affine(4, 64)
        up = kind("ffn_up", layer, (1536, 576), 4, 64)
        assert up == (GGMLType.Q8_0 if layer >= 19 else Affine(4, 64))        # the last 3/8: 11 of 30
    # a 3-bit file notches up to 4 bits in groups of 64, whatever its own group size
    assert kind("attn_v", 0, (192, 576), 3, 32) == Affine(4, 64)
    assert kind("ffn_gate", 0, (1536, 576), 3, 32) == Affine(3, 32)


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
        # notched-up 4-bit tensors of a 3-bit file take groups of at least 64 (recipe.NOTCH_GROUP)
        g = group_size if nb == bits else max(group_size, 64)
        assert list(scales.shape) == list(biases.shape) == [cols // g, rows]
        w = dequantize(np.asarray(words.data).view(np.uint32).reshape(rows, -1), np.asarray(scales.data),
                       np.asarray(biases.data), nb, g)
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
