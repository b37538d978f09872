/*
 * The first buffer read out of range seen by any thread of the forward's or
 * the backward's parallel region (cpu.h). Threads check it between tiles to
 * stop early; the call then fails naming the mod, the buffer and the index.
 */
#include "cpu.h"

void cpu_bounds_failure_record(cpu_bounds_failure *f, const flex_mod *mod,
                               const mod_bounds_error *err) {
#ifdef _OPENMP
#pragma omp critical(flex_cpu_bounds_failure)
#endif
    {
        if (!f->failed) {
            f->mod = mod;
            if (err) f->err = *err;
#ifdef _OPENMP
#pragma omp atomic write
#endif
            f->failed = 1;
        }
    }
}

int cpu_bounds_failure_seen(cpu_bounds_failure *f) {
    int seen;
#ifdef _OPENMP
#pragma omp atomic read
#endif
    seen = f->failed;
    return seen;
}
