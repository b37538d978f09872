/*
 * Tiled, block-sparse attention forward on the CPU.
 *
 * Work items are (b, h, q-tile). Each thread takes items off a list sorted
 * by descending number of non-empty KV blocks (OpenMP dynamic schedule), so
 * the long rows of an uneven mask start first and the short ones fill the
 * gaps at the end. For one item the thread packs the Q tile once (f32,
 * contiguous), then walks the row's partial and full KV blocks in ascending
 * order. K (transposed into 32-column panels) and V (32-column panels) are
 * packed once per call into aligned f32 copies shared by all threads (per
 * tile into thread scratch when that copy would be too large). Per KV tile
 * the thread computes the scores with the register-blocked kernel, applies
 * the score mod everywhere and the mask mod only in partial blocks, and
 * folds the tile into the online softmax state (core/softmax.h rule). A
 * partial tile is cut into units of 16 rows x 32 columns that interval
 * analysis classifies as empty, full or mixed; only mixed units go through
 * the tile interpreter, and each row group computes only its non-empty
 * units. Work items run with subnormals flushed to zero, but for the mods,
 * which keep them (cpu.h, core/fpenv.h).
 *
 * Scratch (and the packed copies) are allocated before any output is
 * written, once per call. All arithmetic is f32; f16/bf16 inputs are
 * converted while packing and the output is rounded to nearest even on the
 * way out. A buffer read out of range stops every thread at its next work
 * item; out and lse are then partly written (unspecified).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "internal.h"
#include "plan.h"
#include "softmax.h"
#include "cpu.h"

/* ---- element access ---- */

/* Reads n elements with stride `stride` starting at element off into dst. */
static void load_row(const flex_tensor *t, int64_t off, int64_t stride, int n, float *dst) {
    if (t->dtype == FLEX_F32 && stride == 1) {
        memcpy(dst, (const float *)t->data + off, (size_t)n * sizeof(float));
        return;
    }
    for (int i = 0; i < n; i++)
        dst[i] = flex_load_as_float(t->data, t->dtype, off + (int64_t)i * stride);
}

/* A partial tile is decided in units of SUB_ROWS rows x CPU_NR columns:
 * small enough that a diagonal leaves little undecided, large enough that a
 * row group still reuses each K panel from L1 across several register
 * blocks. */
enum { SUB_ROWS = 16 };
enum { UNIT_EMPTY = 0, UNIT_MIXED = 1, UNIT_FULL = 2 };

void flex_cpu_block_row_classes(const struct flex_block_mask *mask, int64_t num_kv_blocks,
                                int64_t b, int64_t h, int64_t qb, uint8_t *classes) {
    if (!mask) {
        memset(classes, FLEX_BLOCK_FULL, (size_t)num_kv_blocks);
        return;
    }
    memset(classes, FLEX_BLOCK_EMPTY, (size_t)num_kv_blocks);
    int64_t bm = mask->B == 1 ? 0 : b, hm = mask->H == 1 ? 0 : h;
    int64_t row = (bm * mask->H + hm) * mask->num_q_blocks + qb;
    for (int32_t i = mask->kv_partial.offsets[row]; i < mask->kv_partial.offsets[row + 1]; i++)
        classes[mask->kv_partial.indices[i]] = FLEX_BLOCK_PARTIAL;
    for (int32_t i = mask->kv_full.offsets[row]; i < mask->kv_full.offsets[row + 1]; i++)
        classes[mask->kv_full.indices[i]] = FLEX_BLOCK_FULL;
}

/* ---- the shared, read-only description of one call ---- */

typedef struct fwd_problem {
    const flex_forward_args *a;
    const cpu_kernels *kern;
    int64_t B, Hq, Hkv, Lq, Lkv, D, Dv;
    int64_t group;       /* query heads per kv head */
    int q_tile, kv_tile; /* rows / columns of a tile (real) */
    int mq, nk, dvp;     /* padded scratch sizes */
    int64_t num_q_tiles;
    int q_block, kv_block; /* block size of the mask (tile sizes when no mask) */
    int64_t num_q_blocks, num_kv_blocks;
    const struct flex_block_mask *mask;
    const ir_mod *score_ir, *mask_ir;
    const mod_buffer_view *score_views, *mask_views;
    /* Interval analysis of the mask mod over sub-tiles of partial tiles:
     * usable when the mod reads no buffer or mask_tables were built. */
    int mask_intervals;
    const mod_range_tables *mask_tables;
    int units_per_row; /* 32-column units of a tile: nk / CPU_NR */

    /* K and V packed once per call (NULL: packed per tile into scratch) */
    int64_t num_kv_tiles; /* per (b, kv head) */
    float *packed_k, *packed_v;
    size_t packed_k_stride, packed_v_stride; /* floats per tile */

    cpu_bounds_failure bounds; /* the first out-of-range buffer read */
} fwd_problem;

typedef struct work_item {
    int32_t b, h, qt;
    int32_t cost; /* non-empty kv blocks of the row */
} work_item;

/* Per-thread scratch. */
typedef struct fwd_scratch {
    float *q;             /* mq x D */
    const float *qt;      /* the Q tile in use: q, or the rows of Q themselves */
    float *kp;            /* nk/32 panels of D x 32 */
    float *vp;            /* panels of nk x 32 (last 16) */
    float *s;             /* mq x nk scores, then probabilities */
    float *o;             /* mq x dvp accumulator */
    float *m, *l, *alpha; /* mq each */
    float *row;           /* max(D, Dv) staging for strided reads */
    uint8_t *keep;        /* mq x nk mask tile (valid in UNIT_MIXED units only) */
    uint8_t *units;       /* unit classes, (mq / SUB_ROWS) x units_per_row */
    void *interval;       /* interval-analysis scratch */
    ir_value *point;      /* scalar interpreter scratch (fallback path) */
    mod_tile *score_tile, *mask_tile;
    void *block; /* the single allocation behind the float arrays */
} fwd_scratch;

static void scratch_free(fwd_scratch *sc) {
    free(sc->block);
    free(sc->keep);
    free(sc->units);
    free(sc->interval);
    free(sc->point);
    if (sc->score_tile) mod_tile_destroy(sc->score_tile);
    if (sc->mask_tile) mod_tile_destroy(sc->mask_tile);
    memset(sc, 0, sizeof *sc);
}

static int scratch_alloc(fwd_scratch *sc, const fwd_problem *pb) {
    memset(sc, 0, sizeof *sc);
    size_t mq = (size_t)pb->mq, nk = (size_t)pb->nk, dvp = (size_t)pb->dvp, D = (size_t)pb->D;
    size_t rowlen = (size_t)(pb->D > pb->Dv ? pb->D : pb->Dv);
    size_t sizes[9] = {mq * D, nk * D, nk * dvp, mq * nk, mq * dvp, mq, mq, mq, rowlen};
    float **const dst[9] = {&sc->q, &sc->kp, &sc->vp,    &sc->s,  &sc->o,
                            &sc->m, &sc->l,  &sc->alpha, &sc->row};
    if (cpu_scratch_carve(9, sizes, dst, &sc->block) != 0) return -1;
    sc->keep = malloc(mq * nk);
    if (!sc->keep) return -1;
    sc->units = malloc((size_t)cpu_round_up((int64_t)mq, SUB_ROWS) / SUB_ROWS * nk / CPU_NR);
    if (!sc->units) return -1;
    if (pb->mask_intervals) {
        size_t bytes = mod_interval_scratch_size(pb->mask_ir);
        sc->interval = malloc(bytes > 0 ? bytes : 1);
        if (!sc->interval) return -1;
    }
    int nodes = 1;
    if (pb->score_ir && pb->score_ir->num_nodes > nodes) nodes = pb->score_ir->num_nodes;
    if (pb->mask_ir && pb->mask_ir->num_nodes > nodes) nodes = pb->mask_ir->num_nodes;
    sc->point = malloc((size_t)nodes * sizeof(ir_value));
    if (!sc->point) return -1;
    if (pb->score_ir) {
        sc->score_tile = mod_tile_create(pb->score_ir, pb->q_tile, pb->kv_tile);
        if (!sc->score_tile) return -1;
    }
    if (pb->mask_ir) {
        sc->mask_tile = mod_tile_create(pb->mask_ir, pb->q_tile, pb->kv_tile);
        if (!sc->mask_tile) return -1;
    }
    return 0;
}

/* ---- packing ---- */

static void pack_q(const fwd_problem *pb, fwd_scratch *sc, int64_t b, int64_t h, int64_t q0,
                   int rows) {
    const flex_tensor *t = &pb->a->q;
    int D = (int)pb->D;
    /* f32 rows that already lie one after another at stride D are the
     * packed layout: the kernels read them in place. */
    if (t->dtype == FLEX_F32 && t->strides[3] == 1 && t->strides[2] == D && rows == pb->mq) {
        sc->qt = (const float *)t->data + b * t->strides[0] + h * t->strides[1] + q0 * D;
        return;
    }
    sc->qt = sc->q;
    for (int r = 0; r < rows; r++) {
        int64_t off = b * t->strides[0] + h * t->strides[1] + (q0 + r) * t->strides[2];
        load_row(t, off, t->strides[3], D, sc->q + (size_t)r * D);
    }
    if (rows < pb->mq) memset(sc->q + (size_t)rows * D, 0, (size_t)(pb->mq - rows) * D * 4);
}

/* K rows kv0 .. kv0+cols-1 into panels: kp[p][k][c] = K[kv0 + 32p + c][k]. */
static void pack_k(const fwd_problem *pb, float *kp, float *row, int64_t b, int64_t hk, int64_t kv0,
                   int cols) {
    const flex_tensor *t = &pb->a->k;
    int D = (int)pb->D;
    int used_panels = (cols + CPU_NR - 1) / CPU_NR;
    if (t->dtype == FLEX_F32 && t->strides[3] == 1) {
        /* Panel by panel: 32 source rows read in step, each panel row
         * written whole. */
        const float *src = (const float *)t->data + b * t->strides[0] + hk * t->strides[1];
        for (int p = 0; p < used_panels; p++) {
            int n0 = p * CPU_NR, w = cols - n0 < CPU_NR ? cols - n0 : CPU_NR;
            float *dst = kp + (size_t)p * D * CPU_NR;
            const float *rows0 = src + (kv0 + n0) * t->strides[2];
            for (int k = 0; k < D; k++)
                for (int c = 0; c < w; c++)
                    dst[(size_t)k * CPU_NR + c] = rows0[c * t->strides[2] + k];
        }
    } else {
        for (int n = 0; n < cols; n++) {
            int64_t off = b * t->strides[0] + hk * t->strides[1] + (kv0 + n) * t->strides[2];
            load_row(t, off, t->strides[3], D, row);
            float *dst = kp + (size_t)(n / CPU_NR) * D * CPU_NR + (n % CPU_NR);
            for (int k = 0; k < D; k++)
                dst[(size_t)k * CPU_NR] = row[k];
        }
    }
    /* Zero the unused columns of the last used panel, and any wholly unused
     * panels (their scores are overwritten with -inf anyway, but keep them
     * finite). */
    for (int n = cols; n < used_panels * CPU_NR; n++) {
        float *dst = kp + (size_t)(n / CPU_NR) * D * CPU_NR + (n % CPU_NR);
        for (int k = 0; k < D; k++)
            dst[(size_t)k * CPU_NR] = 0.0f;
    }
    if (used_panels * CPU_NR < pb->nk)
        memset(kp + (size_t)used_panels * D * CPU_NR, 0,
               (size_t)(pb->nk - used_panels * CPU_NR) * D * sizeof(float));
}

/* V rows into panels of 32 columns (the last one 16 wide when dvp % 32 ==
 * 16); rows beyond cols are zero. */
static void pack_v(const fwd_problem *pb, float *vp, float *row, int64_t b, int64_t hk, int64_t kv0,
                   int cols) {
    const flex_tensor *t = &pb->a->v;
    int Dv = (int)pb->Dv, dvp = pb->dvp, nk = pb->nk;
    if (t->dtype == FLEX_F32 && t->strides[3] == 1 && Dv == dvp) {
        /* Every panel lies inside Dv: whole runs of 32 (or 16) floats. */
        const float *src = (const float *)t->data + b * t->strides[0] + hk * t->strides[1];
        for (int n = 0; n < nk; n++) {
            const float *vrow = src + (kv0 + n) * t->strides[2];
            for (int c0 = 0; c0 < dvp; c0 += CPU_NR) {
                int w = dvp - c0 >= CPU_NR ? CPU_NR : dvp - c0;
                float *dst = vp + (size_t)c0 * nk + (size_t)n * w;
                /* plain loops: a library call per 128 bytes costs more */
                if (n < cols)
                    for (int c = 0; c < w; c++)
                        dst[c] = vrow[c0 + c];
                else
                    for (int c = 0; c < w; c++)
                        dst[c] = 0.0f;
            }
        }
        return;
    }
    for (int n = 0; n < nk; n++) {
        if (n < cols) {
            int64_t off = b * t->strides[0] + hk * t->strides[1] + (kv0 + n) * t->strides[2];
            load_row(t, off, t->strides[3], Dv, row);
        }
        for (int c0 = 0; c0 < dvp; c0 += CPU_NR) {
            int w = dvp - c0 >= CPU_NR ? CPU_NR : dvp - c0;
            float *dst = vp + (size_t)c0 * nk + (size_t)n * w;
            for (int c = 0; c < w; c++)
                dst[c] = (n < cols && c0 + c < Dv) ? row[c0 + c] : 0.0f;
        }
    }
}

/* ---- one KV tile ---- */

/* Real columns of unit p (32 wide but for a ragged last one). */
static inline int unit_width(int p, int cols) {
    int w = cols - p * CPU_NR;
    return w < CPU_NR ? w : CPU_NR;
}

/* Whether element (r, c) of the tile is attended: every element of a full
 * unit is, a mixed unit says so in keep. cls holds the row group's units. */
static inline int attended(const fwd_scratch *sc, int nk, const uint8_t *cls, int r, int c) {
    uint8_t u = cls[c / CPU_NR];
    return u == UNIT_FULL || (u == UNIT_MIXED && sc->keep[(size_t)r * nk + c]);
}

/* Scalar fallback for a partial row group whose score mod failed on the
 * tile interpreter: the failing read may lie at an element the mask
 * removes, which is not an error. Recomputes the raw scores of rows
 * g0 .. g0+rows-1, columns c0 .. c1-1 (c0 a multiple of 32) and re-evaluates
 * only the attended elements. */
static int score_attended_points(const fwd_problem *pb, fwd_scratch *sc, const float *kp, int32_t b,
                                 int32_t h, int64_t q0, int g0, int mg, int rows, int64_t kv0,
                                 int c0, int c1, const uint8_t *cls, mod_bounds_error *err) {
    int nk = pb->nk;
    int n = (int)cpu_round_up(c1 - c0, CPU_NR);
    pb->kern->scores_ld(mg, n, (int)pb->D, sc->qt + (size_t)g0 * pb->D,
                        kp + (size_t)(c0 / CPU_NR) * pb->D * CPU_NR, pb->a->scale,
                        sc->s + (size_t)g0 * nk + c0, nk);
    for (int r = g0; r < g0 + rows; r++)
        for (int c = c0; c < c1; c++) {
            if (!attended(sc, nk, cls, r, c)) continue;
            ir_value result;
            float *sv = &sc->s[(size_t)r * nk + c];
            if (mod_eval_point(pb->score_ir, pb->score_views, *sv, b, h, (int32_t)(q0 + r),
                               (int32_t)(kv0 + c), sc->point, &result, err) != 0)
                return -1;
            *sv = result.f;
        }
    return 0;
}

/* Scores, score mod, mask, online softmax and P.V for rows g0 .. g0+mg-1
 * of the tile (mg a multiple of CPU_MR; rows g0 .. g0+rows-1 are real) over
 * columns c0 .. c1-1 (multiples of 32; real columns end at ce). cls: the
 * unit classes of the row group in a partial tile (the mask applies in its
 * mixed units), NULL in a full one. */
static int do_row_group(fwd_problem *pb, fwd_scratch *sc, const float *kp, const float *vp,
                        int32_t b, int32_t h, int64_t q0, int g0, int mg, int rows, int64_t kv0,
                        int c0, int c1, int ce, const uint8_t *cls) {
    const cpu_kernels *kn = pb->kern;
    int nk = pb->nk, n = c1 - c0;
    float *s = sc->s + (size_t)g0 * nk + c0;
    mod_bounds_error err;
    memset(&err, 0, sizeof err);
    kn->scores_ld(mg, n, (int)pb->D, sc->qt + (size_t)g0 * pb->D,
                  kp + (size_t)(c0 / CPU_NR) * pb->D * CPU_NR, pb->a->scale, s, nk);
    if (pb->score_ir && ce > c0) {
        unsigned fp = cpu_mods_begin();
        if (mod_tile_score(sc->score_tile, pb->score_views, b, h, (int32_t)(q0 + g0), rows,
                           (int32_t)(kv0 + c0), ce - c0, s, nk, &err) != 0) {
            mod_bounds_error err2;
            memset(&err2, 0, sizeof err2);
            if (!cls || score_attended_points(pb, sc, kp, b, h, q0, g0, mg, rows, kv0, c0, ce, cls,
                                              &err2) != 0) {
                cpu_mods_end(fp);
                cpu_bounds_failure_record(&pb->bounds, pb->a->score_mod, cls ? &err2 : &err);
                return -1;
            }
        }
        cpu_mods_end(fp);
    }
    for (int r = g0; r < g0 + rows; r++) {
        float *srow = sc->s + (size_t)r * nk;
        if (cls) {
            const uint8_t *keep = sc->keep + (size_t)r * nk;
            for (int c = c0; c < ce; c += CPU_NR)
                if (cls[c / CPU_NR] == UNIT_MIXED)
                    kn->mask_scores(srow + c, keep + c, ce - c < CPU_NR ? ce - c : CPU_NR);
        }
        for (int c = ce; c < c1; c++)
            srow[c] = -INFINITY;
        /* Online softmax update (core/softmax.h rule, vector exp). */
        float m_old = sc->m[r];
        float tile_max = kn->row_max(srow + c0, n);
        float m_new = tile_max > m_old ? tile_max : m_old;
        float shift = flex_softmax_shift(m_new);
        float sum = kn->exp_sum(srow + c0, n, shift);
        float alpha = flex_softmax_rescale(m_old, m_new);
        sc->l[r] = sc->l[r] * alpha + sum;
        sc->m[r] = m_new;
        sc->alpha[r] = alpha;
    }
    /* Padding rows carry no probability mass. */
    for (int r = g0 + rows; r < g0 + mg; r++) {
        memset(sc->s + (size_t)r * nk + c0, 0, (size_t)n * sizeof(float));
        sc->alpha[r] = 1.0f;
    }
    kn->accumulate_rows(mg, n, pb->dvp, s, nk, vp, nk, c0, sc->alpha + g0,
                        sc->o + (size_t)g0 * pb->dvp);
    return 0;
}

/* Where a partial tile is decided. The tile (rows x cols at q0, kv0) is cut
 * into units of SUB_ROWS rows x 32 columns, each empty, full or mixed. */
typedef struct partial_tile {
    int32_t b, h;
    int64_t q0, kv0;
    int rows, cols;
    int groups, panels; /* units down and across */
} partial_tile;

static void fill_units(const fwd_problem *pb, fwd_scratch *sc, int g0, int g1, int p0, int p1,
                       uint8_t cls) {
    for (int g = g0; g < g1; g++)
        memset(sc->units + (size_t)g * pb->units_per_row + p0, cls, (size_t)(p1 - p0));
}

/* Classifies the units g0..g1-1 x p0..p1-1 with interval analysis: one
 * question for the whole rectangle, halves (the longer side in elements)
 * while the answer is "undecided". The work grows with the mask's boundary
 * inside the tile, not with its area: a diagonal costs about two questions
 * per row group. */
static void classify_units(const fwd_problem *pb, fwd_scratch *sc, const partial_tile *t, int g0,
                           int g1, int p0, int p1) {
    int r_end = g1 * SUB_ROWS < t->rows ? g1 * SUB_ROWS : t->rows;
    int c_end = p1 * CPU_NR < t->cols ? p1 * CPU_NR : t->cols;
    mod_box box = {{t->b, t->h, t->q0 + (int64_t)g0 * SUB_ROWS, t->kv0 + (int64_t)p0 * CPU_NR},
                   {t->b, t->h, t->q0 + r_end - 1, t->kv0 + c_end - 1}};
    mod_tri tri = mod_interval_mask(pb->mask_ir, pb->mask_tables, &box, sc->interval);
    if (tri == MOD_TRI_FALSE || tri == MOD_TRI_TRUE) {
        fill_units(pb, sc, g0, g1, p0, p1, tri == MOD_TRI_TRUE ? UNIT_FULL : UNIT_EMPTY);
        return;
    }
    int down = g1 - g0, across = p1 - p0;
    if (down == 1 && across == 1) {
        fill_units(pb, sc, g0, g1, p0, p1, UNIT_MIXED);
        return;
    }
    if (across == 1 || (down > 1 && down * SUB_ROWS >= across * CPU_NR)) {
        int mid = g0 + down / 2;
        classify_units(pb, sc, t, g0, mid, p0, p1);
        classify_units(pb, sc, t, mid, g1, p0, p1);
    } else {
        int mid = p0 + across / 2;
        classify_units(pb, sc, t, g0, g1, p0, mid);
        classify_units(pb, sc, t, g0, g1, mid, p1);
    }
}

/* Evaluates the mask element by element in the mixed units of row group g
 * (one tile-interpreter call per run of adjacent mixed units), then
 * reclassifies each of them by what it holds: a unit with no attended
 * element costs nothing further, one with all attended needs no masking.
 * Returns 0, or -1 after recording a failure. */
static int evaluate_mixed_units(fwd_problem *pb, fwd_scratch *sc, const partial_tile *t, int g) {
    int nk = pb->nk;
    int r0 = g * SUB_ROWS, grows = t->rows - r0 < SUB_ROWS ? t->rows - r0 : SUB_ROWS;
    uint8_t *cls = sc->units + (size_t)g * pb->units_per_row;
    for (int p = 0; p < t->panels;) {
        if (cls[p] != UNIT_MIXED) {
            p++;
            continue;
        }
        int p_end = p + 1;
        while (p_end < t->panels && cls[p_end] == UNIT_MIXED)
            p_end++;
        int c0 = p * CPU_NR, c1 = p_end * CPU_NR < t->cols ? p_end * CPU_NR : t->cols;
        mod_bounds_error err;
        memset(&err, 0, sizeof err);
        if (mod_tile_mask(sc->mask_tile, pb->mask_views, t->b, t->h, (int32_t)(t->q0 + r0), grows,
                          (int32_t)(t->kv0 + c0), c1 - c0, sc->keep + (size_t)r0 * nk + c0, nk,
                          &err) != 0) {
            cpu_bounds_failure_record(&pb->bounds, pb->mask->mask_mod, &err);
            return -1;
        }
        for (; p < p_end; p++) {
            int w = unit_width(p, t->cols);
            unsigned any = 0, all = 1;
            for (int r = r0; r < r0 + grows; r++) {
                const uint8_t *k = sc->keep + (size_t)r * nk + p * CPU_NR;
                unsigned row_any = 0, row_all = 1;
                for (int c = 0; c < w; c++) {
                    row_any |= k[c];
                    row_all &= k[c];
                }
                any |= row_any;
                all &= row_all;
            }
            cls[p] = !any ? UNIT_EMPTY : all ? UNIT_FULL : UNIT_MIXED;
        }
    }
    return 0;
}

/* Processes KV columns kv0 .. kv0+cols-1 for the packed Q tile. Returns 0,
 * or -1 after recording a failure. */
static int do_kv_tile(fwd_problem *pb, fwd_scratch *sc, int32_t b, int32_t h, int64_t hk,
                      int64_t q0, int rows, int64_t kv0, int cols, int partial) {
    int mq = pb->mq;
    const float *kp = sc->kp, *vp = sc->vp;
    partial_tile t = {
        b, h, q0, kv0, rows, cols, (rows + SUB_ROWS - 1) / SUB_ROWS, (cols + CPU_NR - 1) / CPU_NR};
    if (partial) {
        /* Decide the units first (no FLOPs are spent on a tile the mask
         * empties): interval analysis where it can, the tile interpreter on
         * what it leaves undecided. */
        unsigned fp = cpu_mods_begin();
        if (pb->mask_intervals)
            classify_units(pb, sc, &t, 0, t.groups, 0, t.panels);
        else
            fill_units(pb, sc, 0, t.groups, 0, t.panels, UNIT_MIXED);
        int any = 0;
        for (int g = 0; g < t.groups; g++) {
            if (evaluate_mixed_units(pb, sc, &t, g) != 0) {
                cpu_mods_end(fp);
                return -1;
            }
            const uint8_t *cls = sc->units + (size_t)g * pb->units_per_row;
            for (int p = 0; p < t.panels && !any; p++)
                any = cls[p] != UNIT_EMPTY;
        }
        cpu_mods_end(fp);
        if (!any) return 0; /* the mask empties this tile */
    }
    if (pb->packed_k) {
        size_t tile = (size_t)((b * pb->Hkv + hk) * pb->num_kv_tiles + kv0 / pb->kv_tile);
        kp = pb->packed_k + tile * pb->packed_k_stride;
        vp = pb->packed_v + tile * pb->packed_v_stride;
    } else {
        pack_k(pb, sc->kp, sc->row, b, hk, kv0, cols);
        pack_v(pb, sc->vp, sc->row, b, hk, kv0, cols);
    }
    if (!partial)
        return do_row_group(pb, sc, kp, vp, b, h, q0, 0, mq, rows, kv0, 0,
                            (int)cpu_round_up(cols, CPU_NR), cols, NULL);

    /* Each row group computes its runs of non-empty units only: the far side
     * of a diagonal, the outside of a window and the gaps between documents
     * cost no FLOPs, and full units no mask evaluation. An empty unit leaves
     * the softmax state of its rows unchanged, which is exact. */
    for (int g = 0; g < t.groups; g++) {
        int g0 = g * SUB_ROWS;
        int grows = rows - g0 < SUB_ROWS ? rows - g0 : SUB_ROWS;
        int mg = (int)cpu_round_up(grows, CPU_MR);
        const uint8_t *cls = sc->units + (size_t)g * pb->units_per_row;
        for (int p = 0; p < t.panels;) {
            if (cls[p] == UNIT_EMPTY) {
                p++;
                continue;
            }
            int p_end = p + 1;
            while (p_end < t.panels && cls[p_end] != UNIT_EMPTY)
                p_end++;
            int c0 = p * CPU_NR, c1 = p_end * CPU_NR, ce = c1 < cols ? c1 : cols;
            if (do_row_group(pb, sc, kp, vp, b, h, q0, g0, mg, grows, kv0, c0, c1, ce, cls) != 0)
                return -1;
            p = p_end;
        }
    }
    return 0;
}

/* ---- one work item ---- */

static void write_output(const fwd_problem *pb, fwd_scratch *sc, int64_t b, int64_t h, int64_t q0,
                         int rows) {
    const flex_tensor *out = &pb->a->out;
    const flex_tensor *lse = pb->a->lse;
    int Dv = (int)pb->Dv;
    for (int r = 0; r < rows; r++) {
        /* l is 0 for a row with no kept score, NaN for a row with a NaN or
         * +inf one (core/softmax.h): the output is then 0 or NaN. */
        float l = sc->l[r];
        float inv = flex_softmax_inverse(l);
        const float *orow = sc->o + (size_t)r * pb->dvp;
        int64_t off = b * out->strides[0] + h * out->strides[1] + (q0 + r) * out->strides[2];
        int64_t st = out->strides[3];
        if (out->dtype == FLEX_F32 && st == 1) {
            float *dst = (float *)out->data + off;
            if (l != 0.0f)
                for (int c = 0; c < Dv; c++)
                    dst[c] = orow[c] * inv;
            else
                memset(dst, 0, (size_t)Dv * sizeof(float));
        } else {
            for (int c = 0; c < Dv; c++)
                flex_store_from_float(out->data, out->dtype, off + c * st,
                                      l != 0.0f ? orow[c] * inv : 0.0f);
        }
        if (lse) {
            int64_t loff = b * lse->strides[0] + h * lse->strides[1] + (q0 + r) * lse->strides[2];
            ((float *)lse->data)[loff] = flex_softmax_lse(sc->m[r], l);
        }
    }
}

static void do_item(fwd_problem *pb, fwd_scratch *sc, const work_item *it, uint8_t *classes) {
    int32_t b = it->b, h = it->h;
    int64_t hk = h / pb->group;
    int64_t q0 = (int64_t)it->qt * pb->q_tile;
    int rows = (int)(pb->Lq - q0 < pb->q_tile ? pb->Lq - q0 : pb->q_tile);
    pack_q(pb, sc, b, h, q0, rows);
    flex_softmax_init(sc->m, sc->l, pb->mq);
    memset(sc->o, 0, (size_t)pb->mq * pb->dvp * sizeof(float));

    int64_t qb = q0 / pb->q_block;
    flex_cpu_block_row_classes(pb->mask, pb->num_kv_blocks, b, h, qb, classes);
    for (int64_t j = 0; j < pb->num_kv_blocks; j++) {
        if (classes[j] == FLEX_BLOCK_EMPTY) continue;
        int partial = classes[j] == FLEX_BLOCK_PARTIAL;
        int64_t blk_end = (j + 1) * pb->kv_block;
        if (blk_end > pb->Lkv) blk_end = pb->Lkv;
        for (int64_t kv0 = j * pb->kv_block; kv0 < blk_end; kv0 += pb->kv_tile) {
            int cols = (int)(blk_end - kv0 < pb->kv_tile ? blk_end - kv0 : pb->kv_tile);
            if (do_kv_tile(pb, sc, b, h, hk, q0, rows, kv0, cols, partial) != 0) return;
        }
    }
    write_output(pb, sc, b, h, q0, rows);
}

/* Packs every K/V tile of the call once (in parallel) into pb->packed_k/v;
 * leaves them NULL (per-tile packing) when the copy would exceed the plan's
 * limit or memory is short. */
static void prepack_kv(fwd_problem *pb, const struct flex_plan *plan, fwd_scratch *scratch,
                       int threads) {
    pb->num_kv_tiles = (pb->Lkv + pb->kv_tile - 1) / pb->kv_tile;
    pb->packed_k_stride = (size_t)pb->nk * (size_t)pb->D;
    pb->packed_v_stride = (size_t)pb->nk * (size_t)pb->dvp;
    int64_t tiles = pb->B * pb->Hkv * pb->num_kv_tiles;
    double bytes = (double)tiles * (double)(pb->packed_k_stride + pb->packed_v_stride) * 4.0;
    if (tiles == 0 || (plan->prepack_limit_bytes > 0 && bytes > (double)plan->prepack_limit_bytes))
        return;
    float *k = NULL, *v = NULL;
    if (posix_memalign((void **)&k, 64, (size_t)tiles * pb->packed_k_stride * sizeof(float)) ||
        posix_memalign((void **)&v, 64, (size_t)tiles * pb->packed_v_stride * sizeof(float))) {
        free(k);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (int64_t i = 0; i < tiles; i++) {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        int64_t tile = i % pb->num_kv_tiles, bh = i / pb->num_kv_tiles;
        int64_t b = bh / pb->Hkv, hk = bh % pb->Hkv;
        int64_t kv0 = tile * pb->kv_tile;
        int cols = (int)(pb->Lkv - kv0 < pb->kv_tile ? pb->Lkv - kv0 : pb->kv_tile);
        pack_k(pb, k + (size_t)i * pb->packed_k_stride, scratch[t].row, b, hk, kv0, cols);
        pack_v(pb, v + (size_t)i * pb->packed_v_stride, scratch[t].row, b, hk, kv0, cols);
    }
    (void)threads;
    pb->packed_k = k;
    pb->packed_v = v;
}

/* Whether interval analysis can decide sub-tiles of partial tiles, building
 * the range tables of the mask mod's buffers into *tables when it reads any.
 * A table costs a pass over its buffer, so a buffer much larger than the
 * attention's rows (a dense q x kv mask held in a buffer, say) is left to
 * the tile interpreter alone. Out of memory is no error: the sub-tiles are
 * then all evaluated element by element. */
static int mask_interval_setup(const fwd_problem *pb, mod_range_tables **tables) {
    const ir_mod *ir = pb->mask_ir;
    if (ir->num_buffers == 0) return 1;
    int64_t elements = 0;
    for (int i = 0; i < ir->num_buffers && i < IR_MAX_BUFFERS; i++) {
        const mod_buffer_view *v = &pb->mask_views[i];
        int64_t n = 1;
        for (int d = 0; d < v->ndim; d++)
            n *= v->sizes[d];
        elements += n;
    }
    if (elements > 4 * pb->B * pb->Hq * (pb->Lq + pb->Lkv) + 65536) return 0;
    *tables = mod_range_tables_build(ir, pb->mask_views);
    return *tables != NULL;
}

static int compare_items(const void *x, const void *y) {
    const work_item *a = x, *b = y;
    if (a->cost != b->cost) return a->cost > b->cost ? -1 : 1;
    /* Stable order among equal costs keeps memory access sequential. */
    if (a->b != b->b) return a->b < b->b ? -1 : 1;
    if (a->h != b->h) return a->h < b->h ? -1 : 1;
    return a->qt < b->qt ? -1 : (a->qt > b->qt);
}

static int32_t row_cost(const fwd_problem *pb, int64_t b, int64_t h, int64_t qb) {
    const struct flex_block_mask *m = pb->mask;
    if (!m) return (int32_t)pb->num_kv_blocks;
    int64_t bm = m->B == 1 ? 0 : b, hm = m->H == 1 ? 0 : h;
    int64_t row = (bm * m->H + hm) * m->num_q_blocks + qb;
    return (m->kv_partial.offsets[row + 1] - m->kv_partial.offsets[row]) +
           (m->kv_full.offsets[row + 1] - m->kv_full.offsets[row]);
}

flex_status flex_cpu_forward(flex_context *ctx, const flex_forward_args *args) {
    struct flex_plan local_plan;
    const struct flex_plan *plan = args->plan;
    if (!plan) {
        flex_status st = flex_plan_make(ctx, args, &local_plan);
        if (st != FLEX_OK) return st;
        plan = &local_plan;
    }
    if (flex_cpu_decode_wanted(args, plan)) return flex_cpu_forward_decode(ctx, args);
    if (plan->use_reference) return flex_cpu_forward_reference(ctx, args);

    fwd_problem pb;
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

    if (pb.B == 0 || pb.Hq == 0 || pb.Lq == 0 || pb.Dv == 0) return FLEX_OK;

    pb.q_tile = plan->q_tile > 0 ? plan->q_tile : 64;
    pb.kv_tile = plan->kv_tile > 0 ? plan->kv_tile : 128;
    if (pb.mask) {
        pb.q_block = pb.mask->q_block;
        pb.kv_block = pb.mask->kv_block;
        /* A plan made for another mask must still keep tiles inside blocks. */
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
    pb.dvp = (int)cpu_round_up(pb.Dv, CPU_DV_ALIGN);
    pb.num_q_tiles = (pb.Lq + pb.q_tile - 1) / pb.q_tile;
    pb.units_per_row = pb.nk / CPU_NR;

    /* Host views of the mods' buffers (copies only for device buffers). */
    mod_buffer_view score_views[IR_MAX_BUFFERS], mask_views[IR_MAX_BUFFERS];
    void *score_copies[IR_MAX_BUFFERS] = {0}, *mask_copies[IR_MAX_BUFFERS] = {0};
    mod_range_tables *mask_tables = NULL;
    const flex_mod *mask_mod = pb.mask ? pb.mask->mask_mod : NULL;
    int mask_partial = pb.mask && pb.mask->num_partial > 0 && mask_mod;
    if (pb.mask && pb.mask->num_partial > 0 && !mask_mod)
        return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                         "block_mask has partial blocks but no mask mod to decide them");
    /* The identity score mod ("score") costs nothing: skip it. */
    int identity = args->score_mod && args->score_mod->ir.num_nodes >= 1 &&
                   args->score_mod->ir.nodes[args->score_mod->ir.root].op == IR_SCORE;
    if (args->score_mod && !identity) {
        flex_status st = flex_mod_host_views(ctx, args->score_mod, score_views, score_copies);
        if (st != FLEX_OK) return st;
        pb.score_ir = &args->score_mod->ir;
        pb.score_views = score_views;
    }
    if (mask_partial) {
        flex_status st = flex_mod_host_views(ctx, mask_mod, mask_views, mask_copies);
        if (st != FLEX_OK) {
            flex_mod_release_host_views(score_copies);
            return st;
        }
        pb.mask_ir = &mask_mod->ir;
        pb.mask_views = mask_views;
        pb.mask_intervals = mask_interval_setup(&pb, &mask_tables);
        pb.mask_tables = mask_tables;
    }

    int64_t num_items = pb.B * pb.Hq * pb.num_q_tiles;
    work_item *items = malloc((size_t)num_items * sizeof *items);
    flex_status result = FLEX_OK;
    if (!items) {
        result = flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "no memory for %lld CPU work items",
                           (long long)num_items);
        goto done;
    }
    {
        int64_t n = 0;
        for (int64_t b = 0; b < pb.B; b++)
            for (int64_t h = 0; h < pb.Hq; h++)
                for (int64_t t = 0; t < pb.num_q_tiles; t++) {
                    work_item *it = &items[n++];
                    it->b = (int32_t)b;
                    it->h = (int32_t)h;
                    it->qt = (int32_t)t;
                    it->cost = row_cost(&pb, b, h, t * pb.q_tile / pb.q_block);
                }
        if (plan->longest_first) qsort(items, (size_t)num_items, sizeof *items, compare_items);
    }

    {
        /* Scratch for every thread is made here, before any output is
         * written, so that running out of memory never leaves out half
         * written. */
        int threads = plan->num_threads;
#ifdef _OPENMP
        if (threads <= 0) threads = omp_get_max_threads();
#endif
        if (threads <= 0) threads = 1;
        if ((int64_t)threads > num_items) threads = (int)num_items;
        fwd_scratch *scratch = calloc((size_t)threads, sizeof *scratch);
        uint8_t *classes = malloc((size_t)threads * (size_t)pb.num_kv_blocks + 1);
        int ok = scratch && classes;
        for (int t = 0; ok && t < threads; t++)
            ok = scratch_alloc(&scratch[t], &pb) == 0;
        if (ok && plan->prepack_kv) prepack_kv(&pb, plan, scratch, threads);
        if (!ok) {
            result = flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY,
                               "no memory for the CPU forward's scratch (%d threads, q_tile %d, "
                               "kv_tile %d, D %lld, Dv %lld)",
                               threads, pb.q_tile, pb.kv_tile, (long long)pb.D, (long long)pb.Dv);
        } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
            {
                int t = 0;
#ifdef _OPENMP
                t = omp_get_thread_num();
#endif
                unsigned saved_csr = cpu_subnormals_off();
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
                for (int64_t i = 0; i < num_items; i++) {
                    if (cpu_bounds_failure_seen(&pb.bounds)) continue;
                    do_item(&pb, &scratch[t], &items[i], classes + (size_t)t * pb.num_kv_blocks);
                }
                cpu_subnormals_restore(saved_csr);
            }
        }
        for (int t = 0; scratch && t < threads; t++)
            scratch_free(&scratch[t]);
        free(pb.packed_k);
        free(pb.packed_v);
        free(scratch);
        free(classes);
    }

    if (result == FLEX_OK && pb.bounds.failed)
        result = flex_fail_bounds(ctx, pb.bounds.mod, &pb.bounds.err);
done:
    free(items);
    flex_mod_release_host_views(score_copies);
    flex_mod_release_host_views(mask_copies);
    mod_range_tables_free(mask_tables);
    return result;
}
