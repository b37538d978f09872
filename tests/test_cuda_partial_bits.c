/*
 * The CUDA forward and backward with partial blocks read from bit masks
 * (the default, backends/gpu/gpu_partial_bits.h) against the same kernels
 * evaluating the mask mod (FLEXATTN_DEBUG=cuda_partial_bits=0): out, lse,
 * dk and dv must be the same bits, since a mask is boolean (dq, summed by
 * atomics in an order that varies, within a unit of its last place). The
 * backward runs over a mask whose bits its forward made, and over one
 * whose bits it makes itself. Cases: masks with partial blocks that read
 * neither b nor h (stored once or once per (b, h)), that read h (per-head
 * lists, and a broadcast mask, whose bits come in planes), that read a
 * bool buffer, lengths that are no multiple of the blocks and Lq != Lkv,
 * GQA, explicit lists per (b, h), rows every block masks, a score mod
 * beside the mask, the wgmma kernels (128-blocks) and the mma.sync ones
 * (smaller blocks, down to 16-key steps), each called twice (the second
 * call finds the bits made). A mask mod that reads out of its buffer is
 * reported by flex_synchronize on every call, forward and backward, as
 * when it is evaluated. Outputs are poisoned (NaN) before every call.
 * Without a usable CUDA backend the program prints "SKIPPED: <reason>" and
 * exits 77. It needs no test library (GPU machines may lack it).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "dtype.h"

#include "gpu_test.h"

/* The GPU context that evaluates the mask mod (gpu, from gpu_test.h,
 * reads the bit masks), and one more reading them, where the backward's
 * mask is not the forward's, so that the backward makes its bits. */
static flex_context *gpu_eval, *gpu_bwd_bits;

static uint64_t rng = 0x9e3779b97f4a7c15ull;

typedef struct bits_case {
    const char *name;
    flex_dtype dt;
    int B, Hq, Hkv, Lq, Lkv, D, Dv;
    const char *mask;      /* mask mod text; may read g[...] (bool, Lkv + Lq entries) */
    int mask_B, mask_H;    /* the block mask's stored B and H (1: broadcast) */
    int q_block, kv_block;
    const char *score;     /* NULL: none */
    int explicit_lists;    /* random partial and full lists per (b, h) instead of a build */
} bits_case;

static const bits_case cases[] = {
    /* the wgmma kernel: 128 x 128 blocks, head dim 128 or 64 */
    {"dilated, one grid", FLEX_BF16, 2, 4, 4, 1000, 1000, 128, 128,
     "q >= kv && (q - kv) % 4 == 0 && q - kv <= 600", 1, 1, 128, 128, NULL, 0},
    {"dilated, a grid per (b, h)", FLEX_BF16, 2, 4, 4, 1000, 1000, 128, 128,
     "q >= kv && (q - kv) % 4 == 0 && q - kv <= 600", 2, 4, 128, 128, NULL, 0},
    {"per head, lists per head", FLEX_F16, 2, 4, 4, 700, 700, 64, 64,
     "q >= kv && (q - kv) % (h + 2) == 0", 1, 4, 128, 128, NULL, 0},
    {"per head, broadcast mask", FLEX_BF16, 2, 4, 4, 700, 700, 128, 128,
     "q >= kv && (q - kv) % (h + 2) == 0", 1, 1, 128, 128, NULL, 0},
    {"per batch and head", FLEX_BF16, 3, 2, 2, 500, 500, 128, 128,
     "(q + kv + b * 5 + h * 3) % 7 != 0", 1, 1, 128, 128, NULL, 0},
    {"global tokens in a buffer, Lq != Lkv", FLEX_BF16, 2, 4, 4, 900, 1100, 128, 128,
     "abs(q - kv) <= 100 || g[kv] || g[q]", 1, 1, 128, 128, NULL, 0},
    {"GQA", FLEX_BF16, 2, 8, 2, 1000, 1000, 128, 128,
     "q >= kv && (q - kv) % 4 == 0 && q - kv <= 600", 1, 1, 128, 256, NULL, 0},
    {"empty rows", FLEX_BF16, 1, 2, 2, 600, 600, 128, 128, "q % 3 != 0 && q >= kv", 1, 1, 128,
     128, NULL, 0},
    {"soft-cap score mod", FLEX_BF16, 2, 4, 4, 1000, 1000, 128, 128,
     "q >= kv && (q - kv) % 4 == 0 && q - kv <= 600", 1, 1, 128, 128,
     "30.0 * tanh(score / 30.0)", 0},
    {"explicit lists per (b, h)", FLEX_BF16, 2, 3, 3, 640, 768, 128, 128,
     "(q * 7 + kv * 3) % 5 != 0", 2, 3, 128, 128, NULL, 1},
    /* the mma.sync kernel: blocks below 128 */
    {"mma.sync, 64 x 64 blocks", FLEX_BF16, 2, 4, 4, 1000, 1000, 128, 128,
     "q >= kv && (q - kv) % 4 == 0 && q - kv <= 600", 1, 1, 64, 64, NULL, 0},
    {"mma.sync, 32 x 16 blocks, buffer", FLEX_F16, 2, 2, 1, 300, 250, 64, 64,
     "abs(q - kv) <= 40 || g[kv] || g[q]", 1, 1, 32, 16, NULL, 0},
    {"mma.sync, explicit lists, head dim 256", FLEX_BF16, 1, 2, 2, 200, 300, 256, 256,
     "(q * 7 + kv * 3) % 5 != 0", 1, 2, 64, 32, "score * 0.5", 1},
};

static flex_mod *compile_mod(flex_mod_kind kind, const char *text, const flex_tensor *g) {
    const flex_buffer_decl decl = {"g", FLEX_BOOL, 1};
    const int reads = strstr(text, "g[") != NULL; /* a declared buffer must be bound */
    const flex_mod_desc desc = {kind, text, NULL, 0, &decl, reads};
    flex_mod *m = NULL;
    if (flex_mod_compile(NULL, &desc, &m) != FLEX_OK ||
        (reads && flex_mod_bind_buffer(NULL, m, "g", g) != FLEX_OK)) {
        fprintf(stderr, "FAIL: mod '%s': %s\n", text, flex_error_message(NULL));
        exit(1);
    }
    return m;
}

/* Random kv-block lists for every (b, h, q-block): each block partial,
 * full or absent. */
static void random_lists(int rows, int nk, int32_t *num, int32_t *idx, int32_t *full_num,
                         int32_t *full_idx) {
    for (int r = 0; r < rows; r++) {
        num[r] = full_num[r] = 0;
        for (int j = 0; j < nk; j++) {
            const uint64_t x = gpu_test_next(&rng) >> 33;
            if (x % 3 == 0)
                idx[r * nk + num[r]++] = j;
            else if (x % 3 == 1)
                full_idx[r * nk + full_num[r]++] = j;
        }
    }
}

/* The case's block mask on ctx (the same lists on both contexts). */
static flex_block_mask *make_mask(flex_context *ctx, const bits_case *c, const flex_mod *mod,
                                  const int32_t *lists) {
    flex_block_mask *mask = NULL;
    flex_status s;
    if (c->explicit_lists) {
        const int nq = (c->Lq + c->q_block - 1) / c->q_block;
        const int nk = (c->Lkv + c->kv_block - 1) / c->kv_block;
        const int rows = c->mask_B * c->mask_H * nq;
        s = flex_block_mask_from_kv_blocks(ctx, mod, c->mask_B, c->mask_H, c->Lq, c->Lkv,
                                           c->q_block, c->kv_block, lists, lists + rows,
                                           lists + rows + (size_t)rows * nk,
                                           lists + 2 * rows + (size_t)rows * nk, &mask);
    } else {
        s = flex_block_mask_create(ctx, mod, c->mask_B, c->mask_H, c->Lq, c->Lkv, c->q_block,
                                   c->kv_block, &mask);
    }
    if (s != FLEX_OK) {
        fprintf(stderr, "FAIL: %s: block mask: %s\n", c->name, flex_error_message(ctx));
        exit(1);
    }
    return mask;
}

/* A call's tensors on the device: q, k, v of case c, out (B, Hq, Lq, Dv)
 * and lse (B, Hq, Lq) at dout and dlse. */
typedef struct call_tensors {
    flex_tensor q, k, v, o, l;
} call_tensors;

static call_tensors call_tensors_of(const bits_case *c, void *dq, void *dk, void *dv, void *dout,
                                    void *dlse) {
    const int64_t qs[4] = {c->B, c->Hq, c->Lq, c->D}, ks[4] = {c->B, c->Hkv, c->Lkv, c->D};
    const int64_t vs[4] = {c->B, c->Hkv, c->Lkv, c->Dv}, os[4] = {c->B, c->Hq, c->Lq, c->Dv};
    const call_tensors t = {flex_tensor_contiguous(dq, c->dt, 4, qs, FLEX_DEVICE_CUDA),
                            flex_tensor_contiguous(dk, c->dt, 4, ks, FLEX_DEVICE_CUDA),
                            flex_tensor_contiguous(dv, c->dt, 4, vs, FLEX_DEVICE_CUDA),
                            flex_tensor_contiguous(dout, c->dt, 4, os, FLEX_DEVICE_CUDA),
                            flex_tensor_contiguous(dlse, FLEX_F32, 3, os, FLEX_DEVICE_CUDA)};
    return t;
}

/* One forward on ctx into out_host (B, Hq, Lq, Dv) and lse_host (B, Hq,
 * Lq), the device outputs poisoned (all bits set: NaN) first. */
static flex_status forward_on(flex_context *ctx, const bits_case *c, void *dq, void *dk, void *dv,
                              const flex_mod *score, const flex_block_mask *mask, void *out_host,
                              float *lse_host) {
    const size_t es = flex_dtype_size(c->dt);
    const size_t out_bytes = (size_t)(c->B * c->Hq * c->Lq * c->Dv) * es;
    const size_t lse_bytes = (size_t)(c->B * c->Hq * c->Lq) * 4;
    unsigned char *poison = malloc(out_bytes > lse_bytes ? out_bytes : lse_bytes);
    memset(poison, 0xff, out_bytes > lse_bytes ? out_bytes : lse_bytes);
    void *dout = to_gpu(poison, out_bytes), *dlse = to_gpu(poison, lse_bytes);
    free(poison);
    const call_tensors t = call_tensors_of(c, dq, dk, dv, dout, dlse);
    flex_attention_options opts;
    memset(&opts, 0, sizeof opts);
    flex_status s = flex_attention(ctx, &t.q, &t.k, &t.v, score, mask, &opts, &t.o, &t.l);
    if (s == FLEX_OK) s = flex_synchronize(ctx);
    if (s == FLEX_OK) s = flex_copy_to_host(ctx, out_host, dout, out_bytes);
    if (s == FLEX_OK) s = flex_copy_to_host(ctx, lse_host, dlse, lse_bytes);
    flex_free(gpu, dout);
    flex_free(gpu, dlse);
    return s;
}

/* The gradients of one backward on ctx over bwd_mask, after a forward
 * over fwd_mask (the same mask, or one built alike), into host_grads[0..2]
 * (dq, dk, dv), the device gradients poisoned first; dout_dev is the
 * upstream gradient. *forward_status gets the forward's synchronize (a
 * bounds report there is the forward's). */
static flex_status backward_on(flex_context *ctx, const bits_case *c, void *dq, void *dk, void *dv,
                               void *dout_dev, const flex_mod *score,
                               const flex_block_mask *fwd_mask, const flex_block_mask *bwd_mask,
                               void *host_grads[3], flex_status *forward_status) {
    const size_t es = flex_dtype_size(c->dt);
    const size_t bytes[3] = {(size_t)((int64_t)c->B * c->Hq * c->Lq * c->D) * es,
                             (size_t)((int64_t)c->B * c->Hkv * c->Lkv * c->D) * es,
                             (size_t)((int64_t)c->B * c->Hkv * c->Lkv * c->Dv) * es};
    const size_t out_bytes = (size_t)(c->B * c->Hq * c->Lq * c->Dv) * es;
    const size_t lse_bytes = (size_t)(c->B * c->Hq * c->Lq) * 4;
    size_t most = out_bytes > lse_bytes ? out_bytes : lse_bytes;
    for (int i = 0; i < 3; i++)
        most = bytes[i] > most ? bytes[i] : most;
    unsigned char *poison = malloc(most);
    memset(poison, 0xff, most);
    void *dout = to_gpu(poison, out_bytes), *dlse = to_gpu(poison, lse_bytes);
    void *grads[3];
    for (int i = 0; i < 3; i++)
        grads[i] = to_gpu(poison, bytes[i]);
    free(poison);
    const call_tensors t = call_tensors_of(c, dq, dk, dv, dout, dlse);
    /* the gradients and dO: tensors of q's, k's, v's and out's sizes */
    const call_tensors g = call_tensors_of(c, grads[0], grads[1], grads[2], dout_dev, dlse);
    flex_attention_options opts;
    memset(&opts, 0, sizeof opts);
    flex_status s = flex_attention(ctx, &t.q, &t.k, &t.v, score, fwd_mask, &opts, &t.o, &t.l);
    *forward_status = s == FLEX_OK ? flex_synchronize(ctx) : s;
    if (s == FLEX_OK)
        s = flex_attention_backward(ctx, &t.q, &t.k, &t.v, &t.o, &g.o, &t.l, score, bwd_mask,
                                    &opts, &g.q, &g.k, &g.v, NULL, 0);
    if (s == FLEX_OK) s = flex_synchronize(ctx);
    for (int i = 0; i < 3 && s == FLEX_OK; i++)
        s = flex_copy_to_host(ctx, host_grads[i], grads[i], bytes[i]);
    for (int i = 0; i < 3; i++)
        flex_free(gpu, grads[i]);
    flex_free(gpu, dout);
    flex_free(gpu, dlse);
    return s;
}

/* The backward of case c on the bit-mask contexts against the evaluating
 * one: dk and dv the same bits, dq within 1/128 of its magnitude (bf16
 * and f16 keep 8 and 11 bits; summing the same fp32 terms in another
 * order can move the rounding by one unit) plus 1e-5 of the largest dq. */
static void compare_backward(const bits_case *c, void *dq, void *dk, void *dv,
                             const flex_mod *score, const flex_block_mask *mask_eval,
                             const flex_block_mask *mask_bits, const flex_block_mask *mask_fwd,
                             const flex_block_mask *mask_made) {
    const size_t es = flex_dtype_size(c->dt);
    const int64_t n[3] = {(int64_t)c->B * c->Hq * c->Lq * c->D,
                          (int64_t)c->B * c->Hkv * c->Lkv * c->D,
                          (int64_t)c->B * c->Hkv * c->Lkv * c->Dv};
    const int64_t no = (int64_t)c->B * c->Hq * c->Lq * c->Dv;
    void *hout = malloc((size_t)no * es);
    for (int64_t i = 0; i < no; i++)
        flex_store_from_float(hout, c->dt, i, gpu_test_uniform(&rng));
    void *ddout = to_gpu(hout, (size_t)no * es);
    free(hout);
    void *ref[3], *got[3];
    for (int i = 0; i < 3; i++)
        ref[i] = malloc((size_t)n[i] * es), got[i] = malloc((size_t)n[i] * es);
    flex_status fs;
    flex_status s =
        backward_on(gpu_eval, c, dq, dk, dv, ddout, score, mask_eval, mask_eval, ref, &fs);
    if (s != FLEX_OK) {
        fprintf(stderr, "FAIL %s: backward evaluating the mask: %s\n", c->name,
                flex_error_message(gpu_eval));
        failures++;
    }
    flex_context *ctxs[2] = {gpu, gpu_bwd_bits};
    const flex_block_mask *fwd_masks[2] = {mask_bits, mask_fwd};
    const flex_block_mask *masks[2] = {mask_bits, mask_made};
    const char *which[2] = {"bits made by the forward", "bits made by the backward"};
    for (int w = 0; w < 2 && s == FLEX_OK; w++) {
        for (int call = 0; call < 2; call++) {
            const flex_status sw =
                backward_on(ctxs[w], c, dq, dk, dv, ddout, score, fwd_masks[w], masks[w], got, &fs);
            if (sw != FLEX_OK) {
                fprintf(stderr, "FAIL %s: backward, %s: %s\n", c->name, which[w],
                        flex_error_message(ctxs[w]));
                failures++;
                break;
            }
            size_t bad[3] = {0, 0, 0};
            double most = 0.0;
            for (int64_t i = 0; i < n[0]; i++)
                most = fmax(most, fabs(flex_load_as_float(ref[0], c->dt, i)));
            for (int t = 0; t < 3; t++)
                for (int64_t i = 0; i < n[t]; i++) {
                    const float a = flex_load_as_float(ref[t], c->dt, i);
                    const float b = flex_load_as_float(got[t], c->dt, i);
                    if (t > 0)
                        bad[t] += memcmp((char *)ref[t] + i * es, (char *)got[t] + i * es, es) != 0;
                    else
                        bad[t] += !(fabsf(a - b) <=
                                    fmaxf(fabsf(a), fabsf(b)) / 128.0f + 1e-5f * (float)most);
                }
            if (bad[0] || bad[1] || bad[2]) {
                fprintf(stderr,
                        "FAIL %s: backward, %s (call %d): %zu dq beyond tolerance, %zu dk and "
                        "%zu dv not the same bits as the evaluated mask's\n",
                        c->name, which[w], call + 1, bad[0], bad[1], bad[2]);
                failures++;
                break;
            }
        }
    }
    for (int i = 0; i < 3; i++)
        free(ref[i]), free(got[i]);
    flex_free(gpu, ddout);
}

static void run_case(const bits_case *c) {
    const int failures_before = failures;
    const size_t es = flex_dtype_size(c->dt);
    const int64_t nq = (int64_t)c->B * c->Hq * c->Lq * c->D;
    const int64_t nk = (int64_t)c->B * c->Hkv * c->Lkv * c->D;
    const int64_t nv = (int64_t)c->B * c->Hkv * c->Lkv * c->Dv;
    void *hq = malloc((size_t)nq * es), *hk = malloc((size_t)nk * es), *hv = malloc((size_t)nv * es);
    for (int64_t i = 0; i < nq; i++)
        flex_store_from_float(hq, c->dt, i, 3.0f * gpu_test_uniform(&rng));
    for (int64_t i = 0; i < nk; i++)
        flex_store_from_float(hk, c->dt, i, gpu_test_uniform(&rng));
    for (int64_t i = 0; i < nv; i++)
        flex_store_from_float(hv, c->dt, i, gpu_test_uniform(&rng));
    void *dq = to_gpu(hq, (size_t)nq * es), *dk = to_gpu(hk, (size_t)nk * es);
    void *dv = to_gpu(hv, (size_t)nv * es);
    free(hq), free(hk), free(hv);

    /* global tokens: every 37th position, on the host */
    const int64_t gn = c->Lq + c->Lkv;
    uint8_t *g = malloc((size_t)gn);
    for (int64_t i = 0; i < gn; i++)
        g[i] = i % 37 == 5;
    const flex_tensor gt = flex_tensor_contiguous(g, FLEX_BOOL, 1, &gn, FLEX_DEVICE_CPU);
    flex_mod *mask_mod = compile_mod(FLEX_MOD_MASK, c->mask, &gt);
    flex_mod *score = c->score ? compile_mod(FLEX_MOD_SCORE, c->score, NULL) : NULL;

    int32_t *lists = NULL;
    if (c->explicit_lists) {
        const int nqb = (c->Lq + c->q_block - 1) / c->q_block;
        const int nkb = (c->Lkv + c->kv_block - 1) / c->kv_block;
        const int rows = c->mask_B * c->mask_H * nqb;
        lists = malloc((size_t)(2 * rows + 2 * (size_t)rows * nkb) * sizeof *lists);
        random_lists(rows, nkb, lists, lists + rows, lists + rows + (size_t)rows * nkb,
                     lists + 2 * rows + (size_t)rows * nkb);
    }
    flex_block_mask *mask_bits = make_mask(gpu, c, mask_mod, lists);
    flex_block_mask *mask_eval = make_mask(gpu_eval, c, mask_mod, lists);
    flex_block_mask *mask_fwd = make_mask(gpu_bwd_bits, c, mask_mod, lists);
    flex_block_mask *mask_made = make_mask(gpu_bwd_bits, c, mask_mod, lists);

    const size_t out_bytes = (size_t)(c->B * c->Hq * c->Lq * c->Dv) * es;
    const size_t lse_n = (size_t)(c->B * c->Hq * c->Lq);
    void *out_eval = malloc(out_bytes), *out_bits = malloc(out_bytes);
    float *lse_eval = malloc(lse_n * 4), *lse_bits = malloc(lse_n * 4);
    for (int call = 0; call < 2; call++) {
        flex_status s = forward_on(gpu_eval, c, dq, dk, dv, score, mask_eval, out_eval, lse_eval);
        if (s != FLEX_OK) {
            fprintf(stderr, "FAIL %s: forward evaluating the mask: %s\n", c->name,
                    flex_error_message(gpu_eval));
            failures++;
            break;
        }
        s = forward_on(gpu, c, dq, dk, dv, score, mask_bits, out_bits, lse_bits);
        if (s != FLEX_OK) {
            fprintf(stderr, "FAIL %s: forward with bit masks: %s\n", c->name,
                    flex_error_message(gpu));
            failures++;
            break;
        }
        size_t bad_out = 0, bad_lse = 0, nan_out = 0;
        for (size_t i = 0; i < out_bytes / es; i++) {
            bad_out += memcmp((char *)out_eval + i * es, (char *)out_bits + i * es, es) != 0;
            nan_out += isnan(flex_load_as_float(out_bits, c->dt, (int64_t)i));
        }
        for (size_t i = 0; i < lse_n; i++)
            bad_lse += memcmp(&lse_eval[i], &lse_bits[i], 4) != 0;
        if (bad_out || bad_lse || nan_out) {
            fprintf(stderr,
                    "FAIL %s (call %d): %zu outputs and %zu lse differ from the evaluated mask; "
                    "%zu outputs NaN\n",
                    c->name, call + 1, bad_out, bad_lse, nan_out);
            failures++;
            break;
        }
    }
    if (failures == failures_before)
        compare_backward(c, dq, dk, dv, score, mask_eval, mask_bits, mask_fwd, mask_made);
    if (failures == failures_before)
        printf("PASS %s: the same bits, forward and backward\n", c->name);
    free(out_eval), free(out_bits), free(lse_eval), free(lse_bits), free(lists), free(g);
    flex_block_mask_destroy(mask_bits);
    flex_block_mask_destroy(mask_eval);
    flex_block_mask_destroy(mask_fwd);
    flex_block_mask_destroy(mask_made);
    flex_mod_destroy(mask_mod);
    if (score) flex_mod_destroy(score);
    flex_free(gpu, dq), flex_free(gpu, dk), flex_free(gpu, dv);
}

/* A mask mod that reads past its buffer: the bit kernel clamps and flags
 * the read, and every forward, the one that made the bits and the ones
 * that find them made, reports it at the next synchronize, as evaluating
 * the mask does. The masks are built while the buffer is long enough (the
 * build would refuse the read); the forwards run after a shorter one is
 * bound. */
static void test_bounds_reported(void) {
    const int failures_before = failures;
    const bits_case c = {"bounds", FLEX_BF16, 1, 2, 2, 300, 300, 128, 128,
                         "q >= kv && (q - kv) % 3 == 0 && !g[kv + 100]", 1, 1, 128, 128, NULL, 0};
    int64_t gn = 400;
    uint8_t *g = calloc((size_t)gn, 1);
    const flex_tensor long_g = flex_tensor_contiguous(g, FLEX_BOOL, 1, &gn, FLEX_DEVICE_CPU);
    flex_mod *mod = compile_mod(FLEX_MOD_MASK, c.mask, &long_g);
    flex_block_mask *masks[2] = {make_mask(gpu_eval, &c, mod, NULL), make_mask(gpu, &c, mod, NULL)};
    const int64_t short_n = 300; /* the read at kv + 100 runs past it */
    const flex_tensor short_g = flex_tensor_contiguous(g, FLEX_BOOL, 1, &short_n, FLEX_DEVICE_CPU);
    if (flex_mod_bind_buffer(NULL, mod, "g", &short_g) != FLEX_OK) exit(1);
    const size_t es = 2, n = (size_t)(c.B * c.Hq * c.Lq * c.D);
    void *zeros = calloc(n, es);
    void *dq = to_gpu(zeros, n * es), *dk = to_gpu(zeros, n * es), *dv = to_gpu(zeros, n * es);
    void *out = malloc(n * es);
    float *lse = malloc((size_t)(c.B * c.Hq * c.Lq) * 4);
    void *grads[3] = {malloc(n * es), malloc(n * es), malloc(n * es)};
    flex_context *ctxs[2] = {gpu_eval, gpu};
    for (int i = 0; i < 2; i++) {
        for (int call = 0; call < 2; call++) {
            flex_status s = forward_on(ctxs[i], &c, dq, dk, dv, NULL, masks[i], out, lse);
            if (s != FLEX_ERR_BUFFER_BOUNDS || !strstr(flex_error_message(ctxs[i]), "'g'")) {
                fprintf(stderr, "FAIL bounds (%s, call %d): status %d, '%s'\n",
                        i ? "bit masks" : "evaluated", call + 1, (int)s,
                        flex_error_message(ctxs[i]));
                failures++;
            }
            /* the backward reports it by itself (the forward's report was
             * taken at its own synchronize) */
            flex_status fs;
            s = backward_on(ctxs[i], &c, dq, dk, dv, dq, NULL, masks[i], masks[i], grads, &fs);
            if (fs != FLEX_ERR_BUFFER_BOUNDS || s != FLEX_ERR_BUFFER_BOUNDS ||
                !strstr(flex_error_message(ctxs[i]), "'g'")) {
                fprintf(stderr, "FAIL bounds, backward (%s, call %d): status %d / %d, '%s'\n",
                        i ? "bit masks" : "evaluated", call + 1, (int)fs, (int)s,
                        flex_error_message(ctxs[i]));
                failures++;
            }
        }
        flex_block_mask_destroy(masks[i]);
    }
    if (failures == failures_before)
        printf("PASS mask read out of its buffer: reported on every call, forward and backward\n");
    free(out), free(lse), free(zeros), free(g), free(grads[0]), free(grads[1]), free(grads[2]);
    flex_mod_destroy(mod);
    flex_free(gpu, dq), flex_free(gpu, dk), flex_free(gpu, dv);
}

/* A context with `add` on top of the environment's keys; without one the
 * program says why and skips. */
static flex_context *open_with(const char *add) {
    flex_context *ctx = gpu_test_open_with(add);
    if (!ctx) {
        printf("SKIPPED: no usable CUDA backend (%s)\n", flex_error_message(NULL));
        exit(77);
    }
    return ctx;
}

int main(void) {
    gpu_test_open(); /* exits 77 without a usable CUDA backend */
    flex_context_destroy(gpu);
    gpu = open_with("cuda_partial_bits=1");
    gpu_eval = open_with("cuda_partial_bits=0");
    gpu_bwd_bits = open_with("cuda_partial_bits=1");
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        run_case(&cases[i]);
    test_bounds_reported();
    flex_context_destroy(gpu_bwd_bits);
    flex_context_destroy(gpu_eval);
    flex_context_destroy(gpu);
    flex_context_destroy(cpu);
    if (failures) {
        fprintf(stderr, "%d failures\n", failures);
        return 1;
    }
    printf("partial-block bit masks: every case the same bits as the evaluated mask, forward and "
           "backward\n");
    return 0;
}
