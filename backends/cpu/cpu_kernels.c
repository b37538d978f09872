/*
 * Portable micro-kernels: plain C written so that the compiler vectorises
 * the inner loops for whatever SIMD the build targets. They follow the same
 * packed layouts as the AVX-512 kernels (cpu.h) and are the fallback on CPUs
 * without AVX-512, and on other architectures.
 */
#include <math.h>
#include <string.h>

#include "plan.h"
#include "cpu.h"

static void scores_portable(int mq, int n, int d, const float *q, const float *kp, float scale,
                            float *s, int lds) {
    for (int p = 0; p < n / CPU_NR; p++) {
        const float *panel = kp + (size_t)p * d * CPU_NR;
        for (int r0 = 0; r0 < mq; r0 += CPU_MR) {
            float acc[CPU_MR][CPU_NR];
            memset(acc, 0, sizeof acc);
            for (int k = 0; k < d; k++) {
                const float *krow = panel + (size_t)k * CPU_NR;
                for (int r = 0; r < CPU_MR; r++) {
                    float x = q[(size_t)(r0 + r) * d + k];
                    for (int c = 0; c < CPU_NR; c++)
                        acc[r][c] += x * krow[c];
                }
            }
            for (int r = 0; r < CPU_MR; r++) {
                float *dst = s + (size_t)(r0 + r) * lds + p * CPU_NR;
                for (int c = 0; c < CPU_NR; c++)
                    dst[c] = acc[r][c] * scale;
            }
        }
    }
}

static void accumulate_portable(int mq, int n, int dvp, const float *p, int ldp, const float *vp,
                                int nk, int row0, const float *alpha, float *o) {
    for (int c0 = 0; c0 < dvp; c0 += CPU_NR) {
        int w = dvp - c0 >= CPU_NR ? CPU_NR : dvp - c0;
        const float *panel = vp + (size_t)c0 * nk + (size_t)row0 * w;
        for (int r0 = 0; r0 < mq; r0 += CPU_MR) {
            float acc[CPU_MR][CPU_NR];
            for (int r = 0; r < CPU_MR; r++)
                for (int c = 0; c < w; c++)
                    acc[r][c] = alpha[r0 + r] * o[(size_t)(r0 + r) * dvp + c0 + c];
            for (int j = 0; j < n; j++) {
                const float *vrow = panel + (size_t)j * w;
                for (int r = 0; r < CPU_MR; r++) {
                    float x = p[(size_t)(r0 + r) * ldp + j];
                    for (int c = 0; c < w; c++)
                        acc[r][c] += x * vrow[c];
                }
            }
            for (int r = 0; r < CPU_MR; r++)
                for (int c = 0; c < w; c++)
                    o[(size_t)(r0 + r) * dvp + c0 + c] = acc[r][c];
        }
    }
}

static void scores_portable_dense(int mq, int nk, int d, const float *q, const float *kp,
                                  float scale, float *s) {
    scores_portable(mq, nk, d, q, kp, scale, s, nk);
}

static void accumulate_portable_dense(int mq, int nk, int dvp, const float *p, const float *vp,
                                      const float *alpha, float *o) {
    accumulate_portable(mq, nk, dvp, p, nk, vp, nk, 0, alpha, o);
}

static float row_max_portable(const float *x, int n) {
    float m = -INFINITY;
    for (int i = 0; i < n; i++)
        m = x[i] > m ? x[i] : m;
    return m;
}

/* exp by range reduction to r in [-ln2/2, ln2/2] and a degree-7 Taylor
 * polynomial (truncation error below 1e-8 relative); 2^n is built from the
 * exponent bits. Results below FLT_MIN are flushed to 0, which cannot change
 * a softmax row (its largest term is exp(0) = 1). */
static inline float exp_portable(float x) {
    if (x != x) return x;
    if (x < -87.3f) return 0.0f;
    if (x > 88.0f) x = 88.0f;
    const float round_magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float n = (x * 1.44269504088896341f + round_magic) - round_magic;
    float r = x - n * 0.693145751953125f;
    r = r - n * 1.428606765330187045e-06f;
    float poly = 1.0f / 5040.0f;
    poly = poly * r + 1.0f / 720.0f;
    poly = poly * r + 1.0f / 120.0f;
    poly = poly * r + 1.0f / 24.0f;
    poly = poly * r + 1.0f / 6.0f;
    poly = poly * r + 0.5f;
    poly = poly * r + 1.0f;
    poly = poly * r + 1.0f;
    int32_t e = (int32_t)n + 127;
    uint32_t bits = (uint32_t)e << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return poly * two_n;
}

static float exp_sum_portable(float *x, int n, float shift) {
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = exp_portable(x[i] - shift);
        sum += x[i];
    }
    return sum;
}

static void mask_scores_portable(float *x, const uint8_t *keep, int n) {
    for (int i = 0; i < n; i++)
        x[i] = keep[i] ? x[i] : -INFINITY;
}

const cpu_kernels flex_cpu_kernels_portable = {
    .name = "portable",
    .scores = scores_portable_dense,
    .accumulate = accumulate_portable_dense,
    .scores_ld = scores_portable,
    .accumulate_rows = accumulate_portable,
    .row_max = row_max_portable,
    .exp_sum = exp_sum_portable,
    .mask_scores = mask_scores_portable,
};

const cpu_kernels *flex_cpu_select_kernels(int simd) {
    const cpu_kernels *avx512 = flex_cpu_kernels_avx512();
    if (simd == FLEX_PLAN_SIMD_PORTABLE || !avx512) return &flex_cpu_kernels_portable;
    return avx512;
}
