/*
 * AVX-512F + FMA micro-kernels. The file is compiled for the generic target
 * like the rest of the library; the functions below carry the AVX-512 target
 * through a pragma, and flex_cpu_kernels_avx512() hands them out only when
 * the running CPU has the instructions, so the library still runs anywhere.
 *
 * Register blocking: a block of 8 rows x 32 columns keeps 16 accumulators in
 * zmm registers; per step of the reduction it loads two 16-float vectors of
 * the packed panel and broadcasts 8 scalars, for 16 FMAs (the two FMA ports
 * stay busy while the loads fit in the two load ports).
 */
#include <math.h>
#include <stddef.h>

#include "cpu.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FLEX_CPU_HAVE_AVX512_KERNELS 1
#endif

#ifdef FLEX_CPU_HAVE_AVX512_KERNELS

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#endif

#include <immintrin.h>

#define ROWS8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)

static void scores_avx512(int mq, int n, int d, const float *q, const float *kp, float scale,
                          float *s, int lds) {
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int p = 0; p < n / CPU_NR; p++) {
        const float *panel = kp + (size_t)p * d * CPU_NR;
        for (int r0 = 0; r0 < mq; r0 += CPU_MR) {
            const float *qr = q + (size_t)r0 * d;
#define DECL(r) __m512 a##r##0 = _mm512_setzero_ps(), a##r##1 = _mm512_setzero_ps();
            ROWS8(DECL)
#undef DECL
            for (int k = 0; k < d; k++) {
                const __m512 b0 = _mm512_load_ps(panel + (size_t)k * CPU_NR);
                const __m512 b1 = _mm512_load_ps(panel + (size_t)k * CPU_NR + 16);
#define STEP(r)                                                                                    \
    {                                                                                              \
        const __m512 x = _mm512_set1_ps(qr[(size_t)(r)*d + k]);                                    \
        a##r##0 = _mm512_fmadd_ps(x, b0, a##r##0);                                                 \
        a##r##1 = _mm512_fmadd_ps(x, b1, a##r##1);                                                 \
    }
                ROWS8(STEP)
#undef STEP
            }
#define STORE(r)                                                                                   \
    {                                                                                              \
        float *dst = s + (size_t)(r0 + (r)) * lds + p * CPU_NR;                                    \
        _mm512_storeu_ps(dst, _mm512_mul_ps(a##r##0, vscale));                                     \
        _mm512_storeu_ps(dst + 16, _mm512_mul_ps(a##r##1, vscale));                                \
    }
            ROWS8(STORE)
#undef STORE
        }
    }
}

static void accumulate_avx512(int mq, int n, int dvp, const float *p, int ldp, const float *vp,
                              int nk, int row0, const float *alpha, float *o) {
    int c0 = 0;
    for (; c0 + CPU_NR <= dvp; c0 += CPU_NR) {
        const float *panel = vp + (size_t)c0 * nk + (size_t)row0 * CPU_NR;
        for (int r0 = 0; r0 < mq; r0 += CPU_MR) {
            const float *pr = p + (size_t)r0 * ldp;
            float *orow = o + (size_t)r0 * dvp + c0;
#define DECL(r)                                                                                    \
    const __m512 al##r = _mm512_set1_ps(alpha[r0 + (r)]);                                          \
    __m512 a##r##0 = _mm512_mul_ps(al##r, _mm512_loadu_ps(orow + (size_t)(r)*dvp));                \
    __m512 a##r##1 = _mm512_mul_ps(al##r, _mm512_loadu_ps(orow + (size_t)(r)*dvp + 16));
            ROWS8(DECL)
#undef DECL
            for (int j = 0; j < n; j++) {
                const __m512 b0 = _mm512_load_ps(panel + (size_t)j * CPU_NR);
                const __m512 b1 = _mm512_load_ps(panel + (size_t)j * CPU_NR + 16);
#define STEP(r)                                                                                    \
    {                                                                                              \
        const __m512 x = _mm512_set1_ps(pr[(size_t)(r)*ldp + j]);                                  \
        a##r##0 = _mm512_fmadd_ps(x, b0, a##r##0);                                                 \
        a##r##1 = _mm512_fmadd_ps(x, b1, a##r##1);                                                 \
    }
                ROWS8(STEP)
#undef STEP
            }
#define STORE(r)                                                                                   \
    _mm512_storeu_ps(orow + (size_t)(r)*dvp, a##r##0);                                             \
    _mm512_storeu_ps(orow + (size_t)(r)*dvp + 16, a##r##1);
            ROWS8(STORE)
#undef STORE
        }
    }
    if (c0 < dvp) { /* the last panel is 16 wide */
        const float *panel = vp + (size_t)c0 * nk + (size_t)row0 * 16;
        for (int r0 = 0; r0 < mq; r0 += CPU_MR) {
            const float *pr = p + (size_t)r0 * ldp;
            float *orow = o + (size_t)r0 * dvp + c0;
#define DECL(r)                                                                                    \
    __m512 a##r =                                                                                  \
        _mm512_mul_ps(_mm512_set1_ps(alpha[r0 + (r)]), _mm512_loadu_ps(orow + (size_t)(r)*dvp));
            ROWS8(DECL)
#undef DECL
            for (int j = 0; j < n; j++) {
                const __m512 b0 = _mm512_load_ps(panel + (size_t)j * 16);
#define STEP(r) a##r = _mm512_fmadd_ps(_mm512_set1_ps(pr[(size_t)(r)*ldp + j]), b0, a##r);
                ROWS8(STEP)
#undef STEP
            }
#define STORE(r) _mm512_storeu_ps(orow + (size_t)(r)*dvp, a##r);
            ROWS8(STORE)
#undef STORE
        }
    }
}

static void scores_avx512_dense(int mq, int nk, int d, const float *q, const float *kp, float scale,
                                float *s) {
    scores_avx512(mq, nk, d, q, kp, scale, s, nk);
}

static void accumulate_avx512_dense(int mq, int nk, int dvp, const float *p, const float *vp,
                                    const float *alpha, float *o) {
    accumulate_avx512(mq, nk, dvp, p, nk, vp, nk, 0, alpha, o);
}

static float row_max_avx512(const float *x, int n) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int i = 0; i < n; i += 16)
        m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
    return _mm512_reduce_max_ps(m);
}

/* exp(x): n = round(x / ln 2), r = x - n ln 2 (two-part ln 2), a degree-7
 * Taylor polynomial for exp(r) (truncation below 1e-8 relative on
 * |r| <= ln2/2), then scalef multiplies by 2^n with correct underflow to 0.
 * Inputs are clamped to [-104, 88]: exp(-104) rounds to 0, so -inf gives
 * exactly 0; NaN passes through the clamps (max/min return their second
 * operand when either is NaN) and stays NaN. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
    x = _mm512_min_ps(_mm512_set1_ps(88.0f), x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 poly = _mm512_set1_ps(1.0f / 5040.0f);
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 720.0f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 120.0f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 24.0f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 6.0f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(0.5f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(poly, n);
}

static float exp_sum_avx512(float *x, int n, float shift) {
    const __m512 vshift = _mm512_set1_ps(shift);
    __m512 sum = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), vshift));
        _mm512_storeu_ps(x + i, e);
        sum = _mm512_add_ps(sum, e);
    }
    return _mm512_reduce_add_ps(sum);
}

/* 16 keep bytes widen to 16 lanes; lanes whose byte is 0 take -inf. */
static void mask_scores_avx512(float *x, const uint8_t *keep, int n) {
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512i k = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(keep + i)));
        const __mmask16 attend = _mm512_test_epi32_mask(k, k);
        _mm512_storeu_ps(x + i, _mm512_mask_blend_ps(attend, neg_inf, _mm512_loadu_ps(x + i)));
    }
    for (; i < n; i++)
        x[i] = keep[i] ? x[i] : -INFINITY;
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

static const cpu_kernels kernels_avx512 = {
    .name = "avx512",
    .scores = scores_avx512_dense,
    .accumulate = accumulate_avx512_dense,
    .scores_ld = scores_avx512,
    .accumulate_rows = accumulate_avx512,
    .row_max = row_max_avx512,
    .exp_sum = exp_sum_avx512,
    .mask_scores = mask_scores_avx512,
};

const cpu_kernels *flex_cpu_kernels_avx512(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) return &kernels_avx512;
    return NULL;
}

#else /* no AVX-512 kernels in this build */

const cpu_kernels *flex_cpu_kernels_avx512(void) {
    return NULL;
}

#endif
