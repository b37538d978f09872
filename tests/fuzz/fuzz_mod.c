/*
 * libFuzzer harness: mod text -> compile -> block mask -> a tiny attention
 * on the CPU backend, checked against element-wise evaluation and the fp64
 * oracle (tests/oracle.c). Any disagreement aborts, and so does a crash or
 * a sanitizer report.
 *
 * Input: 8 bytes of shape and configuration (below), then the mask mod's
 * text, a NUL, and the score mod's text (either may be empty: no mod). Mods
 * may use the params W, P (int) and C (float) and the buffers doc (i32,
 * [64]), slopes (f32, [4]), bias (f32, [128]) and sel (bool, [4][3]).
 *
 * What is checked, for inputs whose element-wise evaluation reads no buffer
 * out of range:
 *   - the block mask's classes equal the element-wise classes (exact); a
 *     mask is broadcast over batch or heads (as the input asks) only when
 *     the mod does not read b or h, since broadcasting is the caller's
 *     promise that it does not;
 *   - every row of the attention, on the tiled path (best or portable
 *     kernels, chosen by the input) and on the reference path, is of the
 *     class the element-wise scores give it: NaN (a kept score NaN or +inf:
 *     output and LSE NaN), empty (output 0, LSE -inf) or finite;
 *   - finite rows of the two paths agree closely (both f32);
 *   - finite rows agree with the fp64 oracle wherever the row's mods give
 *     the same kept set and nearly the same scores in f32 and in f64 (a mod
 *     may legitimately round differently in the two precisions);
 *   - a score mod reading out of range at a kept element is a bounds error
 *     and nowhere else.
 * Inputs are multiples of 1/2 below 2 in magnitude, D <= 8 and the scale a
 * power of two, so every raw score is exact in every path and precision.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "mod/eval.h"
#include "oracle.h"

enum { MAX_L = 48, MAX_TEXT = 1024, MAX_D = 8 };

#define FUZZ_CHECK(cond, ...)                                                                      \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_mod: check failed: %s\n  ", #cond);                              \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fprintf(stderr, "\n  mask: %s\n  score: %s\n", g_mask_text, g_score_text);             \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static char g_mask_text[MAX_TEXT + 1], g_score_text[MAX_TEXT + 1];
static flex_context *g_ctx;

/* ---- the problem ---- */

typedef struct problem {
    int B, Hq, Hkv, Lq, Lkv, D, Dv;
    int Bm, Hm;       /* block mask batch and heads (1: broadcast) */
    int qb, kb;       /* block sizes */
    int q_tile, kv_tile;
    int path;         /* 0 tiled, 1 tiled portable kernels, 2 reference, 3 tiled + backward */
    uint32_t seed;
} problem;

static uint32_t next_rand(uint32_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    return *s;
}

static void decode(const uint8_t *c, problem *p) {
    static const int groups[3][2] = {{1, 1}, {1, 2}, {2, 1}}; /* (Hkv, Hq / Hkv) */
    const int *g = groups[(c[0] >> 1) % 3];
    p->B = 1 + (c[0] & 1);
    p->Hkv = g[0];
    p->Hq = g[0] * g[1];
    p->Bm = (c[0] & 0x08) ? p->B : 1;
    p->Hm = (c[0] & 0x10) ? p->Hq : 1;
    p->path = (c[0] >> 5) & 3;
    p->Lq = 1 + c[1] % MAX_L;
    p->Lkv = 1 + c[2] % MAX_L;
    p->qb = 16 << (c[3] % 3);
    p->kb = 16 << ((c[3] >> 2) % 3);
    static const int q_tiles[4] = {0, 8, 16, 32}, kv_tiles[4] = {0, 16, 32, 64};
    p->q_tile = q_tiles[c[4] & 3];
    p->kv_tile = kv_tiles[(c[4] >> 2) & 3];
    p->D = (c[5] & 1) ? 8 : 4;
    p->Dv = 4 + 4 * ((c[5] >> 1) % 3);
    p->seed = (uint32_t)c[6] << 8 | c[7] | 0x10000u;
}

/* ---- buffers the mods may read ---- */

static int32_t g_doc[64];
static float g_slopes[4], g_bias[128];
static uint8_t g_sel[12];

static void fill_buffers(uint32_t seed) {
    uint32_t s = seed * 2654435761u + 1;
    for (int i = 0, d = 0; i < 64; i++) {
        if (next_rand(&s) % 7 == 0) d++;
        g_doc[i] = d;
    }
    for (int i = 0; i < 4; i++)
        g_slopes[i] = ldexpf(1.0f, -(int)(next_rand(&s) % 8));
    for (int i = 0; i < 128; i++)
        g_bias[i] = 0.25f * (float)((int)(next_rand(&s) % 17) - 8);
    for (int i = 0; i < 12; i++)
        g_sel[i] = (uint8_t)(next_rand(&s) & 1);
}

static const flex_param k_params[] = {{"W", 0, 5}, {"P", 0, 20}, {"C", 1, 2.5}};
static const flex_buffer_decl k_buffers[] = {
    {"doc", FLEX_I32, 1}, {"slopes", FLEX_F32, 1}, {"bias", FLEX_F32, 1}, {"sel", FLEX_BOOL, 2}};

static flex_mod *compile(const char *text, flex_mod_kind kind) {
    if (!text[0]) return NULL;
    flex_mod_desc desc = {kind, text, k_params, 3, k_buffers, 4};
    flex_mod *m = NULL;
    flex_status st = flex_mod_compile(g_ctx, &desc, &m);
    if (st != FLEX_OK) {
        FUZZ_CHECK(m == NULL && flex_error_message(g_ctx)[0] != 0, "a failed compile (%d)",
                   (int)st);
        return NULL;
    }
    FUZZ_CHECK(flex_mod_get_kind(m) == kind, "kind");
    /* Bind what the mod reads (a declared, unread buffer needs nothing). */
    for (int i = 0; i < m->ir.num_buffers; i++) {
        const char *name = m->ir.buffers[i].name;
        flex_tensor t;
        if (!strcmp(name, "doc")) {
            int64_t n = 64;
            t = flex_tensor_contiguous(g_doc, FLEX_I32, 1, &n, FLEX_DEVICE_CPU);
        } else if (!strcmp(name, "slopes")) {
            int64_t n = 4;
            t = flex_tensor_contiguous(g_slopes, FLEX_F32, 1, &n, FLEX_DEVICE_CPU);
        } else if (!strcmp(name, "bias")) {
            int64_t n = 128;
            t = flex_tensor_contiguous(g_bias, FLEX_F32, 1, &n, FLEX_DEVICE_CPU);
        } else {
            int64_t n[2] = {4, 3};
            t = flex_tensor_contiguous(g_sel, FLEX_BOOL, 2, n, FLEX_DEVICE_CPU);
        }
        FUZZ_CHECK(flex_mod_bind_buffer(g_ctx, m, name, &t) == FLEX_OK, "bind %s: %s", name,
                   flex_error_message(g_ctx));
    }
    return m;
}

/* ---- element-wise truth ---- */

enum { ROW_FINITE = 0, ROW_EMPTY = 1, ROW_NAN = 2 };

typedef struct truth {
    int bounds_mask;  /* the mask mod reads out of range somewhere */
    int bounds_score; /* the score mod reads out of range at a kept element */
    uint8_t *keep;    /* [B][Hq][Lq][Lkv], f32 mask */
    uint8_t *row;     /* [B][Hq][Lq]: ROW_* by the f32 scores */
    uint8_t *robust;  /* [B][Hq][Lq]: f64 mods give the same row (oracle comparable) */
} truth;

static float tensor_at(const flex_tensor *t, int64_t a, int64_t b, int64_t c, int64_t d) {
    return ((const float *)t->data)[a * t->strides[0] + b * t->strides[1] + c * t->strides[2] +
                                    d * t->strides[3]];
}

static int same_class(double a, double b) {
    if (isnan(a) || isnan(b)) return isnan(a) && isnan(b);
    if (isinf(a) || isinf(b)) return a == b;
    return fabs(a - b) <= 1e-3;
}

static void element_truth(const problem *p, const flex_mod *mask, const flex_mod *score,
                          const flex_tensor *q, const flex_tensor *k, float scale, truth *t) {
    mod_buffer_view mviews[IR_MAX_BUFFERS], sviews[IR_MAX_BUFFERS];
    void *mcopies[IR_MAX_BUFFERS] = {0}, *scopies[IR_MAX_BUFFERS] = {0};
    memset(mviews, 0, sizeof mviews);
    memset(sviews, 0, sizeof sviews);
    if (mask) FUZZ_CHECK(flex_mod_host_views(g_ctx, mask, mviews, mcopies) == FLEX_OK, "views");
    if (score) FUZZ_CHECK(flex_mod_host_views(g_ctx, score, sviews, scopies) == FLEX_OK, "views");
    int nodes = 1;
    if (mask && mask->ir.num_nodes > nodes) nodes = mask->ir.num_nodes;
    if (score && score->ir.num_nodes > nodes) nodes = score->ir.num_nodes;
    ir_value *s32 = malloc(sizeof(ir_value) * (size_t)nodes);
    double *s64 = malloc(sizeof(double) * (size_t)nodes);
    int group = p->Hq / p->Hkv;
    for (int b = 0; b < p->B; b++)
        for (int h = 0; h < p->Hq; h++)
            for (int i = 0; i < p->Lq; i++) {
                size_t r = ((size_t)b * p->Hq + h) * p->Lq + i;
                int any_kept = 0, any_nan = 0, robust = 1;
                for (int j = 0; j < p->Lkv; j++) {
                    mod_bounds_error err;
                    memset(&err, 0, sizeof err);
                    int kept = 1, kept64 = 1;
                    if (mask) {
                        ir_value v;
                        double v64;
                        if (mod_eval_point(&mask->ir, mviews, 0.0f, b, h, i, j, s32, &v, &err) !=
                            0) {
                            t->bounds_mask = 1;
                            kept = 0;
                        } else {
                            kept = v.i != 0;
                        }
                        memset(&err, 0, sizeof err);
                        if (mod_eval_point_f64(&mask->ir, mviews, 0.0, b, h, i, j, s64, &v64,
                                               &err) == 0)
                            kept64 = v64 != 0.0;
                        else
                            kept64 = -1;
                    }
                    if (kept != kept64) robust = 0;
                    float raw = 0.0f;
                    for (int d = 0; d < p->D; d++)
                        raw += tensor_at(q, b, h, i, d) * tensor_at(k, b, h / group, j, d);
                    raw *= scale; /* exact: small multiples of 1/8 times a power of two */
                    float sc = raw;
                    double sc64 = raw;
                    if (kept && score) {
                        ir_value v;
                        memset(&err, 0, sizeof err);
                        if (mod_eval_point(&score->ir, sviews, raw, b, h, i, j, s32, &v, &err) !=
                            0) {
                            t->bounds_score = 1;
                            robust = 0;
                            continue;
                        }
                        sc = v.f;
                        memset(&err, 0, sizeof err);
                        if (mod_eval_point_f64(&score->ir, sviews, raw, b, h, i, j, s64, &sc64,
                                               &err) != 0 ||
                            !same_class(sc, sc64))
                            robust = 0;
                    }
                    if (kept && sc == -INFINITY) kept = 0;
                    t->keep[r * p->Lkv + j] = (uint8_t)kept;
                    any_kept |= kept;
                    any_nan |= kept && (isnan(sc) || sc == INFINITY);
                }
                t->row[r] = any_nan ? ROW_NAN : any_kept ? ROW_FINITE : ROW_EMPTY;
                t->robust[r] = (uint8_t)robust;
            }
    free(s32);
    free(s64);
    flex_mod_release_host_views(mcopies);
    flex_mod_release_host_views(scopies);
}

/* ---- checks ---- */

/* Element-wise classes of the mask alone (f32) against the block mask. */
static void check_block_classes(const problem *p, const flex_mod *mask, const flex_block_mask *bm) {
    int64_t nq = (p->Lq + p->qb - 1) / p->qb, nk = (p->Lkv + p->kb - 1) / p->kb;
    size_t n = (size_t)(p->Bm * p->Hm * nq * nk);
    uint8_t *dense = malloc(n), *seen = calloc(n, 1);
    FUZZ_CHECK(flex_block_mask_to_dense(bm, dense) == FLEX_OK, "to_dense");
    mod_buffer_view views[IR_MAX_BUFFERS];
    void *copies[IR_MAX_BUFFERS] = {0};
    memset(views, 0, sizeof views);
    FUZZ_CHECK(flex_mod_host_views(g_ctx, mask, views, copies) == FLEX_OK, "views");
    ir_value *s = malloc(sizeof(ir_value) * (size_t)(mask->ir.num_nodes + 1));
    for (int b = 0; b < p->Bm; b++)
        for (int h = 0; h < p->Hm; h++)
            for (int i = 0; i < p->Lq; i++)
                for (int j = 0; j < p->Lkv; j++) {
                    ir_value v;
                    mod_bounds_error err;
                    memset(&err, 0, sizeof err);
                    FUZZ_CHECK(mod_eval_point(&mask->ir, views, 0.0f, b, h, i, j, s, &v, &err) ==
                                   0,
                               "element (%d,%d,%d,%d) out of range", b, h, i, j);
                    seen[((b * p->Hm + h) * nq + i / p->qb) * nk + j / p->kb] |= v.i ? 2 : 1;
                }
    for (size_t x = 0; x < n; x++) {
        uint8_t expect = seen[x] == 3   ? FLEX_BLOCK_PARTIAL
                         : seen[x] == 2 ? FLEX_BLOCK_FULL
                                        : FLEX_BLOCK_EMPTY;
        FUZZ_CHECK(dense[x] == expect,
                   "block %zu of the mask (B %d H %d, %d x %d, blocks %d x %d) is %d, "
                   "element-wise %d",
                   x, p->Bm, p->Hm, p->Lq, p->Lkv, p->qb, p->kb, dense[x], expect);
    }
    free(s);
    free(dense);
    free(seen);
    flex_mod_release_host_views(copies);
}

typedef struct result {
    float *out, *lse;
} result;

static int row_class(const problem *p, const result *res, size_t r, int *all_nan) {
    int nan_out = 0, zero_out = 0, finite = 1;
    for (int c = 0; c < p->Dv; c++) {
        float x = res->out[r * p->Dv + c];
        nan_out += isnan(x);
        zero_out += x == 0.0f;
        finite &= isfinite(x);
    }
    float l = res->lse[r];
    *all_nan = nan_out == p->Dv && isnan(l);
    if (*all_nan) return ROW_NAN;
    if (zero_out == p->Dv && l == -INFINITY) return ROW_EMPTY;
    if (finite && isfinite(l)) return ROW_FINITE;
    return -1;
}

static void check_rows(const problem *p, const truth *t, const result *res, const char *what) {
    size_t rows = (size_t)p->B * p->Hq * p->Lq;
    for (size_t r = 0; r < rows; r++) {
        int all_nan;
        int cls = row_class(p, res, r, &all_nan);
        FUZZ_CHECK(cls == t->row[r],
                   "%s: row %zu (b %zu h %zu q %zu) is of class %d (out[0] %g, lse %g), "
                   "element-wise %d (0 finite, 1 empty, 2 NaN)",
                   what, r, r / ((size_t)p->Hq * p->Lq), r / p->Lq % p->Hq, r % p->Lq, cls,
                   res->out[r * p->Dv], res->lse[r], t->row[r]);
    }
}

static void compare_results(const problem *p, const truth *t, const result *a, const result *b,
                            const char *what) {
    size_t rows = (size_t)p->B * p->Hq * p->Lq;
    for (size_t r = 0; r < rows; r++) {
        if (t->row[r] != ROW_FINITE) continue;
        for (int c = 0; c < p->Dv; c++) {
            float x = a->out[r * p->Dv + c], y = b->out[r * p->Dv + c];
            FUZZ_CHECK(fabsf(x - y) <= 1e-4f, "%s: row %zu out[%d] %.9g vs %.9g", what, r, c, x,
                       y);
        }
        float la = a->lse[r], lb = b->lse[r];
        FUZZ_CHECK(fabsf(la - lb) <= 1e-4f * fmaxf(1.0f, fabsf(la)), "%s: row %zu lse %.9g vs %.9g",
                   what, r, la, lb);
    }
}

/* Whether the reference's error is an out-of-range read of a buffer that
 * the library's folding removed (`sel[q][kv] && false` is `false`: the
 * read's value cannot matter, so the library never makes it and has no
 * error to report). Any other reference failure is a finding. */
static int read_folded_away(const char *err, const flex_mod *mask, const flex_mod *score) {
    const char *open = strstr(err, "buffer '");
    if (!open || !strstr(err, "read out of range")) return 0;
    open += strlen("buffer '");
    const char *close = strchr(open, '\'');
    if (!close || close == open || close - open > 60) return 0;
    char read[64];
    snprintf(read, sizeof read, "%.*s[", (int)(close - open), open);
    const flex_mod *mods[2] = {mask, score};
    for (int i = 0; i < 2; i++)
        if (mods[i] && strstr(flex_mod_canonical_text(mods[i]), read)) return 0;
    return 1;
}

static void compare_oracle(const problem *p, const truth *t, const result *a, const flex_mod *mask,
                           const flex_mod *score, const flex_tensor *q, const flex_tensor *k,
                           const flex_tensor *v, float scale) {
    size_t rows = (size_t)p->B * p->Hq * p->Lq;
    double *ref = malloc(rows * (size_t)p->Dv * sizeof(double));
    double *ref_lse = malloc(rows * sizeof(double));
    oracle_problem op;
    memset(&op, 0, sizeof op);
    op.ctx = g_ctx;
    op.q = *q, op.k = *k, op.v = *v;
    op.score_mod = score;
    op.mask_mod = mask;
    op.scale = scale;
    char err[256];
    if (oracle_forward(&op, ref, ref_lse, err, sizeof err) != 0 &&
        read_folded_away(err, mask, score)) {
        free(ref);
        free(ref_lse);
        return;
    }
    FUZZ_CHECK(oracle_forward(&op, ref, ref_lse, err, sizeof err) == 0, "oracle: %s", err);
    for (size_t r = 0; r < rows; r++) {
        if (t->row[r] != ROW_FINITE || !t->robust[r]) continue;
        for (int c = 0; c < p->Dv; c++) {
            double x = a->out[r * p->Dv + c], y = ref[r * p->Dv + c];
            FUZZ_CHECK(fabs(x - y) <= 2e-3, "oracle: row %zu out[%d] %.9g vs %.9g", r, c, x, y);
        }
        FUZZ_CHECK(fabs(a->lse[r] - ref_lse[r]) <= 2e-3 * fmax(1.0, fabs(ref_lse[r])),
                   "oracle: row %zu lse %.9g vs %.9g", r, a->lse[r], ref_lse[r]);
    }
    free(ref);
    free(ref_lse);
}

/* ---- one input ---- */

static flex_tensor tensor4(float *data, int64_t a, int64_t b, int64_t c, int64_t d) {
    int64_t sizes[4] = {a, b, c, d};
    return flex_tensor_contiguous(data, FLEX_F32, 4, sizes, FLEX_DEVICE_CPU);
}

static flex_status attention(const problem *p, int path, const flex_tensor *q, const flex_tensor *k,
                             const flex_tensor *v, const flex_mod *score, const flex_block_mask *bm,
                             float scale, result *res) {
    size_t rows = (size_t)p->B * p->Hq * p->Lq;
    for (size_t i = 0; i < rows * (size_t)p->Dv; i++)
        res->out[i] = 12345.0f; /* poison: an unwritten element shows */
    for (size_t i = 0; i < rows; i++)
        res->lse[i] = 12345.0f;
    flex_tensor out = tensor4(res->out, p->B, p->Hq, p->Lq, p->Dv);
    flex_tensor lse = tensor4(res->lse, p->B, p->Hq, p->Lq, 1);
    flex_attention_options o;
    memset(&o, 0, sizeof o);
    o.scale = scale;
    o.q_tile = p->q_tile;
    o.kv_tile = p->kv_tile;
    if (path == 2)
        setenv("FLEXATTN_CPU_REFERENCE", "1", 1);
    else
        unsetenv("FLEXATTN_CPU_REFERENCE");
    if (path == 1)
        setenv("FLEXATTN_CPU_SIMD", "portable", 1);
    else
        unsetenv("FLEXATTN_CPU_SIMD");
    flex_status st = flex_attention(g_ctx, q, k, v, score, bm, &o, &out, &lse);
    if (st == FLEX_ERR_INVALID_ARGUMENT && (o.q_tile || o.kv_tile)) {
        /* a hint larger than the plan's tile is refused: run the plan's */
        o.q_tile = o.kv_tile = 0;
        st = flex_attention(g_ctx, q, k, v, score, bm, &o, &out, &lse);
    }
    unsetenv("FLEXATTN_CPU_REFERENCE");
    unsetenv("FLEXATTN_CPU_SIMD");
    return st;
}

static void run_backward(const problem *p, const flex_tensor *q, const flex_tensor *k,
                         const flex_tensor *v, const flex_mod *score, const flex_block_mask *bm,
                         float scale, const result *fwd) {
    size_t nq = (size_t)p->B * p->Hq * p->Lq, nk = (size_t)p->B * p->Hkv * p->Lkv;
    float *dout = malloc(nq * p->Dv * sizeof(float)), *dq = malloc(nq * p->D * sizeof(float));
    float *dk = malloc(nk * p->D * sizeof(float)), *dv = malloc(nk * p->Dv * sizeof(float));
    for (size_t i = 0; i < nq * p->Dv; i++)
        dout[i] = 0.5f * (float)((int)(i % 7) - 3);
    flex_tensor o = tensor4(fwd->out, p->B, p->Hq, p->Lq, p->Dv);
    flex_tensor l = tensor4(fwd->lse, p->B, p->Hq, p->Lq, 1);
    flex_tensor d_out = tensor4(dout, p->B, p->Hq, p->Lq, p->Dv);
    flex_tensor d_q = tensor4(dq, p->B, p->Hq, p->Lq, p->D);
    flex_tensor d_k = tensor4(dk, p->B, p->Hkv, p->Lkv, p->D);
    flex_tensor d_v = tensor4(dv, p->B, p->Hkv, p->Lkv, p->Dv);
    flex_attention_options opts;
    memset(&opts, 0, sizeof opts);
    opts.scale = scale;
    flex_status st = flex_attention_backward(g_ctx, q, k, v, &o, &d_out, &l, score, bm, &opts, &d_q,
                                             &d_k, &d_v, NULL, 0);
    FUZZ_CHECK(st == FLEX_OK, "backward: %s", flex_error_message(g_ctx));
    /* Without a score mod a row that is not NaN has a finite dQ (a score
     * mod's derivative may be infinite where its value is not: sqrt at 0). */
    for (size_t r = 0; r < nq && !score; r++) {
        int all_nan, cls = row_class(p, fwd, r, &all_nan);
        (void)all_nan;
        if (cls == ROW_NAN) continue;
        for (int d = 0; d < p->D; d++)
            FUZZ_CHECK(isfinite(dq[r * p->D + d]), "backward: dq row %zu of a %s row is %g", r,
                       cls == ROW_EMPTY ? "empty" : "finite", dq[r * p->D + d]);
    }
    free(dout);
    free(dq);
    free(dk);
    free(dv);
}

static void run_input(const problem *p, const char *mask_text, const char *score_text) {
    flex_mod *mask = compile(mask_text, FLEX_MOD_MASK);
    flex_mod *score = compile(score_text, FLEX_MOD_SCORE);
    if ((mask_text[0] && !mask) || (score_text[0] && !score)) goto done_mods;

    size_t nq = (size_t)p->B * p->Hq * p->Lq, nk = (size_t)p->B * p->Hkv * p->Lkv;
    float *qd = malloc(nq * p->D * sizeof(float)), *kd = malloc(nk * p->D * sizeof(float));
    float *vd = malloc(nk * p->Dv * sizeof(float));
    uint32_t s = p->seed;
    for (size_t i = 0; i < nq * p->D; i++)
        qd[i] = 0.5f * (float)((int)(next_rand(&s) % 9) - 4);
    for (size_t i = 0; i < nk * p->D; i++)
        kd[i] = 0.5f * (float)((int)(next_rand(&s) % 9) - 4);
    for (size_t i = 0; i < nk * p->Dv; i++)
        vd[i] = 0.25f * (float)((int)(next_rand(&s) % 17) - 8);
    flex_tensor q = tensor4(qd, p->B, p->Hq, p->Lq, p->D);
    flex_tensor k = tensor4(kd, p->B, p->Hkv, p->Lkv, p->D);
    flex_tensor v = tensor4(vd, p->B, p->Hkv, p->Lkv, p->Dv);
    const float scale = 0.25f;

    truth t;
    memset(&t, 0, sizeof t);
    t.keep = malloc(nq * (size_t)p->Lkv);
    t.row = malloc(nq);
    t.robust = malloc(nq);
    element_truth(p, mask, score, &q, &k, scale, &t);

    flex_block_mask *bm = NULL;
    problem pm = *p; /* the block mask's shape */
    if (mask) {
        /* A mask broadcast over batch or heads is the caller's promise that
         * the mod does not depend on them (the kernels evaluate partial
         * blocks at the real b and h): broadcast only where that holds. */
        uint8_t *deps = malloc((size_t)mask->ir.num_nodes + 1);
        ir_dependencies(&mask->ir, deps);
        int root = mask->ir.num_nodes > 0 ? deps[mask->ir.root] : 0;
        free(deps);
        if (root & IR_DEP_B) pm.Bm = p->B;
        if (root & IR_DEP_H) pm.Hm = p->Hq;
        p = &pm;
        flex_status st =
            flex_block_mask_create(g_ctx, mask, p->Bm, p->Hm, p->Lq, p->Lkv, p->qb, p->kb, &bm);
        if (t.bounds_mask) {
            /* Reads out of range somewhere: the builder may find it (an
             * error) or not need that element; nothing is compared. */
            FUZZ_CHECK(st == FLEX_OK || st == FLEX_ERR_BUFFER_BOUNDS, "block mask: %s",
                       flex_error_message(g_ctx));
        } else {
            FUZZ_CHECK(st == FLEX_OK, "block mask: %s", flex_error_message(g_ctx));
            check_block_classes(p, mask, bm);
        }
    }

    if (!mask || bm) {
        result res[2];
        for (int i = 0; i < 2; i++) {
            res[i].out = malloc(nq * p->Dv * sizeof(float));
            res[i].lse = malloc(nq * sizeof(float));
        }
        int tiled_path = p->path == 1 ? 1 : 0;
        flex_status st0 = attention(p, tiled_path, &q, &k, &v, score, bm, scale, &res[0]);
        flex_status st1 = attention(p, 2, &q, &k, &v, score, bm, scale, &res[1]);
        if (!t.bounds_mask) {
            flex_status expect = t.bounds_score ? FLEX_ERR_BUFFER_BOUNDS : FLEX_OK;
            FUZZ_CHECK(st0 == expect, "tiled: status %d, expected %d: %s", (int)st0, (int)expect,
                       flex_error_message(g_ctx));
            FUZZ_CHECK(st1 == expect, "reference: status %d, expected %d: %s", (int)st1,
                       (int)expect, flex_error_message(g_ctx));
            if (expect == FLEX_OK) {
                check_rows(p, &t, &res[0], tiled_path ? "tiled portable" : "tiled");
                check_rows(p, &t, &res[1], "reference");
                compare_results(p, &t, &res[0], &res[1], "tiled vs reference");
                compare_oracle(p, &t, &res[0], mask, score, &q, &k, &v, scale);
                if (p->path == 3) run_backward(p, &q, &k, &v, score, bm, scale, &res[0]);
            }
        }
        for (int i = 0; i < 2; i++) {
            free(res[i].out);
            free(res[i].lse);
        }
    }
    flex_block_mask_destroy(bm);
    free(t.keep);
    free(t.row);
    free(t.robust);
    free(qd);
    free(kd);
    free(vd);
done_mods:
    flex_mod_destroy(mask);
    flex_mod_destroy(score);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 8) return 0;
    if (!g_ctx) {
        setenv("FLEXATTN_CACHE_DIR", "off", 1);
        if (flex_context_create("cpu", &g_ctx) != FLEX_OK) abort();
    }
    problem p;
    decode(data, &p);
    fill_buffers(p.seed);
    size_t n = size - 8;
    if (n > 2 * MAX_TEXT) n = 2 * MAX_TEXT;
    const char *text = (const char *)data + 8;
    const char *nul = memchr(text, 0, n);
    size_t mask_len = nul ? (size_t)(nul - text) : n;
    size_t score_len = nul ? n - mask_len - 1 : 0;
    if (mask_len > MAX_TEXT || score_len > MAX_TEXT) return 0;
    memcpy(g_mask_text, text, mask_len);
    g_mask_text[mask_len] = 0;
    if (score_len) memcpy(g_score_text, nul + 1, score_len);
    g_score_text[score_len] = 0;
    /* Text with an embedded NUL in the score part is cut there. */
    run_input(&p, g_mask_text, g_score_text);
    return 0;
}
