/*
 * A tile evaluator with several outputs (core/mod/tile_multi.c): evaluates
 * chosen nodes of a mod over a tile of (q, kv) points in one pass over the
 * nodes, so values shared between the outputs are computed once. The
 * backward pass uses it for a score mod's value, its derivative with respect
 * to the score and to each buffer read, and the indices of those reads.
 * Semantics are ir_apply's.
 */
#ifndef FLEXATTN_MOD_TILE_MULTI_H
#define FLEXATTN_MOD_TILE_MULTI_H

#include "mod/eval.h"

typedef struct mod_multi mod_multi;

/*
 * Prepares the evaluation of nodes outputs[0..num_outputs) of m over tiles of
 * at most max_elems points. Keeps a pointer to m, which must stay alive and
 * unchanged until mod_multi_destroy; outputs is copied. One mod_multi per
 * thread. NULL on out of memory.
 */
mod_multi *mod_multi_create(const ir_mod *m, const int *outputs, int num_outputs, int max_elems);
void mod_multi_destroy(mod_multi *t);

/*
 * Evaluates the outputs at the points (q0 + r, kv0 + c), r < rows, c < cols
 * (rows * cols <= max_elems), for batch b and head h. score[r * ld + c] is
 * the score at each point (unread when the mod has no score; may then be
 * NULL). Returns 0, or -1 with *err filled on an out-of-range buffer read.
 */
int mod_multi_eval(mod_multi *t, const mod_buffer_view *bufs, int32_t b, int32_t h, int32_t q0,
                   int rows, int32_t kv0, int cols, const float *score, int ld,
                   mod_bounds_error *err);

/*
 * The values of output i of the last evaluation: rows * cols entries, point
 * (r, c) at index r * cols + c (float for float nodes, int32 for ints and
 * bools). Owned by t; valid until the next mod_multi_eval.
 */
const ir_value *mod_multi_output(const mod_multi *t, int i);

#endif /* FLEXATTN_MOD_TILE_MULTI_H */
