/*
 * The plain reference forward: one query row at a time, every score
 * computed with a straightforward dot product, mods through the scalar
 * interpreter, a two-pass softmax in f32. No tiling, no SIMD kernels, so it
 * shares nothing with the tiled path beyond the block-list lookup; tests run
 * both and compare each with the fp64 oracle.
 *
 * The block mask is honoured class by class: empty blocks are masked, full
 * blocks attended, partial blocks decided by the mask mod element-wise. The
 * score mod is evaluated only at attended elements.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "softmax.h"
#include "cpu.h"

static int64_t offset4(const flex_tensor *t, int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
    return i0 * t->strides[0] + i1 * t->strides[1] + i2 * t->strides[2] + i3 * t->strides[3];
}

flex_status flex_cpu_forward_reference(flex_context *ctx, const flex_forward_args *a) {
    int64_t B = a->q.sizes[0], Hq = a->q.sizes[1], Lq = a->q.sizes[2], D = a->q.sizes[3];
    int64_t Hkv = a->k.sizes[1], Lkv = a->k.sizes[2], Dv = a->v.sizes[3];
    int64_t group = Hkv > 0 && Hq >= Hkv ? Hq / Hkv : 1;
    const struct flex_block_mask *mask = a->block_mask;
    const flex_mod *mask_mod = mask ? mask->mask_mod : NULL;
    if (B == 0 || Hq == 0 || Lq == 0 || Dv == 0) return FLEX_OK;
    if (mask && mask->num_partial > 0 && !mask_mod)
        return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                         "block_mask has partial blocks but no mask mod to decide them");

    int q_block = mask ? mask->q_block : 128, kv_block = mask ? mask->kv_block : 128;
    int64_t nkb = mask ? mask->num_kv_blocks : (Lkv + kv_block - 1) / kv_block;

    mod_buffer_view score_views[IR_MAX_BUFFERS], mask_views[IR_MAX_BUFFERS];
    void *score_copies[IR_MAX_BUFFERS] = {0}, *mask_copies[IR_MAX_BUFFERS] = {0};
    flex_status st = FLEX_OK;
    /* All of it with subnormals, the mods' arithmetic (core/fpenv.h). */
    unsigned fp = cpu_mods_begin();
    if (a->score_mod) st = flex_mod_host_views(ctx, a->score_mod, score_views, score_copies);
    if (st == FLEX_OK && mask_mod) st = flex_mod_host_views(ctx, mask_mod, mask_views, mask_copies);
    if (st != FLEX_OK) {
        flex_mod_release_host_views(score_copies);
        flex_mod_release_host_views(mask_copies);
        cpu_mods_end(fp);
        return st;
    }

    int nodes = 1;
    if (a->score_mod && a->score_mod->ir.num_nodes > nodes) nodes = a->score_mod->ir.num_nodes;
    if (mask_mod && mask_mod->ir.num_nodes > nodes) nodes = mask_mod->ir.num_nodes;
    float *scores = malloc((size_t)(Lkv > 0 ? Lkv : 1) * sizeof(float));
    float *qrow = malloc((size_t)(D > 0 ? D : 1) * sizeof(float));
    float *acc = malloc((size_t)Dv * sizeof(float));
    uint8_t *classes = malloc((size_t)(nkb > 0 ? nkb : 1));
    ir_value *point = malloc((size_t)nodes * sizeof(ir_value));
    if (!scores || !qrow || !acc || !classes || !point) {
        st = flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "no memory for the CPU reference forward");
        goto done;
    }

    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hq; h++) {
            int64_t hk = h / group;
            int64_t cached_qb = -1;
            for (int64_t i = 0; i < Lq; i++) {
                int64_t qb = i / q_block;
                if (qb != cached_qb) {
                    flex_cpu_block_row_classes(mask, nkb, b, h, qb, classes);
                    cached_qb = qb;
                }
                for (int64_t d = 0; d < D; d++)
                    qrow[d] = flex_load_as_float(a->q.data, a->q.dtype, offset4(&a->q, b, h, i, d));
                float row_max = -INFINITY;
                for (int64_t j = 0; j < Lkv; j++) {
                    uint8_t cls = classes[j / kv_block];
                    scores[j] = -INFINITY;
                    if (cls == FLEX_BLOCK_EMPTY) continue;
                    mod_bounds_error err;
                    memset(&err, 0, sizeof err);
                    ir_value r;
                    if (cls == FLEX_BLOCK_PARTIAL) {
                        if (mod_eval_point(&mask_mod->ir, mask_views, 0.0f, (int32_t)b, (int32_t)h,
                                           (int32_t)i, (int32_t)j, point, &r, &err) != 0) {
                            st = flex_fail_bounds(ctx, mask_mod, &err);
                            goto done;
                        }
                        if (!r.i) continue;
                    }
                    float dot = 0.0f;
                    for (int64_t d = 0; d < D; d++)
                        dot += qrow[d] * flex_load_as_float(a->k.data, a->k.dtype,
                                                            offset4(&a->k, b, hk, j, d));
                    float s = dot * a->scale;
                    if (a->score_mod) {
                        if (mod_eval_point(&a->score_mod->ir, score_views, s, (int32_t)b,
                                           (int32_t)h, (int32_t)i, (int32_t)j, point, &r,
                                           &err) != 0) {
                            st = flex_fail_bounds(ctx, a->score_mod, &err);
                            goto done;
                        }
                        s = r.f;
                    }
                    scores[j] = s;
                    if (s > row_max) row_max = s;
                }
                float shift = flex_softmax_shift(row_max);
                float sum = 0.0f;
                for (int64_t c = 0; c < Dv; c++)
                    acc[c] = 0.0f;
                for (int64_t j = 0; j < Lkv; j++) {
                    if (scores[j] == -INFINITY) continue;
                    float p = expf(scores[j] - shift);
                    sum += p;
                    for (int64_t c = 0; c < Dv; c++)
                        acc[c] += p * flex_load_as_float(a->v.data, a->v.dtype,
                                                         offset4(&a->v, b, hk, j, c));
                }
                /* sum is 0 when no score is kept, NaN when a kept score is
                 * NaN or +inf (core/softmax.h): the output is then 0 or NaN. */
                for (int64_t c = 0; c < Dv; c++)
                    flex_store_from_float(a->out.data, a->out.dtype, offset4(&a->out, b, h, i, c),
                                          sum != 0.0f ? acc[c] / sum : 0.0f);
                if (a->lse)
                    ((float *)a->lse->data)[offset4(a->lse, b, h, i, 0)] =
                        flex_softmax_lse(row_max, sum);
            }
        }
done:
    free(scores);
    free(qrow);
    free(acc);
    free(classes);
    free(point);
    flex_mod_release_host_views(score_copies);
    flex_mod_release_host_views(mask_copies);
    cpu_mods_end(fp);
    return st;
}
