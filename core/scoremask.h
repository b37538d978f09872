/*
 * Block sparsity of score mods. A score mod that returns -inf over whole
 * blocks, e.g. `where(q >= kv, score, -inf)`, masks those blocks as surely as
 * a mask mod would: their weights are exp(-inf) = 0. Interval analysis
 * (mod_interval_score_kept) proves which blocks the mod masks whatever the
 * score is, and flex_attention and flex_attention_backward then walk a block
 * mask without them, on every backend.
 */
#ifndef FLEXATTN_SCOREMASK_H
#define FLEXATTN_SCOREMASK_H

#include <stdint.h>

#include "internal.h"

/*
 * Finds the blocks of a q_len x kv_len grid (blocks of q_block x kv_block)
 * where score_mod returns -inf at every element for every score, NaN and the
 * infinities included. Writes masked[((b * H + h) * nq + i) * nk + j] = 1 for
 * such a block and 0 otherwise, for b < B, h < H (pass 1 for a dimension the
 * mod does not read: its grid is the same for all), and the number of
 * masked blocks to *num_masked. Sound: a block is marked only when the
 * analysis proves it, so a block the analysis cannot decide stays 0.
 * Reads the mod's buffers (copied to the host if they live on a device);
 * borrows every argument.
 */
flex_status flex_score_mask_find(flex_context *ctx, const flex_mod *score_mod, int64_t B, int64_t H,
                                 int64_t q_len, int64_t kv_len, int q_block, int kv_block,
                                 uint8_t *masked, int64_t *num_masked);

/*
 * The block mask a call with score_mod and base (the caller's block mask,
 * the one built for opts->mask_mod, or NULL for none) should walk: base
 * without the blocks score_mod masks, with base's block sizes (128 x 128
 * without base) and base's mask mod for its partial blocks. B and H are the
 * call's batch and query heads; the new mask keeps a dimension only when
 * base or the score mod tells its entries apart. *out is a new mask owned by
 * the caller, or NULL when the score mod masks no block that base keeps
 * (then base is the mask to walk). The new mask borrows base's mask mod.
 */
flex_status flex_score_mask_restrict(flex_context *ctx, const flex_mod *score_mod,
                                     const flex_block_mask *base, int64_t B, int64_t H,
                                     int64_t q_len, int64_t kv_len, flex_block_mask **out);

#endif /* FLEXATTN_SCOREMASK_H */
