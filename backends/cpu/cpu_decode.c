/*
 * The CPU's decode path: few query rows against a long key/value cache,
 * with run-time query offsets, per-batch kv lengths and a paged cache
 * (flex_attention_options; docs/decode.md).
 *
 * Work items are (b, h, split): the logical kv range is cut into splits of
 * whole 64-key chunks, each item runs the online softmax over its split and
 * leaves a normalised output and an LSE per query row, and a second
 * parallel pass merges the splits of each row with the LSE merge of
 * core/lse_merge.h (the rule a GPU combine kernel shares). With one split
 * the item writes out and lse itself; the merge of one piece is the piece,
 * bit for bit, so the result is the same.
 *
 * Chunk boundaries are multiples of 64 logical positions (of the mask's
 * kv_block when that is smaller), never page boundaries, and each key row is
 * found through the page table on its own: the same call on a paged cache
 * and on a contiguous one does the same arithmetic in the same order and
 * gives the same bits. Query rows are processed in groups of up to 16 that
 * lie in one q block of the mask (their absolute positions q_offsets[b] + i
 * decide the block), so each (group, chunk) has one block class.
 *
 * Mods see absolute positions. Keys at positions >= the batch's kv length
 * are never read, never passed to a mod, never attended. Values were checked
 * by the core (core/decode_args.c), so every page number read here is in
 * range. Scratch, partial results and thread state are allocated before
 * out is written; a buffer read out of range stops the work and leaves out
 * unwritten when there is more than one split (partly written otherwise, as
 * the tiled path's contract allows).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "internal.h"
#include "decode_args.h"
#include "lse_merge.h"
#include "plan.h"
#include "softmax.h"
#include "cpu.h"

enum {
    DEC_CHUNK = 64, /* keys per step (at most; the mask's kv_block when smaller) */
    DEC_ROWS = 16,  /* query rows per group */
    DEC_MIN_CHUNKS_PER_SPLIT = 4
};

typedef struct dec_problem {
    const flex_forward_args *a;
    const cpu_kernels *kern;
    int64_t B, Hq, Hkv, Lq, D, Dv, group;
    int32_t *q_off, *kv_len; /* per batch: absolute position of row 0, keys attended */
    int chunk, nkp, mq, dvp;
    int64_t splits, chunks_per_split;
    const struct flex_block_mask *mask;
    int q_block, kv_block;
    int64_t num_kv_blocks;
    const ir_mod *score_ir, *mask_ir;
    const mod_buffer_view *score_views, *mask_views;
    float *part_out; /* (b, h, split, row) x dvp, when splits > 1 */
    float *part_lse; /* (b, h, split, row) */
    cpu_bounds_failure bounds;
} dec_problem;

typedef struct dec_scratch {
    float *q, *kp, *vp, *s, *o, *m, *l, *alpha, *row;
    void *block;
    uint8_t *keep, *classes;
    ir_value *point;
    mod_tile *score_tile, *mask_tile;
} dec_scratch;

static void scratch_free(dec_scratch *sc) {
    free(sc->block);
    free(sc->keep);
    free(sc->classes);
    free(sc->point);
    if (sc->score_tile) mod_tile_destroy(sc->score_tile);
    if (sc->mask_tile) mod_tile_destroy(sc->mask_tile);
    memset(sc, 0, sizeof *sc);
}

static int scratch_alloc(dec_scratch *sc, const dec_problem *pb) {
    memset(sc, 0, sizeof *sc);
    size_t mq = (size_t)pb->mq, nk = (size_t)pb->nkp, dvp = (size_t)pb->dvp, D = (size_t)pb->D;
    size_t rowlen = (size_t)(pb->D > pb->Dv ? pb->D : pb->Dv);
    size_t sizes[9] = {mq * D, nk * D, nk * dvp, mq * nk, mq * dvp, mq, mq, mq, rowlen};
    float **const dst[9] = {&sc->q, &sc->kp, &sc->vp,    &sc->s,  &sc->o,
                            &sc->m, &sc->l,  &sc->alpha, &sc->row};
    if (cpu_scratch_carve(9, sizes, dst, &sc->block) != 0) return -1;
    sc->keep = calloc(mq * nk, 1);
    sc->classes = malloc((size_t)pb->num_kv_blocks + 1);
    if (!sc->keep || !sc->classes) return -1;
    int nodes = 1;
    if (pb->score_ir && pb->score_ir->num_nodes > nodes) nodes = pb->score_ir->num_nodes;
    if (pb->mask_ir && pb->mask_ir->num_nodes > nodes) nodes = pb->mask_ir->num_nodes;
    sc->point = malloc((size_t)nodes * sizeof(ir_value));
    if (!sc->point) return -1;
    if (pb->score_ir && !(sc->score_tile = mod_tile_create(pb->score_ir, DEC_ROWS, pb->nkp)))
        return -1;
    if (pb->mask_ir && !(sc->mask_tile = mod_tile_create(pb->mask_ir, DEC_ROWS, pb->nkp)))
        return -1;
    return 0;
}

/* Element offset of logical key row pos of (b, kv head hk) in t (k or v):
 * through the page table when the cache is paged. */
static inline int64_t kv_row_offset(const dec_problem *pb, const flex_tensor *t, int64_t b,
                                    int64_t hk, int64_t pos) {
    const flex_forward_args *a = pb->a;
    if (a->page_table) {
        int64_t page = flex_decode_load(a->page_table, b, pos / a->page_size);
        return page * t->strides[0] + hk * t->strides[1] + (pos % a->page_size) * t->strides[2];
    }
    return b * t->strides[0] + hk * t->strides[1] + pos * t->strides[2];
}

static void load_row(const flex_tensor *t, int64_t off, int n, float *dst) {
    int64_t st = t->strides[3];
    if (t->dtype == FLEX_F32 && st == 1) {
        memcpy(dst, (const float *)t->data + off, (size_t)n * sizeof(float));
        return;
    }
    for (int i = 0; i < n; i++)
        dst[i] = flex_load_as_float(t->data, t->dtype, off + (int64_t)i * st);
}

/* Keys kv0 .. kv0+cols-1 into the panels of the micro-kernels (cpu.h):
 * kp[p][d][c] = K[kv0 + 32p + c][d], V in panels of 32 (or 16) columns;
 * columns beyond cols are zero. */
static void pack_chunk(const dec_problem *pb, dec_scratch *sc, int64_t b, int64_t hk, int64_t kv0,
                       int cols) {
    int D = (int)pb->D, Dv = (int)pb->Dv, nk = pb->nkp, dvp = pb->dvp;
    memset(sc->kp, 0, (size_t)nk * D * sizeof(float));
    for (int n = 0; n < cols; n++) {
        load_row(&pb->a->k, kv_row_offset(pb, &pb->a->k, b, hk, kv0 + n), D, sc->row);
        float *dst = sc->kp + (size_t)(n / CPU_NR) * D * CPU_NR + (n % CPU_NR);
        for (int d = 0; d < D; d++)
            dst[(size_t)d * CPU_NR] = sc->row[d];
    }
    for (int n = 0; n < nk; n++) {
        if (n < cols)
            load_row(&pb->a->v, kv_row_offset(pb, &pb->a->v, b, hk, kv0 + n), Dv, sc->row);
        for (int c0 = 0; c0 < dvp; c0 += CPU_NR) {
            int w = dvp - c0 >= CPU_NR ? CPU_NR : dvp - c0;
            float *dst = sc->vp + (size_t)c0 * nk + (size_t)n * w;
            for (int c = 0; c < w; c++)
                dst[c] = (n < cols && c0 + c < Dv) ? sc->row[c0 + c] : 0.0f;
        }
    }
}

/* Score mod at the kept elements only, one point at a time: the tile
 * interpreter failed, and the failing read may lie where the mask removes
 * the element (no error then). Recomputes the raw scores first. */
static int score_kept_points(const dec_problem *pb, dec_scratch *sc, int32_t b, int32_t h,
                             int32_t p0, int rows, int32_t kv0, int cols, mod_bounds_error *err) {
    int nk = pb->nkp;
    pb->kern->scores_ld((int)cpu_round_up(rows, CPU_MR), nk, (int)pb->D, sc->q, sc->kp, pb->a->scale,
                        sc->s, nk);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) {
            if (!sc->keep[(size_t)r * nk + c]) continue;
            ir_value result;
            float *sv = &sc->s[(size_t)r * nk + c];
            if (mod_eval_point(pb->score_ir, pb->score_views, *sv, b, h, p0 + r, kv0 + c, sc->point,
                               &result, err) != 0)
                return -1;
            *sv = result.f;
        }
    return 0;
}

/* One chunk for the packed row group. Returns 0, or -1 after recording a
 * failure. */
static int do_chunk(dec_problem *pb, dec_scratch *sc, int32_t b, int32_t h, int64_t hk, int32_t p0,
                    int rows, int64_t kv0, int cols, int partial) {
    const cpu_kernels *kn = pb->kern;
    /* Only the register blocks the group's rows need: one block of 8 for a
     * decode step of up to 8 rows. */
    int nk = pb->nkp, mq = (int)cpu_round_up(rows, CPU_MR);
    mod_bounds_error err;
    memset(&err, 0, sizeof err);
    if (partial) {
        unsigned fp = cpu_mods_begin();
        int failed = mod_tile_mask(sc->mask_tile, pb->mask_views, b, h, p0, rows, (int32_t)kv0,
                                   cols, sc->keep, nk, &err);
        cpu_mods_end(fp);
        if (failed) {
            cpu_bounds_failure_record(&pb->bounds, pb->mask->mask_mod, &err);
            return -1;
        }
        unsigned any = 0;
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < cols; c++)
                any |= sc->keep[(size_t)r * nk + c];
        if (!any) return 0;
    }
    pack_chunk(pb, sc, b, hk, kv0, cols);
    kn->scores_ld(mq, nk, (int)pb->D, sc->q, sc->kp, pb->a->scale, sc->s, nk);
    if (pb->score_ir) {
        unsigned fp = cpu_mods_begin();
        int failed = mod_tile_score(sc->score_tile, pb->score_views, b, h, p0, rows, (int32_t)kv0,
                                    cols, sc->s, nk, &err);
        if (failed) {
            mod_bounds_error err2;
            memset(&err2, 0, sizeof err2);
            if (!partial ||
                score_kept_points(pb, sc, b, h, p0, rows, (int32_t)kv0, cols, &err2) != 0) {
                cpu_mods_end(fp);
                cpu_bounds_failure_record(&pb->bounds, pb->a->score_mod, partial ? &err2 : &err);
                return -1;
            }
        }
        cpu_mods_end(fp);
    }
    for (int r = 0; r < rows; r++) {
        float *srow = sc->s + (size_t)r * nk;
        if (partial) kn->mask_scores(srow, sc->keep + (size_t)r * nk, cols);
        for (int c = cols; c < nk; c++)
            srow[c] = -INFINITY;
        float m_old = sc->m[r];
        float tile_max = kn->row_max(srow, nk);
        float m_new = tile_max > m_old ? tile_max : m_old;
        float sum = kn->exp_sum(srow, nk, flex_softmax_shift(m_new));
        float alpha = flex_softmax_rescale(m_old, m_new);
        sc->l[r] = sc->l[r] * alpha + sum;
        sc->m[r] = m_new;
        sc->alpha[r] = alpha;
    }
    for (int r = rows; r < mq; r++) {
        memset(sc->s + (size_t)r * nk, 0, (size_t)nk * sizeof(float));
        sc->alpha[r] = 1.0f;
    }
    kn->accumulate_rows(mq, nk, pb->dvp, sc->s, nk, sc->vp, nk, 0, sc->alpha, sc->o);
    return 0;
}

/* Where the results of rows i0 .. i0+rows-1 of item (b, h, split) go: out
 * and lse themselves with one split, the partial arrays otherwise. */
static void write_rows(const dec_problem *pb, const dec_scratch *sc, int64_t b, int64_t h,
                       int64_t split, int64_t i0, int rows) {
    const flex_tensor *out = &pb->a->out, *lse = pb->a->lse;
    int Dv = (int)pb->Dv;
    for (int r = 0; r < rows; r++) {
        int64_t i = i0 + r;
        float l = sc->l[r], inv = flex_softmax_inverse(l);
        const float *orow = sc->o + (size_t)r * pb->dvp;
        float row_lse = flex_softmax_lse(sc->m[r], l);
        if (pb->splits > 1) {
            int64_t at = ((b * pb->Hq + h) * pb->splits + split) * pb->Lq + i;
            float *dst = pb->part_out + at * pb->dvp;
            for (int c = 0; c < Dv; c++)
                dst[c] = l != 0.0f ? orow[c] * inv : 0.0f;
            pb->part_lse[at] = row_lse;
            continue;
        }
        int64_t off = b * out->strides[0] + h * out->strides[1] + i * out->strides[2];
        for (int c = 0; c < Dv; c++)
            flex_store_from_float(out->data, out->dtype, off + c * out->strides[3],
                                  l != 0.0f ? orow[c] * inv : 0.0f);
        if (lse)
            ((float *)lse->data)[b * lse->strides[0] + h * lse->strides[1] + i * lse->strides[2]] =
                row_lse;
    }
}

static void do_item(dec_problem *pb, dec_scratch *sc, int64_t item) {
    int64_t split = item % pb->splits, bh = item / pb->splits;
    int32_t b = (int32_t)(bh / pb->Hq), h = (int32_t)(bh % pb->Hq);
    int64_t hk = h / pb->group;
    int64_t len = pb->kv_len[b];
    int64_t first = split * pb->chunks_per_split * pb->chunk;
    int64_t last = first + pb->chunks_per_split * pb->chunk;
    if (last > len) last = len;
    const flex_tensor *q = &pb->a->q;
    int64_t cached_qb = -1;
    for (int64_t i0 = 0; i0 < pb->Lq;) {
        int64_t p0 = pb->q_off[b] + i0;
        int64_t qb = p0 / pb->q_block;
        int64_t end = i0 + DEC_ROWS;
        if (end > pb->Lq) end = pb->Lq;
        if (end > i0 + (pb->q_block - p0 % pb->q_block))
            end = i0 + (pb->q_block - p0 % pb->q_block);
        int rows = (int)(end - i0);
        for (int r = 0; r < pb->mq; r++) {
            if (r < rows)
                load_row(q, b * q->strides[0] + h * q->strides[1] + (i0 + r) * q->strides[2],
                         (int)pb->D, sc->q + (size_t)r * pb->D);
            else
                memset(sc->q + (size_t)r * pb->D, 0, (size_t)pb->D * sizeof(float));
        }
        flex_softmax_init(sc->m, sc->l, pb->mq);
        memset(sc->o, 0, (size_t)pb->mq * pb->dvp * sizeof(float));
        if (pb->mask && qb != cached_qb) {
            flex_cpu_block_row_classes(pb->mask, pb->num_kv_blocks, b, h, qb, sc->classes);
            cached_qb = qb;
        }
        for (int64_t kv0 = first; kv0 < last; kv0 += pb->chunk) {
            int cols = (int)(last - kv0 < pb->chunk ? last - kv0 : pb->chunk);
            uint8_t cls = pb->mask ? sc->classes[kv0 / pb->kv_block] : FLEX_BLOCK_FULL;
            if (cls == FLEX_BLOCK_EMPTY) continue;
            if (do_chunk(pb, sc, b, h, hk, (int32_t)p0, rows, kv0, cols,
                         cls == FLEX_BLOCK_PARTIAL) != 0)
                return;
        }
        write_rows(pb, sc, b, h, split, i0, rows);
        i0 = end;
    }
}

/* Row (b, h, i) of out and lse from its splits (core/lse_merge.h). */
static void merge_row(const dec_problem *pb, int64_t b, int64_t h, int64_t i, float *acc) {
    int64_t base = (b * pb->Hq + h) * pb->splits * pb->Lq + i;
    int Dv = (int)pb->Dv;
    float max = -INFINITY;
    for (int64_t s = 0; s < pb->splits; s++)
        max = flex_lse_merge_max(max, pb->part_lse[base + s * pb->Lq]);
    float weight_sum = 0.0f;
    memset(acc, 0, (size_t)Dv * sizeof(float));
    for (int64_t s = 0; s < pb->splits; s++) {
        int64_t at = base + s * pb->Lq;
        float w = flex_lse_merge_weight(pb->part_lse[at], max);
        if (w == 0.0f) continue;
        weight_sum += w;
        const float *src = pb->part_out + at * pb->dvp;
        for (int c = 0; c < Dv; c++)
            acc[c] += w * src[c];
    }
    float inv = flex_lse_merge_inverse(weight_sum);
    const flex_tensor *out = &pb->a->out;
    int64_t off = b * out->strides[0] + h * out->strides[1] + i * out->strides[2];
    for (int c = 0; c < Dv; c++)
        flex_store_from_float(out->data, out->dtype, off + c * out->strides[3], acc[c] * inv);
    if (pb->a->lse) {
        const flex_tensor *lse = pb->a->lse;
        ((float *)lse->data)[b * lse->strides[0] + h * lse->strides[1] + i * lse->strides[2]] =
            flex_lse_merge_lse(max, weight_sum);
    }
}

int64_t flex_cpu_decode_splits(int64_t B, int64_t Hq, int64_t Lq, int64_t longest_kv, int chunk,
                               int threads, int hint) {
    int64_t chunks = (longest_kv + chunk - 1) / chunk;
    if (chunks < 1) chunks = 1;
    if (hint > 0) return hint < chunks ? hint : chunks;
    int64_t items = B * Hq * ((Lq + DEC_ROWS - 1) / DEC_ROWS);
    if (items >= 2 * (int64_t)threads) return 1;
    int64_t splits = (2 * (int64_t)threads + items - 1) / items;
    int64_t most = chunks / DEC_MIN_CHUNKS_PER_SPLIT;
    if (splits > most) splits = most;
    return splits < 1 ? 1 : splits;
}

static int plan_threads(const struct flex_plan *plan) {
    int threads = plan ? plan->num_threads : 0;
#ifdef _OPENMP
    if (threads <= 0) threads = omp_get_max_threads();
#endif
    return threads > 0 ? threads : 1;
}

int flex_cpu_decode_wanted(const flex_forward_args *a, const struct flex_plan *plan) {
    if (a->q_offsets || a->kv_lengths || a->page_table || a->kv_splits > 1) return 1;
    if (a->q.sizes[2] > DEC_ROWS || (plan && plan->use_reference)) return 0;
    int chunk = DEC_CHUNK;
    if (a->block_mask && a->block_mask->kv_block < chunk) chunk = a->block_mask->kv_block;
    return flex_cpu_decode_splits(a->q.sizes[0], a->q.sizes[1], a->q.sizes[2], a->k.sizes[2], chunk,
                                  plan_threads(plan), 0) > 1;
}

flex_status flex_cpu_forward_decode(flex_context *ctx, const flex_forward_args *a) {
    dec_problem pb;
    memset(&pb, 0, sizeof pb);
    pb.a = a;
    pb.kern = flex_cpu_select_kernels(a->plan ? a->plan->simd : FLEX_PLAN_SIMD_AUTO);
    pb.B = a->q.sizes[0];
    pb.Hq = a->q.sizes[1];
    pb.Lq = a->q.sizes[2];
    pb.D = a->q.sizes[3];
    pb.Hkv = a->k.sizes[1];
    pb.Dv = a->v.sizes[3];
    pb.group = pb.Hq / pb.Hkv;
    int64_t kv_len = a->kv_len > 0 ? a->kv_len : a->k.sizes[2];
    pb.mask = a->block_mask;
    const flex_mod *mask_mod = pb.mask ? pb.mask->mask_mod : NULL;
    if (pb.mask && pb.mask->num_partial > 0 && !mask_mod)
        return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                         "block_mask has partial blocks but no mask mod to decide them");
    pb.chunk = DEC_CHUNK;
    if (pb.mask) {
        pb.q_block = pb.mask->q_block;
        pb.kv_block = pb.mask->kv_block;
        pb.num_kv_blocks = pb.mask->num_kv_blocks;
        if (pb.kv_block < pb.chunk) pb.chunk = pb.kv_block;
    } else {
        pb.q_block = DEC_ROWS;
        pb.kv_block = pb.chunk;
        pb.num_kv_blocks = (kv_len + pb.chunk - 1) / pb.chunk;
    }
    pb.nkp = (int)cpu_round_up(pb.chunk, CPU_NR);
    pb.mq = (int)cpu_round_up(DEC_ROWS, CPU_MR);
    pb.dvp = (int)cpu_round_up(pb.Dv, CPU_DV_ALIGN);

    pb.q_off = calloc((size_t)pb.B, sizeof(int32_t));
    pb.kv_len = calloc((size_t)pb.B, sizeof(int32_t));
    dec_scratch *scratch = NULL;
    mod_buffer_view score_views[IR_MAX_BUFFERS], mask_views[IR_MAX_BUFFERS];
    void *score_copies[IR_MAX_BUFFERS] = {0}, *mask_copies[IR_MAX_BUFFERS] = {0};
    flex_status result = FLEX_OK;
    int threads = plan_threads(a->plan);
    if (!pb.q_off || !pb.kv_len) {
        result = flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "no memory for the CPU decode's lengths");
        goto done;
    }
    int64_t longest = 0;
    for (int64_t b = 0; b < pb.B; b++) {
        pb.q_off[b] = a->q_offsets ? flex_decode_load(a->q_offsets, b, 0) : 0;
        pb.kv_len[b] = (int32_t)(a->kv_lengths ? flex_decode_load(a->kv_lengths, b, 0) : kv_len);
        if (pb.kv_len[b] > longest) longest = pb.kv_len[b];
    }
    pb.splits =
        flex_cpu_decode_splits(pb.B, pb.Hq, pb.Lq, longest, pb.chunk, threads, a->kv_splits);
    int64_t chunks = (longest + pb.chunk - 1) / pb.chunk;
    pb.chunks_per_split = (chunks + pb.splits - 1) / pb.splits;
    if (pb.chunks_per_split < 1) pb.chunks_per_split = 1;

    int identity = a->score_mod && a->score_mod->ir.num_nodes >= 1 &&
                   a->score_mod->ir.nodes[a->score_mod->ir.root].op == IR_SCORE;
    if (a->score_mod && !identity) {
        if ((result = flex_mod_host_views(ctx, a->score_mod, score_views, score_copies))) goto done;
        pb.score_ir = &a->score_mod->ir;
        pb.score_views = score_views;
    }
    if (pb.mask && pb.mask->num_partial > 0) {
        if ((result = flex_mod_host_views(ctx, mask_mod, mask_views, mask_copies))) goto done;
        pb.mask_ir = &mask_mod->ir;
        pb.mask_views = mask_views;
    }

    int64_t num_items = pb.B * pb.Hq * pb.splits;
    if ((int64_t)threads > num_items) threads = (int)num_items;
    scratch = calloc((size_t)threads, sizeof *scratch);
    int ok = scratch != NULL;
    for (int t = 0; ok && t < threads; t++)
        ok = scratch_alloc(&scratch[t], &pb) == 0;
    if (ok && pb.splits > 1) {
        size_t rows = (size_t)num_items * (size_t)pb.Lq;
        pb.part_out = malloc(rows * (size_t)pb.dvp * sizeof(float));
        pb.part_lse = malloc(rows * sizeof(float));
        ok = pb.part_out && pb.part_lse;
    }
    if (!ok) {
        result = flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY,
                           "no memory for the CPU decode (%d threads, %lld splits, Lq %lld, Dv "
                           "%lld)",
                           threads, (long long)pb.splits, (long long)pb.Lq, (long long)pb.Dv);
        goto done;
    }
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
            do_item(&pb, &scratch[t], i);
        }
        cpu_subnormals_restore(saved_csr);
    }
    if (pb.bounds.failed) {
        result = flex_fail_bounds(ctx, pb.bounds.mod, &pb.bounds.err);
        goto done;
    }
    if (pb.splits > 1) {
        int64_t rows = pb.B * pb.Hq * pb.Lq;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
        for (int64_t r = 0; r < rows; r++) {
            int t = 0;
#ifdef _OPENMP
            t = omp_get_thread_num();
#endif
            merge_row(&pb, r / (pb.Hq * pb.Lq), r / pb.Lq % pb.Hq, r % pb.Lq, scratch[t].o);
        }
    }
done:
    for (int t = 0; scratch && t < threads; t++)
        scratch_free(&scratch[t]);
    free(scratch);
    free(pb.part_out);
    free(pb.part_lse);
    free(pb.q_off);
    free(pb.kv_len);
    flex_mod_release_host_views(score_copies);
    flex_mod_release_host_views(mask_copies);
    return result;
}
