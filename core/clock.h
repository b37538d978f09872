/*
 * Monotonic wall-clock time in milliseconds and the ordering that sorts
 * timings for a median: for build times (block masks, kernel compiles) and
 * for the `flexattn` command and the benchmarks. Header-only.
 */
#ifndef FLEXATTN_CLOCK_H
#define FLEXATTN_CLOCK_H

#include <time.h>

static inline double flex_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

/* qsort comparator for doubles, ascending. */
static inline int flex_compare_doubles(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

#endif /* FLEXATTN_CLOCK_H */
