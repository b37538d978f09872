"""Dense attention references for the parity tests, sharing nothing with the
library: the mods run as torch ops on broadcast index grids (int32, as in
torch's flex_attention), in float64 (the oracle) or in the inputs' dtype
(the naive same-precision reference that bounds the error a kernel may
have)."""

import math

import torch


def _over_bhqkv(fn, has_score):
    """fn applied at every (b, h, q, kv) with the index tensors as 0-d
    int32 values, as torch's flex_attention evaluates mods (vmap)."""
    prefix = (0,) if has_score else ()
    for dims in [(None, None, None, 0), (None, None, 0, None), (None, 0, None, None),
                 (0, None, None, None)]:
        fn = torch.vmap(fn, in_dims=prefix + dims, out_dims=0)
    return fn


def dense_attention(q, k, v, score_mod=None, mask_mod=None, scale=None, dtype=torch.float64):
    """(out, lse) of softmax(score_mod(q kᵀ scale) masked) v, differentiable,
    computed in `dtype`. Rows without an attended key give out 0, lse -inf."""
    B, Hq, Lq, D = q.shape
    Hkv, Lkv = k.shape[1], k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    if Hq != Hkv:
        kd = kd.repeat_interleave(Hq // Hkv, dim=1)
        vd = vd.repeat_interleave(Hq // Hkv, dim=1)
    score = (qd @ kd.transpose(-1, -2)) * scale
    dev = q.device
    idx = [torch.arange(n, device=dev, dtype=torch.int32) for n in (B, Hq, Lq, Lkv)]
    if score_mod is not None:
        score = _over_bhqkv(score_mod, True)(score, *idx).to(dtype)
    if mask_mod is not None:
        keep = _over_bhqkv(mask_mod, False)(*idx).expand(B, Hq, Lq, Lkv)
        score = score.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(score, dim=-1)
    empty = torch.isneginf(lse)
    p = torch.exp(score - torch.where(empty, torch.zeros_like(lse), lse).unsqueeze(-1))
    out = p @ vd
    return out, lse


def max_error(a, b):
    """max |a - b| over finite positions, the -inf positions required equal."""
    a, b = a.detach().double(), b.detach().double()
    inf_a, inf_b = torch.isinf(a), torch.isinf(b)
    assert torch.equal(inf_a, inf_b), "infinities differ"
    if (~inf_a).sum() == 0:
        return 0.0
    return float((a[~inf_a] - b[~inf_a]).abs().max())
