#include <stdlib.h>

#include "blockmask_cache.h"

/* A handful of entries covers the usual training loop (a few layers' masks);
 * beyond that the oldest entry is replaced. */
enum { MASK_CACHE_CAPACITY = 16 };

struct mask_cache_entry {
    const flex_mod *mod;
    uint64_t hash, generation;
    int64_t B, H, q_len, kv_len;
    flex_block_mask *mask;
};

flex_status flex_mask_cache_get(flex_context *ctx, const flex_mod *mask_mod, int64_t B, int64_t H,
                                int64_t q_len, int64_t kv_len, const flex_block_mask **out) {
    for (int i = 0; i < ctx->mask_cache_count; i++) {
        struct mask_cache_entry *e = &ctx->mask_cache[i];
        if (e->mod == mask_mod && e->hash == mask_mod->hash &&
            e->generation == mask_mod->binding_generation && e->B == B && e->H == H &&
            e->q_len == q_len && e->kv_len == kv_len) {
            *out = e->mask;
            return FLEX_OK;
        }
    }
    if (!ctx->mask_cache) {
        ctx->mask_cache = calloc(MASK_CACHE_CAPACITY, sizeof *ctx->mask_cache);
        if (!ctx->mask_cache)
            return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory for the block-mask cache");
    }
    /* A mask uses b and h only when the mod reads them; otherwise one
     * broadcast mask serves every batch and head. */
    uint8_t *deps = malloc((size_t)mask_mod->ir.num_nodes);
    if (!deps) return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory");
    ir_dependencies(&mask_mod->ir, deps);
    uint8_t root_deps = deps[mask_mod->ir.root];
    free(deps);
    int64_t mask_B = (root_deps & IR_DEP_B) ? B : 1;
    int64_t mask_H = (root_deps & IR_DEP_H) ? H : 1;

    flex_block_mask *mask = NULL;
    flex_status st =
        flex_block_mask_create(ctx, mask_mod, mask_B, mask_H, q_len, kv_len, 0, 0, &mask);
    if (st != FLEX_OK) return st;
    int slot = ctx->mask_cache_count;
    if (slot == MASK_CACHE_CAPACITY) {
        flex_block_mask_destroy(ctx->mask_cache[0].mask);
        for (int i = 1; i < MASK_CACHE_CAPACITY; i++)
            ctx->mask_cache[i - 1] = ctx->mask_cache[i];
        slot = MASK_CACHE_CAPACITY - 1;
    } else {
        ctx->mask_cache_count++;
    }
    ctx->mask_cache[slot] = (struct mask_cache_entry){.mod = mask_mod,
                                                      .hash = mask_mod->hash,
                                                      .generation = mask_mod->binding_generation,
                                                      .B = B,
                                                      .H = H,
                                                      .q_len = q_len,
                                                      .kv_len = kv_len,
                                                      .mask = mask};
    *out = mask;
    return FLEX_OK;
}

void flex_mask_cache_clear(flex_context *ctx) {
    for (int i = 0; i < ctx->mask_cache_count; i++)
        flex_block_mask_destroy(ctx->mask_cache[i].mask);
    free(ctx->mask_cache);
    ctx->mask_cache = NULL;
    ctx->mask_cache_count = 0;
}
