/*
 * Evaluating a mod's IR on the host: one point (scalar interpreter), a whole
 * tile at once (tile interpreter, the CPU backend's hot path) and over boxes
 * of indices (interval analysis, the block-mask builder's first pass).
 * All three follow ir_apply's semantics exactly.
 */
#ifndef FLEXATTN_MOD_EVAL_H
#define FLEXATTN_MOD_EVAL_H

#include <stddef.h>
#include <stdint.h>

#include "mod/ir.h"

/* A buffer as evaluators see it: host memory, sizes and strides in
 * elements. The views array of a mod is indexed like ir_mod.buffers. */
typedef struct mod_buffer_view {
    const void *data;
    flex_dtype dtype;
    int ndim;
    int64_t sizes[4];
    int64_t strides[4];
} mod_buffer_view;

/* Where a buffer read went out of range (first one found). */
typedef struct mod_bounds_error {
    int set;
    int buffer, dim;
    int64_t index, size;
    int32_t b, h, q, kv;
} mod_bounds_error;

/* Reads element idx[0..ndim) of a buffer as the IR type of its dtype.
 * Returns 0, or -1 (and fills *err when err->set is 0) when out of range. */
int mod_buffer_read(const mod_buffer_view *view, int buffer, const int32_t *idx, ir_value *out,
                    mod_bounds_error *err);

/* Formats a bounds error in words into msg. */
void mod_bounds_error_format(const ir_mod *m, const mod_bounds_error *err, char *msg, size_t cap);

/* ---- scalar interpreter (core/mod/interp.c) ---- */

/* Evaluates the mod at one point. scratch holds m->num_nodes values; the
 * result is scratch[m->root] and is also returned in *result. Returns 0, or
 * -1 on an out-of-range buffer read (err filled). */
int mod_eval_point(const ir_mod *m, const mod_buffer_view *bufs, float score, int32_t b, int32_t h,
                   int32_t q, int32_t kv, ir_value *scratch, ir_value *result,
                   mod_bounds_error *err);

/* The same in double precision, for the fp64 oracle: float ops are computed
 * in double (float constants and buffer elements widened exactly), ints and
 * bools are carried exactly in doubles and follow ir_apply's int semantics.
 * scratch holds m->num_nodes doubles. Returns 0, or -1 with err filled. */
int mod_eval_point_f64(const ir_mod *m, const mod_buffer_view *bufs, double score, int32_t b,
                       int32_t h, int32_t q, int32_t kv, double *scratch, double *result,
                       mod_bounds_error *err);

/* ---- tile interpreter (core/mod/tile.c) ---- */

/* Per-thread scratch for tiles of up to max_rows x max_cols. */
typedef struct mod_tile mod_tile;
mod_tile *mod_tile_create(const ir_mod *m, int max_rows, int max_cols);
void mod_tile_destroy(mod_tile *t);

/* Score mod over rows q0.. q0+rows-1 and columns kv0 .. kv0+cols-1: score
 * is row-major with leading dimension ld and is replaced in place by the
 * modified score. Returns 0, or -1 with err filled. */
int mod_tile_score(mod_tile *t, const mod_buffer_view *bufs, int32_t b, int32_t h, int32_t q0,
                   int rows, int32_t kv0, int cols, float *score, int ld, mod_bounds_error *err);

/* Mask mod over the same kind of tile: writes 1 (attend) or 0 to mask. */
int mod_tile_mask(mod_tile *t, const mod_buffer_view *bufs, int32_t b, int32_t h, int32_t q0,
                  int rows, int32_t kv0, int cols, uint8_t *mask, int ld, mod_bounds_error *err);

/* ---- interval analysis (core/mod/interval.c) ---- */

/* Three-valued truth as a bit set: may be false (1), may be true (2). */
typedef enum mod_tri { MOD_TRI_FALSE = 1, MOD_TRI_TRUE = 2, MOD_TRI_UNKNOWN = 3 } mod_tri;

/* Inclusive index ranges of b, h, q, kv (in that order). */
typedef struct mod_box {
    int64_t lo[4], hi[4];
} mod_box;

/* Per-buffer min/max tables over aligned power-of-two spans, so the range of
 * a buffer over any index interval is found in O(log n). Built once per
 * block-mask build from host views. */
typedef struct mod_range_tables mod_range_tables;
mod_range_tables *mod_range_tables_build(const ir_mod *m, const mod_buffer_view *bufs);
void mod_range_tables_free(mod_range_tables *t);

/* Scratch for mod_interval_mask: bytes needed for m. */
size_t mod_interval_scratch_size(const ir_mod *m);

/* Sound verdict of a mask mod over every point of box: MOD_TRI_TRUE only if
 * every point attends, MOD_TRI_FALSE only if none does. A buffer read that
 * may be out of range makes the verdict MOD_TRI_UNKNOWN. */
mod_tri mod_interval_mask(const ir_mod *m, const mod_range_tables *tables, const mod_box *box,
                          void *scratch);

/* Sound verdict of a score mod over box, in a mask's terms:
 * MOD_TRI_FALSE only if at every point of box the mod returns -inf (never
 * NaN) whatever the score is, NaN and the infinities included, so a kernel
 * may skip the box as a mask's empty block; MOD_TRI_TRUE only if at every
 * point some score (0) gives a result other than -inf, so no block inside
 * box is masked; MOD_TRI_UNKNOWN otherwise, also for a buffer read that may
 * be out of range and for a mod that is not a score mod. scratch as for
 * mod_interval_mask. */
mod_tri mod_interval_score_kept(const ir_mod *m, const mod_range_tables *tables,
                                const mod_box *box, void *scratch);

/* 1 when score 0 keeps every point of box (the result stays above -inf)
 * with every buffer value taken as any value of its type, floats finite:
 * then the blocks a score mod masks could only come from infinities or NaN
 * in its float buffers, which are left unexploited (never a wrong skip), and
 * the buffers need not be read. 0 otherwise (also for an empty box or no
 * memory). */
int mod_interval_score_never_masked(const ir_mod *m, const mod_box *box);

/* For code generation, which may use cheaper arithmetic where a value
 * provably stays small: within[i] = 1 when node i is an int whose every
 * value over box, buffer reads taken as any int32 (no tables), lies in
 * [-limit, limit]. within holds m->num_nodes entries. 0 on success, -1 for
 * an empty box or no memory. */
int mod_interval_ints_within(const ir_mod *m, const mod_box *box, int64_t limit,
                             unsigned char *within);

/* For code generation, from one analysis over box (the score taken as any
 * float, buffer reads as any value):
 * - near[i] = 1 when node i is a float whose every value other than NaN
 *   lies in [-limit, limit] (so never an infinity either): a function's
 *   inline path may be taken where its argument provably stays near zero;
 * - sign[i] is MOD_SIGN_POSITIVE (>= 1) or MOD_SIGN_NONNEGATIVE (>= 0)
 *   when node i is an int with every value so, else MOD_SIGN_ANY: ints may
 *   be divided as unsigned where both operands provably are (floor
 *   division and the remainder then agree with C's).
 * Each holds m->num_nodes entries. 0 on success, -1 for an empty box or no
 * memory. */
enum { MOD_SIGN_ANY = 0, MOD_SIGN_NONNEGATIVE = 1, MOD_SIGN_POSITIVE = 2 };
int mod_interval_near_floats_and_signs(const ir_mod *m, const mod_box *box, float limit,
                                       unsigned char *near, unsigned char *sign);

/* For code generation, which may read a buffer without bounds checks where
 * the read provably stays inside it: in_range[i] = 1 when node i is a
 * buffer read whose every index over box (buffer values taken as any int32)
 * lies within [0, sizes[buffer][dim]). sizes is indexed like m->buffers;
 * in_range holds m->num_nodes entries. 0 on success, -1 for an empty box or
 * no memory. */
int mod_interval_loads_in_range(const ir_mod *m, const mod_box *box, const int64_t (*sizes)[4],
                                unsigned char *in_range);

#endif /* FLEXATTN_MOD_EVAL_H */
