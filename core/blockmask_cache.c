/*
 * The context's cache of block masks built from a mask mod (see
 * blockmask_cache.h for the contract).
 */
#include <pthread.h>
#include <stdlib.h>

#include "blockmask_cache.h"

/* A handful of entries covers the usual training loop (a few layers' masks);
 * beyond that the oldest entry is replaced. */
enum { MASK_CACHE_CAPACITY = 16 };

struct flex_cached_mask {
    const flex_mod *mod;
    uint64_t hash, generation;
    int64_t B, H, q_len, kv_len;
    flex_block_mask *mask;
    int refs; /* one for the cache while listed, one per call holding it; under the lock */
};

struct flex_mask_cache {
    pthread_mutex_t lock;
    flex_cached_mask *entries[MASK_CACHE_CAPACITY]; /* oldest first */
    int count;
};

flex_status flex_mask_cache_create(flex_context *ctx) {
    struct flex_mask_cache *c = calloc(1, sizeof *c);
    if (!c) return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory for the block-mask cache");
    pthread_mutex_init(&c->lock, NULL);
    ctx->mask_cache = c;
    return FLEX_OK;
}

/* The listed entry for these sizes, or NULL; the caller holds the lock. */
static flex_cached_mask *find(struct flex_mask_cache *c, const flex_mod *mod, int64_t B, int64_t H,
                              int64_t q_len, int64_t kv_len) {
    for (int i = 0; i < c->count; i++) {
        flex_cached_mask *e = c->entries[i];
        if (e->mod == mod && e->hash == mod->hash && e->generation == mod->binding_generation &&
            e->B == B && e->H == H && e->q_len == q_len && e->kv_len == kv_len)
            return e;
    }
    return NULL;
}

static void destroy_entry(flex_cached_mask *e) {
    flex_block_mask_destroy(e->mask);
    free(e);
}

/* Builds the mask outside the lock (it can take a while, and may run the
 * backend); a mask uses b and h only when the mod reads them, otherwise one
 * broadcast mask serves every batch and head. */
static flex_status build(flex_context *ctx, const flex_mod *mask_mod, int64_t B, int64_t H,
                         int64_t q_len, int64_t kv_len, flex_cached_mask **out) {
    uint8_t *deps = malloc((size_t)mask_mod->ir.num_nodes);
    if (!deps) return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory");
    ir_dependencies(&mask_mod->ir, deps);
    uint8_t root_deps = deps[mask_mod->ir.root];
    free(deps);
    int64_t mask_B = (root_deps & IR_DEP_B) ? B : 1;
    int64_t mask_H = (root_deps & IR_DEP_H) ? H : 1;
    flex_cached_mask *e = calloc(1, sizeof *e);
    if (!e) return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory for a cached mask");
    flex_block_mask *mask = NULL;
    flex_status st =
        flex_block_mask_create(ctx, mask_mod, mask_B, mask_H, q_len, kv_len, 0, 0, &mask);
    if (st != FLEX_OK) {
        free(e);
        return st;
    }
    *e = (flex_cached_mask){.mod = mask_mod,
                            .hash = mask_mod->hash,
                            .generation = mask_mod->binding_generation,
                            .B = B,
                            .H = H,
                            .q_len = q_len,
                            .kv_len = kv_len,
                            .mask = mask};
    *out = e;
    return FLEX_OK;
}

flex_status flex_mask_cache_acquire(flex_context *ctx, const flex_mod *mask_mod, int64_t B,
                                    int64_t H, int64_t q_len, int64_t kv_len,
                                    flex_cached_mask **held, const flex_block_mask **mask) {
    struct flex_mask_cache *c = ctx->mask_cache;
    pthread_mutex_lock(&c->lock);
    flex_cached_mask *e = find(c, mask_mod, B, H, q_len, kv_len);
    if (e) e->refs++;
    pthread_mutex_unlock(&c->lock);
    if (!e) {
        flex_cached_mask *built = NULL;
        flex_status st = build(ctx, mask_mod, B, H, q_len, kv_len, &built);
        if (st != FLEX_OK) return st;
        flex_cached_mask *evicted = NULL;
        pthread_mutex_lock(&c->lock);
        /* Another thread may have listed the same mask meanwhile: take
         * theirs, so that equal calls share one. */
        e = find(c, mask_mod, B, H, q_len, kv_len);
        if (e) {
            e->refs++;
        } else {
            if (c->count == MASK_CACHE_CAPACITY) {
                flex_cached_mask *oldest = c->entries[0];
                for (int i = 1; i < MASK_CACHE_CAPACITY; i++)
                    c->entries[i - 1] = c->entries[i];
                c->count--;
                if (--oldest->refs == 0) evicted = oldest;
            }
            e = built;
            e->refs = 2; /* the cache's and the caller's */
            c->entries[c->count++] = e;
            built = NULL;
        }
        pthread_mutex_unlock(&c->lock);
        if (built) destroy_entry(built);
        if (evicted) destroy_entry(evicted);
    }
    *held = e;
    *mask = e->mask;
    return FLEX_OK;
}

void flex_mask_cache_release(flex_context *ctx, flex_cached_mask *held) {
    if (!held) return;
    struct flex_mask_cache *c = ctx->mask_cache;
    pthread_mutex_lock(&c->lock);
    const int last = --held->refs == 0;
    pthread_mutex_unlock(&c->lock);
    if (last) destroy_entry(held);
}

void flex_mask_cache_destroy(flex_context *ctx) {
    struct flex_mask_cache *c = ctx->mask_cache;
    if (!c) return;
    for (int i = 0; i < c->count; i++)
        if (--c->entries[i]->refs == 0) destroy_entry(c->entries[i]);
    pthread_mutex_destroy(&c->lock);
    free(c);
    ctx->mask_cache = NULL;
}
