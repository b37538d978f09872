"""The mod zoo: flexattn's CUDA forward against torch's compiled flex_attention
on mods collected from attention-gym, PyTorch's flex_attention tests and
papers, on several shapes.

Every mod is written once, as torch code: the same callables go to torch's
flex_attention and to flexattn.torch (the one-import route, translated by the
package's tracer). `softcap_tanh_approx` calls attention-gym's approximate
tanh op `approx::tanh` (Inductor lowers it to PTX tanh.approx.f32 on torch's
side; flexattn's tracer reads it as the language's tanh_approx).

GPU run (writes bench/results/zoo-<device>.md and .jsonl):
    python3 bench/gpu/zoo.py [--rounds N] [--mods a,b] [--shapes main,d64,...]
  - torch side: torch.compile(flex_attention, dynamic=False), default mode;
    the settings are written in the result files;
  - timing: in one process, A B A B interleaved rounds, CUDA events around
    each call on both sides, medians;
  - FLOPs (torch's convention, attention-gym's benchmark): 2 * B * Hq * Lq *
    Lkv * (D + Dv) * density, density = 1 - sparsity of torch's block mask
    (1 without a mask mod), the same count for both sides;
  - check: every timed configuration's output is compared with flexattn's CPU
    backend on batch 0 and the first two query heads (all rows, all keys: the
    mods see the same b, h, q, kv), by the parity rule of python/tests:
    max|flexattn - cpu| <= max(2 * max|torch - cpu|, floor); torch's own
    error must stay under 8 floors (else the two sides do not compute the
    same mod). A failed check exits non-zero and writes nothing.
  - every row is also appended, as it is measured, to PREFIX.partial.jsonl
    (removed once the results are written, or when a check fails), so that a
    run stopped by a time limit leaves its checked rows behind.

Combining runs (one per shape, say, each within a time limit) into one result:
    python3 bench/gpu/zoo.py --combine a.jsonl,b.partial.jsonl --out PREFIX
  the rows of every file in order (one device and one commit; a row of a
  later file replaces an earlier one of the same shape and mod), written as
  a GPU run writes them.

CPU dry run (no GPU, no timing, writes nothing):
    python3 bench/gpu/zoo.py --cpu-dry-run
  every mod at tiny shapes, flexattn's CPU backend against torch's eager
  flex_attention on the CPU and an fp64 dense reference.
"""
import argparse
import datetime
import json
import math
import os
import statistics
import sys

import torch

ZOO = {}


def zoo(name, source, differentiable=True, mask_reads_bh=False):
    """Registers make(B, H, Lq, Lkv, device) -> (score_mod, mask_mod, flexattn_score_mod);
    flexattn_score_mod None means the same callable as torch's. mask_reads_bh:
    torch's block mask is built per (b, h) (otherwise broadcast, as torch
    users do: a dense B x H x Lq x Lkv evaluation is gigabytes at S8192)."""
    def register(make):
        ZOO[name] = dict(make=make, source=source, differentiable=differentiable,
                         mask_reads_bh=mask_reads_bh)
        return make
    return register


def _doc_ids(n, device, mean=1000):
    """Uneven documents of about `mean` tokens (at least 3 documents)."""
    mean = max(4, min(mean, n // 3))
    lens = [mean // 2, mean, (3 * mean) // 2, mean // 4 + 1, 2 * mean]
    ids, d = [], 0
    while len(ids) < n:
        ids += [d] * lens[d % len(lens)]
        d += 1
    return torch.tensor(ids[:n], dtype=torch.int32, device=device)


def _image_side(n):
    """(height, width) of an image of n tokens, width a power of two."""
    w = 1 << max(1, (int(math.isqrt(n)) - 1).bit_length())
    return max(1, n // w), w


# ---------------------------------------------------------------- the zoo

@zoo("noop", "baseline")
def _noop(B, H, Lq, Lkv, dev):
    return None, None, None


@zoo("causal", "attention-gym masks/causal")
def _causal(B, H, Lq, Lkv, dev):
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx
    return None, causal, None


@zoo("causal_score", "PyTorch test_flex_attention (causal as a score mod)")
def _causal_score(B, H, Lq, Lkv, dev):
    def causal_score(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx, score, -float("inf"))
    return causal_score, None, None


@zoo("sliding_window", "attention-gym masks/sliding_window (Mistral)")
def _sliding(B, H, Lq, Lkv, dev):
    W = max(8, Lkv // 8)

    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= W)
    return None, sliding_window, None


@zoo("sliding_window_score", "sliding window written as a score mod")
def _sliding_score(B, H, Lq, Lkv, dev):
    W = max(8, Lkv // 8)

    def sliding_window_score(score, b, h, q_idx, kv_idx):
        keep = (q_idx >= kv_idx) & (q_idx - kv_idx <= W)
        return torch.where(keep, score, -float("inf"))
    return sliding_window_score, None, None


@zoo("dilated_window", "dilated sliding window (Longformer, Beltagy et al. 2020)")
def _dilated(B, H, Lq, Lkv, dev):
    W, DIL = max(8, Lkv // 16), 4

    def dilated_window(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d >= 0) & (d <= W * DIL) & (d % DIL == 0)
    return None, dilated_window, None


@zoo("global_sliding", "Longformer / BigBird global + sliding, global tokens in a bool buffer")
def _global_sliding(B, H, Lq, Lkv, dev):
    W = max(8, Lkv // 16)
    n = max(Lq, Lkv)
    is_global = torch.zeros(n, dtype=torch.bool, device=dev)
    is_global[:: max(2, n // 16)] = True

    def global_sliding(b, h, q_idx, kv_idx):
        window = (q_idx - kv_idx).abs() <= W
        return window | is_global[kv_idx] | is_global[q_idx]
    return None, global_sliding, None


@zoo("natten_1d", "NATTEN 1-D neighborhood attention (Hassani et al. 2023)")
def _natten1d(B, H, Lq, Lkv, dev):
    K = max(3, (Lkv // 16) | 1)

    def natten_1d(b, h, q_idx, kv_idx):
        centre = q_idx.clamp(K // 2, (Lkv - 1) - K // 2)
        return (centre - kv_idx).abs() <= K // 2
    return None, natten_1d, None


@zoo("natten_2d", "attention-gym masks/natten (2-D neighborhood over an image)")
def _natten2d(B, H, Lq, Lkv, dev):
    IH, IW = _image_side(Lkv)
    K_H, K_W = 7, 7

    def natten_2d(b, h, q_idx, kv_idx):
        q_x, q_y = q_idx // IW, q_idx % IW
        kv_x, kv_y = kv_idx // IW, kv_idx % IW
        kernel_x = q_x.clamp(K_H // 2, (IH - 1) - K_H // 2)
        kernel_y = q_y.clamp(K_W // 2, (IW - 1) - K_W // 2)
        return ((kernel_x - kv_x).abs() <= K_H // 2) & ((kernel_y - kv_y).abs() <= K_W // 2)
    return None, natten_2d, None


@zoo("sliding_tile_2d", "sliding tile attention (STA, Zhang et al. 2025): windows of whole tiles")
def _sta(B, H, Lq, Lkv, dev):
    IH, IW = _image_side(Lkv)
    T = 4 if IW >= 8 else 1          # tile side in tokens
    WT = 1                           # window radius in tiles
    TW = max(1, IW // T)

    def sliding_tile(b, h, q_idx, kv_idx):
        q_tx, q_ty = (q_idx // IW) // T, (q_idx % IW) // T
        k_tx, k_ty = (kv_idx // IW) // T, (kv_idx % IW) // T
        q_tx = q_tx.clamp(WT, max(WT, IH // T - 1 - WT))
        q_ty = q_ty.clamp(WT, max(WT, TW - 1 - WT))
        return ((q_tx - k_tx).abs() <= WT) & ((q_ty - k_ty).abs() <= WT)
    return None, sliding_tile, None


@zoo("block_causal", "block diffusion (BD3-LM, Arriola et al. 2025): causal over blocks")
def _block_diffusion(B, H, Lq, Lkv, dev):
    BS = max(4, Lkv // 32)

    def block_causal(b, h, q_idx, kv_idx):
        return q_idx // BS >= kv_idx // BS
    return None, block_causal, None


@zoo("prefix_lm_documents", "attention-gym prefix LM, per document (packed sequences)")
def _prefix_docs(B, H, Lq, Lkv, dev):
    n = max(Lq, Lkv)
    doc = _doc_ids(n, dev, mean=max(8, n // 8))
    starts = torch.zeros(int(doc.max()) + 1, dtype=torch.int32, device=dev)
    for d in range(int(doc.max()) + 1):
        starts[d] = int((doc == d).nonzero()[0])
    P = max(2, n // 64)

    def prefix_lm_documents(b, h, q_idx, kv_idx):
        same = doc[q_idx] == doc[kv_idx]
        prefix = kv_idx - starts[doc[kv_idx]] < P
        return same & (prefix | (q_idx >= kv_idx))
    return None, prefix_lm_documents, None


@zoo("document_causal", "attention-gym masks/document_mask")
def _doc_causal(B, H, Lq, Lkv, dev):
    doc = _doc_ids(max(Lq, Lkv), dev)

    def document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[q_idx] == doc[kv_idx])
    return None, document_causal, None


@zoo("t5_bucketed_bias", "T5 relative position bias, bucketed (Raffel et al. 2020)")
def _t5(B, H, Lq, Lkv, dev):
    NB, MAXD = 32, 128
    g = torch.Generator().manual_seed(5)
    table = (torch.randn(H, NB, generator=g) * 0.5).to(dev)
    half, exact = NB // 2, NB // 4

    def t5_bias(score, b, h, q_idx, kv_idx):
        rel = kv_idx - q_idx
        side = torch.where(rel > 0, half, 0)
        n = rel.abs()
        large = exact + (torch.log(n.float() / exact + 1e-6) / math.log(MAXD / exact)
                         * (half - exact)).int()
        large = torch.clamp(large, 0, half - 1)
        bucket = side + torch.where(n < exact, n, large)
        return score + table[h, bucket]
    return t5_bias, None, None


@zoo("alibi", "ALiBi (Press et al. 2022), attention-gym mods/alibi, slopes in a buffer")
def _alibi(B, H, Lq, Lkv, dev):
    slopes = torch.exp2(-8.0 * torch.arange(1, H + 1, device=dev, dtype=torch.float32) / H)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx
    return alibi, causal, None


@zoo("head_scale_clamp", "per-head scale and clamp (PyTorch tests: head_offset, logit clip)")
def _head_scale_clamp(B, H, Lq, Lkv, dev):
    scale = torch.linspace(0.5, 1.5, H, device=dev)
    clip = torch.linspace(1.0, 4.0, H, device=dev)

    def head_scale_clamp(score, b, h, q_idx, kv_idx):
        return torch.clamp(score * scale[h], -clip[h], clip[h])
    return head_scale_clamp, None, None


@zoo("softcap_tanh", "Gemma 2 soft-capping, attention-gym mods/softcapping")
def _softcap(B, H, Lq, Lkv, dev):
    def softcap(score, b, h, q_idx, kv_idx):
        return 30.0 * torch.tanh(score / 30.0)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx
    return softcap, causal, None


@zoo("softcap_tanh_approx", "attention-gym mods/softcapping (approximate tanh op approx::tanh)")
def _softcap_approx(B, H, Lq, Lkv, dev):
    tanh_approx = _approx_tanh_op(lower=dev != "cpu")

    def softcap_approx(score, b, h, q_idx, kv_idx):
        return 30.0 * tanh_approx(score / 30.0)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx
    if dev == "cpu":
        # torch's eager CPU flex_attention vmaps the mod, and the custom op
        # has no vmap rule: torch's side gets the exact tanh there
        def softcap_exact(score, b, h, q_idx, kv_idx):
            return 30.0 * torch.tanh(score / 30.0)
        return softcap_exact, causal, softcap_approx
    return softcap_approx, causal, None


@zoo("trig", "PyTorch test_flex_attention _trig: sin/cos of the score, tan of an index")
def _trig(B, H, Lq, Lkv, dev):
    def trig(score, b, h, m, n):
        return torch.sin(torch.cos(score)) + torch.tan(b)
    return trig, None, None


@zoo("trig2", "PyTorch test_flex_attention _trig2")
def _trig2(B, H, Lq, Lkv, dev):
    def trig2(score, b, h, m, n):
        return torch.cos(score) * torch.sin(score) * torch.tan(h + 1)
    return trig2, None, None


@zoo("gather_3d_int", "score bias gathered from a 3-D int buffer indexed by (b, q, kv)")
def _gather3d(B, H, Lq, Lkv, dev):
    g = torch.Generator().manual_seed(3)
    table = torch.randint(-8, 8, (B, Lq, Lkv), generator=g, dtype=torch.int32).to(dev)

    def gather_3d(score, b, h, q_idx, kv_idx):
        return score + table[b, q_idx, kv_idx] * 0.125
    return gather_3d, None, None


@zoo("per_bh_length", "padding mask from per-(batch, head) lengths in a buffer",
     mask_reads_bh=True)
def _per_bh(B, H, Lq, Lkv, dev):
    g = torch.Generator().manual_seed(4)
    length = torch.randint(max(1, Lkv // 4), Lkv + 1, (B, H), generator=g,
                           dtype=torch.int32).to(dev)

    def per_bh_length(b, h, q_idx, kv_idx):
        return kv_idx < length[b, h]
    return None, per_bh_length, None


@zoo("rel_bias", "PyTorch test_flex_attention _rel_bias")
def _rel_bias(B, H, Lq, Lkv, dev):
    def rel_bias(score, b, h, m, n):
        return score + (m - n) * 0.01
    return rel_bias, None, None


@zoo("learnable_rel_bias", "attention-gym relative position bias table, indexed by (h, q - kv)")
def _learned_rel(B, H, Lq, Lkv, dev):
    g = torch.Generator().manual_seed(6)
    bias = (torch.randn(H, Lq + Lkv, generator=g) * 0.5).to(dev)

    def rel_table(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx - kv_idx + Lkv]
    return rel_table, None, None


@zoo("checkerboard", "PyTorch test_flex_attention _checkerboard")
def _checkerboard(B, H, Lq, Lkv, dev):
    def checkerboard(score, b, h, q_idx, kv_idx):
        return torch.where(torch.abs(kv_idx - q_idx) % 2 == 0, score * 2.0, score * 0.5)
    return checkerboard, None, None


@zoo("squared", "PyTorch test_flex_attention _squared")
def _squared(B, H, Lq, Lkv, dev):
    def squared(score, b, h, m, n):
        return score * score * 0.1
    return squared, None, None


@zoo("document_score", "PyTorch tests document masking as a score mod (int buffer)")
def _doc_score(B, H, Lq, Lkv, dev):
    doc = _doc_ids(max(Lq, Lkv), dev)

    def document_score(score, b, h, q_idx, kv_idx):
        return torch.where(doc[q_idx] == doc[kv_idx], score, -float("inf"))
    return document_score, None, None


def _approx_tanh_op(lower):
    """attention-gym's approximate tanh: the custom op approx::tanh (torch.tanh
    in eager mode), lowered by Inductor to PTX tanh.approx.f32 when `lower`.
    flexattn's tracer reads the op as the language's tanh_approx."""
    import torch.library
    if not hasattr(torch.ops.approx, "tanh"):
        @torch.library.custom_op("approx::tanh", mutates_args=())
        def tanh_approx(inp: torch.Tensor) -> torch.Tensor:
            return torch.tanh(inp)

        @tanh_approx.register_fake
        def _(inp):
            return torch.tanh(inp)
    op = torch.ops.approx.tanh
    if lower and not getattr(_approx_tanh_op, "lowered", False):
        try:
            from functools import partial

            from torch._inductor.lowering import make_pointwise, register_lowering
            from torch._inductor.virtualized import ops

            def lowering(inp):
                fn = partial(ops.inline_asm_elementwise, asm="tanh.approx.f32 $0, $1;")
                return make_pointwise(fn)(inp)
            register_lowering(torch.ops.approx.tanh)(lowering)
            _approx_tanh_op.lowered = True
        except Exception as e:  # then torch's side computes the exact tanh: say so
            print(f"approximate tanh lowering unavailable ({type(e).__name__}: {e}); "
                  f"torch's side of softcap_tanh_approx uses the exact tanh")
    return op


# ---------------------------------------------------------------- shapes

# torch's tiles where its default ones need more shared memory than there is
SMALL_TILES = {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 1}

SHAPES = {  # name: B, Hq, Hkv, Lq, Lkv, D, Dv
    "main": (4, 16, 16, 8192, 8192, 128, 128),
    "d64": (4, 16, 16, 4096, 4096, 64, 64),
    "d256": (2, 8, 8, 4096, 4096, 256, 256),
    "dv64": (4, 16, 16, 4096, 4096, 128, 64),
    "gqa": (2, 32, 8, 4096, 4096, 128, 128),
    "lq_ne_lkv": (4, 16, 16, 1024, 8192, 128, 128),
}
DRY_SHAPES = {
    "tiny": (2, 4, 4, 96, 96, 16, 16),
    "tiny_gqa_dv": (1, 4, 2, 64, 128, 16, 24),
}
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# ---------------------------------------------------------------- helpers

def _over_bhqkv(fn, has_score):
    prefix = (0,) if has_score else ()
    for dims in [(None, None, None, 0), (None, None, 0, None), (None, 0, None, None),
                 (0, None, None, None)]:
        fn = torch.vmap(fn, in_dims=prefix + dims, out_dims=0)
    return fn


def dense_reference(q, k, v, score_mod, mask_mod, dtype=torch.float64):
    """softmax(score_mod(q k^T / sqrt(D)) masked) v in `dtype`, mods evaluated
    with torch (vmap, int32 indices, as torch's flex_attention)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lkv = k.shape[1], k.shape[2]
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    if Hq != Hkv:
        kd, vd = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (kd, vd))
    score = (qd @ kd.transpose(-1, -2)) / math.sqrt(D)
    idx = [torch.arange(n, device=q.device, dtype=torch.int32) for n in (B, Hq, Lq, Lkv)]
    if score_mod is not None:
        score = _over_bhqkv(score_mod, True)(score, *idx).to(dtype)
    if mask_mod is not None:
        keep = _over_bhqkv(mask_mod, False)(*idx).expand(B, Hq, Lq, Lkv)
        score = score.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(score, dim=-1)
    shift = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    return torch.exp(score - shift.unsqueeze(-1)) @ vd, lse


def max_error(a, b):
    """max |a - b| over finite positions; the infinities must match."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.equal(torch.isinf(a), torch.isinf(b)):
        return float("inf")
    fin = ~torch.isinf(a)
    return float((a[fin] - b[fin]).abs().max()) if fin.any() else 0.0


def build(name, shape, dev):
    """The mods of zoo entry `name` for `shape` on `dev`: torch's score mod,
    mask mod and flexattn's score mod."""
    B, Hq, Hkv, Lq, Lkv, D, Dv = shape
    score_mod, mask_mod, fa_score = ZOO[name]["make"](B, Hq, Lq, Lkv, dev)
    return score_mod, mask_mod, fa_score if fa_score is not None else score_mod


def flexattn_call(fa, q, k, v, fa_score, mask_mod, block=128, return_lse=False):
    B, Hq, Lq, Lkv = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    bm = None
    if mask_mod is not None:
        bm = fa.create_block_mask(mask_mod, B, Hq, Lq, Lkv, device=q.device, BLOCK_SIZE=block)
    return fa.flex_attention(q, k, v, score_mod=fa_score, block_mask=bm,
                             enable_gqa=Hq != k.shape[1], return_lse=return_lse)


def inputs(shape, dtype, dev, seed=0, requires_grad=False):
    B, Hq, Hkv, Lq, Lkv, D, Dv = shape
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=dev, dtype=dtype)  # noqa: E731
    q, k, v = mk(B, Hq, Lq, D), mk(B, Hkv, Lkv, D), mk(B, Hkv, Lkv, Dv)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_()
    return q, k, v


# ---------------------------------------------------------------- CPU dry run

def dry_check(name, shape, dtype=torch.float32, backward=True):
    """flexattn's CPU backend against torch's eager CPU flex_attention and the
    fp64 dense reference at a tiny shape; raises AssertionError on a miss.
    Returns a one-line summary."""
    import flexattn.torch as fa
    from torch.nn.attention import flex_attention as tf
    B, Hq, Hkv, Lq, Lkv, D, Dv = shape
    score_mod, mask_mod, fa_score = build(name, shape, "cpu")
    q, k, v = inputs(shape, dtype, "cpu", requires_grad=backward)
    out = flexattn_call(fa, q, k, v, fa_score, mask_mod, block=32)
    ref, _ = dense_reference(q, k, v, score_mod, mask_mod)
    naive, _ = dense_reference(q, k, v, score_mod, mask_mod, dtype=dtype)
    try:
        bm = None
        if mask_mod is not None:
            bm = tf.create_block_mask(mask_mod, B, Hq, Lq, Lkv, device="cpu", BLOCK_SIZE=32)
        with torch.no_grad():
            theirs = tf.flex_attention(q.detach(), k.detach(), v.detach(), score_mod=score_mod,
                                       block_mask=bm, enable_gqa=Hq != Hkv)
        torch_err, against = max_error(theirs, ref), "torch flex"
    except (NotImplementedError, RuntimeError):
        # torch's eager CPU path cannot trace some mods (data-dependent
        # indexing): the naive same-precision attention bounds these
        torch_err, against = max_error(naive, ref), "naive"
    err = max_error(out, ref)
    floor = FLOOR[dtype]
    assert err <= max(2 * torch_err, floor), \
        f"{name} {shape}: out error {err:.3g} vs {against} {torch_err:.3g}"
    line = f"{name:24s} out err {err:.2e} ({against} {torch_err:.2e})"
    if backward and ZOO[name]["differentiable"]:
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
        ours = torch.autograd.grad(out, (q, k, v), dout)
        refg = torch.autograd.grad(ref, (q, k, v), dout.double())
        naiveg = torch.autograd.grad(naive, (q, k, v), dout)
        for label, a, r, n in zip(("dq", "dk", "dv"), ours, refg, naiveg):
            e, ne = max_error(a, r), max_error(n, r)
            assert e <= max(2 * ne, floor * max(1.0, float(r.abs().max()))), \
                f"{name} {shape}: {label} error {e:.3g} vs naive {ne:.3g}"
        line += ", gradients ok"
    return line


def cpu_dry_run(mods):
    failed = 0
    for shape_name, shape in DRY_SHAPES.items():
        for name in mods:
            try:
                print(f"[{shape_name}] " + dry_check(name, shape), flush=True)
            except AssertionError as e:
                print(f"[{shape_name}] FAILED {e}", flush=True)
                failed += 1
    print(f"{len(mods) * len(DRY_SHAPES) - failed} passed, {failed} failed (CPU dry run: "
          f"no timing, nothing written)")
    return 1 if failed else 0


# ---------------------------------------------------------------- GPU run

def _commit():
    """FLEXATTN_COMMIT when set (a copied tree's git may be stale), else HEAD."""
    from bench_results import commit_id
    return commit_id(os.path.dirname(os.path.abspath(__file__)))


def _cpu_check(fa_cpu_call, out_gpu, theirs_gpu, q, k, v, dtype):
    """flexattn CUDA and torch outputs against flexattn's CPU backend on batch
    0 and query heads 0-1 with their kv heads (the mods see the same b, h, q
    and kv as on the GPU): (flexattn err, torch err, floor)."""
    Hq, Hkv = q.shape[1], k.shape[1]
    hs = min(2, Hq)
    group = Hq // Hkv
    kv_hi = (hs - 1) // group + 1  # kv heads 0 .. kv_hi-1 serve query heads 0 .. hs-1
    ref = fa_cpu_call(q[:1, :hs].cpu(), k[:1, :kv_hi].cpu(), v[:1, :kv_hi].cpu()).float()
    e_ours = max_error(out_gpu[:1, :hs], ref)
    e_torch = max_error(theirs_gpu[:1, :hs], ref)
    return e_ours, e_torch, FLOOR[dtype]


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "none"


def gpu_run(args):
    import flexattn.torch as fa
    from torch.nn.attention.flex_attention import create_block_mask
    from compiled_flex import RECOMPILE_LIMIT, compiled_flex_attention  # beside this script
    dev = "cuda"
    dtype = torch.bfloat16
    device_name = torch.cuda.get_device_name()
    tag = "h200" if "H200" in device_name else "h100" if "H100" in device_name else "gpu"
    prefix = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                      "results", f"zoo-{tag}")
    compile_settings = dict(fn="torch.compile(flex_attention, dynamic=False)", mode="default",
                            fullgraph=False, kernel_options=None, torch=torch.__version__,
                            triton=_triton_version(), recompile_limit=RECOMPILE_LIMIT)
    flex = compiled_flex_attention()
    commit = _commit()
    partial_path = prefix + ".partial.jsonl"
    partial = open(partial_path, "w")
    mods = args.mods.split(",") if args.mods else list(ZOO)
    shapes = args.shapes.split(",") if args.shapes else list(SHAPES)
    rows = []
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        B, Hq, Hkv, Lq, Lkv, D, Dv = shape
        q, k, v = inputs(shape, dtype, dev)
        for name in mods:
            score_mod, mask_mod, fa_score = build(name, shape, dev)
            bh = (B, Hq) if ZOO[name]["mask_reads_bh"] else (None, None)
            bm = (create_block_mask(mask_mod, *bh, Lq, Lkv, device=dev)
                  if mask_mod is not None else None)
            density = 1.0 if bm is None else 1.0 - bm.sparsity() / 100.0
            fa_bm = (fa.create_block_mask(mask_mod, B, Hq, Lq, Lkv, device=dev)
                     if mask_mod is not None else None)

            torch_options = None

            def run_torch():
                return flex(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=Hq != Hkv,
                            kernel_options=torch_options)

            def run_ours():
                return fa.flex_attention(q, k, v, score_mod=fa_score, block_mask=fa_bm,
                                         enable_gqa=Hq != Hkv)
            try:  # compile / JIT, then the check
                theirs = run_torch()
            except Exception as e:  # torch's default tiles may not fit: its smaller ones
                print(f"{shape_name:10s} {name:24s} torch failed at its default tiles "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); timed with "
                      f"kernel_options={SMALL_TILES}", flush=True)
                torch_options = SMALL_TILES
                theirs = run_torch()
            ours = run_ours()
            torch.cuda.synchronize()

            def cpu_call(qc, kc, vc):
                # the full shape: buffers made from seeded generators get the
                # same values as the GPU's
                _, mm, fs = build(name, shape, "cpu")
                return flexattn_call(fa, qc, kc, vc, fs, mm)
            e_ours, e_torch, floor = _cpu_check(cpu_call, ours, theirs, q, k, v, dtype)
            ok = e_ours <= max(2 * e_torch, floor) and e_torch <= 8 * floor
            print(f"{shape_name:10s} {name:24s} check: flexattn {e_ours:.3g}, torch "
                  f"{e_torch:.3g} (floor {floor:g}) {'ok' if ok else 'FAILED'}", flush=True)
            if not ok:
                print("a check failed: no results written")
                partial.close()
                os.remove(partial_path)
                return 1
            for _ in range(args.warmup):
                run_torch(), run_ours()
            times = {"torch": [], "flexattn": []}
            for _ in range(args.rounds):  # A B A B
                for label, fn in (("flexattn", run_ours), ("torch", run_torch)):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                        enable_timing=True)
                    a.record()
                    fn()
                    b.record()
                    torch.cuda.synchronize()
                    times[label].append(a.elapsed_time(b))
            fa_ms, t_ms = statistics.median(times["flexattn"]), statistics.median(times["torch"])
            flops = 2.0 * B * Hq * Lq * Lkv * (D + Dv) * density
            row = dict(mod=name, source=ZOO[name]["source"], commit=commit, device=device_name,
                       torch_kernel_options=torch_options,
                       shape=shape_name, B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lkv=Lkv, D=D, Dv=Dv,
                       dtype="bf16", density=density, flexattn_ms=fa_ms, torch_ms=t_ms,
                       speedup=t_ms / fa_ms, flexattn_tflops=flops / fa_ms / 1e9,
                       torch_tflops=flops / t_ms / 1e9, check_err=e_ours, torch_check_err=e_torch,
                       rounds=args.rounds, torch_compile=compile_settings)
            rows.append(row)
            partial.write(json.dumps(row) + "\n")
            partial.flush()
            print(f"{shape_name:10s} {name:24s} flexattn {fa_ms:8.3f} ms  torch {t_ms:8.3f} ms  "
                  f"{row['speedup']:.2f}x", flush=True)
            del theirs, ours
    write_results(prefix, rows, compile_settings, device_name, commit, args.rounds)
    partial.close()
    os.remove(partial_path)
    return 0


def combine(paths, prefix):
    """The rows of several runs' .jsonl (or .partial.jsonl) files as one
    result, written by write_results; 1 with a message when they come from
    different devices or commits or hold no row."""
    rows = {}
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            rows[(r["shape"], r["mod"])] = r
    rows = list(rows.values())
    if not rows:
        print("no rows to combine")
        return 1
    for key in ("device", "commit"):
        values = sorted({r[key] for r in rows})
        if len(values) > 1:
            print(f"rows of different {key}s ({', '.join(values)}): not combined")
            return 1
    order = list(SHAPES)
    rows.sort(key=lambda r: order.index(r["shape"]) if r["shape"] in order else len(order))
    rounds = sorted({r["rounds"] for r in rows})
    write_results(prefix, rows, rows[0]["torch_compile"], rows[0]["device"], rows[0]["commit"],
                  "/".join(str(n) for n in rounds))
    return 0


def write_results(prefix, rows, settings, device_name, commit, rounds):
    with open(prefix + ".jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    speedups = [r["speedup"] for r in rows]
    with open(prefix + ".md", "w") as f:
        f.write(f"# Mod zoo: flexattn CUDA forward vs torch flex_attention\n\n"
                f"Written by bench/gpu/zoo.py on {datetime.date.today()}, commit {commit}, "
                f"{device_name}. torch side: `{settings['fn']}`, mode {settings['mode']}, "
                f"torch {settings['torch']}, triton {settings['triton']}, default kernel "
                f"options. Interleaved A B rounds ({rounds}), CUDA events, medians. FLOPs: "
                f"2·B·Hq·Lq·Lkv·(D+Dv)·density of torch's block mask. Every row's output was "
                f"checked against the CPU backend (batch 0, heads 0-1).\n\n"
                f"Median speedup {statistics.median(speedups):.2f}x, "
                f"minimum {min(speedups):.2f}x over {len(rows)} configurations.\n\n"
                "| shape | mod | flexattn ms | torch ms | speedup | flexattn TFLOP/s |\n"
                "| --- | --- | ---: | ---: | ---: | ---: |\n")
        for r in rows:
            star = "*" if r.get("torch_kernel_options") else ""
            f.write(f"| {r['shape']} | {r['mod']}{star} | {r['flexattn_ms']:.3f} | "
                    f"{r['torch_ms']:.3f} | {r['speedup']:.2f} | {r['flexattn_tflops']:.0f} |\n")
        small = [r for r in rows if r.get("torch_kernel_options")]
        if small:
            f.write(f"\n*: torch's default tiles did not fit; timed with kernel_options="
                    f"{small[0]['torch_kernel_options']}.\n")
    print(f"wrote {prefix}.md and {prefix}.jsonl")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--mods", default=None, help="comma-separated zoo names (default: all)")
    ap.add_argument("--shapes", default=None, help=f"comma-separated of {','.join(SHAPES)}")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None, help="result path prefix (default "
                    "bench/results/zoo-<device>)")
    ap.add_argument("--combine", default=None,
                    help="comma-separated .jsonl files of earlier runs to write as one result")
    args = ap.parse_args()
    if args.combine:
        if not args.out:
            print("--combine needs --out")
            return 2
        return combine(args.combine.split(","), args.out)
    if args.cpu_dry_run:
        return cpu_dry_run(args.mods.split(",") if args.mods else list(ZOO))
    if not torch.cuda.is_available():
        print("no CUDA device: use --cpu-dry-run")
        return 2
    return gpu_run(args)


if __name__ == "__main__":
    sys.exit(main())
