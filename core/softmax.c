/*
 * Online softmax and LSE merges (see softmax.h for the rules).
 */
#include <math.h>

#include "softmax.h"

void flex_softmax_init(float *m, float *l, int n) {
    for (int i = 0; i < n; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
    }
}

float flex_softmax_update_row(float *m, float *l, float *s, int n) {
    float m_new = *m;
    for (int i = 0; i < n; i++)
        if (s[i] > m_new) m_new = s[i];
    float alpha = flex_softmax_rescale(*m, m_new);
    float shift = flex_softmax_shift(m_new);
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        s[i] = expf(s[i] - shift);
        sum += s[i];
    }
    *l = *l * alpha + sum;
    *m = m_new;
    return alpha;
}

void flex_lse_merge(int dv, const float *o_a, float lse_a, const float *o_b, float lse_b, float *o,
                    float *lse) {
    float top = lse_a > lse_b ? lse_a : lse_b;
    if (lse_a != lse_a || lse_b != lse_b) top = NAN; /* a NaN part makes the row NaN */
    if (top == -INFINITY) {
        for (int c = 0; c < dv; c++)
            o[c] = 0.0f;
        *lse = -INFINITY;
        return;
    }
    /* Weights relative to the larger LSE, so neither exp overflows. */
    float wa = expf(lse_a - top), wb = expf(lse_b - top);
    float total = wa + wb;
    for (int c = 0; c < dv; c++)
        o[c] = (wa * o_a[c] + wb * o_b[c]) / total;
    *lse = top + logf(total);
}

void flex_lse_merge_many(int dv, int parts, const float *o_parts, int ld, const float *lse_parts,
                         float *o, float *lse) {
    float top = -INFINITY;
    int nan_part = 0;
    for (int i = 0; i < parts; i++) {
        if (lse_parts[i] > top) top = lse_parts[i];
        nan_part |= lse_parts[i] != lse_parts[i];
    }
    if (nan_part) { /* a NaN part makes the row NaN */
        for (int c = 0; c < dv; c++)
            o[c] = NAN;
        *lse = NAN;
        return;
    }
    for (int c = 0; c < dv; c++)
        o[c] = 0.0f;
    if (top == -INFINITY) {
        *lse = -INFINITY;
        return;
    }
    float total = 0.0f;
    for (int i = 0; i < parts; i++) {
        float w = expf(lse_parts[i] - top);
        if (w == 0.0f) continue;
        total += w;
        for (int c = 0; c < dv; c++)
            o[c] += w * o_parts[(long)i * ld + c];
    }
    for (int c = 0; c < dv; c++)
        o[c] /= total;
    *lse = top + logf(total);
}
