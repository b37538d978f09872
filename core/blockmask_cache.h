/*
 * Block masks that flex_attention builds itself when it is given a mask mod
 * and no block mask. Keyed by the mod's hash and binding generation, the
 * sizes and the block sizes; owned by the context.
 */
#ifndef FLEXATTN_BLOCKMASK_CACHE_H
#define FLEXATTN_BLOCKMASK_CACHE_H

#include "internal.h"

/* Returns (in *out) a mask owned by ctx's cache, building it on a miss. The
 * pointer stays valid until the context is destroyed. */
flex_status flex_mask_cache_get(flex_context *ctx, const flex_mod *mask_mod, int64_t B, int64_t H,
                                int64_t q_len, int64_t kv_len, const flex_block_mask **out);
/* Destroys every cached mask. */
void flex_mask_cache_clear(flex_context *ctx);

#endif
