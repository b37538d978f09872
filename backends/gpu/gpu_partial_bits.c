/*
 * Partial blocks as bit masks (gpu_partial_bits.h): the plan that maps a
 * call's partial blocks onto distinct bit blocks, their device memory on
 * the mask's device copy, and the launch of the kernel that makes them.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_partial_bits.h"
#include "mod/ir.h"

/* Bytes of the allocation's head: the bounds word, padded so that the
 * tables and the bits after it stay 16-byte aligned (the forward reads a
 * row's four words at once). */
#define BITS_HEAD_BYTES 256u

static size_t plan_bytes(int64_t table_entries, int64_t num_blocks, int64_t block_words) {
    const size_t tables = (size_t)table_entries * 4 + (size_t)num_blocks * 16;
    return BITS_HEAD_BYTES + ((tables + 255) & ~(size_t)255) +
           (size_t)num_blocks * (size_t)block_words * 4;
}

/* Both tables: per (plane, entry) of the kv-major and of the q-major lists. */
size_t flex_gpu_bits_plan_bytes(const flex_gpu_bits_plan *plan) {
    return plan_bytes(2 * (int64_t)plan->planes_b * plan->planes_h * plan->entries,
                      plan->num_blocks, plan->block_words);
}

void flex_gpu_bits_plan_free(flex_gpu_bits_plan *plan) {
    free(plan->entry_words);
    free(plan->q_entry_words);
    free(plan->blocks);
    plan->entry_words = plan->q_entry_words = plan->blocks = NULL;
}

/* Appends a bit block (b, h, q-block i, kv-block j); its number in *slot.
 * 0, or -1 when out of memory. */
static int add_block(flex_gpu_bits_plan *plan, int64_t *cap, int32_t b, int32_t h, int32_t i,
                     int32_t j, int64_t *slot) {
    if (plan->num_blocks == *cap) {
        const int64_t grown = *cap ? 2 * *cap : 1024;
        int32_t *more = realloc(plan->blocks, (size_t)grown * 4 * sizeof *more);
        if (!more) return -1;
        plan->blocks = more;
        *cap = grown;
    }
    int32_t *at = plan->blocks + 4 * plan->num_blocks;
    at[0] = b, at[1] = h, at[2] = i, at[3] = j;
    *slot = plan->num_blocks++;
    return 0;
}

/* The position of j in the ascending list[0..n), or -1. */
static int64_t find_sorted(const int32_t *list, int64_t n, int32_t j) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (list[mid] < j)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && list[lo] == j ? lo : -1;
}

/*
 * The q-major table from the kv-major one: the q-major lists are the
 * kv-major ones transposed, so partial entry (column (b, h, kv block j), q
 * block i) is the entry of j in kv-major row (b, h, i). 0, -1 when out of
 * memory, 1 when the lists are not each other's transpose (no bits).
 */
static int map_q_entries(const struct flex_block_mask *mask, int64_t planes,
                         flex_gpu_bits_plan *plan) {
    const int64_t nq = mask->num_q_blocks, nk = mask->num_kv_blocks;
    const int64_t columns = mask->B * mask->H * nk;
    plan->q_entry_words = malloc((size_t)(planes * plan->entries > 0 ? planes * plan->entries : 1) *
                                 sizeof *plan->q_entry_words);
    if (!plan->q_entry_words) return -1;
    const int32_t *off = mask->kv_partial.offsets, *idx = mask->kv_partial.indices;
    const int32_t *qoff = mask->q_partial.offsets, *qidx = mask->q_partial.indices;
    for (int64_t c = 0; c < columns; c++) {
        const int64_t bh = c / nk;
        const int32_t j = (int32_t)(c % nk);
        for (int64_t e = qoff[c]; e < qoff[c + 1]; e++) {
            const int64_t r = bh * nq + qidx[e];
            const int64_t pos = find_sorted(idx + off[r], off[r + 1] - off[r], j);
            if (pos < 0) return 1; /* not each other's transpose: no bits */
            const int64_t at = off[r] + pos;
            for (int64_t plane = 0; plane < planes; plane++)
                plan->q_entry_words[plane * plan->entries + e] =
                    plan->entry_words[plane * plan->entries + at];
        }
    }
    return 0;
}

/*
 * Every (plane, stored row) maps onto a key row: the q-block row at the
 * (b, h) the mask mod is evaluated at, b and h 0 where it reads neither.
 * The first (plane, stored row) of a key row gives each of its partial
 * entries a new bit block; later ones with the same key row reuse those
 * blocks (a straight copy where the lists are equal, the usual case of a
 * mask that stores a copy per (b, h)), and only entries the first did not
 * have get new ones.
 */
int flex_gpu_bits_plan_make(const struct flex_block_mask *mask, int reads_b, int reads_h,
                            int64_t B, int64_t Hq, size_t budget, flex_gpu_bits_plan *plan) {
    memset(plan, 0, sizeof *plan);
    const int64_t nq = mask->num_q_blocks;
    const int64_t rows = mask->B * mask->H * nq;
    plan->planes_b = reads_b && mask->B == 1 ? (int)B : 1;
    plan->planes_h = reads_h && mask->H == 1 ? (int)Hq : 1;
    plan->row_words = mask->kv_block >= 32 ? mask->kv_block / 32 : 1;
    plan->block_words = (int64_t)mask->q_block * plan->row_words;
    plan->entries = mask->kv_partial.offsets[rows];
    const int64_t planes = (int64_t)plan->planes_b * plan->planes_h;
    const int64_t key_b = reads_b ? B : 1, key_h = reads_h ? Hq : 1;
    /* the tables alone over the budget, or a key-row index too large to
     * keep on the host */
    if (plan_bytes(2 * planes * plan->entries, 0, 0) > budget || key_b * key_h * nq > (1 << 26))
        return 1;
    const int64_t key_rows = key_b * key_h * nq;
    int64_t *first_row = malloc((size_t)key_rows * sizeof *first_row);   /* stored row */
    int64_t *first_slot = malloc((size_t)key_rows * sizeof *first_slot); /* its first block */
    plan->entry_words = malloc((size_t)(planes * plan->entries > 0 ? planes * plan->entries : 1) *
                               sizeof *plan->entry_words);
    int64_t cap = 0;
    int result = first_row && first_slot && plan->entry_words ? 0 : -1;
    for (int64_t k = 0; !result && k < key_rows; k++)
        first_row[k] = -1;
    const int32_t *off = mask->kv_partial.offsets, *idx = mask->kv_partial.indices;
    for (int64_t plane = 0; !result && plane < planes; plane++) {
        const int64_t pb = plane / plan->planes_h, ph = plane % plan->planes_h;
        for (int64_t r = 0; !result && r < rows; r++) {
            const int64_t mb = r / (mask->H * nq), mh = r / nq % mask->H, i = r % nq;
            const int64_t kb = !reads_b ? 0 : plan->planes_b > 1 ? pb : mb;
            const int64_t kh = !reads_h ? 0 : plan->planes_h > 1 ? ph : mh;
            const int64_t key = (kb * key_h + kh) * nq + i;
            const int32_t *list = idx + off[r];
            const int64_t n = off[r + 1] - off[r];
            int32_t *words = plan->entry_words + plane * plan->entries + off[r];
            const int64_t canon = first_row[key];
            if (canon < 0) {
                first_row[key] = r;
                first_slot[key] = plan->num_blocks;
            }
            const int32_t *canon_list = canon < 0 ? list : idx + off[canon];
            const int64_t canon_n = canon < 0 ? n : off[canon + 1] - off[canon];
            const int same = canon >= 0 && canon_n == n && !memcmp(canon_list, list, (size_t)n * 4);
            for (int64_t e = 0; !result && e < n; e++) {
                const int64_t at = canon < 0 ? -1 : same ? e : find_sorted(canon_list, canon_n, list[e]);
                int64_t slot = first_slot[key] + at;
                if (at < 0)
                    result = add_block(plan, &cap, (int32_t)kb, (int32_t)kh, (int32_t)i, list[e],
                                       &slot);
                words[e] = (int32_t)(slot * plan->block_words);
            }
            if (!result && plan_bytes(2 * planes * plan->entries, plan->num_blocks,
                                      plan->block_words) > budget)
                result = 1;
        }
    }
    free(first_row);
    free(first_slot);
    if (!result) result = map_q_entries(mask, planes, plan);
    if (result) flex_gpu_bits_plan_free(plan);
    return result;
}

/* The ops flex_gpu_mask_mod_cheap accepts: indices, constants and integer
 * or boolean operations of a few instructions (no load, division, modulo,
 * float function or conversion). */
static const unsigned char cheap_ops[IR_OP_COUNT] = {
    [IR_CONST] = 1, [IR_B] = 1,      [IR_H] = 1,   [IR_Q] = 1,   [IR_KV] = 1,  [IR_NEG] = 1,
    [IR_NOT] = 1,   [IR_BITNOT] = 1, [IR_ABS] = 1, [IR_ADD] = 1, [IR_SUB] = 1, [IR_MUL] = 1,
    [IR_MIN] = 1,   [IR_MAX] = 1,    [IR_EQ] = 1,  [IR_NE] = 1,  [IR_LT] = 1,  [IR_LE] = 1,
    [IR_GT] = 1,    [IR_GE] = 1,     [IR_AND] = 1, [IR_OR] = 1,  [IR_XOR] = 1, [IR_SELECT] = 1,
};

int flex_gpu_mask_mod_cheap(const ir_mod *ir) {
    if (ir->num_nodes > FLEX_GPU_CHEAP_MASK_NODES) return 0;
    for (int i = 0; i < ir->num_nodes; i++) {
        const ir_node *n = &ir->nodes[i];
        if (n->type == IR_FLOAT || n->op >= IR_OP_COUNT || !cheap_ops[n->op]) return 0;
    }
    return 1;
}

/* ---- on the device ---- */

void flex_gpu_partial_bits_free(const flex_gpu_state *st, flex_gpu_partial_bits *pb) {
    if (!pb) return;
    if (pb->memory) st->ops->mem_free(st->api, pb->memory);
    free(pb);
}

/* Whether the mask mod's value depends on b / on h. */
static void mod_reads_bh(const ir_mod *ir, int *reads_b, int *reads_h) {
    int deps = 0;
    uint8_t *d = malloc((size_t)(ir->num_nodes > 0 ? ir->num_nodes : 1));
    if (d && ir->num_nodes > 0) {
        ir_dependencies(ir, d);
        deps = d[ir->root];
    } else if (!d) {
        deps = IR_DEP_B | IR_DEP_H; /* no memory to look: assume both */
    }
    free(d);
    *reads_b = (deps & IR_DEP_B) != 0;
    *reads_h = (deps & IR_DEP_H) != 0;
}

/* Allocates pb's memory for plan and uploads the bounds word (0) and the
 * tables; the bits are written by the kernel. */
static flex_status upload_plan(flex_context *ctx, flex_gpu_state *st, const flex_gpu_bits_plan *plan,
                               flex_gpu_partial_bits *pb) {
    const size_t bytes = flex_gpu_bits_plan_bytes(plan);
    const size_t table_words = (size_t)plan->planes_b * plan->planes_h * (size_t)plan->entries;
    const size_t head = BITS_HEAD_BYTES + 2 * table_words * 4 + (size_t)plan->num_blocks * 16;
    unsigned char *host = calloc(1, head);
    if (!host) return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory for bit mask tables");
    memcpy(host + BITS_HEAD_BYTES, plan->entry_words, table_words * 4);
    memcpy(host + BITS_HEAD_BYTES + table_words * 4, plan->q_entry_words, table_words * 4);
    memcpy(host + BITS_HEAD_BYTES + 2 * table_words * 4, plan->blocks,
           (size_t)plan->num_blocks * 16);
    char what[96];
    snprintf(what, sizeof what, "%s (partial-block bit masks)", st->ops->mem_alloc_name);
    const int r = st->ops->mem_alloc(st->api, &pb->memory, bytes);
    flex_status s = r == st->ops->out_of_memory
                        ? flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY,
                                    "the GPU has no room for %zu bytes of partial-block bit masks",
                                    bytes)
                        : flex_gpu_check(ctx, st, r, what);
    if (!s) {
        snprintf(what, sizeof what, "%s (partial-block bit masks)", st->ops->copy_to_device_name);
        s = flex_gpu_check(ctx, st, st->ops->copy_to_device(st->api, pb->memory, host, head), what);
    }
    free(host);
    if (s) return s;
    pb->oob = pb->memory;
    pb->entry_words = pb->memory + BITS_HEAD_BYTES;
    pb->q_entry_words = pb->entry_words + table_words * 4;
    pb->blocks = pb->q_entry_words + table_words * 4;
    pb->bits = pb->memory + (bytes - (size_t)plan->num_blocks * (size_t)plan->block_words * 4);
    return FLEX_OK;
}

flex_status flex_gpu_partial_bits_prepare(flex_context *ctx, flex_gpu_state *st,
                                          const struct flex_block_mask *mask,
                                          flex_gpu_mask_copy *mc, int64_t B, int64_t Hq,
                                          flex_gpu_partial_bits **out) {
    *out = NULL;
    const struct flex_mod *mod = mask ? mask->mask_mod : NULL;
    if (!mod || mask->num_partial == 0) return FLEX_OK;
    int reads_b, reads_h;
    mod_reads_bh(&mod->ir, &reads_b, &reads_h);
    const int planes_b = reads_b && mask->B == 1 ? (int)B : 1;
    const int planes_h = reads_h && mask->H == 1 ? (int)Hq : 1;
    flex_gpu_partial_bits *old = mc->partial_bits;
    if (old && old->generation == mod->binding_generation && old->planes_b == planes_b &&
        old->planes_h == planes_h) {
        *out = old;
        return FLEX_OK;
    }
    if (st->capturing)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "bit masks of the block mask's partial blocks must be made on the GPU, "
                         "but the stream is being captured into a graph, where that is not "
                         "allowed: make one call with the same mods, block mask, dtypes and "
                         "shapes before the capture");
    if (old) {
        /* a forward still queued may read the old bits */
        flex_status s = flex_gpu_check(ctx, st, st->ops->synchronize(st->api),
                                       st->ops->synchronize_name);
        if (s) return s;
        flex_gpu_partial_bits_free(st, old);
        mc->partial_bits = NULL;
    }
    flex_gpu_partial_bits *pb = calloc(1, sizeof *pb);
    if (!pb) return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory for bit masks");
    pb->generation = mod->binding_generation;
    pb->planes_b = planes_b;
    pb->planes_h = planes_h;
    flex_gpu_bits_plan plan;
    const int planned = flex_gpu_bits_plan_make(mask, reads_b, reads_h, B, Hq,
                                                FLEX_GPU_PARTIAL_BITS_BUDGET, &plan);
    if (planned < 0) {
        free(pb);
        return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory planning bit masks");
    }
    if (planned > 0) {
        flex_log(FLEX_LOG_INFO,
                 "partial-block bit masks would take more than %zu MB; the forward evaluates "
                 "the mask mod",
                 FLEX_GPU_PARTIAL_BITS_BUDGET >> 20);
    } else {
        flex_status s = upload_plan(ctx, st, &plan, pb);
        pb->usable = !s;
        pb->row_words = plan.row_words;
        pb->entries = plan.entries;
        pb->num_blocks = plan.num_blocks;
        flex_log(FLEX_LOG_DEBUG, "partial-block bit masks: %lld blocks for %lld entries x %d planes",
                 (long long)plan.num_blocks, (long long)plan.entries, planes_b * planes_h);
        flex_gpu_bits_plan_free(&plan);
        if (s) {
            flex_gpu_partial_bits_free(st, pb);
            return s;
        }
    }
    mc->partial_bits = pb;
    *out = pb;
    return FLEX_OK;
}

/* Mirrors the head of flex_partial_bits.cuh's parameter block; the
 * forward's buffers and the bounds flag follow it. */
typedef struct partial_bits_params {
    uint64_t blocks, bits, oob;
    int64_t count;
    int32_t q_len, kv_len, q_block, kv_block, row_words, pad_;
} partial_bits_params;

flex_status flex_gpu_partial_bits_make(flex_context *ctx, flex_gpu_state *st,
                                       const struct flex_block_mask *mask,
                                       flex_gpu_partial_bits *pb, void *fn,
                                       const flex_gpu_buffer_desc *descs, int slots,
                                       void *stream) {
    if (pb->made) return FLEX_OK;
    if (st->capturing)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "bit masks of the block mask's partial blocks must be made on the GPU, "
                         "but the stream is being captured into a graph: make one call with the "
                         "same mods, block mask, dtypes and shapes before the capture");
    const partial_bits_params p = {.blocks = pb->blocks,
                                   .bits = pb->bits,
                                   .oob = pb->oob,
                                   .count = pb->num_blocks,
                                   .q_len = (int32_t)mask->q_len,
                                   .kv_len = (int32_t)mask->kv_len,
                                   .q_block = mask->q_block,
                                   .kv_block = mask->kv_block,
                                   .row_words = pb->row_words};
    unsigned char blob[sizeof p + (FLEX_EMIT_MAX_SLOTS + 2) * sizeof(flex_gpu_buffer_desc)];
    memcpy(blob, &p, sizeof p);
    const size_t size = flex_gpu_append_buffers(blob, sizeof p, descs, slots, st->bounds_flag);
    const unsigned ctas = (unsigned)(pb->num_blocks < (1 << 20) ? pb->num_blocks : (1 << 20));
    flex_status s = st->ops->launch(ctx, st, fn, ctas, 1, 256, 0, stream, blob, size, NULL);
    /* Made on the call's stream (after the work that wrote the mod's
     * buffers) and waited for, once, so that calls on other streams find
     * them complete. */
    if (!s)
        s = flex_gpu_check(ctx, st, st->ops->synchronize(st->api), st->ops->synchronize_name);
    if (!s) {
        pb->made = 1;
        if (slots > 0) atomic_store(&st->bounds_pending, 1);
    }
    return s;
}

void flex_gpu_fwd_params_set_bits(flex_gpu_fwd_params *p, const flex_gpu_partial_bits *pb) {
    p->bit_words = pb->entry_words;
    p->bits = pb->bits;
    p->bits_oob = pb->oob;
    p->bit_planes_b = pb->planes_b;
    p->bit_planes_h = pb->planes_h;
    p->bit_entries = (int32_t)pb->entries;
    p->bit_row_words = pb->row_words;
}
