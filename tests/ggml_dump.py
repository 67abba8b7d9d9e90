"""llama.cpp's intermediate tensors, captured with its graph callback (``cb_eval``), for op-level
bit-exactness tests of kernels/ggml_math.py against the engine it reproduces."""
from __future__ import annotations

import ctypes

import numpy as np


class _Tensor(ctypes.Structure):
    """``struct ggml_tensor`` (ggml.h, GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10,
    GGML_MAX_NAME 64)."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


OP_MUL_MAT, OP_ROPE = 29, 48  # enum ggml_op values of this ggml version (checked by the test)
_DTYPES = {0: np.float32, 1: np.float16}  # GGML_TYPE_F32, GGML_TYPE_F16


def _array(t: _Tensor) -> np.ndarray | None:
    """A copy of an F32/F16 tensor's data, numpy shape ne[::-1] (strided views included)."""
    dt = _DTYPES.get(t.type)
    if dt is None or not t.data:
        return None
    ne, nb = list(t.ne), list(t.nb)
    item = np.dtype(dt).itemsize
    span = sum((ne[i] - 1) * nb[i] for i in range(4)) + item
    raw = np.frombuffer((ctypes.c_uint8 * span).from_address(t.data), dtype=np.uint8)
    return np.lib.stride_tricks.as_strided(raw[: span - span % item].view(dt), shape=ne[::-1],
                                           strides=nb[::-1]).copy()


def decode_and_capture(llama_cpp, path: str, ids: list[int], step: int) -> list[tuple[str, int, np.ndarray]]:
    """Evaluate ``ids`` one token at a time (n_batch=1: llama.cpp's decoding path) and return
    (name, op, data) of every F32/F16 tensor computed for token ``step``, in graph order."""
    from llama_cpp import llama_cpp as lib
    from llama_cpp._internals import LlamaBatch, LlamaContext

    captured: list[tuple[str, int, np.ndarray]] = []
    active = [False]

    def callback(ptr, ask, _user):
        if not ask and active[0]:
            t = _Tensor.from_address(ptr)
            a = _array(t)
            if a is not None:
                captured.append((t.name.decode(), t.op, a))
        return True

    cb = lib.ggml_backend_sched_eval_callback(callback)
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_batch=1, n_ubatch=1, n_threads=2, n_threads_batch=2,
                          verbose=False)
    params = llm.context_params
    params.cb_eval = cb
    llm._ctx = LlamaContext(model=llm._model, params=params, verbose=False)
    llm._batch = LlamaBatch(n_tokens=1, embd=0, n_seq_max=1, verbose=False)
    try:
        for i, tok in enumerate(ids[: step + 1]):
            active[0] = i == step
            llm.eval([tok])
    finally:
        llm.close()
    return captured
