"""Attention on numpy arrays with the library's CPU backend, without torch.

Mods are mod text (docs/mod-language.md); params are Python numbers by name,
buffers numpy arrays by name, read in place (no copy) when they are
C-contiguous and of a dtype the library reads.
"""

import ctypes
import math

import numpy as np

from . import _library as L
from . import _runtime

_ATTENTION_DTYPES = {np.dtype(np.float32): L.F32, np.dtype(np.float16): L.F16}
_BUFFER_DTYPES = {np.dtype(np.float32): L.F32, np.dtype(np.float16): L.F16,
                  np.dtype(np.int32): L.I32, np.dtype(np.int64): L.I64,
                  np.dtype(np.uint8): L.U8, np.dtype(np.bool_): L.BOOL}


def _view(a, dtype_code):
    strides = [s // a.itemsize for s in a.strides]
    return L.make_tensor(a.ctypes.data, dtype_code, a.shape, strides)


def _buffer(name, a):
    a = np.asarray(a)
    if a.dtype not in _BUFFER_DTYPES:
        a = a.astype(np.float32 if a.dtype.kind == "f" else np.int32)
    if a.ndim == 0:
        a = a.reshape(1)
    if not 1 <= a.ndim <= 4:
        raise ValueError(f"buffer {name!r} has {a.ndim} dimensions; 1 to 4 are allowed")
    return np.ascontiguousarray(a)


def _mod(kind, text, params, buffers):
    if text is None:
        return None, []
    arrays = {n: _buffer(n, a) for n, a in (buffers or {}).items()}
    decls = [(n, _BUFFER_DTYPES[a.dtype], a.ndim) for n, a in arrays.items()]
    ctx = _runtime.context("cpu")
    mod = _runtime.Mod(kind, text, decls, ctx, sorted((params or {}).items()))
    mod.bind(ctx, [_view(a, _BUFFER_DTYPES[a.dtype]) for a in arrays.values()])
    return mod, list(arrays.values())


def attention(q, k, v, score_mod=None, mask_mod=None, params=None, buffers=None, scale=None,
              return_lse=False):
    """softmax(score_mod(q kᵀ scale) masked by mask_mod) v on the CPU.

    q: (B, Hq, Lq, D), k: (B, Hkv, Lkv, D), v: (B, Hkv, Lkv, Dv), float32 or
    float16, Hq a multiple of Hkv. score_mod and mask_mod are mod text
    ("30 * tanh(score / 30)", "q >= kv && doc[q] == doc[kv]"); params and
    buffers map the names they use to numbers and arrays. Returns out
    (B, Hq, Lq, Dv), or (out, lse) with return_lse (lse float32 (B, Hq, Lq)).
    """
    q, k, v = (np.asarray(x) for x in (q, k, v))
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _ATTENTION_DTYPES:
        raise ValueError(f"q, k and v must all be float32 or all float16, got {q.dtype}, "
                         f"{k.dtype} and {v.dtype}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("q, k and v must be 4-D (batch, heads, sequence, head_dim)")
    code = _ATTENTION_DTYPES[q.dtype]
    B, Hq, Lq, D = q.shape
    out = np.empty((B, Hq, Lq, v.shape[3]), dtype=q.dtype)
    lse = np.empty((B, Hq, Lq), dtype=np.float32)
    score, keep_s = _mod(L.MOD_SCORE, score_mod, params, buffers)
    mask, keep_m = _mod(L.MOD_MASK, mask_mod, params, buffers)
    ctx = _runtime.context("cpu")
    block_mask = None
    if mask is not None:
        block_mask = _runtime.CBlockMask.create(ctx, mask, B, Hq, Lq, k.shape[2], 0, 0)
    opts = L.AttentionOptions()
    opts.scale = scale if scale is not None else 1.0 / math.sqrt(D)
    tq, tk, tv, to = (_view(x, code) for x in (q, k, v, out))
    tl = L.make_tensor(lse.ctypes.data, L.F32, (B, Hq, Lq, 1), (Hq * Lq, Lq, 1, 1))
    with ctx.lock:
        ctx.check(L.lib.flex_attention(ctx.handle, ctypes.byref(tq), ctypes.byref(tk),
                                       ctypes.byref(tv), score.handle if score else None,
                                       block_mask.handle if block_mask else None,
                                       ctypes.byref(opts), ctypes.byref(to), ctypes.byref(tl)))
    del keep_s, keep_m, block_mask
    return (out, lse) if return_lse else out
