/*
 * Block-mask internals shared by the builder (blockmask.c), the exact host
 * evaluator (blockmask_eval.c), the printer (blockmask_format.c) and the
 * backend wrappers (backend.c uses the host evaluator as the default of the
 * mask_blocks slot).
 */
#ifndef FLEXATTN_BLOCKMASK_H
#define FLEXATTN_BLOCKMASK_H

#include <stdint.h>

#include "internal.h"

/*
 * Exact class of each undecided block, evaluated on the host: for blocks[i]
 * writes FLEX_BLOCK_EMPTY, _PARTIAL or _FULL to classes[i], considering only
 * elements inside (q_len, kv_len). Same contract as the mask_blocks slot of
 * flex_backend_iface. Reads the mod's buffers through flex_mod_host_views
 * for the call; borrows every argument. An out-of-range buffer read met on
 * the way is FLEX_ERR_BUFFER_BOUNDS. Runs the blocks in parallel with
 * OpenMP when it is available.
 */
flex_status flex_block_mask_eval_host(flex_context *ctx, const struct flex_mod *mask_mod,
                                      int64_t q_len, int64_t kv_len, int q_block, int kv_block,
                                      const flex_block_ref *blocks, int64_t count,
                                      uint8_t *classes);

/*
 * The same, with host views and range tables the caller already built for
 * mask_mod (tables may be NULL: interval refinement is then skipped and
 * undecided blocks are scanned). Lets the builder reuse what it made for its
 * own interval pass instead of building it twice.
 */
flex_status flex_block_mask_eval_host_with(flex_context *ctx, const struct flex_mod *mask_mod,
                                           const mod_buffer_view *views,
                                           const mod_range_tables *tables, int64_t q_len,
                                           int64_t kv_len, int q_block, int kv_block,
                                           const flex_block_ref *blocks, int64_t count,
                                           uint8_t *classes);

/*
 * Storage of a mask's lists: kv_full.offsets is one allocation holding all
 * four offsets arrays and kv_full.indices one holding all four indices
 * arrays; the other lists point into them. Only flex_block_mask_destroy
 * frees them.
 */

/* Checks a block size argument: a power of two in [16, 1024], 0 meaning
 * 128. Writes the effective size to *out, or fails naming `what`. */
flex_status flex_block_size_check(flex_context *ctx, const char *what, int block, int *out);

/* Number of blocks of `block` elements that cover `len` elements. */
static inline int64_t flex_blocks_for(int64_t len, int block) {
    return (len + block - 1) / block;
}

#endif /* FLEXATTN_BLOCKMASK_H */
