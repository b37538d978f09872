/*
 * Per-thread scratch of the CPU paths (forward, decode, backward): their
 * float arrays carved out of one aligned allocation.
 */
#include <stdlib.h>
#include <string.h>

#include "cpu.h"

int cpu_scratch_carve(int n, const size_t *sizes, float **const *dst, void **block) {
    size_t total = 0;
    for (int i = 0; i < n; i++)
        total += (size_t)cpu_round_up((int64_t)sizes[i], 16);
    float *base = NULL;
    if (posix_memalign((void **)&base, 64, (total ? total : 16) * sizeof(float)) != 0) return -1;
    memset(base, 0, total * sizeof(float));
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        *dst[i] = base + at;
        at += (size_t)cpu_round_up((int64_t)sizes[i], 16);
    }
    *block = base;
    return 0;
}
