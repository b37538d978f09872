/*
 * Exact classes of the blocks that interval analysis left undecided, on the
 * host. Most undecided blocks are really partial, and a partial block is
 * proven by one attending and one non-attending element: a handful of
 * sampled points settles almost all of them. What sampling does not settle
 * is refined with interval analysis on sub-rectangles, and only
 * sub-rectangles that analysis cannot decide are scanned element by element
 * with the tile interpreter, stopping as soon as both values have been seen.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "fpenv.h"
#include "blockmask.h"
#include "clock.h"

/* Sub-rectangles at most this many elements a side are scanned whole. */
#define SCAN_SIDE 32

/* The calling thread works alone for at least SERIAL_MS milliseconds, and
 * shares the rest with a thread team only when the rest would take it more
 * than PARALLEL_MIN_MS. */
#define SERIAL_MS       0.25
#define PARALLEL_MIN_MS 2.0

enum { SEEN_FALSE = 1, SEEN_TRUE = 2, SEEN_BOTH = 3 };

#ifdef _OPENMP
#endif

/* Per-thread state: scratch of every evaluator. */
typedef struct eval_worker {
    const ir_mod *ir;
    const mod_buffer_view *views;
    const mod_range_tables *tables;
    ir_value *point_scratch;
    void *interval_scratch;
    mod_tile *tile;
    uint8_t tile_out[SCAN_SIDE * SCAN_SIDE];
    mod_bounds_error bounds;
    int failed; /* 1: bounds error (in bounds), 2: out of memory */
} eval_worker;

static int worker_init(eval_worker *w, const ir_mod *ir, const mod_buffer_view *views,
                       const mod_range_tables *tables) {
    memset(w, 0, sizeof *w);
    w->ir = ir;
    w->views = views;
    w->tables = tables;
    w->point_scratch = malloc(sizeof(ir_value) * (size_t)(ir->num_nodes > 0 ? ir->num_nodes : 1));
    size_t isz = mod_interval_scratch_size(ir);
    w->interval_scratch = malloc(isz > 0 ? isz : 1);
    w->tile = mod_tile_create(ir, SCAN_SIDE, SCAN_SIDE);
    return w->point_scratch && w->interval_scratch && w->tile ? 0 : -1;
}

static void worker_free(eval_worker *w) {
    free(w->point_scratch);
    free(w->interval_scratch);
    mod_tile_destroy(w->tile);
}

/* The value of the mask at one element: SEEN_TRUE / SEEN_FALSE, or 0 after
 * a bounds error (recorded in w). */
static int sample_point(eval_worker *w, int32_t b, int32_t h, int64_t q, int64_t kv) {
    ir_value result;
    if (mod_eval_point(w->ir, w->views, 0.0f, b, h, (int32_t)q, (int32_t)kv, w->point_scratch,
                       &result, &w->bounds) != 0) {
        w->failed = 1;
        return 0;
    }
    return result.i ? SEEN_TRUE : SEEN_FALSE;
}

/* Element-wise scan of a rectangle no larger than SCAN_SIDE a side. */
static int scan_rect(eval_worker *w, int32_t b, int32_t h, int64_t q0, int64_t q1, int64_t k0,
                     int64_t k1, int seen) {
    int rows = (int)(q1 - q0), cols = (int)(k1 - k0);
    if (mod_tile_mask(w->tile, w->views, b, h, (int32_t)q0, rows, (int32_t)k0, cols, w->tile_out,
                      cols, &w->bounds) != 0) {
        w->failed = 1;
        return seen;
    }
    int n = rows * cols;
    for (int i = 0; i < n && seen != SEEN_BOTH; i++)
        seen |= w->tile_out[i] ? SEEN_TRUE : SEEN_FALSE;
    return seen;
}

/* Adds what rectangle [q0,q1) x [k0,k1) contains to `seen`, stopping once
 * both values are known. */
static int refine_rect(eval_worker *w, int32_t b, int32_t h, int64_t q0, int64_t q1, int64_t k0,
                       int64_t k1, int seen) {
    if (w->tables || w->ir->num_buffers == 0) {
        mod_box box = {{b, h, q0, k0}, {b, h, q1 - 1, k1 - 1}};
        mod_tri tri = mod_interval_mask(w->ir, w->tables, &box, w->interval_scratch);
        if (tri == MOD_TRI_TRUE) return seen | SEEN_TRUE;
        if (tri == MOD_TRI_FALSE) return seen | SEEN_FALSE;
    }
    int64_t nq = q1 - q0, nk = k1 - k0;
    if (nq <= SCAN_SIDE && nk <= SCAN_SIDE) return scan_rect(w, b, h, q0, q1, k0, k1, seen);
    if (nq >= nk) {
        int64_t mid = q0 + nq / 2;
        seen = refine_rect(w, b, h, q0, mid, k0, k1, seen);
        if (seen == SEEN_BOTH || w->failed) return seen;
        return refine_rect(w, b, h, mid, q1, k0, k1, seen);
    }
    int64_t mid = k0 + nk / 2;
    seen = refine_rect(w, b, h, q0, q1, k0, mid, seen);
    if (seen == SEEN_BOTH || w->failed) return seen;
    return refine_rect(w, b, h, q0, q1, mid, k1, seen);
}

static uint8_t classify_block(eval_worker *w, const flex_block_ref *ref, int64_t q_len,
                              int64_t kv_len, int q_block, int kv_block) {
    int64_t q0 = (int64_t)ref->q_block * q_block, k0 = (int64_t)ref->kv_block * kv_block;
    int64_t q1 = q0 + q_block < q_len ? q0 + q_block : q_len;
    int64_t k1 = k0 + kv_block < kv_len ? k0 + kv_block : kv_len;
    /* Corners and centre: a partial block usually shows both values here.
     * The anti-diagonal corners come first: they hold the smallest and the
     * largest q - kv, the extremes of every causal or banded mask. */
    const int64_t pts[5][2] = {{q0, k1 - 1},
                               {q1 - 1, k0},
                               {q0, k0},
                               {q1 - 1, k1 - 1},
                               {q0 + (q1 - q0) / 2, k0 + (k1 - k0) / 2}};
    int seen = 0;
    for (int p = 0; p < 5 && seen != SEEN_BOTH; p++) {
        seen |= sample_point(w, ref->b, ref->h, pts[p][0], pts[p][1]);
        if (w->failed) return FLEX_BLOCK_EMPTY;
    }
    if (seen != SEEN_BOTH) seen = refine_rect(w, ref->b, ref->h, q0, q1, k0, k1, seen);
    if (seen == SEEN_BOTH) return FLEX_BLOCK_PARTIAL;
    return seen == SEEN_TRUE ? FLEX_BLOCK_FULL : FLEX_BLOCK_EMPTY;
}

static flex_status check_refs(flex_context *ctx, int64_t q_len, int64_t kv_len, int q_block,
                              int kv_block, const flex_block_ref *blocks, int64_t count) {
    int64_t nq = flex_blocks_for(q_len, q_block), nk = flex_blocks_for(kv_len, kv_block);
    for (int64_t i = 0; i < count; i++) {
        const flex_block_ref *r = &blocks[i];
        if (r->q_block < 0 || r->q_block >= nq || r->kv_block < 0 || r->kv_block >= nk ||
            r->b < 0 || r->h < 0)
            return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                             "block %lld to evaluate is (b %d, h %d, q-block %d, kv-block %d), "
                             "outside the %lld x %lld grid of blocks",
                             (long long)i, (int)r->b, (int)r->h, (int)r->q_block, (int)r->kv_block,
                             (long long)nq, (long long)nk);
    }
    return FLEX_OK;
}

flex_status flex_block_mask_eval_host_with(flex_context *ctx, const struct flex_mod *mask_mod,
                                           const mod_buffer_view *views,
                                           const mod_range_tables *tables, int64_t q_len,
                                           int64_t kv_len, int q_block, int kv_block,
                                           const flex_block_ref *blocks, int64_t count,
                                           uint8_t *classes) {
    if (count <= 0) return FLEX_OK;
    flex_status st = check_refs(ctx, q_len, kv_len, q_block, kv_block, blocks, count);
    if (st != FLEX_OK) return st;

    const ir_mod *ir = &mask_mod->ir;
    int failed = 0; /* 1: bounds, 2: memory */
    /* The mod keeps subnormals on every thread (core/fpenv.h). */
    unsigned fp = flex_fp_mods_begin();
    mod_bounds_error first_bounds;
    memset(&first_bounds, 0, sizeof first_bounds);

    /* Most undecided blocks take a fraction of a microsecond, and waking a
     * thread team costs more than a few hundred of them. So the blocks are
     * worked through on the calling thread until that has taken a while;
     * only what is left then (slow blocks, or very many) is shared out. */
    int64_t done = 0;
    {
        eval_worker *w = malloc(sizeof *w);
        if (!w || worker_init(w, ir, views, tables) != 0) {
            failed = 2;
        } else {
#ifdef _OPENMP
            double start = flex_now_ms();
            int threads = omp_get_max_threads();
#endif
            while (done < count && !w->failed) {
                int64_t end = done + 16 < count ? done + 16 : count;
                for (; done < end; done++)
                    classes[done] =
                        classify_block(w, &blocks[done], q_len, kv_len, q_block, kv_block);
#ifdef _OPENMP
                /* Hand over when what is left would take long enough to
                 * repay starting the team. */
                if (threads > 1) {
                    double spent = flex_now_ms() - start;
                    if (spent > SERIAL_MS &&
                        spent / (double)done * (double)(count - done) > PARALLEL_MIN_MS)
                        break;
                }
#endif
            }
            if (w->failed) {
                failed = 1;
                first_bounds = w->bounds;
            }
        }
        if (w) worker_free(w);
        free(w);
    }
    if (!failed && done < count) {
#ifdef _OPENMP
#pragma omp parallel
#endif
        {
            unsigned thread_fp = flex_fp_mods_begin();
            eval_worker *w = malloc(sizeof *w);
            int ok = w && worker_init(w, ir, views, tables) == 0;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 16)
#endif
            for (int64_t i = done; i < count; i++) {
                if (!ok || w->failed) continue;
                classes[i] = classify_block(w, &blocks[i], q_len, kv_len, q_block, kv_block);
            }
            int mine = !ok ? 2 : w->failed;
            if (mine) {
#ifdef _OPENMP
#pragma omp critical(flex_block_eval_error)
#endif
                {
                    if (!failed || (failed == 2 && mine == 1)) {
                        failed = mine;
                        if (mine == 1) first_bounds = w->bounds;
                    }
                }
            }
            if (w) worker_free(w);
            free(w);
            flex_fp_restore(thread_fp);
        }
    }
    flex_fp_restore(fp);
    if (failed == 1) return flex_fail_bounds(ctx, mask_mod, &first_bounds);
    if (failed == 2)
        return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY,
                         "out of memory for the evaluator scratch of the mask mod");
    return FLEX_OK;
}

flex_status flex_block_mask_eval_host(flex_context *ctx, const struct flex_mod *mask_mod,
                                      int64_t q_len, int64_t kv_len, int q_block, int kv_block,
                                      const flex_block_ref *blocks, int64_t count,
                                      uint8_t *classes) {
    if (!mask_mod) return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "mask_mod is NULL");
    if (count > 0 && (!blocks || !classes))
        return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "%s is NULL", !blocks ? "blocks" : "classes");
    if (count <= 0) return FLEX_OK;

    mod_buffer_view views[IR_MAX_BUFFERS];
    void *host_copies[IR_MAX_BUFFERS];
    memset(views, 0, sizeof views);
    memset(host_copies, 0, sizeof host_copies);
    flex_status st = flex_mod_host_views(ctx, mask_mod, views, host_copies);
    if (st != FLEX_OK) return st;
    mod_range_tables *tables = mod_range_tables_build(&mask_mod->ir, views);
    if (!tables && mask_mod->ir.num_buffers > 0) {
        flex_mod_release_host_views(host_copies);
        return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY,
                         "out of memory for the buffer range tables of the mask mod");
    }
    st = flex_block_mask_eval_host_with(ctx, mask_mod, views, tables, q_len, kv_len, q_block,
                                        kv_block, blocks, count, classes);
    if (tables) mod_range_tables_free(tables);
    flex_mod_release_host_views(host_copies);
    return st;
}
