/*
 * Partial blocks as bit masks (flex_partial_bits.cuh on the device): the
 * elements a block mask's partial blocks keep, evaluated once on the GPU
 * into one bit per element and read by the forward instead of the mask
 * mod. A bit block is made once per distinct (b, h) the mask mod reads and
 * per partial (q-block, kv-block), and shared by every batch and head that
 * reads the same bits, however many copies of the lists the mask stores.
 * They are made at a forward's first use, kept on the mask's device copy
 * beside its lists, and dropped with it; docs/decisions.md, "Partial blocks
 * as bit masks", says why and what they cost.
 */
#ifndef FLEXATTN_GPU_PARTIAL_BITS_H
#define FLEXATTN_GPU_PARTIAL_BITS_H

#include <stddef.h>
#include <stdint.h>

#include "gpu_host.h"

/* The most device memory one mask's bit masks take (tables included).
 * Masks that would need more evaluate the mask mod as before. */
#define FLEX_GPU_PARTIAL_BITS_BUDGET ((size_t)64 << 20)

/* Where a call's partial blocks find their bit blocks. A plane is a (b, h)
 * the mask mod reads but the mask's lists do not tell apart (a broadcast
 * mask whose mod reads b or h); the planes of a call are planes_b x
 * planes_h. */
typedef struct flex_gpu_bits_plan {
    int planes_b, planes_h; /* B or 1, Hq or 1 */
    int row_words;          /* 32-bit words per row of a bit block: kv_block / 32, at least 1 */
    int64_t block_words;    /* q_block * row_words */
    int64_t entries;        /* partial entries of the mask's stored lists */
    /* per (plane, entry), plane-major: the word offset of its bit block */
    int32_t *entry_words;
    /* the same per (plane, entry of the q-major partial lists), which the
     * backward walks (an entry of each list per partial block) */
    int32_t *q_entry_words;
    /* per distinct bit block, 4 ints: the b, h, q-block and kv-block index
     * its mask mod is evaluated at (b and h 0 where the mod reads neither) */
    int32_t *blocks;
    int64_t num_blocks;
} flex_gpu_bits_plan;

/* The plan for a call of B batches and Hq query heads over mask, whose
 * mask mod reads b (reads_b) and/or h (reads_h). Returns 0 with *plan
 * made (free with flex_gpu_bits_plan_free), 1 when the bits and tables
 * would take more than budget bytes of device memory (nothing to free), -1
 * when out of memory. Pure. */
int flex_gpu_bits_plan_make(const struct flex_block_mask *mask, int reads_b, int reads_h,
                            int64_t B, int64_t Hq, size_t budget, flex_gpu_bits_plan *plan);
void flex_gpu_bits_plan_free(flex_gpu_bits_plan *plan);
/* The device bytes of a plan's bits and tables (with the bounds word). */
size_t flex_gpu_bits_plan_bytes(const flex_gpu_bits_plan *plan);

/* A mask's bit masks on the device, kept on its device copy
 * (flex_gpu_mask_copy.partial_bits). */
typedef struct flex_gpu_partial_bits {
    /* made for: the mask mod's binding (its buffers' contents decide the
     * bits) and the call's planes */
    uint64_t generation;
    int planes_b, planes_h;
    int usable; /* 0: over the budget; the forward evaluates the mask mod */
    int made;   /* the bit kernel has run */
    int row_words;
    int64_t entries, num_blocks;
    flex_gpu_ptr memory; /* one allocation: */
    flex_gpu_ptr oob;    /* the mask mod's bounds bits (u32), in the first 256 bytes */
    flex_gpu_ptr entry_words, q_entry_words, blocks, bits;
} flex_gpu_partial_bits;

/*
 * The bit masks of mask for a forward of B x Hq heads, from mc's cache or
 * planned and allocated there (their tables uploaded, the bits not yet
 * made: flex_gpu_partial_bits_make). NULL in *out where the mask has no
 * partial blocks or no mask mod. A set for another binding of the mask mod
 * or other planes is replaced. During a graph capture a set not made
 * before is refused with FLEX_ERR_UNSUPPORTED naming it. Under st->lock
 * with the context current.
 */
flex_status flex_gpu_partial_bits_prepare(flex_context *ctx, flex_gpu_state *st,
                                          const struct flex_block_mask *mask,
                                          flex_gpu_mask_copy *mc, int64_t B, int64_t Hq,
                                          flex_gpu_partial_bits **out);

/* Makes the bits of pb, once: launches the bit kernel fn (of the forward's
 * module) on stream with the forward's buffers (descs, slots) and waits
 * for the device, so that a forward on any stream finds them made. Under
 * st->lock with the context current. */
flex_status flex_gpu_partial_bits_make(flex_context *ctx, flex_gpu_state *st,
                                       const struct flex_block_mask *mask,
                                       flex_gpu_partial_bits *pb, void *fn,
                                       const flex_gpu_buffer_desc *descs, int slots,
                                       void *stream);

/* The most nodes of a mask mod the backward evaluates rather than read
 * its bits (flex_gpu_mask_mod_cheap). */
#define FLEX_GPU_CHEAP_MASK_NODES 16

/* Whether evaluating mask mod ir per score costs the backward less than
 * reading its partial blocks' bit masks: at most FLEX_GPU_CHEAP_MASK_NODES
 * nodes, each an index, a constant or an integer or boolean operation
 * other than division and modulo (a causal mask, a sliding window), so no
 * buffer read, division or float arithmetic. Pure. */
int flex_gpu_mask_mod_cheap(const ir_mod *ir);

/* Points a forward parameter block at pb's bits (pb made and usable);
 * the backward adds pb->q_entry_words for its q-major walk. */
void flex_gpu_fwd_params_set_bits(flex_gpu_fwd_params *p, const flex_gpu_partial_bits *pb);

/* Frees pb and its device memory (the context current). */
void flex_gpu_partial_bits_free(const flex_gpu_state *st, flex_gpu_partial_bits *pb);

#endif /* FLEXATTN_GPU_PARTIAL_BITS_H */
