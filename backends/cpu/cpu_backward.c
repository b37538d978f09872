/*
 * Block-sparse attention backward on the CPU.
 *
 * With the forward's log-sum-exp saved, every (q tile, kv tile) pair is
 * independent:
 *   S' = score_mod(scale * Q Kᵀ)          (masked elements excluded)
 *   P  = exp(S' - lse)
 *   dP = dO Vᵀ,  delta = rowsum(dO * O)
 *   dS' = P * (dP - delta)                 (gradient wrt the modified score)
 *   dS  = dS' * d(mod)/d(score)            (gradient wrt the raw score)
 *   dV += Pᵀ dO,  dK += scale dSᵀ Q,  dQ += scale dS K
 *   buffer grad[element read] += dS' * d(mod)/d(value read)
 *
 * Work and determinism. A task is (b, kv head, chunk of kv blocks): it walks
 * its kv tiles one by one, and for each walks the query heads of the group
 * and the q blocks of the block mask's q-major lists (empty blocks are
 * skipped, the mask mod runs only in partial blocks), so it owns its dK and
 * dV rows outright and sums them in a fixed order. dQ rows are summed into a
 * per-chunk f32 array the task also owns; when there are more chunks than
 * one per kv head (few heads, many threads) a last pass adds the chunk
 * arrays in chunk order. Buffer gradients go to per-thread f64 arrays
 * filled under a static schedule and added in thread order. No atomics, so
 * two runs with the same thread count give the same bits.
 *
 * The matrix products use the forward's register-blocked micro-kernels
 * (cpu.h): `scores` for S and dP, `accumulate` for dV, dK and dQ. Q and dO
 * are packed once per call (f32, both row-major and in column panels), K and
 * V once per kv tile.
 *
 * A score mod's value and derivatives come from the derived IR
 * (core/mod/derive.h) evaluated with the multi-output tile evaluator. Where
 * dS' is exactly 0 (no probability mass) dS and the buffer terms are 0 even
 * if the mod's derivative is infinite or NaN there, so an element that a
 * score mod masks with -inf never turns a gradient into NaN.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "internal.h"
#include "plan.h"
#include "mod/derive.h"
#include "mod/tile_multi.h"
#include "cpu.h"

/* Points per call of the score mod's evaluator: rows of a tile go through
 * it in strips of this many points, so its per-node arrays stay in L1/L2. */
enum { BWD_STRIP_ELEMS = 2048 };

static void load_row(const flex_tensor *t, int64_t off, int n, float *dst) {
    int64_t st = t->strides[3];
    if (t->dtype == FLEX_F32 && st == 1) {
        memcpy(dst, (const float *)t->data + off, (size_t)n * sizeof(float));
        return;
    }
    for (int i = 0; i < n; i++)
        dst[i] = flex_load_as_float(t->data, t->dtype, off + (int64_t)i * st);
}

static void store_row(const flex_tensor *t, int64_t off, int n, const float *src) {
    int64_t st = t->strides[3];
    if (t->dtype == FLEX_F32 && st == 1) {
        memcpy((float *)t->data + off, src, (size_t)n * sizeof(float));
        return;
    }
    for (int i = 0; i < n; i++)
        flex_store_from_float(t->data, t->dtype, off + (int64_t)i * st, src[i]);
}

static inline int64_t row_offset(const flex_tensor *t, int64_t b, int64_t h, int64_t s) {
    return b * t->strides[0] + h * t->strides[1] + s * t->strides[2];
}

static inline int64_t min64(int64_t a, int64_t b) {
    return a < b ? a : b;
}

/* Copies rows x n of src (row-major, leading dimension n) into column panels
 * of 32 (the last one 16 wide when np % 32 == 16): panel c0 starts at
 * dst + c0 * rows_p and holds rows_p rows of its width. Columns n .. np and
 * rows beyond `rows` are zero. This is the layout `accumulate` reads its
 * right-hand side in. */
static void pack_panels(const float *src, int rows, int rows_p, int n, int np, float *dst) {
    for (int c0 = 0; c0 < np; c0 += CPU_NR) {
        int w = np - c0 >= CPU_NR ? CPU_NR : np - c0;
        float *panel = dst + (size_t)c0 * rows_p;
        for (int r = 0; r < rows_p; r++)
            for (int c = 0; c < w; c++)
                panel[(size_t)r * w + c] =
                    (r < rows && c0 + c < n) ? src[(size_t)r * n + c0 + c] : 0.0f;
    }
}

/* Copies rows x n of src (leading dimension n) transposed into panels of 32
 * rows: dst[p][k][c] = src[32p + c][k], rows beyond `rows` zero, rows_p / 32
 * panels. This is the layout `scores` reads its right-hand side in. */
static void pack_transposed(const float *src, int rows, int rows_p, int n, float *dst) {
    for (int r = 0; r < rows_p; r++) {
        float *col = dst + (size_t)(r / CPU_NR) * n * CPU_NR + (r % CPU_NR);
        if (r < rows)
            for (int k = 0; k < n; k++)
                col[(size_t)k * CPU_NR] = src[(size_t)r * n + k];
        else
            for (int k = 0; k < n; k++)
                col[(size_t)k * CPU_NR] = 0.0f;
    }
}

/* dst (cols x rows) = srcᵀ (rows x cols), both dense. */
static void transpose_portable(const float *src, int rows, int cols, float *dst) {
    enum { T = 16 };
    for (int r0 = 0; r0 < rows; r0 += T)
        for (int c0 = 0; c0 < cols; c0 += T)
            for (int r = r0; r < r0 + T && r < rows; r++)
                for (int c = c0; c < c0 + T && c < cols; c++)
                    dst[(size_t)c * rows + r] = src[(size_t)r * cols + c];
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BWD_HAVE_AVX512_TRANSPOSE 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f")
#endif
#include <immintrin.h>

/* 16 x 16 blocks through registers: 32-bit then 64-bit interleaves build
 * 4 x 4 sub-blocks inside each 128-bit lane, two lane shuffles move the
 * lanes into place. rows and cols are multiples of 16. */
static void transpose_avx512(const float *src, int rows, int cols, float *dst) {
    for (int r0 = 0; r0 < rows; r0 += 16)
        for (int c0 = 0; c0 < cols; c0 += 16) {
            __m512 r[16], t[16], u[16];
            for (int i = 0; i < 16; i++)
                r[i] = _mm512_loadu_ps(src + (size_t)(r0 + i) * cols + c0);
            for (int k = 0; k < 8; k++) {
                t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
                t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
            }
            /* u[4g + m], lane L: column 4L + m of rows 4g .. 4g + 3 */
            for (int g = 0; g < 4; g++) {
                __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 2]);
                __m512d c = _mm512_castps_pd(t[4 * g + 1]), d = _mm512_castps_pd(t[4 * g + 3]);
                u[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
                u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
                u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
                u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
            }
            for (int m = 0; m < 4; m++) {
                __m512 va = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x44);
                __m512 vb = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xEE);
                __m512 wa = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x44);
                __m512 wb = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xEE);
                float *out = dst + (size_t)(c0 + m) * rows + r0;
                _mm512_storeu_ps(out, _mm512_shuffle_f32x4(va, wa, 0x88));
                _mm512_storeu_ps(out + (size_t)4 * rows, _mm512_shuffle_f32x4(va, wa, 0xDD));
                _mm512_storeu_ps(out + (size_t)8 * rows, _mm512_shuffle_f32x4(vb, wb, 0x88));
                _mm512_storeu_ps(out + (size_t)12 * rows, _mm512_shuffle_f32x4(vb, wb, 0xDD));
            }
        }
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

typedef void (*transpose_fn)(const float *src, int rows, int cols, float *dst);

/* The AVX-512 transpose goes with the AVX-512 kernels (the CPU has it). */
static transpose_fn pick_transpose(const cpu_kernels *kern, int rows, int cols) {
#ifdef BWD_HAVE_AVX512_TRANSPOSE
    if (kern == flex_cpu_kernels_avx512() && rows % 16 == 0 && cols % 16 == 0)
        return transpose_avx512;
#endif
    (void)kern, (void)rows, (void)cols;
    return transpose_portable;
}

/* ---- the read-only description of one call ---- */

/* One buffer whose gradient was asked for, and the derivative outputs of the
 * loads that read it. */
typedef struct bwd_grad_load {
    int grad; /* index into bwd_problem.grads */
    int ndim;
    int out_deriv; /* evaluator output of d(mod)/d(value read) */
    int out_index; /* first of ndim evaluator outputs: the indices read */
} bwd_grad_load;

typedef struct bwd_grad {
    int buffer;             /* ir buffer index */
    const flex_tensor *dst; /* caller's f32 gradient */
    int64_t numel;
    int64_t dense_strides[4]; /* row-major strides of the bound buffer's sizes */
    int64_t offset;           /* where this buffer starts in a thread's partial array */
} bwd_grad;

typedef struct bwd_problem {
    const flex_backward_args *a;
    const cpu_kernels *kern;
    transpose_fn transpose;
    int64_t B, Hq, Hkv, Lq, Lkv, D, Dv, group;
    int q_tile, kv_tile; /* real tile sizes (divide the mask's blocks) */
    int mq, nk;          /* padded: q rows (multiple of 8), kv columns (of 32) */
    int dp, dvp;         /* D and Dv padded to 16 */
    int q_block, kv_block;
    int64_t num_q_blocks, num_kv_blocks, num_q_tiles;
    const struct flex_block_mask *mask;
    int want_dq, want_dk, want_dv;

    /* packed Q and dO: per (b, h, q tile) one record of q_record floats */
    float *packed;
    size_t q_record;
    size_t off_qrow, off_qpan, off_dorow, off_dopan, off_lse, off_delta;

    /* dQ accumulators: chunks x B x Hq x (num_q_tiles * q_tile) x dp */
    int chunks;
    float *dq_acc;
    size_t dq_chunk_stride;

    /* score mod: a private copy of its IR with the derivative nodes */
    int has_score;
    ir_mod score_ir;
    int score_ir_made;
    int out_value, out_dscore; /* evaluator outputs */
    int dscore_is_one;
    int num_outputs;
    int *outputs;
    const mod_buffer_view *score_views;
    const ir_mod *mask_ir;
    const mod_buffer_view *mask_views;

    int num_grads;
    bwd_grad grads[IR_MAX_BUFFERS];
    int num_grad_loads;
    bwd_grad_load grad_loads[MOD_DERIVE_MAX_LOADS];
    int64_t partial_len;
    cpu_bounds_failure bounds; /* the first out-of-range buffer read */
} bwd_problem;

typedef struct bwd_scratch {
    float *kt, *kr, *vt; /* K transposed panels, K column panels, V transposed panels */
    float *dk, *dv;      /* nk x dp, nk x dvp accumulators */
    float *s, *dp, *t;   /* mq x nk tiles, and an nk x mq transpose */
    float *g;            /* mq x nk d(mod)/d(score) */
    float *ones;
    float *row;          /* max(D, Dv) staging */
    float *load_deriv;   /* num_grad_loads x mq x nk */
    int32_t *load_index; /* sum of ndim x mq x nk */
    uint8_t *keep;       /* mq x nk */
    double *partial;     /* buffer gradient partial sums */
    mod_multi *multi;    /* tiles of strips */
    mod_multi *point;    /* single points (fallback) */
    mod_tile *mask_tile;
    void *block;
} bwd_scratch;

static void scratch_free(bwd_scratch *sc) {
    free(sc->block);
    free(sc->keep);
    free(sc->load_index);
    free(sc->partial);
    mod_multi_destroy(sc->multi);
    mod_multi_destroy(sc->point);
    if (sc->mask_tile) mod_tile_destroy(sc->mask_tile);
    memset(sc, 0, sizeof *sc);
}

static int scratch_alloc(bwd_scratch *sc, const bwd_problem *pb) {
    memset(sc, 0, sizeof *sc);
    size_t mq = (size_t)pb->mq, nk = (size_t)pb->nk, D = (size_t)pb->D, Dv = (size_t)pb->Dv;
    size_t dp = (size_t)pb->dp, dvp = (size_t)pb->dvp;
    size_t rowlen = D > Dv ? D : Dv;
    size_t tile = mq * nk;
    size_t nloads = (size_t)pb->num_grad_loads;
    size_t sizes[12] = {nk * D,
                        nk * dp,
                        nk * Dv,
                        nk * dp,
                        nk * dvp,
                        tile,
                        tile,
                        tile,
                        pb->has_score ? tile : 1,
                        mq > nk ? mq : nk,
                        rowlen,
                        nloads * tile + 1};
    float **const dst[12] = {&sc->kt, &sc->kr, &sc->vt, &sc->dk,   &sc->dv,  &sc->s,
                             &sc->dp, &sc->t,  &sc->g,  &sc->ones, &sc->row, &sc->load_deriv};
    if (cpu_scratch_carve(12, sizes, dst, &sc->block) != 0) return -1;
    for (size_t i = 0; i < (mq > nk ? mq : nk); i++)
        sc->ones[i] = 1.0f;
    sc->keep = malloc(tile);
    if (!sc->keep) return -1;
    size_t index_slots = 0;
    for (int l = 0; l < pb->num_grad_loads; l++)
        index_slots += (size_t)pb->grad_loads[l].ndim;
    sc->load_index = malloc((index_slots * tile + 1) * sizeof(int32_t));
    if (!sc->load_index) return -1;
    if (pb->partial_len > 0) {
        sc->partial = calloc((size_t)pb->partial_len, sizeof(double));
        if (!sc->partial) return -1;
    }
    if (pb->has_score) {
        int strip_rows = BWD_STRIP_ELEMS / pb->kv_tile;
        if (strip_rows < 1) strip_rows = 1;
        sc->multi =
            mod_multi_create(&pb->score_ir, pb->outputs, pb->num_outputs, strip_rows * pb->kv_tile);
        sc->point = mod_multi_create(&pb->score_ir, pb->outputs, pb->num_outputs, 1);
        if (!sc->multi || !sc->point) return -1;
    }
    if (pb->mask_ir) {
        sc->mask_tile = mod_tile_create(pb->mask_ir, pb->q_tile, pb->kv_tile);
        if (!sc->mask_tile) return -1;
    }
    return 0;
}

/* ---- pre-pass: packed Q, dO, lse and delta per (b, h, q tile) ---- */

static float *q_record(const bwd_problem *pb, int64_t b, int64_t h, int64_t qt) {
    return pb->packed + (size_t)((b * pb->Hq + h) * pb->num_q_tiles + qt) * pb->q_record;
}

static void pack_q_tile(const bwd_problem *pb, float *row, int64_t b, int64_t h, int64_t qt) {
    const flex_backward_args *a = pb->a;
    float *rec = q_record(pb, b, h, qt);
    float *qrow = rec + pb->off_qrow, *dorow = rec + pb->off_dorow;
    float *lse = rec + pb->off_lse, *delta = rec + pb->off_delta;
    int D = (int)pb->D, Dv = (int)pb->Dv;
    int64_t q0 = qt * pb->q_tile;
    int rows = (int)min64(pb->Lq - q0, pb->q_tile);
    for (int r = 0; r < pb->mq; r++) {
        if (r >= rows) {
            memset(qrow + (size_t)r * D, 0, (size_t)D * sizeof(float));
            memset(dorow + (size_t)r * Dv, 0, (size_t)Dv * sizeof(float));
            lse[r] = -INFINITY;
            delta[r] = 0.0f;
            continue;
        }
        int64_t s = q0 + r;
        load_row(&a->q, row_offset(&a->q, b, h, s), D, qrow + (size_t)r * D);
        load_row(&a->dout, row_offset(&a->dout, b, h, s), Dv, dorow + (size_t)r * Dv);
        load_row(&a->out, row_offset(&a->out, b, h, s), Dv, row);
        double dot = 0.0;
        const float *dor = dorow + (size_t)r * Dv;
        for (int c = 0; c < Dv; c++)
            dot += (double)dor[c] * (double)row[c];
        delta[r] = (float)dot;
        /* -inf: a row the forward found empty, which carries no mass; NaN:
         * a row with a NaN or +inf score, whose gradients are NaN. */
        lse[r] = ((const float *)a->lse.data)[row_offset(&a->lse, b, h, s)];
    }
    pack_panels(qrow, pb->mq, pb->mq, D, pb->dp, rec + pb->off_qpan);
    pack_panels(dorow, pb->mq, pb->mq, Dv, pb->dvp, rec + pb->off_dopan);
    /* The panels feed dK = dS^T Q. A NaN row's dS is NaN at the keys it
     * attends and 0 elsewhere; its Q row (which may hold the NaN) is zeroed
     * there so that 0 * NaN does not reach the keys it does not attend. */
    float *qpan = rec + pb->off_qpan;
    for (int r = 0; r < rows; r++) {
        if (lse[r] == lse[r]) continue;
        for (int c0 = 0; c0 < pb->dp; c0 += CPU_NR) {
            int w = pb->dp - c0 >= CPU_NR ? CPU_NR : pb->dp - c0;
            memset(qpan + (size_t)c0 * pb->mq + (size_t)r * w, 0, (size_t)w * sizeof(float));
        }
    }
}

/* ---- score mod and mask over one tile ---- */

/* Copies the evaluator's outputs for rows r0 .. r0+rows-1 (all cols) into
 * the scratch tiles (leading dimension nk). */
static void take_outputs(const bwd_problem *pb, bwd_scratch *sc, const mod_multi *mm, int r0,
                         int rows, int c0, int cols) {
    int nk = pb->nk;
    size_t tile = (size_t)pb->mq * nk;
    const ir_value *v = mod_multi_output(mm, pb->out_value);
    const ir_value *g = mod_multi_output(mm, pb->out_dscore);
    for (int r = 0; r < rows; r++) {
        float *srow = sc->s + (size_t)(r0 + r) * nk + c0;
        for (int c = 0; c < cols; c++)
            srow[c] = v[r * cols + c].f;
    }
    if (!pb->dscore_is_one) /* else g is never read */
        for (int r = 0; r < rows; r++) {
            float *grow = sc->g + (size_t)(r0 + r) * nk + c0;
            for (int c = 0; c < cols; c++)
                grow[c] = g[r * cols + c].f;
        }
    int32_t *index = sc->load_index;
    for (int l = 0; l < pb->num_grad_loads; l++) {
        const bwd_grad_load *gl = &pb->grad_loads[l];
        const ir_value *dv = mod_multi_output(mm, gl->out_deriv);
        float *dst = sc->load_deriv + (size_t)l * tile;
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < cols; c++)
                dst[(size_t)(r0 + r) * nk + c0 + c] = dv[r * cols + c].f;
        for (int d = 0; d < gl->ndim; d++) {
            const ir_value *iv = mod_multi_output(mm, gl->out_index + d);
            for (int r = 0; r < rows; r++)
                for (int c = 0; c < cols; c++)
                    index[(size_t)(r0 + r) * nk + c0 + c] = iv[r * cols + c].i;
            index += tile;
        }
    }
}

/* Evaluates the score mod (value and derivatives) over the tile whose raw
 * scores are in sc->s. Returns 0; -1 after recording a failure; or 1 when a
 * buffer read went out of range in a partial tile: it may lie at an element
 * the mask removes, which is not an error, so the caller recomputes the raw
 * scores (the strips done have replaced theirs) and evaluates the attended
 * elements one by one (apply_score_mod_points). */
static int apply_score_mod(bwd_problem *pb, bwd_scratch *sc, int32_t b, int32_t h, int64_t q0,
                           int rows, int64_t kv0, int cols, int partial) {
    int nk = pb->nk;
    int strip = BWD_STRIP_ELEMS / pb->kv_tile;
    if (strip < 1) strip = 1;
    mod_bounds_error err;
    memset(&err, 0, sizeof err);
    int failed = 0;
    /* The evaluator reads the raw scores from sc->s and take_outputs
     * overwrites them strip by strip, below the rows still to be read. */
    for (int r0 = 0; r0 < rows && !failed; r0 += strip) {
        int n = rows - r0 < strip ? rows - r0 : strip;
        if (mod_multi_eval(sc->multi, pb->score_views, b, h, (int32_t)(q0 + r0), n, (int32_t)kv0,
                           cols, sc->s + (size_t)r0 * nk, nk, &err) != 0) {
            failed = 1;
            break;
        }
        take_outputs(pb, sc, sc->multi, r0, n, 0, cols);
    }
    if (!failed) return 0;
    if (!partial) {
        cpu_bounds_failure_record(&pb->bounds, pb->a->score_mod, &err);
        return -1;
    }
    return 1;
}

static int apply_score_mod_points(bwd_problem *pb, bwd_scratch *sc, int32_t b, int32_t h,
                                  int64_t q0, int rows, int64_t kv0, int cols) {
    int nk = pb->nk;
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) {
            size_t at = (size_t)r * nk + c;
            if (!sc->keep[at]) continue;
            mod_bounds_error err;
            memset(&err, 0, sizeof err);
            float raw = sc->s[at];
            if (mod_multi_eval(sc->point, pb->score_views, b, h, (int32_t)(q0 + r), 1,
                               (int32_t)(kv0 + c), 1, &raw, 1, &err) != 0) {
                cpu_bounds_failure_record(&pb->bounds, pb->a->score_mod, &err);
                return -1;
            }
            take_outputs(pb, sc, sc->point, r, 1, c, 1);
        }
    return 0;
}

/* ---- one (q tile, kv tile) pair ---- */

static int do_pair(bwd_problem *pb, bwd_scratch *sc, int32_t b, int32_t h, int64_t qt, int64_t kv0,
                   int cols, int partial, float *dq_tile) {
    const cpu_kernels *kn = pb->kern;
    const int mq = pb->mq, nk = pb->nk;
    const float *rec = q_record(pb, b, h, qt);
    const float *lse = rec + pb->off_lse, *delta = rec + pb->off_delta;
    const int64_t q0 = qt * pb->q_tile;
    const int rows = (int)min64(pb->Lq - q0, pb->q_tile);
    const float scale = pb->a->scale;

    kn->scores(mq, nk, (int)pb->D, rec + pb->off_qrow, sc->kt, scale, sc->s);

    /* The mods keep subnormals (cpu.h). */
    unsigned fp = cpu_mods_begin();
    if (partial) {
        mod_bounds_error err;
        memset(&err, 0, sizeof err);
        if (mod_tile_mask(sc->mask_tile, pb->mask_views, b, h, (int32_t)q0, rows, (int32_t)kv0,
                          cols, sc->keep, nk, &err) != 0) {
            cpu_mods_end(fp);
            cpu_bounds_failure_record(&pb->bounds, pb->mask->mask_mod, &err);
            return -1;
        }
    }
    if (pb->has_score) {
        int rc = apply_score_mod(pb, sc, b, h, q0, rows, kv0, cols, partial);
        if (rc > 0) {
            kn->scores(mq, nk, (int)pb->D, rec + pb->off_qrow, sc->kt, scale, sc->s);
            rc = apply_score_mod_points(pb, sc, b, h, q0, rows, kv0, cols) != 0 ? -1 : 0;
        }
        if (rc < 0) {
            cpu_mods_end(fp);
            return -1;
        }
    }
    cpu_mods_end(fp);

    /* P = exp(S' - lse) over attended elements, 0 elsewhere. In a NaN row
     * (NaN lse) P is NaN wherever the row has mass, that is at attended
     * elements whose S' is not -inf, and 0 elsewhere. */
    for (int r = 0; r < mq; r++) {
        float *srow = sc->s + (size_t)r * nk;
        if (r >= rows || lse[r] == -INFINITY) {
            memset(srow, 0, (size_t)nk * sizeof(float));
            continue;
        }
        if (partial) {
            const uint8_t *keep = sc->keep + (size_t)r * nk;
            for (int c = 0; c < cols; c++)
                if (!keep[c]) srow[c] = -INFINITY;
        }
        for (int c = cols; c < nk; c++)
            srow[c] = -INFINITY;
        if (lse[r] != lse[r]) {
            for (int c = 0; c < nk; c++)
                srow[c] = srow[c] == -INFINITY ? 0.0f : NAN;
            continue;
        }
        kn->exp_sum(srow, nk, lse[r]);
    }

    /* dP = dO Vᵀ, then dS' = P (dP - delta) in place of dP; without a score
     * mod dS = scale dS' at once. */
    kn->scores(mq, nk, (int)pb->Dv, rec + pb->off_dorow, sc->vt, 1.0f, sc->dp);
    const float fold = pb->has_score ? 1.0f : scale;
    for (int r = 0; r < mq; r++) {
        const float *prow = sc->s + (size_t)r * nk;
        float *drow = sc->dp + (size_t)r * nk;
        const float d = delta[r];
        if (r < rows && lse[r] != lse[r]) {
            /* A NaN row: NaN where P is (delta, from its NaN output, would
             * spread NaN to the elements without mass too). */
            memcpy(drow, prow, (size_t)nk * sizeof(float));
            continue;
        }
        for (int c = 0; c < nk; c++)
            drow[c] = prow[c] * (drow[c] - d) * fold;
    }

    /* Buffer gradients: scatter dS' * d(mod)/d(read) to the element read. */
    if (pb->num_grad_loads > 0) {
        size_t tile = (size_t)mq * nk;
        const int32_t *index = sc->load_index;
        for (int l = 0; l < pb->num_grad_loads; l++) {
            const bwd_grad_load *gl = &pb->grad_loads[l];
            const bwd_grad *gr = &pb->grads[gl->grad];
            const float *dl = sc->load_deriv + (size_t)l * tile;
            double *part = sc->partial + gr->offset;
            for (int r = 0; r < rows; r++)
                for (int c = 0; c < cols; c++) {
                    size_t at = (size_t)r * nk + c;
                    float dsp = sc->dp[at];
                    if (dsp == 0.0f) continue;
                    int64_t flat = 0;
                    for (int d = 0; d < gl->ndim; d++)
                        flat += (int64_t)index[(size_t)d * tile + at] * gr->dense_strides[d];
                    part[flat] += (double)dsp * (double)dl[at];
                }
            index += (size_t)gl->ndim * tile;
        }
    }

    /* dS = dS' * d(mod)/d(score) * scale (0 wherever dS' is 0). */
    if (pb->has_score && !pb->dscore_is_one) {
        for (int r = 0; r < mq; r++) {
            float *drow = sc->dp + (size_t)r * nk;
            const float *grow = sc->g + (size_t)r * nk;
            for (int c = 0; c < nk; c++)
                drow[c] = drow[c] != 0.0f ? drow[c] * grow[c] * scale : 0.0f;
        }
    } else if (pb->has_score) {
        for (size_t i = 0; i < (size_t)mq * nk; i++)
            sc->dp[i] *= scale;
    }

    const float *qpan = rec + pb->off_qpan, *dopan = rec + pb->off_dopan;
    if (pb->want_dv) {
        pb->transpose(sc->s, mq, nk, sc->t);
        kn->accumulate(nk, mq, pb->dvp, sc->t, dopan, sc->ones, sc->dv);
    }
    if (pb->want_dk) {
        pb->transpose(sc->dp, mq, nk, sc->t);
        kn->accumulate(nk, mq, pb->dp, sc->t, qpan, sc->ones, sc->dk);
    }
    if (pb->want_dq) kn->accumulate(mq, nk, pb->dp, sc->dp, sc->kr, sc->ones, dq_tile);
    return 0;
}

/* ---- one task: (b, kv head, chunk of kv blocks) ---- */

/* Walks the non-empty q blocks of kv-block column j for (b, h) in ascending
 * order, merging the partial and full lists; walk_next says which list each
 * came from. Without a mask every q block is full. */
typedef struct q_block_walk {
    const int32_t *pi, *pe, *fi, *fe; /* partial and full cursors */
    int64_t next_all, num_all;        /* when there is no mask */
} q_block_walk;

static void walk_init(q_block_walk *w, const bwd_problem *pb, int64_t b, int64_t h, int64_t j) {
    memset(w, 0, sizeof *w);
    const struct flex_block_mask *m = pb->mask;
    if (!m) {
        w->num_all = pb->num_q_blocks;
        return;
    }
    int64_t bm = m->B == 1 ? 0 : b, hm = m->H == 1 ? 0 : h;
    int64_t col = (bm * m->H + hm) * m->num_kv_blocks + j;
    w->pi = m->q_partial.indices + m->q_partial.offsets[col];
    w->pe = m->q_partial.indices + m->q_partial.offsets[col + 1];
    w->fi = m->q_full.indices + m->q_full.offsets[col];
    w->fe = m->q_full.indices + m->q_full.offsets[col + 1];
}

static int walk_next(q_block_walk *w, const bwd_problem *pb, int64_t *qb, int *partial) {
    if (!pb->mask) {
        if (w->next_all >= w->num_all) return 0;
        *qb = w->next_all++;
        *partial = 0;
        return 1;
    }
    int have_p = w->pi < w->pe, have_f = w->fi < w->fe;
    if (!have_p && !have_f) return 0;
    if (have_p && (!have_f || *w->pi < *w->fi)) {
        *qb = *w->pi++;
        *partial = 1;
    } else {
        *qb = *w->fi++;
        *partial = 0;
    }
    return 1;
}

static int64_t column_cost(const bwd_problem *pb, int64_t b, int64_t hk, int64_t j) {
    const struct flex_block_mask *m = pb->mask;
    if (!m) return pb->num_q_blocks * pb->group + 1;
    int64_t cost = 1;
    for (int64_t g = 0; g < pb->group; g++) {
        int64_t h = hk * pb->group + g;
        int64_t bm = m->B == 1 ? 0 : b, hm = m->H == 1 ? 0 : h;
        int64_t col = (bm * m->H + hm) * m->num_kv_blocks + j;
        cost += (m->q_partial.offsets[col + 1] - m->q_partial.offsets[col]) +
                (m->q_full.offsets[col + 1] - m->q_full.offsets[col]);
    }
    return cost;
}

/* The kv blocks [*j0, *j1) of chunk c: contiguous ranges of about equal
 * work (number of non-empty blocks), a pure function of the mask. */
static void chunk_range(const bwd_problem *pb, int64_t b, int64_t hk, int c, int64_t *j0,
                        int64_t *j1) {
    int64_t n = pb->num_kv_blocks;
    if (pb->chunks <= 1) {
        *j0 = 0;
        *j1 = n;
        return;
    }
    int64_t total = 0;
    for (int64_t j = 0; j < n; j++)
        total += column_cost(pb, b, hk, j);
    /* block j goes to chunk floor(prefix_before_j * chunks / total) */
    int64_t prefix = 0, first = -1, last = -1;
    for (int64_t j = 0; j < n; j++) {
        int64_t owner = prefix * pb->chunks / total;
        if (owner == c) {
            if (first < 0) first = j;
            last = j;
        }
        prefix += column_cost(pb, b, hk, j);
    }
    *j0 = first < 0 ? 0 : first;
    *j1 = first < 0 ? 0 : last + 1;
}

static void store_kv_rows(const flex_tensor *t, const float *acc, int ld, int n, int64_t b,
                          int64_t hk, int64_t kv0, int cols) {
    for (int r = 0; r < cols; r++)
        store_row(t, row_offset(t, b, hk, kv0 + r), n, acc + (size_t)r * ld);
}

static void do_task(bwd_problem *pb, bwd_scratch *sc, int64_t task) {
    const flex_backward_args *a = pb->a;
    int c = (int)(task % pb->chunks);
    int64_t bh = task / pb->chunks;
    int64_t b = bh / pb->Hkv, hk = bh % pb->Hkv;
    int64_t j0, j1;
    chunk_range(pb, b, hk, c, &j0, &j1);
    const int D = (int)pb->D, Dv = (int)pb->Dv;
    const size_t q_rows = (size_t)(pb->num_q_tiles * pb->q_tile);
    float *dq_chunk = pb->dq_acc ? pb->dq_acc + (size_t)c * pb->dq_chunk_stride : NULL;

    for (int64_t j = j0; j < j1; j++) {
        int64_t blk_end = min64((j + 1) * pb->kv_block, pb->Lkv);
        for (int64_t kv0 = j * pb->kv_block; kv0 < blk_end; kv0 += pb->kv_tile) {
            if (cpu_bounds_failure_seen(&pb->bounds)) return;
            int cols = (int)min64(blk_end - kv0, pb->kv_tile);
            /* K and V rows of the tile in f32 (staged in the accumulators,
             * which are cleared right after), then in the kernels' layouts. */
            for (int r = 0; r < cols; r++)
                load_row(&a->k, row_offset(&a->k, b, hk, kv0 + r), D, sc->dk + (size_t)r * D);
            pack_transposed(sc->dk, cols, pb->nk, D, sc->kt);
            pack_panels(sc->dk, cols, pb->nk, D, pb->dp, sc->kr);
            for (int r = 0; r < cols; r++)
                load_row(&a->v, row_offset(&a->v, b, hk, kv0 + r), Dv, sc->dv + (size_t)r * Dv);
            pack_transposed(sc->dv, cols, pb->nk, Dv, sc->vt);
            memset(sc->dk, 0, (size_t)pb->nk * pb->dp * sizeof(float));
            memset(sc->dv, 0, (size_t)pb->nk * pb->dvp * sizeof(float));

            for (int64_t g = 0; g < pb->group; g++) {
                int64_t h = hk * pb->group + g;
                q_block_walk w;
                walk_init(&w, pb, b, h, j);
                int64_t qb;
                int partial;
                while (walk_next(&w, pb, &qb, &partial)) {
                    int64_t q_end = min64((qb + 1) * pb->q_block, pb->Lq);
                    for (int64_t q0 = qb * pb->q_block; q0 < q_end; q0 += pb->q_tile) {
                        int64_t qt = q0 / pb->q_tile;
                        float *dq_tile =
                            dq_chunk ? dq_chunk +
                                           ((size_t)(b * pb->Hq + h) * q_rows + (size_t)q0) * pb->dp
                                     : NULL;
                        if (do_pair(pb, sc, (int32_t)b, (int32_t)h, qt, kv0, cols, partial,
                                    dq_tile) != 0)
                            return;
                    }
                }
            }
            if (pb->want_dk && a->dk) store_kv_rows(a->dk, sc->dk, pb->dp, D, b, hk, kv0, cols);
            if (pb->want_dv && a->dv) store_kv_rows(a->dv, sc->dv, pb->dvp, Dv, b, hk, kv0, cols);
        }
    }
}

/* ---- the call ---- */

static int find_outputs(bwd_problem *pb, const mod_derivative *der) {
    /* value, d/dscore, then per gradient load: its derivative and indices */
    int n = 2;
    for (int l = 0; l < der->num_loads; l++)
        for (int k = 0; k < pb->num_grads; k++)
            if (der->loads[l].buffer == pb->grads[k].buffer)
                n += 1 + pb->score_ir.nodes[der->loads[l].load].nargs;
    pb->outputs = malloc((size_t)n * sizeof *pb->outputs);
    if (!pb->outputs) return -1;
    pb->outputs[0] = der->value;
    pb->outputs[1] = der->dscore;
    pb->out_value = 0;
    pb->out_dscore = 1;
    int at = 2;
    for (int l = 0; l < der->num_loads; l++)
        for (int k = 0; k < pb->num_grads; k++) {
            if (der->loads[l].buffer != pb->grads[k].buffer) continue;
            const ir_node *load = &pb->score_ir.nodes[der->loads[l].load];
            bwd_grad_load *gl = &pb->grad_loads[pb->num_grad_loads++];
            gl->grad = k;
            gl->ndim = load->nargs;
            gl->out_deriv = at;
            pb->outputs[at++] = der->loads[l].node;
            gl->out_index = at;
            for (int d = 0; d < load->nargs; d++)
                pb->outputs[at++] = load->args[d];
        }
    pb->num_outputs = at;
    const ir_node *ds = &pb->score_ir.nodes[der->dscore];
    pb->dscore_is_one = ds->op == IR_CONST && ds->type == IR_FLOAT && ds->imm.f == 1.0f;
    return 0;
}

static flex_status setup_grads(flex_context *ctx, bwd_problem *pb) {
    const flex_backward_args *a = pb->a;
    const flex_mod *mod = a->score_mod;
    int64_t offset = 0;
    for (int i = 0; i < a->num_buffer_grads; i++) {
        const flex_buffer_grad *bg = &a->buffer_grads[i];
        int buffer = -1;
        for (int j = 0; mod && j < mod->ir.num_buffers; j++)
            if (!strcmp(mod->ir.buffers[j].name, bg->name)) buffer = j;
        if (buffer < 0)
            return flex_fail(ctx, FLEX_ERR_MOD_NAME, "the score mod has no buffer '%s'", bg->name);
        if (pb->num_grads == IR_MAX_BUFFERS)
            return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                             "more than %d buffer gradients asked for", IR_MAX_BUFFERS);
        bwd_grad *g = &pb->grads[pb->num_grads++];
        g->buffer = buffer;
        g->dst = &bg->grad;
        const flex_tensor *view = &mod->views[buffer];
        int64_t numel = 1;
        for (int d = view->ndim - 1; d >= 0; d--) {
            g->dense_strides[d] = numel;
            numel *= view->sizes[d];
        }
        g->numel = numel;
        g->offset = offset;
        offset += numel;
    }
    pb->partial_len = offset;
    return FLEX_OK;
}

/* dq[b, h] = the chunks' accumulators summed in chunk order. */
static void write_dq(const bwd_problem *pb, int64_t b, int64_t h, int64_t qt, float *row) {
    const flex_tensor *dq = pb->a->dq;
    const size_t q_rows = (size_t)(pb->num_q_tiles * pb->q_tile);
    int64_t q0 = qt * pb->q_tile;
    int rows = (int)min64(pb->Lq - q0, pb->q_tile);
    int D = (int)pb->D;
    for (int r = 0; r < rows; r++) {
        size_t at = ((size_t)(b * pb->Hq + h) * q_rows + (size_t)(q0 + r)) * pb->dp;
        memcpy(row, pb->dq_acc + at, (size_t)D * sizeof(float));
        for (int c = 1; c < pb->chunks; c++) {
            const float *src = pb->dq_acc + (size_t)c * pb->dq_chunk_stride + at;
            for (int k = 0; k < D; k++)
                row[k] += src[k];
        }
        store_row(dq, row_offset(dq, b, h, q0 + r), D, row);
    }
}

/* Adds the threads' partial sums, in thread order, to the caller's
 * gradient tensors. */
static void write_buffer_grads(const bwd_problem *pb, const bwd_scratch *scratch, int threads) {
    for (int k = 0; k < pb->num_grads; k++) {
        const bwd_grad *g = &pb->grads[k];
        const flex_tensor *dst = g->dst;
        int ndim = dst->ndim;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
        for (int64_t e = 0; e < g->numel; e++) {
            double sum = 0.0;
            for (int t = 0; t < threads; t++)
                sum += scratch[t].partial[g->offset + e];
            if (sum == 0.0) continue;
            int64_t rest = e, off = 0;
            for (int d = 0; d < ndim; d++) {
                int64_t i = rest / g->dense_strides[d];
                rest -= i * g->dense_strides[d];
                off += i * dst->strides[d];
            }
            ((float *)dst->data)[off] += (float)sum;
        }
    }
}

flex_status flex_cpu_backward(flex_context *ctx, const flex_backward_args *args) {
    struct flex_plan local_plan;
    const struct flex_plan *plan = args->plan;
    if (!plan) {
        flex_forward_args fa = {.q = args->q,
                                .k = args->k,
                                .v = args->v,
                                .out = args->out,
                                .score_mod = args->score_mod,
                                .block_mask = args->block_mask,
                                .scale = args->scale};
        flex_status st = flex_plan_make(ctx, &fa, &local_plan);
        if (st != FLEX_OK) return st;
        plan = &local_plan;
    }

    bwd_problem pb;
    memset(&pb, 0, sizeof pb);
    pb.a = args;
    pb.kern = flex_cpu_select_kernels(plan->simd);
    pb.B = args->q.sizes[0];
    pb.Hq = args->q.sizes[1];
    pb.Lq = args->q.sizes[2];
    pb.D = args->q.sizes[3];
    pb.Hkv = args->k.sizes[1];
    pb.Lkv = args->k.sizes[2];
    pb.Dv = args->v.sizes[3];
    pb.group = pb.Hkv > 0 ? pb.Hq / pb.Hkv : 1;
    if (pb.group < 1) pb.group = 1;
    pb.mask = args->block_mask;
    pb.want_dq = args->dq != NULL && pb.D > 0;
    pb.want_dk = args->dk != NULL && pb.D > 0;
    pb.want_dv = args->dv != NULL && pb.Dv > 0;
    if (pb.B == 0 || pb.Hkv == 0) return FLEX_OK;

    pb.q_tile = plan->q_tile > 0 ? plan->q_tile : 64;
    pb.kv_tile = plan->kv_tile > 0 ? plan->kv_tile : 128;
    if (pb.mask) {
        pb.q_block = pb.mask->q_block;
        pb.kv_block = pb.mask->kv_block;
        while (pb.q_block % pb.q_tile)
            pb.q_tile /= 2;
        while (pb.kv_block % pb.kv_tile)
            pb.kv_tile /= 2;
        pb.num_q_blocks = pb.mask->num_q_blocks;
        pb.num_kv_blocks = pb.mask->num_kv_blocks;
    } else {
        pb.q_block = pb.q_tile;
        pb.kv_block = pb.kv_tile;
        pb.num_q_blocks = (pb.Lq + pb.q_tile - 1) / pb.q_tile;
        pb.num_kv_blocks = (pb.Lkv + pb.kv_tile - 1) / pb.kv_tile;
    }
    pb.mq = (int)cpu_round_up(pb.q_tile, CPU_MR);
    pb.nk = (int)cpu_round_up(pb.kv_tile, CPU_NR);
    pb.dp = (int)cpu_round_up(pb.D, CPU_DV_ALIGN);
    pb.dvp = (int)cpu_round_up(pb.Dv, CPU_DV_ALIGN);
    pb.num_q_tiles = (pb.Lq + pb.q_tile - 1) / pb.q_tile;
    pb.transpose = pick_transpose(pb.kern, pb.mq, pb.nk);

    flex_status result = FLEX_OK;
    mod_buffer_view score_views[IR_MAX_BUFFERS], mask_views[IR_MAX_BUFFERS];
    void *score_copies[IR_MAX_BUFFERS] = {0}, *mask_copies[IR_MAX_BUFFERS] = {0};
    bwd_scratch *scratch = NULL;
    int threads = plan->num_threads;
#ifdef _OPENMP
    if (threads <= 0) threads = omp_get_max_threads();
#endif
    if (threads <= 0) threads = 1;

    if ((result = setup_grads(ctx, &pb)) != FLEX_OK) goto done;
    const flex_mod *mask_mod = pb.mask ? pb.mask->mask_mod : NULL;
    if (pb.mask && pb.mask->num_partial > 0 && !mask_mod) {
        result = flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                           "block_mask has partial blocks but no mask mod to decide them");
        goto done;
    }
    /* The identity mod `score` needs neither evaluation nor derivative. */
    int identity = args->score_mod && args->score_mod->ir.root >= 0 &&
                   args->score_mod->ir.nodes[args->score_mod->ir.root].op == IR_SCORE;
    if (args->score_mod && !identity) {
        if (ir_copy(&pb.score_ir, &args->score_mod->ir) != 0) {
            result = flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "no memory to copy the score mod");
            goto done;
        }
        pb.score_ir_made = 1;
        pb.has_score = 1;
        mod_derivative der;
        int rc = mod_derive(&pb.score_ir, &der);
        if (rc == MOD_DERIVE_TOO_MANY_LOADS) {
            result = flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                               "the score mod reads float buffers at more than %d places; the "
                               "backward supports at most that many",
                               MOD_DERIVE_MAX_LOADS);
            goto done;
        }
        if (rc != 0 || find_outputs(&pb, &der) != 0) {
            result = flex_fail(
                ctx,
                rc == MOD_DERIVE_NOT_SCORE ? FLEX_ERR_INVALID_ARGUMENT : FLEX_ERR_OUT_OF_MEMORY,
                rc == MOD_DERIVE_NOT_SCORE ? "score_mod does not return a float score"
                                           : "no memory (or too many IR nodes) for the score mod's "
                                             "derivative");
            goto done;
        }
        if ((result = flex_mod_host_views(ctx, args->score_mod, score_views, score_copies)))
            goto done;
        pb.score_views = score_views;
    }
    if (pb.mask && pb.mask->num_partial > 0) {
        if ((result = flex_mod_host_views(ctx, mask_mod, mask_views, mask_copies))) goto done;
        pb.mask_ir = &mask_mod->ir;
        pb.mask_views = mask_views;
    }

    /* Chunks of kv blocks per (b, kv head): enough tasks to keep every
     * thread busy, bounded by the memory of their dQ accumulators. */
    {
        int64_t base = pb.B * pb.Hkv;
        int64_t chunks = 1;
        /* several tasks per thread, so that the dynamic schedule evens out
         * uneven masks and threads slowed by other work */
        if (base < 8 * (int64_t)threads) chunks = (8 * (int64_t)threads + base - 1) / base;
        if (chunks > pb.num_kv_blocks) chunks = pb.num_kv_blocks;
        size_t q_rows = (size_t)(pb.num_q_tiles * pb.q_tile);
        pb.dq_chunk_stride = (size_t)(pb.B * pb.Hq) * q_rows * (size_t)pb.dp;
        double limit = 512.0 * 1024 * 1024;
        while (pb.want_dq && chunks > 1 &&
               (double)chunks * (double)pb.dq_chunk_stride * 4.0 > limit)
            chunks--;
        pb.chunks = chunks < 1 ? 1 : (int)chunks;
    }

    /* Every allocation happens before any output is written. */
    pb.off_qrow = 0;
    pb.off_qpan = pb.off_qrow + (size_t)cpu_round_up((int64_t)pb.mq * pb.D, 16);
    pb.off_dorow = pb.off_qpan + (size_t)cpu_round_up((int64_t)pb.mq * pb.dp, 16);
    pb.off_dopan = pb.off_dorow + (size_t)cpu_round_up((int64_t)pb.mq * pb.Dv, 16);
    pb.off_lse = pb.off_dopan + (size_t)cpu_round_up((int64_t)pb.mq * pb.dvp, 16);
    pb.off_delta = pb.off_lse + (size_t)cpu_round_up(pb.mq, 16);
    pb.q_record = pb.off_delta + (size_t)cpu_round_up(pb.mq, 16);
    size_t records = (size_t)(pb.B * pb.Hq * pb.num_q_tiles);
    if (posix_memalign((void **)&pb.packed, 64, (records * pb.q_record + 16) * sizeof(float))) {
        pb.packed = NULL;
        result = flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY,
                           "no memory for the backward's packed q and dout (%zu floats)",
                           records * pb.q_record);
        goto done;
    }
    if (pb.want_dq) {
        size_t n = (size_t)pb.chunks * pb.dq_chunk_stride + 16;
        if (posix_memalign((void **)&pb.dq_acc, 64, n * sizeof(float))) {
            pb.dq_acc = NULL;
            result = flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY,
                               "no memory for the backward's dq accumulators (%zu floats)", n);
            goto done;
        }
        memset(pb.dq_acc, 0, n * sizeof(float));
    }
    scratch = calloc((size_t)threads, sizeof *scratch);
    int ok = scratch != NULL;
    for (int t = 0; ok && t < threads; t++)
        ok = scratch_alloc(&scratch[t], &pb) == 0;
    if (!ok) {
        result = flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY,
                           "no memory for the CPU backward's scratch (%d threads, q_tile %d, "
                           "kv_tile %d, D %lld, Dv %lld)",
                           threads, pb.q_tile, pb.kv_tile, (long long)pb.D, (long long)pb.Dv);
        goto done;
    }

    {
        int64_t n = (int64_t)records;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
        for (int64_t i = 0; i < n; i++) {
            int t = 0;
#ifdef _OPENMP
            t = omp_get_thread_num();
#endif
            int64_t qt = i % pb.num_q_tiles, bh = i / pb.num_q_tiles;
            pack_q_tile(&pb, scratch[t].row, bh / pb.Hq, bh % pb.Hq, qt);
        }
    }

    {
        int64_t tasks = pb.B * pb.Hkv * pb.chunks;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
        {
            int t = 0;
#ifdef _OPENMP
            t = omp_get_thread_num();
#endif
            unsigned saved_fp = cpu_subnormals_off();
            if (pb.num_grads > 0) {
                /* Buffer gradients are summed per thread: a static schedule
                 * keeps which tasks (and so which sums) a thread gets the
                 * same. */
#ifdef _OPENMP
#pragma omp for schedule(static, 1)
#endif
                for (int64_t task = 0; task < tasks; task++)
                    do_task(&pb, &scratch[t], task);
            } else {
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
                for (int64_t task = 0; task < tasks; task++)
                    do_task(&pb, &scratch[t], task);
            }
            cpu_subnormals_restore(saved_fp);
        }
    }
    if (pb.bounds.failed) {
        result = flex_fail_bounds(ctx, pb.bounds.mod, &pb.bounds.err);
        goto done;
    }

    if (pb.want_dq) {
        int64_t n = (int64_t)records;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
        for (int64_t i = 0; i < n; i++) {
            int t = 0;
#ifdef _OPENMP
            t = omp_get_thread_num();
#endif
            int64_t qt = i % pb.num_q_tiles, bh = i / pb.num_q_tiles;
            write_dq(&pb, bh / pb.Hq, bh % pb.Hq, qt, scratch[t].row);
        }
    }
    if (pb.num_grads > 0) write_buffer_grads(&pb, scratch, threads);

done:
    for (int t = 0; scratch && t < threads; t++)
        scratch_free(&scratch[t]);
    free(scratch);
    free(pb.packed);
    free(pb.dq_acc);
    free(pb.outputs);
    if (pb.score_ir_made) ir_free(&pb.score_ir);
    flex_mod_release_host_views(score_copies);
    flex_mod_release_host_views(mask_copies);
    return result;
}
