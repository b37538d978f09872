/*
 * The CPU forward (tiled and reference paths) against the fp64 oracle.
 *
 * Every case fills q, k, v with fixed pseudo-random values in the case's
 * dtype and layout, poisons out and lse with NaN, runs flex_attention on a
 * "cpu" context and compares out and lse with the oracle run on the very
 * same (already rounded) inputs. The matrix covers each axis separately
 * (dtypes, odd lengths, Q_LEN != KV_LEN, GQA, head dims, Dv != D, mask
 * broadcast, per-head masks, strided views, block sizes, tile hints) rather
 * than their full product, to stay fast under sanitizers.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "plan.h"
#include "softmax.h"
#include "oracle.h"
#include "tolerance.h"

enum { LAYOUT_BHSD = 0, LAYOUT_BSHD = 1, LAYOUT_PADDED = 2, LAYOUT_STRIDED_D = 3 };

typedef struct fcase {
    const char *name;
    const char *mask;  /* preset name, "=" followed by mod text, or NULL */
    const char *score; /* same */
    int B, Hq, Hkv, Lq, Lkv, D, Dv;
    flex_dtype dtype;
    int layout;
    int mask_per_head; /* block mask built for (B, Hq) instead of (1, 1) */
    int reference;     /* the plain reference path */
    int no_lse;
    int q_block, kv_block; /* 0 = 128 */
    int q_tile, kv_tile;   /* kernel hints, 0 = plan */
} fcase;

/* ---- inputs ---- */

static uint64_t rng_state;

static double rnd_normalish(void) {
    /* Sum of four uniforms, centred: a cheap bell shape, fully deterministic. */
    double s = 0.0;
    for (int i = 0; i < 4; i++) {
        rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
        s += (double)(rng_state >> 11) / 9007199254740992.0;
    }
    return (s - 2.0) * 1.7;
}

typedef struct host_tensor {
    void *mem;
    flex_tensor t;
} host_tensor;

static void store_value(flex_tensor *t, int64_t off, double v) {
    flex_store_from_float(t->data, t->dtype, off, (float)v);
}

/* A (B, H, S, D) tensor in the given layout; poisoned with 0xff bytes. */
static host_tensor make_tensor(flex_dtype dt, int layout, int64_t B, int64_t H, int64_t S,
                               int64_t D) {
    host_tensor h;
    memset(&h, 0, sizeof h);
    int64_t st[4];
    switch (layout) {
    case LAYOUT_BSHD:
        st[3] = 1, st[2] = H * D, st[1] = D, st[0] = S * H * D;
        break;
    case LAYOUT_PADDED: /* BSHD rows with gaps everywhere */
        st[3] = 1, st[1] = D + 3, st[2] = H * (D + 3) + 5, st[0] = S * st[2] + 11;
        break;
    case LAYOUT_STRIDED_D: /* every other element of BHSD memory */
        st[3] = 2, st[2] = 2 * D, st[1] = S * 2 * D, st[0] = H * S * 2 * D;
        break;
    default:
        st[3] = 1, st[2] = D, st[1] = S * D, st[0] = H * S * D;
        break;
    }
    int64_t span = 1 + (B - 1) * st[0] + (H - 1) * st[1] + (S - 1) * st[2] + (D - 1) * st[3];
    size_t bytes = (size_t)span * flex_dtype_size(dt);
    h.mem = malloc(bytes ? bytes : 1);
    ck_assert_ptr_nonnull(h.mem);
    memset(h.mem, 0xff, bytes);
    h.t.data = h.mem;
    h.t.dtype = dt;
    h.t.ndim = 4;
    h.t.sizes[0] = B, h.t.sizes[1] = H, h.t.sizes[2] = S, h.t.sizes[3] = D;
    for (int i = 0; i < 4; i++)
        h.t.strides[i] = st[i];
    h.t.device = FLEX_DEVICE_CPU;
    return h;
}

static void fill_random(host_tensor *h) {
    flex_tensor *t = &h->t;
    for (int64_t a = 0; a < t->sizes[0]; a++)
        for (int64_t b = 0; b < t->sizes[1]; b++)
            for (int64_t c = 0; c < t->sizes[2]; c++)
                for (int64_t d = 0; d < t->sizes[3]; d++)
                    store_value(t,
                                a * t->strides[0] + b * t->strides[1] + c * t->strides[2] +
                                    d * t->strides[3],
                                rnd_normalish());
}

/* ---- mods and their buffers ---- */

typedef struct mod_data {
    int32_t *doc, *seq, *off, *img_of, *intervals;
    float *slopes, *bias;
} mod_data;

static void mod_data_free(mod_data *md) {
    free(md->doc);
    free(md->seq);
    free(md->off);
    free(md->img_of);
    free(md->intervals);
    free(md->slopes);
    free(md->bias);
    memset(md, 0, sizeof *md);
}

static int mod_has_buffer(const flex_mod *m, const char *name) {
    for (int i = 0; i < m->ir.num_buffers; i++)
        if (strcmp(m->ir.buffers[i].name, name) == 0) return 1;
    return 0;
}

static void bind1(flex_context *ctx, flex_mod *m, const char *name, void *data, flex_dtype dt,
                  int ndim, int64_t n0, int64_t n1) {
    int64_t sizes[2] = {n0, n1};
    flex_tensor t = flex_tensor_contiguous(data, dt, ndim, sizes, FLEX_DEVICE_CPU);
    flex_status st = flex_mod_bind_buffer(ctx, m, name, &t);
    ck_assert_msg(st == FLEX_OK, "bind %s: %s", name, flex_error_message(ctx));
}

/* Binds every buffer the seed presets use, with data that makes them bite:
 * documents of uneven lengths, packed sequences, ALiBi slopes, images with
 * text intervals, a relative bias indexed by q - kv. */
static void bind_buffers(flex_context *ctx, flex_mod *m, mod_data *md, int Hq, int Lq, int Lkv) {
    int L = Lq > Lkv ? Lq : Lkv;
    static const int doc_lengths[] = {37, 90, 13, 64, 5, 128, 41};
    if (mod_has_buffer(m, "doc")) {
        if (!md->doc) {
            md->doc = malloc((size_t)L * sizeof(int32_t));
            for (int i = 0, d = 0, left = doc_lengths[0]; i < L; i++) {
                if (left == 0) d++, left = doc_lengths[d % 7];
                md->doc[i] = d;
                left--;
            }
        }
        bind1(ctx, m, "doc", md->doc, FLEX_I32, 1, L, 0);
    }
    if (mod_has_buffer(m, "seq")) {
        if (!md->seq) {
            md->seq = malloc((size_t)L * sizeof(int32_t));
            md->off = malloc((size_t)(L + 1) * sizeof(int32_t));
            int n = 0;
            for (int i = 0, left = 0; i < L; i++) {
                if (left == 0) md->off[n++] = i, left = doc_lengths[n % 7];
                md->seq[i] = n - 1;
                left--;
            }
            md->off[n] = L;
        }
        bind1(ctx, m, "seq", md->seq, FLEX_I32, 1, L, 0);
        bind1(ctx, m, "off", md->off, FLEX_I32, 1, L + 1, 0);
    }
    if (mod_has_buffer(m, "slopes")) {
        if (!md->slopes) {
            md->slopes = malloc((size_t)Hq * sizeof(float));
            for (int h = 0; h < Hq; h++)
                md->slopes[h] = (float)exp2(-8.0 * (h + 1) / Hq);
        }
        bind1(ctx, m, "slopes", md->slopes, FLEX_F32, 1, Hq, 0);
    }
    if (mod_has_buffer(m, "img_of")) {
        int per_image = 16, images = (Lkv + per_image - 1) / per_image;
        if (!md->img_of) {
            md->img_of = malloc((size_t)Lkv * sizeof(int32_t));
            md->intervals = malloc((size_t)images * 2 * sizeof(int32_t));
            for (int j = 0; j < Lkv; j++)
                md->img_of[j] = j / per_image;
            for (int i = 0; i < images; i++) {
                md->intervals[2 * i] = (int32_t)((int64_t)i * Lq / images);
                md->intervals[2 * i + 1] = (int32_t)((int64_t)(i + 2) * Lq / images);
            }
        }
        bind1(ctx, m, "img_of", md->img_of, FLEX_I32, 1, Lkv, 0);
        bind1(ctx, m, "intervals", md->intervals, FLEX_I32, 2, images, 2);
    }
    if (mod_has_buffer(m, "bias")) {
        if (!md->bias) {
            md->bias = malloc((size_t)Lq * sizeof(float));
            for (int i = 0; i < Lq; i++)
                md->bias[i] = (float)(0.01 * i) - 0.5f;
        }
        bind1(ctx, m, "bias", md->bias, FLEX_F32, 1, Lq, 0);
    }
}

/* Small-size overrides so every preset's params make a visible pattern at
 * the test sizes. */
static int preset_overrides(const char *name, flex_param *p) {
    if (!strcmp(name, "sliding_window") || !strcmp(name, "sliding_window_bidirectional")) {
        p[0] = (flex_param){"W", 0, 20};
        return 1;
    }
    if (!strcmp(name, "prefix_lm")) {
        p[0] = (flex_param){"P", 0, 30};
        return 1;
    }
    if (!strcmp(name, "sasa")) {
        p[0] = (flex_param){"IW", 0, 10};
        p[1] = (flex_param){"WIN", 0, 2};
        return 2;
    }
    if (!strcmp(name, "natten")) {
        p[0] = (flex_param){"IH", 0, 10};
        p[1] = (flex_param){"IW", 0, 10};
        p[2] = (flex_param){"KH", 0, 3};
        p[3] = (flex_param){"KW", 0, 5};
        return 4;
    }
    if (!strcmp(name, "alibi_functional")) {
        p[0] = (flex_param){"NH", 0, 4};
        return 1;
    }
    if (!strcmp(name, "softcap") || !strcmp(name, "softcap_approx")) {
        p[0] = (flex_param){"C", 1, 0.8};
        return 1;
    }
    return 0;
}

static const flex_buffer_decl bias_decl[] = {{"bias", FLEX_F32, 1}};

static flex_mod *compile_spec(flex_context *ctx, const char *spec, flex_mod_kind kind) {
    flex_mod *m = NULL;
    flex_status st;
    if (spec[0] == '=') {
        flex_mod_desc desc = {kind, spec + 1, NULL, 0, NULL, 0};
        if (strstr(spec, "bias[")) desc.buffers = bias_decl, desc.num_buffers = 1;
        st = flex_mod_compile(ctx, &desc, &m);
    } else {
        flex_param ov[4];
        int n = preset_overrides(spec, ov);
        st = flex_preset_compile(ctx, spec, ov, n, &m);
    }
    ck_assert_msg(st == FLEX_OK, "compile '%s': %s", spec, flex_error_message(ctx));
    ck_assert_int_eq(flex_mod_get_kind(m), kind);
    return m;
}

/* ---- one case ---- */

typedef struct case_run {
    flex_context *ctx;
    host_tensor q, k, v, out, lse;
    flex_mod *score, *mask_mod;
    flex_block_mask *mask;
    mod_data md;
} case_run;

/* The reference path is a setting of the context, read from FLEXATTN_DEBUG
 * when it is created; the switches a test already set there are kept. */
static flex_status create_context(int reference, flex_context **ctx) {
    const char *outer = getenv("FLEXATTN_DEBUG");
    char saved[256] = "", with_reference[300];
    if (outer) snprintf(saved, sizeof saved, "%s", outer);
    if (reference) {
        snprintf(with_reference, sizeof with_reference, "%s%scpu_reference=1", saved,
                 saved[0] ? "," : "");
        setenv("FLEXATTN_DEBUG", with_reference, 1);
    }
    flex_status st = flex_context_create("cpu", ctx);
    if (outer)
        setenv("FLEXATTN_DEBUG", saved, 1);
    else
        unsetenv("FLEXATTN_DEBUG");
    return st;
}

static void case_setup(case_run *r, const fcase *c) {
    memset(r, 0, sizeof *r);
    flex_status st = create_context(c->reference, &r->ctx);
    ck_assert_msg(st == FLEX_OK, "context: %s", flex_error_message(NULL));
    rng_state = 0x9e3779b97f4a7c15ull ^ (uint64_t)(c->Lq * 131 + c->Lkv * 7 + c->D);
    r->q = make_tensor(c->dtype, c->layout, c->B, c->Hq, c->Lq, c->D);
    r->k = make_tensor(c->dtype, c->layout, c->B, c->Hkv, c->Lkv, c->D);
    r->v = make_tensor(c->dtype, c->layout, c->B, c->Hkv, c->Lkv, c->Dv);
    r->out = make_tensor(c->dtype, c->layout, c->B, c->Hq, c->Lq, c->Dv);
    fill_random(&r->q);
    fill_random(&r->k);
    fill_random(&r->v);
    r->lse = make_tensor(FLEX_F32, LAYOUT_BHSD, c->B, c->Hq, c->Lq, 1);
    if (c->score) {
        r->score = compile_spec(r->ctx, c->score, FLEX_MOD_SCORE);
        bind_buffers(r->ctx, r->score, &r->md, c->Hq, c->Lq, c->Lkv);
    }
    if (c->mask) {
        r->mask_mod = compile_spec(r->ctx, c->mask, FLEX_MOD_MASK);
        bind_buffers(r->ctx, r->mask_mod, &r->md, c->Hq, c->Lq, c->Lkv);
        int64_t mb = c->mask_per_head ? c->B : 1, mh = c->mask_per_head ? c->Hq : 1;
        st = flex_block_mask_create(r->ctx, r->mask_mod, mb, mh, c->Lq, c->Lkv, c->q_block,
                                    c->kv_block, &r->mask);
        ck_assert_msg(st == FLEX_OK, "block mask: %s", flex_error_message(r->ctx));
    }
}

static void case_teardown(case_run *r) {
    flex_block_mask_destroy(r->mask);
    flex_mod_destroy(r->mask_mod);
    flex_mod_destroy(r->score);
    mod_data_free(&r->md);
    free(r->q.mem);
    free(r->k.mem);
    free(r->v.mem);
    free(r->out.mem);
    free(r->lse.mem);
    flex_context_destroy(r->ctx);
}

static flex_status case_attention(case_run *r, const fcase *c) {
    flex_attention_options opts;
    memset(&opts, 0, sizeof opts);
    opts.q_tile = c->q_tile;
    opts.kv_tile = c->kv_tile;
    return flex_attention(r->ctx, &r->q.t, &r->k.t, &r->v.t, r->score, r->mask, &opts, &r->out.t,
                          c->no_lse ? NULL : &r->lse.t);
}

static void run_case(const fcase *c) {
    case_run r;
    case_setup(&r, c);
    flex_status st = case_attention(&r, c);
    ck_assert_msg(st == FLEX_OK, "%s: flex_attention: %s", c->name, flex_error_message(r.ctx));

    size_t rows = (size_t)c->B * c->Hq * c->Lq;
    double *ref = malloc(rows * (size_t)c->Dv * sizeof(double));
    double *ref_lse = malloc(rows * sizeof(double));
    double *got = malloc(rows * (size_t)c->Dv * sizeof(double));
    double *got_lse = malloc(rows * sizeof(double));
    oracle_problem p;
    memset(&p, 0, sizeof p);
    p.ctx = r.ctx;
    p.q = r.q.t, p.k = r.k.t, p.v = r.v.t;
    p.score_mod = r.score;
    p.mask_mod = r.mask_mod;
    char err[512];
    ck_assert_msg(oracle_forward(&p, ref, ref_lse, err, sizeof err) == 0, "oracle: %s", err);

    size_t n = 0;
    for (int b = 0; b < c->B; b++)
        for (int h = 0; h < c->Hq; h++)
            for (int i = 0; i < c->Lq; i++, n++) {
                for (int d = 0; d < c->Dv; d++) {
                    double v = oracle_load(&r.out.t, b, h, i, d);
                    got[n * c->Dv + d] = v;
                    ck_assert_msg(!isnan(v), "%s: out[%d][%d][%d][%d] is NaN (unwritten?)", c->name,
                                  b, h, i, d);
                    if (ref_lse[n] == -INFINITY)
                        ck_assert_msg(v == 0.0, "%s: fully masked row %d gives %g, not 0", c->name,
                                      i, v);
                }
                got_lse[n] = oracle_load(&r.lse.t, b, h, i, 0);
            }
    double *naive = malloc(rows * (size_t)c->Dv * sizeof(double));
    double *naive_lse = malloc(rows * sizeof(double));
    ck_assert_msg(oracle_forward_naive(&p, naive, naive_lse, err, sizeof err) == 0, "naive: %s",
                  err);
    tol_report out_r, lse_r;
    int out_ok = tol_compare(c->dtype, TOL_OUTPUT, ref, naive, got, rows * (size_t)c->Dv, 0.0,
                             &out_r);
    int lse_ok = c->no_lse || tol_compare(c->dtype, TOL_LSE, ref_lse, naive_lse, got_lse, rows,
                                          0.0, &lse_r);
    if (getenv("FLEXATTN_TEST_VERBOSE"))
        fprintf(stderr, "%-40s out %.2f lse %.2f of bound\n", c->name, tol_margin(&out_r),
                c->no_lse ? 0.0 : tol_margin(&lse_r));
    ck_assert_msg(out_ok, "%s: %s", c->name, out_r.why);
    if (!c->no_lse) {
        ck_assert_msg(lse_ok, "%s: %s", c->name, lse_r.why);
    } else {
        /* lse was not asked for: its poison must be untouched. */
        ck_assert(isnan(got_lse[0]));
    }
    free(naive);
    free(naive_lse);
    free(ref);
    free(ref_lse);
    free(got);
    free(got_lse);
    case_teardown(&r);
}

/* ---- the matrix ---- */

#define F32  FLEX_F32
#define F16  FLEX_F16
#define BF16 FLEX_BF16

static const fcase shape_cases[] = {
    /* name, mask, score, B, Hq, Hkv, Lq, Lkv, D, Dv, dtype, layout, per_head, ref, no_lse, qb, kb,
       qt, kt */
    {"len1", NULL, NULL, 1, 2, 2, 1, 1, 64, 64, F32, 0, 0, 0, 0, 0, 0, 0, 0},
    {"len17 causal", "causal", NULL, 1, 2, 2, 17, 17, 64, 64, F32, 0, 0, 0, 0, 0, 0, 0, 0},
    {"len257 causal", "causal", NULL, 1, 1, 1, 257, 257, 64, 64, F32, 0, 0, 0, 0, 0, 0, 0, 0},
    {"len257 noop ref", NULL, NULL, 1, 1, 1, 257, 257, 32, 32, F32, 0, 0, 1, 0, 0, 0, 0, 0},
    {"q1 kv300 decode", NULL, "alibi", 1, 4, 4, 1, 300, 64, 64, F32, 0, 0, 0, 0, 0, 0, 0, 0},
    {"q17 kv100", "prefix_lm", NULL, 1, 2, 2, 17, 100, 64, 64, F32, 0, 0, 0, 0, 0, 0, 0, 0},
    {"q257 kv33 causal", "causal", NULL, 1, 2, 2, 257, 33, 16, 16, F32, 0, 0, 0, 0, 32, 16, 0, 0},
    {"q100 kv257 f16", "sliding_window_bidirectional", NULL, 1, 2, 2, 100, 257, 64, 64, F16, 0, 0,
     0, 0, 0, 0, 0, 0},
    {"gqa 4:1", "causal", "softcap", 1, 8, 2, 100, 100, 64, 64, F32, 0, 0, 0, 0, 0, 0, 0, 0},
    {"gqa 8:1 bf16", "sliding_window", NULL, 2, 8, 1, 70, 90, 64, 64, BF16, 0, 0, 0, 0, 0, 0, 0, 0},
    {"gqa 8:1 ref", "causal", NULL, 1, 8, 1, 40, 40, 32, 32, F32, 0, 0, 1, 0, 0, 0, 0, 0},
    {"D16", "causal", NULL, 1, 2, 2, 100, 100, 16, 16, F32, 0, 0, 0, 0, 0, 0, 0, 0},
    {"D80", "causal", "alibi", 1, 2, 2, 100, 100, 80, 80, F32, 0, 0, 0, 0, 0, 0, 0, 0},
    {"D128", NULL, NULL, 1, 2, 2, 150, 150, 128, 128, F32, 0, 0, 0, 0, 0, 0, 0, 0},
    {"D256 bf16", "causal", NULL, 1, 2, 2, 100, 100, 256, 256, BF16, 0, 0, 0, 0, 0, 0, 0, 0},
    {"D256 f32", NULL, "checkerboard", 1, 1, 1, 64, 130, 256, 256, F32, 0, 0, 0, 0, 0, 0, 0, 0},
    {"D64 Dv32", "causal", NULL, 1, 2, 2, 100, 100, 64, 32, F32, 0, 0, 0, 0, 0, 0, 0, 0},
    {"D80 Dv48 f16", NULL, NULL, 1, 2, 2, 60, 77, 80, 48, F16, 0, 0, 0, 0, 0, 0, 0, 0},
    {"D16 Dv128", "document_causal", NULL, 1, 2, 2, 100, 100, 16, 128, F32, 0, 0, 0, 0, 0, 0, 0, 0},
    {"D64 Dv40 ref", "causal", "alibi", 1, 2, 1, 50, 60, 64, 40, F32, 0, 0, 1, 0, 0, 0, 0, 0},
    {"mask broadcast B2 H4", "document_causal", "alibi", 2, 4, 4, 130, 130, 32, 32, F32, 0, 0, 0, 0,
     0, 0, 0, 0},
    {"mask per head", "=q + h * 9 >= kv && kv + 40 + b * 7 >= q", NULL, 2, 4, 2, 130, 130, 32, 32,
     F32, 0, 1, 0, 0, 32, 32, 0, 0},
    {"mask per head ref", "=q + h * 9 >= kv && kv + 40 + b * 7 >= q", NULL, 2, 4, 2, 70, 70, 32, 32,
     F32, 0, 1, 1, 0, 16, 32, 0, 0},
    {"bshd", "causal", "alibi", 2, 4, 2, 100, 100, 64, 64, F32, LAYOUT_BSHD, 0, 0, 0, 0, 0, 0, 0},
    {"padded f16", "document", NULL, 1, 4, 2, 100, 120, 48, 40, F16, LAYOUT_PADDED, 0, 0, 0, 0, 0,
     0, 0},
    {"padded bf16 ref", "causal", NULL, 1, 2, 2, 50, 50, 32, 32, BF16, LAYOUT_PADDED, 0, 1, 0, 0, 0,
     0, 0},
    {"strided D", "causal", "softcap", 1, 2, 1, 90, 90, 64, 64, F32, LAYOUT_STRIDED_D, 0, 0, 0, 0,
     0, 0, 0},
    {"no lse", "causal", NULL, 1, 2, 2, 100, 100, 64, 64, F32, 0, 0, 0, 1, 0, 0, 0, 0},
    {"no lse ref", "causal", NULL, 1, 2, 2, 40, 40, 64, 64, F32, 0, 0, 1, 1, 0, 0, 0, 0},
    {"blocks 16x32", "sliding_window", "alibi", 1, 2, 2, 150, 150, 64, 64, F32, 0, 0, 0, 0, 16, 32,
     0, 0},
    {"blocks 256x64", "natten", NULL, 1, 2, 2, 300, 300, 32, 32, F32, 0, 0, 0, 0, 256, 64, 0, 0},
    {"tile hints 16/32", "causal", NULL, 1, 2, 2, 200, 200, 64, 64, F32, 0, 0, 0, 0, 0, 0, 16, 32},
    {"fully masked rows", "=q >= 50 && kv <= q", NULL, 1, 2, 2, 100, 100, 32, 32, F32, 0, 0, 0, 0,
     0, 0, 0, 0},
    {"fully masked rows ref", "=q >= 50 && kv <= q", NULL, 1, 2, 2, 100, 100, 32, 32, F32, 0, 0, 1,
     0, 0, 0, 0, 0},
    {"-inf score rows", NULL, "=where(q % 3 == 0, -inf, score)", 1, 2, 2, 40, 50, 32, 32, F32, 0, 0,
     0, 0, 0, 0, 0, 0},
    {"-inf score rows ref", NULL, "=where(q % 3 == 0, -inf, score)", 1, 2, 2, 40, 50, 32, 32, F32,
     0, 0, 1, 0, 0, 0, 0, 0},
    {"-inf score bf16", "causal", "causal_score", 1, 2, 2, 100, 100, 32, 32, BF16, 0, 0, 0, 0, 0, 0,
     0, 0},
    /* The score mod's bias read is out of range only above the diagonal,
     * where the mask removes the element: not an error. */
    {"bias in masked part", "causal", "=score + bias[q - kv]", 1, 2, 2, 150, 150, 32, 32, F32, 0, 0,
     0, 0, 0, 0, 0, 0},
    {"bias in masked part ref", "causal", "=score + bias[q - kv]", 1, 2, 2, 100, 100, 32, 32, F32,
     0, 0, 1, 0, 0, 0, 0, 0},
    /* Subnormal arithmetic in mods: (q - kv) * 1e-40 is subnormal, and
     * exact, for every pair here; kernels that flushed it to zero (or read
     * the constant as 0) disagreed with the block mask's diagonal blocks. */
    {"subnormal mask constants", "=float(q - kv) * 1e-40 >= 1e-40", NULL, 1, 1, 1, 64, 64, 4, 4,
     F32, 0, 0, 0, 0, 16, 16, 0, 0},
    {"subnormal mask constants ref", "=float(q - kv) * 1e-40 >= 1e-40", NULL, 1, 1, 1, 64, 64, 4,
     4, F32, 0, 0, 1, 0, 16, 16, 0, 0},
    {"subnormal score constants", NULL,
     "=where(float(q - kv) * 1e-40 >= 1e-40, score * 3.0, score + float(kv) * 1e-41 * 1e38)", 1, 2,
     2, 70, 70, 16, 16, F32, 0, 0, 0, 0, 0, 0, 0, 0},
};

/* Several cases per test: each test is a forked process with its own
 * leak check, which dominates the run time under sanitizers. */
enum { SHAPES_PER_TEST = 4 };
#define NUM_SHAPE_CASES ((int)(sizeof shape_cases / sizeof shape_cases[0]))

START_TEST(test_shapes) {
    for (int i = _i * SHAPES_PER_TEST; i < (_i + 1) * SHAPES_PER_TEST && i < NUM_SHAPE_CASES; i++)
        run_case(&shape_cases[i]);
}
END_TEST

/* Every preset at f32, f16 and bf16, on the tiled and the reference path. */
static void preset_case(int preset, int dt, int reference) {
    const flex_preset *p = flex_preset_at(preset);
    ck_assert_ptr_nonnull(p);
    static const flex_dtype dts[] = {FLEX_F32, FLEX_F16, FLEX_BF16};
    char name[128];
    snprintf(name, sizeof name, "preset %s %s%s", p->name, flex_dtype_name(dts[dt]),
             reference ? " ref" : "");
    fcase c = {name,    NULL, NULL, 1,         2, 2, 100, 100, 64, 64,
               dts[dt], 0,    0,    reference, 0, 0, 0,   0,   0};
    if (reference) c.Lq = c.Lkv = 70;
    if (p->kind == FLEX_MOD_MASK)
        c.mask = p->name;
    else
        c.score = p->name;
    /* A q-block size below the sequence so partial and full blocks mix. */
    c.q_block = 32;
    c.kv_block = 32;
    run_case(&c);
}

START_TEST(test_presets) {
    for (int variant = 0; variant < 6; variant++)
        preset_case(_i, variant / 2, variant % 2);
}
END_TEST

/* ---- errors ---- */

/* A buffer shorter than the sequence: the forward must stop with
 * FLEX_ERR_BUFFER_BOUNDS and a message naming the buffer. */
static void bounds_case(int reference, int in_score) {
    fcase c = {"bounds",
               in_score ? "causal" : "document_causal",
               in_score ? "alibi" : NULL,
               1,
               4,
               4,
               100,
               100,
               32,
               32,
               F32,
               0,
               0,
               reference,
               0,
               32,
               32,
               0,
               0};
    case_run r;
    case_setup(&r, &c);
    int32_t short_doc[40];
    float short_slopes[2] = {0.5f, 0.25f};
    for (int i = 0; i < 40; i++)
        short_doc[i] = i / 10;
    if (in_score)
        bind1(r.ctx, r.score, "slopes", short_slopes, FLEX_F32, 1, 2, 0);
    else
        bind1(r.ctx, r.mask_mod, "doc", short_doc, FLEX_I32, 1, 40, 0);
    flex_status st = case_attention(&r, &c);
    ck_assert_msg(st == FLEX_ERR_BUFFER_BOUNDS, "got %s: %s", flex_status_name(st),
                  flex_error_message(r.ctx));
    const char *msg = flex_error_message(r.ctx);
    ck_assert_msg(strstr(msg, in_score ? "slopes" : "doc") != NULL, "message: %s", msg);
    case_teardown(&r);
}

START_TEST(test_bounds_mask_tiled) {
    bounds_case(0, 0);
}
END_TEST

START_TEST(test_bounds_mask_reference) {
    bounds_case(1, 0);
}
END_TEST

START_TEST(test_bounds_score_tiled) {
    bounds_case(0, 1);
}
END_TEST

START_TEST(test_bounds_score_reference) {
    bounds_case(1, 1);
}
END_TEST

/* Both micro-kernel families give the same answer as the oracle. */
START_TEST(test_portable_kernels) {
    setenv("FLEXATTN_DEBUG", "cpu_simd=portable", 1);
    fcase c = {"portable kernels",
               "sliding_window",
               "softcap",
               1,
               2,
               1,
               150,
               130,
               80,
               48,
               F32,
               0,
               0,
               0,
               0,
               64,
               32,
               0,
               0};
    run_case(&c);
    fcase c2 = {"portable kernels f16",
                "causal",
                NULL,
                1,
                2,
                2,
                90,
                90,
                64,
                64,
                F16,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0};
    run_case(&c2);
    unsetenv("FLEXATTN_DEBUG");
}
END_TEST

/* ---- NaN propagation (PyTorch's rule) ----
 *
 * A row with a kept score that is NaN or +inf gives NaN output and NaN LSE;
 * -inf scores and masked elements are removed, whatever their value. Each
 * case plants one such score (through q, k or the score mod) and says which
 * rows it must poison; every other row must stay finite and match the
 * oracle. Lq = Lkv = 300 with the default 128-wide tiles puts key 200 in
 * the second kv tile, after a finite running max, and key 1 in the first. */

enum { POISON_NONE, POISON_Q_NAN, POISON_K_INF_1, POISON_K_INF_200 };

typedef struct nan_case {
    const char *name;
    const char *mask, *score; /* specs as in fcase */
    int poison;
    /* Whether row (h, i) must be NaN; r gives the inputs. */
    int (*nan_row)(const case_run *r, int h, int i);
} nan_case;

static int row_q5_head0(const case_run *r, int h, int i) {
    (void)r;
    return h == 0 && i == 5;
}
/* q . k[kv] is +inf where q[0] > 0 (k[kv][0] = +inf, the rest finite), -inf
 * (a removed key) where q[0] < 0; causal rows reach kv from row kv on. */
static int row_sees_inf_key(const case_run *r, int h, int i, int kv) {
    return i >= kv && oracle_load(&r->q.t, 0, h, i, 0) > 0.0;
}
static int row_k_inf_1(const case_run *r, int h, int i) {
    return row_sees_inf_key(r, h, i, 1);
}
static int row_k_inf_200(const case_run *r, int h, int i) {
    return row_sees_inf_key(r, h, i, 200);
}
static int row_3(const case_run *r, int h, int i) {
    (void)r, (void)h;
    return i == 3;
}
static int row_250(const case_run *r, int h, int i) {
    (void)r, (void)h;
    return i == 250;
}
static int row_7(const case_run *r, int h, int i) {
    (void)r, (void)h;
    return i == 7;
}
static int row_none(const case_run *r, int h, int i) {
    (void)r, (void)h, (void)i;
    return 0;
}

static const nan_case nan_cases[] = {
    {"NaN in q", "causal", NULL, POISON_Q_NAN, row_q5_head0},
    {"inf in k, first tile", "causal", NULL, POISON_K_INF_1, row_k_inf_1},
    {"inf in k, second tile", "causal", NULL, POISON_K_INF_200, row_k_inf_200},
    {"score mod +inf", NULL, "=where(q == 3 && kv == 1, inf, score)", POISON_NONE, row_3},
    {"score mod +inf, second tile", "causal", "=where(q == 250 && kv == 200, inf, score)",
     POISON_NONE, row_250},
    {"score mod sqrt(-1)", NULL, "=score + where(q == 7 && kv == 290, sqrt(-1), 0.0)", POISON_NONE,
     row_7},
    {"NaN and +inf where the mask removes them", "causal",
     "=where(kv > q, where(kv % 2 == 0, sqrt(-1), inf), score)", POISON_NONE, row_none},
    {"NaN in a removed row element, -inf kept", "=kv != 4", "=where(kv == 4, sqrt(-1), score)",
     POISON_NONE, row_none},
};
enum { NAN_PATHS = 3 }; /* tiled (best kernels), tiled portable kernels, reference */

static void run_nan_case(const nan_case *nc, int path) {
    fcase c = {.name = nc->name, .mask = nc->mask, .score = nc->score, .B = 1, .Hq = 2, .Hkv = 1,
               .Lq = 300, .Lkv = 300, .D = 32, .Dv = 32, .dtype = F32, .reference = path == 2};
    if (path == 1)
        setenv("FLEXATTN_CPU_SIMD", "portable", 1);
    else
        unsetenv("FLEXATTN_CPU_SIMD");
    case_run r;
    case_setup(&r, &c);
    float *q = r.q.mem, *k = r.k.mem;
    if (nc->poison == POISON_Q_NAN) q[(size_t)5 * c.D + 3] = NAN; /* head 0, row 5 */
    if (nc->poison == POISON_K_INF_1) k[(size_t)1 * c.D] = INFINITY;
    if (nc->poison == POISON_K_INF_200) k[(size_t)200 * c.D] = INFINITY;
    flex_status st = case_attention(&r, &c);
    unsetenv("FLEXATTN_CPU_SIMD");
    ck_assert_msg(st == FLEX_OK, "%s: %s", nc->name, flex_error_message(r.ctx));

    size_t rows = (size_t)c.Hq * c.Lq;
    double *ref = malloc(rows * (size_t)c.Dv * sizeof(double));
    double *ref_lse = malloc(rows * sizeof(double));
    oracle_problem p;
    memset(&p, 0, sizeof p);
    p.q = r.q.t, p.k = r.k.t, p.v = r.v.t;
    p.score_mod = r.score;
    p.mask_mod = r.mask_mod;
    char err[512];
    ck_assert_msg(oracle_forward(&p, ref, ref_lse, err, sizeof err) == 0, "oracle: %s", err);
    int nan_rows = 0, finite_rows = 0;
    double worst = 0.0;
    for (int h = 0; h < c.Hq; h++)
        for (int i = 0; i < c.Lq; i++) {
            size_t n = (size_t)h * c.Lq + i;
            double lse = oracle_load(&r.lse.t, 0, h, i, 0);
            if (nc->nan_row(&r, h, i)) {
                nan_rows++;
                for (int d = 0; d < c.Dv; d++)
                    ck_assert_msg(isnan(oracle_load(&r.out.t, 0, h, i, d)),
                                  "%s (path %d): out[%d][%d][%d] is %g, not NaN", nc->name, path,
                                  h, i, d, oracle_load(&r.out.t, 0, h, i, d));
                ck_assert_msg(isnan(lse), "%s (path %d): lse[%d][%d] is %g, not NaN", nc->name,
                              path, h, i, lse);
                continue;
            }
            finite_rows++;
            ck_assert_msg(isfinite(lse), "%s (path %d): lse[%d][%d] is %g", nc->name, path, h, i,
                          lse);
            worst = fmax(worst, fabs(lse - ref_lse[n]) / fmax(1.0, fabs(ref_lse[n])));
            for (int d = 0; d < c.Dv; d++) {
                double v = oracle_load(&r.out.t, 0, h, i, d);
                ck_assert_msg(isfinite(v), "%s (path %d): out[%d][%d][%d] is %g", nc->name, path,
                              h, i, d, v);
                worst = fmax(worst, fabs(v - ref[n * c.Dv + d]));
            }
        }
    ck_assert_msg(worst < 1e-4, "%s (path %d): finite rows differ from the oracle by %g",
                  nc->name, path, worst);
    if (nc->nan_row != row_none) ck_assert_int_gt(nan_rows, 0);
    ck_assert_int_gt(finite_rows, 0);
    free(ref);
    free(ref_lse);
    case_teardown(&r);
}

START_TEST(test_nan_propagation) {
    run_nan_case(&nan_cases[_i / NAN_PATHS], _i % NAN_PATHS);
}
END_TEST

/* A caller whose thread flushes subnormals (a program built with
 * -ffast-math) gets the same block mask and the same bits: block-mask
 * building, interval analysis and the kernels' mod evaluation keep
 * subnormals whatever the caller's state, which is restored afterwards.
 * The IEEE run is checked against the oracle by the shape cases. */
#if defined(__x86_64__)
#include <xmmintrin.h>
static void run_twice_compare(const fcase *c) {
    unsigned saved = _mm_getcsr();
    case_run r[2];
    size_t n = (size_t)c->B * c->Hq * c->Lq * c->Dv;
    for (int flush = 0; flush < 2; flush++) {
        if (flush) _mm_setcsr(saved | 0x8040u); /* FTZ and DAZ */
        case_setup(&r[flush], c);
        ck_assert_int_eq(case_attention(&r[flush], c), FLEX_OK);
        /* the control bits come back (the low six are sticky exception flags) */
        ck_assert_uint_eq(_mm_getcsr() & ~0x3fu, (flush ? (saved | 0x8040u) : saved) & ~0x3fu);
        _mm_setcsr(saved);
    }
    if (c->mask) {
        size_t blocks = (size_t)((c->Lq + 15) / 16) * (size_t)((c->Lkv + 15) / 16);
        uint8_t *d0 = malloc(blocks), *d1 = malloc(blocks);
        ck_assert_int_eq(flex_block_mask_to_dense(r[0].mask, d0), FLEX_OK);
        ck_assert_int_eq(flex_block_mask_to_dense(r[1].mask, d1), FLEX_OK);
        ck_assert_msg(memcmp(d0, d1, blocks) == 0, "%s: block masks differ", c->name);
        free(d0);
        free(d1);
    }
    for (size_t i = 0; i < n; i++) {
        float a = ((const float *)r[0].out.mem)[i], b = ((const float *)r[1].out.mem)[i];
        ck_assert_msg(memcmp(&a, &b, sizeof a) == 0, "%s: out[%zu] %g with IEEE, %g flushing",
                      c->name, i, a, b);
    }
    ck_assert(memcmp(r[0].lse.mem, r[1].lse.mem, (size_t)c->B * c->Hq * c->Lq * 4) == 0);
    case_teardown(&r[0]);
    case_teardown(&r[1]);
}

START_TEST(test_subnormals_caller_flushes) {
    for (int i = NUM_SHAPE_CASES - 3; i < NUM_SHAPE_CASES; i++) {
        ck_assert(strstr(shape_cases[i].name, "subnormal") != NULL);
        run_twice_compare(&shape_cases[i]);
    }
}
END_TEST
#endif
/* The plan never leaves a tile across a block boundary. */
START_TEST(test_plan_tiles) {
    case_run r;
    fcase c = {"plan", "causal", NULL, 1, 1, 1, 64, 64, 32, 32, F32, 0, 0, 0, 0, 16, 32, 0, 0};
    case_setup(&r, &c);
    flex_forward_args a;
    memset(&a, 0, sizeof a);
    a.q = r.q.t, a.k = r.k.t, a.v = r.v.t, a.out = r.out.t;
    a.block_mask = r.mask;
    struct flex_plan plan;
    ck_assert_int_eq(flex_plan_make(r.ctx, &a, &plan), FLEX_OK);
    ck_assert_int_eq(16 % plan.q_tile, 0);
    ck_assert_int_eq(32 % plan.kv_tile, 0);
    case_teardown(&r);
}
END_TEST

static Suite *cpu_forward_suite(void) {
    Suite *s = suite_create("cpu_forward");
    TCase *tc = tcase_create("oracle");
    tcase_set_timeout(tc, 600);
    tcase_add_loop_test(tc, test_shapes, 0,
                        (NUM_SHAPE_CASES + SHAPES_PER_TEST - 1) / SHAPES_PER_TEST);
    tcase_add_loop_test(tc, test_presets, 0, flex_preset_count());
    tcase_add_test(tc, test_portable_kernels);
#if defined(__x86_64__)
    tcase_add_test(tc, test_subnormals_caller_flushes);
#endif
    tcase_add_loop_test(tc, test_nan_propagation, 0,
                        (int)(sizeof nan_cases / sizeof nan_cases[0]) * NAN_PATHS);
    suite_add_tcase(s, tc);
    TCase *te = tcase_create("errors");
    tcase_add_test(te, test_bounds_mask_tiled);
    tcase_add_test(te, test_bounds_mask_reference);
    tcase_add_test(te, test_bounds_score_tiled);
    tcase_add_test(te, test_bounds_score_reference);
    tcase_add_test(te, test_plan_tiles);
    suite_add_tcase(s, te);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(cpu_forward_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
