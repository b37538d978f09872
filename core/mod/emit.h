/*
 * CUDA C (and, through backends/cuda/vendor.cuh, HIP C) source for compiled
 * mods (core/mod/emit.c). The emitted functions follow ir_apply's semantics
 * exactly: ints wrap, floor division and Python modulo with the zero-divisor
 * rules, saturating float -> int, NaN-propagating min/max, and buffer reads
 * that clamp an out-of-range index and set a bit in a device flag.
 */
#ifndef FLEXATTN_MOD_EMIT_H
#define FLEXATTN_MOD_EMIT_H

#include "mod/ir.h"

/* At most this many buffer slots in one kernel: the mask mod's buffers take
 * slots 0.. and the score mod's follow. A read outside a buffer sets bit
 * `slot` of *bufs.bounds_flag. */
#define FLEX_EMIT_MAX_SLOTS 32

/* The short-index bounds. The emitter proves (interval analysis, buffer
 * values taken as any int) which ints stay within [-2^22, 2^22] while b and
 * h are below FLEX_EMIT_SHORT_HEADS and q and kv below FLEX_EMIT_SHORT_LEN,
 * and converts those to float with two operations instead of seven
 * (flex_i2f_short) when the kernel is compiled with FLEX_SHORT_INDICES 1.
 * The host sets it only while every index the kernel passes to a mod,
 * including the discarded ones of a tile past the end, is within them. */
#define FLEX_EMIT_SHORT_LEN   (1 << 20)
#define FLEX_EMIT_SHORT_HEADS (1 << 16)

/*
 * Returns a malloc'd string (caller frees) that defines, in this order:
 *   FLEX_NUM_BUFFERS, FLEX_HAS_MASK_MOD, FLEX_HAS_SCORE_MOD (0 or 1);
 *   FLEX_SCORE_INDEX_USES_SCORE (1: a buffer index of the score mod depends
 *   on the score, so its bounds bits cannot be had without the score);
 *   flex_buffers, the mods' buffer descriptors and the bounds flag:
 *   flex_gpu_buffers<max(slots, 1)> of backends/gpu/flex_gpu_params.h,
 *   { flex_buffer buf[...]; unsigned *bounds_flag; }
 *   __device__ bool  flex_mask_mod(int b, int h, int q, int kv, const flex_buffers &bufs,
 *                                  unsigned &oob)
 *   __device__ float flex_score_mod(float score, int b, int h, int q, int kv,
 *                                   const flex_buffers &bufs, unsigned &oob)
 * A read outside a buffer clamps the index and sets bit `slot` of oob; the
 * kernel ORs oob into *bufs.bounds_flag before it ends.
 * mask or score may be NULL (no mask: always true; no score mod: identity).
 * The text expects vendor.cuh and backends/gpu/flex_gpu_params.h before
 * it. NULL on out of memory or
 * when the mods together have more than FLEX_EMIT_MAX_SLOTS buffers.
 */
char *flex_emit_mods(const ir_mod *mask, const ir_mod *score);

/*
 * The same, with the buffer reads that the host proved inside their buffers
 * (mod_interval_loads_in_range over every index the kernel passes to a mod)
 * read without a check: mask_in_range / score_in_range hold one flag per
 * node of mask / score (either may be NULL: every read checked). When a
 * mask flag is set the text defines FLEX_MASK_READS_IN_RANGE 1, and the
 * kernel then passes the mask mod only indices inside the sequences (it
 * evaluates the discarded scores past the end at the last row and column),
 * so a mask proof may cover q < Lq and kv < Lkv only; a score proof must
 * cover every index the kernel passes.
 */
char *flex_emit_mods_in_range(const ir_mod *mask, const ir_mod *score,
                              const unsigned char *mask_in_range,
                              const unsigned char *score_in_range);

/*
 * The same, and with diagonal_rows > 0 the score mod's diagonal split
 * (mod/diagonal.h, found from score_in_range) after the mods, which must
 * have that many rows (the caller sized its tables for them; NULL
 * otherwise, as when there is no score mod): the text then
 * defines FLEX_DIAG_VALUES (the split's values; 0: no split, and nothing
 * more), FLEX_DIAG_ROWS (the table's rows: the values, then the bounds bits
 * of the diagonal's unproved reads where it has some), FLEX_DIAG_STRIDE
 * (FLEX_BLOCK_N + 16: the kernel's configuration block must define
 * FLEX_BLOCK_N) and
 *   __device__ void  flex_score_diag_fill(int b, int h, int d,
 *                                         const flex_buffers &bufs, float *at)
 *     stores value k of the diagonal d = kv - q at at[k * FLEX_DIAG_STRIDE]
 *     (ints and bools as the bits of an int), then the bounds bits;
 *   __device__ float flex_score_mod_diag(float score, int b, int h, int q, int kv,
 *                                        const flex_buffers &bufs, unsigned &oob,
 *                                        const float *diag)
 *     flex_score_mod with the values read from diag, the entry of the
 *     diagonal kv - q, and the entry's bounds bits added to oob.
 * With diagonal_rows 0 the text defines FLEX_DIAG_VALUES 0.
 */
char *flex_emit_mods_diagonal(const ir_mod *mask, const ir_mod *score,
                              const unsigned char *mask_in_range,
                              const unsigned char *score_in_range, int diagonal_rows);

/*
 * Any IR function, such as a score mod's derivative (mod_derive adds its
 * nodes to the mod's own IR): a malloc'd definition (caller frees) of
 *   __device__ void name(float score, int b, int h, int q, int kv,
 *                        const flex_buffers &bufs, unsigned &oob,
 *                        T0 &out0, T1 &out1, ...)
 * that stores node outputs[k] of m in outk, Tk its C type (float, int,
 * bool). Every node of m is emitted once, so values shared between the
 * outputs are computed once; m's buffers take slots slot_base.. (as the
 * score mod's do after the mask mod's in flex_emit_mods); in_range as for
 * flex_emit_mods_in_range, one flag per node of m (NULL: every read
 * checked). The text must follow flex_emit_mods' (struct flex_buffers, the
 * helpers and the loads). NULL on out of memory or a bad argument.
 */
char *flex_emit_ir_function(const ir_mod *m, const char *name, const int *outputs, int num_outputs,
                            int slot_base, const unsigned char *in_range);

/* Number of buffer slots the two mods use (mask's first). */
int flex_emit_num_slots(const ir_mod *mask, const ir_mod *score);

#endif /* FLEXATTN_MOD_EMIT_H */
