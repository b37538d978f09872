/*
 * Block sparsity of score mods (core/scoremask.c): the blocks interval
 * analysis proves masked (-inf whatever the score) and the attention calls
 * that skip them.
 *
 * Three kinds of checks:
 *  - the masked blocks of known mods are exactly the expected ones, and
 *    mods that are -inf only on some elements, only for some scores, or
 *    that may give NaN get none;
 *  - soundness by brute force: every element of every block marked masked
 *    evaluates to -inf with the scalar interpreter for a set of scores that
 *    includes NaN and both infinities;
 *  - flex_attention and flex_attention_backward on the CPU with the
 *    sparsity on and off (FLEXATTN_DEBUG=score_sparsity=0) agree with each
 *    other and with the fp64 oracle, rows whose every block is masked
 *    included (output 0, LSE -inf).
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "blockmask.h"
#include "scoremask.h"
#include "mod/eval.h"
#include "oracle.h"
#include "oracle_backward.h"
#include "tolerance.h"

/* ---- helpers ---- */

static flex_context *make_ctx(int sparsity) {
    if (sparsity)
        unsetenv("FLEXATTN_DEBUG");
    else
        setenv("FLEXATTN_DEBUG", "score_sparsity=0", 1);
    flex_context *ctx = NULL;
    ck_assert_int_eq(flex_context_create("cpu", &ctx), FLEX_OK);
    unsetenv("FLEXATTN_DEBUG");
    return ctx;
}

static flex_mod *compile_with(flex_context *ctx, flex_mod_kind kind, const char *text,
                              const flex_buffer_decl *bufs, int num_bufs) {
    flex_mod_desc desc = {kind, text, NULL, 0, bufs, num_bufs};
    flex_mod *m = NULL;
    flex_status st = flex_mod_compile(ctx, &desc, &m);
    ck_assert_msg(st == FLEX_OK, "compile '%s': %s", text, flex_error_message(ctx));
    return m;
}

static flex_mod *compile_score(flex_context *ctx, const char *text) {
    return compile_with(ctx, FLEX_MOD_SCORE, text, NULL, 0);
}

static void bind_1d(flex_context *ctx, flex_mod *m, const char *name, void *data, flex_dtype dt,
                    int64_t n) {
    flex_tensor t = flex_tensor_contiguous(data, dt, 1, &n, FLEX_DEVICE_CPU);
    ck_assert_msg(flex_mod_bind_buffer(ctx, m, name, &t) == FLEX_OK, "bind %s: %s", name,
                  flex_error_message(ctx));
}

/* The masked grid of m for (B, H) grids of q_len x kv_len in blocks of
 * qb x kb (malloc'd), and the count. */
static uint8_t *find(flex_context *ctx, const flex_mod *m, int64_t B, int64_t H, int64_t q_len,
                     int64_t kv_len, int qb, int kb, int64_t *count) {
    int64_t n = B * H * flex_blocks_for(q_len, qb) * flex_blocks_for(kv_len, kb);
    uint8_t *masked = malloc((size_t)n);
    ck_assert_ptr_nonnull(masked);
    flex_status st = flex_score_mask_find(ctx, m, B, H, q_len, kv_len, qb, kb, masked, count);
    ck_assert_msg(st == FLEX_OK, "find: %s", flex_error_message(ctx));
    return masked;
}

/* Scores every masked element must turn into -inf. */
static const float probe_scores[] = {-INFINITY, -3e38f, -1.0f, -1e-40f, 0.0f,
                                     0.5f,      7.0f,   3e38f, INFINITY, NAN};

/* Brute force: every element of every block marked in masked gives -inf
 * for every probe score. Returns the number of elements checked. */
static int64_t check_sound(flex_context *ctx, const flex_mod *m, const uint8_t *masked, int64_t B,
                           int64_t H, int64_t q_len, int64_t kv_len, int qb, int kb) {
    mod_buffer_view views[IR_MAX_BUFFERS];
    void *copies[IR_MAX_BUFFERS];
    memset(views, 0, sizeof views);
    memset(copies, 0, sizeof copies);
    ck_assert_int_eq(flex_mod_host_views(ctx, m, views, copies), FLEX_OK);
    ir_value *scratch = malloc((size_t)m->ir.num_nodes * sizeof *scratch);
    ck_assert_ptr_nonnull(scratch);
    int64_t nq = flex_blocks_for(q_len, qb), nk = flex_blocks_for(kv_len, kb), checked = 0;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t i = 0; i < nq; i++)
                for (int64_t j = 0; j < nk; j++) {
                    if (!masked[((b * H + h) * nq + i) * nk + j]) continue;
                    for (int64_t q = i * qb; q < (i + 1) * qb && q < q_len; q++)
                        for (int64_t kv = j * kb; kv < (j + 1) * kb && kv < kv_len; kv++)
                            for (size_t s = 0; s < sizeof probe_scores / sizeof *probe_scores;
                                 s++) {
                                ir_value r;
                                mod_bounds_error err = {0};
                                int rc = mod_eval_point(&m->ir, views, probe_scores[s],
                                                        (int32_t)b, (int32_t)h, (int32_t)q,
                                                        (int32_t)kv, scratch, &r, &err);
                                ck_assert_int_eq(rc, 0);
                                ck_assert_msg(r.f == -INFINITY,
                                              "block (%lld, %lld) marked masked but score %g at "
                                              "q=%lld kv=%lld gives %g",
                                              (long long)i, (long long)j, (double)probe_scores[s],
                                              (long long)q, (long long)kv, (double)r.f);
                                checked++;
                            }
                }
    free(scratch);
    flex_mod_release_host_views(copies);
    return checked;
}

/* ---- which blocks are found ---- */

START_TEST(causal_score_mod_masks_the_upper_blocks) {
    flex_context *ctx = make_ctx(1);
    flex_mod *m = compile_score(ctx, "where(q >= kv, score, -inf)");
    /* odd lengths and Q_LEN != KV_LEN: a block is masked iff its first kv
     * lies past its last q */
    const int64_t lens[][2] = {{256, 256}, {200, 300}, {300, 77}};
    for (size_t c = 0; c < 3; c++) {
        int64_t Lq = lens[c][0], Lkv = lens[c][1], count = 0, expected = 0;
        uint8_t *masked = find(ctx, m, 1, 1, Lq, Lkv, 32, 16, &count);
        int64_t nq = flex_blocks_for(Lq, 32), nk = flex_blocks_for(Lkv, 16);
        for (int64_t i = 0; i < nq; i++)
            for (int64_t j = 0; j < nk; j++) {
                int64_t last_q = (i + 1) * 32 < Lq ? (i + 1) * 32 - 1 : Lq - 1;
                int want = j * 16 > last_q;
                expected += want;
                ck_assert_msg(masked[i * nk + j] == want, "%lldx%lld block (%lld, %lld): %d",
                              (long long)Lq, (long long)Lkv, (long long)i, (long long)j,
                              masked[i * nk + j]);
            }
        ck_assert_int_eq(count, expected);
        ck_assert_int_gt(count, 0);
        check_sound(ctx, m, masked, 1, 1, Lq, Lkv, 32, 16);
        free(masked);
    }
    flex_mod_destroy(m);
    flex_context_destroy(ctx);
}
END_TEST

/* Expected: the blocks where no element satisfies the keep condition,
 * found by scanning every element with keep(). */
typedef int (*keep_fn)(int64_t h, int64_t q, int64_t kv, const void *data);

static void expect_exact(flex_context *ctx, const flex_mod *m, int64_t H, int64_t L, int blk,
                         keep_fn keep, const void *data) {
    int64_t count = 0, expected = 0, n = flex_blocks_for(L, blk);
    uint8_t *masked = find(ctx, m, 1, H, L, L, blk, blk, &count);
    for (int64_t h = 0; h < H; h++)
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = 0; j < n; j++) {
                int any = 0;
                for (int64_t q = i * blk; q < (i + 1) * blk && q < L && !any; q++)
                    for (int64_t kv = j * blk; kv < (j + 1) * blk && kv < L && !any; kv++)
                        any = keep(h, q, kv, data);
                expected += !any;
                ck_assert_msg(masked[(h * n + i) * n + j] == !any, "h %lld block (%lld, %lld)",
                              (long long)h, (long long)i, (long long)j);
            }
    ck_assert_int_eq(count, expected);
    ck_assert_int_gt(count, 0);
    check_sound(ctx, m, masked, 1, H, L, L, blk, blk);
    free(masked);
}

static int keep_window(int64_t h, int64_t q, int64_t kv, const void *data) {
    (void)h, (void)data;
    return q >= kv && q - kv <= 40;
}

START_TEST(sliding_window_score_mod) {
    flex_context *ctx = make_ctx(1);
    flex_mod *m = compile_score(ctx, "where(q >= kv && q - kv <= 40, score * 1.5, -inf)");
    expect_exact(ctx, m, 1, 333, 16, keep_window, NULL);
    flex_mod_destroy(m);
    /* the same with `-inf` reached through arithmetic on a selected branch */
    m = compile_score(ctx, "let w = q - kv; where(w < 0 || w > 40, -inf, score) - 2.0");
    expect_exact(ctx, m, 1, 333, 16, keep_window, NULL);
    flex_mod_destroy(m);
    flex_context_destroy(ctx);
}
END_TEST

static int keep_document(int64_t h, int64_t q, int64_t kv, const void *data) {
    (void)h;
    const int32_t *doc = data;
    return doc[q] == doc[kv] && q >= kv;
}

START_TEST(document_score_mod_reads_a_buffer) {
    flex_context *ctx = make_ctx(1);
    enum { L = 300 };
    static int32_t doc[L];
    for (int i = 0; i < L; i++)
        doc[i] = i < 50 ? 0 : i < 170 ? 1 : i < 180 ? 2 : 3;
    flex_buffer_decl decl = {"doc", FLEX_I32, 1};
    flex_mod *m =
        compile_with(ctx, FLEX_MOD_SCORE, "where(doc[q] == doc[kv] && q >= kv, score, -inf)",
                     &decl, 1);
    bind_1d(ctx, m, "doc", doc, FLEX_I32, L);
    expect_exact(ctx, m, 1, L, 16, keep_document, doc);
    flex_mod_destroy(m);
    flex_context_destroy(ctx);
}
END_TEST

static int keep_head_window(int64_t h, int64_t q, int64_t kv, const void *data) {
    const int32_t *width = data;
    return kv <= q && q - kv <= width[h];
}

START_TEST(per_head_buffer_gives_per_head_grids) {
    flex_context *ctx = make_ctx(1);
    static int32_t width[3] = {10, 64, 1000};
    flex_buffer_decl decl = {"width", FLEX_I32, 1};
    flex_mod *m = compile_with(ctx, FLEX_MOD_SCORE,
                               "where(kv <= q && q - kv <= width[h], score, -inf)", &decl, 1);
    bind_1d(ctx, m, "width", width, FLEX_I32, 3);
    expect_exact(ctx, m, 3, 200, 16, keep_head_window, width);
    flex_mod_destroy(m);
    flex_context_destroy(ctx);
}
END_TEST

/* Mods that must get no masked block: -inf only on some elements of every
 * block, only for some scores, or NaN where a naive reading sees -inf. */
START_TEST(no_false_masked_blocks) {
    flex_context *ctx = make_ctx(1);
    static const char *const texts[] = {
        "where((q + kv) % 2 == 0, score, -inf)",   /* checkerboard: half of each block */
        "where(score > 0.0, score, -inf)",         /* depends on the score */
        "score + log(float(q >= kv))",             /* score = +inf gives NaN, not -inf */
        "score * 0.0 - inf * float(q < kv)",       /* score = inf gives NaN */
        "where(q >= kv, score, -inf) * 0.0",       /* -inf * 0 is NaN */
        "min(score, where(q >= kv, 0.0, -inf))",   /* NaN score: min keeps NaN */
        "where(q >= kv, score, -inf) + score",     /* -inf + inf is NaN */
        "score - exp(float(kv - q))",              /* -inf only by overflow, finite for 0 */
        "-inf * float(q < kv) + score * float(q >= kv) + 1.0", /* inf * 0 = NaN where q >= kv */
    };
    for (size_t t = 0; t < sizeof texts / sizeof *texts; t++) {
        flex_mod *m = compile_score(ctx, texts[t]);
        int64_t count = -1;
        uint8_t *masked = find(ctx, m, 1, 1, 96, 2048, 16, 16, &count);
        ck_assert_msg(count == 0, "'%s' got %lld masked blocks", texts[t], (long long)count);
        free(masked);
        flex_mod_destroy(m);
    }
    flex_context_destroy(ctx);
}
END_TEST

/* A float buffer added to a masked score: finite values keep the block
 * masked (-inf + x = -inf), one NaN anywhere in the buffer makes every read
 * of it possibly NaN (-inf + NaN = NaN), so no block is masked. A -inf
 * inside a float buffer is not exploited (the first look takes float reads
 * as finite, so that bias buffers are never read for nothing). */
START_TEST(float_buffer_with_nan) {
    flex_context *ctx = make_ctx(1);
    enum { L = 128 };
    static float pad[L];
    flex_buffer_decl decl = {"pad", FLEX_F32, 1};
    flex_mod *m =
        compile_with(ctx, FLEX_MOD_SCORE, "where(q >= kv, score, -inf) + pad[kv]", &decl, 1);
    bind_1d(ctx, m, "pad", pad, FLEX_F32, L);
    int64_t count = 0;
    uint8_t *masked = find(ctx, m, 1, 1, L, L, 16, 16, &count);
    ck_assert_int_eq(count, 8 * 7 / 2);
    check_sound(ctx, m, masked, 1, 1, L, L, 16, 16);
    free(masked);
    pad[100] = NAN;
    bind_1d(ctx, m, "pad", pad, FLEX_F32, L);
    masked = find(ctx, m, 1, 1, L, L, 16, 16, &count);
    ck_assert_int_eq(count, 0);
    free(masked);
    flex_mod_destroy(m);
    /* -inf in a float buffer: not exploited, and sound either way */
    for (int i = 0; i < L; i++)
        pad[i] = -INFINITY;
    m = compile_with(ctx, FLEX_MOD_SCORE, "where(q >= kv, score, pad[kv])", &decl, 1);
    bind_1d(ctx, m, "pad", pad, FLEX_F32, L);
    masked = find(ctx, m, 1, 1, L, L, 16, 16, &count);
    ck_assert_int_eq(count, 0);
    free(masked);
    flex_mod_destroy(m);
    flex_context_destroy(ctx);
}
END_TEST

/* A read the analysis cannot prove in range decides nothing: only blocks
 * whose reads all stay inside the buffer are masked, and the call still
 * reports the read that goes out of range. */
START_TEST(possibly_out_of_range_read) {
    flex_context *ctx = make_ctx(1);
    static float bias[64];
    flex_buffer_decl decl = {"bias", FLEX_F32, 1};
    flex_mod *m = compile_with(ctx, FLEX_MOD_SCORE, "where(q >= kv, score, bias[kv - q] - inf)",
                               &decl, 1);
    bind_1d(ctx, m, "bias", bias, FLEX_F32, 64);
    int64_t count = -1;
    uint8_t *masked = find(ctx, m, 1, 1, 128, 128, 16, 16, &count);
    /* kv - q of block (i, j) spans 16 (j - i) - 15 .. 16 (j - i) + 15 */
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 8; j++)
            ck_assert_int_eq(masked[i * 8 + j], j - i >= 1 && j - i <= 3);
    ck_assert_int_eq(count, 7 + 6 + 5);
    check_sound(ctx, m, masked, 1, 1, 128, 128, 16, 16);
    free(masked);
    float *x = calloc(128 * 8, sizeof(float)), *out = calloc(128 * 8, sizeof(float));
    int64_t sizes[4] = {1, 1, 128, 8};
    flex_tensor t = flex_tensor_contiguous(x, FLEX_F32, 4, sizes, FLEX_DEVICE_CPU);
    flex_tensor o = flex_tensor_contiguous(out, FLEX_F32, 4, sizes, FLEX_DEVICE_CPU);
    ck_assert_int_eq(flex_attention(ctx, &t, &t, &t, m, NULL, NULL, &o, NULL),
                     FLEX_ERR_BUFFER_BOUNDS);
    free(x), free(out);
    flex_mod_destroy(m);
    flex_context_destroy(ctx);
}
END_TEST

/* The first look, without buffers: int reads are finite whatever they
 * hold, and float reads are taken as finite too (a -inf in a float buffer
 * is not exploited: only a skipped block must be proven). */
START_TEST(never_masked_without_reading_buffers) {
    flex_context *ctx = make_ctx(1);
    flex_buffer_decl decls[2] = {{"t", FLEX_I32, 1}, {"f", FLEX_F32, 1}};
    static const struct {
        const char *text;
        int never;
    } cases[] = {
        {"score + float(t[q]) * 0.5", 1},
        {"30.0 * tanh(score / 30.0) + float(kv - q)", 1},
        {"where(q >= kv, score, -inf)", 0},
        {"score + f[q]", 1}, /* a -inf in f is left unexploited */
        {"where(q >= kv, score + f[q], -inf)", 0},
        {"where(t[q] == t[kv], score, -inf)", 0},
    };
    mod_box box = {.lo = {0, 0, 0, 0}, .hi = {0, 0, 255, 255}};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        flex_mod *m = compile_with(ctx, FLEX_MOD_SCORE, cases[i].text, decls, 2);
        ck_assert_msg(mod_interval_score_never_masked(&m->ir, &box) == cases[i].never, "%s",
                      cases[i].text);
        flex_mod_destroy(m);
    }
    flex_context_destroy(ctx);
}
END_TEST

/* ---- the mask a call walks ---- */

START_TEST(restrict_keeps_the_base_mask) {
    flex_context *ctx = make_ctx(1);
    flex_mod *score = compile_score(ctx, "where(q >= kv, score, -inf)");
    flex_mod *window = compile_with(ctx, FLEX_MOD_MASK, "q - kv <= 40 && kv - q <= 40", NULL, 0);
    flex_block_mask *base = NULL;
    ck_assert_int_eq(flex_block_mask_create(ctx, window, 1, 1, 256, 256, 32, 32, &base), FLEX_OK);
    flex_block_mask *r = NULL;
    ck_assert_int_eq(flex_score_mask_restrict(ctx, score, base, 2, 4, 256, 256, &r), FLEX_OK);
    ck_assert_ptr_nonnull(r);
    ck_assert_ptr_eq(r->mask_mod, window);
    ck_assert_int_eq(r->B, 1); /* neither reads b or h: still broadcast */
    ck_assert_int_eq(r->H, 1);
    uint8_t bc[64], rc[64];
    flex_block_mask_to_dense(base, bc);
    flex_block_mask_to_dense(r, rc);
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 8; j++)
            ck_assert_int_eq(rc[i * 8 + j], j > i ? FLEX_BLOCK_EMPTY : bc[i * 8 + j]);
    flex_block_mask_destroy(r);
    /* a base whose blocks the score mod does not mask is kept as it is */
    flex_mod *lower = compile_with(ctx, FLEX_MOD_MASK, "q >= kv + 64", NULL, 0);
    flex_block_mask *lb = NULL;
    ck_assert_int_eq(flex_block_mask_create(ctx, lower, 1, 1, 256, 256, 32, 32, &lb), FLEX_OK);
    ck_assert_int_eq(flex_score_mask_restrict(ctx, score, lb, 1, 1, 256, 256, &r), FLEX_OK);
    ck_assert_ptr_null(r);
    /* no base: every kept block full, 128 x 128 blocks, no mask mod */
    ck_assert_int_eq(flex_score_mask_restrict(ctx, score, NULL, 1, 1, 300, 300, &r), FLEX_OK);
    ck_assert_ptr_nonnull(r);
    ck_assert_ptr_null(r->mask_mod);
    ck_assert_int_eq(r->q_block, 128);
    ck_assert_int_eq(r->num_partial, 0);
    ck_assert_int_eq(r->num_full, 6);
    flex_block_mask_destroy(r);
    flex_block_mask_destroy(lb);
    flex_block_mask_destroy(base);
    flex_mod_destroy(lower);
    flex_mod_destroy(window);
    flex_mod_destroy(score);
    flex_context_destroy(ctx);
}
END_TEST

/* ---- attention with the sparsity on and off ---- */

typedef struct problem {
    int B, Hq, Hkv, L, D;
    const char *score;
    const char *mask; /* mask mod text or NULL */
    int block;        /* of a block mask built from mask, 0: pass mask as opts->mask_mod */
} problem;

static float *random_floats(int64_t n, uint64_t seed) {
    float *x = malloc((size_t)n * sizeof *x);
    ck_assert_ptr_nonnull(x);
    for (int64_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((double)(seed >> 11) / 9007199254740992.0 * 4.0 - 2.0);
    }
    return x;
}

typedef struct outputs {
    float *out, *lse, *dq, *dk, *dv;
} outputs;

static void outputs_free(outputs *o) {
    free(o->out), free(o->lse), free(o->dq), free(o->dk), free(o->dv);
}

static flex_tensor t4(float *data, int64_t b, int64_t h, int64_t s, int64_t d) {
    int64_t sizes[4] = {b, h, s, d};
    return flex_tensor_contiguous(data, FLEX_F32, 4, sizes, FLEX_DEVICE_CPU);
}

/* Runs forward and backward of p on a context with the sparsity on or off,
 * checks both against the oracle by the tolerance rule. */
static outputs run_problem(const problem *p, int sparsity) {
    flex_context *ctx = make_ctx(sparsity);
    int64_t nq = (int64_t)p->B * p->Hq * p->L * p->D, nk = (int64_t)p->B * p->Hkv * p->L * p->D;
    float *q = random_floats(nq, 1), *k = random_floats(nk, 2), *v = random_floats(nk, 3),
          *dout = random_floats(nq, 4);
    outputs o = {calloc((size_t)nq, 4), calloc((size_t)(p->B * p->Hq * p->L), 4),
                 calloc((size_t)nq, 4), calloc((size_t)nk, 4), calloc((size_t)nk, 4)};
    flex_tensor tq = t4(q, p->B, p->Hq, p->L, p->D), tk = t4(k, p->B, p->Hkv, p->L, p->D),
                tv = t4(v, p->B, p->Hkv, p->L, p->D), tout = t4(o.out, p->B, p->Hq, p->L, p->D),
                tdout = t4(dout, p->B, p->Hq, p->L, p->D), tlse = t4(o.lse, p->B, p->Hq, p->L, 1),
                tdq = t4(o.dq, p->B, p->Hq, p->L, p->D), tdk = t4(o.dk, p->B, p->Hkv, p->L, p->D),
                tdv = t4(o.dv, p->B, p->Hkv, p->L, p->D);
    flex_mod *score = compile_score(ctx, p->score);
    flex_mod *mask = p->mask ? compile_with(ctx, FLEX_MOD_MASK, p->mask, NULL, 0) : NULL;
    flex_block_mask *bm = NULL;
    flex_attention_options opts = {0};
    if (mask && p->block)
        ck_assert_int_eq(
            flex_block_mask_create(ctx, mask, 1, 1, p->L, p->L, p->block, p->block, &bm), FLEX_OK);
    else
        opts.mask_mod = mask;
    /* twice: the second call takes the cached mask */
    for (int rep = 0; rep < 2; rep++) {
        flex_status st = flex_attention(ctx, &tq, &tk, &tv, score, bm, &opts, &tout, &tlse);
        ck_assert_msg(st == FLEX_OK, "forward: %s", flex_error_message(ctx));
    }
    flex_status st = flex_attention_backward(ctx, &tq, &tk, &tv, &tout, &tdout, &tlse, score, bm,
                                             &opts, &tdq, &tdk, &tdv, NULL, 0);
    ck_assert_msg(st == FLEX_OK, "backward: %s", flex_error_message(ctx));

    oracle_problem op = {.q = tq, .k = tk, .v = tv, .score_mod = score, .mask_mod = mask};
    size_t n_out = (size_t)nq, n_lse = (size_t)(p->B * p->Hq * p->L), n_k = (size_t)nk;
    double *ref[5], *naive[5], *got[5];
    size_t counts[5] = {n_out, n_lse, n_out, n_k, n_k};
    float *gotf[5] = {o.out, o.lse, o.dq, o.dk, o.dv};
    for (int i = 0; i < 5; i++) {
        ref[i] = malloc(counts[i] * sizeof(double));
        naive[i] = malloc(counts[i] * sizeof(double));
        got[i] = malloc(counts[i] * sizeof(double));
        for (size_t j = 0; j < counts[i]; j++)
            got[i][j] = gotf[i][j];
    }
    char err[256];
    ck_assert_msg(oracle_forward(&op, ref[0], ref[1], err, sizeof err) == 0, "%s", err);
    ck_assert_msg(oracle_forward_naive(&op, naive[0], naive[1], err, sizeof err) == 0, "%s", err);
    ck_assert_msg(oracle_backward(&op, &tdout, ref[2], ref[3], ref[4], NULL, 0, err, sizeof err) ==
                      0,
                  "%s", err);
    ck_assert_msg(
        oracle_backward_naive(&op, &tdout, naive[2], naive[3], naive[4], NULL, 0, err, sizeof err) ==
            0,
        "%s", err);
    static const tol_quantity quantity[5] = {TOL_OUTPUT, TOL_LSE, TOL_GRADIENT, TOL_GRADIENT,
                                             TOL_GRADIENT};
    static const char *const names[5] = {"out", "lse", "dq", "dk", "dv"};
    for (int i = 0; i < 5; i++) {
        tol_report r;
        tol_compare(FLEX_F32, quantity[i], ref[i], naive[i], got[i], counts[i], 0.0, &r);
        ck_assert_msg(r.pass, "'%s' sparsity %d: %s: %s", p->score, sparsity, names[i], r.why);
        free(ref[i]), free(naive[i]), free(got[i]);
    }
    flex_block_mask_destroy(bm);
    flex_mod_destroy(mask);
    flex_mod_destroy(score);
    free(q), free(k), free(v), free(dout);
    flex_context_destroy(ctx);
    return o;
}

static void compare_paths(const problem *p) {
    outputs on = run_problem(p, 1), off = run_problem(p, 0);
    int64_t nq = (int64_t)p->B * p->Hq * p->L * p->D, nk = (int64_t)p->B * p->Hkv * p->L * p->D;
    const float *a[5] = {on.out, on.lse, on.dq, on.dk, on.dv};
    const float *b[5] = {off.out, off.lse, off.dq, off.dk, off.dv};
    int64_t n[5] = {nq, (int64_t)p->B * p->Hq * p->L, nq, nk, nk};
    /* Skipping a block whose scores are all -inf leaves every sum of a row
     * as it was (exp(-inf) adds 0): the forwards agree to the last bit. The
     * backward splits its work by the blocks it walks, so the order in which
     * partial gradients are added may change: a few ulps. */
    for (int i = 0; i < 5; i++)
        for (int64_t j = 0; j < n[i]; j++)
            ck_assert_msg(a[i][j] == b[i][j] || (isnan(a[i][j]) && isnan(b[i][j])) ||
                              (i >= 2 && fabsf(a[i][j] - b[i][j]) <=
                                             1e-6f * (fabsf(a[i][j]) + fabsf(b[i][j])) + 1e-7f),
                          "'%s': quantity %d element %lld: %g with the sparsity, %g without",
                          p->score, i, (long long)j, (double)a[i][j], (double)b[i][j]);
    outputs_free(&on);
    outputs_free(&off);
}

START_TEST(attention_matches_without_sparsity) {
    static const problem problems[] = {
        {1, 2, 2, 300, 16, "where(q >= kv, score, -inf)", NULL, 0},
        {2, 4, 2, 200, 8, "where(q >= kv && q - kv <= 70, score + float(h) * 0.25, -inf)", NULL,
         0},
        /* with a block mask of 32 x 32 blocks and with opts->mask_mod */
        {1, 2, 1, 256, 8, "where(q >= kv, 30.0 * tanh(score / 30.0), -inf)",
         "q - kv <= 90 && kv - q <= 90", 32},
        {1, 2, 1, 256, 8, "where(q >= kv, score, -inf)", "(q + kv) % 3 != 0", 0},
    };
    compare_paths(&problems[_i]);
}
END_TEST

/* Rows whose every block the score mod masks: output 0 and LSE -inf on
 * both paths, and no gradient. */
START_TEST(fully_masked_rows) {
    problem p = {1, 2, 2, 300, 16, "where(q >= kv + 160, score, -inf)", NULL, 0};
    outputs on = run_problem(&p, 1);
    for (int h = 0; h < 2; h++)
        for (int r = 0; r < 160; r++) {
            ck_assert(on.lse[h * 300 + r] == -INFINITY);
            for (int d = 0; d < 16; d++) {
                ck_assert(on.out[(h * 300 + r) * 16 + d] == 0.0f);
                ck_assert(on.dq[(h * 300 + r) * 16 + d] == 0.0f);
            }
        }
    outputs_free(&on);
    compare_paths(&p);
}
END_TEST

static Suite *suite(void) {
    Suite *s = suite_create("scoremask");
    TCase *tc = tcase_create("find");
    tcase_add_test(tc, causal_score_mod_masks_the_upper_blocks);
    tcase_add_test(tc, sliding_window_score_mod);
    tcase_add_test(tc, document_score_mod_reads_a_buffer);
    tcase_add_test(tc, per_head_buffer_gives_per_head_grids);
    tcase_add_test(tc, no_false_masked_blocks);
    tcase_add_test(tc, float_buffer_with_nan);
    tcase_add_test(tc, possibly_out_of_range_read);
    tcase_add_test(tc, never_masked_without_reading_buffers);
    tcase_add_test(tc, restrict_keeps_the_base_mask);
    suite_add_tcase(s, tc);
    TCase *ta = tcase_create("attention");
    tcase_set_timeout(ta, 300);
    tcase_add_loop_test(ta, attention_matches_without_sparsity, 0, 4);
    tcase_add_test(ta, fully_masked_rows);
    suite_add_tcase(s, ta);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
