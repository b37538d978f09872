/*
 * Block masks that flex_attention builds itself: for a mask mod given
 * without a block mask, and for the blocks a score mod masks. Keyed by the
 * mod, its hash and binding generation and the sizes; owned by the context.
 *
 * Threads sharing a context share the cache: it is locked, and every mask
 * handed out is referenced, so replacing an entry while another call still
 * runs with its mask only drops the cache's reference; the last release
 * destroys the mask.
 */
#ifndef FLEXATTN_BLOCKMASK_CACHE_H
#define FLEXATTN_BLOCKMASK_CACHE_H

#include "internal.h"

/* One mask of the cache, held by a call. */
typedef struct flex_cached_mask flex_cached_mask;

/* Makes ctx's (empty) cache. */
flex_status flex_mask_cache_create(flex_context *ctx);

/* Returns in *held a reference to the mask for these sizes, building it on
 * a miss, and the mask in *mask. The caller gives the reference back with
 * flex_mask_cache_release when its call is done with the mask. */
flex_status flex_mask_cache_acquire(flex_context *ctx, const flex_mod *mask_mod, int64_t B,
                                    int64_t H, int64_t q_len, int64_t kv_len,
                                    flex_cached_mask **held, const flex_block_mask **mask);
/*
 * The same for the block sparsity of a score mod (core/scoremask.h): in
 * *mask the mask a call with score_mod and base (its block mask, or NULL)
 * walks, which is base itself when the score mod masks none of base's
 * blocks. Keyed by the score mod (pointer, hash, binding generation), the
 * sizes and base's serial (so also its block sizes); an entry whose base is
 * gone is never found again and ages out.
 */
flex_status flex_score_mask_cache_acquire(flex_context *ctx, const flex_mod *score_mod,
                                          const flex_block_mask *base, int64_t B, int64_t H,
                                          int64_t q_len, int64_t kv_len, flex_cached_mask **held,
                                          const flex_block_mask **mask);

/* Gives back a reference (NULL is ignored); the last one destroys the mask. */
void flex_mask_cache_release(flex_context *ctx, flex_cached_mask *held);

/* Drops the cache's references and frees the cache (context destruction:
 * no call is running any more). */
void flex_mask_cache_destroy(flex_context *ctx);

#endif
