/*
 * The CUDA backward against the CPU backward on the same inputs (the
 * CPU's forward out and lse, so only the backward kernels differ): dq, dk,
 * dv and the gradients of float buffers (learnable biases), with GQA,
 * unequal lengths, D != Dv, unaligned head dims, BSHD views, block-sparse
 * masks, calls that want only some gradients, and the named errors that
 * leave the caller's gradients untouched. The CPU backward is itself
 * checked against the fp64 oracle (test_cpu_backward). Without a usable
 * CUDA backend the program prints "SKIPPED: <reason>" and exits 77. It
 * needs no test library, so it also builds where the check library is
 * missing (GPU machines).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "dtype.h"
#if FLEXATTN_HAVE_CUDA
#include "backends/cuda/cuda_loader.h"
#endif

#include "gpu_test.h"

#define EXPECT_EQ(a, b) EXPECT((a) == (b), "%s is %d, expected %d", #a, (int)(a), (int)(b))

typedef struct bw_case {
    const char *name;
    flex_dtype dt;
    int B, Hq, Hkv, Lq, Lkv, D, Dv;
    int bshd;
    const char *score;  /* NULL: none */
    const char *mask;   /* NULL: dense */
    int block;          /* mask block size */
    const char *grads;  /* comma-separated buffer names whose gradients are wanted */
    int want_dq, want_dk, want_dv;
    /* opts->deterministic: the GPU backward runs twice, its gradients
     * poisoned between the runs, and the two must agree bit for bit */
    int deterministic;
} bw_case;

/* Buffers every case's mods may declare: slopes[Hq] f32, hs[Hq] f32,
 * rel[Hq][Lq + Lkv] bf16, doc[max(Lq, Lkv)] i32, unused[4] f32. */
#define NUM_BUFS 5
static const char *const buf_names[NUM_BUFS] = {"slopes", "hs", "rel", "doc", "unused"};
static const flex_dtype buf_types[NUM_BUFS] = {FLEX_F32, FLEX_F32, FLEX_BF16, FLEX_I32, FLEX_F32};

typedef struct host_bufs {
    void *data[NUM_BUFS];
    flex_tensor view[NUM_BUFS];
} host_bufs;

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static float uniform(void) {
    return gpu_test_uniform(&rng);
}

static void make_bufs(const bw_case *c, host_bufs *hb) {
    const int64_t len = c->Lq > c->Lkv ? c->Lq : c->Lkv;
    const int64_t sizes[NUM_BUFS][2] = {
        {c->Hq, 1}, {c->Hq, 1}, {c->Hq, c->Lq + c->Lkv}, {len, 1}, {4, 1}};
    const int ndims[NUM_BUFS] = {1, 1, 2, 1, 1};
    for (int i = 0; i < NUM_BUFS; i++) {
        const int64_t n = sizes[i][0] * sizes[i][1];
        hb->data[i] = calloc((size_t)n, 4);
        for (int64_t e = 0; e < n; e++) {
            if (buf_types[i] == FLEX_I32)
                ((int32_t *)hb->data[i])[e] = (int32_t)(e / 37); /* documents of 37 */
            else
                flex_store_from_float(hb->data[i], buf_types[i], e, 0.5f * uniform());
        }
        hb->view[i] = flex_tensor_contiguous(hb->data[i], buf_types[i], ndims[i], sizes[i],
                                             FLEX_DEVICE_CPU);
    }
}

static flex_mod *compile_mod(flex_context *ctx, flex_mod_kind kind, const char *text,
                             const host_bufs *hb) {
    flex_buffer_decl decls[NUM_BUFS];
    for (int i = 0; i < NUM_BUFS; i++)
        decls[i] = (flex_buffer_decl){buf_names[i], buf_types[i], hb->view[i].ndim};
    const flex_mod_desc desc = {kind, text, NULL, 0, decls, NUM_BUFS};
    flex_mod *m = NULL;
    int bad = flex_mod_compile(ctx, &desc, &m) != FLEX_OK;
    for (int i = 0; i < NUM_BUFS && !bad; i++)
        bad = flex_mod_bind_buffer(ctx, m, buf_names[i], &hb->view[i]) != FLEX_OK;
    if (bad) {
        fprintf(stderr, "FAIL: mod '%s': %s\n", text, flex_error_message(ctx));
        failures++;
        exit(1);
    }
    return m;
}

static flex_tensor view_of(const bw_case *c, void *data, flex_dtype dt, int64_t H, int64_t L,
                           int64_t D, flex_device_type dev) {
    return c->bshd ? flex_tensor_bshd(data, dt, c->B, H, L, D, dev)
                   : flex_tensor_bhsd(data, dt, c->B, H, L, D, dev);
}

/* max |a - b| / max |b| over n floats */
static double rel_error(const float *a, const float *b, int64_t n) {
    double err = 0.0, ref = 0.0;
    for (int64_t i = 0; i < n; i++) {
        const double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= err)) err = d; /* NaN counts as worst */
        if (fabs((double)b[i]) > ref) ref = fabs((double)b[i]);
    }
    return ref > 0.0 ? err / ref : err;
}

static float *as_floats(const void *p, flex_dtype dt, int64_t n) {
    float *f = malloc((size_t)n * sizeof *f);
    for (int64_t i = 0; i < n; i++)
        f[i] = flex_load_as_float(p, dt, i);
    return f;
}

/* Runs c on both backends; returns the worst relative error over the
 * wanted gradients and checks each against tol. */
static void run_case(const bw_case *c) {
    const flex_dtype dt = c->dt;
    const size_t es = flex_dtype_size(dt);
    const int64_t nq = (int64_t)c->B * c->Hq * c->Lq, nk = (int64_t)c->B * c->Hkv * c->Lkv;
    const int64_t n[6] = {nq * c->D, nk * c->D, nk * c->Dv, nq * c->Dv, nq * c->Dv, nq};
    void *h[6]; /* q, k, v, dout, out, lse */
    for (int i = 0; i < 6; i++) {
        h[i] = calloc((size_t)n[i], i == 5 ? 4 : es);
        if (i < 4)
            for (int64_t e = 0; e < n[i]; e++)
                flex_store_from_float(h[i], dt, e, uniform());
    }
    host_bufs hb;
    make_bufs(c, &hb);
    flex_context *ctxs[2] = {cpu, gpu};
    flex_mod *score[2] = {NULL, NULL}, *maskm[2] = {NULL, NULL};
    flex_block_mask *bm[2] = {NULL, NULL};
    for (int x = 0; x < 2; x++) {
        if (c->score) score[x] = compile_mod(ctxs[x], FLEX_MOD_SCORE, c->score, &hb);
        if (c->mask) {
            maskm[x] = compile_mod(ctxs[x], FLEX_MOD_MASK, c->mask, &hb);
            EXPECT_EQ(flex_block_mask_create(ctxs[x], maskm[x], 1, 1, c->Lq, c->Lkv,
                                                    c->block, c->block, &bm[x]),
                             FLEX_OK);
        }
    }
    const flex_tensor q = view_of(c, h[0], dt, c->Hq, c->Lq, c->D, FLEX_DEVICE_CPU);
    const flex_tensor k = view_of(c, h[1], dt, c->Hkv, c->Lkv, c->D, FLEX_DEVICE_CPU);
    const flex_tensor v = view_of(c, h[2], dt, c->Hkv, c->Lkv, c->Dv, FLEX_DEVICE_CPU);
    const flex_tensor dout = view_of(c, h[3], dt, c->Hq, c->Lq, c->Dv, FLEX_DEVICE_CPU);
    const flex_tensor out = view_of(c, h[4], dt, c->Hq, c->Lq, c->Dv, FLEX_DEVICE_CPU);
    const flex_tensor lse = flex_tensor_bhsd(h[5], FLEX_F32, c->B, c->Hq, c->Lq, 1,
                                             FLEX_DEVICE_CPU);
    EXPECT_EQ(flex_attention(cpu, &q, &k, &v, score[0], bm[0], NULL, &out, &lse), FLEX_OK);

    /* Buffer gradients, starting from 0.25 (they are added to). */
    int grad_buf[NUM_BUFS], num_grads = 0;
    for (int i = 0; c->grads && i < NUM_BUFS; i++) {
        const char *at = strstr(c->grads, buf_names[i]);
        if (at && (at[strlen(buf_names[i])] == 0 || at[strlen(buf_names[i])] == ','))
            grad_buf[num_grads++] = i;
    }
    float *gh[2][NUM_BUFS];
    flex_buffer_grad bg[2][NUM_BUFS];
    void *gdev[NUM_BUFS];
    for (int g = 0; g < num_grads; g++) {
        const flex_tensor *bv = &hb.view[grad_buf[g]];
        int64_t cnt = 1;
        for (int d = 0; d < bv->ndim; d++)
            cnt *= bv->sizes[d];
        for (int x = 0; x < 2; x++) {
            gh[x][g] = malloc((size_t)cnt * 4);
            for (int64_t e = 0; e < cnt; e++)
                gh[x][g][e] = 0.25f;
        }
        gdev[g] = to_gpu(gh[1][g], (size_t)cnt * 4);
        bg[0][g].name = bg[1][g].name = buf_names[grad_buf[g]];
        bg[0][g].grad = flex_tensor_contiguous(gh[0][g], FLEX_F32, bv->ndim, bv->sizes,
                                               FLEX_DEVICE_CPU);
        bg[1][g].grad = flex_tensor_contiguous(gdev[g], FLEX_F32, bv->ndim, bv->sizes,
                                               FLEX_DEVICE_CUDA);
    }

    /* CPU reference */
    void *cg[3];
    const int64_t gn[3] = {n[0], n[1], n[2]};
    for (int i = 0; i < 3; i++)
        cg[i] = calloc((size_t)gn[i], es);
    const flex_tensor cdq = view_of(c, cg[0], dt, c->Hq, c->Lq, c->D, FLEX_DEVICE_CPU);
    const flex_tensor cdk = view_of(c, cg[1], dt, c->Hkv, c->Lkv, c->D, FLEX_DEVICE_CPU);
    const flex_tensor cdv = view_of(c, cg[2], dt, c->Hkv, c->Lkv, c->Dv, FLEX_DEVICE_CPU);
    EXPECT(flex_attention_backward(cpu, &q, &k, &v, &out, &dout, &lse, score[0], bm[0], NULL,
                                          &cdq, &cdk, &cdv, bg[0], num_grads) == FLEX_OK,
                  "%s cpu: %s", c->name, flex_error_message(cpu));

    /* GPU, from the same out and lse; gradients poisoned with NaN bits
     * first (0xff bytes), so that an element never written shows. */
    void *d[6], *dg[3];
    for (int i = 0; i < 6; i++)
        d[i] = to_gpu(h[i], (size_t)n[i] * (i == 5 ? 4 : es));
    const flex_tensor gq = view_of(c, d[0], dt, c->Hq, c->Lq, c->D, FLEX_DEVICE_CUDA);
    const flex_tensor gk = view_of(c, d[1], dt, c->Hkv, c->Lkv, c->D, FLEX_DEVICE_CUDA);
    const flex_tensor gv = view_of(c, d[2], dt, c->Hkv, c->Lkv, c->Dv, FLEX_DEVICE_CUDA);
    const flex_tensor gdo = view_of(c, d[3], dt, c->Hq, c->Lq, c->Dv, FLEX_DEVICE_CUDA);
    const flex_tensor go = view_of(c, d[4], dt, c->Hq, c->Lq, c->Dv, FLEX_DEVICE_CUDA);
    const flex_tensor glse =
        flex_tensor_bhsd(d[5], FLEX_F32, c->B, c->Hq, c->Lq, 1, FLEX_DEVICE_CUDA);
    void *poison[3];
    for (int i = 0; i < 3; i++) {
        poison[i] = malloc((size_t)gn[i] * es);
        memset(poison[i], 0xff, (size_t)gn[i] * es);
        dg[i] = to_gpu(poison[i], (size_t)gn[i] * es);
    }
    const flex_tensor gdq = view_of(c, dg[0], dt, c->Hq, c->Lq, c->D, FLEX_DEVICE_CUDA);
    const flex_tensor gdk = view_of(c, dg[1], dt, c->Hkv, c->Lkv, c->D, FLEX_DEVICE_CUDA);
    const flex_tensor gdv = view_of(c, dg[2], dt, c->Hkv, c->Lkv, c->Dv, FLEX_DEVICE_CUDA);
    const flex_attention_options opts = {.deterministic = c->deterministic};
    const int want[3] = {c->want_dq, c->want_dk, c->want_dv};
    const char *const what[3] = {"dq", "dk", "dv"};
    void *first[3] = {NULL, NULL, NULL}; /* the first run's gradients (deterministic) */
    for (int run = 0; run < (c->deterministic ? 2 : 1); run++) {
        if (run == 1)
            for (int i = 0; i < 3; i++) {
                first[i] = malloc((size_t)gn[i] * es);
                EXPECT_EQ(flex_copy_to_host(gpu, first[i], dg[i], (size_t)gn[i] * es), FLEX_OK);
                EXPECT_EQ(flex_copy_to_device(gpu, dg[i], poison[i], (size_t)gn[i] * es),
                          FLEX_OK);
            }
        flex_status s = flex_attention_backward(
            gpu, &gq, &gk, &gv, &go, &gdo, &glse, score[1], bm[1], &opts,
            c->want_dq ? &gdq : NULL, c->want_dk ? &gdk : NULL, c->want_dv ? &gdv : NULL, bg[1],
            num_grads);
        if (s == FLEX_OK) s = flex_synchronize(gpu);
        EXPECT(s == FLEX_OK, "%s gpu (run %d): %s", c->name, run + 1, flex_error_message(gpu));
    }

    const double tol = dt == FLEX_F32 ? 1e-4 : 2e-2;
    for (int i = 0; i < 3; i++) {
        void *back = malloc((size_t)gn[i] * es);
        EXPECT_EQ(flex_copy_to_host(gpu, back, dg[i], (size_t)gn[i] * es), FLEX_OK);
        if (first[i] && want[i]) {
            size_t diff = 0;
            for (size_t e = 0; e < (size_t)gn[i] * es; e++)
                diff += ((unsigned char *)back)[e] != ((unsigned char *)first[i])[e];
            printf("%-28s %s two deterministic runs: %s\n", c->name, what[i],
                   diff ? "DIFFER" : "bit-identical");
            EXPECT(diff == 0, "%s: deterministic %s differs in %zu bytes between two runs",
                   c->name, what[i], diff);
        }
        free(first[i]);
        if (want[i]) {
            float *a = as_floats(back, dt, gn[i]), *b = as_floats(cg[i], dt, gn[i]);
            const double e = rel_error(a, b, gn[i]);
            printf("%-28s %s rel %.2e\n", c->name, what[i], e);
            EXPECT(e <= tol, "%s: %s differs from the CPU backward by %.3g (tol %.g)",
                          c->name, what[i], e, tol);
            free(a);
            free(b);
        } else {
            EXPECT(memcmp(back, poison[i], (size_t)gn[i] * es) == 0,
                          "%s: %s was not asked for but written", c->name, what[i]);
        }
        free(back);
    }
    for (int g = 0; g < num_grads; g++) {
        const flex_tensor *bv = &bg[0][g].grad;
        int64_t cnt = 1;
        for (int dd = 0; dd < bv->ndim; dd++)
            cnt *= bv->sizes[dd];
        EXPECT_EQ(flex_copy_to_host(gpu, gh[1][g], gdev[g], (size_t)cnt * 4), FLEX_OK);
        int moved = 0;
        for (int64_t e = 0; e < cnt; e++)
            moved |= gh[0][g][e] != 0.25f;
        EXPECT(moved, "%s: the CPU gradient of %s is 0 everywhere: the case tests nothing",
                      c->name, bg[0][g].name);
        const double e = rel_error(gh[1][g], gh[0][g], cnt);
        printf("%-28s grad %s rel %.2e\n", c->name, bg[0][g].name, e);
        EXPECT(e <= tol, "%s: the gradient of %s differs by %.3g", c->name, bg[0][g].name,
                      e);
        free(gh[0][g]);
        free(gh[1][g]);
        flex_free(gpu, gdev[g]);
    }
    for (int i = 0; i < 6; i++) {
        flex_free(gpu, d[i]);
        free(h[i]);
    }
    for (int i = 0; i < 3; i++) {
        flex_free(gpu, dg[i]);
        free(cg[i]);
        free(poison[i]);
    }
    for (int x = 0; x < 2; x++) {
        if (bm[x]) flex_block_mask_destroy(bm[x]);
        if (maskm[x]) flex_mod_destroy(maskm[x]);
        if (score[x]) flex_mod_destroy(score[x]);
    }
    for (int i = 0; i < NUM_BUFS; i++)
        free(hb.data[i]);
}

static const bw_case cases[] = {
    {"bf16 alibi causal gqa", FLEX_BF16, 1, 4, 2, 200, 200, 64, 64, 0,
     "score + slopes[h] * (kv - q)", "q >= kv", 64, "slopes", 1, 1, 1, 0},
    {"f16 bias table window bshd", FLEX_F16, 2, 2, 1, 150, 256, 48, 80, 1,
     "score * hs[h] + float(rel[h][q - kv + 255])", "q - kv <= 40 && kv - q <= 40", 32,
     "hs,rel", 1, 1, 1, 0},
    {"bf16 noop D128", FLEX_BF16, 1, 2, 2, 300, 300, 128, 128, 0, NULL, NULL, 128, NULL, 1, 1, 1,
     0},
    {"f16 softcap doc causal D96", FLEX_F16, 1, 2, 2, 160, 160, 96, 64, 0,
     "30.0 * tanh(score / 30.0)", "q >= kv && doc[q] == doc[kv]", 16, NULL, 1, 1, 1, 0},
    {"bf16 D256 Dv 200 causal", FLEX_BF16, 1, 1, 1, 90, 90, 256, 200, 0, NULL, "q >= kv", 128,
     NULL, 1, 1, 1, 0},
    {"f32 softcap doc gqa", FLEX_F32, 1, 4, 1, 100, 120, 32, 40, 0, "30.0 * tanh(score / 30.0)",
     "q >= kv && doc[q] == doc[kv]", 32, NULL, 1, 1, 1, 0},
    {"f32 alibi hs grads", FLEX_F32, 2, 2, 2, 70, 90, 64, 64, 1,
     "score * hs[h] + slopes[h] * (kv - q)", NULL, 64, "slopes,hs", 1, 1, 1, 0},
    /* 128-row kv tiles (8 warps) with GQA, partial blocks, ends of both
     * sequences inside a tile, and a buffer gradient */
    {"bf16 alibi doc causal gqa D128 blocks 128", FLEX_BF16, 2, 4, 2, 400, 400, 128, 128, 0,
     "score + slopes[h] * (kv - q)", "q >= kv && doc[q] == doc[kv]", 128, "slopes", 1, 1, 1, 0},
    {"f16 noop gqa D64 Lq != Lkv", FLEX_F16, 1, 4, 1, 330, 270, 64, 64, 0, NULL, NULL, 128, NULL,
     1, 1, 1, 0},
    /* blocks of 128: on sm_90 the wgmma kernel (flex_backward_sm90.cuh),
     * with D != Dv, a padded head dim, buffer gradients, partial blocks,
     * both sequences ending inside a tile, and some gradients only */
    {"f16 bias table window D64 Dv128 blocks 128", FLEX_F16, 2, 2, 1, 200, 300, 64, 128, 1,
     "score * hs[h] + float(rel[h][q - kv + 299])", "q - kv <= 100 && kv - q <= 100", 128,
     "hs,rel", 1, 1, 1, 0},
    {"bf16 softcap causal D96 Dv64 Lq > Lkv blocks 128", FLEX_BF16, 1, 4, 2, 330, 200, 96, 64, 0,
     "30.0 * tanh(score / 30.0)", "q >= kv", 128, NULL, 1, 1, 1, 0},
    {"bf16 dq dk only D128 Dv64 doc blocks 128", FLEX_BF16, 1, 2, 2, 260, 260, 128, 64, 0, NULL,
     "doc[q] == doc[kv]", 128, NULL, 1, 1, 0, 0},
    /* dQ of both warpgroups added into the same rows at head dim 64, the
     * last step's rows partly past Lq (200 = 3 x 64 + 8) */
    {"bf16 causal gqa D64 Lq 200 blocks 128", FLEX_BF16, 2, 4, 2, 200, 200, 64, 64, 0, NULL,
     "q >= kv", 128, NULL, 1, 1, 1, 0},
    {"f16 alibi dv only D64 blocks 128", FLEX_F16, 1, 2, 1, 190, 190, 64, 64, 0,
     "score + slopes[h] * (kv - q)", "q >= kv", 128, "slopes", 0, 0, 1, 0},
    {"bf16 dv only", FLEX_BF16, 1, 2, 1, 130, 130, 64, 64, 0, NULL, "q >= kv", 64, NULL, 0, 0, 1,
     0},
    {"f16 dq dk only, -inf rows", FLEX_F16, 1, 2, 2, 100, 60, 64, 32, 0,
     "where(q >= 80, -inf, score)", NULL, 64, NULL, 1, 1, 0, 0},
    /* opts->deterministic: dQ from its own kernel (flex_backward_dq.cuh),
     * block masks with partial blocks, GQA and score mods; two runs bit
     * for bit, and the CPU backward within the same tolerances */
    {"det bf16 alibi doc gqa", FLEX_BF16, 2, 4, 2, 200, 200, 64, 64, 0,
     "score + slopes[h] * (kv - q)", "q >= kv && doc[q] == doc[kv]", 64, NULL, 1, 1, 1, 1},
    {"det f16 softcap window bshd", FLEX_F16, 1, 4, 1, 150, 256, 48, 80, 1,
     "30.0 * tanh(score / 30.0)", "q - kv <= 40 && kv - q <= 40", 32, NULL, 1, 1, 1, 1},
    {"det f32 alibi causal gqa", FLEX_F32, 1, 4, 2, 100, 120, 32, 40, 0,
     "score + slopes[h] * (kv - q)", "q >= kv", 32, NULL, 1, 1, 1, 1},
    {"det f32 scale doc bshd", FLEX_F32, 2, 2, 1, 77, 77, 64, 64, 1, "score * hs[h]",
     "q >= kv && doc[q] == doc[kv]", 16, NULL, 1, 1, 1, 1},
    {"det bf16 D256 Dv 200 blocks 16", FLEX_BF16, 1, 2, 1, 90, 90, 256, 200, 0,
     "score * hs[h]", "q >= kv", 16, NULL, 1, 1, 1, 1},
    {"det bf16 D128 blocks 128", FLEX_BF16, 1, 4, 2, 300, 300, 128, 128, 0,
     "30.0 * tanh(score / 30.0)", "q >= kv && doc[q] == doc[kv]", 128, NULL, 1, 1, 1, 1},
    {"det f16 dense -inf rows", FLEX_F16, 1, 2, 2, 100, 60, 64, 32, 0,
     "where(q >= 80, -inf, score)", NULL, 64, NULL, 1, 1, 1, 1},
    {"det bf16 dq only", FLEX_BF16, 1, 2, 1, 130, 130, 64, 64, 0, NULL, "q >= kv", 64, NULL, 1,
     0, 0, 1},
    /* and the default mode on the same shapes, which must still pass */
    {"bf16 alibi doc gqa", FLEX_BF16, 2, 4, 2, 200, 200, 64, 64, 0,
     "score + slopes[h] * (kv - q)", "q >= kv && doc[q] == doc[kv]", 64, NULL, 1, 1, 1, 0},
    {"f32 alibi causal gqa", FLEX_F32, 1, 4, 2, 100, 120, 32, 40, 0,
     "score + slopes[h] * (kv - q)", "q >= kv", 32, NULL, 1, 1, 1, 0},
};

/* Named errors, and the caller's gradients untouched by them. */
static void test_errors_write_nothing(void) {
    const bw_case c = {"errors", FLEX_BF16, 1, 2, 2, 64, 64, 32, 32, 0, NULL, NULL, 64, NULL,
                       1, 1, 1, 0};
    host_bufs hb;
    make_bufs(&c, &hb);
    flex_mod *sm = compile_mod(gpu, FLEX_MOD_SCORE, "score + slopes[h] + float(doc[q])", &hb);
    const size_t bytes = (size_t)2 * 64 * 32 * 2;
    void *src = malloc(bytes), *back = malloc(bytes);
    memset(src, 0x3c, bytes);
    void *d[6];
    for (int i = 0; i < 6; i++)
        d[i] = to_gpu(src, bytes);
    const flex_tensor t[5] = {
        flex_tensor_bhsd(d[0], FLEX_BF16, 1, 2, 64, 32, FLEX_DEVICE_CUDA),
        flex_tensor_bhsd(d[1], FLEX_BF16, 1, 2, 64, 32, FLEX_DEVICE_CUDA),
        flex_tensor_bhsd(d[2], FLEX_BF16, 1, 2, 64, 32, FLEX_DEVICE_CUDA),
        flex_tensor_bhsd(d[3], FLEX_BF16, 1, 2, 64, 32, FLEX_DEVICE_CUDA),
        flex_tensor_bhsd(d[4], FLEX_BF16, 1, 2, 64, 32, FLEX_DEVICE_CUDA)};
    const flex_tensor lse = flex_tensor_bhsd(d[5], FLEX_F32, 1, 2, 64, 1, FLEX_DEVICE_CUDA);
    void *dq = to_gpu(src, bytes);
    const flex_tensor tdq = flex_tensor_bhsd(dq, FLEX_BF16, 1, 2, 64, 32, FLEX_DEVICE_CUDA);
    float host_grad[4] = {0};
    void *dev_grad = to_gpu(host_grad, sizeof host_grad);
    const int64_t n4 = 4, n2 = 2;
    struct {
        flex_buffer_grad g;
        flex_status want;
        const char *says;
    } bad[] = {
        /* an int buffer */
        {{"doc", flex_tensor_contiguous(dev_grad, FLEX_F32, 1, &n4, FLEX_DEVICE_CUDA)},
         FLEX_ERR_DTYPE, "doc"},
        /* a buffer the score mod does not read */
        {{"unused", flex_tensor_contiguous(dev_grad, FLEX_F32, 1, &n4, FLEX_DEVICE_CUDA)},
         FLEX_ERR_INVALID_ARGUMENT, "does not read"},
        /* a gradient in host memory */
        {{"slopes", flex_tensor_contiguous(host_grad, FLEX_F32, 1, &n2, FLEX_DEVICE_CPU)},
         FLEX_ERR_INVALID_ARGUMENT, "slopes"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        const flex_status s =
            flex_attention_backward(gpu, &t[0], &t[1], &t[2], &t[3], &t[4], &lse, sm, NULL, NULL,
                                    &tdq, NULL, NULL, &bad[i].g, 1);
        EXPECT_EQ(s, bad[i].want);
        EXPECT(strstr(flex_error_message(gpu), bad[i].says) != NULL, "%s",
                      flex_error_message(gpu));
        EXPECT_EQ(flex_synchronize(gpu), FLEX_OK);
        EXPECT_EQ(flex_copy_to_host(gpu, back, dq, bytes), FLEX_OK);
        EXPECT(memcmp(back, src, bytes) == 0, "dq written by a failed call");
    }
    /* deterministic with a buffer gradient: refused, naming the buffer */
    const flex_buffer_grad slopes_grad = {
        "slopes", flex_tensor_contiguous(dev_grad, FLEX_F32, 1, &n2, FLEX_DEVICE_CUDA)};
    const flex_attention_options det = {.deterministic = 1};
    EXPECT_EQ(flex_attention_backward(gpu, &t[0], &t[1], &t[2], &t[3], &t[4], &lse, sm, NULL,
                                      &det, &tdq, NULL, NULL, &slopes_grad, 1),
              FLEX_ERR_UNSUPPORTED);
    EXPECT(strstr(flex_error_message(gpu), "'slopes'") != NULL &&
               strstr(flex_error_message(gpu), "deterministic") != NULL,
           "%s", flex_error_message(gpu));
    EXPECT_EQ(flex_synchronize(gpu), FLEX_OK);
    EXPECT_EQ(flex_copy_to_host(gpu, back, dq, bytes), FLEX_OK);
    EXPECT(memcmp(back, src, bytes) == 0, "dq written by a failed call");
    /* out of a shape that does not match the inputs */
    const flex_tensor short_out = flex_tensor_bhsd(d[3], FLEX_BF16, 1, 2, 63, 32, FLEX_DEVICE_CUDA);
    EXPECT_EQ(flex_attention_backward(gpu, &t[0], &t[1], &t[2], &short_out, &t[4], &lse, sm,
                                             NULL, NULL, &tdq, NULL, NULL, NULL, 0),
                     FLEX_ERR_SHAPE);
    EXPECT_EQ(flex_copy_to_host(gpu, back, dq, bytes), FLEX_OK);
    EXPECT(memcmp(back, src, bytes) == 0, "dq written by a failed call");
    for (int i = 0; i < 6; i++)
        flex_free(gpu, d[i]);
    flex_free(gpu, dq);
    flex_free(gpu, dev_grad);
    flex_mod_destroy(sm);
    free(src);
    free(back);
    for (int i = 0; i < NUM_BUFS; i++)
        free(hb.data[i]);
}

#if FLEXATTN_HAVE_CUDA
/* ---- a forward and a backward captured in a CUDA graph ---- */

/* A failed driver call: its name and the driver's words, a failure
 * counted, and the case left. */
#define EXPECT_CU(call)                                                                            \
    do {                                                                                           \
        const CUresult cu_r_ = (call);                                                             \
        if (cu_r_ != 0) {                                                                          \
            char cu_desc_[256];                                                                    \
            flex_cuda_describe(api, cu_r_, cu_desc_, sizeof cu_desc_);                             \
            fprintf(stderr, "FAIL %s:%d: %s: %s\n", __FILE__, __LINE__, #call, cu_desc_);          \
            failures++;                                                                            \
            return;                                                                                \
        }                                                                                          \
    } while (0)

static const flex_cuda_api *api;

/* Waits for every copy: a synchronous copy from pageable memory may return
 * before its DMA ends, and the graphs' stream does not wait for the legacy
 * stream the copies go to. */
static void settle(void) {
    if (flex_synchronize(gpu) != FLEX_OK) {
        fprintf(stderr, "FAIL: flex_synchronize: %s\n", flex_error_message(gpu));
        exit(1);
    }
}

/* Fills n values of dtype dt at device memory d (new values each call). */
static void fill_device(void *d, flex_dtype dt, int64_t n) {
    const size_t es = flex_dtype_size(dt);
    void *h = malloc((size_t)n * es);
    for (int64_t e = 0; e < n; e++)
        flex_store_from_float(h, dt, e, uniform());
    if (flex_copy_to_device(gpu, d, h, (size_t)n * es) != FLEX_OK) {
        fprintf(stderr, "FAIL: copy to the GPU: %s\n", flex_error_message(gpu));
        exit(1);
    }
    free(h);
    settle();
}

/* out, lse, dq, dk, dv of one step, on the host. */
enum { G_OUT, G_LSE, G_DQ, G_DK, G_DV, G_COUNT };
static const char *const g_names[G_COUNT] = {"out", "lse", "dq", "dk", "dv"};

typedef struct graph_problem {
    flex_dtype dt;
    int deterministic;
    const flex_tensor *t;        /* q, k, v, dout, then G_COUNT outputs */
    void *const *dev;            /* their device memory */
    const size_t *bytes;         /* their sizes */
    const flex_mod *score;
    const flex_block_mask *mask;
    CUstream stream;
} graph_problem;

/* The step a training loop would capture: forward, then backward, on the
 * problem's stream. */
static flex_status graph_step(const graph_problem *g, const flex_block_mask *mask) {
    const flex_tensor *t = g->t;
    const flex_attention_options opts = {.stream = g->stream, .deterministic = g->deterministic};
    flex_status s = flex_attention(gpu, &t[0], &t[1], &t[2], g->score, mask, &opts, &t[4 + G_OUT],
                                   &t[4 + G_LSE]);
    if (s == FLEX_OK)
        s = flex_attention_backward(gpu, &t[0], &t[1], &t[2], &t[4 + G_OUT], &t[3],
                                    &t[4 + G_LSE], g->score, mask, &opts, &t[4 + G_DQ],
                                    &t[4 + G_DK], &t[4 + G_DV], NULL, 0);
    return s;
}

/* Copies the outputs to host[] (malloc'd by the caller). */
static int graph_outputs(const graph_problem *g, void **host) {
    if (flex_synchronize(gpu) != FLEX_OK) return -1;
    for (int i = 0; i < G_COUNT; i++)
        if (flex_copy_to_host(gpu, host[i], g->dev[4 + i], g->bytes[4 + i]) != FLEX_OK) return -1;
    return 0;
}

/* Whether got equals want: bit for bit, except dq in the default mode
 * (fp32 atomics: its last bits may move), which must be within tol. */
static int graph_same(const graph_problem *g, void *const *got, void *const *want,
                      const char *what) {
    int ok = 1;
    for (int i = 0; i < G_COUNT; i++) {
        const flex_dtype dt = i == G_LSE ? FLEX_F32 : g->dt;
        if (i == G_DQ && !g->deterministic) {
            const int64_t n = (int64_t)(g->bytes[4 + i] / flex_dtype_size(dt));
            float *a = as_floats(got[i], dt, n), *b = as_floats(want[i], dt, n);
            const double e = rel_error(a, b, n), tol = dt == FLEX_F32 ? 1e-5 : 1e-2;
            free(a);
            free(b);
            if (e > tol) {
                fprintf(stderr, "FAIL: %s: dq differs by %.3g (tol %.g)\n", what, e, tol);
                ok = 0;
            }
        } else if (memcmp(got[i], want[i], g->bytes[4 + i]) != 0) {
            fprintf(stderr, "FAIL: %s: %s is not bit-identical\n", what, g_names[i]);
            ok = 0;
        }
    }
    return ok;
}

/* ---- work space from the caller's allocator ---- */

typedef struct test_pool {
    void *base;
    size_t size;
    int allocs, frees, outstanding;
    void *stream;
} test_pool;

static void *pool_alloc(void *user, size_t bytes, void *stream) {
    test_pool *p = user;
    if (bytes > p->size || p->outstanding) return NULL;
    p->allocs++;
    p->outstanding = 1;
    p->stream = stream;
    return p->base;
}
static void pool_free(void *user, void *ptr, void *stream) {
    test_pool *p = user;
    if (ptr == p->base && stream == p->stream) p->outstanding = 0;
    p->frees++;
}

/* A forward and backward whose work space comes from the caller's
 * allocator (a poisoned pool): the same bits as with the backend's own
 * (deterministic mode), every allocation given back on the call's stream;
 * a pool too small is FLEX_ERR_OUT_OF_MEMORY. */
static void test_caller_allocator(void) {
    const int B = 1, Hq = 4, Hkv = 2, L = 200, D = 64;
    const flex_dtype dt = FLEX_BF16;
    const bw_case c = {"allocator", dt, B, Hq, Hkv, L, L, D, D, 0, NULL, NULL, 128, NULL, 1, 1, 1,
                       0};
    host_bufs hb;
    make_bufs(&c, &hb);
    flex_mod *score = compile_mod(gpu, FLEX_MOD_SCORE, "score + slopes[h] * (kv - q)", &hb);
    const int64_t nq = (int64_t)B * Hq * L, nk = (int64_t)B * Hkv * L;
    const int64_t n[4 + G_COUNT] = {nq * D, nk * D, nk * D, nq * D, nq * D, nq, nq * D, nk * D,
                                    nk * D};
    void *dev[4 + G_COUNT], *want[G_COUNT], *got[G_COUNT];
    size_t bytes[4 + G_COUNT];
    flex_tensor t[4 + G_COUNT];
    for (int i = 0; i < 4 + G_COUNT; i++) {
        const flex_dtype d = i == 4 + G_LSE ? FLEX_F32 : dt;
        bytes[i] = (size_t)n[i] * flex_dtype_size(d);
        EXPECT_EQ(flex_malloc(gpu, bytes[i], &dev[i]), FLEX_OK);
        const int64_t H = i == 1 || i == 2 || i == 4 + G_DK || i == 4 + G_DV ? Hkv : Hq;
        t[i] = flex_tensor_bhsd(dev[i], d, B, H, L, i == 4 + G_LSE ? 1 : D, FLEX_DEVICE_CUDA);
        if (i < 4) fill_device(dev[i], dt, n[i]);
        if (i >= 4) {
            want[i - 4] = malloc(bytes[i]);
            got[i - 4] = malloc(bytes[i]);
        }
    }
    const graph_problem g = {dt, 1, t, dev, bytes, score, NULL, NULL};
    EXPECT(graph_step(&g, NULL) == FLEX_OK, "allocator: %s", flex_error_message(gpu));
    EXPECT(graph_outputs(&g, want) == 0, "allocator: %s", flex_error_message(gpu));

    test_pool pool = {NULL, (size_t)8 << 20, 0, 0, 0, NULL};
    EXPECT_EQ(flex_malloc(gpu, pool.size, &pool.base), FLEX_OK);
    unsigned char *ff = malloc(pool.size);
    memset(ff, 0xff, pool.size);
    EXPECT_EQ(flex_copy_to_device(gpu, pool.base, ff, pool.size), FLEX_OK);
    settle();
    const flex_device_allocator a = {pool_alloc, pool_free, &pool};
    EXPECT_EQ(flex_context_set_allocator(gpu, &a), FLEX_OK);
    EXPECT(graph_step(&g, NULL) == FLEX_OK, "allocator: %s", flex_error_message(gpu));
    EXPECT(graph_outputs(&g, got) == 0, "allocator: %s", flex_error_message(gpu));
    EXPECT(pool.allocs >= 1, "the backward took no work space from the caller's allocator");
    EXPECT(pool.allocs == pool.frees && !pool.outstanding,
           "%d allocations, %d given back (outstanding %d)", pool.allocs, pool.frees,
           pool.outstanding);
    EXPECT(graph_same(&g, got, want, "caller's allocator"), "results differ from the backend's "
                                                            "own work space");
    const size_t whole = pool.size;
    pool.size = 16; /* too small for any work space */
    const flex_status s = graph_step(&g, NULL);
    EXPECT(s == FLEX_ERR_OUT_OF_MEMORY && strstr(flex_error_message(gpu), "caller's allocator"),
           "a refused allocation gave %s: %s", flex_status_name(s), flex_error_message(gpu));
    pool.size = whole;
    EXPECT_EQ(flex_context_set_allocator(gpu, NULL), FLEX_OK);
    settle();
    printf("%-28s work space from the caller's allocator (%d allocations): same bits\n",
           "allocator", pool.allocs);
    flex_free(gpu, pool.base);
    free(ff);
    for (int i = 0; i < 4 + G_COUNT; i++)
        flex_free(gpu, dev[i]);
    for (int i = 0; i < G_COUNT; i++) {
        free(want[i]);
        free(got[i]);
    }
    flex_mod_destroy(score);
    for (int i = 0; i < NUM_BUFS; i++)
        free(hb.data[i]);
}

/* Captures a forward and a backward (prepared by one direct call first:
 * kernels compiled, the block mask's lists and the host-resident buffers
 * copied to the GPU) on a stream in global capture mode, where any
 * allocation, synchronous copy or synchronisation inside the calls would
 * fail the capture; replays the graph and compares with direct calls, then
 * replays it on new inputs copied into the same buffers, which it must
 * recompute. Then a call that would need a first upload during a capture
 * is refused by name and leaves the capture valid. */
static void test_graph_capture(flex_dtype dt, int deterministic) {
    /* 16-bit: blocks of 128, which on sm_90 take the TMA forward (tensor
     * maps in the parameters, shared memory set per launch) */
    const int B = 1, Hq = 4, Hkv = 2, L = 200, D = 64, block = dt == FLEX_F32 ? 64 : 128;
    const bw_case c = {"graph", dt, B, Hq, Hkv, L, L, D, D, 0, NULL, NULL, block, NULL, 1, 1, 1,
                       0};
    host_bufs hb;
    make_bufs(&c, &hb); /* slopes and doc stay in host memory */
    flex_mod *score = compile_mod(gpu, FLEX_MOD_SCORE, "score + slopes[h] * (kv - q)", &hb);
    flex_mod *maskm = compile_mod(gpu, FLEX_MOD_MASK, "q >= kv && doc[q] == doc[kv]", &hb);
    flex_block_mask *bm = NULL, *fresh = NULL;
    EXPECT_EQ(flex_block_mask_create(gpu, maskm, 1, 1, L, L, block, block, &bm), FLEX_OK);
    const int64_t nq = (int64_t)B * Hq * L, nk = (int64_t)B * Hkv * L;
    const int64_t n[4 + G_COUNT] = {nq * D, nk * D, nk * D, nq * D, nq * D, nq, nq * D, nk * D,
                                    nk * D};
    void *dev[4 + G_COUNT];
    size_t bytes[4 + G_COUNT];
    flex_tensor t[4 + G_COUNT];
    void *want[G_COUNT], *got[G_COUNT], *poison = NULL;
    size_t most = 0;
    for (int i = 0; i < 4 + G_COUNT; i++) {
        const flex_dtype d = i == 4 + G_LSE ? FLEX_F32 : dt;
        bytes[i] = (size_t)n[i] * flex_dtype_size(d);
        most = bytes[i] > most ? bytes[i] : most;
        EXPECT_EQ(flex_malloc(gpu, bytes[i], &dev[i]), FLEX_OK);
        const int64_t H = i == 1 || i == 2 || i == 4 + G_DK || i == 4 + G_DV ? Hkv : Hq;
        t[i] = flex_tensor_bhsd(dev[i], d, B, H, L, i == 4 + G_LSE ? 1 : D, FLEX_DEVICE_CUDA);
        if (i >= 4) {
            want[i - 4] = malloc(bytes[i]);
            got[i - 4] = malloc(bytes[i]);
        }
    }
    poison = malloc(most);
    memset(poison, 0xff, most);
    CUstream stream = NULL;
    CUgraph graph = NULL;
    CUgraphExec exec = NULL;
    EXPECT_CU(api->cuStreamCreate(&stream, FLEX_CU_STREAM_NON_BLOCKING));
    const graph_problem g = {dt, deterministic, t, dev, bytes, score, bm, stream};
    char label[96];
    snprintf(label, sizeof label, "graph %s %s", flex_dtype_name(dt),
             deterministic ? "deterministic" : "default");

    /* 1. Prepared by a direct call on inputs A; its results are the
     * reference for the first replay. */
    for (int i = 0; i < 4; i++)
        fill_device(dev[i], dt, n[i]);
    EXPECT(graph_step(&g, bm) == FLEX_OK, "%s: direct call: %s", label, flex_error_message(gpu));
    EXPECT(graph_outputs(&g, want) == 0, "%s: %s", label, flex_error_message(gpu));

    /* 2. Captured in global mode: the calls must succeed and the capture
     * end valid. */
    EXPECT_CU(api->cuStreamBeginCapture(stream, FLEX_CU_STREAM_CAPTURE_MODE_GLOBAL));
    const flex_status captured = graph_step(&g, bm);
    char message[512];
    snprintf(message, sizeof message, "%s", flex_error_message(gpu));
    const CUresult ended = api->cuStreamEndCapture(stream, &graph);
    EXPECT(captured == FLEX_OK, "%s: a captured call failed (%s): %s", label,
           flex_status_name(captured), message);
    EXPECT_CU(ended);
    EXPECT_CU(api->cuGraphInstantiate(&exec, graph, 0));

    /* 3. Replayed on the same inputs, outputs poisoned first: the direct
     * call's results. */
    for (int i = 4; i < 4 + G_COUNT; i++)
        EXPECT_EQ(flex_copy_to_device(gpu, dev[i], poison, bytes[i]), FLEX_OK);
    settle();
    EXPECT_CU(api->cuGraphLaunch(exec, stream));
    EXPECT_CU(api->cuStreamSynchronize(stream));
    EXPECT(graph_outputs(&g, got) == 0, "%s: %s", label, flex_error_message(gpu));
    EXPECT(graph_same(&g, got, want, "replay on the inputs of the direct call"),
           "%s: the replay differs from the direct call", label);

    /* 4. New inputs copied into the same buffers: the replay recomputes,
     * and equals a direct call on them. */
    for (int i = 0; i < 4; i++)
        fill_device(dev[i], dt, n[i]);
    EXPECT_CU(api->cuGraphLaunch(exec, stream));
    EXPECT_CU(api->cuStreamSynchronize(stream));
    EXPECT(graph_outputs(&g, got) == 0, "%s: %s", label, flex_error_message(gpu));
    EXPECT(memcmp(got[G_OUT], want[G_OUT], bytes[4 + G_OUT]) != 0 &&
               memcmp(got[G_DK], want[G_DK], bytes[4 + G_DK]) != 0,
           "%s: the replay on new inputs gave the old results", label);
    EXPECT(graph_step(&g, bm) == FLEX_OK, "%s: direct call: %s", label, flex_error_message(gpu));
    EXPECT(graph_outputs(&g, want) == 0, "%s: %s", label, flex_error_message(gpu));
    EXPECT(graph_same(&g, got, want, "replay on new inputs"),
           "%s: the replay on new inputs differs from a direct call", label);
    printf("%-28s captured forward + backward replayed: identical to direct calls, and "
           "recomputed on new inputs\n",
           label);

    /* 5. A mask never used before needs its lists uploaded: refused by
     * name during a capture, before anything a capture forbids is issued,
     * so the capture itself stays valid. */
    EXPECT_EQ(flex_block_mask_create(gpu, maskm, 1, 1, L, L, block, block, &fresh), FLEX_OK);
    CUgraph empty = NULL;
    EXPECT_CU(api->cuStreamBeginCapture(stream, FLEX_CU_STREAM_CAPTURE_MODE_GLOBAL));
    const flex_status refused = graph_step(&g, fresh);
    snprintf(message, sizeof message, "%s", flex_error_message(gpu));
    const CUresult ended2 = api->cuStreamEndCapture(stream, &empty);
    if (empty) api->cuGraphDestroy(empty);
    EXPECT(refused == FLEX_ERR_UNSUPPORTED && strstr(message, "captured into a graph"),
           "%s: a first upload during a capture gave %s: %s", label, flex_status_name(refused),
           message);
    EXPECT_CU(ended2);
    printf("%-28s a first upload during a capture: refused by name (%s), capture still valid\n",
           label, flex_status_name(refused));
    /* and outside a capture the same call runs */
    EXPECT(graph_step(&g, fresh) == FLEX_OK, "%s: %s", label, flex_error_message(gpu));
    EXPECT_EQ(flex_synchronize(gpu), FLEX_OK);

    api->cuGraphExecDestroy(exec);
    api->cuGraphDestroy(graph);
    api->cuStreamDestroy(stream);
    for (int i = 0; i < 4 + G_COUNT; i++)
        flex_free(gpu, dev[i]);
    for (int i = 0; i < G_COUNT; i++) {
        free(want[i]);
        free(got[i]);
    }
    free(poison);
    flex_block_mask_destroy(fresh);
    flex_block_mask_destroy(bm);
    flex_mod_destroy(maskm);
    flex_mod_destroy(score);
    for (int i = 0; i < NUM_BUFS; i++)
        free(hb.data[i]);
}

/* A buffer read out of range inside a graph is reported by the
 * flex_synchronize after each replay, although replays make no call into
 * the library. */
static void test_graph_bounds_flag(void) {
    const int B = 1, H = 2, L = 64, D = 32;
    const bw_case c = {"graph bounds", FLEX_F32, B, H, H, L, L, D, D, 0, NULL, NULL, 64, NULL,
                       1, 1, 1, 0};
    host_bufs hb;
    make_bufs(&c, &hb);
    flex_mod *score = compile_mod(gpu, FLEX_MOD_SCORE, "score + slopes[h + q]", &hb);
    const size_t bytes = (size_t)B * H * L * D * 4;
    void *d[5];
    flex_tensor t[5];
    for (int i = 0; i < 5; i++) {
        EXPECT_EQ(flex_malloc(gpu, bytes, &d[i]), FLEX_OK);
        fill_device(d[i], FLEX_F32, (int64_t)B * H * L * D);
        t[i] = flex_tensor_bhsd(d[i], FLEX_F32, B, H, L, i == 4 ? 1 : D, FLEX_DEVICE_CUDA);
    }
    CUstream stream = NULL;
    CUgraph graph = NULL;
    CUgraphExec exec = NULL;
    EXPECT_CU(api->cuStreamCreate(&stream, FLEX_CU_STREAM_NON_BLOCKING));
    const flex_attention_options opts = {.stream = stream};
    EXPECT_EQ(flex_attention(gpu, &t[0], &t[1], &t[2], score, NULL, &opts, &t[3], &t[4]),
              FLEX_OK);
    EXPECT_EQ(flex_synchronize(gpu), FLEX_ERR_BUFFER_BOUNDS); /* the direct call's */
    EXPECT_CU(api->cuStreamBeginCapture(stream, FLEX_CU_STREAM_CAPTURE_MODE_GLOBAL));
    const flex_status captured =
        flex_attention(gpu, &t[0], &t[1], &t[2], score, NULL, &opts, &t[3], &t[4]);
    EXPECT_CU(api->cuStreamEndCapture(stream, &graph));
    EXPECT_EQ(captured, FLEX_OK);
    EXPECT_CU(api->cuGraphInstantiate(&exec, graph, 0));
    /* The capture launched nothing; its mark is read once. */
    EXPECT_EQ(flex_synchronize(gpu), FLEX_OK);
    for (int replay = 0; replay < 2; replay++) {
        EXPECT_CU(api->cuGraphLaunch(exec, stream));
        EXPECT_EQ(flex_synchronize(gpu), FLEX_ERR_BUFFER_BOUNDS);
        EXPECT(strstr(flex_error_message(gpu), "slopes") != NULL, "%s", flex_error_message(gpu));
    }
    printf("%-28s an out-of-range read in a replayed graph is reported at synchronize\n",
           "graph bounds");
    api->cuGraphExecDestroy(exec);
    api->cuGraphDestroy(graph);
    api->cuStreamDestroy(stream);
    for (int i = 0; i < 5; i++)
        flex_free(gpu, d[i]);
    flex_mod_destroy(score);
    for (int i = 0; i < NUM_BUFS; i++)
        free(hb.data[i]);
}

/* The graph tests, or a line saying why they cannot run. Streams and
 * graphs are made in the device's primary context, which the library uses
 * too, kept current on this thread for them (the library pushes and pops
 * it around its own calls). */
static void test_graphs(void) {
    char why[256] = "";
    if (flex_cuda_load_driver(&api, why, sizeof why) != 0 || !api->cuStreamCreate ||
        !api->cuStreamDestroy || !api->cuStreamBeginCapture || !api->cuStreamEndCapture ||
        !api->cuGraphInstantiate || !api->cuGraphLaunch || !api->cuGraphExecDestroy ||
        !api->cuGraphDestroy || !api->cuStreamIsCapturing || !api->cuMemAllocAsync) {
        printf("SKIPPED: graph capture (%s)\n",
               why[0] ? why : "the driver lacks the stream capture or graph entry points");
        return;
    }
    CUdevice dev;
    CUcontext primary, old;
    EXPECT_CU(api->cuDeviceGet(&dev, flex_context_device_index(gpu)));
    EXPECT_CU(api->cuDevicePrimaryCtxRetain(&primary, dev));
    EXPECT_CU(api->cuCtxPushCurrent(primary));
    const flex_dtype dts[2] = {FLEX_BF16, FLEX_F32};
    for (int d = 0; d < 2; d++)
        for (int det = 0; det < 2; det++) {
            const int before = failures;
            test_graph_capture(dts[d], det);
            printf("%s: graph capture %s %s\n", failures == before ? "PASS" : "FAIL",
                   flex_dtype_name(dts[d]), det ? "deterministic" : "default");
        }
    const int before = failures;
    test_graph_bounds_flag();
    printf("%s: graph bounds flag\n", failures == before ? "PASS" : "FAIL");
    api->cuCtxPopCurrent(&old);
    api->cuDevicePrimaryCtxRelease(dev);
}
#endif

/* Buffer gradients summed per CTA in shared memory (cuda_bwd_grad_smem,
 * on by default where the gradient tensors hold at most 12288 floats) and
 * by one global atomic per score: relative-position tables (grad
 * Hq x (Lq + Lkv) floats) that fit the region (1200; 2080 + 4 in two
 * slots, BSHD) and that do not (4 x 3200 = 12800), at head dims 128 and
 * 64, on blocks of 128; 4 x 3000 = 12000 fits beside the wgmma kernel's
 * tiles at head dim 128 only without dQ's staging (cuda_bwd_dq_bulk),
 * which then gives way. Each runs under every setting of grad_settings: on
 * sm_90 the default takes the wgmma kernel and cuda_bwd_wgmma=0 the
 * mma.sync one, and cuda_bwd_grad_smem=0 the global atomics of both. */
static const bw_case grad_cases[] = {
    {"bf16 rel table causal D128 blocks 128", FLEX_BF16, 1, 2, 1, 300, 300, 128, 128, 0,
     "score + float(rel[h][q - kv + 299])", "q >= kv", 128, "rel", 1, 1, 1, 0},
    {"f16 rel table slopes D64 bshd blocks 128", FLEX_F16, 2, 4, 2, 260, 260, 64, 64, 1,
     "score + slopes[h] * (kv - q) + float(rel[h][q - kv + 259])", NULL, 128, "slopes,rel", 1,
     1, 1, 0},
    {"bf16 rel table too large D128 window", FLEX_BF16, 1, 4, 2, 1600, 1600, 128, 128, 0,
     "score + float(rel[h][q - kv + 1599])", "q - kv <= 200 && kv - q <= 200", 128, "rel", 1,
     1, 1, 0},
    {"f16 rel table too large D64 window", FLEX_F16, 1, 4, 4, 1600, 1600, 64, 64, 0,
     "score + float(rel[h][q - kv + 1599])", "q - kv <= 200 && kv - q <= 200", 128, "rel", 1,
     1, 1, 0},
    {"bf16 rel table displacing dQ staging D128 window", FLEX_BF16, 1, 4, 2, 1500, 1500, 128,
     128, 0, "score + float(rel[h][q - kv + 1499])", "q - kv <= 200 && kv - q <= 200", 128,
     "rel", 1, 1, 1, 0},
};
static const char *const grad_settings[] = {"", "cuda_bwd_wgmma=0", "cuda_bwd_grad_smem=0",
                                            "cuda_bwd_wgmma=0,cuda_bwd_grad_smem=0"};
/* The sm_90 wgmma kernel's copies each way, whatever the default: its
 * cases (mask blocks of 128) again with cp.async, with two TMA stages, and
 * with the TMA refill at the top of the step. Where the kernel or the
 * tensor maps do not apply, the same cases run the other paths again. */
static const char *const copy_settings[] = {"cuda_bwd_tma=0", "cuda_bwd_tma=2",
                                            "cuda_bwd_refill_early=1"};
/* The grid order in groups of (batch, kv head) pairs (flex_bwd_tile_of),
 * whatever the default: 3 divides few of the cases' pair counts, so the
 * last group is short; 1 is each pair's tiles together. Every case. */
static const char *const order_settings[] = {"cuda_bwd_head_group=3", "cuda_bwd_head_group=1"};

/* A context with `add` on top of the environment's keys; exits on failure
 * (gpu_test_open has already shown CUDA usable). */
static flex_context *open_with(const char *add) {
    flex_context *ctx = gpu_test_open_with(add);
    if (!ctx) {
        fprintf(stderr, "FAIL: a CUDA context with %s: %s\n", add, flex_error_message(NULL));
        exit(1);
    }
    return ctx;
}

/* The cases of list whose name holds `only` (NULL: all) under each of the
 * settings, in a context of the setting's own. */
static void run_under(const char *const *settings, size_t num_settings, const bw_case *list,
                      size_t num_cases, const char *only) {
    for (size_t k = 0; k < num_settings; k++) {
        gpu = open_with(settings[k]);
        for (size_t i = 0; i < num_cases; i++) {
            if (only && !strstr(list[i].name, only)) continue;
            const int before = failures;
            run_case(&list[i]);
            printf("%s: %s [%s]\n", failures == before ? "PASS" : "FAIL", list[i].name,
                   *settings[k] ? settings[k] : "default");
        }
        flex_context_destroy(gpu);
    }
}

int main(void) {
    gpu_test_open();
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const int before = failures;
        run_case(&cases[i]);
        printf("%s: %s\n", failures == before ? "PASS" : "FAIL", cases[i].name);
    }
    flex_context *const main_gpu = gpu;
    run_under(grad_settings, sizeof grad_settings / sizeof grad_settings[0], grad_cases,
              sizeof grad_cases / sizeof grad_cases[0], NULL);
    run_under(copy_settings, sizeof copy_settings / sizeof copy_settings[0], cases,
              sizeof cases / sizeof cases[0], "blocks 128");
    run_under(order_settings, sizeof order_settings / sizeof order_settings[0], cases,
              sizeof cases / sizeof cases[0], NULL);
    gpu = main_gpu;
    const int before = failures;
    test_errors_write_nothing();
    printf("%s: named errors write nothing\n", failures == before ? "PASS" : "FAIL");
#if FLEXATTN_HAVE_CUDA
    const int before_alloc = failures;
    test_caller_allocator();
    printf("%s: work space from the caller's allocator\n",
           failures == before_alloc ? "PASS" : "FAIL");
    test_graphs();
#endif
    flex_context_destroy(cpu);
    flex_context_destroy(gpu);
    return failures ? 1 : 0;
}
