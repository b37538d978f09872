/*
 * flex_attention and flex_attention_backward: every argument is checked here,
 * before any backend sees it, so a bad call fails with a named error and
 * never writes to the caller's outputs. Then the block mask is resolved, the
 * plan made, and the backend called.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "blockmask_cache.h"
#include "decode_args.h"
#include "plan.h"

static int is_attention_dtype(flex_dtype d) {
    return d == FLEX_F32 || d == FLEX_F16 || d == FLEX_BF16;
}

/* Byte range [lo, hi) a view touches. Only for views that passed
 * check_extent, so the arithmetic cannot overflow. */
static void tensor_extent(const flex_tensor *t, uintptr_t *lo, uintptr_t *hi) {
    uint64_t bytes = 0;
    flex_tensor_byte_extent(t, &bytes);
    *lo = (uintptr_t)t->data;
    *hi = (uintptr_t)t->data + (uintptr_t)bytes;
}

static int tensors_overlap(const flex_tensor *a, const flex_tensor *b) {
    uintptr_t alo, ahi, blo, bhi;
    tensor_extent(a, &alo, &ahi);
    tensor_extent(b, &blo, &bhi);
    return alo < bhi && blo < ahi;
}

/* A view (sizes >= 1, strides >= 0) whose memory does not fit the address
 * space is refused before any other arithmetic is done on its strides. */
static flex_status check_extent(flex_context *ctx, const char *fn, const char *name,
                                const flex_tensor *t) {
    uint64_t bytes;
    int d = flex_tensor_byte_extent(t, &bytes);
    if (d < 0) return FLEX_OK;
    return flex_fail(ctx, FLEX_ERR_OVERFLOW,
                     "%s: %s->strides[%d] = %lld with sizes[%d] = %lld reaches beyond the address "
                     "space",
                     fn, name, d, (long long)t->strides[d], d, (long long)t->sizes[d]);
}

/* An output view must not write one element twice: with dims ordered by
 * stride, each stride must step over the whole extent of the smaller ones.
 * The extent saturates: a product past INT64_MAX is larger than any later
 * stride, which is then an overlap. */
static int has_self_overlap(const flex_tensor *t) {
    int order[4] = {0, 1, 2, 3};
    int n = t->ndim;
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && t->strides[order[j]] < t->strides[order[j - 1]]; j--) {
            int tmp = order[j];
            order[j] = order[j - 1];
            order[j - 1] = tmp;
        }
    int64_t extent = 1;
    for (int i = 0; i < n; i++) {
        int d = order[i];
        if (t->sizes[d] == 1) continue;
        if (t->strides[d] < extent) return 1;
        if (__builtin_mul_overflow(t->strides[d], t->sizes[d], &extent)) extent = INT64_MAX;
    }
    return 0;
}

/* Checks one attention tensor: present, 4-D, a float dtype, positive sizes,
 * non-negative strides, on the context's device. */
static flex_status check_tensor(flex_context *ctx, const char *fn, const char *name,
                                const flex_tensor *t, int is_output) {
    if (!t) return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "%s: %s is NULL", fn, name);
    if (!t->data) return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "%s: %s->data is NULL", fn, name);
    if (t->ndim != 4)
        return flex_fail(ctx, FLEX_ERR_SHAPE,
                         "%s: %s must have 4 dims (batch, heads, sequence, head_dim), has %d", fn,
                         name, t->ndim);
    if (!is_attention_dtype(t->dtype))
        return flex_fail(ctx, FLEX_ERR_DTYPE, "%s: %s has dtype %s; f32, f16 or bf16 expected", fn,
                         name, flex_dtype_name(t->dtype));
    for (int d = 0; d < 4; d++) {
        if (t->sizes[d] < 1 || t->sizes[d] > INT32_MAX)
            return flex_fail(ctx, FLEX_ERR_SHAPE, "%s: %s->sizes[%d] is %lld; 1 to 2^31-1 allowed",
                             fn, name, d, (long long)t->sizes[d]);
        if (t->strides[d] < 0)
            return flex_fail(ctx, FLEX_ERR_SHAPE,
                             "%s: %s->strides[%d] is %lld; negative strides are not supported", fn,
                             name, d, (long long)t->strides[d]);
    }
    if (t->device != ctx->backend->device_type ||
        (t->device != FLEX_DEVICE_CPU && t->device_index != ctx->device_index))
        return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                         "%s: %s is on device type %d:%d but the context's backend '%s' needs "
                         "device type %d:%d",
                         fn, name, (int)t->device, t->device_index, ctx->backend->name,
                         (int)ctx->backend->device_type, ctx->device_index);
    if (ctx->backend->device_type != FLEX_DEVICE_CPU && t->strides[3] != 1)
        return flex_fail(ctx, FLEX_ERR_SHAPE,
                         "%s: %s must be contiguous in its last dim (strides[3] == 1) on the '%s' "
                         "backend, got %lld",
                         fn, name, ctx->backend->name, (long long)t->strides[3]);
    flex_status st = check_extent(ctx, fn, name, t);
    if (st != FLEX_OK) return st;
    if (is_output && has_self_overlap(t))
        return flex_fail(ctx, FLEX_ERR_SHAPE,
                         "%s: the strides of %s make two elements share memory", fn, name);
    return FLEX_OK;
}

static flex_status check_dims(flex_context *ctx, const char *fn, const char *name,
                              const flex_tensor *t, int64_t b, int64_t h, int64_t s, int64_t d,
                              const char *why) {
    if (t->sizes[0] != b || t->sizes[1] != h || t->sizes[2] != s || t->sizes[3] != d)
        return flex_fail(ctx, FLEX_ERR_SHAPE,
                         "%s: %s has sizes (%lld, %lld, %lld, %lld); (%lld, %lld, %lld, %lld) "
                         "expected (%s)",
                         fn, name, (long long)t->sizes[0], (long long)t->sizes[1],
                         (long long)t->sizes[2], (long long)t->sizes[3], (long long)b, (long long)h,
                         (long long)s, (long long)d, why);
    return FLEX_OK;
}

/* lse may be (B, H, L) or (B, H, L, 1); normalised to the 4-D form. */
static flex_status check_lse(flex_context *ctx, const char *fn, const flex_tensor *lse, int64_t B,
                             int64_t H, int64_t L, int is_output, flex_tensor *norm) {
    if (!lse->data) return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "%s: lse->data is NULL", fn);
    if (lse->dtype != FLEX_F32)
        return flex_fail(ctx, FLEX_ERR_DTYPE, "%s: lse must be f32, is %s", fn,
                         flex_dtype_name(lse->dtype));
    *norm = *lse;
    if (lse->ndim == 3) {
        norm->ndim = 4;
        norm->sizes[3] = 1;
        norm->strides[3] = 1;
    } else if (lse->ndim != 4 || lse->sizes[3] != 1) {
        return flex_fail(ctx, FLEX_ERR_SHAPE,
                         "%s: lse must be (B, H, Lq) or (B, H, Lq, 1); it has %d dims", fn,
                         lse->ndim);
    }
    for (int d = 0; d < 3; d++)
        if (norm->strides[d] < 0)
            return flex_fail(ctx, FLEX_ERR_SHAPE, "%s: lse->strides[%d] is negative", fn, d);
    if (norm->sizes[0] != B || norm->sizes[1] != H || norm->sizes[2] != L)
        return flex_fail(ctx, FLEX_ERR_SHAPE,
                         "%s: lse has sizes (%lld, %lld, %lld); (%lld, %lld, %lld) expected", fn,
                         (long long)norm->sizes[0], (long long)norm->sizes[1],
                         (long long)norm->sizes[2], (long long)B, (long long)H, (long long)L);
    flex_status st = check_extent(ctx, fn, "lse", norm);
    if (st != FLEX_OK) return st;
    if (norm->device != ctx->backend->device_type)
        return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                         "%s: lse is not on the context's device (backend '%s')", fn,
                         ctx->backend->name);
    if (is_output && has_self_overlap(norm))
        return flex_fail(ctx, FLEX_ERR_SHAPE,
                         "%s: the strides of lse make two elements share memory", fn);
    return FLEX_OK;
}

static flex_status check_mod_bound(flex_context *ctx, const char *fn, const char *role,
                                   const flex_mod *mod, flex_mod_kind kind) {
    if (mod->ir.kind != kind)
        return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                         "%s: the %s is a %s mod, a %s mod is needed", fn, role,
                         mod->ir.kind == FLEX_MOD_MASK ? "mask" : "score",
                         kind == FLEX_MOD_MASK ? "mask" : "score");
    for (int i = 0; i < mod->ir.num_buffers; i++)
        if (!mod->bound[i])
            return flex_fail(ctx, FLEX_ERR_BUFFER_UNBOUND,
                             "%s: buffer '%s' of the %s has no data; call flex_mod_bind_buffer", fn,
                             mod->ir.buffers[i].name, role);
    return FLEX_OK;
}

/* Shared by forward and backward: q, k, v, the mods, the block mask and the
 * scale. Fills the dimensions (Lkv is the logical kv length). dec receives
 * the decode arguments (core/decode_args.h); NULL (the backward) refuses
 * them. Replaces *block_mask by the mask the call walks: the one built for
 * opts->mask_mod, less the blocks the score mod masks. Masks taken from the
 * context's cache are left in held[0] (mask mod) and held[1] (score mod)
 * for the caller to release. */
typedef struct attention_dims {
    int64_t B, Hq, Hkv, Lq, Lkv, D, Dv;
} attention_dims;

static flex_status check_common(flex_context *ctx, const char *fn, const flex_tensor *q,
                                const flex_tensor *k, const flex_tensor *v,
                                const flex_mod *score_mod, const flex_block_mask **block_mask,
                                const flex_attention_options *opts, float *scale,
                                attention_dims *dims, flex_cached_mask *held[2],
                                flex_decode_args *dec) {
    flex_status st;
    if ((st = check_tensor(ctx, fn, "q", q, 0)) || (st = check_tensor(ctx, fn, "k", k, 0)) ||
        (st = check_tensor(ctx, fn, "v", v, 0)))
        return st;
    if (k->dtype != q->dtype || v->dtype != q->dtype)
        return flex_fail(ctx, FLEX_ERR_DTYPE, "%s: q, k and v must share a dtype (%s, %s, %s)", fn,
                         flex_dtype_name(q->dtype), flex_dtype_name(k->dtype),
                         flex_dtype_name(v->dtype));
    dims->B = q->sizes[0];
    dims->Hq = q->sizes[1];
    dims->Lq = q->sizes[2];
    dims->D = q->sizes[3];
    dims->Hkv = k->sizes[1];
    dims->Lkv = k->sizes[2];
    dims->Dv = v->sizes[3];
    if (!dec && opts && (opts->q_offsets || opts->kv_lengths || opts->page_table))
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "%s: opts->%s is not supported by the backward (decode and paged KV are "
                         "forward only)",
                         fn,
                         opts->q_offsets    ? "q_offsets"
                         : opts->kv_lengths ? "kv_lengths"
                                            : "page_table");
    flex_decode_args no_decode;
    if (!dec) dec = &no_decode;
    if ((st = flex_decode_check_tensors(ctx, fn, dec == &no_decode ? NULL : opts, dims->B, dims->Lq,
                                        k, v, dec)))
        return st;
    /* A paged k and v are (num_pages, Hkv, page_size, D / Dv). */
    int64_t kv_batch = dec->page_table ? dec->num_pages : dims->B;
    if ((st = check_dims(ctx, fn, "k", k, kv_batch, dims->Hkv, dims->Lkv, dims->D,
                         dec->page_table ? "a page pool with q's head_dim"
                                         : "batch and head_dim of q")))
        return st;
    if ((st = check_dims(ctx, fn, "v", v, kv_batch, dims->Hkv, dims->Lkv, dims->Dv,
                         "batch, heads and length of k")))
        return st;
    dims->Lkv = dec->kv_len;
    if (dims->Hq % dims->Hkv)
        return flex_fail(ctx, FLEX_ERR_SHAPE,
                         "%s: q has %lld heads, not a multiple of k's %lld heads (grouped-query "
                         "attention needs Hq = G * Hkv)",
                         fn, (long long)dims->Hq, (long long)dims->Hkv);
    if (score_mod && (st = check_mod_bound(ctx, fn, "score mod", score_mod, FLEX_MOD_SCORE)))
        return st;

    const flex_mod *mask_mod = opts ? opts->mask_mod : NULL;
    if (mask_mod && (st = check_mod_bound(ctx, fn, "mask mod", mask_mod, FLEX_MOD_MASK))) return st;
    const flex_block_mask *bm = *block_mask;
    int64_t mask_q_len = dims->Lq; /* of a mask built here */
    if (bm) {
        if (mask_mod && mask_mod != bm->mask_mod)
            return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                             "%s: both a block mask and a different opts->mask_mod were given; "
                             "pass one of them",
                             fn);
        if (bm->ctx != ctx)
            return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                             "%s: the block mask was built on another context", fn);
        if (dec->active && (bm->q_len < dims->Lq || bm->kv_len < dims->Lkv))
            return flex_fail(ctx, FLEX_ERR_SHAPE,
                             "%s: the block mask is for q_len %lld, kv_len %lld; with decode "
                             "arguments it must reach Lq %lld and the logical kv length %lld",
                             fn, (long long)bm->q_len, (long long)bm->kv_len, (long long)dims->Lq,
                             (long long)dims->Lkv);
        if (!dec->active && (bm->q_len != dims->Lq || bm->kv_len != dims->Lkv))
            return flex_fail(ctx, FLEX_ERR_SHAPE,
                             "%s: the block mask is for q_len %lld, kv_len %lld but q has length "
                             "%lld and k %lld",
                             fn, (long long)bm->q_len, (long long)bm->kv_len, (long long)dims->Lq,
                             (long long)dims->Lkv);
        if (bm->B != 1 && bm->B != dims->B)
            return flex_fail(ctx, FLEX_ERR_SHAPE,
                             "%s: the block mask has batch %lld; 1 (broadcast) or %lld expected",
                             fn, (long long)bm->B, (long long)dims->B);
        if (bm->H != 1 && bm->H != dims->Hq)
            return flex_fail(ctx, FLEX_ERR_SHAPE,
                             "%s: the block mask has %lld heads; 1 (broadcast) or %lld expected",
                             fn, (long long)bm->H, (long long)dims->Hq);
        if (bm->mask_mod &&
            (st = check_mod_bound(ctx, fn, "block mask's mask mod", bm->mask_mod, FLEX_MOD_MASK)))
            return st;
        if ((st = flex_decode_check_values(ctx, fn, dec, dims->B, dims->Lq, bm->q_len))) return st;
    } else {
        if ((st = flex_decode_check_values(ctx, fn, dec, dims->B, dims->Lq, -1))) return st;
        /* Decode steps share one mask: its q_len covers the whole cache (and
         * any query past it), so a new offset is no new mask. */
        if (dec->active) mask_q_len = dec->q_end > dims->Lkv ? dec->q_end : dims->Lkv;
        if (mask_mod) {
            if ((st = flex_mask_cache_acquire(ctx, mask_mod, dims->B, dims->Hq, mask_q_len,
                                              dims->Lkv, &held[0], &bm)))
                return st;
            *block_mask = bm;
        }
    }
    /* Blocks the score mod masks (-inf whatever the score) are skipped like
     * a mask's empty blocks; FLEXATTN_DEBUG=score_sparsity=0 turns it off.
     * The mask is over logical positions, as the mask mod's is. */
    if (score_mod && flex_debug_int(ctx, FLEX_DEBUG_SCORE_SPARSITY, 1, 0, 1)) {
        if ((st = flex_score_mask_cache_acquire(ctx, score_mod, bm, dims->B, dims->Hq,
                                                bm ? bm->q_len : mask_q_len,
                                                bm ? bm->kv_len : dims->Lkv, &held[1], &bm)))
            return st;
        *block_mask = bm;
    }

    float s = opts ? opts->scale : 0.0f;
    if (!isfinite(s))
        return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT, "%s: opts->scale is not finite", fn);
    *scale = s != 0.0f ? s : (float)(1.0 / sqrt((double)dims->D));
    if (opts && (opts->q_tile < 0 || opts->kv_tile < 0 || opts->kv_splits < 0))
        return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                         "%s: opts->q_tile, kv_tile and kv_splits must be >= 0 (0 = automatic)",
                         fn);
    /* Refused in the forward too (which ignores it), so a bad value never
     * passes unnoticed until the backward. */
    if (opts && opts->deterministic != 0 && opts->deterministic != 1)
        return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                         "%s: opts->deterministic is %d; 0 or 1 expected", fn,
                         opts->deterministic);
    return FLEX_OK;
}

static flex_status check_no_overlap(flex_context *ctx, const char *fn, const char *out_name,
                                    const flex_tensor *out, const flex_tensor *const *inputs,
                                    const char *const *names, int n) {
    for (int i = 0; i < n; i++)
        if (inputs[i] && tensors_overlap(out, inputs[i]))
            return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                             "%s: %s overlaps %s in memory; outputs must not alias inputs", fn,
                             out_name, names[i]);
    return FLEX_OK;
}

static int is_pow2(int x) {
    return x > 0 && !(x & (x - 1));
}

/* The core's plan, then the caller's hints where they keep it valid: a tile
 * hint is taken when it is a power of two no larger than the planned tile
 * (so tiles still nest inside mask blocks). */
static flex_status make_plan(flex_context *ctx, const flex_forward_args *args,
                             const flex_attention_options *opts, struct flex_plan *plan) {
    memset(plan, 0, sizeof *plan);
    flex_status st = flex_plan_make(ctx, args, plan);
    if (st != FLEX_OK || !opts) return st;
    if (opts->q_tile) {
        if (!is_pow2(opts->q_tile) || opts->q_tile > plan->q_tile)
            return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                             "opts->q_tile %d: a power of two up to %d is needed here",
                             opts->q_tile, plan->q_tile);
        plan->q_tile = opts->q_tile;
    }
    if (opts->kv_tile) {
        if (!is_pow2(opts->kv_tile) || opts->kv_tile > plan->kv_tile)
            return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                             "opts->kv_tile %d: a power of two up to %d is needed here",
                             opts->kv_tile, plan->kv_tile);
        plan->kv_tile = opts->kv_tile;
    }
    return FLEX_OK;
}

/* flex_attention once ctx is known; masks it takes from the context's cache
 * are left in held for the caller to release. */
static flex_status attention_forward(flex_context *ctx, const flex_tensor *q, const flex_tensor *k,
                                     const flex_tensor *v, const flex_mod *score_mod,
                                     const flex_block_mask *block_mask,
                                     const flex_attention_options *opts, const flex_tensor *out,
                                     const flex_tensor *lse, flex_cached_mask *held[2]) {
    static const char fn[] = "flex_attention";
    flex_status st;
    attention_dims dims;
    float scale;
    flex_decode_args dec;
    if ((st = check_common(ctx, fn, q, k, v, score_mod, &block_mask, opts, &scale, &dims, held,
                           &dec)))
        return st;
    if ((st = check_tensor(ctx, fn, "out", out, 1))) return st;
    if (out->dtype != q->dtype)
        return flex_fail(ctx, FLEX_ERR_DTYPE, "%s: out has dtype %s, q has %s", fn,
                         flex_dtype_name(out->dtype), flex_dtype_name(q->dtype));
    if ((st = check_dims(ctx, fn, "out", out, dims.B, dims.Hq, dims.Lq, dims.Dv,
                         "batch, heads and length of q, head_dim of v")))
        return st;
    /* The decode tensors count as inputs where they share out's memory
     * space (a host table beside device outputs cannot alias them). */
    const flex_tensor *inputs[6] = {q, k, v};
    const char *names[6] = {"q", "k", "v"};
    int num_inputs = 3;
    const flex_tensor *decode_inputs[3] = {dec.q_offsets, dec.kv_lengths, dec.page_table};
    const char *const decode_names[3] = {"opts->q_offsets", "opts->kv_lengths", "opts->page_table"};
    for (int i = 0; i < 3; i++)
        if (decode_inputs[i] && decode_inputs[i]->device == out->device) {
            inputs[num_inputs] = decode_inputs[i];
            names[num_inputs++] = decode_names[i];
        }
    if ((st = check_no_overlap(ctx, fn, "out", out, inputs, names, num_inputs))) return st;
    flex_tensor lse4;
    if (lse) {
        if ((st = check_lse(ctx, fn, lse, dims.B, dims.Hq, dims.Lq, 1, &lse4))) return st;
        if ((st = check_no_overlap(ctx, fn, "lse", &lse4, inputs, names, num_inputs))) return st;
        const flex_tensor *o[] = {out};
        const char *const on[] = {"out"};
        if ((st = check_no_overlap(ctx, fn, "lse", &lse4, o, on, 1))) return st;
    }

    flex_forward_args args = {
        .q = *q,
        .k = *k,
        .v = *v,
        .out = *out,
        .lse = lse ? &lse4 : NULL,
        .score_mod = score_mod,
        .block_mask = block_mask,
        .scale = scale,
        .stream = opts ? opts->stream : NULL,
        .q_offsets = dec.q_offsets,
        .kv_lengths = dec.kv_lengths,
        .page_table = dec.page_table,
        .page_size = dec.page_size,
        .kv_len = dims.Lkv,
        .kv_splits = opts ? opts->kv_splits : 0,
    };
    struct flex_plan plan;
    if ((st = make_plan(ctx, &args, opts, &plan))) return st;
    args.plan = &plan;
    flex_clear_error(ctx);
    return flex_backend_forward(ctx, &args);
}

flex_status flex_attention(flex_context *ctx, const flex_tensor *q, const flex_tensor *k,
                           const flex_tensor *v, const flex_mod *score_mod,
                           const flex_block_mask *block_mask, const flex_attention_options *opts,
                           const flex_tensor *out, const flex_tensor *lse) {
    if (!ctx) return flex_fail(NULL, FLEX_ERR_NULL_POINTER, "flex_attention: ctx is NULL");
    flex_cached_mask *held[2] = {NULL, NULL};
    flex_status st = attention_forward(ctx, q, k, v, score_mod, block_mask, opts, out, lse, held);
    flex_mask_cache_release(ctx, held[1]);
    flex_mask_cache_release(ctx, held[0]);
    return st;
}

/* flex_attention_backward once ctx is known; held as in attention_forward. */
static flex_status attention_backward(flex_context *ctx, const flex_tensor *q, const flex_tensor *k,
                                      const flex_tensor *v, const flex_tensor *out,
                                      const flex_tensor *dout, const flex_tensor *lse,
                                      const flex_mod *score_mod, const flex_block_mask *block_mask,
                                      const flex_attention_options *opts, const flex_tensor *dq,
                                      const flex_tensor *dk, const flex_tensor *dv,
                                      const flex_buffer_grad *buffer_grads, int num_buffer_grads,
                                      flex_cached_mask *held[2]) {
    static const char fn[] = "flex_attention_backward";
    flex_status st;
    attention_dims dims;
    float scale;
    if ((st = check_common(ctx, fn, q, k, v, score_mod, &block_mask, opts, &scale, &dims, held,
                           NULL)))
        return st;
    if ((st = check_tensor(ctx, fn, "out", out, 0)) ||
        (st = check_tensor(ctx, fn, "dout", dout, 0)))
        return st;
    if (out->dtype != q->dtype || dout->dtype != q->dtype)
        return flex_fail(ctx, FLEX_ERR_DTYPE, "%s: out and dout must have q's dtype %s", fn,
                         flex_dtype_name(q->dtype));
    if ((st = check_dims(ctx, fn, "out", out, dims.B, dims.Hq, dims.Lq, dims.Dv,
                         "the forward's output shape")) ||
        (st = check_dims(ctx, fn, "dout", dout, dims.B, dims.Hq, dims.Lq, dims.Dv,
                         "the shape of out")))
        return st;
    if (!lse)
        return flex_fail(ctx, FLEX_ERR_NULL_POINTER,
                         "%s: lse is NULL; the backward needs the forward's lse", fn);
    flex_tensor lse4;
    if ((st = check_lse(ctx, fn, lse, dims.B, dims.Hq, dims.Lq, 0, &lse4))) return st;

    const flex_tensor *inputs[] = {q, k, v, out, dout, &lse4};
    const char *const names[] = {"q", "k", "v", "out", "dout", "lse"};
    const flex_tensor *grads[] = {dq, dk, dv};
    const char *const grad_names[] = {"dq", "dk", "dv"};
    const flex_tensor *like[] = {q, k, v};
    for (int i = 0; i < 3; i++) {
        if (!grads[i]) continue;
        if ((st = check_tensor(ctx, fn, grad_names[i], grads[i], 1))) return st;
        if (grads[i]->dtype != q->dtype)
            return flex_fail(ctx, FLEX_ERR_DTYPE, "%s: %s must have dtype %s", fn, grad_names[i],
                             flex_dtype_name(q->dtype));
        if ((st = check_dims(ctx, fn, grad_names[i], grads[i], like[i]->sizes[0], like[i]->sizes[1],
                             like[i]->sizes[2], like[i]->sizes[3],
                             "the shape of the matching input")))
            return st;
        if ((st = check_no_overlap(ctx, fn, grad_names[i], grads[i], inputs, names, 6))) return st;
        for (int j = 0; j < i; j++)
            if (grads[j] && tensors_overlap(grads[i], grads[j]))
                return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT, "%s: %s overlaps %s", fn,
                                 grad_names[i], grad_names[j]);
    }
    if (num_buffer_grads < 0 || (num_buffer_grads > 0 && !buffer_grads))
        return flex_fail(ctx, FLEX_ERR_NULL_POINTER,
                         "%s: buffer_grads is NULL with num_buffer_grads %d", fn, num_buffer_grads);
    for (int i = 0; i < num_buffer_grads; i++) {
        const flex_buffer_grad *g = &buffer_grads[i];
        if (!g->name)
            return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "%s: buffer_grads[%d].name is NULL", fn,
                             i);
        if (!score_mod)
            return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                             "%s: a gradient for buffer '%s' was asked for but there is no score "
                             "mod",
                             fn, g->name);
        int found = -1;
        for (int j = 0; j < score_mod->ir.num_buffers; j++)
            if (!strcmp(score_mod->ir.buffers[j].name, g->name)) found = j;
        if (found < 0)
            return flex_fail(ctx, FLEX_ERR_MOD_NAME, "%s: the score mod has no buffer '%s'", fn,
                             g->name);
        flex_dtype bd = score_mod->ir.buffers[found].dtype;
        if (bd != FLEX_F32 && bd != FLEX_F16 && bd != FLEX_BF16)
            return flex_fail(ctx, FLEX_ERR_DTYPE,
                             "%s: buffer '%s' has dtype %s; gradients exist only for float "
                             "buffers",
                             fn, g->name, flex_dtype_name(bd));
        const flex_tensor *view = &score_mod->views[found];
        if (!g->grad.data)
            return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "%s: the gradient of '%s' has no data", fn,
                             g->name);
        if (g->grad.dtype != FLEX_F32)
            return flex_fail(ctx, FLEX_ERR_DTYPE, "%s: the gradient of '%s' must be f32", fn,
                             g->name);
        if (g->grad.ndim != view->ndim)
            return flex_fail(ctx, FLEX_ERR_SHAPE, "%s: the gradient of '%s' must have %d dims", fn,
                             g->name, view->ndim);
        for (int d = 0; d < view->ndim; d++)
            if (g->grad.sizes[d] != view->sizes[d] || g->grad.strides[d] < 0)
                return flex_fail(ctx, FLEX_ERR_SHAPE,
                                 "%s: the gradient of '%s' must have the bound buffer's sizes "
                                 "(dim %d: %lld, not %lld)",
                                 fn, g->name, d, (long long)view->sizes[d],
                                 (long long)g->grad.sizes[d]);
        char grad_name[96];
        snprintf(grad_name, sizeof grad_name, "the gradient of '%s'", g->name);
        if ((st = check_extent(ctx, fn, grad_name, &g->grad))) return st;
        if (has_self_overlap(&g->grad))
            return flex_fail(ctx, FLEX_ERR_SHAPE,
                             "%s: the strides of the gradient of '%s' make "
                             "two elements share memory",
                             fn, g->name);
    }

    flex_backward_args args = {
        .q = *q,
        .k = *k,
        .v = *v,
        .out = *out,
        .dout = *dout,
        .lse = lse4,
        .dq = dq,
        .dk = dk,
        .dv = dv,
        .score_mod = score_mod,
        .block_mask = block_mask,
        .scale = scale,
        .stream = opts ? opts->stream : NULL,
        .buffer_grads = buffer_grads,
        .num_buffer_grads = num_buffer_grads,
        .deterministic = opts ? opts->deterministic : 0,
    };
    flex_forward_args plan_args = {
        .q = *q,
        .k = *k,
        .v = *v,
        .out = *out,
        .lse = &lse4,
        .score_mod = score_mod,
        .block_mask = block_mask,
        .scale = scale,
        .stream = args.stream,
    };
    struct flex_plan plan;
    if ((st = make_plan(ctx, &plan_args, opts, &plan))) return st;
    args.plan = &plan;
    flex_clear_error(ctx);
    return flex_backend_backward(ctx, &args);
}

flex_status flex_attention_backward(flex_context *ctx, const flex_tensor *q, const flex_tensor *k,
                                    const flex_tensor *v, const flex_tensor *out,
                                    const flex_tensor *dout, const flex_tensor *lse,
                                    const flex_mod *score_mod, const flex_block_mask *block_mask,
                                    const flex_attention_options *opts, const flex_tensor *dq,
                                    const flex_tensor *dk, const flex_tensor *dv,
                                    const flex_buffer_grad *buffer_grads, int num_buffer_grads) {
    if (!ctx) return flex_fail(NULL, FLEX_ERR_NULL_POINTER, "flex_attention_backward: ctx is NULL");
    flex_cached_mask *held[2] = {NULL, NULL};
    flex_status st = attention_backward(ctx, q, k, v, out, dout, lse, score_mod, block_mask, opts,
                                        dq, dk, dv, buffer_grads, num_buffer_grads, held);
    flex_mask_cache_release(ctx, held[1]);
    flex_mask_cache_release(ctx, held[0]);
    return st;
}
