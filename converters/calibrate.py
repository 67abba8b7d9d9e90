"""Calibration for ``--method awq`` and ``--method gptq``: activations of the float32 HF model.

The checkpoint runs in float32 with torch/transformers on the first ``n_tokens`` tokens of the
calibration text (never the evaluation text); forward pre-hooks capture the input of every
projection of every decoder layer. From those inputs:

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

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConversionError

N_GRID = 20
SEQ_LEN = 512


@dataclass
class Calibration:
    """What the quantizer needs from calibration, keyed by HF tensor name."""

    method: str
    n_tokens: int
    seconds: float = 0.0
    weights: dict[str, np.ndarray] = field(default_factory=dict)   # AWQ-rescaled tensors (float32)
    hessians: dict[str, np.ndarray] = field(default_factory=dict)  # GPTQ: sum x x^T of the input


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


def _search_scale(x, linears: list, bits: list[int | None], group_size: int):
    """AWQ's grid search: the per-channel scale of input ``x`` [N, in] for ``linears``, or None."""
    import torch

    w = torch.cat([lin.weight for lin in linears], 0)
    ref = x @ w.T
    x_mean = x.abs().mean(0)
    best, best_s = float("inf"), None
    for k in range(N_GRID):
        alpha = k / N_GRID
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1: keeps weights well-scaled
        wq = torch.cat([lin.weight if b is None else _fake_quant(lin.weight * s, b, group_size) / s
                        for lin, b in zip(linears, bits)], 0)
        loss = (x @ wq.T - ref).pow(2).mean().item()
        if loss < best:
            best, best_s = loss, s
    return best_s  # alpha = 0 gives s = 1: never worse than no scaling on this data


def calibrate(folder: Path, calib_file: Path, method: str, bits_of: Callable[[str], int | None],
              group_size: int, n_tokens: int = 2048, n_awq_tokens: int = 512) -> Calibration:
    """Run the calibration text through the float32 model; see the module docstring.

    ``bits_of(hf_name)`` is the affine bit width the recipe gives a tensor, None if it is not
    stored affine (AWQ's search then treats it as exact).
    """
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    seqs = _tokens(folder, calib_file, n_tokens)
    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    layers = model.model.layers
    sites = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    hess: dict[str, torch.Tensor] = {}
    xs: dict[str, list] = {}
    hooks = []

    def hook_for(key: str):
        def hook(_mod, args):
            if method == "gptq":
                x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
                hess[key] = hess.get(key, 0) + x.T @ x
            kept = sum(t.shape[0] for t in xs.setdefault(key, []))
            if method == "awq" and kept < n_awq_tokens:
                xs[key].append(args[0].reshape(-1, args[0].shape[-1])[: n_awq_tokens - kept].clone())
        return hook

    for i, layer in enumerate(layers):
        for site in sites:
            hooks.append(layer.get_submodule(site).register_forward_pre_hook(hook_for(f"{i}.{site}")))
    for ids in seqs:
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    n = sum(len(s) for s in seqs)
    cal = Calibration(method, n)
    pre = "model.layers.{}."
    if method == "gptq":
        share = {"self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "self_attn.o_proj": ("self_attn.o_proj",),
                 "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj": ("mlp.down_proj",)}
        for i in range(len(layers)):
            for site, names in share.items():
                h = hess[f"{i}.{site}"].numpy()
                for name in names:
                    cal.hessians[pre.format(i) + name + ".weight"] = h
    elif method == "awq":
        for i, layer in enumerate(layers):
            _awq_layer(layer, {k.split(".", 1)[1]: torch.cat(v) for k, v in xs.items() if k.startswith(f"{i}.")},
                       lambda name, i=i: bits_of(pre.format(i) + name + ".weight"), group_size)
            for name, t in layer.named_parameters():
                cal.weights[pre.format(i) + name] = t.detach().numpy().copy()
    else:
        raise ValueError(f"calibrate: unknown method {method!r}")
    cal.seconds = time.perf_counter() - t0
    return cal


def _awq_layer(layer, xs: dict, bits_of: Callable[[str], int | None], group_size: int) -> None:
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
        s = _search_scale(xs[key], linears, [bits_of(n) for n in names], group_size)
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
