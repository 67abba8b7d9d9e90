"""Calibration for ``--method awq`` and ``--method gptq``: activations of the float32 HF model.

The checkpoint runs in float32 with torch/transformers on the first ``n_tokens`` tokens of the
calibration text (never the evaluation text), one decoder layer at a time (``_layerwise_pass``:
peak RSS stays under 1 GB); forward pre-hooks capture the input of every projection. From
those inputs:

* GPTQ gets ``H = sum x x^T`` per projection input (q/k/v share one, gate/up share one).
* AWQ (Lin et al. 2023) searches, per group of projections sharing an input, a per-input-channel
  scale ``s = mean|x|^alpha`` (alpha on a grid in [0, 1]) that minimizes the output error of the
  quantized projections, ``|X W^T - X (Q(W diag s) diag s^-1)^T|^2``. Salient input channels
  (large activations) get larger weights, hence relatively finer quantization. The inverse scale
  is folded into what produces the input -- the RMSNorm weight for q/k/v and gate/up, the rows of
  ``up_proj`` for ``down_proj``, the rows of ``v_proj`` for ``o_proj`` (only without GQA, where
  the two line up) -- so the model computes the same function and the runtime needs no change.

Scaling leaves every layer's output unchanged in exact arithmetic, so the activations of one
float forward pass serve all layers (AWQ's layer-by-layer pass gives the same inputs).
"""
from __future__ import annotations

import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConversionError
from .safetensors import Checkpoint, bf16_to_f32

N_GRID = 20
SEQ_LEN = 512
_PRE = "model.layers.{}."
_SITES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")  # distinct inputs
_SHARES = {"self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "self_attn.o_proj": ("self_attn.o_proj",),
           "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj": ("mlp.down_proj",)}
# Calibration tokens per method. GPTQ fits each weight to the Hessian of its inputs: with fewer
# tokens than a few times the input width (1,536 for SmolLM2's ffn_down) the Hessian is close to
# singular and GPTQ overfits -- on 2,048 tokens its error on held-out text was *above* RTN's for
# ffn_down, on 12,288 it is 1.3-5x below RTN's for every projection, and perplexity still
# improves up to the 49,152 tokens used by default (about all of wikitext-2-calib.txt).
# AWQ searches one scale per input channel and needs far less.
DEFAULT_TOKENS = {"gptq": 49152, "awq": 2048}


class SpillStore(Mapping):
    """Arrays by name, kept in ``.npy`` files of a private temporary directory and read back on
    access: calibration results (GPTQ's float64 Hessians are 0.8 GB for SmolLM2, AWQ's rescaled
    weights 0.4 GB) stay out of memory until the quantizer needs each one. The directory is
    removed when the store is garbage-collected or the process exits."""

    def __init__(self, prefix: str):
        self._prefix = prefix
        self._dir: Path | None = None  # made on the first put
        self._files: dict[str, Path] = {}

    def put(self, name: str, a: np.ndarray) -> None:
        self.put_shared([name], a)

    def put_shared(self, names: list[str], a: np.ndarray) -> None:
        """Store one array under several names (projections that share an input)."""
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix=f"edgelm-{self._prefix}-"))
            weakref.finalize(self, shutil.rmtree, self._dir, True)
        path = self._dir / f"{len(set(self._files.values()))}.npy"
        np.save(path, np.ascontiguousarray(a))
        for name in names:
            self._files[name] = path

    def __getitem__(self, name: str) -> np.ndarray:
        return np.load(self._files[name])

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


@dataclass
class Calibration:
    """What the quantizer needs from calibration, keyed by HF tensor name."""

    method: str
    n_tokens: int
    seconds: float = 0.0
    weights: SpillStore = field(default_factory=lambda: SpillStore("awq"))     # AWQ-rescaled tensors (float32)
    hessians: SpillStore = field(default_factory=lambda: SpillStore("gptq"))   # GPTQ: sum x x^T of the input


def _tokens(folder: Path, calib_file: Path, n_tokens: int) -> "list":
    from transformers import AutoTokenizer

    try:
        text = calib_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConversionError(f"{calib_file}: cannot read the calibration text: {exc.strerror}") from None
    ids = AutoTokenizer.from_pretrained(str(folder))(text[: n_tokens * 20])["input_ids"][:n_tokens]
    if len(ids) < 64:
        raise ConversionError(f"{calib_file}: only {len(ids)} tokens; calibration needs at least 64")
    return [ids[i:i + SEQ_LEN] for i in range(0, len(ids), SEQ_LEN) if len(ids[i:i + SEQ_LEN]) >= 16]


def _fake_quant(w, bits: int, group_size: int):
    """Min-max affine fake quantization in torch (AWQ's search quantizer: fast, no clip search)."""
    import torch

    rows, cols = w.shape
    x = w.reshape(rows, cols // group_size, group_size)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    qmax = (1 << bits) - 1
    s = ((hi - lo) / qmax).clamp(min=1e-8)
    return (torch.clamp(torch.round((x - lo) / s), 0, qmax) * s + lo).reshape(rows, cols)


def _search_scale(x, linears: list, quants: list[tuple[int, int] | None]):
    """AWQ's grid search: the per-channel scale of input ``x`` [N, in] for ``linears`` (each
    quantized at its ``(bits, group_size)``, or exact for None), or None."""
    import torch

    w = torch.cat([lin.weight for lin in linears], 0)
    ref = x @ w.T
    x_mean = x.abs().mean(0)
    best, best_s = float("inf"), None
    for k in range(N_GRID):
        alpha = k / N_GRID
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1: keeps weights well-scaled
        wq = torch.cat([lin.weight if q is None else _fake_quant(lin.weight * s, *q) / s
                        for lin, q in zip(linears, quants)], 0)
        loss = (x @ wq.T - ref).pow(2).mean().item()
        if loss < best:
            best, best_s = loss, s
    return best_s  # alpha = 0 gives s = 1: never worse than no scaling on this data


def calibrate(folder: Path, calib_file: Path, method: str, quant_of: Callable[[str], tuple[int, int] | None],
              n_tokens: int | None = None, n_awq_tokens: int = 512) -> Calibration:
    """Run the calibration text through the float32 model; see the module docstring.

    ``quant_of(hf_name)`` is the affine ``(bits, group_size)`` the recipe gives a tensor, None
    if it is not stored affine (AWQ's search then treats it as exact).
    """
    if method not in DEFAULT_TOKENS:
        raise ValueError(f"calibrate: unknown method {method!r}")
    n_tokens = n_tokens or DEFAULT_TOKENS[method]
    t0 = time.perf_counter()
    seqs = _tokens(folder, calib_file, n_tokens)
    cal = Calibration(method, sum(len(s) for s in seqs))
    if method == "gptq":
        _gptq_hessians(folder, seqs, cal)
    else:
        _awq(folder, seqs, quant_of, n_awq_tokens, cal)
    cal.seconds = time.perf_counter() - t0
    return cal


def _layerwise_pass(folder: Path, seqs: list, on_input: Callable[[str, "object"], None],
                    on_layer: Callable[[int, "object"], None]) -> None:
    """The float32 forward pass over ``seqs``, one decoder layer at a time.

    ``on_input("i.site", x)`` receives the input [tokens, in] of every projection site of layer
    ``i`` for every sequence, then ``on_layer(i, layer)`` the float32 layer itself. Only one
    float32 layer and the hidden states of the sequences (tokens x hidden x 4 bytes) are in
    memory: the layer is built from transformers' own class and loaded from the safetensors
    (then unmapped), not the whole model -- the float32 model alone would take the converter
    past 1 GB. Each layer computes exactly what it computes inside the full model (the same
    module, causal mask and rotary tables; the Hessians are bit-identical)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    from ..runtime.model import release_free_memory  # (imports numba: only when calibrating)

    torch.set_grad_enabled(False)
    with torch.device("meta"):  # classes and attention settings only, no weights
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))
    cfg, body = skeleton.config, skeleton.model
    rope = type(body.rotary_emb)(config=cfg)  # float32 tables
    ckpt = Checkpoint(folder)
    # The hidden states of all sequences in one float32 buffer [tokens, hidden], each layer's
    # output written over its input (a fresh tensor per sequence and layer fragments the heap).
    ends = np.cumsum([len(ids) for ids in seqs]).tolist()
    spans = list(zip([0] + ends[:-1], ends))
    hidden = torch.empty(ends[-1], cfg.hidden_size, dtype=torch.float32)
    for (a, b), ids in zip(spans, seqs):
        hidden[a:b] = torch.from_numpy(_embedding_rows(ckpt, ids))
    ckpt.close()
    release_free_memory()  # the tokenizer's and the loaders' leftovers
    ctx: dict[int, tuple] = {}  # sequence length -> (position ids, cos/sin, masks by layer type)
    for a, b in spans:
        if b - a not in ctx:
            h, pos = hidden[a:b].unsqueeze(0), torch.arange(b - a).unsqueeze(0)
            kw = dict(config=cfg, inputs_embeds=h, attention_mask=None, past_key_values=None, position_ids=pos)
            masks = {"full_attention": create_causal_mask(**kw)}
            if "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
                masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
            ctx[b - a] = (pos, rope(h, pos), masks)

    def hook_for(key: str):
        def hook(_mod, args):
            on_input(key, args[0].reshape(-1, args[0].shape[-1]))
        return hook

    for i in range(len(body.layers)):
        with torch.device("meta"):
            layer = type(body.layers[i])(cfg, i)
        layer = layer.to_empty(device="cpu").float().eval()
        prefix = _PRE.format(i)
        layer.load_state_dict({k: torch.from_numpy(np.array(ckpt.float32(prefix + k), np.float32))
                               for k in layer.state_dict()})
        ckpt.close()  # unmap: the checkpoint's pages would otherwise stay resident
        kind = cfg.layer_types[i] if getattr(cfg, "layer_types", None) else "full_attention"
        hooks = [layer.get_submodule(site).register_forward_pre_hook(hook_for(f"{i}.{site}")) for site in _SITES]
        try:
            for a, b in spans:
                pos, pe, masks = ctx[b - a]
                out = layer(hidden[a:b].unsqueeze(0), attention_mask=masks[kind], position_ids=pos,
                            position_embeddings=pe)
                hidden[a:b] = (out[0] if isinstance(out, tuple) else out)[0]
        finally:
            for hk in hooks:
                hk.remove()
        on_layer(i, layer)
        del layer
        release_free_memory()


def _embedding_rows(ckpt: Checkpoint, ids: list[int]) -> np.ndarray:
    """float32 rows ``ids`` of the checkpoint's token embedding, without converting the table."""
    name = "model.embed_tokens.weight"
    rows = np.asarray(ckpt.raw(name))[np.asarray(ids)]
    return bf16_to_f32(rows) if ckpt[name].dtype == "BF16" else rows.astype(np.float32)


def _awq(folder: Path, seqs: list, quant_of: Callable[[str], tuple[int, int] | None], n_awq_tokens: int,
         cal: Calibration) -> None:
    """AWQ: per layer, keep the first ``n_awq_tokens`` inputs of each projection, search and fold
    the scales, and spill the rescaled float32 layer into ``cal.weights``."""
    import torch

    xs: dict[str, list] = {}

    def keep(key: str, x) -> None:
        kept = sum(t.shape[0] for t in xs.setdefault(key, []))
        if kept < n_awq_tokens:
            xs[key].append(x[: n_awq_tokens - kept].clone())

    def fold(i: int, layer) -> None:
        _awq_layer(layer, {k.split(".", 1)[1]: torch.cat(v) for k, v in xs.items() if k.startswith(f"{i}.")},
                   lambda name: quant_of(_PRE.format(i) + name + ".weight"))
        xs.clear()
        for name, t in layer.named_parameters():
            cal.weights.put(_PRE.format(i) + name, t.detach().numpy())

    _layerwise_pass(folder, seqs, keep, fold)


def _gptq_hessians(folder: Path, seqs: list, cal: Calibration) -> None:
    """``H = sum x x^T`` (float64) of every projection's input over the calibration tokens,
    spilled into ``cal.hessians`` layer by layer. (GPTQ's sequential mode -- each layer's inputs
    taken from the layers before it already quantized -- was tried on SmolLM2 and changed
    perplexity by less than the noise: 26.33 -> 26.30 at INT4, 31.4 -> 32.1 at INT3, for 3x the
    calibration time.)"""
    import torch

    hess: dict[str, torch.Tensor] = {}

    def accumulate(key: str, x) -> None:
        x = x.to(torch.float64)
        hess[key] = hess.get(key, 0) + x.T @ x

    def spill(i: int, _layer) -> None:
        for site, names in _SHARES.items():
            h = hess.pop(f"{i}.{site}").numpy()
            cal.hessians.put_shared([_PRE.format(i) + name + ".weight" for name in names], h)

    _layerwise_pass(folder, seqs, accumulate, spill)


def _awq_layer(layer, xs: dict, quant_of: Callable[[str], tuple[int, int] | None]) -> None:
    """Search and fold AWQ scales into one decoder layer, in place."""
    att, mlp = layer.self_attn, layer.mlp
    groups = [  # (input key, module producing it, its kind, consumer names)
        ("self_attn.q_proj", layer.input_layernorm, "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("mlp.gate_proj", layer.post_attention_layernorm, "norm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.down_proj", mlp.up_proj, "rows", ("mlp.down_proj",)),
    ]
    if att.v_proj.weight.shape[0] == att.o_proj.weight.shape[1]:  # no GQA: v rows line up with o columns
        groups.insert(1, ("self_attn.o_proj", att.v_proj, "rows", ("self_attn.o_proj",)))
    for key, prev, kind, names in groups:
        linears = [layer.get_submodule(n) for n in names]
        s = _search_scale(xs[key], linears, [quant_of(n) for n in names])
        if s is None:
            continue
        for lin in linears:
            lin.weight.mul_(s)  # scale input channels (columns)
        if kind == "norm":
            prev.weight.div_(s)
        else:
            prev.weight.div_(s[:, None])  # output channels (rows) of the producing projection
            if getattr(prev, "bias", None) is not None:
                prev.bias.div_(s)
