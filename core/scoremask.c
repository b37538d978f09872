/*
 * Block sparsity of score mods (see scoremask.h): a walk over each grid of
 * blocks that proves whole rectangles masked or kept with interval
 * analysis, and the restriction of a call's block mask to the blocks the
 * score mod does not mask.
 */
#include <stdlib.h>
#include <string.h>

#include "fpenv.h"
#include "blockmask.h"
#include "scoremask.h"

/* One grid walk: the mod, its range tables, scratch, and the grid. */
typedef struct score_walk {
    const ir_mod *ir;
    const mod_range_tables *tables;
    void *scratch;
    int64_t b, h, q_len, kv_len;
    int q_block, kv_block;
    int64_t nk;
    uint8_t *masked; /* this (b, h)'s nq x nk grid */
    int64_t count;
} score_walk;

static int64_t min64(int64_t a, int64_t b) {
    return a < b ? a : b;
}

/*
 * Decides the rectangle of blocks [i0, i1) x [j0, j1): masked (every element
 * -inf for every score) marks it all, kept (score 0 keeps every element)
 * leaves it, and unknown splits the side longer in elements. A single block
 * that stays unknown is kept: only proven blocks are skipped. Depth is
 * bounded by the log of the grid sides.
 */
static void walk(score_walk *w, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    mod_box box = {
        .lo = {w->b, w->h, i0 * w->q_block, j0 * w->kv_block},
        .hi = {w->b, w->h, min64(i1 * w->q_block, w->q_len) - 1,
               min64(j1 * w->kv_block, w->kv_len) - 1},
    };
    mod_tri t = mod_interval_score_kept(w->ir, w->tables, &box, w->scratch);
    if (t == MOD_TRI_FALSE) {
        for (int64_t i = i0; i < i1; i++)
            memset(w->masked + i * w->nk + j0, 1, (size_t)(j1 - j0));
        w->count += (i1 - i0) * (j1 - j0);
        return;
    }
    if (t == MOD_TRI_TRUE || (i1 - i0 == 1 && j1 - j0 == 1)) return;
    int64_t q_elems = box.hi[2] - box.lo[2] + 1, kv_elems = box.hi[3] - box.lo[3] + 1;
    if (j1 - j0 == 1 || (i1 - i0 > 1 && q_elems >= kv_elems)) {
        int64_t mid = i0 + (i1 - i0) / 2;
        walk(w, i0, mid, j0, j1);
        walk(w, mid, i1, j0, j1);
    } else {
        int64_t mid = j0 + (j1 - j0) / 2;
        walk(w, i0, i1, j0, mid);
        walk(w, i0, i1, mid, j1);
    }
}

flex_status flex_score_mask_find(flex_context *ctx, const flex_mod *score_mod, int64_t B, int64_t H,
                                 int64_t q_len, int64_t kv_len, int q_block, int kv_block,
                                 uint8_t *masked, int64_t *num_masked) {
    const ir_mod *ir = &score_mod->ir;
    int64_t nq = flex_blocks_for(q_len, q_block), nk = flex_blocks_for(kv_len, kv_block);
    memset(masked, 0, (size_t)(B * H * nq * nk));
    *num_masked = 0;
    /* Most score mods (biases, soft-caps) can never give -inf: one look at
     * the whole box, buffers taken as any value, spares reading them (a
     * copy from the device for GPU backends) and building range tables. */
    mod_box all = {.lo = {0, 0, 0, 0}, .hi = {B - 1, H - 1, q_len - 1, kv_len - 1}};
    unsigned fp0 = flex_fp_mods_begin();
    int never = mod_interval_score_never_masked(ir, &all);
    flex_fp_restore(fp0);
    if (never) return FLEX_OK;
    mod_buffer_view views[IR_MAX_BUFFERS];
    void *host_copies[IR_MAX_BUFFERS];
    memset(views, 0, sizeof views);
    memset(host_copies, 0, sizeof host_copies);
    flex_status st = flex_mod_host_views(ctx, score_mod, views, host_copies);
    if (st != FLEX_OK) return st;
    mod_range_tables *tables = mod_range_tables_build(ir, views);
    size_t scratch_size = mod_interval_scratch_size(ir);
    void *scratch = malloc(scratch_size > 0 ? scratch_size : 1);
    if (!scratch || (!tables && ir->num_buffers > 0)) {
        free(scratch);
        mod_range_tables_free(tables);
        flex_mod_release_host_views(host_copies);
        return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY,
                         "out of memory for the score mod's block analysis");
    }
    /* The analysis runs in the arithmetic of every mod evaluation. */
    unsigned fp = flex_fp_mods_begin();
    score_walk w = {.ir = ir,
                    .tables = tables,
                    .scratch = scratch,
                    .q_len = q_len,
                    .kv_len = kv_len,
                    .q_block = q_block,
                    .kv_block = kv_block,
                    .nk = nk};
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            w.b = b;
            w.h = h;
            w.masked = masked + (b * H + h) * nq * nk;
            walk(&w, 0, nq, 0, nk);
        }
    flex_fp_restore(fp);
    *num_masked = w.count;
    free(scratch);
    mod_range_tables_free(tables);
    flex_mod_release_host_views(host_copies);
    return FLEX_OK;
}

/* Which of b and h the mod's result depends on (IR_DEP_B, IR_DEP_H). */
static flex_status root_dependencies(flex_context *ctx, const flex_mod *mod, int *deps) {
    const ir_mod *ir = &mod->ir;
    uint8_t *d = malloc((size_t)(ir->num_nodes > 0 ? ir->num_nodes : 1));
    if (!d) return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory");
    ir_dependencies(ir, d);
    *deps = ir->num_nodes > 0 ? d[ir->root] : 0;
    free(d);
    return FLEX_OK;
}

flex_status flex_score_mask_restrict(flex_context *ctx, const flex_mod *score_mod,
                                     const flex_block_mask *base, int64_t B, int64_t H,
                                     int64_t q_len, int64_t kv_len, flex_block_mask **out) {
    *out = NULL;
    int deps = 0;
    flex_status st = root_dependencies(ctx, score_mod, &deps);
    if (st != FLEX_OK) return st;
    int q_block = base ? base->q_block : 128, kv_block = base ? base->kv_block : 128;
    int64_t nq = flex_blocks_for(q_len, q_block), nk = flex_blocks_for(kv_len, kv_block);
    int64_t sB = (deps & IR_DEP_B) ? B : 1, sH = (deps & IR_DEP_H) ? H : 1;
    int64_t grid = nq * nk;
    uint8_t *masked = malloc((size_t)(sB * sH * grid));
    if (!masked) return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory");
    int64_t num_masked = 0;
    st = flex_score_mask_find(ctx, score_mod, sB, sH, q_len, kv_len, q_block, kv_block, masked,
                              &num_masked);
    if (st != FLEX_OK || num_masked == 0) {
        free(masked);
        return st;
    }

    /* Classes of the new mask: base's (every block full without one), less
     * the masked blocks. */
    int64_t bB = base ? base->B : 1, bH = base ? base->H : 1;
    int64_t mB = (sB > 1 || bB > 1) ? B : 1, mH = (sH > 1 || bH > 1) ? H : 1;
    uint8_t *base_classes = base ? malloc((size_t)(bB * bH * grid)) : NULL;
    uint8_t *classes = malloc((size_t)(mB * mH * grid));
    if (!classes || (base && !base_classes)) {
        free(masked);
        free(base_classes);
        free(classes);
        return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory");
    }
    if (base) flex_block_mask_to_dense(base, base_classes);
    int64_t removed = 0;
    for (int64_t b = 0; b < mB; b++)
        for (int64_t h = 0; h < mH; h++) {
            const uint8_t *s = masked + ((sB > 1 ? b : 0) * sH + (sH > 1 ? h : 0)) * grid;
            const uint8_t *c =
                base ? base_classes + ((bB > 1 ? b : 0) * bH + (bH > 1 ? h : 0)) * grid : NULL;
            uint8_t *o = classes + (b * mH + h) * grid;
            for (int64_t k = 0; k < grid; k++) {
                uint8_t cls = c ? c[k] : FLEX_BLOCK_FULL;
                if (s[k] && cls != FLEX_BLOCK_EMPTY) {
                    cls = FLEX_BLOCK_EMPTY;
                    removed++;
                }
                o[k] = cls;
            }
        }
    free(masked);
    free(base_classes);
    if (removed > 0)
        st = flex_block_mask_from_classes(ctx, base ? base->mask_mod : NULL, mB, mH, q_len, kv_len,
                                          q_block, kv_block, classes, out);
    free(classes);
    return st;
}
