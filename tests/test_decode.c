/*
 * Decode and serving on the CPU: run-time query offsets, per-batch kv
 * lengths, a paged KV cache and split-KV with the LSE merge.
 *
 *  - steps: a prefill, then step-by-step decode (1 or 4 tokens a step) into
 *    a cache whose rows past each batch's kv length hold NaN, equals full
 *    attention under the fp64 oracle (tolerance rule of docs/testing.md),
 *    for causal, sliding-window, ALiBi, soft-cap and document masks, GQA
 *    4:1 and 8:1, f32 and bf16, with the mask built by the call (and one
 *    mask serving every step) or given;
 *  - paged: shuffled pages give the same bits as a contiguous cache;
 *  - bad input: each named error, with out left untouched;
 *  - the LSE merge (core/lse_merge.h) against a double-precision merge.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "blockmask_cache.h"
#include "lse_merge.h"
#include "plan.h"
#include "backends/cpu/cpu.h"
#include "oracle.h"
#include "tolerance.h"

/* ---- inputs ---- */

static uint64_t rng_state;

static uint64_t rnd_next(void) {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return rng_state >> 11;
}

static double rnd_normalish(void) {
    double s = 0.0;
    for (int i = 0; i < 4; i++)
        s += (double)rnd_next() / 9007199254740992.0;
    return (s - 2.0) * 1.7;
}

typedef struct host_tensor {
    void *mem;
    size_t bytes;
    flex_tensor t;
} host_tensor;

/* A contiguous (S0, S1, S2, S3) tensor, BHSD memory order, poisoned with
 * 0xff bytes (NaN in every float dtype). */
static host_tensor make4(flex_dtype dt, int64_t s0, int64_t s1, int64_t s2, int64_t s3) {
    host_tensor h;
    h.bytes = (size_t)(s0 * s1 * s2 * s3) * flex_dtype_size(dt);
    h.mem = malloc(h.bytes);
    ck_assert_ptr_nonnull(h.mem);
    memset(h.mem, 0xff, h.bytes);
    h.t = flex_tensor_bhsd(h.mem, dt, s0, s1, s2, s3, FLEX_DEVICE_CPU);
    return h;
}

static int64_t off4(const flex_tensor *t, int64_t a, int64_t b, int64_t c, int64_t d) {
    return a * t->strides[0] + b * t->strides[1] + c * t->strides[2] + d * t->strides[3];
}

static void fill_random(flex_tensor *t) {
    for (int64_t a = 0; a < t->sizes[0]; a++)
        for (int64_t b = 0; b < t->sizes[1]; b++)
            for (int64_t c = 0; c < t->sizes[2]; c++)
                for (int64_t d = 0; d < t->sizes[3]; d++)
                    flex_store_from_float(t->data, t->dtype, off4(t, a, b, c, d),
                                          (float)rnd_normalish());
}

/* dst[a][b][c0 + i][:] = src[sa][b][c_src + i][:] for i < n (same dtype). */
static void copy_rows(flex_tensor *dst, int64_t a, int64_t c0, const flex_tensor *src, int64_t sa,
                      int64_t c_src, int64_t n) {
    size_t es = flex_dtype_size(src->dtype);
    for (int64_t b = 0; b < src->sizes[1]; b++)
        for (int64_t i = 0; i < n; i++)
            for (int64_t d = 0; d < src->sizes[3]; d++)
                memcpy((char *)dst->data + (size_t)off4(dst, a, b, c0 + i, d) * es,
                       (const char *)src->data + (size_t)off4(src, sa, b, c_src + i, d) * es, es);
}

/* A view of batch a of t with its length cut to len. */
static flex_tensor batch_view(const flex_tensor *t, int64_t a, int64_t len) {
    flex_tensor v = *t;
    v.data = (char *)t->data + (size_t)(a * t->strides[0]) * flex_dtype_size(t->dtype);
    v.sizes[0] = 1;
    v.sizes[2] = len;
    return v;
}

static flex_tensor i32_view(int32_t *data, int ndim, int64_t n0, int64_t n1) {
    int64_t sizes[2] = {n0, n1};
    return flex_tensor_contiguous(data, FLEX_I32, ndim, sizes, FLEX_DEVICE_CPU);
}

/* ---- mods ---- */

typedef struct mods {
    flex_mod *mask, *score;
    int32_t *doc;
    float *slopes;
} mods;

static flex_mod *compile_preset(flex_context *ctx, const char *name) {
    flex_param ov[1];
    int n = 0;
    if (!strcmp(name, "sliding_window")) ov[0] = (flex_param){"W", 0, 20}, n = 1;
    if (!strcmp(name, "softcap")) ov[0] = (flex_param){"C", 1, 2.0}, n = 1;
    flex_mod *m = NULL;
    flex_status st = flex_preset_compile(ctx, name, ov, n, &m);
    ck_assert_msg(st == FLEX_OK, "compile %s: %s", name, flex_error_message(ctx));
    return m;
}

static void bind(flex_context *ctx, flex_mod *m, const char *name, void *data, flex_dtype dt,
                 int64_t n) {
    flex_tensor t = flex_tensor_contiguous(data, dt, 1, &n, FLEX_DEVICE_CPU);
    flex_status st = flex_mod_bind_buffer(ctx, m, name, &t);
    ck_assert_msg(st == FLEX_OK, "bind %s: %s", name, flex_error_message(ctx));
}

/* Compiles the presets and binds their buffers for positions up to L:
 * documents of uneven lengths, ALiBi slopes. */
static void mods_make(flex_context *ctx, mods *m, const char *mask, const char *score, int Hq,
                      int64_t L) {
    memset(m, 0, sizeof *m);
    m->doc = malloc((size_t)L * sizeof(int32_t));
    m->slopes = malloc((size_t)Hq * sizeof(float));
    static const int doc_lengths[] = {37, 90, 13, 64, 5, 128, 41};
    for (int64_t i = 0, d = 0, left = doc_lengths[0]; i < L; i++) {
        if (left == 0) d++, left = doc_lengths[d % 7];
        m->doc[i] = (int32_t)d;
        left--;
    }
    for (int h = 0; h < Hq; h++)
        m->slopes[h] = (float)exp2(-8.0 * (h + 1) / Hq);
    if (mask) {
        m->mask = compile_preset(ctx, mask);
        if (strstr(mask, "document")) bind(ctx, m->mask, "doc", m->doc, FLEX_I32, L);
    }
    if (score) {
        m->score = compile_preset(ctx, score);
        if (!strcmp(score, "alibi")) bind(ctx, m->score, "slopes", m->slopes, FLEX_F32, Hq);
    }
}

static void mods_free(mods *m) {
    flex_mod_destroy(m->mask);
    flex_mod_destroy(m->score);
    free(m->doc);
    free(m->slopes);
}

/* ---- prefill, then decode steps, against the oracle ---- */

typedef struct step_case {
    const char *name;
    const char *mask, *score; /* presets or NULL */
    int Hq, Hkv;
    flex_dtype dtype;
    int step;       /* tokens a decode step */
    int L;          /* tokens of each sequence */
    int given_mask; /* block size of a given block mask; 0: opts->mask_mod */
    int kv_splits;
} step_case;

enum { STEP_B = 2, STEP_D = 32, STEP_PREFILL = 40, STEP_SHIFT = 5 };

/* Growing arrays of compared values. */
typedef struct values {
    double *v;
    size_t n, cap;
} values;

static void values_push(values *a, double x) {
    if (a->n == a->cap) {
        a->cap = a->cap ? 2 * a->cap : 4096;
        a->v = realloc(a->v, a->cap * sizeof(double));
        ck_assert_ptr_nonnull(a->v);
    }
    a->v[a->n++] = x;
}

static void run_steps(const step_case *c) {
    flex_context *ctx;
    ck_assert_int_eq(flex_context_create("cpu", &ctx), FLEX_OK);
    rng_state = 0x243f6a8885a308d3ull ^ (uint64_t)(c->Hq * 977 + c->step * 31 + c->L);
    /* Batch b is STEP_SHIFT * b tokens ahead: its offsets and lengths differ. */
    const int B = STEP_B, D = STEP_D, cap = c->L + STEP_SHIFT * (B - 1);
    host_tensor qs = make4(c->dtype, B, c->Hq, cap, D), ks = make4(c->dtype, B, c->Hkv, cap, D),
                vs = make4(c->dtype, B, c->Hkv, cap, D);
    fill_random(&qs.t);
    fill_random(&ks.t);
    fill_random(&vs.t);
    /* The cache: rows past a batch's kv length hold NaN. */
    host_tensor kc = make4(c->dtype, B, c->Hkv, cap, D), vc = make4(c->dtype, B, c->Hkv, cap, D);
    mods m;
    mods_make(ctx, &m, c->mask, c->score, c->Hq, cap);
    flex_block_mask *given = NULL;
    if (c->mask && c->given_mask) {
        flex_status st = flex_block_mask_create(ctx, m.mask, 1, 1, cap, cap, c->given_mask,
                                                c->given_mask, &given);
        ck_assert_msg(st == FLEX_OK, "mask: %s", flex_error_message(ctx));
    }
    /* The mask the calls build is for the whole cache; holding it shows that
     * no step builds another (a new one would push it out of the cache). */
    flex_cached_mask *held = NULL;
    const flex_block_mask *first_mask = NULL;
    if (c->mask && !c->given_mask)
        ck_assert_int_eq(
            flex_mask_cache_acquire(ctx, m.mask, B, c->Hq, cap, cap, &held, &first_mask), FLEX_OK);

    values got = {0}, ref = {0}, naive = {0}, got_lse = {0}, ref_lse = {0}, naive_lse = {0};
    int32_t offsets[STEP_B], lengths[STEP_B], filled[STEP_B] = {0, 0};
    int steps = 0;
    for (int t = 0; t < c->L; steps++) {
        int s = t == 0 ? STEP_PREFILL : c->step;
        if (t + s > c->L) s = c->L - t;
        for (int b = 0; b < B; b++) {
            offsets[b] = t + STEP_SHIFT * b;
            lengths[b] = offsets[b] + s;
            copy_rows(&kc.t, b, filled[b], &ks.t, b, filled[b], lengths[b] - filled[b]);
            copy_rows(&vc.t, b, filled[b], &vs.t, b, filled[b], lengths[b] - filled[b]);
            filled[b] = lengths[b];
        }
        host_tensor q = make4(c->dtype, B, c->Hq, s, D), out = make4(c->dtype, B, c->Hq, s, D),
                    lse = make4(FLEX_F32, B, c->Hq, s, 1);
        for (int b = 0; b < B; b++)
            copy_rows(&q.t, b, 0, &qs.t, b, offsets[b], s);
        flex_tensor off_t = i32_view(offsets, 1, B, 0), len_t = i32_view(lengths, 1, B, 0);
        flex_attention_options opts = {
            .q_offsets = &off_t, .kv_lengths = &len_t, .kv_splits = c->kv_splits};
        if (c->mask && !c->given_mask) opts.mask_mod = m.mask;
        flex_status st =
            flex_attention(ctx, &q.t, &kc.t, &vc.t, m.score, given, &opts, &out.t, &lse.t);
        ck_assert_msg(st == FLEX_OK, "%s step at %d: %s", c->name, t, flex_error_message(ctx));

        for (int b = 0; b < B; b++) {
            int64_t rows[STEP_PREFILL];
            for (int r = 0; r < s; r++)
                rows[r] = offsets[b] + r;
            oracle_problem p;
            memset(&p, 0, sizeof p);
            p.q = batch_view(&qs.t, b, cap);
            p.k = batch_view(&ks.t, b, lengths[b]);
            p.v = batch_view(&vs.t, b, lengths[b]);
            p.score_mod = m.score;
            p.mask_mod = m.mask;
            p.rows = rows;
            p.num_rows = s;
            size_t n = (size_t)c->Hq * s;
            double *o = malloc(n * D * sizeof(double)), *l = malloc(n * sizeof(double));
            double *no = malloc(n * D * sizeof(double)), *nl = malloc(n * sizeof(double));
            char err[512];
            ck_assert_msg(oracle_forward(&p, o, l, err, sizeof err) == 0, "oracle: %s", err);
            ck_assert_msg(oracle_forward_naive(&p, no, nl, err, sizeof err) == 0, "naive: %s", err);
            for (int h = 0, k = 0; h < c->Hq; h++)
                for (int r = 0; r < s; r++, k++) {
                    for (int d = 0; d < D; d++) {
                        values_push(&got, oracle_load(&out.t, b, h, r, d));
                        values_push(&ref, o[(size_t)k * D + d]);
                        values_push(&naive, no[(size_t)k * D + d]);
                    }
                    values_push(&got_lse, oracle_load(&lse.t, b, h, r, 0));
                    values_push(&ref_lse, l[k]);
                    values_push(&naive_lse, nl[k]);
                }
            free(o), free(l), free(no), free(nl);
        }
        free(q.mem), free(out.mem), free(lse.mem);
        t += s;
    }
    ck_assert_int_gt(steps, 16);
    if (held) {
        flex_cached_mask *again = NULL;
        const flex_block_mask *mask_now = NULL;
        ck_assert_int_eq(
            flex_mask_cache_acquire(ctx, m.mask, B, c->Hq, cap, cap, &again, &mask_now), FLEX_OK);
        ck_assert_msg(mask_now == first_mask, "%s: a decode step built another block mask",
                      c->name);
        flex_mask_cache_release(ctx, again);
        flex_mask_cache_release(ctx, held);
    }
    tol_report ro, rl;
    int out_ok = tol_compare(c->dtype, TOL_OUTPUT, ref.v, naive.v, got.v, got.n, 0.0, &ro);
    int lse_ok =
        tol_compare(c->dtype, TOL_LSE, ref_lse.v, naive_lse.v, got_lse.v, got_lse.n, 0.0, &rl);
    if (getenv("FLEXATTN_TEST_VERBOSE"))
        fprintf(stderr, "%-36s %d steps, out %.2f lse %.2f of bound\n", c->name, steps,
                tol_margin(&ro), tol_margin(&rl));
    ck_assert_msg(out_ok, "%s: out: %s", c->name, ro.why);
    ck_assert_msg(lse_ok, "%s: lse: %s", c->name, rl.why);
    free(got.v), free(ref.v), free(naive.v), free(got_lse.v), free(ref_lse.v), free(naive_lse.v);
    flex_block_mask_destroy(given);
    mods_free(&m);
    free(qs.mem), free(ks.mem), free(vs.mem), free(kc.mem), free(vc.mem);
    flex_context_destroy(ctx);
}

#define F32  FLEX_F32
#define BF16 FLEX_BF16

static const step_case step_cases[] = {
    /* name, mask, score, Hq, Hkv, dtype, step, L, given_mask, kv_splits */
    {"causal gqa4 f32 step1", "causal", NULL, 8, 2, F32, 1, 100, 0, 0},
    {"causal gqa8 bf16 step4 given16", "causal", NULL, 8, 1, BF16, 4, 300, 16, 0},
    {"window gqa4 f32 step4 split3", "sliding_window", NULL, 8, 2, F32, 4, 300, 0, 3},
    {"window gqa8 bf16 step1 given16", "sliding_window", NULL, 8, 1, BF16, 1, 100, 16, 0},
    {"alibi causal gqa4 f32 step4 split2", "causal", "alibi", 8, 2, F32, 4, 300, 0, 2},
    {"alibi causal gqa8 bf16 step1", "causal", "alibi", 8, 1, BF16, 1, 100, 0, 0},
    {"softcap causal gqa8 f32 step1", "causal", "softcap", 8, 1, F32, 1, 100, 32, 0},
    {"softcap causal gqa4 bf16 step4 split4", "causal", "softcap", 8, 2, BF16, 4, 300, 0, 4},
    {"document gqa4 f32 step4", "document_causal", NULL, 8, 2, F32, 4, 300, 0, 0},
    {"document gqa8 bf16 step1 given16 split2", "document_causal", NULL, 8, 1, BF16, 1, 100, 16, 2},
    {"alibi unmasked gqa4 f32 step4", NULL, "alibi", 8, 2, F32, 4, 300, 0, 0},
};

START_TEST(test_steps) {
    run_steps(&step_cases[_i]);
}
END_TEST

/* ---- paged equals contiguous ---- */

typedef struct paged_run {
    host_tensor out, lse;
} paged_run;

/* One call of B=3 batches with kv lengths 150, 64 and 1 (not multiples of
 * the page size), 4 query rows ending at each batch's last key; on a
 * contiguous cache (page_size 0) or a pool of shuffled pages. */
static paged_run run_paged(flex_context *ctx, flex_dtype dt, int page_size, int max_pages,
                           const host_tensor *q, const host_tensor *ks, const host_tensor *vs,
                           const mods *m, int kv_splits) {
    enum { B = 3, Hq = 4, Hkv = 2, D = 64, Lq = 4 };
    int32_t lengths[B] = {150, 64, 1}, offsets[B];
    for (int b = 0; b < B; b++)
        offsets[b] = lengths[b] >= Lq ? lengths[b] - Lq : 0;
    int64_t cap = (int64_t)max_pages * (page_size ? page_size : 1);
    if (!page_size) cap = ks->t.sizes[2];
    paged_run r = {make4(dt, B, Hq, Lq, D), make4(FLEX_F32, B, Hq, Lq, 1)};
    flex_tensor off_t = i32_view(offsets, 1, B, 0), len_t = i32_view(lengths, 1, B, 0);
    flex_attention_options opts = {
        .q_offsets = &off_t, .kv_lengths = &len_t, .mask_mod = m->mask, .kv_splits = kv_splits};
    flex_status st;
    if (!page_size) {
        st = flex_attention(ctx, &q->t, &ks->t, &vs->t, m->score, NULL, &opts, &r.out.t, &r.lse.t);
    } else {
        /* Pages in a shuffled order, two spare ones, unread table entries -1. */
        int num_pages = B * max_pages + 2;
        int *perm = malloc((size_t)num_pages * sizeof(int));
        for (int i = 0; i < num_pages; i++)
            perm[i] = i;
        for (int i = num_pages - 1; i > 0; i--) {
            int j = (int)(rnd_next() % (uint64_t)(i + 1)), tmp = perm[i];
            perm[i] = perm[j], perm[j] = tmp;
        }
        size_t es = flex_dtype_size(dt);
        size_t pool_bytes = (size_t)num_pages * page_size * Hkv * D * es;
        void *kp = malloc(pool_bytes), *vp = malloc(pool_bytes);
        memset(kp, 0xff, pool_bytes);
        memset(vp, 0xff, pool_bytes);
        flex_tensor kpool = flex_tensor_bshd(kp, dt, num_pages, Hkv, page_size, D, FLEX_DEVICE_CPU);
        flex_tensor vpool = flex_tensor_bshd(vp, dt, num_pages, Hkv, page_size, D, FLEX_DEVICE_CPU);
        int32_t *table = malloc((size_t)B * max_pages * sizeof(int32_t));
        for (int b = 0; b < B; b++)
            for (int p = 0; p < max_pages; p++) {
                int used = p * page_size < lengths[b];
                int page = perm[b * max_pages + p];
                table[b * max_pages + p] = used ? page : -1;
                if (used) {
                    int64_t n = lengths[b] - p * page_size;
                    if (n > page_size) n = page_size;
                    copy_rows(&kpool, page, 0, &ks->t, b, (int64_t)p * page_size, n);
                    copy_rows(&vpool, page, 0, &vs->t, b, (int64_t)p * page_size, n);
                }
            }
        flex_tensor table_t = i32_view(table, 2, B, max_pages);
        opts.page_table = &table_t;
        st = flex_attention(ctx, &q->t, &kpool, &vpool, m->score, NULL, &opts, &r.out.t, &r.lse.t);
        free(perm), free(kp), free(vp), free(table);
    }
    ck_assert_msg(st == FLEX_OK, "paged %d: %s", page_size, flex_error_message(ctx));
    (void)cap;
    return r;
}

START_TEST(test_paged_equals_contiguous) {
    static const flex_dtype dts[2] = {FLEX_F32, FLEX_BF16};
    static const int page_sizes[2] = {16, 64};
    flex_context *ctx;
    ck_assert_int_eq(flex_context_create("cpu", &ctx), FLEX_OK);
    for (int di = 0; di < 2; di++)
        for (int pi = 0; pi < 2; pi++)
            for (int split = 0; split < 3; split += 2) {
                flex_dtype dt = dts[di];
                int ps = page_sizes[pi], max_pages = (150 + ps - 1) / ps;
                rng_state = 0x13198a2e03707344ull + (uint64_t)(di * 7 + pi * 3 + split);
                host_tensor q = make4(dt, 3, 4, 4, 64), ks = make4(dt, 3, 2, max_pages * ps, 64),
                            vs = make4(dt, 3, 2, max_pages * ps, 64);
                fill_random(&q.t);
                fill_random(&ks.t);
                fill_random(&vs.t);
                mods m;
                mods_make(ctx, &m, "causal", "alibi", 4, max_pages * ps);
                paged_run a = run_paged(ctx, dt, 0, 0, &q, &ks, &vs, &m, split);
                paged_run b = run_paged(ctx, dt, ps, max_pages, &q, &ks, &vs, &m, split);
                ck_assert_msg(memcmp(a.out.mem, b.out.mem, a.out.bytes) == 0,
                              "%s page size %d splits %d: paged out differs from contiguous",
                              flex_dtype_name(dt), ps, split);
                ck_assert_msg(memcmp(a.lse.mem, b.lse.mem, a.lse.bytes) == 0,
                              "%s page size %d splits %d: paged lse differs from contiguous",
                              flex_dtype_name(dt), ps, split);
                /* Not vacuous: every row saw a key (no NaN from the poison). */
                for (size_t i = 0; i < a.lse.bytes / 4; i++)
                    ck_assert(isfinite(((float *)a.lse.mem)[i]));
                free(a.out.mem), free(a.lse.mem), free(b.out.mem), free(b.lse.mem);
                free(q.mem), free(ks.mem), free(vs.mem);
                mods_free(&m);
            }
    flex_context_destroy(ctx);
}
END_TEST

/* ---- bad input ---- */

typedef struct bad_setup {
    flex_context *ctx;
    host_tensor q, k, v, out, lse;
    int32_t offsets[2], lengths[2], table[2 * 4];
    flex_tensor off_t, len_t, table_t;
    flex_attention_options opts;
} bad_setup;

/* B=2, Lq=2, a pool of 6 pages of 16 rows, 4 pages a batch. */
static void bad_init(bad_setup *s) {
    memset(s, 0, sizeof *s);
    ck_assert_int_eq(flex_context_create("cpu", &s->ctx), FLEX_OK);
    s->q = make4(FLEX_F32, 2, 2, 2, 16);
    s->k = make4(FLEX_F32, 6, 1, 16, 16);
    s->v = make4(FLEX_F32, 6, 1, 16, 16);
    rng_state = 7;
    fill_random(&s->q.t);
    fill_random(&s->k.t);
    fill_random(&s->v.t);
    s->out = make4(FLEX_F32, 2, 2, 2, 16);
    s->lse = make4(FLEX_F32, 2, 2, 2, 1);
    s->offsets[0] = 30, s->offsets[1] = 10;
    s->lengths[0] = 32, s->lengths[1] = 12;
    int32_t table[8] = {5, 0, -1, -1, 2, -1, -1, -1};
    memcpy(s->table, table, sizeof table);
    s->off_t = i32_view(s->offsets, 1, 2, 0);
    s->len_t = i32_view(s->lengths, 1, 2, 0);
    s->table_t = i32_view(s->table, 2, 2, 4);
    s->opts.q_offsets = &s->off_t;
    s->opts.kv_lengths = &s->len_t;
    s->opts.page_table = &s->table_t;
}

/* Runs the call and checks its status and message, and that out and lse
 * still hold their poison. */
static void bad_expect(bad_setup *s, const flex_block_mask *mask, flex_status want,
                       const char *needle) {
    flex_status st = flex_attention(s->ctx, &s->q.t, &s->k.t, &s->v.t, NULL, mask, &s->opts,
                                    &s->out.t, &s->lse.t);
    const char *msg = flex_error_message(s->ctx);
    ck_assert_msg(st == want, "want %s, got %s: %s", flex_status_name(want), flex_status_name(st),
                  msg);
    if (needle) ck_assert_msg(strstr(msg, needle), "message '%s' lacks '%s'", msg, needle);
    if (want == FLEX_OK) {
        memset(s->out.mem, 0xff, s->out.bytes);
        memset(s->lse.mem, 0xff, s->lse.bytes);
    } else {
        for (size_t i = 0; i < s->out.bytes; i++)
            ck_assert_msg(((uint8_t *)s->out.mem)[i] == 0xff, "out written by a failed call");
        for (size_t i = 0; i < s->lse.bytes; i++)
            ck_assert_msg(((uint8_t *)s->lse.mem)[i] == 0xff, "lse written by a failed call");
    }
}

static void bad_free(bad_setup *s) {
    free(s->q.mem), free(s->k.mem), free(s->v.mem), free(s->out.mem), free(s->lse.mem);
    flex_context_destroy(s->ctx);
}

START_TEST(test_bad_input) {
    bad_setup s;
    bad_init(&s);
    /* The setup itself is good (the checks below each break one thing). */
    bad_expect(&s, NULL, FLEX_OK, NULL);

    s.table[4] = 6; /* batch 1, page 0: one past the pool */
    bad_expect(&s, NULL, FLEX_ERR_INVALID_ARGUMENT, "opts->page_table[1][0] = 6");
    s.table[4] = -3;
    bad_expect(&s, NULL, FLEX_ERR_INVALID_ARGUMENT, "opts->page_table[1][0] = -3");
    s.table[4] = 2;
    s.table[1] = 9; /* batch 0 reads page 1 (keys 16..31) */
    bad_expect(&s, NULL, FLEX_ERR_INVALID_ARGUMENT, "opts->page_table[0][1] = 9");
    s.table[1] = 0;

    s.offsets[1] = -1;
    bad_expect(&s, NULL, FLEX_ERR_INVALID_ARGUMENT, "opts->q_offsets[1] = -1");
    s.offsets[1] = 13; /* past batch 1's kv length 12 */
    bad_expect(&s, NULL, FLEX_ERR_INVALID_ARGUMENT, "opts->q_offsets[1] = 13");
    s.offsets[1] = 10;

    s.lengths[0] = 65; /* the logical cache is 4 pages of 16 */
    bad_expect(&s, NULL, FLEX_ERR_INVALID_ARGUMENT, "opts->kv_lengths[0] = 65");
    s.lengths[0] = -1;
    bad_expect(&s, NULL, FLEX_ERR_INVALID_ARGUMENT, "opts->kv_lengths[0] = -1");
    s.lengths[0] = 32;

    /* A block mask too short for the queries' positions, or for the keys. */
    flex_mod *causal = compile_preset(s.ctx, "causal");
    flex_block_mask *mask = NULL;
    ck_assert_int_eq(flex_block_mask_create(s.ctx, causal, 1, 1, 31, 64, 16, 16, &mask), FLEX_OK);
    bad_expect(&s, mask, FLEX_ERR_INVALID_ARGUMENT,
               "opts->q_offsets[0] = 30 with Lq 2 reaches position 32, past the block mask's "
               "q_len 31");
    flex_block_mask_destroy(mask);
    ck_assert_int_eq(flex_block_mask_create(s.ctx, causal, 1, 1, 64, 48, 16, 16, &mask), FLEX_OK);
    bad_expect(&s, mask, FLEX_ERR_SHAPE, "logical kv length 64");
    flex_block_mask_destroy(mask);
    ck_assert_int_eq(flex_block_mask_create(s.ctx, causal, 1, 1, 32, 64, 16, 16, &mask), FLEX_OK);
    bad_expect(&s, mask, FLEX_OK, NULL); /* exactly long enough */
    flex_block_mask_destroy(mask);
    flex_mod_destroy(causal);

    /* Tensors of the wrong kind. */
    int64_t wide[2] = {0, 0};
    flex_tensor wrong = flex_tensor_contiguous(wide, FLEX_I64, 1, (int64_t[]){2}, FLEX_DEVICE_CPU);
    s.opts.q_offsets = &wrong;
    bad_expect(&s, NULL, FLEX_ERR_DTYPE, "opts->q_offsets has dtype i64");
    flex_tensor short_len = i32_view(s.lengths, 1, 1, 0);
    s.opts.q_offsets = &s.off_t;
    s.opts.kv_lengths = &short_len;
    bad_expect(&s, NULL, FLEX_ERR_SHAPE, "opts->kv_lengths->sizes[0] is 1");
    s.opts.kv_lengths = &s.len_t;
    /* A pool whose v disagrees with k. */
    flex_tensor v_short = s.v.t;
    v_short.sizes[0] = 5;
    flex_status st =
        flex_attention(s.ctx, &s.q.t, &s.k.t, &v_short, NULL, NULL, &s.opts, &s.out.t, &s.lse.t);
    ck_assert_int_eq(st, FLEX_ERR_SHAPE);
    bad_free(&s);
}
END_TEST

/* The backward refuses the decode arguments by name. */
START_TEST(test_backward_unsupported) {
    flex_context *ctx;
    ck_assert_int_eq(flex_context_create("cpu", &ctx), FLEX_OK);
    host_tensor q = make4(FLEX_F32, 1, 1, 4, 8), k = make4(FLEX_F32, 1, 1, 4, 8),
                v = make4(FLEX_F32, 1, 1, 4, 8), out = make4(FLEX_F32, 1, 1, 4, 8),
                dout = make4(FLEX_F32, 1, 1, 4, 8), lse = make4(FLEX_F32, 1, 1, 4, 1),
                dq = make4(FLEX_F32, 1, 1, 4, 8);
    rng_state = 3;
    fill_random(&q.t), fill_random(&k.t), fill_random(&v.t), fill_random(&out.t),
        fill_random(&dout.t), fill_random(&lse.t);
    int32_t zero = 0, four = 4, page = 0;
    flex_tensor z = i32_view(&zero, 1, 1, 0), f = i32_view(&four, 1, 1, 0),
                pt = i32_view(&page, 2, 1, 1);
    struct {
        flex_attention_options opts;
        const char *name;
    } cases[3] = {{{.q_offsets = &z}, "opts->q_offsets"},
                  {{.kv_lengths = &f}, "opts->kv_lengths"},
                  {{.page_table = &pt}, "opts->page_table"}};
    for (int i = 0; i < 3; i++) {
        flex_status st =
            flex_attention_backward(ctx, &q.t, &k.t, &v.t, &out.t, &dout.t, &lse.t, NULL, NULL,
                                    &cases[i].opts, &dq.t, NULL, NULL, NULL, 0);
        ck_assert_int_eq(st, FLEX_ERR_UNSUPPORTED);
        ck_assert_msg(strstr(flex_error_message(ctx), cases[i].name), "%s",
                      flex_error_message(ctx));
        for (size_t j = 0; j < dq.bytes; j++)
            ck_assert(((uint8_t *)dq.mem)[j] == 0xff);
    }
    free(q.mem), free(k.mem), free(v.mem), free(out.mem), free(dout.mem), free(lse.mem),
        free(dq.mem);
    flex_context_destroy(ctx);
}
END_TEST

/* ---- plain calls on the decode path ---- */

/* Short-query calls without decode arguments: with a kv_splits hint, and
 * as the split policy routes them (two threads: one (b, h) item for many
 * keys), the decode path matches the oracle. */
START_TEST(test_plain_short_query) {
    flex_context *ctx;
    ck_assert_int_eq(flex_context_create("cpu", &ctx), FLEX_OK);
    enum { Hq = 2, Hkv = 1, Lq = 3, Lkv = 1000, D = 32 };
    rng_state = 0xa4093822299f31d0ull;
    host_tensor q = make4(FLEX_F32, 1, Hq, Lq, D), k = make4(FLEX_F32, 1, Hkv, Lkv, D),
                v = make4(FLEX_F32, 1, Hkv, Lkv, D);
    fill_random(&q.t), fill_random(&k.t), fill_random(&v.t);
    mods m;
    mods_make(ctx, &m, NULL, "alibi", Hq, Lkv);
    struct plan_probe {
        int num_threads, kv_splits;
    } runs[3] = {{0, 7}, {2, 0}, {1, 0}};
    for (int r = 0; r < 3; r++) {
        host_tensor out = make4(FLEX_F32, 1, Hq, Lq, D), lse = make4(FLEX_F32, 1, Hq, Lq, 1);
        struct flex_plan plan = {.q_tile = 64, .kv_tile = 128, .num_threads = runs[r].num_threads};
        flex_forward_args args = {.q = q.t,
                                  .k = k.t,
                                  .v = v.t,
                                  .out = out.t,
                                  .lse = &lse.t,
                                  .score_mod = m.score,
                                  .scale = 1.0f / sqrtf((float)D),
                                  .plan = &plan,
                                  .kv_len = Lkv,
                                  .kv_splits = runs[r].kv_splits};
        /* Two threads and one item a head: the policy splits; one thread
         * with two items does not (the tiled path answers). */
        ck_assert_int_eq(flex_cpu_decode_wanted(&args, &plan), r < 2);
        flex_attention_options opts = {.kv_splits = runs[r].kv_splits};
        ck_assert_int_eq(
            flex_attention(ctx, &q.t, &k.t, &v.t, m.score, NULL, &opts, &out.t, &lse.t), FLEX_OK);
        oracle_problem p;
        memset(&p, 0, sizeof p);
        p.q = q.t, p.k = k.t, p.v = v.t;
        p.score_mod = m.score;
        double ref[Hq * Lq * D], naive[Hq * Lq * D], got[Hq * Lq * D];
        double ref_lse[Hq * Lq], naive_lse[Hq * Lq], got_lse[Hq * Lq];
        char err[512];
        ck_assert_msg(oracle_forward(&p, ref, ref_lse, err, sizeof err) == 0, "%s", err);
        ck_assert_msg(oracle_forward_naive(&p, naive, naive_lse, err, sizeof err) == 0, "%s", err);
        for (int h = 0, n = 0; h < Hq; h++)
            for (int i = 0; i < Lq; i++, n++) {
                for (int d = 0; d < D; d++)
                    got[n * D + d] = oracle_load(&out.t, 0, h, i, d);
                got_lse[n] = oracle_load(&lse.t, 0, h, i, 0);
            }
        tol_report tr;
        ck_assert_msg(tol_compare(FLEX_F32, TOL_OUTPUT, ref, naive, got, Hq * Lq * D, 0.0, &tr),
                      "run %d: %s", r, tr.why);
        ck_assert_msg(
            tol_compare(FLEX_F32, TOL_LSE, ref_lse, naive_lse, got_lse, Hq * Lq, 0.0, &tr),
            "run %d lse: %s", r, tr.why);
        free(out.mem), free(lse.mem);
    }
    mods_free(&m);
    free(q.mem), free(k.mem), free(v.mem);
    flex_context_destroy(ctx);
}
END_TEST

/* ---- the LSE merge ---- */

START_TEST(test_lse_merge) {
    /* A row of 40 scores over values cut into pieces of varying lengths
     * (one empty) merges to the row's result computed whole in double. */
    enum { N = 40, DV = 3 };
    double score[N], val[N][DV];
    rng_state = 11;
    for (int j = 0; j < N; j++) {
        score[j] = rnd_normalish() * 3.0;
        for (int c = 0; c < DV; c++)
            val[j][c] = rnd_normalish();
    }
    static const int cuts[] = {0, 7, 7, 20, 39, 40};
    enum { PIECES = 5 };
    float lse_s[PIECES], out_s[PIECES][DV];
    for (int s = 0; s < PIECES; s++) {
        double mx = -INFINITY, sum = 0, acc[DV] = {0};
        for (int j = cuts[s]; j < cuts[s + 1]; j++)
            mx = score[j] > mx ? score[j] : mx;
        for (int j = cuts[s]; j < cuts[s + 1]; j++) {
            double p = exp(score[j] - mx);
            sum += p;
            for (int c = 0; c < DV; c++)
                acc[c] += p * val[j][c];
        }
        lse_s[s] = sum > 0 ? (float)(mx + log(sum)) : -INFINITY;
        for (int c = 0; c < DV; c++)
            out_s[s][c] = sum > 0 ? (float)(acc[c] / sum) : 0.0f;
    }
    double mx = -INFINITY, sum = 0, whole[DV] = {0};
    for (int j = 0; j < N; j++)
        mx = score[j] > mx ? score[j] : mx;
    for (int j = 0; j < N; j++) {
        sum += exp(score[j] - mx);
        for (int c = 0; c < DV; c++)
            whole[c] += exp(score[j] - mx) * val[j][c];
    }
    float max = -INFINITY, wsum = 0.0f, acc[DV] = {0};
    for (int s = 0; s < PIECES; s++)
        max = flex_lse_merge_max(max, lse_s[s]);
    for (int s = 0; s < PIECES; s++) {
        float w = flex_lse_merge_weight(lse_s[s], max);
        wsum += w;
        for (int c = 0; c < DV; c++)
            acc[c] += w * out_s[s][c];
    }
    ck_assert_double_eq_tol(flex_lse_merge_lse(max, wsum), mx + log(sum), 1e-5);
    for (int c = 0; c < DV; c++)
        ck_assert_double_eq_tol(acc[c] * flex_lse_merge_inverse(wsum), whole[c] / sum, 1e-5);

    /* Only empty pieces: out 0, lse -inf. A NaN piece: NaN. One piece: itself. */
    ck_assert_float_eq(flex_lse_merge_weight(-INFINITY, -INFINITY), 0.0f);
    ck_assert(flex_lse_merge_lse(-INFINITY, 0.0f) == -INFINITY);
    ck_assert_float_eq(flex_lse_merge_inverse(0.0f), 0.0f);
    ck_assert(isnan(flex_lse_merge_weight(NAN, 1.0f)));
    ck_assert(isnan(flex_lse_merge_lse(1.0f, 1.0f + NAN)));
    float one = flex_lse_merge_weight(lse_s[0], flex_lse_merge_max(-INFINITY, lse_s[0]));
    ck_assert(one == 1.0f);
    ck_assert(flex_lse_merge_lse(lse_s[0], one) == lse_s[0]);
}
END_TEST

static Suite *decode_suite(void) {
    Suite *s = suite_create("decode");
    TCase *tc = tcase_create("decode");
    tcase_set_timeout(tc, 600);
    tcase_add_loop_test(tc, test_steps, 0, (int)(sizeof step_cases / sizeof step_cases[0]));
    tcase_add_test(tc, test_paged_equals_contiguous);
    tcase_add_test(tc, test_bad_input);
    tcase_add_test(tc, test_backward_unsupported);
    tcase_add_test(tc, test_lse_merge);
    tcase_add_test(tc, test_plain_short_query);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(decode_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
