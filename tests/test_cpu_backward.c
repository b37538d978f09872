/*
 * The CPU backward against the fp64 backward oracle, and the oracle itself
 * against finite differences.
 *
 * A case fills q, k, v and dout with fixed pseudo-random values in the
 * case's dtype and layout, runs the CPU forward for out and lse, poisons dq,
 * dk and dv with NaN bytes, runs flex_attention_backward and compares every
 * gradient with oracle_backward on the very same inputs by the tolerance
 * rule of tolerance.h (against oracle_backward_naive).
 * Buffer gradients start from a non-zero value, which checks that they are
 * added to, not overwritten; the second one of a case is a strided view
 * whose gaps must stay untouched.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "oracle.h"
#include "oracle_backward.h"
#include "tolerance.h"

enum { LAYOUT_BHSD = 0, LAYOUT_BSHD = 1, LAYOUT_PADDED = 2, LAYOUT_STRIDED_D = 3 };

#define PER_HEAD   "per-head:"
#define GRAD_START 0.25f /* initial value of every buffer gradient */
#define GRAD_GAP   7.5f  /* between the elements of a strided gradient; never written */

typedef struct bcase {
    const char *name;
    const char *mask;  /* preset name, "=" + mod text, or NULL */
    const char *score; /* same */
    int B, Hq, Hkv, Lq, Lkv, D, Dv;
    flex_dtype dtype;
    int layout;
    int q_block, kv_block;     /* 0 = 128 */
    const char *grad1, *grad2; /* buffers whose gradients are checked */
} bcase;

/* ---- inputs ---- */

static uint64_t rng;

static double rnd(void) {
    double s = 0.0;
    for (int i = 0; i < 3; i++) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        s += (double)(rng >> 11) / 9007199254740992.0;
    }
    return (s - 1.5) * 1.6;
}

typedef struct host_tensor {
    void *mem;
    size_t bytes;
    flex_tensor t;
} host_tensor;

static host_tensor make_tensor(flex_dtype dt, int layout, int64_t B, int64_t H, int64_t S,
                               int64_t D) {
    host_tensor h;
    memset(&h, 0, sizeof h);
    int64_t st[4];
    if (layout == LAYOUT_BSHD) {
        st[3] = 1, st[2] = H * D, st[1] = D, st[0] = S * H * D;
    } else if (layout == LAYOUT_PADDED) {
        st[3] = 1, st[1] = D + 3, st[2] = H * (D + 3) + 5, st[0] = S * st[2] + 11;
    } else if (layout == LAYOUT_STRIDED_D) {
        st[3] = 2, st[2] = 2 * D, st[1] = S * 2 * D, st[0] = H * S * 2 * D;
    } else {
        st[3] = 1, st[2] = D, st[1] = S * D, st[0] = H * S * D;
    }
    int64_t span = 1 + (B - 1) * st[0] + (H - 1) * st[1] + (S - 1) * st[2] + (D - 1) * st[3];
    h.bytes = (size_t)span * flex_dtype_size(dt);
    h.mem = malloc(h.bytes ? h.bytes : 1);
    ck_assert_ptr_nonnull(h.mem);
    memset(h.mem, 0xff, h.bytes); /* NaN in every float dtype */
    h.t.data = h.mem;
    h.t.dtype = dt;
    h.t.ndim = 4;
    h.t.sizes[0] = B, h.t.sizes[1] = H, h.t.sizes[2] = S, h.t.sizes[3] = D;
    for (int i = 0; i < 4; i++)
        h.t.strides[i] = st[i];
    h.t.device = FLEX_DEVICE_CPU;
    return h;
}

static void store_value(flex_tensor *t, int64_t off, double v) {
    flex_store_from_float(t->data, t->dtype, off, (float)v);
}

static int64_t offset_of(const flex_tensor *t, int64_t a, int64_t b, int64_t c, int64_t d) {
    return a * t->strides[0] + b * t->strides[1] + c * t->strides[2] + d * t->strides[3];
}

static void fill_random(flex_tensor *t) {
    for (int64_t a = 0; a < t->sizes[0]; a++)
        for (int64_t b = 0; b < t->sizes[1]; b++)
            for (int64_t c = 0; c < t->sizes[2]; c++)
                for (int64_t d = 0; d < t->sizes[3]; d++)
                    store_value(t, offset_of(t, a, b, c, d), rnd());
}

/* ---- mods and buffers ---- */

enum { MAX_BUFS = 8 };

typedef struct bound_buffer {
    char name[32];
    void *data;
    flex_dtype dtype;
    int ndim;
    int64_t sizes[2];
} bound_buffer;

typedef struct mods {
    flex_mod *score, *mask_mod;
    bound_buffer bufs[MAX_BUFS];
    int num_bufs;
} mods;

static bound_buffer *add_buffer(mods *md, const char *name, flex_dtype dt, int ndim, int64_t n0,
                                int64_t n1) {
    for (int i = 0; i < md->num_bufs; i++)
        if (!strcmp(md->bufs[i].name, name)) return &md->bufs[i];
    ck_assert_int_lt(md->num_bufs, MAX_BUFS);
    bound_buffer *b = &md->bufs[md->num_bufs++];
    snprintf(b->name, sizeof b->name, "%s", name);
    b->dtype = dt;
    b->ndim = ndim;
    b->sizes[0] = n0;
    b->sizes[1] = ndim > 1 ? n1 : 1;
    b->data = calloc((size_t)(b->sizes[0] * b->sizes[1]), 4);
    ck_assert_ptr_nonnull(b->data);
    return b;
}

/* Makes (once) and binds the data of every buffer the test mods use. */
static void bind_all(flex_context *ctx, flex_mod *m, mods *md, int Hq, int Lq, int Lkv) {
    int L = Lq > Lkv ? Lq : Lkv;
    static const int doc_len[] = {23, 41, 9, 30, 5, 64};
    for (int i = 0; i < m->ir.num_buffers; i++) {
        const char *name = m->ir.buffers[i].name;
        bound_buffer *b = NULL;
        if (!strcmp(name, "doc") || !strcmp(name, "seq")) {
            b = add_buffer(md, name, FLEX_I32, 1, L, 0);
            int32_t *d = b->data;
            for (int j = 0, id = 0, left = doc_len[0]; j < L; j++) {
                if (left == 0) id++, left = doc_len[id % 6];
                d[j] = id;
                left--;
            }
        } else if (!strcmp(name, "off")) {
            b = add_buffer(md, name, FLEX_I32, 1, L + 1, 0);
            int32_t *d = b->data;
            int n = 0;
            for (int j = 0, left = 0; j < L; j++) {
                if (left == 0) d[n++] = j, left = doc_len[n % 6];
                left--;
            }
            for (; n <= L; n++)
                d[n] = L;
        } else if (!strcmp(name, "clip")) {
            /* small enough that a good part of the scores is clipped */
            b = add_buffer(md, name, FLEX_F32, 1, Hq, 0);
            for (int h = 0; h < Hq; h++)
                ((float *)b->data)[h] = 0.4f + 0.2f * (float)h;
        } else if (!strcmp(name, "slopes") || !strcmp(name, "head_scale")) {
            b = add_buffer(md, name, FLEX_F32, 1, Hq, 0);
            float *d = b->data;
            for (int h = 0; h < Hq; h++)
                d[h] = (float)exp2(-2.0 * (h + 1) / Hq) + 0.1f * h;
        } else if (!strcmp(name, "rel")) {
            b = add_buffer(md, name, FLEX_F32, 2, Hq, Lq + Lkv - 1);
            float *d = b->data;
            for (int j = 0; j < Hq * (Lq + Lkv - 1); j++)
                d[j] = (float)((j * 7) % 11) * 0.1f - 0.5f;
        } else if (!strcmp(name, "img_of")) {
            b = add_buffer(md, name, FLEX_I32, 1, Lkv, 0);
            for (int j = 0; j < Lkv; j++)
                ((int32_t *)b->data)[j] = j / 16;
        } else if (!strcmp(name, "intervals")) {
            int images = (Lkv + 15) / 16;
            b = add_buffer(md, name, FLEX_I32, 2, images, 2);
            int32_t *d = b->data;
            for (int j = 0; j < images; j++) {
                d[2 * j] = (int32_t)((int64_t)j * Lq / images);
                d[2 * j + 1] = (int32_t)((int64_t)(j + 2) * Lq / images);
            }
        }
        ck_assert_msg(b != NULL, "no test data for buffer '%s'", name);
        flex_tensor t =
            flex_tensor_contiguous(b->data, b->dtype, b->ndim, b->sizes, FLEX_DEVICE_CPU);
        flex_status st = flex_mod_bind_buffer(ctx, m, name, &t);
        ck_assert_msg(st == FLEX_OK, "bind %s: %s", name, flex_error_message(ctx));
    }
}

static int overrides_for(const char *name, int Lkv, flex_param *p) {
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
        p[0] = (flex_param){"C", 1, 2.0};
        return 1;
    }
    (void)Lkv;
    return 0;
}

static const flex_buffer_decl text_buffers[] = {
    {"head_scale", FLEX_F32, 1}, {"rel", FLEX_F32, 2}, {"doc", FLEX_I32, 1}, {"clip", FLEX_F32, 1}};
enum { NUM_TEXT_BUFFERS = sizeof text_buffers / sizeof *text_buffers };

static flex_mod *compile_spec(flex_context *ctx, const char *spec, flex_mod_kind kind, int Lkv) {
    flex_mod *m = NULL;
    flex_status st;
    if (spec[0] == '=') {
        flex_buffer_decl used[NUM_TEXT_BUFFERS];
        int n = 0;
        for (int i = 0; i < NUM_TEXT_BUFFERS; i++) {
            char pat[40];
            snprintf(pat, sizeof pat, "%s[", text_buffers[i].name);
            if (strstr(spec, pat)) used[n++] = text_buffers[i];
        }
        flex_param kv_len = {"KV_LEN", 0, Lkv};
        flex_mod_desc desc = {kind, spec + 1, &kv_len, 1, used, n};
        st = flex_mod_compile(ctx, &desc, &m);
    } else {
        flex_param ov[4];
        int n = overrides_for(spec, Lkv, ov);
        st = flex_preset_compile(ctx, spec, ov, n, &m);
    }
    ck_assert_msg(st == FLEX_OK, "compile '%s': %s", spec, flex_error_message(ctx));
    return m;
}

/* ---- one case ---- */

typedef struct run {
    flex_context *ctx;
    host_tensor q, k, v, out, dout, lse, dq, dk, dv;
    mods md;
    flex_block_mask *mask;
    float *grads[2];
    int gap[2]; /* the second gradient is a strided view: every other float */
    flex_buffer_grad bg[2];
    int num_grads;
} run;

static void setup(run *r, const bcase *c) {
    memset(r, 0, sizeof *r);
    ck_assert_int_eq(flex_context_create("cpu", &r->ctx), FLEX_OK);
    rng = 0x2545f4914f6cdd1dull ^ (uint64_t)(c->Lq * 977 + c->Lkv * 31 + c->D * 7 + c->Dv);
    r->q = make_tensor(c->dtype, c->layout, c->B, c->Hq, c->Lq, c->D);
    r->k = make_tensor(c->dtype, c->layout, c->B, c->Hkv, c->Lkv, c->D);
    r->v = make_tensor(c->dtype, c->layout, c->B, c->Hkv, c->Lkv, c->Dv);
    r->out = make_tensor(c->dtype, c->layout, c->B, c->Hq, c->Lq, c->Dv);
    r->dout = make_tensor(c->dtype, c->layout, c->B, c->Hq, c->Lq, c->Dv);
    r->dq = make_tensor(c->dtype, c->layout, c->B, c->Hq, c->Lq, c->D);
    r->dk = make_tensor(c->dtype, c->layout, c->B, c->Hkv, c->Lkv, c->D);
    r->dv = make_tensor(c->dtype, c->layout, c->B, c->Hkv, c->Lkv, c->Dv);
    r->lse = make_tensor(FLEX_F32, LAYOUT_BHSD, c->B, c->Hq, c->Lq, 1);
    fill_random(&r->q.t);
    fill_random(&r->k.t);
    fill_random(&r->v.t);
    fill_random(&r->dout.t);
    if (c->score) {
        r->md.score = compile_spec(r->ctx, c->score, FLEX_MOD_SCORE, c->Lkv);
        bind_all(r->ctx, r->md.score, &r->md, c->Hq, c->Lq, c->Lkv);
    }
    if (c->mask) {
        /* PER_HEAD before a mask builds the block mask for (B, Hq), not
         * broadcast over batch and heads */
        int per_head = !strncmp(c->mask, PER_HEAD, strlen(PER_HEAD));
        const char *spec = per_head ? c->mask + strlen(PER_HEAD) : c->mask;
        r->md.mask_mod = compile_spec(r->ctx, spec, FLEX_MOD_MASK, c->Lkv);
        bind_all(r->ctx, r->md.mask_mod, &r->md, c->Hq, c->Lq, c->Lkv);
        flex_status st = flex_block_mask_create(r->ctx, r->md.mask_mod, per_head ? c->B : 1,
                                                per_head ? c->Hq : 1, c->Lq, c->Lkv, c->q_block,
                                                c->kv_block, &r->mask);
        ck_assert_msg(st == FLEX_OK, "block mask: %s", flex_error_message(r->ctx));
    }
    const char *names[2] = {c->grad1, c->grad2};
    for (int i = 0; i < 2; i++) {
        if (!names[i]) continue;
        bound_buffer *b = NULL;
        for (int j = 0; j < r->md.num_bufs; j++)
            if (!strcmp(r->md.bufs[j].name, names[i])) b = &r->md.bufs[j];
        ck_assert_ptr_nonnull(b);
        int64_t n = b->sizes[0] * b->sizes[1];
        int gap = r->num_grads == 0 ? 1 : 2, k = r->num_grads;
        r->gap[k] = gap;
        r->grads[k] = malloc((size_t)(n * gap) * sizeof(float));
        for (int64_t e = 0; e < n * gap; e++)
            r->grads[k][e] = e % gap ? GRAD_GAP : GRAD_START;
        r->bg[k].name = names[i];
        r->bg[k].grad =
            flex_tensor_contiguous(r->grads[k], FLEX_F32, b->ndim, b->sizes, FLEX_DEVICE_CPU);
        for (int d = 0; d < b->ndim; d++)
            r->bg[k].grad.strides[d] *= gap;
        r->num_grads++;
    }
    flex_status st = flex_attention(r->ctx, &r->q.t, &r->k.t, &r->v.t, r->md.score, r->mask, NULL,
                                    &r->out.t, &r->lse.t);
    ck_assert_msg(st == FLEX_OK, "%s: forward: %s", c->name, flex_error_message(r->ctx));
}

static void teardown(run *r) {
    flex_block_mask_destroy(r->mask);
    flex_mod_destroy(r->md.score);
    flex_mod_destroy(r->md.mask_mod);
    for (int i = 0; i < r->md.num_bufs; i++)
        free(r->md.bufs[i].data);
    for (int i = 0; i < r->num_grads; i++)
        free(r->grads[i]);
    host_tensor *all[] = {&r->q, &r->k, &r->v, &r->out, &r->dout, &r->lse, &r->dq, &r->dk, &r->dv};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        free(all[i]->mem);
    flex_context_destroy(r->ctx);
}

static flex_status backward_opts(run *r, const flex_attention_options *opts, int want_dq,
                                 int want_dk, int want_dv) {
    return flex_attention_backward(r->ctx, &r->q.t, &r->k.t, &r->v.t, &r->out.t, &r->dout.t,
                                   &r->lse.t, r->md.score, r->mask, opts, want_dq ? &r->dq.t : NULL,
                                   want_dk ? &r->dk.t : NULL, want_dv ? &r->dv.t : NULL, r->bg,
                                   r->num_grads);
}

static flex_status backward(run *r, int want_dq, int want_dk, int want_dv) {
    return backward_opts(r, NULL, want_dq, want_dk, want_dv);
}

/* Copies a (B, H, S, D) tensor into a dense double array, asserting that no
 * element is NaN (an unwritten poisoned element). */
static double *dense(const flex_tensor *t, const char *what, const char *name) {
    size_t n = (size_t)(t->sizes[0] * t->sizes[1] * t->sizes[2] * t->sizes[3]);
    double *d = malloc((n ? n : 1) * sizeof *d);
    size_t at = 0;
    for (int64_t a = 0; a < t->sizes[0]; a++)
        for (int64_t b = 0; b < t->sizes[1]; b++)
            for (int64_t c = 0; c < t->sizes[2]; c++)
                for (int64_t e = 0; e < t->sizes[3]; e++) {
                    d[at] = oracle_load(t, a, b, c, e);
                    ck_assert_msg(!isnan(d[at]), "%s: %s[%lld][%lld][%lld][%lld] is NaN", name,
                                  what, (long long)a, (long long)b, (long long)c, (long long)e);
                    at++;
                }
    return d;
}

/* The tolerance rule (tolerance.h) for one gradient. */
static void expect_close(const double *ref, const double *naive, const double *got, size_t n,
                         flex_dtype dt, const char *what, const char *name) {
    tol_report r;
    int ok = tol_compare(dt, TOL_GRADIENT, ref, naive, got, n, 0.0, &r);
    if (getenv("FLEXATTN_TEST_VERBOSE"))
        fprintf(stderr, "%-40s %-16s %.2f of bound\n", name, what, tol_margin(&r));
    ck_assert_msg(ok, "%s: %s: %s", name, what, r.why);
}

static void check_case(const bcase *c) {
    run r;
    setup(&r, c);
    char name[96]; /* the case and its dtype, for the messages */
    snprintf(name, sizeof name, "%s (%s)", c->name, flex_dtype_name(c->dtype));
    flex_status st = backward(&r, 1, 1, 1);
    ck_assert_msg(st == FLEX_OK, "%s: backward: %s", name, flex_error_message(r.ctx));

    size_t nq = (size_t)c->B * c->Hq * c->Lq, nk = (size_t)c->B * c->Hkv * c->Lkv;
    double *ref_dq = malloc(nq * c->D * sizeof(double));
    double *ref_dk = malloc((nk * c->D + 1) * sizeof(double));
    double *ref_dv = malloc((nk * c->Dv + 1) * sizeof(double));
    oracle_buffer_grad og[2];
    double *ref_g[2] = {NULL, NULL};
    size_t gn[2] = {0, 0};
    for (int i = 0; i < r.num_grads; i++) {
        gn[i] = 1;
        for (int d = 0; d < r.bg[i].grad.ndim; d++)
            gn[i] *= (size_t)r.bg[i].grad.sizes[d];
        ref_g[i] = calloc(gn[i], sizeof(double));
        og[i].name = r.bg[i].name;
        og[i].grad = ref_g[i];
    }
    oracle_problem p;
    memset(&p, 0, sizeof p);
    p.ctx = r.ctx;
    p.q = r.q.t, p.k = r.k.t, p.v = r.v.t;
    p.score_mod = r.md.score;
    p.mask_mod = r.md.mask_mod;
    char err[512];
    ck_assert_msg(oracle_backward(&p, &r.dout.t, ref_dq, ref_dk, ref_dv, og, r.num_grads, err,
                                  sizeof err) == 0,
                  "oracle: %s", err);
    double *naive_dq = malloc(nq * c->D * sizeof(double));
    double *naive_dk = malloc((nk * c->D + 1) * sizeof(double));
    double *naive_dv = malloc((nk * c->Dv + 1) * sizeof(double));
    oracle_buffer_grad naive_og[2];
    double *naive_g[2] = {NULL, NULL};
    for (int i = 0; i < r.num_grads; i++) {
        naive_g[i] = calloc(gn[i], sizeof(double));
        naive_og[i].name = r.bg[i].name;
        naive_og[i].grad = naive_g[i];
    }
    ck_assert_msg(oracle_backward_naive(&p, &r.dout.t, naive_dq, naive_dk, naive_dv, naive_og,
                                        r.num_grads, err, sizeof err) == 0,
                  "naive: %s", err);
    double *got = dense(&r.dq.t, "dq", name);
    expect_close(ref_dq, naive_dq, got, nq * c->D, c->dtype, "dq", name);
    free(got);
    got = dense(&r.dk.t, "dk", name);
    expect_close(ref_dk, naive_dk, got, nk * c->D, c->dtype, "dk", name);
    free(got);
    got = dense(&r.dv.t, "dv", name);
    expect_close(ref_dv, naive_dv, got, nk * c->Dv, c->dtype, "dv", name);
    free(got);
    free(naive_dq);
    free(naive_dk);
    free(naive_dv);
    for (int i = 0; i < r.num_grads; i++) {
        double *g = malloc(gn[i] * sizeof(double));
        for (size_t e = 0; e < gn[i]; e++) {
            g[e] = (double)r.grads[i][e * r.gap[i]] - GRAD_START;
            if (r.gap[i] > 1) ck_assert(r.grads[i][e * r.gap[i] + 1] == GRAD_GAP);
        }
        char what[64];
        snprintf(what, sizeof what, "gradient of %s", r.bg[i].name);
        /* a gradient that is 0 everywhere would compare equal while testing nothing */
        double ref_max = 0.0;
        for (size_t e = 0; e < gn[i]; e++)
            ref_max = fmax(ref_max, fabs(ref_g[i][e]));
        ck_assert_msg(ref_max > 0.0, "%s: the reference %s is 0 everywhere", name, what);
        expect_close(ref_g[i], naive_g[i], g, gn[i], c->dtype, what, name);
        free(g);
        free(ref_g[i]);
        free(naive_g[i]);
    }
    free(ref_dq);
    free(ref_dk);
    free(ref_dv);
    teardown(&r);
}

#define F32  FLEX_F32
#define F16  FLEX_F16
#define BF16 FLEX_BF16

/* The mods of the issue, each at the three dtypes (loop index / 3). */
static const bcase mod_cases[] = {
    {"score*score", NULL, "=score * score * 0.3", 1, 2, 2, 70, 70, 32, 32, F32, 0, 32, 32, NULL,
     NULL},
    {"sin(cos)", "causal", "=sin(cos(score)) * 3.0", 1, 2, 2, 70, 70, 32, 32, F32, 0, 32, 32, NULL,
     NULL},
    {"where -inf", NULL, "=where(q >= kv, score + (q - kv) * 0.05, -inf)", 1, 2, 2, 70, 70, 32, 32,
     F32, 0, 32, 32, NULL, NULL},
    {"head_scale", "causal", "=score * head_scale[h]", 1, 4, 2, 70, 70, 32, 32, F32, 0, 32, 32,
     "head_scale", NULL},
    {"rel bias", NULL, "=score + rel[h][q - kv + KV_LEN - 1]", 1, 2, 1, 60, 70, 32, 32, F32, 0, 32,
     32, "rel", NULL},
    {"softcap", "sliding_window", "softcap", 1, 2, 2, 70, 70, 32, 32, F32, 0, 32, 32, NULL, NULL},
    {"alibi slopes", "causal", "alibi", 1, 4, 4, 70, 70, 32, 32, F32, 0, 32, 32, "slopes", NULL},
    {"two buffers", "causal",
     "=30.0 * tanh((score + rel[h][q - kv + KV_LEN - 1]) / 30.0) * head_scale[h]", 1, 2, 2, 50, 50,
     16, 16, F32, 0, 16, 16, "rel", "head_scale"},
    /* the training framework seed's per-head logit clipping: clamp's rule
     * (the chosen argument gets the gradient), the buffer bounding both sides */
    {"clip", "causal", "=clamp(score, -clip[h], clip[h])", 1, 4, 2, 70, 70, 32, 32, F32, 0, 32, 32,
     "clip", NULL},
};

START_TEST(test_mods_all_dtypes) {
    static const flex_dtype dts[] = {F32, F16, BF16};
    bcase c = mod_cases[_i / 3];
    c.dtype = dts[_i % 3];
    check_case(&c);
}
END_TEST

/* Shapes and layouts, one axis at a time. */
static const bcase shape_cases[] = {
    {"dense odd", NULL, NULL, 1, 2, 2, 37, 53, 24, 24, F32, 0, 0, 0, NULL, NULL},
    {"causal 257 block128", "causal", NULL, 1, 1, 1, 257, 257, 32, 32, F32, 0, 0, 0, NULL, NULL},
    {"gqa 4:1 BSHD", "causal", "softcap", 2, 8, 2, 45, 45, 16, 16, F32, LAYOUT_BSHD, 16, 32, NULL,
     NULL},
    {"D != Dv padded", "document_causal", NULL, 1, 2, 1, 90, 90, 40, 24, F32, LAYOUT_PADDED, 32, 16,
     NULL, NULL},
    {"strided D", "prefix_lm", "alibi", 1, 2, 2, 50, 66, 16, 48, F32, LAYOUT_STRIDED_D, 16, 64,
     "slopes", NULL},
    {"q < kv", "sliding_window_bidirectional", NULL, 1, 2, 2, 17, 100, 32, 32, F32, 0, 16, 32, NULL,
     NULL},
    {"q > kv", NULL, "=score * head_scale[h]", 1, 3, 1, 100, 19, 32, 16, F32, 0, 32, 16,
     "head_scale", NULL},
    {"empty rows", "=kv + 4 <= q", NULL, 1, 2, 2, 40, 40, 16, 16, F32, 0, 16, 16, NULL, NULL},
    {"empty rows by score", NULL, "=where(kv + 3 <= q, score, -inf)", 1, 2, 2, 40, 40, 16, 16, F32,
     0, 0, 0, NULL, NULL},
    {"D128 bf16 BSHD", "causal", NULL, 1, 2, 2, 80, 80, 128, 128, BF16, LAYOUT_BSHD, 64, 64, NULL,
     NULL},
    {"single element", NULL, NULL, 1, 1, 1, 1, 1, 8, 8, F32, 0, 0, 0, NULL, NULL},
    {"per-head mask gqa", PER_HEAD "=q + 3 * h >= kv && q - kv <= 40 + 7 * b", "softcap", 2, 4, 2,
     90, 90, 16, 16, F32, 0, 16, 32, NULL, NULL},
    /* mods whose values are subnormal: the block mask and the backward's
     * mod evaluation must agree (both keep subnormals) */
    {"subnormal constants", "=float(q - kv) * 1e-40 >= 1e-40",
     "=where(float(q - kv) * 1e-40 >= 3e-40, score * 2.0, score)", 1, 2, 2, 64, 64, 16, 16, F32, 0,
     16, 16, NULL, NULL},
};

START_TEST(test_shapes) {
    check_case(&shape_cases[_i]);
}
END_TEST

/* Every preset at f32, f16 and bf16 (loop index / 3, dtype index % 3):
 * mask presets as the mask, score presets as the score mod (with the causal
 * mask over them). The presets cover the seeds' masks and score mods; alibi's
 * slope gradient is checked at every dtype with the same bound as dq, dk, dv
 * (at this size its bf16 error is about 0.002). */
START_TEST(test_presets) {
    static const flex_dtype dts[] = {F32, F16, BF16};
    const flex_preset *pr = flex_preset_at(_i / 3);
    ck_assert_ptr_nonnull(pr);
    bcase c = {pr->name, NULL, NULL, 1, 2, 1, 100, 100, 16, 24, dts[_i % 3], 0, 32, 32, NULL, NULL};
    if (pr->kind == FLEX_MOD_MASK) {
        c.mask = pr->name;
    } else {
        c.score = pr->name;
        c.mask = "causal";
        if (!strcmp(pr->name, "alibi")) c.grad1 = "slopes";
    }
    check_case(&c);
}
END_TEST

/* Two runs give the same bits (no order-dependent sums), here with
 * several threads when OpenMP has them; opts->deterministic, which the CPU
 * backward needs for none of that, is accepted and changes no bit (the
 * second run asks for it), and a value other than 0 or 1 is refused before
 * anything is written. */
START_TEST(test_deterministic) {
    bcase c = {"determinism",
               "document_causal",
               "=score * head_scale[h] + rel[h][q - kv + KV_LEN - 1]",
               1,
               4,
               1,
               150,
               150,
               32,
               32,
               F32,
               0,
               32,
               32,
               "rel",
               "head_scale"};
    run r;
    setup(&r, &c);
    ck_assert_int_eq(backward(&r, 1, 1, 1), FLEX_OK);
    host_tensor *outs[3] = {&r.dq, &r.dk, &r.dv};
    void *first[3];
    for (int i = 0; i < 3; i++) {
        first[i] = malloc(outs[i]->bytes);
        memcpy(first[i], outs[i]->mem, outs[i]->bytes);
        memset(outs[i]->mem, 0xff, outs[i]->bytes);
    }
    size_t n0 = (size_t)(r.bg[0].grad.sizes[0] * r.bg[0].grad.sizes[1]);
    size_t n1 = (size_t)r.bg[1].grad.sizes[0] * 2; /* strided: with its gaps */
    float *g0 = malloc(n0 * sizeof(float)), *g1 = malloc(n1 * sizeof(float));
    memcpy(g0, r.grads[0], n0 * sizeof(float));
    memcpy(g1, r.grads[1], n1 * sizeof(float));
    for (size_t e = 0; e < n0; e++)
        r.grads[0][e] = GRAD_START;
    for (size_t e = 0; e < n1; e += 2)
        r.grads[1][e] = GRAD_START;
    const flex_attention_options det = {.deterministic = 1};
    ck_assert_int_eq(backward_opts(&r, &det, 1, 1, 1), FLEX_OK);
    for (int i = 0; i < 3; i++) {
        ck_assert_msg(memcmp(first[i], outs[i]->mem, outs[i]->bytes) == 0,
                      "gradient %d differs between two runs", i);
        free(first[i]);
    }
    ck_assert(memcmp(g0, r.grads[0], n0 * sizeof(float)) == 0);
    ck_assert(memcmp(g1, r.grads[1], n1 * sizeof(float)) == 0);
    for (int i = 0; i < 3; i++)
        memset(outs[i]->mem, 0xff, outs[i]->bytes);
    for (int bad = -1; bad <= 2; bad += 3) {
        const flex_attention_options wrong = {.deterministic = bad};
        ck_assert_int_eq(backward_opts(&r, &wrong, 1, 1, 1), FLEX_ERR_INVALID_ARGUMENT);
        ck_assert_ptr_nonnull(strstr(flex_error_message(r.ctx), "opts->deterministic"));
        for (int i = 0; i < 3; i++) {
            const unsigned char *m = outs[i]->mem;
            for (size_t e = 0; e < outs[i]->bytes; e++)
                ck_assert_int_eq(m[e], 0xff);
        }
        ck_assert(memcmp(g0, r.grads[0], n0 * sizeof(float)) == 0);
    }
    free(g0);
    free(g1);
    teardown(&r);
}
END_TEST

/* Gradients not asked for are not computed: passing only dv leaves the
 * other tensors' poison alone, and dv still matches a full run. */
START_TEST(test_partial_outputs) {
    bcase c = {"dv only", "causal", NULL, 1, 2, 2, 33, 33, 16, 16, F32, 0, 16, 16, NULL, NULL};
    run r;
    setup(&r, &c);
    ck_assert_int_eq(backward(&r, 0, 0, 1), FLEX_OK);
    void *dv_only = malloc(r.dv.bytes);
    memcpy(dv_only, r.dv.mem, r.dv.bytes);
    const unsigned char *dq = r.dq.mem;
    for (size_t i = 0; i < r.dq.bytes; i++)
        ck_assert_int_eq(dq[i], 0xff);
    ck_assert_int_eq(backward(&r, 1, 1, 1), FLEX_OK);
    ck_assert(memcmp(dv_only, r.dv.mem, r.dv.bytes) == 0);
    free(dv_only);
    teardown(&r);
}
END_TEST

/* A score mod that reads out of range only where the mask removes the
 * element is fine (as in the forward); reading out of range at an attended
 * element is FLEX_ERR_BUFFER_BOUNDS. */
START_TEST(test_out_of_range_reads) {
    bcase c = {
        "masked oob", "causal", "=score + rel[h][q - kv]", 1, 2, 2, 40, 40, 16, 16, F32, 0, 16, 16,
        "rel",        NULL};
    check_case(&c);
    run r;
    setup(&r, &c);
    flex_status st = flex_attention_backward(r.ctx, &r.q.t, &r.k.t, &r.v.t, &r.out.t, &r.dout.t,
                                             &r.lse.t, r.md.score, NULL, NULL, &r.dq.t, &r.dk.t,
                                             &r.dv.t, r.bg, r.num_grads);
    ck_assert_int_eq(st, FLEX_ERR_BUFFER_BOUNDS);
    ck_assert_ptr_nonnull(strstr(flex_error_message(r.ctx), "rel"));
    teardown(&r);
}
END_TEST

/* The portable micro-kernels (and transpose) give the same gradients. */
START_TEST(test_portable_kernels) {
    bcase c = {
        "portable",   "causal", "=score * head_scale[h]", 1, 4, 2, 70, 70, 40, 24, F32, 0, 32, 64,
        "head_scale", NULL};
    setenv("FLEXATTN_DEBUG", "cpu_simd=portable", 1);
    check_case(&c);
    unsetenv("FLEXATTN_DEBUG");
}
END_TEST

/* ---- NaN rows ----
 *
 * A row that the forward made NaN (a kept score NaN or +inf: NaN output and
 * LSE) has NaN gradients: its dQ row, and the dK and dV rows of every key it
 * attends. Keys it does not attend, and every other row's dQ, stay finite
 * and match the oracle. Causal mask, so row i attends keys 0 .. i. */

/* The NaN row is row nan_i of head nan_h (-1: of every head). */
static void check_nan_row(const char *name, const char *score, int poison_q, int nan_h, int nan_i,
                          int portable) {
    bcase c = {name, "causal", score, 1, 2, 1, 70, 70, 16, 16, F32, 0, 32, 32, NULL, NULL};
    if (portable) setenv("FLEXATTN_CPU_SIMD", "portable", 1);
    run r;
    memset(&r, 0, sizeof r);
    if (poison_q) {
        /* setup runs the forward: plant the NaN first, through a setup of
         * the same inputs (same seed) whose q is then poisoned. */
        setup(&r, &c);
        ((float *)r.q.mem)[((size_t)nan_h * c.Lq + nan_i) * c.D + 3] = NAN;
        ck_assert_int_eq(flex_attention(r.ctx, &r.q.t, &r.k.t, &r.v.t, r.md.score, r.mask, NULL,
                                        &r.out.t, &r.lse.t),
                         FLEX_OK);
    } else {
        setup(&r, &c);
    }
    ck_assert(isnan(oracle_load(&r.lse.t, 0, nan_h < 0 ? 0 : nan_h, nan_i, 0)));
    ck_assert_int_eq(backward(&r, 1, 1, 1), FLEX_OK);
    unsetenv("FLEXATTN_CPU_SIMD");

    size_t nq = (size_t)c.Hq * c.Lq, nk = (size_t)c.Hkv * c.Lkv;
    double *ref_dq = malloc(nq * c.D * sizeof(double));
    double *ref_dk = malloc(nk * c.D * sizeof(double));
    double *ref_dv = malloc(nk * c.Dv * sizeof(double));
    oracle_problem p;
    memset(&p, 0, sizeof p);
    p.q = r.q.t, p.k = r.k.t, p.v = r.v.t;
    p.score_mod = r.md.score;
    p.mask_mod = r.md.mask_mod;
    char err[512];
    ck_assert_msg(oracle_backward(&p, &r.dout.t, ref_dq, ref_dk, ref_dv, NULL, 0, err,
                                  sizeof err) == 0,
                  "oracle: %s", err);
    double worst = 0.0;
    int finite_q = 0, finite_k = 0;
    for (int h = 0; h < c.Hq; h++)
        for (int i = 0; i < c.Lq; i++)
            for (int d = 0; d < c.D; d++) {
                double g = oracle_load(&r.dq.t, 0, h, i, d);
                if ((nan_h < 0 || h == nan_h) && i == nan_i) {
                    ck_assert_msg(isnan(g), "%s: dq[%d][%d][%d] = %g, not NaN", name, h, i, d, g);
                    continue;
                }
                ck_assert_msg(isfinite(g), "%s: dq[%d][%d][%d] = %g", name, h, i, d, g);
                worst = fmax(worst, fabs(g - ref_dq[((size_t)h * c.Lq + i) * c.D + d]));
                finite_q++;
            }
    for (int j = 0; j < c.Lkv; j++)
        for (int d = 0; d < c.D; d++) {
            double gk = oracle_load(&r.dk.t, 0, 0, j, d), gv = oracle_load(&r.dv.t, 0, 0, j, d);
            if (j <= nan_i) { /* attended by the NaN row */
                ck_assert_msg(isnan(gk) && isnan(gv), "%s: dk/dv[%d][%d] = %g / %g, not NaN", name,
                              j, d, gk, gv);
                continue;
            }
            ck_assert_msg(isfinite(gk) && isfinite(gv), "%s: dk/dv[%d][%d] = %g / %g", name, j, d,
                          gk, gv);
            worst = fmax(worst, fabs(gk - ref_dk[(size_t)j * c.D + d]));
            worst = fmax(worst, fabs(gv - ref_dv[(size_t)j * c.Dv + d]));
            finite_k++;
        }
    ck_assert_msg(worst < 1e-4, "%s: finite gradients differ from the oracle by %g", name, worst);
    ck_assert_int_gt(finite_q, 0);
    ck_assert_int_gt(finite_k, 0);
    free(ref_dq);
    free(ref_dk);
    free(ref_dv);
    teardown(&r);
}

START_TEST(test_nan_rows) {
    int portable = _i % 2;
    switch (_i / 2) {
    case 0:
        check_nan_row("score mod +inf", "=where(q == 40 && kv == 10, inf, score)", 0, -1, 40,
                      portable);
        break;
    case 1:
        check_nan_row("score mod sqrt(-1)",
                      "=score + where(q == 33 && kv == 33 && h == 1, sqrt(-1), 0.0)", 0, 1, 33,
                      portable);
        break;
    default:
        check_nan_row("NaN in q", NULL, 1, 0, 5, portable);
        break;
    }
}
END_TEST

/* ---- the oracle against finite differences ---- */

/* loss = sum(dout * out) in f64 through oracle_forward. */
static double loss(const oracle_problem *p, const flex_tensor *dout) {
    int64_t B = p->q.sizes[0], H = p->q.sizes[1], L = p->q.sizes[2], Dv = p->v.sizes[3];
    double *out = malloc((size_t)(B * H * L * Dv) * sizeof(double));
    char err[256];
    ck_assert_msg(oracle_forward(p, out, NULL, err, sizeof err) == 0, "%s", err);
    double s = 0.0;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t i = 0; i < L; i++)
                for (int64_t c = 0; c < Dv; c++)
                    s += out[((b * H + h) * L + i) * Dv + c] * oracle_load(dout, b, h, i, c);
    free(out);
    return s;
}

/* Central difference of the loss in one f32 element (the step actually
 * taken, after rounding to f32, is the denominator). */
static double finite_difference(const oracle_problem *p, const flex_tensor *dout, float *x) {
    float saved = *x;
    float up = saved + 1e-3f, down = saved - 1e-3f;
    *x = up;
    double lu = loss(p, dout);
    *x = down;
    double ld = loss(p, dout);
    *x = saved;
    return (lu - ld) / ((double)up - (double)down);
}

START_TEST(test_oracle_matches_finite_differences) {
    bcase c = {"fd",
               "=q + 1 >= kv",
               "=sin(score) * head_scale[h] + rel[h][q - kv + KV_LEN - 1]",
               1,
               2,
               1,
               5,
               6,
               4,
               3,
               F32,
               0,
               16,
               16,
               "rel",
               "head_scale"};
    run r;
    setup(&r, &c);
    oracle_problem p;
    memset(&p, 0, sizeof p);
    p.ctx = r.ctx;
    p.q = r.q.t, p.k = r.k.t, p.v = r.v.t;
    p.score_mod = r.md.score;
    p.mask_mod = r.md.mask_mod;
    double dq[2 * 5 * 4], dk[6 * 4], dv[6 * 3], grel[2 * 10] = {0}, ghs[2] = {0};
    oracle_buffer_grad og[2] = {{"rel", grel}, {"head_scale", ghs}};
    char err[256];
    ck_assert_msg(oracle_backward(&p, &r.dout.t, dq, dk, dv, og, 2, err, sizeof err) == 0, "%s",
                  err);
    struct {
        const char *what;
        flex_tensor *t;
        const double *g;
        int64_t H, S, D;
    } sets[] = {
        {"dq", &r.q.t, dq, 2, 5, 4}, {"dk", &r.k.t, dk, 1, 6, 4}, {"dv", &r.v.t, dv, 1, 6, 3}};
    for (int s = 0; s < 3; s++)
        for (int64_t h = 0; h < sets[s].H; h++)
            for (int64_t i = 0; i < sets[s].S; i++)
                for (int64_t d = 0; d < sets[s].D; d++) {
                    float *x = (float *)sets[s].t->data + offset_of(sets[s].t, 0, h, i, d);
                    double fd = finite_difference(&p, &r.dout.t, x);
                    double got = sets[s].g[(h * sets[s].S + i) * sets[s].D + d];
                    ck_assert_msg(fabs(got - fd) < 1e-5 + 1e-4 * fabs(fd),
                                  "%s[%lld][%lld][%lld]: oracle %.9g, finite difference %.9g",
                                  sets[s].what, (long long)h, (long long)i, (long long)d, got, fd);
                }
    float *rel = NULL, *hs = NULL;
    for (int i = 0; i < r.md.num_bufs; i++) {
        if (!strcmp(r.md.bufs[i].name, "rel")) rel = r.md.bufs[i].data;
        if (!strcmp(r.md.bufs[i].name, "head_scale")) hs = r.md.bufs[i].data;
    }
    for (int e = 0; e < 20; e++) {
        double fd = finite_difference(&p, &r.dout.t, &rel[e]);
        ck_assert_msg(fabs(grel[e] - fd) < 1e-5 + 1e-4 * fabs(fd), "rel[%d]: %.9g vs %.9g", e,
                      grel[e], fd);
    }
    for (int e = 0; e < 2; e++) {
        double fd = finite_difference(&p, &r.dout.t, &hs[e]);
        ck_assert_msg(fabs(ghs[e] - fd) < 1e-5 + 1e-4 * fabs(fd), "head_scale[%d]: %.9g vs %.9g", e,
                      ghs[e], fd);
    }
    teardown(&r);
}
END_TEST

static Suite *backward_suite(void) {
    Suite *s = suite_create("cpu_backward");
    TCase *tc = tcase_create("backward");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_oracle_matches_finite_differences);
    tcase_add_loop_test(tc, test_mods_all_dtypes, 0,
                        (int)(3 * sizeof mod_cases / sizeof *mod_cases));
    tcase_add_loop_test(tc, test_shapes, 0, (int)(sizeof shape_cases / sizeof *shape_cases));
    tcase_add_loop_test(tc, test_presets, 0, 3 * flex_preset_count());
    tcase_add_test(tc, test_deterministic);
    tcase_add_test(tc, test_partial_outputs);
    tcase_add_test(tc, test_portable_kernels);
    tcase_add_test(tc, test_out_of_range_reads);
    tcase_add_loop_test(tc, test_nan_rows, 0, 6);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(backward_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}
