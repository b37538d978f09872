/*
 * The LSE merge: how the results of pieces of one attention row, each
 * computed over a disjoint part of the keys, become the row's result.
 *
 * A piece s reports its normalised output out_s and its lse_s (the log of
 * its sum of exp of scores; -inf for a piece with no attended key, NaN when
 * one of its scores was NaN or +inf, core/softmax.h). With M the largest
 * lse_s and w_s = exp(lse_s - M) (0 for an empty piece):
 *
 *     out = sum_s w_s * out_s / sum_s w_s,   lse = M + log(sum_s w_s)
 *
 * A row whose pieces are all empty gives out 0 and lse -inf; a NaN piece
 * makes out and lse NaN. One piece merges to itself bit for bit (w = 1).
 *
 * This header is the one definition of that rule. It is plain C for the
 * host (the CPU backend's split-KV decode, backends/cpu/cpu_decode.c) and
 * compiles unchanged as CUDA device code under NVRTC, for a GPU combine
 * kernel: it includes nothing there and uses only expf and logf.
 */
#ifndef FLEXATTN_LSE_MERGE_H
#define FLEXATTN_LSE_MERGE_H

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FLEX_LSE_MERGE_FN      static __device__ __forceinline__
#define FLEX_LSE_MERGE_NEG_INF (-__int_as_float(0x7f800000))
#else
#include <math.h>
#define FLEX_LSE_MERGE_FN      static inline
#define FLEX_LSE_MERGE_NEG_INF (-INFINITY)
#endif

/* The running maximum of the pieces' lse: start from -inf and fold each
 * lse_s in. A NaN lse_s is skipped here; its weight carries it. */
FLEX_LSE_MERGE_FN float flex_lse_merge_max(float max_so_far, float lse_s) {
    return lse_s > max_so_far ? lse_s : max_so_far;
}

/* w_s = exp(lse_s - max): 0 for an empty piece, NaN for a NaN piece. */
FLEX_LSE_MERGE_FN float flex_lse_merge_weight(float lse_s, float max) {
    if (lse_s == FLEX_LSE_MERGE_NEG_INF) return 0.0f;
    return expf(lse_s - max);
}

/* The merged lse from the maximum and the sum of the weights. */
FLEX_LSE_MERGE_FN float flex_lse_merge_lse(float max, float weight_sum) {
    if (weight_sum == 0.0f) return FLEX_LSE_MERGE_NEG_INF;
    return max + logf(weight_sum);
}

/* The factor that turns sum_s w_s * out_s into out: 1 / sum w_s, 0 for a
 * row with no attended key. */
FLEX_LSE_MERGE_FN float flex_lse_merge_inverse(float weight_sum) {
    return weight_sum == 0.0f ? 0.0f : 1.0f / weight_sum;
}

#endif /* FLEXATTN_LSE_MERGE_H */
