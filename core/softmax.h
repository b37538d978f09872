/*
 * The online-softmax rule every backend follows.
 *
 * State per query row: the running maximum m of the scores seen so far, the
 * running sum l of exp(score - m), and an accumulator o of exp(score - m) * v.
 * A row that has seen only -inf scores has m == -inf and l == 0; the rules
 * below keep such rows free of NaN (their output is 0 and their LSE -inf).
 *
 * NaN propagates as in PyTorch: a kept score that is NaN or +inf makes l NaN
 * (exp(NaN - m) is NaN; a +inf score makes m +inf and exp(inf - inf) NaN),
 * and a NaN l stays NaN through every later update (NaN * alpha + sum). The
 * row's output (o / l) and LSE are then NaN. The running max may skip a NaN
 * score (fmaxf and `s > m` both do); the sum never does, so no backend needs
 * a NaN test in its inner loop, only the `l == 0` test of the epilogue.
 */
#ifndef FLEXATTN_SOFTMAX_H
#define FLEXATTN_SOFTMAX_H

#include <math.h>

/* The value subtracted from scores before exp: m itself, or 0 when m is
 * -inf, so exp(-inf - 0) == 0 instead of exp(-inf + inf) == NaN. */
static inline float flex_softmax_shift(float m) {
    return m == -INFINITY ? 0.0f : m;
}

/* Factor that rescales state kept relative to m_old so it is relative to
 * m_new (m_new >= m_old): exp(m_old - shift(m_new)); 0 when m_old is -inf. */
static inline float flex_softmax_rescale(float m_old, float m_new) {
    if (m_old == -INFINITY) return 0.0f;
    return expf(m_old - flex_softmax_shift(m_new));
}

/* Natural-log sum of exp of the scores: m + log(l), -inf when l == 0 (no
 * kept score), NaN when l is NaN. */
static inline float flex_softmax_lse(float m, float l) {
    if (l == 0.0f) return -INFINITY;
    return m + logf(l);
}

/* The factor that normalises a row's accumulator: 1 / l, 0 for a row with
 * no kept score (its accumulator is 0), NaN when l is NaN. */
static inline float flex_softmax_inverse(float l) {
    return l == 0.0f ? 0.0f : 1.0f / l;
}

/* Initialises n rows of state: m = -inf, l = 0. */
void flex_softmax_init(float *m, float *l, int n);

#endif /* FLEXATTN_SOFTMAX_H */
