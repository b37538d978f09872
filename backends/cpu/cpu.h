/*
 * The CPU backend's private interface: the forward paths, the backward entry
 * (backends/cpu/cpu_backward.c) and the micro-kernel table shared by the
 * tiled forward and its SIMD implementations.
 */
#ifndef FLEXATTN_CPU_H
#define FLEXATTN_CPU_H

#include <stddef.h>
#include <stdint.h>
#include "fpenv.h" /* MXCSR; before any AVX-512 target region */
#include "internal.h"

/* Tiled, block-sparse forward (cpu_forward.c); picks the reference path when
 * args->plan asks for it. args are validated by the core. On a buffer read
 * out of range it returns FLEX_ERR_BUFFER_BOUNDS and the contents of out and
 * lse are unspecified; no other failure happens after out is first written. */
flex_status flex_cpu_forward(flex_context *ctx, const flex_forward_args *args);

/* Plain reference forward (cpu_reference.c): no tiling, the scalar mod
 * interpreter, f32 arithmetic, the block mask honoured class by class. Same
 * contract as flex_cpu_forward. */
flex_status flex_cpu_forward_reference(flex_context *ctx, const flex_forward_args *args);

/* The decode path (cpu_decode.c): work split over (b, h, kv split) with an
 * LSE merge; the only path that knows q_offsets, kv_lengths and page_table.
 * Same contract as flex_cpu_forward. */
flex_status flex_cpu_forward_decode(flex_context *ctx, const flex_forward_args *args);

/* Whether flex_cpu_forward hands a call to the decode path: always with
 * decode arguments or a kv_splits hint above 1; for a plain call with at
 * most 16 query rows when the split policy would split its keys. */
int flex_cpu_decode_wanted(const flex_forward_args *args, const struct flex_plan *plan);

/* The split policy, the one place it lives: the hint when > 0 (at most one
 * split per chunk of keys), else enough (b, h, split) items for twice the
 * threads, with at least 4 chunks per split. longest_kv is the longest kv
 * length of the batch. */
int64_t flex_cpu_decode_splits(int64_t B, int64_t Hq, int64_t Lq, int64_t longest_kv, int chunk,
                               int threads, int hint);

/* Rounds v up to a multiple of m (v >= 0, m > 0). */
static inline int64_t cpu_round_up(int64_t v, int64_t m) {
    return (v + m - 1) / m * m;
}

/* The scratch arrays of one thread in a single allocation:
 * array i gets sizes[i] floats, starts on a 64-byte boundary (aligned panel
 * loads) and is zero (padding lanes never hold stale NaN patterns).
 * *dst[i] points into the block returned in *block, which the caller frees
 * with free(). Returns 0, or -1 when out of memory (nothing allocated).
 * (cpu_scratch.c) */
int cpu_scratch_carve(int n, const size_t *sizes, float **const *dst, void **block);

/* Backward (cpu_backward.c). */
flex_status flex_cpu_backward(flex_context *ctx, const flex_backward_args *args);

/* Probabilities far below a row's largest (long rows under ALiBi, say) are
 * subnormal floats, and on x86 every multiply that meets one takes a slow
 * microcode path. The forward's and backward's threads run with subnormals
 * flushed to zero (FTZ and DAZ) and restore the caller's state afterwards;
 * a term below 1.2e-38 of the row's largest cannot change an f32 result.
 * Mods are the exception: every mod evaluation (tile interpreter, point
 * evaluator, interval analysis) is bracketed by cpu_mods_begin/end, which
 * keep subnormals, so a mod computes the same bits here as in block-mask
 * building and on the GPU (core/fpenv.h). */
static inline unsigned cpu_subnormals_off(void) {
    return flex_fp_flush_begin();
}
static inline void cpu_subnormals_restore(unsigned saved) {
    flex_fp_restore(saved);
}
static inline unsigned cpu_mods_begin(void) {
    return flex_fp_mods_begin();
}
static inline void cpu_mods_end(unsigned saved) {
    flex_fp_restore(saved);
}

/* The first buffer read out of range seen by any thread of a parallel region
 * (cpu_failure.c); zero-initialise. record keeps the first one only; seen
 * may be polled by every thread to stop early. After the region, `failed`
 * is plain to read and flex_fail_bounds(ctx, mod, &err) reports it. */
typedef struct cpu_bounds_failure {
    int failed;
    const flex_mod *mod;
    mod_bounds_error err;
} cpu_bounds_failure;

void cpu_bounds_failure_record(cpu_bounds_failure *f, const flex_mod *mod,
                               const mod_bounds_error *err);
int cpu_bounds_failure_seen(cpu_bounds_failure *f);

/*
 * Writes the class (FLEX_BLOCK_EMPTY / _PARTIAL / _FULL) of every kv block of
 * q-block row qb of (b, h) into classes[0 .. mask->num_kv_blocks). b and h are
 * attention coordinates; broadcast mask dims are mapped to 0. mask NULL means
 * every block is full.
 */
void flex_cpu_block_row_classes(const struct flex_block_mask *mask, int64_t num_kv_blocks,
                                int64_t b, int64_t h, int64_t qb, uint8_t *classes);

/* ---- micro-kernels ---- */

/* Register-block sizes every kernel family shares. Scratch tiles are padded
 * to these multiples, so kernels never see ragged edges. */
enum {
    CPU_MR = 8,       /* rows of a register block */
    CPU_NR = 32,      /* columns of a K panel (and the wide V panel) */
    CPU_DV_ALIGN = 16 /* Dv is padded to a multiple of this; the last V panel may be 16 wide */
};

typedef struct cpu_kernels {
    const char *name;
    /* s[r * nk + c] = scale * sum_k q[r * d + k] * kp[panel(c)][k][c % 32]:
     * mq a multiple of CPU_MR, nk of CPU_NR; kp holds nk / 32 panels of d x 32
     * floats, one after another. (scores_ld with lds = nk.) */
    void (*scores)(int mq, int nk, int d, const float *q, const float *kp, float scale, float *s);
    /* o[r * dvp + c] = alpha[r] * o[r * dvp + c] + sum_n p[r * nk + n] * v(n, c):
     * v is packed in panels of 32 columns (the last one 16 when dvp % 32 ==
     * 16); panel i starts at vp + i * 32 * nk and is nk rows of its width.
     * (accumulate_rows with ldp = nk, row0 = 0.) */
    void (*accumulate)(int mq, int nk, int dvp, const float *p, const float *vp, const float *alpha,
                       float *o);
    /* scores with a row stride: s[r * lds + c] for c < n (a multiple of
     * CPU_NR), kp holding n / 32 panels. */
    void (*scores_ld)(int mq, int n, int d, const float *q, const float *kp, float scale, float *s,
                      int lds);
    /* accumulate over V rows row0 .. row0+n-1 of panels packed for nk rows:
     * o[r][c] = alpha[r] * o[r][c] + sum_{j < n} p[r * ldp + j] * v(row0 + j, c). */
    void (*accumulate_rows)(int mq, int n, int dvp, const float *p, int ldp, const float *vp,
                            int nk, int row0, const float *alpha, float *o);
    /* Largest of x[0..n) (n a multiple of 16); -inf when all are. */
    float (*row_max)(const float *x, int n);
    /* x[i] = exp(x[i] - shift) for i < n (n a multiple of 16); returns the
     * sum. exp(-inf) is exactly 0; relative error about 1 ulp. */
    float (*exp_sum)(float *x, int n, float shift);
    /* x[i] = -inf wherever keep[i] is 0, for i < n (any n >= 0); keep holds
     * 0 or 1. One pass of vector blends instead of a scalar store per masked
     * element (those would also stall the vector loads that follow). */
    void (*mask_scores)(float *x, const uint8_t *keep, int n);
} cpu_kernels;

extern const cpu_kernels flex_cpu_kernels_portable;
/* NULL when the library was built without AVX-512 support. */
const cpu_kernels *flex_cpu_kernels_avx512(void);

/* The kernels for a FLEX_PLAN_SIMD_* choice on this CPU (never NULL). */
const cpu_kernels *flex_cpu_select_kernels(int simd);

#endif /* FLEXATTN_CPU_H */
