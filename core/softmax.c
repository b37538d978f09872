/*
 * Online softmax state (see softmax.h for the rules).
 */
#include <math.h>

#include "softmax.h"

void flex_softmax_init(float *m, float *l, int n) {
    for (int i = 0; i < n; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
    }
}
