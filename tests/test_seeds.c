/*
 * Every example of the three seed documents, run on the CPU backend.
 *
 * The seeds are the FlexAttention blog post, a walk-through of its API
 * notebook, and a training framework's request for FlexAttention. Each of
 * their score and mask functions is written here as mod text, token for
 * token where the language allows (the seed's names, lets for its local
 * variables, its params and buffers with the seed's data and dtypes), and
 * checked three ways:
 *
 *   - the text means what the seed's Python means: the compiled mod is
 *     evaluated point by point and compared with a plain C port of the
 *     seed's function;
 *   - attention with it on the CPU backend matches the fp64 oracle at a
 *     small size: the forward at f32, then forward and backward (dq, dk,
 *     dv, and the gradient of a captured tensor) at f32, f16 and bf16, as
 *     the notebook's test_mask checks its outputs and gradients;
 *   - for the seed's block-mask prints, the block classes and the ASCII
 *     picture at the seed's own sizes (S = 8192 or 32768, 128 x 128 blocks,
 *     B = H = 1) equal those derived here from the C port, and where a seed
 *     preset exists, the seed's text compiles to the very same mod (hash).
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

/* ------------------------------------------------------------------------
 * Small helpers
 * ---------------------------------------------------------------------- */

static flex_context *cpu_context(void) {
    flex_context *ctx = NULL;
    ck_assert_msg(flex_context_create("cpu", &ctx) == FLEX_OK, "cpu context: %s",
                  flex_error_message(NULL));
    return ctx;
}

static flex_mod *compile_mod(flex_context *ctx, flex_mod_kind kind, const char *text,
                             const flex_param *params, int num_params,
                             const flex_buffer_decl *buffers, int num_buffers) {
    flex_mod_desc desc = {kind, text, params, num_params, buffers, num_buffers};
    flex_mod *m = NULL;
    flex_status st = flex_mod_compile(ctx, &desc, &m);
    ck_assert_msg(st == FLEX_OK, "compile '%s': %s", text, flex_error_message(ctx));
    return m;
}

static flex_mod *compile_preset(flex_context *ctx, const char *name, const flex_param *overrides,
                                int n) {
    flex_mod *m = NULL;
    flex_status st = flex_preset_compile(ctx, name, overrides, n, &m);
    ck_assert_msg(st == FLEX_OK, "preset %s: %s", name, flex_error_message(ctx));
    return m;
}

static void bind_buffer(flex_context *ctx, flex_mod *m, const char *name, void *data,
                        flex_dtype dtype, int ndim, int64_t n0, int64_t n1) {
    int64_t sizes[2] = {n0, n1};
    flex_tensor t = flex_tensor_contiguous(data, dtype, ndim, sizes, FLEX_DEVICE_CPU);
    flex_status st = flex_mod_bind_buffer(ctx, m, name, &t);
    ck_assert_msg(st == FLEX_OK, "bind %s: %s", name, flex_error_message(ctx));
}

/* The seed's text and the preset must be one mod: same canonical text. */
static void assert_same_mod(const flex_mod *seed, const flex_mod *preset, const char *what) {
    ck_assert_msg(flex_mod_hash(seed) == flex_mod_hash(preset),
                  "%s: the seed's text and the preset differ:\n%s\nversus\n%s", what,
                  flex_mod_canonical_text(seed), flex_mod_canonical_text(preset));
}

/* Document ids from lengths: ids[t] = the document holding token t. */
static int32_t *doc_ids_from_lengths(const int *lengths, int n, int64_t total) {
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)total);
    ck_assert_ptr_nonnull(ids);
    int64_t t = 0;
    for (int d = 0; d < n; d++)
        for (int i = 0; i < lengths[d]; i++)
            ids[t++] = d;
    ck_assert_int_eq(t, total);
    return ids;
}

/* ------------------------------------------------------------------------
 * C ports of the seeds' functions (Python semantics: // and % floor)
 * ---------------------------------------------------------------------- */

static int64_t floordiv(int64_t a, int64_t b) {
    int64_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

static int64_t pymod(int64_t a, int64_t b) {
    return a - floordiv(a, b) * b;
}

static int64_t clampi(int64_t x, int64_t lo, int64_t hi) {
    return x < lo ? lo : x > hi ? hi : x;
}

/* The values the seed functions close over. */
static struct {
    int64_t sliding_window, prefix_length;
    int64_t img_h, img_w, window, k_h, k_w;
    const int32_t *document_id;
    const int64_t *njt_offsets, *njt_seq_idx;
    const int64_t *image_boundaries, *intervals;
} seed;

typedef int (*mask_port)(int64_t b, int64_t h, int64_t q_idx, int64_t kv_idx);

static int port_causal(int64_t b, int64_t h, int64_t q_idx, int64_t kv_idx) {
    (void)b, (void)h;
    return q_idx >= kv_idx;
}

static int port_sliding_window_causal(int64_t b, int64_t h, int64_t q_idx, int64_t kv_idx) {
    (void)b, (void)h;
    return q_idx >= kv_idx && q_idx - kv_idx <= seed.sliding_window;
}

static int port_prefix_lm_causal(int64_t b, int64_t h, int64_t q_idx, int64_t kv_idx) {
    (void)b, (void)h;
    return kv_idx <= seed.prefix_length || q_idx >= kv_idx;
}

static int port_document_causal(int64_t b, int64_t h, int64_t q_idx, int64_t kv_idx) {
    (void)b, (void)h;
    return q_idx >= kv_idx && seed.document_id[q_idx] == seed.document_id[kv_idx];
}

static int port_document(int64_t b, int64_t h, int64_t q_idx, int64_t kv_idx) {
    (void)b, (void)h;
    return seed.document_id[q_idx] == seed.document_id[kv_idx];
}

/* The seeds' get_x_y(idx) = (idx // W, idx % W), tabulated by coords_fill
 * (the 8192-token pictures evaluate it 2 x 67M times). */
static int64_t *coord_x, *coord_y;

static void coords_fill(int64_t len) {
    free(coord_x);
    free(coord_y);
    coord_x = malloc(sizeof(int64_t) * (size_t)len);
    coord_y = malloc(sizeof(int64_t) * (size_t)len);
    ck_assert(coord_x && coord_y);
    for (int64_t i = 0; i < len; i++)
        coord_x[i] = floordiv(i, seed.img_w), coord_y[i] = pymod(i, seed.img_w);
}

static void coords_free(void) {
    free(coord_x);
    free(coord_y);
    coord_x = coord_y = NULL;
}

static int port_sasa(int64_t b, int64_t h, int64_t q_idx, int64_t kv_idx) {
    (void)b, (void)h;
    int64_t q_x = coord_x[q_idx], q_y = coord_y[q_idx];
    int64_t kv_x = coord_x[kv_idx], kv_y = coord_y[kv_idx];
    return llabs(q_x - kv_x) <= seed.window && llabs(q_y - kv_y) <= seed.window;
}

static int port_natten(int64_t b, int64_t h, int64_t q_idx, int64_t kv_idx) {
    (void)b, (void)h;
    int64_t W = seed.img_w, H = seed.img_h, K_H = seed.k_h, K_W = seed.k_w;
    int64_t q_x = coord_x[q_idx], q_y = coord_y[q_idx];
    int64_t kv_x = coord_x[kv_idx], kv_y = coord_y[kv_idx];
    int64_t kernel_x = clampi(q_x, K_W / 2, (W - 1) - K_W / 2);
    int64_t kernel_y = clampi(q_y, K_H / 2, (H - 1) - K_H / 2);
    return llabs(kernel_x - kv_x) <= K_W / 2 && llabs(kernel_y - kv_y) <= K_H / 2;
}

static int port_njt_causal(int64_t b, int64_t h, int64_t q_idx, int64_t kv_idx) {
    (void)b, (void)h;
    int64_t q_nested = q_idx - seed.njt_offsets[seed.njt_seq_idx[q_idx]];
    int64_t kv_nested = kv_idx - seed.njt_offsets[seed.njt_seq_idx[kv_idx]];
    return q_nested >= kv_nested && seed.njt_seq_idx[q_idx] == seed.njt_seq_idx[kv_idx];
}

static int port_vision_x_attention(int64_t b, int64_t h, int64_t q_idx, int64_t kv_idx) {
    (void)b, (void)h;
    int64_t image_idx = seed.image_boundaries[kv_idx];
    const int64_t *interval = &seed.intervals[2 * image_idx];
    return q_idx >= interval[0] && q_idx < interval[1];
}

/* Score ports, in double. */
typedef double (*score_port)(double score, int64_t b, int64_t h, int64_t q_idx, int64_t kv_idx);

static struct {
    double softcap, alibi_heads;
    const float *alibi_bias, *clip;
} seed_score;

static double sport_checkerboard(double score, int64_t b, int64_t h, int64_t q, int64_t kv) {
    (void)b, (void)h;
    score = pymod(llabs(kv - q), 1) == 0 ? score * 0.5 : score;
    score = pymod(llabs(kv - q), 2) == 0 ? score * 2.0 : score;
    return score;
}

static double sport_noop(double score, int64_t b, int64_t h, int64_t q, int64_t kv) {
    (void)b, (void)h, (void)q, (void)kv;
    return score;
}

static double sport_causal_bias(double score, int64_t b, int64_t h, int64_t q, int64_t kv) {
    (void)b, (void)h;
    return q >= kv ? score : -INFINITY;
}

static double sport_alibi_closure(double score, int64_t b, int64_t h, int64_t q, int64_t kv) {
    (void)b;
    return score + seed_score.alibi_bias[h] * (double)(q - kv);
}

static double sport_alibi_functional(double score, int64_t b, int64_t h, int64_t q, int64_t kv) {
    (void)b;
    double scale = exp2(-((double)(h + 1) * 8.0 / seed_score.alibi_heads));
    return score + (double)(q - kv) * scale;
}

static double sport_tanh_soft_cap_2(double score, int64_t b, int64_t h, int64_t q, int64_t kv) {
    (void)b, (void)h, (void)q, (void)kv;
    return tanh(score / 2) * 2;
}

static double sport_soft_cap(double score, int64_t b, int64_t h, int64_t q, int64_t kv) {
    (void)b, (void)h, (void)q, (void)kv;
    return tanh(score / seed_score.softcap) * seed_score.softcap;
}

static double sport_head_clip(double score, int64_t b, int64_t h, int64_t q, int64_t kv) {
    (void)b, (void)q, (void)kv;
    double c = seed_score.clip[h];
    return score < -c ? -c : score > c ? c : score;
}

/* ------------------------------------------------------------------------
 * The mod means what the seed's function means: point-wise comparison
 * ---------------------------------------------------------------------- */

typedef struct host_views {
    mod_buffer_view views[IR_MAX_BUFFERS];
    void *copies[IR_MAX_BUFFERS];
    ir_value *scratch;
} host_views;

static void views_open(flex_context *ctx, const flex_mod *m, host_views *hv) {
    memset(hv, 0, sizeof *hv);
    ck_assert_int_eq(flex_mod_host_views(ctx, m, hv->views, hv->copies), FLEX_OK);
    hv->scratch = malloc(sizeof(ir_value) * (size_t)(m->ir.num_nodes + 1));
    ck_assert_ptr_nonnull(hv->scratch);
}

static void views_close(host_views *hv) {
    free(hv->scratch);
    flex_mod_release_host_views(hv->copies);
}

/* Every element of a q_len x kv_len mask, for heads [0, H). */
static void check_mask_points(flex_context *ctx, const flex_mod *m, mask_port port, int64_t H,
                              int64_t q_len, int64_t kv_len, const char *what) {
    host_views hv;
    views_open(ctx, m, &hv);
    for (int64_t h = 0; h < H; h++)
        for (int64_t i = 0; i < q_len; i++)
            for (int64_t j = 0; j < kv_len; j++) {
                ir_value r;
                mod_bounds_error err;
                memset(&err, 0, sizeof err);
                int rc = mod_eval_point(&m->ir, hv.views, 0.0f, 0, (int32_t)h, (int32_t)i,
                                        (int32_t)j, hv.scratch, &r, &err);
                if (rc != 0)
                    ck_abort_msg("%s: buffer read out of range at (%lld, %lld)", what, (long long)i,
                                 (long long)j);
                /* (ck_assert records every pass: too slow for every element) */
                if (!!r.i != !!port(0, h, i, j))
                    ck_abort_msg("%s: mod says %d, the seed's function %d at h=%lld q=%lld kv=%lld",
                                 what, r.i, port(0, h, i, j), (long long)h, (long long)i,
                                 (long long)j);
            }
    views_close(&hv);
}

/* The score mod against the port on a grid of scores, heads and positions. */
static void check_score_points(flex_context *ctx, const flex_mod *m, score_port port, int64_t H,
                               int64_t len, const char *what) {
    static const float scores[] = {-37.5f, -7.25f, -1.0f, -0.3f, 0.0f, 0.25f, 2.0f, 9.75f, 61.0f};
    host_views hv;
    views_open(ctx, m, &hv);
    for (int64_t h = 0; h < H; h++)
        for (int64_t i = 0; i < len; i += 3)
            for (int64_t j = 0; j < len; j += 5)
                for (size_t s = 0; s < sizeof scores / sizeof scores[0]; s++) {
                    ir_value r;
                    mod_bounds_error err;
                    memset(&err, 0, sizeof err);
                    int rc = mod_eval_point(&m->ir, hv.views, scores[s], 0, (int32_t)h, (int32_t)i,
                                            (int32_t)j, hv.scratch, &r, &err);
                    if (rc != 0) ck_abort_msg("%s: buffer read out of range", what);
                    double want = port(scores[s], 0, h, i, j), got = r.f;
                    if (isinf(want)) {
                        if (got != want) ck_abort_msg("%s: %g, want %g", what, got, want);
                        continue;
                    }
                    if (!(fabs(got - want) <= 2e-6 * fmax(1.0, fabs(want))))
                        ck_abort_msg("%s: score %g h=%lld q=%lld kv=%lld gives %.9g, the seed's "
                                     "function %.9g",
                                     what, scores[s], (long long)h, (long long)i, (long long)j, got,
                                     want);
                }
    views_close(&hv);
}

/* ------------------------------------------------------------------------
 * Attention against the fp64 oracle
 * ---------------------------------------------------------------------- */

typedef struct attn_case {
    int B, Hq, Hkv, Lq, Lkv, D, Dv;
    flex_dtype dtype;
    int bshd;              /* memory B,S,H,D (the jagged and training seeds) */
    float scale;           /* 0: 1/sqrt(D) */
    int q_block, kv_block; /* 0: 128 */
    int backward;          /* also dq, dk, dv (and grad_name's gradient) vs the oracle */
    const char *grad_name; /* a float buffer of the score mod, grad_len elements */
    int grad_len;
} attn_case;

typedef struct attn_result {
    double rel, lse_err;
    double *out; /* B*Hq*Lq*Dv values, (b, h, i, d) order; caller frees */
} attn_result;

static uint64_t rng_state;

static double rnd_normalish(void) {
    double s = 0.0;
    for (int i = 0; i < 4; i++) {
        rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
        s += (double)(rng_state >> 11) / 9007199254740992.0;
    }
    return (s - 2.0) * 1.7;
}

static flex_tensor host_tensor(flex_dtype dt, int bshd, int64_t B, int64_t H, int64_t S, int64_t D,
                               int random) {
    size_t n = (size_t)(B * H * S * D);
    void *mem = malloc(n * flex_dtype_size(dt) + 1);
    ck_assert_ptr_nonnull(mem);
    memset(mem, 0xff, n * flex_dtype_size(dt)); /* NaN poison in every dtype */
    flex_tensor t = bshd ? flex_tensor_bshd(mem, dt, B, H, S, D, FLEX_DEVICE_CPU)
                         : flex_tensor_bhsd(mem, dt, B, H, S, D, FLEX_DEVICE_CPU);
    if (random)
        for (size_t i = 0; i < n; i++) {
            float v = (float)rnd_normalish();
            flex_store_from_float(mem, dt, (int64_t)i, v);
        }
    return t;
}

/* Host tensor values in (b, h, s, d) order, as doubles (malloc'd). */
static double *tensor_values(const flex_tensor *t) {
    size_t n = (size_t)(t->sizes[0] * t->sizes[1] * t->sizes[2] * t->sizes[3]), k = 0;
    double *v = malloc(n * sizeof(double) + 1);
    ck_assert_ptr_nonnull(v);
    for (int64_t a = 0; a < t->sizes[0]; a++)
        for (int64_t b = 0; b < t->sizes[1]; b++)
            for (int64_t i = 0; i < t->sizes[2]; i++)
                for (int64_t d = 0; d < t->sizes[3]; d++)
                    v[k++] = oracle_load(t, a, b, i, d);
    return v;
}

/* The seeds' test_mask also checks the gradients of q, k and v: the CPU
 * backward against the fp64 oracle's, from the forward's out and lse. */
static void check_backward(flex_context *ctx, const attn_case *c, const oracle_problem *p,
                           const flex_block_mask *mask, const flex_tensor *out,
                           const flex_tensor *lse, const char *what) {
    flex_tensor dout = host_tensor(c->dtype, c->bshd, c->B, c->Hq, c->Lq, c->Dv, 1);
    flex_tensor dq = host_tensor(c->dtype, c->bshd, c->B, c->Hq, c->Lq, c->D, 0);
    flex_tensor dk = host_tensor(c->dtype, c->bshd, c->B, c->Hkv, c->Lkv, c->D, 0);
    flex_tensor dv = host_tensor(c->dtype, c->bshd, c->B, c->Hkv, c->Lkv, c->Dv, 0);
    float *grad = NULL;
    double *ref_grad = NULL;
    flex_buffer_grad bg;
    oracle_buffer_grad og;
    /* The buffer gradient sums ds' over every element weighted by what the
     * mod reads, with much cancellation; the tolerance rule measures it
     * against the naive reference's own error, which has the same
     * cancellation. */
    if (c->grad_name) {
        grad = calloc((size_t)c->grad_len, sizeof(float));
        ref_grad = calloc((size_t)c->grad_len, sizeof(double));
        ck_assert(grad && ref_grad);
        int64_t n = c->grad_len;
        bg.name = c->grad_name;
        bg.grad = flex_tensor_contiguous(grad, FLEX_F32, 1, &n, FLEX_DEVICE_CPU);
        og.name = c->grad_name;
        og.grad = ref_grad;
    }
    flex_attention_options opts;
    memset(&opts, 0, sizeof opts);
    opts.scale = c->scale;
    flex_status st =
        flex_attention_backward(ctx, &p->q, &p->k, &p->v, out, &dout, lse, p->score_mod, mask,
                                &opts, &dq, &dk, &dv, grad ? &bg : NULL, grad ? 1 : 0);
    ck_assert_msg(st == FLEX_OK, "%s: backward: %s", what, flex_error_message(ctx));

    size_t nq = (size_t)(c->B * c->Hq * c->Lq), nk = (size_t)(c->B * c->Hkv * c->Lkv);
    double *rdq = malloc(nq * (size_t)c->D * sizeof(double));
    double *rdk = malloc(nk * (size_t)c->D * sizeof(double));
    double *rdv = malloc(nk * (size_t)c->Dv * sizeof(double));
    ck_assert(rdq && rdk && rdv);
    char err[512];
    ck_assert_msg(oracle_backward(p, &dout, rdq, rdk, rdv, grad ? &og : NULL, grad ? 1 : 0, err,
                                  sizeof err) == 0,
                  "%s: backward oracle: %s", what, err);
    double *ndq = malloc(nq * (size_t)c->D * sizeof(double));
    double *ndk = malloc(nk * (size_t)c->D * sizeof(double));
    double *ndv = malloc(nk * (size_t)c->Dv * sizeof(double));
    double *naive_grad = grad ? calloc((size_t)c->grad_len, sizeof(double)) : NULL;
    ck_assert(ndq && ndk && ndv && (!grad || naive_grad));
    oracle_buffer_grad naive_og = {c->grad_name, naive_grad};
    ck_assert_msg(oracle_backward_naive(p, &dout, ndq, ndk, ndv, grad ? &naive_og : NULL,
                                        grad ? 1 : 0, err, sizeof err) == 0,
                  "%s: naive backward: %s", what, err);
    const flex_tensor *got[3] = {&dq, &dk, &dv};
    const double *ref[3] = {rdq, rdk, rdv}, *naive[3] = {ndq, ndk, ndv};
    static const char *names[3] = {"dq", "dk", "dv"};
    for (int t = 0; t < 3; t++) {
        double *g = tensor_values(got[t]);
        size_t n =
            (size_t)(got[t]->sizes[0] * got[t]->sizes[1] * got[t]->sizes[2] * got[t]->sizes[3]);
        tol_report r;
        int ok = tol_compare(c->dtype, TOL_GRADIENT, ref[t], naive[t], g, n, 0.0, &r);
        if (getenv("FLEXATTN_TEST_VERBOSE"))
            fprintf(stderr, "%-44s %s %.2f of bound\n", what, names[t], tol_margin(&r));
        ck_assert_msg(ok, "%s: %s: %s", what, names[t], r.why);
        free(g);
    }
    if (grad) {
        double *g = malloc(sizeof(double) * (size_t)c->grad_len);
        ck_assert_ptr_nonnull(g);
        for (int i = 0; i < c->grad_len; i++)
            g[i] = grad[i];
        tol_report r;
        int ok = tol_compare(c->dtype, TOL_GRADIENT, ref_grad, naive_grad, g,
                             (size_t)c->grad_len, 0.0, &r);
        if (getenv("FLEXATTN_TEST_VERBOSE"))
            fprintf(stderr, "%-44s grad %s %.2f of bound\n", what, c->grad_name,
                    tol_margin(&r));
        ck_assert_msg(ok, "%s: gradient of %s: %s", what, c->grad_name, r.why);
        free(g);
    }
    free(ndq);
    free(ndk);
    free(ndv);
    free(naive_grad);
    free(rdq);
    free(rdk);
    free(rdv);
    free(grad);
    free(ref_grad);
    free(dout.data);
    free(dq.data);
    free(dk.data);
    free(dv.data);
}

/* Runs flex_attention (block mask broadcast over batch and heads, as the
 * seeds' create_block_mask(mask_mod, 1, 1, ...)) and the oracle on the same
 * inputs; asserts no NaN, zero rows where everything is masked and errors
 * within DESIGN's bounds. q, k, v are returned through qkv when not NULL
 * (caller frees their data), else freed. */
static attn_result run_attention(flex_context *ctx, const attn_case *c, const flex_mod *score,
                                 const flex_mod *mask_mod, const char *what, flex_tensor *qkv) {
    rng_state = 0x9e3779b97f4a7c15ull ^ (uint64_t)(c->Lq * 131 + c->Lkv * 7 + c->D);
    flex_tensor q = host_tensor(c->dtype, c->bshd, c->B, c->Hq, c->Lq, c->D, 1);
    flex_tensor k = host_tensor(c->dtype, c->bshd, c->B, c->Hkv, c->Lkv, c->D, 1);
    flex_tensor v = host_tensor(c->dtype, c->bshd, c->B, c->Hkv, c->Lkv, c->Dv, 1);
    flex_tensor out = host_tensor(c->dtype, c->bshd, c->B, c->Hq, c->Lq, c->Dv, 0);
    flex_tensor lse = host_tensor(FLEX_F32, 0, c->B, c->Hq, c->Lq, 1, 0);

    flex_block_mask *mask = NULL;
    if (mask_mod) {
        flex_status st = flex_block_mask_create(ctx, mask_mod, 1, 1, c->Lq, c->Lkv, c->q_block,
                                                c->kv_block, &mask);
        ck_assert_msg(st == FLEX_OK, "%s: block mask: %s", what, flex_error_message(ctx));
    }
    flex_attention_options opts;
    memset(&opts, 0, sizeof opts);
    opts.scale = c->scale;
    flex_status st = flex_attention(ctx, &q, &k, &v, score, mask, &opts, &out, &lse);
    ck_assert_msg(st == FLEX_OK, "%s: flex_attention: %s", what, flex_error_message(ctx));

    size_t rows = (size_t)c->B * c->Hq * c->Lq;
    double *ref = malloc(rows * (size_t)c->Dv * sizeof(double));
    double *got = malloc(rows * (size_t)c->Dv * sizeof(double));
    double *ref_lse = malloc(rows * sizeof(double));
    double *got_lse = malloc(rows * sizeof(double));
    ck_assert(ref && got && ref_lse && got_lse);
    oracle_problem p;
    memset(&p, 0, sizeof p);
    p.ctx = ctx;
    p.q = q, p.k = k, p.v = v;
    p.score_mod = score;
    p.mask_mod = mask_mod;
    p.scale = c->scale;
    char err[512];
    ck_assert_msg(oracle_forward(&p, ref, ref_lse, err, sizeof err) == 0, "%s: oracle: %s", what,
                  err);
    size_t n = 0;
    for (int b = 0; b < c->B; b++)
        for (int h = 0; h < c->Hq; h++)
            for (int i = 0; i < c->Lq; i++, n++) {
                for (int d = 0; d < c->Dv; d++) {
                    double x = oracle_load(&out, b, h, i, d);
                    if (isnan(x)) ck_abort_msg("%s: out[%d][%d][%d][%d] is NaN", what, b, h, i, d);
                    if (ref_lse[n] == -INFINITY && x != 0.0)
                        ck_abort_msg("%s: fully masked row %d gives %g", what, i, x);
                    got[n * c->Dv + d] = x;
                }
                got_lse[n] = oracle_load(&lse, b, h, i, 0);
            }
    attn_result r;
    r.rel = oracle_rel_error(ref, got, rows * (size_t)c->Dv);
    r.lse_err = oracle_lse_error(ref_lse, got_lse, rows);
    r.out = got;
    double *naive = malloc(rows * (size_t)c->Dv * sizeof(double));
    double *naive_lse = malloc(rows * sizeof(double));
    ck_assert(naive && naive_lse);
    ck_assert_msg(oracle_forward_naive(&p, naive, naive_lse, err, sizeof err) == 0,
                  "%s: naive: %s", what, err);
    tol_report out_r, lse_r;
    int out_ok =
        tol_compare(c->dtype, TOL_OUTPUT, ref, naive, got, rows * (size_t)c->Dv, 0.0, &out_r);
    int lse_ok = tol_compare(c->dtype, TOL_LSE, ref_lse, naive_lse, got_lse, rows, 0.0, &lse_r);
    if (getenv("FLEXATTN_TEST_VERBOSE"))
        fprintf(stderr, "%-44s out %.2f lse %.2f of bound\n", what, tol_margin(&out_r),
                tol_margin(&lse_r));
    ck_assert_msg(out_ok, "%s: %s", what, out_r.why);
    ck_assert_msg(lse_ok, "%s: %s", what, lse_r.why);
    free(naive);
    free(naive_lse);
    if (c->backward) check_backward(ctx, c, &p, mask, &out, &lse, what);
    free(ref);
    free(ref_lse);
    free(got_lse);
    flex_block_mask_destroy(mask);
    if (qkv) {
        qkv[0] = q, qkv[1] = k, qkv[2] = v;
    } else {
        free(q.data);
        free(k.data);
        free(v.data);
    }
    free(out.data);
    free(lse.data);
    return r;
}

/* A seed example forward and backward at f32, f16 and bf16 (the notebook
 * benchmarks at f16, the training request trains in bf16). */
static void check_seed(flex_context *ctx, attn_case c, const flex_mod *score,
                       const flex_mod *mask_mod, const char *what) {
    /* The fp64 oracles dominate the run time: at most 160 positions (still
     * several blocks of 32, the masks' patterns intact), and the half
     * precision runs with a small head dim. */
    static const flex_dtype dtypes[] = {FLEX_F32, FLEX_F16, FLEX_BF16};
    if (c.Lq > 160) c.Lq = 160;
    if (c.Lkv > 160) c.Lkv = 160;
    c.backward = 1;
    for (int d = 0; d < 3; d++) {
        char name[128];
        if (d > 0) c.D = c.Dv = 16;
        c.dtype = dtypes[d];
        snprintf(name, sizeof name, "%s %s D%d", what, flex_dtype_name(dtypes[d]), c.D);
        attn_result r = run_attention(ctx, &c, score, mask_mod, name, NULL);
        free(r.out);
    }
}

/* ------------------------------------------------------------------------
 * Block classes and pictures at the seeds' sizes
 * ---------------------------------------------------------------------- */

/* The kv interval [lo, hi] a query row attends (empty when lo > hi): every
 * seed mask but SASA and NATTEN attends one interval per row. */
typedef void (*row_interval)(int64_t q, int64_t kv_len, int64_t *lo, int64_t *hi);

static void rows_causal(int64_t q, int64_t kv_len, int64_t *lo, int64_t *hi) {
    (void)kv_len;
    *lo = 0, *hi = q;
}

static void rows_sliding_window(int64_t q, int64_t kv_len, int64_t *lo, int64_t *hi) {
    (void)kv_len;
    *lo = q - seed.sliding_window > 0 ? q - seed.sliding_window : 0, *hi = q;
}

static void rows_prefix_lm(int64_t q, int64_t kv_len, int64_t *lo, int64_t *hi) {
    *lo = 0, *hi = q > seed.prefix_length ? q : seed.prefix_length;
    if (*hi > kv_len - 1) *hi = kv_len - 1;
}

/* Start of the document holding each token, filled by doc_starts_fill. */
static int64_t *doc_start;

static void doc_starts_fill(int64_t len) {
    free(doc_start);
    doc_start = malloc(sizeof(int64_t) * (size_t)len);
    ck_assert_ptr_nonnull(doc_start);
    for (int64_t t = 0; t < len; t++)
        doc_start[t] =
            t > 0 && seed.document_id[t - 1] == seed.document_id[t] ? doc_start[t - 1] : t;
}

static void rows_document_causal(int64_t q, int64_t kv_len, int64_t *lo, int64_t *hi) {
    (void)kv_len;
    *lo = doc_start[q], *hi = q;
}

/* Block classes from row intervals: a block is full when every row covers
 * all its columns, empty when no row touches them. */
static uint8_t *classes_from_rows(row_interval rows, int64_t q_len, int64_t kv_len, int qb,
                                  int kb) {
    int64_t nq = (q_len + qb - 1) / qb, nk = (kv_len + kb - 1) / kb;
    uint8_t *cls = malloc((size_t)(nq * nk));
    ck_assert_ptr_nonnull(cls);
    for (int64_t i = 0; i < nq; i++)
        for (int64_t j = 0; j < nk; j++) {
            int64_t k0 = j * kb, k1 = (j + 1) * kb < kv_len ? (j + 1) * kb : kv_len;
            int any = 0, all = 1;
            for (int64_t q = i * qb; q < (i + 1) * qb && q < q_len; q++) {
                int64_t lo, hi;
                rows(q, kv_len, &lo, &hi);
                int64_t a = lo > k0 ? lo : k0, b = hi < k1 - 1 ? hi : k1 - 1;
                if (a <= b) any = 1;
                if (!(lo <= k0 && hi >= k1 - 1)) all = 0;
            }
            cls[i * nk + j] = all ? FLEX_BLOCK_FULL : any ? FLEX_BLOCK_PARTIAL : FLEX_BLOCK_EMPTY;
        }
    return cls;
}

/* Block classes by evaluating the port at every element. */
static uint8_t *classes_from_port(mask_port port, int64_t q_len, int64_t kv_len, int qb, int kb) {
    int64_t nq = (q_len + qb - 1) / qb, nk = (kv_len + kb - 1) / kb;
    uint8_t *cls = malloc((size_t)(nq * nk));
    ck_assert_ptr_nonnull(cls);
    for (int64_t i = 0; i < nq; i++)
        for (int64_t j = 0; j < nk; j++) {
            int64_t seen_true = 0, seen_false = 0;
            for (int64_t q = i * qb; q < (i + 1) * qb && q < q_len; q++)
                for (int64_t kv = j * kb; kv < (j + 1) * kb && kv < kv_len; kv++) {
                    if (port(0, 0, q, kv))
                        seen_true = 1;
                    else
                        seen_false = 1;
                }
            cls[i * nk + j] = !seen_false ? FLEX_BLOCK_FULL
                              : seen_true ? FLEX_BLOCK_PARTIAL
                                          : FLEX_BLOCK_EMPTY;
        }
    return cls;
}

/* The picture the seed's legend describes: one line per row of cells, "██"
 * full, "░░" partial, "  " empty, trailing blanks dropped; a cell covers
 * group x group blocks and shows the densest of them. */
static char *render_picture(const uint8_t *cls, int64_t nq, int64_t nk, int64_t group) {
    static const char *glyph[3] = {"  ", "\xe2\x96\x91\xe2\x96\x91", "\xe2\x96\x88\xe2\x96\x88"};
    int64_t rows = nq / group, cols = nk / group;
    char *text = malloc((size_t)(rows * (cols * 6 + 1) + 1));
    ck_assert_ptr_nonnull(text);
    size_t len = 0;
    for (int64_t r = 0; r < rows; r++) {
        int64_t last = 0;
        size_t start = len;
        for (int64_t c = 0; c < cols; c++) {
            int cell = FLEX_BLOCK_EMPTY;
            for (int64_t i = r * group; i < (r + 1) * group; i++)
                for (int64_t j = c * group; j < (c + 1) * group; j++)
                    if (cls[i * nk + j] > cell) cell = cls[i * nk + j];
            memcpy(text + len, glyph[cell], strlen(glyph[cell]));
            len += strlen(glyph[cell]);
            if (cell != FLEX_BLOCK_EMPTY) last = (int64_t)(len - start);
        }
        len = start + (size_t)last;
        text[len++] = '\n';
    }
    text[len] = '\0';
    return text;
}

/* Builds the mask of mod at the seed's sizes (B = H = 1, 128 x 128 blocks
 * unless told), compares its classes with `want` and its print with the
 * picture of `want`, and checks the header's sparsity. */
static void check_block_mask(flex_context *ctx, const flex_mod *mod, int64_t q_len, int64_t kv_len,
                             int block, const uint8_t *want, const char *what) {
    flex_block_mask *mask = NULL;
    flex_status st = flex_block_mask_create(ctx, mod, 1, 1, q_len, kv_len, block, block, &mask);
    ck_assert_msg(st == FLEX_OK, "%s: %s", what, flex_error_message(ctx));
    flex_block_mask_shape shape;
    ck_assert_int_eq(flex_block_mask_get_shape(mask, &shape), FLEX_OK);
    int64_t nq = shape.num_q_blocks, nk = shape.num_kv_blocks;
    ck_assert_int_eq(shape.q_block, block ? block : 128);
    uint8_t *got = malloc((size_t)(nq * nk));
    ck_assert_ptr_nonnull(got);
    ck_assert_int_eq(flex_block_mask_to_dense(mask, got), FLEX_OK);
    int64_t empty = 0;
    for (int64_t i = 0; i < nq; i++)
        for (int64_t j = 0; j < nk; j++) {
            if (got[i * nk + j] != want[i * nk + j])
                ck_abort_msg("%s: block (%lld, %lld) is %d, the seed's function makes it %d", what,
                             (long long)i, (long long)j, got[i * nk + j], want[i * nk + j]);
            empty += want[i * nk + j] == FLEX_BLOCK_EMPTY;
        }

    /* The print: a header, a (b, h) line, then the picture (shrunk to 64
     * cells a side, as the default). */
    size_t need = flex_block_mask_format(mask, 0, 0, 64, NULL, 0);
    char *pic = malloc(need + 1);
    ck_assert_ptr_nonnull(pic);
    ck_assert_uint_eq(flex_block_mask_format(mask, 0, 0, 64, pic, need + 1), need);
    char sparsity[64];
    snprintf(sparsity, sizeof sparsity, "sparsity=%.2f%%",
             100.0 * (double)empty / (double)(nq * nk));
    ck_assert_msg(strstr(pic, sparsity) != NULL, "%s: header lacks '%s':\n%s", what, sparsity, pic);
    const char *body = strchr(pic, '\n');
    ck_assert_ptr_nonnull(body);
    body = strchr(body + 1, '\n');
    ck_assert_ptr_nonnull(body);
    int64_t group = nq > 64 ? nq / 64 : 1;
    ck_assert_int_eq(nq % group, 0);
    char *want_pic = render_picture(want, nq, nk, group);
    ck_assert_msg(strcmp(body + 1, want_pic) == 0, "%s: picture differs:\n%s\nwanted:\n%s", what,
                  body + 1, want_pic);
    free(want_pic);
    free(pic);
    free(got);
    flex_block_mask_destroy(mask);
}

/* ------------------------------------------------------------------------
 * The notebook walk-through (FlexAttention API usage)
 * ---------------------------------------------------------------------- */

/* "Basic usage": the checkerboard score mod, no block mask, f32
 * (8, 8, 2048, 64 in the seed). */
START_TEST(test_checkerboard) {
    flex_context *ctx = cpu_context();
    flex_mod *m = compile_mod(ctx, FLEX_MOD_SCORE,
                              "let token_q = q_idx; let token_kv = kv_idx;\n"
                              "let score1 = where(abs(token_kv - token_q) % 1 == 0, score * 0.5, "
                              "score);\n"
                              "where(abs(token_kv - token_q) % 2 == 0, score1 * 2.0, score1)",
                              NULL, 0, NULL, 0);
    check_score_points(ctx, m, sport_checkerboard, 1, 40, "checkerboard");
    flex_mod *preset = compile_preset(ctx, "checkerboard", NULL, 0);
    assert_same_mod(m, preset, "checkerboard");
    attn_case c = {2, 2, 2, 150, 150, 64, 64, FLEX_F32, 0, 0, 0, 0, 0, NULL, 0};
    check_seed(ctx, c, m, NULL, "checkerboard");
    flex_mod_destroy(preset);
    flex_mod_destroy(m);
    flex_context_destroy(ctx);
}
END_TEST

/* "Full attention": noop, whose block mask the seed prints as None. */
START_TEST(test_noop) {
    flex_context *ctx = cpu_context();
    flex_mod *m = compile_mod(ctx, FLEX_MOD_SCORE, "score", NULL, 0, NULL, 0);
    check_score_points(ctx, m, sport_noop, 1, 20, "noop");
    flex_mod *preset = compile_preset(ctx, "noop", NULL, 0);
    assert_same_mod(m, preset, "noop");
    attn_case c = {1, 2, 2, 200, 200, 64, 64, FLEX_F32, 0, 0, 0, 0, 0, NULL, 0};
    attn_result r = run_attention(ctx, &c, m, NULL, "noop", NULL);
    /* The same with no score mod at all (flex_attention(q, k, v)). */
    attn_result r0 = run_attention(ctx, &c, NULL, NULL, "no mods", NULL);
    ck_assert(oracle_rel_error(r0.out, r.out, (size_t)200 * 2 * 64) < 1e-6);
    free(r.out);
    free(r0.out);
    check_seed(ctx, c, m, NULL, "noop");
    flex_mod_destroy(preset);
    flex_mod_destroy(m);
    flex_context_destroy(ctx);
}
END_TEST

/* "Standard causal mask", both as a score mod (causal_bias) and as a mask
 * mod (causal_mask): the same attention, the mask skipping blocks. */
START_TEST(test_causal) {
    flex_context *ctx = cpu_context();
    flex_mod *bias =
        compile_mod(ctx, FLEX_MOD_SCORE, "where(q_idx >= kv_idx, score, -inf)", NULL, 0, NULL, 0);
    flex_mod *mask = compile_mod(ctx, FLEX_MOD_MASK, "q_idx >= kv_idx", NULL, 0, NULL, 0);
    check_score_points(ctx, bias, sport_causal_bias, 1, 30, "causal_bias");
    check_mask_points(ctx, mask, port_causal, 1, 70, 70, "causal_mask");
    flex_mod *p1 = compile_preset(ctx, "causal_score", NULL, 0);
    flex_mod *p2 = compile_preset(ctx, "causal", NULL, 0);
    assert_same_mod(bias, p1, "causal_bias");
    assert_same_mod(mask, p2, "causal_mask");

    attn_case c = {1, 2, 2, 300, 300, 64, 64, FLEX_F32, 0, 0, 0, 0, 0, NULL, 0};
    attn_result rb = run_attention(ctx, &c, bias, NULL, "causal_bias", NULL);
    attn_result rm = run_attention(ctx, &c, NULL, mask, "causal_mask", NULL);
    ck_assert(oracle_rel_error(rb.out, rm.out, (size_t)300 * 2 * 64) < 1e-5);
    free(rb.out);
    free(rm.out);
    check_seed(ctx, c, bias, NULL, "causal_bias");
    check_seed(ctx, c, NULL, mask, "causal_mask");

    /* The print at the notebook's size: S = 8192, 128 x 128 blocks. */
    uint8_t *want = classes_from_rows(rows_causal, 8192, 8192, 128, 128);
    check_block_mask(ctx, mask, 8192, 8192, 0, want, "causal 8192");
    free(want);
    /* And a small one written out: the lower triangle of the legend. */
    flex_block_mask *bm = NULL;
    ck_assert_int_eq(flex_block_mask_create(ctx, mask, 1, 1, 512, 512, 128, 128, &bm), FLEX_OK);
    char pic[1024];
    flex_block_mask_format(bm, 0, 0, 64, pic, sizeof pic);
    const char *body = strchr(strchr(pic, '\n') + 1, '\n') + 1;
    ck_assert_str_eq(body,
                     "\xe2\x96\x91\xe2\x96\x91\n"
                     "\xe2\x96\x88\xe2\x96\x88\xe2\x96\x91\xe2\x96\x91\n"
                     "\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x91\xe2\x96\x91\n"
                     "\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88"
                     "\xe2\x96\x91\xe2\x96\x91\n");
    flex_block_mask_destroy(bm);
    flex_mod_destroy(p1);
    flex_mod_destroy(p2);
    flex_mod_destroy(bias);
    flex_mod_destroy(mask);
    flex_context_destroy(ctx);
}
END_TEST

/* "Sliding window attention" + causal, SLIDING_WINDOW = 1024. */
START_TEST(test_sliding_window) {
    flex_context *ctx = cpu_context();
    const char *text = "let causal_mask = q_idx >= kv_idx;\n"
                       "let windowed_mask = q_idx - kv_idx <= SLIDING_WINDOW;\n"
                       "causal_mask & windowed_mask";
    flex_param seed_param = {"SLIDING_WINDOW", 0, 1024};
    flex_mod *m = compile_mod(ctx, FLEX_MOD_MASK, text, &seed_param, 1, NULL, 0);
    flex_mod *preset = compile_preset(ctx, "sliding_window", NULL, 0);
    assert_same_mod(m, preset, "sliding_window_causal_mask");

    seed.sliding_window = 1024;
    uint8_t *want = classes_from_rows(rows_sliding_window, 8192, 8192, 128, 128);
    check_block_mask(ctx, m, 8192, 8192, 0, want, "sliding window 8192");
    free(want);

    /* Attention at a small size, the window scaled with the length. */
    flex_param small = {"SLIDING_WINDOW", 0, 40};
    flex_mod *ms = compile_mod(ctx, FLEX_MOD_MASK, text, &small, 1, NULL, 0);
    seed.sliding_window = 40;
    check_mask_points(ctx, ms, port_sliding_window_causal, 1, 200, 200, "sliding window");
    attn_case c = {1, 2, 2, 320, 320, 64, 64, FLEX_F32, 0, 0, 32, 32, 0, NULL, 0};
    check_seed(ctx, c, NULL, ms, "sliding_window_causal");
    flex_mod_destroy(ms);
    flex_mod_destroy(preset);
    flex_mod_destroy(m);
    flex_context_destroy(ctx);
}
END_TEST

/* "Prefix LM (bidirectional + causal)", PREFIX_LENGTH = 2048. */
START_TEST(test_prefix_lm) {
    flex_context *ctx = cpu_context();
    const char *text = "let prefix_mask = kv_idx <= PREFIX_LENGTH;\n"
                       "let causal_mask = q_idx >= kv_idx;\n"
                       "prefix_mask | causal_mask";
    flex_param seed_param = {"PREFIX_LENGTH", 0, 2048};
    flex_mod *m = compile_mod(ctx, FLEX_MOD_MASK, text, &seed_param, 1, NULL, 0);
    flex_mod *preset = compile_preset(ctx, "prefix_lm", NULL, 0);
    assert_same_mod(m, preset, "prefix_lm_causal_mask");

    seed.prefix_length = 2048;
    uint8_t *want = classes_from_rows(rows_prefix_lm, 8192, 8192, 128, 128);
    check_block_mask(ctx, m, 8192, 8192, 0, want, "prefix lm 8192");
    free(want);

    flex_param small = {"PREFIX_LENGTH", 0, 80};
    flex_mod *ms = compile_mod(ctx, FLEX_MOD_MASK, text, &small, 1, NULL, 0);
    seed.prefix_length = 80;
    check_mask_points(ctx, ms, port_prefix_lm_causal, 1, 200, 200, "prefix lm");
    attn_case c = {1, 2, 2, 320, 320, 64, 64, FLEX_F32, 0, 0, 32, 32, 0, NULL, 0};
    check_seed(ctx, c, NULL, ms, "prefix_lm_causal");
    flex_mod_destroy(ms);
    flex_mod_destroy(preset);
    flex_mod_destroy(m);
    flex_context_destroy(ctx);
}
END_TEST

/* "Document masking": document_causal_mask with the seed's document_id, at
 * S = 32768 (documents of 4096, 4096, 8192, 8192, 8192 tokens) and at the
 * S = 8192 variant (4096, 4096). */
START_TEST(test_document_causal) {
    flex_context *ctx = cpu_context();
    static const flex_buffer_decl decl[] = {{"document_id", FLEX_I32, 1}};
    const char *text = "let causal_mask = q_idx >= kv_idx;\n"
                       "let document_mask = document_id[q_idx] == document_id[kv_idx];\n"
                       "causal_mask & document_mask";
    flex_mod *m = compile_mod(ctx, FLEX_MOD_MASK, text, NULL, 0, decl, 1);

    static const int long_docs[] = {4096, 4096, 8192, 8192, 8192};
    int32_t *ids = doc_ids_from_lengths(long_docs, 5, 32768);
    bind_buffer(ctx, m, "document_id", ids, FLEX_I32, 1, 32768, 0);
    seed.document_id = ids;
    doc_starts_fill(32768);
    uint8_t *want = classes_from_rows(rows_document_causal, 32768, 32768, 128, 128);
    check_block_mask(ctx, m, 32768, 32768, 0, want, "document causal 32768");
    free(want);
    free(ids);

    static const int short_docs[] = {4096, 4096};
    ids = doc_ids_from_lengths(short_docs, 2, 8192);
    bind_buffer(ctx, m, "document_id", ids, FLEX_I32, 1, 8192, 0);
    seed.document_id = ids;
    doc_starts_fill(8192);
    want = classes_from_rows(rows_document_causal, 8192, 8192, 128, 128);
    free(doc_start);
    doc_start = NULL;
    check_block_mask(ctx, m, 8192, 8192, 0, want, "document causal 8192");
    free(want);
    free(ids);

    /* Attention: the seed's document lengths divided by 128 and uneven, so
     * documents end inside blocks. */
    static const int small_docs[] = {37, 32, 70, 64, 97};
    ids = doc_ids_from_lengths(small_docs, 5, 300);
    bind_buffer(ctx, m, "document_id", ids, FLEX_I32, 1, 300, 0);
    seed.document_id = ids;
    check_mask_points(ctx, m, port_document_causal, 1, 300, 300, "document causal");
    attn_case c = {1, 2, 2, 300, 300, 64, 64, FLEX_F32, 0, 0, 32, 32, 0, NULL, 0};
    check_seed(ctx, c, NULL, m, "document_causal");
    free(ids);
    flex_mod_destroy(m);
    flex_context_destroy(ctx);
}
END_TEST

/* "Stand-alone self-attention masking": H = W = 128, WINDOW = 8. */
START_TEST(test_sasa) {
    flex_context *ctx = cpu_context();
    const char *text = "let q_x = q_idx // W; let q_y = q_idx % W;\n"
                       "let kv_x = kv_idx // W; let kv_y = kv_idx % W;\n"
                       "let horizontal_mask = abs(q_x - kv_x) <= WINDOW;\n"
                       "let vertical_mask = abs(q_y - kv_y) <= WINDOW;\n"
                       "horizontal_mask & vertical_mask";
    flex_param params[] = {{"H", 0, 128}, {"W", 0, 128}, {"WINDOW", 0, 8}};
    /* H is unused by the seed's function: a param the text does not read
     * is allowed. */
    flex_mod *m = compile_mod(ctx, FLEX_MOD_MASK, text, params, 3, NULL, 0);
    flex_mod *preset = compile_preset(ctx, "sasa", NULL, 0);
    assert_same_mod(m, preset, "sasa_mask");

    seed.img_w = 128, seed.window = 8;
    coords_fill(8192);
    uint8_t *want = classes_from_port(port_sasa, 8192, 8192, 128, 128);
    check_block_mask(ctx, m, 8192, 8192, 0, want, "sasa 8192");
    free(want);

    flex_param small[] = {{"H", 0, 16}, {"W", 0, 16}, {"WINDOW", 0, 2}};
    flex_mod *ms = compile_mod(ctx, FLEX_MOD_MASK, text, small, 3, NULL, 0);
    seed.img_w = 16, seed.window = 2;
    coords_fill(256);
    check_mask_points(ctx, ms, port_sasa, 1, 256, 256, "sasa");
    attn_case c = {1, 2, 2, 256, 256, 64, 64, FLEX_F32, 0, 0, 32, 32, 0, NULL, 0};
    check_seed(ctx, c, NULL, ms, "sasa");
    coords_free();
    flex_mod_destroy(ms);
    flex_mod_destroy(preset);
    flex_mod_destroy(m);
    flex_context_destroy(ctx);
}
END_TEST

/* "NATTEN masking": H = W = 128, K_H = K_W = 7. */
START_TEST(test_natten) {
    flex_context *ctx = cpu_context();
    const char *text =
        "let q_x = q_idx // W; let q_y = q_idx % W;\n"
        "let kv_x = kv_idx // W; let kv_y = kv_idx % W;\n"
        "# kernel nominally attempts to center itself on the query, but kernel center\n"
        "# is clamped to a fixed distance (kernel half-length) from the canvas edge\n"
        "let kernel_x = clamp(q_x, K_W // 2, (W - 1) - K_W // 2);\n"
        "let kernel_y = clamp(q_y, K_H // 2, (H - 1) - K_H // 2);\n"
        "let hori_mask = abs(kernel_x - kv_x) <= K_W // 2;\n"
        "let vert_mask = abs(kernel_y - kv_y) <= K_H // 2;\n"
        "hori_mask & vert_mask";
    flex_param params[] = {{"H", 0, 128}, {"W", 0, 128}, {"K_H", 0, 7}, {"K_W", 0, 7}};
    flex_mod *m = compile_mod(ctx, FLEX_MOD_MASK, text, params, 4, NULL, 0);
    flex_mod *preset = compile_preset(ctx, "natten", NULL, 0);
    assert_same_mod(m, preset, "natten_mask");

    seed.img_h = 128, seed.img_w = 128, seed.k_h = 7, seed.k_w = 7;
    coords_fill(8192);
    uint8_t *want = classes_from_port(port_natten, 8192, 8192, 128, 128);
    check_block_mask(ctx, m, 8192, 8192, 0, want, "natten 8192");
    free(want);

    /* A non-square image and kernel, so that a swapped axis would show. */
    flex_param small[] = {{"H", 0, 12}, {"W", 0, 20}, {"K_H", 0, 3}, {"K_W", 0, 5}};
    flex_mod *ms = compile_mod(ctx, FLEX_MOD_MASK, text, small, 4, NULL, 0);
    seed.img_h = 12, seed.img_w = 20, seed.k_h = 3, seed.k_w = 5;
    coords_fill(240);
    check_mask_points(ctx, ms, port_natten, 1, 240, 240, "natten");
    attn_case c = {1, 2, 2, 240, 240, 64, 64, FLEX_F32, 0, 0, 32, 32, 0, NULL, 0};
    check_seed(ctx, c, NULL, ms, "natten");
    coords_free();
    flex_mod_destroy(ms);
    flex_mod_destroy(preset);
    flex_mod_destroy(m);
    flex_context_destroy(ctx);
}
END_TEST

/* "Alibi bias", both ways the seed writes it, with the causal mask: the
 * closure over a tensor of per-head slopes (a buffer) and the functional
 * form computing the slope in the mod (H = 4 here; the seed leaves H to the
 * reader). */
START_TEST(test_alibi) {
    flex_context *ctx = cpu_context();
    enum { HEADS = 4 };
    float alibi_bias[HEADS];
    for (int h = 0; h < HEADS; h++)
        alibi_bias[h] = (float)exp2(-((h + 1) * 8.0 / HEADS));
    static const flex_buffer_decl decl[] = {{"alibi_bias", FLEX_F32, 1}};
    flex_mod *closure = compile_mod(ctx, FLEX_MOD_SCORE,
                                    "let bias = alibi_bias[h] * (q_idx - kv_idx);\n"
                                    "score + bias",
                                    NULL, 0, decl, 1);
    bind_buffer(ctx, closure, "alibi_bias", alibi_bias, FLEX_F32, 1, HEADS, 0);
    flex_param hp = {"H", 0, HEADS};
    flex_mod *functional = compile_mod(ctx, FLEX_MOD_SCORE,
                                       "let scale = exp2(-((h + 1) * 8.0 / H));\n"
                                       "let bias = (q_idx - kv_idx) * scale;\n"
                                       "score + bias",
                                       &hp, 1, NULL, 0);
    seed_score.alibi_bias = alibi_bias;
    seed_score.alibi_heads = HEADS;
    check_score_points(ctx, closure, sport_alibi_closure, HEADS, 60, "alibi closure");
    check_score_points(ctx, functional, sport_alibi_functional, HEADS, 60, "alibi functional");
    flex_param nh = {"NH", 0, HEADS};
    flex_mod *preset = compile_preset(ctx, "alibi_functional", &nh, 1);
    assert_same_mod(functional, preset, "alibi_and_causal_functional");

    flex_mod *causal = compile_mod(ctx, FLEX_MOD_MASK, "q_idx >= kv_idx", NULL, 0, NULL, 0);
    attn_case c = {1, HEADS, HEADS, 128, 128, 64, 64, FLEX_F32, 0, 0, 0, 0, 0, NULL, 0};
    attn_result a = run_attention(ctx, &c, closure, causal, "alibi closure + causal", NULL);
    attn_result b = run_attention(ctx, &c, functional, causal, "alibi functional + causal", NULL);
    /* The two spellings compute the same slopes. */
    ck_assert(oracle_rel_error(a.out, b.out, (size_t)HEADS * 128 * 64) < 1e-5);
    free(a.out);
    free(b.out);
    /* Backward too, with the gradient of the captured alibi_bias tensor. */
    attn_case with_grad = c;
    with_grad.grad_name = "alibi_bias";
    with_grad.grad_len = HEADS;
    check_seed(ctx, with_grad, closure, causal, "alibi closure + causal");
    check_seed(ctx, c, functional, causal, "alibi functional + causal");
    flex_mod_destroy(causal);
    flex_mod_destroy(preset);
    flex_mod_destroy(closure);
    flex_mod_destroy(functional);
    flex_context_destroy(ctx);
}
END_TEST

/* "Tanh soft-capping" with the approximate tanh (score / 2, tanh_approx,
 * * 2) and the causal mask. On the CPU tanh_approx is the exact tanh. */
START_TEST(test_tanh_soft_cap) {
    flex_context *ctx = cpu_context();
    flex_mod *m = compile_mod(ctx, FLEX_MOD_SCORE,
                              "let score1 = score / 2;\n"
                              "let score2 = tanh_approx(score1);\n"
                              "score2 * 2",
                              NULL, 0, NULL, 0);
    check_score_points(ctx, m, sport_tanh_soft_cap_2, 1, 20, "tanh_soft_cap");
    flex_mod *causal = compile_preset(ctx, "causal", NULL, 0);
    attn_case c = {1, 2, 2, 200, 200, 64, 64, FLEX_F32, 0, 0, 0, 0, 0, NULL, 0};
    check_seed(ctx, c, m, causal, "tanh_soft_cap + causal");
    flex_mod_destroy(causal);
    flex_mod_destroy(m);
    flex_context_destroy(ctx);
}
END_TEST

/* "Nested jagged tensor": 16 sequences of random lengths (the last pads the
 * total to a multiple of 128) packed into one, the NJT wrapper around the
 * causal mask with the seed's int64 offsets and seq_idx, and q, k, v as
 * the seed passes them: values.view(1, -1, n_heads, D).transpose(1, 2),
 * i.e. BSHD memory. Checked against the oracle and, as the seed checks it
 * against per-sequence causal SDPA, against causal attention run on each
 * sequence alone. */
START_TEST(test_njt) {
    flex_context *ctx = cpu_context();
    enum { SEQS = 16, HEADS = 2, D = 32 };
    int64_t lengths[SEQS], total = 0;
    uint64_t r = 12345;
    for (int i = 0; i < SEQS - 1; i++) {
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        lengths[i] = 1 + (int64_t)((r >> 33) % 40);
        total += lengths[i];
    }
    lengths[SEQS - 1] = 128 - total % 128;
    total += lengths[SEQS - 1];
    ck_assert_int_eq(total % 128, 0);
    int64_t offsets[SEQS + 1];
    offsets[0] = 0;
    for (int i = 0; i < SEQS; i++)
        offsets[i + 1] = offsets[i] + lengths[i];
    int64_t *seq_idx = malloc(sizeof(int64_t) * (size_t)total);
    ck_assert_ptr_nonnull(seq_idx);
    for (int i = 0; i < SEQS; i++)
        for (int64_t t = offsets[i]; t < offsets[i + 1]; t++)
            seq_idx[t] = i;

    static const flex_buffer_decl decl[] = {{"offsets", FLEX_I64, 1}, {"seq_idx", FLEX_I64, 1}};
    flex_mod *m = compile_mod(ctx, FLEX_MOD_MASK,
                              "let q_nested = q_idx - offsets[seq_idx[q_idx]];\n"
                              "let kv_nested = kv_idx - offsets[seq_idx[kv_idx]];\n"
                              "let is_same_sequence = seq_idx[q_idx] == seq_idx[kv_idx];\n"
                              "(q_nested >= kv_nested) & is_same_sequence",
                              NULL, 0, decl, 2);
    bind_buffer(ctx, m, "offsets", offsets, FLEX_I64, 1, SEQS + 1, 0);
    bind_buffer(ctx, m, "seq_idx", seq_idx, FLEX_I64, 1, total, 0);
    seed.njt_offsets = offsets, seed.njt_seq_idx = seq_idx;
    check_mask_points(ctx, m, port_njt_causal, 1, total, total, "njt causal");

    attn_case c = {1, HEADS, HEADS, (int)total, (int)total, D, D, FLEX_F32, 1, 0, 0, 0, 1, NULL, 0};
    flex_tensor qkv[3];
    attn_result res = run_attention(ctx, &c, NULL, m, "njt causal", qkv);

    /* Each sequence alone, causal: a view into the packed BSHD tensors. */
    flex_mod *causal = compile_preset(ctx, "causal", NULL, 0);
    flex_attention_options opts;
    memset(&opts, 0, sizeof opts);
    opts.mask_mod = causal;
    for (int i = 0; i < SEQS; i++) {
        int64_t len = lengths[i], row0 = offsets[i];
        flex_tensor sq[3], so;
        for (int t = 0; t < 3; t++) {
            sq[t] = qkv[t];
            sq[t].data = (float *)qkv[t].data + row0 * qkv[t].strides[2];
            sq[t].sizes[2] = len;
        }
        float *out = malloc(sizeof(float) * (size_t)(len * HEADS * D));
        ck_assert_ptr_nonnull(out);
        so = flex_tensor_bshd(out, FLEX_F32, 1, HEADS, len, D, FLEX_DEVICE_CPU);
        ck_assert_msg(flex_attention(ctx, &sq[0], &sq[1], &sq[2], NULL, NULL, &opts, &so, NULL) ==
                          FLEX_OK,
                      "sequence %d: %s", i, flex_error_message(ctx));
        for (int h = 0; h < HEADS; h++)
            for (int64_t t = 0; t < len; t++)
                for (int d = 0; d < D; d++) {
                    double alone = out[(t * HEADS + h) * D + d];
                    double packed = res.out[((size_t)h * total + (size_t)(row0 + t)) * D + d];
                    if (!(fabs(alone - packed) <= 1e-5 * fmax(1.0, fabs(alone))))
                        ck_abort_msg("sequence %d row %lld: packed %g, alone %g", i, (long long)t,
                                     packed, alone);
                }
        free(out);
    }
    flex_mod_destroy(causal);

    /* The jagged_causal preset, fed the same data as int32, is the same
     * attention. */
    flex_mod *preset = compile_preset(ctx, "jagged_causal", NULL, 0);
    int32_t off32[SEQS + 1], *seq32 = malloc(sizeof(int32_t) * (size_t)total);
    ck_assert_ptr_nonnull(seq32);
    for (int i = 0; i <= SEQS; i++)
        off32[i] = (int32_t)offsets[i];
    for (int64_t t = 0; t < total; t++)
        seq32[t] = (int32_t)seq_idx[t];
    bind_buffer(ctx, preset, "off", off32, FLEX_I32, 1, SEQS + 1, 0);
    bind_buffer(ctx, preset, "seq", seq32, FLEX_I32, 1, total, 0);
    check_mask_points(ctx, preset, port_njt_causal, 1, total, total, "jagged_causal preset");
    free(seq32);
    flex_mod_destroy(preset);

    for (int t = 0; t < 3; t++)
        free(qkv[t].data);
    free(res.out);
    free(seq_idx);
    flex_mod_destroy(m);
    flex_context_destroy(ctx);
}
END_TEST

/* "Flamingo cross attention": 12 text tokens, 3 images of 3 tokens, the
 * seed's int64 intervals [[0, 7], [1, 7], [7, 12]] and image_boundaries;
 * create_mask(vision_x_attention_mask, 1, 1, 12, 9) is the element mask
 * below. */
START_TEST(test_flamingo) {
    flex_context *ctx = cpu_context();
    static const flex_buffer_decl decl[] = {{"image_boundaries", FLEX_I64, 1},
                                            {"intervals", FLEX_I64, 2}};
    flex_mod *m = compile_mod(ctx, FLEX_MOD_MASK,
                              "let image_idx = image_boundaries[kv_idx];\n"
                              "let interval = intervals[image_idx];\n"
                              "(q_idx >= interval[0]) & (q_idx < interval[1])",
                              NULL, 0, decl, 2);
    int64_t image_boundaries[9] = {0, 0, 0, 1, 1, 1, 2, 2, 2};
    int64_t intervals[6] = {0, 7, 1, 7, 7, 12};
    bind_buffer(ctx, m, "image_boundaries", image_boundaries, FLEX_I64, 1, 9, 0);
    bind_buffer(ctx, m, "intervals", intervals, FLEX_I64, 2, 3, 2);
    seed.image_boundaries = image_boundaries, seed.intervals = intervals;
    check_mask_points(ctx, m, port_vision_x_attention, 1, 12, 9, "vision_x_attention_mask");

    /* The seed's print(mask), written out (1 = attend). */
    static const char *const expected[12] = {"111000000", "111111000", "111111000", "111111000",
                                             "111111000", "111111000", "111111000", "000000111",
                                             "000000111", "000000111", "000000111", "000000111"};
    host_views hv;
    views_open(ctx, m, &hv);
    for (int i = 0; i < 12; i++)
        for (int j = 0; j < 9; j++) {
            ir_value v;
            mod_bounds_error err;
            memset(&err, 0, sizeof err);
            ck_assert_int_eq(
                mod_eval_point(&m->ir, hv.views, 0.0f, 0, 0, i, j, hv.scratch, &v, &err), 0);
            ck_assert_msg(v.i == expected[i][j] - '0', "mask[%d][%d]", i, j);
        }
    views_close(&hv);

    /* One 16 x 16 block holds it all: partial. */
    uint8_t want = FLEX_BLOCK_PARTIAL;
    check_block_mask(ctx, m, 12, 9, 16, &want, "flamingo 12 x 9");

    /* Query length != key length, any length. */
    attn_case c = {1, 2, 2, 12, 9, 64, 64, FLEX_F32, 0, 0, 0, 0, 0, NULL, 0};
    check_seed(ctx, c, NULL, m, "vision_x_attention");
    flex_mod_destroy(m);
    flex_context_destroy(ctx);
}
END_TEST

/* The pieces of the notebook's API listing: create_block_mask's default
 * block size (128) and separate Q_BLOCK_SIZE / KV_BLOCK_SIZE; flex_attention's
 * scale; test_mask's float16 inputs. */
START_TEST(test_api_listing) {
    flex_context *ctx = cpu_context();
    flex_mod *causal = compile_preset(ctx, "causal", NULL, 0);
    flex_block_mask *bm = NULL;
    ck_assert_int_eq(flex_block_mask_create(ctx, causal, 1, 1, 1000, 1000, 0, 0, &bm), FLEX_OK);
    flex_block_mask_shape shape;
    flex_block_mask_get_shape(bm, &shape);
    ck_assert_int_eq(shape.q_block, 128);
    ck_assert_int_eq(shape.kv_block, 128);
    flex_block_mask_destroy(bm);

    attn_case blocks = {1, 2, 2, 200, 150, 64, 64, FLEX_F32, 0, 0, 32, 16, 0, NULL, 0};
    attn_result r = run_attention(ctx, &blocks, NULL, causal, "Q_BLOCK 32, KV_BLOCK 16", NULL);
    free(r.out);
    attn_case scaled = {1, 2, 2, 150, 150, 64, 64, FLEX_F32, 0, 0.3f, 0, 0, 1, NULL, 0};
    flex_mod *softcap = compile_preset(ctx, "softcap", NULL, 0);
    r = run_attention(ctx, &scaled, softcap, causal, "scale 0.3", NULL);
    free(r.out);
    attn_case half = {2, 4, 4, 150, 150, 64, 64, FLEX_F16, 0, 0, 0, 0, 0, NULL, 0};
    r = run_attention(ctx, &half, NULL, causal, "f16 causal", NULL);
    free(r.out);
    flex_mod_destroy(softcap);
    flex_mod_destroy(causal);
    flex_context_destroy(ctx);
}
END_TEST

/* ------------------------------------------------------------------------
 * The blog post
 * ---------------------------------------------------------------------- */

/* soft_cap with softcap = 20 (an int in the seed: score / softcap is still
 * float division). */
START_TEST(test_blog_soft_cap) {
    flex_context *ctx = cpu_context();
    flex_param p = {"softcap", 0, 20};
    flex_mod *m = compile_mod(ctx, FLEX_MOD_SCORE,
                              "let score1 = score / softcap;\n"
                              "let score2 = tanh(score1);\n"
                              "let score3 = score2 * softcap;\n"
                              "score3",
                              &p, 1, NULL, 0);
    seed_score.softcap = 20;
    check_score_points(ctx, m, sport_soft_cap, 1, 20, "soft_cap 20");
    attn_case c = {1, 2, 2, 200, 200, 64, 64, FLEX_F32, 0, 2.0f, 0, 0, 0, NULL, 0};
    check_seed(ctx, c, m, NULL, "soft_cap 20");
    flex_mod_destroy(m);
    flex_context_destroy(ctx);
}
END_TEST

/* document_masking: document_id[q_idx] == document_id[kv_idx] (no causal). */
START_TEST(test_blog_document_masking) {
    flex_context *ctx = cpu_context();
    static const flex_buffer_decl decl[] = {{"document_id", FLEX_I32, 1}};
    flex_mod *m = compile_mod(ctx, FLEX_MOD_MASK, "document_id[q_idx] == document_id[kv_idx]", NULL,
                              0, decl, 1);
    static const int docs[] = {50, 13, 100, 40, 77};
    int32_t *ids = doc_ids_from_lengths(docs, 5, 280);
    bind_buffer(ctx, m, "document_id", ids, FLEX_I32, 1, 280, 0);
    seed.document_id = ids;
    check_mask_points(ctx, m, port_document, 1, 280, 280, "document_masking");
    attn_case c = {1, 2, 2, 280, 280, 64, 64, FLEX_F32, 0, 0, 32, 32, 0, NULL, 0};
    check_seed(ctx, c, NULL, m, "document_masking");
    free(ids);
    flex_mod_destroy(m);
    flex_context_destroy(ctx);
}
END_TEST

/* ------------------------------------------------------------------------
 * The training framework's request: self-attention with is_causal plus
 * optional doc_ids (document-causal packing), Gemma 2's soft-cap, per-head
 * logit clipping, ALiBi as an additive bias, the sliding window follow-up;
 * bf16 training, and the usual GQA with (B, S, H, D) activations.
 * ---------------------------------------------------------------------- */

START_TEST(test_training_request) {
    flex_context *ctx = cpu_context();
    static const flex_buffer_decl decl[] = {{"doc_ids", FLEX_I32, 1}};
    flex_mod *doc_causal =
        compile_mod(ctx, FLEX_MOD_MASK, "q >= kv && doc_ids[q] == doc_ids[kv]", NULL, 0, decl, 1);
    static const int docs[] = {50, 28, 37, 13};
    int32_t *ids = doc_ids_from_lengths(docs, 4, 128);
    bind_buffer(ctx, doc_causal, "doc_ids", ids, FLEX_I32, 1, 128, 0);
    seed.document_id = ids;
    check_mask_points(ctx, doc_causal, port_document_causal, 1, 128, 128, "doc_ids causal");

    flex_param cap = {"soft_cap", 1, 50.0};
    flex_mod *softcap =
        compile_mod(ctx, FLEX_MOD_SCORE, "soft_cap * tanh(score / soft_cap)", &cap, 1, NULL, 0);
    seed_score.softcap = 50.0;
    check_score_points(ctx, softcap, sport_soft_cap, 1, 20, "gemma soft_cap");

    enum { HQ = 4, HKV = 1 };
    float clip[HQ];
    for (int h = 0; h < HQ; h++)
        clip[h] = 0.5f + 0.25f * (float)h;
    static const flex_buffer_decl clip_decl[] = {{"clip", FLEX_F32, 1}};
    flex_mod *clipping =
        compile_mod(ctx, FLEX_MOD_SCORE, "clamp(score, -clip[h], clip[h])", NULL, 0, clip_decl, 1);
    bind_buffer(ctx, clipping, "clip", clip, FLEX_F32, 1, HQ, 0);
    seed_score.clip = clip;
    check_score_points(ctx, clipping, sport_head_clip, HQ, 20, "per-head clip");

    flex_mod *causal = compile_preset(ctx, "causal", NULL, 0);
    flex_mod *alibi = compile_preset(ctx, "alibi", NULL, 0);
    float slopes[HQ];
    for (int h = 0; h < HQ; h++)
        slopes[h] = (float)exp2(-8.0 * (h + 1) / HQ);
    bind_buffer(ctx, alibi, "slopes", slopes, FLEX_F32, 1, HQ, 0);
    flex_mod *window = compile_preset(ctx, "sliding_window", &(flex_param){"W", 0, 48}, 1);

    /* Training: forward and backward. */
    attn_case f32 = {2, HQ, HKV, 128, 128, 32, 32, FLEX_F32, 1, 0, 32, 32, 1, NULL, 0};
    attn_case bf16 = {2, HQ, HKV, 128, 128, 32, 32, FLEX_BF16, 1, 0, 32, 32, 1, NULL, 0};
    attn_result r;
    r = run_attention(ctx, &f32, NULL, causal, "is_causal, GQA 4:1, BSHD", NULL);
    free(r.out);
    r = run_attention(ctx, &f32, NULL, doc_causal, "doc_ids causal, GQA 4:1, BSHD", NULL);
    free(r.out);
    r = run_attention(ctx, &bf16, softcap, doc_causal, "soft_cap 50 + doc_ids, bf16", NULL);
    free(r.out);
    r = run_attention(ctx, &f32, clipping, causal, "per-head clip + causal", NULL);
    free(r.out);
    r = run_attention(ctx, &f32, alibi, causal, "alibi + causal", NULL);
    free(r.out);
    r = run_attention(ctx, &bf16, NULL, window, "sliding window 48, bf16", NULL);
    free(r.out);

    flex_mod_destroy(window);
    flex_mod_destroy(alibi);
    flex_mod_destroy(causal);
    flex_mod_destroy(clipping);
    flex_mod_destroy(softcap);
    flex_mod_destroy(doc_causal);
    free(ids);
    flex_context_destroy(ctx);
}
END_TEST

static Suite *seeds_suite(void) {
    Suite *s = suite_create("seeds");
    TCase *notebook = tcase_create("notebook");
    tcase_set_timeout(notebook, 600);
    tcase_add_test(notebook, test_checkerboard);
    tcase_add_test(notebook, test_noop);
    tcase_add_test(notebook, test_causal);
    tcase_add_test(notebook, test_sliding_window);
    tcase_add_test(notebook, test_prefix_lm);
    tcase_add_test(notebook, test_document_causal);
    tcase_add_test(notebook, test_sasa);
    tcase_add_test(notebook, test_natten);
    tcase_add_test(notebook, test_alibi);
    tcase_add_test(notebook, test_tanh_soft_cap);
    tcase_add_test(notebook, test_njt);
    tcase_add_test(notebook, test_flamingo);
    tcase_add_test(notebook, test_api_listing);
    suite_add_tcase(s, notebook);
    TCase *blog = tcase_create("blog");
    tcase_set_timeout(blog, 600);
    tcase_add_test(blog, test_blog_soft_cap);
    tcase_add_test(blog, test_blog_document_masking);
    suite_add_tcase(s, blog);
    TCase *request = tcase_create("training_request");
    tcase_set_timeout(request, 600);
    tcase_add_test(request, test_training_request);
    suite_add_tcase(s, request);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(seeds_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
