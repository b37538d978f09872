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

static flex_context *cpu, *gpu;
static int failures;

/* On a false condition: the message, a failure counted, and the case left. */
#define EXPECT(cond, ...)                                                                          \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                  \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            failures++;                                                                            \
            return;                                                                                \
        }                                                                                          \
    } while (0)
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
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
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

static void *to_gpu(const void *host, size_t bytes) {
    void *d = NULL;
    if (flex_malloc(gpu, bytes, &d) != FLEX_OK ||
        flex_copy_to_device(gpu, d, host, bytes) != FLEX_OK) {
        fprintf(stderr, "FAIL: device memory: %s\n", flex_error_message(gpu));
        exit(1);
    }
    return d;
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
    flex_status s = flex_attention_backward(
        gpu, &gq, &gk, &gv, &go, &gdo, &glse, score[1], bm[1], NULL, c->want_dq ? &gdq : NULL,
        c->want_dk ? &gdk : NULL, c->want_dv ? &gdv : NULL, bg[1], num_grads);
    if (s == FLEX_OK) s = flex_synchronize(gpu);
    EXPECT(s == FLEX_OK, "%s gpu: %s", c->name, flex_error_message(gpu));

    const double tol = dt == FLEX_F32 ? 1e-4 : 2e-2;
    const int want[3] = {c->want_dq, c->want_dk, c->want_dv};
    const char *const what[3] = {"dq", "dk", "dv"};
    for (int i = 0; i < 3; i++) {
        void *back = malloc((size_t)gn[i] * es);
        EXPECT_EQ(flex_copy_to_host(gpu, back, dg[i], (size_t)gn[i] * es), FLEX_OK);
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
     "score + slopes[h] * (kv - q)", "q >= kv", 64, "slopes", 1, 1, 1},
    {"f16 bias table window bshd", FLEX_F16, 2, 2, 1, 150, 256, 48, 80, 1,
     "score * hs[h] + float(rel[h][q - kv + 255])", "q - kv <= 40 && kv - q <= 40", 32,
     "hs,rel", 1, 1, 1},
    {"bf16 noop D128", FLEX_BF16, 1, 2, 2, 300, 300, 128, 128, 0, NULL, NULL, 128, NULL, 1, 1, 1},
    {"f16 softcap doc causal D96", FLEX_F16, 1, 2, 2, 160, 160, 96, 64, 0,
     "30.0 * tanh(score / 30.0)", "q >= kv && doc[q] == doc[kv]", 16, NULL, 1, 1, 1},
    {"bf16 D256 Dv 200 causal", FLEX_BF16, 1, 1, 1, 90, 90, 256, 200, 0, NULL, "q >= kv", 128,
     NULL, 1, 1, 1},
    {"f32 softcap doc gqa", FLEX_F32, 1, 4, 1, 100, 120, 32, 40, 0, "30.0 * tanh(score / 30.0)",
     "q >= kv && doc[q] == doc[kv]", 32, NULL, 1, 1, 1},
    {"f32 alibi hs grads", FLEX_F32, 2, 2, 2, 70, 90, 64, 64, 1,
     "score * hs[h] + slopes[h] * (kv - q)", NULL, 64, "slopes,hs", 1, 1, 1},
    /* 128-row kv tiles (8 warps) with GQA, partial blocks, ends of both
     * sequences inside a tile, and a buffer gradient */
    {"bf16 alibi doc causal gqa D128 blocks 128", FLEX_BF16, 2, 4, 2, 400, 400, 128, 128, 0,
     "score + slopes[h] * (kv - q)", "q >= kv && doc[q] == doc[kv]", 128, "slopes", 1, 1, 1},
    {"f16 noop gqa D64 Lq != Lkv", FLEX_F16, 1, 4, 1, 330, 270, 64, 64, 0, NULL, NULL, 128, NULL,
     1, 1, 1},
    {"bf16 dv only", FLEX_BF16, 1, 2, 1, 130, 130, 64, 64, 0, NULL, "q >= kv", 64, NULL, 0, 0, 1},
    {"f16 dq dk only, -inf rows", FLEX_F16, 1, 2, 2, 100, 60, 64, 32, 0,
     "where(q >= 80, -inf, score)", NULL, 64, NULL, 1, 1, 0},
};

/* Named errors, and the caller's gradients untouched by them. */
static void test_errors_write_nothing(void) {
    const bw_case c = {"errors", FLEX_BF16, 1, 2, 2, 64, 64, 32, 32, 0, NULL, NULL, 64, NULL,
                       1, 1, 1};
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

int main(void) {
    if (flex_context_create("cuda", &gpu) != FLEX_OK) {
        printf("SKIPPED: no usable CUDA backend (%s)\n", flex_error_message(NULL));
        return 77;
    }
    if (flex_context_create("cpu", &cpu) != FLEX_OK) return 1;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const int before = failures;
        run_case(&cases[i]);
        printf("%s: %s\n", failures == before ? "PASS" : "FAIL", cases[i].name);
    }
    const int before = failures;
    test_errors_write_nothing();
    printf("%s: named errors write nothing\n", failures == before ? "PASS" : "FAIL");
    flex_context_destroy(cpu);
    flex_context_destroy(gpu);
    return failures ? 1 : 0;
}
