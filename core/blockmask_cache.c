/*
 * The context's cache of block masks built from a mask mod, and of masks
 * restricted by a score mod's block sparsity (see blockmask_cache.h for the
 * contract).
 */
#include <pthread.h>
#include <stdlib.h>

#include "blockmask_cache.h"
#include "scoremask.h"

/* A handful of entries covers the usual training loop (a few layers' masks);
 * beyond that the oldest entry is replaced. */
enum { MASK_CACHE_CAPACITY = 16 };

/* What an entry was built from. */
typedef enum entry_kind {
    FROM_MASK_MOD,  /* flex_block_mask_create of opts->mask_mod */
    FROM_SCORE_MOD, /* a base mask less the blocks a score mod masks */
} entry_kind;

/* The key of an entry: the mod (pointer, hash and binding generation), the
 * call's sizes, and for score-mod entries the serial of the base mask (0:
 * none), which also fixes the block sizes. */
typedef struct entry_key {
    entry_kind kind;
    const flex_mod *mod;
    uint64_t hash, generation;
    int64_t B, H, q_len, kv_len;
    uint64_t base_serial;
} entry_key;

struct flex_cached_mask {
    entry_key key;
    flex_block_mask *mask; /* NULL for a score mod that masks no block of its base */
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

static int same_key(const entry_key *a, const entry_key *b) {
    return a->kind == b->kind && a->mod == b->mod && a->hash == b->hash &&
           a->generation == b->generation && a->B == b->B && a->H == b->H &&
           a->q_len == b->q_len && a->kv_len == b->kv_len && a->base_serial == b->base_serial;
}

/* The listed entry for this key, or NULL; the caller holds the lock. */
static flex_cached_mask *find(struct flex_mask_cache *c, const entry_key *key) {
    for (int i = 0; i < c->count; i++)
        if (same_key(&c->entries[i]->key, key)) return c->entries[i];
    return NULL;
}

static void destroy_entry(flex_cached_mask *e) {
    flex_block_mask_destroy(e->mask);
    free(e);
}

/* Builds a mask-mod entry's mask; a mask uses b and h only when the mod
 * reads them, otherwise one broadcast mask serves every batch and head. */
static flex_status build_from_mask_mod(flex_context *ctx, const entry_key *key,
                                       const flex_block_mask *base, flex_block_mask **mask) {
    (void)base;
    const flex_mod *mask_mod = key->mod;
    uint8_t *deps = malloc((size_t)mask_mod->ir.num_nodes);
    if (!deps) return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory");
    ir_dependencies(&mask_mod->ir, deps);
    uint8_t root_deps = deps[mask_mod->ir.root];
    free(deps);
    int64_t mask_B = (root_deps & IR_DEP_B) ? key->B : 1;
    int64_t mask_H = (root_deps & IR_DEP_H) ? key->H : 1;
    return flex_block_mask_create(ctx, mask_mod, mask_B, mask_H, key->q_len, key->kv_len, 0, 0,
                                  mask);
}

static flex_status build_from_score_mod(flex_context *ctx, const entry_key *key,
                                        const flex_block_mask *base, flex_block_mask **mask) {
    return flex_score_mask_restrict(ctx, key->mod, base, key->B, key->H, key->q_len, key->kv_len,
                                    mask);
}

typedef flex_status (*entry_builder)(flex_context *ctx, const entry_key *key,
                                     const flex_block_mask *base, flex_block_mask **mask);

/*
 * Returns in *held a referenced entry for key, building its mask with build
 * on a miss. The build runs outside the lock (it can take a while, and may
 * run the backend); another thread may list the same key meanwhile, and then
 * its entry is taken, so that equal calls share one mask.
 */
static flex_status acquire(flex_context *ctx, const entry_key *key, const flex_block_mask *base,
                           entry_builder build, flex_cached_mask **held) {
    struct flex_mask_cache *c = ctx->mask_cache;
    pthread_mutex_lock(&c->lock);
    flex_cached_mask *e = find(c, key);
    if (e) e->refs++;
    pthread_mutex_unlock(&c->lock);
    if (!e) {
        flex_cached_mask *built = calloc(1, sizeof *built);
        if (!built) return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory for a cached mask");
        flex_status st = build(ctx, key, base, &built->mask);
        if (st != FLEX_OK) {
            free(built);
            return st;
        }
        built->key = *key;
        flex_cached_mask *evicted = NULL;
        pthread_mutex_lock(&c->lock);
        e = find(c, key);
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
    return FLEX_OK;
}

flex_status flex_mask_cache_acquire(flex_context *ctx, const flex_mod *mask_mod, int64_t B,
                                    int64_t H, int64_t q_len, int64_t kv_len,
                                    flex_cached_mask **held, const flex_block_mask **mask) {
    entry_key key = {.kind = FROM_MASK_MOD,
                     .mod = mask_mod,
                     .hash = mask_mod->hash,
                     .generation = mask_mod->binding_generation,
                     .B = B,
                     .H = H,
                     .q_len = q_len,
                     .kv_len = kv_len};
    flex_status st = acquire(ctx, &key, NULL, build_from_mask_mod, held);
    if (st == FLEX_OK) *mask = (*held)->mask;
    return st;
}

flex_status flex_score_mask_cache_acquire(flex_context *ctx, const flex_mod *score_mod,
                                          const flex_block_mask *base, int64_t B, int64_t H,
                                          int64_t q_len, int64_t kv_len, flex_cached_mask **held,
                                          const flex_block_mask **mask) {
    entry_key key = {.kind = FROM_SCORE_MOD,
                     .mod = score_mod,
                     .hash = score_mod->hash,
                     .generation = score_mod->binding_generation,
                     .B = B,
                     .H = H,
                     .q_len = q_len,
                     .kv_len = kv_len,
                     .base_serial = base ? base->serial : 0};
    flex_status st = acquire(ctx, &key, base, build_from_score_mod, held);
    if (st == FLEX_OK) *mask = (*held)->mask ? (*held)->mask : base;
    return st;
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
