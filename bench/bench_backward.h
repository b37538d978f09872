/*
 * Backward timing for the attention benchmark (bench/bench_backward.c).
 */
#ifndef FLEXATTN_BENCH_BACKWARD_H
#define FLEXATTN_BENCH_BACKWARD_H

#include <stdint.h>

#include "flexattn.h"

/*
 * Median time in ms of `iters` flex_attention_backward calls (after `warmup`
 * untimed ones) for q, k, v (device tensors of one dtype, BHSD), with the
 * score mod and block mask of the forward (either may be NULL). Allocates
 * out, lse, dout (fixed pseudo-random values), dq, dk and dv on the
 * context's device, runs the forward once for out and lse, and frees them
 * all before returning. Returns FLEX_OK, or the failing call's status (the
 * message is on ctx; FLEX_ERR_UNSUPPORTED for a backend without backward).
 */
flex_status bench_backward_ms(flex_context *ctx, const flex_tensor *q, const flex_tensor *k,
                              const flex_tensor *v, const flex_mod *score_mod,
                              const flex_block_mask *mask, int64_t warmup, int64_t iters,
                              double *ms);

#endif /* FLEXATTN_BENCH_BACKWARD_H */
